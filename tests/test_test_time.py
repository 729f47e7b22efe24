"""Test-time adaptation (issue 26): stream orders, the predict-then-adapt protocol in the trainer,
what each TTA method may change, the seeded evaluation order of batch-dependent models, and the
one-line errors of a stream that cannot be."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dalab import streams
from dalab.methods import METHODS, Batch, resolve_hparams
from dalab.methods.nets import build_classifier
from dalab.runs import RunConfig
from dalab.trainer import train

KW = dict(device="cpu", progress=False, tensorboard=False)
TTA = sorted(n for n, c in METHODS.items() if c.test_time)


def tta_cfg(method: str, target: str = "toy_c", **hp) -> RunConfig:
    return RunConfig(method, "toy_a", target, steps=30, eval_every=30, backbone="lenet_bn", precision="fp32",
                     hparams={"batch_size": 16, **hp})


def make(name: str, **over):
    torch.manual_seed(0)
    cls = METHODS[name]
    m = cls(build_classifier("lenet_bn", 10), 10, resolve_hparams(cls, over), 10)
    m.train()
    m.on_train_start(None)
    return m


# --------------------------------------------------------------------------- stream orders

@pytest.mark.parametrize("how", list(streams.ORDERS))
def test_every_order_is_one_pass_over_every_sample(how):
    labels = np.repeat(np.arange(10), 30)
    rng = np.random.default_rng(0)
    perm = streams.order(labels, how, rng, batch_size=16, alpha=0.1)
    assert sorted(perm.tolist()) == list(range(len(labels)))


def test_class_sorted_is_sorted_and_iid_is_not_the_storage_order():
    labels = np.repeat(np.arange(10), 30)  # stored sorted by class, as mnist5k is
    srt = streams.order(labels, "class_sorted", np.random.default_rng(0), 16)
    assert np.all(np.diff(labels[srt]) >= 0)
    iid = streams.order(labels, "iid", np.random.default_rng(0), 16)
    assert len(set(labels[iid[:16]].tolist())) > 3  # a first batch of mixed classes


def test_dirichlet_concentration_moves_between_sorted_and_iid():
    """Small alpha: each batch holds few classes (label shift); large alpha: close to i.i.d."""
    labels = np.repeat(np.arange(10), 64)

    def classes_per_batch(alpha):
        perm = streams.order(labels, "dirichlet", np.random.default_rng(0), 32, alpha)
        return np.mean([len(set(labels[perm[i:i + 32]].tolist())) for i in range(0, len(perm), 32)])

    assert classes_per_batch(0.01) < 3 < 8 < classes_per_batch(1000.0)


# --------------------------------------------------------------------------- the protocol

def test_each_batch_is_predicted_before_the_method_adapts_on_it(tmp_path, monkeypatch):
    """The trainer's StreamLoop: stream_predict(batch s) comes before update(batch s), the batch the
    method sees holds the predicted inputs and nothing else (no source sample, no label), and the
    record's headline is the online accuracy of those predictions."""
    cls = METHODS["tent"]
    calls = []
    real_predict, real_update = cls.stream_predict, cls.update

    def predict(self, x, step):
        calls.append(("predict", step, x))
        return real_predict(self, x, step)

    def update(self, batch, step):
        assert batch.x_src is None and batch.y_src is None and batch.x_tgt_lab is None and batch.y_tgt_lab is None
        assert batch.x_tgt is calls[-1][2]  # the batch just predicted
        calls.append(("update", step, batch.x_tgt))
        return real_update(self, batch, step)

    monkeypatch.setattr(cls, "stream_predict", predict)
    monkeypatch.setattr(cls, "update", update)
    rec = train(tta_cfg("tent"), tmp_path, **KW)
    kinds = [(k, s) for k, s, _ in calls]
    n = rec["train"]["steps"]
    assert kinds == [(k, s) for s in range(1, n + 1) for k in ("predict", "update")]
    assert rec["data"]["target"]["train"] == rec["final"]["online"]["samples"]  # one pass over target train
    from dalab.tasks import headline_split, score
    assert headline_split(rec) == "online" and score(rec, rec["final"]) == rec["final"]["online"]["acc"]
    assert rec["method"]["uses_source"] is False and len(rec["evals"]) == 1


