"""The benchmark runner: spec validation, grid expansion, skip/resume, kill-and-resume,
concurrent runners, and the submitit local executor path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dalab.bench import BenchSpec, expand, launch, run_state, try_claim
from dalab.cli import main
from dalab.utils import DalabError


def spec(tmp_path, **over) -> BenchSpec:
    raw = {"name": "t", "methods": ["source_only", "dann"], "pairs": [["toy_a", "toy_b"]], "seeds": [0, 1],
           "steps": 4, "eval_every": 2, "runs_dir": str(tmp_path / "runs"), "out": str(tmp_path / "out")}
    raw.update(over)
    return BenchSpec.from_dict(raw)


def write_spec(tmp_path, **over) -> Path:
    s = spec(tmp_path, **over)
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump({k: getattr(s, k) for k in s.__dataclass_fields__}))
    return p


def test_grid_expansion_is_stable_and_respects_label_budgets(tmp_path):
    g1 = [c.run_id() for c, _ in expand(spec(tmp_path, budgets=[0, 3]))]
    g2 = [c.run_id() for c, _ in expand(spec(tmp_path, budgets=[0, 3]))]
    assert g1 == g2 and len(g1) == 4 and len(set(g1)) == 4  # UDA methods skip budget 3
    assert g1[0].startswith("source_only")


def test_hparam_trials_are_seeded_and_trial_zero_is_default(tmp_path):
    g = expand(spec(tmp_path, methods=["dann"], seeds=[0], trials=3))
    hps = [c.hparams for c, _ in g]
    assert hps[0] == {} and hps[1] != hps[2] and "lr" in hps[1]
    assert [c.hparams for c, _ in expand(spec(tmp_path, methods=["dann"], seeds=[0], trials=3))] == hps


def test_adding_a_hyperparameter_never_changes_the_others_draws(tmp_path, monkeypatch):
    from dalab.methods import METHODS, HParam
    from dalab.bench import trial_hparams

    s = spec(tmp_path, methods=["dann"], seeds=[0], trials=3)
    before = [trial_hparams("dann", t, s) for t in (1, 2)]
    monkeypatch.setattr(METHODS["dann"], "hparams", {"aaa_new": HParam(1.0, ("uniform", 0.0, 1.0)),
                                                     **METHODS["dann"].hparams})
    after = [trial_hparams("dann", t, s) for t in (1, 2)]
    for b, a in zip(before, after):
        assert "aaa_new" in a and {k: v for k, v in a.items() if k != "aaa_new"} == b


@pytest.mark.parametrize("over,needle", [
    ({"stepz": 3}, "unknown field 'stepz'"),
    ({"steps": -1}, "'steps' must be an integer >= 1"),
    ({"seeds": []}, "'seeds' must be a non-empty list"),
    ({"selection": ["best_test"]}, "unknown rule 'best_test'"),
    ({"methods": ["dnn"]}, "unknown method 'dnn'"),
    ({"pairs": [["toy_a", "nope"]]}, "unknown domain 'nope'"),
    ({"hparams": {"dann": {"lr": "fast"}}}, "must be a float"),
])
def test_bad_specs_fail_before_anything_runs(tmp_path, over, needle):
    with pytest.raises(DalabError, match=needle):
        expand(spec(tmp_path, **over))
    assert not (tmp_path / "runs").exists()


def test_malformed_yaml_one_line_error_exit_2(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("methods: [dann\nseeds: 1\n")
    assert main(["bench", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: malformed YAML") and "\n" not in err


def test_bench_runs_skips_finished_and_writes_tables(tmp_path, capsys):
    p = write_spec(tmp_path)
    assert main(["bench", str(p)]) == 0
    out = capsys.readouterr().out
    assert out.count("done     ") == 4
    for f in ("table.md", "table_last.tex", "table_oracle.tex", "table.csv", "runs.csv", "accuracy.png", "timing.json"):
        assert (tmp_path / "out" / f).is_file()
    assert "grid efficiency" in out
    t = json.loads((tmp_path / "out" / "timing.json").read_text())
    assert t["runs"] == 4 and 0 < t["efficiency"] <= 1 and t["train_s"] > 0 and t["eval_s"] > 0
    parts = t["train_s"] + t["eval_s"] + t["setup_s"] + t["orchestration_s"]
    assert abs(parts - t["wall_s"] * t["workers"]) < 1e-6 * parts + 1e-6  # the split covers the wall time
    assert t["cpu_cores"] >= 1 and t["load_avg_15min"] >= 0  # the machine's load, beside the times it explains
    assert main(["bench", str(p)]) == 0  # everything done: nothing re-run
    assert "0 runs attempted" in capsys.readouterr().out
    assert main(["bench", str(p), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("  done ") == 4


def test_partial_run_is_redone(tmp_path):
    s = spec(tmp_path, seeds=[0], methods=["source_only"])
    (cfg, _), = expand(s)
    d = Path(s.runs_dir) / cfg.run_id()
    d.mkdir(parents=True)
    (d / "record.json").write_text("{half")  # a crash mid-write would never leave this (atomic), but be safe
    assert run_state(Path(s.runs_dir), cfg.run_id()) == "partial"
    assert launch(s, expand(s)) == [(cfg.run_id(), "done")]
    assert run_state(Path(s.runs_dir), cfg.run_id()) == "done"


def test_claims_are_exclusive_and_stale_claims_are_taken_over(tmp_path):
    assert try_claim(tmp_path, "r1") and not try_claim(tmp_path, "r1")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "r2.claim").write_text(f'{{"pid": {dead.pid}, "host": "{os.uname().nodename}", "time": 0}}')
    assert try_claim(tmp_path, "r2")


def _bench_proc(spec_path, log):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on a small machine: no thread thrashing
    return subprocess.Popen([sys.executable, "-m", "dalab.cli", "bench", str(spec_path)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def test_kill_mid_grid_then_rerun_finishes_only_missing_runs(tmp_path):
    p = write_spec(tmp_path, methods=["source_only"], seeds=[0, 1, 2, 3], steps=200, eval_every=200)
    s = BenchSpec.from_yaml(p)
    ids = [c.run_id() for c, _ in expand(s)]
    proc = _bench_proc(p, tmp_path / "log1")
    deadline = time.time() + 600
    while time.time() < deadline and not any(run_state(Path(s.runs_dir), i) == "done" for i in ids):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {i for i in ids if run_state(Path(s.runs_dir), i) == "done"}
    assert 1 <= len(before) < len(ids), "kill the grid between its first and last run"
    mtimes = {i: (Path(s.runs_dir) / i / "record.json").stat().st_mtime_ns for i in before}
    attempted = launch(s, expand(s))
    assert {rid for rid, _ in attempted} == set(ids) - before  # no lost, no duplicated runs
    assert all(run_state(Path(s.runs_dir), i) == "done" for i in ids)
    assert all((Path(s.runs_dir) / i / "record.json").stat().st_mtime_ns == m for i, m in mtimes.items())


def test_two_concurrent_benches_never_run_a_run_twice(tmp_path):
    p = write_spec(tmp_path, methods=["source_only"], seeds=[0, 1, 2, 3], steps=60, eval_every=60)
    procs = [_bench_proc(p, tmp_path / f"log{i}") for i in range(2)]
    for pr in procs:
        assert pr.wait(timeout=300) == 0
    trained = [ln for i in range(2) for ln in (tmp_path / f"log{i}").read_text().splitlines() if ln.startswith("done")]
    assert len(trained) == 4 and len({ln.split()[1] for ln in trained}) == 4


def test_submitit_local_executor_path(tmp_path):
    pytest.importorskip("submitit")
    s = spec(tmp_path, methods=["source_only"], seeds=[0, 1])
    res = launch(s, expand(s), launcher="submitit-local", jobs=2, submitit_dir=str(tmp_path / "sub"))
    assert sorted(st for _, st in res) == ["done", "done"]
    assert all(run_state(Path(s.runs_dir), c.run_id()) == "done" for c, _ in expand(s))


def test_per_method_variants_are_named_rows_and_searches_are_pooled_only_when_declared(tmp_path, capsys):
    """Issue 27: a mapping of variants adds rows for one method beside its main setting, named by
    the spec; a declared search (trials) is one row 'best of N trials by RULE', while `dalab table`
    on the same folder without the spec shows every trial as its own row."""
    from dalab.tables import build_table, load_records

    groups: dict = {}
    s = spec(tmp_path, seeds=[0], variants={"dann": [{"trade_off": 0.1, "name": "DANN small"}]})
    grid = expand(s, [], groups)
    assert [(c.method, c.hparams) for c, _ in grid] == [("source_only", {}), ("dann", {}), ("dann", {"trade_off": 0.1})]
    assert [g.name for g in groups.values()] == ["DANN small"]
    with pytest.raises(DalabError, match="not in the grid's methods"):
        expand(spec(tmp_path, methods=["dann"], variants={"source_only": [{"lr": 0.1}]}))
    with pytest.raises(DalabError, match="unknown hyperparameter 'trade_of'"):
        expand(spec(tmp_path, variants={"dann": [{"trade_of": 0.1}]}))
    with pytest.raises(DalabError, match="name that is not a non-empty string"):
        spec(tmp_path, variants={"dann": [{"name": ""}]})
    launch(s, grid)
    t = build_table(load_records(s.runs_dir), "last", groups=groups)
    assert sorted(r["display"] for r in t["rows"]) == ["DANN (trade_off=1.0)", "DANN small", "Source only"]

    searched = spec(tmp_path, methods=["dann"], seeds=[0], trials=2)
    groups = {}
    grid = expand(searched, [], groups)
    launch(searched, grid)
    recs = [r for r in load_records(searched.runs_dir) if r["run_id"] in groups]
    pooled = build_table(recs, "src_val", groups=groups)["rows"]
    assert [r["display"] for r in pooled] == ["DANN (best of 2 trials by src_val)"]
    assert len(build_table(recs, "src_val")["rows"]) == 2  # without the spec: one row per trial
    p = write_spec(tmp_path, methods=["dann"], seeds=[0], trials=2)
    assert main(["table", searched.runs_dir, "--spec", str(p), "--format", "md", "--rules", "src_val"]) == 0
    assert "DANN (best of 2 trials by src_val)" in capsys.readouterr().out
