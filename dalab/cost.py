"""What a benchmark grid needs and costs, before it runs (``dalab bench SPEC --dry-run``).

- :func:`check_inputs`: every domain of the grid is read once from ``--data-root`` (image folders
  only list their files; nothing is decoded) and every source/target pair has the same classes;
  the ImageNet weight file a spec names exists. Problems are one-line :class:`DalabError` s, so a
  three-day sweep does not die on its first run for a typo in a folder name.
- :func:`estimate`: runs to do, training steps, and a wall-time estimate from a short probe on
  the current device (a few timed optimizer steps of one of the grid's methods, with its backbone,
  batch size, precision and memory layout, on synthetic inputs of the domains' shape; plus a timed
  forward pass for evaluation), or from a per-step figure the user states (``--step-time``).

What the probe does not see: image decoding (DataLoader workers; on a GPU with few CPU cores it
can be the bottleneck), the other methods' costs (multi-step methods such as MCD take longer than
the probed one), and workers slowing each other down when they share a GPU or cores. The printed
line says so; the estimate is a lower bound of the right order, meant to tell minutes from days.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from dalab.utils import duration



def check_inputs(grid, data_root: str | None, pretrained: str | None, backbone: str) -> dict[str, Any]:
    """Read every domain of ``grid`` (list of (RunConfig, trial)); returns {domain: DomainSplits}."""
    from dalab.datasets.base import check_same_classes, load_domain

    cfgs = [c for c, _ in grid]
    domains: dict[str, Any] = {}
    for cfg in cfgs:
        for name in (*cfg.sources, cfg.target):
            if name not in domains:
                domains[name] = load_domain(name, cfg.split_seed, "cpu", root=data_root)
    for pair in dict.fromkeys((s, c.target) for c in cfgs for s in c.sources):
        check_same_classes(domains[pair[0]], domains[pair[1]])
    if pretrained and backbone.startswith("resnet"):
        from dalab.methods.nets import find_local_weights
        find_local_weights(backbone, pretrained)
    return domains


def _probe_batch(method_cls, hp: dict, shape: tuple[int, ...], num_classes: int, dev: torch.device,
                 num_sources: int = 1):
    from dalab.methods.base import Batch, TargetData

    bs = hp["batch_size"]
    g = torch.Generator().manual_seed(0)
    x = lambda: torch.randn(bs, *shape, generator=g).to(dev)  # noqa: E731
    y = lambda: torch.randint(0, num_classes, (bs,), generator=g).to(dev)  # noqa: E731
    b = Batch(x(), y()) if method_cls.uses_source else Batch(None, None)
    if method_cls.uses_source and num_sources > 1:  # per-domain balanced: batch_size from each source domain
        b.x_src, b.y_src = torch.cat([b.x_src] + [x() for _ in range(num_sources - 1)]), y().repeat(num_sources)
        b.d_src = torch.arange(num_sources, device=dev).repeat_interleave(bs)
    if method_cls.target_data in (TargetData.UNLABELED, TargetData.BOTH):
        b.x_tgt = x()
    if method_cls.target_data in (TargetData.LABELED, TargetData.BOTH):
        b.x_tgt_lab, b.y_tgt_lab = x(), y()
    return b


def probe(cfg, shape: tuple[int, ...], num_classes: int, device: str = "auto", steps: int = 3,
          warmup: int = 1) -> dict[str, float]:
    """Seconds per training step of run ``cfg`` (mean of ``steps`` timed steps after ``warmup``) and
    seconds per evaluated image, on synthetic inputs of ``shape`` on ``device``."""
    from dalab.methods.nets import build_classifier
    from dalab.evaluation import EVAL_BATCH
    from dalab.trainer import pick_device, resolve_precision, validate

    prep = validate(cfg)
    dev = pick_device(device)
    net = build_classifier(cfg.backbone, num_classes)  # random weights: the time is the same
    method = prep.method_cls(net, num_classes, prep.hp, max(cfg.steps, warmup + steps),
                             num_sources=len(cfg.sources)).to(dev)
    method.precision = resolve_precision(cfg.precision, dev)
    if any(isinstance(m, torch.nn.Conv2d) for m in net.backbone.modules()):
        method.to(memory_format=torch.channels_last)
    method.train()
    batch = _probe_batch(prep.method_cls, prep.hp, shape, num_classes, dev, len(cfg.sources))
    if batch.x_src is not None:
        batch.x_src = batch.x_src.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    for s in range(1, warmup + 1):  # first calls pick kernels, allocate, autotune
        method.train_step(batch, s)
    # the median step: robust to a step slowed by another process on a shared machine
    times = sorted(timed(lambda s=s: method.train_step(batch, s)) for s in range(warmup + 1, warmup + steps + 1))
    step_s = times[len(times) // 2] if times else float("nan")
    method.eval()
    n = EVAL_BATCH if dev.type == "cuda" else 64  # enough to time a forward; a CPU ResNet is slow
    x = torch.randn(n, *shape).to(dev).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        eval_s = min(timed(lambda: method.predict(x)) for _ in range(2)) / n
    return {"step_s": step_s, "eval_image_s": eval_s, "device": _device_label(dev), "precision": method.precision}


def _device_label(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _test_time(cfg) -> bool:
    from dalab.methods import get_method

    return get_method(cfg.method).test_time


def _run_steps(cfg, domains: dict[str, Any] | None) -> int:
    """Training steps of a run: its budget, or a test-time run's stream length (adaptation steps per
    batch included; its domains' sizes from ``domains``, when they are there) -- it evaluates once."""
    if not _test_time(cfg):
        return cfg.steps
    from dalab.methods import get_method, resolve_hparams
    from dalab.streams import StreamOptions, length

    opts = StreamOptions.of(resolve_hparams(get_method(cfg.method), cfg.hparams), cfg.target)
    if not domains or any(d not in domains for d in opts.domains):
        return cfg.steps
    return length([len(domains[d].train) for d in opts.domains], opts) * opts.adapt_steps


