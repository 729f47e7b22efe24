"""The one training loop every method runs in, as six named stages.

The trainer owns validation of the run config, data (on-device tensor splits, infinite shuffled
iterators), the typed :class:`~dalab.methods.base.Batch` (with only the target data the method
declared and the label budget allows), device, step budget, evaluation on every split every
``eval_every`` steps (:mod:`dalab.evaluation`), TensorBoard scalars, the progress bar, and the
JSON run record. The method owns its losses and its optimizer step (``Method.update``).

A run (:func:`train`) is these stages, in this order, each with one job:

1. :func:`validate` -- resolve and check the config (method, domains, backbone, label budget,
   hyperparameters, and the method's own :meth:`~dalab.methods.base.Method.check_run`); nothing
   is loaded, trained or written before it passes.
2. :func:`load_task` -> :class:`Task` -- the task's data: both domains' splits on the device, the
   labeled target subset of the label budget, standardisation and augmentation.
3. :func:`build_method` -> :class:`Built` -- the network (from the source model when the method
   starts from one), the method, precision, memory layout, DDP, the weight average.
4. :func:`build_streams` -> :class:`Streams` -- the infinite training batches the method declared
   (source, unlabeled target, labeled target), one generator each.
5. :class:`Loop` -- step, log, evaluate, checkpoint, stop, resume; its :class:`History` is what a
   checkpoint saves and the record reports, its :class:`Guard` decides when a run ends early
   (divergence, a stop signal).
6. :func:`finish` -- the end hook, the final evaluation; :func:`write_results` -- the record and
   the model.

Where a new setting plugs in:

- **the task's data** (several source domains, a label-set shift, a test-time stream):
  :func:`load_task` and :class:`Task` (its ``eval_splits`` are what every evaluation point scores);
- **the sampler** (class-balanced, shuffled or ordered streams): :func:`build_streams` (which
  iterators exist, and how each split is sampled) and :meth:`Streams.batch` (what one step sees);
- **the loop's order of predict and update** (test-time adaptation predicts each batch before it
  updates on it): :meth:`Loop.step`, one training step and everything that follows it;
- **what an evaluation point measures**: :mod:`dalab.evaluation` (metrics and validator registries).

A run writes ``<runs_dir>/<run_id>/``: ``record.json`` (written atomically), ``tb/`` (TensorBoard
events) and, last, a ``done`` marker.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import platform
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from dalab import runs
from dalab.evaluation import evaluate
from dalab.record import DataInfo, MethodInfo, Provenance, RunRecord, TrainStats
from dalab.runs import RECORD_VERSION, Interrupted, RunConfig, RunOptions  # noqa: F401 -- re-exported
from dalab.utils import DalabError, Unsupported, git_commit, package_versions, seed_everything

if TYPE_CHECKING:
    from dalab.methods.base import Batch


PRECISIONS = ("auto", "fp32", "bf16")
SEED_BOUND = 2 ** 31  # seeds are < 2**31: the data streams seed generators with seed * 1000 + i


def resolve_precision(precision: str, dev: torch.device) -> str:
    """``auto`` -> ``bf16`` where the device computes it natively, else ``fp32``: the one rule,
    :func:`dalab.utils.resolve_precision`, which run ids read too (an id names what was computed)."""
    from dalab.utils import resolve_precision as resolve

    return resolve(precision, str(dev))


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DalabError(f"--device {device} requested but CUDA is not available; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise DalabError(f"bad --device {device!r}; use auto, cpu, cuda or cuda:N") from None


# --------------------------------------------------------------------------- 1. resolve and validate

@dataclass
class Prepared:
    """A validated run: resolved hyperparameters and the method class."""

    cfg: RunConfig
    method_cls: type
    hp: dict[str, Any]
    budget: int | None


def validate(cfg: RunConfig) -> Prepared:
    """Check a config before any data is built or anything is written; DalabError if it is bad.
    Last, the method checks the run against what it needs (``Method.check_run``: e.g. a backbone
    with BatchNorm), so a run it cannot do fails here, before any source model is trained."""
    from dalab.datasets.base import parse_budget
    from dalab.methods import get_method, resolve_hparams
    from dalab.methods.base import budget_kind

    method_cls = get_method(cfg.method)
    _check_domains_and_backbone(cfg)
    budget = parse_budget(cfg.budget)
    if budget_kind(budget) not in method_cls.label_budgets:
        raise Unsupported(f"method {cfg.method!r} does not support target-label budget {cfg.budget!r} "
                          f"(it supports {', '.join(method_cls.label_budgets)}; 'k' = labels per class)")
    if cfg.precision not in PRECISIONS:
        raise DalabError(f"precision={cfg.precision!r} is not one of {', '.join(PRECISIONS)}")
    for name, v, lo in (("steps", cfg.steps, 1), ("eval_every", cfg.eval_every, 1), ("seed", cfg.seed, 0),
                        ("split_seed", cfg.split_seed, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise DalabError(f"{name}={v!r} must be an integer >= {lo}")
    for name, v in (("seed", cfg.seed), ("split_seed", cfg.split_seed)):
        if v >= SEED_BOUND:
            raise DalabError(f"{name}={v} is too large: use 0 <= {name} < 2**31 ({SEED_BOUND})")
    hp = resolve_hparams(method_cls, cfg.hparams)
    src_hp = cfg.source_run_hparams(hp)
    if src_hp is not None:  # the source model's overrides must be valid too
        resolve_hparams(get_method("source_only"), src_hp)
    _check_data_options(cfg, method_cls, hp)
    _check_sources(cfg, method_cls, hp)
    _check_label_set(cfg, method_cls, budget)
    method_cls.check_run(cfg, hp)
    return Prepared(cfg, method_cls, hp, budget)


def _check_label_set(cfg: RunConfig, method_cls: type, budget: int | None) -> None:
    """The task's label set parses, the method runs on its setting, and no target label of an
    unknown class could reach the method (no labeled target budget where the target has them)."""
    from dalab.methods import METHODS

    ls = cfg.label_set()
    setting = ls.setting if ls else "closed"
    if setting not in method_cls.settings:
        fits = [n for n, c in METHODS.items() if setting in c.settings and c.family != "baseline"][:6]
        raise Unsupported(f"method {cfg.method!r} runs on {'/'.join(method_cls.settings)} tasks, not {setting}; "
                          f"use another setting (--setting / --classes) or a method for {setting} tasks: {', '.join(fits)}")
    if ls is not None and ls.has_unknown and budget != 0:
        raise Unsupported(f"target-label budget {cfg.budget!r} on a {setting} task would hand the method labels of "
                          f"unknown classes; use --budget 0 (labeled target data is supported on closed and partial tasks)")


def _check_sources(cfg: RunConfig, method_cls: type, hp: dict[str, Any]) -> None:
    """The task has as many source domains as the method needs, and a domain-generalization
    method is given nothing that would hand it target data."""
    from dalab.methods.base import TargetData

    k = len(cfg.sources)
    if k < method_cls.min_sources:
        raise Unsupported(f"method {cfg.method!r} needs at least {method_cls.min_sources} source domains (it reads "
                          f"each sample's source domain) but this task has {k}; give several with --sources a,b "
                          f"(a spec: a list as a pair's source, or leave_one_out:)")
    if method_cls.domain_generalization:
        if method_cls.target_data is not TargetData.NONE or method_cls.refresh_every is not None:
            raise DalabError(f"method {cfg.method!r} declares domain generalization but asks for target data; "
                             f"a DG method's target_data must be none (methods/{cfg.method}.py)")
        if hp["vat"] > 0:
            raise Unsupported(f"method {cfg.method!r} is a domain-generalization method: it sees no target data, so "
                              f"vat={hp['vat']} (a term on target inputs) cannot apply; use vat=0")


def _check_domains_and_backbone(cfg: RunConfig) -> None:
    """The domains exist, the target is not a source, and the backbone exists and takes their images."""
    from dalab.datasets.base import get_domain
    from dalab.methods.nets import BACKBONE_INPUT, BACKBONE_MIN_SIZE
    from dalab.tasks import check_sources

    domains = [get_domain(name) for name in check_sources(cfg.source, cfg.target)] + [get_domain(cfg.target)]
    if cfg.source == cfg.target:
        raise DalabError(f"source and target are the same domain {cfg.source!r}: that is not domain adaptation; "
                         f"pick another --target (in-domain accuracy is every record's src_val, or "
                         f"--method target_only --budget all)")
    if cfg.backbone not in BACKBONE_INPUT:
        raise DalabError(f"unknown backbone {cfg.backbone!r}; choose one of {', '.join(BACKBONE_INPUT)}")
    need = BACKBONE_INPUT[cfg.backbone]
    for d in domains:
        if need is not None and d.image_size != need:
            fits = [b for b, n in BACKBONE_INPUT.items() if n in (None, d.image_size)]
            raise DalabError(f"backbone {cfg.backbone!r} takes {need}x{need} images but domain {d.name!r} gives "
                             f"{d.image_size}x{d.image_size}; use a backbone that fits: {', '.join(fits)} "
                             f"(--backbone, or a spec's backbone:)")
        if d.image_size < BACKBONE_MIN_SIZE.get(cfg.backbone, 0):
            _warn_small_input(cfg.backbone, d.name, d.image_size)


@functools.cache  # once per process: a grid validates every run
def _warn_small_input(backbone: str, domain: str, size: int) -> None:
    from dalab.methods.nets import BACKBONE_MIN_SIZE

    runs.warn(f"backbone {backbone!r} is made for images of at least {BACKBONE_MIN_SIZE[backbone]}x"
              f"{BACKBONE_MIN_SIZE[backbone]}; on {domain!r}'s {size}x{size} its last feature map is 1x1 and it costs "
              f"a ResNet's compute for a digit (about 0.1 steps/s on 2 CPU cores): lenet_bn is the digits backbone")


def _check_data_options(cfg: RunConfig, method_cls: type, hp: dict[str, Any]) -> None:
    """The run's data options (mixup, BSP) fit the data the method sees."""
    from dalab.methods.base import TargetData

    if hp["mixup"] == "cross" and method_cls.target_data not in (TargetData.UNLABELED, TargetData.BOTH):
        raise Unsupported(f"mixup=cross mixes source with unlabeled target inputs, but method {cfg.method!r} "
                          f"uses no unlabeled target data; use mixup=source, or a method that adapts (e.g. dann)")
    if not method_cls.uses_source and hp["mixup"] != "none":
        raise Unsupported(f"method {cfg.method!r} is source-free (its adaptation sees no source data), so "
                          f"mixup={hp['mixup']} cannot apply; use mixup=none")
    if hp["bsp"] > 0 and (not method_cls.uses_source
                          or method_cls.target_data not in (TargetData.UNLABELED, TargetData.BOTH)):
        raise Unsupported(f"bsp penalises source and target features together, but method {cfg.method!r} does not "
                          f"see both (source-free, or no unlabeled target data); use bsp=0, or a method that "
                          f"adapts with both (e.g. dann)")


