"""Crash safety and bad input: the fault battery of issue 15, one test per fault.

Processes that die are real processes killed with real signals. Runs are tiny (toy domains, tens of
steps) so the whole module stays within a couple of minutes on 2 cores."""

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

from dalab import runs
from dalab.bench import BenchSpec, expand, run_state
from dalab.cli import INTERRUPTED, main
from dalab.methods.dann import DANN
from dalab.tables import build_table, load_records
from dalab.trainer import RunConfig, train
from dalab.utils import DalabError
from conftest import killed_at_step

KW = dict(device="cpu", progress=False, tensorboard=False, checkpoint_every=4)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # subprocesses: 1 thread each


def spec_file(tmp_path, **over) -> Path:
    raw = {"name": "t", "methods": ["source_only"], "pairs": [["toy_a", "toy_b"]], "seeds": [0],
           "steps": 4, "eval_every": 2, "runs_dir": str(tmp_path / "runs"), "out": str(tmp_path / "out")}
    raw.update(over)
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def dalab(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dalab.cli", *map(str, args)], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def wait_for(cond, timeout=300.0, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err
    return err


# --------------------------------------------------------------------------- 1-5: bad input

def test_same_domain_is_a_one_line_error(tmp_path, capsys):  # item 1
    rd = tmp_path / "runs"
    assert main(["run", "--method", "source_only", "--source", "toy_a", "--target", "toy_a", "--steps", "2",
                 "--runs-dir", str(rd), "--quiet"]) == 2
    one_line_error(capsys, "same domain 'toy_a'")
    assert not rd.exists()
    with pytest.raises(DalabError, match="same domain"):
        expand(BenchSpec.from_yaml(spec_file(tmp_path, pairs=[["toy_b", "toy_b"]])))


@pytest.mark.parametrize("field", ["methods", "pairs"])
def test_empty_methods_or_pairs_rejected_and_tables_untouched(tmp_path, capsys, field):  # item 2
    out = tmp_path / "out"
    out.mkdir()
    (out / "table.md").write_text("the previous tables\n")
    assert main(["bench", str(spec_file(tmp_path, **{field: []}))]) == 2
    one_line_error(capsys, f"field '{field}' is an empty list")
    assert (out / "table.md").read_text() == "the previous tables\n" and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("variant,needle", [({"mixup": "sideways"}, "mixup='sideways' must be one of"),
                                            ({"mixupp": "source"}, "unknown hyperparameter 'mixupp'")])
def test_invalid_variant_rejected_before_anything_runs(tmp_path, capsys, variant, needle):  # item 3
    assert main(["bench", str(spec_file(tmp_path, methods=["source_only", "dann"], variants=[{}, variant]))]) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "runs").exists()
    # a variant a method cannot take is still skipped for that method only, with a line saying so
    skipped: list[str] = []
    grid = expand(BenchSpec.from_yaml(spec_file(tmp_path, methods=["source_only", "dann"],
                                                variants=[{}, {"mixup": "cross"}])), skipped)
    assert len(grid) == 3 and len(skipped) == 1 and "skipped for source_only" in skipped[0]


@pytest.mark.parametrize("which", ["runs_dir", "out"])
def test_unusable_runs_dir_or_out_fail_before_the_first_run(tmp_path, capsys, which):  # item 4
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad = str(blocker) if which == "runs_dir" else str(blocker / "tables")  # a file; a folder under a file
    p = spec_file(tmp_path, **{which: bad})
    assert main(["bench", str(p)]) == 2
    one_line_error(capsys, which)
    assert not [d for d in (tmp_path / "runs").glob("*") if d.is_dir()]  # nothing trained


