"""Fused linear + distillation loss for large vocabularies: the (N, V) logits never exist in full.

Drop-in for ``fused_wttm_loss(h_s @ W_s.T, h_t @ W_t.T, target)`` on the last hidden states::

    loss = fused_linear_wttm_loss(h_s, lm_head_s.weight, h_t, lm_head_t.weight, target, gamma=0.2)

A chunk of C rows at a time, the student and teacher logits are computed into two (C, V) buffers allocated
once, the row kernel writes the loss and d(loss)/d(logits) into the student buffer in one launch, and two
GEMMs turn it into the gradients of the student's hidden states (written into their slice) and LM head
(summed over chunks in fp32). Beyond the gradients themselves, the extra memory is the two buffers and the
fp32 dW accumulator, whatever N is.

Precision: the logits stay in the GEMM's output dtype, and the loss and its gradient read the same rounded
values; the kernel works in fp32 and rounds dlogits once; dW and db are summed in fp32 and rounded once at
the end.

Gradients: with ``reduction="mean"`` or ``"sum"`` they are computed in the forward (Liger style) and the
backward only scales them by the scalar upstream gradient, so backpropagating twice through one loss
(``retain_graph=True``) is an error. With ``reduction="none"`` the per-row upstream gradient must reach
dlogits before dW sums over the rows, so the forward computes the loss only and the backward recomputes
the chunks, teacher GEMM included.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from . import _ops, distributed, reference, spec as specs
from ._stats import ROW_TERM_STATS
from .distributed import _SumGradOverGroup, _member, _settings, agree, exchange_device, is_dtensor, sharded_rows
from .functional import _compiled_backend, validate_options, validate_target
from .reduction import components, mean_denominator, valid_rows, validate_num_items
from .spec import AS_STUDENT, DEFAULT_GAMMA, DEFAULT_TEMPERATURE, LossSpec, check_vocab_size, check_weight_norm

VOCAB_MISMATCH = ("error", "truncate_teacher")
# The chunk buffers' bytes are budgeted, not rows. CUDA: 1 GiB (2048 rows at V=128256 bf16) ran within 3% of
# 4096-row chunks and 5% faster than 1024 on an H200 (benchmarks/RESULTS.md) at the same peak, which the fp32
# dW (2 GiB there) and its cast set. CPU: the GEMMs saturate with far fewer rows.
CHUNK_BUDGET_BYTES = {"cuda": 1 << 30}
DEFAULT_CHUNK_BUDGET_BYTES = 64 << 20
MIN_CHUNK_ROWS = 256


class Launch(NamedTuple):
    """What the chunk loop runs: the loss (``spec.LossSpec``: its scalars and the heads' post-processing) on a
    resolved backend."""

    loss: LossSpec
    backend: str


@functools.cache
def _addmm_has_fp32_out(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(..., out_dtype=torch.float32)`` runs on ``dtype`` inputs here (CUDA, torch >= 2.8);
    without it, the chunk is upcast to fp32 for the weight-gradient GEMM."""
    try:
        x = torch.zeros((1, 1), dtype=dtype, device=device_type)
        acc = torch.zeros((1, 1), dtype=torch.float32, device=device_type)
        torch.addmm(acc, x, x, out_dtype=torch.float32, out=acc)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def default_chunk_size(n_rows: int, vocab: int, student_dtype: torch.dtype, teacher_dtype: Optional[torch.dtype],
                       device: torch.device, fp32_scratch: bool = False, softcap_scratch: bool = False) -> int:
    """Rows per chunk: as many as fit the device's budget (``CHUNK_BUDGET_BYTES``, 1 GiB on CUDA, 64 MiB
    elsewhere) for the student and teacher (C, V) buffers (no teacher buffer for ``teacher_dtype`` None: a
    sparse teacher), plus an fp32 copy of the student's when the weight gradient is summed through an upcast,
    and a student-dtype one for the soft-cap's derivative; rounded down to a multiple of 128, clamped to
    [min(256, N), N]."""
    teacher_bytes = 0 if teacher_dtype is None else teacher_dtype.itemsize
    row_bytes = vocab * (student_dtype.itemsize * (2 if softcap_scratch else 1) + teacher_bytes
                         + (4 if fp32_scratch else 0))
    budget = CHUNK_BUDGET_BYTES.get(torch.device(device).type, DEFAULT_CHUNK_BUDGET_BYTES)
    rows = budget // max(row_bytes, 1)
    if rows > 128:
        rows -= rows % 128
    return max(1, min(n_rows, max(rows, MIN_CHUNK_ROWS)))


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _linear_into(out, hidden, weight, bias):
    if bias is None:
        torch.mm(hidden, weight.t(), out=out)
    else:
        torch.addmm(bias, hidden, weight.t(), out=out)


def _head_transform_(logits, head: tuple, derivative=None):
    """A LM head's own post-processing of its logits, in place, with ``head = (softcap, logit_scale)`` (a spec's
    ``student_head`` or ``teacher_head``): ``x * logit_scale`` (Cohere's multiplier, Granite's 1 / logits_scaling),
    then ``softcap * tanh(x / softcap)`` (Gemma-2's final soft-capping), in the models' order and dtype. With
    ``derivative`` (a buffer of the same shape) and a soft-cap, also writes d out / d x = logit_scale * (1 - tanh^2)
    there, from the rounded tanh as eager autograd does."""
    softcap, logit_scale = head
    if logit_scale != 1.0:
        logits.mul_(logit_scale)
    if softcap is not None:
        logits.div_(softcap).tanh_()
        if derivative is not None:
            torch.mul(logits, logits, out=derivative).mul_(-logit_scale).add_(logit_scale)
        logits.mul_(softcap)


def _head_transform_backward_(grad, head: tuple, derivative):
    """d loss / d logits -> d loss / d (the GEMM's output), in place: the chain rule of ``_head_transform_``."""
    softcap, logit_scale = head
    if softcap is not None:
        grad.mul_(derivative)
    elif logit_scale != 1.0:
        grad.mul_(logit_scale)


ROW_TERMS = ("loss", "kl", "ce", "weight", "entropy")  # the statistics' ROW_TERM_STATS


def loss_and_grad_torch(z, rows_of, row_grad):
    """The reference on one chunk, in float32 (float64 for float64 logits): its (5, C) row terms, writing
    d(sum row_grad * loss)/dz into ``z``. ``rows_of(logits)``: the reference's row dict of those logits."""
    compute = _accumulation_dtype(z.dtype)
    if row_grad is None:
        rows = rows_of(z.to(compute))
        return torch.stack([rows[k] for k in ROW_TERMS])
    with torch.enable_grad():
        z_compute = z.to(compute).requires_grad_()
        rows = rows_of(z_compute)
        (grad,) = torch.autograd.grad(rows["loss"], z_compute,
                                      grad_outputs=row_grad.to(compute).expand_as(rows["loss"]))
    z.copy_(grad)
    return torch.stack([rows[k].detach() for k in ROW_TERMS])


def _chunk_loss(z, v, y, row_grad, launch: Launch):
    """Per-row fp32 (loss, kl, ce, weight, entropy) of one chunk; with ``row_grad``, also overwrites ``z`` with
    its gradient."""
    spec = launch.loss
    if launch.backend == "torch":
        return loss_and_grad_torch(z, lambda logits: reference.loss_rows(logits, v.to(logits.dtype), y,
                                                                         **spec.reference_params()), row_grad)
    stats = _ops.chunk_stats(z, [v], y, row_grad, spec.kernel_scales, spec.weighted, spec.ignore_index, "dense",
                             launch.backend)
    return reported_terms(stats[ROW_TERM_STATS], spec)


def reported_terms(terms: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """A kernel's ``ROW_TERMS`` rows of a chunk with the weight the logs report: the kernels compute U, and the
    factor of ``weight_norm`` is folded into their kl_coef. The rows are the chunk's own (no backward reads
    them)."""
    if spec.weight_factor != 1.0:
        terms[3] *= spec.weight_factor
    return terms


class DenseTeacher:
    """The teacher of the chunk loop (``_run_chunks``) as a provider: the rows [start, end) of its logits,
    computed by its GEMM into a (C, V) buffer (then the heads' post-processing, as the student's), and the
    chunk's loss against them with ``loss`` (``_chunk_loss``; the vocabulary-parallel loss passes its own).
    A sparse teacher (``topk.TopkTeacher``) is another provider: no buffer, no GEMM. A provider holds no state
    that the loop changes (``allocate`` returns the buffer, which the loop hands back to ``chunk_loss``), so
    that torch.compile can trace the loop in the backward too."""

    def __init__(self, hidden, weight, bias, vocab, loss=_chunk_loss):
        shared = min(vocab, weight.shape[0])
        self.hidden, self.weight = hidden, weight[:shared]
        self.bias = None if bias is None else bias[:shared]
        self.shared, self.buffer_dtype, self.loss = shared, hidden.dtype, loss

    def allocate(self, chunk, vocab):
        buffer = torch.empty((chunk, vocab), dtype=self.buffer_dtype, device=self.hidden.device)
        # Student-only columns: the teacher gives them probability 0, i.e. logit -inf (a 0 logit would give
        # tokens the teacher lacks mass exp(0) / Z).
        buffer[:, self.shared:] = float("-inf")
        return buffer

    def chunk_loss(self, z, start, end, y, row_grad, launch, buffer):
        v = buffer[: end - start]
        _linear_into(v[:, :self.shared], self.hidden[start:end], self.weight, self.bias)
        _head_transform_(v[:, :self.shared], launch.loss.teacher_head)  # the -inf columns stay -inf
        return self.loss(z, v, y, row_grad, launch)

    def rows(self, index):
        """This teacher on the rows ``index`` of its hidden states (the chunk loop's counted rows)."""
        return DenseTeacher(self.hidden[index], self.weight, self.bias, self.shared, self.loss)


def counted_rows(target, ignore_index: int, n_rows: int) -> Optional[torch.Tensor]:
    """The (M,) int64 indices of the rows that count (target != ignore_index) when some do not, for the chunk
    loop to project only those: an ignored row's loss and gradients are 0, so its GEMMs (the student's, the
    teacher's, and the two of the backward) would be wasted, and a prompt-masked fine-tuning batch ignores half
    its rows or more. None when every row counts, and when the rows cannot be picked: without a target, under
    torch.compile (a data-dependent shape) and while a CUDA graph is captured. On a GPU it costs one host
    synchronisation per call (``nonzero`` waits for the count); a backward that recomputes reuses the indices."""
    if target is None or torch.compiler.is_compiling():
        return None
    if target.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    kept = (target != ignore_index).nonzero().squeeze(1)
    return None if kept.numel() == n_rows else kept


def _run_counted_chunks(kept, h_s, w_s, b_s, teacher, target, launch, chunk_size, row_grad=None,
                        needs=(False,) * 3):
    """``_run_chunks`` on the rows ``kept`` only (``counted_rows``; None: every row). The others' row terms and
    hidden-state gradient are 0, as the kernels give an ignored row, and add nothing to dW and db."""
    if kept is None:
        return _run_chunks(h_s, w_s, b_s, teacher, target, launch, chunk_size, row_grad, needs)
    if row_grad is not None and row_grad.dim():
        row_grad = row_grad[kept]
    rows, grad_h, grad_w, grad_b = _run_chunks(h_s[kept], w_s, b_s, teacher.rows(kept), target[kept], launch,
                                               chunk_size, row_grad, needs)
    rows = rows.new_zeros((rows.shape[0], h_s.shape[0])).index_copy_(1, kept, rows)
    if grad_h is not None:
        grad_h = h_s.new_zeros(h_s.shape).index_copy_(0, kept, grad_h)
    return rows, grad_h, grad_w, grad_b


def _run_chunks(h_s, w_s, b_s, teacher, target, launch, chunk_size, row_grad=None, needs=(False,) * 3):
    """Row terms (5, N) (``ROW_TERMS``; fp32, fp64 for fp64 inputs) against ``teacher`` (a provider,
    see ``DenseTeacher``) and, with ``row_grad`` ((N,) or 0-dim), the gradients of sum_i row_grad_i * loss_i
    w.r.t. (h_s, w_s, b_s), each None unless ``needs`` asks for it."""
    n, vocab = h_s.shape[0], w_s.shape[0]
    need_h, need_w, need_b = needs if row_grad is not None else (False,) * 3
    # dW and db are summed in fp32 (fp64 for fp64 weights) and rounded once at the end.
    accumulate = _accumulation_dtype(w_s.dtype)
    fp32_out = w_s.dtype != accumulate and _addmm_has_fp32_out(w_s.device.type, w_s.dtype)
    upcast = w_s.dtype != accumulate and not fp32_out
    # The soft-cap's derivative needs the capped logits, which the kernel overwrites with their gradient.
    spec = launch.loss
    softcap_scratch = row_grad is not None and spec.softcap is not None
    chunk = chunk_size or default_chunk_size(n, vocab, h_s.dtype, teacher.buffer_dtype, h_s.device,
                                             fp32_scratch=need_w and upcast, softcap_scratch=softcap_scratch)
    chunk = max(1, min(chunk, n))

    device = h_s.device
    # Under torch.compile a fresh buffer per chunk (inductor plans the memory): with one buffer reused across the
    # chunks, inductor 2.13 misorders the chunks' writes around the in-place loss op when no GEMM of a dense
    # teacher sits between them (a top-k teacher with a soft-cap got wrong gradients,
    # tests/test_linear.py::test_fused_linear_loss_torch_compile).
    s_buf = None if torch.compiler.is_compiling() else torch.empty((chunk, vocab), dtype=h_s.dtype, device=device)
    d_buf = torch.empty((chunk, vocab), dtype=h_s.dtype, device=device) if softcap_scratch else None
    teacher_buffer = teacher.allocate(chunk, vocab)
    rows = torch.empty((len(ROW_TERMS), n), dtype=accumulate, device=device)
    grad_h = torch.empty_like(h_s) if need_h else None
    # Filled by the first chunk (beta=0: neither a memset nor a read of the accumulator).
    grad_w = (torch.empty if n else torch.zeros)(w_s.shape, dtype=accumulate, device=device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=accumulate, device=device) if need_b else None

    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        z = (torch.empty((end - start, vocab), dtype=h_s.dtype, device=device) if s_buf is None
             else s_buf[: end - start])
        derivative = None if d_buf is None else d_buf[: end - start]
        hidden = h_s[start:end]
        _linear_into(z, hidden, w_s, b_s)
        _head_transform_(z, spec.student_head, derivative)
        y = None if target is None else target[start:end]
        rg = row_grad if row_grad is None or row_grad.dim() == 0 else row_grad[start:end]
        rows[:, start:end] = teacher.chunk_loss(z, start, end, y, rg, launch, teacher_buffer)
        # From here on z holds dlogits.
        if rg is not None:
            _head_transform_backward_(z, spec.student_head, derivative)
        if need_h:
            torch.mm(z, w_s, out=grad_h[start:end])
        if need_w:
            beta = 0 if start == 0 else 1
            if fp32_out:
                torch.addmm(grad_w, z.t(), hidden, beta=beta, out_dtype=torch.float32, out=grad_w)
            elif upcast:
                grad_w.addmm_(z.t().float(), hidden.float(), beta=beta)
            else:
                grad_w.addmm_(z.t(), hidden, beta=beta)
        if need_b:
            grad_b += z.sum(0, dtype=accumulate)

    s_buf = d_buf = z = derivative = teacher_buffer = None  # free the buffers before the casts below
    if grad_w is not None:
        grad_w = grad_w.to(w_s.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(b_s.dtype)
    return rows, grad_h, grad_w, grad_b


def student_needs(hidden, weight, bias) -> tuple:
    """Which of the student's gradients (hidden states, weight, bias) the chunk loop computes
    (``ctx.needs_input_grad`` ignores torch.no_grad())."""
    return tuple(torch.is_grad_enabled() and x is not None and x.requires_grad for x in (hidden, weight, bias))


class _FusedLinearLoss(torch.autograd.Function):
    """Returns the reduced loss and the detached (4, N) row terms kl, ce, weight, entropy (for logging)."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, teacher, target, spec, reduction, chunk_size, needs, denominator):
        # Ignored rows never reach a GEMM (``counted_rows``).
        kept = counted_rows(target, spec.loss.ignore_index, h_s.shape[0])
        inputs = (kept, h_s, w_s, b_s, teacher, target, spec, chunk_size)
        # The gradients are computed in the backward, from the saved inputs, for "none" (the per-row upstream
        # gradient must reach dlogits before dW sums over the rows) and for float64, which is for checking:
        # there a backward that can run twice (gradcheck does) matters more than the memory of the forward's;
        # and under torch.compile, whose tracer refuses gradients kept on ctx by the forward (a side effect).
        ctx.deferred = any(needs) and (reduction == "none" or h_s.dtype == torch.float64
                                       or torch.compiler.is_compiling())
        if reduction == "mean":
            # The mean's divisor (functional.mean_denominator) scales each row's gradient as the kernel writes
            # it: on the device, no host sync, no pass over the gradient afterwards.
            scale = 1.0 / denominator
        else:
            scale = torch.ones((), dtype=_accumulation_dtype(h_s.dtype), device=h_s.device)
        if ctx.deferred or not any(needs):
            if ctx.deferred:
                ctx.save_for_backward(h_s, w_s, b_s, target, None if reduction == "none" else scale)
                ctx.params = (kept, teacher, spec, chunk_size, needs)
            rows = _run_counted_chunks(*inputs)[0]
            loss = rows[0] if reduction == "none" else rows[0].sum() * scale
        else:
            rows, *grads = _run_counted_chunks(*inputs, row_grad=scale, needs=needs)
            ctx.grads = grads
            loss = rows[0].sum() * scale
        terms = rows[1:]
        ctx.mark_non_differentiable(terms)
        return loss, terms

    @staticmethod
    def backward(ctx, grad_out, _grad_terms):
        _ops.refuse_higher_order()
        if ctx.deferred:
            h_s, w_s, b_s, target, scale = ctx.saved_tensors
            kept, teacher, spec, chunk_size, needs = ctx.params
            row_grad = grad_out.contiguous() if scale is None else grad_out * scale
            _, *grads = _run_counted_chunks(kept, h_s, w_s, b_s, teacher, target, spec, chunk_size,
                                            row_grad=row_grad, needs=needs)
        else:
            if ctx.grads is None:
                raise RuntimeError("fused linear loss: its gradients were computed in the forward and already "
                                   "handed to a first backward; recompute the loss to backpropagate again")
            grads, ctx.grads = ctx.grads, None
            for grad in grads:
                if grad is not None:
                    _ops.scale_grad_(grad, grad_out)  # on the device: no pass, and no host sync, when it is 1
        return (*grads, None, None, None, None, None, None, None)


def _check_tensor(name, x, dim=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(x.shape)}")


def _validate_side(side, hidden, weight, bias):
    _check_tensor(f"{side}_hidden", hidden)
    _check_tensor(f"{side}_weight", weight, dim=2)
    if hidden.dim() == 0 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{side}_hidden must have shape (..., {weight.shape[1]}) to match {side}_weight of shape "
                         f"(V, H) = {tuple(weight.shape)}, got {tuple(hidden.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{side}_weight must have V >= 1 rows, got shape {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{side}_hidden and {side}_weight must have the same dtype, got {hidden.dtype} and "
                        f"{weight.dtype}")
    if bias is not None:
        _check_tensor(f"{side}_bias", bias, dim=1)
        if bias.shape[0] != weight.shape[0] or bias.dtype != weight.dtype:
            raise ValueError(f"{side}_bias must have shape ({weight.shape[0]},) and dtype {weight.dtype}, got "
                             f"{tuple(bias.shape)} and {bias.dtype}")


def validate_student(student_hidden, student_weight, student_bias, reduction, ignore_index, chunk_size,
                     num_items_in_batch=None):
    """The student side and the options of a fused linear loss; else an error naming the argument."""
    validate_options(reduction, ignore_index)
    validate_num_items(num_items_in_batch, reduction)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    _validate_side("student", student_hidden, student_weight, student_bias)
    device = student_hidden.device
    for name, x in (("student_weight", student_weight), ("student_bias", student_bias)):
        if isinstance(x, torch.Tensor) and x.device != device:
            raise ValueError(f"{name} must be on student_hidden's device {device}, got {x.device}")


def _check_linear_args(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                       ignore_index, reduction, chunk_size, vocab_mismatch, num_items_in_batch) -> torch.Size:
    """Every check of the dense fused linear loss's arguments that needs no other process and no vocabulary;
    returns the leading shape."""
    if vocab_mismatch not in VOCAB_MISMATCH:
        raise ValueError(f"vocab_mismatch must be one of {VOCAB_MISMATCH}, got {vocab_mismatch!r}")
    validate_student(student_hidden, student_weight, student_bias, reduction, ignore_index, chunk_size,
                     num_items_in_batch)
    _validate_side("teacher", teacher_hidden, teacher_weight, teacher_bias)
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(f"teacher_hidden must have the student's leading shape {tuple(lead)}, got "
                         f"{tuple(teacher_hidden.shape[:-1])}")
    device = student_hidden.device
    for name, x in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                    ("teacher_bias", teacher_bias)):
        if isinstance(x, torch.Tensor) and x.device != device:
            raise ValueError(f"{name} must be on student_hidden's device {device}, got {x.device}")
    if teacher_hidden.requires_grad:
        raise ValueError("teacher_hidden requires grad, but no gradient flows to the teacher: run the teacher "
                         "under torch.no_grad() or pass teacher_hidden.detach()")
    return lead


def _fused_linear_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, target, spec: LossSpec, *,
                       student_bias, teacher_bias, reduction, chunk_size, vocab_mismatch, backend, return_components,
                       num_items_in_batch=None, return_soft_hard=False, process_group=None, reduce_hidden_grad=True,
                       vocab_size=None):
    """The fused linear loss; with ``return_soft_hard`` (reduction "mean"), ``(loss, soft, hard)``: the
    detached distillation term ``sum_rows(kl_scale * weight * KL)`` and cross-entropy ``sum_rows(CE)``, each
    over the mean's divisor, so that ``loss = ce_weight * hard + beta * soft``."""
    if process_group is not None:
        if return_soft_hard:
            raise ValueError("return_soft_hard is not supported with process_group yet")
        return vocab_parallel_linear_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, target, spec, process_group=process_group,
            reduce_hidden_grad=reduce_hidden_grad, student_bias=student_bias, teacher_bias=teacher_bias,
            reduction=reduction, chunk_size=chunk_size, vocab_mismatch=vocab_mismatch, backend=backend,
            return_components=return_components, num_items_in_batch=num_items_in_batch, vocab_size=vocab_size)
    if not torch.compiler.is_compiling() and any(map(is_dtensor, (student_weight, student_bias, teacher_weight,
                                                                   teacher_bias))):
        student_weight, student_bias = distributed.full_parameters(student_weight, student_bias)
        teacher_weight, teacher_bias = distributed.full_parameters(teacher_weight, teacher_bias, constant=True)
    lead = _check_linear_args(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                              teacher_bias, spec.ignore_index, reduction, chunk_size, vocab_mismatch,
                              num_items_in_batch)
    device = student_hidden.device
    vocab, teacher_vocab = student_weight.shape[0], teacher_weight.shape[0]
    check_vocab_size(vocab_size, vocab)
    if vocab != teacher_vocab and vocab_mismatch == "error":
        raise ValueError(f"student vocabulary {vocab} (student_weight rows) != teacher vocabulary {teacher_vocab} "
                         "(teacher_weight rows); pass vocab_mismatch='truncate_teacher' to align the teacher "
                         "to the student's vocabulary")
    if target is not None:
        validate_target(target, lead, vocab, device, spec.ignore_index)
        target = target.reshape(-1).long()
    spec = spec.at_vocab(vocab)
    backend = _ops.resolve_backend(backend, device, student_hidden.dtype)

    teacher = DenseTeacher(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight.detach(),
                           None if teacher_bias is None else teacher_bias.detach(), vocab)
    return run_linear_loss(student_hidden, student_weight, student_bias, teacher, target, Launch(spec, backend),
                           reduction, chunk_size, return_components, num_items_in_batch, return_soft_hard)


class Sharded(NamedTuple):
    """A head orchestration whose ranks hold the rows of the LM heads (``run_linear_loss``)."""
    shards: object  # distributed.Shards, after the agreement
    group: object
    reduce_hidden_grad: bool


def run_linear_loss(student_hidden, student_weight, student_bias, teacher, target, launch: Launch, reduction,
                    chunk_size, return_components, num_items_in_batch=None, return_soft_hard=False,
                    sharded: Optional[Sharded] = None):
    """The orchestrator of the losses from hidden states and LM heads, for any teacher provider (``DenseTeacher``,
    ``topk.TopkTeacher``, their sharded variants): the mean's denominator, the chunk loop's autograd Function and
    the components. The validated call's loss (of the leading shape for "none") and, with ``return_components``,
    its ``LossComponents`` (with ``return_soft_hard``, see ``_fused_linear_loss``); ``target`` already (N,) int64.
    ``sharded``: the ranks hold the heads' rows; every rank runs the same chunks (each one's collectives), sized
    for the widest shard, and the hidden states' gradient is summed over the group unless told otherwise."""
    spec = launch.loss
    lead = student_hidden.shape[:-1]
    n_rows, device = lead.numel(), student_hidden.device
    denominator = None
    if reduction == "mean":
        denominator = mean_denominator(target, spec.ignore_index, n_rows, device, num_items_in_batch,
                                       dtype=_accumulation_dtype(student_hidden.dtype))
    needs = student_needs(student_hidden, student_weight, student_bias)
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    if sharded is not None:
        chunk_size = chunk_size or default_chunk_size(
            n_rows, max(sharded.shards.widths), student_hidden.dtype, teacher.buffer_dtype, device,
            fp32_scratch=needs[1] and student_weight.dtype not in (torch.float32, torch.float64),
            softcap_scratch=any(needs) and spec.softcap is not None)
        if sharded.reduce_hidden_grad and needs[0]:
            hidden = _SumGradOverGroup.apply(hidden, sharded.group)
    loss, terms = _FusedLinearLoss.apply(hidden, student_weight, student_bias, teacher, target, launch, reduction,
                                         chunk_size, needs, denominator)
    if reduction == "none":
        loss = loss.view(lead)
    if return_soft_hard:
        kl, ce, weight, _ = terms
        return loss, spec.kl_scale * (weight * kl).sum() / denominator, ce.sum() / denominator
    if not return_components:
        return loss
    return loss, components(terms, valid_rows(target, lead, device, spec.ignore_index).view(lead))


# ---------------------------------------------------------------------------------------------- vocabulary-parallel
# Each rank holds rows of both LM heads, on the collectives of ``distributed`` (its docstring has the algorithm).


def _sharded_chunk_loss(z, v, y, row_grad, spec, *, shards):
    """``_chunk_loss`` for a chunk whose columns the ranks hold: the chunk's ``ROW_TERMS`` rows,
    and with ``row_grad`` its gradient written over ``z``."""
    pieces = _ops.RowPieces(spec.backend, spec.loss.kernel_params(), spec.loss.weighted, shards.vocab)
    stats = sharded_rows(pieces, shards, z, [v], y, grad=None if row_grad is None else z, row_grad=row_grad)
    return reported_terms(stats[ROW_TERM_STATS], spec.loss)


def vocab_parallel_linear_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, target, spec, *,
                               process_group, reduce_hidden_grad, student_bias, teacher_bias, reduction, chunk_size,
                               vocab_mismatch, backend, return_components, num_items_in_batch=None, vocab_size=None):
    """``_fused_linear_loss`` with each rank's rows of both LM heads: the chunk loop of ``_run_chunks``
    with the sharded rows' loss per chunk (every rank runs the same chunks)."""
    index = _member(process_group)
    if dist.get_world_size(process_group) == 1:  # the whole LM heads are here
        return _fused_linear_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, target, spec, student_bias=student_bias,
            teacher_bias=teacher_bias, reduction=reduction, chunk_size=chunk_size, vocab_mismatch=vocab_mismatch,
            backend=backend, return_components=return_components, num_items_in_batch=num_items_in_batch,
            vocab_size=vocab_size)
    device = exchange_device(process_group, student_hidden, teacher_hidden, target)
    names = ("the number of rows N", "the student hidden size", "the teacher hidden size", "the student dtype",
             "the teacher dtype", "the device type", "whether a target is given",
             "the loss settings (gamma or temperature, beta, ce_weight, ignore_index, softcap, logit_scale, "
             "reduction, chunk_size, reduce_hidden_grad, biases, backend)")

    def check():
        if not isinstance(reduce_hidden_grad, bool):
            raise TypeError(f"reduce_hidden_grad must be True or False, got {reduce_hidden_grad!r}")
        tensors = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
        if any(map(is_dtensor, tensors)):
            raise TypeError("with process_group, pass each rank's own shards as plain tensors (DTensor.to_local())")
        lead = _check_linear_args(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                  teacher_bias, spec.ignore_index, reduction, chunk_size, vocab_mismatch,
                                  num_items_in_batch)
        if vocab_mismatch != "error":
            raise ValueError(f"vocab_mismatch={vocab_mismatch!r} is not supported with process_group: give every "
                             "rank the teacher's rows of the student's vocabulary slice")
        if teacher_weight.shape[0] != student_weight.shape[0]:
            raise ValueError(f"with process_group, each rank's teacher_weight must hold the rows of its "
                             f"student_weight's vocabulary slice: got {teacher_weight.shape[0]} and "
                             f"{student_weight.shape[0]} rows")
        if target is not None:
            validate_target(target, lead, None, device, spec.ignore_index)
        resolved = _compiled_backend(backend, device, student_hidden.dtype)
        settings = _settings(spec, reduction, chunk_size, reduce_hidden_grad, student_bias is None,
                             teacher_bias is None, resolved)
        return student_weight.shape[0], (lead.numel(), student_hidden.shape[-1], teacher_hidden.shape[-1],
                                          student_hidden.dtype, teacher_hidden.dtype, device.type,
                                          target is not None, settings)

    shards = agree(process_group, index, device, check, names, target, spec.ignore_index, num_items_in_batch,
                   vocab_size)
    spec = spec.at_vocab(shards.vocab)  # the whole vocabulary, not this rank's shard (see LossSpec)
    backend = _ops.resolve_backend(backend, device, student_hidden.dtype)
    target = None if target is None else target.reshape(-1).long()
    teacher = DenseTeacher(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight.detach(),
                           None if teacher_bias is None else teacher_bias.detach(), student_weight.shape[0],
                           loss=functools.partial(_sharded_chunk_loss, shards=shards))
    return run_linear_loss(student_hidden, student_weight, student_bias, teacher, target, Launch(spec, backend),
                           reduction, chunk_size, return_components, num_items_in_batch,
                           sharded=Sharded(shards, process_group, reduce_hidden_grad))


