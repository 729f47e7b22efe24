"""Information maximisation (a preset of ``entropy_min``)."""

from __future__ import annotations

from .base import SHARED_HPARAMS, HParam, register
from .entropy_min import EntropyMin


@register("im")
class IM(EntropyMin):
    """Information maximisation (Shi & Sha, ICML 2012; the IM loss of SHOT, Liang et al. 2020):

        loss = CE(C(G(x_s)), y_s) + trade_off * ( E_t H(p(y|x_t)) - H(E_t p(y|x_t)) )

    i.e. ``entropy_min`` with diversity = 1: confident target predictions that still use every
    class. trade_off = 1 (SHOT weighs the two IM terms 1:1 and the diversity term prevents the
    collapse a weight of 1 would cause in plain entropy minimisation). Deviation: trained jointly
    with source CE (SHOT adapts a source model without source data).
    """

    display = "IM"
    paper = "Shi & Sha, Information-Theoretical Learning of Discriminative Clusters for Unsupervised Domain Adaptation, ICML 2012. https://arxiv.org/abs/1206.6438"
    hparams = {**EntropyMin.hparams,
               "trade_off": HParam(1.0, ("log", 0.01, 10.0), "weight of the IM term", low=0.0),
               "diversity": HParam(1.0, ("uniform", 0.0, 1.0), "weight of -H(mean prediction)", low=0.0),
               # not tuned on the tuning pairs: the shared default, not entropy_min's split
               "bn_mode": SHARED_HPARAMS["bn_mode"]}
