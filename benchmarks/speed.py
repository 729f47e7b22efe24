"""Training throughput: dalab's trainer vs a bare PyTorch loop vs pytorch-adapt's adapters.

    python -m dalab.benchmarks.speed [--steps 300] [--repeats 3] [--device auto]

In ONE process, with the same network (the DANN paper's LeNet), the same data (mnist5k ->
ucidigits, held on the device), the same batch sizes (64 source + 64 target) and the same
optimizer (SGD, momentum 0.9), it times the training steps of

1. a bare hand-written loop (the fastest thing one would write by hand),
2. dalab's trainer (``dalab.trainer.train``, its step time, evaluation excluded),
3. pytorch-adapt's adapter (``DANN`` / ``Classifier``, ``training_step``),

for DANN and for source-only, and prints steps/s, images/s and ratios (median over repeats,
variants interleaved so drift hits all alike), plus peak memory (CUDA: per variant; CPU: the
process's peak RSS, which is shared, so only indicative).

Each loop runs in two settings: ``fp32`` (float32, NCHW: what a hand-written loop and
pytorch-adapt do by default) and ``fast`` (dalab's defaults on this device: bf16 autocast where
the device has native bf16, channels_last for the conv net). So

- dalab/bare in the same setting is the trainer's overhead (target >= 0.95),
- dalab (its defaults) / pytorch-adapt (its defaults) is what a user gets by switching (target >= 1.5),
- pytorch-adapt ``fast`` applies the same autocast + channels_last from outside its adapter, to
  show how much of the gap is settings and how much is per-step overhead.
"""

from __future__ import annotations

import argparse
import builtins
import resource
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

from dalab import display
from dalab.datasets import load_domain
from dalab.methods.layers import dann_lambda, grad_reverse
from dalab.methods.nets import build_classifier, domain_discriminator
from dalab.render import Cell, Table
from dalab.trainer import RunConfig, pick_device, resolve_precision, train

BS = 64


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _batches(split, gen):
    return split.sampler(BS, gen)


def autocast(dev, precision: str):
    """bf16 autocast of a whole forward pass (a no-op for fp32), as one would write it by hand.
    (dalab's trainer autocasts only the backbone: see ``Method.features``.)"""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _setting(fast: bool, dev, *splits):
    """(precision, memory format) of a setting; sets the splits' input layout."""
    fmt = torch.channels_last if fast else torch.contiguous_format
    for s in splits:
        s.memory_format = fmt
    return (resolve_precision("auto", dev) if fast else "fp32"), fmt