def test_no_adapt_is_the_source_model_whatever_the_order(tmp_path):
    """no_adapt's final model is source_only's network (same target-test numbers), and its online
    accuracy does not depend on the stream order (eval-mode BatchNorm: no batch dependence)."""
    a = train(tta_cfg("no_adapt"), tmp_path, **KW)
    b = train(tta_cfg("no_adapt", stream_order="class_sorted", batch_size=8), tmp_path, **KW)
    src = json.loads((tmp_path / a["method"]["init_from"] / "record.json").read_text())
    assert a["final"]["tgt_test"] == src["final"]["tgt_test"]
    assert a["final"]["online"]["acc"] == pytest.approx(b["final"]["online"]["acc"], abs=1e-9)


def test_batch_statistics_change_with_the_order_and_episodic_resets_each_batch(tmp_path):
    """BN adapt on a class-sorted stream sees one-class batches: its online accuracy differs from
    the i.i.d. stream's. With episodic resets TENT's final model is the source model again."""
    iid = train(tta_cfg("bn_adapt"), tmp_path, **KW)
    srt = train(tta_cfg("bn_adapt", stream_order="class_sorted"), tmp_path, **KW)
    assert abs(iid["final"]["online"]["acc"] - srt["final"]["online"]["acc"]) > 1e-6
    epi = train(tta_cfg("tent", stream_reset="episodic"), tmp_path, **KW)
    bn = train(tta_cfg("bn_adapt"), tmp_path, **KW)  # the source model with test-batch statistics
    assert epi["final"]["tgt_test"]["acc"] == pytest.approx(bn["final"]["tgt_test"]["acc"], abs=1e-9)


def test_a_continual_stream_walks_its_domains_in_order(tmp_path):
    rec = train(tta_cfg("tent", stream_domains="toy_c,toy_b"), tmp_path, **KW)
    online = rec["final"]["online_domains"]
    assert list(online) == ["toy_c", "toy_b"]
    per_domain = rec["data"]["target"]["train"]  # the toy domains have the same size
    assert rec["final"]["online"]["samples"] == 2 * per_domain
    assert rec["train"]["steps"] == 2 * -(-per_domain // 16)


def test_batch_dependent_models_are_evaluated_in_a_seeded_random_order():
    """mnist5k is stored sorted by class: a model with test-batch statistics must not be evaluated
    on one-class batches. predict_split draws a seeded order (the same at every call)."""
    from dalab.datasets.base import TensorSplit
    from dalab.evaluation import predict_split

    y = torch.arange(10).repeat_interleave(20)  # sorted by class
    split = TensorSplit(torch.randint(0, 255, (200, 1, 28, 28), dtype=torch.uint8), y)
    m = make("bn_adapt", batch_size=16)
    seen = []
    real = m.predict
    m.predict = lambda x: (seen.append(x), real(x))[1]
    logits, labels = predict_split(m, split)
    first = seen[0]
    assert len(first) == 16  # the stream's batch size
    assert len(set(labels[:16].tolist())) > 3  # mixed classes in the first batch
    again, labels2 = predict_split(m, split)
    assert torch.equal(logits, again) and np.array_equal(labels, labels2)


# --------------------------------------------------------------------------- what each method changes

def _batchnorm_affine_names(m) -> set[str]:
    return {f"net.{n}.{p}" for n, mod in m.net.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)
            for p in ("weight", "bias")} | {f"net.{n}.{p}" for n, mod in m.net.named_modules()
                                            if isinstance(mod, torch.nn.BatchNorm1d) for p in ("weight", "bias")}


@pytest.mark.parametrize("name", ["tent", "sar"])
def test_tent_and_sar_change_only_the_batchnorm_affine_parameters(name):
    m = make(name, e_margin=1.0) if name == "sar" else make(name)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for step in range(1, 4):
        x = torch.randn(16, 3, 28, 28, generator=g)
        with torch.no_grad():
            m.stream_predict(x, step)
        m.train_step(Batch(None, None, x_tgt=x), step)
    after = m.state_dict()
    affine = _batchnorm_affine_names(m)
    assert affine and any(not torch.equal(after[k], before[k]) for k in affine)
    for k in before:
        if k not in affine:
            assert torch.equal(after[k], before[k]), f"{name} changed {k}"