@dataclass
class Run:
    """How and where one validated run executes: its options, device, process role and folder."""

    prep: Prepared
    o: RunOptions
    runs_dir: Path
    run_dir: Path
    dev: torch.device
    ddp: Any  # a dalab.distributed.Dist under torchrun (one of several ranks), else None

    @property
    def cfg(self) -> RunConfig:
        return self.prep.cfg

    @property
    def hp(self) -> dict[str, Any]:
        return self.prep.hp

    @property
    def main(self) -> bool:
        """Rank 0 (or the only process): it alone evaluates and writes."""
        return self.ddp is None or self.ddp.is_main


def start_run(cfg: RunConfig, runs_dir: Path, run_dir: Path, o: RunOptions) -> Run:
    """Stage 1: validate the config, pick the device and this process's role."""
    from dalab import distributed

    prep = validate(cfg)
    ddp = distributed.context()  # torchrun: one of several ranks of this run (dalab.distributed)
    dev = ddp.device if ddp else pick_device(o.device)
    set_determinism(o.deterministic, dev)
    return Run(prep, o, runs_dir, run_dir, dev, ddp)


# --------------------------------------------------------------------------- 2. the task's data

@dataclass
class Task:
    """The task's data: both domains on the device, the labeled target subset of the label budget
    (indices into target train), and the data options applied (the record's ``data.options``)."""

    src: Any  # dalab.datasets.base.DomainSplits (restricted and relabeled to the label set's classes)
    tgt: Any
    lab_idx: np.ndarray
    options: dict[str, Any]
    label_set: Any = None  # a dalab.tasks.LabelSet, or None (closed-set over all classes)
    # a multi-source task's source domains (restricted like ``src``, in source order); ``src`` is then
    # their concatenation (the pooled source: src_val, standardisation, the record). None: one source
    sources: list[Any] | None = None
    # a test-time run's stream: (domain name, its train split) in stream order, the task's target first
    stream: list[tuple[str, Any]] | None = None

    def source_parts(self) -> list[Any]:
        """The per-domain parts of the pooled source train split (subsets of ``src.train``, so they
        carry its standardisation and memory layout), in source order: what the balanced sampler draws."""
        bounds = np.cumsum([0] + [len(d.train) for d in self.sources])
        return [self.src.train.subset(np.arange(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]

    @property
    def num_classes(self) -> int:
        """K: the classes the model predicts, the source's (kept to the label set's source classes by
        :func:`load_task`); a target label K is "unknown"."""
        return self.src.num_classes

    def eval_splits(self) -> dict[str, Any]:
        """What every evaluation point scores (:func:`dalab.evaluation.evaluate`)."""
        return {"src_val": self.src.val, "tgt_val": self.tgt.val, "tgt_test": self.tgt.test,
                "tgt_train": self.tgt.train}


def load_task(run: Run) -> Task:
    """Stage 2: load both domains (the split is fixed by ``split_seed``), check they share their
    classes, keep each side's classes of the task's label set (relabeled: :mod:`dalab.tasks`),
    apply standardisation and resolve augmentation, and pick the label budget's samples."""
    from dalab.datasets.base import (check_same_classes, concat_domains, labeled_indices, load_domain,
                                     restrict_classes)

    cfg, o = run.cfg, run.o
    srcs = [load_domain(name, cfg.split_seed, run.dev, root=o.data_root) for name in cfg.sources]
    tgt = load_domain(cfg.target, cfg.split_seed, run.dev, root=o.data_root)
    for src in srcs:
        check_same_classes(src, tgt)
    ls = cfg.label_set()
    if ls is not None:
        ls.check(tgt.classes)
        srcs = [restrict_classes(src, ls.source_lut(src.num_classes)) for src in srcs]
        tgt = restrict_classes(tgt, ls.target_lut(tgt.num_classes), unknown_label=ls.num_known)
    sources = srcs if len(srcs) > 1 else None
    src = concat_domains(cfg.source, srcs) if sources else srcs[0]
    domains = {"source": src, "target": tgt}
    stream = None
    if run.prep.method_cls.test_time:  # the stream's further target domains (continual TTA)
        stream = _stream_domains(run, tgt)
        domains.update({f"stream {name}": dom for name, dom in stream[1:]})
    options = set_up_data_options(run.hp, domains)
    lab_idx = labeled_indices(tgt.train.labels.cpu().numpy(), cfg.budget, cfg.split_seed)
    runs.check_stop()  # a stop asked for while the data loaded: nothing to save yet
    return Task(src, tgt, lab_idx, options, ls,
                stream=[(name, dom.train) for name, dom in stream] if stream is not None else None, sources=sources)


def _stream_domains(run: Run, tgt) -> list[tuple[str, Any]]:
    """A test-time run's stream domains, loaded (the task's target first, already loaded), each with
    the target's classes and at least one stream batch of samples."""
    from dalab.datasets.base import check_same_classes, load_domain
    from dalab.streams import StreamOptions

    opts = StreamOptions.of(run.hp, run.cfg.target)
    out = [(opts.domains[0], tgt)]
    for name in opts.domains[1:]:
        dom = load_domain(name, run.cfg.split_seed, run.dev, root=run.o.data_root)
        check_same_classes(tgt, dom)
        out.append((name, dom))
    for name, dom in out:
        if opts.batch_size > len(dom.train):
            raise DalabError(f"batch_size={opts.batch_size} is larger than the stream's {name!r} target set "
                             f"({len(dom.train)} samples); use --set batch_size=N with N <= {len(dom.train)}")
    return out


def set_up_data_options(hp: dict, domains) -> dict[str, Any]:
    """Apply the run's ``standardize`` to every split of each domain and resolve ``augment``;
    returns what was applied, for the run record. Image-folder domains are normalised by their
    transforms (ImageNet statistics), so only ``auto``/``imagenet`` are valid for them."""
    from dalab.augment import standardization
    from dalab.datasets.base import TensorSplit

    out: dict[str, Any] = {}
    for role, dom in domains.items():
        tensor = isinstance(dom.train, TensorSplit)
        if tensor:
            mean, std = standardization(hp["standardize"], dom.train.images)
            for split in dom.splits():
                split.set_standardization(mean, std)
        elif hp["standardize"] in ("fixed", "domain"):
            raise DalabError(f"standardize={hp['standardize']} is for tensor (digits) domains; {dom.name!r} is an "
                             f"image-folder domain normalised with ImageNet statistics: use standardize=auto or imagenet")
        else:
            mean, std = standardization("imagenet", None)
        augment = hp["augment"] if hp["augment"] != "auto" else ("none" if tensor else "light")
        out[role] = {"standardize": hp["standardize"], "mean": [round(v, 5) for v in mean],
                     "std": [round(v, 5) for v in std], "augment": augment}
    return out


def input_stats(dom) -> tuple[list[float], list[float]]:
    """(mean, std) a domain's model inputs are standardised with (tensor splits: the run's
    ``standardize``; image folders: ImageNet's)."""
    from dalab.augment import standardization

    train = dom.train
    return (train.mean, train.std) if hasattr(train, "mean") else standardization("imagenet", None)


# --------------------------------------------------------------------------- 3. the method

@dataclass
class Built:
    """The method as it trains, and how it was set up (for the record)."""

    method: Any  # a dalab.methods.base.Method
    average: Any  # a dalab.optim.WeightAverage (weight_ema > 0), else None
    precision: str
    channels_last: bool
    init_from: str | None  # run id of the source model it started from
    source_key: dict | None  # that source run's configuration


def build_method(run: Run, task: Task) -> Built:
    """Stage 3: the network (loaded from the source model when the method starts from one), the
    method around it, its precision, memory layout, DDP wrapping and weight average."""
    from dalab.augment import extra_terms
    from dalab.methods.nets import build_classifier
    from dalab.optim import WeightAverage

    cfg, hp, o, dev = run.cfg, run.hp, run.o, run.dev
    init_state, init_from, source_key = _source_model(run)  # before seeding: a cache hit or miss changes nothing
    seed_everything(cfg.seed)
    net = build_classifier(cfg.backbone, task.num_classes, cfg.pretrained)
    if init_from:
        net.load_state_dict(init_state)
    method = run.prep.method_cls(net, task.num_classes, hp, cfg.steps,
                                 num_sources=len(task.sources or [task.src])).to(dev)
    method.train()
    method.extra_terms = extra_terms(hp, task.num_classes)
    precision = resolve_precision(cfg.precision, dev)
    method.precision = precision
    method.input_stats = {role: input_stats(dom) for role, dom in (("source", task.src), ("target", task.tgt))}
    if run.ddp:  # SyncBatchNorm, rank 0's weights everywhere, gradient averaging in every optimizer step
        run.ddp.prepare(method, hp["batch_size"])
    channels_last = o.channels_last and any(isinstance(m, torch.nn.Conv2d) for m in net.backbone.modules())
    if channels_last:
        method.to(memory_format=torch.channels_last)
        for split in (*task.src.splits(), *task.tgt.splits()):
            split.memory_format = torch.channels_last
    if o.compile:
        net.backbone.compile()
    # weight_ema > 0: the run evaluates and hands over the average of its weights (after the layout change)
    average = WeightAverage(method, hp["weight_ema"]) if hp["weight_ema"] > 0 else None
    return Built(method, average, precision, channels_last, init_from, source_key)


def _source_model(run: Run) -> tuple[dict | None, str | None, dict | None]:
    """(weights, run id, config) of the source model the method starts from, trained first when
    it is not in the runs dir (dalab.pretrain); all None when the method starts from scratch."""
    if not run.prep.method_cls.starts_from_source(run.hp):
        return None, None, None
    from dalab import distributed
    from dalab.pretrain import source_config, source_pretrained

    if run.ddp:
        distributed.require_source_run(run.cfg, run.runs_dir)
    init_state, init_from = source_pretrained(run.cfg, run.runs_dir, run.o, train_fn=train)
    runs.check_stop()
    return init_state, init_from, source_config(run.cfg).key()


# --------------------------------------------------------------------------- 4. the data streams

@dataclass
class Streams:
    """The training batches of a run: infinite iterators of (inputs, labels), ``None`` where the
    method (or the label budget) gives it no such data."""

    src: Iterator | None
    tgt: Iterator | None
    lab: Iterator | None
    mixup: Callable | None  # source mixup of (x, y), or None
    vat_only: bool  # unlabeled target inputs drawn only for VAT (the method declares none)
    # no target data in any batch, ever (a domain-generalization method, or any run that declares
    # none): build_streams makes no target stream and batch() asserts the batch holds none
    target_free: bool = False

    def batch(self) -> Batch:
        """One step's :class:`~dalab.methods.base.Batch`: only the data the method declared (on a
        multi-source task the source part is per-domain balanced, with each sample's domain)."""
        from dalab.methods.base import Batch

        xs = ys = ds = None
        if self.src is not None:
            xs, ys, *rest = next(self.src)
            ds = rest[0] if rest else None
            if self.mixup is not None:
                xs, ys = self.mixup(xs, ys)
        batch = Batch(xs, ys, d_src=ds)
        if self.tgt is not None:
            batch.x_tgt = next(self.tgt)[0]           # labels dropped: unsupervised use
        if self.lab is not None:
            batch.x_tgt_lab, batch.y_tgt_lab = next(self.lab)
        if self.target_free and not (batch.x_tgt is None and batch.x_tgt_lab is None and batch.y_tgt_lab is None):
            raise AssertionError("trainer bug: a target-free run's batch holds target data")
        return batch

    def skip(self, steps: int) -> None:
        """Replay the streams to where they were after ``steps`` steps (indexing only: resume)."""
        for _ in range(steps):
            for it in (self.src, self.tgt, self.lab):
                if it is not None:
                    next(it)


def build_streams(run: Run, task: Task) -> Streams:
    """Stage 4: one shuffled stream per kind of data the method declared, each with its own
    generator, so adding a stream never changes another's order."""
    from dalab.augment import mixup_source
    from dalab.methods.base import TargetData

    cfg, hp, cls = run.cfg, run.hp, run.prep.method_cls
    bs = hp["batch_size"]
    gens = [torch.Generator().manual_seed(cfg.seed * 1000 + i) for i in range(3)]
    aug_s, aug_t = task.options["source"]["augment"], task.options["target"]["augment"]
    # several processes (torchrun): every rank draws the same global batch and keeps its slice
    sample = run.ddp.sampler if run.ddp else (lambda split, *a: split.sampler(*a))
    # a source-free method's adaptation phase is given no source data at all
    src = None
    if cls.uses_source and task.sources is None:
        src = sample(task.src.train, bs, gens[0], aug_s)
    elif cls.uses_source:  # per-domain balanced: each domain its own generator (seeded after the three above)
        src = _balanced([sample(part, bs, torch.Generator().manual_seed(cfg.seed * 1000 + 3 + d), aug_s)
                         for d, part in enumerate(task.source_parts())])
    unlabeled = cls.target_data in (TargetData.UNLABELED, TargetData.BOTH)
    # VAT regularises on target inputs: with a method that declares none, the run uses them for it
    vat_only = hp["vat"] > 0 and not unlabeled
    tgt = sample(task.tgt.train, bs, gens[1], aug_t) if unlabeled or vat_only else None
    lab = None
    if cls.target_data in (TargetData.LABELED, TargetData.BOTH) and len(task.lab_idx):
        lab = sample(task.tgt.train.subset(task.lab_idx), bs, gens[2], aug_t)
    mixup = (functools.partial(mixup_source, num_classes=task.num_classes, alpha=hp["mixup_alpha"])
             if hp["mixup"] == "source" else None)
    target_free = cls.domain_generalization or (cls.target_data is TargetData.NONE and not vat_only)
    if target_free and (tgt is not None or lab is not None):
        raise AssertionError(f"trainer bug: a target stream for {cfg.method!r}, which must see no target data")
    return Streams(src, tgt, lab, mixup, vat_only, target_free)


def _balanced(streams: list[Iterator]) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per-domain balanced source batches: one batch from each domain's stream, concatenated in
    source order, with each sample's domain index (``Batch.d_src``)."""
    while True:
        parts = [next(s) for s in streams]
        yield (torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]),
               torch.cat([torch.full((len(y),), d, dtype=torch.long, device=y.device) for d, (_, y) in enumerate(parts)]))


