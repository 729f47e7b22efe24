"""The protocol study's measures and its default-choosing rule (dalab.benchmarks.protocol), on
synthetic run records: no training."""

from __future__ import annotations

from pathlib import Path

import pytest

from dalab.benchmarks import protocol as pr
from dalab.runs import precision_key

ROOT = Path(__file__).resolve().parents[1]


def rec(accs, steps=500, hparams=None, method="dann", seed=0):
    """A finished record with one evaluation point per entry of ``accs`` (evenly spaced), of a run in
    the precision ``auto`` computes in on this machine."""
    every = steps // len(accs)
    evals = [{"step": every * (i + 1), "tgt_test": {"acc": a}} for i, a in enumerate(accs)]
    return {"config": {"method": method, "source": "a", "target": "b", "seed": seed, "budget": "0",
                       "steps": steps, "eval_every": every, "backbone": "lenet_bn", "split_seed": 0,
                       "precision": precision_key("auto"), "pretrained": None, "hparams": hparams or {}},
            "hparams": {"bn_mode": "joint", **(hparams or {})}, "evals": evals, "final": evals[-1], "status": "done"}


def test_plateau_is_last_minus_halfway_in_points():
    assert pr.plateau(rec([0.40, 0.50, 0.60, 0.56])) == pytest.approx(6.0)   # |56 - 50|
    assert pr.plateau(rec([0.5, 0.6, 0.7], steps=600)) is None                # no evaluation at step 300
    assert pr.plateau({"final": None}) is None                               # diverged run


def test_trend_keeps_the_sign_that_the_plateau_drops():
    rising = [rec([0.4, 0.5, 0.6, 0.56]), rec([0.4, 0.5, 0.6, 0.58])]      # +6, +8
    swinging = [rec([0.4, 0.5, 0.6, 0.56]), rec([0.4, 0.5, 0.6, 0.44])]    # +6, -6
    assert pr.drift(rising[0]) == pytest.approx(6.0)
    s = pr.summarize({("a", "b"): rising})
    assert (s["plateau"], s["trend"]) == (pytest.approx(7.0), pytest.approx(7.0))
    s = pr.summarize({("a", "b"): swinging})
    assert (s["plateau"], s["trend"]) == (pytest.approx(6.0), pytest.approx(0.0))
    assert pr.fmt_plateau(6.0, 0.0) == "6.0 (+0.0)" and pr.fmt_plateau(None, None) == "—"


def test_study_cells_of_one_setting_form_one_curve():
    names = {pr.curve_name(label) for label, *_ in pr.STUDY}
    assert pr.curve_name("lenet_bn, 500 steps") == pr.curve_name("lenet_bn, 1000 steps") == "lenet_bn"
    assert len(names) < len(pr.STUDY)        # at least one setting is measured at two budgets
    for label, backbone, steps, *_ in pr.STUDY:
        assert f"{steps} steps" in label and backbone in label


def test_rule_compares_candidates_on_matched_seeds_only():
    a = {("p", "q"): [rec([0.5]), rec([0.9]), None]}          # seeds 0, 1 done
    b = {("p", "q"): [rec([0.6]), None, None]}                # only seed 0 done
    # on the common seed 0, b (60) beats a (50), although a's mean over its own seeds is 70
    assert pr.rule_pick([("a", a), ("b", b)]) == "b"
    assert pr.rule_pick([("a", a), ("c", {("p", "q"): [None, None, None]})]) is None


def test_records_match_on_resolved_hparams_and_new_keys_default(tmp_path):
    from dalab.trainer import RunConfig

    r = rec([0.5, 0.6, 0.7, 0.8], hparams={})
    del r["hparams"]["bn_mode"]                                  # a record older than bn_mode
    recs = pr.Records(tmp_path)
    recs.add(r)
    cfg = RunConfig("dann", "a", "b", seed=0, steps=500, eval_every=125, backbone="lenet_bn")
    defaults = {"bn_mode": "joint"}
    assert recs.find(cfg, {"bn_mode": "joint"}, defaults) is r   # missing key = its default
    assert recs.find(cfg, {"bn_mode": "split"}, defaults) is None


