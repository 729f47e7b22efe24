"""The label-set methods (PADA: partial; OSBP and OVANet: open-set / universal): what each one
computes that a closed-set method does not, checked against hand computations, and one smoke run
each on lenet_bn. Offline, CPU, deterministic."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from dalab.methods import METHODS, Batch, resolve_hparams
from dalab.methods.nets import build_classifier
from dalab.utils import DalabError

SGD_PLAIN = {"momentum": 0.0, "weight_decay": 0.0, "lr_schedule": "constant"}


def make(name: str, k: int = 4, backbone: str = "lenet", steps: int = 10, **over):
    torch.manual_seed(0)
    cls = METHODS[name]
    m = cls(build_classifier(backbone, k), k, resolve_hparams(cls, over), steps)
    m.train()
    return m


def batch(k: int = 4, n: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 3, 28, 28, generator=g), torch.arange(n) % k,
                 x_tgt=torch.randn(n, 3, 28, 28, generator=g) + 0.5)


def grads(loss, module) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    gs = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params.items(), gs)}


def assert_sgd_step(m, ref, lr: float, expect: dict[str, torch.Tensor]) -> None:
    """m's parameters == ref's - lr x the hand gradient (zero where ``expect`` has none)."""
    for (name, p), (_, p0) in zip(m.named_parameters(), ref.named_parameters()):
        g = expect.get(name, torch.zeros_like(p0))
        assert torch.allclose(p.detach(), p0.detach() - lr * g, rtol=0.0, atol=1e-7), \
            f"{name}: max diff {float((p.detach() - p0.detach() + lr * g).abs().max()):.2e}"


# --------------------------------------------------------------------------- declarations

def test_label_set_declarations():
    assert METHODS["pada"].settings == ("partial",) and not METHODS["pada"].open_set
    for name in ("osbp", "ovanet"):
        assert METHODS[name].settings == ("openset", "universal") and METHODS[name].open_set
    for name in ("pada", "osbp", "ovanet"):
        assert METHODS[name].paper.split(". http")[1] and METHODS[name].__doc__


@pytest.mark.parametrize("name,over", [("osbp", {"mixup": "source"}), ("ovanet", {"mixup": "cross"}),
                                       ("ovanet", {"vat": 1.0})])
def test_open_set_methods_refuse_options_that_read_k_class_labels_or_logits(name, over):
    cls = METHODS[name]
    with pytest.raises(DalabError, match=name):
        cls.check_run(SimpleNamespace(backbone="lenet_bn"), resolve_hparams(cls, over))
    cls.check_run(SimpleNamespace(backbone="lenet_bn"), resolve_hparams(cls, {}))


# --------------------------------------------------------------------------- PADA

def test_pada_class_weights_are_the_max_normalised_mean_target_prediction():
    """gamma from known target predictions (two batches, as refresh receives them), by hand:
    mean of [.7 .1 .1 .1], [.1 .7 .1 .1], [.6 .2 .1 .1] = [1.4 1.0 .3 .3] / 3, / its max."""
    m = make("pada")
    probs = [torch.tensor([[.7, .1, .1, .1], [.1, .7, .1, .1]]), torch.tensor([[.6, .2, .1, .1]])]
    modes = []

    def predict(x):  # the "network": batch i of target train -> its fixed predictions (as logits)
        modes.append(m.training)
        return torch.log(probs[int(x[0, 0, 0, 0])])

    m.predict = predict
    m.refresh([torch.zeros(2, 3, 28, 28), torch.ones(1, 3, 28, 28)], step=1)
    gamma = torch.tensor([1.0, 1.0 / 1.4, 0.3 / 1.4, 0.3 / 1.4])
    assert torch.allclose(m.class_weight, gamma, atol=1e-6)
    assert modes == [False, False] and m.training  # eval-mode predictions, training mode restored
    y = torch.tensor([0, 2, 3, 1])
    assert torch.allclose(m.sample_weights(y), gamma[y], atol=1e-6)
    soft = torch.tensor([[0.5, 0.5, 0.0, 0.0]])  # source mixup: the label's expectation of gamma
    assert torch.allclose(m.sample_weights(soft), (gamma[0] + gamma[1]) / 2, atol=1e-6)


@pytest.mark.parametrize("loss_norm", ["mean", "weighted_mean"])
def test_pada_losses_are_gamma_weighted_on_source_only(loss_norm):
    """The logged losses equal the paper's weighted objective from the weights before the step:
    cls = mean_i gamma_{y_i} CE_i, domain = 1/2 (mean_i gamma_{y_i} BCE(d_i, 1) + mean_j BCE(d_j, 0));
    with ``loss_norm=weighted_mean`` (the authors' code) the source means divide by sum_i gamma_{y_i}."""
    m = make("pada", lr=1e-8, loss_norm=loss_norm, **SGD_PLAIN)
    m.class_weight.copy_(torch.tensor([1.0, 0.5, 0.0, 0.25]))
    b = batch()
    ref = copy.deepcopy(m)
    out = m.train_step(b, 3)
    with torch.no_grad():
        f_s, f_t = ref.net.backbone(b.x_src), ref.net.backbone(b.x_tgt)
        w = torch.tensor([1.0, 0.5, 0.0, 0.25])[b.y_src]
        ce = -torch.log_softmax(ref.net.head(f_s), 1).gather(1, b.y_src[:, None]).squeeze(1)
        d_s, d_t = ref.disc(f_s).squeeze(1), ref.disc(f_t).squeeze(1)
        bce_s, bce_t = torch.log1p(torch.exp(-d_s)), torch.log1p(torch.exp(d_t))  # -log sigma(d), -log(1 - sigma(d))
        norm = len(w) if loss_norm == "mean" else w.sum()
        cls_loss = (w * ce).sum() / norm
        domain_loss = 0.5 * ((w * bce_s).sum() / norm + bce_t.mean())
    assert math.isclose(float(out["cls_loss"]), float(cls_loss), rel_tol=1e-5)
    assert math.isclose(float(out["domain_loss"]), float(domain_loss), rel_tol=1e-5)
    assert math.isclose(float(out["loss"]), float(cls_loss + domain_loss), rel_tol=1e-5)  # trade_off = 1


def test_pada_ignores_source_samples_of_classes_with_zero_weight():
    """gamma_c = 0: the inputs of class-c source samples do not reach the gradient (BN-free LeNet)."""
    diffs = []
    for scale in (0.0, 3.0):
        m = make("pada", lr=1e-8, **SGD_PLAIN)
        m.class_weight.copy_(torch.tensor([1.0, 0.0, 0.5, 1.0]))
        b = batch()
        b.x_src[b.y_src == 1] += scale
        m.train_step(b, 3)
        diffs.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    assert torch.allclose(diffs[0], diffs[1], rtol=0.0, atol=1e-9)


# --------------------------------------------------------------------------- OSBP

def test_osbp_classifier_has_k_plus_one_outputs():
    m = make("osbp", k=4)
    assert m.net.head[-1].out_features == 5
    m.eval()
    with torch.no_grad():
        assert m.predict(torch.randn(3, 3, 28, 28)).shape == (3, 5)


@pytest.mark.parametrize("t", [0.5, 0.3])
def test_osbp_adversarial_term_is_bce_of_p_unknown_against_t(t):
    from dalab.methods.osbp import osbp_adversarial_loss

    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.1, 0.2, 0.3, 3.0], [-2.0, 1.0, 0.0, -4.0]])
    expect = 0.0
    for row in logits.tolist():  # by hand: p_unknown = the last softmax entry
        z = [math.exp(v) for v in row]
        p = z[-1] / sum(z)
        expect += -(t * math.log(p) + (1 - t) * math.log(1 - p)) / len(logits)
    assert math.isclose(float(osbp_adversarial_loss(logits, t)), expect, rel_tol=1e-6)
    # the minimum over the unknown logit sits where p_unknown = t
    u = torch.tensor(0.0, requires_grad=True)
    for _ in range(500):
        loss = osbp_adversarial_loss(torch.cat([logits[:1, :3], u.view(1, 1)], 1), t)
        (g,) = torch.autograd.grad(loss, u)
        u = (u - 1.0 * g).detach().requires_grad_(True)
    assert math.isclose(float(torch.softmax(torch.cat([logits[0, :3], u.view(1)]), 0)[-1]), t, abs_tol=1e-4)


