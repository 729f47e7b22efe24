"""Methods: the shared interface (:mod:`.base`) and every registered method, one file each."""

from .base import (METHODS, SHARED_HPARAMS, Batch, HParam, Method, TargetData, get_method, register,
                   resolve_hparams)
from . import source_only, dann  # noqa: F401,E401  (each module registers its method)

__all__ = ["METHODS", "SHARED_HPARAMS", "Batch", "HParam", "Method", "TargetData", "get_method",
           "register", "resolve_hparams"]
