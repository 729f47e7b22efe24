"""Office-31, Office-Home, VisDA-2017 and DomainNet, read from ``--data-root`` (never downloaded).

Domain names are ``<prefix>_<domain>`` with the standard domain names:

=============  ==========================================================  =====================
prefix         domains                                                     folder under root
=============  ==========================================================  =====================
``office31``   amazon, dslr, webcam                                        ``office31/``
``officehome`` Art, Clipart, Product, Real_World                           ``officehome/``
``visda``      train (synthetic renderings), validation (real photos)      ``visda2017/``
``domainnet``  clipart, infograph, painting, quickdraw, real, sketch       ``domainnet/``
=============  ==========================================================  =====================

Each domain is read from the dataset folder in either layout (image list first):

- TLlib image list: ``image_list/<domain>.txt`` (DomainNet: ``<domain>_train.txt`` and
  ``<domain>_test.txt``, in ``image_list/`` or the dataset folder), paths relative to the dataset folder;
- ImageFolder: ``<domain>/<class>/*.jpg`` (Office-31's archive has ``<domain>/images/<class>/``;
  Office-Home's ``Real World`` with a space is accepted too).

Splits: with its official image lists, DomainNet keeps the test list as the test split (val = 15%
of its train list, stratified, fixed seed); everything else gets the usual seeded 70/15/15.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dalab.utils import DalabError

from .base import register_domain
from .images import ImageData, read_image_folder, read_image_list


@dataclass(frozen=True)
class ImageDataset:
    prefix: str
    title: str
    folder: str                      # sub-folder of the data root
    domains: tuple[str, ...]
    url: str
    pairs: tuple[tuple[str, str], ...] = ()   # default: every ordered pair of domains
    official_split: bool = False     # <domain>_train.txt / <domain>_test.txt image lists

    @property
    def where(self) -> str:
        return f"get {self.title} from {self.url}"


DATASETS: dict[str, ImageDataset] = {d.prefix: d for d in (
    ImageDataset("office31", "Office-31", "office31", ("amazon", "dslr", "webcam"),
                 "https://faculty.cc.gatech.edu/~judy/domainadapt/ (image lists: TLlib)"),
    ImageDataset("officehome", "Office-Home", "officehome", ("Art", "Clipart", "Product", "Real_World"),
                 "https://www.hemanthdv.org/officeHomeDataset.html"),
    ImageDataset("visda", "VisDA-2017", "visda2017", ("train", "validation"),
                 "https://github.com/VisionLearningGroup/taskcv-2017-public/tree/master/classification",
                 pairs=(("train", "validation"),)),
    ImageDataset("domainnet", "DomainNet", "domainnet",
                 ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
                 "http://ai.bu.edu/M3SDA/", official_split=True),
)}


def data_root(root: str | os.PathLike | None, what: str, where: str) -> Path:
    """The data root (``--data-root`` or ``$DALAB_DATA_ROOT``); DalabError if unset or missing.
    ``what`` names the dataset and its folder, ``where`` says where to obtain it."""
    root = root or os.environ.get("DALAB_DATA_ROOT")
    if not root:
        raise DalabError(f"{what} is read from disk: pass --data-root DIR (or set DALAB_DATA_ROOT); {where}")
    p = Path(root).expanduser()
    if not p.is_dir():
        raise DalabError(f"data root {p} does not exist: pass --data-root pointing at the folder that "
                         f"holds {what}; {where}")
    return p


def dataset_dir(ds: ImageDataset, root: str | os.PathLike | None) -> Path:
    """``root/<folder>`` (also spelt like ``Office-31`` or ``OfficeHome``), or ``root`` itself when
    it already is the dataset folder."""
    r = data_root(root, f"{ds.title} (folder {ds.folder}/)", ds.where)
    norm = lambda s: "".join(ch for ch in s.lower() if ch.isalnum())  # noqa: E731
    aliases = [c for c in sorted(r.iterdir()) if c.is_dir() and norm(c.name) == ds.folder]
    for cand in (r / ds.folder, *aliases, r):
        if (cand / "image_list").is_dir() or any((cand / d).is_dir() for d in ds.domains):
            return cand
    raise DalabError(f"{ds.title} not found: {r} has no folder {ds.folder}/ with domain folders "
                     f"({', '.join(ds.domains)}) or image_list/; {ds.where}")


def _split_official(y_train: np.ndarray, n_test: int, seed: int = 0, val_fraction: float = 0.15):
    """0/1 (train/val, stratified, fixed seed) for the official train list, 2 for its test list."""
    rng = np.random.default_rng(seed)
    out = np.zeros(len(y_train), dtype=np.int64)
    for c in np.unique(y_train):
        idx = np.flatnonzero(y_train == c)
        out[rng.permutation(idx)[:round(val_fraction * len(idx))]] = 1
    return torch.from_numpy(np.concatenate([out, np.full(n_test, 2)]))


def read_domain(ds: ImageDataset, domain: str, root: str | os.PathLike | None) -> ImageData:
    """One domain of ``ds`` in whichever layout is on disk."""
    d = dataset_dir(ds, root)
    split = None
    lists = [d / "image_list", d]
    if ds.official_split:
        found = [(b / f"{domain}_train.txt", b / f"{domain}_test.txt") for b in lists]
        found = [f for f in found if f[0].is_file() and f[1].is_file()]
        if found:
            tr, te = (read_image_list(f, d, ds.where) for f in found[0])
            if tr[2] != te[2]:
                raise DalabError(f"{found[0][0]} and {found[0][1]} have different classes; use the official lists")
            split = _split_official(np.asarray(tr[1]), len(te[0]))
            paths, labels, classes = tr[0] + te[0], tr[1] + te[1], tr[2]
            return _data(paths, labels, classes, split, found[0][0])
    for b in lists:
        if (b / f"{domain}.txt").is_file():
            return _data(*read_image_list(b / f"{domain}.txt", d, ds.where), split, b / f"{domain}.txt")
    for name in (domain, domain.replace("_", " ")):
        folder = d / name
        if folder.is_dir():
            folder = folder / "images" if (folder / "images").is_dir() else folder
            return _data(*read_image_folder(folder, ds.where), split, folder)
    lst = f"{domain}_train.txt/_test.txt" if ds.official_split else f"{domain}.txt"
    raise DalabError(f"{ds.title} domain {domain!r} not found in {d}: expected {d}/{domain}/<class>/*.jpg "
                     f"or {d}/image_list/{lst}; {ds.where}")


def _data(paths, labels, classes, split, origin: Path) -> ImageData:
    return ImageData(paths, torch.tensor(labels, dtype=torch.int64), classes, split, info={"root": str(origin)})


def _make_builder(ds: ImageDataset, domain: str):
    def build(root: str | None = None) -> ImageData:
        return read_domain(ds, domain, root)

    build.__name__ = build.__qualname__ = f"{ds.prefix}_{domain}"
    build.__doc__ = f"{ds.title} {domain!r} from --data-root ({ds.folder}/), ImageNet-style 3x224x224"
    return build


# names in tables and figures (default: the folder name, capitalised)
_DISPLAY = {"dslr": "DSLR", "Real_World": "Real World", "train": "Synthetic", "validation": "Real"}

for _ds in DATASETS.values():
    for _domain in _ds.domains:
        register_domain(family=_ds.prefix, display=_DISPLAY.get(_domain, _domain[:1].upper() + _domain[1:]),
                        image_size=224)(_make_builder(_ds, _domain))