def estimate(spec, grid, states: list[str], domains: dict[str, Any] | None = None, jobs: int = 1,
             device: str = "auto", probe_steps: int = 3, step_time: float | None = None) -> list[str]:
    """Lines saying what the not-done runs of ``grid`` cost: runs, steps, and wall time from a
    probe (``probe_steps`` timed steps) or the stated ``step_time`` seconds per step."""
    todo = [cfg for (cfg, _), st in zip(grid, states) if st != "done"]
    run_steps = {c.run_id(): _run_steps(c, domains) for c in todo}
    steps = sum(run_steps.values())
    lines = [f"cost: {len(todo)} runs to do, {steps:,} training steps"
             + (f" ({steps // len(todo):,} per run)" if todo and len(set(run_steps.values())) == 1 else "")]
    if not todo or (step_time is None and probe_steps <= 0):
        return lines
    evals_per_run = {c.run_id(): 1 if _test_time(c) else math.ceil(c.steps / c.eval_every) for c in todo}
    eval_images = None
    if domains:
        per_pair = {}
        for c in todo:
            t = domains[c.target]
            per_pair[(c.source, c.target)] = (sum(len(domains[s].val) for s in c.sources) + len(t.val)
                                              + len(t.test) + len(t.train))
        eval_images = sum(evals_per_run[c.run_id()] * per_pair[(c.source, c.target)] for c in todo)
    if step_time is not None:
        step_s, eval_s, how = step_time, None, f"stated {step_time:g} s/step"
    else:
        names = [c.method for c in todo]
        cfg = todo[names.index("dann")] if "dann" in names else todo[0]
        dom = (domains or {}).get(cfg.sources[0])
        shape = tuple(dom.train.input_shape) if dom is not None else (
            (3, 28, 28) if cfg.backbone.startswith("lenet") else (3, 224, 224))
        ncls = dom.num_classes if dom is not None else 10
        print(f"probing the cost: {probe_steps} training steps of {cfg.method} on {cfg.backbone} "
              f"(--step-time S skips this) ...", flush=True)
        p = probe(cfg, shape, ncls, device, steps=probe_steps)
        step_s, eval_s = p["step_s"], p["eval_image_s"]
        bs = cfg.hparams.get("batch_size", 64)
        how = (f"probe: {cfg.method}, {cfg.backbone}, batch {bs}+{bs}, {p['precision']}, {p['device']}: "
               f"{step_s:.3g} s/step ({probe_steps} timed steps, synthetic inputs: decoding not included)"
               f", evaluation {eval_s * 1e3:.3g} ms/image")
    train_s = steps * step_s
    eval_total = eval_images * eval_s if (eval_images is not None and eval_s is not None) else None
    total = train_s + (eval_total or 0.0)
    lines.append(f"  {how}")
    lines.append(f"  training {duration(train_s)}"
                 + (f" + evaluation {duration(eval_total)} ({eval_images:,} images)" if eval_total is not None
                    else " (evaluation not estimated)")
                 + f" = {duration(total)} of one worker")
    if jobs > 1:
        lines.append(f"  with --jobs {jobs}: about {duration(total / jobs)} if the workers do not slow each other "
                     f"down (one GPU or core set each)")
    return lines
