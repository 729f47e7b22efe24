"""The one interface every adaptation method implements.

A method is a small :class:`Method` subclass registered by name once with :func:`register`. It
declares

- ``family``         -- e.g. "baseline", "adversarial", "joint" (for tables and ``dalab list``),
- ``target_data``    -- which target data it uses (:class:`TargetData`),
- ``label_budgets``  -- which target-label budgets it supports: "0" (unsupervised), "k" (k labels
  per class), "all",
- ``hparams``        -- its own hyperparameters, each with a default and a search space,
- what else its run must give it: ``init_from_source`` (it starts from the source model),
  ``needs_batchnorm`` (a backbone with BatchNorm); :meth:`Method.check_run` turns these, and any
  check a method adds, into one-line errors before anything is trained or written,
- what it never changes: :meth:`Method.frozen` (frozen weights, kept BatchNorm statistics),

and implements ``update(batch, step) -> dict`` (its losses and optimizer step). ``predict(x)``
returns logits and ``features(x)`` the representation validators and plots use. The trainer owns
everything else: iteration, device, evaluation, logging, checkpoints.

Shared hyperparameters (optimizer, lr and its schedule, batch size) live in :data:`SHARED_HPARAMS`;
their defaults follow the DANN paper's protocol (SGD, momentum 0.9, mu_p = mu0 / (1 + 10 p)^0.75).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalab.utils import DalabError, Unsupported

from .nets import BACKBONE_BATCHNORM, BACKBONE_INPUT, has_batchnorm

if TYPE_CHECKING:
    from dalab.runs import RunConfig


# --------------------------------------------------------------------------- data a step sees

class TargetData(str, Enum):
    """What target data a method's update may see."""

    NONE = "none"                       # source only: never sees a target image
    UNLABELED = "unlabeled"             # target inputs, labels hidden
    LABELED = "labeled"                 # labeled target samples from the budget only
    BOTH = "unlabeled+labeled"          # target inputs, plus labeled ones when the budget gives some


@dataclass
class Batch:
    """One training step's data. A target field is ``None`` unless the method's ``target_data``
    and the run's label budget allow it, so a method cannot peek at data it did not declare."""

    x_src: Tensor | None               # None only for source-free methods (``uses_source = False``)
    y_src: Tensor | None               # class indices, or class probabilities under source mixup
    x_tgt: Tensor | None = None        # unlabeled target inputs (target train, labels never given)
    x_tgt_lab: Tensor | None = None    # labeled target inputs (the budget's k per class, or all)
    y_tgt_lab: Tensor | None = None
    # the source domain (0..k-1, the task's source order: dalab.tasks) of each source sample on a
    # multi-source task, whose source batch is per-domain balanced and concatenated in that order;
    # None on a single-source task. A method that ignores it trains on the pooled sources
    d_src: Tensor | None = None


# --------------------------------------------------------------------------- hyperparameters