# --------------------------------------------------------------------------- 5. the loop

class Outputs:
    """What rank 0 shows and logs while training: the run folder, TensorBoard scalars, the
    progress bar (either may be off). Other ranks get one that does nothing."""

    def __init__(self, run: Run):
        self.writer = self.bar = None
        if not run.main:
            return
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "done").unlink(missing_ok=True)
        if run.o.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run.run_dir / "tb"),  # a killed attempt's later steps hidden
                                        purge_step=runs.tensorboard_purge_step(run.run_dir, run.o.resume))
        if run.o.progress:
            from tqdm import tqdm
            cfg = run.cfg
            self.bar = tqdm(total=cfg.steps, desc=f"{cfg.method} {cfg.source}->{cfg.target} s{cfg.seed}",
                            leave=False, dynamic_ncols=True)

    def losses(self, step: int, losses: dict[str, float]) -> None:
        if self.writer:
            for k, v in losses.items():
                self.writer.add_scalar(f"train/{k}", v, step)
        if self.bar:
            self.bar.set_postfix(loss=f"{losses.get('loss', float('nan')):.3f}")

    def evaluation(self, ev: dict[str, Any]) -> None:
        if self.writer:
            from dalab.evaluation import display_scalars
            for tag, v in display_scalars(ev).items():  # percent, as the tables; entropy with its sign
                self.writer.add_scalar(tag, v, ev["step"])

    def advance(self, steps: int = 1) -> None:
        if self.bar:
            self.bar.update(steps)

    def close(self) -> None:
        for closing in (self.writer, self.bar):
            if closing:
                closing.close()


