"""The alignment losses against small hand computations: CDAN's multilinear map and entropy
weights, MDD's disparity, multi-kernel MMD, CORAL, MCC and BNM. Inputs are a few numbers, the
expected values are written out (numpy loops or closed forms), independent of the code under test."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from dalab.methods.layers import (adversarial_domain_loss, cdan_entropy_weights, mdd_disparity,
                                  multilinear_map)


def test_multilinear_map_is_the_flattened_outer_product():
    f = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    g = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    assert torch.equal(multilinear_map(f, g), torch.tensor([[0.25, 0.75, 0.5, 1.5], [3.0, 0.0, -1.0, 0.0]]))


def test_randomized_multilinear_map_matches_paper():
    """pytorch-adapt's RandomizedDotProduct is (R_f f) * (R_g g) / sqrt(d) (CDAN, Sec. 3.2)."""
    from pytorch_adapt.layers import RandomizedDotProduct

    torch.manual_seed(0)
    m = RandomizedDotProduct([3, 2], 4)
    f, g = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.3, 0.7]])
    rf, rg = m.rand_mat0, m.rand_mat1
    expect = [sum(f[0, a] * rf[a, j] for a in range(3)) * sum(g[0, c] * rg[c, j] for c in range(2)) / 2.0
              for j in range(4)]
    assert torch.allclose(m(f, g)[0], torch.stack(expect), atol=1e-6)


def test_cdan_entropy_weights_by_hand():
    g = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    # H = 0 -> 1 + e^0 = 2;  H = ln 2 -> 1 + 1/2 = 1.5;  normalised: 2/3.5, 1.5/3.5
    assert torch.allclose(cdan_entropy_weights(g), torch.tensor([2 / 3.5, 1.5 / 3.5]))


def test_weighted_domain_loss_by_hand():
    """Discriminator = identity on a 1-d input: logits are the inputs themselves."""
    disc = nn.Identity()
    f_s, f_t = torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0]])
    w_s = torch.tensor([0.25, 0.75])
    def sp(z):  # BCE(z, 1) = softplus(-z), BCE(z, 0) = softplus(z)
        return math.log1p(math.exp(z))

    expect = 0.5 * ((0.25 * sp(-0.0) + 0.75 * sp(-2.0)) + sp(1.0))
    loss = adversarial_domain_loss(disc, f_s, f_t, 1.0, w_s, torch.tensor([1.0]))
    assert math.isclose(float(loss), expect, rel_tol=1e-6)
    # the reversal: d loss / d f_t = -(d/dz softplus(z)) = -sigmoid(1) * 0.5
    f_t.requires_grad_(True)
    adversarial_domain_loss(disc, f_s, f_t, 0.3).backward()
    assert math.isclose(float(f_t.grad), -0.3 * 0.5 / (1 + math.exp(-1.0)), rel_tol=1e-6)


def test_mdd_disparity_by_hand():
    y_s = torch.tensor([[2.0, 0.0]])      # F predicts class 0 on the source sample
    y_t = torch.tensor([[0.0, 1.0]])      # ... and class 1 on the target sample
    adv_s = torch.tensor([[0.0, 0.0]])    # F' is uniform on source: CE = ln 2
    adv_t = torch.tensor([[0.0, math.log(3.0)]])  # F' gives class 1 prob 3/4 on target
    expect = 4.0 * math.log(2.0) - math.log(1 - 0.75)
    assert math.isclose(float(mdd_disparity(y_s, y_t, adv_s, adv_t, 4.0)), expect, rel_tol=1e-6)


def _mk_mmd_by_hand(x: np.ndarray, y: np.ndarray, scales) -> float:
    """Unbiased quadratic MK-MMD^2 with Gaussian kernels exp(-||a-b||^2 * s / median) averaged over
    the scales s; the median is over all source-source squared distances, diagonal included
    (pytorch-adapt's choice), and is torch's LOWER median for an even count."""
    def d(a, b):
        return float(((a - b) ** 2).sum())

    dists = sorted(d(a, b) for a in x for b in x)
    med = dists[(len(dists) - 1) // 2]
    def k(a, b):
        return sum(math.exp(-d(a, b) * s / med) for s in scales) / len(scales)

    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(a, b) for a in x for b in y) / (n * m)
    return kxx + kyy - 2 * kxy


