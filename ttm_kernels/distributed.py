"""Beyond one device: vocabulary-parallel (tensor-parallel) losses on ``torch.distributed``, DTensor logits and
FSDP2 LM heads.

Vocabulary parallelism (Megatron-style): each rank of a process group holds a contiguous slice of the
vocabulary columns of both logits (rank order = column order, uneven widths allowed), or of the rows of both
LM heads for the fused linear loss, and the same target (global ids). No logits are gathered:

1. Agreement, once per call: one ``all_gather`` of a few int64 per rank (shard width and place, rows, dtypes,
   a checksum of the settings, the target's fingerprint and range, whether the rank's own argument checks
   passed). Every rank then knows the column layout and raises the same error when the ranks disagree or any
   of them rejected its arguments, instead of leaving the others blocked in a collective.
2. Each rank's online (max, sum) pairs over its columns (``_ops.RowPieces.partial``: NUM_PARTIAL fp32 per row),
   one ``all_gather`` of them, and every rank merges all of them (``RowPieces.merge``, the merge of the split-row
   path): the rows' statistics, bit for bit the same on every rank.
3. The second pass over the local columns: their KL terms and, for "mean"/"sum", their gradient.
4. One ``all_reduce`` (sum) of the rows' KL (one fp32 per row): the loss, the same on every rank.

Why an all_gather of the partials rather than two all-reduces (max of the maxima, then sum of the rescaled
sums): it is one collective instead of two (at O(N) bytes both are latency-bound), it reuses the one merge
that split rows and shards share, and each rank merges identical inputs in the same order. It moves more
bytes beyond two ranks: a rank sends (world - 1) * 36 bytes per row (ring all_gather) against
2 * (world - 1) / world * 36 for two ring all-reduces, equal at 2 ranks, 2x at 4, 4x at 8: still O(N), against
the (world - 1) / world * 2 * N * V * itemsize bytes that gathering both logits moves (README, "Beyond one
device").

The backward issues no collective for the logits losses: the gradient of "mean"/"sum" is computed in the
forward; "none" recomputes it from the merged statistics it saved. The fused linear loss's backward sums the
hidden-state gradient over the group (one all-reduce, unless ``reduce_hidden_grad=False``) and, for "none",
recomputes the chunks (their collectives included): every rank must call backward on the loss, as every rank
of a tensor-parallel model does.
"""
from __future__ import annotations

import functools
import struct
import zlib
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import _ops, functional, linear, reference, reduction as reduction_
from ._stats import ROW_TERM_STATS, Stat
from .functional import is_dtensor

# float dtypes as small integers for the agreement exchange
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT64_MAX = torch.iinfo(torch.int64).max
_NO_NUM_ITEMS = -1  # num_items_in_batch None in the agreement (the bits of a NaN, which no valid count has)
# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Shards(NamedTuple):
    """The vocabulary layout that the ranks agreed on: this rank's place in column order (``index``), its first
    global column (``offset``), the global vocabulary and every shard's width, in column order."""

    group: object
    index: int
    offset: int
    vocab: int
    widths: tuple


