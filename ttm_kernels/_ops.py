"""Backend dispatch and the ``torch.library`` ops that autograd and ``torch.compile`` see.

Every compiled backend module (``triton_kernels``, ``cpu_kernels``) offers the same functions, on the
arguments that ``_kernel_rows`` and ``_row_grad_rows`` normalise (the one place that does): (B, T, V) row
views of the logits (see ``_rows.row_view``), a contiguous int64 (N,) target, a contiguous fp32 (N,) or 0-dim
upstream gradient:

    forward(student, teacher, target, *, student_scale, teacher_scale, kl_coef, ce_weight, weighted,
            ignore_index, grad=None, row_grad=None) -> stats (NUM_STATS, N) fp32 (rows: ``_stats.Stat``)
    backward(row_grad, student, teacher, target, stats, grad, *, student_scale, teacher_scale, kl_coef,
             ce_weight, ignore_index) -> None   (writes the gradient into ``grad``)
    partial / merge / pieces / finish: the same loss of rows held in column pieces (see ``RowPieces``)

and the top-k teacher's kernels (``triton_topk``, ``cpu_kernels``) ``topk_forward`` / ``topk_backward`` (see
``_topk_ops``). The four ops below take either teacher form, so dense and top-k losses share one autograd.

Every backward refuses to build a graph for higher-order gradients (``refuse_higher_order``): the kernels'
gradients are not differentiable, and dropping the second-order terms silently would be a wrong answer.

Two autograd paths, each allocating one (N, V) tensor in all, the gradient (none with ``inplace_backward``):

* reduction "mean"/"sum" with a student that needs a gradient: the forward launch also writes the gradient
  (the row's second read comes from cache, not memory), scaled by the reduction's 1/N; only that gradient
  is kept, so the teacher logits can be freed right after the forward. The backward multiplies it in
  place by the upstream gradient, a no-op when that is 1.
* otherwise ("none", whose per-row upstream gradients arrive only in the backward): the forward saves the
  (NUM_STATS, N) statistics and the inputs; the backward recomputes the probabilities from them.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Optional

import torch

from ._rows import row_view
from ._stats import NUM_STATS, Stat

BACKENDS = ("auto", "triton", "cpu", "torch")
HIGHER_ORDER_ERROR = (
    "ttm_kernels: the fused backends compute first-order gradients only, and this backward was asked to "
    "build a graph for higher-order ones (create_graph=True, e.g. a gradient penalty, a Hessian-vector "
    "product or gradgradcheck). Pass backend='torch': the unfused reference is differentiable to any order.")


@functools.cache
def _load(module: str):
    try:
        return importlib.import_module(f"ttm_kernels.{module}"), None
    except (ImportError, OSError, RuntimeError) as exc:
        return None, exc


# torch.compile calls these once while tracing and keeps their answers as constants.
@torch.compiler.assume_constant_result
def triton_available() -> bool:
    return _load("triton_kernels")[0] is not None


@torch.compiler.assume_constant_result
def cpu_extension_available() -> bool:
    return _load("cpu_kernels")[0] is not None


@torch.compiler.assume_constant_result
def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _warn_unfused(device_type: str) -> None:
    missing = "triton" if device_type == "cuda" else "the compiled extension ttm_kernels._C (pip install -e .)"
    warnings.warn(f"ttm_kernels: {missing} is not available, so backend='auto' runs the unfused PyTorch "
                  f"reference on {device_type} tensors", RuntimeWarning, stacklevel=4)


def resolve_backend(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """The concrete backend ("triton", "cpu" or "torch") that ``backend`` runs for student logits of ``dtype``
    on ``device``, or a clear error when it cannot run there.

    The compiled kernels compute in float32; float64 logits (gradcheck, numerical studies) are computed in
    float64 by the reference, which "auto" picks for them and which an explicit compiled backend refuses to
    stand in for."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if dtype == torch.float64:
        if backend in ("triton", "cpu"):
            raise ValueError(f"backend={backend!r} computes in float32, and float64 inputs ask for float64: pass "
                             "backend='auto' or 'torch' (the reference computes float64 in float64, e.g. for "
                             "torch.autograd.gradcheck), or float32 inputs")
        return "torch"
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cpu" and cpu_extension_available():
            return "cpu"
        if device.type in ("cuda", "cpu"):
            _warn_unfused(device.type)
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package, which failed to import: "
                               f"{_load('triton_kernels')[1]}")
        if device.type == "cpu" and not triton_interpreted():
            raise ValueError("backend='triton' got CPU tensors: move them to CUDA, or set TRITON_INTERPRET=1 "
                             "before importing triton to run the kernels in the interpreter")
    if backend == "cpu":
        if not cpu_extension_available():
            raise RuntimeError("backend='cpu' needs the compiled extension ttm_kernels._C, which failed to "
                               f"load ({_load('cpu_kernels')[1]}); reinstall with `pip install -e .`")
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' got tensors on {device}; use backend='auto' or move them to the CPU")
    return backend


