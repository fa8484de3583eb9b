"""The checks that ``test_distributed.py`` runs in spawned gloo processes, all of them in one spawn per world size
(spawning costs seconds): ``main`` runs every check on every rank, in the same order, and writes per rank which
failed (a traceback) and which check it is in (the name a timeout reports).

Every check computes first (all collectives) and asserts last, then the ranks meet at a barrier, so one rank's
failed assertion does not leave the others waiting in a collective of the next check. Each rank builds the
same full tensors from one seed and takes its slice; the reference is the float64 loss of the whole rows and
the single-process compiled loss.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist
from torch import nn

import matrix
import ttm_kernels
from ttm_kernels import reference
from test_fused_loss import FUSED, REFERENCE, assert_close, reference_loss_and_grad

V = 1500
LEAD = (3, 3)
# Uneven shards; with 3 ranks the middle one holds a single column.
BOUNDS = {2: (0, 700, V), 3: (0, 700, 701, V)}
IGNORE = -100
KW = {"wttm": dict(gamma=0.3, beta=2.0, ce_weight=0.5), "ttm": dict(gamma=0.2, beta=3.0, ce_weight=0.7),
      "kd": dict(temperature=3.0, beta=0.9, ce_weight=0.1)}
LINEAR = {"wttm": ttm_kernels.fused_linear_wttm_loss, "ttm": ttm_kernels.fused_linear_ttm_loss,
          "kd": ttm_kernels.fused_linear_kd_loss}


def world_group():
    return dist.group.WORLD


def columns(rank, world):
    bounds = BOUNDS[world]
    return bounds[rank], bounds[rank + 1]


def make_rows(seed=0, n=9, spread=10.0):
    """Full float64 (n, V) logits and target, the same on every rank: a target in every shard (columns 5, 700,
    V - 1), an ignored row, teacher and student -inf masks across the shard boundary at column 700."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=gen, dtype=torch.float64) * spread
    v = torch.randn(n, V, generator=gen, dtype=torch.float64) * spread
    target = torch.randint(0, V, (n,), generator=gen)
    target[:4] = torch.tensor([5, 700, V - 1, IGNORE])
    v[4, 600:800] = float("-inf")
    z[5, 650:760] = v[5, 650:760] = float("-inf")
    target[4:6] = torch.tensor([100, 900])
    return z, v, target


def gathered(x):
    """``x`` from every rank, stacked (the ranks' losses must be bitwise equal)."""
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.stack(out)


def assert_same_on_every_rank(name, x):
    everyone = gathered(x.detach())
    assert all(torch.equal(everyone[0], other) for other in everyone[1:]), f"{name} differs between the ranks"


def sharded_loss_and_grad(kind, z, v, target, rank, world, upstream=None, dtype=torch.float32, backend="auto",
                          **extra):
    a, b = columns(rank, world)
    local = z[:, a:b].to(dtype).view(*LEAD, b - a).requires_grad_()
    loss = FUSED[kind](local, v[:, a:b].to(dtype).view(*LEAD, b - a), target.view(LEAD), backend=backend,
                       process_group=world_group(), **KW[kind], **extra)
    loss.backward(upstream)
    return loss.detach(), local.grad.reshape(-1, b - a)


# ------------------------------------------------------------------------------------------- logits


def check_loss_matches_reference(kind, reduction):
    def check(rank, world):
        z, v, target = make_rows(seed=1)
        upstream = torch.linspace(0.5, 2.0, z.shape[0]).view(LEAD) if reduction == "none" else None
        loss, grad = sharded_loss_and_grad(kind, z, v, target, rank, world, upstream, reduction=reduction)
        assert_same_on_every_rank("loss", loss)
        ref_loss, ref_grad = reference_loss_and_grad(kind, z.view(*LEAD, V), v.view(*LEAD, V), target.view(LEAD),
                                                     upstream, reduction=reduction, **KW[kind])
        one = FUSED[kind](z.float().view(*LEAD, V).requires_grad_(), v.float().view(*LEAD, V), target.view(LEAD),
                          reduction=reduction, **KW[kind])
        a, b = columns(rank, world)
        assert_close("loss vs float64", ref_loss, loss, 2e-6, 1e-6)
        assert_close("grad vs float64", ref_grad.reshape(-1, V)[:, a:b], grad, 1e-5, 1e-9)
        assert_close("loss vs one process", one.detach(), loss, 2e-6, 1e-6)
    return check


