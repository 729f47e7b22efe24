"""Every registered method: init -> 3 updates -> finite losses -> predict shape, per label budget."""

from __future__ import annotations

import math

import pytest
import torch

from dalab.methods import METHODS, Batch, TargetData, resolve_hparams
from dalab.methods.nets import build_classifier
from conftest import tiny_batch

BUDGET_FOR = {"0": 0, "k": 2, "all": None}
# closed-set cases: a method that runs only on label-set tasks (PADA, OSBP, OVANet) has its own tests
# (tests/test_labelset_methods.py)
CASES = [(name, kind) for name, cls in sorted(METHODS.items()) if "closed" in cls.settings
         for kind in cls.label_budgets]


def make(name: str, steps: int = 10, backbone: str | None = None, **over):
    """The method on ``backbone``; by default on the one its declaration needs (``lenet_bn`` when it
    needs BatchNorm, else ``lenet``)."""
    torch.manual_seed(0)
    cls = METHODS[name]
    hp = resolve_hparams(cls, over)
    backbone = backbone or ("lenet_bn" if cls.batchnorm_needed(hp) else "lenet")
    return cls(build_classifier(backbone, 10), 10, hp, steps, num_sources=max(cls.min_sources, 1))


def batch_for(cls, kind: str, seed: int = 0) -> Batch:
    """The batch the trainer would build: target fields only where declared and budgeted, source
    fields only for methods that use source data (``uses_source``)."""
    uses = cls.target_data
    b = tiny_batch(seed=seed, source=cls.uses_source,
                   unlabeled=uses in (TargetData.UNLABELED, TargetData.BOTH),
                   labeled=uses in (TargetData.LABELED, TargetData.BOTH) and kind != "0")
    if cls.min_sources > 1:  # a multi-source task's balanced batch: equal parts, in domain order
        b.d_src = torch.arange(len(b.y_src)) * cls.min_sources // len(b.y_src)
    return b


@pytest.mark.parametrize("name,kind", CASES)
def test_three_updates_finite_and_predict_shape(name, kind):
    m = make(name)
    m.train()
    for step in range(1, 4):
        out = m.update(batch_for(type(m), kind, seed=step), step)
        assert "loss" in out
        for k, v in out.items():
            assert math.isfinite(float(torch.as_tensor(v).detach())), f"{name}: {k} = {v}"
    m.eval()
    x = torch.randn(5, 3, 28, 28)
    with torch.no_grad():
        assert m.predict(x).shape == (5, 10)
        assert m.features(x).ndim == 2


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_declares_its_interface(name):
    cls = METHODS[name]
    assert cls.name == name and cls.family and cls.__doc__ and cls.paper
    assert isinstance(cls.target_data, TargetData)
    if cls.domain_generalization:  # no target data, ever (the trainer also asserts it per batch)
        assert cls.target_data is TargetData.NONE and cls.refresh_every is None and cls.min_sources >= 2
    assert set(cls.label_budgets) <= {"0", "k", "all"} and cls.label_budgets
    for h in cls.hparams.values():  # every default is valid and search spaces sample
        import numpy as np
        assert h.parse("x", h.default) == h.default
        h.sample(np.random.default_rng(0))


def _end_data(b: Batch):
    """What the trainer hands ``on_train_end``: only the target data in the batch."""
    return ([b.x_tgt] if b.x_tgt is not None else None,
            [(b.x_tgt_lab, b.y_tgt_lab)] if b.x_tgt_lab is not None else None)


def _dependence_on_target(name: str, kind: str) -> tuple[float, float]:
    """How much (1) the gradient of every trainable parameter and (2) the predictions after
    ``on_train_end`` (AdaBN statistics, probes) change when only the target inputs change."""
    grads, preds = [], []
    x_probe = torch.randn(6, 3, 28, 28, generator=torch.Generator().manual_seed(9))
    noise = torch.Generator().manual_seed(11)
    for scale in (0.0, 2.0):  # random, not constant, changes: covariance losses ignore a shift
        # the target term amplified, so that a small but real dependence is not lost in float noise
        amp = {"trade_off": 100.0} if "trade_off" in METHODS[name].hparams else {}
        if "conf_threshold" in METHODS[name].hparams:  # a confidence gate that an untrained teacher never opens
            amp["conf_threshold"] = 0.0
        m = make(name, lr=1e-8, momentum=0.0, weight_decay=0.0, **amp)
        m.train()
        b = batch_for(type(m), kind)
        if b.x_tgt is not None:
            b.x_tgt = b.x_tgt + scale * torch.rand(b.x_tgt.shape, generator=noise)
        if b.x_tgt_lab is not None:
            b.x_tgt_lab = b.x_tgt_lab + scale * torch.rand(b.x_tgt_lab.shape, generator=noise)
        m.update(b, 5)
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad and p.grad is not None]))
        m.on_train_end(*_end_data(b))
        m.eval()
        with torch.no_grad():
            preds.append(m.predict(x_probe))
    return float((grads[0] - grads[1]).abs().max()), float((preds[0] - preds[1]).abs().max())


