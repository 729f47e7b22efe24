"""Benchmark grids: methods x pairs x label budgets x seeds (x hparam trials), resumable.

A spec (YAML, see ``benchmarks/digits.yaml``) expands deterministically into :class:`RunConfig`s.
Every run has a deterministic id; a finished run has a ``done`` marker and is skipped on
re-launch, so an interrupted grid resumes where it stopped. A worker *claims* a run (an
exclusively created ``<id>.claim`` file) before training it, so several workers -- or several
``dalab bench`` processes on the same results dir -- never train the same run twice. A claim left
by a dead process on this host is stale and is taken over.

Launchers: ``local`` (this process, sequential), ``local --jobs N`` (N worker processes: with
GPUs visible they are spread round-robin over the GPUs, so ``--jobs 8`` on one GPU trains 8 runs of
a small model concurrently on it; without GPUs they split the CPU cores), ``submitit-local`` and
``slurm`` (through submitit's executors; we do not write our own scheduler).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dalab.selection import RULE_NAMES as RULES  # the one registry of selection rules
from dalab.utils import DalabError


@dataclass
class BenchSpec:
    """A benchmark grid. Every field can be given in the YAML spec."""

    name: str = "bench"
    methods: list[str] | str = "all"                    # names, or "all" (every registered method)
    pairs: list[list[str]] | str = "default"             # [[source, target], ...], "default" or a benchmark name
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    budgets: list[str] = field(default_factory=lambda: ["0"])  # each method runs the ones it supports
    steps: int = 2000
    eval_every: int = 250
    backbone: str = "lenet"
    pretrained: str | None = None
    split_seed: int = 0
    precision: str = "auto"                              # auto | fp32 | bf16 (see dalab.trainer)
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)  # {method or "all": {name: value}}
    # data options swept as separate rows: [{hparam: value, ...}, ...] applied on top of hparams;
    # [{}] = defaults only. E.g. [{}, {mixup: source}, {vat: 1.0}]
    variants: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    trials: int = 1                                      # 1 = defaults only; n > 1 adds n-1 random draws
    search_seed: int = 0
    selection: list[str] = field(default_factory=lambda: list(RULES))
    runs_dir: str = "results/runs"
    out: str = "results/bench"

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "BenchSpec":
        import yaml

        p = Path(path)
        if not p.is_file():
            raise DalabError(f"benchmark spec {p} not found; pass a YAML file such as benchmarks/digits.yaml")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise DalabError(f"malformed YAML in {p}{where}: {getattr(e, 'problem', e)}; fix the syntax") from None
        if not isinstance(raw, dict):
            raise DalabError(f"benchmark spec {p} must be a mapping of fields ({', '.join(f.name for f in fields(cls))})")
        return cls.from_dict(raw, str(p))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "spec") -> "BenchSpec":
        from dalab.datasets.base import closest

        known = {f.name for f in fields(cls)}
        for k in raw:
            if k not in known:
                raise DalabError(f"unknown field {k!r} in {where}{closest(str(k), known)}; "
                                 f"allowed: {', '.join(sorted(known))}")
        spec = cls(**raw)
        spec.validate(where)
        return spec

    def validate(self, where: str = "spec") -> None:
        def bad(name, msg):
            raise DalabError(f"{where}: field {name!r} {msg}")

        for name in ("steps", "eval_every", "trials"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, f"must be an integer >= 1, got {v!r}")
        if not isinstance(self.seeds, list) or not self.seeds or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds):
            bad("seeds", f"must be a non-empty list of integers >= 0, got {self.seeds!r}")
        if not isinstance(self.budgets, list) or not self.budgets:
            bad("budgets", f"must be a non-empty list of 0, k (labels per class) or 'all', got {self.budgets!r}")
        self.budgets = [str(b) for b in self.budgets]
        for r in self.selection:
            if r not in RULES:
                bad("selection", f"has unknown rule {r!r}; allowed: {', '.join(RULES)}")
        if not isinstance(self.variants, list) or not self.variants or not all(isinstance(v, dict) for v in self.variants):
            bad("variants", f"must be a non-empty list of {{hparam: value}} mappings ([{{}}] = defaults), got {self.variants!r}")
        if not isinstance(self.hparams, dict) or not all(isinstance(v, dict) for v in self.hparams.values()):
            bad("hparams", "must map a method name (or 'all') to {hparam: value}")
        if isinstance(self.pairs, list) and not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in self.pairs):
            bad("pairs", f"must be 'default', a benchmark name or a list of [source, target], got {self.pairs!r}")


def resolve_pairs(pairs: list | str) -> list[tuple[str, str]]:
    """A spec's pairs: a list of [source, target], "default" (the offline digits benchmark) or the
    name of a benchmark in ``dalab.datasets.BENCHMARKS`` (e.g. office31)."""
    from dalab.datasets import BENCHMARKS, DEFAULT_PAIRS
    from dalab.datasets.base import closest

    if pairs == "default":
        return [tuple(p) for p in DEFAULT_PAIRS]
    if isinstance(pairs, str):
        if pairs not in BENCHMARKS:
            raise DalabError(f"field 'pairs': unknown benchmark {pairs!r}{closest(pairs, BENCHMARKS)}; use "
                             f"'default', one of {', '.join(BENCHMARKS)}, or a list of [source, target]")
        return [tuple(p) for p in BENCHMARKS[pairs]]
    return [tuple(p) for p in pairs]


def resolve_methods(spec: BenchSpec) -> list[str]:
    from dalab.methods import METHODS, get_method

    if spec.methods == "all":
        return sorted(METHODS, key=lambda n: (n != "source_only", METHODS[n].family, n))
    if not isinstance(spec.methods, list):
        raise DalabError(f"field 'methods' must be 'all' or a list of method names, got {spec.methods!r}")
    for m in spec.methods:
        get_method(m)
    return list(spec.methods)


def trial_hparams(method: str, trial: int, spec: BenchSpec) -> dict[str, Any]:
    """Trial 0: the defaults (plus spec overrides). Trial t > 0: a seeded random draw from every
    hyperparameter's search space (the method's own and the shared ones), then spec overrides.
    Each hyperparameter draws from its own generator, seeded by (search seed, method, trial, its
    name), so adding or removing a hyperparameter never changes the others' draws."""
    import numpy as np

    from dalab.methods import SHARED_HPARAMS, get_method

    cls = get_method(method)
    out: dict[str, Any] = {}
    if trial > 0:
        table = {**SHARED_HPARAMS, **cls.hparams}
        out = {k: h.sample(np.random.default_rng([spec.search_seed, zlib.crc32(method.encode()), trial,
                                                  zlib.crc32(k.encode())]))
               for k, h in sorted(table.items()) if h.space is not None and k != "batch_size"}
    out.update(spec.hparams.get("all", {}))
    out.update(spec.hparams.get(method, {}))
    return out


