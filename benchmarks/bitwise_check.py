"""Bitwise before/after check of the trainer: every registered method's short run, fingerprinted.

    python -m dalab.benchmarks.bitwise_check --out before.json      # on the code before a change
    python -m dalab.benchmarks.bitwise_check --compare before.json  # after it: exit 1 on any difference

For every closed-set method in the registry (``dalab.methods.METHODS``) and each label budget it supports
(0, 10 per class, all), plus a few option variants that take the trainer's other branches
(weight average, source mixup, VAT on a method without target data, cross mixup), it runs a
40-step CPU run on mnist5k -> ucidigits with the ``lenet_bn`` backbone, evaluated every 20 steps,
into a temporary runs dir (fp32, torch threads fixed), and stores a sha256 of the final weights
(every tensor of ``model.pt``, in name order) and every evaluation point's numbers, exactly (floats
as ``repr``). Methods that start from a source model share the ``source_only`` run of that dir,
as in a benchmark. A refactor that claims to change no arithmetic must leave every entry equal.
About two to four minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

PAIR = ("mnist5k", "ucidigits")
STEPS, EVAL_EVERY, THREADS = 40, 20, 2
BUDGETS = {"0": "0", "k": "10", "all": "all"}
# branches of the trainer no method takes at its defaults
VARIANTS = [("dann", "0", {"weight_ema": 0.99}), ("source_only", "0", {"mixup": "source"}),
            ("source_only", "0", {"vat": 1.0}), ("dann", "0", {"mixup": "cross"})]


def cases() -> list[tuple[str, str, dict]]:
    from dalab.methods import METHODS

    out = [(name, BUDGETS[kind], {}) for name, cls in sorted(METHODS.items()) if "closed" in cls.settings
           for kind in cls.label_budgets]  # the pair is a closed-set task
    return out + VARIANTS


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous().reshape(-1)
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(state[k].shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def exact(x):
    """Numbers as exact strings (repr of a float round-trips), nested structures kept."""
    if isinstance(x, float):
        return repr(x)
    if isinstance(x, dict):
        return {k: exact(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [exact(v) for v in x]
    return x


def fingerprint(method: str, budget: str, hparams: dict, runs_dir: Path) -> dict:
    from dalab import runs
    from dalab.runs import RunConfig
    from dalab.trainer import train

    cfg = RunConfig(method, *PAIR, seed=0, budget=budget, steps=STEPS, eval_every=EVAL_EVERY,
                    backbone="lenet_bn", precision="fp32", hparams=dict(hparams))
    rec = train(cfg, runs_dir, device="cpu", progress=False, tensorboard=False, save_model=True)
    state = runs.load_model(runs.run_dir(runs_dir, cfg.run_id()))
    return {"run_id": cfg.run_id(), "status": rec["status"], "init_from": rec["method"]["init_from"],
            "weights_sha256": weights_sha256(state) if state is not None else None,
            "evals": exact(rec["evals"]), "last_losses": exact(rec["train"]["last_losses"])}


def run_all() -> dict[str, dict]:
    torch.set_num_threads(THREADS)
    out = {}
    with tempfile.TemporaryDirectory(prefix="dalab-bitwise-") as tmp:
        for method, budget, hp in cases():
            name = f"{method} b{budget}" + "".join(f" {k}={v}" for k, v in hp.items())
            out[name] = fingerprint(method, budget, hp, Path(tmp))
            print(f"{name:40s} {out[name]['status']:8s} {str(out[name]['weights_sha256'])[:16]}", flush=True)
    return out


def compare(before: dict, after: dict) -> list[str]:
    """One line per case that is missing or differs (and in which field)."""
    bad = []
    for name in sorted(set(before) | set(after)):
        if name not in after or name not in before:
            bad.append(f"{name}: only in {'before' if name in before else 'after'}")
            continue
        diff = [k for k in before[name] if before[name][k] != after[name].get(k)]
        if diff:
            bad.append(f"{name}: differs in {', '.join(diff)}")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="write the fingerprints to this JSON file")
    g.add_argument("--compare", help="compare with fingerprints written by --out; exit 1 on any difference")
    a = ap.parse_args(argv)
    result = run_all()
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        print(f"{len(result)} runs fingerprinted -> {a.out}")
        return 0
    bad = compare(json.loads(Path(a.compare).read_text()), result)
    for line in bad:
        print(line)
    print(f"{len(result) - len(bad)}/{len(result)} runs bitwise equal to {a.compare}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
