"""Peer equivalence, the peer side: pytorch-adapt 0.0.83's adapters and hooks, each configured to
dalab's protocol over deep copies of a built dalab method's modules.

Each ``peer_<name>(m, **kwargs) -> Peer`` takes a built dalab method ``m`` and returns the adapter
that must train exactly as ``m`` does, with the (name, dalab's module, the peer's copy) pairs to
compare. The configuration is set-up only: loss weights (a SumWeighter with dalab's trade-offs
instead of pytorch-adapt's MeanWeighter), the gradient-reversal coefficient (dalab's lambda_p written
into its GradientReversal buffers before each step), one plain SGD optimizer per model at dalab's lr,
and dalab's domain labels (source = 1). Which method is compared with which peer, and how, is
:mod:`dalab.benchmarks.peer_cases`; the run and the measure, :mod:`dalab.benchmarks.peer_compare`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from dalab.methods.layers import dann_lambda


def _walk(obj, kind, seen=None):
    """Every object of type ``kind`` reachable from a pytorch-adapt hook (attributes, lists, dicts,
    submodules): how GRL weights and entropy normalisers are configured after construction."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, kind):
        yield obj
    if isinstance(obj, nn.Module):
        for m in obj.modules():
            if m is not obj:
                yield from _walk(m, kind, seen)
        return
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif type(obj).__module__.startswith("pytorch_adapt.hooks") or type(obj).__module__.startswith("dalab"):
        children = list(vars(obj).values())
    else:
        return
    for c in children:
        yield from _walk(c, kind, seen)


@dataclass
class Peer:
    """A configured pytorch-adapt adapter and the modules to compare: (name, dalab's, the peer's)."""

    adapter: object
    pairs: list[tuple[str, nn.Module, nn.Module]]
    grl: Callable[[int], float] | None = None   # reversal coefficient of a step (dalab's schedule)

    def step(self, batch: dict, step: int) -> None:
        from pytorch_adapt.layers import GradientReversal

        if self.grl is not None:
            for g in _walk(self.adapter.hook, GradientReversal):
                # the buffer takes the dtype of the constructor's weight: the hooks' default weight=1
                # makes it int64, and update_weight(0.46) would store 0 (hence weight=1.0 above)
                assert g.weight.is_floating_point(), "construct the hook with gradient_reversal_weight=1.0"
                g.update_weight(self.grl(step))
        self.adapter.training_step(batch)


def peer_batch(x_s, y_s, x_t=None) -> dict:
    """pytorch-adapt's batch dict, with dalab's domain labels (source = 1, target = 0; its own
    datasets use 0 / 1)."""
    out = {"src_imgs": x_s, "src_labels": y_s, "src_domain": torch.ones(len(x_s))}
    if x_t is not None:
        out.update(target_imgs=x_t, target_domain=torch.zeros(len(x_t)))
    return out


def _sgd(m, keys=None, multipliers=None):
    """One plain SGD optimizer per model at dalab's method's lr (the comparison's protocol: no
    momentum, no weight decay, so one optimizer per model steps exactly as dalab's single one)."""
    from pytorch_adapt.containers import Optimizers

    return Optimizers((torch.optim.SGD, {"lr": m.hp.lr, "momentum": 0.0, "weight_decay": 0.0}), keys=keys,
                      multipliers=multipliers)


def _gc(m):
    G, C = copy.deepcopy(m.net.backbone), copy.deepcopy(m.net.head)
    return G, C, [("backbone", m.net.backbone, G), ("head", m.net.head, C)]


def _weighter(weights: dict[str, float]):
    from pytorch_adapt.weighters import SumWeighter

    return SumWeighter(weights=weights)


def peer_dann(m, **_) -> Peer:
    from pytorch_adapt.adapters import DANN
    from pytorch_adapt.containers import Models

    G, C, pairs = _gc(m)
    D = copy.deepcopy(m.disc)
    t = m.hp.trade_off
    # dalab's domain loss is the mean of the two domain BCEs: each domain term weighs trade_off / 2
    weights = {"src_domain_loss": t / 2, "target_domain_loss": t / 2}
    extra = {}
    if m.hp.bsp > 0:  # dalab's bsp option = pytorch-adapt's BSPHook after G (source and target features)
        from pytorch_adapt.hooks import BSPHook
        from pytorch_adapt.layers import BatchSpectralLoss
        extra = {"post_g": [BSPHook(loss_fn=BatchSpectralLoss(k=m.hp.bsp_k))]}
        weights["bsp_loss"] = m.hp.bsp
    adapter = DANN(models=Models({"G": G, "C": C, "D": nn.Sequential(D, nn.Flatten(0))}), optimizers=_sgd(m),
                   hook_kwargs={"weighter": _weighter(weights), "gradient_reversal_weight": 1.0, **extra})
    return Peer(adapter, pairs + [("disc", m.disc, D)], lambda s: dann_lambda(m.progress(s), m.hp.gamma))