def test_osbp_update_reverses_the_target_gradient_into_the_backbone_only():
    """One plain SGD step equals the hand gradient: the classifier gets + trade_off x grad L_adv,
    the backbone - grl_coeff x trade_off x grad L_adv (reversed), both the source CE unchanged."""
    from dalab.methods.osbp import osbp_adversarial_loss

    lr, trade_off, coeff = 0.5, 0.7, 0.6
    m = make("osbp", lr=lr, trade_off=trade_off, grl_coeff=coeff, **SGD_PLAIN)
    b = batch()
    ref = copy.deepcopy(m)
    m.train_step(b, 2)
    f_s, f_t = ref.net.backbone(b.x_src), ref.net.backbone(b.x_tgt)
    cls = torch.nn.functional.cross_entropy(ref.net.head(f_s), b.y_src)
    adv = osbp_adversarial_loss(ref.net.head(f_t), ref.hp.t)  # no GRL here
    g_cls, g_adv = grads(cls, ref), grads(adv, ref)
    sign = {n: (-coeff if n.startswith("net.backbone.") else 1.0) for n in g_adv}
    assert any(g_adv[n].abs().max() > 1e-4 for n in g_adv if n.startswith("net.backbone."))
    assert_sgd_step(m, ref, lr, {n: g_cls[n] + trade_off * sign[n] * g_adv[n] for n in g_cls})


# --------------------------------------------------------------------------- OVANet

OVA = torch.tensor([  # (N=2, 2, K=3): [:, 0] negative, [:, 1] positive
    [[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]],
    [[-0.3, 0.8, 0.1], [0.2, 1.5, -2.0]],
])


