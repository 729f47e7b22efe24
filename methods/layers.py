"""Small reusable pieces shared by methods.

Gradient reversal is our own 10-line autograd function rather than pytorch-adapt's
``GradientReversal`` module: the coefficient changes every step (the DANN lambda schedule), which
here is a plain argument instead of a mutated buffer, and it keeps ``import dalab.methods`` free of
pytorch-adapt's heavy import chain (torchmetrics, pytorch-metric-learning; ~3 s).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, coeff: float) -> Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return -ctx.coeff * grad, None


def grad_reverse(x: Tensor, coeff: float = 1.0) -> Tensor:
    """Identity forward; multiplies the gradient by ``-coeff`` backward (Ganin & Lempitsky, 2015)."""
    return _GradReverse.apply(x, float(coeff))


def dann_lambda(p: float, gamma: float = 10.0) -> float:
    """The DANN paper's adaptation-factor schedule lambda_p = 2 / (1 + exp(-gamma p)) - 1."""
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0