def test_image_folder_domain_with_a_digits_backbone_is_a_one_line_error(tmp_path, capsys):  # item 5
    assert main(["run", "--method", "source_only", "--source", "office31_amazon", "--target", "office31_webcam",
                 "--backbone", "lenet", "--data-root", str(tmp_path), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = one_line_error(capsys, "backbone 'lenet' takes 28x28 images")
    assert "resnet18" in err and "resnet50" in err and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- 6: divergence

def _nan_from(step_from: int, monkeypatch, cls=None):
    from dalab.methods.source_only import SourceOnly
    cls = cls or SourceOnly
    real = cls.update

    def blows_up(self, batch, step):  # the loss turns non-finite at step_from
        out = real(self, batch, step)
        return {**out, "loss": out["loss"] * float("nan")} if step >= step_from else out

    monkeypatch.setattr(cls, "update", blows_up)


def _all_rules_mark_it(runs_dir):
    from dalab.tables import RULE_TEXT
    for rule in RULE_TEXT:
        cell = build_table(load_records(runs_dir), rule)["rows"][0]["cells"]["toy_a→toy_b"]
        assert cell["n_failed"] == 1 and not cell["accs"], rule


def test_divergence_between_logging_points_stops_at_that_step_and_every_rule_marks_it(tmp_path, monkeypatch):
    _nan_from(7, monkeypatch)
    cfg = RunConfig("source_only", "toy_a", "toy_b", steps=20, eval_every=5)
    rec = train(cfg, tmp_path, device="cpu", progress=False, tensorboard=False, log_every=50)
    assert rec["status"] == "diverged" and rec["final"] is None and rec["train"]["diverged_at"] == 7
    assert [e["step"] for e in rec["evals"]] == [5]  # no evaluation of a NaN model
    assert (tmp_path / cfg.run_id() / "done").read_text().strip() == "diverged"  # finished: not re-run
    _all_rules_mark_it(tmp_path)


def test_divergence_on_device_flag_path_keeps_the_first_bad_step(tmp_path, monkeypatch):
    """The CUDA path (no per-step host sync) exercised on CPU: the flag is read at logging and
    evaluation points, the record still gives the first non-finite step."""
    import dalab.trainer as trainer
    monkeypatch.setattr(trainer, "_sync_every_step", lambda dev: False)
    _nan_from(7, monkeypatch)
    rec = train(RunConfig("source_only", "toy_a", "toy_b", steps=20, eval_every=10), tmp_path,
                device="cpu", progress=False, tensorboard=False, log_every=50)
    assert rec["status"] == "diverged" and rec["train"]["diverged_at"] == 7 and rec["evals"] == []


def test_non_finite_weights_are_caught_before_evaluation(tmp_path, monkeypatch):
    from dalab.methods.source_only import SourceOnly
    real = SourceOnly.update

    def poisons(self, batch, step):  # finite loss, NaN weights (e.g. an infinite gradient)
        out = real(self, batch, step)
        if step == 3:
            next(self.parameters()).data.fill_(float("nan"))
        return out

    monkeypatch.setattr(SourceOnly, "update", poisons)
    rec = train(RunConfig("source_only", "toy_a", "toy_b", steps=8, eval_every=4), tmp_path,
                device="cpu", progress=False, tensorboard=False)
    assert rec["status"] == "diverged" and rec["train"]["diverged_at"] in (3, 4) and rec["evals"] == []


# --------------------------------------------------------------------------- 7: SIGINT / SIGTERM

RUN = ["run", "--method", "source_only", "--source", "toy_a", "--target", "toy_b", "--seed", "0", "--quiet",
       "--steps", "300", "--eval-every", "100", "--checkpoint-every", "10", "--no-tensorboard", "--precision", "fp32"]


def _interrupt(rd: Path, sig: int) -> tuple[subprocess.Popen, str, str]:
    p = dalab(*RUN, "--runs-dir", rd)
    wait_for(lambda: any(rd.glob("*/checkpoint.pt")) or p.poll() is not None, what="a first checkpoint")
    assert p.poll() is None, p.communicate()
    p.send_signal(sig)
    out, err = p.communicate(timeout=300)
    return p, out, err


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_dalab_run_with_one_line_and_a_resumable_checkpoint(tmp_path, sig, code):  # item 7
    rd = tmp_path / "runs"
    p, out, err = _interrupt(rd, sig)
    assert p.returncode == code and err.strip().splitlines()[-1] == INTERRUPTED and "Traceback" not in err
    (run,) = [d for d in rd.iterdir() if d.is_dir()]
    st = runs.load_checkpoint(run, "cpu")
    assert st is not None and 10 <= st["step"] < 300 and not (run / "done").exists()
    assert not list(rd.glob("*.claim"))  # claim released
    if sig == signal.SIGINT:  # the same command resumes, to the numbers of an uninterrupted run
        again = dalab(*RUN, "--runs-dir", rd)
        out2, err2 = again.communicate(timeout=300)
        assert again.returncode == 0 and "resuming" in err2, err2
        ref = dalab(*RUN, "--runs-dir", tmp_path / "ref")
        assert ref.wait(timeout=300) == 0
        rec = runs.read_record(run)
        assert rec["train"]["resumed_from"] == st["step"]
        assert rec["evals"] == runs.read_record(tmp_path / "ref" / run.name)["evals"]


def test_sigint_to_a_parallel_bench_releases_claims_and_keeps_checkpoints(tmp_path):  # item 7, bench
    p = spec_file(tmp_path, seeds=[0, 1], steps=300, eval_every=5, precision="fp32")
    rd = tmp_path / "runs"
    b = dalab("bench", p, "--jobs", "2", "--no-tensorboard")
    wait_for(lambda: len(list(rd.glob("*/checkpoint.pt"))) == 2 or b.poll() is not None, what="two checkpoints")
    b.send_signal(signal.SIGINT)
    out, err = b.communicate(timeout=300)
    assert b.returncode == 130 and err.strip().splitlines()[-1] == INTERRUPTED, err
    wait_for(lambda: not list(rd.glob("*.claim")), what="claims released")
    assert len(list(rd.glob("*/checkpoint.pt"))) == 2


# --------------------------------------------------------------------------- 8: kill -9 of the bench parent

def test_kill_9_of_the_bench_parent_takes_its_workers_with_it(tmp_path, capsys):  # item 8
    p = spec_file(tmp_path, seeds=[0, 1, 2], steps=300, eval_every=100, precision="fp32")
    rd = tmp_path / "runs"
    b = dalab("bench", p, "--jobs", "2", "--no-tensorboard")
    wait_for(lambda: len(list(rd.glob("*.claim"))) == 2 and all(c.read_text() for c in rd.glob("*.claim"))
             or b.poll() is not None, what="two claimed runs")
    workers = [json.loads(c.read_text())["pid"] for c in rd.glob("*.claim")]
    assert b.poll() is None and b.pid not in workers
    b.kill()
    b.wait()
    wait_for(lambda: not any(runs._pid_alive(w) for w in workers), what="orphaned workers to exit")
    assert not list(rd.glob("*.claim"))  # they released their claims on the way out
    assert main(["bench", str(p), "--no-tensorboard"]) == 0  # the relaunch finishes every run
    spec = BenchSpec.from_yaml(p)
    assert all(run_state(rd, c.run_id()) == "done" for c, _ in expand(spec))


def test_relaunch_never_exits_0_while_runs_are_missing_or_failed(tmp_path, capsys, monkeypatch):  # item 8
    p = spec_file(tmp_path, methods=["source_only", "dann"], seeds=[0, 1])
    real = DANN.update

    def broken(self, batch, step):
        raise RuntimeError("boom")

    monkeypatch.setattr(DANN, "update", broken)
    assert main(["bench", str(p), "--no-tensorboard"]) == 1
    err = capsys.readouterr().err
    assert "2 of 4 runs of this grid are not finished" in err and "2 failed (RuntimeError: boom)" in err
    monkeypatch.setattr(DANN, "update", real)
    assert main(["bench", str(p), "--no-tensorboard"]) == 0  # a relaunch retries failed runs
    assert "2 runs attempted" in capsys.readouterr().out


# --------------------------------------------------------------------------- 9-13: files

def test_truncated_record_is_not_done_and_table_counts_it(tmp_path, capsys):  # item 9
    p = spec_file(tmp_path, seeds=[0, 1])
    assert main(["bench", str(p), "--no-tensorboard"]) == 0
    rd = tmp_path / "runs"
    rec = sorted(rd.glob("*/record.json"))[0]
    rec.write_text(rec.read_text()[:200])
    assert run_state(rd, rec.parent.name) == "partial"
    capsys.readouterr()
    assert main(["table", str(rd), "--out", str(tmp_path / "t")]) == 0
    assert "1 finished run(s) under" in capsys.readouterr().err
    assert main(["bench", str(p), "--no-tensorboard"]) == 0  # redone
    assert "1 runs attempted" in capsys.readouterr().out and run_state(rd, rec.parent.name) == "done"


def test_garbage_checkpoint_is_moved_aside_and_the_run_restarts(tmp_path, capsys):  # item 10
    cfg = RunConfig("source_only", "toy_a", "toy_b", steps=8, eval_every=4)
    run = tmp_path / "b" / cfg.run_id()
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"\x00garbage" * 10)
    rec = train(cfg, tmp_path / "b", resume=True, **KW)
    assert "unreadable" in capsys.readouterr().err and list(run.glob("checkpoint.pt.corrupt-*"))
    assert rec["train"]["resumed_from"] is None
    assert rec["evals"] == train(cfg, tmp_path / "a", **KW)["evals"]


def test_truncated_source_model_is_retrained_once(tmp_path, capsys, monkeypatch):  # item 11
    import dalab.trainer as trainer
    kw = dict(source="toy_a", target="toy_b", steps=4, eval_every=4, budget="2")
    rd = tmp_path / "runs"
    ft = train(RunConfig("finetune", **kw), rd, device="cpu", progress=False, tensorboard=False)
    model = rd / ft["method"]["init_from"] / "model.pt"
    model.write_bytes(model.read_bytes()[:100])
    calls = []
    real = trainer.train
    monkeypatch.setattr(trainer, "train", lambda cfg, *a, **k: calls.append(cfg.method) or real(cfg, *a, **k))
    again = train(RunConfig("finetune", **kw), rd, device="cpu", progress=False, tensorboard=False)
    assert calls == ["source_only"] and again["final"] == ft["final"]
    assert "unreadable" in capsys.readouterr().err and list(model.parent.glob("model.pt.corrupt-*"))


def test_empty_claim_goes_stale_after_a_few_seconds(tmp_path):  # item 12
    claim = runs.claim_path(tmp_path, "r1")
    claim.write_text("")  # its writer died between create and write
    assert not runs.try_claim(tmp_path, "r1")  # maybe still being written
    old = time.time() - runs.CLAIM_EMPTY_STALE_S - 1
    os.utime(claim, (old, old))
    assert runs.try_claim(tmp_path, "r1")
    assert json.loads(claim.read_text())["pid"] == os.getpid()


def test_two_identical_runs_at_once_the_second_refuses_in_one_line(tmp_path):  # item 13
    rd = tmp_path / "runs"
    first = dalab(*RUN, "--runs-dir", rd)
    wait_for(lambda: any(rd.glob("*/checkpoint.pt")) or first.poll() is not None, what="the first run")
    second = dalab(*RUN, "--runs-dir", rd)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 2 and err.startswith("error: run ") and "being trained right now" in err
    assert err.count("\n") == 1
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=300) == 130


