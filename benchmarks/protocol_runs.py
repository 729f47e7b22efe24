"""The protocol study, its runs and measures: finding a wanted setting's runs under the runs dir (or
training them), the measures (the `last` rule's accuracy, the plateau), the rule that picks a
default, and the study's two stages -- :func:`tune` (every method's candidates) and :func:`study`
(the budget and backbone cells) -- whose results :mod:`dalab.benchmarks.protocol_report` renders.

Runs are ordinary run records: a run that is already done under the runs dir is read, not retrained
(``dalab.bench.run_or_load``), and a record whose resolved hyperparameters equal the wanted ones is
reused even when it was launched with different (but equivalent) overrides.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dalab.benchmarks.protocol_grid import (CANDIDATES, EVAL_POINTS, MAIN_STEPS, PRECISION, SEEDS, STUDY, candidate,
                                            matches, source_overrides)
from dalab.convergence import drift, mean_drift

class Records:
    """Finished run records under a runs dir, indexed by everything but the hyperparameters, so
    that a wanted setting can be matched on its resolved hyperparameters."""

    FIELDS = ("method", "source", "target", "seed", "budget", "steps", "eval_every", "backbone",
              "split_seed", "precision", "pretrained", "source_hparams")

    def __init__(self, runs_dir: str | Path):
        from dalab.tables import load_records

        self.runs_dir = Path(runs_dir)
        self.index: dict[tuple, list[dict]] = {}
        self.wanted: dict[str, Any] | None = None  # set by plan(): run id -> RunConfig of every missing run
        for r in load_records(self.runs_dir):
            self.add(r)

    @classmethod
    def key(cls, config: dict) -> tuple:
        """The index key of a record's (or a wanted run's) canonical config: FIELDS, dicts as JSON."""
        import json

        return tuple(json.dumps(config.get(f), sort_keys=True) for f in cls.FIELDS)

    def add(self, rec: dict) -> None:
        key = self.key(rec["config"])
        self.index.setdefault(key, []).append(rec)

    def find(self, cfg, hp: dict[str, Any], defaults: dict[str, Any]) -> dict | None:
        """A done record of ``cfg`` whose resolved hyperparameters equal ``hp``. A key missing from
        an older record (an hparam added since) matches when ``hp`` has that key's default value
        (new hyperparameters are added with the old behaviour as default)."""
        key = self.key(cfg.key())
        for rec in self.index.get(key, []):
            if matches(rec.get("hparams", {}), hp, defaults):
                return rec
        return None


def get_run(records: Records, method: str, src: str, tgt: str, seed: int, steps: int, backbone: str,
            overrides: dict[str, Any], cached_only: bool, device: str,
            source_overrides: dict[str, Any] | None = None) -> dict | None:
    """The run of ``method`` with ``overrides`` (and, for a method that starts from the source
    model, that model trained with ``source_overrides``): found under the runs dir, or trained."""
    from dalab.bench import run_or_load
    from dalab.methods import get_method, resolve_hparams
    from dalab.trainer import RunConfig

    cfg = RunConfig(method, src, tgt, seed=seed, steps=steps, eval_every=max(1, steps // EVAL_POINTS),
                    backbone=backbone, precision=PRECISION, hparams=dict(overrides),
                    source_hparams=dict(source_overrides or {}))
    cls = get_method(method)
    hp, defaults = resolve_hparams(cls, overrides), resolve_hparams(cls, {})
    rec = records.find(cfg, hp, defaults)
    if rec is None and records.wanted is not None:  # a planning pass: note the run, train nothing
        records.wanted.setdefault(cfg.run_id(), cfg)
        return None
    if rec is None:
        rec = run_or_load(cfg, records.runs_dir, device, cached_only=cached_only, tensorboard=False)
        if rec is not None:
            records.add(rec)
            print(f"  trained {cfg.run_id()}", flush=True)
    return rec


def plan(records: Records, pairs: list[tuple[str, str]], device: str, with_study: bool) -> list:
    """The RunConfigs of every run the study wants that is not under the runs dir yet (source-only
    runs first, so that a two-phase method's source model is trained before the method), found by one
    pass of the stages that trains nothing; :func:`dalab.bench.launch` then runs them in parallel."""
    records.wanted = {}
    try:
        grid = Grid(records, pairs, True, device)
        tune(grid)
        if with_study:
            study(grid)
        cfgs = list(records.wanted.values())
    finally:
        records.wanted = None
    return sorted(cfgs, key=lambda c: c.method != "source_only")


# --------------------------------------------------------------------------- measures

def last_acc(rec: dict) -> float | None:
    return rec["final"]["tgt_test"]["acc"] * 100 if rec and rec.get("final") else None


def plateau(rec: dict) -> float | None:
    """|drift| (:func:`dalab.convergence.drift`): how far a run still moves in its second half."""
    d = drift(rec)
    return None if d is None else abs(d)


def summarize(recs_by_pair: dict[tuple, list[dict | None]]) -> dict[str, Any]:
    """Per pair mean/std over seeds; the 4-pair average, the mean per-cell seed std, the plateau and
    the trend (mean signed drift)."""
    cells, stds, drifts, missing = {}, [], [], 0
    for pair, recs in recs_by_pair.items():
        accs = [a for a in (last_acc(r) for r in recs) if a is not None]
        missing += len(recs) - len(accs)
        drifts += [d for d in (drift(r) for r in recs) if d is not None]
        cells[pair] = accs
        if len(accs) > 1:
            stds.append(statistics.stdev(accs))
    means = [statistics.mean(a) for a in cells.values() if a]
    complete = all(len(a) >= 1 for a in cells.values())  # cells with fewer seeds say (n=k)
    return {"cells": cells, "avg": statistics.mean(means) if means and complete else None,
            "std": statistics.mean(stds) if stds else None,
            **dict(zip(("plateau", "trend"), mean_drift(drifts))), "missing": missing}


def rule_pick(grids: list[tuple[str, dict[tuple, list[dict | None]]]]) -> str | None:
    """:data:`RULE` on matched runs: per pair, only the seeds every candidate has finished count,
    so candidates are compared on the same (pair, seed) cells; None until every pair has one."""
    pairs = list(grids[0][1])
    score = {label: [] for label, _ in grids}
    for p in pairs:
        common = [i for i in range(len(SEEDS)) if all(last_acc(g[p][i]) is not None for _, g in grids)]
        if not common:
            return None
        for label, g in grids:
            score[label].append(statistics.mean(last_acc(g[p][i]) for i in common))
    return max(score, key=lambda k: statistics.mean(score[k]))


# --------------------------------------------------------------------------- the stages

@dataclass
class Grid:
    """The runs of one setting on every tuning pair and seed: ``grid(method, backbone, steps,
    overrides, source)`` -> {pair: [record or None per seed]}; ``source``: the overrides of the source
    model a two-phase method starts from (ignored by the others)."""

    records: Records
    pairs: list[tuple[str, str]]
    cached_only: bool
    device: str

    def __call__(self, method: str, backbone: str, steps: int, overrides: dict[str, Any],
                 source: dict[str, Any]) -> dict[tuple, list[dict | None]]:
        return {p: [get_run(self.records, method, *p, s, steps, backbone, overrides, self.cached_only, self.device,
                            source) for s in SEEDS] for p in self.pairs}


@dataclass
class Tuned:
    """One method's tuning grid: each candidate's (label, overrides, summary), and the rule's pick."""

    method: str
    rows: list[tuple[str, dict[str, Any], dict[str, Any]]]
    best: str | None


def tune(grid: Grid) -> tuple[dict[str, Any], list[Tuned]]:
    """Stage 1, the tuning grid at the main job's budget on lenet_bn: source-only at its main setting
    (the reference), then every method's candidates, which differ in the method's own setting (a
    two-phase method starts from the main job's source model)."""
    base = summarize(grid("source_only", "lenet_bn", MAIN_STEPS, candidate("source_only"), source_overrides()))
    tuned = []
    for method, cands in CANDIDATES.items():
        grids = [(label, ov, grid(method, "lenet_bn", MAIN_STEPS, ov, source_overrides())) for label, ov in cands]
        best = rule_pick([(label, g) for label, _, g in grids])
        tuned.append(Tuned(method, [(label, ov, summarize(g)) for label, ov, g in grids], best))
    return base, tuned


def study(grid: Grid) -> dict[str, dict[str, dict[str, Any]]]:
    """Stage 2, the budget and backbone cells (:data:`STUDY`): STUDY label -> method -> summary. A
    cell runs the main job's setting or, where it says so, the method's own defaults; its shared
    overrides (budget aside) hold for its source model too, and own defaults use the source model's."""
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for m in study_methods():
        for label, bb, st, over, own, ms in STUDY:
            if m in ms:
                source = {} if own else {**source_overrides(), **over}
                cells.setdefault(label, {})[m] = summarize(grid(m, bb, st, {**candidate(m, main=not own), **over}, source))
    return cells


def study_methods() -> list[str]:
    """The methods of the budget and backbone study, in the order of their first cell."""
    return list(dict.fromkeys(m for *_, ms in STUDY for m in ms))
