"""MNIST, USPS, SVHN (torchvision's dataset classes and file layouts) and MNIST-M, read from disk.

No wheel ships these, so they are read from ``--data-root`` (or ``$DALAB_DATA_ROOT``):

============  =====================================================  ===========================
domain        files                                                  tensor format
============  =====================================================  ===========================
``mnist``     ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``  1 x 28 x 28 (as is)
``usps``      ``<root>/usps/usps.bz2``, ``usps.t.bz2``               1 x 28 x 28 (16x16 -> 20x20 box, MNIST framing)
``svhn``      ``<root>/svhn/{train,test}_32x32.mat``                 3 x 28 x 28 (resized, colour kept)
``mnistm``    ``<root>/mnist_m/mnist_m_{train,test}/*.png`` +        3 x 28 x 28 (resized)
              ``mnist_m_{train,test}_labels.txt`` (lines ``name.png label``)
============  =====================================================  ===========================

torchvision reads the first three with ``download=False``; ``dalab run --download`` (or
``DALAB_DOWNLOAD=1``) lets it fetch them, for users with internet. MNIST-M (Ganin & Lempitsky,
2015) has no torchvision class; it is read from its usual folder + label-file layout.
Splits: the official test set is the test split; val is 15% of the official train set (stratified,
fixed seed). The offline ``mnistm5k`` is a different, MNIST-M-*style* domain.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dalab.utils import DalabError

from .base import DomainData, register_domain
from .digits import DIGIT_CLASSES, mnist_framing
from .office import _split_official, data_root


MNISTM_URL = "http://yaroslav.ganin.net/ (MNIST-M, Ganin & Lempitsky 2015)"


def download_enabled() -> bool:
    """Whether torchvision may download (``dalab run --download`` sets ``DALAB_DOWNLOAD=1``)."""
    return os.environ.get("DALAB_DOWNLOAD", "") == "1"


def _torchvision(cls, root: Path, expected: str, url: str, **kw):
    """Instantiate a torchvision dataset; its "not found" errors become one-line DalabErrors."""
    try:
        return cls(str(root), download=download_enabled(), **kw)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise DalabError(f"{cls.__name__} not found or corrupted in {root}: expected {expected} "
                         f"(torchvision layout); get it from {url} or rerun with --download "
                         f"[{str(e).splitlines()[0][:80]}]") from None


def _resize(x: torch.Tensor, size: int = 28) -> torch.Tensor:
    """uint8 N x C x H x W -> uint8 N x C x size x size (antialiased bilinear)."""
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)


def _domain(train_x, train_y, test_x, test_y, root: Path, source: str) -> DomainData:
    y_tr = torch.as_tensor(np.asarray(train_y), dtype=torch.int64)
    y_te = torch.as_tensor(np.asarray(test_y), dtype=torch.int64)
    return DomainData(torch.cat([train_x, test_x]), torch.cat([y_tr, y_te]), DIGIT_CLASSES,
                      split=_split_official(y_tr.numpy(), len(y_te)), info={"root": str(root), "source": source})


@register_domain(family="digits-disk", display="MNIST")
def mnist(root: str | None = None) -> DomainData:
    """MNIST (70,000) from torchvision's MNIST/raw files under --data-root."""
    from torchvision.datasets import MNIST

    url = "http://yann.lecun.com/exdb/mnist/"
    r = data_root(root, "MNIST (MNIST/raw/)", f"get it from {url} or rerun with --download")
    exp = f"{r}/MNIST/raw/train-images-idx3-ubyte etc."
    tr, te = (_torchvision(MNIST, r, exp, url, train=t) for t in (True, False))
    return _domain(tr.data[:, None], tr.targets, te.data[:, None], te.targets, r, "torchvision MNIST")


@register_domain(family="digits-disk", display="USPS")
def usps(root: str | None = None) -> DomainData:
    """USPS (9,298) from torchvision's usps.bz2 / usps.t.bz2 under --data-root/usps, MNIST framing."""
    from torchvision.datasets import USPS

    url = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass.html#usps"
    r = data_root(root, "USPS (usps/)", f"get it from {url} or rerun with --download") / "usps"
    exp = f"{r}/usps.bz2 and usps.t.bz2"
    tr, te = (_torchvision(USPS, r, exp, url, train=t) for t in (True, False))
    frame = lambda d: mnist_framing(torch.from_numpy(d.data).float().div(255)[:, None])  # noqa: E731
    return _domain(frame(tr), tr.targets, frame(te), te.targets, r, "torchvision USPS")


@register_domain(family="digits-disk", display="SVHN")
def svhn(root: str | None = None) -> DomainData:
    """SVHN (99,289 without 'extra') from torchvision's .mat files under --data-root/svhn, 28x28 colour."""
    from torchvision.datasets import SVHN

    url = "http://ufldl.stanford.edu/housenumbers/"
    r = data_root(root, "SVHN (svhn/)", f"get it from {url} or rerun with --download") / "svhn"
    exp = f"{r}/train_32x32.mat and test_32x32.mat"
    tr, te = (_torchvision(SVHN, r, exp, url, split=s) for s in ("train", "test"))
    img = lambda d: _resize(torch.from_numpy(d.data))  # noqa: E731  (N x 3 x 32 x 32 already)
    return _domain(img(tr), tr.labels, img(te), te.labels, r, "torchvision SVHN")


def _read_mnistm_part(r: Path, part: str) -> tuple[torch.Tensor, list[int]]:
    from PIL import Image

    labels_file, folder = r / f"mnist_m_{part}_labels.txt", r / f"mnist_m_{part}"
    if not labels_file.is_file() or not folder.is_dir():
        raise DalabError(f"MNIST-M not found in {r}: expected {folder}/*.png and {labels_file} "
                         f"(lines 'name.png label'); get it from {MNISTM_URL}")
    imgs, labels = [], []
    for n, line in enumerate(labels_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) > 9:
            raise DalabError(f"bad line {n} in {labels_file}: {line[:60]!r}; expected 'name.png label' with label 0-9")
        try:
            with Image.open(folder / parts[0]) as im:
                imgs.append(np.asarray(im.convert("RGB").resize((28, 28), Image.BILINEAR)))
        except (OSError, ValueError) as e:
            raise DalabError(f"cannot read image {folder / parts[0]} listed in {labels_file}: "
                             f"{type(e).__name__}; replace the file or fix the list") from None
        labels.append(int(parts[1]))
    if not imgs:
        raise DalabError(f"{labels_file} lists no images; expected lines 'name.png label'")
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(), labels


@register_domain(family="digits-disk", display="MNIST-M")
def mnistm(root: str | None = None) -> DomainData:
    """MNIST-M (original, 68,002) from --data-root/mnist_m folders + label files, 28x28 colour."""
    r = data_root(root, "MNIST-M (mnist_m/)", f"get it from {MNISTM_URL}") / "mnist_m"
    (xtr, ytr), (xte, yte) = _read_mnistm_part(r, "train"), _read_mnistm_part(r, "test")
    return _domain(xtr, ytr, xte, yte, r, "MNIST-M folder layout")
