"""The ``torch.library`` ops of the sparse-teacher (top-k) losses and their autograd, on the dense ops' scheme
(``_ops``): the same argument normalisation, the same two autograd paths, the same first-order contract.

Every compiled backend module (``triton_topk``, ``cpu_kernels``) offers, on normalised arguments ((B, T, V)
row views of the student, ``topk_rows``' sorted int32 ids and fp32 log-probabilities, ``_ops``' target and
upstream gradient):

    topk_forward(student, ids, logprobs, target, *, student_scale, teacher_scale, kl_coef, ce_weight, weighted,
                 bucket, ignore_index, grad=None, row_grad=None) -> stats (NUM_STATS, N) fp32 (``TopkStat``)
    topk_backward(row_grad, student, ids, logprobs, target, stats, grad, *, ...) -> None

No (N, V) tensor is allocated besides the gradient (none when it is written into the logits' storage).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _ops
from ._rows import row_view
from ._stats import NUM_STATS, TopkStat


def topk_rows(ids: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's ids as the kernels take them, a contiguous int32 (N, k) sorted ascending per row (the
    padding id -1 first), and its log-probabilities in the same order, a contiguous fp32 (N, k). Sorted once
    per call (O(N k log k)): the statistics pass then finds the ids of each block of columns by walking them."""
    k = ids.shape[-1]
    sorted_ids, order = torch.sort(ids.reshape(-1, k).to(torch.int32), dim=-1)
    return sorted_ids.contiguous(), logprobs.reshape(-1, k).float().gather(-1, order).contiguous()


def _kernels(backend: str):
    return _ops._load("triton_topk" if backend == "triton" else "cpu_kernels")[0]


def _params(student_scale, teacher_scale, kl_coef, ce_weight, bucket, ignore_index):
    return dict(student_scale=student_scale, teacher_scale=teacher_scale, kl_coef=kl_coef, ce_weight=ce_weight,
                bucket=bucket, ignore_index=ignore_index, jsd_beta=0.0)  # the forward KL: see topk._topk_backend


def _forward(backend, student, ids, logprobs, target, params, *, weighted, grad=None, row_grad=None):
    if grad is not None:
        grad, row_grad = _ops._own_rows(grad, "the gradient"), _ops._row_grad_rows(row_grad)
    return _kernels(backend).topk_forward(row_view(student), ids, logprobs, _ops._target_rows(target),
                                          weighted=weighted, grad=grad, row_grad=row_grad, **params)


def _backward_into(grad, row_grad, student, ids, logprobs, target, stats, params, backend):
    _kernels(backend).topk_backward(_ops._row_grad_rows(row_grad), row_view(student), ids, logprobs,
                                    _ops._target_rows(target), stats.contiguous(), grad, **params)


def _new_stats(student):
    return student.new_empty((NUM_STATS, student[..., 0].numel()), dtype=torch.float32)


@torch.library.custom_op("ttm_kernels::topk_fwd", mutates_args=())
def topk_fwd(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, target: Optional[torch.Tensor],
             student_scale: float, teacher_scale: float, kl_coef: float, ce_weight: float, weighted: bool,
             bucket: bool, ignore_index: int, backend: str) -> torch.Tensor:
    """(NUM_STATS, N) fp32 statistics per row (``TopkStat``)."""
    return _forward(backend, student, ids, logprobs, target,
                    _params(student_scale, teacher_scale, kl_coef, ce_weight, bucket, ignore_index),
                    weighted=weighted)


@topk_fwd.register_fake
def _(student, ids, logprobs, target, student_scale, teacher_scale, kl_coef, ce_weight, weighted, bucket,
      ignore_index, backend):
    return _new_stats(student)


@torch.library.custom_op("ttm_kernels::topk_bwd", mutates_args=())
def topk_bwd(row_grad: torch.Tensor, student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
             target: Optional[torch.Tensor], stats: torch.Tensor, student_scale: float, teacher_scale: float,
             kl_coef: float, ce_weight: float, bucket: bool, ignore_index: int, backend: str) -> torch.Tensor:
    """d(sum_i row_grad_i * loss_i) / d student, in the student's dtype and shape (contiguous)."""
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    _backward_into(row_view(grad), row_grad, student, ids, logprobs, target, stats,
                   _params(student_scale, teacher_scale, kl_coef, ce_weight, bucket, ignore_index), backend)
    return grad


@topk_bwd.register_fake
def _(row_grad, student, ids, logprobs, target, stats, student_scale, teacher_scale, kl_coef, ce_weight, bucket,
      ignore_index, backend):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    student, ids, logprobs, target, student_scale, teacher_scale, kl_coef, ce_weight, _, bucket, ignore_index, \
        backend = inputs
    ctx.params = (student_scale, teacher_scale, kl_coef, ce_weight, bucket, ignore_index, backend)
    ctx.save_for_backward(student, ids, logprobs, target, output)


