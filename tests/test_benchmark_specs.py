"""The standard-benchmark specs (benchmarks/{office31,officehome,visda,domainnet}.yaml): their
protocol, and ``dalab bench SPEC --dry-run`` on tiny generated folders in each dataset's real
layout (data found, classes agree, weight file present, cost printed); plus the cost probe."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalab.bench import BenchSpec, expand
from dalab.cli import main

SPECS = Path(__file__).resolve().parents[1] / "benchmarks"
CLASSES = ["bike", "mug", "pen"]
STEPS = {"office31": 20000, "officehome": 30000, "visda": 30000, "domainnet": 75000}


def images(folder: Path, n: int = 3, ext: str = "jpg") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = folder / f"img_{i}.{ext}"
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def office31(root: Path) -> None:  # the official archive: <domain>/images/<class>/
    for d in ("amazon", "dslr", "webcam"):
        for c in CLASSES:
            images(root / "office31" / d / "images" / c)


def officehome(root: Path) -> None:  # the official archive; "Real World" with a space
    for d in ("Art", "Clipart", "Product", "Real World"):
        for c in CLASSES:
            images(root / "OfficeHome" / d / c)


def visda(root: Path) -> None:  # the official archives: train/ renders as png, validation/ photos
    for d, ext in (("train", "png"), ("validation", "jpg")):
        for c in CLASSES:
            images(root / "visda2017" / d / c, ext=ext)


def domainnet(root: Path) -> None:  # <domain>/<class>/*.jpg + the official <domain>_{train,test}.txt
    base = root / "domainnet"
    for d in ("clipart", "painting", "real", "sketch"):
        lines = {"train": [], "test": []}
        for k, c in enumerate(CLASSES):
            for i, p in enumerate(images(base / d / c, n=4)):
                lines["test" if i == 3 else "train"].append(f"{p.relative_to(base)} {k}\n")
        for part, ls in lines.items():
            (base / f"{d}_{part}.txt").write_text("".join(ls))


LAYOUTS = {"office31": office31, "officehome": officehome, "visda": visda, "domainnet": domainnet}


@pytest.fixture
def weights(tmp_path, monkeypatch):
    """torch's hub cache with a (placeholder) resnet50 ImageNet file: the dry-run checks it exists."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    f = tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"")
    return f


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_spec_follows_the_protocol(name):
    spec = BenchSpec.from_yaml(SPECS / f"{name}.yaml")
    assert spec.backbone == "resnet50" and spec.pretrained == "imagenet" and spec.budgets == ["0"]
    assert spec.steps == STEPS[name] and spec.steps % spec.eval_every == 0
    assert spec.hparams["all"] == {"batch_size": 32, "lr": 0.01, "weight_decay": 0.001, "lr_schedule": "dann",
                                   "backbone_lr_mult": 0.1}


def test_resnet50_classifier_has_the_256_bottleneck():
    from dalab.methods.nets import build_classifier

    head = build_classifier("resnet50", 31).head
    assert [m.out_features for m in head if hasattr(m, "out_features")] == [256, 31]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_dry_run_on_generated_folders(name, tmp_path, weights, capsys):
    LAYOUTS[name](tmp_path / "data")
    grid = expand(BenchSpec.from_yaml(SPECS / f"{name}.yaml"))
    rc = main(["bench", str(SPECS / f"{name}.yaml"), "--dry-run", "--data-root", str(tmp_path / "data"),
               "--runs-dir", str(tmp_path / "runs"), "--step-time", "0.25", "--jobs", "4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    n = len(grid)
    assert f"{name}: {n} runs (0 done, {n} to run)" in out
    assert f"cost: {n} runs to do, {n * STEPS[name]:,} training steps ({STEPS[name]:,} per run)" in out
    assert "stated 0.25 s/step" in out and "with --jobs 4: about" in out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_dry_run_names_missing_data_and_weights(tmp_path, weights, capsys):
    spec = str(SPECS / "office31.yaml")
    (tmp_path / "data").mkdir()
    assert main(["bench", spec, "--dry-run", "--data-root", str(tmp_path / "data"), "--step-time", "1"]) == 2
    assert re.search(r"error: Office-31 not found: .*office31/", capsys.readouterr().err)
    office31(tmp_path / "data")
    weights.unlink()
    assert main(["bench", spec, "--dry-run", "--data-root", str(tmp_path / "data"), "--step-time", "1"]) == 2
    assert "ImageNet weights for resnet50 not found" in capsys.readouterr().err


def test_cost_probe_times_a_run_on_this_device(tmp_path, capsys):
    p = tmp_path / "tiny.yaml"
    p.write_text("name: tiny\nmethods: [source_only, dann]\npairs: [[mnist5k, ucidigits]]\nseeds: [0, 1]\n"
                 "steps: 100\neval_every: 50\nbackbone: lenet\nprecision: fp32\nhparams: {all: {batch_size: 8}}\n"
                 f"runs_dir: {tmp_path / 'runs'}\n")
    assert main(["bench", str(p), "--dry-run", "--probe-steps", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "cost: 4 runs to do, 400 training steps (100 per run)" in out
    m = re.search(r"probe: dann, lenet, batch 8\+8, fp32, cpu \(\d+ threads\): ([\d.e+-]+) s/step", out)
    assert m and 0 < float(m.group(1)) < 5
    # 2 evaluations per run over mnist5k val (750) + ucidigits val/test/train (1797)
    assert "(20,376 images)" in out


def test_extends_starts_from_the_parent_spec(tmp_path):
    """``extends:`` takes every field of another spec (path relative to the child) and lets the
    child override some; the long-budget spec shares the main job's settings this way."""
    (tmp_path / "base.yaml").write_text("name: base\nsteps: 500\nseeds: [0, 1]\nhparams: {dann: {trade_off: 0.3}}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("extends: ../base.yaml\nname: child\nsteps: 2000\n")
    spec = BenchSpec.from_yaml(tmp_path / "sub" / "child.yaml")
    assert (spec.name, spec.steps, spec.seeds, spec.hparams) == ("child", 2000, [0, 1], {"dann": {"trade_off": 0.3}})
    main_job, long = BenchSpec.from_yaml(SPECS / "digits.yaml"), BenchSpec.from_yaml(SPECS / "digits_long.yaml")
    assert long.hparams == main_job.hparams and long.pairs == main_job.pairs and long.backbone == main_job.backbone
    assert long.steps == 4 * main_job.steps and long.runs_dir != main_job.runs_dir
    # hparams merge per method: the child adds or replaces a method's entry, the others stay
    (tmp_path / "sub" / "more.yaml").write_text("extends: ../base.yaml\nhparams: {cdan: {lr: 0.03}}\n")
    assert BenchSpec.from_yaml(tmp_path / "sub" / "more.yaml").hparams == {"dann": {"trade_off": 0.3}, "cdan": {"lr": 0.03}}
    (tmp_path / "sub" / "over.yaml").write_text("extends: ../base.yaml\nhparams: {dann: {lr: 0.03}}\n")
    assert BenchSpec.from_yaml(tmp_path / "sub" / "over.yaml").hparams == {"dann": {"lr": 0.03}}


@pytest.mark.parametrize("text, msg", [("extends: missing.yaml\n", "not found"),
                                       ("extends: [a]\n", "must name another spec file"),
                                       ("extends: self.yaml\n", "nests more than 4")])
def test_extends_errors(tmp_path, text, msg):
    from dalab.utils import DalabError

    (tmp_path / "self.yaml").write_text(text)
    with pytest.raises(DalabError, match=msg):
        BenchSpec.from_yaml(tmp_path / "self.yaml")