def test_records_of_two_phase_methods_match_on_their_source_model(tmp_path):
    """ADDA/SHOT runs that started from different source models are different settings."""
    from dalab.trainer import RunConfig

    recs = pr.Records(tmp_path)
    runs = {}
    for lr in (0.01, 0.03):
        cfg = RunConfig("adda", "a", "b", seed=0, steps=500, eval_every=125, backbone="lenet_bn",
                        source_hparams={"lr": lr})
        r = rec([0.5, 0.6, 0.7, 0.8], method="adda")
        r["config"] = {**r["config"], **{k: cfg.key()[k] for k in ("source_hparams", "precision", "pretrained")}}
        recs.add(r)
        runs[lr] = (cfg, r)
    for cfg, r in runs.values():
        assert recs.find(cfg, r["hparams"], {}) is r


def test_default_marks_the_main_jobs_setting_and_candidates_name_every_tuned_key():
    """A candidate is the default when it equals the method's defaults plus the main spec's overrides
    (benchmarks/digits.yaml); within a method every candidate sets the same keys, so a later change
    of a default never lets an old record stand for another setting."""
    from dalab.bench import BenchSpec

    spec = BenchSpec.from_yaml(pr.MAIN_SPEC)
    assert pr.main_overrides("dann") == spec.hparams["dann"]
    for method, cands in pr.CANDIDATES.items():
        keys = {frozenset(ov) for _, ov in cands}
        assert len(keys) == 1, f"{method}: candidates set different keys {keys}"
        defaults = [label for label, ov in cands if pr.is_default(method, ov)]
        assert len(defaults) == 1, f"{method}: {len(defaults)} candidates equal the main job's setting"


def test_plan_lists_every_missing_run_once_source_only_first_and_trains_nothing(tmp_path, monkeypatch):
    """`make protocol` first plans (one pass of the stages that trains nothing), then hands the missing
    runs to the bench's launcher; a run the runs dir already has is not planned again."""
    import dalab.bench

    monkeypatch.setattr(dalab.bench, "run_or_load", lambda *a, **k: pytest.fail("plan trained a run"))
    pairs = [("a", "b")]
    recs = pr.Records(tmp_path)
    cfgs = pr.plan(recs, pairs, "cpu", with_study=False)
    ids = [c.run_id() for c in cfgs]
    assert len(ids) == len(set(ids)) and recs.wanted is None
    planned = {(c.method, tuple(sorted(c.hparams.items())), c.seed) for c in cfgs}
    for method, cands in pr.CANDIDATES.items():          # every candidate of the tuning grid, every seed
        for _, ov in cands:
            for seed in pr.SEEDS:
                assert (method, tuple(sorted(ov.items())), seed) in planned, (method, ov, seed)
    first_other = next(i for i, c in enumerate(cfgs) if c.method != "source_only")
    assert all(c.method == "source_only" for c in cfgs[:first_other])
    assert all(c.method != "source_only" for c in cfgs[first_other:])
    with_study = pr.plan(pr.Records(tmp_path), pairs, "cpu", with_study=True)
    assert {c.run_id() for c in cfgs} < {c.run_id() for c in with_study}
    # a finished run is found, not planned
    done = cfgs[0]
    r = rec([0.5, 0.6, 0.7, 0.8], steps=done.steps, hparams=dict(done.hparams), method=done.method)
    r["config"] = done.key()
    from dalab.methods import get_method, resolve_hparams
    r["hparams"] = resolve_hparams(get_method(done.method), dict(done.hparams))
    recs.add(r)
    assert done.run_id() not in {c.run_id() for c in pr.plan(recs, pairs, "cpu", with_study=False)}