_COMMON_DOC = """
    Args:
        student_hidden: (..., H_s) last hidden states of the student, float32, bfloat16 or float16 (float64
            for checks such as gradcheck). Every tensor argument may have any layout (strided, expanded,
            transposed); the target any integer dtype.
        student_weight: (V, H_s) student LM head, same dtype (no autocast: each side's hidden states,
            weight and bias share one dtype); ``student_bias``: optional (V,).
        teacher_hidden: (..., H_t) teacher hidden states with the student's leading shape; must not require
            grad (run the teacher under ``torch.no_grad()``).
        teacher_weight: (V_t, H_t) teacher LM head; ``teacher_bias``: optional (V_t,). The teacher is a
            constant: no gradient reaches teacher_weight or teacher_bias even when they require grad.
        target: optional (...) integer class indices in [0, V) or ``ignore_index``; adds
            ``ce_weight * CE``. Ignored rows contribute nothing to any term.
        beta, ce_weight, ignore_index, reduction: as in the unfused loss. ``"mean"`` divides by the rows
            not ignored (0 when all are); ``"none"`` returns float32 per-row losses of the leading shape.
        chunk_size: rows per chunk. Default: from a memory budget for the two (chunk, V) logits buffers
            (1 GiB on CUDA, 64 MiB elsewhere), clamped to [min(256, N), N]; see ``default_chunk_size``.
        vocab_mismatch: ``"error"`` (default) when V != V_t. ``"truncate_teacher"`` aligns the teacher to the
            student's V columns: a larger teacher's extra rows (e.g. Qwen2.5's 152064 vs 151936) are
            dropped, so its softmax runs over the shared columns; a smaller teacher gets logit -inf
            (probability 0, never a 0 logit, which would give tokens it lacks mass) in the student-only
            columns, while the student keeps them in its own softmax, so the loss pushes the student's
            mass off them. To leave the student's extra columns out instead, pass ``student_weight[:V_t]``.
        backend: ``"auto"`` (Triton on CUDA, the C++ kernel on CPU, else the reference), ``"triton"``,
            ``"cpu"`` or ``"torch"`` (the reference on each chunk).
        return_components: also return a ``LossComponents`` of detached batch means (KL, CE, WTTM weight),
            as the unfused loss does.
        num_items_in_batch: the divisor of ``reduction="mean"`` in place of this call's non-ignored rows, as
            Hugging Face's Trainer passes it (the non-ignored tokens of all gradient-accumulation
            micro-batches, and of all ranks with ``average_tokens_across_devices``): accumulated micro-batches
            then give the gradient of one big batch. An int, a float or a one-element tensor on any device
            (no host synchronisation), positive. See ``fused_wttm_loss``.
        softcap, logit_scale: the LM heads' own post-processing of their logits, applied to the student's and
            (unless ``teacher_softcap`` or ``teacher_logit_scale`` say otherwise) the teacher's inside the chunk
            loop, with its gradient, so that the loss sees the logits the
            models produce: ``x * logit_scale`` (Cohere's ``logit_scale``; Granite's ``1 / logits_scaling``),
            then ``softcap * tanh(x / softcap)`` (Gemma-2's ``final_logit_softcapping``). Default: neither.
            A soft-cap adds one (chunk, V) buffer in the student's dtype for its derivative. With
            ``process_group`` each rank applies it to its own columns.
        teacher_softcap, teacher_logit_scale: the teacher head's own post-processing when its model family differs
            from the student's (TRL's ``teacher_final_logit_softcapping`` and ``teacher_logit_scale``; None: no
            soft-cap). Default ``"student"``: the student's ``softcap`` and ``logit_scale``.
        jsd_beta: the divergence D between the (transformed) teacher's distribution p and the student's q that
            replaces KL(p || q), in TRL's and Liger's convention: 0 (default) the forward KL(p || q) of the paper
            and of KD; 1 the reverse KL(q || p); in between the generalised JSD beta * KL(p || m) + (1 - beta) *
            KL(q || m), m = beta * p + (1 - beta) * q. Every backend computes them; the reverse KL and the JSD
            cost one more pass over the row than the forward KL (their gradient needs the row's sum).
        process_group: vocabulary parallelism (``ttm_kernels.distributed``): each rank of this
            ``torch.distributed`` group passes its rows of both LM heads (and biases), a contiguous slice of the
            vocabulary (rank order = row order, uneven slices allowed), and the same hidden states and target
            (global ids). Every rank gets the loss of the whole rows; the weight and bias gradients are its
            slices' (local); the hidden-state gradient is summed over the group before it is returned.
        vocab_size: optional, the whole vocabulary's size: with ``process_group`` the ranks check that their LM-head
            slices tile it; without, it must be the student head's V.
        reduce_hidden_grad: with ``process_group``, False returns this rank's part of the hidden-state
            gradient instead (the sum over the group is the gradient), for frameworks whose column-parallel
            LM head all-reduces it in its own backward (Megatron's ``copy_to_tensor_model_parallel_region``).

    Ignored rows (target ``ignore_index``) never reach a GEMM: the chunk loop projects only the rows that count
    (a prompt-masked batch skips the prompt's share of all four GEMMs), at the cost of one host synchronisation
    per call on a GPU (the count of counted rows), none under torch.compile or CUDA-graph capture, where every
    row is projected. Under torch.compile (``fullgraph=True`` included) the chunk loop is traced whole and the
    gradients are computed in the backward from the saved inputs, as for ``reduction="none"``: the chunks'
    GEMMs run again there.

    FSDP2: LM heads of ``fully_shard``-ed modules (DTensor parameters) are gathered for the call
    (``full_tensor``); their gradients reach the sharded parameters reduce-scattered and averaged over the
    mesh, as FSDP2 averages the other gradients.

    Returns:
        The float32 loss (float64 for float64 inputs, which the reference computes on each chunk; with
        ``return_components``, a ``(loss, LossComponents)`` pair). Gradients reach student_hidden,
        student_weight and student_bias in their dtypes, first-order only (a backward with
        ``create_graph=True`` raises). With "mean" or "sum" they are computed during the forward and the
        backward only scales them (a second backward through the same loss raises); with "none", and for
        float64 inputs, the backward recomputes the chunks.
"""



