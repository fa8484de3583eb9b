"""``FusedLinearDistillLoss``: the fused linear distillation loss in the shape of Liger-Kernel's
``LigerFusedLinearJSDLoss``, so that code written for Liger (TRL's trainers, axolotl, ms-swift) changes only
its import::

    # from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss as DistillLoss
    from ttm_kernels import FusedLinearDistillLoss as DistillLoss

    loss_fn = DistillLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, ignore_index=-100)
    loss = loss_fn(student_hidden, student_lm_head.weight, teacher_hidden, teacher_lm_head.weight, labels)

It is one configuration of ``linear.fused_linear_*_loss`` (the same chunked GEMMs and kernels), not a new
code path: ``weight_hard_loss`` is their ``ce_weight``, ``weight_soft_loss`` their ``beta``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import spec as specs
from .linear import VOCAB_MISMATCH, _fused_linear_loss
from .spec import DEFAULT_GAMMA, LossSpec, check_finite, check_flag

LOSSES = ("wttm", "ttm", "kd")


class FusedLinearDistillLoss(nn.Module):
    """Fused linear + distillation loss with Liger's constructor and ``forward`` arguments.

    ``loss = weight_hard_loss * CE(z, true_labels) + weight_soft_loss * D``, both terms averaged over the rows
    whose label is not ``ignore_index`` (over ``num_items_in_batch`` when given), with student logits
    ``z = student_input @ student_weight.T + student_bias`` and teacher logits ``v`` likewise, after the heads'
    own ``logit_scale`` and ``softcap`` (both models), and per row

    * ``loss="wttm"`` (default): ``D = U * KL(softmax(gamma * v) || softmax(z))``, ``U = sum(softmax(v)**gamma)``;
    * ``loss="ttm"``: ``D = KL(softmax(gamma * v) || softmax(z))``;
    * ``loss="kd"``: ``D = KL(softmax(v / T) || softmax(z / T))`` with ``T = temperature``.

    Conventions, chosen so that Liger code keeps the objective it had:

    * ``temperature`` divides both models' logits and the KD term has **no T^2 factor**, as in Liger (whose
      ``temperature`` divides both sides, without T^2). This differs from ``fused_linear_kd_loss`` (Hinton's
      and RepDistiller's T^2): ``loss="kd"`` here equals ``fused_linear_kd_loss(..., temperature=T,
      beta=weight_soft_loss / T**2)``. At the default T = 1 the two agree.
    * TTM and WTTM have no student temperature: their teacher transform is ``gamma`` (= 1/T of the paper),
      so ``temperature`` must stay 1 with them, and ``gamma`` is not used by ``"kd"``.
    * The cross-entropy is on the untempered student logits (as in Liger).
    * The divergence is the forward KL(teacher || student) of the paper and of KD, which is Liger's JSD at
      ``beta=0``. ``beta`` is accepted for Liger code only as 0 (or None); Liger's other values (reverse KL,
      Jensen-Shannon mixtures) are not computed here and raise instead of silently optimising something else.
      ``compiled`` is accepted and ignored: the fused path needs no torch.compile.

    Args:
        loss: ``"wttm"``, ``"ttm"`` or ``"kd"``.
        gamma: the power-transform exponent of TTM / WTTM (default 0.2, T = 5).
        temperature: KD's temperature (default 1, no softening).
        weight_hard_loss, weight_soft_loss: weights of the CE and distillation terms (defaults 0 and 1).
        ignore_index: label of rows to ignore (default -100): they count in no term and not in the mean.
        chunk_size: rows per chunk of the fused GEMMs (default: from a memory budget).
        softcap, logit_scale: the LM heads' post-processing of their logits (Gemma-2's
            ``final_logit_softcapping``; Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``), applied to
            both models inside the fused path with its gradient; see ``fused_linear_wttm_loss``.
        return_soft_hard_loss: also return the detached soft (D) and hard (CE) terms, each averaged like the
            loss: ``(loss, soft_loss, hard_loss)`` with ``loss = weight_hard_loss * hard_loss +
            weight_soft_loss * soft_loss``. Only ``loss`` carries gradients.
        vocab_mismatch: ``"error"`` or ``"truncate_teacher"`` (see ``fused_linear_wttm_loss``).
        backend: ``"auto"``, ``"triton"``, ``"cpu"`` or ``"torch"``.

    ``forward(student_input, student_weight, teacher_input, teacher_weight, true_labels=None, student_bias=None,
    teacher_bias=None, *, num_items_in_batch=None)``: hidden states (BT, H_s) and (BT, H_t) (any leading shape
    works; the two H may differ), LM heads (V, H_s) and (V_t, H_t), labels (BT,). ``true_labels`` may be
    None only with ``weight_hard_loss=0``. ``num_items_in_batch``: the divisor of the mean in place of this
    call's labelled rows, as Hugging Face's Trainer passes it, for gradient accumulation (see
    ``fused_wttm_loss``).
    """

    def __init__(self, loss: str = "wttm", gamma: float = DEFAULT_GAMMA, temperature: float = 1.0,
                 weight_hard_loss: float = 0.0, weight_soft_loss: float = 1.0, ignore_index: int = -100,
                 chunk_size: Optional[int] = None, softcap: Optional[float] = None, logit_scale: float = 1.0,
                 return_soft_hard_loss: bool = False, vocab_mismatch: str = "error", *,
                 beta: Optional[float] = None, compiled: Optional[bool] = None, backend: str = "auto"):
        super().__init__()
        self.loss = loss
        self.gamma = gamma
        self.temperature = temperature
        self.weight_hard_loss = weight_hard_loss
        self.weight_soft_loss = weight_soft_loss
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.return_soft_hard_loss = return_soft_hard_loss
        self.vocab_mismatch = vocab_mismatch
        self.backend = backend
        if beta is not None and (isinstance(beta, bool) or beta != 0):
            raise ValueError(f"beta={beta!r}: Liger's JSD interpolation is not computed here; ttm_kernels' losses "
                             "are the forward KL(teacher || student), Liger's beta=0 (pass beta=0 or leave it out)")
        self._spec()  # refuse a bad configuration at construction, not at the first step

    def _spec(self) -> LossSpec:
        """The loss spec of the current attributes (Liger's conventions: KD without T^2), or a clear error."""
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        gamma = check_finite("gamma", self.gamma, positive=True)
        temperature = check_finite("temperature", self.temperature, positive=True)
        check_finite("weight_hard_loss", self.weight_hard_loss)
        check_finite("weight_soft_loss", self.weight_soft_loss)
        check_flag("return_soft_hard_loss", self.return_soft_hard_loss)
        if self.vocab_mismatch not in VOCAB_MISMATCH:
            raise ValueError(f"vocab_mismatch must be one of {VOCAB_MISMATCH}, got {self.vocab_mismatch!r}")
        options = dict(beta=self.weight_soft_loss, ce_weight=self.weight_hard_loss, ignore_index=self.ignore_index,
                       softcap=self.softcap, logit_scale=self.logit_scale)
        if self.loss == "kd":
            if gamma != DEFAULT_GAMMA:
                raise ValueError(f"gamma={gamma} is the TTM/WTTM exponent; loss='kd' uses temperature")
            return specs.kd(temperature, t_squared=False, **options)
        if temperature != 1.0:
            raise ValueError(f"temperature={temperature}: TTM and WTTM have no student temperature; their teacher "
                             f"transform is gamma (= 1/T), e.g. gamma={1.0 / temperature:g} for T={temperature:g}")
        return specs.from_scales(self.loss, gamma, **options)

    def forward(self, student_input: torch.Tensor, student_weight: torch.Tensor, teacher_input: torch.Tensor,
                teacher_weight: torch.Tensor, true_labels: Optional[torch.Tensor] = None,
                student_bias: Optional[torch.Tensor] = None, teacher_bias: Optional[torch.Tensor] = None, *,
                num_items_in_batch=None):
        spec = self._spec()
        if true_labels is None and self.weight_hard_loss != 0:
            raise ValueError(f"weight_hard_loss={self.weight_hard_loss} needs true_labels for its cross-entropy; "
                             "pass them, or weight_hard_loss=0")
        return _fused_linear_loss(
            student_input, student_weight, teacher_input, teacher_weight, true_labels, spec, student_bias=student_bias,
            teacher_bias=teacher_bias, reduction="mean", chunk_size=self.chunk_size,
            vocab_mismatch=self.vocab_mismatch, backend=self.backend, return_components=False,
            num_items_in_batch=num_items_in_batch, return_soft_hard=self.return_soft_hard_loss)

    def extra_repr(self) -> str:
        scale = f"temperature={self.temperature}" if self.loss == "kd" else f"gamma={self.gamma}"
        return (f"loss={self.loss!r}, {scale}, weight_hard_loss={self.weight_hard_loss}, "
                f"weight_soft_loss={self.weight_soft_loss}, ignore_index={self.ignore_index}, "
                f"chunk_size={self.chunk_size}, softcap={self.softcap}, logit_scale={self.logit_scale}, "
                f"vocab_mismatch={self.vocab_mismatch!r}, backend={self.backend!r}")
