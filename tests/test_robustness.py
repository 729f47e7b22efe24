"""Crash safety: a killed run resumes to the same numbers; a diverged run is recorded, not fatal."""

from __future__ import annotations

import pytest

from dalab.methods.dann import DANN
from dalab.tables import build_table, load_records
from dalab.trainer import RunConfig, train

KW = dict(device="cpu", progress=False, tensorboard=False, checkpoint_every=4)


def test_killed_run_resumes_to_the_same_final_numbers(tmp_path, monkeypatch):
    cfg = RunConfig("dann", "toy_a", "toy_b", steps=12, eval_every=4)
    full = train(cfg, tmp_path / "a", **KW)
    assert not (tmp_path / "a" / cfg.run_id() / "checkpoint.pt").exists()  # removed once finished

    real = DANN.update

    def dies_at_step_7(self, batch, step):
        if step == 7:
            raise KeyboardInterrupt  # as if killed between the step-4 and step-8 checkpoints
        return real(self, batch, step)

    monkeypatch.setattr(DANN, "update", dies_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", **KW)
    run = tmp_path / "b" / cfg.run_id()
    assert (run / "checkpoint.pt").is_file() and not (run / "done").exists()
    monkeypatch.setattr(DANN, "update", real)
    resumed = train(cfg, tmp_path / "b", resume=True, **KW)
    assert resumed["evals"] == full["evals"]  # every checkpoint's metrics, bitwise
    assert (run / "done").read_text().strip() == "done"


def test_resume_without_checkpoint_starts_from_scratch(tmp_path):
    cfg = RunConfig("source_only", "toy_a", "toy_b", steps=4, eval_every=4)
    a = train(cfg, tmp_path / "a", **KW)
    b = train(cfg, tmp_path / "b", resume=True, **KW)
    assert a["evals"] == b["evals"]


def test_diverged_run_is_recorded_and_marked_in_tables(tmp_path, monkeypatch):
    from dalab.methods.source_only import SourceOnly
    real = SourceOnly.update

    def blows_up(self, batch, step):  # a loss that turns non-finite at step 7
        out = real(self, batch, step)
        return {**out, "loss": out["loss"] * float("nan")} if step >= 7 else out

    monkeypatch.setattr(SourceOnly, "update", blows_up)
    cfg = RunConfig("source_only", "toy_a", "toy_b", steps=20, eval_every=5)
    rec = train(cfg, tmp_path, device="cpu", progress=False, tensorboard=False, log_every=5)
    assert rec["status"] == "diverged" and rec["final"] is None
    assert rec["train"]["diverged_at"] == 10 and rec["train"]["last_losses"]
    assert [e["step"] for e in rec["evals"]] == [5]  # the evaluation before it is kept
    assert (tmp_path / cfg.run_id() / "done").read_text().strip() == "diverged"  # finished: not re-run
    row = build_table(load_records(tmp_path), "last")["rows"][0]
    assert row["cells"]["toy_a→toy_b"]["n_failed"] == 1 and not row["cells"]["toy_a→toy_b"]["accs"]


@pytest.mark.parametrize("name", ["self_ensembling", "adamatch"])
def test_teacher_and_view_methods_resume_bitwise(tmp_path, monkeypatch, name):
    """An EMA teacher (self_ensembling) and in-method augmented views (both) are restored from the
    checkpoint: a run killed at step 7 resumes to the uninterrupted run's evaluations, bitwise."""
    from dalab.methods import METHODS

    cls = METHODS[name]
    cfg = RunConfig(name, "toy_a", "toy_b", steps=12, eval_every=4)
    full = train(cfg, tmp_path / "a", **KW)
    real = cls.update

    def dies_at_step_7(self, batch, step):
        if step == 7:
            raise KeyboardInterrupt
        return real(self, batch, step)

    monkeypatch.setattr(cls, "update", dies_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", **KW)
    monkeypatch.setattr(cls, "update", real)
    resumed = train(cfg, tmp_path / "b", resume=True, **KW)
    assert resumed["evals"] == full["evals"]


@pytest.mark.parametrize("name", ["mcd", "adda"])
def test_multi_optimizer_methods_resume_exactly(tmp_path, monkeypatch, name):
    """MCD (optimizers G and C, 2 + num_k steps per batch) and ADDA (T and D, a frozen source encoder,
    started from the shared source pretraining) resume from a checkpoint to bitwise the same numbers."""
    from dalab.methods import METHODS

    cls = METHODS[name]
    cfg = RunConfig(name, "toy_a", "toy_b", steps=8, eval_every=4)
    full = train(cfg, tmp_path / "a", **KW)
    real = cls.update

    def dies_at_step_6(self, batch, step):
        if step == 6:
            raise KeyboardInterrupt
        return real(self, batch, step)

    monkeypatch.setattr(cls, "update", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", **KW)
    assert (tmp_path / "b" / cfg.run_id() / "checkpoint.pt").is_file()
    monkeypatch.setattr(cls, "update", real)
    resumed = train(cfg, tmp_path / "b", resume=True, **KW)
    assert resumed["evals"] == full["evals"]
