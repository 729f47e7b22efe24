"""Label-set tasks (dalab.tasks): the split, its metrics, the run ids, and bad input (issue 24)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dalab.cli import main
from dalab.evaluation import REJECT_QUANTILE, open_predictions, open_set_metrics, rejection_threshold
from dalab.runs import RunConfig
from dalab.tasks import LabelSet, classes_key, label_set, setting_of
from dalab.utils import DalabError

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the split

@pytest.mark.parametrize("setting,expected", [("partial", "partial"), ("openset", "openset"),
                                              ("universal", "universal")])
def test_named_settings_make_their_setting(setting, expected):
    ls = label_set(setting)
    assert ls.setting == expected
    assert set(ls.shared).isdisjoint(ls.source_private) and set(ls.shared).isdisjoint(ls.target_private)
    assert label_set("closed") is None and label_set(None) is None


def test_classes_text_round_trips_and_agrees_with_setting():
    ls = label_set(classes="0-3:4,5,6:7-9")
    assert (ls.shared, ls.source_private, ls.target_private) == ((0, 1, 2, 3), (4, 5, 6), (7, 8, 9))
    assert ls.text() == "0-3:4-6:7-9" and label_set(classes=ls.text()) == ls
    assert LabelSet.from_key(ls.key()) == ls
    assert label_set("universal", "0-3:4-6:7-9") == ls
    with pytest.raises(DalabError, match="define a universal task, not a openset one"):
        label_set("openset", "0-3:4-6:7-9")


def test_luts_relabel_source_and_mark_unknown():
    ls = label_set(classes="2,5:7:0,9")  # shared 2,5; source-private 7; target-private 0,9
    src, tgt = ls.source_lut(10), ls.target_lut(10)
    assert ls.source_classes == (2, 5, 7) and ls.num_known == 3
    assert src.tolist() == [-1, -1, 0, -1, -1, 1, -1, 2, -1, -1]
    assert tgt.tolist() == [3, -1, 0, -1, -1, 1, -1, -1, -1, 3]


def test_task_data_keeps_each_sides_classes_and_hides_unknown_from_batches():
    """No target-private sample in any source split, no source-private class in the target, labels
    relabeled, and unlabeled target batches carry no labels (so label K never reaches a method)."""
    from dalab.trainer import build_streams, load_task, start_run
    from dalab.runs import RunOptions

    cfg = RunConfig("dann", "toy_a", "toy_b", steps=2, eval_every=1, backbone="lenet_bn",
                    classes=classes_key("universal"))
    run = start_run(cfg, Path("/nonexistent"), Path("/nonexistent/x"), RunOptions(progress=False))
    task = run_task = load_task(run)
    ls = task.label_set
    assert task.num_classes == ls.num_known == 7
    for split in task.src.splits():
        assert set(split.labels.tolist()) == set(range(7))  # shared 0-3 -> 0-3, source-private 4-6 -> 4-6
    for split in task.tgt.splits():
        assert set(split.labels.tolist()) == {0, 1, 2, 3, 7}  # shared, and unknown (= K)
    assert task.src.classes == ["0", "1", "2", "3", "4", "5", "6"]
    assert task.tgt.classes == ["0", "1", "2", "3", "unknown"]
    batch = build_streams(run, run_task).batch()
    assert batch.y_src.max().item() < 7 and batch.x_tgt is not None
    assert batch.x_tgt_lab is None and batch.y_tgt_lab is None


# --------------------------------------------------------------------------- metrics

def test_open_set_metrics_against_a_hand_computed_confusion():
    # K = 2 known classes (0, 1), unknown = 2
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 0, 0, 2, 1, 0, 2, 2, 0, 2])
    m = open_set_metrics(labels, pred, k=2)
    os_star = (3 / 4 + 1 / 2) / 2           # per-class recall of the known classes
    unk = 3 / 4                             # recall of unknown
    assert m["os_star"] == pytest.approx(os_star)
    assert m["unk"] == pytest.approx(unk)
    assert m["h_score"] == pytest.approx(2 * os_star * unk / (os_star + unk))
    assert m["os"] == pytest.approx((3 / 4 + 1 / 2 + 3 / 4) / 3)
    zero = open_set_metrics(labels, np.ones_like(labels), k=2)  # everything called class 1
    assert zero["h_score"] == pytest.approx(0.0) and zero["unk"] == pytest.approx(0.0)


def test_partial_per_class_accuracy_is_over_the_targets_classes_only():
    from dalab.evaluation import metrics_of

    labels = np.array([0, 0, 0, 0, 1, 1])        # the target has classes 0 and 1 only
    pred = np.array([0, 0, 0, 7, 8, 1])          # mistakes into source-private classes 7 and 8
    m = metrics_of(labels, pred)
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["bal_acc"] == pytest.approx((3 / 4 + 1 / 2) / 2)


def test_rejection_baseline_threshold_comes_from_source_validation():
    g = torch.Generator().manual_seed(0)
    src_logits = torch.randn(200, 3, generator=g) * 3
    tau = rejection_threshold(src_logits)
    conf = torch.softmax(src_logits, 1).max(1).values
    assert (conf < tau).float().mean().item() == pytest.approx(REJECT_QUANTILE, abs=0.01)
    tgt = torch.tensor([[5.0, 0.0, 0.0], [0.1, 0.0, 0.05]])
    assert open_predictions(tgt, 3, threshold=0.6).tolist() == [0, 3]  # the flat one is unknown
    own = torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 1.0]])  # K + 1 scores: the method decides
    assert open_predictions(own, 3, threshold=None).tolist() == [3, 0]


# --------------------------------------------------------------------------- ids and records

def test_closed_set_run_ids_are_unchanged():
    """Every committed closed-set record's id is still what its config gives (no classes key)."""
    from dalab.runs import key_id

    recs = sorted((ROOT / "results" / "digits" / "runs").glob("*/record.json"))[:40]
    assert recs, "the main job's committed records are missing"
    for path in recs:
        rec = json.loads(path.read_text())
        assert "classes" not in rec["config"]
        assert key_id(rec["config"]) == rec["run_id"]
        c = rec["config"]
        cfg = RunConfig(c["method"], c["source"], c["target"], seed=c["seed"], budget=c["budget"], steps=c["steps"],
                        eval_every=c["eval_every"], backbone=c["backbone"], pretrained=c["pretrained"],
                        split_seed=c["split_seed"], precision=c["precision"], hparams=c["hparams"],
                        source_hparams=c["source_hparams"] or {})
        if c["source_hparams"] is None or cfg.source_run_hparams() is not None:
            assert cfg.run_id() == rec["run_id"]


