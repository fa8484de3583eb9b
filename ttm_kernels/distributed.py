"""Beyond one device: the collectives of the vocabulary-parallel (tensor-parallel) losses on ``torch.distributed``,
DTensor logits and FSDP2 LM heads.

This module knows no loss: the agreement exchange (``agree``), the merged statistics of rows held in column
shards (``sharded_rows``), the hidden-state gradient's sum over the group (``_SumGradOverGroup``), DTensor logits'
local shards (``_local_logits``) and FSDP2 heads' whole parameters (``full_parameters``). Each teacher form's
orchestrator runs its loss on them, below the public API and above this module:
``functional.vocab_parallel_logits_loss`` (logits, with a dense or a top-k teacher form),
``linear.vocab_parallel_linear_loss`` (LM heads) and ``topk.vocab_parallel_linear_topk_loss`` (an LM head and a
top-k teacher). The algorithm they share:

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

A top-k teacher (``_topk_ops.TopkPieces``) takes the same steps with its own pieces: the partials are each
rank's sums over its columns outside the teacher's k ids plus the logits of the ids (and of the target) that
it holds (5 + 1 + k fp32 per row); the merge forms the whole loss, whose terms are O(k) per row, so step 4
and the second pass's sums are not needed: the second pass is the gradient alone.

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

import struct
import sys
import zlib
from typing import NamedTuple

import torch
import torch.distributed as dist

from .spec import check_vocab_size

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
        check_vocab_size(vocab_size)
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


def _settings(*values) -> str:
    """The loss's settings as one string, compared across ranks by checksum."""
    return repr(values)


def sharded_rows(pieces, shards: Shards, student, teacher, target, grad=None, row_grad=None):
    """The statistics (NUM_STATS, N) of rows whose columns the ranks of ``shards.group`` hold, the same on every
    rank, from this rank's columns (``student``: (..., width); ``teacher``: what ``pieces`` reads of it, e.g. the
    teacher's columns here, or a top-k teacher's ids and log-probabilities); with ``grad``, this rank's columns'
    gradient of sum_i row_grad_i * loss_i written into it. ``pieces``: ``_ops.RowPieces`` or
    ``_topk_ops.TopkPieces``. Collectives: the partials' all_gather, and for pieces whose loss sums over every
    column (``has_piece_sums``, a dense teacher) the sums' all_reduce (KL, DIV_GRAD, entropy); the reverse KL's
    and the JSD's gradient needs the reduced sums, in one more pass over this rank's columns."""
    local = pieces.partial(student, teacher, target, shards.offset, chunk_v=student.shape[-1])
    n_partial, n_rows = local.shape[:2]
    gathered = local.new_empty((len(shards.widths) * n_partial, n_rows))
    _all_gather_single(gathered, local.reshape(n_partial, n_rows), group=shards.group)
    stats = pieces.merge(gathered.view(-1, n_partial, n_rows).permute(1, 2, 0), teacher, target)
    fused_grad = None if pieces.gradient_needs_sums else grad
    sums = pieces.second_pass(student, teacher, target, stats, shards.offset, grad=fused_grad, row_grad=row_grad)
    if pieces.has_piece_sums:
        sums = sums.sum(-1, keepdim=True)
        dist.all_reduce(sums, group=shards.group)
        pieces.finish(stats, sums)
    if grad is not None and fused_grad is None:
        pieces.second_pass(student, teacher, target, stats, shards.offset, grad=grad, row_grad=row_grad)
    return stats


# ---------------------------------------------------------------------------------------------- DTensor logits


def is_dtensor(x) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (without importing that module, slow to import:
    no DTensor exists before it is imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def _local_logits(student, teacher, target, process_group):
    """(student, teacher, target, group, place in column order): DTensor logits sharded on the last dimension over a
    1-D mesh become their local shards (differentiably) on the mesh's group (``local_shards``)."""
    if not (is_dtensor(student) or is_dtensor(teacher)):
        # Anything else (None included) is checked in the agreement, where every rank learns of it.
        return student, teacher, target, process_group, _member(process_group)
    (student, teacher), target, group, index = local_shards(
        (("student_logits", student), ("teacher_logits", teacher)), target, process_group)
    return student, teacher, target, group, index


def local_shards(named, target, process_group):
    """((local tensors), target, group, place in column order) for ``named``, (name, DTensor) pairs sharded on the
    last dimension over one 1-D mesh: their local shards (differentiably) on the mesh's group, and a replicated
    DTensor target's local copy. Only global facts of DTensors are checked here, the same on every rank, so
    raising at once leaves no rank waiting."""
    from torch.distributed.tensor import Shard

    for name, x in named:
        if not is_dtensor(x):
            raise TypeError(f"{name} must be a DTensor like the other logits, got {type(x).__name__}")
        if x.device_mesh.ndim != 1 or tuple(x.placements) != (Shard(x.ndim - 1),):
            raise ValueError(f"{name} is a DTensor with placements {tuple(x.placements)} over a mesh of shape "
                             f"{tuple(x.device_mesh.shape)}; the vocabulary-parallel loss takes DTensors sharded on "
                             "the last dimension (Shard(-1)) over a 1-D mesh: redistribute them, or pass "
                             ".full_tensor() for the loss on one device")
    mesh = named[0][1].device_mesh
    if any(x.device_mesh != mesh for _, x in named):
        raise ValueError(f"{' and '.join(name for name, _ in named)} must be DTensors over the same device mesh")
    group = mesh.get_group()
    if process_group is not None and process_group != group:
        raise ValueError("process_group must be the DTensor logits' mesh group (or None)")
    return tuple(x.to_local() for _, x in named), replicated_local("target", target), group, mesh.get_local_rank()


def replicated_local(name, x):
    """A DTensor argument that every rank holds whole (replicated), as its local tensor; anything else as it is."""
    if not is_dtensor(x):
        return x
    if not all(p.is_replicate() for p in x.placements):
        raise ValueError(f"{name} must be replicated (every rank holds all of it), got placements "
                         f"{tuple(x.placements)}")
    return x.to_local()


# ---------------------------------------------------------------------------------------------- LM heads


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
