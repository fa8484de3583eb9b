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
    statistics (``merge``, given every piece's partials concatenated on the last dimension, in any order),
    each piece's second pass (``second_pass``: its sums, ``_stats.PieceSum``, and given ``grad`` its gradient),
    then the KL, DIV_GRAD, entropy and loss from the pieces' sums (``finish``); the reverse KL's and the JSD's
    gradient needs the finished DIV_GRAD, so there the gradient is a second call of ``second_pass`` after
    ``finish`` (``gradient_needs_sums``). Arguments are normalised as for the whole-row ops; ``params``
    as ``_params`` makes them; ``vocab`` is the whole row's width, ``col_offset`` a piece's first column."""

    def __init__(self, backend: str, params: dict, weighted: bool, vocab: int):
        self.kernels = _kernels(backend)
        self.params, self.weighted, self.vocab = params, weighted, vocab

    def partial(self, student, teacher, target, col_offset: int, chunk_v: Optional[int] = None) -> torch.Tensor:
        """``chunk_v``: columns per piece of the output (Triton; the C++ kernel gives one piece per row), e.g.
        the width here for exactly one piece, as the ranks of a process group exchange them."""
        student, teacher, target = _kernel_rows(student, teacher, target)
        return self.kernels.partial(student, teacher, target, weighted=self.weighted, col_offset=col_offset,
                                    chunk_v=chunk_v, **self.params)

    def merge(self, partials, target) -> torch.Tensor:
        return self.kernels.merge(partials, _target_rows(target), weighted=self.weighted, vocab=self.vocab,
                                  **self.params)

    def second_pass(self, student, teacher, target, stats, col_offset: int, grad=None, row_grad=None):
        student, teacher, target = _kernel_rows(student, teacher, target)
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


@torch.library.custom_op("ttm_kernels::loss_fwd", mutates_args=())
def loss_fwd(student: torch.Tensor, teacher: torch.Tensor, target: Optional[torch.Tensor],
             student_scale: float, teacher_scale: float, kl_coef: float, ce_weight: float, weighted: bool,
             ignore_index: int, jsd_beta: float, backend: str) -> torch.Tensor:
    """(NUM_STATS, N) fp32 statistics per row: loss, kl, ce, weight, then what the backward needs."""
    return _forward(backend, student, teacher, target,
                    _params(student_scale, teacher_scale, kl_coef, ce_weight, ignore_index, jsd_beta),
                    weighted=weighted)


@loss_fwd.register_fake
def _(student, teacher, target, student_scale, teacher_scale, kl_coef, ce_weight, weighted, ignore_index,
      jsd_beta, backend):
    return student.new_empty((NUM_STATS, student[..., 0].numel()), dtype=torch.float32)


@torch.library.custom_op("ttm_kernels::loss_bwd", mutates_args=())
def loss_bwd(row_grad: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, target: Optional[torch.Tensor],
             stats: torch.Tensor, student_scale: float, teacher_scale: float, kl_coef: float, ce_weight: float,
             ignore_index: int, jsd_beta: float, backend: str) -> torch.Tensor:
    """d(sum_i row_grad_i * loss_i) / d student, in the student's dtype and shape (contiguous)."""
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    _backward_into(grad, row_grad, student, teacher, target, stats,
                   _params(student_scale, teacher_scale, kl_coef, ce_weight, ignore_index, jsd_beta), backend)
    return grad


@loss_bwd.register_fake
def _(row_grad, student, teacher, target, stats, student_scale, teacher_scale, kl_coef, ce_weight, ignore_index,
      jsd_beta, backend):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _own_rows(student: torch.Tensor, what: str) -> torch.Tensor:
    """The (B, T, V) view of ``student`` that a kernel may overwrite: its own storage, never a copy."""
    view = row_view(student)
    if view.data_ptr() != student.data_ptr():
        raise ValueError(f"{what} needs a tensor whose last dimension is contiguous")
    return view


@torch.library.custom_op("ttm_kernels::loss_bwd_inplace", mutates_args=("student",))
def loss_bwd_inplace(row_grad: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                     target: Optional[torch.Tensor], stats: torch.Tensor, student_scale: float,
                     teacher_scale: float, kl_coef: float, ce_weight: float, ignore_index: int, jsd_beta: float,
                     backend: str) -> None:
    """Like ``loss_bwd``, but overwrites the student logits with their gradient (one row at a time, each
    row read in full before it is written)."""
    _backward_into(student, row_grad, student, teacher, target, stats,
                   _params(student_scale, teacher_scale, kl_coef, ce_weight, ignore_index, jsd_beta), backend)


@torch.library.custom_op("ttm_kernels::loss_fwd_grad_inplace", mutates_args=("student",))
def loss_fwd_grad_inplace(student: torch.Tensor, teacher: torch.Tensor, target: Optional[torch.Tensor],
                          row_grad: torch.Tensor, student_scale: float, teacher_scale: float, kl_coef: float,
                          ce_weight: float, weighted: bool, ignore_index: int, jsd_beta: float,
                          backend: str) -> torch.Tensor:
    """Forward and gradient in one launch: returns the statistics and overwrites ``student`` with
    d(sum_i row_grad_i * loss_i)/dz (``row_grad``: (N,) or a 0-dim scalar for every row). For callers that
    own the logits buffer, such as the fused linear loss."""
    return _forward(backend, student, teacher, target,
                    _params(student_scale, teacher_scale, kl_coef, ce_weight, ignore_index, jsd_beta),
                    weighted=weighted,
                    grad=student, row_grad=row_grad)


@loss_fwd_grad_inplace.register_fake
def _(student, teacher, target, row_grad, student_scale, teacher_scale, kl_coef, ce_weight, weighted,
      ignore_index, jsd_beta, backend):
    return student.new_empty((NUM_STATS, student[..., 0].numel()), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    student, teacher, target, student_scale, teacher_scale, kl_coef, ce_weight, _weighted, *rest = inputs
    ctx.params = (student_scale, teacher_scale, kl_coef, ce_weight, *rest)  # ignore_index, jsd_beta, backend
    ctx.inplace = False
    ctx.save_for_backward(student, teacher, target, output)


def _backward(ctx, grad_stats):
    refuse_higher_order()
    student, teacher, target, stats = ctx.saved_tensors
    if grad_stats is None:
        grad_stats = torch.zeros_like(stats)
    row_grad = grad_stats[Stat.LOSS]
    if ctx.inplace:
        loss_bwd_inplace(row_grad, student, teacher, target, stats, *ctx.params)
        grad = student
    else:
        grad = loss_bwd(row_grad, student, teacher, target, stats, *ctx.params)
    return grad, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("ttm_kernels::loss_fwd", _backward, setup_context=_setup_context)


class _InplaceLoss(torch.autograd.Function):
    """``loss_fwd`` with a backward that writes the gradient into the student logits' own storage."""

    @staticmethod
    def forward(ctx, student, teacher, target, *params):
        stats = loss_fwd(student, teacher, target, *params)
        _setup_context(ctx, (student, teacher, target, *params), stats)
        ctx.inplace = True
        return stats

    @staticmethod
    def backward(ctx, grad_stats):
        return _backward(ctx, grad_stats)


@torch.library.custom_op("ttm_kernels::loss_fwd_with_grad", mutates_args=())
def loss_fwd_with_grad(student: torch.Tensor, teacher: torch.Tensor, target: Optional[torch.Tensor],
                       row_grad: torch.Tensor, student_scale: float, teacher_scale: float, kl_coef: float,
                       ce_weight: float, weighted: bool, ignore_index: int, jsd_beta: float,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss = sum_i row_grad * loss_i, statistics, d loss / d student) from one launch; row_grad is 0-dim."""
    return _loss_with_grad(student, teacher, target, row_grad, student_scale, teacher_scale, kl_coef, ce_weight,
                           weighted, ignore_index, jsd_beta, backend)


def _loss_with_grad(student, teacher, target, row_grad, student_scale, teacher_scale, kl_coef, ce_weight, weighted,
                    ignore_index, jsd_beta, backend):
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    stats = _forward(backend, student, teacher, target,
                     _params(student_scale, teacher_scale, kl_coef, ce_weight, ignore_index, jsd_beta),
                     weighted=weighted,
                     grad=grad, row_grad=row_grad)
    return stats[Stat.LOSS].sum() * row_grad, stats, grad


@loss_fwd_with_grad.register_fake
def _(student, teacher, target, row_grad, student_scale, teacher_scale, kl_coef, ce_weight, weighted,
      ignore_index, jsd_beta, backend):
    stats = student.new_empty((NUM_STATS, student[..., 0].numel()), dtype=torch.float32)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    return row_grad.new_empty(()), stats, grad


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


def _with_grad_setup_context(ctx, inputs, output):
    # Without this autograd would fill an (N, V) zero tensor for the unused gradient output.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _with_grad_backward(ctx, grad_loss, _grad_stats, _grad_grad):
    refuse_higher_order()
    if grad_loss is None:
        return (None,) * 12
    # A second backward (retain_graph=True) is refused by autograd's version check on the saved gradient.
    (grad,) = ctx.saved_tensors
    (_scale_grad if _eager(grad, grad_loss) else scale_grad_)(grad, grad_loss)
    return grad, None, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("ttm_kernels::loss_fwd_with_grad", _with_grad_backward,
                                setup_context=_with_grad_setup_context)


class _InplaceLossWithGrad(torch.autograd.Function):
    """``loss_fwd_with_grad`` writing the gradient into the student logits' storage during the forward."""

    @staticmethod
    def forward(ctx, student, teacher, target, row_grad, *params):
        stats = loss_fwd_grad_inplace(student, teacher, target, row_grad, *params)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(student)
        ctx.mark_non_differentiable(stats)
        return stats[Stat.LOSS].sum() * row_grad, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        return _with_grad_backward(ctx, grad_loss, None, None)


def _eager(student: torch.Tensor, teacher: torch.Tensor) -> bool:
    """Whether the kernels may run without the custom ops' dispatch, which costs about 0.1 ms of Python a call:
    in eager mode on plain tensors, with no function or dispatch mode and no torch.func transform active.
    torch.compile, export, fake tensors and subclasses take the custom ops, which they know how to trace."""
    return (type(student) is torch.Tensor and type(teacher) is torch.Tensor and not torch.compiler.is_compiling()
            and not torch._C._is_torch_function_mode_enabled() and torch._C._len_torch_dispatch_stack() == 0
            and torch._C._functorch.peek_interpreter_stack() is None)


class _EagerLossWithGrad(torch.autograd.Function):
    """``loss_fwd_with_grad`` and its backward in eager mode, minus the custom op's dispatch. The parameters
    come as one tuple: ``apply`` walks its arguments, a few microseconds each."""

    @staticmethod
    def forward(ctx, student, teacher, target, row_grad, params):
        loss, stats, grad = _loss_with_grad(student, teacher, target, row_grad, *params)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        return _with_grad_backward(ctx, grad_loss, None, None)[:5]  # the student's gradient, then Nones


def fused_loss(student, teacher, target, denominator, *, reduction, student_scale, teacher_scale, kl_coef,
               ce_weight, weighted, ignore_index, jsd_beta, backend, inplace_backward=False):
    """The reduced loss (float32) and the (NUM_STATS, N) statistics (rows loss, kl, ce, weight detached).
    ``denominator``: the 0-dim float32 divisor of reduction "mean" (``functional.mean_denominator``)."""
    params = (float(student_scale), float(teacher_scale), float(kl_coef), float(ce_weight), bool(weighted),
              int(ignore_index), float(jsd_beta), backend)
    eager = _eager(student, teacher)
    with_grad = student.requires_grad and torch.is_grad_enabled()
    if reduction != "none" and with_grad:
        if reduction == "mean":
            row_grad = denominator.reciprocal()
        else:
            row_grad = torch.ones((), dtype=torch.float32, device=student.device)
        if inplace_backward:
            loss, stats = _InplaceLossWithGrad.apply(student, teacher, target, row_grad, *params)
        elif eager:
            loss, stats = _EagerLossWithGrad.apply(student, teacher, target, row_grad, params)
        else:
            loss, stats, _ = loss_fwd_with_grad(student, teacher, target, row_grad, *params)
        return loss, stats
    if inplace_backward:
        stats = _InplaceLoss.apply(student, teacher, target, *params)
    elif eager and not with_grad:
        stats = _forward(backend, student, teacher, target,
                         _params(student_scale, teacher_scale, kl_coef, ce_weight, ignore_index, jsd_beta),
                         weighted=weighted)
    else:
        stats = loss_fwd(student, teacher, target, *params)
    rows = stats[Stat.LOSS].view(student.shape[:-1])
    if reduction == "none":
        return rows, stats
    total = rows.sum()
    return (total / denominator if reduction == "mean" else total), stats