def test_temporary_files_are_unique_per_writer_and_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    import torch
    d = tmp_path / "run"
    d.mkdir()
    assert runs._tmp_path(tmp_path / "checkpoint.pt") != runs._tmp_path(tmp_path / "checkpoint.pt")
    runs.save_checkpoint(d, {"step": 1, "method": {}, "evals": [], "rng": None})

    def disk_full(obj, f, *a, **k):
        Path(f).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        runs.save_checkpoint(d, {"step": 2, "method": {}, "evals": [], "rng": None})
    monkeypatch.undo()
    assert runs.load_checkpoint(d, "cpu")["step"] == 1 and sorted(p.name for p in d.iterdir()) == ["checkpoint.pt"]


# --------------------------------------------------------------------------- records and identity

def test_run_id_is_the_canonical_resolved_config(tmp_path):
    from dalab.cli import parse_sets
    ids = {RunConfig("dann", "toy_a", "toy_b", hparams=hp).run_id()
           for hp in ({}, {"lr": 0.01}, {"lr": 1e-2}, parse_sets(["lr=0.01"]), parse_sets(["lr=1e-2"]),
                      {"lr": "0.010", "momentum": 0.9})}
    assert len(ids) == 1
    assert RunConfig("dann", "toy_a", "toy_b", hparams={"lr": 0.02}).run_id() not in ids
    # a spec stating the default trains nothing new
    a = expand(BenchSpec.from_yaml(spec_file(tmp_path, methods=["dann"])))
    b = expand(BenchSpec.from_yaml(spec_file(tmp_path, methods=["dann"], hparams={"dann": {"lr": 1e-2}})))
    assert [c.run_id() for c, _ in a] == [c.run_id() for c, _ in b]