@dataclass
class History:
    """What the loop has done so far -- evaluation points, last logged losses, times, outcome: what
    a checkpoint saves and the record reports."""

    evals: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    last_losses: dict[str, float] = dataclasses.field(default_factory=dict)
    train_time: float = 0.0
    eval_time: float = 0.0
    status: str = "done"                 # or "diverged"
    diverged_at: int | None = None
    resumed_from: int | None = None      # the checkpoint's step, when the run was resumed


class Guard:
    """When a run must end early: a non-finite loss or weights (divergence), or a stop request.
    On CPU the loss is checked every step (no cost); on CUDA (and across DDP ranks) the first
    non-finite step is kept in an on-device flag (0 = none), read at sync points only."""

    def __init__(self, run: Run):
        self.ddp = run.ddp
        per_step = _sync_every_step(run.dev) and run.ddp is None
        self.first_bad = None if per_step else torch.zeros((), dtype=torch.long, device=run.dev)

    def step_ok(self, out: dict, step: int) -> bool:
        """After a step: False if its losses are not finite (checked on the host), else True (or
        the flag updated, to be read at the next sync point)."""
        finite = _all_finite(out)
        if self.first_bad is None or not torch.is_tensor(finite):
            return bool(finite) or self.ddp is not None
        self.first_bad = torch.where(finite | (self.first_bad > 0), self.first_bad, step)
        return True

    def at_sync_point(self, step: int, method, evaluate_now: bool, stop: bool) -> tuple[int, bool]:
        """(first diverged step or 0, whether to stop now): the flag read (the loop's only host sync
        on CUDA), weights checked before an evaluation (a NaN model is never evaluated); under DDP
        every rank decides together: divergence or a stop on any rank stops all."""
        bad = int(self.first_bad) if self.first_bad is not None else 0
        stopping = stop
        if self.ddp:
            agreed = self.ddp.average_scalars({"bad": float(bad > 0), "stop": float(stop)})
            bad = bad or (step if agreed["bad"] > 0 else 0)
            stopping = agreed["stop"] > 0
        if not bad and evaluate_now and not _params_finite(method):
            bad = step
        return bad, stopping


