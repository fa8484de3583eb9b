"""The sparse-teacher (top-k) losses on the dense loss's ops (``_ops``, teacher forms "topk_bucket" and
"topk_renormalize"): the same argument normalisation, the same two autograd paths, the same first-order contract.

Every compiled backend module (``triton_topk``, ``cpu_kernels``) offers, on normalised arguments ((B, T, V)
row views of the student, ``topk_rows``' sorted int32 ids and fp32 log-probabilities, ``_ops``' target and
upstream gradient):

    topk_forward(student, ids, logprobs, target, *, student_scale, teacher_scale, kl_coef, ce_weight, weighted,
                 bucket, ignore_index, grad=None, row_grad=None) -> stats (NUM_STATS, N) fp32 (``TopkStat``)
    topk_backward(row_grad, student, ids, logprobs, target, stats, grad, *, ...) -> None

No (N, V) tensor is allocated besides the gradient (none when it is written into the logits' storage).
"""
from __future__ import annotations

import torch

from . import _ops


def topk_rows(ids: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's ids as the kernels take them, a contiguous int32 (N, k) sorted ascending per row (the
    padding id -1 first), and its log-probabilities in the same order, a contiguous fp32 (N, k). Sorted once
    per call (O(N k log k)): the statistics pass then finds the ids of each block of columns by walking them."""
    k = ids.shape[-1]
    sorted_ids, order = torch.sort(ids.reshape(-1, k).to(torch.int32), dim=-1)
    return sorted_ids.contiguous(), logprobs.reshape(-1, k).float().gather(-1, order).contiguous()


def fused_topk_loss(student, ids, logprobs, target, denominator, *, reduction, student_scale, teacher_scale,
                    kl_coef, ce_weight, weighted, bucket, ignore_index, backend, jsd_beta=0.0,
                    inplace_backward=False):
    """The reduced loss (float32) and the (NUM_STATS, N) statistics (``TopkStat``), from ``topk_rows``' ids and
    logprobs: ``_ops.fused_rows_loss`` of the top-k teacher form."""
    return _ops.fused_rows_loss(student, [ids, logprobs], target, denominator,
                                form="topk_bucket" if bucket else "topk_renormalize", reduction=reduction,
                                scales=(student_scale, teacher_scale, kl_coef, ce_weight, jsd_beta),
                                weighted=weighted, ignore_index=ignore_index, backend=backend,
                                inplace_backward=inplace_backward)
