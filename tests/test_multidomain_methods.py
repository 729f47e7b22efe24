"""The special part of each multi-source and domain-generalization method (issue 25), against a
hand computation: M3SDA's moments, DG-CORAL's pairwise distance, VREx's variance, IRM's penalty,
GroupDRO's weights, MixStyle's statistics mixing, the adversarial methods' domain classifiers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalab.methods import METHODS, Batch, resolve_hparams
from dalab.methods.nets import build_classifier


def make(name: str, k: int = 2, backbone: str = "lenet", **over):
    torch.manual_seed(0)
    cls = METHODS[name]
    m = cls(build_classifier(backbone, 10), 10, resolve_hparams(cls, over), 100, num_sources=k)
    m.train()
    return m


def balanced_batch(k: int = 2, n: int = 6, seed: int = 0, target: bool = False) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k * n, 3, 28, 28, generator=g) + torch.arange(k).repeat_interleave(n).view(-1, 1, 1, 1)
    b = Batch(x, torch.randint(0, 10, (k * n,), generator=g), d_src=torch.arange(k).repeat_interleave(n))
    if target:
        b.x_tgt = torch.randn(n, 3, 28, 28, generator=g) + 0.5
    return b


def hand_risks(m, b: Batch, k: int) -> np.ndarray:
    with torch.no_grad():
        logits = m.predict(b.x_src)
    return np.array([F.cross_entropy(logits[b.d_src == i], b.y_src[b.d_src == i]).item() for i in range(k)])


@pytest.mark.parametrize("about", ["mean", "origin"])
def test_m3sda_moment_distance_by_hand(about):
    from dalab.methods.m3sda import moment_distance

    g = torch.Generator().manual_seed(1)
    s1, s2, s3, t = (torch.randn(5, 4, generator=g) * (1 + i) + i for i in range(4))

    def moment(x: np.ndarray, m: int) -> np.ndarray:
        if m > 1 and about == "mean":
            x = x - x.mean(0)
        return (x ** m).mean(0)

    want = 0.0
    for m in (1, 2):
        mu = [moment(x.numpy(), m) for x in (s1, s2, s3)]
        mt = moment(t.numpy(), m)
        want += np.mean([np.linalg.norm(u - mt) for u in mu])
        want += np.mean([np.linalg.norm(a - b) for a, b in itertools.combinations(mu, 2)])
    assert moment_distance([s1, s2, s3], t, 2, about).item() == pytest.approx(want, rel=1e-5)
    out = make("m3sda", k=3, moments_about=about).train_step(balanced_batch(k=3, target=True), 1)
    assert float(out["moment_distance"].detach()) > 0.1  # three shifted domains: far from rounding level


def test_m3sda_central_moments_ignore_a_shared_shift():
    """About the mean, a shift common to every domain changes nothing; about the origin it moves
    the second moments (the scale that drove features to zero: methods/m3sda.py)."""
    from dalab.methods.m3sda import moment_distance

    g = torch.Generator().manual_seed(3)
    doms = [torch.randn(6, 4, generator=g) * (1 + i) for i in range(4)]
    shifted = [x + 5.0 for x in doms]
    central = [moment_distance(d[:3], d[3], 2, "mean").item() for d in (doms, shifted)]
    raw = [moment_distance(d[:3], d[3], 2, "origin").item() for d in (doms, shifted)]
    assert central[1] == pytest.approx(central[0], rel=1e-4)
    assert raw[1] > 1.3 * raw[0]


def test_dg_coral_penalty_by_hand():
    from dalab.methods.dg_coral import coral_penalty

    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(7, 3, generator=g), torch.randn(9, 3, generator=g) * 2
    an, bn = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
    want = ((an.mean(0) - bn.mean(0)) ** 2).mean() + ((np.cov(an.T) - np.cov(bn.T)) ** 2).mean()
    assert coral_penalty(a, b).item() == pytest.approx(want, rel=1e-4)


def test_vrex_penalty_is_the_variance_of_the_per_domain_risks():
    k = 3
    m = make("vrex", k=k, anneal_frac=0.0)  # the full penalty from step 1
    b = balanced_batch(k=k)
    risks = hand_risks(m, b, k)
    out = m.train_step(b, 1)
    assert float(out["risk_variance"]) == pytest.approx(risks.var(), rel=1e-4, abs=1e-7)
    assert float(out["cls_loss"]) == pytest.approx(risks.mean(), rel=1e-5)
    want = (risks.mean() + 10.0 * risks.var()) / 10.0  # divided by beta once beta > 1
    assert float(out["loss"]) == pytest.approx(want, rel=1e-4)
    assert make("vrex", k=k).train_step(b, 1)["beta"] == 1.0  # annealing: weight 1 for the first 10 %
    kept = make("vrex", k=k, anneal_frac=0.0, rescale="none").train_step(b, 1)  # not divided
    assert float(kept["loss"]) == pytest.approx(risks.mean() + 10.0 * risks.var(), rel=1e-4)


def test_irm_penalty_by_hand():
    from dalab.methods.irm import irm_penalty

    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(6, 4, generator=g), torch.randint(0, 4, (6,), generator=g)
    p = torch.softmax(z, 1)
    grad = ((p * z).sum(1) - z[torch.arange(6), y]).mean()  # d/dw CE(w z, y) at w = 1
    assert irm_penalty(z, y).item() == pytest.approx(grad.item() ** 2, rel=1e-4, abs=1e-9)
    out = make("irm").train_step(balanced_batch(), 1)
    assert float(out["irm_penalty"]) >= 0 and out["lambda"] == 1.0


def test_groupdro_weights_move_toward_the_worst_domain():
    k = 3
    m = make("groupdro", k=k, eta=0.5)
    b = balanced_batch(k=k)
    risks = hand_risks(m, b, k)
    m.train_step(b, 1)
    q = np.ones(k) / k * np.exp(0.5 * risks)
    q /= q.sum()
    assert m.q.numpy() == pytest.approx(q, rel=1e-4)
    assert int(m.q.argmax()) == int(risks.argmax()) and m.q.max().item() > 1 / k + 1e-4


def test_mixstyle_mixes_statistics_across_domains_and_only_in_training():
    from dalab.methods.mixstyle import mix_styles, other_domain_partner

    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 2, 5, 5, generator=g) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1) + \
        torch.arange(4.0).view(4, 1, 1, 1)
    perm, lam = torch.tensor([2, 3, 0, 1]), torch.tensor([0.3, 0.5, 0.9, 0.1])
    out = mix_styles(x, perm, lam)
    mu, sig = x.mean((2, 3)), (x.var((2, 3)) + 1e-6).sqrt()
    lam2 = lam.view(-1, 1)
    assert torch.allclose(out.mean((2, 3)), lam2 * mu + (1 - lam2) * mu[perm], atol=1e-4)
    assert torch.allclose(out.var((2, 3)).sqrt(), lam2 * sig + (1 - lam2) * sig[perm], rtol=1e-3)
    d = torch.tensor([0, 0, 1, 1, 2, 2])
    for s in range(5):
        partner = other_domain_partner(d, torch.Generator().manual_seed(s))
        assert (d[partner] != d).all()
    m = make("mixstyle", backbone="lenet_bn", p=1.0)
    m.eval()
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():  # no hook outside a training step: the plain network
        assert torch.equal(m.predict(x), m.net.head(m.net.backbone(x)))
    seen = []
    m.net.backbone.body[3].register_forward_hook(lambda mod, i, o: seen.append(o.detach().clone()))
    m.train()
    m.train_step(balanced_batch(), 1)
    assert seen  # the layer ran; its output was mixed in place of the plain one
    assert not torch.allclose(m.net.backbone.body[3](m.net.backbone.body[:3](balanced_batch().x_src)), seen[0])


@pytest.mark.parametrize("name,k,width", [("ms_dann", 3, 4), ("dann_dg", 3, 3)])
def test_adversarial_domain_classifiers_see_every_domain(name, k, width):
    """MS-DANN: one (k+1)-way classifier (the sources and the target); DANN-DG: k-way, sources only.
    At initialisation its cross-entropy is near log(width)."""
    m = make(name, k=k, backbone="lenet_bn")
    assert m.disc[-1].out_features == width
    out = m.train_step(balanced_batch(k=k, target=name == "ms_dann"), 1)
    assert abs(float(out["domain_loss"]) - np.log(width)) < 1.0


def test_mdan_combines_the_sources_losses_as_the_paper():
    """soft = (1/gamma) log sum exp(gamma L_i), between the max and the max + log(k)/gamma; hard = max;
    the soft form's gradient weights each source by softmax(gamma L)."""
    from dalab.methods.mdan import combine_sources

    losses = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    soft = combine_sources(losses, "soft", 10.0)
    value = float(soft.detach())
    assert value == pytest.approx(np.log(np.exp(5.0) + np.exp(10.0) + np.exp(20.0)) / 10, rel=1e-6)
    assert 2.0 <= value <= 2.0 + np.log(3) / 10 + 1e-6
    soft.backward()
    w = np.exp(10 * np.array([0.5, 1.0, 2.0]))
    assert losses.grad.numpy() == pytest.approx(w / w.sum(), rel=1e-5)
    assert float(combine_sources(losses.detach(), "hard", 10.0)) == 2.0