def fused_linear_wttm_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                           teacher_weight: torch.Tensor, target: Optional[torch.Tensor] = None, *,
                           student_bias: Optional[torch.Tensor] = None, teacher_bias: Optional[torch.Tensor] = None,
                           gamma: float = DEFAULT_GAMMA, beta: float = 1.0, ce_weight: float = 1.0,
                           ignore_index: int = -100, reduction: str = "mean", chunk_size: Optional[int] = None,
                           vocab_mismatch: str = "error", backend: str = "auto", return_components: bool = False,
                           num_items_in_batch=None, softcap: Optional[float] = None, logit_scale: float = 1.0,
                           jsd_beta: float = 0.0, teacher_softcap: Optional[float] | str = AS_STUDENT,
                           teacher_logit_scale: float | str = AS_STUDENT,
                           process_group=None, reduce_hidden_grad: bool = True, vocab_size: Optional[int] = None,
                           weight_norm: str = "none"):
    spec = specs.wttm(gamma, beta=beta, ce_weight=ce_weight, ignore_index=ignore_index, softcap=softcap,
                    logit_scale=logit_scale, jsd_beta=jsd_beta, teacher_softcap=teacher_softcap,
                    teacher_logit_scale=teacher_logit_scale, weight_norm=weight_norm)
    return _fused_linear_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, target, spec,
                              student_bias=student_bias, teacher_bias=teacher_bias, reduction=reduction,
                              chunk_size=chunk_size, vocab_mismatch=vocab_mismatch, backend=backend,
                              return_components=return_components, num_items_in_batch=num_items_in_batch,
                              process_group=process_group, reduce_hidden_grad=reduce_hidden_grad,
                              vocab_size=vocab_size)


