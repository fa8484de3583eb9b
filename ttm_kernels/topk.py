"""Distillation from a sparse teacher: its top-k token ids and log-probabilities per row, as a store on disk or
a served teacher (vLLM, SGLang) gives them, with no teacher in memory::

    loss = fused_wttm_loss_topk(student_logits, topk_ids, topk_logprobs, target, gamma=0.2, beta=4.0)
    loss = fused_linear_wttm_loss_topk(h_s, lm_head.weight, topk_ids, topk_logprobs, target)

TTM and WTTM need only the teacher's log-probabilities: softmax(gamma * v) is proportional to p**gamma and
U = sum(p**gamma). The definition (``reference.topk_loss_rows``): per row, S = the ids other than the padding
id -1, p_R = max(0, 1 - sum_S p) the tail mass, and

* ``tail="bucket"`` (default): teacher and student both on the k + 1 outcomes S and R (every other id in one
  bucket; q_R the student's mass outside S, summed over those ids, never 1 - q_S). The dense loss when S is
  the whole vocabulary, the dense loss of the two coarsened distributions otherwise.
* ``tail="renormalize"``: the teacher renormalised over S, no bucket, against the full-vocabulary student
  (the sparse KD of DistillKit-like tools).

Kernels: one streaming read of the student row (its online sums over R: each block's ids of S are found by
walking the ids sorted once per call), a gather of the k student logits, O(k) teacher work per row; for
"mean"/"sum" the gradient in the same launch. No (N, V) tensor besides the student's gradient.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from . import _ops, _topk_ops, linear, reference, spec as specs
from ._stats import ROW_TERM_STATS
from .distributed import (_INT64_MAX, _all_gather_single, _member, _settings, agree, exchange_device,
                          full_parameters, is_dtensor, local_shards, replicated_local, sharded_rows)
from .functional import logits_loss, sharded_logits_loss, validate_target
from .reduction import components, mean_denominator, valid_rows
from .spec import DEFAULT_GAMMA, DEFAULT_TEMPERATURE, LossSpec, check_flag as _check_flag, check_vocab_size

TAILS = reference.TAILS
PAD_ID = -1
# Rounding slack of the log-probabilities' checks: an fp32 log_softmax upstream (1e-4, with room), plus the
# rounding of the stored dtype (8 eps: a bf16 log-probability of the top token is off by up to 0.03).
UPSTREAM_SLACK = 1e-4
STORAGE_EPS_SLACK = 8


def logprob_slack(dtype: torch.dtype, k: int) -> tuple[float, float]:
    """How far above 0 a log-probability of ``dtype``, and above 1 the sum of k probabilities, may lie as
    rounding: (1e-4 + 8 eps, (1e-4 + 8 eps) * max(1, ln k)) (sum p_i |log p_i| <= ln k bounds the sum's
    rounding by eps/2 each)."""
    slack = UPSTREAM_SLACK + STORAGE_EPS_SLACK * torch.finfo(dtype).eps
    return slack, slack * max(1.0, math.log(k))


def _refuse(bad: torch.Tensor, message: str, example=None) -> None:
    """Raise ValueError(message) when ``bad`` holds a True; on a GPU a device-side assertion instead (no host
    synchronisation, as ``F.cross_entropy``'s target check), and under torch.compile nothing (the kernels give
    such rows NaN or refuse them)."""
    if torch.compiler.is_compiling():
        return
    if bad.device.type != "cpu":
        torch._assert_async(torch.logical_not(bad.any()), message)
    elif bool(bad.any()):
        raise ValueError(message + ("" if example is None else f", e.g. {example(bad)}"))


def validate_topk(ids, logprobs, lead_shape, vocab, device, tail, valid=None):
    """The teacher's (..., k) ids and log-probabilities for student rows of ``lead_shape`` and ``vocab``
    columns; returns ``topk_rows``' sorted (N, k) int32 ids and fp32 log-probabilities, or raises an error
    naming the argument. Value checks (on the CPU a ValueError, on a GPU a device-side assertion): ids in
    [0, vocab) or the padding id -1; no id twice in a row (after the sort, a comparison of neighbours);
    log-probabilities at most slightly above 0, and their exponentials' sum at most slightly above 1 (see
    ``logprob_slack``); with ``tail="renormalize"``, at least one id in every row of ``valid``."""
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"teacher_topk_ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"teacher_topk_ids must hold integer token ids (int32 or int64), got dtype {ids.dtype}")
    if not isinstance(logprobs, torch.Tensor):
        raise TypeError(f"teacher_topk_logprobs must be a torch.Tensor, got {type(logprobs).__name__}")
    if not logprobs.is_floating_point():
        raise TypeError(f"teacher_topk_logprobs must be a floating-point tensor, got dtype {logprobs.dtype}")
    if ids.shape != logprobs.shape:
        raise ValueError("teacher_topk_ids and teacher_topk_logprobs must have the same shape (..., k), got "
                         f"{tuple(ids.shape)} and {tuple(logprobs.shape)}")
    if ids.dim() == 0 or ids.shape[:-1] != lead_shape or ids.shape[-1] == 0:
        raise ValueError(f"teacher_topk_ids must have shape {(*lead_shape, 'k')} with k >= 1 (the student's leading "
                         f"shape), got {tuple(ids.shape)}")
    for name, x in (("teacher_topk_ids", ids), ("teacher_topk_logprobs", logprobs)):
        if x.device != device:
            raise ValueError(f"{name} must be on the student's device {device}, got {x.device}")
    if logprobs.requires_grad:
        raise ValueError("teacher_topk_logprobs requires grad, but the teacher is a constant target here and no "
                         "gradient flows to it: pass teacher_topk_logprobs.detach()")
    # The range is checked in the ids' own dtype, before the kernels' int32 narrows them (2**32 + c would read c).
    _refuse((ids < PAD_ID) | (ids >= vocab),
            f"teacher_topk_ids holds ids outside [0, {vocab}) that are not the padding id {PAD_ID}",
            lambda bad: ids[bad][0].item())
    sorted_ids, sorted_logprobs = _topk_ops.topk_rows(ids, logprobs)
    present = sorted_ids >= 0
    _refuse((sorted_ids[:, 1:] == sorted_ids[:, :-1]) & present[:, 1:],
            "teacher_topk_ids holds an id twice in one row (each row's ids must be distinct; pad with -1)",
            lambda bad: sorted_ids[:, 1:][bad][0].item())
    slack, sum_slack = logprob_slack(logprobs.dtype, ids.shape[-1])
    lp = torch.where(present, sorted_logprobs, float("-inf"))
    _refuse(lp > slack, f"teacher_topk_logprobs holds log-probabilities above 0 (beyond a rounding slack of "
            f"{slack:.2g} for {logprobs.dtype}): pass log-probabilities, not logits", lambda bad: lp[bad][0].item())
    p_sum = torch.exp(lp.double()).sum(-1)
    _refuse(p_sum > 1 + sum_slack, "teacher_topk_logprobs of a row sum to a probability above 1 (beyond a rounding "
            f"slack of {sum_slack:.2g}): they must be normalised over the full vocabulary, as a served teacher "
            "returns them", lambda bad: p_sum[bad][0].item())
    if tail == "renormalize":
        # A row whose ids all have log-probability -inf has no mass to renormalise, as a row of padding.
        massless = ~(present & (sorted_logprobs > float("-inf"))).any(-1)
        empty = massless if valid is None else massless & valid.reshape(-1)
        _refuse(empty, "tail='renormalize' has no teacher to renormalise in a row that counts: every row that is "
                "not ignored needs at least one id in teacher_topk_ids with a finite log-probability "
                "(tail='bucket' takes empty rows)")
    return sorted_ids, sorted_logprobs


def _topk_backend(backend, device, dtype, spec: LossSpec) -> str:
    """``_ops.resolve_backend`` for a top-k teacher, whose kernels compute the forward KL only: the reverse KL
    and the JSD (``jsd_beta`` not 0) run on the reference's arithmetic, which "auto" picks for them."""
    resolved = _ops.resolve_backend(backend, device, dtype)
    if spec.jsd_beta != 0.0 and resolved != "torch":
        if backend == "auto":
            return "torch"
        raise ValueError(f"backend={backend!r}: the top-k kernels compute the forward KL only, and "
                         f"jsd_beta={spec.jsd_beta} asks for the reverse KL or the JSD: pass backend='auto' or 'torch'")
    return resolved