def _member(process_group) -> int:
    """This process's rank in ``process_group`` (its place in column order)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group was given, but torch.distributed is not initialized: call "
                           "torch.distributed.init_process_group first")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got {type(process_group).__name__}")
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise ValueError("this process is not a member of process_group")
    return rank


def _encode(value) -> int:
    if isinstance(value, torch.dtype):
        return _DTYPES.index(value) if value in _DTYPES else -1
    if isinstance(value, str):
        return zlib.crc32(value.encode())
    return int(value)


def _shown(local, code: int) -> str:
    if isinstance(local, torch.dtype):
        return str(_DTYPES[code]) if 0 <= code < len(_DTYPES) else "another dtype"
    return str(bool(code)) if isinstance(local, bool) else str(code)


def _target_facts(target, ignore_index, device) -> torch.Tensor:
    """(fingerprint, smallest, largest class index that is not ignore_index) of the target, int64 on ``device``:
    the fingerprint tells whether the ranks hold the same target, the range is checked against the global
    vocabulary (known only after the exchange)."""
    if target is None or target.numel() == 0:
        return torch.tensor([0, _INT64_MAX, -1], dtype=torch.int64, device=device)
    t = target.reshape(-1).long()
    valid = t != ignore_index
    position = torch.arange(1, t.numel() + 1, dtype=torch.int64, device=device)
    return torch.stack([(t * position).sum(), torch.where(valid, t, _INT64_MAX).min(),
                        torch.where(valid, t, -1).max()])


def _num_items_code(num_items_in_batch, device) -> torch.Tensor:
    """``num_items_in_batch`` (validated) as the int64 bits of its float64 value, a (1,) tensor on ``device``, or
    ``_NO_NUM_ITEMS`` for None. A tensor count is converted on the device: the agreement's one host
    synchronisation reads it."""
    if num_items_in_batch is None:
        return torch.full((1,), _NO_NUM_ITEMS, dtype=torch.int64, device=device)
    if isinstance(num_items_in_batch, torch.Tensor):
        value = num_items_in_batch.detach().reshape(1).to(device=device, dtype=torch.float64)
    else:
        value = torch.full((1,), float(num_items_in_batch), dtype=torch.float64, device=device)
    return value.view(torch.int64)


def _shown_num_items(code: int) -> str:
    return "None" if code == _NO_NUM_ITEMS else f"{struct.unpack('<d', struct.pack('<q', code))[0]:g}"


def exchange_device(group, *tensors) -> torch.device:
    """The device of the agreement's tensors: that of the first tensor argument, else the group's (a rank whose
    arguments are all missing must still take part in the exchange, and then raise with the others)."""
    for x in tensors:
        if isinstance(x, torch.Tensor):
            return x.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(group, index: int, device, check, names, target=None, ignore_index=-100,
          num_items_in_batch=None, vocab_size=None) -> Shards:
    """The vocabulary layout of ``group``, after one all_gather in which every rank also learns whether every other
    rank's own checks passed and whether they agree on ``names`` and on ``num_items_in_batch`` (a different
    divisor per rank would give each rank another loss of the same rows).

    ``check()`` runs this rank's checks (those that need no other rank, None inputs included) and returns its
    shard width and one value per name (ints, dtypes, or strings compared by checksum). An exception it raises is
    exchanged, not raised at once, so that every rank raises (this one its own exception; the others a
    RuntimeError naming the rank and its message) rather than some waiting forever in the next collective.
    ``vocab_size``, when given, is agreed on too and must be the sum of the shard widths."""
    world = dist.get_world_size(group)
    names = (*names, "vocab_size")
    error, width, values = None, 0, [0] * len(names)
    try:
        functional.check_vocab_size(vocab_size)
        width, values = check()
        values = (*values, -1 if vocab_size is None else vocab_size)
        facts = torch.cat([_target_facts(target, ignore_index, device),
                           _num_items_code(num_items_in_batch, device)])
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
        facts = torch.cat([_target_facts(None, ignore_index, device), _num_items_code(None, device)])
    head = [int(error is not None), index, width] + [_encode(v) for v in values]
    row = torch.cat([torch.tensor(head, dtype=torch.int64, device=device), facts])
    table = row.new_empty(world * row.numel())  # gloo wants the inputs concatenated, not stacked
    _all_gather_single(table, row, group=group)
    table = table.view(world, -1).tolist()  # the one host sync of the call

    failed = [rank for rank in range(world) if table[rank][0]]
    if failed:
        messages = [None] * world
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
        if error is not None:
            raise error
        raise RuntimeError(f"rank {failed[0]} of the process group rejected its arguments ({messages[failed[0]]}); "
                           "every rank raises")
    indices = [row[1] for row in table]
    if sorted(indices) != list(range(world)):
        raise ValueError(f"the ranks' places in column order must be 0..{world - 1} once each, got {indices}")
    for k, (name, local) in enumerate(zip(names, values), start=3):
        codes = [row[k] for row in table]
        if len(set(codes)) > 1:
            if isinstance(local, str):
                raise ValueError(f"the ranks of the process group disagree on {name}")
            raise ValueError(f"the ranks of the process group disagree on {name}: "
                             + ", ".join(f"rank {r}: {_shown(local, c)}" for r, c in enumerate(codes)))
    num_items_codes = [row[-1] for row in table]
    if len(set(num_items_codes)) > 1:
        raise ValueError("the ranks of the process group disagree on num_items_in_batch: "
                         + ", ".join(f"rank {r}: {_shown_num_items(c)}" for r, c in enumerate(num_items_codes))
                         + " (every rank computes the loss of the same rows: pass every rank the same count)")
    fingerprint, low, high = (table[0][k] for k in range(-4, -1))
    if any(row[-4] != fingerprint for row in table):
        raise ValueError("the ranks of the process group hold different targets: every rank must pass the same "
                         "target (global class ids)")
    widths = [0] * world
    for row in table:
        widths[row[1]] = row[2]
    vocab = sum(widths)
    if vocab_size is not None and vocab != vocab_size:
        raise ValueError(f"the ranks' shard widths {widths} sum to {vocab}, not vocab_size={vocab_size}: each rank "
                         "must pass its contiguous slice of the vocabulary, together all of it once")
    if target is not None and (low < 0 or high >= vocab):
        raise ValueError(f"target holds class indices outside [0, {vocab}) (the global vocabulary: the ranks' shard "
                         f"widths {widths} together) that are not ignore_index={ignore_index}, e.g. "
                         f"{low if low < 0 else high}")
    return Shards(group, index, sum(widths[:index]), vocab, tuple(widths))


def _compiled_backend(backend: str, device, dtype) -> str:
    resolved = _ops.resolve_backend(backend, device, dtype)
    if resolved == "torch":
        raise ValueError(f"the vocabulary-parallel loss runs on the compiled kernels ('triton' on CUDA, 'cpu' on "
                         f"the CPU), but backend={backend!r} gives the unfused reference for {dtype} tensors on "
                         f"{device} (float64 inputs, or kernels that are not built): pass float32, bfloat16 or "
                         "float16 inputs with a compiled backend")
    return resolved


def _settings(*values) -> str:
    """The loss's settings as one string, compared across ranks by checksum."""
    return repr(values)