def test_mk_mmd_matches_hand_computation():
    from pytorch_adapt.layers import MMDLoss

    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    y = np.array([[1.0, 1.0], [3.0, 0.0], [2.0, 2.0], [0.5, -1.0]])
    scales = [0.25, 0.5, 1.0, 2.0, 4.0]
    loss = MMDLoss(kernel_scales=torch.tensor(scales), mmd_type="quadratic")
    got = float(loss(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)))
    assert math.isclose(got, _mk_mmd_by_hand(x, y, scales), rel_tol=1e-9)
    near = float(loss(torch.tensor(x, dtype=torch.float64), torch.tensor(x + 0.01, dtype=torch.float64)))
    assert got > near  # farther domains, larger discrepancy (the unbiased estimate may be < 0)


def test_mk_mmd_single_kernel_closed_form():
    """1-d, x = {0, 1, 3}, y = {0, 2}: source squared distances 0,0,0,1,1,4,4,9,9 -> median 1,
    one kernel k(d^2) = exp(-d^2)."""
    from pytorch_adapt.layers import MMDLoss

    e = math.exp
    kxx = (e(-1) + e(-9) + e(-4)) / 3
    kyy = e(-4)
    kxy = (1 + e(-4) + e(-1) + e(-1) + e(-9) + e(-1)) / 6
    expect = kxx + kyy - 2 * kxy
    got = MMDLoss(kernel_scales=1.0, mmd_type="quadratic")(torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64),
                                                          torch.tensor([[0.0], [2.0]], dtype=torch.float64))
    assert math.isclose(float(got), expect, rel_tol=1e-9)


def test_coral_matches_hand_computation():
    from pytorch_adapt.layers import CORALLoss

    xs = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0], [0.0, -3.0]])  # cov = diag(2/3, 6)
    xt = torch.tensor([[2.0, 2.0], [-2.0, -2.0], [0.0, 0.0], [0.0, 0.0]])  # cov = [[8/3, 8/3], [8/3, 8/3]]
    diff = np.array([[2 / 3 - 8 / 3, -8 / 3], [-8 / 3, 6 - 8 / 3]])
    expect = (diff ** 2).sum() / (4 * 2 ** 2)
    assert math.isclose(float(CORALLoss()(xs, xt)), expect, rel_tol=1e-6)


def test_mcc_matches_hand_computation():
    from pytorch_adapt.layers import MCCLoss

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    T = 2.0
    y = torch.softmax(logits / T, 1).numpy().astype(np.float64)
    h = -(y * np.log(y)).sum(1)
    w = 1 + np.exp(-h)
    w = len(y) * w / w.sum()
    c = sum(w[i] * np.outer(y[i], y[i]) for i in range(len(y)))
    c = c / c.sum(1, keepdims=True)  # the paper's row normalisation
    expect = (c.sum() - np.trace(c)) / 2
    assert math.isclose(float(MCCLoss(T=T)(logits)), expect, rel_tol=1e-5)


def test_bnm_is_minus_nuclear_norm_over_batch():
    from pytorch_adapt.layers import BNMLoss

    # softmax rows e1, e2 (one-hot in the limit): nuclear norm 2, batch 2 -> -1
    logits = torch.tensor([[50.0, 0.0, 0.0], [0.0, 50.0, 0.0]])
    assert math.isclose(float(BNMLoss()(logits)), -1.0, rel_tol=1e-6)
    # identical rows: rank 1, nuclear norm = ||row|| * sqrt(2)
    same = torch.tensor([[50.0, 0.0, 0.0], [50.0, 0.0, 0.0]])
    assert math.isclose(float(BNMLoss()(same)), -math.sqrt(2) / 2, rel_tol=1e-6)


