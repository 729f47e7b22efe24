"""The shape shared by test-time adaptation (TTA) methods: BN adapt, TENT, SAR, CoTTA.

A test-time method starts from the shared source model (``init_from_source``), never sees a source
sample (``uses_source = False``) and adapts on a STREAM of unlabeled target batches
(:mod:`dalab.streams`): the trainer (:class:`dalab.trainer.StreamLoop`) asks it for each batch's
prediction first (:meth:`TestTimeMethod.stream_predict`), then lets it adapt on that batch
(``update``, ``adapt_steps`` times), and resets it to the source model after every batch when the
stream is episodic (:meth:`TestTimeMethod.reset`).

What a method adapts is declared through the one optimizer interface (:meth:`Method.optimizers`):
:meth:`TestTimeMethod.adapted` names the parameters it updates (TENT and SAR: the BatchNorm affine
parameters; CoTTA: every weight); everything else of the network is frozen (:meth:`frozen`, checked
bitwise by tests/test_methods.py).

``batch_statistics = True``: BatchNorm layers normalise with the statistics of the batch they see,
at prediction and in evaluation (test-time BN, Nado et al. 2020 / Schneider et al. 2020; TENT's
configuration); the source running statistics are dropped. Such a model's prediction depends on
the batch, so every evaluation of it draws its batches in a seeded random order of the stream's
batch size (:func:`dalab.evaluation.forward_split`), never a split's storage order.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Iterable

from torch import Tensor, nn

from dalab.streams import stream_hparams

from .base import HParam, Method, TargetData

# the TTA optimizer protocol of TENT's and CoTTA's CIFAR configurations (Adam, lr 1e-3, no weight
# decay, constant lr, one step per batch): a method's own defaults override the shared ones
TTA_OPTIMIZATION = {
    "optimizer": HParam("adam", ("choice", ("sgd", "adam")), "optimizer of the adapted parameters "
                        "(TENT/CoTTA CIFAR configs: Adam)"),
    "lr": HParam(1e-3, ("log", 1e-4, 1e-2), "lr of the adapted parameters (TENT/CoTTA CIFAR configs: 1e-3)",
                 low=1e-8, high=10.0),
    "weight_decay": HParam(0.0, None, "L2 weight decay (TENT/CoTTA: 0)", low=0.0, high=1.0),
    "lr_schedule": HParam("constant", None, "constant: a stream has no planned end to anneal towards",
                          choices=("dann", "constant", "cosine")),
}


def use_batch_statistics(module: nn.Module) -> None:
    """Every BatchNorm layer of ``module`` normalises with the statistics of the batch it sees, in
    train and eval mode alike (its running statistics are dropped: TENT's ``configure_model``)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None


def batchnorm_affine(module: nn.Module) -> list[nn.Parameter]:
    """The affine (scale and shift) parameters of ``module``'s BatchNorm layers."""
    return [p for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in (m.weight, m.bias) if p is not None]


class TestTimeMethod(Method):
    """Base of the test-time methods: the stream protocol's hooks, written once."""

    __test__ = False  # not a pytest class
    family = "test-time"
    target_data = TargetData.UNLABELED
    label_budgets = ("0",)
    init_from_source = True
    uses_source = False
    settings = ("closed",)
    test_time: ClassVar[bool] = True
    batch_statistics: ClassVar[bool] = True
    # False: the method never changes a weight (the source model, BN adapt): all of them are frozen
    adapts_weights: ClassVar[bool] = True
    hparams = {**TTA_OPTIMIZATION, **stream_hparams()}

    @classmethod
    def check_run(cls, cfg, hp) -> None:
        """The stream must be one this task and this method can have (one-line errors, before
        anything is loaded): domains (dalab.streams.StreamOptions.check), several adaptation steps
        only for a method that adapts weights."""
        from dalab.streams import StreamOptions
        from dalab.utils import Unsupported

        super().check_run(cfg, hp)
        StreamOptions.of(hp, cfg.target).check(cfg.source, cfg.target)
        if not cls.adapts_weights and hp["adapt_steps"] != 1:
            raise Unsupported(f"method {cls.name!r} changes no weight, so adapt_steps={hp['adapt_steps']} cannot apply; "
                              f"use adapt_steps=1 (or tent / sar / cotta)")

    def build(self) -> None:
        if self.batch_statistics:
            use_batch_statistics(self.net)
        moved = {id(p) for p in self.adapted()} if self.adapts_weights else set()
        for p in self.net.parameters():  # what is not adapted takes no gradient
            p.requires_grad_(id(p) in moved)
        self._source_state: dict[str, Tensor] | None = None

    def adapted(self) -> list[nn.Parameter]:
        """The parameters the method updates at test time. Default: BatchNorm affine (TENT's choice)."""
        return batchnorm_affine(self.net)

    def optimizers(self) -> dict[str, list[dict]]:
        params = self.adapted() if self.adapts_weights else []
        # a method that updates nothing still gets an (unused) optimizer over the head: never stepped
        return {"main": [{"params": params or list(self.net.head.parameters()), "lr_mult": 1.0}]}

    def frozen(self) -> list[str]:
        moved = {id(p) for p in self.adapted()} if self.adapts_weights else set()
        return [k for k, v in self.net.state_dict(prefix="net.", keep_vars=True).items() if id(v) not in moved]

    # -- the stream protocol (dalab.trainer.StreamLoop)
    def on_train_start(self, x_tgt: Iterable[Tensor] | None) -> None:
        """Before the stream: remember the source model (what an episodic reset goes back to)."""
        self._source_state = copy.deepcopy(self.state_dict())

    def reset(self) -> None:
        """Back to the source model: weights, buffers and the optimizer's state."""
        self.load_state_dict(self._source_state)
        for opt in self.optim.optimizers.values():
            opt.state.clear()

    def stream_predict(self, x: Tensor, step: int) -> Tensor:
        """The prediction (logits) on stream batch ``step`` BEFORE the method adapts on it; the
        trainer calls it without gradients. Default: :meth:`predict`."""
        return self.predict(x)

    def update(self, batch, step: int) -> dict[str, Any]:
        return {"loss": 0.0}