def sharded_rows(pieces: _ops.RowPieces, shards: Shards, student, teacher, target, grad=None, row_grad=None):
    """The statistics (NUM_STATS, N) of rows whose columns the ranks of ``shards.group`` hold, the same on every
    rank, from this rank's columns (``student``, ``teacher``: (..., width)); with ``grad``, this rank's columns'
    gradient of sum_i row_grad_i * loss_i written into it. Two collectives: the partials' all_gather and the
    sums' all_reduce (KL, DIV_GRAD, entropy); the reverse KL's and the JSD's gradient needs the reduced sums, in
    one more pass over this rank's columns."""
    local = pieces.partial(student, teacher, target, shards.offset, chunk_v=student.shape[-1])
    n_partial, n_rows = local.shape[:2]
    gathered = local.new_empty((len(shards.widths) * n_partial, n_rows))
    _all_gather_single(gathered, local.view(n_partial, n_rows), group=shards.group)
    stats = pieces.merge(gathered.view(-1, n_partial, n_rows).permute(1, 2, 0), target)
    fused_grad = None if pieces.gradient_needs_sums else grad
    sums = pieces.second_pass(student, teacher, target, stats, shards.offset, grad=fused_grad, row_grad=row_grad)
    sums = sums.sum(-1, keepdim=True)
    dist.all_reduce(sums, group=shards.group)
    pieces.finish(stats, sums)
    if grad is not None and fused_grad is None:
        pieces.second_pass(student, teacher, target, stats, shards.offset, grad=grad, row_grad=row_grad)
    return stats


# ---------------------------------------------------------------------------------------------- logits


class _VocabParallelLoss(torch.autograd.Function):
    """(the rows' losses, or their sum times ``row_grad``; the statistics) of rows held in column shards.

    ``row_grad``: the 0-dim gradient of every row's loss ("mean": 1/count, "sum": 1) when the gradient is
    computed in the forward and kept alone; None: the forward saves the statistics and the inputs, and the
    backward recomputes the gradient from them for its per-row upstream gradients ("none"). Neither backward
    issues a collective."""

    @staticmethod
    def forward(ctx, student, teacher, target, row_grad, pieces, shards):
        ctx.set_materialize_grads(False)
        grad = None if row_grad is None else torch.empty(student.shape, dtype=student.dtype, device=student.device)
        stats = sharded_rows(pieces, shards, student, teacher, target, grad=grad, row_grad=row_grad)
        ctx.mark_non_differentiable(stats)
        ctx.eager, ctx.grad = grad is not None, grad
        if ctx.eager:
            return stats[Stat.LOSS].sum() * row_grad, stats
        ctx.pieces, ctx.offset = pieces, shards.offset
        ctx.save_for_backward(student, teacher, target, stats)
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
        student, teacher, target, stats = ctx.saved_tensors
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        ctx.pieces.second_pass(student, teacher, target, stats, ctx.offset, grad=grad, row_grad=grad_loss.reshape(-1))
        return grad, None, None, None, None, None


