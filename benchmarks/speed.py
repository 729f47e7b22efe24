"""Training throughput: dalab's trainer vs a bare PyTorch loop vs pytorch-adapt's adapters.

    python -m dalab.benchmarks.speed [--steps 300] [--repeats 3] [--device auto]

In ONE process, with the same network (the DANN paper's LeNet), the same data (mnist5k ->
ucidigits, held on the device), the same batch sizes (64 source + 64 target) and the same
optimizer (SGD, momentum 0.9), it times the training steps of

1. a bare hand-written loop (the fastest thing one would write by hand),
2. dalab's trainer (``dalab.trainer.train``, its step time, evaluation excluded),
3. pytorch-adapt's adapter (``DANN`` / ``Classifier``, ``training_step``),

for DANN and for source-only, and prints steps/s, images/s and the ratios dalab/bare and
dalab/pytorch-adapt (median over repeats, variants interleaved so drift hits all alike), plus
peak memory (CUDA: per variant; CPU: the process's peak RSS, which is shared, so only indicative).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

from dalab.datasets import load_domain
from dalab.methods.layers import dann_lambda, grad_reverse
from dalab.methods.nets import build_classifier, domain_discriminator
from dalab.trainer import RunConfig, pick_device, train

BS = 64


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _batches(split, gen):
    return split.sampler(BS, gen)


def bare(method: str, steps: int, dev, src, tgt, backbone: str) -> float:
    """A hand-written loop: same model and data path, no trainer. Returns seconds for ``steps``."""
    torch.manual_seed(0)
    net = build_classifier(backbone, 10).to(dev)
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


def dalab_trainer(method: str, steps: int, dev, runs_dir: str, backbone: str) -> float:
    cfg = RunConfig("dann" if method == "dann" else "source_only", "mnist5k", "ucidigits", steps=steps,
                    eval_every=10 ** 9, backbone=backbone)
    rec = train(cfg, runs_dir, device=str(dev), progress=False, tensorboard=False)
    return rec["train"]["train_time_s"]


def pytorch_adapt(method: str, steps: int, dev, src, tgt, backbone: str) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pytorch_adapt.adapters import DANN, Classifier
        from pytorch_adapt.containers import LRSchedulers, Models, Optimizers
    torch.manual_seed(0)
    net = build_classifier(backbone, 10).to(dev)
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
    args = ap.parse_args(argv)
    dev = pick_device(args.device)
    src, tgt = load_domain("mnist5k", 0, dev).train, load_domain("ucidigits", 0, dev).train
    runs = tempfile.mkdtemp(prefix="dalab-speed-")
    variants = {
        "bare": lambda m, n: bare(m, n, dev, src, tgt, args.backbone),
        "dalab": lambda m, n: dalab_trainer(m, n, dev, runs, args.backbone),
        "pytorch-adapt": lambda m, n: pytorch_adapt(m, n, dev, src, tgt, args.backbone),
    }
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {args.steps} timed steps x {args.repeats} repeats; "
          f"batch {BS} source + {BS} target; backbone {args.backbone}\n")
    print("| method | loop | steps/s | images/s | peak mem (MiB) |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        times: dict[str, list[float]] = {k: [] for k in variants}
        mem = {}
        for k, fn in variants.items():  # warm-up (imports, allocator, first-call overheads)
            fn(method, args.warmup)
        for _ in range(args.repeats):
            for k, fn in variants.items():
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                times[k].append(fn(method, args.steps))
                mem[k] = peak_mem(dev)
        sps = {k: args.steps / statistics.median(v) for k, v in times.items()}
        imgs = BS * (2 if method == "dann" else 1)
        for k in variants:
            print(f"| {method} | {k} | {sps[k]:.1f} | {sps[k] * imgs:.0f} | {mem[k]:.0f} |")
        print(f"| {method} | **ratios** | dalab/bare = {sps['dalab'] / sps['bare']:.2f} | "
              f"dalab/pytorch-adapt = {sps['dalab'] / sps['pytorch-adapt']:.2f} | |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
