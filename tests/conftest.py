"""Shared fixtures: everything offline, on CPU, small and deterministic."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def runs_dir(tmp_path):
    return tmp_path / "runs"


def tiny_batch(n: int = 8, seed: int = 0, labeled: bool = True, unlabeled: bool = True, source: bool = True):
    """A Batch of random 3x28x28 inputs for 10 classes (``source=False``: no source fields, as the
    trainer builds them for a source-free method; the target draws stay the same)."""
    from dalab.methods import Batch

    g = torch.Generator().manual_seed(seed)
    b = Batch(torch.randn(n, 3, 28, 28, generator=g), torch.arange(n) % 10)
    if not source:
        b.x_src = b.y_src = None
    if unlabeled:
        b.x_tgt = torch.randn(n, 3, 28, 28, generator=g) + 0.5
    if labeled:
        b.x_tgt_lab = torch.randn(n, 3, 28, 28, generator=g) + 0.5
        b.y_tgt_lab = (torch.arange(n) + 3) % 10
    return b


@contextmanager
def killed_at_step(cls, step: int, exc: type[BaseException] = KeyboardInterrupt, attr: str = "update"):
    """Inside: ``cls.<attr>`` raises ``exc`` at training step ``step`` -- a run killed between two
    checkpoints. The real method is back on exit."""
    real = getattr(cls, attr)

    def dies(self, batch, s):
        if s == step:
            raise exc("killed")
        return real(self, batch, s)

    setattr(cls, attr, dies)
    try:
        yield
    finally:
        setattr(cls, attr, real)