def _p_pos(sample: int, j: int) -> float:
    neg, pos = OVA[sample, 0, j].item(), OVA[sample, 1, j].item()
    return math.exp(pos) / (math.exp(pos) + math.exp(neg))


def test_ova_loss_is_the_positive_plus_the_hardest_negative_term():
    from dalab.methods.ovanet import ova_loss

    y = torch.tensor([0, 1])
    expect = 0.0
    for i, yi in enumerate(y.tolist()):
        pos = -math.log(_p_pos(i, yi))
        hardest = max(-math.log(1 - _p_pos(i, j)) for j in range(3) if j != yi)
        expect += (pos + hardest) / 2
    assert math.isclose(float(ova_loss(OVA, y)), expect, rel_tol=1e-6)
    # sample 0 (y = 0): the hardest negative is class 1 (p_pos 0.73), not class 2 (p_pos 0.08)
    assert _p_pos(0, 1) > 0.5 > _p_pos(0, 2)


def test_open_entropy_is_the_mean_binary_entropy_over_heads_and_samples():
    from dalab.methods.ovanet import open_entropy

    def h(p):
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    expect = sum(h(_p_pos(i, j)) for i in range(2) for j in range(3)) / 6
    assert math.isclose(float(open_entropy(OVA)), expect, rel_tol=1e-6)


def _rule(closed: torch.Tensor, ova: torch.Tensor) -> torch.Tensor:
    """OVANet's decision written out: k* = argmax closed; unknown (K) if p^{k*}(positive) < 0.5."""
    k = closed.argmax(1)
    p_pos = torch.softmax(ova, 1)[torch.arange(len(k)), 1, k]
    return torch.where(p_pos < 0.5, torch.full_like(k, closed.shape[1]), k)


def test_ovanet_scores_argmax_is_the_decision_rule():
    from dalab.methods.ovanet import ovanet_scores

    g = torch.Generator().manual_seed(0)
    closed = 3.0 * torch.randn(4000, 5, generator=g)
    ova = 2.0 * torch.randn(4000, 2, 5, generator=g)
    k = closed.argmax(1)
    ova[:200, 1, :] = ova[:200, 0, :]  # ties: p^{k*}(positive) = 0.5 exactly -> known
    scores = ovanet_scores(closed, ova)
    assert scores.shape == (4000, 6)
    rule = _rule(closed, ova)
    assert torch.equal(scores.argmax(1), rule)
    assert torch.equal(rule[:200], k[:200])
    assert 0.3 < float((rule == 5).float().mean()) < 0.7  # both decisions are exercised
    assert torch.allclose(scores[:, :5], torch.softmax(closed, 1))


def test_ovanet_update_and_predict_use_the_right_heads():
    """The logged terms equal ova_loss on the source part and open_entropy on the target part of
    the weights before the step; predict's argmax is the rule on the model's own heads."""
    from dalab.methods.ovanet import open_entropy, ova_loss

    m = make("ovanet", lr=1e-8, **SGD_PLAIN)
    b = batch()
    ref = copy.deepcopy(m)
    out = m.train_step(b, 2)
    with torch.no_grad():
        closed_s, ova_s = ref.heads(ref.net.backbone(b.x_src))
        _, ova_t = ref.heads(ref.net.backbone(b.x_tgt))
        cls = torch.nn.functional.cross_entropy(closed_s, b.y_src)
        src, ent = ova_loss(ova_s, b.y_src), open_entropy(ova_t)
    assert math.isclose(float(out["ova_loss"]), float(src), rel_tol=1e-5)
    assert math.isclose(float(out["open_entropy"]), float(ent), rel_tol=1e-5)
    assert math.isclose(float(out["loss"]), float(cls + 0.5 * src + 0.1 * ent), rel_tol=1e-5)
    m.eval()
    with torch.no_grad():
        x = torch.randn(16, 3, 28, 28)
        assert torch.equal(m.predict(x).argmax(1), _rule(*m.heads(m.features(x))))


# --------------------------------------------------------------------------- smoke: lenet_bn, a few steps

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["pada", "osbp", "ovanet"])
def test_a_few_train_steps_on_lenet_bn_are_finite(name, precision):
    k = 6
    m = make(name, k=k, backbone="lenet_bn")
    m.precision = precision
    x_tgt = [batch(k, seed=s).x_tgt for s in range(2)]
    for step in range(1, 4):
        m.refresh(x_tgt, step)  # the trainer's hook (PADA's class weights; a no-op for the others)
        out = m.train_step(batch(k, seed=step), step)
        for key, v in out.items():
            assert math.isfinite(float(torch.as_tensor(v).detach())), f"{name}: {key} = {v}"
    m.eval()
    with torch.no_grad():
        p = m.predict(torch.randn(5, 3, 28, 28))
    assert p.shape == (5, k + 1 if m.open_set else k) and p.dtype == torch.float32 and torch.isfinite(p).all()
