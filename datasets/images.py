"""Image-file domains (Office-31, Office-Home, VisDA-2017, DomainNet): read lazily from disk.

These datasets are too large to hold as tensors, so a domain is a list of file paths with labels
(:class:`ImageData`), and each split is an :class:`ImageSplit`: the same duck-typed API as
:class:`~dalab.datasets.base.TensorSplit` (``len``, ``labels``, ``subset``, ``batches``,
``sampler``, ``input_shape``), backed by a ``DataLoader`` that decodes and augments in workers.

Two on-disk layouts are read:

- ImageFolder: ``<domain dir>/<class>/<image>`` (classes = sorted folder names);
- image list (TLlib's): ``image_list/<domain>.txt`` with lines ``<path relative to the dataset dir> <label>``
  (class names = the parent folder of each label's images).

Transforms are ImageNet-style: train = RandomResizedCrop(224) + horizontal flip, test =
Resize(256) + CenterCrop(224); both normalised with ImageNet mean/std.

A file that cannot be decoded does not crash a worker with a multi-line traceback: the worker
returns label ``-1 - index`` and the main process raises a one-line :class:`DalabError` naming it.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from dalab.utils import DalabError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def imagenet_transform(train: bool, size: int = 224, resize: int = 256, augment: str = "light"):
    """ImageNet-style preprocessing: for training, ``light`` = random-resized crop + horizontal flip
    (the ResNet / TLlib protocol), ``strong`` = that + colour jitter, ``none`` = the evaluation
    transform (resize + centre crop); then ImageNet normalisation (what pretrained ResNets expect)."""
    from torchvision import transforms as T

    if not train or augment == "none":
        aug = [T.Resize(resize), T.CenterCrop(size)]
    else:
        aug = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
        if augment == "strong":
            aug.append(T.ColorJitter(0.4, 0.4, 0.4))
    return T.Compose([*aug, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class _Files(torch.utils.data.Dataset):
    """(image, label) pairs decoded with PIL; an unreadable file gives label ``-1 - index``."""

    def __init__(self, paths: list[str], labels: list[int], transform, size: int):
        self.paths, self.labels, self.transform, self.size = paths, labels, transform, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as im:
                img = im.convert("RGB")
        except (OSError, ValueError, SyntaxError):  # missing, truncated, not an image
            return torch.zeros(3, self.size, self.size), -1 - i
        return self.transform(img), self.labels[i]


def loader_workers() -> int:
    """DataLoader workers: ``$DALAB_WORKERS`` or one per spare core, at most 8."""
    env = os.environ.get("DALAB_WORKERS")
    if env is not None:
        return max(0, int(env))
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class ImageSplit:
    """One split of an image-file domain; batches come out decoded, transformed, on ``device``."""

    def __init__(self, paths: list[str], labels: Tensor, device: torch.device | str = "cpu",
                 size: int = 224, resize: int = 256):
        self.paths = list(paths)
        self.device = torch.device(device)
        self.labels = labels.to(torch.int64).to(self.device)
        self.size, self.resize = size, resize
        self.memory_format = torch.contiguous_format  # the trainer sets channels_last for conv nets

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    def subset(self, idx: np.ndarray) -> "ImageSplit":
        sub = ImageSplit([self.paths[i] for i in np.asarray(idx, dtype=np.int64)],
                         self.labels.cpu()[torch.as_tensor(idx, dtype=torch.long)], self.device,
                         self.size, self.resize)
        sub.memory_format = self.memory_format
        return sub

    def _loader(self, batch_size: int, train: bool, generator: torch.Generator | None = None,
                augment: str = "light", shard: tuple[int, int] | None = None):
        workers = loader_workers()
        ds = _Files(self.paths, self.labels.cpu().tolist(),
                    imagenet_transform(train, self.size, self.resize, augment), self.size)
        drop_last = train and len(self) >= batch_size
        batching: dict = {"batch_size": batch_size, "shuffle": train, "drop_last": drop_last}
        if shard is not None:  # the one-process batches (same sampler, same generator), sliced
            batches = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(ds, generator=generator),
                                                    batch_size, drop_last)
            batching = {"batch_sampler": _Slices(batches, *shard), "worker_init_fn": _Reseed(shard[0])}
        return torch.utils.data.DataLoader(
            ds, generator=generator, num_workers=workers, pin_memory=self.device.type == "cuda",
            persistent_workers=train and workers > 0, prefetch_factor=4 if workers > 0 else None, **batching)

    def _to_device(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if (y < 0).any():
            bad = self.paths[-1 - int(y[y < 0][0])]
            raise DalabError(f"cannot read image {bad}: not a readable image file; "
                             f"replace it or remove it from the dataset folder / image list")
        nb = self.device.type == "cuda"
        return (x.to(self.device, non_blocking=nb).contiguous(memory_format=self.memory_format),
                y.to(self.device, non_blocking=nb))

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The whole split once, in order, with test transforms (evaluation)."""
        for x, y in self._loader(batch_size, train=False):
            yield self._to_device(x, y)

    def sampler(self, batch_size: int, generator: torch.Generator, augment: str = "light",
                shard: tuple[int, int] | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Infinite shuffled batches with train transforms (decoded and augmented in workers;
        see :func:`imagenet_transform`); workers persist across epochs. ``shard=(rank, world)``
        (multi-process runs, :mod:`dalab.distributed`): only this rank's contiguous slice of each
        one-process batch is decoded, with its own augmentation draws."""
        if len(self) == 0:
            raise DalabError("cannot sample from an empty split")
        loader = self._loader(batch_size, train=True, generator=generator, augment=augment, shard=shard)
        while True:
            for x, y in loader:
                yield self._to_device(x, y)


class _Slices:
    """Rank ``rank``'s contiguous slice (``torch.tensor_split`` sizes) of every batch of ``batches``."""

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            q, r = divmod(len(b), self.world)
            start = self.rank * q + min(self.rank, r)
            yield b[start:start + q + (self.rank < r)]


class _Reseed:
    """DataLoader worker init: ranks draw different augmentations (a worker's seed is the same on
    every rank, as all ranks share the loader's generator)."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        torch.manual_seed((torch.initial_seed() + 1_000_003 * self.rank) % 2 ** 63)


@dataclass
class ImageData:
    """All images of a file-backed domain (paths, not pixels); ``take`` makes an :class:`ImageSplit`."""

    paths: list[str]
    labels: Tensor  # int64 N
    classes: list[str]
    split: Tensor | None = None
    info: dict = field(default_factory=dict)
    size: int = 224

    def take(self, idx: np.ndarray, device: torch.device | str = "cpu") -> ImageSplit:
        return ImageSplit([self.paths[i] for i in idx], self.labels[torch.as_tensor(idx, dtype=torch.long)],
                          device, self.size)


# --------------------------------------------------------------------------- layouts

def read_image_folder(folder: Path, where: str) -> tuple[list[str], list[int], list[str]]:
    """ImageFolder layout ``folder/<class>/<image>``; ``where`` says where to obtain the data."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise DalabError(f"no class folders in {folder}: expected {folder}/<class>/<image>.jpg ({where})")
    paths, labels = [], []
    for k, c in enumerate(classes):
        files = sorted(str(f) for f in (folder / c).rglob("*") if f.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise DalabError(f"empty class folder {folder / c}: expected images "
                             f"({', '.join(IMAGE_EXTS[:3])}, ...) of class {c!r} ({where})")
        paths += files
        labels += [k] * len(files)
    return paths, labels, classes


def read_image_list(list_file: Path, base: Path, where: str) -> tuple[list[str], list[int], list[str]]:
    """TLlib image-list layout: lines ``<path relative to base> <label>``; class names are the
    parent folder of each label's images; labels must be 0..K-1 with none missing."""
    paths, labels = [], []
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
            raise DalabError(f"bad line {n} in {list_file}: {line.strip()[:60]!r}; expected "
                             f"'<relative/path.jpg> <label>' with an integer label >= 0 ({where})")
        paths.append(str(base / parts[0]))
        labels.append(int(parts[1]))
    if not paths:
        raise DalabError(f"image list {list_file} is empty: expected lines '<relative/path.jpg> <label>' ({where})")
    k = max(labels) + 1
    names: list[Counter] = [Counter() for _ in range(k)]
    for p, y in zip(paths, labels):
        names[y][Path(p).parent.name] += 1
    missing = [i for i in range(k) if not names[i]]
    if missing:
        raise DalabError(f"image list {list_file} has no images of label {missing[0]}: expected every "
                         f"label 0..{k - 1} to appear ({where})")
    return paths, labels, [c.most_common(1)[0][0] for c in names]