def expand(spec: BenchSpec, skipped: list[str] | None = None):
    """The grid as a list of RunConfig, validated, in a stable order (source_only first so
    source-pretrained models exist before the methods that start from them). A variant a method
    cannot take (e.g. ``mixup: cross`` for ``source_only``, which sees no target data) is left out
    for that method and the reason appended to ``skipped``; any other invalid run is an error."""
    from dalab.datasets.base import parse_budget
    from dalab.methods import get_method
    from dalab.methods.base import budget_kind
    from dalab.trainer import RunConfig, validate

    for key in spec.hparams:
        if key != "all":
            get_method(key)
    pairs = resolve_pairs(spec.pairs)
    out = []
    for method in resolve_methods(spec):
        cls = get_method(method)
        budgets = [b for b in spec.budgets if budget_kind(parse_budget(b)) in cls.label_budgets]
        for src, tgt in pairs:
            for b in budgets:
                for variant in spec.variants:
                    for t in range(spec.trials):
                        hp = {**trial_hparams(method, t, spec), **variant}
                        for seed in spec.seeds:
                            cfg = RunConfig(method, src, tgt, seed=seed, budget=b, steps=spec.steps,
                                            eval_every=spec.eval_every, backbone=spec.backbone,
                                            pretrained=spec.pretrained, split_seed=spec.split_seed,
                                            precision=spec.precision, hparams=hp)
                            try:
                                validate(cfg)
                            except DalabError as e:
                                if not variant:
                                    raise
                                msg = f"variant {variant} skipped for {method}: {e}"
                                if skipped is not None and msg not in skipped:
                                    skipped.append(msg)
                                continue
                            out.append((cfg, t))
    return out


# --------------------------------------------------------------------------- run states and claims

def run_state(runs_dir: Path, run_id: str) -> str:
    """done (finished: record + marker), claimed (someone is on it), partial (started, not
    finished: will be redone), or missing."""
    d = runs_dir / run_id
    if (d / "done").is_file() and (d / "record.json").is_file():
        return "done"
    if (runs_dir / f"{run_id}.claim").exists():
        return "claimed"
    return "partial" if d.exists() else "missing"


