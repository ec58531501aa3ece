"""ued_fast: knowledge distillation from a Unified Ensemble of Specialized Teachers, with fused ops."""
from ._backend import available_backends
from ._backend import extension_loaded as _load_extension
from .ops.ensemble_kd_loss import EnsembleKDLoss, ensemble_kd_loss
from .ops.fused_linear_kd_loss import (FusedLinearEnsembleKDLoss, FusedLinearKDLoss, FusedLinearSparseKDLoss,
                                       fused_linear_ensemble_kd_loss, fused_linear_kd_loss,
                                       fused_linear_sparse_kd_loss)
from .ops.grouped_heads import GroupedHeads, grouped_heads
from .ops._checks import set_input_checks
from .ops.kd_loss import KDLoss, kd_loss
from .presets import PRESET_DIFFERENCES, PRESETS, preset_kwargs
from .reference import ensemble_kd_loss_reference, grouped_heads_reference, kd_loss_reference
from .ops.sparse_kd_loss import SparseKDLoss, sparse_kd_loss, sparse_kd_loss_reference

_load_extension()

__version__ = "0.1.0"
__all__ = [
    "kd_loss", "KDLoss", "ensemble_kd_loss", "EnsembleKDLoss", "grouped_heads", "GroupedHeads",
    "kd_loss_reference", "ensemble_kd_loss_reference", "grouped_heads_reference", "available_backends",
    "fused_linear_kd_loss", "FusedLinearKDLoss", "fused_linear_ensemble_kd_loss", "FusedLinearEnsembleKDLoss",
    "set_input_checks", "PRESETS", "PRESET_DIFFERENCES", "preset_kwargs", "sparse_kd_loss",
    "sparse_kd_loss_reference", "SparseKDLoss", "fused_linear_sparse_kd_loss", "FusedLinearSparseKDLoss",
]