def test_mdan_has_one_binary_classifier_per_source_each_seeing_its_source_and_the_target():
    """k binary classifiers; a step's loss is the soft combination of the per-source losses computed
    by hand from the same features (source i's samples only, the whole target batch)."""
    from dalab.methods.layers import domain_bce
    from dalab.methods.mdan import combine_sources

    k = 3
    m = make("mdan", k=k, backbone="lenet_bn", disc_bn_stats="joint")
    assert len(m.discs) == k and all(d[-1].out_features == 1 for d in m.discs)
    b = balanced_batch(k=k, target=True)
    m.eval()  # the same features in the hand computation and the step: BatchNorm from running statistics
    with torch.no_grad():
        f_s, f_t = m.net.backbone(b.x_src), m.net.backbone(b.x_tgt)
        per = []
        for i, d in enumerate(m.discs):
            mine = b.d_src == i
            dom = domain_bce(d(torch.cat([f_s[mine], f_t])).squeeze(1)[: int(mine.sum())], d(f_t).squeeze(1))
            per.append(F.cross_entropy(m.net.head(f_s[mine]), b.y_src[mine]) + m.hp.trade_off * dom)
        want = combine_sources(torch.stack(per), "soft", m.hp.mix_gamma)
    out = m.train_step(b, 1)
    assert float(out["loss"]) == pytest.approx(float(want), rel=1e-4)