class Loop:
    """Stage 5: step, log, evaluate, checkpoint, stop. :meth:`run` goes from the first (or the
    resumed) step to the budget; :meth:`step` is one training step and everything after it."""

    def __init__(self, run: Run, task: Task, built: Built, streams: Streams):
        self.run_, self.task, self.streams = run, task, streams
        self.method, self.average = built.method, built.average
        self.out, self.guard, self.history = Outputs(run), Guard(run), History()
        self.t0 = time.perf_counter()
        # re-iterable target-train inputs for the method's hooks, only if it declared unlabeled target data
        self.tgt_inputs = _Inputs(task.tgt.train) if streams.tgt is not None else None
        self.refresh = refresh_period(run.prep.method_cls.refresh_every, len(task.tgt.train), run.hp["batch_size"])
        self.steps = run.cfg.steps  # the run's last step (a stream run: its number of batches)

    def run(self) -> None:
        """Train to the step budget (from the checkpoint, when resuming one); ends early on
        divergence (``history.status``) or, after writing a checkpoint, on a stop (Interrupted)."""
        done = resume(self) if self.run_.o.resume else 0
        if not done:
            self.method.on_train_start(self.tgt_inputs)
        for step in range(done + 1, self.run_.cfg.steps + 1):
            if not self.step(step):
                break

    def step(self, step: int) -> bool:
        """One training step, then its logging, evaluation and checkpoint; False once diverged."""
        run, h, last = self.run_, self.history, step == self.run_.cfg.steps
        t_step = time.perf_counter()
        if self.refresh and (step - 1) % self.refresh == 0:  # pseudo-labels, clusters, memory banks
            if self.streams.target_free:
                raise AssertionError("trainer bug: a refresh with target inputs in a target-free run")
            self.method.refresh(_Inputs(self.task.tgt.train), step)
        out = self.method.train_step(self.streams.batch(), step)
        if self.average is not None:
            self.average.update()
        h.train_time += time.perf_counter() - t_step
        if not self.guard.step_ok(out, step):
            return self._diverged(step, out)
        log = step % run.o.log_every == 0 or last
        evaluate_now = step % run.cfg.eval_every == 0 or last
        stop = runs.stop_requested() is not None and not last
        if log or evaluate_now or (stop and run.ddp is None):  # sync points (the same step on every rank)
            bad, stopping = self.guard.at_sync_point(step, self.method, evaluate_now, stop)
            if bad:
                return self._diverged(bad, out)
            if stopping:  # a signal asked us to stop: this step is complete, so its checkpoint resumes exactly
                self.checkpoint(step)
                self.out.close()
                raise Interrupted(runs.stop_requested() or int(signal.SIGTERM), step)
        if log:
            h.last_losses = self._floats(out)
            if run.ddp:  # the global batch's losses
                h.last_losses = run.ddp.average_scalars(h.last_losses)
            self.out.losses(step, h.last_losses)
        self.out.advance()
        if evaluate_now and not last and run.main:  # the last point is finish()'s, after the end hook
            self.evaluate(step)
        if run.o.checkpoint_every and step % run.o.checkpoint_every == 0 and not last:
            self.checkpoint(step)  # atomic: a crash leaves the previous checkpoint intact
        return True

    def _diverged(self, step: int, out: dict) -> bool:
        self.history.status, self.history.diverged_at = "diverged", step
        self.history.last_losses = self._floats(out)
        return False

    def _floats(self, out: dict) -> dict[str, float]:
        d = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()}
        d["lr"] = self.method.lr
        return d

    def evaluate(self, step: int) -> None:
        """Score the model at ``step`` (rank 0): the weight average swapped in before the last step
        (after it, the average is the network), as the method would deploy it (e.g. AdaBN)."""
        t_eval = time.perf_counter()
        averaged = (self.average.swapped_in() if self.average is not None and step < self.run_.cfg.steps
                    else nullcontext())
        with averaged, self.method.deployed(self.tgt_inputs):  # e.g. AdaBN's target statistics at every point
            ev = {"step": step, **evaluate(self.method, self.task.eval_splits(), self.task.label_set,
                                           self.run_.o.validators)}
        self.history.eval_time += time.perf_counter() - t_eval
        self.history.evals.append(ev)
        self.out.evaluation(ev)

    def checkpoint(self, step: int) -> None:
        """Everything needed to resume exactly after ``step`` (rank 0 writes it)."""
        if self.run_.main:
            h = self.history
            runs.save_checkpoint(self.run_.run_dir, {
                "step": step, "method": self.method.training_state(), "evals": h.evals,
                "last_losses": h.last_losses, "train_time": h.train_time, "eval_time": h.eval_time,
                "rng": _get_rng_state(), "average": self.average.state_dict() if self.average is not None else None})