class TopkLogits:
    """The top-k teacher form of ``functional.logits_loss`` (see ``functional.DenseLogits``): the teacher's (..., k)
    ids and log-probabilities over the full vocabulary, with its tail; with a process group, its whole top-k in
    global ids on every rank, each rank handling the ids of its columns."""

    fact_names = ("k (the last dimension of teacher_topk_ids)", "the teacher_topk_ids",
                  "the largest id in teacher_topk_ids")  # what the ranks of a process group agree on

    def __init__(self, ids, logprobs, tail):
        self.ids, self.logprobs, self.tail = ids, logprobs, tail

    @property
    def form(self) -> str:
        return f"topk_{self.tail}"

    def post_processed(self, spec: LossSpec) -> "TopkLogits":
        return self  # the log-probabilities are final

    def check(self, student_logits) -> None:
        pass  # the ids and log-probabilities need the target's rows: ``kernel_tensors``

    def kernel_tensors(self, student_logits, target, spec: LossSpec) -> list:
        """``topk_rows``' sorted ids and log-probabilities, after their checks (``validate_topk``)."""
        lead, device = student_logits.shape[:-1], student_logits.device
        valid = valid_rows(target, lead, device, spec.ignore_index)
        reference.check_topk_divergence(self.tail, spec.jsd_beta)
        return list(validate_topk(self.ids, self.logprobs, lead, student_logits.shape[-1], device, self.tail, valid))

    def resolve_backend(self, backend, device, dtype, spec: LossSpec) -> str:
        return _topk_backend(backend, device, dtype, spec)

    def reference_rows(self, student, target, spec: LossSpec) -> dict:
        return reference.topk_loss_rows(student, self.ids, self.logprobs, target, tail=self.tail,
                                        **spec.reference_params())

    # With a process group: the ranks hold column shards of the student's logits, every rank the whole top-k.

    def local(self, student_logits, target, process_group):
        """(student, this form, target, group, place in column order): DTensor student logits sharded on the last
        dimension become their local shards on the mesh's group (the top-k and the target plain or replicated)."""
        if not is_dtensor(student_logits):
            return student_logits, self, target, process_group, _member(process_group)
        (student,), target, group, index = local_shards((("student_logits", student_logits),), target,
                                                        process_group)
        ids, logprobs = (replicated_local(name, x) for name, x in (("teacher_topk_ids", self.ids),
                                                                   ("teacher_topk_logprobs", self.logprobs)))
        return student, TopkLogits(ids, logprobs, self.tail), target, group, index

    @property
    def tensors(self) -> tuple:
        return self.ids, self.logprobs

    def sharded_facts(self, student, target, spec: LossSpec) -> tuple:
        return _sharded_topk_facts(self.ids, self.logprobs, target, student.shape[:-1], student.device, self.tail,
                                   spec)

    def sharded_backend(self, backend, device, dtype, spec: LossSpec) -> str:
        return _topk_backend(backend, device, dtype, spec)

    def sharded_loss(self, student, target, spec: LossSpec, shards, backend, *, reduction, return_components,
                     num_items_in_batch):
        """After the agreement: the top-k kernels' pieces (``_topk_ops.TopkPieces``) through the shards' loss of
        the dense teacher (``functional.sharded_logits_loss``): one read of this rank's columns for its partial
        sums, the merge, and for "mean"/"sum" the gradient in the forward (one more read and a write); one
        all_gather of 6 + k numbers per row, none in the backward. On the "torch" backend (float64 logits, the
        reverse KL and the JSD) the reference's arithmetic on each rank's columns (``_sharded_topk_rows``), with
        autograd."""
        _check_ids_in_vocabulary(self.ids, shards)
        if backend != "torch":
            pieces = _topk_ops.TopkPieces(backend, spec.kernel_scales, spec.weighted, spec.ignore_index, self.tail,
                                          shards.vocab)
            return sharded_logits_loss(student, list(_topk_ops.topk_rows(self.ids, self.logprobs)), target, pieces,
                                       shards, spec, reduction=reduction, return_components=return_components,
                                       num_items_in_batch=num_items_in_batch)
        lead, device = student.shape[:-1], student.device
        compute = torch.float64 if student.dtype == torch.float64 else torch.float32
        flat_target = None if target is None else target.reshape(-1).long()
        valid = valid_rows(flat_target, (lead.numel(),), device, spec.ignore_index)
        k = self.ids.shape[-1]
        rows = _sharded_topk_rows(student.reshape(-1, student.shape[-1]).to(compute), self.ids.reshape(-1, k).long(),
                                  self.logprobs.reshape(-1, k), flat_target, valid, spec, self.tail, shards)
        loss = rows["loss"].view(lead)
        if reduction != "none":
            loss = loss.sum()
            if reduction == "mean":
                loss = loss / mean_denominator(flat_target, spec.ignore_index, lead.numel(), device,
                                               num_items_in_batch, dtype=compute)
        if not return_components:
            return loss
        return loss, components([rows[k] for k in ("kl", "ce", "weight", "entropy")], valid.view(lead))


