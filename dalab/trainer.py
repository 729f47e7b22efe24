"""The one training loop every method runs in.

The trainer owns: validation of the run config, data (on-device tensor splits, infinite shuffled
iterators), the typed :class:`~dalab.methods.base.Batch` (with only the target data the method
declared and the label budget allows), device, step budget, evaluation on every split every
``eval_every`` steps, TensorBoard scalars, the progress bar, and the JSON run record. The method
owns its losses and its optimizer step (``Method.update``).

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
from typing import Any

import numpy as np
import torch

from dalab import runs
from dalab.runs import RECORD_VERSION, Interrupted, RunConfig, RunOptions  # noqa: F401 -- re-exported
from dalab.utils import DalabError, Unsupported, git_commit, package_versions, seed_everything


PRECISIONS = ("auto", "fp32", "bf16")


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, dev: torch.device) -> str:
    """``auto`` -> ``bf16`` on a CUDA GPU with bf16 support or a CPU with native bf16, else ``fp32``."""
    if precision != "auto":
        return precision
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if dev.type == "cpu" and cpu_has_bf16() else "fp32"


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DalabError(f"--device {device} requested but CUDA is not available; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise DalabError(f"bad --device {device!r}; use auto, cpu, cuda or cuda:N") from None


@dataclass
class Prepared:
    """A validated run: resolved hyperparameters and the method class."""

    cfg: RunConfig
    method_cls: type
    hp: dict[str, Any]
    budget: int | None


def validate(cfg: RunConfig) -> Prepared:
    """Check a config before any data is built or anything is written; DalabError if it is bad."""
    from dalab.datasets.base import get_domain, parse_budget
    from dalab.methods import get_method, resolve_hparams
    from dalab.methods.base import TargetData, budget_kind

    from dalab.methods.nets import BACKBONE_INPUT

    method_cls = get_method(cfg.method)
    domains = [get_domain(cfg.source), get_domain(cfg.target)]
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
    budget = parse_budget(cfg.budget)
    kind = budget_kind(budget)
    if kind not in method_cls.label_budgets:
        raise Unsupported(f"method {cfg.method!r} does not support target-label budget {cfg.budget!r} "
                         f"(it supports {', '.join(method_cls.label_budgets)}; 'k' = labels per class)")
    if cfg.precision not in PRECISIONS:
        raise DalabError(f"precision={cfg.precision!r} is not one of {', '.join(PRECISIONS)}")
    for name, v, lo in (("steps", cfg.steps, 1), ("eval_every", cfg.eval_every, 1), ("seed", cfg.seed, 0)):
        if not isinstance(v, int) or v < lo:
            raise DalabError(f"{name}={v!r} must be an integer >= {lo}")
    hp = resolve_hparams(method_cls, cfg.hparams)
    src_hp = cfg.source_run_hparams(hp)
    if src_hp is not None:  # the source model's overrides must be valid too
        resolve_hparams(get_method("source_only"), src_hp)
    if hp["mixup"] == "cross" and method_cls.target_data not in (TargetData.UNLABELED, TargetData.BOTH):
        raise Unsupported(f"mixup=cross mixes source with unlabeled target inputs, but method {cfg.method!r} "
                         f"uses no unlabeled target data; use mixup=source, or a method that adapts (e.g. dann)")
    if not method_cls.uses_source and hp["mixup"] != "none":
        raise Unsupported(f"method {cfg.method!r} is source-free (its adaptation sees no source data), so "
                         f"mixup={hp['mixup']} cannot apply; use mixup=none")
    return Prepared(cfg, method_cls, hp, budget)


# --------------------------------------------------------------------------- evaluation

EVAL_BATCH = 256  # cache-friendly on CPU (1024 was 2x slower on LeNet), plenty on a GPU


@torch.inference_mode()
def predict_split(method, split, batch_size: int = EVAL_BATCH) -> tuple[torch.Tensor, np.ndarray]:
    """Logits (float32, CPU) and labels of a whole split (in the method's precision); device-side
    results are moved to the host once, at the end."""
    logits, labels = [], []
    for x, y in split.batches(batch_size):
        logits.append(method.predict(x).float())
        labels.append(y)
    return torch.cat(logits).cpu(), torch.cat(labels).cpu().numpy()


def classification_metrics(logits: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    pred = logits.argmax(1).numpy()
    return {"acc": float(accuracy_score(labels, pred)),
            "bal_acc": float(balanced_accuracy_score(labels, pred)),
            "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0))}


# label-free validators (pytorch-adapt), scored on target-train predictions; higher is better.
UNSUPERVISED_VALIDATORS = ("im", "entropy", "snd")


def snd_score(preds: torch.Tensor, temperature: float = 0.05, chunk: int = 1024) -> float:
    """Soft neighbourhood density (Saito et al., ICCV 2021) of softmax predictions: the mean over
    samples of the entropy of softmax(cos(p_i, p_j) / T) over the other samples j. The same
    numbers as pytorch-adapt's SNDValidator (tested bit-identical), computed with one matrix
    product per chunk of rows and the self-similarity masked to -inf instead of being cut out
    row by row -- 3-4x faster; it was a third of an evaluation point on CPU."""
    from pytorch_metric_learning.utils.common_functions import small_val

    p = torch.nn.functional.normalize(preds.float(), dim=1)
    eps = small_val(p.dtype)
    out = []
    for i in range(0, len(p), chunk):
        sim = p[i:i + chunk] @ p.T
        rows = torch.arange(len(sim))
        sim[rows, rows + i] = float("-inf")
        q = torch.softmax(sim / temperature, 1)
        out.append(-(q * torch.log(q + eps)).sum(1))
    return float(torch.cat(out).mean())


def unsupervised_scores(logits: torch.Tensor) -> dict[str, float]:
    """pytorch-adapt's IM (Shi & Sha 2012) and negative entropy, and SND (Saito et al. 2021,
    :func:`snd_score`) of target-train predictions. No target label is touched."""
    import warnings
    with warnings.catch_warnings():  # torchmetrics 0.9 (pytorch-adapt's pin) warns about pkg_resources
        warnings.simplefilter("ignore")
        from pytorch_adapt.validators import EntropyValidator, IMValidator
    split = {"logits": logits, "preds": torch.softmax(logits, 1)}
    return {"im": float(IMValidator()(target_train=split)),
            "entropy": float(EntropyValidator()(target_train=split)),
            "snd": snd_score(split["preds"])}


def evaluate(method, data: dict) -> dict[str, Any]:
    """Metrics on every labeled split, label-free scores on target train."""
    was_training = method.training
    method.eval()
    out: dict[str, Any] = {}
    for name in ("src_val", "tgt_val", "tgt_test"):
        out[name] = classification_metrics(*predict_split(method, data[name]))
    out["tgt_train_unsup"] = unsupervised_scores(predict_split(method, data["tgt_train"])[0])
    method.train(was_training)
    return out


# --------------------------------------------------------------------------- the loop

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


def _train(cfg: RunConfig, runs_dir: Path, run_dir: Path, o: RunOptions) -> dict[str, Any]:
    from dalab.datasets.base import check_same_classes, labeled_indices, load_domain
    from dalab.methods.base import Batch, TargetData
    from dalab.methods.nets import build_classifier

    from dalab import distributed

    prep = validate(cfg)
    ddp = distributed.context()  # torchrun: one of several ranks of this run (dalab.distributed)
    dev = ddp.device if ddp else pick_device(o.device)
    main = ddp is None or ddp.is_main  # rank 0 alone evaluates and writes
    set_determinism(o.deterministic, dev)
    src = load_domain(cfg.source, cfg.split_seed, dev, root=o.data_root)
    tgt = load_domain(cfg.target, cfg.split_seed, dev, root=o.data_root)
    check_same_classes(src, tgt)
    data_options = set_up_data_options(prep.hp, {"source": src, "target": tgt})
    runs.check_stop()  # a stop asked for while the data loaded: nothing to save yet

    init_from = source_key = None
    if prep.method_cls.starts_from_source(prep.hp):  # before seeding, so a cache hit or miss changes nothing
        from dalab.pretrain import source_config, source_pretrained
        if ddp:
            distributed.require_source_run(cfg, runs_dir)
        init_state, init_from = source_pretrained(cfg, runs_dir, o, train_fn=train)
        source_key = source_config(cfg).key()
        runs.check_stop()
    seed_everything(cfg.seed)
    net = build_classifier(cfg.backbone, src.num_classes, cfg.pretrained)
    if init_from:
        net.load_state_dict(init_state)
    method = prep.method_cls(net, src.num_classes, prep.hp, cfg.steps).to(dev)
    method.train()
    from dalab.augment import extra_terms, mixup_source
    method.extra_terms = extra_terms(prep.hp, src.num_classes)
    precision = resolve_precision(cfg.precision, dev)
    method.precision = precision
    method.input_stats = {role: input_stats(dom) for role, dom in (("source", src), ("target", tgt))}
    if ddp:  # SyncBatchNorm, rank 0's weights everywhere, gradient averaging in every optimizer step
        ddp.prepare(method, prep.hp["batch_size"])
    channels_last = o.channels_last and any(isinstance(m, torch.nn.Conv2d) for m in net.backbone.modules())
    if channels_last:
        method.to(memory_format=torch.channels_last)
        for split in (*src.splits(), *tgt.splits()):
            split.memory_format = torch.channels_last
    if o.compile:
        net.backbone.compile()
    from dalab.optim import WeightAverage
    # weight_ema > 0: the run evaluates and hands over the average of its weights (after the layout change)
    average = WeightAverage(method, prep.hp["weight_ema"]) if prep.hp["weight_ema"] > 0 else None

    # data streams: each gets its own generator so adding a stream never changes another's order
    bs = prep.hp["batch_size"]
    gens = [torch.Generator().manual_seed(cfg.seed * 1000 + i) for i in range(3)]
    aug_s, aug_t = data_options["source"]["augment"], data_options["target"]["augment"]
    # several processes (torchrun): every rank draws the same global batch and keeps its slice
    sample = ddp.sampler if ddp else (lambda split, *a: split.sampler(*a))
    # a source-free method's adaptation phase is given no source data at all
    src_iter = sample(src.train, bs, gens[0], aug_s) if prep.method_cls.uses_source else None
    uses = prep.method_cls.target_data
    # VAT regularises on target inputs: with a method that declares none, the run uses them for it
    vat_only = prep.hp["vat"] > 0 and uses not in (TargetData.UNLABELED, TargetData.BOTH)
    tgt_iter = (sample(tgt.train, bs, gens[1], aug_t)
                if uses in (TargetData.UNLABELED, TargetData.BOTH) or vat_only else None)
    lab_idx = labeled_indices(tgt.train.labels.cpu().numpy(), cfg.budget, cfg.split_seed)
    lab_iter = None
    if uses in (TargetData.LABELED, TargetData.BOTH) and len(lab_idx):
        lab_iter = sample(tgt.train.subset(lab_idx), bs, gens[2], aug_t)

    data = {"src_val": src.val, "tgt_val": tgt.val, "tgt_test": tgt.test, "tgt_train": tgt.train}
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "done").unlink(missing_ok=True)
    writer = None
    if o.tensorboard and main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run_dir / "tb"), purge_step=runs.tensorboard_purge_step(run_dir, o.resume))

    evals: list[dict[str, Any]] = []
    last_losses: dict[str, float] = {}
    status, diverged_at = "done", None
    bar = None
    if o.progress and main:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, desc=f"{cfg.method} {cfg.source}->{cfg.target} s{cfg.seed}",
                   leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    train_time = eval_time = 0.0
    start = 1
    state = runs.load_checkpoint(run_dir, dev) if o.resume else None  # unreadable: moved aside, None
    if state is not None:
        method.load_training_state(state["method"])
        if average is not None:
            average.load_state_dict(state["average"])  # written by every checkpoint of such a run
        evals, last_losses, train_time = state["evals"], state["last_losses"], state["train_time"]
        eval_time = state.get("eval_time", 0.0)
        for _ in range(state["step"]):  # replay the data streams to where they were (indexing only)
            for it in (src_iter, tgt_iter, lab_iter):
                if it is not None:
                    next(it)
        _set_rng_state(state["rng"])
        if ddp:
            ddp.restore_cuda_rng(state["rng"])
        start = state["step"] + 1
        if main:
            print(f"resuming {cfg.run_id()} from its checkpoint at step {state['step']}", file=sys.stderr, flush=True)
        if bar:
            bar.update(state["step"])
    resumed_from = start - 1 if start > 1 else None
    tgt_inputs = _Inputs(tgt.train) if tgt_iter is not None else None
    refresh = refresh_period(prep.method_cls.refresh_every, len(tgt.train), bs)
    if start == 1:
        method.on_train_start(tgt_inputs)

    def checkpoint(step: int) -> None:
        if main:
            runs.save_checkpoint(run_dir, {"step": step, "method": method.training_state(), "evals": evals,
                                           "last_losses": last_losses, "train_time": train_time,
                                           "eval_time": eval_time, "rng": _get_rng_state(),
                                           "average": average.state_dict() if average is not None else None})

    def floats(out: dict) -> dict[str, float]:
        d = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()}
        d["lr"] = method.lr
        return d

    # divergence: on CPU the loss is checked every step (no cost); on CUDA (and across DDP ranks)
    # the first non-finite step is kept in an on-device flag (0 = none), read at sync points only
    per_step = _sync_every_step(dev) and ddp is None
    first_bad = None if per_step else torch.zeros((), dtype=torch.long, device=dev)
    with runs.graceful_stop():
        for step in range(start, cfg.steps + 1):
            t_step = time.perf_counter()
            if refresh and (step - 1) % refresh == 0:  # pseudo-labels, clusters, memory banks
                method.refresh(_Inputs(tgt.train), step)
            xs = ys = None
            if src_iter is not None:
                xs, ys = next(src_iter)
                if prep.hp["mixup"] == "source":
                    xs, ys = mixup_source(xs, ys, src.num_classes, prep.hp["mixup_alpha"])
            batch = Batch(xs, ys)
            if tgt_iter is not None:
                batch.x_tgt = next(tgt_iter)[0]           # labels dropped: unsupervised use
            if lab_iter is not None:
                batch.x_tgt_lab, batch.y_tgt_lab = next(lab_iter)
            out = method.train_step(batch, step)
            if average is not None:
                average.update()
            train_time += time.perf_counter() - t_step
            finite = _all_finite(out)
            if first_bad is None or not torch.is_tensor(finite):
                if not bool(finite) and ddp is None:
                    status, diverged_at, last_losses = "diverged", step, floats(out)
                    break
            else:
                first_bad = torch.where(finite | (first_bad > 0), first_bad, step)
            log = step % o.log_every == 0 or step == cfg.steps
            evaluate_now = step % cfg.eval_every == 0 or step == cfg.steps
            stop = runs.stop_requested() is not None and step < cfg.steps
            if log or evaluate_now or (stop and ddp is None):  # sync points (the same step on every rank)
                bad = int(first_bad) if first_bad is not None else 0  # the loop's only host sync on CUDA
                stopping = stop
                if ddp:  # every rank decides together: divergence or a stop on any rank stops all
                    agreed = ddp.average_scalars({"bad": float(bad > 0), "stop": float(stop)})
                    bad = bad or (step if agreed["bad"] > 0 else 0)
                    stopping = agreed["stop"] > 0
                if bad or (evaluate_now and not _params_finite(method)):  # never evaluate a NaN model
                    status, diverged_at, last_losses = "diverged", bad or step, floats(out)
                    break
                if stopping:
                    # a signal asked us to stop: this step is complete, so its checkpoint resumes exactly
                    checkpoint(step)
                    for closing in (writer, bar):
                        if closing:
                            closing.close()
                    raise Interrupted(runs.stop_requested() or int(signal.SIGTERM), step)
            if log:
                last_losses = floats(out)
                if ddp:  # the global batch's losses
                    last_losses = ddp.average_scalars(last_losses)
                if writer:
                    for k, v in last_losses.items():
                        writer.add_scalar(f"train/{k}", v, step)
                if bar:
                    bar.set_postfix(loss=f"{last_losses.get('loss', float('nan')):.3f}")
            if bar:
                bar.update(1)
            if step == cfg.steps:  # post-training adaptation (AdaBN, probes) sees only declared target data
                if average is not None:
                    average.apply()  # the averaged network is the one adapted, evaluated and saved
                method.on_train_end(tgt_inputs,
                                    _Inputs(tgt.train.subset(lab_idx), labels=True) if lab_iter is not None else None)
            if evaluate_now and main:
                t_eval = time.perf_counter()
                averaged = average.swapped_in() if average is not None and step < cfg.steps else nullcontext()
                with averaged, method.deployed(tgt_inputs):  # e.g. AdaBN's target statistics at every point
                    ev = {"step": step, **evaluate(method, data)}
                eval_time += time.perf_counter() - t_eval
                evals.append(ev)
                if writer:
                    for split in ("src_val", "tgt_val", "tgt_test"):
                        for m, v in ev[split].items():
                            writer.add_scalar(f"{split}/{m}", v, step)
                    for m, v in ev["tgt_train_unsup"].items():
                        writer.add_scalar(f"tgt_train_unsup/{m}", v, step)
            if o.checkpoint_every and step % o.checkpoint_every == 0 and step < cfg.steps:
                checkpoint(step)  # atomic: a crash leaves the previous checkpoint intact
    wall = time.perf_counter() - t0
    if bar:
        bar.close()
    if writer:
        writer.close()

    steps_done = diverged_at or cfg.steps
    record = {
        "record_version": RECORD_VERSION,
        "run_id": cfg.run_id(),
        "status": status,
        "config": cfg.key(),
        "hparams": prep.hp,
        "method": {"name": cfg.method, "family": prep.method_cls.family,
                   "target_data": prep.method_cls.target_data.value + (" (+ unlabeled for vat)" if vat_only else ""),
                   "budget": str(cfg.budget), "uses_source": prep.method_cls.uses_source,
                   "init_from": init_from, "source_config": source_key},
        "data": {"source": {"classes": len(src.classes), **{k: len(getattr(src, k)) for k in ("train", "val", "test")}},
                 "target": {"classes": len(tgt.classes), **{k: len(getattr(tgt, k)) for k in ("train", "val", "test")},
                            "labeled": int(len(lab_idx)) if lab_iter is not None else 0},
                 "options": data_options},
        "evals": evals,
        "final": evals[-1] if evals and status == "done" else None,
        "train": {"steps": steps_done, "wall_time_s": wall, "train_time_s": train_time,
                  "eval_time_s": eval_time,
                  "steps_per_s": steps_done / max(train_time, 1e-9), "last_losses": last_losses,
                  "diverged_at": diverged_at, "resumed_from": resumed_from, "precision": precision,
                  "channels_last": channels_last, "compile": o.compile,
                  "distributed": ddp.record_info() if ddp else None},
        "provenance": {**git_commit(), "versions": package_versions(), "device": str(dev),
                       "device_name": _device_name(dev), "torch_threads": torch.get_num_threads(),
                       "deterministic": o.deterministic,
                       "host": platform.node(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    if not main:
        return ddp.broadcast(None)  # rank 0's record, once it is written
    if (o.save_model or cfg.method == "source_only") and status == "done":
        runs.save_model(run_dir, method.net.state_dict())  # atomic: readers see no half-written weights
    runs.write_record(run_dir, record)
    runs.remove_checkpoint(run_dir)  # finished: the record holds every evaluation
    runs.mark_done(run_dir, status)
    return ddp.broadcast(record) if ddp else record
