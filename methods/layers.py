"""Small reusable pieces shared by methods.

Gradient reversal is our own 10-line autograd function rather than pytorch-adapt's
``GradientReversal`` module: the coefficient changes every step (the DANN lambda schedule), which
here is a plain argument instead of a mutated buffer, and it keeps ``import dalab.methods`` free of
pytorch-adapt's heavy import chain (torchmetrics, pytorch-metric-learning; ~3 s).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, coeff: float) -> Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return -ctx.coeff * grad, None


def grad_reverse(x: Tensor, coeff: float = 1.0) -> Tensor:
    """Identity forward; multiplies the gradient by ``-coeff`` backward (Ganin & Lempitsky, 2015)."""
    return _GradReverse.apply(x, float(coeff))


def dann_lambda(p: float, gamma: float = 10.0) -> float:
    """The DANN paper's adaptation-factor schedule lambda_p = 2 / (1 + exp(-gamma p)) - 1."""
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


# --------------------------------------------------------------------------- entropy-based pieces

def entropy(logits: Tensor) -> Tensor:
    """Per-sample Shannon entropy H(softmax(logits)) in nats."""
    return -(torch.softmax(logits, 1) * torch.log_softmax(logits, 1)).sum(1)


def multilinear_map(f: Tensor, g: Tensor) -> Tensor:
    """CDAN's multilinear conditioning T(f, g) = f (x) g, flattened: (N, d) x (N, C) -> (N, d*C),
    row i holding f_i[a] * g_i[c] at index a*C + c."""
    return torch.bmm(f.unsqueeze(2), g.unsqueeze(1)).flatten(1)


def cdan_entropy_weights(g: Tensor) -> Tensor:
    """CDAN+E's weights w = 1 + exp(-H(g)) of softmax outputs ``g``, normalised to sum to 1 (over
    the samples given: call once per domain)."""
    h = -(g * torch.log(g.clamp_min(1e-12))).sum(1)
    w = 1.0 + torch.exp(-h)
    return w / w.sum()


def domain_logits(disc, f_s: Tensor, f_t: Tensor, coeff: float, split_bn: bool = True) -> tuple[Tensor, Tensor]:
    """Discriminator logits of source and target features behind a gradient reversal layer of
    coefficient ``coeff``: one call on the concatenation when the discriminator has no BatchNorm
    (the same numbers, half the kernel launches), one call per domain when it has (BatchNorm
    statistics per domain)."""
    from .nets import has_batchnorm

    if split_bn and has_batchnorm(disc):
        return disc(grad_reverse(f_s, coeff)).squeeze(1), disc(grad_reverse(f_t, coeff)).squeeze(1)
    d = disc(grad_reverse(torch.cat([f_s, f_t]), coeff)).squeeze(1)
    return d[: len(f_s)], d[len(f_s):]


def domain_bce(d_s: Tensor, d_t: Tensor, w_s: Tensor | None = None, w_t: Tensor | None = None) -> Tensor:
    """Domain classifier BCE (source = 1, target = 0): mean of the two domain terms, each a
    (weighted, weights summing to 1) mean over its samples."""
    import torch.nn.functional as F

    l_s = F.binary_cross_entropy_with_logits(d_s, torch.ones_like(d_s), reduction="none")
    l_t = F.binary_cross_entropy_with_logits(d_t, torch.zeros_like(d_t), reduction="none")
    l_s = (l_s * w_s).sum() if w_s is not None else l_s.mean()
    l_t = (l_t * w_t).sum() if w_t is not None else l_t.mean()
    return 0.5 * (l_s + l_t)


def domain_accuracy(d_s: Tensor, d_t: Tensor) -> Tensor:
    """A binary domain classifier's accuracy from its logits (source = 1: logit > 0), the mean of the
    two domains' accuracies."""
    return 0.5 * ((d_s > 0).float().mean() + (d_t <= 0).float().mean())


def binary_domain_loss(disc, f_s: Tensor, f_t: Tensor, coeff: float, split_bn: bool = True) -> tuple[Tensor, Tensor]:
    """(:func:`domain_bce`, :func:`domain_accuracy`) of a binary domain classifier behind a gradient
    reversal layer of coefficient ``coeff`` (:func:`domain_logits`): DANN's domain term."""
    d_s, d_t = domain_logits(disc, f_s, f_t, coeff, split_bn)
    return domain_bce(d_s, d_t), domain_accuracy(d_s, d_t)


def adversarial_domain_loss(disc, f_s: Tensor, f_t: Tensor, coeff: float,
                            w_s: Tensor | None = None, w_t: Tensor | None = None, split_bn: bool = True) -> Tensor:
    """:func:`domain_bce` of :func:`domain_logits`: the adversarial loss of DANN-style methods."""
    return domain_bce(*domain_logits(disc, f_s, f_t, coeff, split_bn), w_s, w_t)


def mdd_disparity(y_s: Tensor, y_t: Tensor, adv_s: Tensor, adv_t: Tensor, margin: float) -> Tensor:
    """Margin disparity discrepancy, as the loss the adversarial head F' minimises (= -D_gamma;
    Zhang et al. 2019, Eq. 29 with the paper's modified target loss):

        gamma * CE(F'(x_s), argmax F(x_s))  +  E_t -log(1 - softmax(F'(x_t))[argmax F(x_t)])

    F's predictions are constants here (argmax). The feature extractor sees this through a GRL."""
    import torch.nn.functional as F

    src = F.cross_entropy(adv_s, y_s.argmax(1))
    p_t = torch.softmax(adv_t, 1).gather(1, y_t.argmax(1, keepdim=True)).squeeze(1)
    tgt = -torch.log1p(-p_t.clamp(max=1.0 - 1e-6)).mean()
    return margin * src + tgt
