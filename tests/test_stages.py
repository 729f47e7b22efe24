"""The run as named stages (dalab.trainer), evaluation in its own module (dalab.evaluation), and a
method's own check of its run (``Method.check_run``) before anything is trained or written."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dalab.cli import main
from dalab.methods import METHODS, resolve_hparams
from dalab.methods.nets import BACKBONE_BATCHNORM, BACKBONE_BLOCKS, backbone_blocks, build_classifier, has_batchnorm
from dalab.trainer import RunConfig, train, validate
from dalab.utils import DalabError

ROOT = Path(__file__).resolve().parent.parent
KW = dict(device="cpu", progress=False, tensorboard=False)
NEED_BN = sorted(name for name, cls in METHODS.items() if cls.batchnorm_needed(resolve_hparams(cls, {})))


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and all(n in err for n in needles), err
    return err


def nothing_written(runs_dir: Path) -> bool:
    return not runs_dir.exists() or not any(runs_dir.iterdir())


# --------------------------------------------------------------------------- a method checks its run

def test_arch_mod_with_a_batchnorm_free_backbone_fails_before_anything_is_written(tmp_path):
    """The case of issue 23: a BatchNorm method (AdaBN) on the default BN-free ``lenet`` used to
    train and save a source model, then fail with an optimizer error. Now: `dalab run` prints one
    line naming the backbone to use, exits 2, and the runs dir stays empty."""
    rd = tmp_path / "runs"
    p = subprocess.run([sys.executable, "-m", "dalab.cli", "run", "--method", "arch_mod", "--source", "toy_a",
                        "--target", "toy_b", "--steps", "4", "--runs-dir", str(rd), "--quiet"],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True, capture_output=True, timeout=300)
    err = p.stderr.strip()
    assert p.returncode == 2, p.stderr
    assert err.startswith("error: ") and "\n" not in err, err
    assert "BatchNorm" in err and "lenet_bn" in err and "'lenet'" in err, err
    assert nothing_written(rd)


def test_batchnorm_need_follows_the_registry_and_is_checked_by_train(tmp_path):
    """Every method that declares ``needs_batchnorm`` is refused on ``lenet`` by train() itself
    (before its source model), and accepted on ``lenet_bn``."""
    assert "arch_mod" in NEED_BN
    for name in NEED_BN:
        cls = METHODS[name]
        budget = "0" if "0" in cls.label_budgets else "2"
        with pytest.raises(DalabError, match="lenet_bn"):
            train(RunConfig(name, "toy_a", "toy_b", budget=budget, steps=2, eval_every=2), tmp_path / "runs", **KW)
        validate(RunConfig(name, "toy_a", "toy_b", budget=budget, steps=2, backbone="lenet_bn"))
    assert nothing_written(tmp_path / "runs")


def test_an_option_can_lift_the_batchnorm_need():
    """arch_mod needs BatchNorm for AdaBN only: ``adabn=false`` runs on the BN-free backbone."""
    validate(RunConfig("arch_mod", "toy_a", "toy_b", steps=2, hparams={"adabn": False}))


def test_finetuning_more_blocks_than_the_backbone_has_is_a_one_line_error(tmp_path, capsys):
    """A second unmet need: ``finetune blocks=3`` on LeNet (2 blocks) used to fine-tune the whole
    network silently; it is refused in validate, naming the range, with nothing written."""
    rd = tmp_path / "runs"
    assert main(["run", "--method", "finetune", "--budget", "2", "--source", "toy_a", "--target", "toy_b",
                 "--steps", "2", "--set", "blocks=3", "--runs-dir", str(rd), "--quiet"]) == 2
    one_line_error(capsys, "blocks=3", "2 blocks", "-1")
    assert nothing_written(rd)
    validate(RunConfig("finetune", "toy_a", "toy_b", budget="2", steps=2, hparams={"blocks": 2}))


@pytest.mark.parametrize("backbone", sorted(BACKBONE_BATCHNORM))
def test_backbone_tables_match_the_built_networks(backbone):
    """What validate reads without building a network (BatchNorm, number of blocks) is what the
    built backbone has."""
    bb = build_classifier(backbone, 10).backbone
    assert has_batchnorm(bb) == BACKBONE_BATCHNORM[backbone]
    assert len(backbone_blocks(bb)) == BACKBONE_BLOCKS[backbone]


# --------------------------------------------------------------------------- seeds

def test_a_huge_seed_is_a_one_line_error_not_an_overflow(tmp_path, capsys):  # issue 30, item 5
    rd = tmp_path / "runs"
    assert main(["run", "--method", "source_only", "--source", "toy_a", "--target", "toy_b", "--steps", "2",
                 "--seed", "99999999999999999", "--runs-dir", str(rd), "--quiet"]) == 2
    one_line_error(capsys, "seed=99999999999999999", "2**31")
    assert nothing_written(rd)


@pytest.mark.parametrize("field,value", [("seed", 2 ** 31), ("split_seed", 2 ** 31), ("seed", -1)])
def test_seeds_are_bounded(field, value):
    with pytest.raises(DalabError, match=field):
        validate(RunConfig("source_only", "toy_a", "toy_b", **{field: value}))
    validate(RunConfig("source_only", "toy_a", "toy_b", **{field: 2 ** 31 - 1 if value > 0 else 0}))


# --------------------------------------------------------------------------- evaluation

def test_a_new_metric_or_validator_is_one_registry_entry(runs_dir, monkeypatch):
    """An entry added to dalab.evaluation's registries is in every evaluation point of a run."""
    from dalab import evaluation

    monkeypatch.setitem(evaluation.CLASSIFICATION_METRICS, "n", lambda labels, pred: float(len(pred)))
    monkeypatch.setitem(evaluation.UNSUPERVISED_SCORES, "max_prob",
                        lambda split: float(split["preds"].max(1).values.mean()))
    rec = train(RunConfig("source_only", "toy_a", "toy_b", steps=2, eval_every=1), runs_dir, **KW)
    for ev in rec["evals"]:
        for split in evaluation.LABELED_SPLITS:
            assert set(ev[split]) == {"acc", "bal_acc", "macro_f1", "n"} and ev[split]["n"] > 0
        assert set(ev["tgt_train_unsup"]) == set(evaluation.UNSUPERVISED_SCORES) and "max_prob" in ev["tgt_train_unsup"]
        assert 0.0 < ev["tgt_train_unsup"]["max_prob"] <= 1.0