_TOPK_DOC = """
    Args:
        student_logits: (..., V) float32, bfloat16 or float16 logits of the student (float64 for checks, computed
            by the reference). Rows may be strided; the last dimension should be contiguous.
        teacher_topk_ids: (..., k) int32 or int64 token ids of the teacher's k most likely tokens per row, in any
            order; a row with fewer ids pads the unused slots with -1. The ids of a row must be distinct (a
            duplicate raises: each row is sorted once anyway, and neighbours are compared). k >= 1, up to V.
        teacher_topk_logprobs: (..., k) log-probabilities of those ids, normalised over the full vocabulary (what
            a served teacher returns), any float dtype; the padding slots' values are ignored. Must not require
            grad. A log-probability above 0, or a row whose probabilities sum above 1, beyond a rounding slack
            (``logprob_slack``: 1e-4 + 8 eps of the dtype) raises; within it, the tail mass is clamped at 0.
        target: optional (...) integer class indices; adds ``ce_weight * CE(student_logits, target)`` (the full
            vocabulary's softmax); rows whose target is ``ignore_index`` contribute nothing to any term.
        tail: ``"bucket"`` (default): the teacher's tail mass p_R = 1 - sum of its k probabilities is one more
            outcome, matched against the student's mass outside the k ids. ``"renormalize"``: the teacher
            renormalised over its k ids (every row that counts needs one), no bucket.
        beta, ce_weight, ignore_index, reduction, backend, return_components: as in the dense losses
            (``fused_wttm_loss``): "mean" over the rows not ignored, "sum", "none"; "auto" runs the Triton
            kernel on CUDA tensors, the C++ kernel on CPU tensors, the float64 reference for float64.
        num_items_in_batch: the divisor of ``reduction="mean"`` in place of this call's non-ignored rows, for
            exact gradient accumulation, as in ``fused_wttm_loss``.
        inplace_backward: write the gradient into ``student_logits``' own storage, allocating no (N, V) tensor, as
            in ``fused_wttm_loss`` (the logits' values are destroyed; refused with the reference backend, which a
            jsd_beta other than 0 runs on, with softcap/logit_scale, process_group, a leaf that requires grad and
            expanded or overlapping logits).
        softcap, logit_scale: the student head's post-processing (``softcap * tanh(logit_scale * z / softcap)``),
            applied to the student's logits with its gradient (one more (N, V) tensor); the teacher's
            log-probabilities are already final and stay as given.
        jsd_beta: the divergence D between the (transformed) teacher's distribution p and the student's q that
            replaces KL(p || q), in TRL's and Liger's convention: 0 (default) the forward KL(p || q) of the paper
            and of KD; 1 the reverse KL(q || p); in between the generalised JSD beta * KL(p || m) + (1 - beta) *
            KL(q || m), m = beta * p + (1 - beta) * q. With tail="bucket" only (the divergence of the k + 1
            outcomes); any other value than 0 runs on the reference's arithmetic ("auto" picks it for a top-k
            teacher; "cpu" and "triton" refuse it).
        process_group: vocabulary parallelism: each rank passes its contiguous slice of the student's vocabulary
            columns (rank order = column order, uneven widths allowed) and the teacher's whole (..., k) top-k in
            global ids (the same on every rank; each rank handles the ids in its columns) and the same target.
            Every rank gets the loss of the whole rows and its columns' gradient. On the compiled backends the
            top-k kernels read each rank's columns (its sums outside the teacher's ids), one all_gather of 6 + k
            numbers per row merges them after the agreement, and for "mean"/"sum" the kernels write the gradient
            in the forward (the collectives of ``ttm_kernels.distributed``; none in the backward). The
            ``"torch"`` backend (float64 logits, ``jsd_beta`` other than 0) runs the reference's arithmetic on
            each rank's columns instead (a few (N, width) temporaries). Student logits given as a DTensor
            sharded on the last dimension (``Shard(-1)``) over a 1-D mesh take this path without it.
        vocab_size: optional, the whole vocabulary's size: with ``process_group`` the ranks check that their slices
            tile it; without, it must be V.

    Errors are raised before any work, naming the argument; on a GPU the value checks of the ids and
    log-probabilities are device-side assertions (no host synchronisation), as for the target.

    Storage: keep the log-probabilities in float32 for ``tail="bucket"``. The tail mass of a confident teacher
    is small, and the rounding of float16 or bfloat16 log-probabilities moves it enough for the power transform
    to change such rows' loss by up to ~10% (1e-5 from float32); with ``"renormalize"`` float16 stays within
    5e-4 (benchmarks/RESULTS.md, "Storage dtypes of the log-probabilities").

    Returns:
        The float32 loss, and with ``return_components`` a ``(loss, LossComponents)`` pair (the weight is U of the
        sparse teacher). The gradient reaches ``student_logits`` only, in its dtype, first-order only.
"""


