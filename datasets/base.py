"""Domains: a registry of builders, seeded stratified splits, target-label budgets.

A *domain* is a named builder returning :class:`DomainData` (all images of the domain as uint8
tensors with labels). The framework splits it into train / val / test with a seeded, stratified
split (or the builder's own fixed split, e.g. held-out fonts), and the *label budget* picks the
labeled part of target train deterministically.

Tensor format of the offline digits domains: uint8 ``N x C x 28 x 28`` with C = 1 (grayscale) or 3;
:meth:`TensorSplit.to_input` turns a batch into float ``N x 3 x 28 x 28`` in [-1, 1] on the device.
Image-file datasets (Office-31 etc.) return :class:`~dalab.datasets.images.ImageData` instead, whose
``take`` gives lazy :class:`~dalab.datasets.images.ImageSplit` s with the same split API.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from dalab.utils import DalabError

SPLITS = ("train", "val", "test")


@dataclass
class DomainData:
    """All images of a domain. ``split`` (optional, values 0/1/2 = train/val/test) overrides the
    random split, for domains whose test set must differ in kind (e.g. unseen fonts)."""

    images: Tensor  # uint8 N x C x H x W
    labels: Tensor  # int64 N
    classes: list[str]
    split: Tensor | None = None
    info: dict = field(default_factory=dict)

    def take(self, idx: np.ndarray, device: torch.device | str = "cpu") -> "TensorSplit":
        """The samples ``idx`` as one on-device split (image domains return a lazy split instead)."""
        i = torch.as_tensor(idx, dtype=torch.long)
        return TensorSplit(self.images[i], self.labels[i], device)


@dataclass(frozen=True)
class DomainSpec:
    name: str
    builder: Callable[..., DomainData]
    family: str
    description: str
    hidden: bool = False  # test-only domains are not listed in benchmarks
    display: str = ""     # name in tables and figures ("UCI digits"); the registry name stays the CLI's
    image_size: int = 28  # side of the square images the model sees (digits 28, image folders 224)


DOMAINS: dict[str, DomainSpec] = {}


def register_domain(family: str, hidden: bool = False, display: str = "", image_size: int = 28):
    """Register a domain builder; the function's name is the domain's name (written once);
    ``display`` is its name in tables and figures (default: the registry name); ``image_size`` the
    side of the square images the model sees (backbones are checked against it)."""

    def deco(fn: Callable[..., DomainData]) -> Callable[..., DomainData]:
        name = fn.__name__
        if name in DOMAINS:
            raise ValueError(f"domain {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        DOMAINS[name] = DomainSpec(name, fn, family, doc[0] if doc else "", hidden, display or name, image_size)
        return fn

    return deco


def closest(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` or an empty string."""
    m = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {m[0]!r}?)" if m else ""


def get_domain(name: str) -> DomainSpec:
    if name not in DOMAINS:
        shown = sorted(n for n, d in DOMAINS.items() if not d.hidden)  # test-only domains stay out of sight
        raise DalabError(f"unknown domain {name!r}{closest(name, shown)}; "
                         f"known domains: {', '.join(shown)} (see `dalab list`)")
    return DOMAINS[name]


def fingerprint(data) -> str:
    """A content hash of a built domain (``sha256:<16 hex>``): images (or, for image folders, the
    file paths), labels, classes and any fixed split. Two builds with the same fingerprint hold
    the same data; the cache checks it, and a run's data can be identified by it."""
    h = hashlib.sha256()
    h.update(json.dumps(list(data.classes)).encode())
    images = getattr(data, "images", None)
    if isinstance(images, Tensor):
        h.update(json.dumps([str(images.dtype), list(images.shape)]).encode())
        h.update(images.contiguous().numpy().tobytes())
    else:  # files on disk: their list (contents are the user's folder)
        h.update(json.dumps(list(getattr(data, "paths", []))).encode())
    for t in (data.labels, data.split):
        h.update(b"-" if t is None else t.contiguous().numpy().astype(np.int64).tobytes())
    return "sha256:" + h.hexdigest()[:16]


# --------------------------------------------------------------------------- splits and budgets

def stratified_split(labels: np.ndarray, seed: int, fractions=(0.7, 0.15, 0.15)) -> np.ndarray:
    """Assign each sample to train/val/test (0/1/2), stratified by class, deterministic in ``seed``.

    Per class: shuffle with a seed-derived generator, cut by the fractions (rounded), so every
    class appears in every split whenever it has at least 3 samples.
    """
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = max(1, round(fractions[1] * len(idx))) if len(idx) >= 3 else 0
        n_test = max(1, round(fractions[2] * len(idx))) if len(idx) >= 3 else 0
        n_train = len(idx) - n_val - n_test
        out[idx[:n_train]] = 0
        out[idx[n_train:n_train + n_val]] = 1
        out[idx[n_train + n_val:]] = 2
    return out