@pytest.mark.parametrize("name", ["cdan", "mdd", "joint", "dan", "deep_coral"])
def test_update_loss_uses_these_pieces(name):
    """The methods' logged transfer term equals the piece recomputed from the same weights."""
    from dalab.methods import METHODS, resolve_hparams
    from dalab.methods.nets import build_classifier
    from conftest import tiny_batch

    torch.manual_seed(0)
    cls = METHODS[name]
    m = cls(build_classifier("lenet", 10), 10, resolve_hparams(cls, {"lr": 1e-8, "momentum": 0.0,
                                                                    "weight_decay": 0.0}), 10)
    b = tiny_batch(labeled=False)
    m.train()
    ref = copy.deepcopy(m)  # the weights before the update
    out = m.update(b, 5)
    m = ref
    key = {"cdan": "domain_loss", "mdd": "disparity"}.get(name, "transfer_loss")
    with torch.no_grad():
        f = m.net.backbone(torch.cat([b.x_src, b.x_tgt]))
        logits = m.net.head(f)
        if name == "mdd":
            adv = m.adv_head(f)
            expect = -mdd_disparity(logits[:8], logits[8:], adv[:8], adv[8:], m.hp.margin)
        elif name == "cdan":
            g = torch.softmax(logits, 1)
            h = m.map(f, g)
            expect = adversarial_domain_loss(m.disc, h[:8], h[8:], 1.0, cdan_entropy_weights(g[:8]),
                                             cdan_entropy_weights(g[8:]))
        else:
            from dalab.methods.joint import head_taps
            zs = {"features": [f], "logits": [logits], "head": head_taps(m.net.head, f)}[m.hp.layers]
            expect = sum(m.align(z[:8], z[8:]) for z in zs)
    assert math.isclose(float(out[key].detach()), float(expect), rel_tol=1e-4, abs_tol=1e-6)


# --------------------------------------------------------------------------- full updates by hand
# Methods with no pytorch-adapt counterpart (see results/peer_equivalence.md): one plain-SGD update
# (momentum 0, weight decay 0, constant LR) must equal p - lr * g, with g the gradient of the
# paper's objective written out here with plain torch ops (no dalab loss pieces), including which
# parameters a reversed or detached path reaches.

LR = 0.1


def _sgd_method(name, overrides=None, total=10):
    from dalab.methods import METHODS, resolve_hparams
    from dalab.methods.nets import build_classifier

    torch.manual_seed(0)
    cls = METHODS[name]
    hp = resolve_hparams(cls, {"lr": LR, "momentum": 0.0, "weight_decay": 0.0, "lr_schedule": "constant",
                               **(overrides or {})})
    m = cls(build_classifier("lenet", 10), 10, hp, total)
    m.train()
    return m, copy.deepcopy(m)


def _assert_sgd_step(m, ref, grads: dict):
    """m's parameters == ref's minus LR x the hand gradient (zero where grads has none), to 3e-8:
    four float32 ulps of a weight of 0.1 (measured rounding differences: <= 7.5e-9); a 1% change
    of any loss weight moves some weight by > 1e-7 here."""
    for (name, p), (_, p0) in zip(m.named_parameters(), ref.named_parameters()):
        g = grads.get(name, torch.zeros_like(p0))
        expect = p0.detach() - LR * g
        assert torch.allclose(p.detach(), expect, rtol=0.0, atol=3e-8), \
            f"{name}: max diff {float((p.detach() - expect).abs().max()):.2e}"


def _grads(loss, module, prefix, keep=True):
    names = [n for n, _ in module.named_parameters()]
    gs = torch.autograd.grad(loss, list(module.parameters()), retain_graph=keep, allow_unused=True)
    return {f"{prefix}{n}": (g if g is not None else torch.zeros(1)) for n, g in zip(names, gs)}


def _ce(logits, y):
    return -(torch.log_softmax(logits, 1).gather(1, y[:, None]).squeeze(1)).mean()


def test_mdd_full_update_by_hand():
    """MDD (Zhang et al. 2019; the authors' code): F' minimises
    gamma * CE(F'(x_s), h_F(x_s)) - E_t log(1 - softmax(F'(x_t))[h_F(x_t)]) with weight eta; the
    features get that gradient reversed and scaled by grl_max * lambda_p; F gets only the source
    CE (its argmax h_F is a constant)."""
    from dalab.methods.layers import dann_lambda
    from conftest import tiny_batch

    step, total = 3, 10
    m, ref = _sgd_method("mdd", {"trade_off": 0.7, "margin": 3.0}, total)
    b = tiny_batch(labeled=False)
    m.train_step(b, step)

    eta, gamma = 0.7, 3.0
    coeff = 0.1 * dann_lambda(step / total)
    f = ref.net.backbone(torch.cat([b.x_src, b.x_tgt]))
    y = ref.net.head(f)
    adv = ref.adv_head(f)
    h_s, h_t = y[:8].argmax(1).detach(), y[8:].argmax(1).detach()
    ce = _ce(y[:8], b.y_src)
    p_t = torch.softmax(adv[8:], 1).gather(1, h_t[:, None]).squeeze(1)
    disparity = gamma * _ce(adv[:8], h_s) - torch.log(1 - p_t).mean()
    g_ce_bb = _grads(ce, ref.net.backbone, "net.backbone.")
    g_d_bb = _grads(disparity, ref.net.backbone, "net.backbone.")
    grads = {k: g_ce_bb[k] - coeff * eta * g_d_bb[k] for k in g_ce_bb}
    grads.update(_grads(ce, ref.net.head, "net.head."))
    grads.update({k: eta * g for k, g in _grads(disparity, ref.adv_head, "adv_head.").items()})
    _assert_sgd_step(m, ref, grads)
    assert coeff > 0.05  # the reversed term is really in the check