@pytest.mark.parametrize("name,kind", [(n, k) for n, k in CASES if not METHODS[n].test_time])
def test_target_use_matches_declaration(name, kind):
    """A method declaring target data must depend on it -- through its gradient, or (AdaBN-style
    post-training adaptation) through its final predictions; one declaring none depends on neither.
    (Test-time methods also depend on it through the stream's predictions: tests/test_test_time.py.)"""
    uses_target = METHODS[name].target_data is not TargetData.NONE and not (
        METHODS[name].target_data is TargetData.LABELED and kind == "0")
    grad_diff, pred_diff = _dependence_on_target(name, kind)
    if uses_target:
        # tiny but real: Deep CORAL on near-zero logits at init moves gradients by ~1e-8, while a
        # method that ignores target data gives exactly 0.0 (same inputs, deterministic CPU)
        assert max(grad_diff, pred_diff) > 1e-9, f"{name} declares target data but ignores it"
    else:
        assert grad_diff == 0.0 and pred_diff == 0.0, f"{name} declares no target data but depends on it"


def _freezing_cases() -> list[tuple[str, dict]]:
    """(method, overrides) whose built method declares frozen state (``Method.frozen``), read off
    the registry: each method at its defaults, and each other value of one of its "choice"
    hyperparameters that changes what it freezes (e.g. finetune ``blocks=1``, arch_mod ``adapters``)."""
    cases = []
    for name, cls in sorted(METHODS.items()):
        if not getattr(cls, "adapts_weights", True):  # changes no weight at all: tests/test_test_time.py
            continue
        seen = [make(name, backbone="lenet_bn").frozen()]
        if seen[0]:
            # SAR's reliability gate (entropy < 0.4 ln K) is never open on the random inputs of an untrained net
            cases.append((name, {"e_margin": 1.0} if "e_margin" in cls.hparams else {}))
        for key, h in sorted(cls.hparams.items()):
            for value in (v for v in (h.space[1] if h.space and h.space[0] == "choice" else ()) if v != h.default):
                names = make(name, backbone="lenet_bn", **{key: value}).frozen()
                if names and names not in seen:
                    seen.append(names)
                    cases.append((name, {key: value}))
    return cases


def _case_id(v) -> str:
    return v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()) or "defaults"


@pytest.mark.parametrize("name,over", _freezing_cases(), ids=_case_id)
def test_frozen_parts_stay_bitwise_unchanged(name, over):
    """What a method declares frozen (``Method.frozen``: weights, kept BatchNorm statistics) is
    bitwise identical after updates and the end hook, on a BatchNorm backbone; declared weights take
    no gradient; the trained parts do move."""
    m = make(name, backbone="lenet_bn", **over)
    kind = "k" if "k" in m.label_budgets else m.label_budgets[0]
    state = m.state_dict(keep_vars=True)
    frozen = {k: state[k].detach().clone() for k in m.frozen()}
    trained = {k: p.detach().clone() for k, p in m.named_parameters() if p.requires_grad}
    assert frozen and trained
    grads = [k for k, p in m.named_parameters() if k in frozen and p.requires_grad]
    assert not grads, f"{name}: declared frozen, but take gradients: {grads}"
    m.train()
    for step in range(1, 4):
        m.update(batch_for(type(m), kind, seed=step), step)
    m.on_train_end(*_end_data(batch_for(type(m), kind)))
    after = m.state_dict()
    for k, v in frozen.items():
        assert torch.equal(after[k], v), f"{name}: frozen {k} changed"
    assert any(not torch.equal(p, trained[k]) for k, p in m.named_parameters() if k in trained)


def test_logreg_probe_fits_labeled_target():
    """frozen_features' sklearn probe replaces the linear head and fits its labeled set."""
    m = make("frozen_features", head="logreg")
    b = batch_for(type(m), "k")
    m.train()
    m.update(b, 1)
    m.on_train_end(*_end_data(b))
    m.eval()
    with torch.no_grad():
        assert (m.predict(b.x_tgt_lab).argmax(1) == b.y_tgt_lab).float().mean() == 1.0


@pytest.mark.parametrize("name,kind", CASES)
def test_every_method_trains_in_bf16(name, kind):
    """precision=bf16: the backbone runs under bf16 autocast, everything after it in float32, so
    no loss meets a low-precision corner case (BNM's nuclear norm refuses bf16; MDD's log1p(-p)
    would see p rounded to 1)."""
    m = make(name)
    m.precision = "bf16"
    m.train()
    for step in range(1, 3):
        out = m.train_step(batch_for(type(m), kind, seed=step), step)
        for k, v in out.items():
            assert math.isfinite(float(torch.as_tensor(v).detach())), f"{name}: {k} = {v}"
    x = torch.randn(4, 3, 28, 28)
    assert m.features(x).dtype == torch.float32 and m.predict(x).dtype == torch.float32


def test_arch_mod_scores_every_point_with_adabn_and_trains_on_source_statistics():
    """arch_mod's ``deployed`` applies AdaBN for one evaluation (every checkpoint is scored as the
    network it hands over) and restores the source statistics training uses; the end hook's AdaBN
    gives the same predictions as the evaluation-time one."""
    torch.manual_seed(0)
    cls = METHODS["arch_mod"]
    m = cls(build_classifier("lenet_bn", 10), 10, resolve_hparams(cls, {}), 10)
    m.train()
    for step in range(1, 3):
        m.update(batch_for(cls, "0", seed=step), step)
    m.eval()
    x_tgt = [tiny_batch(seed=s).x_tgt for s in range(3)]
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    plain = m.predict(x_tgt[0])
    with m.deployed(x_tgt):
        inside = m.predict(x_tgt[0])
        assert any(not torch.equal(v, before[k]) for k, v in m.net.state_dict().items() if "running_mean" in k)
    for k, v in m.net.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} not restored after evaluation"
    assert not torch.allclose(inside, plain)
    m.on_train_end(x_tgt, None)
    m.eval()
    assert torch.allclose(m.predict(x_tgt[0]), inside, atol=1e-6)
