"""Triton kernels for the fused TTM / WTTM / KD loss.

One program per row. Logits arrive as (B, T, V) views (last dimension contiguous, free leading strides;
each tensor with its own B x T split of the N rows); the target as a contiguous int64 (N,) and the
upstream gradient as a contiguous fp32 (N,) or a 0-dim scalar (``_ops`` normalises every argument).
Per row, with s = student_scale, g = teacher_scale:

    statistics pass: one streaming read of z and v (2V elements) with online (max, sum) accumulation of
             lse(s*z), lse(g*v), lse(v) (WTTM only) and lse(z) (CE under a student temperature only).
    KL / gradient pass: a second read of the row (from L2 when it is short enough) that recomputes the
             probabilities q = softmax(s*z) and p = softmax(g*v) and sums the KL as
             sum_i q_i f(log(p_i / q_i)), f(y) = y e^y - e^y + 1 >= 0: every term is non-negative, so the
             sum never cancels (the one-pass form, E_p[g*v - s*z] - lse(g*v) + lse(s*z), loses all its
             digits when KL << log V, e.g. KD at a large temperature). With HAS_GRAD the same pass writes
             the row's gradient (V more elements), computed in fp32 and rounded to nearest once at the store.

Statistics: (NUM_STATS, N) fp32, rows as named in ``_stats.Stat``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._stats import NUM_STATS, Stat

MAX_BLOCK_V = 4096

# The statistics rows, as compile-time constants of the kernels.
LOSS = tl.constexpr(int(Stat.LOSS))
KL = tl.constexpr(int(Stat.KL))
CE = tl.constexpr(int(Stat.CE))
WEIGHT = tl.constexpr(int(Stat.WEIGHT))
MAX_S = tl.constexpr(int(Stat.MAX_S))
LOG_SUM_S = tl.constexpr(int(Stat.LOG_SUM_S))
MAX_T = tl.constexpr(int(Stat.MAX_T))
LOG_SUM_T = tl.constexpr(int(Stat.LOG_SUM_T))
MAX_Z = tl.constexpr(int(Stat.MAX_Z))
LOG_SUM_Z = tl.constexpr(int(Stat.LOG_SUM_Z))
N_STATS = tl.constexpr(NUM_STATS)


@triton.jit
def _row_ptr(base, row, n_inner, stride_b, stride_t):
    # Each (B, T, V) view has its own split of the N rows: row = b * T + t, T = n_inner.
    return base + (row // n_inner) * stride_b + (row % n_inner) * stride_t


@triton.jit
def _store_rounded(ptr, value, mask):
    # fp32 -> the pointer's dtype, rounded to nearest even explicitly. bf16 is rounded on the bits: the
    # interpreter truncates fp32 -> bf16 whatever rounding mode is asked for, the GPU rounds to nearest, and
    # the same integer code gives the GPU's answer in both. NaN stays a quiet NaN.
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = tl.where(value != value, 0x7FC00000, bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(ptr, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    elif ptr.dtype.element_ty == tl.float16:
        tl.store(ptr, value.to(tl.float16, fp_downcast_rounding="rtne"), mask=mask)
    else:
        tl.store(ptr, value, mask=mask)


@triton.jit
def _stats_pass(s_row, t_row, V, student_scale, teacher_scale, WEIGHTED: tl.constexpr,
                SEPARATE_CE: tl.constexpr, BLOCK_V: tl.constexpr):
    # A finite initial max: exp(-inf - m) = 0 and exp(m - m) = 1, so an all -inf prefix never gives inf - inf.
    m_s = -1.0e30
    d_s = 0.0
    m_t = -1.0e30
    d_t = 0.0
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
        d_s = d_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(sz - m_s_new), 0)
        m_s = m_s_new
        m_t_new = tl.maximum(m_t, tl.max(gv, 0))
        d_t = d_t * tl.exp(m_t - m_t_new) + tl.sum(tl.exp(gv - m_t_new), 0)
        m_t = m_t_new
        if WEIGHTED:
            m_v_new = tl.maximum(m_v, tl.max(v, 0))
            d_v = d_v * tl.exp(m_v - m_v_new) + tl.sum(tl.exp(v - m_v_new), 0)
            m_v = m_v_new
        if SEPARATE_CE:
            m_z_new = tl.maximum(m_z, tl.max(z, 0))
            d_z = d_z * tl.exp(m_z - m_z_new) + tl.sum(tl.exp(z - m_z_new), 0)
            m_z = m_z_new
    return m_s, d_s, m_t, d_t, m_v, d_v, m_z, d_z


@triton.jit
def _kl_term(q, p, y):
    # q * f(y) with y = log(p / q), f(y) = (y - 1) e^y + 1 = sum_{n>=2} (n-1)/n! y^n >= 0. For |y| < 1/2 the
    # series (to n = 10, below 1e-8 relative there) keeps its digits where the closed form would cancel;
    # elsewhere the closed form p*y - p + q, with p*y = 0 where p = 0 (a class the teacher never picks, also
    # when the student masks it too and y is NaN).
    poly = 1.0 / 45360.0 + y * (1.0 / 403200.0)
    poly = 1.0 / 5760.0 + y * poly
    poly = 1.0 / 840.0 + y * poly
    poly = 1.0 / 144.0 + y * poly
    poly = 1.0 / 30.0 + y * poly
    poly = 1.0 / 8.0 + y * poly
    poly = 1.0 / 3.0 + y * poly
    poly = 0.5 + y * poly
    series = q * (y * y * poly)
    closed = tl.where(p > 0, p * y, 0.0) + (q - p)
    return tl.where(tl.abs(y) < 0.5, series, closed)


@triton.jit
def _kl_grad_pass(s_row, t_row, g_row, y, V, kl_coef, ce_coef, student_scale, teacher_scale,
                  m_s, log_d_s, m_t, log_d_t, m_z, log_d_z, HAS_TARGET: tl.constexpr, SEPARATE_CE: tl.constexpr,
                  STORE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    # Returns KL(p || q) of the row; with STORE_GRAD also writes
    # d/dz = kl_coef * (q - p) + ce_coef * (softmax(z) - onehot(y)), where kl_coef already carries
    # beta * kl_scale * weight * s and the row's upstream gradient. Last block first: right after the
    # statistics pass, the blocks it read last are the likeliest to still be in L2.
    if HAS_TARGET:
        # A class index outside [0, V) poisons the row's gradient (the loss is NaN too), never a silent answer.
        ce_coef = tl.where((y >= 0) & (y < V), ce_coef, float("nan"))
    log_ratio = log_d_t - log_d_s
    kl = tl.zeros((BLOCK_V,), dtype=tl.float32)
    n_blocks = tl.cdiv(V, BLOCK_V)
    for i in range(n_blocks):
        cols = (n_blocks - 1 - i) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        v = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        a = z * student_scale - m_s
        b = v * teacher_scale - m_t
        q = tl.exp(a - log_d_s)
        p = tl.exp(b - log_d_t)
        kl += tl.where(mask, _kl_term(q, p, (b - a) - log_ratio), 0.0)
        if STORE_GRAD:
            grad = kl_coef * (q - p)
            if HAS_TARGET:
                if SEPARATE_CE:
                    q_ce = tl.exp((z - m_z) - log_d_z)
                else:
                    q_ce = q
                grad += ce_coef * (q_ce - tl.where(cols == y, 1.0, 0.0))
            _store_rounded(g_row + cols, grad, mask)
    return tl.sum(kl, 0)


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
            for k in tl.static_range(N_STATS):
                tl.store(STATS + k * n_rows + row, 0.0)
            if HAS_GRAD:
                _zero_pass(g_row, V, BLOCK_V)
            return

    m_s, d_s, m_t, d_t, m_v, d_v, m_z, d_z = _stats_pass(s_row, t_row, V, student_scale, teacher_scale,
                                                          WEIGHTED, SEPARATE_CE, BLOCK_V)
    log_d_s = tl.log(d_s)
    log_d_t = tl.log(d_t)
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
    row_grad = 0.0
    if HAS_GRAD:
        row_grad = tl.load(ROW_GRAD + row * row_grad_stride)
    kl = _kl_grad_pass(s_row, t_row, g_row, y, V, row_grad * kl_coef * weight * student_scale,
                       row_grad * ce_weight, student_scale, teacher_scale, m_s, log_d_s, m_t, log_d_t, m_z,
                       log_d_z, HAS_TARGET, SEPARATE_CE, HAS_GRAD, BLOCK_V)

    tl.store(STATS + LOSS * n_rows + row, kl_coef * weight * kl + ce_weight * ce)
    tl.store(STATS + KL * n_rows + row, kl)
    tl.store(STATS + CE * n_rows + row, ce)
    tl.store(STATS + WEIGHT * n_rows + row, weight)
    tl.store(STATS + MAX_S * n_rows + row, m_s)
    tl.store(STATS + LOG_SUM_S * n_rows + row, log_d_s)
    tl.store(STATS + MAX_T * n_rows + row, m_t)
    tl.store(STATS + LOG_SUM_T * n_rows + row, log_d_t)
    tl.store(STATS + MAX_Z * n_rows + row, m_z)
    tl.store(STATS + LOG_SUM_Z * n_rows + row, log_d_z)


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
    weight = tl.load(STATS + WEIGHT * n_rows + row)
    row_grad = tl.load(ROW_GRAD + row * row_grad_stride)
    _kl_grad_pass(s_row, t_row, g_row, y, V, row_grad * kl_coef * weight * student_scale, row_grad * ce_weight,
                  student_scale, teacher_scale, tl.load(STATS + MAX_S * n_rows + row),
                  tl.load(STATS + LOG_SUM_S * n_rows + row), tl.load(STATS + MAX_T * n_rows + row),
                  tl.load(STATS + LOG_SUM_T * n_rows + row), tl.load(STATS + MAX_Z * n_rows + row),
                  tl.load(STATS + LOG_SUM_Z * n_rows + row), HAS_TARGET, SEPARATE_CE, True, BLOCK_V)


@triton.jit
def scale_kernel(G, SCALE, n_elements, BLOCK: tl.constexpr):
    # Reads the scale on the device, so the host never waits to learn that it is 1 (the usual case).
    scale = tl.load(SCALE)
    if scale != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        g = tl.load(G + offs, mask=mask).to(tl.float32)
        _store_rounded(G + offs, g * scale, mask)


def scale_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad *= scale in place for a contiguous ``grad``; a 0-dim fp32 ``scale`` of 1 costs no pass over it."""
    block = 4096
    scale_kernel[(triton.cdiv(grad.numel(), block),)](grad, scale, grad.numel(), BLOCK=block, num_warps=8)