def test_entropy_min_update_by_hand():
    """Grandvalet & Bengio 2004: CE(source) + lambda * mean_t H(p(y|x_t)), lambda = trade_off."""
    from conftest import tiny_batch

    m, ref = _sgd_method("entropy_min", {"trade_off": 0.3})
    b = tiny_batch(labeled=False)
    m.train_step(b, 1)

    logits = ref.net(torch.cat([b.x_src, b.x_tgt]))
    p_t = torch.softmax(logits[8:], 1)
    ent = -(p_t * torch.log(p_t)).sum(1).mean()
    loss = _ce(logits[:8], b.y_src) + 0.3 * ent
    _assert_sgd_step(m, ref, {**_grads(loss, ref.net.backbone, "net.backbone."),
                              **_grads(loss, ref.net.head, "net.head.")})


def _mk_mmd_torch(x, y, scales=(0.25, 0.5, 1.0, 2.0, 4.0)):
    """_mk_mmd_by_hand in differentiable torch: unbiased quadratic MK-MMD^2, Gaussian kernels
    exp(-d^2 s / median) averaged over s, median (a constant) = torch's lower median of the
    source-source squared distances, diagonal included."""
    d = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(2)  # noqa: E731
    dxx, dyy, dxy = d(x, x), d(y, y), d(x, y)
    med = dxx.detach().flatten().sort().values[(dxx.numel() - 1) // 2]
    k = lambda dd: sum(torch.exp(-dd * s / med) for s in scales) / len(scales)  # noqa: E731
    n, m = len(x), len(y)
    off = lambda kk, size: (kk.sum() - kk.diagonal().sum()) / (size * (size - 1))  # noqa: E731
    return off(k(dxx), n) + off(k(dyy), m) - 2 * k(dxy).mean()


def test_joint_labeled_update_by_hand():
    """joint with target labels (budget k), defaults otherwise: CE(source) + CE(labeled target) +
    trade_off * MK-MMD^2 of the backbone features between source and UNLABELED target."""
    from conftest import tiny_batch

    m, ref = _sgd_method("joint", {"trade_off": 2.0})
    b = tiny_batch(labeled=True)
    m.train_step(b, 1)

    f = ref.net.backbone(torch.cat([b.x_src, b.x_tgt, b.x_tgt_lab]))
    logits = ref.net.head(f)
    mmd = _mk_mmd_torch(f[:8], f[8:16])
    loss = _ce(logits[:8], b.y_src) + _ce(logits[16:], b.y_tgt_lab) + 2.0 * mmd
    assert float(mmd.detach()) > 0.05  # the alignment term is really in the check
    _assert_sgd_step(m, ref, {**_grads(loss, ref.net.backbone, "net.backbone."),
                              **_grads(loss, ref.net.head, "net.head.")})


def test_arch_mod_adabn_statistics_by_hand():
    """AdaBN (Li et al. 2016) at the end of arch_mod: every BatchNorm layer's running mean becomes
    the mean of its input over the target set, the running variance the average of the per-batch
    (unbiased) variances -- torch's update_bn, a cumulative average over batches. (The paper uses
    whole-set statistics; the average of batch variances misses the between-batch variance of the
    means, ~1/batch_size of the variance: 1.6% at 64 per batch.)"""
    from dalab.methods import METHODS, resolve_hparams
    from dalab.methods.nets import batchnorm_layers, build_classifier

    torch.manual_seed(0)
    cls = METHODS["arch_mod"]
    m = cls(build_classifier("lenet_bn", 10), 10, resolve_hparams(cls, {}), 10)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(16, 3, 28, 28, generator=g) * 0.8 + 0.4 for _ in range(2)]
    ref = copy.deepcopy(m.net).train()
    seen = {id(b): [] for b in batchnorm_layers(ref)}
    hooks = [b.register_forward_hook(lambda mod, inp, out: seen[id(mod)].append(inp[0].detach()))
             for b in batchnorm_layers(ref)]
    with torch.no_grad():
        for x in xs:
            ref(x)
    for h in hooks:
        h.remove()
    m.on_train_end(xs, None)
    for b_ref, b in zip(batchnorm_layers(ref), batchnorm_layers(m.net)):
        dims = [0] + list(range(2, seen[id(b_ref)][0].dim()))
        means = [z.mean(dims) for z in seen[id(b_ref)]]
        vars_ = [z.var(dims, unbiased=True) for z in seen[id(b_ref)]]
        assert torch.allclose(b.running_mean, sum(means) / 2, atol=1e-6)
        assert torch.allclose(b.running_var, sum(vars_) / 2, rtol=1e-5, atol=1e-6)
    assert len(seen) == 3  # two backbone BatchNorms and the new bottleneck's