def check_one_shard_masked(rank, world):
    """Every row of the last rank's shard is -inf in both logits (no target there)."""
    z, v, target = make_rows(seed=2)
    last = BOUNDS[world][-2]
    z[:, last:] = v[:, last:] = float("-inf")
    target[target >= last] = 3
    loss, grad = sharded_loss_and_grad("wttm", z, v, target, rank, world)
    ref_loss, ref_grad = reference_loss_and_grad("wttm", z, v, target, **KW["wttm"])
    a, b = columns(rank, world)
    assert torch.isfinite(loss)
    assert_close("loss", ref_loss, loss, 2e-6, 1e-6)
    assert_close("grad", ref_grad[:, a:b], grad, 1e-5, 1e-9)


def check_no_target(rank, world):
    z, v, _ = make_rows(seed=3)
    a, b = columns(rank, world)
    local = z[:, a:b].float().requires_grad_()
    loss = ttm_kernels.fused_ttm_loss(local, v[:, a:b].float(), gamma=0.2, beta=3.0, process_group=world_group())
    loss.backward()
    ref_loss, ref_grad = reference_loss_and_grad("ttm", z, v, None, gamma=0.2, beta=3.0)
    assert_close("loss", ref_loss, loss.detach(), 2e-6, 1e-6)
    assert_close("grad", ref_grad[:, a:b], local.grad, 1e-5, 1e-9)


def check_all_rows_ignored(rank, world):
    z, v, target = make_rows(seed=4)
    target[:] = IGNORE
    loss, grad = sharded_loss_and_grad("wttm", z, v, target, rank, world)
    assert loss.item() == 0.0 and not grad.any()


def check_components(rank, world):
    z, v, target = make_rows(seed=5)
    a, b = columns(rank, world)
    loss, parts = ttm_kernels.fused_wttm_loss(z[:, a:b].float(), v[:, a:b].float(), target, gamma=0.3,
                                              process_group=world_group(), return_components=True)
    one, one_parts = ttm_kernels.fused_wttm_loss(z.float(), v.float(), target, gamma=0.3, return_components=True)
    assert_close("loss", one, loss, 2e-6, 1e-6)
    for name, ref, out in zip(one_parts._fields, one_parts, parts):
        assert_close(name, ref, out, 2e-6, 1e-6)


def check_num_items_in_batch(rank, world):
    """Micro-batches accumulated with the whole batch's count (num_items_in_batch) equal the whole batch."""
    z, v, target = make_rows(seed=8)
    a, b = columns(rank, world)
    count = int((target != IGNORE).sum())
    whole = z[:, a:b].float().requires_grad_()
    ttm_kernels.fused_wttm_loss(whole, v[:, a:b].float(), target, gamma=0.3, process_group=world_group()).backward()
    parts = z[:, a:b].float().requires_grad_()
    for rows in (slice(0, 4), slice(4, 9)):
        ttm_kernels.fused_wttm_loss(parts[rows], v[rows, a:b].float(), target[rows], gamma=0.3,
                                    process_group=world_group(), num_items_in_batch=count).backward()
    assert_close("grad", whole.grad, parts.grad, 1e-6, 1e-9)


def check_bfloat16(rank, world):
    """bf16 logits against the one-process compiled loss on the same bf16 values (fp32 arithmetic in both)."""
    z, v, target = make_rows(seed=6)
    z, v = z.bfloat16().double(), v.bfloat16().double()
    loss, grad = sharded_loss_and_grad("wttm", z, v, target, rank, world, dtype=torch.bfloat16)
    one = z.bfloat16().view(*LEAD, V).requires_grad_()
    one_loss = ttm_kernels.fused_wttm_loss(one, v.bfloat16().view(*LEAD, V), target.view(LEAD), **KW["wttm"])
    one_loss.backward()
    a, b = columns(rank, world)
    assert grad.dtype == torch.bfloat16
    assert_close("loss", one_loss.detach(), loss, 2e-6, 1e-6)
    assert_close("grad", one.grad.reshape(-1, V)[:, a:b], grad, 1e-2)  # bf16 rounding of the gradient


def check_triton_interpreted(rank, world):
    """The Triton kernels' partials, merge and second pass (the interpreter on CPU tensors)."""
    z, v, target = make_rows(seed=7, n=6)
    for reduction in ("mean", "none"):
        a, b = columns(rank, world)
        local = z[:, a:b].float().requires_grad_()
        loss = ttm_kernels.fused_wttm_loss(local, v[:, a:b].float(), target, reduction=reduction, backend="triton",
                                           process_group=world_group(), **KW["wttm"])
        upstream = torch.linspace(0.5, 2.0, 6) if reduction == "none" else None
        loss.backward(upstream)
        ref_loss, ref_grad = reference_loss_and_grad("wttm", z, v, target, upstream, reduction=reduction,
                                                     **KW["wttm"])
        assert_close(f"{reduction} loss", ref_loss, loss.detach(), 2e-6, 1e-6)
        assert_close(f"{reduction} grad", ref_grad[:, a:b], local.grad, 1e-5, 1e-9)


