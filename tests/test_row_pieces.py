"""The loss of rows held in pieces (``_ops.RowPieces``: the vocabulary shards of ranks, the pieces of a split
row) equals the loss of the whole rows, on every compiled backend: each piece's online sums, merged, then each
piece's second pass. This is the mechanism the vocabulary-parallel losses build on."""
import pytest
import torch

import ttm_kernels
from ttm_kernels import _ops
from ttm_kernels._stats import Stat

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
    partials = torch.cat([pieces.partial(z[:, a:b], v[:, a:b], target, a) for a, b in reversed(shards)], -1)
    stats = pieces.merge(partials, target)
    grad = torch.full_like(z, float("nan"))
    # The reverse KL's and the JSD's gradient needs the finished sums: a pass after finish.
    fused_grad = with_grad and not pieces.gradient_needs_sums
    sums = torch.cat([pieces.second_pass(z[:, a:b], v[:, a:b], target, stats, a,
                                         grad=grad[:, a:b] if fused_grad else None, row_grad=row_grad)
                      for a, b in shards], -1)
    pieces.finish(stats, sums)
    if with_grad and not fused_grad:
        for a, b in shards:
            pieces.second_pass(z[:, a:b], v[:, a:b], target, stats, a, grad=grad[:, a:b], row_grad=row_grad)

    for row in Stat:
        torch.testing.assert_close(stats[row], whole[row], rtol=2e-6, atol=1e-6, msg=row.name)
    if with_grad:
        # Entries that are differences of near-equal probabilities agree to the largest entry's precision. The
        # reverse KL's and the JSD's entries q (y - D) subtract the row's sum D, summed in another order here:
        # they agree to D's rounding times the row's |y| (up to ~50 at this spread), a few times more loosely.
        scale = 1e-6 if jsd_beta == 0.0 else 1e-5
        torch.testing.assert_close(grad, whole_grad, rtol=1e-5, atol=scale * whole_grad.abs().max().item())