def test_classification_metrics_by_hand():
    from dalab.evaluation import classification_metrics

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [1.0, 0.0]])  # predicts 0, 1, 0, 0
    m = classification_metrics(logits, torch.tensor([0, 1, 1, 1]).numpy())
    assert m["acc"] == pytest.approx(0.5) and m["bal_acc"] == pytest.approx((1.0 + 1 / 3) / 2)


# --------------------------------------------------------------------------- the stages stay small

@pytest.mark.parametrize("module", ["dalab/trainer.py", "dalab/evaluation.py"])
def test_no_function_of_the_trainer_is_long(module):
    tree = ast.parse((ROOT / module).read_text())
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert not long, long


def test_tensorboard_scalars_are_percent_and_entropy_has_its_sign(tmp_path):
    """Issue 27 item 5: TensorBoard shows accuracies in percent, as the tables, and the entropy
    score under names that say its sign (the record keeps pytorch-adapt's negative entropy)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dalab.runs import RunConfig
    from dalab.trainer import train

    cfg = RunConfig("source_only", "toy_a", "toy_b", steps=4, eval_every=2, backbone="lenet_bn")
    rec = train(cfg, tmp_path, device="cpu", progress=False)
    acc = EventAccumulator(str(tmp_path / cfg.run_id() / "tb"))
    acc.Reload()
    final = rec["evals"][-1]
    pct = acc.Scalars("tgt_test/acc")[-1].value
    assert abs(pct - 100 * final["tgt_test"]["acc"]) < 1e-3
    ent = acc.Scalars("tgt_train_unsup/entropy")[-1].value
    assert ent >= 0 and abs(ent + final["tgt_train_unsup"]["entropy"]) < 1e-5
    assert abs(acc.Scalars("tgt_train_unsup/neg_entropy")[-1].value - final["tgt_train_unsup"]["entropy"]) < 1e-5


def test_the_record_names_the_data_it_saw(tmp_path):
    """Issue 30: two runs with one id cannot have seen different data unnoticed -- the record keeps
    each domain's content fingerprint (the cache's identity check uses the same hash)."""
    from dalab.datasets.base import load_domain
    from dalab.runs import RunConfig
    from dalab.trainer import train

    rec = train(RunConfig("source_only", "toy_a", "toy_b", steps=2, eval_every=2, backbone="lenet_bn"), tmp_path,
                device="cpu", progress=False, tensorboard=False)
    for role, name in (("source", "toy_a"), ("target", "toy_b")):
        fp = rec["data"][role]["fingerprint"]
        assert fp and fp == load_domain(name, 0, "cpu").fingerprint
    assert rec["data"]["source"]["fingerprint"] != rec["data"]["target"]["fingerprint"]


def test_a_resnet_on_digits_warns_once(capsys):
    from dalab.runs import RunConfig
    from dalab.trainer import _warn_small_input, validate

    _warn_small_input.cache_clear()
    for seed in (0, 1):
        validate(RunConfig("source_only", "mnist5k", "ucidigits", seed=seed, backbone="resnet18"))
    err = capsys.readouterr().err
    assert err.count("warning: backbone 'resnet18' is made for images of at least 64x64") == 2  # one per domain
    validate(RunConfig("source_only", "mnist5k", "ucidigits", backbone="lenet_bn"))
    assert "warning" not in capsys.readouterr().err