def test_a_report_from_part_of_the_study_is_refused_and_nothing_is_written(tmp_path, capsys):
    """`--cached-only` (what `make tables` runs) with runs missing: one error line naming how many
    and the command that trains them, exit 1, no report and no figure."""
    out = tmp_path / "protocol.md"
    assert pr.main(["--cached-only", "--runs-dir", str(tmp_path / "runs"), "--skip-study", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "`make protocol`" in err
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_the_report_header_names_the_command_that_rederives_it():
    """However the runs were trained (workers, device), the header names the re-derivation from the
    records: no training, the same runs and main-job folders."""
    import argparse

    args = argparse.Namespace(runs_dir="results/protocol/runs", main_runs_dir="results/digits/runs",
                              skip_study=False, out="results/protocol.md", jobs=2, device="cpu")
    assert pr.rederive_argv(args) == ["--cached-only", "--runs-dir", "results/protocol/runs", "--main-runs-dir",
                                      "results/digits/runs", "--out", "results/protocol.md"]


def test_the_grid_reading_is_computed_from_candidates_that_differ_in_one_key():
    """The report's reading of the tuning grid: a contrast pairs two candidates that differ in one
    setting only (in the grid's order of its values), and the bullet's numbers are theirs."""
    from dalab.benchmarks.protocol_report import contrast_bullet, contrasts

    pairs = [("a", "b"), ("c", "d")]

    def summ(x, y):
        return {"avg": (x + y) / 2, "cells": {("a", "b"): [x], ("c", "d"): [y]}, "plateau": 1.0, "trend": 0.0}

    joint, split, split_hi = summ(40.0, 80.0), summ(50.0, 81.0), summ(48.0, 80.0)
    t = pr.Tuned("m", [("j", {"bn_mode": "joint", "lr": 0.01}, joint), ("s", {"bn_mode": "split", "lr": 0.01}, split),
                       ("s3", {"bn_mode": "split", "lr": 0.03}, split_hi),
                       ("never run", {"bn_mode": "joint", "lr": 0.03}, {"avg": None, "cells": {}})], "s")
    assert contrasts(t, "bn_mode") == [(joint, split)] and contrasts(t, "lr") == [(split, split_hi)]
    assert contrasts(t, "weight_ema") == []
    bullet = contrast_bullet(pairs, [t], "bn_mode", "`bn_mode`", "Split is better")
    assert bullet == "- `bn_mode`: m +5.5 (a→b 40.0 → 50.0). Split is better for 1 of 1 methods (m)."
    assert contrast_bullet(pairs, [t], "lr", "lr", "0.03 is better").endswith("0.03 is better for 0 of 1 methods.")


def test_where_the_rule_and_the_default_disagree_the_margin_and_its_test_are_printed():
    from dalab.benchmarks.protocol_report import pick_margin

    pairs = [("a", "b"), ("c", "d")]
    best = {"avg": 61.0, "cells": {("a", "b"): [50.0, 52.0, 54.0], ("c", "d"): [70.0, 70.0, 70.0]}}
    default = {"avg": 60.0, "cells": {("a", "b"): [49.0, 53.0, 52.0], ("c", "d"): [71.0, 69.0, 70.0]}}
    text = pick_margin(pairs, best, default)
    assert text.startswith("+1.0 points on the 4-pair average; paired t-test over the 6 (pair, seed) runs p = ")
    assert text.endswith("not significant; within the tie margin of 2 points: the default stays")
    far = {"avg": 65.0, "cells": {("a", "b"): [55.0, 57.0, 59.0], ("c", "d"): [75.0, 74.0, 76.0]}}
    assert pick_margin(pairs, far, default).endswith("beyond the tie margin of 2 points: the default breaks the rule**")
    assert "not comparable" in pick_margin(pairs, best, {**default, "avg": None})


def test_a_complete_study_writes_its_whole_report(tmp_path):
    """Every run the plan wants, as a synthetic finished record: `--cached-only` writes the whole
    report -- tuning grid with every candidate, readings, budget table and figure -- so the end of
    a study that takes hours cannot stop at its report."""
    import json
    import random

    from dalab.datasets import BENCHMARKS
    from dalab.methods import get_method, resolve_hparams

    pairs = [tuple(p) for p in BENCHMARKS[pr.BENCHMARK]]
    runs = tmp_path / "runs"
    cfgs = pr.plan(pr.Records(runs), pairs, "cpu", with_study=True)
    # a committed record of the study as the template (the record format's every field)
    template = json.loads(next((ROOT / "results" / "protocol" / "runs").glob("*/record.json")).read_text())
    rng = random.Random(0)
    for c in cfgs:
        r = dict(template, config=c.key(), run_id=c.run_id(), method=dict(template["method"], name=c.method),
                 hparams=resolve_hparams(get_method(c.method), dict(c.hparams)))
        every = c.steps // pr.EVAL_POINTS
        r["evals"] = [dict(template["evals"][0], step=every * (i + 1), tgt_test={"acc": rng.uniform(0.3, 0.9)})
                      for i in range(pr.EVAL_POINTS)]
        r["final"] = dict(r["evals"][-1])
        d = runs / c.run_id()
        d.mkdir(parents=True)
        (d / "record.json").write_text(json.dumps(r))
        (d / "done").write_text("done\n")
    out = tmp_path / "protocol.md"
    assert pr.main(["--cached-only", "--runs-dir", str(runs), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith(f"<!-- generated by: python -m dalab.benchmarks.protocol --cached-only --runs-dir {runs} ")
    grid = text[text.index("## Tuning grid"):text.index("Reading the grid")]
    assert "—" not in grid and "(n=" not in grid     # every candidate on every pair and seed
    assert "no two candidates" not in text and out.with_suffix(".png").is_file()