def check_dtensor_logits(rank, world):
    """DTensor logits sharded on the last dimension (DTensor's own uneven split) take the vocabulary-parallel
    path without process_group; the gradient reaches the DTensor leaf."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    z, v, target = make_rows(seed=8)
    student = distribute_tensor(z.float(), mesh, [Shard(-1)]).requires_grad_()
    teacher = distribute_tensor(v.float(), mesh, [Shard(-1)])
    loss = ttm_kernels.fused_kd_loss(student, teacher, distribute_tensor(target, mesh, [Replicate()]), **KW["kd"])
    loss.backward()
    grad = student.grad.full_tensor()
    ref_loss, ref_grad = reference_loss_and_grad("kd", z, v, target, **KW["kd"])
    assert student.grad.placements == (Shard(1),)
    assert_close("loss", ref_loss, loss.detach(), 2e-6, 1e-6)
    assert_close("grad", ref_grad, grad, 1e-5, 1e-9)


def check_dtensor_topk(rank, world):
    """Student logits as a DTensor sharded on the last dimension take the vocabulary-parallel top-k path without
    process_group (the top-k and the target replicated DTensors); the gradient reaches the DTensor leaf."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    z, v, target = make_rows(seed=10)
    top = torch.log_softmax(v, -1).topk(12, -1)
    ids, logprobs = top.indices, top.values.float()
    student = distribute_tensor(z.float(), mesh, [Shard(-1)]).requires_grad_()
    replicated = [distribute_tensor(x, mesh, [Replicate()]) for x in (ids, logprobs, target)]
    loss = ttm_kernels.fused_wttm_loss_topk(student, *replicated, **KW["wttm"])
    loss.backward()
    z64 = z.float().double().requires_grad_()
    ref = reference.wttm_loss_topk(z64, ids, logprobs.double(), target, **KW["wttm"])
    ref.backward()
    assert student.grad.placements == (Shard(1),)
    assert_close("loss", ref.detach(), loss.detach(), 1e-5, 1e-6)
    assert_close("grad", z64.grad, student.grad.full_tensor(), 1e-4, 1e-9)


# ------------------------------------------------------------------------------------------- errors


def expect_error(rank, world, make_call, own_error, own_match, bad_ranks):
    """Every rank raises: the ranks in ``bad_ranks`` ``own_error`` matching ``own_match``, the others a
    RuntimeError naming the first bad rank, or all ``own_error`` when ``bad_ranks`` is None (a disagreement every
    rank sees). Then a good call on every rank shows that no rank was left behind in a collective."""
    try:
        make_call()
    except Exception as exc:  # noqa: BLE001 (checked below)
        caught = exc
    else:
        caught = None
    z, v, target = make_rows(seed=9)
    after, _ = sharded_loss_and_grad("wttm", z, v, target, rank, world)
    assert caught is not None, "no error raised"
    if bad_ranks is None or rank in bad_ranks:
        assert isinstance(caught, own_error) and own_match in str(caught), repr(caught)
    else:
        assert isinstance(caught, RuntimeError) and f"rank {bad_ranks[0]} of the process group rejected" in str(
            caught), repr(caught)
    assert torch.isfinite(after)


def _call(rank, world, n=9, dtype=torch.float32, change_target=None, requires_grad_teacher=False, gamma=0.3,
          student_none=False, **extra):
    z, v, target = make_rows(seed=10, n=n)
    if change_target is not None:
        change_target(target)
    a, b = columns(rank, world)
    teacher = v[:, a:b].to(dtype).requires_grad_(requires_grad_teacher)
    student = None if student_none else z[:, a:b].to(dtype)
    return lambda: ttm_kernels.fused_wttm_loss(student, teacher, target, gamma=gamma, process_group=world_group(),
                                               **extra)


def check_error_rows_differ(rank, world):
    expect_error(rank, world, _call(rank, world, n=9 if rank == 0 else 8), ValueError, "number of rows N", None)


def check_error_dtypes_differ(rank, world):
    expect_error(rank, world, _call(rank, world, dtype=torch.float32 if rank == 0 else torch.bfloat16), ValueError,
                 "student_logits dtype: rank 0: torch.float32, rank 1: torch.bfloat16", None)


