"""Test-time streams: the order in which a test-time adaptation (TTA) run sees its target batches.

A TTA run (a method with ``test_time = True``, methods/test_time.py) starts from the shared source
model and walks a stream of unlabeled target batches. For each batch the trainer records the
prediction FIRST, then lets the method adapt on that batch (:class:`dalab.trainer.StreamLoop`); the
online accuracy over the whole stream is the run's headline number.

The stream's options are the test-time methods' data options (declared once, in
:data:`STREAM_HPARAMS`; part of every TTA run's config and id, rows of a spec's ``variants:``):

- ``stream_order``: ``iid`` (a seeded shuffle per pass), ``class_sorted`` (all samples of class 0,
  then class 1, ...; shuffled within a class), ``dirichlet`` (label shift over time: each class's
  samples are spread over the stream's time slots with proportions ~ Dir(``stream_alpha``), as in
  the non-i.i.d. streams of Gong et al. 2022 / Yuan et al. 2023 (NOTE, RoTTA); small alpha is close
  to class-sorted, large alpha to i.i.d.);
- ``batch_size`` (the shared one): the stream's batch size; the last partial batch of a pass is kept
  (every target sample is predicted exactly once per pass);
- ``stream_passes``: passes over each domain's data;
- ``stream_reset``: ``none`` (the model keeps adapting along the stream) or ``episodic`` (back to
  the source model after every batch);
- ``stream_domains``: continual TTA, the target domains the stream walks through in order
  (comma-separated; empty = the task's target only). The task's target must be the first: the
  final model is scored on its test split after the whole stream (what the continual stream did
  to the first domain).

The stream reads each domain's TRAIN split (labels are never given to the method: they score the
online predictions), so the final model's target-TEST accuracy is measured on data the stream
never showed. Order is always drawn explicitly from the run seed, never inherited from a split's
storage order (mnist5k is stored sorted by class).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from dalab.utils import DalabError

ORDERS = {"iid": "a seeded shuffle of the domain's samples per pass",
          "class_sorted": "class 0's samples first, then class 1's, ... (shuffled within a class)",
          "dirichlet": "label shift over time: each class spread over the time slots ~ Dir(stream_alpha)"}
RESETS = {"none": "the model keeps adapting along the whole stream",
          "episodic": "back to the source model after every batch"}


def stream_hparams() -> dict[str, Any]:
    """The stream options every test-time method declares (methods/test_time.py)."""
    from dalab.methods.base import HParam

    return {
        "stream_order": HParam("iid", None, "test-time stream order: " + "; ".join(f"{k}: {v}" for k, v in ORDERS.items()),
                               choices=tuple(ORDERS)),
        "stream_alpha": HParam(1.0, None, "Dirichlet concentration of stream_order=dirichlet (smaller: closer to "
                               "class-sorted)", low=1e-3, high=1e6),
        "stream_passes": HParam(1, None, "passes over each stream domain's data", low=1, high=100),
        "stream_reset": HParam("none", None, "reset policy: " + "; ".join(f"{k}: {v}" for k, v in RESETS.items()),
                               choices=tuple(RESETS)),
        "stream_domains": HParam("", None, "continual TTA: comma-separated target domains the stream walks through, "
                                 "the task's target first (empty: the task's target only)"),
        "adapt_steps": HParam(1, None, "adaptation steps the method takes on each stream batch (after predicting it)",
                              low=1, high=100),
    }


@dataclass(frozen=True)
class StreamOptions:
    """A TTA run's stream, read from its resolved hyperparameters."""

    order: str
    alpha: float
    batch_size: int
    passes: int
    reset: str
    domains: tuple[str, ...]  # the target domains in stream order (the task's target first)
    adapt_steps: int

    @classmethod
    def of(cls, hp: Mapping[str, Any], target: str) -> "StreamOptions":
        doms = tuple(d.strip() for d in str(hp["stream_domains"]).split(",") if d.strip()) or (target,)
        return cls(hp["stream_order"], float(hp["stream_alpha"]), int(hp["batch_size"]), int(hp["stream_passes"]),
                   hp["stream_reset"], doms, int(hp["adapt_steps"]))

    def check(self, source: str, target: str) -> None:
        """One-line errors for a stream this task cannot have (before anything is loaded)."""
        from dalab.datasets.base import get_domain
        from dalab.tasks import source_domains

        if self.domains[0] != target:
            raise DalabError(f"stream_domains={','.join(self.domains)!r} must start with the task's target {target!r} "
                             f"(the final model is scored on its test split); put {target} first or change --target")
        if len(set(self.domains)) != len(self.domains):
            raise DalabError(f"stream_domains={','.join(self.domains)!r} repeats a domain; use stream_passes for "
                             f"several passes over one domain")
        for d in self.domains:
            get_domain(d)  # unknown: one line naming the known ones
            if d in source_domains(source):
                raise DalabError(f"stream_domains includes the source domain {d!r}: a test-time stream is "
                                 f"target data only; remove it")

    def text(self) -> str:
        """Short description for tables: ``class_sorted, batch 16, continual 3 domains``."""
        s = self.order + (f" α={self.alpha:g}" if self.order == "dirichlet" else "") + f", batch {self.batch_size}"
        if self.passes > 1:
            s += f", {self.passes} passes"
        if self.reset != "none":
            s += f", {self.reset}"
        if len(self.domains) > 1:
            s += ", continual " + "→".join(self.domains)
        return s


def order(labels: np.ndarray, how: str, rng: np.random.Generator, batch_size: int, alpha: float = 1.0) -> np.ndarray:
    """One pass over a split: a permutation of ``range(len(labels))`` in stream order ``how``."""
    n = len(labels)
    if how == "iid":
        return rng.permutation(n)
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    if how == "class_sorted":
        return np.concatenate(by_class)
    if how == "dirichlet":
        slots = max(1, math.ceil(n / batch_size))
        placed: list[list[np.ndarray]] = [[] for _ in range(slots)]
        for idx in by_class:
            p = rng.dirichlet(np.full(slots, alpha))
            cuts = np.round(np.cumsum(p)[:-1] * len(idx)).astype(int)
            for s, part in enumerate(np.split(idx, cuts)):
                placed[s].append(part)
        return np.concatenate([rng.permutation(np.concatenate(parts)) for parts in placed])
    raise DalabError(f"stream_order={how!r} is not one of {', '.join(ORDERS)}")


def batches(domains: Sequence[tuple[str, Any]], opts: StreamOptions, seed: int) -> Iterator[tuple[str, Any, Any]]:
    """The stream: (domain name, model inputs, labels) per batch, domains in order, ``passes`` over
    each, the order of every pass drawn from ``seed`` (never the split's storage order)."""
    rng = np.random.default_rng([seed, 7919])
    for name, split in domains:
        labels = split.labels.cpu().numpy()
        for _ in range(opts.passes):
            perm = order(labels, opts.order, rng, opts.batch_size, opts.alpha)
            sub = split.subset(perm)
            for x, y in sub.batches(opts.batch_size):
                yield name, x, y


def length(sizes: Sequence[int], opts: StreamOptions) -> int:
    """Number of batches of a stream over domains of these train sizes."""
    return sum(opts.passes * math.ceil(n / opts.batch_size) for n in sizes)
