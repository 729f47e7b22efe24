"""Every registered method: init -> 3 updates -> finite losses -> predict shape, per label budget."""

from __future__ import annotations

import math

import pytest
import torch

from dalab.methods import METHODS, Batch, TargetData, resolve_hparams
from dalab.methods.nets import build_classifier
from conftest import tiny_batch

BUDGET_FOR = {"0": 0, "k": 2, "all": None}
CASES = [(name, kind) for name, cls in sorted(METHODS.items()) for kind in cls.label_budgets]


def make(name: str, steps: int = 10, **over):
    torch.manual_seed(0)
    cls = METHODS[name]
    return cls(build_classifier("lenet", 10), 10, resolve_hparams(cls, over), steps)


def batch_for(cls, kind: str, seed: int = 0) -> Batch:
    """The batch the trainer would build: target fields only where declared and budgeted."""
    uses = cls.target_data
    return tiny_batch(seed=seed,
                      unlabeled=uses in (TargetData.UNLABELED, TargetData.BOTH),
                      labeled=uses in (TargetData.LABELED, TargetData.BOTH) and kind != "0")


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
    assert set(cls.label_budgets) <= {"0", "k", "all"} and cls.label_budgets
    for h in cls.hparams.values():  # every default is valid and search spaces sample
        import numpy as np
        assert h.parse("x", h.default) == h.default
        h.sample(np.random.default_rng(0))


def _grads_wrt_target(name: str, kind: str) -> float:
    """Size of the change of the backbone gradient when only the target inputs change."""
    grads = []
    for shift in (0.0, 3.0):
        m = make(name, lr=1e-8, momentum=0.0, weight_decay=0.0)
        b = batch_for(type(m), kind)
        if b.x_tgt is not None:
            b.x_tgt = b.x_tgt + shift
        if b.x_tgt_lab is not None:
            b.x_tgt_lab = b.x_tgt_lab + shift
        m.update(b, 5)
        grads.append(torch.cat([p.grad.flatten() for p in m.net.backbone.parameters() if p.grad is not None]))
    return float((grads[0] - grads[1]).abs().max())


@pytest.mark.parametrize("name,kind", CASES)
def test_target_use_matches_declaration(name, kind):
    uses_target = METHODS[name].target_data is not TargetData.NONE and not (
        METHODS[name].target_data is TargetData.LABELED and kind == "0")
    diff = _grads_wrt_target(name, kind)
    if uses_target:
        assert diff > 1e-6, f"{name} declares target data but its gradient ignores it"
    else:
        assert diff == 0.0, f"{name} declares no target data but its gradient depends on it"
