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
