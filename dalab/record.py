"""A run's record (``record.json``): its fields, its schema version, and its strict-JSON text.

:class:`RunRecord` is the one definition. The trainer builds one when a run ends; :mod:`dalab.runs`,
the only module that touches a run's folder, writes it (:func:`dalab.runs.write_record`) and reads
it back (:func:`dalab.runs.read_record`) through :meth:`RunRecord.to_text` and
:meth:`RunRecord.from_text`. The JSON object is :meth:`RunRecord.to_dict` plus ``nonfinite``; its
sections keep the layout the tables and selection rules index (``rec["final"]["tgt_test"]["acc"]``),
written out below as TypedDicts (plain dicts at run time, so the layout is exactly the JSON's).

Schema versions (``record_version``); every committed record of every version still loads
(tests/test_record.py):

1. JSON with bare ``NaN`` for non-finite numbers. The config has no ``precision`` and no
   ``source_hparams``; ``method``, ``data``, ``train`` and ``provenance`` lack the keys marked
   "since 2" below.
2. Strict JSON: a non-finite number is stored as null and its JSON-pointer path listed in
   ``nonfinite`` (jq, JavaScript and ``json.loads(..., parse_constant=error)`` accept the file).

A record without ``record_version`` (hand-made, e.g. in tests) is read as the current version. A
record of a newer version is read as far as this version knows it: keys it does not know are kept
(:attr:`RunRecord.extra`), so it is never taken for a damaged record and trained again.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

RECORD_VERSION = 2
REQUIRED = ("run_id", "status", "config", "method", "evals", "train")  # every version has these
FINISHED = ("done", "diverged")  # a record is written when its run ends, never before
EVAL_SPLITS = ("src_val", "tgt_val", "tgt_test")  # dalab.evaluation.LABELED_SPLITS (which imports torch)
_NUMBER = (int, float, type(None))  # non-finite numbers come back as floats, a missing score as None


# --------------------------------------------------------------------------- the sections' layout

class Scores(TypedDict, total=False):
    """One labeled split at one evaluation point, as fractions (:mod:`dalab.evaluation`)."""

    acc: float
    bal_acc: float
    macro_f1: float
    # target splits of a task with unknown target classes (--classes with target-private classes)
    os_star: float
    unk: float
    h_score: float
    os: float


class EvalPoint(TypedDict, total=False):
    """One entry of ``evals`` (and ``final``, the last one of a finished run)."""

    step: int
    src_val: Scores
    tgt_val: Scores
    tgt_test: Scores
    tgt_train_unsup: dict[str, float | None]  # label-free scores (dalab.evaluation.UNSUPERVISED_SCORES)
    tgt_train: Scores  # transductive accuracy on the target train split (records since 2026-12-02); nothing selects on it
    reject_threshold: float | None  # tasks with unknown target classes: a closed-set method's threshold


class MethodInfo(TypedDict, total=False):
    name: str
    family: str
    target_data: str                  # the target data the method declared (TargetData)
    budget: str                       # target labels: "0", k per class, or "all"
    init_from: str | None             # the source_only run it started from
    uses_source: bool                 # since 2
    source_config: dict | None        # since 2: that run's canonical config


class DataInfo(TypedDict, total=False):
    source: dict[str, Any]            # classes, train, val, test sizes; fingerprint (since 2)
    target: dict[str, Any]            # the same, and how many target train labels were used
    options: dict[str, Any]           # since 2: the data options applied (standardisation, augmentation)


class TrainStats(TypedDict, total=False):
    steps: int                        # steps trained (the divergence step of a diverged run)
    wall_time_s: float
    train_time_s: float
    steps_per_s: float
    last_losses: dict[str, float]
    diverged_at: int | None
    eval_time_s: float                # since 2, like the rest
    resumed_from: int | None
    precision: str                    # what the run computed in (fp32, bf16)
    channels_last: bool
    compile: bool
    distributed: dict[str, Any] | None


class Provenance(TypedDict, total=False):
    commit: str | None
    dirty: bool | None
    versions: dict[str, str]
    device: str
    device_name: str
    torch_threads: int
    host: str
    finished: str                     # local time, ISO 8601
    deterministic: bool               # since 2


# --------------------------------------------------------------------------- the record

@dataclass(kw_only=True)
class RunRecord:
    """A finished run: what it was (config, resolved hyperparameters, method, data), every evaluation
    point, how it trained, and where and from which code. Fields in the order the trainer writes
    them; ``hparams``, ``data`` and ``provenance`` are None only in hand-made records, and then
    absent from :meth:`to_dict`."""

    record_version: int = RECORD_VERSION
    run_id: str
    status: str                       # done | diverged
    config: dict[str, Any]            # dalab.runs.RunConfig.key(): what the run id hashes
    hparams: dict[str, Any] | None = None  # every hyperparameter, resolved
    method: MethodInfo
    data: DataInfo | None = None
    evals: list[EvalPoint]
    final: EvalPoint | None = None    # the last evaluation point of a run that did not diverge
    train: TrainStats
    provenance: Provenance | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a newer version, kept as they are

    _OPTIONAL = ("hparams", "data", "provenance")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (without ``nonfinite``: :meth:`to_text` computes it), values as held."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for k in self._OPTIONAL:
            if out[k] is None:
                del out[k]
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        """The record of a JSON object (``nonfinite`` ignored: its numbers are restored already).
        ValueError names what makes it incomplete or damaged (a field the tables and selection rules
        read, of the wrong shape), so such a record is reported as unreadable, not crashed on."""
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        if d["status"] not in FINISHED:
            raise ValueError(f"status {d['status']!r}")
        damage = _damage(d)
        if damage:
            raise ValueError(damage)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names},
                   extra={k: v for k, v in d.items() if k not in names and k != "nonfinite"})

    def to_text(self) -> str:
        """Strict JSON, keys sorted, indented by 2: non-finite numbers become null and their
        JSON-pointer paths are listed in ``"nonfinite"``; numpy/torch scalars become numbers."""
        bad: dict[str, str] = {}
        clean = _strict(self.to_dict(), "", bad)
        clean["nonfinite"] = bad
        return json.dumps(clean, indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_text(cls, text: str) -> RunRecord:
        """The record in ``text`` (any version), non-finite numbers restored as floats. ValueError
        if it is not a complete record (truncated, not JSON, keys missing, unfinished, damaged)."""
        def bare(name: str) -> float:  # version 1 wrote bare NaN
            return float(name)
        d = json.loads(text, parse_constant=bare)
        if isinstance(d, dict):
            _restore(d, d.get("nonfinite") or {})
        return cls.from_dict(d)


# --------------------------------------------------------------------------- checks and strict JSON

def _damage(rec: dict) -> str | None:
    """What makes a record with every :data:`REQUIRED` key unusable (a field of the wrong shape), or
    None. The fields the tables and selection rules read are checked."""
    c, m, t = rec["config"], rec["method"], rec["train"]
    if not isinstance(c, dict):
        return "config is not an object"
    for k, typ in (("method", str), ("source", str), ("target", str), ("seed", int), ("steps", int),
                   ("budget", (str, int))):
        if not isinstance(c.get(k), typ):
            return f"config.{k} is missing or of the wrong type"
    if not isinstance(m, dict) or not all(isinstance(m.get(k), str) for k in ("name", "family", "budget")):
        return "method is not an object with name, family and budget"
    if not isinstance(t, dict):
        return "train is not an object"
    if not isinstance(rec.get("hparams", {}), dict):
        return "hparams is not an object"
    if not isinstance(rec["evals"], list):
        return "evals is not a list"
    points = rec["evals"] + ([rec["final"]] if rec.get("final") is not None else [])
    for i, ev in enumerate(points):
        if not isinstance(ev, dict) or not isinstance(ev.get("step"), int):
            return f"evaluation point {i} has no step"
        for split in EVAL_SPLITS:
            if not isinstance(ev.get(split), dict) or not isinstance(ev[split].get("acc"), _NUMBER):
                return f"evaluation point {i} has no {split} accuracy"
        unsup = ev.get("tgt_train_unsup", {})
        if not isinstance(unsup, dict) or not all(isinstance(v, _NUMBER) for v in unsup.values()):
            return f"evaluation point {i} has malformed label-free scores"
    return None


def _strict(obj: Any, path: str, bad: dict[str, str]) -> Any:
    """A copy of ``obj`` with every non-finite float replaced by None, its path noted in ``bad``."""
    if isinstance(obj, dict):
        return {k: _strict(v, f"{path}/{k}", bad) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v, f"{path}/{i}", bad) for i, v in enumerate(obj)]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        bad[path] = repr(obj)  # 'nan', 'inf', '-inf'
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _restore(rec: dict, bad: dict[str, str]) -> None:
    """Put the non-finite numbers listed in ``nonfinite`` back where :func:`_strict` nulled them."""
    for ptr, val in bad.items():
        *parents, last = ptr.split("/")[1:]
        node: Any = rec
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[int(last) if isinstance(node, list) else last] = float(val)
