"""Datasets read from disk, on tiny files written here in the real layouts (torchvision's MNIST /
USPS / SVHN formats, MNIST-M's folder + label files, ImageFolder and TLlib image lists), loaded
through the same code path as real data; and every error a user can hit, as one line."""

from __future__ import annotations

import bz2
import hashlib
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from dalab.cli import main
from dalab.datasets import check_same_classes, load_domain
from dalab.utils import DalabError


@pytest.fixture(autouse=True)
def _no_workers(monkeypatch):
    monkeypatch.setenv("DALAB_WORKERS", "0")  # in-process decoding: fast on 2 cores


def _fresh(name, root, **kw):
    """load_domain keeps built domains per process; tmp roots differ per test, so keys never clash."""
    return load_domain(name, root=str(root), **kw)


# --------------------------------------------------------------------------- torchvision formats

def write_idx(path, arr: np.ndarray):
    """MNIST's idx format: magic (0x08 = uint8, ndim), big-endian dims, raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(head + arr.astype(np.uint8).tobytes())


def tiny_digits(n, seed, size=28, channels=None):
    rng = np.random.default_rng(seed)
    shape = (n, size, size) if channels is None else (n, size, size, channels)
    return rng.integers(0, 256, shape).astype(np.uint8), np.arange(n) % 10


def test_mnist_from_torchvision_raw_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    (xtr, ytr), (xte, yte) = tiny_digits(40, 0), tiny_digits(20, 1)
    for prefix, x, y in (("train", xtr, ytr), ("t10k", xte, yte)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
    d = _fresh("mnist", tmp_path)
    assert len(d.test) == 20 and len(d.train) + len(d.val) == 40 and len(d.val) == 10  # 15% of 4/class -> 1
    assert d.train.images.shape[1:] == (1, 28, 28) and d.classes == [str(i) for i in range(10)]
    assert torch.equal(d.test.images[:, 0], torch.from_numpy(xte)) and d.test.labels.tolist() == yte.tolist()


def test_usps_from_torchvision_bz2(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in (("usps.bz2", 30), ("usps.t.bz2", 10)):
        vals = rng.uniform(-1, 1, (n, 256))
        lines = [f"{i % 10 + 1} " + " ".join(f"{j + 1}:{v:.4f}" for j, v in enumerate(row))
                 for i, row in enumerate(vals)]
        (tmp_path / "usps").mkdir(exist_ok=True)
        (tmp_path / "usps" / name).write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
    d = _fresh("usps", tmp_path)
    assert len(d.train) + len(d.val) + len(d.test) == 40 and len(d.test) == 10
    assert d.test.labels.tolist() == list(range(10))  # USPS labels 1..10 -> 0..9
    img = d.train.images
    assert img.shape[1:] == (1, 28, 28) and img[:, :, :4].max() == 0 and img[:, :, 4:24, 4:24].float().mean() > 50


def test_svhn_from_torchvision_mat(tmp_path, monkeypatch):
    from scipy.io import savemat
    from torchvision.datasets import SVHN

    (tmp_path / "svhn").mkdir()
    md5 = {}
    for split, n in (("train", 30), ("test", 10)):
        x, _ = tiny_digits(n, 2, size=32, channels=3)
        y = (np.arange(n) % 10)
        y[y == 0] = 10  # SVHN stores digit 0 as label 10
        f = tmp_path / "svhn" / f"{split}_32x32.mat"
        savemat(f, {"X": x.transpose(1, 2, 3, 0), "y": y[:, None]})
        md5[split] = hashlib.md5(f.read_bytes()).hexdigest()
    # torchvision checks the real files' md5; point it at ours so the rest of its code path runs as is
    monkeypatch.setattr(SVHN, "split_list", {k: [u, f, md5.get(k, m)] for k, (u, f, m) in SVHN.split_list.items()})
    d = _fresh("svhn", tmp_path)
    assert d.train.images.shape[1:] == (3, 28, 28) and len(d.test) == 10
    assert sorted(d.test.labels.tolist()) == list(range(10))


def test_mnistm_from_folder_and_label_files(tmp_path):
    r = tmp_path / "mnist_m"
    for part, n in (("train", 30), ("test", 10)):
        (r / f"mnist_m_{part}").mkdir(parents=True)
        x, y = tiny_digits(n, 3, size=32, channels=3)
        for i in range(n):
            Image.fromarray(x[i]).save(r / f"mnist_m_{part}" / f"{i:08d}.png")
        (r / f"mnist_m_{part}_labels.txt").write_text("".join(f"{i:08d}.png {y[i]}\n" for i in range(n)))
    d = _fresh("mnistm", tmp_path)
    assert d.train.images.shape[1:] == (3, 28, 28) and len(d.test) == 10 and d.origin == str(r)


def test_torchvision_files_missing_is_one_line_error(tmp_path):
    with pytest.raises(DalabError, match=r"data root .*nope does not exist.*USPS \(usps/\); get it from https://"):
        _fresh("usps", tmp_path / "nope")
    with pytest.raises(DalabError, match=r"MNIST not found or corrupted in .*MNIST/raw/train-images-idx3-ubyte.*--download"):
        _fresh("mnist", tmp_path)
    (tmp_path / "svhn").mkdir()
    with pytest.raises(DalabError, match=r"SVHN not found or corrupted in .*train_32x32.mat.*ufldl"):
        _fresh("svhn", tmp_path)
    with pytest.raises(DalabError, match=r"MNIST-M not found in .*mnist_m_train_labels.txt"):
        _fresh("mnistm", tmp_path)


# --------------------------------------------------------------------------- image folders / lists

def write_images(folder, n, seed=0, size=(40, 30), prefix="img"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{prefix}_{i}.jpg")


CLASSES = ["back_pack", "bike", "mug"]


def office31(root, domains=("amazon", "webcam"), classes=CLASSES, n=4):
    for d in domains:
        for c in classes:
            write_images(root / "office31" / d / "images" / c, n)
    return root


def test_office31_image_folder_layout(tmp_path):
    d = _fresh("office31_amazon", office31(tmp_path))
    assert d.classes == CLASSES and len(d.train) + len(d.val) + len(d.test) == 12
    assert d.input_shape == (3, 224, 224) and d.origin.endswith("amazon/images")
    x, y = next(d.test.batches(5))
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -3 < x.min() < 0 < x.max() < 3  # ImageNet-normalised
    sub = d.train.subset(np.array([0, 2]))
    assert len(sub) == 2 and torch.equal(sub.labels, d.train.labels[[0, 2]])
    a = [next(d.train.sampler(4, torch.Generator().manual_seed(1)))[1] for _ in range(2)]
    assert torch.equal(a[0], a[1])  # seeded order
    it = d.train.sampler(4, torch.Generator().manual_seed(1))
    seen = torch.cat([next(it)[1] for _ in range(3)])  # runs past one epoch (6 train images)
    assert len(seen) == 12 and set(seen.tolist()) <= {0, 1, 2}


def test_officehome_and_visda_tllib_image_lists(tmp_path):
    base = tmp_path / "OfficeHome"  # the archive's spelling of officehome/
    lines = []
    for k, c in enumerate(["Alarm_Clock", "Bike"]):
        write_images(base / "Art" / c, 3, seed=k)
        lines += [f"Art/{c}/img_{i}.jpg {k}" for i in range(3)]
    (base / "image_list").mkdir()
    (base / "image_list" / "Art.txt").write_text("\n".join(lines) + "\n")
    (base / "Art" / "Alarm_Clock" / "stray.jpg").write_bytes(b"")  # not in the list: ignored
    d = _fresh("officehome_Art", tmp_path)
    assert d.classes == ["Alarm_Clock", "Bike"] and len(d.train) + len(d.val) + len(d.test) == 6
    assert d.origin.endswith("image_list/Art.txt")
    # VisDA as ImageFolder, with the data root pointing straight at the dataset folder
    for dom in ("train", "validation"):
        for c in ("aeroplane", "bus"):
            write_images(tmp_path / "v" / dom / c, 3)
    v = _fresh("visda_validation", tmp_path / "v")
    assert v.classes == ["aeroplane", "bus"] and next(v.val.batches(8))[0].shape[1:] == (3, 224, 224)


def test_domainnet_keeps_its_official_test_list(tmp_path):
    base = tmp_path / "domainnet"
    for part, n in (("train", 7), ("test", 3)):
        lines = []
        for k, c in enumerate(["aircraft_carrier", "zebra"]):
            write_images(base / "sketch" / c, n, seed=k, prefix=part)
            lines += [f"sketch/{c}/{part}_{i}.jpg {k}" for i in range(n)]
        (base / f"sketch_{part}.txt").write_text("\n".join(lines))
    d = _fresh("domainnet_sketch", tmp_path)
    assert len(d.test) == 6 and all("/test_" in p for p in d.test.paths)
    assert len(d.val) == 2 and len(d.train) == 12  # 15% of 7 per class -> 1 per class
    assert d.classes == ["aircraft_carrier", "zebra"]  # from the images' parent folders
    assert sorted(d.test.labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_show_domains_refuses_image_file_domains_with_exit_2(tmp_path, capsys):
    office31(tmp_path)
    assert main(["show-domains", "office31_amazon", "--data-root", str(tmp_path), "--out", str(tmp_path / "g")]) == 2
    assert "read lazily from image files" in capsys.readouterr().err


def test_images_decode_in_worker_processes_too(tmp_path, monkeypatch):
    monkeypatch.setenv("DALAB_WORKERS", "1")
    d = _fresh("office31_webcam", office31(tmp_path))
    x, y = next(d.train.sampler(3, torch.Generator().manual_seed(0)))
    assert x.shape == (3, 3, 224, 224)


# --------------------------------------------------------------------------- errors

def test_missing_root_exits_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "nope"
    args = ["run", "--method", "source_only", "--source", "office31_amazon", "--target", "office31_dslr",
            "--steps", "1", "--quiet", "--runs-dir", str(tmp_path / "runs"), "--data-root", str(missing), "--backbone", "resnet18"]  # fits 224x224
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data root ") and str(missing) in err and "\n" not in err
    assert "office31/" in err and "get Office-31 from https://" in err
    assert not (tmp_path / "runs").exists()


def test_missing_dataset_and_missing_domain(tmp_path):
    with pytest.raises(DalabError, match=r"Office-Home not found: .* no folder officehome/.*hemanthdv"):
        _fresh("officehome_Art", tmp_path)
    office31(tmp_path, domains=("amazon",))
    with pytest.raises(DalabError, match=r"domain 'dslr' not found in .*office31: expected .*/dslr/<class>/\*\.jpg "
                                         r"or .*image_list/dslr\.txt; get Office-31 from"):
        _fresh("office31_dslr", tmp_path)


def test_empty_class_folder(tmp_path):
    office31(tmp_path)
    (tmp_path / "office31" / "amazon" / "images" / "ruler").mkdir()
    with pytest.raises(DalabError, match=r"empty class folder .*amazon/images/ruler: expected images"):
        _fresh("office31_amazon", tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "missing"])
def test_unreadable_image_names_the_file(tmp_path, damage):
    office31(tmp_path)
    bad = tmp_path / "office31" / "amazon" / "images" / "mug" / "img_1.jpg"
    bad.write_bytes(b"not a jpeg") if damage == "garbage" else None
    d = _fresh("office31_amazon", tmp_path)
    if damage == "missing":
        bad.unlink()  # deleted after the listing was read
    with pytest.raises(DalabError, match=r"cannot read image .*mug/img_1.jpg: not a readable image file"):
        for split in (d.train, d.val, d.test):
            list(split.batches(64))


def test_bad_image_list_line(tmp_path):
    (tmp_path / "office31" / "image_list").mkdir(parents=True)
    (tmp_path / "office31" / "image_list" / "amazon.txt").write_text("amazon/images/a/1.jpg zero\n")
    with pytest.raises(DalabError, match=r"bad line 1 in .*amazon.txt.*'<relative/path.jpg> <label>'"):
        _fresh("office31_amazon", tmp_path)


def test_class_lists_that_differ_between_source_and_target(tmp_path, capsys):
    office31(tmp_path, domains=("amazon",))
    office31(tmp_path, domains=("webcam",), classes=["back_pack", "bike", "ruler"])
    src, tgt = _fresh("office31_amazon", tmp_path), _fresh("office31_webcam", tmp_path)
    with pytest.raises(DalabError, match=r"different class lists .*only in source: mug; only in target: ruler"):
        check_same_classes(src, tgt)
    args = ["run", "--method", "source_only", "--source", "office31_amazon", "--target", "office31_webcam",
            "--steps", "1", "--quiet", "--runs-dir", str(tmp_path / "runs"), "--data-root", str(tmp_path), "--backbone", "resnet18"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "different class" in err and "\n" not in err


def test_same_classes_in_another_order_is_caught(tmp_path):
    from dalab.datasets.base import DomainSplits

    a = DomainSplits("a", ["x", "y"], None, None, None, origin="/data/a")
    b = DomainSplits("b", ["y", "x"], None, None, None, origin="/data/b")
    check_same_classes(a, DomainSplits("c", ["x", "y"], None, None, None))
    with pytest.raises(DalabError, match=r"'a' \(/data/a\) and target 'b' \(/data/b\).*same names in a different order"):
        check_same_classes(a, b)