def _local_logits(student, teacher, target, process_group):
    """(student, teacher, target, group, place in column order): DTensor logits sharded on the last dimension over a
    1-D mesh become their local shards (differentiably) on the mesh's group. Only global facts of DTensors are
    checked here, the same on every rank, so raising at once leaves no rank waiting."""
    if not (is_dtensor(student) or is_dtensor(teacher)):
        # Anything else (None included) is checked in the agreement, where every rank learns of it.
        return student, teacher, target, process_group, _member(process_group)
    from torch.distributed.tensor import Shard

    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        if not is_dtensor(x):
            raise TypeError(f"{name} must be a DTensor like the other logits, got {type(x).__name__}")
        if x.device_mesh.ndim != 1 or tuple(x.placements) != (Shard(x.ndim - 1),):
            raise ValueError(f"{name} is a DTensor with placements {tuple(x.placements)} over a mesh of shape "
                             f"{tuple(x.device_mesh.shape)}; the vocabulary-parallel loss takes DTensors sharded on "
                             "the last dimension (Shard(-1)) over a 1-D mesh: redistribute them, or pass "
                             ".full_tensor() for the loss on one device")
    mesh = student.device_mesh
    if teacher.device_mesh != mesh:
        raise ValueError("student_logits and teacher_logits must be DTensors over the same device mesh")
    group = mesh.get_group()
    if process_group is not None and process_group != group:
        raise ValueError("process_group must be the DTensor logits' mesh group (or None)")
    if is_dtensor(target):
        if not all(p.is_replicate() for p in target.placements):
            raise ValueError(f"target must be replicated (every rank holds all of it), got placements "
                             f"{tuple(target.placements)}")
        target = target.to_local()
    return student.to_local(), teacher.to_local(), target, group, mesh.get_local_rank()


def vocab_parallel_loss(student_logits, teacher_logits, target, spec, *, process_group, reduction, backend,
                        inplace_backward, return_components, num_items_in_batch=None, vocab_size=None):
    """``functional._fused_loss`` for logits whose columns the ranks of ``process_group`` hold (or DTensors
    sharded on the last dimension): the loss of the whole rows on every rank, and this rank's columns' gradient."""
    student, teacher, target, group, index = _local_logits(student_logits, teacher_logits, target, process_group)
    if dist.get_world_size(group) == 1:  # the whole rows are here: the one-pass kernels
        # (the heads' post-processing is already applied: the spec without it)
        return functional._fused_loss(student, teacher, target, spec.without_head_post(), reduction=reduction,
                                      backend=backend, inplace_backward=inplace_backward,
                                      return_components=return_components, num_items_in_batch=num_items_in_batch,
                                      vocab_size=vocab_size)
    device = exchange_device(group, student, teacher, target)
    names = ("the number of rows N", "the student_logits dtype", "the teacher_logits dtype", "the device type",
             "whether a target is given", "the loss settings (gamma or temperature, beta, ce_weight, "
             "ignore_index, softcap, logit_scale, reduction, backend)")

    def check():
        if inplace_backward:
            raise ValueError("inplace_backward=True is not supported with process_group (each rank's logits are "
                             "already 1/world of the vocabulary)")
        functional._validate(student, teacher, None, spec.ignore_index, reduction)
        reduction_.validate_num_items(num_items_in_batch, reduction)
        if target is not None:
            functional.validate_target(target, student.shape[:-1], None, device, spec.ignore_index)
        resolved = _compiled_backend(backend, device, student.dtype)
        settings = _settings(spec, reduction, resolved)
        return student.shape[-1], (student[..., 0].numel(), student.dtype, teacher.dtype, device.type,
                                   target is not None, settings)

    shards = agree(group, index, device, check, names, target, spec.ignore_index, num_items_in_batch,
                   vocab_size)
    spec = spec.at_vocab(shards.vocab)  # the whole vocabulary, not this rank's shard (see LossSpec)
    backend = _ops.resolve_backend(backend, device, student.dtype)
    lead = student.shape[:-1]
    flat_target = None if target is None else target.reshape(-1).long()
    valid = (torch.ones(lead, dtype=torch.bool, device=device) if target is None else target != spec.ignore_index)
    pieces = _ops.RowPieces(backend, spec.kernel_params(), spec.weighted, shards.vocab)
    denominator = None
    if reduction == "mean":
        denominator = reduction_.mean_denominator(target, spec.ignore_index, valid.numel(), device,
                                                  num_items_in_batch)
    row_grad = None
    if reduction != "none" and student.requires_grad and torch.is_grad_enabled():
        row_grad = (1.0 / denominator if reduction == "mean"
                    else torch.ones((), dtype=torch.float32, device=device))
    loss, stats = _VocabParallelLoss.apply(student, teacher, flat_target, row_grad, pieces, shards)
    if row_grad is None:
        if reduction == "none":
            loss = loss.view(lead)
        else:
            loss = loss.sum()
            loss = loss / denominator if reduction == "mean" else loss
    if not return_components:
        return loss
    # The kernels' weight row is U; the factor of weight_norm is folded into their kl_coef.
    return loss, reduction_.components([stats[Stat.KL], stats[Stat.CE], stats[Stat.WEIGHT] * spec.weight_factor,
                                        stats[Stat.ENTROPY]], valid)


