"""Fused Transformed Teacher Matching (TTM / WTTM) and KD losses for knowledge distillation."""
from . import reference, spec
from ._ops import cpu_extension_available, resolve_backend, triton_available
from .distill import FusedLinearDistillLoss
from .functional import fused_kd_loss, fused_ttm_loss, fused_wttm_loss
from .linear import (LinearKDLoss, LinearTTMLoss, LinearWTTMLoss, fused_linear_kd_loss, fused_linear_ttm_loss,
                     fused_linear_wttm_loss)
from .modules import KDLoss, TTMLoss, WTTMLoss
from .reduction import LossComponents
from .spec import LossSpec
from .topk import (fused_kd_loss_topk, fused_linear_kd_loss_topk, fused_linear_ttm_loss_topk,
                   fused_linear_wttm_loss_topk, fused_ttm_loss_topk, fused_wttm_loss_topk)

__version__ = "0.1.0"

__all__ = [
    "fused_wttm_loss",
    "fused_ttm_loss",
    "fused_kd_loss",
    "WTTMLoss",
    "TTMLoss",
    "KDLoss",
    "fused_linear_wttm_loss",
    "fused_linear_ttm_loss",
    "fused_linear_kd_loss",
    "LinearWTTMLoss",
    "LinearTTMLoss",
    "LinearKDLoss",
    "FusedLinearDistillLoss",
    "fused_wttm_loss_topk",
    "fused_ttm_loss_topk",
    "fused_kd_loss_topk",
    "fused_linear_wttm_loss_topk",
    "fused_linear_ttm_loss_topk",
    "fused_linear_kd_loss_topk",
    "LossComponents",
    "LossSpec",
    "spec",
    "reference",
    "triton_available",
    "cpu_extension_available",
    "resolve_backend",
]