fused_linear_wttm_loss.__doc__ = """``fused_wttm_loss`` on ``student_hidden @ student_weight.T (+ bias)`` and the
    teacher's logits, a chunk of rows at a time, without materialising either (N, V) logits tensor.

    gamma: the power-transform exponent, 1/T (default 0.2).
    weight_norm: ``"none"`` (default) the paper's weight U, which ranges from 1 to V**(1 - gamma) and so grows
        with the vocabulary V; ``"vocab"`` U / V**max(0, 1 - gamma), in (0, 1] at every V, so that a beta chosen
        at one vocabulary means the same at another (see ``LossSpec``). V is the student's whole vocabulary (all
        ranks' columns under ``process_group``); the factor is a constant, exact under gradient accumulation.
        The reported ``LossComponents.weight`` is the normalised weight. TTM and KD have no weight to normalise.
""" + _COMMON_DOC


def fused_linear_ttm_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                          teacher_weight: torch.Tensor, target: Optional[torch.Tensor] = None, *,
                          student_bias: Optional[torch.Tensor] = None, teacher_bias: Optional[torch.Tensor] = None,
                          gamma: float = DEFAULT_GAMMA, beta: float = 1.0, ce_weight: float = 1.0,
                          ignore_index: int = -100, reduction: str = "mean", chunk_size: Optional[int] = None,
                          vocab_mismatch: str = "error", backend: str = "auto", return_components: bool = False,
                          num_items_in_batch=None, softcap: Optional[float] = None, logit_scale: float = 1.0,
                          jsd_beta: float = 0.0, teacher_softcap: Optional[float] | str = AS_STUDENT,
                          teacher_logit_scale: float | str = AS_STUDENT,
                          process_group=None, reduce_hidden_grad: bool = True, vocab_size: Optional[int] = None):
    spec = specs.ttm(gamma, beta=beta, ce_weight=ce_weight, ignore_index=ignore_index, softcap=softcap,
                    logit_scale=logit_scale, jsd_beta=jsd_beta, teacher_softcap=teacher_softcap,
                    teacher_logit_scale=teacher_logit_scale)
    return _fused_linear_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, target, spec,
                              student_bias=student_bias, teacher_bias=teacher_bias, reduction=reduction,
                              chunk_size=chunk_size, vocab_mismatch=vocab_mismatch, backend=backend,
                              return_components=return_components, num_items_in_batch=num_items_in_batch,
                              process_group=process_group, reduce_hidden_grad=reduce_hidden_grad,
                              vocab_size=vocab_size)


