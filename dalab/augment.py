"""Data options any method can switch on: standardisation, train-time augmentation, mixup, VAT.

They are shared hyperparameters (declared in :data:`dalab.methods.base.DATA_HPARAMS`), so a run
config, ``dalab run --set`` and a benchmark spec (``hparams:`` or ``variants:``) switch them like
any other hyperparameter, the run record keeps their resolved values, and tables never pool runs
whose data options differ (they are part of a row's setting). Methods never re-code them:

- ``standardize`` and ``augment`` live in the data path (:class:`~dalab.datasets.base.TensorSplit`
  normalises every batch; its training ``sampler`` augments on the device, in batch; evaluation
  batches are never augmented);
- ``mixup: source`` is applied by the trainer to the source batch before the method sees it (soft
  labels: ``F.cross_entropy`` takes class probabilities);
- ``mixup: cross`` and ``vat`` are extra terms the trainer attaches to the method; they are added to
  the method's objective in :meth:`~dalab.methods.base.Method.optimize`, the one place every
  method's loss goes through.

Randomness: augmentation draws from a generator seeded from the run's data stream; mixup and VAT
draw from torch's global RNG (seeded per run, saved in checkpoints). Same seed, same numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dalab.datasets.images import IMAGENET_MEAN, IMAGENET_STD
from dalab.utils import DalabError

AUGMENTS = ("none", "light", "strong")


# --------------------------------------------------------------------------- standardisation

def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (3 channels: a grey image counts as 3 equal ones) of uint8
    N x C x H x W images scaled to [0, 1]."""
    c = images.shape[1]
    s = torch.zeros(c, dtype=torch.float64, device=images.device)
    s2 = torch.zeros_like(s)
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].to(torch.float64) / 255.0
        s += x.sum((0, 2, 3))
        s2 += (x * x).sum((0, 2, 3))
    n = len(images) * images.shape[2] * images.shape[3]
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(1e-12).sqrt()
    if c == 1:
        mean, std = mean.repeat(3), std.repeat(3)
    return mean.tolist(), std.clamp_min(1e-3).tolist()


def standardization(mode: str, train_images: Tensor | None) -> tuple[list[float], list[float]]:
    """(mean, std) per channel on [0, 1] inputs for a tensor domain.

    ``auto``/``fixed``: 0.5 / 0.5, i.e. inputs in [-1, 1] (the DANN digits protocol);
    ``domain``: the statistics of this domain's train split (each domain standardised by its own);
    ``imagenet``: ImageNet's (for ImageNet-pretrained backbones)."""
    if mode in ("auto", "fixed"):
        return [0.5] * 3, [0.5] * 3
    if mode == "imagenet":
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    if mode == "domain":
        return channel_stats(train_images)
    raise DalabError(f"standardize={mode!r} is not one of auto, fixed, domain, imagenet")


# --------------------------------------------------------------------------- augmentation

def random_affine(x: Tensor, gen: torch.Generator, degrees: float = 10.0, shift: float = 0.1,
                  scale: tuple[float, float] = (0.9, 1.1)) -> Tensor:
    """Per-image random rotation (+-``degrees``), translation (+-``shift`` of the size) and
    scale, in batch on ``x``'s device (bilinear, border padding). Digits are never flipped."""
    n = x.shape[0]
    u = torch.rand(n, 4, device=x.device, generator=gen, dtype=x.dtype)
    ang = (2 * u[:, 0] - 1) * math.radians(degrees)
    s = scale[0] + u[:, 1] * (scale[1] - scale[0])
    tx, ty = (2 * u[:, 2] - 1) * 2 * shift, (2 * u[:, 3] - 1) * 2 * shift  # grid units span 2
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(x: Tensor, gen: torch.Generator, strength: float = 0.4) -> Tensor:
    """Per-image brightness, contrast and (colour images) saturation factors in
    [1 - strength, 1 + strength], on [0, 1] inputs; the result is clamped to [0, 1]."""
    n = x.shape[0]
    f = 1 + strength * (2 * torch.rand(n, 3, 1, 1, 1, device=x.device, generator=gen, dtype=x.dtype) - 1)
    x = x * f[:, 0]
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * f[:, 1] + mean
    if x.shape[1] == 3:
        grey = x.mean(1, keepdim=True)
        x = (x - grey) * f[:, 2] + grey
    return x.clamp_(0.0, 1.0)


def augment_batch(x: Tensor, level: str, gen: torch.Generator) -> Tensor:
    """Train-time augmentation of a batch of [0, 1] images (tensor domains): ``light`` = random
    affine jitter; ``strong`` = affine jitter + colour jitter. Shape and range are preserved."""
    if level == "none":
        return x
    if level not in AUGMENTS:
        raise DalabError(f"augment={level!r} is not one of auto, {', '.join(AUGMENTS)}")
    x = random_affine(x, gen)
    if level == "strong":
        x = color_jitter(x, gen)
    return x


