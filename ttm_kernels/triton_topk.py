"""Triton kernels of the sparse-teacher (top-k) losses, built from ``triton_kernels``' blocks.

One program per row. Per row, with S the row's ids other than the padding id -1 (``_topk_ops.topk_rows``
sorts them once per call: ascending, the padding first), R every other column, s = student_scale:

    statistics pass: one streaming read of z with the columns of S set to -inf, summed by ``_block_sums``
             (its teacher half is dead code here, which the compiler drops): lse(s*z) over R, and lse(z) over R
             for a CE under a temperature. Each block's ids are the sorted ids in [start, start + BLOCK_V), a
             range of the sorted tile, compared with the block's columns one id at a time: BLOCK_V / threads
             compares per id (16 at 4096 columns over 8 warps), k of them per row.
    O(k): the k student logits gathered; lse over S and over the row (merged with R's); the teacher on S
             (and the bucket R): p_R = 1 - sum_S p summed in fp64; the KL over S + {R} in the form that never
             cancels (``_kl_term``); the student's entropy over S + {R} (with the bucket; without, over the
             vocabulary: R's share from an online sum of the statistics pass, no exponential).
    gradient (HAS_GRAD): for j in R, c (q_j - pt_R q_j / q_R) plus the CE's, = e_j (c q_R - c pt_R) / d_R with
             e_j = exp(s*z_j - max_R): one exponential per element (``_block_kl_grad`` with q = e_j A and
             p = e_j B); then, after a barrier, the k entries of S overwritten with c (q_i - pt_i) plus the
             CE's. The logits of S are gathered before anything is written, so the gradient may be the
             student's own storage.

The reverse KL and the JSD (``jsd_beta`` not 0, the DIVERGENCE constexpr; with the bucket only) are those of the
k + 1 outcomes, O(k) like the KL; their gradient on R is e_j times one per-row coefficient, as the KL's is, and
needs the row sum the statistics pass has already made: no pass more than the forward KL's.

Statistics: (NUM_STATS, N) fp32, rows as named in ``_stats.TopkStat``. k up to MAX_TOPK (the ids tile lives in
registers); the split-row path of the dense kernels is not offered (one program per row).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._stats import NUM_STATS, NUM_TOPK_PARTIAL, TopkPartial, TopkStat
# The statistics rows that TopkStat shares with Stat (tests/test_topk.py checks that they agree), and its own.
from .triton_kernels import CE, DIV_GRAD, ENTROPY, KL, LOG_SUM_S, LOG_SUM_Z, LOSS, MAX_S, MAX_Z, N_STATS, WEIGHT
from .triton_kernels import FORWARD_KL, divergence
from .triton_kernels import (_block_kl_grad, _block_sums, _ce_grad, _checked_ce_coef, _derived_maxima,
                             _divergence_grad, _divergence_grad_factor, _divergence_terms, _kl_term, _row_args,
                             _row_ptr, _separate_ce, _store_rounded, _student_power, _zero_pass, launch_config)

MAX_TOPK = 4096
MAX_R = tl.constexpr(int(TopkStat.MAX_R))
LOG_SUM_R = tl.constexpr(int(TopkStat.LOG_SUM_R))
TOPK_MAX_S, TOPK_SUM_S, TOPK_MAX_Z, TOPK_SUM_Z, TOPK_TAIL_ENTROPY = (tl.constexpr(int(row)) for row in TopkPartial)


@triton.jit
def _tail_sums(s_row, ids_row, k, V, col_offset, student_scale, SEPARATE_CE: tl.constexpr,
               STUDENT_POWER: tl.constexpr, TAIL_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # The online sums of s*z (and z) over the V columns here outside S, the row's columns [col_offset,
    # col_offset + V) (a vocabulary shard; the ids are row columns); with TAIL_ENTROPY also
    # w = sum_R e_j (m_s - s*z_j) >= 0, e_j = exp(s*z_j - m_s), from which _tail_entropy forms R's share of the
    # student's entropy without cancelling (no exponential: the block's e_j are _block_sums').
    slots = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_row + slots, mask=slots < k, other=2147483647)
    lo = tl.sum((ids < col_offset).to(tl.int32), 0)  # the padding and the ids before the columns here sort first
    m_s = -1.0e30
    d_s = 0.0
    m_z = -1.0e30
    d_z = 0.0
    w = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(s_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        hi = tl.sum((ids < col_offset + start + BLOCK_V).to(tl.int32), 0)
        member = cols < 0
        for j in range(lo, hi):
            member = member | (cols == tl.load(ids_row + j) - col_offset)
        lo = hi
        z = tl.where(member, float("-inf"), z)
        m_prev = m_s
        d_prev = d_s
        m_s, d_s, _, _, _, _, m_z, d_z, e_s, _ = _block_sums(
            z, z, m_s, d_s, -1.0e30, 0.0, -1.0e30, 0.0, m_z, d_z, student_scale, student_scale, False, SEPARATE_CE,
            0, STUDENT_POWER)
        if TAIL_ENTROPY:
            # The previous blocks' sum moved to the new maximum, then this block's terms.
            w = tl.exp(m_prev - m_s) * (w + (m_s - m_prev) * d_prev)
            w += tl.sum(tl.where(e_s > 0, e_s * (m_s - z * student_scale), 0.0), 0)
    _, m_z = _derived_maxima(m_s, m_s, m_s, m_z, 0, STUDENT_POWER)
    return m_s, d_s, m_z, d_z, w


@triton.jit
def _tail_entropy(w, m_tail, d_tail, m_all, log_d_all):
    # -sum_R q_j log q_j: with log q_j = (s*z_j - m_tail) + c, c = (m_tail - m_all) - log_d_all <= 0, it is
    # e^c (w - c d_tail), a sum of non-negative terms; 0 for an empty R.
    c = (m_tail - m_all) - log_d_all
    return tl.where(d_tail > 0, tl.exp(c) * (w - c * d_tail), 0.0)


@triton.jit
def _with_tail(m_tail, d_tail, x, present):
    # The (max, log-sum) of the whole row from R's online pair and the values x of S.
    x = tl.where(present, x, float("-inf"))
    m = tl.maximum(m_tail, tl.max(x, 0))
    d = d_tail * tl.exp(m_tail - m) + tl.sum(tl.exp(x - m), 0)
    return m, tl.log(d)


@triton.jit
def _gather(s_row, ids_row, lp_row, k, col_offset, V, BLOCK_K: tl.constexpr):
    # The row's ids tile as columns here (the row's columns [col_offset, col_offset + V)), which of its slots
    # hold an id, which an id of a column here, the student's logits there (-inf elsewhere) and the ids'
    # log-probabilities.
    slots = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_row + slots, mask=slots < k, other=-1)
    present = ids >= 0
    ids = ids - col_offset
    here = present & (ids >= 0) & (ids < V)
    z_s = tl.load(s_row + ids, mask=here, other=float("-inf")).to(tl.float32)
    logprobs = tl.load(lp_row + slots, mask=present, other=float("-inf"))
    return ids, present, here, z_s, logprobs


@triton.jit
def _teacher(logprobs, present, V, teacher_scale, WEIGHTED: tl.constexpr, BUCKET: tl.constexpr):
    # The transformed teacher on S (and the bucket R): log pt of each slot, log pt_R, and the weight U, all
    # from the log-probabilities relative to the row's largest (``shift``): the differences of nearby fp32
    # values are exact, so rows far below 0 keep their digits, and sum p, which underflows in fp64 when every
    # log-probability lies below about -745, is summed shifted (the renormalised weight needs its log).
    l64 = tl.where(present, logprobs.to(tl.float64), float("-inf"))
    m_l = tl.max(l64, 0)
    shift = tl.where(m_l > float("-inf"), m_l, 0.0)
    log_p_sum_shifted = tl.log(tl.sum(tl.where(present, tl.exp(l64 - shift), 0.0), 0))
    shift32 = shift.to(tl.float32)
    w = teacher_scale * (logprobs - shift32)
    w_tail = float("-inf")
    if BUCKET:
        # Under the power transform a residue counts: 1 - sum p in fp64, from the stored values.
        p_sum = tl.exp(shift + log_p_sum_shifted)
        tail = tl.where(tl.sum(present.to(tl.int32), 0) < V, tl.maximum(1.0 - p_sum, 0.0), 0.0)
        w_tail = teacher_scale * (tl.log(tail) - shift).to(tl.float32)
    m_w = tl.maximum(tl.max(w, 0), w_tail)
    log_norm = m_w + tl.log(tl.sum(tl.exp(w - m_w), 0) + tl.exp(w_tail - m_w))
    weight = 1.0
    if WEIGHTED:
        if BUCKET:
            weight = tl.exp(log_norm + teacher_scale * shift32)
        else:
            weight = tl.exp(log_norm - teacher_scale * log_p_sum_shifted.to(tl.float32))
    return w - log_norm, w_tail - log_norm, weight


@triton.jit
def _grad_pass(s_row, g_row, ids, present, z_s, log_q, log_pt, log_pt_tail, y, V, student_scale, m_all,
               log_d_all, m_tail, log_d_tail, m_z, log_d_z, kl_coef, ce_coef, jsd_beta, row_div_grad,
               HAS_TARGET: tl.constexpr, SEPARATE_CE: tl.constexpr, STUDENT_POWER: tl.constexpr,
               DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr):
    # The row's gradient: R's entries over every column, last block first (the likeliest in L2 after the
    # statistics pass), then the entries of S overwritten (the slots ``present``). ``ids`` and ``y`` are columns
    # here. A class j of R has dD/d(s*z_j) = q_j / q_R times the bucket's: e_j * (q_R - pt_R) / d_R for the
    # forward KL, q_j times the bucket's _divergence_grad_factor else.
    d_tail = tl.exp(log_d_tail)
    a = tl.exp((m_tail - m_all) - log_d_all)  # q_j = e_j * a
    b = tl.where(d_tail > 0, tl.exp(log_pt_tail) / d_tail, 0.0)  # pt_R q_j / q_R = e_j * b
    if DIVERGENCE != FORWARD_KL:
        log_q_tail = (m_tail - m_all) + log_d_tail - log_d_all
        factor = _divergence_grad_factor(log_pt_tail - log_q_tail, jsd_beta, row_div_grad, DIVERGENCE)
        tail_coef = tl.where(d_tail > 0, kl_coef * a * factor, 0.0)  # dD/dz_j = e_j * tail_coef
    inv_d_z = tl.exp(-log_d_z)
    if STUDENT_POWER > 0:
        inv_d_z = tl.exp((STUDENT_POWER * m_tail - m_z) - log_d_z)  # softmax(z)_j = e_j^K * inv_d_z
    n_blocks = tl.cdiv(V, BLOCK_V)
    for i in range(n_blocks):
        cols = (n_blocks - 1 - i) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        e = tl.exp(z * student_scale - m_tail)
        if DIVERGENCE == FORWARD_KL:
            _, grad = _block_kl_grad(e * a, e * b, e, e, z, cols, mask, y, kl_coef, ce_coef, m_z, log_d_z,
                                     inv_d_z, HAS_TARGET, SEPARATE_CE, STUDENT_POWER)
        else:
            grad = e * tail_coef
            if HAS_TARGET:
                grad += _ce_grad(e * a, e, z, cols, y, ce_coef, m_z, log_d_z, inv_d_z, SEPARATE_CE, STUDENT_POWER)
        _store_rounded(g_row + cols, grad, mask)
    # Every thread's stores above land before the entries of S are overwritten.
    tl.debug_barrier()
    q = tl.exp(log_q)
    fix = kl_coef * _divergence_grad(q, tl.exp(log_pt), log_pt - log_q, jsd_beta, row_div_grad, DIVERGENCE)
    if HAS_TARGET:
        q_ce = q
        if SEPARATE_CE:
            q_ce = tl.exp((z_s - m_z) - log_d_z)
        fix += ce_coef * (q_ce - tl.where(ids == y, 1.0, 0.0))
    _store_rounded(g_row + ids, fix, present)


@triton.jit
def _store_stats(STATS, n_rows, row, loss, kl, ce, weight, m_all, log_d_all, m_tail, log_d_tail, m_z, log_d_z,
                 div_grad, entropy):
    tl.store(STATS + LOSS * n_rows + row, loss)
    tl.store(STATS + KL * n_rows + row, kl)
    tl.store(STATS + DIV_GRAD * n_rows + row, div_grad)
    tl.store(STATS + ENTROPY * n_rows + row, entropy)
    tl.store(STATS + CE * n_rows + row, ce)
    tl.store(STATS + WEIGHT * n_rows + row, weight)
    tl.store(STATS + MAX_S * n_rows + row, m_all)
    tl.store(STATS + LOG_SUM_S * n_rows + row, log_d_all)
    tl.store(STATS + MAX_R * n_rows + row, m_tail)
    tl.store(STATS + LOG_SUM_R * n_rows + row, log_d_tail)
    tl.store(STATS + MAX_Z * n_rows + row, m_z)
    tl.store(STATS + LOG_SUM_Z * n_rows + row, log_d_z)


@triton.jit
def topk_fwd_kernel(
    S, s_inner, s_stride_b, s_stride_t,
    IDS, LOGP, k, Y, STATS,
    GRAD, g_inner, g_stride_b, g_stride_t, ROW_GRAD, row_grad_stride,
    n_rows, V,
    student_scale, teacher_scale, kl_coef, ce_weight, ignore_index, jsd_beta,
    HAS_TARGET: tl.constexpr, WEIGHTED: tl.constexpr, BUCKET: tl.constexpr, SEPARATE_CE: tl.constexpr,
    STUDENT_POWER: tl.constexpr, DIVERGENCE: tl.constexpr, HAS_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = _row_ptr(S, row, s_inner, s_stride_b, s_stride_t)
    g_row = _row_ptr(GRAD, row, g_inner, g_stride_b, g_stride_t)
    ids_row = IDS + row * k
    y = 0
    if HAS_TARGET:
        y = tl.load(Y + row)
        if y == ignore_index:
            for i in tl.static_range(N_STATS):
                tl.store(STATS + i * n_rows + row, 0.0)
            if HAS_GRAD:
                _zero_pass(g_row, V, BLOCK_V)
            return

    # The entropy is the student's over the k + 1 outcomes with the bucket (O(k)), over the vocabulary without.
    m_tail, d_tail, m_z_tail, d_z_tail, w_tail = _tail_sums(s_row, ids_row, k, V, 0, student_scale, SEPARATE_CE,
                                                            STUDENT_POWER, not BUCKET, BLOCK_V, BLOCK_K)
    ids, present, _, z_s, logprobs = _gather(s_row, ids_row, LOGP + row * k, k, 0, V, BLOCK_K)
    m_all, log_d_all = _with_tail(m_tail, d_tail, z_s * student_scale, present)
    m_z = m_all
    log_d_z = log_d_all
    if SEPARATE_CE:
        m_z, log_d_z = _with_tail(m_z_tail, d_z_tail, z_s, present)
    ce = 0.0
    if HAS_TARGET:
        z_y = tl.load(s_row + y, mask=(y >= 0) & (y < V), other=float("nan")).to(tl.float32)
        ce = (m_z - z_y) + log_d_z
    log_d_tail = tl.log(d_tail)

    log_pt, log_pt_tail, weight = _teacher(logprobs, present, V, teacher_scale, WEIGHTED, BUCKET)
    log_q = (z_s * student_scale - m_all) - log_d_all
    log_q_tail = (m_tail - m_all) + log_d_tail - log_d_all
    if DIVERGENCE == FORWARD_KL:
        kl = tl.sum(tl.where(present, _kl_term(tl.exp(log_q), tl.exp(log_pt), log_pt - log_q), 0.0), 0)
        kl += _kl_term(tl.exp(log_q_tail), tl.exp(log_pt_tail), log_pt_tail - log_q_tail)
        div_grad = 0.0  # the forward KL's gradient needs no row sum
    else:
        # Over the k + 1 outcomes (the bucket: the renormalised teacher defines only the forward KL).
        div_s, div_grad_s = _divergence_terms(tl.exp(log_q), tl.exp(log_pt), log_pt - log_q, jsd_beta, DIVERGENCE)
        div_tail, div_grad_tail = _divergence_terms(tl.exp(log_q_tail), tl.exp(log_pt_tail), log_pt_tail - log_q_tail,
                                                    jsd_beta, DIVERGENCE)
        kl = tl.sum(tl.where(present, div_s, 0.0), 0) + div_tail
        div_grad = tl.sum(tl.where(present, div_grad_s, 0.0), 0) + div_grad_tail
    q = tl.exp(log_q)
    entropy = tl.sum(tl.where(present & (q > 0), -q * log_q, 0.0), 0)
    if BUCKET:
        q_tail = tl.exp(log_q_tail)
        entropy += tl.where(q_tail > 0, -q_tail * log_q_tail, 0.0)
    else:
        entropy += _tail_entropy(w_tail, m_tail, d_tail, m_all, log_d_all)

    if HAS_GRAD:
        row_grad = tl.load(ROW_GRAD + row * row_grad_stride)
        _grad_pass(s_row, g_row, ids, present, z_s, log_q, log_pt, log_pt_tail, y, V, student_scale, m_all,
                   log_d_all, m_tail, log_d_tail, m_z, log_d_z, row_grad * kl_coef * weight * student_scale,
                   _checked_ce_coef(row_grad * ce_weight, y, V, HAS_TARGET), jsd_beta, div_grad, HAS_TARGET,
                   SEPARATE_CE, STUDENT_POWER, DIVERGENCE, BLOCK_V)
    _store_stats(STATS, n_rows, row, kl_coef * weight * kl + ce_weight * ce, kl, ce, weight, m_all, log_d_all,
                 m_tail, log_d_tail, m_z, log_d_z, div_grad, entropy)


@triton.jit
def topk_bwd_kernel(
    S, s_inner, s_stride_b, s_stride_t,
    IDS, LOGP, k, Y, STATS,
    GRAD, g_inner, g_stride_b, g_stride_t, ROW_GRAD, row_grad_stride,
    n_rows, V, col_offset, VOCAB,
    student_scale, teacher_scale, kl_coef, ce_weight, ignore_index, jsd_beta,
    HAS_TARGET: tl.constexpr, BUCKET: tl.constexpr, SEPARATE_CE: tl.constexpr, STUDENT_POWER: tl.constexpr,
    DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # The gradient from the rows' statistics (the forward's, for reduction "none"; or those merged from the
    # pieces' partials): the O(k) terms are recomputed, the statistics pass is not. The student may be a piece
    # of the rows of VOCAB columns: its V columns from col_offset (a vocabulary shard).
    row = tl.program_id(0).to(tl.int64)
    s_row = _row_ptr(S, row, s_inner, s_stride_b, s_stride_t)
    g_row = _row_ptr(GRAD, row, g_inner, g_stride_b, g_stride_t)
    y = 0
    if HAS_TARGET:
        y = tl.load(Y + row)
        if y == ignore_index:
            _zero_pass(g_row, V, BLOCK_V)
            return
    m_all = tl.load(STATS + MAX_S * n_rows + row)
    log_d_all = tl.load(STATS + LOG_SUM_S * n_rows + row)
    m_tail = tl.load(STATS + MAX_R * n_rows + row)
    log_d_tail = tl.load(STATS + LOG_SUM_R * n_rows + row)
    weight = tl.load(STATS + WEIGHT * n_rows + row)
    ids, present, here, z_s, logprobs = _gather(s_row, IDS + row * k, LOGP + row * k, k, col_offset, V, BLOCK_K)
    log_pt, log_pt_tail, _ = _teacher(logprobs, present, VOCAB, teacher_scale, False, BUCKET)
    row_grad = tl.load(ROW_GRAD + row * row_grad_stride)
    _grad_pass(s_row, g_row, ids, here, z_s, (z_s * student_scale - m_all) - log_d_all, log_pt, log_pt_tail,
               y - col_offset, V, student_scale, m_all, log_d_all, m_tail, log_d_tail,
               tl.load(STATS + MAX_Z * n_rows + row), tl.load(STATS + LOG_SUM_Z * n_rows + row),
               row_grad * kl_coef * weight * student_scale,
               _checked_ce_coef(row_grad * ce_weight, y, VOCAB, HAS_TARGET), jsd_beta,
               tl.load(STATS + DIV_GRAD * n_rows + row), HAS_TARGET, SEPARATE_CE, STUDENT_POWER, DIVERGENCE, BLOCK_V)


@triton.jit
def topk_partial_kernel(
    S, s_inner, s_stride_b, s_stride_t,
    IDS, k, Y, PARTIAL,
    n_rows, V, col_offset, student_scale, ignore_index,
    HAS_TARGET: tl.constexpr, SEPARATE_CE: tl.constexpr, STUDENT_POWER: tl.constexpr, TAIL_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # A piece of the rows (the row's columns [col_offset, col_offset + V), a vocabulary shard): its online sums
    # over its columns outside S (``_stats.TopkPartial``), one read of the piece; ignored rows hold empty sums.
    row = tl.program_id(0).to(tl.int64)
    s_row = _row_ptr(S, row, s_inner, s_stride_b, s_stride_t)
    if HAS_TARGET:
        if tl.load(Y + row) == ignore_index:
            _store_topk_partial(PARTIAL, n_rows, row, -1.0e30, 0.0, -1.0e30, 0.0, 0.0)
            return
    m_s, d_s, m_z, d_z, w = _tail_sums(s_row, IDS + row * k, k, V, col_offset, student_scale, SEPARATE_CE,
                                       STUDENT_POWER, TAIL_ENTROPY, BLOCK_V, BLOCK_K)
    if SEPARATE_CE:
        _store_topk_partial(PARTIAL, n_rows, row, m_s, d_s, m_z, d_z, w)
    else:
        _store_topk_partial(PARTIAL, n_rows, row, m_s, d_s, m_s, d_s, w)


@triton.jit
def _store_topk_partial(PARTIAL, n_rows, row, m_s, d_s, m_z, d_z, w):
    tl.store(PARTIAL + TOPK_MAX_S * n_rows + row, m_s)
    tl.store(PARTIAL + TOPK_SUM_S * n_rows + row, d_s)
    tl.store(PARTIAL + TOPK_MAX_Z * n_rows + row, m_z)
    tl.store(PARTIAL + TOPK_SUM_Z * n_rows + row, d_z)
    tl.store(PARTIAL + TOPK_TAIL_ENTROPY * n_rows + row, w)


def _launch_args(student, ids, logprobs, target, stats, grad, row_grad, params) -> dict:
    n_rows, k = ids.shape
    if not params["bucket"] and params["jsd_beta"] != 0.0:
        raise ValueError(f"jsd_beta={params['jsd_beta']} needs the bucket: the renormalised top-k teacher defines "
                         "only the forward KL (jsd_beta=0)")
    if k > MAX_TOPK:
        raise ValueError(f"the Triton kernel takes k <= {MAX_TOPK} ids per row, got k = {k}; pass backend='torch' "
                         "for more")
    return {
        **_row_args("s", "S", student), **_row_args("g", "GRAD", grad),
        "IDS": ids, "LOGP": logprobs, "k": k, "Y": target if target is not None else stats, "STATS": stats,
        "ROW_GRAD": row_grad, "row_grad_stride": 1 if row_grad.dim() else 0,
        "n_rows": n_rows, "V": student.shape[2],
        "student_scale": float(params["student_scale"]), "teacher_scale": float(params["teacher_scale"]),
        "kl_coef": float(params["kl_coef"]), "ce_weight": float(params["ce_weight"]),
        "ignore_index": int(params["ignore_index"]), "jsd_beta": float(params["jsd_beta"]),
        "HAS_TARGET": target is not None, "BUCKET": bool(params["bucket"]),
        "DIVERGENCE": divergence(params["jsd_beta"]),
        "SEPARATE_CE": _separate_ce(target, params["student_scale"]),
        "STUDENT_POWER": _student_power(target, params["student_scale"]),
        "BLOCK_K": triton.next_power_of_2(k), **launch_config(student.shape[2]),
    }


def topk_forward(student, ids, logprobs, target, *, weighted, grad=None, row_grad=None, **params):
    """Statistics (NUM_STATS, N) fp32 (``TopkStat``) of (B, T, V) row views from ``topk_rows``' ids and
    log-probabilities; with ``grad``, also writes d(sum_i row_grad_i * loss_i)/dz into it."""
    stats = torch.empty((NUM_STATS, ids.shape[0]), dtype=torch.float32, device=student.device)
    if ids.shape[0] == 0:
        return stats
    has_grad = grad is not None
    if not has_grad:
        grad, row_grad = student, stats  # never touched
    topk_fwd_kernel[(ids.shape[0],)](**_launch_args(student, ids, logprobs, target, stats, grad, row_grad, params),
                                     WEIGHTED=weighted, HAS_GRAD=has_grad)
    return stats


def topk_backward(row_grad, student, ids, logprobs, target, stats, grad, *, col_offset=0, vocab=None, **params):
    """Writes d(sum_i row_grad_i * loss_i)/dz into ``grad`` from the rows' statistics (``topk_forward``'s, or those
    merged from ``topk_partial``'s); ``student`` is columns [col_offset, col_offset + V) of rows of ``vocab``
    columns (default: the whole rows)."""
    if ids.shape[0]:
        topk_bwd_kernel[(ids.shape[0],)](**_launch_args(student, ids, logprobs, target, stats, grad, row_grad,
                                                        params),
                                         col_offset=col_offset, VOCAB=student.shape[2] if vocab is None else vocab)


def topk_partial(student, ids, target, *, student_scale, bucket, ignore_index, col_offset, vocab, **_unused):
    """The online sums (``_stats.TopkPartial``, N) fp32 of a piece of the rows (columns [col_offset, col_offset +
    V) of ``vocab``) over its columns outside the sorted ``ids`` (row columns)."""
    n_rows, k = ids.shape
    partial = torch.empty((NUM_TOPK_PARTIAL, n_rows), dtype=torch.float32, device=student.device)
    if n_rows:
        topk_partial_kernel[(n_rows,)](
            **_row_args("s", "S", student), IDS=ids, k=k, Y=target if target is not None else ids, PARTIAL=partial,
            n_rows=n_rows, V=student.shape[2], col_offset=col_offset, student_scale=float(student_scale),
            ignore_index=int(ignore_index), HAS_TARGET=target is not None,
            SEPARATE_CE=_separate_ce(target, student_scale), STUDENT_POWER=_student_power(target, student_scale),
            TAIL_ENTROPY=not bucket, BLOCK_K=triton.next_power_of_2(k), **launch_config(student.shape[2]))
    return partial
