"""Triton kernels for the fused TTM / WTTM / KD loss.

One program per row. Logits arrive as (B, T, V) views (last dimension contiguous, free leading strides;
each tensor with its own B x T split of the N rows).
Per row, with s = student_scale, g = teacher_scale:

    forward: one streaming pass over z and v (reads 2V elements) with online (max, sum) accumulation of
             lse(s*z), lse(g*v), lse(v) (WTTM only), lse(z) (CE under a student temperature only) and
             acc = sum exp(g*v - m_t) * ((g*v - m_t) - (s*z - m_s)), kept relative to the running maxima so
             that KL = acc / d_t - log d_t + log d_s never subtracts two large numbers.
             Writes 10 fp32 statistics per row; with HAS_GRAD it also makes the gradient pass below.
    gradient: a second pass (reads 2V, writes V) that recomputes the probabilities from the saved
             statistics, computes the whole row gradient in fp32 and rounds once at the store.

Statistics rows, (10, N) fp32: loss, kl, ce, weight (U, or 1), then (max, log of the rescaled sum) of s*z,
g*v and z. The max and log-sum stay apart because their fp32 sum, lse, would lose the log-sum's bits next
to a logit of 1e4: probabilities are recomputed as exp((x - max) - log_sum), as log_softmax does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_STATS = 10
MAX_BLOCK_V = 4096


@triton.jit
def _row_ptr(base, row, n_inner, stride_b, stride_t):
    # Each (B, T, V) view has its own split of the N rows: row = b * T + t, T = n_inner.
    return base + (row // n_inner) * stride_b + (row % n_inner) * stride_t


@triton.jit
def _grad_pass(s_row, t_row, g_row, y, V, kl_coef, ce_coef, student_scale, teacher_scale,
               m_s, log_d_s, m_t, log_d_t, m_z, log_d_z, HAS_TARGET: tl.constexpr, SEPARATE_CE: tl.constexpr,
               BLOCK_V: tl.constexpr):
    # d/dz = kl_coef * (softmax(s*z) - softmax(g*v)) + ce_coef * (softmax(z) - onehot(y)); kl_coef already
    # carries beta * kl_scale * weight * s and the upstream gradient of the row. Last block first: right
    # after the statistics pass, the blocks it read last are the likeliest to still be in L2.
    n_blocks = tl.cdiv(V, BLOCK_V)
    for i in range(n_blocks):
        cols = (n_blocks - 1 - i) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        v = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        q_s = tl.exp((z * student_scale - m_s) - log_d_s)
        p_t = tl.exp((v * teacher_scale - m_t) - log_d_t)
        grad = kl_coef * (q_s - p_t)
        if HAS_TARGET:
            if SEPARATE_CE:
                q = tl.exp((z - m_z) - log_d_z)
            else:
                q = q_s
            grad += ce_coef * (q - tl.where(cols == y, 1.0, 0.0))
        tl.store(g_row + cols, grad.to(g_row.dtype.element_ty), mask=mask)


@triton.jit
def _zero_pass(g_row, V, BLOCK_V: tl.constexpr):
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        tl.store(g_row + cols, tl.zeros((BLOCK_V,), dtype=g_row.dtype.element_ty), mask=cols < V)


@triton.jit
def ttm_fwd_kernel(
    S, s_inner, s_stride_b, s_stride_t,
    TCH, t_inner, t_stride_b, t_stride_t,
    Y, STATS,
    GRAD, g_inner, g_stride_b, g_stride_t, ROW_GRAD, row_grad_stride,
    n_rows, V,
    student_scale, teacher_scale, kl_coef, ce_weight, ignore_index,
    HAS_TARGET: tl.constexpr, WEIGHTED: tl.constexpr, SEPARATE_CE: tl.constexpr, HAS_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = _row_ptr(S, row, s_inner, s_stride_b, s_stride_t)
    t_row = _row_ptr(TCH, row, t_inner, t_stride_b, t_stride_t)
    g_row = _row_ptr(GRAD, row, g_inner, g_stride_b, g_stride_t)

    y = 0
    if HAS_TARGET:
        y = tl.load(Y + row)
        if y == ignore_index:
            for k in tl.static_range(10):
                tl.store(STATS + k * n_rows + row, 0.0)
            if HAS_GRAD:
                _zero_pass(g_row, V, BLOCK_V)
            return

    # A finite initial max: exp(-inf - m) = 0 and exp(m - m) = 1, so an all -inf prefix never gives inf - inf.
    m_s = -1.0e30
    d_s = 0.0
    m_t = -1.0e30
    d_t = 0.0
    acc = 0.0
    m_v = -1.0e30
    d_v = 0.0
    m_z = -1.0e30
    d_z = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        v = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        sz = z * student_scale
        gv = v * teacher_scale

        m_s_new = tl.maximum(m_s, tl.max(sz, 0))
        m_t_new = tl.maximum(m_t, tl.max(gv, 0))
        alpha_t = tl.exp(m_t - m_t_new)
        # Move the old terms of acc into the new frames before adding this block's.
        acc = alpha_t * (acc + ((m_t - m_t_new) - (m_s - m_s_new)) * d_t)
        e_t = tl.exp(gv - m_t_new)
        acc += tl.sum(tl.where(e_t > 0, e_t * ((gv - m_t_new) - (sz - m_s_new)), 0.0), 0)
        d_t = d_t * alpha_t + tl.sum(e_t, 0)
        d_s = d_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(sz - m_s_new), 0)
        m_s = m_s_new
        m_t = m_t_new
        if WEIGHTED:
            m_v_new = tl.maximum(m_v, tl.max(v, 0))
            d_v = d_v * tl.exp(m_v - m_v_new) + tl.sum(tl.exp(v - m_v_new), 0)
            m_v = m_v_new
        if SEPARATE_CE:
            m_z_new = tl.maximum(m_z, tl.max(z, 0))
            d_z = d_z * tl.exp(m_z - m_z_new) + tl.sum(tl.exp(z - m_z_new), 0)
            m_z = m_z_new

    log_d_s = tl.log(d_s)
    log_d_t = tl.log(d_t)
    kl = acc / d_t - log_d_t + log_d_s
    weight = 1.0
    if WEIGHTED:
        # U = sum softmax(v)^g = exp(lse(g*v) - g * lse(v)); the maxima are subtracted first.
        weight = tl.exp((m_t - teacher_scale * m_v) + log_d_t - teacher_scale * tl.log(d_v))
    if SEPARATE_CE:
        log_d_z = tl.log(d_z)
    else:
        m_z = m_s
        log_d_z = log_d_s
    ce = 0.0
    if HAS_TARGET:
        in_range = (y >= 0) & (y < V)
        z_y = tl.load(s_row + y, mask=in_range, other=float("nan")).to(tl.float32)
        ce = (m_z - z_y) + log_d_z
    loss = kl_coef * weight * kl + ce_weight * ce

    tl.store(STATS + 0 * n_rows + row, loss)
    tl.store(STATS + 1 * n_rows + row, kl)
    tl.store(STATS + 2 * n_rows + row, ce)
    tl.store(STATS + 3 * n_rows + row, weight)
    tl.store(STATS + 4 * n_rows + row, m_s)
    tl.store(STATS + 5 * n_rows + row, log_d_s)
    tl.store(STATS + 6 * n_rows + row, m_t)
    tl.store(STATS + 7 * n_rows + row, log_d_t)
    tl.store(STATS + 8 * n_rows + row, m_z)
    tl.store(STATS + 9 * n_rows + row, log_d_z)

    if HAS_GRAD:
        row_grad = tl.load(ROW_GRAD + row * row_grad_stride)
        _grad_pass(s_row, t_row, g_row, y, V, row_grad * kl_coef * weight * student_scale,
                   row_grad * ce_weight, student_scale, teacher_scale, m_s, log_d_s, m_t, log_d_t, m_z,
                   log_d_z, HAS_TARGET, SEPARATE_CE, BLOCK_V)


@triton.jit
def ttm_bwd_kernel(
    S, s_inner, s_stride_b, s_stride_t,
    TCH, t_inner, t_stride_b, t_stride_t,
    Y, STATS,
    GRAD, g_inner, g_stride_b, g_stride_t, ROW_GRAD, row_grad_stride,
    n_rows, V,
    student_scale, teacher_scale, kl_coef, ce_weight, ignore_index,
    HAS_TARGET: tl.constexpr, SEPARATE_CE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = _row_ptr(S, row, s_inner, s_stride_b, s_stride_t)
    t_row = _row_ptr(TCH, row, t_inner, t_stride_b, t_stride_t)
    g_row = _row_ptr(GRAD, row, g_inner, g_stride_b, g_stride_t)
    y = 0
    if HAS_TARGET:
        y = tl.load(Y + row)
        if y == ignore_index:
            _zero_pass(g_row, V, BLOCK_V)
            return
    weight = tl.load(STATS + 3 * n_rows + row)
    m_s = tl.load(STATS + 4 * n_rows + row)
    log_d_s = tl.load(STATS + 5 * n_rows + row)
    m_t = tl.load(STATS + 6 * n_rows + row)
    log_d_t = tl.load(STATS + 7 * n_rows + row)
    m_z = tl.load(STATS + 8 * n_rows + row)
    log_d_z = tl.load(STATS + 9 * n_rows + row)
    row_grad = tl.load(ROW_GRAD + row * row_grad_stride)
    _grad_pass(s_row, t_row, g_row, y, V, row_grad * kl_coef * weight * student_scale, row_grad * ce_weight,
               student_scale, teacher_scale, m_s, log_d_s, m_t, log_d_t, m_z, log_d_z, HAS_TARGET, SEPARATE_CE,
               BLOCK_V)


@triton.jit
def scale_kernel(G, SCALE, n_elements, BLOCK: tl.constexpr):
    # Reads the scale on the device, so the host never waits to learn that it is 1 (the usual case).
    scale = tl.load(SCALE)
    if scale != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        g = tl.load(G + offs, mask=mask).to(tl.float32)
        tl.store(G + offs, (g * scale).to(G.dtype.element_ty), mask=mask)


def scale_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad *= scale in place for a contiguous ``grad``; a 0-dim fp32 ``scale`` of 1 costs no pass over it."""
    block = 4096
    scale_kernel[(triton.cdiv(grad.numel(), block),)](grad, scale, grad.numel(), BLOCK=block, num_warps=8)