def test_shot_refresh_and_update_by_hand():
    """SHOT (Liang et al. 2020; the authors' code): pseudo-labels by weighted-centroid clustering of
    [g(x), 1] / ||.|| (cosine distance, classes predicted at least once, one re-assignment round),
    then min_g  E_t H(p) - H(E_t p) + beta * CE(p, yhat) with the hypothesis C frozen. Clustering
    in numpy float64, written as the authors' obtain_label."""
    from dalab.methods import Batch
    from conftest import tiny_batch

    m, ref = _sgd_method("shot", {"beta": 0.3})
    x = tiny_batch(n=16, labeled=False, seed=4).x_tgt
    with torch.no_grad():  # a hypothesis that tells these images apart (a fresh init predicts one class)
        g = ref.net.head[:-1](ref.net.backbone(x))
        for net in (m.net, ref.net):
            net.head[-1].weight.copy_(20 * (g[:10] - g.mean(0)))
    m.refresh([x], 1)
    m.train_step(Batch(None, None, x_tgt=x), 1)

    with torch.no_grad():
        g0 = ref.net.head[:-1](ref.net.backbone(x))
        prob = torch.softmax(ref.net.head[-1](g0), 1).double().numpy()
    fea = np.concatenate([g0.double().numpy(), np.ones((len(x), 1))], 1)
    fea = fea / np.linalg.norm(fea, axis=1, keepdims=True)
    labelset = np.where(np.eye(10)[prob.argmax(1)].sum(0) > 0)[0]

    def nearest(centroids):
        c = centroids[labelset]
        cos_dist = 1 - fea @ c.T / np.linalg.norm(c, axis=1)[None, :]  # rows of fea have norm 1
        return labelset[cos_dist.argmin(1)]

    y0 = nearest(prob.T @ fea / (1e-8 + prob.sum(0)[:, None]))
    onehot = np.eye(10)[y0]
    assert (onehot[:, labelset].sum(0) > 0).all()  # no empty cluster (the authors' code would divide 0/0)
    y_hat = torch.as_tensor(nearest(onehot.T @ fea / (1e-8 + onehot.sum(0)[:, None])))

    logits = ref.net(x)
    p = torch.softmax(logits, 1)
    ent = -(p * torch.log(p)).sum(1).mean()
    mean_p = p.mean(0)
    loss = ent + (mean_p * torch.log(mean_p + 1e-5)).sum() + 0.3 * _ce(logits, y_hat)
    grads = {**_grads(loss, ref.net.backbone, "net.backbone."), **_grads(loss, ref.net.head[:-1], "net.head.")}
    _assert_sgd_step(m, ref, grads)  # the hypothesis (net.head.4) and the snapshot: unchanged
    assert len(labelset) > 1 and len(set(y_hat.tolist())) > 1


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_snd_score_equals_pytorch_adapt(scale):
    """dalab's chunked SND (the `snd` selection rule's score) is pytorch-adapt's SNDValidator."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pytorch_adapt.validators import SNDValidator
    from dalab.evaluation import snd_score

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1500, 10, generator=g) * scale  # > one chunk of 1024 rows
    preds = torch.softmax(logits, 1)
    ref = SNDValidator()(target_train={"logits": logits, "preds": preds})
    assert snd_score(preds) == pytest.approx(float(ref), rel=1e-6, abs=1e-6)