def _kernels(backend: str):
    return _load("triton_kernels" if backend == "triton" else "cpu_kernels")[0]


def _kernel_rows(student, teacher, target):
    """The one place where the kernels' arguments are normalised, so that no kernel has to honour a stride it
    was not written for: logits as (B, T, V) row views (a copy only for layouts no two strides describe),
    the target as a contiguous int64 (N,) (``_target_rows``)."""
    return row_view(student), row_view(teacher), _target_rows(target)


def _target_rows(target: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The target as a contiguous int64 (N,), from any integer dtype and any layout (strided, expanded,
    transposed)."""
    return None if target is None else target.reshape(-1).to(torch.int64).contiguous()


def _row_grad_rows(row_grad: torch.Tensor) -> torch.Tensor:
    """The upstream gradient of each row's loss: a contiguous fp32 (N,), or a 0-dim scalar for every row."""
    return row_grad.to(torch.float32).contiguous()


def _own_rows(student: torch.Tensor, what: str) -> torch.Tensor:
    """The (B, T, V) view of ``student`` that a kernel may overwrite: its own storage, never a copy."""
    view = row_view(student)
    if view.data_ptr() != student.data_ptr():
        raise ValueError(f"{what} needs a tensor whose last dimension is contiguous")
    return view


def _params(student_scale, teacher_scale, kl_coef, ce_weight, ignore_index, jsd_beta):
    return dict(student_scale=student_scale, teacher_scale=teacher_scale, kl_coef=kl_coef, ce_weight=ce_weight,
                ignore_index=ignore_index, jsd_beta=jsd_beta)


def _forward(backend, student, teacher, target, params, *, weighted, grad=None, row_grad=None):
    """The statistics (NUM_STATS, N) of ``backend``'s kernel; with ``grad`` (a (B, T, V) view) also the
    gradient of sum_i row_grad_i * loss_i, written into it."""
    student, teacher, target = _kernel_rows(student, teacher, target)
    if grad is not None:
        grad, row_grad = _own_rows(grad, "the gradient"), _row_grad_rows(row_grad)
    return _kernels(backend).forward(student, teacher, target, weighted=weighted, grad=grad, row_grad=row_grad,
                                     **params)


def _backward_into(grad, row_grad, student, teacher, target, stats, params, backend):
    """Writes the gradient of sum_i row_grad_i * loss_i into ``grad`` (its own storage), from the statistics."""
    student, teacher, target = _kernel_rows(student, teacher, target)
    _kernels(backend).backward(_row_grad_rows(row_grad), student, teacher, target, stats.contiguous(),
                               _own_rows(grad, "the gradient"), **params)


class RowPieces:
    """The loss of rows held in pieces (column ranges: the pieces of a split row, the vocabulary shards of
    ranks), with ``backend``'s kernels: each piece's online sums (``partial``), merged into the rows'
    statistics (``merge``, given every piece's partials concatenated on the last dimension, in any order, and the
    teacher, which the dense merge does not read: ``_topk_ops.TopkPieces``' does),
    each piece's second pass (``second_pass``: its sums, ``_stats.PieceSum``, and given ``grad`` its gradient),
    then the KL, DIV_GRAD, entropy and loss from the pieces' sums (``finish``); the reverse KL's and the JSD's
    gradient needs the finished DIV_GRAD, so there the gradient is a second call of ``second_pass`` after
    ``finish`` (``gradient_needs_sums``). The teacher is a list, as the ops take it: ``[logits]`` of the piece's
    columns. Arguments are normalised as for the whole-row ops; ``params`` as ``_params`` makes them; ``vocab``
    is the whole row's width, ``col_offset`` a piece's first column."""

    def __init__(self, backend: str, params: dict, weighted: bool, vocab: int):
        self.kernels = _kernels(backend)
        self.params, self.weighted, self.vocab = params, weighted, vocab

    def partial(self, student, teacher, target, col_offset: int, chunk_v: Optional[int] = None) -> torch.Tensor:
        """``chunk_v``: columns per piece of the output (Triton; the C++ kernel gives one piece per row), e.g.
        the width here for exactly one piece, as the ranks of a process group exchange them."""
        student, teacher, target = _kernel_rows(student, teacher[0], target)
        return self.kernels.partial(student, teacher, target, weighted=self.weighted, col_offset=col_offset,
                                    chunk_v=chunk_v, **self.params)

    has_piece_sums = True  # the loss needs every piece's second pass (``second_pass``' sums, ``finish``)

    def merge(self, partials, teacher, target) -> torch.Tensor:
        return self.kernels.merge(partials, _target_rows(target), weighted=self.weighted, vocab=self.vocab,
                                  **self.params)

    def second_pass(self, student, teacher, target, stats, col_offset: int, grad=None, row_grad=None):
        student, teacher, target = _kernel_rows(student, teacher[0], target)
        if grad is not None:
            grad, row_grad = _own_rows(grad, "the gradient"), _row_grad_rows(row_grad)
        return self.kernels.pieces(student, teacher, target, stats, col_offset=col_offset, vocab=self.vocab,
                                   grad=grad, row_grad=row_grad, **self.params)

    @property
    def gradient_needs_sums(self) -> bool:
        """Whether the gradient pass needs the rows' finished sums (the reverse KL, the JSD)."""
        return self.params["jsd_beta"] != 0.0

    def finish(self, stats, sums) -> None:
        self.kernels.finish(stats, sums, **self.params)


def refuse_higher_order() -> None:
    """Called first in every backward of a fused op: autograd runs a backward with grad mode on exactly when
    it builds a graph for higher-order gradients, which the kernels' gradients cannot carry."""
    if torch.is_grad_enabled():
        raise RuntimeError(HIGHER_ORDER_ERROR)


# ------------------------------------------------------------------------------------------ teacher forms
# The ops below take the teacher as a list of tensors and its form: "dense" [logits (..., V)], or a top-k teacher
# [ids, log-probabilities] ((N, k) each, as ``_topk_ops.topk_rows`` sorts them) with its tail ("topk_bucket",
# "topk_renormalize"). The loss's scalars travel as one list, ``scales``: (student_scale, teacher_scale, kl_coef,
# ce_weight, jsd_beta).
FORMS = ("dense", "topk_bucket", "topk_renormalize")


def _topk_kernels(backend: str):
    return _load("triton_topk" if backend == "triton" else "cpu_kernels")[0]


def _launch_forward(backend, form, student, teacher, target, scales, weighted, ignore_index, grad=None,
                    row_grad=None):
    """The statistics (NUM_STATS, N) of ``backend``'s kernel of ``form``; with ``grad`` (the student's shape, its
    own storage, possibly the student itself) also the gradient of sum_i row_grad_i * loss_i, written into it."""
    student_scale, teacher_scale, kl_coef, ce_weight, jsd_beta = scales
    if form == "dense":
        return _forward(backend, student, teacher[0], target,
                        _params(student_scale, teacher_scale, kl_coef, ce_weight, ignore_index, jsd_beta),
                        weighted=weighted, grad=grad, row_grad=row_grad)
    if grad is not None:
        grad, row_grad = _own_rows(grad, "the gradient"), _row_grad_rows(row_grad)
    ids, logprobs = teacher
    return _topk_kernels(backend).topk_forward(
        row_view(student), ids, logprobs, _target_rows(target), weighted=weighted, grad=grad, row_grad=row_grad,
        student_scale=student_scale, teacher_scale=teacher_scale, kl_coef=kl_coef, ce_weight=ce_weight,
        bucket=form == "topk_bucket", ignore_index=ignore_index, jsd_beta=jsd_beta)


def _launch_backward(backend, form, grad, row_grad, student, teacher, target, stats, scales, ignore_index):
    """Writes the gradient of sum_i row_grad_i * loss_i into ``grad`` (its own storage), from the statistics."""
    student_scale, teacher_scale, kl_coef, ce_weight, jsd_beta = scales
    if form == "dense":
        _backward_into(grad, row_grad, student, teacher[0], target, stats,
                       _params(student_scale, teacher_scale, kl_coef, ce_weight, ignore_index, jsd_beta), backend)
        return
    ids, logprobs = teacher
    _topk_kernels(backend).topk_backward(
        _row_grad_rows(row_grad), row_view(student), ids, logprobs, _target_rows(target), stats.contiguous(),
        _own_rows(grad, "the gradient"), student_scale=student_scale, teacher_scale=teacher_scale, kl_coef=kl_coef,
        ce_weight=ce_weight, bucket=form == "topk_bucket", ignore_index=ignore_index, jsd_beta=jsd_beta)


def _new_stats(student):
    return student.new_empty((NUM_STATS, student[..., 0].numel()), dtype=torch.float32)


def _new_grad(student):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


# ------------------------------------------------------------------------------------------ the four ops
# loss_fwd (functional, with autograd): the statistics, and with row_grad the gradient in the same launch.
# loss_bwd (functional): the gradient from the statistics (the backward of "none").
# loss_into_student_ (mutating): either of them writing the gradient into the student's own storage (the
#   in-place backward, and the fused linear loss's chunk buffer).
# scale_grad_ (mutating): the backward of the gradient computed in the forward.


@torch.library.custom_op("ttm_kernels::loss_fwd", mutates_args=())
def loss_fwd(student: torch.Tensor, teacher: list[torch.Tensor], target: Optional[torch.Tensor],
             row_grad: Optional[torch.Tensor], scales: list[float], weighted: bool, ignore_index: int, form: str,
             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, statistics, gradient). Without ``row_grad``: the (NUM_STATS, N) fp32 statistics per row (loss, kl,
    ce, weight, then what the backward needs), and an empty loss and gradient. With ``row_grad`` (0-dim): also
    loss = sum_i row_grad * loss_i and d loss / d student (the student's dtype and shape) from the same launch."""
    if row_grad is None:
        stats = _launch_forward(backend, form, student, teacher, target, scales, weighted, ignore_index)
        return stats.new_empty((0,)), stats, student.new_empty((0,))
    grad = _new_grad(student)
    stats = _launch_forward(backend, form, student, teacher, target, scales, weighted, ignore_index, grad=grad,
                            row_grad=row_grad)
    return stats[Stat.LOSS].sum() * row_grad, stats, grad


@loss_fwd.register_fake
def _(student, teacher, target, row_grad, scales, weighted, ignore_index, form, backend):
    if row_grad is None:
        return student.new_empty((0,), dtype=torch.float32), _new_stats(student), student.new_empty((0,))
    return row_grad.new_empty(()), _new_stats(student), torch.empty_like(student, memory_format=torch.contiguous_format)


@torch.library.custom_op("ttm_kernels::loss_bwd", mutates_args=())
def loss_bwd(row_grad: torch.Tensor, student: torch.Tensor, teacher: list[torch.Tensor],
             target: Optional[torch.Tensor], stats: torch.Tensor, scales: list[float], ignore_index: int, form: str,
             backend: str) -> torch.Tensor:
    """d(sum_i row_grad_i * loss_i) / d student, in the student's dtype and shape (contiguous)."""
    grad = _new_grad(student)
    _launch_backward(backend, form, grad, row_grad, student, teacher, target, stats, scales, ignore_index)
    return grad


@loss_bwd.register_fake
def _(row_grad, student, teacher, target, stats, scales, ignore_index, form, backend):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


@torch.library.custom_op("ttm_kernels::loss_into_student_", mutates_args=("student",))
def loss_into_student_(student: torch.Tensor, teacher: list[torch.Tensor], target: Optional[torch.Tensor],
                       row_grad: torch.Tensor, stats: Optional[torch.Tensor], scales: list[float], weighted: bool,
                       ignore_index: int, form: str, backend: str) -> torch.Tensor:
    """Overwrites ``student`` with d(sum_i row_grad_i * loss_i)/dz (``row_grad``: (N,) or a 0-dim scalar for every
    row; each row read in full before it is written). Without ``stats``, the forward's launch, which returns the
    statistics; given the statistics (a backward), returns an empty tensor. For callers that own the logits
    buffer: ``inplace_backward``, the fused linear loss's chunks."""
    if stats is None:
        return _launch_forward(backend, form, student, teacher, target, scales, weighted, ignore_index,
                               grad=_own_rows(student, "the student"), row_grad=row_grad)
    _launch_backward(backend, form, student, row_grad, student, teacher, target, stats, scales, ignore_index)
    return stats.new_empty((0,))


@loss_into_student_.register_fake
def _(student, teacher, target, row_grad, stats, scales, weighted, ignore_index, form, backend):
    return _new_stats(student) if stats is None else student.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("ttm_kernels::scale_grad_", mutates_args=("grad",))
def scale_grad_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad *= scale in place; skipped (no pass over the gradient) when scale is 1, the usual case. On CUDA
    a kernel reads the scale on the device, so the host does not wait for it."""
    _scale_grad(grad, scale)


def _scale_grad(grad, scale):
    if grad.is_cuda and grad.is_contiguous() and triton_available():
        _kernels("triton").scale_(grad, scale.float())
    elif scale.item() != 1:  # the value itself: no comparison op before the read
        grad.mul_(scale)


# ------------------------------------------------------------------------------------------ autograd
def _no_grads(n_teacher: int) -> tuple:
    """The gradients of loss_fwd's inputs after the student: none, in their structure (the teacher a list)."""
    return ([None] * n_teacher,) + (None,) * 7


def _setup_context(ctx, inputs, output):
    student, teacher, target, row_grad, scales, _weighted, ignore_index, form, backend = inputs
    _loss, stats, grad = output
    # Without this autograd would fill an (N, V) zero tensor for the unused gradient output.
    ctx.set_materialize_grads(False)
    ctx.with_grad = row_grad is not None
    ctx.n_teacher = len(teacher)
    ctx.mark_non_differentiable(grad)
    if ctx.with_grad:
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(grad)
    else:
        ctx.params = (scales, ignore_index, form, backend)
        ctx.save_for_backward(student, target, stats, *teacher)


def _backward(ctx, grad_loss, grad_stats, _grad_grad):
    refuse_higher_order()
    if ctx.with_grad:
        if grad_loss is None:
            return (None,) + _no_grads(ctx.n_teacher)
        # A second backward (retain_graph=True) is refused by autograd's version check on the saved gradient.
        (grad,) = ctx.saved_tensors
        (_scale_grad if _eager(grad, grad_loss) else scale_grad_)(grad, grad_loss)
        return (grad,) + _no_grads(ctx.n_teacher)
    student, target, stats, *teacher = ctx.saved_tensors
    if grad_stats is None:
        grad_stats = torch.zeros_like(stats)
    return (loss_bwd(grad_stats[Stat.LOSS], student, teacher, target, stats, *ctx.params),) + _no_grads(len(teacher))


torch.library.register_autograd("ttm_kernels::loss_fwd", _backward, setup_context=_setup_context)


def _eager(student: torch.Tensor, teacher: torch.Tensor) -> bool:
    """Whether the kernels may run without the custom ops' dispatch, which costs about 0.1 ms of Python a call:
    in eager mode on plain tensors, with no function or dispatch mode and no torch.func transform active.
    torch.compile, export, fake tensors and subclasses take the custom ops, which they know how to trace."""
    return (type(student) is torch.Tensor and type(teacher) is torch.Tensor and not torch.compiler.is_compiling()
            and not torch._C._is_torch_function_mode_enabled() and torch._C._len_torch_dispatch_stack() == 0
            and torch._C._functorch.peek_interpreter_stack() is None)


class _LossWithGrad(torch.autograd.Function):
    """The gradient computed in the forward's launch and scaled in the backward, as ``loss_fwd`` with ``row_grad``
    does, for two callers: eager mode minus the custom op's dispatch (``into_student`` False: a new gradient
    tensor, the kernels called directly), and ``inplace_backward`` with "mean"/"sum" (``into_student``: the
    gradient written into the student logits' own storage, through ``loss_into_student_``). The parameters come
    as one tuple: ``apply`` walks its arguments, a few microseconds each."""

    @staticmethod
    def forward(ctx, student, row_grad, args, into_student):
        teacher, target, scales, weighted, ignore_index, form, backend = args
        if into_student:
            grad = student
            stats = loss_into_student_(student, teacher, target, row_grad, None, scales, weighted, ignore_index,
                                       form, backend)
        else:
            grad = _new_grad(student)
            stats = _launch_forward(backend, form, student, teacher, target, scales, weighted, ignore_index,
                                    grad=grad, row_grad=row_grad)
        ctx.set_materialize_grads(False)
        ctx.with_grad, ctx.n_teacher = True, len(teacher)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(stats)
        return stats[Stat.LOSS].sum() * row_grad, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        return _backward(ctx, grad_loss, None, None)[0], None, None, None


class _InplaceLoss(torch.autograd.Function):
    """``inplace_backward`` with "none": the forward saves the statistics, the backward writes the gradient into
    the student logits' own storage."""

    @staticmethod
    def forward(ctx, student, args):
        teacher, target, scales, weighted, ignore_index, form, backend = args
        _, stats, _ = loss_fwd(student, teacher, target, None, scales, weighted, ignore_index, form, backend)
        ctx.params = (scales, weighted, ignore_index, form, backend)
        ctx.save_for_backward(student, target, stats, *teacher)
        return stats

    @staticmethod
    def backward(ctx, grad_stats):
        refuse_higher_order()
        student, target, stats, *teacher = ctx.saved_tensors
        loss_into_student_(student, teacher, target, grad_stats[Stat.LOSS], stats, *ctx.params)
        return student, None


def chunk_stats(z, teacher, target, row_grad, scales, weighted, ignore_index, form, backend):
    """A chunk of the fused linear loss: its statistics, and with ``row_grad`` the gradient written into the chunk
    buffer ``z`` (which the caller owns) in the same launch."""
    if row_grad is None:
        return loss_fwd(z, teacher, target, None, scales, weighted, ignore_index, form, backend)[1]
    return loss_into_student_(z, teacher, target, row_grad, None, scales, weighted, ignore_index, form, backend)


def fused_rows_loss(student, teacher, target, denominator, *, form, reduction, scales, weighted, ignore_index,
                    backend, inplace_backward=False):
    """The reduced loss (float32) and the (NUM_STATS, N) statistics (rows loss, kl, ce, weight detached), of a
    teacher given as ``form`` (see ``FORMS``). ``denominator``: the 0-dim float32 divisor of reduction "mean"
    (``reduction.mean_denominator``)."""
    scales = [float(x) for x in scales]
    weighted, ignore_index = bool(weighted), int(ignore_index)
    args = (teacher, target, scales, weighted, ignore_index, form, backend)
    eager = _eager(student, teacher[0])
    with_grad = student.requires_grad and torch.is_grad_enabled()
    row_grad = None
    if reduction != "none" and with_grad:
        row_grad = (denominator.reciprocal() if reduction == "mean"
                    else torch.ones((), dtype=torch.float32, device=student.device))
    if inplace_backward and row_grad is not None:
        return _LossWithGrad.apply(student, row_grad, args, True)
    if inplace_backward:
        stats = _InplaceLoss.apply(student, args)
    elif row_grad is not None:
        if eager:
            return _LossWithGrad.apply(student, row_grad, args, False)
        loss, stats, _ = loss_fwd(student, *args[:2], row_grad, *args[2:])
        return loss, stats
    elif eager and not with_grad:
        stats = _launch_forward(backend, form, student, teacher, target, scales, weighted, ignore_index)
    else:
        _, stats, _ = loss_fwd(student, *args[:2], None, *args[2:])
    rows = stats[Stat.LOSS].view(student.shape[:-1])
    if reduction == "none":
        return rows, stats
    total = rows.sum()
    return (total / denominator if reduction == "mean" else total), stats
