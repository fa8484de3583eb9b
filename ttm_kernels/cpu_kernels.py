"""The C++ CPU kernels of the fused TTM / WTTM / KD loss (ops ``ttm_kernels_C::forward`` / ``backward``).

Same interface and math as ``triton_kernels`` (see csrc/ttm_loss.cpp): logits are (B, T, V) row views,
the statistics a (10, N) fp32 tensor, and the gradient is computed in fp32 and rounded once when stored.
Importing this module raises ImportError when the extension ttm_kernels._C was not built.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the library registers the ops)


def cpu_isa() -> str:
    """The instruction set the kernels run with on this CPU: "avx512", "avx2" or "baseline"."""
    return torch.ops.ttm_kernels_C.cpu_isa()


def forward(student, teacher, target, *, student_scale, teacher_scale, kl_coef, ce_weight, weighted,
            ignore_index, grad=None, row_grad=None):
    """Loss statistics (10, N) fp32 of (B, T, V) row views; with ``grad``, also writes d(sum_i row_grad_i *
    loss_i)/dz into it (a (B, T, V) view, possibly ``student`` itself)."""
    return torch.ops.ttm_kernels_C.forward(
        student, teacher, target, float(student_scale), float(teacher_scale), float(kl_coef), float(ce_weight),
        bool(weighted), int(ignore_index), grad, row_grad)


def backward(row_grad, student, teacher, target, stats, grad, *, student_scale, teacher_scale, kl_coef,
             ce_weight, ignore_index):
    """Writes d(sum_i row_grad_i * loss_i)/dz into ``grad`` from the statistics of ``forward``."""
    torch.ops.ttm_kernels_C.backward(
        row_grad, student, teacher, target, stats, grad, float(student_scale), float(teacher_scale),
        float(kl_coef), float(ce_weight), int(ignore_index))
