"""dalab bench's overall progress line: runs done / total, failed, ETA from measured step rates;
a redrawn bar on a terminal, plain lines otherwise, the first one before any run finishes."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from dalab import runs
from dalab.progress import CLEAR, GridProgress
from dalab.runs import RunConfig
from dalab.selection import at_chance


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _finish(rd: Path, cfg: RunConfig, wall_s: float, status: str = "done") -> None:
    """A finished run's folder as the trainer leaves it (record.json, then done)."""
    m = lambda a: {"acc": a, "bal_acc": a, "macro_f1": a}  # noqa: E731
    point = {"step": cfg.steps, "src_val": m(0.9), "tgt_val": m(0.6), "tgt_test": m(0.6), "tgt_train_unsup": {}}
    rec = {"run_id": cfg.run_id(), "status": status, "config": {**cfg.__dict__}, "hparams": {},
           "method": {"name": cfg.method, "family": "baseline", "budget": "0"}, "evals": [point], "final": point,
           "train": {"steps": cfg.steps, "wall_time_s": wall_s, "steps_per_s": cfg.steps / wall_s}}
    d = runs.run_dir(rd, cfg.run_id())
    d.mkdir(parents=True, exist_ok=True)
    runs.write_record(d, rec)
    runs.mark_done(d, status)


def _cfgs(n: int, method: str = "source_only", steps: int = 100) -> list[RunConfig]:
    return [RunConfig(method, "toy_a", "toy_b", seed=s, steps=steps, eval_every=steps) for s in range(n)]


def test_terminal_bar_is_redrawn_and_the_eta_follows_measured_rates(tmp_path):
    rd = tmp_path / "runs"
    rd.mkdir()
    before, todo = _cfgs(1), _cfgs(4, "dann")
    _finish(rd, before[0], wall_s=10.0)  # finished by an earlier launch: 0.1 s/step of source_only
    out = _Terminal()
    p = GridProgress(rd, todo, total=5, done_ids=[before[0].run_id()], jobs=2, since=time.time(), stream=out)
    p.show()
    # no dann run measured yet: the grid's other measured method stands in (4 runs x 100 steps x 0.1 s / 2 jobs)
    assert p.eta() == (20.0, "measured on 1 run")
    assert out.getvalue().startswith(CLEAR + "[") and "1/5 runs done" in out.getvalue() and "\n" not in out.getvalue()
    _finish(rd, todo[0], wall_s=40.0)  # dann: 0.4 s/step
    runs.claim_path(rd, todo[1].run_id()).write_text("{}")  # running, checkpoint at step 50
    runs.save_torch(runs.run_dir(rd, todo[1].run_id()) / "checkpoint.pt", {"step": 50})
    p.poll()
    p.show()
    assert p.eta() == ((50 + 100 + 100) * 0.4 / 2, "measured on 2 runs")
    assert out.getvalue().count(CLEAR) == 2 and "2/5 runs done, 0 failed, 1 running" in out.getvalue()
    runs.write_failure(rd, todo[2].run_id(), "RuntimeError: boom")
    p.poll()
    p.stop()
    last = out.getvalue().rsplit(CLEAR, 1)[1]
    assert last.startswith("[") and "2/5 runs done, 1 failed" in last and last.endswith("\n")


def test_plain_lines_only_when_something_is_worth_a_line(tmp_path):
    rd = tmp_path / "runs"
    rd.mkdir()
    todo = _cfgs(3)
    out = io.StringIO()
    p = GridProgress(rd, todo, total=3, done_ids=[], jobs=1, since=time.time(), stream=out, plain_every=60)
    p.show()
    p.show()  # nothing new: no line
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]
    assert "0/3 runs done" in out.getvalue() and "ETA once a run has finished" in out.getvalue()
    p.probe_s = 0.01  # the probe's first estimate: worth a line at once
    p.show()
    assert "ETA 3 s (probe: training steps only)" in out.getvalue().splitlines()[-1]
    _finish(rd, todo[0], wall_s=2.0)
    p.poll()
    p.show()  # a change, but within a minute of the last line: no line (the run printed its own)
    assert len(out.getvalue().splitlines()) == 2
    p.stop()
    assert out.getvalue().splitlines()[-1].startswith("progress: 1/3 runs done, 0 failed; elapsed")
    assert CLEAR not in out.getvalue() and "\r" not in out.getvalue()


def test_bench_prints_progress_before_the_first_run_finishes(tmp_path):
    spec = {"name": "t", "methods": ["source_only"], "pairs": [["toy_a", "toy_b"]], "seeds": [0, 1], "steps": 4,
            "runs_dir": str(tmp_path / "runs"), "out": str(tmp_path / "out"), "selection": ["last"]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dalab.cli", "bench", str(tmp_path / "spec.yaml")], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    first_progress = next(i for i, ln in enumerate(lines) if ln.startswith("progress: 0/2 runs done"))
    first_done = next(i for i, ln in enumerate(lines) if ln.startswith("done "))
    assert first_progress < first_done  # shown from the start, not after the first run
    assert any("ETA" in ln and "s (probe" in ln for ln in lines[:first_done]), proc.stdout  # an ETA at once
    assert any(ln.startswith("progress: 2/2 runs done, 0 failed; elapsed") for ln in lines)
    assert "\r" not in proc.stdout and "\x1b" not in proc.stdout  # not a terminal: no redraws
    # 4 steps: a seed may not have learned the source yet -- the summary names exactly those runs
    chance = [rec["run_id"] for rec in runs.load_records(tmp_path / "runs") if at_chance(rec)]
    assert f"2 runs attempted, 0 diverged, 0 failed, {len(chance)} at chance" in proc.stdout
    warning = [ln for ln in lines if ln.startswith("warning: ")]
    assert (warning and all(rid in warning[0] for rid in chance) and "at chance" in warning[0]) if chance else not warning
    assert at_chance({**runs.load_records(tmp_path / "runs")[0], "final": {"src_val": {"acc": 0.1}}})  # fields recorded
