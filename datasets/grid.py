"""Sample grids: one PNG per domain (rows = classes, columns = samples) so a person can look at it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dalab.utils import DalabError

from .base import DOMAINS, load_domain


def offline_domains() -> list[str]:
    """Listed domains that build from pip-package files alone (no ``root`` argument)."""
    import inspect

    return [n for n, d in DOMAINS.items()
            if not d.hidden and "root" not in inspect.signature(d.builder).parameters]


def grid_image(images: torch.Tensor, labels: torch.Tensor, n: int, num_classes: int,
               scale: int = 3, gap: int = 2) -> np.ndarray:
    """uint8 H x W x 3 grid: row c holds the first ``n`` images of class c (blank if fewer)."""
    _, c, h, w = images.shape
    cell_h, cell_w = h * scale + gap, w * scale + gap
    out = np.full((num_classes * cell_h + gap, n * cell_w + gap, 3), 255, dtype=np.uint8)
    for k in range(num_classes):
        idx = torch.nonzero(labels == k).flatten()[:n]
        for j, i in enumerate(idx.tolist()):
            img = images[i].expand(3, -1, -1) if c == 1 else images[i]
            big = img.permute(1, 2, 0).numpy().repeat(scale, 0).repeat(scale, 1)
            y, x = gap + k * cell_h, gap + j * cell_w
            out[y:y + h * scale, x:x + w * scale] = big
    return out


def write_grid(name: str, out_dir: str | Path, n: int = 8, root: str | None = None) -> Path:
    """Write ``out_dir/<name>.png`` from the train split of a tensor domain; returns the path."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    d = load_domain(name, root=root)
    if not hasattr(d.train, "images"):
        raise DalabError(f"{name} is read lazily from image files; show-domains draws tensor domains "
                         f"(the digits ones): open the images under {d.origin} instead")
    path = Path(out_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    img = grid_image(d.train.images.cpu(), d.train.labels.cpu(), n, d.num_classes)
    meta = PngInfo()  # what it shows and the command that made it (read by dalab.results_index)
    meta.add_text("Description", f"Sample grid of the {name} domain ({DOMAINS[name].display}): {n} train images "
                                 "per class, one row per class")
    meta.add_text("Software", f"dalab show-domains {name} --out {Path(out_dir).as_posix()} --n {n}")
    Image.fromarray(img).save(path, pnginfo=meta)
    return path