def fused_wttm_loss_topk(student_logits: torch.Tensor, teacher_topk_ids: torch.Tensor,
                         teacher_topk_logprobs: torch.Tensor, target: Optional[torch.Tensor] = None, *,
                         gamma: float = DEFAULT_GAMMA, beta: float = 1.0, ce_weight: float = 1.0,
                         tail: str = "bucket", ignore_index: int = -100, reduction: str = "mean",
                         backend: str = "auto", return_components: bool = False, inplace_backward: bool = False,
                         num_items_in_batch=None, softcap: Optional[float] = None, logit_scale: float = 1.0,
                         jsd_beta: float = 0.0, process_group=None,
                         vocab_size: Optional[int] = None,
                         weight_norm: str = "none"):
    spec = specs.wttm(gamma, beta=beta, ce_weight=ce_weight, ignore_index=ignore_index, softcap=softcap,
                    logit_scale=logit_scale, jsd_beta=jsd_beta, weight_norm=weight_norm)
    return logits_loss(student_logits, TopkLogits(teacher_topk_ids, teacher_topk_logprobs, tail), target, spec,
                       reduction=reduction, backend=backend, return_components=return_components,
                       inplace_backward=inplace_backward, num_items_in_batch=num_items_in_batch,
                       process_group=process_group, vocab_size=vocab_size)


fused_wttm_loss_topk.__doc__ = """WTTM from the teacher's top-k log-probabilities: ``ce_weight * CE + beta *
    mean_rows(U * KL(pt || q))`` over the teacher's k ids and its tail (see the module docstring).

    gamma: the power-transform exponent, 1/T (default 0.2). pt_b = p_b**gamma / U, U = sum_b p_b**gamma over
        the k ids (and the bucket).
    weight_norm: ``"none"`` (default) the paper's weight U, which ranges from 1 to V**(1 - gamma) and so grows
        with the vocabulary V; ``"vocab"`` U / V**max(0, 1 - gamma), in (0, 1] at every V, so that a beta chosen
        at one vocabulary means the same at another (see ``LossSpec``). V is the student's whole vocabulary (all
        ranks' columns under ``process_group``); the factor is a constant, exact under gradient accumulation.
        The reported ``LossComponents.weight`` is the normalised weight. TTM and KD have no weight to normalise.
""" + _TOPK_DOC


def fused_ttm_loss_topk(student_logits: torch.Tensor, teacher_topk_ids: torch.Tensor,
                        teacher_topk_logprobs: torch.Tensor, target: Optional[torch.Tensor] = None, *,
                        gamma: float = DEFAULT_GAMMA, beta: float = 1.0, ce_weight: float = 1.0,
                        tail: str = "bucket", ignore_index: int = -100, reduction: str = "mean",
                        backend: str = "auto", return_components: bool = False, inplace_backward: bool = False,
                        num_items_in_batch=None, softcap: Optional[float] = None, logit_scale: float = 1.0,
                        jsd_beta: float = 0.0, process_group=None,
                        vocab_size: Optional[int] = None):
    spec = specs.ttm(gamma, beta=beta, ce_weight=ce_weight, ignore_index=ignore_index, softcap=softcap,
                    logit_scale=logit_scale, jsd_beta=jsd_beta)
    return logits_loss(student_logits, TopkLogits(teacher_topk_ids, teacher_topk_logprobs, tail), target, spec,
                       reduction=reduction, backend=backend, return_components=return_components,
                       inplace_backward=inplace_backward, num_items_in_batch=num_items_in_batch,
                       process_group=process_group, vocab_size=vocab_size)


fused_ttm_loss_topk.__doc__ = """TTM from the teacher's top-k log-probabilities: ``ce_weight * CE + beta *
    mean_rows(KL(pt || q))``.

    gamma: the power-transform exponent, 1/T (default 0.2).
""" + _TOPK_DOC


def fused_kd_loss_topk(student_logits: torch.Tensor, teacher_topk_ids: torch.Tensor,
                       teacher_topk_logprobs: torch.Tensor, target: Optional[torch.Tensor] = None, *,
                       temperature: float = DEFAULT_TEMPERATURE, beta: float = 1.0, ce_weight: float = 1.0,
                       tail: str = "bucket", ignore_index: int = -100, reduction: str = "mean",
                       backend: str = "auto", return_components: bool = False, inplace_backward: bool = False,
                       num_items_in_batch=None, softcap: Optional[float] = None, logit_scale: float = 1.0,
                       jsd_beta: float = 0.0, process_group=None,
                       vocab_size: Optional[int] = None):
    spec = specs.kd(temperature, beta=beta, ce_weight=ce_weight, ignore_index=ignore_index, softcap=softcap,
                    logit_scale=logit_scale, jsd_beta=jsd_beta)
    return logits_loss(student_logits, TopkLogits(teacher_topk_ids, teacher_topk_logprobs, tail), target, spec,
                       reduction=reduction, backend=backend, return_components=return_components,
                       inplace_backward=inplace_backward, num_items_in_batch=num_items_in_batch,
                       process_group=process_group, vocab_size=vocab_size)


fused_kd_loss_topk.__doc__ = """Hinton KD from the teacher's top-k log-probabilities: ``ce_weight * CE + beta *
    T^2 * mean_rows(KL(pt || softmax(z / T)))``, the teacher side built with gamma = 1/T.

    temperature: T (default 4).
""" + _TOPK_DOC


