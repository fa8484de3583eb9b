"""Public functional API: ``fused_wttm_loss``, ``fused_ttm_loss``, ``fused_kd_loss``.

Drop-in for the paper's loss lines::

    loss = fused_wttm_loss(student_logits, teacher_logits, target, gamma=0.2, beta=4.0)

computes ``ce_weight * CE(z, target) + beta * mean_rows(U * KL(softmax(gamma * v) || softmax(z)))`` in one
read of each row, saving only per-row fp32 statistics for the backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import _ops, reference, spec as specs
from ._rows import row_view, rows_overlap
from ._stats import Stat
from .distributed import _local_logits, _settings, agree, exchange_device, is_dtensor, sharded_rows
from .reduction import (REDUCTIONS, LossComponents, components, mean_denominator, valid_rows,
                        validate_num_items)
from .spec import DEFAULT_GAMMA, DEFAULT_TEMPERATURE, LossSpec, check_flag as _check_flag, check_vocab_size

def validate_logits(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (..., V) with V >= 1, got {tuple(x.shape)}")


def validate_options(reduction, ignore_index) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def _validate_inplace(student_logits: torch.Tensor) -> None:
    """``inplace_backward=True`` overwrites the student logits' storage with the gradient: refuse the
    tensors for which that would be wrong (not just unusual)."""
    if student_logits.requires_grad and student_logits.is_leaf:
        raise ValueError("inplace_backward=True would overwrite student_logits, a leaf tensor that requires grad "
                         "(PyTorch refuses in-place operations on such leaves): pass the output of a model, or "
                         "leave inplace_backward=False")
    if student_logits.stride(-1) != 1 and student_logits.shape[-1] > 1:
        raise ValueError("inplace_backward=True needs student_logits whose last dimension is contiguous, got "
                         f"strides {student_logits.stride()}")
    if rows_overlap(row_view(student_logits)):
        raise ValueError("inplace_backward=True needs student_logits with one element per memory location, got an "
                         f"expanded or overlapping tensor (shape {tuple(student_logits.shape)}, strides "
                         f"{student_logits.stride()}): the gradients of the rows that share memory would "
                         "overwrite each other")


def validate_target(target, lead_shape, vocab, device, ignore_index) -> None:
    """Class indices of the leading shape, on ``device``, in [0, vocab) or ``ignore_index``; else a clear error.
    ``vocab=None`` leaves the range to the caller (the vocabulary-parallel losses check it across ranks).

    On the CPU the range check raises a ValueError. On other devices it must not make the host wait for the
    device (one synchronisation per call, and no CUDA graphs), so it is a device-side assertion, as in
    ``F.cross_entropy``: an index out of range fails the next synchronisation with "device-side assert
    triggered". Under torch.compile the range check is left to the kernels, which give such a row a NaN
    loss and a NaN gradient."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor or None, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if target.shape != lead_shape:
        raise ValueError(f"target must have the leading shape of the logits {tuple(lead_shape)}, got "
                         f"{tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"target must be on the logits' device {device}, got {target.device}")
    if torch.compiler.is_compiling() or vocab is None:
        return
    if target.device.type == "cpu" and target.numel():
        # One reduction decides the usual case (no index out of [0, vocab)), ignored rows or not.
        lo, hi = torch.aminmax(target)
        if 0 <= lo.item() and hi.item() < vocab:
            return
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if target.device.type != "cpu":
        torch._assert_async(torch.logical_not(bad.any()), f"target holds class indices outside [0, {vocab}) "
                            f"that are not ignore_index={ignore_index}")
    elif bool(bad.any()):
        raise ValueError(f"target holds class indices outside [0, {vocab}) that are not ignore_index="
                         f"{ignore_index}, e.g. {target[bad].flatten()[0].item()}")


def reference_rows(rows_of, target, vocab, ignore_index) -> dict:
    """``rows_of(target)``, the reference's row dict, with the kernels' contract for a target outside [0, vocab)
    that is not ``ignore_index`` (reachable only where ``validate_target`` leaves the range to the kernels:
    under torch.compile): that row's loss, and so its gradient, is NaN, never a raw index error."""
    if target is None:
        return rows_of(None)
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    rows = rows_of(torch.where(bad, 0, target))
    # A factor, not a torch.where of two branches: the branch not taken would get 0 * NaN in the gradient.
    rows["loss"] = rows["loss"] * torch.where(bad, float("nan"), 1.0).to(rows["loss"].dtype)
    return rows


def head_post(logits: torch.Tensor, head: tuple) -> torch.Tensor:
    """A head's post-processing, ``head = (softcap, logit_scale)`` (a spec's ``student_head`` or
    ``teacher_head``), on logits given as such (the logits forms): ``logit_scale * x``, then ``softcap * tanh(x /
    softcap)``, as out-of-place differentiable operations (one more (N, V) tensor each for the student and a dense
    teacher, plus the tanh that autograd saves). -inf stays -inf."""
    softcap, logit_scale = head
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


class DenseLogits:
    """The dense teacher form of ``logits_loss``: the teacher's (..., V) logits (a rank's columns of them with a
    process group). ``topk.TopkLogits`` is the other form. A form checks itself, post-processes itself, gives the
    kernels their teacher tensors (its ops ``form``) and the reference its rows, and, with a process group, says
    what the ranks must agree on and how its rows' pieces merge."""

    form = "dense"
    fact_names = ("the teacher_logits dtype",)  # what the ranks of a process group agree on (``sharded_facts``)

    def __init__(self, teacher_logits):
        self.logits = teacher_logits

    def post_processed(self, spec: LossSpec) -> "DenseLogits":
        """The teacher head's post-processing applied (anything but floating-point logits is left for the checks
        to name)."""
        x = self.logits
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return DenseLogits(head_post(x, spec.teacher_head))
        return self

    def check(self, student_logits) -> None:
        """The teacher against the (already checked) student logits."""
        teacher_logits = self.logits
        validate_logits("teacher_logits", teacher_logits)
        if student_logits.shape != teacher_logits.shape:
            raise ValueError("student_logits and teacher_logits must have the same shape, got "
                             f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
        if student_logits.device != teacher_logits.device:
            raise ValueError("student_logits and teacher_logits must be on the same device, got "
                             f"{student_logits.device} and {teacher_logits.device}")
        if teacher_logits.requires_grad:
            raise ValueError("teacher_logits requires grad, but the teacher is a constant target here and no "
                             "gradient flows to it: compute it under torch.no_grad() or pass teacher_logits.detach()")

    def kernel_tensors(self, student_logits, target, spec: LossSpec) -> list:
        """The ops' teacher (``_ops``), after the checks that need the student's rows and the target."""
        return [self.logits]

    def resolve_backend(self, backend, device, dtype, spec: LossSpec) -> str:
        return _ops.resolve_backend(backend, device, dtype)

    def reference_rows(self, student, target, spec: LossSpec) -> dict:
        """``reference``'s row dict of the student logits (in the compute dtype) against this teacher."""
        return reference.loss_rows(student, self.logits.to(student.dtype), target, **spec.reference_params())

    # With a process group: the ranks hold column shards of both logits.

    def local(self, student_logits, target, process_group):
        """(student, this form, target, group, place in column order) of a rank: DTensor logits become their local
        shards on the mesh's group (``distributed.local_shards``)."""
        student, teacher, target, group, index = _local_logits(student_logits, self.logits, target, process_group)
        return student, DenseLogits(teacher), target, group, index

    @property
    def tensors(self) -> tuple:
        return (self.logits,)

    def sharded_facts(self, student, target, spec: LossSpec) -> tuple:
        """What the ranks must agree on about this teacher (``fact_names``), after this rank's own checks."""
        self.check(student)
        return (self.logits.dtype,)

    def sharded_backend(self, backend, device, dtype, spec: LossSpec) -> str:
        return _compiled_backend(backend, device, dtype)

    def sharded_loss(self, student, target, spec: LossSpec, shards, backend, **reduce):
        """After the agreement: the loss of the rows whose columns the ranks hold."""
        pieces = _ops.RowPieces(backend, spec.kernel_params(), spec.weighted, shards.vocab)
        return sharded_logits_loss(student, [self.logits], target, pieces, shards, spec, **reduce)


def logits_loss(student_logits, teacher, target, spec: LossSpec, *, reduction, backend, inplace_backward,
                return_components, num_items_in_batch, process_group=None, vocab_size=None):
    """The orchestrator of the losses from logits, for either teacher form (``DenseLogits``, ``topk.TopkLogits``):
    checks, the heads' post-processing, the backend, the mean's denominator, the kernels' ops (or the reference)
    and the components; with a process group (or DTensor logits), ``vocab_parallel_logits_loss``."""
    inplace_backward = _check_flag("inplace_backward", inplace_backward)
    return_components = _check_flag("return_components", return_components)
    if spec.has_head_post:
        if inplace_backward:
            raise ValueError("inplace_backward=True cannot write the gradient into student_logits when softcap or "
                             "logit_scale transforms them first (the loss reads a new tensor): leave one of them")
        # Anything but floating-point logits is left as it is, for the checks to name.
        if isinstance(student_logits, torch.Tensor) and student_logits.is_floating_point():
            student_logits = head_post(student_logits, spec.student_head)
        teacher = teacher.post_processed(spec)
        spec = spec.without_head_post()
    if process_group is not None or (not torch.compiler.is_compiling() and is_dtensor(student_logits)):
        return vocab_parallel_logits_loss(
            student_logits, teacher, target, spec, process_group=process_group, reduction=reduction,
            backend=backend, inplace_backward=inplace_backward, return_components=return_components,
            num_items_in_batch=num_items_in_batch, vocab_size=vocab_size)
    validate_logits("student_logits", student_logits)
    teacher.check(student_logits)
    validate_options(reduction, spec.ignore_index)
    validate_num_items(num_items_in_batch, reduction)
    lead, vocab, device = student_logits.shape[:-1], student_logits.shape[-1], student_logits.device
    check_vocab_size(vocab_size, vocab)
    if target is not None:
        validate_target(target, lead, vocab, device, spec.ignore_index)
    kernel_teacher = teacher.kernel_tensors(student_logits, target, spec)
    spec = spec.at_vocab(vocab)  # the student's vocabulary (see LossSpec)
    backend = teacher.resolve_backend(backend, device, student_logits.dtype, spec)
    if inplace_backward:
        if backend == "torch":
            raise ValueError("inplace_backward=True needs a compiled backend ('triton' or 'cpu'), not 'torch' (the "
                             "reference, which float64 logits and a top-k teacher's jsd_beta != 0 run on)")
        _validate_inplace(student_logits)
    denominator = None
    if reduction == "mean":
        denominator = mean_denominator(target, spec.ignore_index, lead.numel(), device, num_items_in_batch)

    if backend == "torch" or lead.numel() == 0:
        # The kernels' contract: float32 arithmetic (float64 stays float64), a float32 loss, the gradient in
        # the student's dtype (the cast's backward).
        compute = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
        rows = reference_rows(lambda y: teacher.reference_rows(student_logits.to(compute), y, spec), target, vocab,
                              spec.ignore_index)
        loss = rows["loss"] if reduction == "none" else rows["loss"].sum()
        if denominator is not None:
            loss = loss / denominator.to(compute)
        terms = [rows[k] for k in ("kl", "ce", "weight", "entropy")]
    else:
        loss, stats = _ops.fused_rows_loss(student_logits, kernel_teacher, target, denominator, form=teacher.form,
                                           reduction=reduction, scales=spec.kernel_scales, weighted=spec.weighted,
                                           ignore_index=spec.ignore_index, backend=backend,
                                           inplace_backward=inplace_backward)
        terms = None  # views of stats, made only when asked for: each costs a few microseconds

    if not return_components:
        return loss
    if terms is None:
        # The kernels' weight row is U; the factor of weight_norm is folded into their kl_coef.
        terms = [stats[Stat.KL].view(lead), stats[Stat.CE].view(lead),
                 stats[Stat.WEIGHT].view(lead) * spec.weight_factor, stats[Stat.ENTROPY].view(lead)]
    return loss, components(terms, valid_rows(target, lead, device, spec.ignore_index))


# ---------------------------------------------------------------------------------------------- vocabulary-parallel
# Logits whose columns the ranks of a process group hold, on the collectives of ``distributed`` (its docstring has
# the algorithm).


def _compiled_backend(backend: str, device, dtype) -> str:
    resolved = _ops.resolve_backend(backend, device, dtype)
    if resolved == "torch":
        raise ValueError(f"the vocabulary-parallel loss runs on the compiled kernels ('triton' on CUDA, 'cpu' on "
                         f"the CPU), but backend={backend!r} gives the unfused reference for {dtype} tensors on "
                         f"{device} (float64 inputs, or kernels that are not built): pass float32, bfloat16 or "
                         "float16 inputs with a compiled backend")
    return resolved


class _VocabParallelLoss(torch.autograd.Function):
    """(the rows' losses, or their sum times ``row_grad``; the statistics) of rows held in column shards, with
    ``pieces`` (``_ops.RowPieces``, ``_topk_ops.TopkPieces``) of the ``teacher``'s tensors (a list).

    ``row_grad``: the 0-dim gradient of every row's loss ("mean": 1/count, "sum": 1) when the gradient is
    computed in the forward and kept alone; None: the forward saves the statistics and the inputs, and the
    backward recomputes the gradient from them for its per-row upstream gradients ("none"). Neither backward
    issues a collective."""

    @staticmethod
    def forward(ctx, student, target, row_grad, pieces, shards, teacher):
        ctx.set_materialize_grads(False)
        grad = None if row_grad is None else torch.empty(student.shape, dtype=student.dtype, device=student.device)
        stats = sharded_rows(pieces, shards, student, teacher, target, grad=grad, row_grad=row_grad)
        ctx.mark_non_differentiable(stats)
        ctx.eager, ctx.grad = grad is not None, grad
        if ctx.eager:
            return stats[Stat.LOSS].sum() * row_grad, stats
        ctx.pieces, ctx.offset = pieces, shards.offset
        ctx.save_for_backward(student, target, stats, *teacher)
        return stats[Stat.LOSS].clone(), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        _ops.refuse_higher_order()
        if grad_loss is None:
            return (None,) * 6
        if ctx.eager:
            if ctx.grad is None:
                raise RuntimeError("vocabulary-parallel loss: its gradient was computed in the forward and already "
                                   "handed to a first backward; recompute the loss to backpropagate again")
            grad, ctx.grad = ctx.grad, None
            _ops.scale_grad_(grad, grad_loss)
            return grad, None, None, None, None, None
        student, target, stats, *teacher = ctx.saved_tensors
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        ctx.pieces.second_pass(student, teacher, target, stats, ctx.offset, grad=grad, row_grad=grad_loss.reshape(-1))
        return grad, None, None, None, None, None


def vocab_parallel_logits_loss(student_logits, teacher, target, spec: LossSpec, *, process_group, reduction, backend,
                               inplace_backward, return_components, num_items_in_batch=None, vocab_size=None):
    """``logits_loss`` for student logits whose columns the ranks of ``process_group`` hold (or DTensors sharded on
    the last dimension), with the teacher's matching columns (``DenseLogits``) or its whole top-k on every rank
    (``topk.TopkLogits``): the loss of the whole rows on every rank, and this rank's columns' gradient. One
    agreement (``distributed.agree``) before any work or error; then the teacher form's pieces, merged."""
    student, teacher, target, group, index = teacher.local(student_logits, target, process_group)
    if dist.get_world_size(group) == 1:  # the whole rows are here: the one-process kernels
        return logits_loss(student, teacher, target, spec, reduction=reduction, backend=backend,
                           inplace_backward=inplace_backward, return_components=return_components,
                           num_items_in_batch=num_items_in_batch, vocab_size=vocab_size)
    device = exchange_device(group, student, *teacher.tensors, target)
    names = ("the number of rows N", "the student_logits dtype", "the device type", "whether a target is given",
             *teacher.fact_names, "the loss settings (gamma or temperature, beta, ce_weight, ignore_index, softcap, "
             "logit_scale, tail, reduction, backend)")

    def check():
        if inplace_backward:
            raise ValueError("inplace_backward=True is not supported with process_group (each rank's logits are "
                             "already 1/world of the vocabulary)")
        validate_logits("student_logits", student)
        validate_options(reduction, spec.ignore_index)
        validate_num_items(num_items_in_batch, reduction)
        if target is not None:
            validate_target(target, student.shape[:-1], None, device, spec.ignore_index)
        teacher_facts = teacher.sharded_facts(student, target, spec)
        resolved = teacher.sharded_backend(backend, device, student.dtype, spec)
        return student.shape[-1], (student[..., 0].numel(), student.dtype, device.type, target is not None,
                                   *teacher_facts, _settings(spec, reduction, resolved, teacher.form))

    shards = agree(group, index, device, check, names, target, spec.ignore_index, num_items_in_batch,
                   vocab_size)
    spec = spec.at_vocab(shards.vocab)  # the whole vocabulary, not this rank's shard (see LossSpec)
    backend = teacher.sharded_backend(backend, device, student.dtype, spec)
    return teacher.sharded_loss(student, target, spec, shards, backend, reduction=reduction,
                                return_components=return_components, num_items_in_batch=num_items_in_batch)


def sharded_logits_loss(student, teacher, target, pieces, shards, spec, *, reduction, return_components,
                        num_items_in_batch):
    """The loss of logits whose columns the ranks hold, after the agreement: the reduction around
    ``_VocabParallelLoss`` of ``pieces`` (a dense or a top-k teacher's, ``teacher`` its tensors)."""
    lead, device = student.shape[:-1], student.device
    flat_target = None if target is None else target.reshape(-1).long()
    valid = valid_rows(target, lead, device, spec.ignore_index)
    denominator = None
    if reduction == "mean":
        denominator = mean_denominator(target, spec.ignore_index, valid.numel(), device, num_items_in_batch)
    row_grad = None
    if reduction != "none" and student.requires_grad and torch.is_grad_enabled():
        row_grad = (1.0 / denominator if reduction == "mean"
                    else torch.ones((), dtype=torch.float32, device=device))
    loss, stats = _VocabParallelLoss.apply(student, flat_target, row_grad, pieces, shards, teacher)
    if row_grad is None:
        if reduction == "none":
            loss = loss.view(lead)
        else:
            loss = loss.sum()
            loss = loss / denominator if reduction == "mean" else loss
    if not return_components:
        return loss
    # The kernels' weight row is U; the factor of weight_norm is folded into their kl_coef.
    return loss, components([stats[Stat.KL], stats[Stat.CE], stats[Stat.WEIGHT] * spec.weight_factor,
                             stats[Stat.ENTROPY]], valid)


_COMMON_DOC = """
    Args:
        student_logits: (..., V) float32, bfloat16 or float16 logits of the student. Rows may be strided;
            the last dimension should be contiguous.
        teacher_logits: (..., V) logits of the teacher, any floating dtype; must not require grad.
        target: optional (...) integer class indices (any integer dtype and layout). Adds
            ``ce_weight * CE(student_logits, target)``; rows whose target is ``ignore_index`` contribute
            nothing to any term. An index outside [0, V) raises a ValueError on the CPU; on a GPU it trips a
            device-side assertion, as in ``F.cross_entropy`` (the check costs no host synchronisation).
        beta: weight of the distillation term.
        ce_weight: weight of the hard-label cross-entropy (used only when ``target`` is given).
        ignore_index: target value of rows to ignore, as in ``torch.nn.functional.cross_entropy``.
        reduction: ``"mean"`` (over the rows not ignored; 0 when every row is ignored), ``"sum"`` or
            ``"none"`` (a float32 tensor of the leading shape, ignored rows 0).
        backend: ``"auto"`` (Triton on CUDA tensors, the compiled C++ kernel on CPU tensors, the reference
            for float64 logits and on other devices), ``"triton"``, ``"cpu"`` or ``"torch"`` (the unfused
            reference, with the same contract: float32 arithmetic and a float32 loss for float32, bfloat16 and
            float16 logits; float64 for float64 logits). The compiled backends give first-order gradients:
            a backward through them with ``create_graph=True`` raises; the reference is differentiable to
            any order (gradcheck, gradgradcheck, gradient penalties).
        inplace_backward: write the gradient into ``student_logits``' own storage, allocating no (N, V)
            tensor at all. Opt-in: the logits' values are destroyed (already during the forward with
            ``reduction`` "mean" or "sum"), so nothing else may use them afterwards. Refused with the
            reference backend, for a leaf tensor that requires grad and for expanded or overlapping logits.
        return_components: also return a ``LossComponents`` of detached batch means (KL, CE, KL weight)
            for logging.
        num_items_in_batch: the divisor of ``reduction="mean"`` in place of this call's non-ignored rows:
            the non-ignored rows of all gradient-accumulation micro-batches together (Hugging Face's
            Trainer passes it to ``compute_loss``), so that summing the micro-batches' gradients gives the
            gradient of one big batch. An int, a float or a one-element tensor (on any device; no host
            synchronisation), positive. Under DDP the loss is this rank's rows over it: with Hugging Face's
            default ``average_tokens_across_devices=True`` it is the count of all ranks, and the Trainer
            multiplies the loss by the world size to undo DDP's gradient averaging. The logged
            ``LossComponents`` stay means over this call's rows.
        vocab_size: optional, the whole vocabulary's size: with ``process_group`` the ranks check (in their one
            agreement exchange) that their slices tile it; without, it must be V.
        softcap, logit_scale: the LM heads' post-processing, for logits that are the raw output of a head whose
            model post-processes them (Gemma-2's soft-cap, Cohere's or Granite's scale): the loss reads
            ``softcap * tanh(logit_scale * x / softcap)`` (``logit_scale * x`` without a soft-cap) of both the
            student's and the teacher's logits, with its gradient. Default: neither. It costs one (N, V) tensor
            per model (and autograd's saved tanh); refused with ``inplace_backward``.
        jsd_beta: the divergence D between the (transformed) teacher's distribution p and the student's q that
            replaces KL(p || q), in TRL's and Liger's convention: 0 (default) the forward KL(p || q) of the paper
            and of KD; 1 the reverse KL(q || p); in between the generalised JSD beta * KL(p || m) + (1 - beta) *
            KL(q || m), m = beta * p + (1 - beta) * q. Every backend computes them; the reverse KL and the JSD
            cost one more pass over the row than the forward KL (their gradient needs the row's sum).
        process_group: a ``torch.distributed`` process group whose ranks each hold a contiguous slice of the
            vocabulary columns of both logits (rank order = column order, uneven widths allowed; ``target``
            holds global ids): the vocabulary-parallel loss (``ttm_kernels.distributed``). Every rank gets the
            loss of the whole rows, and its slice of their gradient. Logits given as DTensors sharded on the
            last dimension (``Shard(-1)``) over a 1-D device mesh take this path without it.

    Memory: with ``reduction`` "mean" or "sum" and a student that requires grad, the forward computes the
    gradient in the same pass over the logits (each row is read once from memory) and keeps only it: the
    teacher logits are not saved and can be freed right after the call. The backward scales it in place by
    the upstream gradient, so one backward per forward (no ``retain_graph`` re-use). With "none", the
    forward keeps per-row float32 statistics and the inputs, and the backward recomputes.

    Returns:
        The float32 loss (computed with float32 accumulation; float64 for float64 logits), and with
        ``return_components`` a ``(loss, LossComponents)`` pair. The gradient reaches ``student_logits``
        only, in its dtype.
"""


def fused_wttm_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: Optional[torch.Tensor] = None,
                    *, gamma: float = DEFAULT_GAMMA, beta: float = 1.0, ce_weight: float = 1.0,
                    ignore_index: int = -100, reduction: str = "mean", backend: str = "auto",
                    inplace_backward: bool = False, return_components: bool = False,
                    num_items_in_batch=None, process_group=None, softcap: Optional[float] = None,
                    logit_scale: float = 1.0, jsd_beta: float = 0.0, vocab_size: Optional[int] = None,
                    weight_norm: str = "none"):
    spec = specs.wttm(gamma, beta=beta, ce_weight=ce_weight, ignore_index=ignore_index, softcap=softcap,
                      logit_scale=logit_scale, jsd_beta=jsd_beta, weight_norm=weight_norm)
    return logits_loss(student_logits, DenseLogits(teacher_logits), target, spec, reduction=reduction, backend=backend,
                       inplace_backward=inplace_backward, return_components=return_components,
                       num_items_in_batch=num_items_in_batch, process_group=process_group, vocab_size=vocab_size)


fused_wttm_loss.__doc__ = """Weighted Transformed Teacher Matching (Zheng & Yang, ICLR 2024).

    ``ce_weight * CE(z, target) + beta * mean_rows(U * KL(pt || q))`` with ``q = softmax(z)`` (no student
    temperature, no T^2 factor), ``pt = softmax(gamma * v) = p**gamma / sum(p**gamma)`` for
    ``p = softmax(v)``, and the per-row weight ``U = sum(p**gamma)``, a constant of the teacher.

    gamma: the power-transform exponent, 1/T (the public code's ``--ttm_l``). Default 0.2 (T = 5), the
        value of the paper's WTTM example; the paper uses 0.1 to 0.25 on CIFAR-100. gamma = 1 is plain KL.
    weight_norm: ``"none"`` (default) the paper's weight U, which ranges from 1 to V**(1 - gamma) and so grows
        with the vocabulary V; ``"vocab"`` U / V**max(0, 1 - gamma), in (0, 1] at every V, so that a beta chosen
        at one vocabulary means the same at another (see ``LossSpec``). V is the student's whole vocabulary (all
        ranks' columns under ``process_group``); the factor is a constant, exact under gradient accumulation.
        The reported ``LossComponents.weight`` is the normalised weight. TTM and KD have no weight to normalise.
""" + _COMMON_DOC


def fused_ttm_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: Optional[torch.Tensor] = None,
                   *, gamma: float = DEFAULT_GAMMA, beta: float = 1.0, ce_weight: float = 1.0,
                   ignore_index: int = -100, reduction: str = "mean", backend: str = "auto",
                   inplace_backward: bool = False, return_components: bool = False,
                   num_items_in_batch=None, process_group=None, softcap: Optional[float] = None,
                   logit_scale: float = 1.0, jsd_beta: float = 0.0, vocab_size: Optional[int] = None):
    spec = specs.ttm(gamma, beta=beta, ce_weight=ce_weight, ignore_index=ignore_index, softcap=softcap,
                     logit_scale=logit_scale, jsd_beta=jsd_beta)
    return logits_loss(student_logits, DenseLogits(teacher_logits), target, spec, reduction=reduction, backend=backend,
                       inplace_backward=inplace_backward, return_components=return_components,
                       num_items_in_batch=num_items_in_batch, process_group=process_group, vocab_size=vocab_size)


