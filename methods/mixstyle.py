"""MixStyle: mix the feature statistics of samples of different source domains."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalab.utils import DalabError

from .base import Batch, HParam, register
from .domains import DomainGeneralization
from .nets import LeNet, ResNetBackbone


def mix_styles(x: Tensor, perm: Tensor, lam: Tensor, eps: float = 1e-6) -> Tensor:
    """MixStyle (Zhou et al. 2021, eq. 3-5) of a feature map ``x`` (B, C, H, W): each sample's
    instance-normalised features, re-styled with the mixed statistics
    gamma_mix = lam * sigma(x) + (1 - lam) * sigma(x[perm]), beta_mix = lam * mu(x) + (1 - lam) * mu(x[perm])
    (``lam``: one weight per sample; statistics detached, as the paper)."""
    mu = x.mean((2, 3), keepdim=True).detach()
    sig = (x.var((2, 3), keepdim=True) + eps).sqrt().detach()
    lam = lam.view(-1, 1, 1, 1).to(x.dtype)
    return (x - mu) / sig * (lam * sig + (1 - lam) * sig[perm]) + lam * mu + (1 - lam) * mu[perm]


def other_domain_partner(d: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """For each sample, a random sample of ANOTHER domain (MixStyle's cross-domain mixing; every
    sample's partner drawn uniformly among the other domains' samples of the batch)."""
    scores = torch.rand(len(d), len(d), generator=generator, device=d.device)
    scores[d[:, None] == d[None, :]] = -1.0
    return scores.argmax(1)


def mixstyle_layers(backbone: nn.Module) -> list[nn.Module]:
    """Where MixStyle goes: after the early stages, where statistics carry style (the paper: after
    ResNet's res1 and res2; LeNet: after its first conv stage, the second being its last layer)."""
    if isinstance(backbone, LeNet):
        return [backbone.body[3]]
    if isinstance(backbone, ResNetBackbone):
        return [backbone.body.layer1, backbone.body.layer2]
    raise DalabError(f"no MixStyle positions known for backbone {type(backbone).__name__}")


def _hook(state: dict, module: nn.Module, inputs, out: Tensor):
    """A forward hook: mixes ``out`` while ``state['d']`` holds the batch's domains (training steps
    only), with probability ``state['p']`` per layer call."""
    d = state.get("d")
    if d is None or torch.rand(()) >= state["p"]:
        return None
    lam = torch.distributions.Beta(state["alpha"], state["alpha"]).sample((len(out),)).to(out.device)
    return mix_styles(out, other_domain_partner(d), lam, state["eps"])


@register("mixstyle")
class MixStyle(DomainGeneralization):
    """MixStyle (Zhou et al., ICLR 2021), cross-domain version: during training, after the backbone's
    early stages (:func:`mixstyle_layers`), each sample's feature statistics (channel mean and std)
    are mixed with those of a sample of another source domain with weight lam ~ Beta(alpha, alpha),
    with probability p per layer; at test time the network is unchanged. Then plain CE on the
    sources. Defaults: the paper's p = 0.5, alpha = 0.1, eps = 1e-6. Deviation: the partner is drawn
    per sample among the other domains' samples (with replacement), not by a shuffled half-batch
    swap, so it works for any k.
    """

    display = "MixStyle"
    paper = "Zhou et al., Domain Generalization with MixStyle, ICLR 2021. https://arxiv.org/abs/2104.02008"
    hparams = {
        "p": HParam(0.5, ("uniform", 0.1, 1.0), "probability of mixing at each MixStyle layer", low=0.0, high=1.0),
        "alpha": HParam(0.1, ("log", 0.05, 1.0), "lam ~ Beta(alpha, alpha)", low=1e-3),
    }

    def build(self):
        self._style = {"d": None, "p": self.hp.p, "alpha": self.hp.alpha, "eps": 1e-6}
        for layer in mixstyle_layers(self.net.backbone):
            layer.register_forward_hook(lambda m, i, o, s=self._style: _hook(s, m, i, o))

    def update(self, batch: Batch, step: int):
        self._style["d"] = batch.d_src
        try:
            logits = self.predict(batch.x_src)
        finally:
            self._style["d"] = None
        loss = F.cross_entropy(logits, batch.y_src)
        self.step(loss)
        return {"loss": loss, "cls_loss": loss}