# ---------------------------------------------------------------------------------------------- top-k logits


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
    the target, one all_gather of them (4 + k numbers per row), and the merge; the other ranks' numbers are
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
    mine = torch.cat([torch.stack([_safe_logsumexp(scaled, -1),
                                   _safe_logsumexp(scaled.masked_fill(member, float("-inf")), -1),
                                   _safe_logsumexp(z, -1),
                                   z_y.masked_fill(~y_here, float("-inf"))], -1),
                      scaled.gather(-1, local_ids).masked_fill(~here, float("-inf"))], -1)
    gathered = mine.new_empty((len(shards.widths),) + tuple(mine.shape))
    _all_gather_single(gathered.view(-1), mine.detach().contiguous().view(-1), group=shards.group)
    parts = torch.stack([mine if rank == shards.index else gathered[rank] for rank in range(len(shards.widths))])
    lse, lse_tail, lse_z = (_safe_logsumexp(parts[..., i], 0) for i in range(3))
    # The target's logit and each id's are finite on the one rank that holds them: a sum of the finite entries.
    held = torch.where(torch.isfinite(parts[..., 3:]), parts[..., 3:], 0).sum(0)
    scaled_s = held[:, 1:].masked_fill(~in_s, float("-inf"))
    log_q = torch.cat([scaled_s, lse_tail.unsqueeze(-1)], -1) - lse.unsqueeze(-1)
    kl = reference.divergence(log_pt, log_q, spec.jsd_beta)
    rows = reference._row_terms(kl, weight, None, target, valid, beta=spec.beta, kl_scale=spec.kl_scale,
                                ce_weight=spec.ce_weight, ce=lse_z - held[:, 0])
    rows["entropy"] = torch.where(valid, reference.entropy(log_q), 0)
    return rows