fused_linear_ttm_loss.__doc__ = """``fused_ttm_loss`` on the student's and teacher's LM-head outputs, chunked.

    gamma: the power-transform exponent, 1/T (default 0.2).
""" + _COMMON_DOC


def fused_linear_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                         teacher_weight: torch.Tensor, target: Optional[torch.Tensor] = None, *,
                         student_bias: Optional[torch.Tensor] = None, teacher_bias: Optional[torch.Tensor] = None,
                         temperature: float = DEFAULT_TEMPERATURE, beta: float = 1.0, ce_weight: float = 1.0,
                         ignore_index: int = -100, reduction: str = "mean", chunk_size: Optional[int] = None,
                         vocab_mismatch: str = "error", backend: str = "auto", return_components: bool = False,
                         num_items_in_batch=None, softcap: Optional[float] = None, logit_scale: float = 1.0,
                         jsd_beta: float = 0.0, teacher_softcap: Optional[float] | str = AS_STUDENT,
                         teacher_logit_scale: float | str = AS_STUDENT,
                         process_group=None, reduce_hidden_grad: bool = True, vocab_size: Optional[int] = None):
    spec = specs.kd(temperature, beta=beta, ce_weight=ce_weight, ignore_index=ignore_index, softcap=softcap,
                    logit_scale=logit_scale, jsd_beta=jsd_beta, teacher_softcap=teacher_softcap,
                    teacher_logit_scale=teacher_logit_scale)
    return _fused_linear_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, target, spec,
                              student_bias=student_bias, teacher_bias=teacher_bias, reduction=reduction,
                              chunk_size=chunk_size, vocab_mismatch=vocab_mismatch, backend=backend,
                              return_components=return_components, num_items_in_batch=num_items_in_batch,
                              process_group=process_group, reduce_hidden_grad=reduce_hidden_grad,
                              vocab_size=vocab_size)


