"""ued_fast: knowledge distillation from a Unified Ensemble of Specialized Teachers, with fused ops."""
from ._backend import available_backends
from ._backend import extension_loaded as _load_extension
from .ops.kd_loss import KDLoss, kd_loss
from .reference import kd_loss_reference

_load_extension()

__version__ = "0.1.0"
__all__ = ["kd_loss", "KDLoss", "kd_loss_reference", "available_backends"]