def vocab_parallel_topk_loss(student_logits, ids, logprobs, target, spec, *, tail, process_group, reduction, backend,
                             return_components, num_items_in_batch=None, vocab_size=None):
    """``topk._fused_topk_loss`` for student logits whose columns the ranks of ``process_group`` hold, and the
    teacher's whole (..., k) top-k in global ids on every rank (each rank handles the ids of its columns).

    The reference's arithmetic in float32 (float64 for float64 logits) on each rank's columns, unfused: a few
    (N, width) temporaries per rank, and the gradient by autograd from this rank's terms (the top-k kernels
    have no partial statistics yet). Collectives: the agreement, one all_gather of 4 + k numbers per row."""
    from . import topk  # imported on first use: it imports this module's importers

    index = _member(process_group)
    device = exchange_device(process_group, student_logits, ids, logprobs, target)
    names = ("the number of rows N", "the student_logits dtype", "the device type", "whether a target is given",
             "k (the last dimension of teacher_topk_ids)", "the teacher_topk_ids",
             "the largest id in teacher_topk_ids",
             "the loss settings (gamma or temperature, beta, ce_weight, ignore_index, softcap, logit_scale, tail, "
             "reduction)")

    def check():
        functional.validate_logits("student_logits", student_logits)
        functional.validate_options(reduction, spec.ignore_index)
        reduction_.validate_num_items(num_items_in_batch, reduction)
        _ops.resolve_backend(backend, device, student_logits.dtype)
        lead = student_logits.shape[:-1]
        if target is not None:
            functional.validate_target(target, lead, None, device, spec.ignore_index)
        valid = reduction_.valid_rows(target, lead, device, spec.ignore_index)
        # The global vocabulary is known after the exchange: the ids' range against it is checked then.
        reference.check_topk_divergence(tail, spec.jsd_beta)
        topk.validate_topk(ids, logprobs, lead, _INT64_MAX, device, tail, valid)
        flat = ids.reshape(-1).long()
        fingerprint = int((flat * torch.arange(1, flat.numel() + 1, device=flat.device)).sum())
        return student_logits.shape[-1], (lead.numel(), student_logits.dtype, device.type, target is not None,
                                          ids.shape[-1], fingerprint, int(flat.max()) if flat.numel() else -1,
                                          _settings(spec, tail, reduction))

    shards = agree(process_group, index, device, check, names, target, spec.ignore_index, num_items_in_batch,
                   vocab_size)
    spec = spec.at_vocab(shards.vocab)  # the whole vocabulary, not this rank's shard (see LossSpec)
    largest = int(ids.max()) if ids.numel() else -1
    if largest >= shards.vocab:
        raise ValueError(f"teacher_topk_ids holds ids outside [0, {shards.vocab}) (the global vocabulary: the ranks' "
                         f"shard widths {list(shards.widths)} together), e.g. {largest}")
    lead = student_logits.shape[:-1]
    compute = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    flat_target = None if target is None else target.reshape(-1).long()
    valid = reduction_.valid_rows(flat_target, (lead.numel(),), device, spec.ignore_index)
    z = student_logits.reshape(-1, student_logits.shape[-1]).to(compute)
    rows = _sharded_topk_rows(z, ids.reshape(-1, ids.shape[-1]).long(), logprobs.reshape(-1, ids.shape[-1]),
                              flat_target, valid, spec, tail, shards)
    loss = rows["loss"].view(lead)
    if reduction != "none":
        loss = loss.sum()
        if reduction == "mean":
            loss = loss / reduction_.mean_denominator(flat_target, spec.ignore_index, lead.numel(), device,
                                                      num_items_in_batch, dtype=compute)
    if not return_components:
        return loss
    return loss, reduction_.components([rows[k] for k in ("kl", "ce", "weight", "entropy")], valid.view(lead))


# ---------------------------------------------------------------------------------------------- fused linear