def check_error_target_outside_vocabulary(rank, world):
    def bad(target):
        target[7] = V
    expect_error(rank, world, _call(rank, world, change_target=bad), ValueError,
                 f"target holds class indices outside [0, {V})", None)


def check_error_targets_differ(rank, world):
    def differ(target):
        target[8] = (target[8] + rank) % V
    expect_error(rank, world, _call(rank, world, change_target=differ), ValueError, "different targets", None)


def check_error_settings_differ(rank, world):
    expect_error(rank, world, _call(rank, world, gamma=0.3 + 0.1 * rank), ValueError, "loss settings", None)


def check_error_one_rank_rejects(rank, world):
    """Only the last rank's arguments are bad (a teacher that requires grad): it raises its own error, the
    others say which rank rejected what; none waits."""
    last = world - 1
    expect_error(rank, world, _call(rank, world, requires_grad_teacher=rank == last), ValueError,
                 "teacher_logits requires grad", [last])


def check_error_num_items_differ(rank, world):
    """num_items_in_batch is in the agreement: ranks passing different counts would each return another loss."""
    expect_error(rank, world, _call(rank, world, num_items_in_batch=torch.tensor(12.0 + rank)), ValueError,
                 "disagree on num_items_in_batch: rank 0: 12, rank 1: 13", None)


def check_error_one_rank_passes_none(rank, world):
    """A rank passing student_logits=None raises its own TypeError in the agreement, the others one naming it:
    none waits in a collective."""
    last = world - 1
    expect_error(rank, world, _call(rank, world, student_none=rank == last), TypeError,
                 "student_logits must be a torch.Tensor, got NoneType", [last])


def check_vocab_size(rank, world):
    """vocab_size= lets the ranks check that their shards tile the vocabulary: the right size changes nothing; a
    wrong one, or ranks passing different sizes, make every rank raise."""
    z, v, target = make_rows(seed=18)
    checked, _ = sharded_loss_and_grad("wttm", z, v, target, rank, world, vocab_size=V)
    plain, _ = sharded_loss_and_grad("wttm", z, v, target, rank, world)
    expect_error(rank, world, _call(rank, world, vocab_size=V + 1), ValueError,
                 f"sum to {V}, not vocab_size={V + 1}", None)
    expect_error(rank, world, _call(rank, world, vocab_size=V + rank), ValueError,
                 f"disagree on vocab_size: rank 0: {V}, rank 1: {V + 1}", None)
    assert torch.equal(checked, plain)


# ------------------------------------------------------------------------------------------- fused linear


def make_linear(seed, n=10, h_s=16, h_t=24):
    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h_s, generator=gen, dtype=torch.float64)
    ht = torch.randn(n, h_t, generator=gen, dtype=torch.float64)
    ws = torch.randn(V, h_s, generator=gen, dtype=torch.float64) * 2
    wt = torch.randn(V, h_t, generator=gen, dtype=torch.float64) * 2
    bs = torch.randn(V, generator=gen, dtype=torch.float64)
    bt = torch.randn(V, generator=gen, dtype=torch.float64)
    target = torch.randint(0, V, (n,), generator=gen)
    target[:4] = torch.tensor([5, 700, V - 1, IGNORE])
    return hs, ws, bs, ht, wt, bt, target


def linear_reference(kind, hs, ws, bs, ht, wt, bt, target, upstream, reduction):
    """Loss and gradients (hidden, weight, bias) of the float64 reference on the whole LM heads."""
    hs, ws, bs = (x.clone().requires_grad_() for x in (hs, ws, bs))
    loss = REFERENCE[kind](hs @ ws.T + bs, ht @ wt.T + bt, target, reduction=reduction, **KW[kind])
    loss.backward(upstream)
    return loss.detach(), hs.grad, ws.grad, bs.grad


def sharded_linear(kind, data, rank, world, reduction, upstream=None, **extra):
    hs, ws, bs, ht, wt, bt, target = data
    a, b = columns(rank, world)
    leaves = [hs.float().requires_grad_(), ws[a:b].float().requires_grad_(), bs[a:b].float().requires_grad_()]
    loss = LINEAR[kind](leaves[0], leaves[1], ht.float(), wt[a:b].float(), target, student_bias=leaves[2],
                        teacher_bias=bt[a:b].float(), reduction=reduction, process_group=world_group(), **KW[kind],
                        **extra)
    loss.backward(upstream)
    return (loss.detach(), *(x.grad for x in leaves))