def augment_inputs(x: Tensor, level: str, gen: torch.Generator, mean: list[float], std: list[float]) -> Tensor:
    """:func:`augment_batch` on STANDARDISED model inputs (what a method's batch holds): back to [0, 1]
    pixels with the domain's (mean, std), augmented exactly as the training sampler augments raw
    pixels (:meth:`dalab.datasets.base.TensorSplit.sampler`: augment, then standardise), standardised
    again. For methods that make their own weak/strong views (:class:`InputViews`)."""
    if level == "none":
        return x
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (augment_batch(x * s + m, level, gen) - m) / s


class InputViews(torch.nn.Module):
    """Augmented views of a method's standardised input batches, made inside ``update`` (weak/strong
    views of self-ensembling, AdaMatch). Deterministic and exactly resumable without saving a
    generator: step ``s`` draws from a generator seeded with (``seed``, ``s``), and ``seed`` is a
    buffer (checkpointed) drawn from torch's RNG when the method is built (so the run seed decides
    it). ``stats`` is the method's per-domain standardisation (``Method.input_stats``, set by the
    trainer), which the views undo and redo around :func:`augment_batch`."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seed", torch.randint(0, 2 ** 31, (1,), dtype=torch.long))
        self._seed: int | None = None  # host copy of the buffer: no device sync per step
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_seed", None))
        self.gen: torch.Generator | None = None

    def begin(self, step: int, device: torch.device) -> torch.Generator:
        """The generator of training step ``step`` (call once per step, before the views)."""
        if self._seed is None:
            self._seed = int(self.seed)
        if self.gen is None or self.gen.device != torch.device(device):
            self.gen = torch.Generator(device=device)
        self.gen.manual_seed(self._seed * 1_000_003 + step)
        return self.gen

    def forward(self, x: Tensor, level: str, stats: tuple[list[float], list[float]]) -> Tensor:
        return augment_inputs(x, level, self.gen, *stats)


# --------------------------------------------------------------------------- mixup

def beta_sample(alpha: float) -> float:
    """lambda ~ Beta(alpha, alpha) from torch's global CPU RNG (a host scalar: no device sync)."""
    a = torch.tensor([float(alpha)])
    return float(torch.distributions.Beta(a, a).sample())


def soft_labels(y: Tensor, num_classes: int) -> Tensor:
    """Class indices -> one-hot probabilities; probabilities pass through."""
    return y if y.is_floating_point() else F.one_hot(y, num_classes).float()


def mixup_source(x: Tensor, y: Tensor, num_classes: int, alpha: float) -> tuple[Tensor, Tensor]:
    """Mixup within the source batch (Zhang et al., mixup, ICLR 2018): one lambda ~ Beta(a, a) per
    batch, each image mixed with a random partner; labels mixed the same way (rows sum to 1)."""
    lam = beta_sample(alpha)
    perm = torch.randperm(len(x), device=x.device)
    y1 = soft_labels(y, num_classes)
    return lam * x + (1 - lam) * x[perm], lam * y1 + (1 - lam) * y1[perm]


class CrossDomainMixup:
    """Inter-domain mixup term, following Yan et al., "Improve Unsupervised Domain Adaptation with
    Mixup Training" (IIMT), arXiv:2001.00677, 2020: mix source and target inputs,

        x_m = lam * x_s + (1 - lam) * x_t,   y_m = lam * onehot(y_s) + (1 - lam) * p_t,

    with lam ~ Beta(alpha, alpha) per batch and p_t the model's current softmax prediction on x_t
    (a soft pseudo-label, no gradient), and add ``weight * CE(C(G(x_m)), y_m)`` to the method's
    objective. Only the classification term of IIMT is used (not its mixed domain labels), so it
    composes with any method that sees unlabeled target inputs."""

    name = "mixup"

    def __init__(self, alpha: float, weight: float, num_classes: int):
        self.alpha, self.weight, self.num_classes = alpha, weight, num_classes

    def mix(self, xs: Tensor, ys: Tensor, xt: Tensor, p_t: Tensor) -> tuple[Tensor, Tensor]:
        """(mixed inputs, mixed soft labels) of source (xs, ys) and target (xt, p_t)."""
        lam = beta_sample(self.alpha)
        return lam * xs + (1 - lam) * xt, lam * soft_labels(ys, self.num_classes) + (1 - lam) * p_t

    def __call__(self, method, batch) -> tuple[Tensor, dict[str, Tensor]]:
        n = min(len(batch.x_src), len(batch.x_tgt))
        xt = batch.x_tgt[:n]
        with torch.no_grad():
            p_t = torch.softmax(method.predict(xt).float(), 1)
        x_m, y_m = self.mix(batch.x_src[:n], batch.y_src[:n], xt, p_t)
        loss = F.cross_entropy(method.predict(x_m).float(), y_m)
        return self.weight * loss, {"mixup_loss": loss}


# --------------------------------------------------------------------------- VAT