@pytest.mark.parametrize("name", ["no_adapt", "bn_adapt"])
def test_methods_without_updates_change_nothing(name):
    m = make(name)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(16, 3, 28, 28)
    m.train_step(Batch(None, None, x_tgt=x), 1)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_sar_recovers_the_source_model_when_its_entropy_collapses():
    m = make("sar", e_margin=1.0, reset_constant=1e6)  # any entropy is "collapsed"
    source = {k: v.clone() for k, v in m.state_dict().items()}
    out = m.train_step(Batch(None, None, x_tgt=torch.randn(16, 3, 28, 28)), 1)
    assert out["resets"] == 1.0 and m.ema is None
    assert all(torch.equal(v, source[k]) for k, v in m.state_dict().items())


def test_sar_skips_the_step_when_no_sample_is_reliable():
    m = make("sar", e_margin=0.0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out = m.train_step(Batch(None, None, x_tgt=torch.randn(16, 3, 28, 28)), 1)
    assert out["reliable"] == 0.0
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_cotta_restores_to_the_source_and_averages_augmented_views():
    """restore = 1: after a step every student weight is the source's again (the teacher has moved
    by its EMA); anchor_threshold = 1: the pseudo-label is the mean over augmented views, which
    differs from the teacher's plain prediction."""
    m = make("cotta", restore=1.0, anchor_threshold=1.0, n_augment=4)
    x = torch.randn(16, 3, 28, 28)
    plain = m.predict(x).detach()
    with torch.no_grad():
        pseudo = m.stream_predict(x, 1)
    assert not torch.allclose(pseudo, plain)
    m.train_step(Batch(None, None, x_tgt=x), 1)
    for p, a in zip(m.net.parameters(), m.anchor.parameters()):
        assert torch.equal(p, a)
    assert any(not torch.equal(t, a) for t, a in zip(m.teacher.parameters(), m.anchor.parameters()))


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("hp,needle", [
    ({"stream_order": "sorted"}, "stream_order"),
    ({"stream_reset": "sometimes"}, "stream_reset"),
    ({"batch_size": 4000}, "larger than the stream"),
    ({"stream_domains": "toy_b,toy_c"}, "must start with the task's target"),
    ({"stream_domains": "toy_c,toy_a"}, "source domain"),
    ({"stream_domains": "toy_c,nowhere"}, "nowhere"),
])
def test_a_stream_that_cannot_be_is_one_line_and_writes_nothing(tmp_path, hp, needle):
    from dalab.utils import DalabError

    with pytest.raises(DalabError, match=needle) as e:
        train(tta_cfg("tent", **hp), tmp_path / "runs", **KW)
    assert "\n" not in str(e.value)
    left = [p for p in (tmp_path / "runs").glob("tent*")] if (tmp_path / "runs").exists() else []
    assert not left


def test_an_option_a_method_cannot_honour_and_a_stream_option_on_an_offline_method(tmp_path):
    from dalab.utils import DalabError

    with pytest.raises(DalabError, match="adapt_steps"):
        train(tta_cfg("bn_adapt", adapt_steps=2), tmp_path, **KW)
    with pytest.raises(DalabError, match="unknown hyperparameter 'stream_order'"):
        train(RunConfig("dann", "toy_a", "toy_b", steps=2, hparams={"stream_order": "iid"}), tmp_path, **KW)


def test_specs_list_test_time_methods_by_name(tmp_path):
    """`methods: all` is the offline protocol's methods; a TTA spec names its methods."""
    from dalab.bench import BenchSpec, resolve_methods

    assert not set(TTA) & set(resolve_methods(BenchSpec(methods="all")))
    assert set(TTA) <= set(resolve_methods(BenchSpec.from_yaml("benchmarks/digits_tta.yaml")))


def test_a_stream_killed_midway_leaves_nothing_and_its_rerun_is_the_whole_stream(tmp_path):
    """A stream run is not checkpointed: killed mid-stream it leaves no record, no ``done`` and no
    checkpoint (it is not finished, and nothing to resume), and the rerun walks the whole stream
    again, to the numbers of an uninterrupted run."""
    from conftest import killed_at_step

    cfg = tta_cfg("tent")
    full = train(cfg, tmp_path / "a", **KW)
    with killed_at_step(METHODS["tent"], 3), pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", **KW)
    left = tmp_path / "b" / cfg.run_id()
    assert not any((left / f).exists() for f in ("record.json", "done", "checkpoint.pt"))
    again = train(cfg, tmp_path / "b", **KW)
    assert again["evals"] == full["evals"]
