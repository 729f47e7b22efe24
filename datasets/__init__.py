"""Domains and their data: the registry (:mod:`.base`) and the built-in domains."""

from .base import (DOMAINS, DomainData, DomainSplits, TensorSplit, budget_name, get_domain,
                   labeled_indices, load_domain, parse_budget, register_domain, stratified_split)
from . import digits  # noqa: F401  (registers the offline digits domains)

__all__ = ["DOMAINS", "DomainData", "DomainSplits", "TensorSplit", "budget_name", "get_domain",
           "labeled_indices", "load_domain", "parse_budget", "register_domain", "stratified_split"]
