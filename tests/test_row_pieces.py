"""The loss of rows held in pieces (``_ops.RowPieces``: the vocabulary shards of ranks, the pieces of a split
row; ``_topk_ops.TopkPieces`` for a top-k teacher) equals the loss of the whole rows, on every compiled backend:
each piece's online sums, merged, then each piece's second pass. This is the mechanism the vocabulary-parallel
losses build on."""
import pytest
import torch

import ttm_kernels
from ttm_kernels import _ops, _topk_ops
from ttm_kernels._stats import Stat, TopkStat

BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not ttm_kernels.triton_available(), reason="triton not installed")),
    pytest.param("cpu", marks=pytest.mark.skipif(not ttm_kernels.cpu_extension_available(),
                                                 reason="C++ extension not built")),
]
# Uneven shards; one shard of a single column; every target in some shard, one ignored, one masked.
BOUNDS = (0, 700, 701, 1900, 3001)
KINDS = {"wttm": dict(student_scale=1.0, teacher_scale=0.2, weighted=True, kl_scale=1.0),
         "ttm-gamma0.3": dict(student_scale=1.0, teacher_scale=0.3, weighted=False, kl_scale=1.0),
         "kd": dict(student_scale=0.25, teacher_scale=0.25, weighted=False, kl_scale=16.0)}


def device_of(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("with_grad", [True, False], ids=["grad", "loss-only"])
@pytest.mark.parametrize("jsd_beta", [0.0, 0.4, 1.0], ids=["forward-kl", "jsd0.4", "reverse-kl"])
def test_row_pieces_equal_whole_rows(backend, kind, with_grad, jsd_beta):
    device = device_of(backend)
    gen = torch.Generator().manual_seed(0)
    n, V = 7, BOUNDS[-1]
    z = (torch.randn(n, V, generator=gen) * 10).to(device)
    v = (torch.randn(n, V, generator=gen) * 10).to(device)
    z[:, 2990:] = v[:, 2990:] = float("-inf")  # a masked tail
    v[1, 600:800] = float("-inf")  # a teacher mask across a shard boundary
    if jsd_beta == 1.0:
        z[1, 600:800] = float("-inf")  # the reverse KL is finite only where the student's support is the teacher's
    target = torch.tensor([5, 700, 701, 1899, -100, 3000 - 11, 2000], device=device)
    spec = KINDS[kind]
    params = _ops._params(spec["student_scale"], spec["teacher_scale"], 1.5 * spec["kl_scale"], 0.5, -100, jsd_beta)
    row_grad = torch.linspace(0.5, 2.0, n, device=device)

    whole_grad = torch.empty_like(z)
    whole = _ops._forward(backend, z, v, target, params, weighted=spec["weighted"],
                          grad=whole_grad if with_grad else None, row_grad=row_grad)

    pieces = _ops.RowPieces(backend, params, spec["weighted"], V)
    shards = list(zip(BOUNDS[:-1], BOUNDS[1:]))
    partials = torch.cat([pieces.partial(z[:, a:b], [v[:, a:b]], target, a) for a, b in reversed(shards)], -1)
    stats = pieces.merge(partials, [v], target)
    grad = torch.full_like(z, float("nan"))
    # The reverse KL's and the JSD's gradient needs the finished sums: a pass after finish.
    fused_grad = with_grad and not pieces.gradient_needs_sums
    sums = torch.cat([pieces.second_pass(z[:, a:b], [v[:, a:b]], target, stats, a,
                                         grad=grad[:, a:b] if fused_grad else None, row_grad=row_grad)
                      for a, b in shards], -1)
    pieces.finish(stats, sums)
    if with_grad and not fused_grad:
        for a, b in shards:
            pieces.second_pass(z[:, a:b], [v[:, a:b]], target, stats, a, grad=grad[:, a:b], row_grad=row_grad)

    for row in Stat:
        torch.testing.assert_close(stats[row], whole[row], rtol=2e-6, atol=1e-6, msg=row.name)
    if with_grad:
        # Entries that are differences of near-equal probabilities agree to the largest entry's precision. The
        # reverse KL's and the JSD's entries q (y - D) subtract the row's sum D, summed in another order here:
        # they agree to D's rounding times the row's |y| (up to ~50 at this spread), a few times more loosely.
        scale = 1e-6 if jsd_beta == 0.0 else 1e-5
        torch.testing.assert_close(grad, whole_grad, rtol=1e-5, atol=scale * whole_grad.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("with_target", [True, False], ids=["target", "no-target"])
def test_topk_row_pieces_equal_whole_rows(backend, kind, tail, with_target):
    """A top-k teacher's pieces (``_topk_ops.TopkPieces``: each piece's sums outside S and its logits of S, the
    merge, each piece's gradient) give the whole rows' statistics and gradient of the top-k kernels."""
    device = device_of(backend)
    gen = torch.Generator().manual_seed(1)
    n, V, k = 7, BOUNDS[-1], 16
    z = torch.randn(n, V, generator=gen) * 10
    z[:, 2990:] = float("-inf")  # a masked tail
    ids = torch.stack([torch.randperm(2990, generator=gen)[:k] for _ in range(n)])
    ids[0, :3] = torch.tensor([699, 700, 701])  # ids on both sides of a boundary, and the one-column shard's
    ids[2, -2:] = -1  # padding
    logprobs = torch.log_softmax(torch.randn(n, k, generator=gen) * 3, -1) - 0.3
    target = torch.tensor([5, 700, 701, 1899, -100, 3000 - 11, 2000]) if with_target else None
    z, ids, logprobs = z.to(device), ids.to(device), logprobs.to(device)
    target = None if target is None else target.to(device)
    spec = KINDS[kind]
    scales = [spec["student_scale"], spec["teacher_scale"], 1.5 * spec["kl_scale"], 0.5, 0.0]
    teacher = list(_topk_ops.topk_rows(ids, logprobs))
    row_grad = torch.linspace(0.5, 2.0, n, device=device)

    whole_grad = torch.empty_like(z)
    whole = _ops._launch_forward(backend, f"topk_{tail}", z, teacher, target, scales, spec["weighted"], -100,
                                 grad=whole_grad, row_grad=row_grad)

    pieces = _topk_ops.TopkPieces(backend, scales, spec["weighted"], -100, tail, V)
    shards = list(zip(BOUNDS[:-1], BOUNDS[1:]))
    partials = torch.stack([pieces.partial(z[:, a:b], teacher, target, a) for a, b in reversed(shards)], -1)
    stats = pieces.merge(partials, teacher, target)
    grad = torch.full_like(z, float("nan"))
    for a, b in shards:
        assert pieces.second_pass(z[:, a:b], teacher, target, stats, a, grad=grad[:, a:b], row_grad=row_grad) is None

    for row in TopkStat:
        torch.testing.assert_close(stats[row], whole[row], rtol=2e-6, atol=1e-6, msg=row.name)
    torch.testing.assert_close(grad, whole_grad, rtol=1e-5, atol=1e-6 * whole_grad.abs().max().item())
