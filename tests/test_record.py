"""The run record (issue 23 item 6): one dataclass (dalab.record.RunRecord) with a schema version;
dalab.runs writes and reads record.json through it and no other module opens one; every committed
record, of every version, still loads and round-trips unchanged."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from dalab import runs
from dalab.record import (RECORD_VERSION, DataInfo, EvalPoint, MethodInfo, Provenance, RunRecord, Scores,
                          TrainStats)
from dalab.runs import RunConfig
from dalab.trainer import train

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted(ROOT.glob("results/**/runs/*/record.json"))


def _without_nonfinite(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "nonfinite"}


def test_every_committed_record_loads_and_round_trips():
    assert len(COMMITTED) >= 200
    versions = set()
    for path in COMMITTED:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text)
        rec = RunRecord.from_text(text)
        versions.add(rec.record_version)
        assert rec.record_version <= RECORD_VERSION and not rec.extra, path
        # the dict form is the file's object (non-finite numbers stay null in the raw parse)
        assert RunRecord.from_dict(raw).to_dict() == _without_nonfinite(raw), path
        if rec.record_version == RECORD_VERSION:  # written by today's writer: byte for byte again
            assert rec.to_text() == text, path
        assert runs.read_record(path.parent) is not None, path
    assert RECORD_VERSION in versions


# a version-1 record as the writer of then left it: bare NaN, no "nonfinite", the keys version 2 added absent
V1 = """{"config": {"backbone": "lenet", "budget": "0", "eval_every": 2, "hparams": {}, "method": "dann",
 "pretrained": null, "seed": 0, "source": "toy_a", "split_seed": 0, "steps": 2, "target": "toy_b"},
 "data": {"source": {"classes": 10, "test": 40, "train": 200, "val": 40},
          "target": {"classes": 10, "labeled": 0, "test": 40, "train": 200, "val": 40}},
 "evals": [{"step": 2, "src_val": {"acc": 0.1, "bal_acc": 0.1, "macro_f1": 0.02},
            "tgt_test": {"acc": 0.1, "bal_acc": 0.1, "macro_f1": 0.02},
            "tgt_train_unsup": {"entropy": NaN, "im": 0.5}, "tgt_val": {"acc": 0.1, "bal_acc": 0.1, "macro_f1": 0.02}}],
 "final": null, "hparams": {"lr": 0.01},
 "method": {"budget": "0", "family": "adversarial", "init_from": null, "name": "dann", "target_data": "unlabeled"},
 "provenance": {"commit": null, "device": "cpu", "device_name": "x86_64", "dirty": null, "finished": "",
                "host": "h", "torch_threads": 1, "versions": {}},
 "record_version": 1, "run_id": "dann__toy_a-toy_b__b0__s0__00000000", "status": "diverged",
 "train": {"diverged_at": 2, "last_losses": {"loss": NaN}, "steps": 2, "steps_per_s": 1.0,
           "train_time_s": 2.0, "wall_time_s": 2.5}}"""


def test_a_version_1_record_still_loads(tmp_path):
    rec = RunRecord.from_text(V1)
    assert rec.record_version == 1 and rec.status == "diverged" and rec.final is None
    loss = rec.train["last_losses"]["loss"]
    assert loss != loss  # bare NaN read back as NaN
    assert set(rec.to_dict()) == set(json.loads(V1, parse_constant=float))  # nothing added, nothing lost
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "record.json").write_text(V1)
    runs.mark_done(tmp_path / "r", "diverged")
    assert [r["run_id"] for r in runs.load_records(tmp_path)] == [rec.run_id]


def test_a_newer_record_keeps_what_it_does_not_know_and_a_hand_made_one_is_current():
    raw = json.loads(V1, parse_constant=float)
    newer = {**raw, "record_version": RECORD_VERSION + 1, "streams": {"order": "predict, then update"}}
    rec = RunRecord.from_dict(newer)
    assert rec.extra == {"streams": {"order": "predict, then update"}}
    assert json.loads(rec.to_text())["streams"] == newer["streams"]
    minimal = {k: raw[k] for k in ("run_id", "status", "config", "method", "evals", "train")}
    rec = RunRecord.from_dict(minimal)
    assert rec.record_version == RECORD_VERSION and rec.hparams is rec.data is rec.provenance is None
    assert set(rec.to_dict()) == set(minimal) | {"record_version", "final"}


@pytest.mark.parametrize("damage", [{"status": "running"}, {"evals": "oops"}, {"config": {}},
                                    {"method": {"name": "dann"}}])
def test_a_record_that_would_not_read_back_is_never_written(tmp_path, damage):
    raw = json.loads(V1, parse_constant=float)
    with pytest.raises(ValueError):
        runs.write_record(tmp_path / "r", {**raw, **damage})
    assert not (tmp_path / "r" / "record.json").exists()


def test_the_trainer_writes_the_record_the_dataclass_describes(tmp_path):
    """A run's record.json has exactly the dataclass's keys, each section the keys its TypedDict
    lists (an open-set run: the target splits carry the open-set scores, the points their threshold),
    and reads back to the record the trainer returned."""
    classes = {"shared": [0, 1, 2, 3, 4], "source_private": [], "target_private": [5, 6, 7, 8, 9]}
    cfg = RunConfig("source_only", "toy_a", "toy_b", steps=2, eval_every=2, precision="fp32", classes=classes)
    rec = train(cfg, tmp_path, device="cpu", progress=False, tensorboard=False)
    text = (tmp_path / cfg.run_id() / "record.json").read_text()
    raw = json.loads(text)
    fields = set(RunRecord.__dataclass_fields__) - {"extra"}
    assert set(raw) == fields | {"nonfinite"} and set(rec) == fields
    assert raw["config"]["classes"] == classes
    for section, typed in (("method", MethodInfo), ("data", DataInfo), ("train", TrainStats),
                           ("provenance", Provenance)):
        assert set(raw[section]) == set(typed.__annotations__), section
    for point in raw["evals"] + [raw["final"]]:
        assert set(point) == set(EvalPoint.__annotations__)
        assert all(set(point[s]) == set(Scores.__annotations__) for s in ("tgt_val", "tgt_test"))
    assert RunRecord.from_text(text).to_text() == text
    assert runs.read_record(tmp_path / cfg.run_id()) == json.loads(json.dumps(rec))


def test_only_dalab_runs_opens_a_record_file():
    """No module but dalab/runs.py builds a path to record.json (``d / "record.json"``, a glob):
    readers go through runs.read_record / runs.load_records, so the record has one reader."""
    offenders = []
    for path in sorted(p for d in ("dalab", "methods", "datasets", "benchmarks") for p in (ROOT / d).rglob("*.py")):
        if path == ROOT / "dalab" / "runs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            right = node.right if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) else None
            args = node.args if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("glob", "rglob") else []
            for c in [right, *args]:
                if isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value.endswith("record.json"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
