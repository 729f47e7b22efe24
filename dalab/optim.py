"""The trainer's side of every optimizer step: named optimizers, their LR schedule, backward.

A method declares named parameter groups (:meth:`dalab.methods.base.Method.optimizers`, e.g.
``{"main": [...]}`` or ``{"G": [...], "C": [...], "D": [...]}``, each group with an ``lr_mult``);
:class:`Optimization` builds one optimizer per name from the run's shared hyperparameters and owns

- the schedule: every optimizer's LR is set ONCE per training step, from the step index
  (:meth:`Optimization.begin_step`), however many optimizer steps the method takes in that step
  (a per-call scheduler would anneal MCD's LR six times per batch);
- backward and step (:meth:`Optimization.step`): a method never calls ``.backward()`` itself, so
  gradient clipping, mixed precision and distributed training apply to every method the same way.

Like ``torch.optim.lr_scheduler.LambdaLR``, the LR used in step ``s`` (counted from 1) is
``base_lr * factor(p)`` with ``p = (s - 1) / steps``: runs match the earlier one-optimizer loop bit
for bit.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

from dalab.utils import DalabError


def lr_factor(schedule: str, p: float) -> float:
    """The LR multiplier at training progress ``p`` in [0, 1]: ``dann`` = (1 + 10 p)^-0.75 (Ganin et
    al. 2016), ``cosine``, or ``constant``."""
    if schedule == "dann":
        return (1.0 + 10.0 * p) ** -0.75
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    return 1.0


def make_optimizer(groups: list[dict], hp: Any) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay) or Adam over ``groups``, each at ``hp.lr * lr_mult``."""
    for g in groups:
        g["lr"] = hp.lr * g.get("lr_mult", 1.0)
    if hp.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    return torch.optim.Adam(groups, lr=hp.lr, weight_decay=hp.weight_decay)


