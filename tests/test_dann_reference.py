"""Hand-written reference for DANN's update: the feature extractor's gradient is
grad(source CE) - lambda_p * trade_off * grad(domain loss), while the discriminator's gradient is
+trade_off * grad(domain loss) (the GRL reverses only what flows into the features)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from dalab.methods import METHODS, resolve_hparams
from dalab.methods.layers import dann_lambda, grad_reverse
from dalab.methods.nets import build_classifier
from conftest import tiny_batch


def test_lambda_schedule_matches_paper():
    assert dann_lambda(0.0) == 0.0
    assert math.isclose(dann_lambda(1.0), 2 / (1 + math.exp(-10)) - 1)
    assert math.isclose(dann_lambda(0.1), 2 / (1 + math.exp(-1)) - 1)


def test_grad_reverse_negates_and_scales():
    x = torch.randn(4, 3, requires_grad=True)
    grad_reverse(x, 0.3).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, -0.3))


def test_dann_update_gradient_equals_reference():
    torch.manual_seed(0)
    total, step, trade_off = 100, 10, 0.7
    hp = resolve_hparams(METHODS["dann"], {"trade_off": trade_off, "lr": 1e-8, "momentum": 0.0,
                                           "weight_decay": 0.0})
    m = METHODS["dann"](build_classifier("lenet", 10), 10, hp, total)
    ref = copy.deepcopy(m)  # same weights, computed by hand below
    b = tiny_batch(labeled=False)

    m.update(b, step)  # leaves the gradient of its loss in .grad (the lr is negligible)

    lam = dann_lambda(step / total)
    f = ref.net.backbone(torch.cat([b.x_src, b.x_tgt]))
    f_s, f_t = f[:8], f[8:]
    ce = F.cross_entropy(ref.net.head(f_s), b.y_src)
    d_s, d_t = ref.disc(f_s).squeeze(1), ref.disc(f_t).squeeze(1)
    dom = 0.5 * (F.binary_cross_entropy_with_logits(d_s, torch.ones(8))
                 + F.binary_cross_entropy_with_logits(d_t, torch.zeros(8)))
    bb = list(ref.net.backbone.parameters())
    g_ce = torch.autograd.grad(ce, bb, retain_graph=True)
    g_dom = torch.autograd.grad(dom, bb, retain_graph=True)
    for p, gc, gd in zip(m.net.backbone.parameters(), g_ce, g_dom):
        assert torch.allclose(p.grad, gc - lam * trade_off * gd, atol=1e-6, rtol=1e-4)
    g_disc = torch.autograd.grad(dom, list(ref.disc.parameters()))
    for p, gd in zip(m.disc.parameters(), g_disc):
        assert torch.allclose(p.grad, trade_off * gd, atol=1e-6, rtol=1e-4)
    assert lam > 0.4  # the reversed term really contributes at this step