def test_record_is_strict_json_with_non_finite_numbers_flagged(tmp_path, monkeypatch):
    _nan_from(3, monkeypatch)
    cfg = RunConfig("source_only", "toy_a", "toy_b", steps=6, eval_every=3)
    rec = train(cfg, tmp_path, device="cpu", progress=False, tensorboard=False)
    text = (tmp_path / cfg.run_id() / "record.json").read_text()

    def reject(name):
        raise ValueError(f"bare {name} in record.json")

    raw = json.loads(text, parse_constant=reject)  # strict JSON: jq / JavaScript accept it
    assert raw["train"]["last_losses"]["loss"] is None and "/train/last_losses/loss" in raw["nonfinite"]
    back = runs.read_record(tmp_path / cfg.run_id())
    assert back["train"]["last_losses"]["loss"] != back["train"]["last_losses"]["loss"]  # NaN again
    assert rec["status"] == back["status"] == "diverged"


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path, monkeypatch):
    import dalab.trainer as trainer

    def unreadable_image(*a, **k):
        raise OSError("image file is truncated (3 bytes not processed)")

    monkeypatch.setattr(trainer, "evaluate", unreadable_image)
    cfg = RunConfig("source_only", "toy_a", "toy_b", steps=4, eval_every=2)
    with pytest.raises(OSError):
        train(cfg, tmp_path / "runs", device="cpu", progress=False)  # with TensorBoard events
    assert not (tmp_path / "runs" / cfg.run_id()).exists()


def test_one_source_model_per_source_hyperparameters(tmp_path):
    from dalab.pretrain import source_config
    p = spec_file(tmp_path, methods=["source_only", "finetune"], budgets=[0, 2], steps=4, eval_every=4,
                  hparams={"source_only": {"lr": 0.02}})
    grid = [c for c, _ in expand(BenchSpec.from_yaml(p))]
    src_row = [c for c in grid if c.method == "source_only"][0]
    ft = [c for c in grid if c.method == "finetune"][0]
    assert source_config(ft).run_id() == src_row.run_id()  # the row IS the source model
    assert main(["bench", str(p), "--no-tensorboard"]) == 0
    rec = runs.read_record(tmp_path / "runs" / ft.run_id())
    assert rec["method"]["init_from"] == src_row.run_id() and rec["method"]["source_config"]["hparams"]["lr"] == 0.02
    # other source hyperparameters, another source model (and another run id)
    other = RunConfig(**{**ft.__dict__, "source_hparams": {"lr": 0.03}})
    assert other.run_id() != ft.run_id() and source_config(other).run_id() != src_row.run_id()


# --------------------------------------------------------------------------- resume (kept from before)

def test_killed_run_resumes_to_the_same_final_numbers(tmp_path):
    cfg = RunConfig("dann", "toy_a", "toy_b", steps=12, eval_every=4)
    full = train(cfg, tmp_path / "a", **KW)
    assert not (tmp_path / "a" / cfg.run_id() / "checkpoint.pt").exists()  # removed once finished

    # as if killed between the step-4 and step-8 checkpoints
    with killed_at_step(DANN, 7, RuntimeError), pytest.raises(RuntimeError):
        train(cfg, tmp_path / "b", **KW)
    run = tmp_path / "b" / cfg.run_id()
    assert (run / "checkpoint.pt").is_file() and not (run / "done").exists()
    resumed = train(cfg, tmp_path / "b", resume=True, **KW)
    assert resumed["evals"] == full["evals"]  # every checkpoint's metrics, bitwise
    assert (run / "done").read_text().strip() == "done"


def test_resume_without_checkpoint_starts_from_scratch(tmp_path):
    cfg = RunConfig("source_only", "toy_a", "toy_b", steps=4, eval_every=4)
    a = train(cfg, tmp_path / "a", **KW)
    b = train(cfg, tmp_path / "b", resume=True, **KW)
    assert a["evals"] == b["evals"]


def _stateful_methods() -> list[str]:
    """The methods whose resume must restore more than one network and one optimizer, read off each
    built method: several optimizers (MCD, ADDA); state outside the network that no optimizer
    updates (an EMA teacher, a frozen source copy, buffers, augmentation views); or hooks that change
    state between steps (``after_step``, ``refresh``, ``on_train_start``). DANN -- one optimizer
    over the network and its discriminator -- has its own test above."""
    from dalab.methods import METHODS, Method, resolve_hparams
    from dalab.methods.nets import build_classifier

    out = []
    for name, cls in sorted(METHODS.items()):
        if cls.test_time:  # a stream run is not checkpointed: a stop ends it, the rerun starts the stream over
            continue
        hp = resolve_hparams(cls, {})
        m = cls(build_classifier("lenet_bn" if cls.batchnorm_needed(hp) else "lenet", 10), 10, hp, 8)
        stepped = {id(p) for opt in m.optim.optimizers.values() for g in opt.param_groups for p in g["params"]}
        own = [k for k, v in m.state_dict(keep_vars=True).items() if not k.startswith("net.") and id(v) not in stepped]
        hooks = [h for h in ("after_step", "refresh", "on_train_start") if getattr(cls, h) is not getattr(Method, h)]
        if len(m.optim.optimizers) > 1 or own or hooks:
            out.append(name)
    return out


