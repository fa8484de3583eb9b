"""Plain-PyTorch definitions of the losses: the specification and the test oracle.

Everything here runs in whatever dtype it is given (float64 for the oracle) and is differentiable with
ordinary autograd. Two families live here:

* ``wttm_loss`` / ``ttm_loss`` / ``kd_loss``: the definitions, written in log space so that they stay
  exact for extreme logits. They take the same arguments as the fused functions.
* ``paper_wttm_loss`` / ``paper_ttm_loss`` / ``paper_kd_loss``: line-for-line ports of the public paper
  code (power transform of the softmax, ``F.kl_div``, RepDistiller's ``DistillKL``). They are what users
  would write otherwise, so the benchmarks time them as the eager baseline.

Per row, with student logits z, teacher logits v and gamma = 1/T::

    q  = softmax(z)                      (no temperature on the student, no T^2)
    pt = softmax(v) ** gamma / sum(...)  = softmax(gamma * v)
    U  = sum(softmax(v) ** gamma)        = exp(logsumexp(gamma * v) - gamma * logsumexp(v))
    TTM  row = KL(pt || q)
    WTTM row = U * KL(pt || q)
    total = ce_weight * CE(z, target) + beta * mean over rows of the (W)TTM row
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "loss_rows",
    "divergence",
    "entropy",
    "reduce_rows",
    "wttm_loss",
    "ttm_loss",
    "kd_loss",
    "paper_wttm_loss",
    "paper_ttm_loss",
    "paper_kd_loss",
    "topk_loss_rows",
    "wttm_loss_topk",
    "ttm_loss_topk",
    "kd_loss_topk",
]


def loss_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    student_scale: float = 1.0,
    teacher_scale: float,
    kl_scale: float = 1.0,
    weighted: bool,
    beta: float = 1.0,
    ce_weight: float = 1.0,
    ignore_index: int = -100,
    jsd_beta: float = 0.0,
    weight_norm: str = "none",
) -> dict[str, torch.Tensor]:
    """Per-row terms of the general loss that every variant is an instance of.

    row loss = ce_weight * CE(z, y) + beta * kl_scale * w * D(softmax(teacher_scale * v), softmax(student_scale * z))

    with w = U when ``weighted`` else 1 (``weight_norm="vocab"``: U / V**max(0, 1 - teacher_scale), U divided by
    its largest value over the V = the logits' width outcomes, in (0, 1]) and D the divergence
    ``divergence(p, q, jsd_beta)``: KL(p || q) for ``jsd_beta`` 0 (the paper's), KL(q || p) for 1, the
    generalised JSD between them otherwise. TTM/WTTM: student_scale = 1, teacher_scale = gamma, kl_scale = 1.
    Classic KD: student_scale = teacher_scale = 1/T, kl_scale = T^2, unweighted. Ignored rows (target ==
    ignore_index) contribute 0 to every term. Returns a dict of tensors of the leading shape: ``loss``, ``kl``
    (the divergence D, whichever it is), ``ce``, ``weight``, ``entropy`` (of the student's distribution q, as TRL
    logs it) and ``valid`` (bool).
    """
    teacher_logits = teacher_logits.detach()
    valid = _valid_rows(student_logits, target, ignore_index)
    if target is not None:
        # Ignored rows are zeroed before any arithmetic: their masked or NaN logits would otherwise give NaN
        # terms, which torch.where below would hide from the loss but not from the gradient (0 * NaN).
        student_logits = torch.where(valid.unsqueeze(-1), student_logits, 0)
        teacher_logits = torch.where(valid.unsqueeze(-1), teacher_logits, 0)
    scaled_student = student_logits * student_scale
    scaled_teacher = teacher_logits * teacher_scale
    lse_student = torch.logsumexp(scaled_student, -1, keepdim=True)
    lse_teacher = torch.logsumexp(scaled_teacher, -1, keepdim=True)
    log_q = scaled_student - lse_student
    log_pt = scaled_teacher - lse_teacher
    # The logits' difference first, the lse's after: next to logits of 1e4 each lse rounds to a coarse grid.
    log_ratio = (scaled_teacher - scaled_student) - (lse_teacher - lse_student)
    kl = divergence(log_pt, log_q, jsd_beta, log_ratio)
    log_norm = _log_weight_norm(weighted, weight_norm, teacher_scale, student_logits.shape[-1])
    if weighted:
        weight = torch.exp(
            torch.logsumexp(teacher_logits * teacher_scale, -1)
            - teacher_scale * torch.logsumexp(teacher_logits, -1)
            - log_norm
        )
    else:
        weight = torch.ones_like(kl)
    rows = _row_terms(kl, weight, student_logits, target, valid, beta=beta, kl_scale=kl_scale, ce_weight=ce_weight)
    rows["entropy"] = torch.where(valid, entropy(log_q), 0)
    return rows


def _log_weight_norm(weighted: bool, weight_norm: str, teacher_scale: float, vocab: int) -> float:
    """log of the divisor of U for ``weight_norm`` ("none": 0; "vocab": log max U = max(0, 1 - g) * log V over V
    outcomes), or a ValueError for an unknown value or a normalisation of no weight."""
    if weight_norm not in ("none", "vocab"):
        raise ValueError(f"weight_norm must be 'none' or 'vocab', got {weight_norm!r}")
    if weight_norm == "none":
        return 0.0
    if not weighted:
        raise ValueError("weight_norm='vocab' normalises WTTM's weight U: it needs weighted=True")
    return max(0.0, 1.0 - teacher_scale) * math.log(vocab)


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, jsd_beta: float = 0.0,
               log_ratio: torch.Tensor | None = None) -> torch.Tensor:
    """The divergence of the rows of two distributions given by their log-probabilities (last dimension):
    TRL's and Liger's generalised JSD. ``jsd_beta`` 0: KL(p || q) (p the teacher's, the forward KL of the paper
    and of KD); 1: KL(q || p) (the reverse KL); in between: beta * KL(p || m) + (1 - beta) * KL(q || m) with the
    mixture m = beta * p + (1 - beta) * q (JSD for 0.5). Every KL is summed as ``_kl_terms`` does (no negative
    term, no cancellation). ``log_ratio``: log(p / q) when the caller formed it more exactly than
    ``log_p - log_q``."""
    if not 0.0 <= jsd_beta <= 1.0:
        raise ValueError(f"jsd_beta must lie in [0, 1], got {jsd_beta}")
    if log_ratio is None:
        log_ratio = log_p - log_q
    p, q = torch.exp(log_p), torch.exp(log_q)
    if jsd_beta == 0.0:
        return _kl_terms(p, q, log_ratio).sum(-1)
    if jsd_beta == 1.0:
        return _kl_terms(q, p, -log_ratio).sum(-1)
    # A class of probability 0 under both has log m = -inf; logaddexp(-inf, -inf)'s gradient would be NaN.
    either = (log_p > float("-inf")) | (log_q > float("-inf"))
    log_m = torch.where(either, torch.logaddexp(torch.where(either, log_p, 0) + math.log(jsd_beta),
                                                torch.where(either, log_q, 0) + math.log1p(-jsd_beta)),
                        float("-inf"))
    m = torch.exp(log_m)
    return (jsd_beta * _kl_terms(p, m, log_p - log_m).sum(-1)
            + (1.0 - jsd_beta) * _kl_terms(q, m, log_q - log_m).sum(-1))


def entropy(log_q: torch.Tensor) -> torch.Tensor:
    """-sum q log q of each row (0 * log 0 = 0: a class of probability 0, masked or underflowed, adds nothing)."""
    q = torch.exp(log_q)
    positive = q > 0
    return -torch.where(positive, q * torch.where(positive, log_q, 0), 0).sum(-1)


def _valid_rows(student_logits, target, ignore_index):
    if target is None:
        return torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
    return target != ignore_index


def _kl_terms(pt, q, log_ratio):
    """The terms of KL(pt || q) = sum_i q_i f(y_i), y = log(pt / q) = ``log_ratio``, f(y) = y e^y - e^y + 1 >= 0
    (as sum pt = sum q = 1 over the outcomes).

    No term is negative, so the sum never cancels, and the lse difference enters y as one constant whose
    rounding changes the sum only at second order. The plain sum pt * y loses all the digits of a KL far
    below log V (KD at a large temperature, a student close to its teacher). Near y = 0 f is formed from y
    alone, y e^y - expm1(y); elsewhere as pt * y - pt + q, which needs no e^y (q may be 0 where pt is not).
    0 * log(0 / q) = 0: a class the transformed teacher never picks contributes its q (masked or not, also
    when y is NaN because both logits are -inf); a NaN teacher stays NaN, in the loss as in the gradient."""
    near_zero = log_ratio.abs() < 0.5
    y = torch.where(near_zero, log_ratio, torch.zeros_like(log_ratio))
    # The ratio is -inf or NaN where pt = 0: masked before the product too, or its gradient would be 0 * inf
    # (pt is the student's distribution in the reverse KL and the JSD, so the gradient flows through it). A NaN
    # pt (a NaN teacher) stays in, so that its row's loss and gradient are NaN.
    supported = pt != 0
    closed = torch.where(supported, pt * torch.where(supported, log_ratio, 0), torch.zeros_like(pt)) + (q - pt)
    return torch.where(near_zero, q * (y * torch.exp(y) - torch.expm1(y)), closed)


def _row_terms(kl, weight, student_logits, target, valid, *, beta, kl_scale, ce_weight, ce=None):
    """The rows' dict of ``loss_rows`` from their KL and weight: adds the hard-label CE of the (untempered)
    student (``ce`` when the caller computed it, e.g. from merged statistics) and zeroes every term of the
    ignored rows."""
    if target is None:
        ce = torch.zeros_like(kl)
    elif ce is None:
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        log_probs = torch.log_softmax(student_logits, dim=-1)
        ce = -log_probs.gather(-1, safe_target.unsqueeze(-1).long()).squeeze(-1)
    zero = torch.zeros_like(kl)
    kl = torch.where(valid, kl, zero)
    ce = torch.where(valid, ce, zero)
    weight = torch.where(valid, weight, zero)
    loss = beta * kl_scale * weight * kl
    if target is not None and ce_weight != 0:
        loss = loss + ce_weight * ce
    return {"loss": loss, "kl": kl, "ce": ce, "weight": weight, "valid": valid}


def reduce_rows(rows: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """PyTorch's reductions over rows; ``mean`` divides by the valid rows and is 0 when none is valid."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(total.dtype)


def _loss(student_logits, teacher_logits, target, reduction, **params):
    rows = loss_rows(student_logits, teacher_logits, target, **params)
    return reduce_rows(rows["loss"], rows["valid"], reduction)


def wttm_loss(student_logits, teacher_logits, target=None, *, gamma=0.2, beta=1.0, ce_weight=1.0,
              ignore_index=-100, reduction="mean", weight_norm="none"):
    """Weighted TTM: ce_weight * CE + beta * mean(U * KL(softmax(gamma * v) || softmax(z))); with
    ``weight_norm="vocab"`` U / V**max(0, 1 - gamma) in place of U."""
    return _loss(student_logits, teacher_logits, target, reduction, teacher_scale=gamma, weighted=True,
                 beta=beta, ce_weight=ce_weight, ignore_index=ignore_index, weight_norm=weight_norm)


def ttm_loss(student_logits, teacher_logits, target=None, *, gamma=0.2, beta=1.0, ce_weight=1.0,
             ignore_index=-100, reduction="mean"):
    """TTM: ce_weight * CE + beta * mean(KL(softmax(gamma * v) || softmax(z)))."""
    return _loss(student_logits, teacher_logits, target, reduction, teacher_scale=gamma, weighted=False,
                 beta=beta, ce_weight=ce_weight, ignore_index=ignore_index)


def kd_loss(student_logits, teacher_logits, target=None, *, temperature=4.0, beta=1.0, ce_weight=1.0,
            ignore_index=-100, reduction="mean"):
    """Hinton KD: ce_weight * CE + beta * T^2 * mean(KL(softmax(v / T) || softmax(z / T)))."""
    return _loss(student_logits, teacher_logits, target, reduction, student_scale=1.0 / temperature,
                 teacher_scale=1.0 / temperature, kl_scale=temperature**2, weighted=False, beta=beta,
                 ce_weight=ce_weight, ignore_index=ignore_index)


def _paper_distill_term(student_logits, teacher_logits, gamma, weighted):
    # The public code (distiller_zoo/ttm.py, wttm.py), on 2-D logits.
    p = F.softmax(teacher_logits, dim=1)
    p = torch.pow(p, gamma)
    norm = torch.sum(p, 1)
    p_t = p / norm.unsqueeze(1)
    kl = torch.sum(F.kl_div(F.log_softmax(student_logits, dim=1), p_t, reduction="none"), 1)
    return torch.mean(norm * kl) if weighted else torch.mean(kl)


def paper_wttm_loss(student_logits, teacher_logits, target=None, *, gamma=0.2, beta=1.0, ce_weight=1.0):
    """The paper's WTTM code, line for line: the eager baseline users would otherwise write."""
    loss = beta * _paper_distill_term(student_logits, teacher_logits, gamma, weighted=True)
    if target is not None:
        loss = loss + ce_weight * F.cross_entropy(student_logits, target)
    return loss


def paper_ttm_loss(student_logits, teacher_logits, target=None, *, gamma=0.2, beta=1.0, ce_weight=1.0):
    """The paper's TTM code, line for line."""
    loss = beta * _paper_distill_term(student_logits, teacher_logits, gamma, weighted=False)
    if target is not None:
        loss = loss + ce_weight * F.cross_entropy(student_logits, target)
    return loss


def paper_kd_loss(student_logits, teacher_logits, target=None, *, temperature=4.0, beta=1.0, ce_weight=1.0):
    """RepDistiller's DistillKL: kl_div(log_softmax(z/T), softmax(v/T), sum) * T^2 / batch."""
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    p = F.softmax(teacher_logits / temperature, dim=1)
    loss = beta * F.kl_div(log_q, p, reduction="sum") * temperature**2 / student_logits.shape[0]
    if target is not None:
        loss = loss + ce_weight * F.cross_entropy(student_logits, target)
    return loss


# --- Sparse teachers: the k most likely ids of each row and their log-probabilities (a store, a served teacher).

TAILS = ("bucket", "renormalize")


def topk_loss_rows(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    student_scale: float = 1.0,
    teacher_scale: float,
    kl_scale: float = 1.0,
    weighted: bool,
    tail: str = "bucket",
    beta: float = 1.0,
    ce_weight: float = 1.0,
    ignore_index: int = -100,
    jsd_beta: float = 0.0,
    weight_norm: str = "none",
) -> dict[str, torch.Tensor]:
    """``loss_rows`` for a teacher known by its top-k log-probabilities only.

    Per row, S holds the ids of ``topk_ids`` that are not the padding id -1 (distinct ids in [0, V), any order)
    and l_i = log p_i their log-probabilities over the full vocabulary; the tail mass p_R = max(0, 1 - sum_S p),
    summed in float64 whatever the dtypes (under the power transform a rounding residue of 1e-7 weighs
    1e-7**0.2 = 0.04), and 0 when S is the whole vocabulary.

    * ``tail="bucket"``: the teacher lives on the k + 1 outcomes S and R, one bucket for every other id. With
      g = teacher_scale, pt_b = p_b**g / sum_b p_b**g and U = sum_b p_b**g over those outcomes; the student is
      coarsened alike, q = softmax(student_scale * z) over the vocabulary and q_R = sum of q outside S (a
      log-sum-exp over those ids: no 1 - q_S cancellation). KL(pt || q) over the k + 1 outcomes: the dense
      loss when S is the whole vocabulary, the dense loss of both distributions coarsened to S + {R} otherwise.
    * ``tail="renormalize"``: the teacher renormalised over S, no bucket: pt and U over S of p_i / sum_S p
      (U = sum_S p_i**g / (sum_S p)**g), KL(pt || q) with the full-vocabulary q. This is the dense loss of the
      teacher logits l on S and -inf elsewhere. A row that counts needs an id (else its loss is NaN).

    ``jsd_beta`` (the divergence, as in ``loss_rows``): with the bucket every divergence is that of the two
    distributions coarsened to the k + 1 outcomes. The renormalised teacher gives no mass outside S, so there
    the reverse KL is infinite and only the forward KL (``jsd_beta`` 0) is taken; anything else is a
    ValueError. The ``entropy`` row is the student's over the k + 1 outcomes with the bucket, over the
    vocabulary otherwise.

    ``weight_norm="vocab"``: U (over the k + 1 or k outcomes) divided by V**max(0, 1 - g) with V the student's
    vocabulary (the logits' width), the divisor of the dense teacher's weight at that vocabulary, not the largest
    U of k + 1 outcomes: the constant belongs to the models' vocabulary, not to how the teacher was stored.

    Same arguments otherwise, and the same dict, as ``loss_rows``; gradients reach the student logits only.
    """
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    check_topk_divergence(tail, jsd_beta)
    valid = _valid_rows(student_logits, target, ignore_index)
    vocab = student_logits.shape[-1]
    # Ignored rows hold a plain teacher (everything in the bucket) and zero logits, whatever they were given:
    # their NaN or -inf would otherwise reach the gradient through the masks below (0 * NaN).
    student_logits = torch.where(valid.unsqueeze(-1), student_logits, 0)
    in_s, ids, log_pt, weight = topk_teacher(topk_ids, topk_logprobs, valid, vocab, student_logits.dtype,
                                             teacher_scale=teacher_scale, weighted=weighted, tail=tail)
    weight = weight * math.exp(-_log_weight_norm(weighted, weight_norm, teacher_scale, vocab))

    # The student on S and R.
    scaled = student_logits * student_scale
    member = torch.zeros((*scaled.shape[:-1], vocab + 1), dtype=torch.bool, device=scaled.device)
    member = member.scatter(-1, torch.where(in_s, ids, vocab), True)[..., :vocab]
    lse = torch.logsumexp(scaled, -1, keepdim=True)
    lse_tail = torch.logsumexp(scaled.masked_fill(member, float("-inf")), -1, keepdim=True)
    scaled_s = scaled.gather(-1, ids).masked_fill(~in_s, float("-inf"))
    log_q = torch.cat([scaled_s, lse_tail], -1) - lse

    kl = divergence(log_pt, log_q, jsd_beta)
    rows = _row_terms(kl, weight, student_logits, target, valid, beta=beta, kl_scale=kl_scale, ce_weight=ce_weight)
    rows["entropy"] = torch.where(valid, entropy(log_q if tail == "bucket" else torch.log_softmax(scaled, -1)), 0)
    return rows


def check_topk_divergence(tail: str, jsd_beta: float) -> None:
    """The divergences a top-k teacher defines exactly (see ``topk_loss_rows``), or a ValueError."""
    if tail == "renormalize" and jsd_beta != 0.0:
        raise ValueError(f"jsd_beta={jsd_beta} with tail='renormalize': the renormalised teacher gives no mass "
                         "outside its k ids, where the student's reverse KL is infinite and the mixture's terms "
                         "are not those of a top-k teacher; use tail='bucket' (every divergence of the k + 1 "
                         "outcomes) or jsd_beta=0 (the forward KL)")


def topk_teacher(topk_ids, topk_logprobs, valid, vocab, dtype, *, teacher_scale, weighted, tail):
    """The teacher side of ``topk_loss_rows`` (its rows of ``valid`` only; ignored rows hold everything in the
    bucket): (in_s, the ids of S (0 elsewhere, int64), log pt over the k slots and the bucket (..., k + 1),
    the weight U (or 1)), in ``dtype``; the tail mass in float64."""
    in_s = (topk_ids >= 0) & valid.unsqueeze(-1)
    ids = torch.where(in_s, topk_ids, 0).long()
    logprobs = torch.where(in_s, topk_logprobs.detach().to(dtype), float("-inf"))

    # The teacher on S and R: log p_b ** g, normalised, from the log-probabilities relative to the row's largest
    # (``shift``), so that rows far below 0 keep their digits in low precision; log sum_S p as a log-sum-exp: below
    # about -745 each p underflows in float64, and the renormalised weight needs its log.
    shift = logprobs.amax(-1, keepdim=True)
    shift = torch.where(shift > float("-inf"), shift, 0)
    log_p_s = torch.logsumexp(logprobs.double(), -1)
    bucket = torch.full_like(valid, tail == "bucket") | ~valid
    p_tail = torch.where(bucket & (in_s.sum(-1) < vocab), (1 - torch.exp(log_p_s)).clamp_min(0), 0)
    log_tail = (torch.log(p_tail) - shift.squeeze(-1).double()).to(dtype)
    log_w = teacher_scale * torch.cat([logprobs - shift, log_tail.unsqueeze(-1)], -1)
    log_norm = torch.logsumexp(log_w, -1, keepdim=True)
    log_pt = log_w - log_norm
    if weighted:
        # U = sum_b p_b**g (over S and R; renormalised: divided by (sum_S p)**g), the shift put back.
        shift = shift.squeeze(-1)
        unshift = torch.where(bucket, teacher_scale * shift, teacher_scale * (shift.double() - log_p_s).to(dtype))
        weight = torch.exp(log_norm.squeeze(-1) + unshift)
    else:
        weight = torch.ones_like(log_norm.squeeze(-1))
    return in_s, ids, log_pt, weight


def _topk_loss(student_logits, topk_ids, topk_logprobs, target, reduction, **params):
    rows = topk_loss_rows(student_logits, topk_ids, topk_logprobs, target, **params)
    return reduce_rows(rows["loss"], rows["valid"], reduction)


def wttm_loss_topk(student_logits, topk_ids, topk_logprobs, target=None, *, gamma=0.2, beta=1.0, ce_weight=1.0,
                   tail="bucket", ignore_index=-100, reduction="mean", weight_norm="none"):
    """``wttm_loss`` from the teacher's top-k log-probabilities (see ``topk_loss_rows``)."""
    return _topk_loss(student_logits, topk_ids, topk_logprobs, target, reduction, teacher_scale=gamma,
                      weighted=True, tail=tail, beta=beta, ce_weight=ce_weight, ignore_index=ignore_index,
                      weight_norm=weight_norm)


def ttm_loss_topk(student_logits, topk_ids, topk_logprobs, target=None, *, gamma=0.2, beta=1.0, ce_weight=1.0,
                  tail="bucket", ignore_index=-100, reduction="mean"):
    """``ttm_loss`` from the teacher's top-k log-probabilities."""
    return _topk_loss(student_logits, topk_ids, topk_logprobs, target, reduction, teacher_scale=gamma,
                      weighted=False, tail=tail, beta=beta, ce_weight=ce_weight, ignore_index=ignore_index)


def kd_loss_topk(student_logits, topk_ids, topk_logprobs, target=None, *, temperature=4.0, beta=1.0,
                 ce_weight=1.0, tail="bucket", ignore_index=-100, reduction="mean"):
    """``kd_loss`` from the teacher's top-k log-probabilities: the teacher side is the same construction with
    gamma = 1/T, the student is tempered (z / T), times T^2."""
    return _topk_loss(student_logits, topk_ids, topk_logprobs, target, reduction, student_scale=1.0 / temperature,
                      teacher_scale=1.0 / temperature, kl_scale=temperature**2, weighted=False, tail=tail, beta=beta,
                      ce_weight=ce_weight, ignore_index=ignore_index)