def check_linear_matches_reference(kind, reduction):
    def check(rank, world):
        data = make_linear(seed=11)
        n = data[0].shape[0]
        upstream = torch.linspace(0.5, 2.0, n) if reduction == "none" else None
        loss, dh, dw, db = sharded_linear(kind, data, rank, world, reduction, upstream, chunk_size=4)
        assert_same_on_every_rank("loss", loss)
        hs, ws, bs, ht, wt, bt, target = data
        one = LINEAR[kind](hs.float(), ws.float(), ht.float(), wt.float(), target, student_bias=bs.float(),
                           teacher_bias=bt.float(), reduction=reduction, chunk_size=4, **KW[kind])
        ref = linear_reference(kind, *data, upstream, reduction)
        a, b = columns(rank, world)
        assert_close("loss vs float64", ref[0], loss, 2e-6, 1e-6)
        assert_close("loss vs one process", one, loss, 2e-6, 1e-6)
        assert_close("hidden grad (summed over the ranks)", ref[1], dh, 1e-5, 1e-9)
        assert_close("weight grad slice", ref[2][a:b], dw, 1e-5, 1e-9)
        assert_close("bias grad slice", ref[3][a:b], db, 1e-5, 1e-9)
    return check


def check_linear_local_hidden_grad(rank, world):
    """reduce_hidden_grad=False returns this rank's part of the hidden-state gradient; the parts sum to it."""
    data = make_linear(seed=12)
    _, dh, dw, _ = sharded_linear("wttm", data, rank, world, "mean", reduce_hidden_grad=False)
    total = dh.clone()
    dist.all_reduce(total)
    ref = linear_reference("wttm", *data, None, "mean")
    a, b = columns(rank, world)
    assert_close("summed parts", ref[1], total, 1e-5, 1e-9)
    assert_close("weight grad slice", ref[2][a:b], dw, 1e-5, 1e-9)
    assert not torch.allclose(dh, total), "the part is the whole gradient"


def check_linear_default_chunks(rank, world):
    """The default chunk size comes from the widest shard, so every rank runs the same chunks (each with its
    collectives) whatever its own width."""
    data = make_linear(seed=13, n=300)
    loss, dh, dw, _ = sharded_linear("kd", data, rank, world, "sum")
    ref = linear_reference("kd", *data, None, "sum")
    a, b = columns(rank, world)
    assert_close("loss", ref[0], loss, 2e-6, 1e-6)
    assert_close("hidden grad", ref[1], dh, 1e-5, 1e-9)
    assert_close("weight grad slice", ref[2][a:b], dw, 1e-5, 1e-9)


def check_linear_error_hidden_sizes_differ(rank, world):
    data = make_linear(seed=14)
    hs, ws, bs, ht, wt, bt, target = data
    a, b = columns(rank, world)
    width = 16 if rank == 0 else 8

    def call():
        return ttm_kernels.fused_linear_wttm_loss(hs[:, :width].float(), ws[a:b, :width].float(), ht.float(),
                                                  wt[a:b].float(), target, process_group=world_group())
    expect_error(rank, world, call, ValueError, "student hidden size: rank 0: 16, rank 1: 8", None)


def check_linear_error_one_rank_passes_none(rank, world):
    """The fused linear loss's agreement likewise: a None student_hidden on one rank, and num_items_in_batch."""
    hs, ws, bs, ht, wt, bt, target = make_linear(seed=15)
    a, b = columns(rank, world)
    last = world - 1

    def call(hidden, **extra):
        return lambda: ttm_kernels.fused_linear_wttm_loss(hidden, ws[a:b].float(), ht.float(), wt[a:b].float(),
                                                          target, process_group=world_group(), **extra)
    expect_error(rank, world, call(None if rank == last else hs.float()), TypeError,
                 "student_hidden must be a torch.Tensor, got NoneType", [last])
    expect_error(rank, world, call(hs.float(), num_items_in_batch=7 if rank == 0 else 5), ValueError,
                 "disagree on num_items_in_batch: rank 0: 7, rank 1: 5", None)


# ------------------------------------------------------------------------------------------- the matrix


def check_matrix_cell(cell):
    """One process_group cell of the variant registry (``matrix.py``): this rank's columns (or LM-head rows)
    against the float64 reference of the whole rows, the loss the same on every rank; or the documented refusal,
    raised by every rank."""
    def check(rank, world):
        inputs = matrix.make_inputs(cell, seed=zlib.crc32(cell.id.encode()))
        columns = matrix.COLUMNS[world][rank:rank + 2]
        local = matrix.shard(inputs, columns)
        error = matrix.documented_error(cell, distributed=True)
        if error is not None:
            with pytest.raises(error[0], match=error[1]):
                matrix.run_cell(cell, local, process_group=world_group())
            return
        upstream = matrix.upstream(cell)
        loss, grads = matrix.run_cell(cell, local, upstream, process_group=world_group())
        assert_same_on_every_rank("loss", loss)
        ref_loss, ref_grads = matrix.reference_cell(cell, inputs, upstream)
        matrix.assert_matches(cell, loss, grads, ref_loss, ref_grads, columns)
    return check