def parse_budget(budget: str | int) -> int | None:
    """Target-label budget: ``0`` (unsupervised), ``k`` labels per class, or ``"all"`` (None)."""
    if isinstance(budget, str) and budget.strip().lower() == "all":
        return None
    try:
        k = int(budget)
    except (TypeError, ValueError):
        raise DalabError(f"bad target-label budget {budget!r}: use 0 (unsupervised), "
                         f"a number k of labels per class, or 'all'") from None
    if k < 0:
        raise DalabError(f"bad target-label budget {k}: must be >= 0 (or 'all')")
    return k


def budget_name(budget: str | int) -> str:
    k = parse_budget(budget)
    return "all" if k is None else str(k)


def labeled_indices(labels: np.ndarray, budget: str | int, seed: int) -> np.ndarray:
    """Indices (into ``labels``) of the labeled target samples for a budget, deterministic in seed."""
    k = parse_budget(budget)
    if k is None:
        return np.arange(len(labels))
    if k == 0:
        return np.arange(0)
    rng = np.random.default_rng(seed + 7919)  # offset: not the same stream as the split
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < k:
            raise DalabError(f"target-label budget {k} per class is larger than class {c}'s "
                             f"{len(idx)} target-train samples; use at most {len(idx)} or 'all'")
        picked.append(np.sort(rng.choice(idx, size=k, replace=False)))
    return np.sort(np.concatenate(picked))


# --------------------------------------------------------------------------- on-device splits

class TensorSplit:
    """One split of a tensor domain, held on the training device, batched by indexing there."""

    def __init__(self, images: Tensor, labels: Tensor, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.memory_format = torch.contiguous_format  # the trainer sets channels_last for conv nets
        self.set_standardization([0.5] * 3, [0.5] * 3)  # inputs in [-1, 1] unless the run says otherwise

    def set_standardization(self, mean: list[float], std: list[float]) -> None:
        """Per-channel mean/std (on [0, 1] pixels) that ``to_input`` normalises with."""
        self.mean, self.std = list(mean), list(std)
        self._mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        self._inv_std = 1.0 / torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "TensorSplit":
        i = torch.as_tensor(idx, dtype=torch.long, device=self.device)
        sub = TensorSplit(self.images[i], self.labels[i], self.device)
        sub.memory_format = self.memory_format
        sub.set_standardization(self.mean, self.std)
        return sub

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one model input (``to_input`` always gives 3 channels)."""
        return (3, *self.images.shape[2:])

    def to_input(self, x: Tensor) -> Tensor:
        """uint8 N x C x H x W -> float N x 3 x H x W, standardised (default: [-1, 1])."""
        return self.normalize(x.float().div_(255.0))

    def normalize(self, x: Tensor) -> Tensor:
        """[0, 1] N x C x H x W (C = 1 or 3) -> standardised N x 3 x H x W model input."""
        x = (x - self._mean) * self._inv_std  # broadcasting turns one grey channel into three
        return x.contiguous(memory_format=self.memory_format)

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The whole split once, in order (evaluation)."""
        for i in range(0, len(self), batch_size):
            yield self.to_input(self.images[i:i + batch_size]), self.labels[i:i + batch_size]

    def sampler(self, batch_size: int, generator: torch.Generator,
                augment: str = "none") -> Iterator[tuple[Tensor, Tensor]]:
        """Infinite shuffled training batches (a fresh permutation per epoch, last partial batch
        dropped unless the split is smaller than one batch), augmented on the device, in batch,
        when ``augment`` is ``light``/``strong`` (:func:`dalab.augment.augment_batch`)."""
        from dalab.augment import augment_batch

        n = len(self)
        if n == 0:
            raise DalabError("cannot sample from an empty split")
        aug_gen = None
        if augment != "none":  # its own device generator, seeded from the stream's
            aug_gen = torch.Generator(device=self.device)
            aug_gen.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))
        while True:
            perm = torch.randperm(n, generator=generator).to(self.device)
            stop = max(n - batch_size + 1, 1)
            for i in range(0, stop, batch_size):
                j = perm[i:i + batch_size]
                x = self.images[j].float().div_(255.0)
                if aug_gen is not None:
                    x = augment_batch(x, augment, aug_gen)
                yield self.normalize(x), self.labels[j]