def launch_config(V: int) -> dict:
    """BLOCK_V and launch options for a vocabulary of V; benchmarks/tune_triton.py sweeps the alternatives."""
    block_v = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    return {"BLOCK_V": block_v, "num_warps": 4 if block_v <= 1024 else 8, "num_stages": 1}


def _row_args(prefix: str, name: str, x: torch.Tensor) -> dict:
    return {name: x, f"{prefix}_inner": x.shape[1], f"{prefix}_stride_b": x.stride(0),
            f"{prefix}_stride_t": x.stride(1)}


def _launch_args(student, teacher, target, stats, grad, row_grad, params) -> dict:
    return {
        **_row_args("s", "S", student), **_row_args("t", "TCH", teacher), **_row_args("g", "GRAD", grad),
        "Y": target if target is not None else stats, "STATS": stats,
        "ROW_GRAD": row_grad, "row_grad_stride": 1 if row_grad.dim() else 0,
        "n_rows": student.shape[0] * student.shape[1], "V": student.shape[2],
        "student_scale": float(params["student_scale"]), "teacher_scale": float(params["teacher_scale"]),
        "kl_coef": float(params["kl_coef"]), "ce_weight": float(params["ce_weight"]),
        "ignore_index": int(params["ignore_index"]),
        "HAS_TARGET": target is not None,
        "SEPARATE_CE": target is not None and params["student_scale"] != 1.0,
        **launch_config(student.shape[2]),
    }


def forward(student, teacher, target, *, grad=None, row_grad=None, weighted, **params):
    """Loss statistics (NUM_STATS, N) fp32 of (B, T, V) row views; with ``grad``, also writes d(sum_i
    row_grad_i * loss_i)/dz into it (a (B, T, V) view, possibly ``student`` itself)."""
    n_rows = student.shape[0] * student.shape[1]
    stats = torch.empty((NUM_STATS, n_rows), dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return stats
    has_grad = grad is not None
    if not has_grad:
        grad, row_grad = student, stats  # never touched
    ttm_fwd_kernel[(n_rows,)](**_launch_args(student, teacher, target, stats, grad, row_grad, params),
                              WEIGHTED=weighted, HAS_GRAD=has_grad)
    return stats


def backward(row_grad, student, teacher, target, stats, grad, **params):
    """Writes d(sum_i row_grad_i * loss_i)/dz into ``grad`` from the statistics of ``forward``."""
    n_rows = student.shape[0] * student.shape[1]
    if n_rows:
        ttm_bwd_kernel[(n_rows,)](**_launch_args(student, teacher, target, stats, grad, row_grad, params))
