"""One run over N processes (data-parallel), launched by PyTorch's own ``torchrun``:

    torchrun --nproc_per_node N -m dalab run --method dann --source ... --target ... [--steps ...]

torchrun starts N copies of ``dalab run`` with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set; the CLI
calls :func:`init_from_env`, which joins the process group (NCCL for one GPU per rank, gloo on CPU
or when ranks share a GPU) and makes the :class:`Dist` context that :func:`dalab.trainer.train`
reads through :func:`context`. Without torchrun nothing here runs and a run is one process.

What is distributed, and where:

- **Gradients.** Every optimizer step of every method goes through
  :meth:`dalab.optim.Optimization.step` (the trainer owns backward); :meth:`Dist.prepare` installs
  :meth:`Dist.average_gradients` there, so after ``loss.backward()`` and before the optimizer steps
  the gradients are averaged over the ranks (one flat all-reduce per optimizer step). The model is
  NOT wrapped in ``torch.nn.parallel.DistributedDataParallel``: methods call submodules directly
  (``self.net.backbone``, ``self.net.head``, discriminators), which would bypass a DDP wrapper's
  ``forward`` and hence its gradient hooks. The price: no bucketing and no overlap of the
  all-reduce with backward (a later optimisation: per-parameter post-accumulate-grad hooks).
- **Parameters and buffers** are broadcast from rank 0 once at the start (ranks are seeded alike
  anyway; this makes it a guarantee). Averaged gradients keep them identical afterwards.
- **Data.** Every rank draws the SAME global batch (``batch_size`` per domain, the spec's number)
  from the same seeded sampler and keeps its contiguous slice (:meth:`Dist.shard`). The global
  data stream is therefore the one-process stream whatever N is (a checkpoint resumes under any
  N), and a per-rank mean loss averaged over ranks is the global mean loss: for losses that are
  means over samples (cross-entropy, DANN's domain loss) an N-process step equals a one-process
  step up to float rounding (tested: ``tests/test_distributed.py``). Losses that are statistics
  of the whole batch (MMD, CORAL, BNM's nuclear norm, MCC, IM's diversity, batch mixup pairs) are
  computed per rank on ``batch_size / N`` samples and averaged, as with any DDP training.
  ``batch_size`` must be divisible by N. Image-folder domains decode only the rank's slice (the
  same sampler and generator as one process, sliced before decoding; each rank draws its own
  augmentations), tensor domains index the global batch on the device and slice it.
- **BatchNorm** layers become ``torch.nn.SyncBatchNorm`` on CUDA, so batch statistics are those
  of the global batch: ``bn_mode=joint`` (one forward on cat(source, target)) pools both domains
  over all ranks, ``bn_mode=split`` (one forward per domain) gives per-domain statistics of the
  global per-domain batch, exactly as in one process. SyncBatchNorm has no CPU kernel: on CPU
  (gloo) each rank normalises with its shard's statistics, and the record says ``sync_bn: false``;
  use a BN-free backbone (``lenet``) when CPU runs must match one process.
- **Rank 0 alone** evaluates, logs to TensorBoard, shows progress, writes checkpoints, the model
  and the record; the record is then broadcast so every rank returns the same one. Logged losses
  are averaged over ranks (the global batch's loss), and a non-finite loss on any rank stops every
  rank at the same step (a run that stopped on one rank only would leave the others waiting).

Verified on CPU only (gloo, 2 processes); the CUDA paths (NCCL, SyncBatchNorm) have not been run
in this project (no GPU was available).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from dalab.utils import DalabError

_CTX: "Dist | None" = None


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Dist:
    """This process's place in a multi-process run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    sync_bn: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------------- model
    def prepare(self, method: torch.nn.Module, batch_size: int) -> None:
        """Before training: SyncBatchNorm on CUDA, rank 0's parameters and buffers everywhere,
        gradient averaging installed in the method's :class:`~dalab.optim.Optimization`."""
        if batch_size % self.world_size:
            raise DalabError(f"batch_size={batch_size} is not divisible by the {self.world_size} processes; "
                             f"use --nproc_per_node dividing it, or --set batch_size=... (the global batch)")
        if self.device.type == "cuda":
            self.sync_bn = sync_batchnorm(method)
        with torch.no_grad():
            for t in [*method.parameters(), *method.buffers()]:
                dist.broadcast(t.data, 0)
        method.optim.grad_sync = self.average_gradients

    def average_gradients(self, params: Iterable[Tensor]) -> None:
        """Replace each gradient by its mean over the ranks: one flat all-reduce per dtype.
        Every rank runs the same code on the same parameters, so the set of parameters that have a
        gradient is the same on every rank."""
        grads = [p.grad for p in params if p.grad is not None]
        by_type: dict[tuple, list[Tensor]] = {}
        for g in grads:
            by_type.setdefault((g.dtype, g.device), []).append(g)
        for group in by_type.values():
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat)  # SUM (gloo has no AVG)
            flat.div_(self.world_size)
            offset = 0
            for g in group:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    # ---------------------------------------------------------------- data
    def sampler(self, split, batch_size: int, generator: torch.Generator, augment: str):
        """``split.sampler(...)`` as this rank sees it: its slice of every global batch. A split that
        can decode only its slice (image folders: ``shard=``) does so; a tensor split is sliced."""
        import inspect

        if "shard" in inspect.signature(split.sampler).parameters:
            return split.sampler(batch_size, generator, augment, shard=(self.rank, self.world_size))
        return self.shard(split.sampler(batch_size, generator, augment))

    def shard(self, batches: Iterator[tuple[Tensor, ...]] | None) -> Iterator[tuple[Tensor, ...]] | None:
        """This rank's contiguous slice of every global batch of ``batches``."""
        if batches is None:
            return None

        def sliced():
            for batch in batches:
                yield tuple(t.tensor_split(self.world_size)[self.rank] for t in batch)

        return sliced()

    # ---------------------------------------------------------------- agreement
    def average_scalars(self, values: dict[str, float]) -> dict[str, float]:
        """Logged losses averaged over the ranks (same keys on every rank)."""
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return {k: v / self.world_size for k, v in zip(keys, t.tolist())}

    def all_true(self, flag: Tensor | bool) -> Tensor:
        """``flag`` AND-ed over the ranks (a 0-dim bool tensor): so that every rank takes the same
        branch (e.g. stop on a non-finite loss) at the same step."""
        t = torch.as_tensor(flag, device=self._comm_device).to(torch.int32).reshape(1)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t[0].bool()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (e.g. the finished record)."""
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, 0, device=self._comm_device)
        return box[0]

    def restore_cuda_rng(self, rng: dict) -> None:
        """Rank 0 checkpointed its own GPU's RNG state; every rank drew the same numbers on its
        own GPU, so that state is each rank's, on its own device."""
        if rng.get("cuda") and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"][0].cpu(), self.device)

    def record_info(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend, "sync_bn": self.sync_bn,
                "grad_sync": "all-reduce mean after backward (dalab.distributed)"}

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.backend.startswith("cpu:gloo,cuda:nccl") else torch.device("cpu")


