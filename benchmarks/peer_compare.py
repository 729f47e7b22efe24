"""Peer equivalence, the run and its measure: dalab's method and its configured peer trained side
by side from the same weights on the same batches, and the largest differences after each step.

:func:`compare` builds dalab's method through the public API (plain SGD at a constant LR, float32),
its peer (:mod:`dalab.benchmarks.peer_adapters`, as a :class:`~dalab.benchmarks.peer_cases.Case`
says), feeds both the same random batches and records, per step, the largest absolute difference
over every compared parameter and BatchNorm buffer, and, with ``control``, how far dalab drifts from
itself started from weights moved by one ulp (the rounding noise floor). :func:`verdict` reads a
:class:`Result` against :data:`REL_TOL`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from dalab.benchmarks.peer_adapters import Peer, peer_batch
from dalab.methods import Batch, get_method, resolve_hparams
from dalab.methods.base import SHARED_HPARAMS
from dalab.methods.nets import build_classifier

if TYPE_CHECKING:
    from dalab.benchmarks.peer_cases import Case

LR = 0.01           # the protocol's mu0; plain SGD so one optimizer == one per model
N_PER_DOMAIN = 8    # images per domain per step (BatchNorm needs > 1)
NUM_CLASSES = 10
TOTAL_STEPS = 10    # p = step / 10: the reversal coefficient changes at every step
# Tolerance of the one-step check, relative to the largest parameter magnitude: float32 has a
# relative precision of 6e-8; the two implementations sum gradients in different orders (one
# concatenated forward vs one per domain picks different conv reductions; loss terms are added in
# another order), which moves a gradient by a few ulps per reduction over ~1e3 terms. 1e-6 is ~16
# ulps of the largest weight: far below any real difference (a factor 2 on one loss term moves the
# weights by ~1e-4 after one step here) and above every rounding difference measured (< 2e-8).
REL_TOL = 1e-6
BACKBONES = ("lenet", "lenet_bn")
HAS_BN_MODE = "bn_mode" in SHARED_HPARAMS


def bn_mode_cases() -> list[tuple[str, dict]]:
    """The BatchNorm settings a lenet_bn comparison runs: dalab's default (pooled statistics) and
    ``bn_mode=split`` (per-domain statistics, pytorch-adapt's hooks)."""
    return [("joint", {"bn_mode": "joint"}), ("split", {"bn_mode": "split"})] if HAS_BN_MODE else [("joint", {})]


def make_batches(steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    n = N_PER_DOMAIN
    out = []
    for _ in range(steps):
        x_s = torch.randn(n, 3, 28, 28, generator=g)
        y_s = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        x_t = 0.7 * torch.randn(n, 3, 28, 28, generator=g) + 0.3  # a shifted, rescaled "domain"
        out.append((x_s, y_s, x_t))
    return out


def build_method(name: str, backbone: str, overrides: dict, seed: int = 0):
    """dalab's method through the public API, with plain SGD at a constant LR, in float32."""
    torch.manual_seed(seed)
    cls = get_method(name)
    hp = resolve_hparams(cls, {"optimizer": "sgd", "lr": LR, "momentum": 0.0, "weight_decay": 0.0, "lr_schedule": "constant",
                               **overrides})
    m = cls(build_classifier(backbone, NUM_CLASSES), NUM_CLASSES, hp, TOTAL_STEPS)
    from dalab.augment import extra_terms
    m.extra_terms = extra_terms(hp, NUM_CLASSES)  # the run's options (bsp), as the trainer sets them
    m.train()
    return m


@torch.no_grad()
def _max_abs_diff(tensors_a, tensors_b) -> float:
    return max((float((a - b).abs().max()) for a, b in zip(tensors_a, tensors_b)), default=0.0)


def param_diff(peer: Peer) -> float:
    """Largest absolute difference over every parameter of the compared modules."""
    return _max_abs_diff([p for _, a, _ in peer.pairs for p in a.parameters()],
                         [p for _, _, b in peer.pairs for p in b.parameters()])


def buffer_diff(peer: Peer) -> float:
    """Largest absolute difference over the floating-point buffers (BatchNorm running statistics)."""
    return _max_abs_diff([v for _, a, _ in peer.pairs for v in a.buffers() if v.is_floating_point()],
                         [v for _, _, b in peer.pairs for v in b.buffers() if v.is_floating_point()])


@dataclass
class Result:
    case: Case
    backbone: str
    bn: str                     # "joint" / "split" on lenet_bn, "-" on lenet
    diffs: list[float]          # largest parameter difference after each step
    buffer_diffs: list[float]   # largest BatchNorm-buffer difference after each step
    control: list[float]        # dalab vs dalab from weights moved by 1 ulp: the rounding noise floor
    scale: float                # largest parameter magnitude (the tolerance's unit)
    update: float               # largest parameter change of dalab's first step

    def diff(self, step: int) -> float:
        return self.diffs[step - 1]

    @property
    def tol(self) -> float:
        return REL_TOL * self.scale


def _nudge(m: nn.Module, seed: int) -> None:
    """Move every weight by one float32 ulp, up or down at random: a rounding-sized change."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            sign = torch.randint(0, 2, p.shape, generator=g).float() * 2 - 1
            p.copy_(torch.nextafter(p, sign * torch.inf))


def compare(case: Case, backbone: str, extra: dict | None = None, steps: int = 1, seed: int = 0,
            control: bool = False) -> Result:
    """Train dalab's method and its configured peer side by side for ``steps`` updates (and, with
    ``control``, dalab again from 1-ulp-nudged weights, to show how rounding differences grow)."""
    extra = extra or {}
    overrides = {**case.overrides, **extra}
    m = build_method(case.method, backbone, overrides, seed)
    peer = case.build(m, **case.peer_kwargs)
    for _, _, b in peer.pairs:
        b.train()
    twin = None
    if control:
        twin = build_method(case.method, backbone, overrides, seed)
        _nudge(twin, seed)
    before = [p.detach().clone() for p in m.parameters()]
    diffs, bdiffs, ctrl, update = [], [], [], 0.0
    for s, (x_s, y_s, x_t) in enumerate(make_batches(steps, seed), start=1):
        if case.data == "uda":
            batch, pbatch = Batch(x_s, y_s, x_tgt=x_t), peer_batch(x_s, y_s, x_t)
        elif case.data == "source":
            batch, pbatch = Batch(x_s, y_s), peer_batch(x_s, y_s)
        else:  # labeled target: a different input distribution, labels from the same draw
            batch, pbatch = Batch(None, None, x_tgt_lab=x_t, y_tgt_lab=y_s), peer_batch(x_t, y_s)
        m.train_step(batch, s)
        peer.step(pbatch, s)
        if s == 1:
            update = _max_abs_diff([p.detach() for p in m.parameters()], before)
        diffs.append(param_diff(peer))
        bdiffs.append(buffer_diff(peer))
        if twin is not None:
            twin.train_step(batch, s)
            ctrl.append(_max_abs_diff([p.detach() for p in m.parameters()], [p.detach() for p in twin.parameters()]))
    bn = "-" if backbone != "lenet_bn" else extra.get("bn_mode", "joint") if case.bn_mode_applies else "n/a"
    scale = max(float(p.abs().max()) for p in before)
    return Result(case, backbone, bn, diffs, bdiffs, ctrl, scale, update)


def verdict(r: Result) -> str:
    c = r.case
    if c.deviation and not c.peer_kwargs.get("paper_setup", True):
        return f"peer default differs: {c.deviation}"
    if r.backbone == "lenet_bn" and r.bn == "joint" and r.diff(1) > r.tol:
        default = resolve_hparams(get_method(c.method), c.overrides).get("bn_mode")
        return ("documented deviation: BatchNorm statistics pooled over source+target (bn_mode=joint"
                + (", dalab's default" if default == "joint" else f"; this method's default is {default}")
                + "); pytorch-adapt forwards each domain alone; `bn_mode=split` removes it")
    if r.diff(1) <= r.tol:
        return "matches"
    return f"MISMATCH ({r.diff(1):.2e} > tolerance {r.tol:.1e})"