def check_weight_norm(cell):
    """WTTM's weight_norm="vocab" with process_group: the factor comes from the whole vocabulary (the ranks' widths
    together), not a rank's shard; this rank's part equals the one-process loss and the float64 reference."""
    def check(rank, world):
        inputs = matrix.make_inputs(cell, seed=zlib.crc32(cell.id.encode()) + 1)
        columns = matrix.COLUMNS[world][rank:rank + 2]
        upstream = matrix.upstream(cell)
        loss, grads = matrix.run_cell(cell, matrix.shard(inputs, columns), upstream, process_group=world_group(),
                                      weight_norm="vocab")
        one_loss, one_grads = matrix.run_cell(cell, inputs, upstream, weight_norm="vocab")
        assert_same_on_every_rank("loss", loss)
        ref_loss, ref_grads = matrix.reference_cell(cell, inputs, upstream, weight_norm="vocab")
        matrix.assert_matches(cell, loss, grads, ref_loss, ref_grads, columns)
        matrix.assert_matches(cell, loss, grads, one_loss, one_grads, columns)
    return check


WEIGHT_NORM_CELLS = [matrix.Cell("wttm", "logits", "3d", "cpu", "mean", "plain"),
                     matrix.Cell("wttm", "head", "sliced", "cpu", "none", "softcap"),
                     matrix.Cell("wttm", "topk", "3d", "cpu", "mean_num_items", "plain"),
                     matrix.Cell("wttm", "head_topk", "sliced", "cpu", "sum", "plain")]


def check_topk_tails_and_full_rows(rank, world):
    """Top-k with process_group, both tails, on the kernels ("cpu") and the reference ("torch"), on rows whose ids
    cover the whole vocabulary (an empty tail on every rank), rows whose ids all lie in one rank's columns, a row
    of padding and an ignored row; against the float64 reference of the whole rows, and the logged components
    (the student's entropy included) against one process's."""
    v, k = matrix.VOCAB, matrix.VOCAB
    gen = torch.Generator().manual_seed(17)
    z = torch.randn(6, v, generator=gen, dtype=torch.float64) * 10
    logprobs_full = torch.log_softmax(torch.randn(6, v, generator=gen, dtype=torch.float64) * 10, -1)
    ids = torch.argsort(torch.rand(6, v, generator=gen), -1)
    ids[2:4, 5:] = -1                              # partial rows
    ids[2, :5] = torch.tensor([0, 3, 7, 11, 19])  # all in rank 0's columns
    ids[3, :5] = torch.tensor([20, 25, 30, 33, 36])  # none in rank 0's
    ids[4, 1:] = -1                                # one id
    logprobs = logprobs_full.gather(-1, ids.clamp_min(0))
    target = torch.tensor([4, 20, -100, 36, 0, 21])
    columns = matrix.COLUMNS[world][rank:rank + 2]
    a, b = columns
    results = []
    for backend in ("cpu", "torch"):
        for tail in ("bucket", "renormalize"):
            options = dict(gamma=0.4, beta=2.0, tail=tail, backend=backend, return_components=True)
            local = z[:, a:b].float().requires_grad_()
            loss, parts = ttm_kernels.fused_wttm_loss_topk(local, ids, logprobs.float(), target,
                                                           process_group=world_group(), **options)
            loss.backward()
            _, one_parts = ttm_kernels.fused_wttm_loss_topk(z.float(), ids, logprobs.float(), target, **options)
            z64 = z.float().double().requires_grad_()
            ref = reference.wttm_loss_topk(z64, ids, logprobs.float().double(), target, gamma=0.4, beta=2.0,
                                           tail=tail)
            ref.backward()
            results.append((f"{backend} {tail}", loss.detach(), local.grad, parts, ref.detach(), z64.grad[:, a:b],
                            one_parts))
    for name, loss, grad, parts, ref_loss, ref_grad, one_parts in results:
        assert_same_on_every_rank(f"{name} loss", loss)
        assert_close(f"{name} loss", ref_loss, loss, 1e-5, 1e-6)
        assert_close(f"{name} grad", ref_grad, grad, 1e-4, 1e-7)
        for field, one, out in zip(one_parts._fields, one_parts, parts):
            assert_close(f"{name} {field}", one, out, 1e-5, 1e-6)


