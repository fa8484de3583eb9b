"""The C++ CPU kernels of the fused TTM / WTTM / KD loss (ops ``ttm_kernels_C::forward`` / ``backward``).

Same interface and math as ``triton_kernels`` (see csrc/ttm_loss.cpp): logits are (B, T, V) row views,
the statistics a (NUM_STATS, N) fp32 tensor, and the gradient is computed in fp32 and rounded once when
stored. ``partial``/``merge``/``pieces``/``finish`` are the same loss computed from pieces of the rows
(column ranges, e.g. the vocabulary shards of ranks): each piece's online sums, merged into the rows'
statistics, then each piece's second pass.
Importing this module raises ImportError when the extension ttm_kernels._C was not built.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the library registers the ops)
from ._stats import Stat


def cpu_isa() -> str:
    """The instruction set the kernels run with on this CPU: "avx512", "avx2" or "baseline"."""
    return torch.ops.ttm_kernels_C.cpu_isa()


def forward(student, teacher, target, *, student_scale, teacher_scale, kl_coef, ce_weight, weighted,
            ignore_index, jsd_beta, grad=None, row_grad=None):
    """Loss statistics (NUM_STATS, N) fp32 of (B, T, V) row views; with ``grad``, also writes d(sum_i row_grad_i
    * loss_i)/dz into it (a (B, T, V) view, possibly ``student`` itself)."""
    return torch.ops.ttm_kernels_C.forward(
        student, teacher, target, float(student_scale), float(teacher_scale), float(kl_coef), float(ce_weight),
        bool(weighted), int(ignore_index), float(jsd_beta), grad, row_grad)


def backward(row_grad, student, teacher, target, stats, grad, **params):
    """Writes d(sum_i row_grad_i * loss_i)/dz into ``grad`` from the statistics of ``forward``: one more pass
    over whole rows."""
    V = student.shape[2]
    pieces(student, teacher, target, stats, col_offset=0, vocab=V, grad=grad, row_grad=row_grad, **params)


def partial(student, teacher, target, *, student_scale, teacher_scale, weighted, ignore_index, col_offset,
            **_unused):
    """The online sums of each row's columns here, columns [col_offset, col_offset + V) of the rows:
    (NUM_PARTIAL, N, 1) fp32 (rows: ``_stats.Partial``)."""
    return torch.ops.ttm_kernels_C.partial(student, teacher, target, float(student_scale), float(teacher_scale),
                                           bool(weighted), int(ignore_index), int(col_offset)).unsqueeze(-1)


def merge(partials, target, *, student_scale, teacher_scale, weighted, ignore_index, vocab, **_unused):
    """The rows' statistics (NUM_STATS, N) from their pieces' partials (NUM_PARTIAL, N, C), all but KL,
    DIV_GRAD, ENTROPY and loss (``finish`` writes them from the pieces' sums)."""
    return torch.ops.ttm_kernels_C.merge(partials.contiguous(), target, float(student_scale), float(teacher_scale),
                                         bool(weighted), int(ignore_index), int(vocab))


def pieces(student, teacher, target, stats, *, col_offset, vocab, grad=None, row_grad=None, student_scale,
           teacher_scale, kl_coef, ce_weight, ignore_index, jsd_beta, **_unused):
    """The second pass over each row's columns here (columns [col_offset, col_offset + V) of rows of
    ``vocab``): their sums (NUM_PIECE_SUMS, N, 1) (rows: ``_stats.PieceSum``), and with ``grad`` their gradient,
    written into it. The gradient of the reverse KL and the JSD (``jsd_beta`` not 0) reads the row's DIV_GRAD
    from ``stats``: ``finish`` must have written it from every piece's sums."""
    return torch.ops.ttm_kernels_C.pieces(
        student, teacher, target, stats, float(student_scale), float(teacher_scale), float(kl_coef),
        float(ce_weight), int(ignore_index), float(jsd_beta), int(col_offset), int(vocab), grad,
        row_grad).unsqueeze(-1)


def finish(stats, sums, *, kl_coef, ce_weight, **_unused):
    """Writes the rows' KL, DIV_GRAD and ENTROPY (the sums of their pieces' ``sums``, (NUM_PIECE_SUMS, N, C))
    and loss into ``stats``."""
    stats[[Stat.KL, Stat.DIV_GRAD, Stat.ENTROPY]] = sums.sum(2)
    stats[Stat.LOSS] = kl_coef * stats[Stat.WEIGHT] * stats[Stat.KL] + ce_weight * stats[Stat.CE]


def topk_forward(student, ids, logprobs, target, *, student_scale, teacher_scale, kl_coef, ce_weight, weighted,
                 bucket, ignore_index, jsd_beta, grad=None, row_grad=None):
    """The sparse-teacher loss's statistics (NUM_STATS, N) fp32 (rows: ``_stats.TopkStat``) of (B, T, V) row
    views, from ``ids`` sorted ascending per row (int32 (N, k), the padding -1 first) and their ``logprobs``
    (fp32 (N, k)); with ``grad``, also writes d(sum_i row_grad_i * loss_i)/dz into it. The forward KL only:
    the public layer gives ``jsd_beta`` other than 0 with a top-k teacher to the reference on the CPU."""
    if jsd_beta != 0.0:
        raise ValueError(f"the C++ top-k kernel computes the forward KL only, got jsd_beta={jsd_beta}")
    return torch.ops.ttm_kernels_C.topk_forward(
        student, ids, logprobs, target, float(student_scale), float(teacher_scale), float(kl_coef), float(ce_weight),
        bool(weighted), bool(bucket), int(ignore_index), grad, row_grad)


def topk_backward(row_grad, student, ids, logprobs, target, stats, grad, *, student_scale, teacher_scale, kl_coef,
                  ce_weight, bucket, ignore_index, col_offset=0, vocab=None, **_unused):
    """Writes d(sum_i row_grad_i * loss_i)/dz into ``grad`` from the rows' statistics (``topk_forward``'s, or those
    merged from ``topk_partial``'s); ``student`` is columns [col_offset, col_offset + V) of rows of ``vocab``
    columns (default: the whole rows)."""
    torch.ops.ttm_kernels_C.topk_backward(
        student, ids, logprobs, target, stats, float(student_scale), float(teacher_scale), float(kl_coef),
        float(ce_weight), bool(bucket), int(ignore_index), grad, row_grad, int(col_offset),
        int(student.shape[-1] if vocab is None else vocab))


def topk_partial(student, ids, target, *, student_scale, bucket, ignore_index, col_offset, vocab, **_unused):
    """The online sums (``_stats.TopkPartial``, N) fp32 of a piece of the rows (columns [col_offset, col_offset +
    V) of ``vocab``) over its columns outside the sorted ``ids`` (row columns)."""
    return torch.ops.ttm_kernels_C.topk_partial(student, ids, target, float(student_scale), bool(bucket),
                                                int(ignore_index), int(col_offset), int(vocab))