fused_linear_kd_loss.__doc__ = """``fused_kd_loss`` (Hinton KD, T^2 factor) on the LM-head outputs, chunked.

    temperature: T (default 4).
""" + _COMMON_DOC


class _LinearDistillLoss(nn.Module):
    _loss_fn = None
    _scale_name = ""

    def __init__(self, scale: float, *, beta: float = 1.0, ce_weight: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", chunk_size: Optional[int] = None, vocab_mismatch: str = "error",
                 backend: str = "auto", softcap: Optional[float] = None, logit_scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.beta = beta
        self.ce_weight = ce_weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.vocab_mismatch = vocab_mismatch
        self.backend = backend
        self.softcap = softcap
        self.logit_scale = logit_scale

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_weight: torch.Tensor, target: Optional[torch.Tensor] = None, *,
                student_bias: Optional[torch.Tensor] = None, teacher_bias: Optional[torch.Tensor] = None,
                return_components: bool = False, num_items_in_batch=None):
        return type(self)._loss_fn(
            student_hidden, student_weight, teacher_hidden, teacher_weight, target, student_bias=student_bias,
            teacher_bias=teacher_bias, **{self._scale_name: self.scale}, beta=self.beta, ce_weight=self.ce_weight,
            ignore_index=self.ignore_index, reduction=self.reduction, chunk_size=self.chunk_size,
            vocab_mismatch=self.vocab_mismatch, backend=self.backend, return_components=return_components,
            num_items_in_batch=num_items_in_batch, softcap=self.softcap, logit_scale=self.logit_scale,
            **self._loss_options())

    def _loss_options(self) -> dict:
        """The keyword arguments only this family member's function takes."""
        return {}

    def extra_repr(self) -> str:
        return (f"{self._scale_name}={self.scale}, beta={self.beta}, ce_weight={self.ce_weight}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, chunk_size={self.chunk_size}, "
                f"vocab_mismatch={self.vocab_mismatch!r}, backend={self.backend!r}, softcap={self.softcap}, "
                f"logit_scale={self.logit_scale}")


