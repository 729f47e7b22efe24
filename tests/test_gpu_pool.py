"""The local GPU pool of ``dalab bench --jobs N``, tested without a GPU: torch's device count and
names, the CPU affinity mask and the worker pool are mocked; what is checked is where each worker
would go (device, threads) and what the user is told. CUDA itself never runs here."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from dalab import bench
from dalab.bench import BenchSpec, expand, launch, local_placement, worker_placement


@pytest.fixture
def machine(monkeypatch):
    """A fake machine: ``set(gpus=[names], cores=n)``; the visible GPUs follow CUDA_VISIBLE_DEVICES
    the way torch's do (a comma-separated list of physical indices; empty = none)."""

    def set_(gpus: list[str], cores: int):
        def visible() -> list[str]:
            import os
            env = os.environ.get("CUDA_VISIBLE_DEVICES")
            if env is None:
                return gpus
            return [gpus[int(i)] for i in env.split(",") if i.strip() != "" and int(i) < len(gpus)]

        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(visible()))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: visible()[i])
        monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(visible()))
        monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: set(range(cores)))

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return set_


@pytest.fixture
def pool(monkeypatch):
    """Replaces the spawn context: records each worker's (todo, runs_dir, opts, threads, ...)
    instead of starting processes; every fake worker reports an empty result at once."""
    import queue

    calls: list[tuple] = []

    class FakeProcess:
        pid = None

        def __init__(self, target=None, name=None, args=()):
            self.q, self.work_args = args
            calls.append(self.work_args)

        def start(self):
            self.q.put(("ok", []))

        def is_alive(self):
            return False

        def join(self):
            pass

    class Ctx:
        def Queue(self):  # noqa: N802 -- multiprocessing's names
            return queue.Queue()

        def Process(self, **kw):  # noqa: N802
            return FakeProcess(**kw)

    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: Ctx())
    return calls


def placed(calls) -> list[tuple[str, int]]:
    """(device, threads) of each recorded worker."""
    return [(a[2].device, a[3]) for a in calls]


def grid_of(tmp_path):
    spec = BenchSpec.from_dict({"methods": ["source_only", "dann"], "pairs": [["mnist5k", "ucidigits"]],
                                "seeds": [0, 1], "steps": 5, "runs_dir": str(tmp_path / "runs")})
    return spec, expand(spec)


def test_eight_jobs_share_one_gpu(machine, pool, tmp_path, capsys):
    machine(["NVIDIA H200"], cores=16)
    spec, grid = grid_of(tmp_path)
    launch(spec, grid, jobs=8)
    assert placed(pool) == [("cuda:0", 2)] * 8                  # 8 runs on one GPU, 16 cores / 8
    assert all(len(a[0]) == len(grid) for a in pool)              # every worker sees the grid, claims decide
    assert "8 workers, 2 CPU threads each: 8 on cuda:0 (NVIDIA H200)" in capsys.readouterr().out


def test_jobs_round_robin_over_gpus(machine, pool, tmp_path, capsys):
    machine(["GPU-A", "GPU-B", "GPU-C"], cores=12)
    spec, grid = grid_of(tmp_path)
    launch(spec, grid, jobs=7)
    assert [d for d, _ in placed(pool)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    assert {t for _, t in placed(pool)} == {1}                    # 12 cores // 7 workers
    assert "3 on cuda:0 (GPU-A), 2 on cuda:1 (GPU-B), 2 on cuda:2 (GPU-C)" in capsys.readouterr().out


def test_cuda_visible_devices_is_respected(machine, pool, tmp_path, monkeypatch, capsys):
    """Workers are placed on the visible GPUs only, by logical index: with CUDA_VISIBLE_DEVICES=2,3
    ``cuda:0`` is physical GPU 2 in the worker too (spawned workers inherit the variable)."""
    machine(["G0", "G1", "G2", "G3"], cores=8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    spec, grid = grid_of(tmp_path)
    launch(spec, grid, jobs=4)
    assert [d for d, _ in placed(pool)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    out = capsys.readouterr().out
    assert "2 on cuda:0 (G2), 2 on cuda:1 (G3); CUDA_VISIBLE_DEVICES=2,3" in out
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")                # no GPU visible: CPU workers
    assert local_placement(2) == [("cpu", 4), ("cpu", 4)]


def test_device_choice_overrides_the_pool(machine):
    machine(["G0", "G1"], cores=8)
    assert local_placement(4, "cpu") == [("cpu", 2)] * 4          # GPUs present, CPU asked for
    assert local_placement(3, "cuda:1") == [("cuda:1", 2)] * 3    # all workers on the named GPU
    assert [d for d, _ in local_placement(3, "cuda")] == ["cuda:0", "cuda:1", "cuda:0"]


def test_cpu_threads_split_the_cores_this_process_may_use(machine):
    """The cores come from the affinity mask (Slurm's --cpus-per-task, taskset), not the machine."""
    machine([], cores=6)
    assert local_placement(3) == [("cpu", 2)] * 3
    assert local_placement(4) == [("cpu", 1)] * 4                 # 6 // 4, never 0
    assert local_placement(10) == [("cpu", 1)] * 10               # more workers than cores
    assert bench.available_cores() == 6
    assert worker_placement(2, 0, 2) == [("cpu", 1), ("cpu", 1)]


def test_a_worker_applies_its_thread_share(tmp_path):
    before = torch.get_num_threads()
    try:
        assert bench.work([], str(tmp_path), threads=3) == []
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