@pytest.mark.parametrize("name", _stateful_methods())
def test_stateful_methods_resume_exactly(tmp_path, name):
    """A method's state beyond the network and one optimizer (several optimizers, an EMA teacher,
    in-method augmented views, pseudo-label state, a frozen source encoder, L2-SP's source weights,
    PADA's class weights) is restored from the checkpoint: a run killed between two checkpoints
    resumes to the uninterrupted run's evaluations, bitwise. A method made for another label-set
    setting runs on the toy pair as a task of its first setting."""
    from dalab.methods import METHODS, resolve_hparams
    from dalab.tasks import classes_key

    cls = METHODS[name]
    source = "+".join(["toy_a", "toy_c"][:max(1, cls.min_sources)])  # a multi-source method: two sources
    cfg = RunConfig(name, source, "toy_b", budget="0" if "0" in cls.label_budgets else "2", steps=8, eval_every=4,
                    backbone="lenet_bn" if cls.batchnorm_needed(resolve_hparams(cls, {})) else "lenet",
                    classes=None if "closed" in cls.settings else classes_key(cls.settings[0]))
    full = train(cfg, tmp_path / "a", **KW)
    with killed_at_step(cls, 6), pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", **KW)
    assert (tmp_path / "b" / cfg.run_id() / "checkpoint.pt").is_file()
    resumed = train(cfg, tmp_path / "b", resume=True, **KW)
    assert resumed["evals"] == full["evals"]


# --------------------------------------------------------------------------- Slurm: checkpoint and requeue

def test_preemption_signal_under_submitit_checkpoints_requeues_and_resumes_exactly(tmp_path):
    pytest.importorskip("submitit")
    from dalab.bench import submit
    cfg = RunConfig("source_only", "toy_a", "toy_b", steps=300, eval_every=100, precision="fp32")
    rd = tmp_path / "runs"
    opts = runs.RunOptions(device="cpu", tensorboard=False, checkpoint_every=10)
    (job,) = submit([cfg.__dict__], str(rd), opts, "submitit-local", 1, str(tmp_path / "sub"))
    run = rd / cfg.run_id()
    wait_for(lambda: (run / "checkpoint.pt").exists() or job.done(), timeout=300, what="the job's first checkpoint")
    assert not job.done()
    task = json.loads(runs.claim_path(rd, cfg.run_id()).read_text())["pid"]  # the job's task process
    os.kill(task, signal.SIGUSR1)  # what Slurm sends before the time limit with --signal USR1@90
    assert dict(job.result())[cfg.run_id()] == "done"  # after the requeue
    rec = runs.read_record(run)
    assert rec["train"]["resumed_from"] is not None
    import torch
    torch.set_num_threads(int(rec["provenance"]["torch_threads"]))
    try:
        ref = train(cfg, tmp_path / "ref", device="cpu", progress=False, tensorboard=False)
    finally:
        torch.set_num_threads(2)
    assert rec["evals"] == ref["evals"]


# --------------------------------------------------------------------------- imports

MODULES = ["dalab.runs", "dalab.trainer", "dalab.pretrain", "dalab.bench", "dalab.cli", "dalab.tables", "dalab.utils",
           "dalab.plots", "dalab.display", "dalab.render", "dalab.stats", "dalab.selection", "dalab.convergence",
           "dalab.rederive", "dalab.results_index", "dalab.progress", "dalab.cost"]


def test_no_import_circle_and_each_module_imports_alone():
    """Walk every ``import dalab.*`` (module level and inside functions) of the run-lifecycle
    modules: no circle; and each imports on its own in a fresh interpreter."""
    import ast
    import importlib.util

    graph: dict[str, set[str]] = {}
    for mod in MODULES:
        path = importlib.util.find_spec(mod).origin
        deps = set()
        for node in ast.walk(ast.parse(Path(path).read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) and node.module else [])
            deps |= {n for n in names if n in MODULES and n != mod}
        graph[mod] = deps

    def visit(m, stack):
        assert m not in stack, f"import circle: {' -> '.join(stack + [m])}"
        for d in graph[m]:
            visit(d, stack + [m])

    for m in MODULES:
        visit(m, [])
    procs = [subprocess.Popen([sys.executable, "-c", f"import {m}"], stderr=subprocess.PIPE, text=True) for m in MODULES]
    for m, p in zip(MODULES, procs):
        assert p.wait(timeout=300) == 0, f"import {m} alone fails: {p.stderr.read()[-500:]}"


# --------------------------------------------------------------------------- issue 30: the second fault battery


