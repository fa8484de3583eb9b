"""Triton kernels for the fused TTM / WTTM / KD loss.

One program per row. Logits arrive as (B, T, V) views (last dimension contiguous, free leading strides;
each tensor with its own B x T split of the N rows); the target as a contiguous int64 (N,) and the
upstream gradient as a contiguous fp32 (N,) or a 0-dim scalar (``_ops`` normalises every argument).
Per row, with s = student_scale, g = teacher_scale, q = softmax(s*z), p = softmax(g*v):

    statistics pass: one streaming read of z and v (2V elements) with online (max, sum) accumulation of
             lse(s*z), lse(g*v), lse(v) (WTTM only) and lse(z) (CE under a student temperature only).
    sums pass: a second read of the row (from L2 when it is short enough) that recomputes q and p and sums
             the divergence D (``LossSpec.jsd_beta``: the DIVERGENCE constexpr) and the student's entropy.
             Every KL(x || w) is summed as sum_i w_i f(log(x_i / w_i)), f(y) = y e^y - e^y + 1 >= 0: every
             term is non-negative, so the sum never cancels (the one-pass form, E_p[g*v - s*z] - lse(g*v) +
             lse(s*z), loses all its digits when KL << log V, e.g. KD at a large temperature).
    gradient: dD/d(s*z_j) = q_j - p_j for the forward KL(p || q), written by the sums pass itself (HAS_GRAD:
             V more elements), computed in fp32 and rounded to nearest once at the store. The reverse KL(q || p)
             (q_j (log(q_j / p_j) - D)) and the generalised JSD (beta KL(p || m) + (1 - beta) KL(q || m),
             m = beta p + (1 - beta) q: (1 - beta) q_j (log(q_j / m_j) - K), K = KL(q || m)) need a row sum
             first, so their gradient takes a third read of the row. A row of one block does all of it in
             registers, reading the row once.

Exponentials per element (beyond the statistics pass's two): forward KL 2, reverse KL 2 (+1 for the gradient),
JSD 3 (+2 for the gradient: q and e^-|log(p/q)|; its logarithm runs on the FMA units).

Statistics: (NUM_STATS, N) fp32, rows as named in ``_stats.Stat``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._stats import NUM_PARTIAL, NUM_PIECE_SUMS, NUM_STATS, Partial, PieceSum, Stat

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
DIV_GRAD = tl.constexpr(int(Stat.DIV_GRAD))
ENTROPY = tl.constexpr(int(Stat.ENTROPY))
N_STATS = tl.constexpr(NUM_STATS)
P_MAX_S = tl.constexpr(int(Partial.MAX_S))
P_SUM_S = tl.constexpr(int(Partial.SUM_S))
P_MAX_T = tl.constexpr(int(Partial.MAX_T))
P_SUM_T = tl.constexpr(int(Partial.SUM_T))
P_MAX_V = tl.constexpr(int(Partial.MAX_V))
P_SUM_V = tl.constexpr(int(Partial.SUM_V))
P_MAX_Z = tl.constexpr(int(Partial.MAX_Z))
P_SUM_Z = tl.constexpr(int(Partial.SUM_Z))
P_TARGET_LOGIT = tl.constexpr(int(Partial.TARGET_LOGIT))
S_KL = tl.constexpr(int(PieceSum.KL))
S_DIV_GRAD = tl.constexpr(int(PieceSum.DIV_GRAD))
S_ENTROPY = tl.constexpr(int(PieceSum.ENTROPY))
N_PIECE_SUMS = tl.constexpr(NUM_PIECE_SUMS)

# The divergence D of the loss (the DIVERGENCE constexpr), as ``LossSpec.jsd_beta`` selects it: 0 the forward
# KL(p || q), 1 the reverse KL(q || p), in between the generalised JSD (``reference.divergence``).
FORWARD_KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)


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
def _ipow(x, K: tl.constexpr):
    # x**K for a compile-time integer K in [1, 127], by squaring: multiplications on the FMA units instead of
    # an exponential on the special-function units, which bind as early as memory does (see _stats_pass).
    result = x
    for i in tl.static_range(5, -1, -1):
        if K >> (i + 1) != 0:  # below K's top bit
            result = result * result
            if (K >> i) & 1:
                result = result * x
    return result


@triton.jit
def _block_sums(z, v, m_s, d_s, m_t, d_t, m_v, d_v, m_z, d_z, student_scale, teacher_scale,
                WEIGHTED: tl.constexpr, SEPARATE_CE: tl.constexpr, TEACHER_POWER: tl.constexpr,
                STUDENT_POWER: tl.constexpr):
    # One block of the statistics pass: the online sums after it, and the block's exp(s*z - m_s) and
    # exp(g*v - m_t) against the new maxima. lse(v) (WTTM) and lse(z) (CE under a temperature) cost no
    # exponential when g = 1/K (TEACHER_POWER = K) or s = 1/K (STUDENT_POWER = K) for an integer K: then
    # exp(v - K m_t) = exp(g*v - m_t)^K, and their sums live in the frames K m_t and K m_s.
    sz = z * student_scale
    gv = v * teacher_scale
    m_s_new = tl.maximum(m_s, tl.max(sz, 0))
    alpha_s = tl.exp(m_s - m_s_new)
    e_s = tl.exp(sz - m_s_new)
    m_t_new = tl.maximum(m_t, tl.max(gv, 0))
    alpha_t = tl.exp(m_t - m_t_new)
    e_t = tl.exp(gv - m_t_new)
    if WEIGHTED:
        if TEACHER_POWER > 0:
            d_v = d_v * _ipow(alpha_t, TEACHER_POWER) + tl.sum(_ipow(e_t, TEACHER_POWER), 0)
        else:
            m_v_new = tl.maximum(m_v, tl.max(v, 0))
            d_v = d_v * tl.exp(m_v - m_v_new) + tl.sum(tl.exp(v - m_v_new), 0)
            m_v = m_v_new
    if SEPARATE_CE:
        if STUDENT_POWER > 0:
            d_z = d_z * _ipow(alpha_s, STUDENT_POWER) + tl.sum(_ipow(e_s, STUDENT_POWER), 0)
        else:
            m_z_new = tl.maximum(m_z, tl.max(z, 0))
            d_z = d_z * tl.exp(m_z - m_z_new) + tl.sum(tl.exp(z - m_z_new), 0)
            m_z = m_z_new
    d_s = d_s * alpha_s + tl.sum(e_s, 0)
    d_t = d_t * alpha_t + tl.sum(e_t, 0)
    return m_s_new, d_s, m_t_new, d_t, m_v, d_v, m_z, d_z, e_s, e_t


@triton.jit
def _derived_maxima(m_s, m_t, m_v, m_z, TEACHER_POWER: tl.constexpr, STUDENT_POWER: tl.constexpr):
    # The frames of the sums _block_sums derives by powers (see there).
    if TEACHER_POWER > 0:
        m_v = TEACHER_POWER * m_t
    if STUDENT_POWER > 0:
        m_z = STUDENT_POWER * m_s
    return m_v, m_z


@triton.jit
def _stats_pass(s_row, t_row, V, student_scale, teacher_scale, WEIGHTED: tl.constexpr,
                SEPARATE_CE: tl.constexpr, TEACHER_POWER: tl.constexpr, STUDENT_POWER: tl.constexpr,
                BLOCK_V: tl.constexpr):
    # Exponentials per element: exp(s*z - m_s) and exp(g*v - m_t), plus one each for lse(v) and lse(z) unless
    # derived by powers. An H200 issues ~4.2e12 exponentials/s against 0.8e12 bf16 elements/s of HBM traffic
    # (3 touches of 2 bytes), so at 5 per element the special-function units bind before memory does.
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
        m_s, d_s, m_t, d_t, m_v, d_v, m_z, d_z, _, _ = _block_sums(
            z, v, m_s, d_s, m_t, d_t, m_v, d_v, m_z, d_z, student_scale, teacher_scale, WEIGHTED, SEPARATE_CE,
            TEACHER_POWER, STUDENT_POWER)
    m_v, m_z = _derived_maxima(m_s, m_t, m_v, m_z, TEACHER_POWER, STUDENT_POWER)
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
def _ce_grad(q, e_s, z, cols, y, ce_coef, m_z, log_d_z, inv_d_z, SEPARATE_CE: tl.constexpr,
             STUDENT_POWER: tl.constexpr):
    # The cross-entropy's gradient ce_coef * (softmax(z) - onehot(y)). e_s = exp(s*z - m_s) gives
    # softmax(z) = e_s^K / d_z without an exponential when s = 1/K (see _block_sums).
    if SEPARATE_CE:
        if STUDENT_POWER > 0:
            q_ce = _ipow(e_s, STUDENT_POWER) * inv_d_z
        else:
            q_ce = tl.exp((z - m_z) - log_d_z)
    else:
        q_ce = q
    return ce_coef * (q_ce - tl.where(cols == y, 1.0, 0.0))


@triton.jit
def _block_kl_grad(q, p, e_s, log_ratio, z, cols, mask, y, kl_coef, ce_coef, m_z, log_d_z, inv_d_z,
                   HAS_TARGET: tl.constexpr, SEPARATE_CE: tl.constexpr, STUDENT_POWER: tl.constexpr):
    # A block's forward-KL terms and gradient d/dz = kl_coef * (q - p) + ce_coef * (softmax(z) - onehot(y)),
    # where kl_coef already carries beta * kl_scale * weight * s and the row's upstream gradient.
    kl_terms = tl.where(mask, _kl_term(q, p, log_ratio), 0.0)
    grad = kl_coef * (q - p)
    if HAS_TARGET:
        grad += _ce_grad(q, e_s, z, cols, y, ce_coef, m_z, log_d_z, inv_d_z, SEPARATE_CE, STUDENT_POWER)
    return kl_terms, grad


@triton.jit
def _expm1_neg(r):
    # expm1(-r) for r >= 0: below 1/2 the series (to r^9/9!, below 1e-9 relative there), where exp(-r) - 1
    # would lose the digits of a small r.
    x = -r
    poly = 1.0 / 40320.0 + x * (1.0 / 362880.0)
    poly = 1.0 / 5040.0 + x * poly
    poly = 1.0 / 720.0 + x * poly
    poly = 1.0 / 120.0 + x * poly
    poly = 1.0 / 24.0 + x * poly
    poly = 1.0 / 6.0 + x * poly
    poly = 0.5 + x * poly
    poly = 1.0 + x * poly
    return tl.where(r < 0.5, x * poly, tl.exp(x) - 1.0)


@triton.jit
def _log_over_mixture(log_ratio, jsd_beta):
    # log(p / m) and log(q / m), m = beta p + (1 - beta) q, from y = log(p / q) alone (not from p and q, which
    # may have underflowed): the larger of p, q over m is 1 / (1 + c expm1(-|y|)), c the smaller one's weight
    # in m, and the smaller over m is e^-|y| times that. log1p(t) = log(u) + (t - (u - 1)) with u = 1 + t: the
    # second term is u's rounding error (exact for t in (-1, 0]), so a small t, where m is close to both,
    # keeps its digits. A class of p = 0 (or q = 0) gets -inf and log(1 / (1 - beta)) (or log(1 / beta)).
    r = tl.abs(log_ratio)
    teacher_larger = log_ratio >= 0
    t = tl.where(teacher_larger, 1.0 - jsd_beta, jsd_beta) * _expm1_neg(r)
    u = 1.0 + t
    log_larger = -(tl.log(u) + (t - (u - 1.0)))
    log_smaller = log_larger - r
    return tl.where(teacher_larger, log_larger, log_smaller), tl.where(teacher_larger, log_smaller, log_larger)


@triton.jit
def _divergence_terms(q, p, log_ratio, jsd_beta, DIVERGENCE: tl.constexpr):
    # A block's terms of D and of the row sum its gradient needs (the reverse KL itself; K = KL(q || m) for
    # the JSD; none for the forward KL), each a KL term that never cancels (_kl_term). log_ratio = log(p / q).
    if DIVERGENCE == FORWARD_KL:
        div = _kl_term(q, p, log_ratio)
        div_grad = tl.zeros_like(div)
    elif DIVERGENCE == REVERSE_KL:
        div = _kl_term(p, q, -log_ratio)
        div_grad = div
    else:
        log_p_m, log_q_m = _log_over_mixture(log_ratio, jsd_beta)
        m = jsd_beta * p + (1.0 - jsd_beta) * q
        div_grad = _kl_term(m, q, log_q_m)
        div = jsd_beta * _kl_term(m, p, log_p_m) + (1.0 - jsd_beta) * div_grad
    return div, div_grad


@triton.jit
def _divergence_grad_factor(log_ratio, jsd_beta, row_div_grad, DIVERGENCE: tl.constexpr):
    # dD / d(s*z_j) = q_j times this, for the reverse KL (log(q_j / p_j) - D) and the JSD
    # ((1 - beta) (log(q_j / m_j) - K)), given the row sum of _divergence_terms' second value.
    if DIVERGENCE == REVERSE_KL:
        factor = -log_ratio - row_div_grad
    else:
        _, log_q_m = _log_over_mixture(log_ratio, jsd_beta)
        factor = (1.0 - jsd_beta) * (log_q_m - row_div_grad)
    return factor


@triton.jit
def _divergence_grad(q, p, log_ratio, jsd_beta, row_div_grad, DIVERGENCE: tl.constexpr):
    # dD / d(s*z_j): q - p for the forward KL, else q times _divergence_grad_factor; 0 where q = 0, whose log
    # is -inf.
    if DIVERGENCE == FORWARD_KL:
        grad = q - p
    else:
        grad = tl.where(q > 0, q * _divergence_grad_factor(log_ratio, jsd_beta, row_div_grad, DIVERGENCE), 0.0)
    return grad


@triton.jit
def _entropy_terms(q, log_q):
    # -q log q, 0 where q = 0 (a masked or underflowed class).
    return tl.where(q > 0, -q * log_q, 0.0)


@triton.jit
def _row_pass(s_row, t_row, g_row, y, V, kl_coef, ce_coef, student_scale, teacher_scale, m_s, log_d_s, m_t,
              log_d_t, m_z, log_d_z, jsd_beta, row_div_grad, HAS_TARGET: tl.constexpr, SEPARATE_CE: tl.constexpr,
              STUDENT_POWER: tl.constexpr, DIVERGENCE: tl.constexpr, SUMS: tl.constexpr,
              STORE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    # Over V columns from the given pointers (a row, or one piece of it, whose target column is y: it may lie
    # outside [0, V) when another piece holds it). With SUMS returns the columns' shares of D, of the row sum
    # the gradient needs and of the entropy; with STORE_GRAD writes their gradient (given that row sum,
    # row_div_grad, unless the divergence is the forward KL). Two exponentials per element (a third for the
    # JSD), one fewer for a gradient pass of the reverse KL or the JSD without SUMS. Last block first: right
    # after the statistics pass, the blocks it read last are the likeliest to still be in L2.
    log_ratio = log_d_t - log_d_s
    d_s = tl.exp(log_d_s)
    inv_d_z = tl.exp(-log_d_z)
    div = tl.zeros((BLOCK_V,), dtype=tl.float32)
    div_grad = tl.zeros((BLOCK_V,), dtype=tl.float32)
    entropy = tl.zeros((BLOCK_V,), dtype=tl.float32)
    n_blocks = tl.cdiv(V, BLOCK_V)
    for i in range(n_blocks):
        cols = (n_blocks - 1 - i) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        v = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        a = z * student_scale - m_s
        b = v * teacher_scale - m_t
        q = tl.exp(a - log_d_s)
        p = tl.exp(b - log_d_t)  # dropped by the compiler where unused (a gradient pass of the reverse KL, JSD)
        if DIVERGENCE == FORWARD_KL:
            # The forward KL's arithmetic as it always was: terms and gradient in one pass.
            div_terms, grad = _block_kl_grad(q, p, q * d_s, (b - a) - log_ratio, z, cols, mask, y, kl_coef,
                                             ce_coef, m_z, log_d_z, inv_d_z, HAS_TARGET, SEPARATE_CE, STUDENT_POWER)
            if SUMS:
                div += div_terms
        else:
            log_ratio_j = (b - a) - log_ratio
            if SUMS:
                div_terms, div_grad_terms = _divergence_terms(q, p, log_ratio_j, jsd_beta, DIVERGENCE)
                div += tl.where(mask, div_terms, 0.0)
                div_grad += tl.where(mask, div_grad_terms, 0.0)
            grad = kl_coef * _divergence_grad(q, p, log_ratio_j, jsd_beta, row_div_grad, DIVERGENCE)
            if HAS_TARGET:
                grad += _ce_grad(q, q * d_s, z, cols, y, ce_coef, m_z, log_d_z, inv_d_z, SEPARATE_CE,
                                 STUDENT_POWER)
        if SUMS:
            entropy += _entropy_terms(q, a - log_d_s)
        if STORE_GRAD:
            _store_rounded(g_row + cols, grad, mask)
    return tl.sum(div, 0), tl.sum(div_grad, 0), tl.sum(entropy, 0)


@triton.jit
def _zero_pass(g_row, V, BLOCK_V: tl.constexpr):
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        tl.store(g_row + cols, tl.zeros((BLOCK_V,), dtype=g_row.dtype.element_ty), mask=cols < V)


@triton.jit
def _finalize(m_s, d_s, m_t, d_t, m_v, d_v, m_z, d_z, z_y, teacher_scale, HAS_TARGET: tl.constexpr,
              WEIGHTED: tl.constexpr, SEPARATE_CE: tl.constexpr):
    # A row's online sums -> (log_d_s, log_d_t, weight, m_z, log_d_z, ce), whether the sums were made in one
    # program or merged from pieces.
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
        ce = (m_z - z_y) + log_d_z
    return log_d_s, log_d_t, weight, m_z, log_d_z, ce


@triton.jit
def _checked_ce_coef(ce_coef, y, V, HAS_TARGET: tl.constexpr):
    # A class index outside [0, V) poisons the row's gradient (its loss is NaN too), never a silent answer.
    if HAS_TARGET:
        ce_coef = tl.where((y >= 0) & (y < V), ce_coef, float("nan"))
    return ce_coef


@triton.jit
def _store_row_stats(STATS, n_rows, row, weight, m_s, log_d_s, m_t, log_d_t, m_z, log_d_z, ce):
    tl.store(STATS + CE * n_rows + row, ce)
    tl.store(STATS + WEIGHT * n_rows + row, weight)
    tl.store(STATS + MAX_S * n_rows + row, m_s)
    tl.store(STATS + LOG_SUM_S * n_rows + row, log_d_s)
    tl.store(STATS + MAX_T * n_rows + row, m_t)
    tl.store(STATS + LOG_SUM_T * n_rows + row, log_d_t)
    tl.store(STATS + MAX_Z * n_rows + row, m_z)
    tl.store(STATS + LOG_SUM_Z * n_rows + row, log_d_z)


@triton.jit
def _store_row_sums(STATS, n_rows, row, kl, div_grad, entropy, loss):
    tl.store(STATS + KL * n_rows + row, kl)
    tl.store(STATS + DIV_GRAD * n_rows + row, div_grad)
    tl.store(STATS + ENTROPY * n_rows + row, entropy)
    tl.store(STATS + LOSS * n_rows + row, loss)


@triton.jit
def ttm_fwd_kernel(
    S, s_inner, s_stride_b, s_stride_t,
    TCH, t_inner, t_stride_b, t_stride_t,
    Y, STATS,
    GRAD, g_inner, g_stride_b, g_stride_t, ROW_GRAD, row_grad_stride,
    n_rows, V,
    student_scale, teacher_scale, kl_coef, ce_weight, ignore_index, jsd_beta,
    HAS_TARGET: tl.constexpr, WEIGHTED: tl.constexpr, SEPARATE_CE: tl.constexpr, HAS_GRAD: tl.constexpr,
    TEACHER_POWER: tl.constexpr, STUDENT_POWER: tl.constexpr, DIVERGENCE: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # One program per row: statistics, then the sums (and gradient; a third pass for the reverse KL and the
    # JSD), with the row's sums in registers. A row of one block (SINGLE_BLOCK: V <= BLOCK_V) stays in registers
    # too: read once, two exponentials per element (three for the JSD).
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

    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        v = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_s, d_s, m_t, d_t, m_v, d_v, m_z, d_z, e_s, e_t = _block_sums(
            z, v, -1.0e30, 0.0, -1.0e30, 0.0, -1.0e30, 0.0, -1.0e30, 0.0, student_scale, teacher_scale, WEIGHTED,
            SEPARATE_CE, TEACHER_POWER, STUDENT_POWER)
        m_v, m_z = _derived_maxima(m_s, m_t, m_v, m_z, TEACHER_POWER, STUDENT_POWER)
    else:
        m_s, d_s, m_t, d_t, m_v, d_v, m_z, d_z = _stats_pass(s_row, t_row, V, student_scale, teacher_scale,
                                                              WEIGHTED, SEPARATE_CE, TEACHER_POWER, STUDENT_POWER,
                                                              BLOCK_V)
    z_y = 0.0
    if HAS_TARGET:
        z_y = tl.load(s_row + y, mask=(y >= 0) & (y < V), other=float("nan")).to(tl.float32)
    log_d_s, log_d_t, weight, m_z, log_d_z, ce = _finalize(m_s, d_s, m_t, d_t, m_v, d_v, m_z, d_z, z_y,
                                                           teacher_scale, HAS_TARGET, WEIGHTED, SEPARATE_CE)
    row_grad = 0.0
    if HAS_GRAD:
        row_grad = tl.load(ROW_GRAD + row * row_grad_stride)
    grad_kl_coef = row_grad * kl_coef * weight * student_scale
    ce_coef = _checked_ce_coef(row_grad * ce_weight, y, V, HAS_TARGET)
    if SINGLE_BLOCK:
        a = z * student_scale - m_s
        b = v * teacher_scale - m_t
        q = e_s / d_s
        p = e_t / d_t
        log_ratio = (b - a) - (log_d_t - log_d_s)
        if DIVERGENCE == FORWARD_KL:
            kl_terms, grad = _block_kl_grad(q, p, e_s, log_ratio, z, cols, mask, y, grad_kl_coef, ce_coef, m_z,
                                            log_d_z, tl.exp(-log_d_z), HAS_TARGET, SEPARATE_CE, STUDENT_POWER)
            kl = tl.sum(kl_terms, 0)
            div_grad = 0.0
        else:
            kl_terms, div_grad_terms = _divergence_terms(q, p, log_ratio, jsd_beta, DIVERGENCE)
            kl = tl.sum(tl.where(mask, kl_terms, 0.0), 0)
            div_grad = tl.sum(tl.where(mask, div_grad_terms, 0.0), 0)
            grad = grad_kl_coef * _divergence_grad(q, p, log_ratio, jsd_beta, div_grad, DIVERGENCE)
            if HAS_TARGET:
                grad += _ce_grad(q, e_s, z, cols, y, ce_coef, m_z, log_d_z, tl.exp(-log_d_z), SEPARATE_CE,
                                 STUDENT_POWER)
        entropy = tl.sum(_entropy_terms(q, a - log_d_s), 0)
        if HAS_GRAD:
            _store_rounded(g_row + cols, grad, mask)
    else:
        # The forward KL writes its gradient in the sums pass; the others need the pass's row sum first.
        kl, div_grad, entropy = _row_pass(
            s_row, t_row, g_row, y, V, grad_kl_coef, ce_coef, student_scale, teacher_scale, m_s, log_d_s, m_t,
            log_d_t, m_z, log_d_z, jsd_beta, 0.0, HAS_TARGET, SEPARATE_CE, STUDENT_POWER, DIVERGENCE, True,
            HAS_GRAD and DIVERGENCE == FORWARD_KL, BLOCK_V)
        if HAS_GRAD and DIVERGENCE != FORWARD_KL:
            _row_pass(s_row, t_row, g_row, y, V, grad_kl_coef, ce_coef, student_scale, teacher_scale, m_s, log_d_s,
                      m_t, log_d_t, m_z, log_d_z, jsd_beta, div_grad, HAS_TARGET, SEPARATE_CE, STUDENT_POWER,
                      DIVERGENCE, False, True, BLOCK_V)
    _store_row_stats(STATS, n_rows, row, weight, m_s, log_d_s, m_t, log_d_t, m_z, log_d_z, ce)
    _store_row_sums(STATS, n_rows, row, kl, div_grad, entropy, kl_coef * weight * kl + ce_weight * ce)


# The split-row path, for few long rows: programs over (row, piece of CHUNK_V columns). Each writes its
# piece's online sums (PARTIAL: N_PARTIAL x N x C fp32, rows as named in _stats.Partial); one program per row
# merges them into the row's statistics; the piece programs then make the sums pass over their pieces (SUMS:
# N_PIECE_SUMS x N x C, rows as named in _stats.PieceSum; the forward KL's gradient in the same pass); one
# program per row sums the pieces' sums and writes the loss; for the reverse KL and the JSD the piece programs
# then write the gradient from the row's sum.


@triton.jit
def _program_piece(V, chunk_v):
    # Programs over (row, piece): this program's row, piece, first column and width.
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    start = chunk * chunk_v
    return row, chunk, start, tl.minimum(chunk_v, V - start)


@triton.jit
def ttm_partial_kernel(
    S, s_inner, s_stride_b, s_stride_t,
    TCH, t_inner, t_stride_b, t_stride_t,
    Y, PARTIAL, n_rows, V, col_offset, chunk_v, n_chunks,
    student_scale, teacher_scale, ignore_index,
    HAS_TARGET: tl.constexpr, WEIGHTED: tl.constexpr, SEPARATE_CE: tl.constexpr, TEACHER_POWER: tl.constexpr,
    STUDENT_POWER: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row, chunk, start, width = _program_piece(V, chunk_v)
    s_row = _row_ptr(S, row, s_inner, s_stride_b, s_stride_t) + start
    t_row = _row_ptr(TCH, row, t_inner, t_stride_b, t_stride_t) + start
    y = 0
    if HAS_TARGET:
        y = tl.load(Y + row)
    z_y = float("-inf")  # merged by max: only the piece that holds the target column has it
    if HAS_TARGET and y != ignore_index:
        column = y - col_offset - start
        z_y = tl.load(s_row + column, mask=(column >= 0) & (column < width), other=float("-inf")).to(tl.float32)
    m_s, d_s, m_t, d_t, m_v, d_v, m_z, d_z = _stats_pass(s_row, t_row, width, student_scale, teacher_scale,
                                                          WEIGHTED, SEPARATE_CE, TEACHER_POWER, STUDENT_POWER,
                                                          BLOCK_V)
    out = PARTIAL + row * n_chunks + chunk
    stride = n_rows * n_chunks
    tl.store(out + P_MAX_S * stride, m_s)
    tl.store(out + P_SUM_S * stride, d_s)
    tl.store(out + P_MAX_T * stride, m_t)
    tl.store(out + P_SUM_T * stride, d_t)
    tl.store(out + P_MAX_V * stride, m_v)
    tl.store(out + P_SUM_V * stride, d_v)
    tl.store(out + P_MAX_Z * stride, m_z)
    tl.store(out + P_SUM_Z * stride, d_z)
    tl.store(out + P_TARGET_LOGIT * stride, z_y)


@triton.jit
def _merged(PARTIAL, k_max, k_sum, offs, mask, stride):
    # The online (max, sum) pair of a row merged over its pieces: M = max m_c, D = sum d_c exp(m_c - M).
    m = tl.load(PARTIAL + k_max * stride + offs, mask=mask, other=-1.0e30)
    d = tl.load(PARTIAL + k_sum * stride + offs, mask=mask, other=0.0)
    m_all = tl.max(m, 0)
    return m_all, tl.sum(d * tl.exp(m - m_all), 0)


@triton.jit
def ttm_merge_kernel(
    PARTIAL, Y, STATS, n_rows, n_chunks, V, teacher_scale, ignore_index,
    HAS_TARGET: tl.constexpr, WEIGHTED: tl.constexpr, SEPARATE_CE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = 0
    if HAS_TARGET:
        y = tl.load(Y + row)
        if y == ignore_index:
            for k in tl.static_range(N_STATS):
                tl.store(STATS + k * n_rows + row, 0.0)
            return
    pieces = tl.arange(0, BLOCK_C)
    mask = pieces < n_chunks
    offs = row * n_chunks + pieces
    stride = n_rows * n_chunks
    m_s, d_s = _merged(PARTIAL, P_MAX_S, P_SUM_S, offs, mask, stride)
    m_t, d_t = _merged(PARTIAL, P_MAX_T, P_SUM_T, offs, mask, stride)
    m_v, d_v = _merged(PARTIAL, P_MAX_V, P_SUM_V, offs, mask, stride)
    m_z, d_z = _merged(PARTIAL, P_MAX_Z, P_SUM_Z, offs, mask, stride)
    z_y = 0.0
    if HAS_TARGET:
        z_y = tl.max(tl.load(PARTIAL + P_TARGET_LOGIT * stride + offs, mask=mask, other=float("-inf")), 0)
        z_y = tl.where((y >= 0) & (y < V), z_y, float("nan"))
    log_d_s, log_d_t, weight, m_z, log_d_z, ce = _finalize(m_s, d_s, m_t, d_t, m_v, d_v, m_z, d_z, z_y,
                                                           teacher_scale, HAS_TARGET, WEIGHTED, SEPARATE_CE)
    _store_row_stats(STATS, n_rows, row, weight, m_s, log_d_s, m_t, log_d_t, m_z, log_d_z, ce)


@triton.jit
def ttm_piece_kernel(
    S, s_inner, s_stride_b, s_stride_t,
    TCH, t_inner, t_stride_b, t_stride_t,
    Y, STATS,
    GRAD, g_inner, g_stride_b, g_stride_t, ROW_GRAD, row_grad_stride,
    SUMS, n_rows, V, col_offset, row_vocab, chunk_v, n_chunks,
    student_scale, teacher_scale, kl_coef, ce_weight, ignore_index, jsd_beta,
    HAS_TARGET: tl.constexpr, SEPARATE_CE: tl.constexpr, STUDENT_POWER: tl.constexpr, DIVERGENCE: tl.constexpr,
    HAS_GRAD: tl.constexpr, HAS_SUMS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # The sums (HAS_SUMS) and gradient (HAS_GRAD) pass over one piece of a row, from the row's statistics (for
    # the gradient of the reverse KL or the JSD, their DIV_GRAD row too): the V columns here are columns
    # [col_offset, col_offset + V) of rows of row_vocab. With one piece per row, this is also the backward of
    # either path.
    row, chunk, start, width = _program_piece(V, chunk_v)
    s_row = _row_ptr(S, row, s_inner, s_stride_b, s_stride_t) + start
    t_row = _row_ptr(TCH, row, t_inner, t_stride_b, t_stride_t) + start
    g_row = _row_ptr(GRAD, row, g_inner, g_stride_b, g_stride_t) + start
    out = SUMS + row * n_chunks + chunk
    stride = n_rows * n_chunks
    y = 0
    if HAS_TARGET:
        y = tl.load(Y + row)
        if y == ignore_index:
            if HAS_GRAD:
                _zero_pass(g_row, width, BLOCK_V)
            if HAS_SUMS:
                for k in tl.static_range(N_PIECE_SUMS):
                    tl.store(out + k * stride, 0.0)
            return
    weight = tl.load(STATS + WEIGHT * n_rows + row)
    row_grad = 0.0
    row_div_grad = 0.0
    if HAS_GRAD:
        row_grad = tl.load(ROW_GRAD + row * row_grad_stride)
        if DIVERGENCE != FORWARD_KL:
            row_div_grad = tl.load(STATS + DIV_GRAD * n_rows + row)
    kl, div_grad, entropy = _row_pass(
        s_row, t_row, g_row, y - col_offset - start, width, row_grad * kl_coef * weight * student_scale,
        _checked_ce_coef(row_grad * ce_weight, y, row_vocab, HAS_TARGET), student_scale, teacher_scale,
        tl.load(STATS + MAX_S * n_rows + row), tl.load(STATS + LOG_SUM_S * n_rows + row),
        tl.load(STATS + MAX_T * n_rows + row), tl.load(STATS + LOG_SUM_T * n_rows + row),
        tl.load(STATS + MAX_Z * n_rows + row), tl.load(STATS + LOG_SUM_Z * n_rows + row), jsd_beta, row_div_grad,
        HAS_TARGET, SEPARATE_CE, STUDENT_POWER, DIVERGENCE, HAS_SUMS, HAS_GRAD, BLOCK_V)
    if HAS_SUMS:
        tl.store(out + S_KL * stride, kl)
        tl.store(out + S_DIV_GRAD * stride, div_grad)
        tl.store(out + S_ENTROPY * stride, entropy)


@triton.jit
def _pieces_total(SUMS, k, row, n_chunks, stride, BLOCK_C: tl.constexpr):
    # A row's sum over its pieces, in piece order: the same result on every run.
    pieces = tl.arange(0, BLOCK_C)
    return tl.sum(tl.load(SUMS + k * stride + row * n_chunks + pieces, mask=pieces < n_chunks, other=0.0), 0)


@triton.jit
def ttm_loss_kernel(SUMS, STATS, n_rows, n_chunks, kl_coef, ce_weight, BLOCK_C: tl.constexpr):
    # Sums a row's pieces' sums and writes KL, DIV_GRAD, ENTROPY and the loss.
    row = tl.program_id(0).to(tl.int64)
    stride = n_rows * n_chunks
    kl = _pieces_total(SUMS, S_KL, row, n_chunks, stride, BLOCK_C)
    weight = tl.load(STATS + WEIGHT * n_rows + row)
    ce = tl.load(STATS + CE * n_rows + row)
    div_grad = _pieces_total(SUMS, S_DIV_GRAD, row, n_chunks, stride, BLOCK_C)
    entropy = _pieces_total(SUMS, S_ENTROPY, row, n_chunks, stride, BLOCK_C)
    _store_row_sums(STATS, n_rows, row, kl, div_grad, entropy, kl_coef * weight * kl + ce_weight * ce)


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
    """BLOCK_V and launch options for rows (or pieces) of V columns; benchmarks/tune_triton.py sweeps the
    alternatives."""
    block_v = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    return {"BLOCK_V": block_v, "num_warps": 4 if block_v <= 1024 else 8, "num_stages": 1}


# The split-row path pays for itself when one program per row leaves SMs idle: aim at PROGRAMS_PER_SM programs
# per SM, in pieces of at least MIN_PIECE_COLUMNS columns (enough work per program to hide its start-up and
# the merge). Both to be set from the device sweep (benchmarks/tune_triton.py).
PROGRAMS_PER_SM = 4
MIN_PIECE_COLUMNS = 16384


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one by one: nothing to fill


def row_split(n_rows: int, V: int, device: torch.device) -> int:
    """Columns per program: V (one program per row) unless rows are too few to fill the device, then pieces
    of a multiple of MAX_BLOCK_V columns. The one place that picks the path."""
    wanted = triton.cdiv(PROGRAMS_PER_SM * _sm_count(device), max(n_rows, 1))
    pieces = min(wanted, V // MIN_PIECE_COLUMNS)
    if pieces <= 1:
        return V
    return triton.cdiv(triton.cdiv(V, pieces), MAX_BLOCK_V) * MAX_BLOCK_V


def _integer_inverse(scale: float) -> int:
    """K when ``scale`` is 1/K for an integer K in [1, 127] (to fp32 precision), else 0: the exponent that
    derives exp(x - K m) from exp(scale * x - m) (``_block_sums``)."""
    k = round(1.0 / scale)
    return k if 1 <= k <= 127 and abs(k * scale - 1.0) < 1e-6 else 0


def _row_args(prefix: str, name: str, x: torch.Tensor) -> dict:
    return {name: x, f"{prefix}_inner": x.shape[1], f"{prefix}_stride_b": x.stride(0),
            f"{prefix}_stride_t": x.stride(1)}


def _separate_ce(target, student_scale) -> bool:
    return target is not None and student_scale != 1.0


def _student_power(target, student_scale) -> int:
    return _integer_inverse(student_scale) if _separate_ce(target, student_scale) else 0


def divergence(jsd_beta: float) -> int:
    """The DIVERGENCE constexpr of ``LossSpec.jsd_beta``: 0 the forward KL, 1 the reverse KL, else the JSD."""
    return int(FORWARD_KL) if jsd_beta == 0.0 else int(REVERSE_KL) if jsd_beta == 1.0 else int(JSD)


def _launch_args(student, teacher, target, stats, grad, row_grad, params) -> dict:
    return {
        **_row_args("s", "S", student), **_row_args("t", "TCH", teacher), **_row_args("g", "GRAD", grad),
        "Y": target if target is not None else stats, "STATS": stats,
        "ROW_GRAD": row_grad, "row_grad_stride": 1 if row_grad.dim() else 0,
        "n_rows": student.shape[0] * student.shape[1], "V": student.shape[2],
        "student_scale": float(params["student_scale"]), "teacher_scale": float(params["teacher_scale"]),
        "kl_coef": float(params["kl_coef"]), "ce_weight": float(params["ce_weight"]),
        "ignore_index": int(params["ignore_index"]), "jsd_beta": float(params["jsd_beta"]),
        "HAS_TARGET": target is not None,
        "SEPARATE_CE": _separate_ce(target, params["student_scale"]),
        "STUDENT_POWER": _student_power(target, params["student_scale"]),
        "DIVERGENCE": divergence(params["jsd_beta"]),
    }


def _pieces(n_cols: int, chunk_v: int) -> dict:
    return {"chunk_v": chunk_v, "n_chunks": triton.cdiv(n_cols, chunk_v), **launch_config(chunk_v)}


def forward(student, teacher, target, *, grad=None, row_grad=None, weighted, **params):
    """Loss statistics (NUM_STATS, N) fp32 of (B, T, V) row views; with ``grad``, also writes d(sum_i
    row_grad_i * loss_i)/dz into it (a (B, T, V) view, possibly ``student`` itself)."""
    n_rows, V = student.shape[0] * student.shape[1], student.shape[2]
    chunk_v = row_split(n_rows, V, student.device)
    if chunk_v != V:
        partials = partial(student, teacher, target, weighted=weighted, col_offset=0, chunk_v=chunk_v, **params)
        stats = merge(partials, target, weighted=weighted, vocab=V, **params)
        # The forward KL's sums pass writes its gradient; the others' gradient needs the merged sums first.
        fused_grad = grad if divergence(params["jsd_beta"]) == FORWARD_KL else None
        sums = pieces(student, teacher, target, stats, col_offset=0, vocab=V, grad=fused_grad, row_grad=row_grad,
                      chunk_v=chunk_v, **params)
        finish(stats, sums, **params)
        if grad is not None and fused_grad is None:
            pieces(student, teacher, target, stats, col_offset=0, vocab=V, grad=grad, row_grad=row_grad,
                   chunk_v=chunk_v, with_sums=False, **params)
        return stats
    stats = torch.empty((NUM_STATS, n_rows), dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return stats
    has_grad = grad is not None
    if not has_grad:
        grad, row_grad = student, stats  # never touched
    config = launch_config(V)
    ttm_fwd_kernel[(n_rows,)](**_launch_args(student, teacher, target, stats, grad, row_grad, params),
                              WEIGHTED=weighted, HAS_GRAD=has_grad, SINGLE_BLOCK=V <= config["BLOCK_V"],
                              TEACHER_POWER=_integer_inverse(params["teacher_scale"]) if weighted else 0, **config)
    return stats


def backward(row_grad, student, teacher, target, stats, grad, **params):
    """Writes d(sum_i row_grad_i * loss_i)/dz into ``grad`` from the statistics of ``forward``: one more pass
    over whole rows (in pieces when the rows are too few to fill the device)."""
    V = student.shape[2]
    pieces(student, teacher, target, stats, col_offset=0, vocab=V, grad=grad, row_grad=row_grad, with_sums=False,
           **params)


def partial(student, teacher, target, *, weighted, col_offset, chunk_v=None, student_scale, teacher_scale,
            ignore_index, **_unused):
    """The online sums of pieces of each row's columns here, columns [col_offset, col_offset + V) of the rows:
    (NUM_PARTIAL, N, C) fp32 (rows: ``_stats.Partial``), C pieces of ``chunk_v`` columns (default from
    ``row_split``)."""
    n_rows, V = student.shape[0] * student.shape[1], student.shape[2]
    pieces_args = _pieces(V, chunk_v or row_split(n_rows, V, student.device))
    partials = torch.empty((NUM_PARTIAL, n_rows, pieces_args["n_chunks"]), dtype=torch.float32,
                           device=student.device)
    if n_rows:
        ttm_partial_kernel[(n_rows, pieces_args["n_chunks"])](
            **_row_args("s", "S", student), **_row_args("t", "TCH", teacher),
            Y=target if target is not None else partials, PARTIAL=partials, n_rows=n_rows, V=V,
            col_offset=col_offset, student_scale=float(student_scale), teacher_scale=float(teacher_scale),
            ignore_index=int(ignore_index), HAS_TARGET=target is not None, WEIGHTED=weighted,
            SEPARATE_CE=_separate_ce(target, student_scale),
            TEACHER_POWER=_integer_inverse(teacher_scale) if weighted else 0,
            STUDENT_POWER=_student_power(target, student_scale), **pieces_args)
    return partials


def merge(partials, target, *, weighted, vocab, student_scale, teacher_scale, ignore_index, **_unused):
    """The rows' statistics (NUM_STATS, N) from their pieces' partials (NUM_PARTIAL, N, C), all but KL,
    DIV_GRAD, ENTROPY and loss (``finish`` writes them from the pieces' sums). Rows of ``vocab`` columns."""
    partials = partials.contiguous()
    n_rows, n_chunks = partials.shape[1], partials.shape[2]
    stats = torch.empty((NUM_STATS, n_rows), dtype=torch.float32, device=partials.device)
    if n_rows:
        ttm_merge_kernel[(n_rows,)](
            PARTIAL=partials, Y=target if target is not None else partials, STATS=stats, n_rows=n_rows,
            n_chunks=n_chunks, V=vocab, teacher_scale=float(teacher_scale), ignore_index=int(ignore_index),
            HAS_TARGET=target is not None, WEIGHTED=weighted, SEPARATE_CE=_separate_ce(target, student_scale),
            BLOCK_C=triton.next_power_of_2(n_chunks))
    return stats


def pieces(student, teacher, target, stats, *, col_offset, vocab, grad=None, row_grad=None, chunk_v=None,
           with_sums=True, **params):
    """The second pass over each row's columns here (columns [col_offset, col_offset + V) of rows of
    ``vocab``), in pieces of ``chunk_v`` columns (default from ``row_split``): their sums (NUM_PIECE_SUMS, N, C)
    (rows: ``_stats.PieceSum``; unless not ``with_sums``: a gradient pass needs none), and with ``grad`` their
    gradient, written into it. The gradient of the reverse KL and the JSD (``jsd_beta`` not 0) reads the row's
    DIV_GRAD from ``stats``: ``finish`` must have written it from every piece's sums."""
    n_rows, V = student.shape[0] * student.shape[1], student.shape[2]
    pieces_args = _pieces(V, chunk_v or row_split(n_rows, V, student.device))
    sums = torch.empty((NUM_PIECE_SUMS, n_rows, pieces_args["n_chunks"]), dtype=torch.float32,
                       device=student.device)
    has_grad = grad is not None
    if not has_grad:
        grad, row_grad = student, sums  # never touched
    if n_rows:
        ttm_piece_kernel[(n_rows, pieces_args["n_chunks"])](
            **_launch_args(student, teacher, target, stats, grad, row_grad, params), SUMS=sums,
            col_offset=col_offset, row_vocab=vocab, HAS_GRAD=has_grad, HAS_SUMS=with_sums, **pieces_args)
    return sums


def finish(stats, sums, *, kl_coef, ce_weight, **_unused):
    """Writes the rows' KL, DIV_GRAD and ENTROPY (the sums of their pieces' ``sums``, (NUM_PIECE_SUMS, N, C))
    and loss into ``stats``."""
    _, n_rows, n_chunks = sums.shape
    if n_rows:
        ttm_loss_kernel[(n_rows,)](SUMS=sums.contiguous(), STATS=stats, n_rows=n_rows, n_chunks=n_chunks,
                                   kl_coef=float(kl_coef), ce_weight=float(ce_weight),
                                   BLOCK_C=triton.next_power_of_2(n_chunks))