def run_or_load(cfg, runs_dir: str | os.PathLike, device: str = "auto", cached_only: bool = False,
                tensorboard: bool = True) -> dict | None:
    """The record of run ``cfg``: read when it is done under ``runs_dir``, else trained now (or
    ``None`` with ``cached_only``). For benchmark scripts that reuse finished runs."""
    from dalab.trainer import train

    rd = Path(runs_dir)
    if run_state(rd, cfg.run_id()) == "done":
        return json.loads((rd / cfg.run_id() / "record.json").read_text())
    if cached_only:
        return None
    return train(cfg, rd, device=device, progress=False, tensorboard=tensorboard)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def try_claim(runs_dir: Path, run_id: str) -> bool:
    """Atomically claim a run for this process (O_EXCL file). Takes over stale claims of dead
    processes on this host."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    path = runs_dir / f"{run_id}.claim"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                return False  # being written right now by its owner
            if owner.get("host") == me["host"] and not _pid_alive(int(owner.get("pid", -1))):
                path.unlink(missing_ok=True)  # stale: its process died
                continue
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True
    return False


def release_claim(runs_dir: Path, run_id: str) -> None:
    (runs_dir / f"{run_id}.claim").unlink(missing_ok=True)


# --------------------------------------------------------------------------- workers and launchers

def work(cfg_dicts: list[dict], runs_dir: str, device: str = "auto", threads: int | None = None,
         data_root: str | None = None, worker: str = "", compile: bool = False) -> list[tuple[str, str]]:
    """Train every not-yet-done run of the list that this worker can claim. Returns
    [(run_id, state)] where state is done / diverged / skipped / failed: <error>."""
    import torch

    from dalab.trainer import RunConfig, train

    if threads:
        torch.set_num_threads(threads)
    rd = Path(runs_dir)
    results = []
    for d in cfg_dicts:
        cfg = RunConfig(**d)
        rid = cfg.run_id()
        if run_state(rd, rid) == "done" or not try_claim(rd, rid):
            results.append((rid, "skipped"))
            continue
        try:
            if run_state(rd, rid) == "done":  # finished by another worker between check and claim
                results.append((rid, "skipped"))
                continue
            t0 = time.perf_counter()
            # a partial run (killed mid-way) continues from its last checkpoint
            rec = train(cfg, rd, device=device, progress=False, data_root=data_root,
                        checkpoint_every=cfg.eval_every, resume=True, compile=compile)
            acc = rec["final"]["tgt_test"]["acc"] * 100 if rec["final"] else float("nan")
            print(f"{worker}{rec['status']:<8} {rid}  tgt_test {acc:5.1f}  "
                  f"({time.perf_counter() - t0:.0f} s, {rec['train']['steps_per_s']:.0f} steps/s)", flush=True)
            results.append((rid, rec["status"]))
        except DalabError:
            raise
        except Exception as e:  # one broken run must not kill the grid
            print(f"{worker}FAILED   {rid}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            results.append((rid, f"failed: {type(e).__name__}: {e}"))
        finally:
            release_claim(rd, rid)
    return results


def _worker_entry(args) -> list[tuple[str, str]]:
    return work(*args)


def worker_placement(jobs: int, ngpu: int, cores: int, device: str = "auto") -> list[tuple[str, int]]:
    """(device, torch threads) of each local worker. With GPUs, worker i runs on cuda:(i mod ngpu),
    so jobs > ngpu puts several concurrent runs on each GPU; every worker keeps a slice of the CPU
    cores (its Python loop, evaluation metrics). Without GPUs the workers split the cores."""
    threads = max(1, cores // max(jobs, 1))
    if ngpu:
        return [(f"cuda:{i % ngpu}", threads) for i in range(jobs)]
    return [("cpu" if device == "auto" else device, threads) for _ in range(jobs)]


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask (what Slurm's --cpus-per-task, taskset or
    a container grant), not the machine's count -- os.cpu_count() on a shared 128-core node would
    give every worker far too many threads."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def local_placement(jobs: int, device: str = "auto") -> list[tuple[str, int]]:
    """:func:`worker_placement` for this machine: the GPUs torch sees (``CUDA_VISIBLE_DEVICES``
    applies: ``cuda:i`` is the i-th visible GPU, and spawned workers inherit the variable) unless
    ``device`` names a CPU or one GPU, and the cores of :func:`available_cores`. Prints one line
    saying where each worker goes."""
    import torch

    ngpu = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    placement = worker_placement(jobs, ngpu, available_cores(), device)
    where = {}
    for dev, _ in placement:
        where.setdefault(dev, 0)
        where[dev] += 1
    names = {f"cuda:{i}": torch.cuda.get_device_name(i) for i in range(ngpu)}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    print(f"{jobs} workers, {placement[0][1]} CPU threads each: " + ", ".join(
        f"{n} on {dev}" + (f" ({names[dev]})" if dev in names else "") for dev, n in where.items())
        + (f"; CUDA_VISIBLE_DEVICES={visible}" if ngpu and visible is not None else ""), flush=True)
    return placement


def launch(spec: BenchSpec, grid, launcher: str = "local", jobs: int = 1, device: str = "auto",
           data_root: str | None = None, submitit_dir: str | None = None, slurm: dict | None = None,
           compile: bool = False):
    """Run every not-done run of ``grid``; returns [(run_id, state)]."""
    todo = [cfg.__dict__ for cfg, _ in grid if run_state(Path(spec.runs_dir), cfg.run_id()) != "done"]
    if not todo:
        return []
    if launcher == "local" and jobs <= 1:
        return work(todo, spec.runs_dir, device, None, data_root, "", compile)
    if launcher == "local":
        import multiprocessing as mp

        args = [(todo, spec.runs_dir, dev, threads, data_root, f"[w{i}] ", compile)
                for i, (dev, threads) in enumerate(local_placement(jobs, device))]
        with mp.get_context("spawn").Pool(jobs) as pool:
            parts = pool.map(_worker_entry, args)
        return _merge(parts)
    if launcher in ("submitit-local", "slurm"):
        import submitit

        folder = submitit_dir or str(Path(spec.runs_dir) / "_submitit")
        ex = submitit.LocalExecutor(folder) if launcher == "submitit-local" else submitit.AutoExecutor(folder)
        ex.update_parameters(timeout_min=(slurm or {}).get("timeout_min", 24 * 60),
                             **{k: v for k, v in (slurm or {}).items() if k != "timeout_min"})
        n = max(1, jobs)
        chunks = [todo[i::n] for i in range(n)]
        jobs_ = [ex.submit(work, c, spec.runs_dir, device, None, data_root, f"[job{i}] ", compile)
                 for i, c in enumerate(chunks) if c]
        return _merge([j.result() for j in jobs_])
    raise DalabError(f"unknown launcher {launcher!r}; use local, submitit-local or slurm")


def _merge(parts) -> list[tuple[str, str]]:
    """Several workers saw every run; keep each run's most informative state."""
    best: dict[str, str] = {}
    for part in parts:
        for rid, st in part:
            if rid not in best or best[rid] == "skipped":
                best[rid] = st
    return list(best.items())