def check_group_of_one(rank, world):
    """A process group of one rank holds whole rows: every teacher form's loss and gradients with it are the
    one-process call's, bit for bit (the one-process kernels run)."""
    own = [dist.new_group([r]) for r in range(world)][rank]  # every rank creates every group
    for form, shape, reduction in (("logits", "3d", "mean"), ("head", "sliced", "none"), ("topk", "sliced", "sum"),
                                   ("head_topk", "3d", "mean_num_items")):
        cell = matrix.Cell("wttm", form, shape, "cpu", reduction, "softcap")
        inputs = matrix.make_inputs(cell, seed=zlib.crc32(cell.id.encode()))
        upstream = matrix.upstream(cell)
        loss, grads = matrix.run_cell(cell, inputs, upstream, process_group=own)
        one_loss, one_grads = matrix.run_cell(cell, inputs, upstream)
        assert torch.equal(loss, one_loss), (cell.id, loss, one_loss)
        assert all(torch.equal(grads[name], one_grads[name]) for name in one_grads), cell.id


def check_topk_error_ids_outside_vocabulary(rank, world):
    """The ids' range is checked against the global vocabulary, known after the agreement: every rank raises."""
    inputs = matrix.make_inputs(matrix.Cell("wttm", "topk", "3d", "cpu", "mean", "plain"), seed=3)
    local = matrix.shard(inputs, matrix.COLUMNS[world][rank:rank + 2])
    local["teacher_topk_ids"] = local["teacher_topk_ids"].clone()
    local["teacher_topk_ids"][0, 0, 0] = matrix.VOCAB

    def call():
        return ttm_kernels.fused_wttm_loss_topk(local["student_logits"].float(), local["teacher_topk_ids"],
                                                local["teacher_topk_logprobs"].float(), local["target"],
                                                process_group=world_group())
    expect_error(rank, world, call, ValueError, f"teacher_topk_ids holds ids outside [0, {matrix.VOCAB})", None)


# ------------------------------------------------------------------------------------------- FSDP2


class Student(nn.Module):
    def __init__(self, h, vocab):
        super().__init__()
        self.trunk = nn.Linear(h, h)
        self.lm_head = nn.Linear(h, vocab)

    def forward(self, x):
        return torch.tanh(self.trunk(x))


FSDP_TOPK = 8


def full_teacher_weight(teacher_head, separate_head):
    return teacher_head.weight.full_tensor() if separate_head else teacher_head.weight.detach()


def teacher_topk(teacher_logits):
    """The teacher's top FSDP_TOPK ids and log-probabilities per row, as a served teacher gives them."""
    top = torch.log_softmax(teacher_logits.double(), -1).topk(FSDP_TOPK, -1)
    return top.indices, top.values