# --- Vocabulary-parallel: the student's columns (or LM-head rows) split over the ranks of a process group.

def _safe_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp whose gradient is 0, not NaN, where every entry is -inf (a rank whose columns all lie in S
    has an empty tail; a row's target lies on one rank only)."""
    m = x.detach().amax(dim, keepdim=True)
    m = torch.where(m > float("-inf"), m, 0)
    total = torch.exp(x - m).sum(dim)
    positive = total > 0
    return torch.where(positive, m.squeeze(dim) + torch.log(torch.where(positive, total, 1)), float("-inf"))


def _sharded_topk_rows(z, ids, logprobs, target, valid, spec, tail, shards):
    """``reference.topk_loss_rows`` of rows whose columns the ranks hold (``z``: this rank's columns, in the
    compute dtype), the same on every rank, differentiable with respect to ``z``: each rank's (max-free) log-sums
    over all its columns, over its columns outside S, of the untempered logits for the CE, its logits of S and of
    the target, one all_gather of them (5 + k numbers per row), and the merge; the other ranks' numbers are
    constants here, so autograd gives this rank's columns' gradient, and the backward issues no collective."""
    n, width = z.shape
    offset = shards.offset
    z = torch.where(valid.unsqueeze(-1), z, 0)
    in_s, ids, log_pt, weight = reference.topk_teacher(ids, logprobs, valid, shards.vocab, z.dtype,
                                                       teacher_scale=spec.teacher_scale, weighted=spec.weighted,
                                                       tail=tail)
    weight = weight * spec.weight_factor
    scaled = z * spec.student_scale
    here = in_s & (ids >= offset) & (ids < offset + width)
    local_ids = torch.where(here, ids - offset, 0)
    member = torch.zeros((n, width + 1), dtype=torch.bool, device=z.device)
    member = member.scatter(-1, torch.where(here, local_ids, width), True)[:, :width]
    y = torch.zeros(n, dtype=torch.long, device=z.device) if target is None else target
    y_here = valid & (y >= offset) & (y < offset + width)
    z_y = z.gather(-1, torch.where(y_here, y - offset, 0).unsqueeze(-1)).squeeze(-1)
    tail_scaled = scaled.masked_fill(member, float("-inf"))
    lse_tail_here = _safe_logsumexp(tail_scaled, -1)
    # The mean of s*z over this rank's columns of R under their own softmax: R's share of the student's entropy
    # over the vocabulary (tail "renormalize") is -sum_ranks exp(lse_R,rank - lse) (mean_rank - lse).
    tail_share = torch.softmax(tail_scaled, -1).nan_to_num(0.0)
    tail_mean = (tail_share * torch.where(tail_share > 0, tail_scaled, 0)).sum(-1)
    mine = torch.cat([torch.stack([_safe_logsumexp(scaled, -1), lse_tail_here, _safe_logsumexp(z, -1), tail_mean,
                                   z_y.masked_fill(~y_here, float("-inf"))], -1),
                      scaled.gather(-1, local_ids).masked_fill(~here, float("-inf"))], -1)
    gathered = mine.new_empty((len(shards.widths),) + tuple(mine.shape))
    _all_gather_single(gathered.view(-1), mine.detach().contiguous().view(-1), group=shards.group)
    parts = torch.stack([mine if rank == shards.index else gathered[rank] for rank in range(len(shards.widths))])
    lse, lse_tail, lse_z = (_safe_logsumexp(parts[..., i], 0) for i in range(3))
    # The target's logit and each id's are finite on the one rank that holds them: a sum of the finite entries.
    held = torch.where(torch.isfinite(parts[..., 4:]), parts[..., 4:], 0).sum(0)
    scaled_s = held[:, 1:].masked_fill(~in_s, float("-inf"))
    log_q = torch.cat([scaled_s, lse_tail.unsqueeze(-1)], -1) - lse.unsqueeze(-1)
    kl = reference.divergence(log_pt, log_q, spec.jsd_beta)
    rows = reference._row_terms(kl, weight, None, target, valid, beta=spec.beta, kl_scale=spec.kl_scale,
                                ce_weight=spec.ce_weight, ce=lse_z - held[:, 0])
    if tail == "bucket":
        entropy = reference.entropy(log_q)
    else:
        entropy = reference.entropy(log_q[:, :-1]) - (torch.exp(parts[..., 1] - lse) * (parts[..., 3] - lse)).sum(0)
    rows["entropy"] = torch.where(valid, entropy, 0)
    return rows


def _sharded_topk_facts(ids, logprobs, target, lead, device, tail, spec) -> tuple:
    """A rank's own checks of the teacher's top-k for a vocabulary-parallel call (the target already checked), and
    the facts of the top-k that every rank must share, for the agreement: k, a fingerprint of the ids and their
    largest (the global vocabulary is known after the exchange: the ids' range against it is checked then)."""
    reference.check_topk_divergence(tail, spec.jsd_beta)
    validate_topk(ids, logprobs, lead, _INT64_MAX, device, tail, valid_rows(target, lead, device, spec.ignore_index))
    flat = ids.reshape(-1).long()
    fingerprint = int((flat * torch.arange(1, flat.numel() + 1, device=flat.device)).sum())
    return ids.shape[-1], fingerprint, int(flat.max()) if flat.numel() else -1


def _check_ids_in_vocabulary(ids, shards) -> None:
    """After the agreement (every rank's ids are the same, so every rank raises alike): the ids within the global
    vocabulary."""
    largest = int(ids.max()) if ids.numel() else -1
    if largest >= shards.vocab:
        raise ValueError(f"teacher_topk_ids holds ids outside [0, {shards.vocab}) (the global vocabulary: the ranks' "
                         f"shard widths {list(shards.widths)} together), e.g. {largest}")


# --- The fused linear variant: the student's logits a chunk of rows at a time, no teacher model at all.

class TopkTeacher:
    """The sparse teacher of the fused linear loss's chunk loop (see ``linear.DenseTeacher``): rows [start,
    end) of its sorted ids and log-probabilities; no buffer, no GEMM."""

    buffer_dtype = None

    def __init__(self, ids, logprobs, tail):
        self.ids, self.logprobs, self.tail = ids, logprobs, tail

    def allocate(self, chunk, vocab):
        return None

    def rows(self, index):
        """This teacher on its rows ``index`` (the chunk loop's counted rows)."""
        return TopkTeacher(self.ids[index], self.logprobs[index], self.tail)

    def chunk_loss(self, z, start, end, y, row_grad, launch, buffer):
        ids, logprobs = self.ids[start:end], self.logprobs[start:end]
        spec = launch.loss
        if launch.backend == "torch":
            return linear.loss_and_grad_torch(
                z, lambda logits: reference.topk_loss_rows(logits, ids, logprobs, y, tail=self.tail,
                                                           **spec.reference_params()), row_grad)
        # The top-k kernels compute the forward KL (jsd_beta 0: see _topk_backend).
        stats = _ops.chunk_stats(z, [ids, logprobs], y, row_grad, spec.kernel_scales, spec.weighted,
                                 spec.ignore_index, f"topk_{self.tail}", launch.backend)
        return linear.reported_terms(stats[ROW_TERM_STATS], spec)


def _fused_linear_topk_loss(student_hidden, student_weight, ids, logprobs, target, spec: LossSpec, *, student_bias,
                            tail, reduction, chunk_size, backend, return_components, num_items_in_batch=None,
                            process_group=None, reduce_hidden_grad=True, vocab_size=None):
    _check_flag("return_components", return_components)
    if process_group is not None:
        return vocab_parallel_linear_topk_loss(
            student_hidden, student_weight, ids, logprobs, target, spec, tail=tail, process_group=process_group,
            reduce_hidden_grad=reduce_hidden_grad, student_bias=student_bias, reduction=reduction,
            chunk_size=chunk_size, backend=backend, return_components=return_components,
            num_items_in_batch=num_items_in_batch, vocab_size=vocab_size)
    if not torch.compiler.is_compiling() and any(map(is_dtensor, (student_weight, student_bias))):
        # FSDP2: the sharded LM head's whole parameters for this call, as the dense head's path gathers them.
        student_weight, student_bias = full_parameters(student_weight, student_bias)
    linear.validate_student(student_hidden, student_weight, student_bias, reduction, spec.ignore_index, chunk_size,
                            num_items_in_batch)
    lead, vocab, device = student_hidden.shape[:-1], student_weight.shape[0], student_hidden.device
    check_vocab_size(vocab_size, vocab)
    if target is not None:
        validate_target(target, lead, vocab, device, spec.ignore_index)
    reference.check_topk_divergence(tail, spec.jsd_beta)
    sorted_ids, sorted_logprobs = validate_topk(ids, logprobs, lead, vocab, device, tail,
                                                valid_rows(target, lead, device, spec.ignore_index))
    spec = spec.at_vocab(vocab)  # the student's vocabulary, not the k + 1 outcomes (see LossSpec)
    backend = _topk_backend(backend, device, student_hidden.dtype, spec)
    # The chunk loop applies the student head's post-processing (softcap, logit_scale) to each chunk.
    return linear.run_linear_loss(student_hidden, student_weight, student_bias,
                                  TopkTeacher(sorted_ids, sorted_logprobs, tail),
                                  None if target is None else target.reshape(-1).long(), linear.Launch(spec, backend),
                                  reduction, chunk_size, return_components, num_items_in_batch)


_LINEAR_TOPK_DOC = """
    Args:
        student_hidden: (..., H) last hidden states of the student, float32, bfloat16 or float16 (float64 for
            checks); student_weight: (V, H) its LM head, same dtype; student_bias: optional (V,).
        teacher_topk_ids, teacher_topk_logprobs: (..., k) with the student's leading shape: the teacher's top-k
            ids (-1 pads) and log-probabilities, as in ``fused_wttm_loss_topk``. No teacher model at all.
        target, tail, beta, ce_weight, ignore_index, reduction, backend, return_components, num_items_in_batch,
            vocab_size: as in ``fused_wttm_loss_topk``.
        jsd_beta: the divergence D between the (transformed) teacher's distribution p and the student's q that
            replaces KL(p || q), in TRL's and Liger's convention: 0 (default) the forward KL(p || q) of the paper
            and of KD; 1 the reverse KL(q || p); in between the generalised JSD beta * KL(p || m) + (1 - beta) *
            KL(q || m), m = beta * p + (1 - beta) * q. With tail="bucket" only (the divergence of the k + 1
            outcomes); any other value than 0 runs on the reference's arithmetic ("auto" picks it for a top-k
            teacher; "cpu" and "triton" refuse it).
        process_group: vocabulary parallelism: each rank passes its rows of the student's LM head (and bias), a
            contiguous slice of the vocabulary, and the same hidden states, target and whole top-k in global ids.
            Every rank gets the loss of the whole rows; the weight and bias gradients are its slices'; the hidden
            states' gradient is summed over the group (``reduce_hidden_grad=False``: this rank's part). As for the
            logits, each chunk's loss runs the top-k kernels on each rank's columns and merges the ranks' sums
            (the reference's arithmetic on ``"torch"``), with its collectives, also in the backward of "none":
            every rank runs the same chunks.
        softcap, logit_scale: the student head's post-processing, applied to each chunk of its logits inside the
            chunk loop with its gradient (as in ``fused_linear_wttm_loss``); the teacher's log-probabilities are
            final.
        chunk_size: rows per chunk; default from the memory budget of the one (chunk, V) student buffer (see
            ``linear.default_chunk_size``: twice the rows of the dense loss's, which also holds the teacher's).

    FSDP2: an LM head of a ``fully_shard``-ed module (DTensor parameters) is gathered for the call and its
    gradients reduce-scattered back, as in ``fused_linear_wttm_loss``.

    The student's logits are never materialised beyond one chunk: each chunk's GEMM, the loss kernel writing
    d loss / d logits in place, two GEMMs for the gradients of the hidden states and the head (dW summed in
    fp32), as ``fused_linear_wttm_loss`` without the teacher's GEMM and buffer.

    Returns:
        The float32 loss (with ``return_components``, a ``(loss, LossComponents)`` pair). Gradients reach
        student_hidden, student_weight and student_bias, first-order only; with "mean"/"sum" they are computed
        in the forward, with "none" the backward recomputes the chunks.
"""


def fused_linear_wttm_loss_topk(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                teacher_topk_ids: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                                target: Optional[torch.Tensor] = None, *, student_bias: Optional[torch.Tensor] = None,
                                gamma: float = DEFAULT_GAMMA, beta: float = 1.0, ce_weight: float = 1.0,
                                tail: str = "bucket", ignore_index: int = -100, reduction: str = "mean",
                                chunk_size: Optional[int] = None, backend: str = "auto",
                                return_components: bool = False, num_items_in_batch=None,
                                softcap: Optional[float] = None, logit_scale: float = 1.0,
                                jsd_beta: float = 0.0, process_group=None,
                                reduce_hidden_grad: bool = True, vocab_size: Optional[int] = None,
                                weight_norm: str = "none"):
    spec = specs.wttm(gamma, beta=beta, ce_weight=ce_weight, ignore_index=ignore_index, softcap=softcap,
                    logit_scale=logit_scale, jsd_beta=jsd_beta, weight_norm=weight_norm)
    return _fused_linear_topk_loss(student_hidden, student_weight, teacher_topk_ids, teacher_topk_logprobs, target,
                                   spec, student_bias=student_bias, tail=tail, reduction=reduction,
                                   chunk_size=chunk_size, backend=backend, return_components=return_components,
                                   num_items_in_batch=num_items_in_batch, process_group=process_group,
                                   reduce_hidden_grad=reduce_hidden_grad, vocab_size=vocab_size)


fused_linear_wttm_loss_topk.__doc__ = """``fused_wttm_loss_topk`` on ``student_hidden @ student_weight.T (+ bias)``,
    a chunk of rows at a time. gamma: the power-transform exponent, 1/T (default 0.2).
    weight_norm: ``"none"`` (default) the paper's weight U, which ranges from 1 to V**(1 - gamma) and so grows
        with the vocabulary V; ``"vocab"`` U / V**max(0, 1 - gamma), in (0, 1] at every V, so that a beta chosen
        at one vocabulary means the same at another (see ``LossSpec``). V is the student's whole vocabulary (all
        ranks' columns under ``process_group``); the factor is a constant, exact under gradient accumulation.
        The reported ``LossComponents.weight`` is the normalised weight. TTM and KD have no weight to normalise.
""" + _LINEAR_TOPK_DOC


def fused_linear_ttm_loss_topk(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                               teacher_topk_ids: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                               target: Optional[torch.Tensor] = None, *, student_bias: Optional[torch.Tensor] = None,
                               gamma: float = DEFAULT_GAMMA, beta: float = 1.0, ce_weight: float = 1.0,
                               tail: str = "bucket", ignore_index: int = -100, reduction: str = "mean",
                               chunk_size: Optional[int] = None, backend: str = "auto",
                               return_components: bool = False, num_items_in_batch=None,
                               softcap: Optional[float] = None, logit_scale: float = 1.0,
                               jsd_beta: float = 0.0, process_group=None,
                               reduce_hidden_grad: bool = True, vocab_size: Optional[int] = None):
    spec = specs.ttm(gamma, beta=beta, ce_weight=ce_weight, ignore_index=ignore_index, softcap=softcap,
                    logit_scale=logit_scale, jsd_beta=jsd_beta)
    return _fused_linear_topk_loss(student_hidden, student_weight, teacher_topk_ids, teacher_topk_logprobs, target,
                                   spec, student_bias=student_bias, tail=tail, reduction=reduction,
                                   chunk_size=chunk_size, backend=backend, return_components=return_components,
                                   num_items_in_batch=num_items_in_batch, process_group=process_group,
                                   reduce_hidden_grad=reduce_hidden_grad, vocab_size=vocab_size)


fused_linear_ttm_loss_topk.__doc__ = """``fused_ttm_loss_topk`` on the student's LM-head output, chunked. gamma:
    1/T (default 0.2).
""" + _LINEAR_TOPK_DOC


def fused_linear_kd_loss_topk(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                              teacher_topk_ids: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                              target: Optional[torch.Tensor] = None, *, student_bias: Optional[torch.Tensor] = None,
                              temperature: float = DEFAULT_TEMPERATURE, beta: float = 1.0, ce_weight: float = 1.0,
                              tail: str = "bucket", ignore_index: int = -100, reduction: str = "mean",
                              chunk_size: Optional[int] = None, backend: str = "auto",
                              return_components: bool = False, num_items_in_batch=None, softcap: Optional[float] = None,
                              logit_scale: float = 1.0, jsd_beta: float = 0.0, process_group=None,
                              reduce_hidden_grad: bool = True, vocab_size: Optional[int] = None):
    spec = specs.kd(temperature, beta=beta, ce_weight=ce_weight, ignore_index=ignore_index, softcap=softcap,
                    logit_scale=logit_scale, jsd_beta=jsd_beta)
    return _fused_linear_topk_loss(student_hidden, student_weight, teacher_topk_ids, teacher_topk_logprobs, target,
                                   spec, student_bias=student_bias, tail=tail, reduction=reduction,
                                   chunk_size=chunk_size, backend=backend, return_components=return_components,
                                   num_items_in_batch=num_items_in_batch, process_group=process_group,
                                   reduce_hidden_grad=reduce_hidden_grad, vocab_size=vocab_size)


fused_linear_kd_loss_topk.__doc__ = """``fused_kd_loss_topk`` (T^2 factor) on the student's LM-head output,
    chunked. temperature: T (default 4).
""" + _LINEAR_TOPK_DOC


# --- The vocabulary-parallel fused linear variant: each rank holds rows of the student's LM head.

class _ShardedTopkTeacher:
    """The top-k teacher of the chunk loop (``linear._run_chunks``) when the ranks hold the student head's rows:
    each chunk's loss and gradient by the top-k kernels' pieces (``_topk_ops.TopkPieces`` through
    ``distributed.sharded_rows``, as a dense head's chunk), or on the "torch" launch by ``_sharded_topk_rows`` and
    autograd (``linear.loss_and_grad_torch``); no buffer, no GEMM. ``ids``, ``logprobs``: ``topk_rows``' sorted
    ones for the kernels, the caller's (int64) for the reference."""

    buffer_dtype = None

    def __init__(self, ids, logprobs, tail, shards):
        self.ids, self.logprobs, self.tail, self.shards = ids, logprobs, tail, shards

    def allocate(self, chunk, vocab):
        return None

    def rows(self, index):
        """This teacher on its rows ``index`` (the chunk loop's counted rows: the same on every rank, whose
        targets agree)."""
        return _ShardedTopkTeacher(self.ids[index], self.logprobs[index], self.tail, self.shards)

    def chunk_loss(self, z, start, end, y, row_grad, launch, buffer):
        spec = launch.loss
        ids, logprobs = self.ids[start:end], self.logprobs[start:end]
        if launch.backend != "torch":
            pieces = _topk_ops.TopkPieces(launch.backend, spec.kernel_scales, spec.weighted, spec.ignore_index,
                                          self.tail, self.shards.vocab)
            stats = sharded_rows(pieces, self.shards, z, [ids, logprobs], y, grad=None if row_grad is None else z,
                                 row_grad=row_grad)
            return linear.reported_terms(stats[ROW_TERM_STATS], spec)
        valid = valid_rows(y, (end - start,), z.device, spec.ignore_index)
        return linear.loss_and_grad_torch(
            z, lambda logits: _sharded_topk_rows(logits, ids, logprobs, y, valid, spec, self.tail, self.shards),
            row_grad)


def vocab_parallel_linear_topk_loss(student_hidden, student_weight, ids, logprobs, target, spec, *, tail,
                                    process_group, reduce_hidden_grad, student_bias, reduction, chunk_size, backend,
                                    return_components, num_items_in_batch=None, vocab_size=None):
    """``topk._fused_linear_topk_loss`` with each rank's rows of the student's LM head and the teacher's whole top-k
    in global ids: the chunk loop of ``linear._run_chunks`` with ``_ShardedTopkTeacher`` (every rank runs the same
    chunks): the top-k kernels' pieces on the compiled backends, the reference's arithmetic on "torch" (as
    ``TopkLogits.sharded_loss``)."""
    index = _member(process_group)
    if dist.get_world_size(process_group) == 1:  # the whole LM head is here
        return _fused_linear_topk_loss(student_hidden, student_weight, ids, logprobs, target, spec,
                                       student_bias=student_bias, tail=tail, reduction=reduction,
                                       chunk_size=chunk_size, backend=backend, return_components=return_components,
                                       num_items_in_batch=num_items_in_batch, vocab_size=vocab_size)
    device = exchange_device(process_group, student_hidden, ids, logprobs, target)
    names = ("the number of rows N", "the student hidden size", "the student dtype", "the device type",
             "whether a target is given", "k (the last dimension of teacher_topk_ids)", "the teacher_topk_ids",
             "the largest id in teacher_topk_ids",
             "the loss settings (gamma or temperature, beta, ce_weight, ignore_index, softcap, logit_scale, tail, "
             "reduction, chunk_size, reduce_hidden_grad, bias, backend)")

    def check():
        if not isinstance(reduce_hidden_grad, bool):
            raise TypeError(f"reduce_hidden_grad must be True or False, got {reduce_hidden_grad!r}")
        if any(map(is_dtensor, (student_hidden, student_weight, student_bias))):
            raise TypeError("with process_group, pass each rank's own shards as plain tensors (DTensor.to_local())")
        linear.validate_student(student_hidden, student_weight, student_bias, reduction, spec.ignore_index,
                                chunk_size, num_items_in_batch)
        resolved = _topk_backend(backend, device, student_hidden.dtype, spec)
        lead = student_hidden.shape[:-1]
        if target is not None:
            validate_target(target, lead, None, device, spec.ignore_index)
        return student_weight.shape[0], (lead.numel(), student_hidden.shape[-1], student_hidden.dtype, device.type,
                                          target is not None,
                                          *_sharded_topk_facts(ids, logprobs, target, lead, device, tail, spec),
                                          _settings(spec, tail, reduction, chunk_size, reduce_hidden_grad,
                                                    student_bias is None, resolved))

    shards = agree(process_group, index, device, check, names, target, spec.ignore_index, num_items_in_batch,
                   vocab_size)
    spec = spec.at_vocab(shards.vocab)  # the whole vocabulary, not this rank's shard (see LossSpec)
    _check_ids_in_vocabulary(ids, shards)
    target = None if target is None else target.reshape(-1).long()
    k = ids.shape[-1]
    backend = _topk_backend(backend, device, student_hidden.dtype, spec)
    teacher = _ShardedTopkTeacher(*(_topk_ops.topk_rows(ids, logprobs) if backend != "torch"
                                    else (ids.reshape(-1, k).long(), logprobs.reshape(-1, k))), tail, shards)
    return linear.run_linear_loss(student_hidden, student_weight, student_bias, teacher, target,
                                  linear.Launch(spec, backend), reduction, chunk_size, return_components,
                                  num_items_in_batch, sharded=linear.Sharded(shards, process_group,
                                                                             reduce_hidden_grad))