class LinearWTTMLoss(_LinearDistillLoss):
    """Module form of :func:`fused_linear_wttm_loss`; ``forward(student_hidden, student_weight, teacher_hidden,
    teacher_weight, target=None, *, student_bias=None, teacher_bias=None, return_components=False,
    num_items_in_batch=None)``. ``weight_norm``: see ``fused_linear_wttm_loss``."""

    _loss_fn = fused_linear_wttm_loss
    _scale_name = "gamma"

    def __init__(self, gamma: float = DEFAULT_GAMMA, *, weight_norm: str = "none", **kwargs):
        super().__init__(gamma, **kwargs)
        self.weight_norm = check_weight_norm(weight_norm)

    def _loss_options(self) -> dict:
        return {"weight_norm": self.weight_norm}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_norm={self.weight_norm!r}"


class LinearTTMLoss(_LinearDistillLoss):
    """Module form of :func:`fused_linear_ttm_loss`."""

    _loss_fn = fused_linear_ttm_loss
    _scale_name = "gamma"

    def __init__(self, gamma: float = DEFAULT_GAMMA, **kwargs):
        super().__init__(gamma, **kwargs)


class LinearKDLoss(_LinearDistillLoss):
    """Module form of :func:`fused_linear_kd_loss`."""

    _loss_fn = fused_linear_kd_loss
    _scale_name = "temperature"

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, **kwargs):
        super().__init__(temperature, **kwargs)