def fsdp_reference(model, data, teacher_head, topk):
    """The gradients of the mean over the ranks of each rank's mean loss, float64 on one process."""
    model = model.double()
    for x, ht, target in data:
        logits, teacher_logits = model.lm_head(model(x)), ht @ teacher_head.weight.double().T
        if topk:
            loss = reference.wttm_loss_topk(logits, *teacher_topk(teacher_logits), target, **KW["wttm"])
        else:
            loss = reference.wttm_loss(logits, teacher_logits, target, **KW["wttm"])
        (loss / len(data)).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def check_fsdp2(separate_head, topk=False):
    """The LM head of a fully_shard-ed model, given to fused_linear_wttm_loss (or, with ``topk``, to
    fused_linear_wttm_loss_topk with the teacher's top-k): as its own FSDP unit (its weight is a sharded DTensor
    outside its forward, gathered by the loss) or in the root's unit (FSDP2 leaves the root's parameters unsharded
    after the forward, and reduce-scatters their gradients itself)."""
    def check(rank, world):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(15)
        h = 12
        model, teacher_head = Student(h, V), nn.Linear(h, V, bias=False).requires_grad_(False)
        full = copy.deepcopy(model)
        mesh = init_device_mesh("cpu", (world,))
        if separate_head:
            fully_shard(model.lm_head, mesh=mesh)
            fully_shard(teacher_head, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # Each rank its own batch (data parallel), known to every rank for the reference.
        data = []
        for r in range(world):
            gen = torch.Generator().manual_seed(100 + r)
            target = torch.randint(0, V, (6,), generator=gen)
            target[r] = IGNORE
            data.append((torch.randn(6, h, generator=gen, dtype=torch.float64),
                         torch.randn(6, h, generator=gen, dtype=torch.float64) * 3, target))
        x, ht, target = data[rank]
        hidden = model(x.float())
        head = model.lm_head
        given = type(head.weight).__name__
        if topk:
            with torch.no_grad():
                teacher_logits = ht @ full_teacher_weight(teacher_head, separate_head).double().T
            ids, logprobs = teacher_topk(teacher_logits)
            loss = ttm_kernels.fused_linear_wttm_loss_topk(hidden, head.weight, ids, logprobs.float(), target,
                                                           student_bias=head.bias, **KW["wttm"])
        else:
            loss = ttm_kernels.fused_linear_wttm_loss(hidden, head.weight, ht.float(), teacher_head.weight, target,
                                                      student_bias=head.bias, **KW["wttm"])
        loss.backward()
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        full_teacher = nn.Linear(h, V, bias=False)
        full_teacher.weight.data = full_teacher_weight(teacher_head, separate_head)
        ref = fsdp_reference(full, data, full_teacher, topk)
        assert given == ("DTensor" if separate_head else "Parameter"), given
        for name, grad in grads.items():
            assert_close(name, ref[name], grad, 1e-5, 1e-9)
    return check


# ------------------------------------------------------------------------------------------- registry

CHECKS = {
    **{f"fused_loss-{kind}-{reduction}": check_loss_matches_reference(kind, reduction)
       for kind in ("wttm", "ttm", "kd") for reduction in ("mean", "sum", "none")},
    "fused_loss-one-shard-masked": check_one_shard_masked,
    "fused_loss-no-target": check_no_target,
    "fused_loss-all-rows-ignored": check_all_rows_ignored,
    "fused_loss-components": check_components,
    "fused_loss-num-items-in-batch": check_num_items_in_batch,
    "fused_loss-bfloat16": check_bfloat16,
    "fused_loss-triton-interpreted": check_triton_interpreted,
    "fused_loss-dtensor": check_dtensor_logits,
    "fused_loss_topk-dtensor": check_dtensor_topk,
    "error-rows-differ": check_error_rows_differ,
    "error-dtypes-differ": check_error_dtypes_differ,
    "error-target-outside-vocabulary": check_error_target_outside_vocabulary,
    "error-targets-differ": check_error_targets_differ,
    "error-settings-differ": check_error_settings_differ,
    "error-one-rank-rejects": check_error_one_rank_rejects,
    "error-num-items-differ": check_error_num_items_differ,
    "fused_loss-vocab-size": check_vocab_size,
    "error-one-rank-passes-none": check_error_one_rank_passes_none,
    **{f"fused_linear-{kind}-{reduction}": check_linear_matches_reference(kind, reduction)
       for kind, reduction in (("wttm", "mean"), ("ttm", "sum"), ("kd", "none"), ("wttm", "none"))},
    "fused_linear-local-hidden-grad": check_linear_local_hidden_grad,
    "fused_linear-default-chunks": check_linear_default_chunks,
    "fused_linear-error-hidden-sizes-differ": check_linear_error_hidden_sizes_differ,
    "fused_linear-error-one-rank-passes-none": check_linear_error_one_rank_passes_none,
    **{f"matrix-{cell.id}": check_matrix_cell(cell) for cell in matrix.distributed_cells()},
    **{f"weight_norm-{cell.id}": check_weight_norm(cell) for cell in WEIGHT_NORM_CELLS},
    "topk-tails-and-full-rows": check_topk_tails_and_full_rows,
    "topk-error-ids-outside-vocabulary": check_topk_error_ids_outside_vocabulary,
    "fused_loss-group-of-one": check_group_of_one,
    "fsdp2-separate-head": check_fsdp2(separate_head=True),
    "fsdp2-root-head": check_fsdp2(separate_head=False),
    "fsdp2-separate-head-topk": check_fsdp2(separate_head=True, topk=True),
    "fsdp2-root-head-topk": check_fsdp2(separate_head=False, topk=True),
}


def main(rank, world, store, folder, names):
    """One spawned rank: every check in ``names``, in order; ``rank{r}.json`` maps each to None or a traceback,
    ``rank{r}.progress`` names the check running (what a timeout reports)."""
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    for name in names:
        with open(os.path.join(folder, f"rank{rank}.progress"), "w") as f:
            f.write(name)
        try:
            CHECKS[name](rank, world)
            results[name] = None
        except Exception:  # noqa: BLE001 (reported by the test)
            results[name] = traceback.format_exc()
        dist.barrier()
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()
