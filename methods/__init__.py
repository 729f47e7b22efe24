"""Methods: the shared interface (:mod:`.base`) and every registered method, one file each."""

from .base import (METHODS, SHARED_HPARAMS, Batch, HParam, Method, TargetData, get_method, register,
                   resolve_hparams)
from . import (source_only, target_only, frozen_features, arch_mod, finetune,  # noqa: F401,E401
               dann, cdan, mdd, joint, dan, deep_coral, mcc, bnm, entropy_min, im, afn, shot,
               self_ensembling, adamatch, mcd, adda, pada, osbp, ovanet,
               no_adapt, bn_adapt, tent, sar, cotta,
               m3sda, ms_dann, mdan, dg_coral, vrex, groupdro, irm, mixstyle, dann_dg)  # each registers its method

__all__ = ["METHODS", "SHARED_HPARAMS", "Batch", "HParam", "Method", "TargetData", "get_method",
           "register", "resolve_hparams"]