@dataclass
class DomainSplits:
    """Train / val / test of one domain: :class:`TensorSplit` s, or lazy image splits
    (:class:`~dalab.datasets.images.ImageSplit`) with the same API for datasets read from disk."""

    name: str
    classes: list[str]
    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    origin: str = ""  # where the data came from (a path for disk datasets), for error messages
    fingerprint: str = ""  # content hash of the built domain (:func:`fingerprint`), for the run record

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def splits(self) -> tuple:
        return (self.train, self.val, self.test)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.train.input_shape


def check_same_classes(source: DomainSplits, target: DomainSplits) -> None:
    """DalabError (one line, naming both origins) unless source and target share the class list."""
    if source.classes == target.classes:
        return
    only_s = sorted(set(source.classes) - set(target.classes))
    only_t = sorted(set(target.classes) - set(source.classes))
    what = (f"only in source: {', '.join(only_s[:5]) or '-'}; only in target: {', '.join(only_t[:5]) or '-'}"
            if only_s or only_t else "same names in a different order")
    raise DalabError(f"source {source.name!r} ({source.origin or 'built-in'}) and target {target.name!r} "
                     f"({target.origin or 'built-in'}) have different class lists ({len(source.classes)} vs "
                     f"{len(target.classes)} classes; {what}); both domains need the same class folders/labels")


def restrict_classes(dom: DomainSplits, lut: np.ndarray, unknown_label: int | None = None) -> DomainSplits:
    """``dom`` with only the samples whose class ``lut`` maps to a label (>= 0), relabeled through
    ``lut`` (a task's label set: :meth:`dalab.tasks.LabelSet.source_lut` / ``target_lut``). Its
    class list is the new labels' names in order, ``unknown`` for ``unknown_label``."""
    import dataclasses

    names = {new: "unknown" if new == unknown_label else dom.classes[old]
             for old, new in enumerate(lut.tolist()) if new >= 0}
    parts = {}
    for role, split in zip(SPLITS, dom.splits()):
        y = split.labels.cpu().numpy()
        keep = np.flatnonzero(lut[y] >= 0)
        sub = split.subset(keep)
        sub.labels = torch.as_tensor(lut[y[keep]], dtype=torch.int64, device=sub.labels.device)
        parts[role] = sub
    return dataclasses.replace(dom, classes=[names[i] for i in sorted(names)], **parts)


def concat_domains(name: str, domains: list[DomainSplits]) -> DomainSplits:
    """Several domains with the same classes as one (a multi-source task's pooled source: dalab.tasks),
    each split the domains' splits concatenated in order, grey images widened to three channels
    when the domains differ in channels (the model input is the same: ``to_input`` broadcasts one
    grey channel to three). Its fingerprint hashes the parts' fingerprints, in order."""
    first = domains[0]
    for d in domains[1:]:
        check_same_classes(first, d)
    if not all(isinstance(s, TensorSplit) for d in domains for s in d.splits()):
        raise DalabError(f"several source domains ({', '.join(d.name for d in domains)}) are supported for tensor "
                         f"(digits) domains only, not image folders yet; use one source domain")
    channels = max(d.train.images.shape[1] for d in domains)
    parts = {}
    for i, role in enumerate(SPLITS):
        splits = [d.splits()[i] for d in domains]
        images = torch.cat([s.images.expand(-1, channels, -1, -1) for s in splits])
        parts[role] = TensorSplit(images, torch.cat([s.labels for s in splits]), splits[0].device)
    fp = hashlib.sha256(json.dumps([d.fingerprint for d in domains]).encode()).hexdigest()[:16]
    return DomainSplits(name, list(first.classes), **parts, origin="+".join(d.origin or d.name for d in domains),
                        fingerprint=f"sha256:{fp}")


_BUILT: dict[str, DomainData] = {}
_FINGERPRINTS: dict[str, str] = {}


def load_domain(name: str, split_seed: int = 0, device: torch.device | str = "cpu",
                root: str | None = None) -> DomainSplits:
    """Build (once per process) a registered domain and split it. ``root`` is the data root for
    domains read from disk (builders that take a ``root`` keyword); offline domains ignore it."""
    spec = get_domain(name)
    key = f"{name}@{root}"
    if key not in _BUILT:
        import inspect
        takes_root = "root" in inspect.signature(spec.builder).parameters
        _BUILT[key] = spec.builder(root=root) if takes_root else spec.builder()
        _FINGERPRINTS[key] = fingerprint(_BUILT[key])
    data = _BUILT[key]
    y = data.labels.numpy()
    assign = data.split.numpy() if data.split is not None else stratified_split(y, split_seed)
    parts = {s: data.take(np.flatnonzero(assign == i), device) for i, s in enumerate(SPLITS)}
    return DomainSplits(name, list(data.classes), **parts, origin=str(data.info.get("root", "")),
                        fingerprint=_FINGERPRINTS[key])