def launch_config(V: int) -> dict:
    """BLOCK_V and launch options for a vocabulary of V; benchmarks/tune_triton.py sweeps the alternatives."""
    block_v = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    return {"BLOCK_V": block_v, "num_warps": 4 if block_v <= 1024 else 8, "num_stages": 1}


def _common_args(student, teacher, target, stats, grad, row_grad):
    B, T, V = student.shape
    target_arg = target if target is not None else stats
    return (
        student, student.shape[1], student.stride(0), student.stride(1),
        teacher, teacher.shape[1], teacher.stride(0), teacher.stride(1),
        target_arg, stats,
        grad, grad.shape[1], grad.stride(0), grad.stride(1),
        row_grad, row_grad.stride(0) if row_grad.dim() else 0,
        B * T, V,
    )


def forward(student, teacher, target, *, student_scale, teacher_scale, kl_coef, ce_weight, weighted,
            ignore_index, grad=None, row_grad=None):
    """Loss statistics (10, N) fp32 of (B, T, V) row views; with ``grad``, also writes d(sum_i row_grad_i *
    loss_i)/dz into it (a (B, T, V) view, possibly ``student`` itself)."""
    B, T, V = student.shape
    stats = torch.empty((NUM_STATS, B * T), dtype=torch.float32, device=student.device)
    has_grad = grad is not None
    if not has_grad:
        grad, row_grad = student, stats
    has_target = target is not None
    ttm_fwd_kernel[(B * T,)](
        *_common_args(student, teacher, target, stats, grad, row_grad),
        float(student_scale), float(teacher_scale), float(kl_coef), float(ce_weight), int(ignore_index),
        HAS_TARGET=has_target, WEIGHTED=weighted,
        SEPARATE_CE=has_target and student_scale != 1.0, HAS_GRAD=has_grad,
        **launch_config(V),
    )
    return stats


def backward(row_grad, student, teacher, target, stats, grad, *, student_scale, teacher_scale, kl_coef,
             ce_weight, ignore_index):
    """Writes d(sum_i row_grad_i * loss_i)/dz into ``grad`` from the statistics of ``forward``."""
    B, T, V = student.shape
    has_target = target is not None
    ttm_bwd_kernel[(B * T,)](
        *_common_args(student, teacher, target, stats, grad, row_grad),
        float(student_scale), float(teacher_scale), float(kl_coef), float(ce_weight), int(ignore_index),
        HAS_TARGET=has_target, SEPARATE_CE=has_target and student_scale != 1.0,
        **launch_config(V),
    )
