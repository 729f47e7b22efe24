"""One run over two processes (torchrun, gloo, CPU) against the same run in one process.

Why the tolerance: on the BN-free ``lenet`` in fp32 with SGD, every loss DANN steps is a mean over
samples, so the average of the two ranks' gradients (each the mean over its half of the global
batch) IS the gradient of the global batch's mean loss; only the order of float additions differs
(the all-reduce sums two partial means). Measured: largest weight difference after 5 steps
7.5e-9 (weights ~0.1, float32 eps 1.2e-7), loss difference 1.2e-7. The bounds below (1e-6 on
weights, 1e-5 relative on losses and label-free scores) leave two orders of magnitude for other
CPUs and thread counts while any real error (an unsynchronised gradient, a wrong shard, a rank
seeing the wrong batch) moves weights by ~1e-3 within one step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dalab.distributed import Dist, sync_batchnorm
from dalab.trainer import RunConfig, train

ARGS = dict(method="dann", source="mnist5k", target="ucidigits", steps=4, eval_every=4, precision="fp32")


def torchrun(runs_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m dalab run ...`` on CPU, as a user would type it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dalab", "run", "--device", "cpu", "--quiet", "--save-model", "--runs-dir", str(runs_dir)]
    for k, v in ARGS.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd + list(extra), capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[dict, dict]:
    """The reference: the same run in this one process (record, final weights); trained once."""
    runs_dir = tmp_path_factory.mktemp("one")
    rec = train(RunConfig(**ARGS), runs_dir, device="cpu", progress=False, save_model=True)
    return rec, torch.load(runs_dir / rec["run_id"] / "model.pt")


def assert_same_run(rec2: dict, w2: dict, rec1: dict, w1: dict) -> None:
    worst = max(float((w2[k] - w1[k]).abs().max()) for k in w1)
    assert worst < 1e-6, f"largest weight difference {worst:.2e}"
    for k, v in rec1["train"]["last_losses"].items():
        assert rec2["train"]["last_losses"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    for k, v in rec1["final"]["tgt_train_unsup"].items():
        assert rec2["final"]["tgt_train_unsup"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    for split in ("src_val", "tgt_val", "tgt_test"):
        assert rec2["final"][split]["acc"] == rec1["final"][split]["acc"]


def test_two_processes_match_one_and_write_once(tmp_path, one_process):
    r = torchrun(tmp_path / "ddp")
    assert r.stdout.count("record:") == 1  # rank 0 prints, rank 1 is silent
    rec1, w1 = one_process
    folders = [p for p in (tmp_path / "ddp").iterdir()]
    assert [p.name for p in folders] == [rec1["run_id"]]  # the same run id: DDP is not part of what a run is
    run = folders[0]
    assert sorted(p.name for p in run.iterdir()) == ["done", "model.pt", "record.json", "tb"]
    assert len(list((run / "tb").iterdir())) == 1  # one TensorBoard events file: rank 0's
    rec2 = json.loads((run / "record.json").read_text())
    assert rec2["train"]["distributed"] == {"world_size": 2, "backend": "gloo", "sync_bn": False,
                                            "grad_sync": "all-reduce mean after backward (dalab.distributed)"}
    assert rec1["train"]["distributed"] is None
    assert_same_run(rec2, torch.load(run / "model.pt"), rec1, w1)


def test_two_processes_resume_a_one_process_checkpoint(tmp_path, monkeypatch, one_process):
    """Every rank draws the global batch and keeps its slice, so the data stream does not depend on
    the number of processes: a checkpoint written by one process resumes under torchrun and ends
    where the uninterrupted one-process run ends."""
    from dalab.methods.base import Method

    real = Method.train_step

    def dies_at_step_3(self, batch, step):
        if step == 3:
            raise RuntimeError("killed")
        return real(self, batch, step)

    monkeypatch.setattr(Method, "train_step", dies_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        train(RunConfig(**ARGS), tmp_path / "ddp", device="cpu", progress=False, checkpoint_every=2)
    monkeypatch.setattr(Method, "train_step", real)
    run = tmp_path / "ddp" / RunConfig(**ARGS).run_id()
    assert (run / "checkpoint.pt").is_file() and not (run / "record.json").exists()

    torchrun(tmp_path / "ddp", "--resume", "--checkpoint-every", "2")
    rec2 = json.loads((run / "record.json").read_text())
    assert rec2["train"]["distributed"]["world_size"] == 2 and not (run / "checkpoint.pt").exists()
    assert [e["step"] for e in rec2["evals"]] == [4]
    rec1, w1 = one_process
    assert_same_run(rec2, torch.load(run / "model.pt"), rec1, w1)


# --------------------------------------------------------------------------- no process group needed

def test_ranks_slice_the_same_global_batch():
    x, y = torch.arange(64.0).view(64, 1), torch.arange(64)
    parts = [next(Dist(r, 4, r, torch.device("cpu"), "gloo").shard(iter([(x, y)]))) for r in range(4)]
    assert [len(p[0]) for p in parts] == [16] * 4
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert Dist(0, 2, 0, torch.device("cpu"), "gloo").shard(None) is None


def test_batch_size_must_split_evenly():
    from dalab.methods import get_method, resolve_hparams
    from dalab.methods.nets import build_classifier
    from dalab.utils import DalabError

    m = get_method("dann")(build_classifier("lenet", 10), 10, resolve_hparams(get_method("dann"), {}), 10)
    with pytest.raises(DalabError, match="batch_size=64 is not divisible by the 3 processes"):
        Dist(0, 3, 0, torch.device("cpu"), "gloo").prepare(m, 64)


def test_sync_batchnorm_keeps_the_optimizers_parameters():
    """SyncBatchNorm replaces the BN modules after the method built its optimizers: the new modules
    must hold the very Parameter objects the optimizers step (checked without a forward: SyncBatchNorm
    has no CPU kernel)."""
    from dalab.methods import get_method, resolve_hparams
    from dalab.methods.nets import batchnorm_layers, build_classifier

    m = get_method("dann")(build_classifier("lenet_bn", 10), 10, resolve_hparams(get_method("dann"), {}), 10)
    before = {id(p) for p in m.parameters()}
    n_bn = len(batchnorm_layers(m))
    assert sync_batchnorm(m) and n_bn == 3  # two in the backbone, one in the discriminator (disc_bn=auto)
    bns = batchnorm_layers(m)
    assert len(bns) == n_bn and all(isinstance(b, torch.nn.SyncBatchNorm) for b in bns)
    assert {id(p) for p in m.parameters()} == before
    stepped = {id(p) for o in m.optim.optimizers.values() for g in o.param_groups for p in g["params"]}
    assert {id(b.weight) for b in bns} <= stepped
    assert not sync_batchnorm(get_method("dann")(build_classifier("lenet", 10), 10,
                                                 resolve_hparams(get_method("dann"), {}), 10))


def test_bench_under_torchrun_is_a_one_line_error(monkeypatch, capsys):
    from dalab.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["bench", "benchmarks/digits.yaml", "--dry-run"]) == 2
    assert "under torchrun use `dalab run ...`" in capsys.readouterr().err


def test_image_folder_ranks_decode_only_their_slice(tmp_path, monkeypatch):
    """An image-folder split under N processes decodes only the rank's slice of the one-process
    batch (same sampler, same generator): the slices put together are the one-process batches."""
    import numpy as np
    from PIL import Image

    from dalab.datasets.images import ImageSplit

    monkeypatch.setenv("DALAB_WORKERS", "0")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(10):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(paths[-1])
    split = ImageSplit(paths, torch.arange(10) % 3, size=8, resize=8)
    decoded = []
    monkeypatch.setattr(split, "_loader", lambda *a, _real=split._loader, **k: _counting(_real(*a, **k), decoded))

    def batches(sampler, n=4):  # 4 batches of 4 from 10 images: crosses an epoch
        return [next(sampler) for _ in range(n)]

    whole = batches(split.sampler(4, torch.Generator().manual_seed(7), "none"))
    n_whole = sum(decoded)
    decoded.clear()
    ranks = [batches(Dist(r, 2, r, torch.device("cpu"), "gloo").sampler(split, 4, torch.Generator().manual_seed(7),
                                                                          "none")) for r in range(2)]
    assert sum(decoded) == n_whole  # together the ranks decode what one process decodes, not N times it
    for i, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([ranks[0][i][0], ranks[1][i][0]]), x)
        assert torch.equal(torch.cat([ranks[0][i][1], ranks[1][i][1]]), y)


def _counting(loader, decoded: list):
    """Wrap a DataLoader: record how many images each batch decoded."""
    class Counting:
        def __iter__(self):
            for x, y in loader:
                decoded.append(len(y))
                yield x, y
    return Counting()