class _DetachedCombiner(nn.Module):
    """CDAN's map T(f, g) with g = softmax(logits) treated as a constant, as in the CDAN authors'
    code (``softmax_output = input_list[1].detach()``) and TLlib; pytorch-adapt's hook lets the
    reversed gradient flow into the classifier through g."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, f, g):
        return self.fn(f, g.detach())


def peer_cdan(m, paper_setup: bool = True, **_) -> Peer:
    from pytorch_adapt.adapters import CDANNE
    from pytorch_adapt.containers import Misc, Models
    from pytorch_adapt.layers import EntropyWeights
    from pytorch_adapt.layers.normalizers import SumNormalizer

    G, C, pairs = _gc(m)
    D = copy.deepcopy(m.disc)
    fmap = copy.deepcopy(m.map) if isinstance(m.map, nn.Module) else m.map
    combiner = _DetachedCombiner(fmap) if paper_setup else fmap
    t = m.hp.trade_off
    adapter = CDANNE(models=Models({"G": G, "C": C, "D": nn.Sequential(D, nn.Flatten(0))}), optimizers=_sgd(m),
                     misc=Misc({"feature_combiner": combiner}),
                     hook_kwargs={"weighter": _weighter({"src_domain_loss": t / 2, "target_domain_loss": t / 2}),
                                  "gradient_reversal_weight": 1.0})
    if paper_setup:
        # CDAN+E's weights normalised to sum to the batch size per domain (the CDAN code, TLlib and
        # dalab); pytorch-adapt divides them by their maximum instead
        for w in _walk(adapter.hook, EntropyWeights):
            w.normalizer = SumNormalizer(detach=True, scale_by_batch_size=True)
    pairs = pairs + [("disc", m.disc, D)]
    if isinstance(fmap, nn.Module):
        pairs.append(("map", m.map, fmap))
    return Peer(adapter, pairs, lambda s: dann_lambda(m.progress(s), m.hp.gamma))


def _classifier_plus(m, post, weights) -> Peer:
    """pytorch-adapt's Classifier adapter (source CE) with loss hooks after it."""
    from pytorch_adapt.adapters import Classifier
    from pytorch_adapt.containers import Models

    G, C, pairs = _gc(m)
    adapter = Classifier(models=Models({"G": G, "C": C}), optimizers=_sgd(m),
                         hook_kwargs={"post": post, "weighter": _weighter(weights)})
    return Peer(adapter, pairs)


def peer_mcc(m, **_) -> Peer:
    from pytorch_adapt.hooks import MCCHook
    from pytorch_adapt.layers import MCCLoss

    return _classifier_plus(m, [MCCHook(loss_fn=MCCLoss(T=m.hp.temperature))], {"mcc_loss": m.hp.trade_off})


def peer_bnm(m, **_) -> Peer:
    from pytorch_adapt.hooks import BNMHook

    return _classifier_plus(m, [BNMHook()], {"bnm_loss": m.hp.trade_off})


def peer_entropy(m, **_) -> Peer:
    """entropy_min and im: TargetEntropyHook (+ TargetDiversityHook for im's diversity term)."""
    from pytorch_adapt.hooks import TargetDiversityHook, TargetEntropyHook

    t, div = m.hp.trade_off, m.hp.diversity
    post, weights = [TargetEntropyHook()], {"entropy_loss": t}
    if div:
        post.append(TargetDiversityHook())
        weights["diversity_loss"] = t * div
    return _classifier_plus(m, post, weights)


def peer_afn(m, **_) -> Peer:
    from pytorch_adapt.hooks import AFNHook
    from pytorch_adapt.layers import AdaptiveFeatureNorm

    radius, weight = m.hp.radius, m.hp.trade_off
    if m.hp.variant == "safn":
        loss_fn = AdaptiveFeatureNorm(step_size=m.hp.delta_r)
    elif m.hp.reduction == "domain":  # HAFN (the library ships only SAFN's loss; its hook takes any loss)
        loss_fn = lambda h: (h.norm(p=2, dim=1).mean() - radius) ** 2  # noqa: E731  (the paper's mean norm)
    else:
        loss_fn = lambda h: ((h.norm(p=2, dim=1) - radius) ** 2).mean()  # noqa: E731  (per sample)
    if m.hp.reduction == "sample":
        # one mean over S u T of a per-sample term = half the hook's sum of the two domain means
        weight = weight / 2
    # AFNHook sums the source and the target term, as dalab's default reduction=domain (the paper)
    return _classifier_plus(m, [AFNHook(loss_fn=loss_fn)], {"afn_loss": weight})


def peer_classifier(m, **_) -> Peer:
    """source_only / target_only / finetune: pytorch-adapt's Classifier adapter (CE on the batch it
    is given as "src"), the backbone's optimizer at dalab's backbone_lr_mult."""
    from pytorch_adapt.adapters import Classifier
    from pytorch_adapt.containers import Models

    G, C, pairs = _gc(m)
    adapter = Classifier(models=Models({"G": G, "C": C}), optimizers=_sgd(m, multipliers={"G": m.hp.backbone_lr_mult}))
    return Peer(adapter, pairs)