def sync_batchnorm(module: torch.nn.Module) -> bool:
    """Turn every BatchNorm layer of ``module`` into ``torch.nn.SyncBatchNorm`` in place (same
    Parameter objects, so optimizers already built keep stepping them). True if any was found."""
    from dalab.methods.nets import has_batchnorm

    if not has_batchnorm(module):
        return False
    for name, child in module.named_children():
        setattr(module, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return True


def context() -> Dist | None:
    """The multi-process context of this run, or None (one process)."""
    return _CTX


def init_from_env(device: str = "auto") -> Dist | None:
    """Join the process group torchrun describes in the environment; None when not launched by it.
    CUDA (``--device auto``/``cuda`` with GPUs visible): rank r uses GPU ``LOCAL_RANK mod #GPUs``,
    NCCL when every local rank has its own GPU, gloo when ranks share one (NCCL refuses that)."""
    global _CTX
    if _CTX is not None or not launched():
        return _CTX
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device != "cpu" and torch.cuda.is_available():
        ngpu = torch.cuda.device_count()
        dev = torch.device("cuda", local % ngpu)
        torch.cuda.set_device(dev)
        backend = "cpu:gloo,cuda:nccl" if local_world <= ngpu else "gloo"
    elif device.startswith("cuda"):
        raise DalabError(f"--device {device} requested but CUDA is not available; use --device cpu or auto")
    else:
        dev, backend = torch.device("cpu"), "gloo"
    # rank 0 evaluates alone while the others wait in the next step's all-reduce: generous timeout
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
    _CTX = Dist(rank, world, local, dev, backend)
    return _CTX


def shutdown(clean: bool = True) -> None:
    """Leave the process group. After a clean run every rank first meets the others in a barrier:
    a rank that tears its gloo connections down while a peer is still writing the record can die
    with SIGABRT ("terminate called without an active exception") at exit. After an error there is
    no barrier (a failed peer would never arrive); torchrun stops the others."""
    global _CTX
    if _CTX is not None and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
    _CTX = None


def exit_process(code: int) -> None:
    """End a rank's process right after its run, once everything is written and flushed, without the
    interpreter's teardown. After :func:`shutdown`, gloo's C++ worker threads can still be alive while
    the interpreter finalizes; destroying them then aborts the process ("terminate called without an
    active exception", SIGABRT) and torchrun reports the finished run as failed (CI saw it about once
    in ten runs, on rank 0 and on rank 1, even after the barrier). The record, model and checkpoints
    are written atomically before this point and TensorBoard's writer is closed by the trainer, so
    nothing is lost by skipping finalization."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def require_source_run(cfg, runs_dir) -> None:
    """A method that starts from the source-pretrained network needs that ``source_only`` run
    finished before a multi-process run: training it on the fly goes through a claim file that
    one rank would take while the others wait, and the ranks would wait on each other forever."""
    from pathlib import Path

    from dalab.pretrain import source_config

    scfg = source_config(cfg)
    d = Path(runs_dir) / scfg.run_id()
    if not ((d / "done").is_file() and (d / "model.pt").is_file()):
        raise DalabError(f"method {cfg.method!r} starts from the source_only run {scfg.run_id()}, which is not "
                         f"finished under {runs_dir}; train it first with the same torchrun command and "
                         f"--method source_only, then re-run this one")