def bare(method: str, steps: int, dev, src, tgt, backbone: str, fast: bool) -> float:
    """A hand-written loop: same model and data path, no trainer. Returns seconds for ``steps``."""
    prec, fmt = _setting(fast, dev, src, tgt)
    torch.manual_seed(0)
    net = build_classifier(backbone, 10).to(dev, memory_format=fmt)
    disc = domain_discriminator(net.backbone.out_dim).to(dev)
    params = list(net.parameters()) + (list(disc.parameters()) if method == "dann" else [])
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 + 10 * s / steps) ** -0.75)
    g = torch.Generator().manual_seed(0)
    si, ti = _batches(src, g), _batches(tgt, g)
    _sync(dev)
    t0 = time.perf_counter()
    for step in range(steps):
        xs, ys = next(si)
        with autocast(dev, prec):
            if method == "dann":
                xt = next(ti)[0]
                f = net.backbone(torch.cat([xs, xt]))
                d = disc(grad_reverse(f, dann_lambda(step / steps))).squeeze(1)
                dom = torch.cat([torch.ones(len(xs), device=dev), torch.zeros(len(xt), device=dev)])
                loss = F.cross_entropy(net.head(f[: len(xs)]), ys) + F.binary_cross_entropy_with_logits(d, dom)
            else:
                loss = F.cross_entropy(net(xs), ys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    _sync(dev)
    return time.perf_counter() - t0


def dalab_trainer(method: str, steps: int, dev, runs_dir: str, backbone: str, fast: bool) -> float:
    cfg = RunConfig("dann" if method == "dann" else "source_only", "mnist5k", "ucidigits", steps=steps,
                    eval_every=10 ** 9, backbone=backbone, precision="auto" if fast else "fp32",
                    hparams={"disc_bn": "false"} if method == "dann" else {})  # the paper's 768-100-1 D, as below
    rec = train(cfg, runs_dir, device=str(dev), progress=False, tensorboard=False, channels_last=fast)
    return rec["train"]["train_time_s"]


def pytorch_adapt(method: str, steps: int, dev, src, tgt, backbone: str, fast: bool) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pytorch_adapt.adapters import DANN, Classifier
        from pytorch_adapt.containers import LRSchedulers, Models, Optimizers
    prec, fmt = _setting(fast, dev, src, tgt)
    torch.manual_seed(0)
    net = build_classifier(backbone, 10).to(dev, memory_format=fmt)
    models = {"G": net.backbone, "C": net.head}
    if method == "dann":
        # pytorch-adapt's domain loss wants one logit per image as a 1-d tensor
        models["D"] = torch.nn.Sequential(domain_discriminator(net.backbone.out_dim), torch.nn.Flatten(0)).to(dev)
    opts = Optimizers((torch.optim.SGD, {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}))
    scheds = LRSchedulers((torch.optim.lr_scheduler.LambdaLR, {"lr_lambda": lambda s: (1 + 10 * s / steps) ** -0.75}))
    adapter = (DANN if method == "dann" else Classifier)(models=Models(models), optimizers=opts, lr_schedulers=scheds)
    g = torch.Generator().manual_seed(0)
    si, ti = _batches(src, g), _batches(tgt, g)
    zeros, ones = torch.zeros(BS, device=dev), torch.ones(BS, device=dev)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        xs, ys = next(si)
        batch = {"src_imgs": xs, "src_labels": ys, "src_domain": zeros}
        if method == "dann":
            batch.update(target_imgs=next(ti)[0], target_domain=ones)
        with autocast(dev, prec):  # fp32 setting: a no-op
            adapter.training_step(batch)
    _sync(dev)
    return time.perf_counter() - t0


def peak_mem(dev) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB, whole process


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backbone", default="lenet")
    ap.add_argument("--methods", nargs="+", default=["dann", "source_only"])
    ap.add_argument("--out", default=None, help="also write the table to this Markdown file (atomically)")
    args = ap.parse_args(argv)
    lines: list[str] = []

    def print(line: str = "", **_):  # noqa: A001 - echo, and keep for --out
        lines.append(line)
        builtins.print(line, flush=True)

    dev = pick_device(args.device)
    src, tgt = load_domain("mnist5k", 0, dev).train, load_domain("ucidigits", 0, dev).train
    runs = tempfile.mkdtemp(prefix="dalab-speed-")
    loops = {"bare": lambda m, n, fast: bare(m, n, dev, src, tgt, args.backbone, fast),
             "dalab": lambda m, n, fast: dalab_trainer(m, n, dev, runs, args.backbone, fast),
             "pytorch-adapt": lambda m, n, fast: pytorch_adapt(m, n, dev, src, tgt, args.backbone, fast)}
    variants = {(loop, setting): (lambda m, n, f=fn, fast=setting == "fast": f(m, n, fast))
                for setting in ("fp32", "fast") for loop, fn in loops.items()}
    fast_prec = resolve_precision("auto", dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {args.steps} timed steps x {args.repeats} repeats; "
          f"batch {BS} source + {BS} target; backbone {args.backbone}; "
          f"fast = {fast_prec} autocast + channels_last\n")
    tab = Table(["Method", "Loop", "Setting", "Steps/s", "Images/s", "Peak mem (MiB)"])
    for method in args.methods:
        times: dict[str, list[float]] = {k: [] for k in variants}
        mem = {}
        for fn in variants.values():  # warm-up (imports, allocator, first-call overheads)
            fn(method, args.warmup)
        for _ in range(args.repeats):
            for k, fn in variants.items():
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                times[k].append(fn(method, args.steps))
                mem[k] = peak_mem(dev)
        sps = {k: args.steps / statistics.median(v) for k, v in times.items()}
        imgs = BS * (2 if method == "dann" else 1)
        name = display.method(method)
        for (loop, setting) in variants:
            k = (loop, setting)
            tab.add(name, loop, setting, f"{sps[k]:.1f}", f"{sps[k] * imgs:.0f}", f"{mem[k]:.0f}")
            builtins.print(f"  {method} {loop} {setting}: {sps[k]:.1f} steps/s", flush=True)

        def r(a, b, sps=sps):
            return sps[a] / sps[b]
        tab.add(name, Cell("dalab/bare (trainer overhead)", "best"),
                f"fp32 {r(('dalab', 'fp32'), ('bare', 'fp32')):.2f}, fast {r(('dalab', 'fast'), ('bare', 'fast')):.2f}",
                "", "", "")
        tab.add(name, Cell("dalab/pytorch-adapt", "best"),
                f"defaults (dalab fast / pa fp32) {r(('dalab', 'fast'), ('pytorch-adapt', 'fp32')):.2f}; same setting: "
                f"fp32 {r(('dalab', 'fp32'), ('pytorch-adapt', 'fp32')):.2f}, fast "
                f"{r(('dalab', 'fast'), ('pytorch-adapt', 'fast')):.2f}", "", "", "")
    for line in tab.markdown().rstrip("\n").splitlines():
        print(line)
    if args.out:
        from dalab.utils import write_report
        write_report(args.out, "dalab.benchmarks.speed", argv, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