def _mount_tmpfs(where: Path, size: str, read_only: bool = False) -> None:
    """A small tmpfs at ``where`` (a full or read-only disk for real); skipped where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:80]})")


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(name, size, read_only)`` mounts a small tmpfs under tmp_path; unmounted afterwards."""
    mounted: list[Path] = []

    def mount(name: str, size: str = "1m", read_only: bool = False) -> Path:
        where = tmp_path / name
        _mount_tmpfs(where, size, read_only)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(folder: Path, leave: int = 0) -> None:
    """Fill the disk of ``folder`` until ``leave`` bytes are free."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler", "wb") as f:
        try:
            f.write(b"\0" * max(free - leave, 0))
            f.flush()
        except OSError:
            pass


SHORT = ["run", "--method", "source_only", "--source", "toy_a", "--target", "toy_b", "--seed", "0", "--quiet",
         "--steps", "40", "--eval-every", "40", "--checkpoint-every", "1", "--no-tensorboard", "--precision", "fp32"]


def test_full_disk_is_one_line_naming_the_folder_and_leaves_no_claim(tmp_path, tmpfs):  # 30.2
    disk = tmpfs("full", "2m")
    (disk / "runs").mkdir()
    _fill(disk)  # 0 bytes free: the bench crashed writing its claim and left a 0-byte one
    b = dalab("bench", spec_file(tmp_path, runs_dir=str(disk / "runs")), "--no-tensorboard")
    out, err = b.communicate(timeout=300)
    assert b.returncode != 0 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and "No space left on device" in err and str(disk / "runs") in err
    assert not list((disk / "runs").glob("*.claim")) and not list((disk / "runs").glob("*/"))
    # a run whose checkpoint no longer fits (torch.save: "unexpected pos ..."): one line, no temporary
    (disk / "filler").unlink()
    _fill(disk, leave=300_000)  # the data and claim fit, a ~1 MB checkpoint does not
    r = dalab(*SHORT, "--runs-dir", disk / "runs")
    out, err = r.communicate(timeout=300)
    assert r.returncode == 1 and err.count("\n") == 1 and "No space left on device" in err, err
    assert "Traceback" not in err and "unexpected pos" not in err
    assert not list((disk / "runs").rglob("*.tmp")) and not list((disk / "runs").glob("*.claim"))


def test_torch_full_disk_error_becomes_the_one_line_error(tmp_path, monkeypatch):  # 30.2, without a tmpfs
    import torch

    from dalab.utils import NoSpace
    d = tmp_path / "run"
    d.mkdir()

    def disk_full(obj, f, *a, **k):
        Path(f).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    class Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(torch, "save", disk_full)
    monkeypatch.setattr(os, "statvfs", lambda p: Full())
    with pytest.raises(NoSpace, match=f"cannot write in {d}: No space left on device"):
        runs.save_checkpoint(d, {"step": 2})
    assert list(d.iterdir()) == []


def test_files_written_atomically_honour_the_umask(tmp_path):  # 30, observation
    from dalab.utils import atomic_write_text
    old = os.umask(0o027)
    try:
        cfg = RunConfig("source_only", "toy_a", "toy_b", steps=2, eval_every=2, precision="fp32")
        train(cfg, tmp_path, device="cpu", progress=False, tensorboard=False)  # source_only: also model.pt
        run = tmp_path / cfg.run_id()
        runs.save_checkpoint(run, {"step": 1})
        atomic_write_text(tmp_path / "table.md", "x")
        for f in ("record.json", "model.pt", "done", "checkpoint.pt"):
            assert oct((run / f).stat().st_mode & 0o777) == oct(0o640), f
        assert oct((tmp_path / "table.md").stat().st_mode & 0o777) == oct(0o640)
    finally:
        os.umask(old)


TINY = ["run", "--method", "source_only", "--source", "toy_a", "--target", "toy_b", "--seed", "0", "--quiet",
        "--steps", "4", "--eval-every", "2", "--no-tensorboard", "--precision", "fp32"]


def test_unwritable_runs_dir_of_dalab_run_is_a_one_line_error(tmp_path, capsys, tmpfs):  # 30.3
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for bad, needle in ((blocker, "is a file, not a folder"), (blocker / "runs", "lies under the file")):
        assert main([*TINY, "--runs-dir", str(bad)]) == 2
        one_line_error(capsys, f"--runs-dir {bad} {needle}")
    ro = tmpfs("ro", read_only=True)
    assert main([*TINY, "--runs-dir", str(ro / "runs")]) == 2
    one_line_error(capsys, f"--runs-dir {ro / 'runs'} is not writable (Read-only file system")


def test_bench_with_a_read_only_out_creates_no_runs_folder(tmp_path, capsys, tmpfs):  # 30.4
    blocker = tmp_path / "a_file"  # out under a file
    blocker.write_text("x")
    assert main(["bench", str(spec_file(tmp_path, out=str(blocker / "tables")))]) == 2
    one_line_error(capsys, "out (--out)")
    assert not (tmp_path / "runs").exists()
    ro = tmpfs("ro", read_only=True)  # the exact case: out on a read-only filesystem
    assert main(["bench", str(spec_file(tmp_path, out=str(ro / "tables")))]) == 2
    one_line_error(capsys, f"out (--out) {ro / 'tables'} is not writable (Read-only file system")
    assert not (tmp_path / "runs").exists()


def test_rerunning_a_finished_run_keeps_it_and_force_replaces_it_only_once_finished(tmp_path, capsys):  # 30.1
    rd = tmp_path / "runs"
    assert main([*SHORT, "--runs-dir", str(rd)]) == 0
    (run,) = [d for d in rd.iterdir() if d.is_dir()]
    before = (run / "record.json").read_bytes()
    capsys.readouterr()
    assert main([*SHORT, "--runs-dir", str(rd)]) == 0  # the same command again: nothing retrained or deleted
    out = capsys.readouterr().out
    assert f"{run.name} is already finished: nothing retrained" in out and "tgt_test" in out
    assert (run / "record.json").read_bytes() == before and (run / "done").is_file()
    # --force, killed -9 after its first checkpoint: the finished result still stands in every table
    p = dalab(*SHORT, "--force", "--runs-dir", rd)
    wait_for(lambda: (run / "checkpoint.pt").exists() or p.poll() is not None, what="the forced run's checkpoint")
    p.kill()
    p.wait()
    assert not (run / "done").exists() and (rd / f"{run.name}.previous" / "record.json").read_bytes() == before
    assert [r["run_id"] for r in load_records(rd)] == [run.name]
    assert main(["table", str(rd), "--out", str(tmp_path / "t")]) == 0
    assert run.name in (tmp_path / "t" / "runs.csv").read_text()
    # the same command finishes the new attempt (from its checkpoint); only then is the old one gone
    assert main([*SHORT, "--runs-dir", str(rd)]) == 0
    assert runs.is_done(rd, run.name) and not (rd / f"{run.name}.previous").exists()
    assert runs.read_record(run)["train"]["resumed_from"] is not None


def test_a_damaged_record_is_reported_and_the_table_still_renders(tmp_path, capsys):  # 30.11
    p = spec_file(tmp_path, seeds=[0, 1, 2])
    assert main(["bench", str(p), "--no-tensorboard"]) == 0
    rd = tmp_path / "runs"
    damaged = sorted(rd.glob("*/record.json"))[:2]
    for path, damage in zip(damaged, ({"config": {}}, {"evals": "oops"})):
        path.write_text(json.dumps({**json.loads(path.read_text()), **damage}))
    capsys.readouterr()
    assert main(["table", str(rd), "--out", str(tmp_path / "t")]) == 0
    assert "2 finished run(s) under" in capsys.readouterr().err
    assert (tmp_path / "t" / "table.md").is_file() and len(runs.load_records(rd, report=False)) == 1
    assert all(run_state(rd, path.parent.name) == "partial" for path in damaged)  # redone by the next bench


def test_a_stale_claim_whose_pid_was_reused_is_taken_over(tmp_path, capsys):  # 30.12
    import socket
    rd = tmp_path / "runs"
    rd.mkdir()
    cfg = RunConfig("source_only", "toy_a", "toy_b", seed=0, steps=4, eval_every=2, precision="fp32")
    claim = runs.claim_path(rd, cfg.run_id())
    live = os.getppid()  # a live process on this host that is not the holder
    claim.write_text(json.dumps({"pid": live, "host": socket.gethostname(), "time": time.time() - 7200}))
    old = time.time() - 7200
    os.utime(claim, (old, old))  # two hours without a heartbeat
    assert run_state(rd, cfg.run_id()) != "claimed"
    assert main([*TINY, "--runs-dir", str(rd)]) == 0 and runs.is_done(rd, cfg.run_id())
    # a fresh claim naming a live pid that is another process than the one that wrote it: stale at once
    claim.write_text(json.dumps({"pid": live, "host": socket.gethostname(), "time": time.time(),
                                 "proc": "another-boot:12345"}))
    assert runs.try_claim(rd, cfg.run_id())
    runs.release_claim(rd, cfg.run_id())
    claim.write_text(json.dumps({"pid": live, "host": socket.gethostname(), "time": time.time(),
                                 "proc": runs._process_identity(live)}))
    assert not runs.try_claim(rd, cfg.run_id())  # its holder, alive and heartbeating: kept


def test_run_ids_name_the_computed_precision_and_committed_ids_stay_valid(tmp_path, monkeypatch):  # 30.13
    import csv
    import dataclasses

    import torch

    import dalab.utils as utils
    repo = Path(__file__).resolve().parent.parent
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # every committed record's id recomputes from its stored config, and it counts as done
    records = sorted(repo.glob("results/*/runs/*/record.json"))
    assert records
    for path in records:
        rec = runs.read_record(path.parent)
        assert runs.key_id(rec["config"]) == rec["run_id"] == path.parent.name
        assert runs.is_done(path.parent.parent, rec["run_id"])
    # the main job: bf16 and fp32 are different runs; auto is the one its CPU computes in, under that run's id
    spec = BenchSpec.from_yaml(repo / "benchmarks" / "digits.yaml")

    def grid_ids(bf16_cpu: bool, precision: str = "auto") -> set[str]:
        monkeypatch.setattr(utils, "cpu_has_bf16", lambda: bf16_cpu)
        return {c.run_id() for c, _ in expand(dataclasses.replace(spec, precision=precision))}

    on_bf16, on_fp32 = grid_ids(True), grid_ids(False)
    assert on_bf16 == grid_ids(True, "bf16") and on_fp32 == grid_ids(False, "fp32") == grid_ids(True, "fp32")
    assert len(on_bf16) == len(on_fp32) and not on_bf16 & on_fp32
    # its committed runs.csv lists the ids of the CPU its runs computed on (table.csv's setting names bf16)
    listed = {r["run_id"] for r in csv.DictReader(open(repo / "results" / "digits" / "runs.csv"))}
    assert listed == (on_bf16 if ", bf16" in (repo / "results" / "digits" / "table.csv").read_text() else on_fp32)
    assert {p.parent.name for p in repo.glob("results/digits/runs/*/record.json")} <= on_bf16 | on_fp32
    # ids committed before ids named the computed precision (results/digits/runs.csv at d809c85: precision
    # auto on a bf16 CPU) are still those bf16 runs' ids
    monkeypatch.setattr(utils, "cpu_has_bf16", lambda: True)
    main_job = dict(steps=500, eval_every=125, backbone="lenet_bn")
    assert RunConfig("source_only", "mnist5k", "ucidigits", hparams={"lr": 0.03, "weight_ema": 0.99},
                     **main_job).run_id() == "source_only__mnist5k-ucidigits__b0__s0__599845b7"
    assert RunConfig("adda", "mnist5k", "mnistm5k", hparams={"weight_ema": 0.99},
                     source_hparams={"lr": 0.03, "weight_ema": 0.99}, **main_job).run_id() == \
        "adda__mnist5k-mnistm5k__b0__s0__10450998"
    # a record under an old auto id that computed fp32 is not the bf16 run that id stands for now
    cfg = RunConfig("source_only", "toy_a", "toy_b", steps=2, eval_every=2, precision="fp32")
    rec = train(cfg, tmp_path, device="cpu", progress=False, tensorboard=False)
    assert runs.is_done(tmp_path, cfg.run_id())
    rec["config"]["precision"] = "auto"
    old_id = runs.key_id(rec["config"])
    (tmp_path / cfg.run_id()).rename(tmp_path / old_id)
    runs.write_record(tmp_path / old_id, {**rec, "run_id": old_id})
    assert not runs.is_done(tmp_path, old_id)
    monkeypatch.setattr(utils, "cpu_has_bf16", lambda: True)
    assert RunConfig("source_only", "toy_a", "toy_b", steps=2, eval_every=2).run_id() == old_id


def test_a_cache_file_of_another_domain_is_rebuilt_not_used(tmp_path):  # 30, observation
    from dalab.datasets.cache import cache_path
    cache = tmp_path / "cache"
    env = {**ENV, "DALAB_CACHE": str(cache)}
    build = "from dalab.datasets import DOMAINS; [DOMAINS[n].builder() for n in ('mnist5k', 'ucidigits')]"
    subprocess.run([sys.executable, "-c", build], env=env, check=True)
    (cache / cache_path("mnist5k", "v1").name).replace(cache / cache_path("ucidigits", "v1").name)
    r = subprocess.run([sys.executable, "-m", "dalab.cli", "run", "--method", "source_only", "--source", "mnist5k",
                        "--target", "ucidigits", "--steps", "1", "--eval-every", "1", "--quiet", "--no-tensorboard",
                        "--precision", "fp32", "--runs-dir", str(tmp_path / "runs")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "rebuilding ucidigits: cannot use cache" in r.stderr and "holds domain 'mnist5k'" in r.stderr
    (rec,) = load_records(tmp_path / "runs")
    assert [rec["data"]["target"][k] for k in ("train", "val", "test")] == [1259, 269, 269]
    from dalab.datasets.base import load_domain
    assert load_domain("ucidigits").fingerprint.startswith("sha256:")  # for the record (see dalab.trainer)


def test_unknown_domain_message_lists_no_test_only_domain(tmp_path, capsys):  # 30, observation
    assert main(["run", "--method", "source_only", "--source", "mnist5k", "--target", "ucidigit",
                 "--runs-dir", str(tmp_path / "runs")]) == 2
    err = one_line_error(capsys, "unknown domain 'ucidigit' (did you mean 'ucidigits'?)")
    assert "toy_a" not in err and "toy_b" not in err and "mnistm5k" in err


def test_a_resumed_run_shows_each_step_once_in_tensorboard(tmp_path):  # 30, observation
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = RunConfig("source_only", "toy_a", "toy_b", steps=30, eval_every=10, precision="fp32")
    kw = dict(device="cpu", progress=False, tensorboard=True, log_every=1, checkpoint_every=10)
    from dalab.methods.source_only import SourceOnly
    with killed_at_step(SourceOnly, 25, RuntimeError), pytest.raises(RuntimeError):
        train(cfg, tmp_path, **kw)  # its events of steps 11-24 are on disk, its checkpoint is at step 20
    train(cfg, tmp_path, resume=True, **kw)
    acc = EventAccumulator(str(tmp_path / cfg.run_id() / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 31))
    assert [e.step for e in acc.Scalars("tgt_test/acc")] == [10, 20, 30]


# --------------------------------------------------------------------------- issue 30 items 6-10

@pytest.mark.parametrize("args, needle", [
    (["--jobs", "0"], "error: --jobs 0 is not valid: give an integer >= 1"),
    (["--jobs", "-2"], "error: --jobs -2 is not valid: give an integer >= 1"),
    (["--dry-run", "--step-time", "-1"], "error: --step-time -1.0 is not valid: give a number of seconds > 0"),
])
def test_bench_rejects_bad_jobs_and_step_time(tmp_path, capsys, args, needle):
    from dalab.cli import main

    p = tmp_path / "s.yaml"
    p.write_text("methods: [source_only]\npairs: [[toy_a, toy_b]]\nseeds: [0]\nsteps: 2\n"
                 f"runs_dir: {tmp_path / 'runs'}\nout: {tmp_path / 'out'}\n")
    assert main(["bench", str(p), *args]) == 2
    err = capsys.readouterr().err
    assert err.strip() == needle and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text, needle", [
    ("methods: [source_only]\nhparams: {dann: {lrr: abc}}\n", "unknown hyperparameter 'lrr' for method 'dann'"),
    ("methods: [source_only]\nhparams: {dann: {lr: abc}}\n", "lr"),
    ("name: [x]\n", "field 'name' must be a non-empty string, got ['x']"),
])
def test_spec_errors_for_names_and_hparams_of_methods_outside_the_grid(tmp_path, capsys, text, needle):
    from dalab.cli import main

    p = tmp_path / "s.yaml"
    p.write_text(text + f"pairs: [[toy_a, toy_b]]\nruns_dir: {tmp_path / 'runs'}\nout: {tmp_path / 'out'}\n")
    assert main(["bench", str(p), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_a_spec_that_is_not_utf8_is_one_error_line(tmp_path, capsys):
    from dalab.cli import main

    p = tmp_path / "s.yaml"
    p.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    assert main(["bench", str(p), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: benchmark spec {p} is not UTF-8 text (byte 0xe9") and err.count("\n") == 1


@pytest.mark.parametrize("method, name", [("dann", "disc_hidden"), ("cdan", "rand_dim"), ("adda", "disc_hidden"),
                                          ("arch_mod", "bottleneck")])
def test_size_hyperparameters_are_bounded(method, name, capsys):
    from dalab.cli import main

    assert main(["run", "--method", method, "--source", "toy_a", "--target", "toy_b",
                 "--set", f"{name}=1000000000000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and name in err and err.count("\n") == 1
