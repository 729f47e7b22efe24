"""Named source -> target pairs: the benchmarks, read by ``dalab list`` and benchmark scripts.

``DEFAULT_PAIRS`` is the offline digits benchmark (nothing downloaded): four shifts of different
kinds -- writer/resolution (mnist5k <-> ucidigits), synthetic fonts -> handwriting (syndigits ->
mnist5k) and texture/colour (mnist5k -> mnistm5k). The disk benchmarks use the standard pairs of
their papers; their domains need ``--data-root``.
"""

from __future__ import annotations

from itertools import permutations

Pair = tuple[str, str]

DEFAULT_PAIRS: list[Pair] = [("mnist5k", "ucidigits"), ("ucidigits", "mnist5k"),
                             ("syndigits", "mnist5k"), ("mnist5k", "mnistm5k")]

# The label-set splits of the digits tasks (class indices = the digits), one per setting other than
# closed-set (dalab.tasks.LabelSet); a task is a pair with one of these (``setting:`` in a spec,
# ``--setting`` in ``dalab run``). Open-set follows OSBP's digit experiments (digits 0-4 known,
# 5-9 the target's unknown), partial keeps half of the classes in the target as PADA's protocol
# keeps a third of Office-31's, and universal splits the classes 4 / 3 / 3 (shared / source-private
# / target-private), UAN's proportions on Office-31 (10 / 10 / 11).
LABEL_SETS: dict[str, dict[str, range | tuple[int, ...]]] = {
    "partial": {"shared": range(0, 5), "source_private": range(5, 10)},
    "openset": {"shared": range(0, 5), "target_private": range(5, 10)},
    "universal": {"shared": range(0, 4), "source_private": range(4, 7), "target_private": range(7, 10)},
}


def _all_pairs(prefix: str, domains: tuple[str, ...]) -> list[Pair]:
    """Every ordered pair of distinct domains of one dataset (the Office protocol)."""
    return [(f"{prefix}_{s}", f"{prefix}_{t}") for s, t in permutations(domains, 2)]


def _benchmarks() -> dict[str, list[Pair]]:
    from .office import DATASETS  # domain names are written once, there

    out = {
        "digits": DEFAULT_PAIRS,
        "digits-extra": [("mnist5k", "mnist5k_rot"), ("mnist5k", "mnist5k_color"),
                         ("syndigits", "ucidigits"), ("mnistm5k", "mnist5k")],
        "digits-disk": [("mnist", "usps"), ("usps", "mnist"), ("svhn", "mnist"), ("mnist", "mnistm")],
    }
    for ds in DATASETS.values():
        out[ds.prefix] = ([(f"{ds.prefix}_{s}", f"{ds.prefix}_{t}") for s, t in ds.pairs]
                          if ds.pairs else _all_pairs(ds.prefix, ds.domains))
    return out


BENCHMARKS: dict[str, list[Pair]] = _benchmarks()
PAIRS: list[Pair] = [p for pairs in BENCHMARKS.values() for p in pairs]