@dataclass(frozen=True)
class HParam:
    """A hyperparameter: default, search space, validity bounds.

    ``space`` is ``("log", lo, hi)``, ``("uniform", lo, hi)``, ``("int", lo, hi)`` or
    ``("choice", (a, b, ...))``; ``low``/``high`` are inclusive validity bounds for overrides.
    """

    default: Any
    space: tuple | None = None
    help: str = ""
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None      # allowed values (when there is no "choice" search space)
    # False for an option added after runs were recorded: at its default it is left out of run ids
    # (RunConfig.key), so every finished run stays valid; set to anything else it is part of the id
    keyed_at_default: bool = True

    def sample(self, rng) -> Any:
        """Draw from the search space with a ``numpy.random.Generator``."""
        if self.space is None:
            return self.default
        kind = self.space[0]
        if kind == "log":
            return float(math.exp(rng.uniform(math.log(self.space[1]), math.log(self.space[2]))))
        if kind == "uniform":
            return float(rng.uniform(self.space[1], self.space[2]))
        if kind == "int":
            return int(rng.integers(self.space[1], self.space[2] + 1))
        if kind == "choice":
            return self.space[1][int(rng.integers(len(self.space[1])))]
        raise ValueError(f"unknown search space {self.space!r}")

    def parse(self, name: str, value: Any) -> Any:
        """Type-check (and coerce from a string) an override; raise DalabError if invalid."""
        kind = type(self.default)
        try:
            if kind is bool:
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    value = value.lower() in ("true", "1", "yes")
                value = bool(value)
            elif kind is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                value = int(value)
            elif kind is float:
                value = float(value)
            elif kind is str:
                value = ("true" if value else "false") if isinstance(value, bool) else str(value)
        except (TypeError, ValueError):
            raise DalabError(f"hyperparameter {name}={value!r} must be a {kind.__name__}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise DalabError(f"hyperparameter {name}={value!r} must be finite")
        if self.low is not None and value < self.low or self.high is not None and value > self.high:
            raise DalabError(f"hyperparameter {name}={value!r} out of range "
                             f"[{self.low if self.low is not None else '-inf'}, "
                             f"{self.high if self.high is not None else 'inf'}]")
        allowed = self.choices or (self.space[1] if self.space is not None and self.space[0] == "choice" else None)
        if allowed is not None and kind is str and value not in allowed:
            raise DalabError(f"hyperparameter {name}={value!r} must be one of {list(allowed)}")
        return value


SHARED_HPARAMS: dict[str, HParam] = {
    "optimizer": HParam("sgd", ("choice", ("sgd", "adam")), "optimizer for every parameter group"),
    "lr": HParam(0.01, ("log", 1e-3, 1e-1), "base learning rate mu0", low=1e-8, high=10.0),
    "momentum": HParam(0.9, ("choice", (0.0, 0.9)), "SGD momentum", low=0.0, high=0.999),
    "weight_decay": HParam(5e-4, ("log", 1e-5, 1e-2), "L2 weight decay", low=0.0, high=1.0),
    "lr_schedule": HParam("dann", ("choice", ("dann", "constant", "cosine")),
                          "dann: mu0 / (1 + 10 p)^0.75 (Ganin et al. 2016); p = step / steps"),
    "batch_size": HParam(64, ("choice", (32, 64, 128)), "batch size per domain", low=1, high=4096),
    "bn_mode": HParam("joint", None, "BatchNorm over two domains: joint (one forward on cat(source, target), "
                      "statistics pooled) or split (one forward per domain, per-domain statistics)",
                      choices=("joint", "split")),
    "backbone_lr_mult": HParam(1.0, ("choice", (0.1, 1.0)),
                               "lr multiplier of the backbone (0.1 for pretrained backbones)",
                               low=0.0, high=10.0),
    # not drawn in random trials (space None): a search recorded before the option keeps its trials
    "weight_ema": HParam(0.0, None,
                         "evaluate and hand over an exponential moving average of the weights and BatchNorm "
                         "statistics with this decay (Polyak averaging, dalab.optim.WeightAverage); 0 = off",
                         low=0.0, high=0.9999, keyed_at_default=False),
}


# Data options (implemented once, in dalab.augment and the data path; no method re-codes them).
# No search space: they are swept explicitly (a spec's `variants:`), not drawn in random trials,
# and runs that differ in them are different table rows.
DATA_HPARAMS: dict[str, HParam] = {
    "standardize": HParam("auto", None, "input normalisation: auto (digits: fixed; image folders: imagenet), "
                          "fixed ([-1, 1]), domain (each domain's train-split mean/std), imagenet",
                          choices=("auto", "fixed", "domain", "imagenet")),
    "augment": HParam("auto", None, "train-only augmentation: auto (digits: none; image folders: light), none, "
                      "light (digits: affine jitter; images: random-resized crop + flip), strong (+ colour jitter)",
                      choices=("auto", "none", "light", "strong")),
    "mixup": HParam("none", None, "none; source (mixup within the source batch, labels mixed; Zhang et al. 2018); "
                    "cross (source x target mixup with soft target pseudo-labels; Yan et al. 2020)",
                    choices=("none", "source", "cross")),
    "mixup_alpha": HParam(0.2, None, "mixup lambda ~ Beta(alpha, alpha)", low=1e-3, high=100.0),
    "mixup_weight": HParam(1.0, None, "weight of the cross-domain mixup loss", low=0.0),
    "vat": HParam(0.0, None, "weight of virtual adversarial training on target inputs (0 = off)", low=0.0),
    "vat_eps": HParam(6.0, None, "VAT perturbation radius (L2, model-input units)", low=0.0),
    "vat_xi": HParam(1e-6, None, "VAT finite-difference step", low=0.0),
    "bsp": HParam(0.0, None, "weight of batch spectral penalization on source and target features (Chen et al. "
                  "2019; 0 = off). Off by default: on the tuning pairs the paper's 1e-4 collapsed DANN on lenet_bn "
                  "(65.0 -> 23.6 mean target accuracy), 1e-5 still cost 19 points (results/bsp_tuning)",
                  low=0.0, high=10.0, keyed_at_default=False),
    "bsp_k": HParam(1, None, "BSP: number of largest singular values penalised per domain", low=1, high=64,
                    keyed_at_default=False),
}
SHARED_HPARAMS.update(DATA_HPARAMS)


def resolve_hparams(method_cls: type["Method"], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults of shared + method hyperparameters with type-checked overrides applied."""
    table = {**SHARED_HPARAMS, **method_cls.hparams}
    out = {k: h.default for k, h in table.items()}
    for k, v in (overrides or {}).items():
        if k not in table:
            from dalab.datasets.base import closest
            raise DalabError(f"unknown hyperparameter {k!r} for method {method_cls.name!r}"
                             f"{closest(k, table)}; known: {', '.join(sorted(table))}")
        out[k] = table[k].parse(k, v)
    return out


def keyed_hparams(method_cls: type["Method"], hp: Mapping[str, Any]) -> dict[str, Any]:
    """Resolved hyperparameters as run ids see them: without the options that are left out at
    their default (``HParam.keyed_at_default``)."""
    table = {**SHARED_HPARAMS, **method_cls.hparams}
    return {k: v for k, v in hp.items()
            if k not in table or table[k].keyed_at_default or v != table[k].default}


# --------------------------------------------------------------------------- registry

METHODS: dict[str, type["Method"]] = {}


def register(name: str):
    """Class decorator: register a method under ``name`` (the only place the name is written)."""

    def deco(cls: type["Method"]) -> type["Method"]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        if not cls.family:
            raise ValueError(f"method {name!r} must declare a family")
        cls.name = name
        cls.display = cls.__dict__.get("display") or name  # tables and figures; the registry name stays the CLI's
        METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> type["Method"]:
    if name not in METHODS:
        from dalab.datasets.base import closest
        raise DalabError(f"unknown method {name!r}{closest(name, METHODS)}; "
                         f"known methods: {', '.join(sorted(METHODS))} (see `dalab list`)")
    return METHODS[name]


def budget_kind(budget: int | None) -> str:
    """Budget (0, k, or None = all) -> the token a method lists in ``label_budgets``."""
    return "all" if budget is None else ("0" if budget == 0 else "k")


# --------------------------------------------------------------------------- the base class

class Method(nn.Module):
    """Base class of every method. Subclasses set the class attributes, may add modules in
    :meth:`build`, and implement :meth:`update`."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    display: ClassVar[str] = ""                    # name in tables and figures ("CDAN+E"); default: the registry name
    paper: ClassVar[str] = ""                      # "Authors, Title, Venue Year. URL"
    # a documented failure under dalab's protocol (one sentence, reason and where it was measured):
    # kept, not hidden -- every results table marks the method's rows and prints it as a footnote.
    # A mapping {setting: text} limits a note to the tables of those label-set settings (dalab.tasks)
    known_failure: ClassVar[str | dict[str, str]] = ""
    target_data: ClassVar[TargetData] = TargetData.NONE
    label_budgets: ClassVar[tuple[str, ...]] = ("0",)
    hparams: ClassVar[dict[str, HParam]] = {}
    # True: the trainer loads the source-pretrained network (the cached ``source_only`` run of the
    # same pair/seed/backbone, see dalab.pretrain) into ``net`` before constructing the method.
    init_from_source: ClassVar[bool] = False

    # non-empty: the backbone must have BatchNorm, for this reason (AdaBN re-estimates its
    # statistics; a method that trains only BatchNorm parameters has nothing else to train)
    needs_batchnorm: ClassVar[str] = ""

    # the fewest source domains its task must have (2: a multi-source or domain-generalization
    # method, which reads ``Batch.d_src``); the trainer refuses a task with fewer, in one line
    min_sources: ClassVar[int] = 1
    # True: a domain-generalization method: it sees NO target data in any batch or hook, ever
    # (``target_data`` NONE, no data option that draws target inputs); the trainer asserts it
    # in the batch construction (dalab.trainer.Streams), as it does ``uses_source = False``
    domain_generalization: ClassVar[bool] = False

    # the label-set settings it runs on (dalab.tasks.SETTINGS). A closed-set method runs on every
    # setting: on partial tasks unchanged, on open-set and universal ones behind the rejection baseline
    # (unknown when its max softmax is below a threshold chosen on SOURCE validation data)
    settings: ClassVar[tuple[str, ...]] = ("closed", "partial", "openset", "universal")
    # True: the method decides "unknown" itself -- ``predict(x)`` returns K + 1 scores (K = the
    # source classes), the last one "unknown", and the argmax is the method's decision (OSBP, OVANet)
    open_set: ClassVar[bool] = False

    @classmethod
    def starts_from_source(cls, hp: Mapping[str, Any]) -> bool:
        """Whether a run with resolved hyperparameters ``hp`` starts from the source-pretrained
        network (``init_from_source`` unless a method lets an option turn it off)."""
        return cls.init_from_source

    @classmethod
    def batchnorm_needed(cls, hp: Mapping[str, Any]) -> bool:
        """Whether a run with resolved hyperparameters ``hp`` needs a backbone with BatchNorm
        (``needs_batchnorm`` unless a method lets an option turn the need off)."""
        return bool(cls.needs_batchnorm)

    @classmethod
    def check_run(cls, cfg: "RunConfig", hp: Mapping[str, Any]) -> None:
        """Raise a one-line :class:`~dalab.utils.DalabError` naming the fix when this method cannot
        do what run ``cfg`` (with resolved hyperparameters ``hp``) asks. ``dalab.trainer.validate``
        calls it after its own checks, before any source model is trained or any folder is made.
        Default: the declared needs (``needs_batchnorm``). A method with a further need overrides
        it and calls ``super().check_run(cfg, hp)`` first."""
        if cls.batchnorm_needed(hp) and not BACKBONE_BATCHNORM.get(cfg.backbone, True):
            fits = [b for b, bn in BACKBONE_BATCHNORM.items()
                    if bn and BACKBONE_INPUT[b] == BACKBONE_INPUT[cfg.backbone]]
            raise Unsupported(f"method {cls.name!r} needs a backbone with BatchNorm ({cls.needs_batchnorm}), but "
                              f"{cfg.backbone!r} has none; use --backbone {' or '.join(fits)} (in a spec: backbone:)")

    def frozen(self) -> list[str]:
        """The names (as in ``state_dict()``) of the weights and statistics this method, once built,
        never changes: its frozen parameters and the BatchNorm statistics it keeps. Not frozen: a
        part without gradients that another rule moves (an EMA teacher, a snapshot taken at a refresh).
        tests/test_methods.py checks every declared name bitwise after updates and the end hook.
        Default: none. A method that freezes parts returns ``self.frozen_names(module, ...)``."""
        return []

    def frozen_names(self, *modules: nn.Module, statistics: bool = True, but: Iterable[nn.Module] = ()) -> list[str]:
        """The ``state_dict()`` names of the parameters of ``modules`` and, with ``statistics``, of
        their buffers (BatchNorm statistics), leaving out those of the submodules ``but`` (parts
        trained inside a frozen module): what :meth:`frozen` returns."""
        keep = {id(t) for m in modules for t in (*m.parameters(), *(m.buffers() if statistics else ()))}
        keep -= {id(t) for m in but for t in (*m.parameters(), *m.buffers())}
        return [k for k, v in self.state_dict(keep_vars=True).items() if id(v) in keep]

    def __init__(self, net: nn.Module, num_classes: int, hp: Mapping[str, Any], total_steps: int,
                 num_sources: int = 1):
        super().__init__()
        self.net = net                  # a dalab.methods.nets.Classifier: backbone + head
        self.num_classes = num_classes
        self.num_sources = int(num_sources)  # k source domains (Batch.d_src is in 0..k-1); known in build()
        self.hp = SimpleNamespace(**hp)
        self.total_steps = max(int(total_steps), 1)
        # extra objective terms from the run's data options (dalab.augment: cross mixup, VAT); the
        # trainer sets them, step() adds them to the first loss in each training step that updates the backbone
        self.extra_terms: list = []
        self.precision = "fp32"  # "bf16": the backbone runs under bf16 autocast (see features())
        # per-domain input standardisation (mean, std per channel of [0, 1] pixels), set by the trainer;
        # methods that augment their batches themselves (dalab.augment.InputViews) undo and redo it
        self.input_stats: dict[str, tuple[list[float], list[float]]] = {
            "source": ([0.5] * 3, [0.5] * 3), "target": ([0.5] * 3, [0.5] * 3)}
        self._batch: Batch | None = None
        self._extra_logs: dict[str, Tensor] = {}
        # (source, target) features of this training step's batch, recorded by features_cat for
        # the terms that read them (BSP); cleared after every step
        self.step_features: tuple[Tensor, Tensor] | None = None
        self._extra_added = False
        self._backbone_opts: set[str] | None = None  # optimizers that update the backbone (computed once)
        self.build()
        from dalab.optim import Optimization
        self.optim = Optimization(self.optimizers(), self.hp, self.total_steps, self.parameters())

    # -- hooks for subclasses
    def build(self) -> None:
        """Create method-specific modules (discriminators, teachers, ...) here; runs before the
        optimizers are built. With ``init_from_source`` the network already holds the
        source-pretrained weights here."""

    def param_groups(self) -> list[dict]:
        """Parameter groups with their lr multipliers: the backbone at ``backbone_lr_mult``,
        everything else (head, discriminators, ...) at 1."""
        backbone = [p for p in self.net.backbone.parameters() if p.requires_grad]
        ids = {id(p) for p in self.net.backbone.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": backbone, "lr_mult": self.hp.backbone_lr_mult},
                  {"params": rest, "lr_mult": 1.0}]
        return [g for g in groups if g["params"]]

    def optimizers(self) -> dict[str, list[dict]]:
        """Named optimizers, each a list of parameter groups ``{"params": [...], "lr_mult": m}``.
        The trainer builds one optimizer per name (SGD/Adam from the shared hyperparameters) and
        sets every LR once per step from the schedule. Default: one optimizer, ``"main"``, over
        :meth:`param_groups`. A method with several (``{"G": ..., "C": ..., "D": ...}``) steps each by
        name: ``self.step(loss, "D")``."""
        return {"main": self.param_groups()}

    def update(self, batch: Batch, step: int) -> dict[str, Tensor | float]:
        """One training step: compute the losses, call :meth:`step` on each (one or more times, with
        named optimizers), return scalars to log."""
        raise NotImplementedError

    # optional hooks the trainer calls
    uses_source: ClassVar[bool] = True   # False: source-free adaptation, batches carry no source data
    # True: a test-time method (methods/test_time.py): it adapts on a stream of target batches, each
    # predicted before the method adapts on it (dalab.streams, dalab.trainer.StreamLoop)
    test_time: ClassVar[bool] = False
    # True: predictions depend on the batch (BatchNorm with the test batch's statistics): every
    # evaluation draws its batches in a seeded random order (dalab.evaluation.forward_split)
    batch_statistics: ClassVar[bool] = False
    # refresh(): every K steps (an int), once per pass over target train ("epoch"), or never (None)
    refresh_every: ClassVar[int | str | None] = None

    def on_train_start(self, x_tgt: Iterable[Tensor] | None) -> None:
        """Called once before the first step (phase change into adaptation), with re-iterable
        batches of target train inputs (``None`` unless declared). Default: nothing."""

    def refresh(self, x_tgt: Iterable[Tensor], step: int) -> None:
        """Called before step ``step`` every ``refresh_every`` steps (first before step 1) with
        re-iterable batches of unlabeled target train inputs: pseudo-labels, clustering, memory banks.
        State kept here must live in buffers or ``get_extra_state`` so checkpoints keep it."""

    def after_step(self, step: int) -> None:
        """Called after every training step (e.g. an EMA teacher update). Default: nothing."""

    def on_train_end(self, x_tgt: Iterable[Tensor] | None,
                     labeled: Iterable[tuple[Tensor, Tensor]] | None) -> None:
        """Called once after the last update, before the final evaluation, with re-iterable batches
        of target train inputs (``None`` unless the method declares unlabeled target data) and of
        the labeled budget (``None`` unless declared and the budget gives labels). For adaptation
        that happens after training (AdaBN statistics, a closed-form probe). Default: nothing."""

    @contextmanager
    def deployed(self, x_tgt: Iterable[Tensor] | None):
        """The model as it would be deployed at an evaluation point, for the duration of that
        evaluation: every checkpoint is scored as the network its rule would hand over (e.g. with
        AdaBN's target statistics), so the evaluation points of a run are comparable. Whatever it
        changes is restored on exit, so training continues unaffected. Default: the model as is."""
        yield

    # -- what the trainer and validators call
    def predict(self, x: Tensor) -> Tensor:
        return self.net.head(self.features(x))

    def features(self, x: Tensor) -> Tensor:
        """Backbone output, always float32. With ``precision = "bf16"`` (set by the trainer) the
        backbone -- nearly all of the compute -- runs under bf16 autocast; heads, discriminators and
        every loss run in float32 (no method has to care about low-precision corner cases)."""
        if self.precision == "bf16":
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                f = self.net.backbone(x)
            return f.float()
        return self.net.backbone(x)

    def features_cat(self, *xs: Tensor) -> Tensor:
        """Backbone features of several domains' batches, concatenated in order. ``bn_mode``
        (shared) decides how BatchNorm layers see them: ``joint`` -- one forward on the
        concatenation, statistics pooled over the domains; ``split`` -- one forward per batch,
        per-domain statistics (as pytorch-adapt's hooks). Without BatchNorm both are the same
        function. Every method that trains on several domains at once goes through here."""
        if self.hp.bn_mode == "split" and len(xs) > 1 and has_batchnorm(self.net.backbone):
            f = torch.cat([self.features(x) for x in xs])
        else:
            f = self.features(torch.cat(xs))
        b = self._batch
        if b is not None and self.step_features is None and len(xs) == 2 and xs[0] is b.x_src and xs[1] is b.x_tgt:
            self.step_features = (f[:len(xs[0])], f[len(xs[0]):])  # this step's source and target features
        return f

    def features_st(self, x_s: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`features_cat` of a source and a target batch, split back into (f_s, f_t)."""
        f = self.features_cat(x_s, x_t)
        return f[: len(x_s)], f[len(x_s):]

    @contextmanager
    def full_precision(self):
        """Inside: the backbone runs in float32 whatever the run's precision (e.g. VAT's tiny
        finite-difference perturbations, which bf16 would round away)."""
        saved, self.precision = self.precision, "fp32"
        try:
            yield
        finally:
            self.precision = saved

    # -- shared machinery
    def progress(self, step: int) -> float:
        """Training progress p in [0, 1] (the p of the DANN paper's schedules)."""
        return min(step / self.total_steps, 1.0)

    def train_step(self, batch: Batch, step: int) -> dict[str, Tensor | float]:
        """What the trainer calls once per step: set the LRs, :meth:`update` (the extra terms of the
        run's data options are added to the first loss it steps, and logged), :meth:`after_step`."""
        self._batch, self._extra_logs, self._extra_added = batch, {}, False
        self.optim.begin_step(step)
        try:
            out = self.update(batch, step)
        finally:
            self._batch, self.step_features = None, None
        self.after_step(step)
        return {**out, **self._extra_logs}

    def step(self, loss: Tensor, *names: str, retain_graph: bool = False) -> None:
        """Backward ``loss`` and step the named optimizers (default: all of them). The trainer's
        :class:`~dalab.optim.Optimization` does the work; the extra terms of the run's data options
        (cross mixup, VAT, BSP) join the first loss stepped in a training step that updates the backbone."""
        names = names or tuple(self.optim.optimizers)
        if self.extra_terms and self._batch is not None and not self._extra_added and self._steps_backbone(names):
            self._extra_added = True
            for term in self.extra_terms:
                extra, logs = term(self, self._batch)
                loss = loss + extra
                self._extra_logs.update(logs)
        self.optim.step(loss, names, retain_graph)

    def step_sharpness_aware(self, loss_at, rho: float, *names: str):
        """A sharpness-aware step (:meth:`dalab.optim.Optimization.sharpness_aware_step`) of the
        named optimizers (default: all): ``loss_at()`` is evaluated at the weights and at their
        worst neighbour within radius ``rho``. Returns the two losses. The run's extra terms (VAT,
        BSP) do not join it."""
        return self.optim.sharpness_aware_step(loss_at, names or tuple(self.optim.optimizers), rho)

    def _steps_backbone(self, names: tuple[str, ...]) -> bool:
        """Whether stepping these optimizers updates the backbone: the extra terms regularise the
        representation, so they join the first such loss (ADDA steps its discriminator first)."""
        if self._backbone_opts is None:
            backbone = {id(p) for p in self.net.backbone.parameters()}
            self._backbone_opts = {n for n, opt in self.optim.optimizers.items()
                                   if any(id(p) in backbone for g in opt.param_groups for p in g["params"])}
        return any(n in self._backbone_opts for n in names)

    @property
    def lr(self) -> float:
        return self.optim.lr

    def training_state(self) -> dict:
        """Everything needed to resume: weights and buffers (teachers, pseudo-labels, memory banks
        are modules or buffers, or a method's ``get_extra_state``), and every optimizer's state."""
        return {"model": self.state_dict(), "optimizers": self.optim.state_dict()}

    def load_training_state(self, state: dict) -> None:
        self.load_state_dict(state["model"])
        self.optim.load_state_dict(state["optimizers"])


class TargetRegularized(Method):
    """The shape shared by BNM, MCC, entropy minimisation and IM:

        loss = CE(C(G(x_s)), y_s) + trade_off * R(C(G(x_t)))

    with source and target through :meth:`Method.features_cat` (``bn_mode``). Subclasses declare ``trade_off`` and implement
    :meth:`target_loss` (R and the scalars to log); the update is written once, here."""

    target_data = TargetData.UNLABELED
    label_budgets = ("0",)

    def target_loss(self, logits_t: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """R(target logits), and the named terms to log."""
        raise NotImplementedError

    def update(self, batch: Batch, step: int):
        n = len(batch.x_src)
        logits = self.net.head(self.features_cat(batch.x_src, batch.x_tgt))
        cls_loss = F.cross_entropy(logits[:n], batch.y_src)
        transfer_loss, logs = self.target_loss(logits[n:])
        loss = cls_loss + self.hp.trade_off * transfer_loss
        self.step(loss)
        return {"loss": loss, "cls_loss": cls_loss, **logs}