def test_label_set_is_part_of_the_run_id():
    closed = RunConfig("dann", "mnist5k", "ucidigits")
    ids = {closed.run_id()} | {RunConfig("dann", "mnist5k", "ucidigits", classes=classes_key(s)).run_id()
                               for s in ("partial", "openset", "universal")}
    assert len(ids) == 4
    op = RunConfig("dann", "mnist5k", "ucidigits", classes=classes_key("openset"))
    assert op.run_id().startswith("dann__mnist5k-ucidigits__openset__b0__s0__")
    # the same split written two ways is one run
    assert RunConfig("dann", "mnist5k", "ucidigits", classes=classes_key(None, "0-4::5-9")).run_id() == op.run_id()
    assert setting_of({"config": op.key()}) == "openset" and setting_of({"config": closed.key()}) == "closed"


def test_open_set_run_records_open_set_metrics(runs_dir, capsys):
    args = ["run", "--method", "source_only", "--source", "toy_a", "--target", "toy_b", "--steps", "4",
            "--eval-every", "2", "--backbone", "lenet_bn", "--setting", "openset", "--quiet",
            "--runs-dir", str(runs_dir)]
    assert main(args) == 0
    assert "h_score" in capsys.readouterr().out
    (run,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    rec = json.loads((run / "record.json").read_text())
    assert rec["config"]["classes"] == {"shared": [0, 1, 2, 3, 4], "source_private": [], "target_private": [5, 6, 7, 8, 9]}
    for ev in rec["evals"] + [rec["final"]]:
        for split in ("tgt_val", "tgt_test"):
            assert {"os_star", "unk", "h_score", "os"} <= set(ev[split])
            assert 0 <= ev[split]["h_score"] <= 1
        assert set(ev["src_val"]) == {"acc", "bal_acc", "macro_f1"}
        assert 0 < ev["reject_threshold"] <= 1 and math.isfinite(ev["reject_threshold"])
    from dalab.tables import run_command
    assert "--classes 0-4::5-9" in run_command(rec)  # --explain's command reproduces the same run id


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("extra,needle", [
    (["--classes", "0-4:4-9"], "class 4 is in two sets"),
    (["--classes", ":0-4:5-9"], "no shared class"),
    (["--classes", "0-4::5-12"], "class index 10 does not exist"),
    (["--classes", "0-4:x"], "bad class list"),
    (["--setting", "opneset"], "unknown setting 'opneset' (did you mean 'openset'?)"),
    (["--setting", "openset", "--method", "finetune", "--budget", "5"], "would hand the method labels of unknown"),
    (["--setting", "partial", "--classes", "0-4::5-9"], "define a openset task, not a partial one"),
])
def test_bad_label_sets_one_line_exit_2_nothing_written(extra, needle, runs_dir, capsys):
    args = ["run", "--source", "toy_a", "--target", "toy_b", "--steps", "2", "--quiet", "--backbone", "lenet_bn",
            "--runs-dir", str(runs_dir)]
    if "--method" not in extra:
        args += ["--method", "dann"]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err
    assert not runs_dir.exists() or not any(p.is_dir() for p in runs_dir.iterdir())


@pytest.mark.parametrize("method,extra,needle", [
    ("osbp", [], "runs on openset/universal tasks, not closed"),
    ("ovanet", ["--setting", "partial"], "runs on openset/universal tasks, not partial"),
    ("pada", ["--setting", "openset"], "runs on partial tasks, not openset"),
])
def test_method_for_another_setting_is_refused(method, extra, needle, runs_dir, capsys):
    args = ["run", "--method", method, "--source", "toy_a", "--target", "toy_b", "--steps", "2", "--quiet",
            "--backbone", "lenet_bn", "--runs-dir", str(runs_dir), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert not runs_dir.exists()