class StreamLoop(Loop):
    """Stage 5 of a test-time run (:mod:`dalab.streams`): for each batch of the target stream, the
    method's prediction is recorded FIRST (eval mode, no gradient), then the method adapts on that
    batch (``adapt_steps`` training steps; the batch holds target inputs only, never a source
    sample or a label), then, on an episodic stream, it is reset to the source model. The online
    metrics over the whole stream (and per stream domain) join the final evaluation point as its
    ``online`` split: a TTA record's headline (:func:`dalab.tasks.score`). A stream run is short and
    not checkpointed: a stop ends it, and the next attempt starts the stream over."""

    def __init__(self, run: Run, task: Task, built: Built, streams: Streams):
        from dalab.streams import StreamOptions, length

        super().__init__(run, task, built, streams)
        self.opts = StreamOptions.of(run.hp, run.cfg.target)
        self.steps = length([len(split) for _, split in task.stream], self.opts)
        self.predicted: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (domain, predictions, labels)

    def run(self) -> None:
        from dalab import streams
        from dalab.methods.base import Batch

        run, h, method = self.run_, self.history, self.method
        method.on_train_start(self.tgt_inputs)  # the source model, remembered for resets
        for step, (domain, x, y) in enumerate(streams.batches(self.task.stream, self.opts, run.cfg.seed), 1):
            t_step = time.perf_counter()
            method.eval()
            with torch.no_grad():
                logits = method.stream_predict(x, step)
            method.train()
            self.predicted.append((domain, logits.argmax(1).cpu(), y.cpu()))
            for _ in range(self.opts.adapt_steps):
                batch = Batch(None, None, x_tgt=x)  # the trainer's guarantee: no source data, no label
                out = method.train_step(batch, step)
            if self.opts.reset == "episodic":
                method.reset()
            h.train_time += time.perf_counter() - t_step
            if not self.guard.step_ok(out, step):
                self._diverged(step, out)
                return
            if runs.stop_requested() is not None and step < self.steps:
                self.out.close()
                raise Interrupted(runs.stop_requested(), step)
            if step % run.o.log_every == 0 or step == self.steps:
                h.last_losses = self._floats(out)
                self.out.losses(step, h.last_losses)
            self.out.advance()

    def evaluate(self, step: int) -> None:
        """The final evaluation point, with the stream's online metrics (the ``online`` split)."""
        from dalab.evaluation import metrics_of

        super().evaluate(step)
        pred = torch.cat([p for _, p, _ in self.predicted]).numpy()
        labels = torch.cat([y for _, _, y in self.predicted]).numpy()
        domains = np.concatenate([[d] * len(p) for d, p, _ in self.predicted])
        ev = self.history.evals[-1]
        ev["online"] = {**metrics_of(labels, pred), "samples": int(len(labels)), "batches": len(self.predicted)}
        if len(self.opts.domains) > 1:
            ev["online_domains"] = {d: metrics_of(labels[domains == d], pred[domains == d]) for d in self.opts.domains}