class Optimization:
    """Named optimizers of one method, their per-step LR schedule and the one backward path."""

    def __init__(self, groups: Mapping[str, list[dict]], hp: Any, total_steps: int,
                 params: Iterable[Tensor] = ()):
        groups = {name: [g for g in gs if g["params"]] for name, gs in groups.items()}
        empty = [name for name, gs in groups.items() if not gs]
        if empty or not groups:
            raise DalabError(f"optimizer(s) {empty or '(none)'} have no trainable parameters; "
                             f"declare at least one parameter group per optimizer in Method.optimizers()")
        self.hp = hp
        self.total_steps = max(int(total_steps), 1)
        self.optimizers = {name: make_optimizer(gs, hp) for name, gs in groups.items()}
        self.base_lrs = {name: [g["lr"] for g in opt.param_groups] for name, opt in self.optimizers.items()}
        self.params = list(params)          # every parameter whose .grad a step clears
        self.max_grad_norm: float | None = None  # set by the trainer (gradient clipping), None = off
        # set by the trainer in a multi-process run (dalab.distributed): averages the gradients of
        # the stepped parameters over the ranks, after backward, before clipping and the step
        self.grad_sync: Callable[[list[Tensor]], None] | None = None
        self.steps_taken = 0                # optimizer steps in the current training step (tests, logs)

    def begin_step(self, step: int) -> None:
        """Set every optimizer's LR for training step ``step`` (from 1). Call once per step."""
        f = lr_factor(self.hp.lr_schedule, min((step - 1) / self.total_steps, 1.0))
        for name, opt in self.optimizers.items():
            for g, base in zip(opt.param_groups, self.base_lrs[name]):
                g["lr"] = base * f
        self.steps_taken = 0

    def step(self, loss: Tensor, names: Iterable[str], retain_graph: bool = False) -> None:
        """Clear every gradient, backpropagate ``loss``, step the named optimizers only."""
        opts = self._named(names)
        self._zero_grad()
        loss.backward(retain_graph=retain_graph)
        self._apply(opts)

    def _zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _named(self, names: Iterable[str]) -> list[torch.optim.Optimizer]:
        opts = []
        for n in names:
            if n not in self.optimizers:
                raise KeyError(f"no optimizer named {n!r}; this method declares {sorted(self.optimizers)}")
            opts.append(self.optimizers[n])
        return opts

    def _apply(self, opts: list[torch.optim.Optimizer]) -> None:
        """The gradients in place: average them over ranks, clip them, step ``opts``."""
        stepped = [p for o in opts for g in o.param_groups for p in g["params"]]
        if self.grad_sync is not None:
            self.grad_sync(stepped)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(stepped, self.max_grad_norm)
        for o in opts:
            o.step()
        self.steps_taken += 1

    def sharpness_aware_step(self, loss_at: Callable[[], Tensor | None], names: Iterable[str],
                             rho: float) -> tuple[Tensor | None, Tensor | None]:
        """One sharpness-aware minimisation step (SAM; Foret et al., ICLR 2021) of the named
        optimizers' parameters w: backpropagate ``loss_at()`` at w, move to the worst nearby point
        w + e, e = rho g / ||g||, backpropagate ``loss_at()`` there, go back to w and step with the
        gradient taken at w + e. ``loss_at`` may return None (nothing to learn from): at the first
        call no step at all, at the second no step either (the weights are restored). Returns the
        two losses (None where there was none)."""
        opts = self._named(names)
        params = [p for o in opts for g in o.param_groups for p in g["params"]]
        first = loss_at()
        if first is None:
            return None, None
        self._zero_grad()
        first.backward()
        moved = [p for p in params if p.grad is not None]
        if self.grad_sync is not None:
            self.grad_sync(moved)
        with torch.no_grad():
            norm = torch.norm(torch.stack([p.grad.norm(2) for p in moved]), 2) if moved else torch.zeros(())
            eps = [p.grad * (rho / (norm + 1e-12)) for p in moved]
            for p, e in zip(moved, eps):
                p.add_(e)
        self._zero_grad()
        second = loss_at()
        if second is not None:
            second.backward()
        with torch.no_grad():
            for p, e in zip(moved, eps):
                p.sub_(e)
        if second is None:
            return first, None
        self._apply(opts)
        return first, second

    @property
    def lr(self) -> float:
        """The current LR of the first optimizer's last group (the head's, for logging)."""
        return next(iter(self.optimizers.values())).param_groups[-1]["lr"]

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: Mapping[str, dict]) -> None:
        if set(state) != set(self.optimizers):
            raise DalabError(f"checkpoint holds optimizers {sorted(state)}, this method has "
                             f"{sorted(self.optimizers)}; the checkpoint is from another method version")
        for name, st in state.items():
            self.optimizers[name].load_state_dict(st)


class WeightAverage:
    """An exponential moving average of a module's weights and BatchNorm statistics (Polyak
    averaging), the model a run evaluates and hands over when ``weight_ema`` > 0.

    After every training step ``avg <- d * avg + (1 - d) * live`` with ``d = min(decay, (1 + n) /
    (10 + n))`` at the n-th update (the warm-up of TensorFlow's ExponentialMovingAverage: early
    averages are not dragged towards the initial weights). Over parameters and BatchNorm running
    statistics only: a method's other buffers (pseudo-labels, memory banks) are training state,
    not the model. :meth:`swapped_in` evaluates the average and restores the live weights, so
    training continues unaffected; :meth:`apply` makes the average the network for good."""

    def __init__(self, module: torch.nn.Module, decay: float):
        from dalab.methods.nets import batchnorm_layers

        self.decay = float(decay)
        stats = [t for bn in batchnorm_layers(module) for t in (bn.running_mean, bn.running_var) if t is not None]
        self.live = [p.data for p in module.parameters()] + stats
        self.avg = [t.detach().clone() for t in self.live]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        torch._foreach_lerp_(self.avg, self.live, 1.0 - d)

    @torch.no_grad()
    def apply(self) -> None:
        torch._foreach_copy_(self.live, self.avg)

    @contextmanager
    def swapped_in(self):
        saved = [t.clone() for t in self.live]
        self.apply()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.live, saved)

    def state_dict(self) -> dict:
        return {"avg": self.avg, "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.avg, list(state["avg"]))
        self.updates = int(state["updates"])
