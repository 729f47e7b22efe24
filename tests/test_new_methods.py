"""What makes each method of issue 14 special (one group of test functions per method)."""

from __future__ import annotations

import shutil

import pytest
import torch

from dalab.methods import METHODS, resolve_hparams
from dalab.methods.nets import build_classifier
from dalab.trainer import RunConfig, train
from conftest import tiny_batch

KW = dict(device="cpu", progress=False, tensorboard=False)


# --------------------------------------------------------------------------- shot (source-free)

def _shot_cfg(steps: int = 12) -> RunConfig:
    # toy_b: 160 train images, batch 32 -> a refresh (pseudo-labels) every 5 steps: 1, 6, 11
    return RunConfig("shot", "toy_a", "toy_b", steps=steps, eval_every=6, hparams={"batch_size": 32})


@pytest.fixture(scope="module")
def shot_source(tmp_path_factory):
    """The shared source pretraining of :func:`_shot_cfg`, trained once for this module."""
    from dalab.pretrain import source_config

    d = tmp_path_factory.mktemp("shot_source")
    train(source_config(_shot_cfg()), d, **KW)
    return d


def _runs_dir(shot_source, path):
    """A fresh runs dir that already holds the source-pretrained run (a cache hit)."""
    shutil.copytree(shot_source, path)
    return path


def test_shot_adaptation_batches_carry_no_source_data(tmp_path, monkeypatch, shot_source):
    """Through the real trainer: every batch SHOT's update receives has no source tensors (and no
    target labels); pseudo-labels are refreshed once per pass over target train."""
    cls = METHODS["shot"]
    seen, refreshed = [], []
    real_update, real_refresh = cls.update, cls.refresh

    def spy_update(self, batch, step):
        seen.append({k: v is not None for k, v in vars(batch).items()})
        return real_update(self, batch, step)

    def spy_refresh(self, x_tgt, step):
        refreshed.append(step)
        return real_refresh(self, x_tgt, step)

    monkeypatch.setattr(cls, "update", spy_update)
    monkeypatch.setattr(cls, "refresh", spy_refresh)
    rec = train(_shot_cfg(), _runs_dir(shot_source, tmp_path / "r"), **KW)
    assert rec["status"] == "done" and rec["method"]["init_from"].startswith("source_only__")
    assert rec["method"]["uses_source"] is False
    assert len(seen) == 12
    assert all(s == {"x_src": False, "y_src": False, "x_tgt": True, "x_tgt_lab": False, "y_tgt_lab": False}
               for s in seen), seen
    assert refreshed == [1, 6, 11]
    assert "pl_loss" in rec["train"]["last_losses"]


def test_shot_source_hypothesis_stays_bitwise_frozen():
    """The head's last layer (the source hypothesis) never changes; the feature extractor does."""
    torch.manual_seed(0)
    cls = METHODS["shot"]
    m = cls(build_classifier("lenet_bn", 10), 10, resolve_hparams(cls, {}), 10)
    hyp = {k: v.clone() for k, v in m.net.head[-1].state_dict().items()}
    rest = {k: v.clone() for k, v in m.net.state_dict().items() if not k.startswith("head.4.")}
    m.train()
    m.refresh([tiny_batch(seed=9).x_tgt, tiny_batch(seed=10).x_tgt], 1)
    assert bool(m.labelset.any())
    for step in range(1, 4):
        out = m.train_step(tiny_batch(seed=step, source=False, labeled=False), step)
        assert "pl_loss" in out
    for k, v in m.net.head[-1].state_dict().items():
        assert torch.equal(v, hyp[k]), f"source hypothesis {k} changed"
    assert all(not p.requires_grad for p in m.net.head[-1].parameters())
    moved = [k for k, v in m.net.state_dict().items() if k in rest and not torch.equal(v, rest[k])]
    assert any(k.startswith("backbone.") for k in moved) and any(k.startswith("head.0.") for k in moved)


def test_shot_pseudo_labels_survive_resume(tmp_path, monkeypatch, shot_source):
    """Killed at step 7 (checkpoint at 4, last refresh at 1), the resumed run's step 5 uses the
    pseudo-labelling state (snapshot, centroids, labelset) restored from the checkpoint: it ends
    bitwise equal to an uninterrupted run; dropping that state on load would not."""
    cls = METHODS["shot"]
    cfg = _shot_cfg()
    for d in "abc":
        _runs_dir(shot_source, tmp_path / d)
    full = train(cfg, tmp_path / "a", save_model=True, checkpoint_every=4, **KW)

    real = cls.update

    def dies_at_step_7(self, batch, step):
        if step == 7:
            raise KeyboardInterrupt
        return real(self, batch, step)

    monkeypatch.setattr(cls, "update", dies_at_step_7)
    for d in ("b", "c"):
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / d, checkpoint_every=4, **KW)
    monkeypatch.setattr(cls, "update", real)
    state = torch.load(tmp_path / "b" / cfg.run_id() / "checkpoint.pt", weights_only=False)["method"]["model"]
    assert state["labelset"].any() and "centroids" in state and any(k.startswith("snapshot.") for k in state)

    resumed = train(cfg, tmp_path / "b", resume=True, save_model=True, checkpoint_every=4, **KW)
    assert resumed["evals"] == full["evals"]
    a = torch.load(tmp_path / "a" / cfg.run_id() / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / cfg.run_id() / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    real_load = cls.load_training_state

    def forgets_pseudo_labels(self, st):  # control: the same resume without the restored state
        real_load(self, st)
        self.labelset.zero_()

    monkeypatch.setattr(cls, "load_training_state", forgets_pseudo_labels)
    train(cfg, tmp_path / "c", resume=True, save_model=True, checkpoint_every=4, **KW)
    c = torch.load(tmp_path / "c" / cfg.run_id() / "model.pt", weights_only=True)
    assert any(not torch.equal(a[k], c[k]) for k in a)