def resume(loop: Loop) -> int:
    """Restore a loop from its run's checkpoint when there is a readable one (an unreadable one is
    moved aside): the step it was written after, or 0."""
    run, h = loop.run_, loop.history
    state = runs.load_checkpoint(run.run_dir, run.dev)
    if state is None:
        return 0
    loop.method.load_training_state(state["method"])
    if loop.average is not None:
        loop.average.load_state_dict(state["average"])  # written by every checkpoint of such a run
    h.evals, h.last_losses, h.train_time = state["evals"], state["last_losses"], state["train_time"]
    h.eval_time, h.resumed_from = state.get("eval_time", 0.0), state["step"]
    loop.streams.skip(state["step"])  # the data streams where they were
    _set_rng_state(state["rng"])
    if run.ddp:
        run.ddp.restore_cuda_rng(state["rng"])
    if run.main:
        print(f"resuming {run.cfg.run_id()} from its checkpoint at step {state['step']}", file=sys.stderr, flush=True)
    loop.out.advance(state["step"])
    return state["step"]


# --------------------------------------------------------------------------- 6. finish

def finish(run: Run, task: Task, built: Built, loop: Loop) -> None:
    """Stage 6, after the last step of a run that did not diverge: the end hook (post-training
    adaptation: AdaBN, probes) sees only the declared target data, then the final evaluation of
    the network the run hands over (the weight average, when there is one)."""
    if loop.history.status != "done":
        return
    if built.average is not None:
        built.average.apply()  # the averaged network is the one adapted, evaluated and saved
    labeled = _Inputs(task.tgt.train.subset(task.lab_idx), labels=True) if loop.streams.lab is not None else None
    built.method.on_train_end(loop.tgt_inputs, labeled)
    if run.main:
        loop.evaluate(loop.steps)


def write_results(run: Run, task: Task, built: Built, loop: Loop) -> dict[str, Any]:
    """Stage 6, last: the record (and the model where asked, always for ``source_only``), then the
    ``done`` marker; every rank returns rank 0's record."""
    wall = time.perf_counter() - loop.t0
    loop.out.close()
    record = make_record(run, task, built, loop, wall)
    if not run.main:
        return run.ddp.broadcast(None)  # rank 0's record, once it is written
    if (run.o.save_model or run.cfg.method == "source_only") and loop.history.status == "done":
        runs.save_model(run.run_dir, built.method.net.state_dict())  # atomic: readers see no half-written weights
    runs.write_record(run.run_dir, record)
    runs.remove_checkpoint(run.run_dir)  # finished: the record holds every evaluation
    runs.mark_done(run.run_dir, loop.history.status)
    return run.ddp.broadcast(record.to_dict()) if run.ddp else record.to_dict()


def make_record(run: Run, task: Task, built: Built, loop: Loop, wall: float) -> RunRecord:
    """The run record: config, resolved hyperparameters, data, every evaluation point, training
    statistics and provenance (written by :mod:`dalab.runs`)."""
    cfg, cls, o, dev, ddp = run.cfg, run.prep.method_cls, run.o, run.dev, run.ddp
    src, tgt, streams, h = task.src, task.tgt, loop.streams, loop.history
    steps_done = h.diverged_at or loop.steps
    sizes = lambda d: {"classes": len(d.classes), **{k: len(getattr(d, k)) for k in ("train", "val", "test")}}  # noqa: E731
    return RunRecord(
        run_id=cfg.run_id(), status=h.status, config=cfg.key(), hparams=run.hp,
        method=MethodInfo(name=cfg.method, family=cls.family,
                          target_data=cls.target_data.value + (" (+ unlabeled for vat)" if streams.vat_only else ""),
                          budget=str(cfg.budget), uses_source=cls.uses_source,
                          init_from=built.init_from, source_config=built.source_key),
        data=DataInfo(source={**sizes(src), "fingerprint": src.fingerprint,  # the data this run saw
                              **_sources_info(task, run.hp, sizes)},
                      target={**sizes(tgt), "labeled": int(len(task.lab_idx)) if streams.lab is not None else 0,
                              "fingerprint": tgt.fingerprint},
                      options=task.options),
        evals=h.evals,
        final=h.evals[-1] if h.evals and h.status == "done" else None,
        train=TrainStats(steps=steps_done, wall_time_s=wall, train_time_s=h.train_time, eval_time_s=h.eval_time,
                         steps_per_s=steps_done / max(h.train_time, 1e-9), last_losses=h.last_losses,
                         diverged_at=h.diverged_at, resumed_from=h.resumed_from, precision=built.precision,
                         channels_last=built.channels_last, compile=o.compile,
                         distributed=ddp.record_info() if ddp else None),
        provenance=Provenance(**git_commit(), versions=package_versions(), device=str(dev),
                              device_name=_device_name(dev), torch_threads=torch.get_num_threads(),
                              deterministic=o.deterministic,
                              host=platform.node(), finished=time.strftime("%Y-%m-%dT%H:%M:%S%z")),
    )