def peer_finetuner(m, **_) -> Peer:
    """frozen_features: pytorch-adapt's Finetuner (G frozen in eval mode, only C optimised)."""
    from pytorch_adapt.adapters import Finetuner
    from pytorch_adapt.containers import Models

    G, C, pairs = _gc(m)
    adapter = Finetuner(models=Models({"G": G, "C": C}), optimizers=_sgd(m, keys=["C"]))
    return Peer(adapter, pairs)


class _TwoHeads(nn.Module):
    """pytorch-adapt's MCD wants C to return the list of both classifiers' logits."""

    def __init__(self, c1: nn.Module, c2: nn.Module):
        super().__init__()
        self.c1, self.c2 = c1, c2

    def forward(self, f):
        return [self.c1(f), self.c2(f)]


def peer_mcd(m, **_) -> Peer:
    """pytorch-adapt's MCD adapter (MCDHook: steps A, B, C; C repeated num_k times)."""
    from pytorch_adapt.adapters import MCD
    from pytorch_adapt.containers import Models
    from pytorch_adapt.weighters import SumWeighter

    G, C1, C2 = copy.deepcopy(m.net.backbone), copy.deepcopy(m.net.head), copy.deepcopy(m.head2)
    # the paper sums the terms of each step (A: CE1 + CE2; B: CE1 + CE2 - d), as dalab; pytorch-adapt's
    # default MeanWeighter divides them by 2 and 3
    adapter = MCD(models=Models({"G": G, "C": _TwoHeads(C1, C2)}),
                  optimizers=_sgd(m, multipliers={"G": m.hp.backbone_lr_mult}),
                  hook_kwargs={"repeat": m.hp.num_k, "x_weighter": SumWeighter(), "y_weighter": SumWeighter()})
    return Peer(adapter, [("backbone", m.net.backbone, G), ("head", m.net.head, C1), ("head2", m.head2, C2)])


def peer_adda(m, **_) -> Peer:
    """pytorch-adapt's ADDA adapter: G = the frozen source encoder, T = its copy (dalab's net.backbone)."""
    from pytorch_adapt.adapters import ADDA
    from pytorch_adapt.containers import Models

    G, C, D = copy.deepcopy(m.src_encoder), copy.deepcopy(m.net.head), copy.deepcopy(m.disc)
    G.requires_grad_(True)  # the adapter deep-copies G into T, which must train (G runs under no_grad)
    # threshold -1: T is stepped at every batch, as the paper and dalab's d_threshold=0 (pytorch-adapt's
    # default 0.6 skips T's step while D's batch accuracy is <= 0.6)
    adapter = ADDA(models=Models({"G": G, "C": C, "D": nn.Sequential(D, nn.Flatten(0))}),
                   optimizers=_sgd(m, keys=["T", "D"], multipliers={"T": m.hp.backbone_lr_mult}),
                   hook_kwargs={"threshold": -1.0})
    T = adapter.models["T"]
    return Peer(adapter, [("target encoder", m.net.backbone, T), ("disc", m.disc, D),
                          ("source encoder", m.src_encoder, G), ("head", m.net.head, C)])


def peer_aligner(m, **_) -> Peer:
    """dan / deep_coral / joint (alignment mmd or coral): pytorch-adapt's Aligner adapter (source CE +
    AlignerHook per aligned layer). Its "features" and "logits" layers are the backbone output and
    the head's logits; for dalab's "head" taps (every hidden ReLU output of the head, DAN's fc6-fc8)
    an AlignerHook per tap reads that tap through a LogitsHook over the head's prefix."""
    from pytorch_adapt.adapters import Aligner
    from pytorch_adapt.containers import Misc, Models
    from pytorch_adapt.hooks import AlignerHook, FeaturesHook, LogitsHook
    from pytorch_adapt.hooks.features import FeaturesChainHook
    from pytorch_adapt.hooks.utils import ChainHook

    G, C, pairs = _gc(m)
    loss_fn = m.align  # pytorch-adapt's MMDLoss / CORALLoss, as dalab builds it (no parameters)
    hooks, misc = [], {}
    if m.hp.layers == "features":
        hooks.append(AlignerHook(loss_fn, layer="features"))
    else:
        if m.hp.layers == "head":
            relus = [i for i, layer in enumerate(C) if isinstance(layer, nn.ReLU)]
            for k, i in enumerate(relus):
                name = f"tap{k}"
                misc[name] = C[: i + 1]  # shares C's parameters
                h = AlignerHook(loss_fn, hook=FeaturesChainHook(
                    FeaturesHook(), LogitsHook(model_name=name, out_suffixes=[f"_{name}"])), layer="logits")
                h.layer = name  # the hook's only check is on "features"/"logits" at construction
                hooks.append(h)
        hooks.append(AlignerHook(loss_fn, layer="logits"))
    weights = {f"{h.layer}_confusion_loss": m.hp.trade_off for h in hooks}
    adapter = Aligner(models=Models({"G": G, "C": C}), optimizers=_sgd(m), misc=Misc(misc) if misc else None,
                      hook_kwargs={"aligner_hook": ChainHook(*hooks), "softmax": False,
                                   "weighter": _weighter(weights)})
    return Peer(adapter, pairs)