# --------------------------------------------------------------------------- where a grid's time goes

def time_split(records: list[dict], wall_s: float, workers: int) -> dict[str, float]:
    """How ``workers`` processes spent ``wall_s`` seconds on the runs of ``records`` (those trained
    by this launch): training steps, evaluation, per-run set-up (data, model, records) and the rest
    (orchestration: process start-up, imports, waiting for the last worker). ``efficiency`` is the
    training-step time over the workers' total time: what a bare loop doing only the grid's steps
    would need, relative to the wall clock (the trainer's step costs within a few % of a bare
    loop's: results/speed.md)."""
    total = max(wall_s * max(workers, 1), 1e-9)
    train = sum(r["train"]["train_time_s"] for r in records)
    ev = sum(r["train"].get("eval_time_s", 0.0) for r in records)
    run = sum(r["train"]["wall_time_s"] for r in records)
    return {"runs": len(records), "wall_s": wall_s, "workers": workers, "train_s": train, "eval_s": ev,
            "setup_s": max(run - train - ev, 0.0), "orchestration_s": max(total - run, 0.0),
            "efficiency": train / total}


def format_time_split(t: dict[str, float]) -> str:
    total = t["wall_s"] * t["workers"]
    parts = ", ".join(f"{k[:-2]} {t[k]:.0f} s ({100 * t[k] / max(total, 1e-9):.0f}%)"
                      for k in ("train_s", "eval_s", "setup_s", "orchestration_s"))
    return (f"time split over {t['workers']} worker(s) x {t['wall_s']:.0f} s for {t['runs']} runs: {parts}; "
            f"grid efficiency (training-step time / worker time) {t['efficiency']:.2f}")