def _sources_info(task: Task, hp: dict[str, Any], sizes: Callable) -> dict[str, Any]:
    """A multi-source record's source side: each domain's sizes and fingerprint, and how batches
    were drawn from them (dalab.tasks.SAMPLING); nothing for a single-source task (its record is
    what it always was)."""
    from dalab.tasks import SAMPLING

    if task.sources is None:
        return {}
    return {"domains": {d.name: {**sizes(d), "fingerprint": d.fingerprint} for d in task.sources},
            "sampling": f"{SAMPLING} ({hp['batch_size']} x {len(task.sources)})"}


# --------------------------------------------------------------------------- the run

def train(cfg: RunConfig, runs_dir: str | Path = "results/runs", opts: RunOptions | None = None,
          **options: Any) -> dict[str, Any]:
    """Train one run to its step budget and write its record. Returns the record.

    ``opts`` (a :class:`dalab.runs.RunOptions`; keyword ``options`` override its fields) says how
    to run, never what: ``data_root`` locates domains read from disk; ``save_model`` also writes
    the weights to ``model.pt`` (always for ``source_only``: the shared source-pretrained start of
    other methods, see dalab.pretrain); ``checkpoint_every`` N writes ``checkpoint.pt`` every N
    steps (atomically): weights, optimizer, scheduler, RNG states, step, evaluations so far;
    ``resume`` continues from it when present (an unreadable one is moved aside and the run starts
    over); on CPU a resumed run ends with the same numbers as an uninterrupted one (same thread
    count). ``deterministic`` selects deterministic GPU kernels; otherwise cuDNN autotunes.

    Stops: SIGINT/SIGTERM/SIGUSR1 finish the current step, write a checkpoint and raise
    :class:`dalab.runs.Interrupted`; a non-finite loss stops the run at that step (on CPU checked
    every step; on CUDA an on-device flag, read at logging and evaluation points, keeps the first
    bad step without a per-step host sync), and non-finite weights are caught before any
    evaluation: the record says ``diverged`` with the step, and no NaN model is ever evaluated.

    Speed options (they change float rounding only, never the algorithm; recorded in provenance):
    ``cfg.precision`` (bf16 autocast of the backbone; part of the run's identity),
    ``channels_last`` (NHWC memory layout for conv backbones: faster convolutions and pooling on
    CPU and on tensor-core GPUs), ``compile`` (``torch.compile`` the backbone; pays off on GPUs and
    long runs, not for a 500-step LeNet run on CPU, where compiling takes longer than training)."""
    o = dataclasses.replace(opts or RunOptions(), **options)
    rdir = runs.run_dir(runs_dir, cfg.run_id())
    existed = rdir.exists()
    try:
        return _train(cfg, Path(runs_dir), rdir, o)
    except Exception:
        # nothing half-written: a run that failed before its first checkpoint leaves no folder
        if not existed and rdir.exists() and not (rdir / "checkpoint.pt").exists():
            shutil.rmtree(rdir, ignore_errors=True)
        raise



def _train(cfg: RunConfig, runs_dir: Path, run_dir: Path, o: RunOptions) -> dict[str, Any]:
    """The stages of one run, in order (see the module docstring)."""
    run = start_run(cfg, runs_dir, run_dir, o)
    task = load_task(run)
    built = build_method(run, task)
    loop = (StreamLoop if run.prep.method_cls.test_time else Loop)(run, task, built, build_streams(run, task))
    with runs.graceful_stop():  # a signal asks for a stop, taken (with a checkpoint) at the next sync point
        loop.run()
        finish(run, task, built, loop)
    return write_results(run, task, built, loop)


# --------------------------------------------------------------------------- helpers

class _Inputs:
    """Re-iterable batches of a split for ``Method.on_train_end``: inputs, or (inputs, labels)."""

    def __init__(self, split, labels: bool = False, batch_size: int = 512):
        self.split, self.labels, self.batch_size = split, labels, batch_size

    def __iter__(self):
        for x, y in self.split.batches(self.batch_size):
            yield (x, y) if self.labels else x


def refresh_period(every: int | str | None, n_target: int, batch_size: int) -> int | None:
    """Steps between two :meth:`Method.refresh` calls: ``every`` steps, one pass over target train
    (``"epoch"``), or never (``None``)."""
    if every is None:
        return None
    return math.ceil(n_target / batch_size) if every == "epoch" else int(every)


def set_determinism(on: bool, device: torch.device) -> None:
    """Deterministic GPU kernels, or cuDNN autotuning for speed. CPU kernels are deterministic for a
    fixed thread count either way."""
    if device.type != "cuda":
        return
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on
    torch.use_deterministic_algorithms(on, warn_only=True)


def _get_rng_state() -> dict:
    import random
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(st: dict) -> None:
    import random
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _all_finite(out: dict) -> torch.Tensor | bool:
    """Whether every logged value of a step is finite: a 0-dim bool tensor on the values' device
    (no host sync), or a bool when there is no tensor."""
    ts = [v.detach().reshape(()) for v in out.values() if torch.is_tensor(v)]
    ok = all(math.isfinite(float(v)) for v in out.values() if not torch.is_tensor(v))
    if not ts:
        return ok
    flag = torch.isfinite(torch.stack([t.float() for t in ts])).all()
    return flag if ok else torch.zeros((), dtype=torch.bool, device=flag.device)


def _sync_every_step(dev: torch.device) -> bool:
    """Check the loss on the host every step (CPU: costs nothing) or keep an on-device flag read at
    logging/evaluation points (CUDA: no per-step synchronisation)."""
    return dev.type == "cpu"


def _params_finite(method) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in method.parameters()]).all())