fused_ttm_loss.__doc__ = """Transformed Teacher Matching: ``ce_weight * CE + beta * mean_rows(KL(softmax(gamma * v) || softmax(z)))``.

    gamma: the power-transform exponent, 1/T. Default 0.2 (T = 5); the paper's TTM example uses 0.1 with
        beta = 45.
""" + _COMMON_DOC


def fused_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: Optional[torch.Tensor] = None,
                  *, temperature: float = DEFAULT_TEMPERATURE, beta: float = 1.0, ce_weight: float = 1.0,
                  ignore_index: int = -100, reduction: str = "mean", backend: str = "auto",
                  inplace_backward: bool = False, return_components: bool = False,
                  num_items_in_batch=None, process_group=None, softcap: Optional[float] = None,
                  logit_scale: float = 1.0, jsd_beta: float = 0.0, vocab_size: Optional[int] = None):
    spec = specs.kd(temperature, beta=beta, ce_weight=ce_weight, ignore_index=ignore_index, softcap=softcap,
                    logit_scale=logit_scale, jsd_beta=jsd_beta)
    return logits_loss(student_logits, DenseLogits(teacher_logits), target, spec, reduction=reduction, backend=backend,
                       inplace_backward=inplace_backward, return_components=return_components,
                       num_items_in_batch=num_items_in_batch, process_group=process_group, vocab_size=vocab_size)


fused_kd_loss.__doc__ = """Classic KD (Hinton et al.): ``ce_weight * CE + beta * T^2 * mean_rows(KL(softmax(v/T) || softmax(z/T)))``.

    temperature: T, default 4 (RepDistiller's ``--kd_T``). The classic CIFAR recipe is ``ce_weight=0.1,
        beta=0.9``.
""" + _COMMON_DOC