def _backward(ctx, grad_stats):
    _ops.refuse_higher_order()
    student, ids, logprobs, target, stats = ctx.saved_tensors
    if grad_stats is None:
        grad_stats = torch.zeros_like(stats)
    grad = topk_bwd(grad_stats[TopkStat.LOSS], student, ids, logprobs, target, stats, *ctx.params)
    return (grad,) + (None,) * 11


torch.library.register_autograd("ttm_kernels::topk_fwd", _backward, setup_context=_setup_context)


@torch.library.custom_op("ttm_kernels::topk_fwd_with_grad", mutates_args=())
def topk_fwd_with_grad(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                       target: Optional[torch.Tensor], row_grad: torch.Tensor, student_scale: float,
                       teacher_scale: float, kl_coef: float, ce_weight: float, weighted: bool, bucket: bool,
                       ignore_index: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss = sum_i row_grad * loss_i, statistics, d loss / d student) from one launch; row_grad is 0-dim."""
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    stats = _forward(backend, student, ids, logprobs, target,
                     _params(student_scale, teacher_scale, kl_coef, ce_weight, bucket, ignore_index),
                     weighted=weighted, grad=row_view(grad), row_grad=row_grad)
    return stats[TopkStat.LOSS].sum() * row_grad, stats, grad


@topk_fwd_with_grad.register_fake
def _(student, ids, logprobs, target, row_grad, student_scale, teacher_scale, kl_coef, ce_weight, weighted, bucket,
      ignore_index, backend):
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    return row_grad.new_empty(()), _new_stats(student), grad


def _with_grad_backward(ctx, grad_loss, grad_stats, grad_grad):
    # The dense op's backward (scale the saved gradient in place), for this op's 13 inputs.
    return _ops._with_grad_backward(ctx, grad_loss, grad_stats, grad_grad)[:1] + (None,) * 12


torch.library.register_autograd("ttm_kernels::topk_fwd_with_grad", _with_grad_backward,
                                setup_context=_ops._with_grad_setup_context)


@torch.library.custom_op("ttm_kernels::topk_fwd_grad_inplace", mutates_args=("student",))
def topk_fwd_grad_inplace(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                          target: Optional[torch.Tensor], row_grad: torch.Tensor, student_scale: float,
                          teacher_scale: float, kl_coef: float, ce_weight: float, weighted: bool, bucket: bool,
                          ignore_index: int, backend: str) -> torch.Tensor:
    """Forward and gradient in one launch: returns the statistics and overwrites ``student`` with
    d(sum_i row_grad_i * loss_i)/dz (``row_grad``: (N,) or 0-dim). For callers that own the logits buffer,
    such as the fused linear loss."""
    return _forward(backend, student, ids, logprobs, target,
                    _params(student_scale, teacher_scale, kl_coef, ce_weight, bucket, ignore_index),
                    weighted=weighted, grad=_ops._own_rows(student, "topk_fwd_grad_inplace"), row_grad=row_grad)


@topk_fwd_grad_inplace.register_fake
def _(student, ids, logprobs, target, row_grad, student_scale, teacher_scale, kl_coef, ce_weight, weighted, bucket,
      ignore_index, backend):
    return _new_stats(student)


def fused_topk_loss(student, ids, logprobs, target, denominator, *, reduction, student_scale, teacher_scale,
                    kl_coef, ce_weight, weighted, bucket, ignore_index, backend):
    """The reduced loss (float32) and the (NUM_STATS, N) statistics, from ``topk_rows``' ids and logprobs; as
    ``_ops.fused_loss``: with "mean"/"sum" and a student that needs a gradient, the gradient is computed in
    the forward's launch; otherwise the backward recomputes it from the statistics. ``denominator``: the 0-dim
    float32 divisor of reduction "mean" (``functional.mean_denominator``)."""
    params = (float(student_scale), float(teacher_scale), float(kl_coef), float(ce_weight), bool(weighted),
              bool(bucket), int(ignore_index), backend)
    if reduction != "none" and student.requires_grad and torch.is_grad_enabled():
        if reduction == "mean":
            row_grad = denominator.reciprocal()
        else:
            row_grad = torch.ones((), dtype=torch.float32, device=student.device)
        loss, stats, _ = topk_fwd_with_grad(student, ids, logprobs, target, row_grad, *params)
        return loss, stats
    stats = topk_fwd(student, ids, logprobs, target, *params)
    rows = stats[TopkStat.LOSS].view(student.shape[:-1])
    if reduction == "none":
        return rows, stats
    total = rows.sum()
    return (total / denominator if reduction == "mean" else total), stats