class _FrozenBNStats:
    """Inside: BatchNorm layers normalise with batch statistics but do not update running ones
    (VAT's extra forward passes must not move the statistics used at test time)."""

    def __init__(self, module: torch.nn.Module):
        from dalab.methods.nets import batchnorm_layers

        self.bns = batchnorm_layers(module)

    def __enter__(self):
        self.saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
                      for m in self.bns]
        for m in self.bns:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
        return self

    def __exit__(self, *exc):
        for m, (mom, nbt) in zip(self.bns, self.saved):
            m.momentum = mom
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


def _unit(d: Tensor) -> Tensor:
    return d / (d.flatten(1).norm(dim=1).view(-1, *([1] * (d.dim() - 1))) + 1e-12)


class VAT:
    """Virtual adversarial training on target inputs (Miyato et al., TPAMI 2018; used for domain
    adaptation by VADA/DIRT-T, Shu et al., ICLR 2018):

        R_vat = KL( p(x_t) || p(x_t + r_adv) ),  r_adv = eps * unit(grad_d KL(p(x_t) || p(x_t + xi d)))

    with ``iters`` power iterations from a random unit d, p(x_t) treated as a constant. Added as
    ``weight * R_vat`` to any method's objective. Computed in float32 even in a bf16 run (a
    perturbation of norm xi = 1e-6 vanishes in bf16). The gradient w.r.t. d is taken with
    ``torch.autograd.grad`` so parameter gradients only ever see the final term."""

    name = "vat"

    def __init__(self, weight: float, eps: float, xi: float = 1e-6, iters: int = 1):
        self.weight, self.eps, self.xi, self.iters = weight, eps, xi, iters

    def __call__(self, method, batch) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch.x_tgt
        with method.full_precision(), _FrozenBNStats(method):
            x = x.float()
            with torch.no_grad():
                logp = F.log_softmax(method.predict(x).float(), 1)
            d = _unit(torch.randn_like(x))
            for _ in range(self.iters):
                d.requires_grad_(True)
                kl = F.kl_div(F.log_softmax(method.predict(x + self.xi * d).float(), 1), logp,
                              log_target=True, reduction="batchmean")
                d = _unit(torch.autograd.grad(kl, d)[0].detach())
            kl = _kl_rows(logp, F.log_softmax(method.predict(x + self.eps * d).float(), 1)).mean()
        return self.weight * kl, {"vat_loss": kl}


def _kl_rows(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) per row, non-negative by construction: each row's sum is >= 0 in exact arithmetic
    but can round to -1e-8 when q is almost p (seen on another CPU), so it is clamped at 0 (which
    changes nothing else: the gradient of a positive row is untouched)."""
    return (logp.exp() * (logp - logq)).sum(1).clamp_min(0.0)


# --------------------------------------------------------------------------- BSP

class BatchSpectralPenalty:
    """Batch spectral penalization (Chen et al., "Transferability vs. Discriminability: Batch
    Spectral Penalization for Adversarial Domain Adaptation", ICML 2019), Eq. 6:

        L_bsp = sum_{i=1..k} sigma_{s,i}^2 + sigma_{t,i}^2,

    the squares of the k largest singular values of the source and of the target batch feature
    matrices (the backbone's output), added as ``weight * L_bsp`` to any method that sees both.
    It penalises the features the method itself computed in this step
    (:attr:`Method.step_features`, recorded by ``features_cat``/``features_st``), so the gradient
    reaches exactly the representation the method aligns; a method that computed no source and
    target features before its first optimizer step (MCD's step A, ADDA) gets them from one extra
    forward per domain, with BatchNorm's running statistics left untouched. The per-matrix loss is
    pytorch-adapt's ``BatchSpectralLoss`` (its BSP hook sums the two domains the same way)."""

    name = "bsp"

    def __init__(self, weight: float, k: int = 1):
        from pytorch_adapt.layers import BatchSpectralLoss

        self.weight, self.k, self.loss = weight, k, BatchSpectralLoss(k)

    def __call__(self, method, batch) -> tuple[Tensor, dict[str, Tensor]]:
        feats = method.step_features
        if feats is None:
            with _FrozenBNStats(method):
                feats = method.features_st(batch.x_src, batch.x_tgt)
        penalty = sum(self.loss(f.float()) for f in feats)
        return self.weight * penalty, {"bsp_loss": penalty}


def extra_terms(hp: dict, num_classes: int) -> list:
    """The objective terms a run's data options add to its method (may be empty)."""
    terms = []
    if hp.get("mixup") == "cross":
        terms.append(CrossDomainMixup(hp["mixup_alpha"], hp["mixup_weight"], num_classes))
    if hp.get("vat", 0.0) > 0:
        terms.append(VAT(hp["vat"], hp["vat_eps"], hp["vat_xi"]))
    if hp.get("bsp", 0.0) > 0:
        terms.append(BatchSpectralPenalty(hp["bsp"], hp["bsp_k"]))
    return terms
