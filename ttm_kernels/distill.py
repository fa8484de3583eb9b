"""``FusedLinearDistillLoss``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (liger-kernel 0.8.5) on this package's
fused linear loss: the same constructor (positional order and defaults), the same ``forward`` and the same
numbers, so that code written for Liger (TRL's trainers, axolotl, ms-swift) swaps its import::

    # from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss as DistillLoss
    from ttm_kernels import FusedLinearDistillLoss as DistillLoss

    loss_fn = DistillLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5)
    loss = loss_fn(student_hidden, student_lm_head.weight, teacher_hidden, teacher_lm_head.weight, labels)

It is one configuration of the public loss functions, not a new code path: Liger's loss is
``fused_linear_kd_loss(..., temperature=T, jsd_beta=beta, ce_weight=weight_hard_loss,
beta=weight_soft_loss / T**2)``, computed with the spec ``spec.kd(T, t_squared=False)`` (Liger has no T^2 factor,
which is then neither multiplied in nor divided out); TTM and WTTM are the same with their own teacher transform
(keyword-only ``loss=`` and ``gamma=``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import spec as specs
from .linear import VOCAB_MISMATCH, _fused_linear_loss
from .spec import DEFAULT_GAMMA, LossSpec, check_finite, check_flag

LOSSES = ("kd", "ttm", "wttm")


class FusedLinearDistillLoss(nn.Module):
    """Fused linear + distillation loss with Liger's ``LigerFusedLinearJSDLoss`` constructor, ``forward`` and
    numbers (liger-kernel 0.8.5).

    ``FusedLinearDistillLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, ignore_index=-100,
    temperature=1.0, compiled=True, chunk_size=1024, return_soft_hard_loss=False, *, loss="kd", gamma=0.2,
    softcap=None, logit_scale=1.0, vocab_mismatch="error", backend="auto")``

    ``loss = weight_hard_loss * hard + weight_soft_loss * soft`` with, over the rows whose label is not
    ``ignore_index`` (n of them, at least 1; ``num_items_in_batch`` in place of n when given):

    * ``hard = sum CE(z, true_labels) / n``, the cross-entropy of the untempered student logits
      ``z = student_input @ student_weight.T + student_bias``;
    * ``soft = sum D(p, q) / n`` with ``q = softmax(z / T)``, ``p = softmax(v / T)`` for the teacher's logits v,
      ``T = temperature``, **no T^2 factor**, and D Liger's generalised JSD: ``beta`` 0 the forward
      KL(p || q), 1 the reverse KL(q || p), in between ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with
      ``m = beta * p + (1 - beta) * q``.

    This is Liger's ``LigerFusedLinearDistillationBase`` with its JSD, term for term: the same divisor (its
    ``num_valid_tokens``, also for the soft term), ignored rows in no term, the CE before the temperature, the
    temperature on both models. Only the student gets gradients (input, weight, bias); the teacher is a
    constant, as under Liger's ``torch.no_grad()`` (``teacher_input`` may require grad: it is detached).

    Liger's arguments that mean something else here:

    * ``compiled`` is accepted (True or False) and ignored: the fused path runs no ``torch.compile``.
    * ``chunk_size``: rows per chunk of the fused GEMMs (the last chunk fewer); Liger splits the rows into
      ``N // chunk_size`` chunks, of ``chunk_size`` to ``2 * chunk_size - 1`` rows. Chunking does not change the
      result beyond fp32 rounding. ``None`` (not Liger's): from a memory budget (``linear.default_chunk_size``).
    * ``return_soft_hard_loss=True`` returns ``(loss, soft, hard)`` as Liger does; soft and hard are detached
      here (Liger returns them as outputs of its autograd function whose gradients its backward drops).
    * Numbers: Liger's to fp32 precision for fp32 inputs (loss, soft, hard and gradients; tested to 2e-4 of
      the largest magnitude, measured within 5e-5). With bf16 / fp16 inputs the logits are rounded as the GEMM
      rounds them and the loss is computed in fp32 (Liger computes its JSD in the logits' dtype).

    Differences in what is accepted: a teacher vocabulary larger than the student's raises (Liger pads the
    student's tempered logits with zeros; ``vocab_mismatch="truncate_teacher"`` drops the teacher's extra
    columns instead), as do a ``beta`` outside [0, 1] (NaN in Liger) and a temperature <= 0 (Liger refuses
    only 0). ``true_labels`` may be None with ``weight_hard_loss=0``: every row then counts. Any leading shape
    works (Liger's is (BT, H)).

    Keyword-only extras (not Liger's):

    * ``loss``: the teacher transform. ``"kd"`` (default): Liger's ``p = softmax(v / T)``. ``"ttm"``:
      ``p = softmax(gamma * v)`` and ``q = softmax(z)`` (TTM has no student temperature: ``temperature`` must
      stay 1; ``gamma`` is 1/T of the paper). ``"wttm"``: TTM's, with each row's D weighted by
      ``U = sum(softmax(v)**gamma)``. ``beta`` chooses D for all three; the paper's TTM and WTTM are the
      forward KL, ``beta=0``, e.g. ``FusedLinearDistillLoss(0.0, 1.0, 0.0, loss="wttm", gamma=0.2)``.
    * ``gamma``: TTM's / WTTM's exponent (default 0.2, T = 5); refused with ``loss="kd"``.
    * ``softcap``, ``logit_scale``: the LM heads' post-processing of their logits (Gemma-2's
      ``final_logit_softcapping``; Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``), applied to both
      models inside the fused path with its gradient; see ``fused_linear_wttm_loss``.
    * ``vocab_mismatch``: ``"error"`` or ``"truncate_teacher"`` (see ``fused_linear_wttm_loss``).
    * ``backend``: ``"auto"``, ``"triton"``, ``"cpu"`` or ``"torch"`` (see ``fused_linear_wttm_loss``; the
      result does not depend on it beyond fp32 rounding).
    * ``forward(..., *, num_items_in_batch=None)``: the divisor n in place of this call's labelled rows, as
      Hugging Face's Trainer passes it, for gradient accumulation (see ``fused_wttm_loss``).

    Changed on 2026-12-03 (issue 20), to be Liger's class: the positional order is Liger's (it was ``loss,
    gamma, temperature, weight_hard_loss, ...``) and ``loss``, ``gamma``, ``softcap``, ``logit_scale``,
    ``vocab_mismatch`` are keyword-only; the defaults are Liger's: ``weight_hard_loss`` 0.5 (was 0),
    ``weight_soft_loss`` 0.5 (was 1), ``beta`` 0.5, the JSD (was the forward KL, the only divergence then),
    ``loss="kd"`` (was ``"wttm"``), ``chunk_size`` 1024 (was None). The former default is
    ``FusedLinearDistillLoss(0.0, 1.0, 0.0, chunk_size=None, loss="wttm")``; ``gamma=`` without ``loss="ttm"``
    or ``"wttm"`` now raises rather than being ignored.

    ``forward(student_input, student_weight, teacher_input, teacher_weight, true_labels=None, student_bias=None,
    teacher_bias=None, *, num_items_in_batch=None)``: hidden states (BT, H_s) and (BT, H_t) (the two H may
    differ), LM heads (V, H_s) and (V_t, H_t), labels (BT,). Returns the float32 loss (float64 for float64
    inputs), or ``(loss, soft, hard)``.
    """

    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5, beta: float = 0.5,
                 ignore_index: int = -100, temperature: float = 1.0, compiled: bool = True,
                 chunk_size: Optional[int] = 1024, return_soft_hard_loss: bool = False, *, loss: str = "kd",
                 gamma: float = DEFAULT_GAMMA, softcap: Optional[float] = None, logit_scale: float = 1.0,
                 vocab_mismatch: str = "error", backend: str = "auto"):
        super().__init__()
        self.weight_hard_loss = weight_hard_loss
        self.weight_soft_loss = weight_soft_loss
        self.beta = beta
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.compiled = compiled
        self.chunk_size = chunk_size
        self.return_soft_hard_loss = return_soft_hard_loss
        self.loss = loss
        self.gamma = gamma
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.vocab_mismatch = vocab_mismatch
        self.backend = backend
        self._spec()  # refuse a bad configuration at construction, not at the first step

    def _spec(self) -> LossSpec:
        """The loss spec of the current attributes (Liger's conventions), or a clear error."""
        if isinstance(self.weight_hard_loss, str):
            # The positional order was (loss, gamma, ...) before this class took Liger's.
            raise TypeError(f"weight_hard_loss must be a number, got {self.weight_hard_loss!r}: the first positional "
                            f"argument is Liger's weight_hard_loss; pass the loss as loss={self.weight_hard_loss!r}")
        check_finite("weight_hard_loss", self.weight_hard_loss)
        check_finite("weight_soft_loss", self.weight_soft_loss)
        beta = check_finite("beta", self.beta)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1] (Liger's generalised JSD: 0 the forward KL(teacher || "
                             f"student), 1 the reverse KL, else the JSD with mixture weight beta), got {beta}")
        temperature = check_finite("temperature", self.temperature, positive=True)
        check_flag("compiled", self.compiled)
        check_flag("return_soft_hard_loss", self.return_soft_hard_loss)
        if self.chunk_size is not None and (isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int)
                                            or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be None or a positive int, got {self.chunk_size!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        gamma = check_finite("gamma", self.gamma, positive=True)
        if self.vocab_mismatch not in VOCAB_MISMATCH:
            raise ValueError(f"vocab_mismatch must be one of {VOCAB_MISMATCH}, got {self.vocab_mismatch!r}")
        options = dict(beta=self.weight_soft_loss, ce_weight=self.weight_hard_loss, ignore_index=self.ignore_index,
                       softcap=self.softcap, logit_scale=self.logit_scale, jsd_beta=beta)
        if self.loss == "kd":
            if gamma != DEFAULT_GAMMA:
                raise ValueError(f"gamma={gamma} is the TTM/WTTM exponent: pass loss='ttm' or 'wttm' with it "
                                 "(loss='kd', the default, is Liger's, tempered by temperature)")
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
        if isinstance(teacher_input, torch.Tensor):
            teacher_input = teacher_input.detach()  # Liger runs the teacher under torch.no_grad()
        return _fused_linear_loss(
            student_input, student_weight, teacher_input, teacher_weight, true_labels, spec, student_bias=student_bias,
            teacher_bias=teacher_bias, reduction="mean", chunk_size=self.chunk_size,
            vocab_mismatch=self.vocab_mismatch, backend=self.backend, return_components=False,
            num_items_in_batch=num_items_in_batch, return_soft_hard=self.return_soft_hard_loss)

    def extra_repr(self) -> str:
        scale = f"temperature={self.temperature}" if self.loss == "kd" else f"gamma={self.gamma}"
        return (f"weight_hard_loss={self.weight_hard_loss}, weight_soft_loss={self.weight_soft_loss}, "
                f"beta={self.beta}, ignore_index={self.ignore_index}, chunk_size={self.chunk_size}, "
                f"return_soft_hard_loss={self.return_soft_hard_loss}, loss={self.loss!r}, {scale}, "
                f"softcap={self.softcap}, logit_scale={self.logit_scale}, vocab_mismatch={self.vocab_mismatch!r}, "
                f"backend={self.backend!r}")
