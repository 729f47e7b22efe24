"""``weight_ema``: the run evaluates and hands over an exponential moving average of its weights
and BatchNorm statistics (dalab.optim.WeightAverage); off by default and then out of run ids."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dalab.optim import WeightAverage
from dalab.trainer import RunConfig, train
from conftest import killed_at_step

KW = dict(device="cpu", progress=False, tensorboard=False, checkpoint_every=4)


def test_average_follows_the_warmed_up_decay_and_swapping_restores_the_live_weights():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    avg = WeightAverage(net, decay=0.9)
    w0 = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(2.0)
    avg.update()                                   # n = 1: d = min(0.9, 2 / 11)
    d = 2 / 11
    assert torch.allclose(avg.avg[0], d * w0 + (1 - d) * (w0 + 1.0))
    assert torch.allclose(avg.avg[-2], torch.full((2,), (1 - d) * 2.0))   # BN running mean averaged too
    for _ in range(200):
        avg.update()
    before = avg.avg[0].clone()
    avg.update()                                   # n = 202: d capped at 0.9
    assert torch.allclose(avg.avg[0], 0.9 * before + 0.1 * net[0].weight)
    live = net[0].weight.detach().clone()
    with avg.swapped_in():
        assert torch.allclose(net[0].weight, avg.avg[0])
    assert torch.equal(net[0].weight, live)         # training continues on its own weights


def test_off_by_default_and_then_not_part_of_the_run_id():
    base = RunConfig("dann", "toy_a", "toy_b", steps=8, eval_every=4)
    assert "weight_ema" not in base.key()["hparams"]    # ids of runs recorded before the option stay valid
    assert RunConfig("dann", "toy_a", "toy_b", steps=8, eval_every=4, hparams={"weight_ema": 0.0}).run_id() == base.run_id()
    assert RunConfig("dann", "toy_a", "toy_b", steps=8, eval_every=4, hparams={"weight_ema": 0.9}).run_id() != base.run_id()


def test_a_run_evaluates_the_average_and_keeps_it_as_its_final_network(tmp_path, monkeypatch):
    """Intermediate points score the average while training goes on with the live weights; the
    final point and the saved network are the average."""
    from dalab import runs
    from dalab.methods.source_only import SourceOnly

    seen, applied = [], []
    real_step, real_apply = SourceOnly.train_step, WeightAverage.apply

    def spy_step(self, batch, step):
        seen.append([p.detach().clone() for p in self.net.parameters()])   # what training steps from
        return real_step(self, batch, step)

    def spy_apply(self):
        applied.append(([t.clone() for t in self.live], [t.clone() for t in self.avg]))
        return real_apply(self)

    monkeypatch.setattr(SourceOnly, "train_step", spy_step)
    monkeypatch.setattr(WeightAverage, "apply", spy_apply)
    plain = train(RunConfig("source_only", "toy_a", "toy_b", steps=8, eval_every=4), tmp_path / "a", **KW)
    seen_plain, seen[:] = list(seen), []
    cfg = RunConfig("source_only", "toy_a", "toy_b", steps=8, eval_every=4, hparams={"weight_ema": 0.9})
    ema = train(cfg, tmp_path / "b", **KW)
    assert all(torch.equal(a, b) for sa, sb in zip(seen_plain, seen) for a, b in zip(sa, sb))  # never fed back
    assert len(applied) == 2             # swapped in at step 4 (and back), applied for good at step 8
    live, avg = applied[-1]
    saved = runs.load_model(tmp_path / "b" / cfg.run_id())
    params = [v for k, v in saved.items() if "running_" not in k and "num_batches" not in k]  # parameter order
    assert len(params) == len(seen[0])
    assert all(torch.equal(s, a) for s, a in zip(params, avg))                # the handed-over network
    assert not all(torch.equal(a, b) for a, b in zip(live[:len(params)], avg))
    assert ema["hparams"]["weight_ema"] == 0.9
    # both points score the average: their label-free scores (continuous) differ from the plain run's
    assert all(a["tgt_train_unsup"] != b["tgt_train_unsup"] for a, b in zip(ema["evals"], plain["evals"]))


def test_a_killed_run_with_an_average_resumes_to_the_same_numbers(tmp_path):
    from dalab.methods.dann import DANN

    cfg = RunConfig("dann", "toy_a", "toy_b", steps=12, eval_every=4, hparams={"weight_ema": 0.9})
    full = train(cfg, tmp_path / "a", **KW)
    with killed_at_step(DANN, 7, RuntimeError), pytest.raises(RuntimeError):
        train(cfg, tmp_path / "b", **KW)
    resumed = train(cfg, tmp_path / "b", resume=True, **KW)
    assert resumed["train"]["resumed_from"] == 4
    assert resumed["evals"] == full["evals"]
