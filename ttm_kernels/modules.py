"""``nn.Module`` wrappers: ``WTTMLoss``, ``TTMLoss``, ``KDLoss``, holding the hyper-parameters."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .functional import fused_kd_loss, fused_ttm_loss, fused_wttm_loss
from .spec import DEFAULT_GAMMA, DEFAULT_TEMPERATURE, check_weight_norm


class _DistillLoss(nn.Module):
    _loss_fn = None
    _scale_name = ""

    def __init__(self, scale: float, *, beta: float = 1.0, ce_weight: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", backend: str = "auto", inplace_backward: bool = False,
                 softcap: Optional[float] = None, logit_scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.beta = beta
        self.ce_weight = ce_weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend
        self.inplace_backward = inplace_backward
        self.softcap = softcap
        self.logit_scale = logit_scale

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: Optional[torch.Tensor] = None, return_components: bool = False, *,
                num_items_in_batch=None):
        return type(self)._loss_fn(
            student_logits, teacher_logits, target, **{self._scale_name: self.scale}, beta=self.beta,
            ce_weight=self.ce_weight, ignore_index=self.ignore_index, reduction=self.reduction,
            backend=self.backend, inplace_backward=self.inplace_backward, return_components=return_components,
            num_items_in_batch=num_items_in_batch, softcap=self.softcap, logit_scale=self.logit_scale,
            **self._loss_options())

    def _loss_options(self) -> dict:
        """The keyword arguments only this family member's function takes."""
        return {}

    def extra_repr(self) -> str:
        return (f"{self._scale_name}={self.scale}, beta={self.beta}, ce_weight={self.ce_weight}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, backend={self.backend!r}, "
                f"softcap={self.softcap}, logit_scale={self.logit_scale}")


class WTTMLoss(_DistillLoss):
    """Module form of :func:`ttm_kernels.fused_wttm_loss`; ``forward(student_logits, teacher_logits, target=None,
    return_components=False, *, num_items_in_batch=None)``. ``weight_norm``: see ``fused_wttm_loss``."""

    _loss_fn = fused_wttm_loss
    _scale_name = "gamma"

    def __init__(self, gamma: float = DEFAULT_GAMMA, *, weight_norm: str = "none", **kwargs):
        super().__init__(gamma, **kwargs)
        self.weight_norm = check_weight_norm(weight_norm)

    def _loss_options(self) -> dict:
        return {"weight_norm": self.weight_norm}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_norm={self.weight_norm!r}"


class TTMLoss(_DistillLoss):
    """Module form of :func:`ttm_kernels.fused_ttm_loss`."""

    _loss_fn = fused_ttm_loss
    _scale_name = "gamma"

    def __init__(self, gamma: float = DEFAULT_GAMMA, **kwargs):
        super().__init__(gamma, **kwargs)


class KDLoss(_DistillLoss):
    """Module form of :func:`ttm_kernels.fused_kd_loss`."""

    _loss_fn = fused_kd_loss
    _scale_name = "temperature"

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, **kwargs):
        super().__init__(temperature, **kwargs)
