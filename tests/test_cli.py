"""The dalab command: list, run, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dalab.cli import main
from dalab.methods import METHODS
from dalab.trainer import RunConfig


def test_list_shows_every_method_and_domain(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert name in out
    assert "mnist5k" in out and "ucidigits" in out and "toy_a" not in out


def test_run_writes_record_tensorboard_and_done(runs_dir, capsys):
    args = ["run", "--method", "dann", "--source", "toy_a", "--target", "toy_b", "--steps", "6",
            "--eval-every", "3", "--quiet", "--runs-dir", str(runs_dir), "--set", "lr=0.005"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "tgt_test" in out
    (run,) = list(runs_dir.iterdir())
    rec = json.loads((run / "record.json").read_text())
    assert (run / "done").read_text().strip() == "done"
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    assert rec["status"] == "done" and rec["hparams"]["lr"] == 0.005
    assert [e["step"] for e in rec["evals"]] == [3, 6]
    for split in ("src_val", "tgt_val", "tgt_test"):
        assert set(rec["final"][split]) == {"acc", "bal_acc", "macro_f1"}
        assert 0 <= rec["final"][split]["acc"] <= 1
    assert rec["train"]["steps_per_s"] > 0 and rec["provenance"]["versions"]["torch"]
    assert rec["config"]["seed"] == 0 and "commit" in rec["provenance"]


@pytest.mark.parametrize("extra,needle", [
    (["--method", "dannn"], "unknown method 'dannn' (did you mean 'dann'?)"),
    (["--target", "ucidigit"], "unknown domain 'ucidigit' (did you mean 'ucidigits'?)"),
    (["--set", "lr=-1"], "out of range"),
    (["--set", "lr=abc"], "must be a float"),
    (["--set", "lr=nan"], "must be finite"),
    (["--set", "nope=1"], "unknown hyperparameter 'nope'"),
    (["--set", "lr"], "use --set NAME=VALUE"),
    (["--budget", "5"], "does not support target-label budget"),
    (["--budget", "x"], "bad target-label budget"),
])
def test_bad_input_one_line_error_exit_2_nothing_written(extra, needle, runs_dir, capsys):
    base = {"--method": "dann", "--source": "toy_a", "--target": "toy_b"}
    args = ["run", "--steps", "2", "--quiet", "--runs-dir", str(runs_dir)]
    for k, v in base.items():
        if k not in extra:
            args += [k, v]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err
    assert not runs_dir.exists()


def test_run_id_is_deterministic_and_config_sensitive():
    a = RunConfig("dann", "mnist5k", "ucidigits", seed=1)
    assert a.run_id() == RunConfig("dann", "mnist5k", "ucidigits", seed=1).run_id()
    assert a.run_id() != RunConfig("dann", "mnist5k", "ucidigits", seed=1, hparams={"lr": 0.02}).run_id()
    assert a.run_id().startswith("dann__mnist5k-ucidigits__b0__s1__")


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "dalab.cli", "list"], capture_output=True, text=True)
    assert r.returncode == 0 and "dann" in r.stdout


def test_import_dalab_is_light():
    r = subprocess.run([sys.executable, "-c", "import dalab, sys; print('torch' in sys.modules)"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "False"


def test_same_seed_same_metrics_on_cpu(tmp_path):
    from dalab.trainer import train
    cfg = RunConfig("dann", "toy_a", "toy_b", steps=4, eval_every=4)
    r1 = train(cfg, tmp_path / "a", device="cpu", progress=False, tensorboard=False)
    r2 = train(cfg, tmp_path / "b", device="cpu", progress=False, tensorboard=False)
    assert r1["final"] == r2["final"]