class _SumGradOverGroup(torch.autograd.Function):
    """The identity, whose backward sums the gradient over the group (Megatron's
    ``copy_to_tensor_model_parallel_region``): each rank's LM-head shard gives a part of the hidden-state
    gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _sharded_chunk_loss(z, v, y, row_grad, spec, *, shards):
    """``linear._chunk_loss`` for a chunk whose columns the ranks hold: the chunk's ``linear.ROW_TERMS`` rows,
    and with ``row_grad`` its gradient written over ``z``."""
    pieces = _ops.RowPieces(spec.backend, spec.loss.kernel_params(), spec.loss.weighted, shards.vocab)
    stats = sharded_rows(pieces, shards, z, v, y, grad=None if row_grad is None else z, row_grad=row_grad)
    return linear.reported_terms(stats[ROW_TERM_STATS], spec.loss)


def vocab_parallel_linear_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, target, spec, *,
                               process_group, reduce_hidden_grad, student_bias, teacher_bias, reduction, chunk_size,
                               vocab_mismatch, backend, return_components, num_items_in_batch=None, vocab_size=None):
    """``linear._fused_linear_loss`` with each rank's rows of both LM heads: the chunk loop of ``linear._run_chunks``
    with the sharded rows' loss per chunk (every rank runs the same chunks)."""
    index = _member(process_group)
    if dist.get_world_size(process_group) == 1:  # the whole LM heads are here
        return linear._fused_linear_loss(
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
        lead = linear._check_linear_args(student_hidden, student_weight, student_bias, teacher_hidden,
                                         teacher_weight, teacher_bias, spec.ignore_index, reduction, chunk_size,
                                         vocab_mismatch, num_items_in_batch)
        if vocab_mismatch != "error":
            raise ValueError(f"vocab_mismatch={vocab_mismatch!r} is not supported with process_group: give every "
                             "rank the teacher's rows of the student's vocabulary slice")
        if teacher_weight.shape[0] != student_weight.shape[0]:
            raise ValueError(f"with process_group, each rank's teacher_weight must hold the rows of its "
                             f"student_weight's vocabulary slice: got {teacher_weight.shape[0]} and "
                             f"{student_weight.shape[0]} rows")
        if target is not None:
            functional.validate_target(target, lead, None, device, spec.ignore_index)
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
    lead = student_hidden.shape[:-1]
    n = lead.numel()
    target = None if target is None else target.reshape(-1).long()
    launch = linear.Launch(spec, backend)
    denominator = None
    if reduction == "mean":
        denominator = reduction_.mean_denominator(target, spec.ignore_index, n, device, num_items_in_batch,
                                                  dtype=linear._accumulation_dtype(student_hidden.dtype))
    needs = tuple(torch.is_grad_enabled() and x is not None and x.requires_grad
                  for x in (student_hidden, student_weight, student_bias))
    # Every rank runs the same chunks (each one's collectives): sized for the widest shard.
    chunk = chunk_size or linear.default_chunk_size(
        n, max(shards.widths), student_hidden.dtype, teacher_hidden.dtype, device,
        fp32_scratch=needs[1] and student_weight.dtype not in (torch.float32, torch.float64),
        softcap_scratch=any(needs) and spec.softcap is not None)
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    if reduce_hidden_grad and needs[0]:
        hidden = _SumGradOverGroup.apply(hidden, process_group)
    teacher = linear.DenseTeacher(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight.detach(),
                                  None if teacher_bias is None else teacher_bias.detach(), student_weight.shape[0],
                                  loss=functools.partial(_sharded_chunk_loss, shards=shards))
    loss, terms = linear._FusedLinearLoss.apply(hidden, student_weight, student_bias, teacher, target, launch,
                                                reduction, chunk, needs, denominator)
    if reduction == "none":
        loss = loss.view(lead)
    if not return_components:
        return loss
    return loss, reduction_.components(terms, reduction_.valid_rows(target, (n,), device, spec.ignore_index).view(lead))


class _ShardedTopkTeacher:
    """The top-k teacher of the chunk loop (``linear._run_chunks``) when the ranks hold the student head's rows:
    each chunk's loss by ``_sharded_topk_rows`` (its all_gather included) and its gradient by autograd, as the
    reference backend computes a chunk (``linear.loss_and_grad_torch``); no buffer, no GEMM."""

    buffer_dtype = None

    def __init__(self, ids, logprobs, tail, shards):
        self.ids, self.logprobs, self.tail, self.shards = ids, logprobs, tail, shards

    def allocate(self, chunk, vocab):
        pass

    def release(self):
        pass

    def rows(self, index):
        """This teacher on its rows ``index`` (the chunk loop's counted rows: the same on every rank, whose
        targets agree)."""
        return _ShardedTopkTeacher(self.ids[index], self.logprobs[index], self.tail, self.shards)

    def chunk_loss(self, z, start, end, y, row_grad, launch):
        spec = launch.loss
        ids, logprobs = self.ids[start:end], self.logprobs[start:end]
        valid = reduction_.valid_rows(y, (end - start,), z.device, spec.ignore_index)
        return linear.loss_and_grad_torch(
            z, lambda logits: _sharded_topk_rows(logits, ids, logprobs, y, valid, spec, self.tail, self.shards),
            row_grad)


def vocab_parallel_linear_topk_loss(student_hidden, student_weight, ids, logprobs, target, spec, *, tail,
                                    process_group, reduce_hidden_grad, student_bias, reduction, chunk_size, backend,
                                    return_components, num_items_in_batch=None, vocab_size=None):
    """``topk._fused_linear_topk_loss`` with each rank's rows of the student's LM head and the teacher's whole top-k
    in global ids: the chunk loop of ``linear._run_chunks`` with ``_ShardedTopkTeacher`` (every rank runs the same
    chunks). Like ``vocab_parallel_topk_loss``, the reference's arithmetic on each rank's columns, unfused."""
    from . import topk  # imported on first use: it imports this module's importers

    index = _member(process_group)
    device = exchange_device(process_group, student_hidden, ids, logprobs, target)
    names = ("the number of rows N", "the student hidden size", "the student dtype", "the device type",
             "whether a target is given", "k (the last dimension of teacher_topk_ids)", "the teacher_topk_ids",
             "the largest id in teacher_topk_ids",
             "the loss settings (gamma or temperature, beta, ce_weight, ignore_index, softcap, logit_scale, tail, "
             "reduction, chunk_size, reduce_hidden_grad, bias)")

    def check():
        if not isinstance(reduce_hidden_grad, bool):
            raise TypeError(f"reduce_hidden_grad must be True or False, got {reduce_hidden_grad!r}")
        if any(map(is_dtensor, (student_hidden, student_weight, student_bias))):
            raise TypeError("with process_group, pass each rank's own shards as plain tensors (DTensor.to_local())")
        linear.validate_student(student_hidden, student_weight, student_bias, reduction, spec.ignore_index,
                                chunk_size, num_items_in_batch)
        _ops.resolve_backend(backend, device, student_hidden.dtype)
        lead = student_hidden.shape[:-1]
        if target is not None:
            functional.validate_target(target, lead, None, device, spec.ignore_index)
        valid = reduction_.valid_rows(target, lead, device, spec.ignore_index)
        # The global vocabulary is known after the exchange: the ids' range against it is checked then.
        reference.check_topk_divergence(tail, spec.jsd_beta)
        topk.validate_topk(ids, logprobs, lead, _INT64_MAX, device, tail, valid)
        flat = ids.reshape(-1).long()
        fingerprint = int((flat * torch.arange(1, flat.numel() + 1, device=flat.device)).sum())
        return student_weight.shape[0], (lead.numel(), student_hidden.shape[-1], student_hidden.dtype, device.type,
                                          target is not None, ids.shape[-1], fingerprint,
                                          int(flat.max()) if flat.numel() else -1,
                                          _settings(spec, tail, reduction, chunk_size, reduce_hidden_grad,
                                                    student_bias is None))

    shards = agree(process_group, index, device, check, names, target, spec.ignore_index, num_items_in_batch,
                   vocab_size)
    spec = spec.at_vocab(shards.vocab)  # the whole vocabulary, not this rank's shard (see LossSpec)
    largest = int(ids.max()) if ids.numel() else -1
    if largest >= shards.vocab:
        raise ValueError(f"teacher_topk_ids holds ids outside [0, {shards.vocab}) (the global vocabulary: the ranks' "
                         f"shard widths {list(shards.widths)} together), e.g. {largest}")
    lead = student_hidden.shape[:-1]
    n = lead.numel()
    target = None if target is None else target.reshape(-1).long()
    denominator = None
    if reduction == "mean":
        denominator = reduction_.mean_denominator(target, spec.ignore_index, n, device, num_items_in_batch,
                                                  dtype=linear._accumulation_dtype(student_hidden.dtype))
    needs = tuple(torch.is_grad_enabled() and x is not None and x.requires_grad
                  for x in (student_hidden, student_weight, student_bias))
    # Every rank runs the same chunks (each one's collectives): sized for the widest shard.
    chunk = chunk_size or linear.default_chunk_size(
        n, max(shards.widths), student_hidden.dtype, None, device,
        fp32_scratch=needs[1] and student_weight.dtype not in (torch.float32, torch.float64),
        softcap_scratch=any(needs) and spec.softcap is not None)
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    if reduce_hidden_grad and needs[0]:
        hidden = _SumGradOverGroup.apply(hidden, process_group)
    k = ids.shape[-1]
    teacher = _ShardedTopkTeacher(ids.reshape(-1, k).long(), logprobs.reshape(-1, k), tail, shards)
    # The chunks' loss is the reference's arithmetic: the "torch" launch (the chunk buffer keeps its dtype).
    loss, terms = linear._FusedLinearLoss.apply(hidden, student_weight, student_bias, teacher, target,
                                                linear.Launch(spec, "torch"), reduction, chunk, needs, denominator)
    if reduction == "none":
        loss = loss.view(lead)
    if not return_components:
        return loss
    return loss, reduction_.components(terms, reduction_.valid_rows(target, (n,), device, spec.ignore_index).view(lead))


# ---------------------------------------------------------------------------------------------- FSDP2


def full_parameters(*params, constant=False):
    """``params`` with each DTensor (an FSDP2 ``fully_shard``-ed module's parameter) replaced by its whole tensor
    for one call (``DTensor.full_tensor``, an all-gather). The backward reduce-scatters the gradient back to the
    shards averaged over the mesh (``Partial("avg")``), as FSDP2 averages the gradients of the parameters it
    gathers itself. ``constant`` (a teacher's): gathered detached."""
    from torch.distributed.tensor import Partial

    def full(x):
        if not is_dtensor(x):
            return x
        if constant or not (x.requires_grad and torch.is_grad_enabled()):
            return x.detach().full_tensor()
        return x.full_tensor(grad_placements=[Partial("avg")] * x.device_mesh.ndim)

    return tuple(full(x) for x in params)
