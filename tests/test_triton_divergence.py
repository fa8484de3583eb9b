"""The Triton kernels' divergences (``LossSpec.jsd_beta``: the forward KL, the reverse KL, the generalised JSD)
and the student's entropy, through the kernel module's interface (``triton_kernels.forward`` / ``backward`` /
``partial`` / ``merge`` / ``pieces`` / ``finish``), against the float64 reference (``reference.loss_rows``).

Without a GPU the kernels run in the Triton interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1): small
shapes. Each case covers the three paths of a row: one block in registers, several blocks (the sums pass, then
for the reverse KL and the JSD a gradient pass), and the split-row path (pieces merged, summed, then the gradient).
"""
import math

import pytest
import torch

import ttm_kernels
from ttm_kernels import reference, spec as loss_spec
from ttm_kernels._stats import NUM_PIECE_SUMS, Stat

pytestmark = pytest.mark.skipif(not ttm_kernels.triton_available(), reason="triton not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
JSD_BETAS = {"forward-kl": 0.0, "jsd0.3": 0.3, "jsd0.5": 0.5, "reverse-kl": 1.0}
SPECS = {"wttm": lambda jsd_beta: loss_spec.wttm(0.2, beta=1.5, ce_weight=0.5, jsd_beta=jsd_beta),
         "ttm": lambda jsd_beta: loss_spec.ttm(0.3, ce_weight=0.7, jsd_beta=jsd_beta),
         # a student temperature: the CE's softmax is a separate one
         "kd": lambda jsd_beta: loss_spec.kd(4.0, ce_weight=0.5, jsd_beta=jsd_beta)}
# (rows, columns, forced piece width or None): one block, several blocks, the split-row path.
PATHS = {"one-column": (2, 1, None), "one-block": (6, 300, None), "multi-block": (3, 4500, None),
         "split-rows": (4, 2100, 700)}
SPREAD = 10.0


@pytest.fixture
def kernels(monkeypatch):
    """The kernel module, with ``force_split(width)`` forcing the split-row path in pieces of ``width`` columns
    (not a power of two, so that pieces end inside a block)."""
    from ttm_kernels import triton_kernels

    def force_split(width):
        monkeypatch.setattr(triton_kernels, "row_split", lambda n_rows, V, device: min(width, V))

    triton_kernels.force_split = force_split
    yield triton_kernels
    del triton_kernels.force_split


def make_inputs(n, V, seed, ignored=(1,)):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=gen, dtype=torch.float64) * SPREAD
    v = torch.randn(n, V, generator=gen, dtype=torch.float64) * SPREAD
    target = torch.randint(0, V, (n,), generator=gen)
    target[list(ignored)] = -100
    row_grad = torch.rand(n, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    return z, v, target, row_grad


def finite_for_reference(x):
    """-inf logits as -1e4: their probability e^-1e4 (times any scale here) is exactly 0 in float64, so the
    reference's loss is the same (for finite divergences: not a reverse KL whose teacher rules out a class the
    student keeps), but its autograd gradient stays finite: at a class of q = 0 the reverse KL's and the JSD's
    q log q give NaN for every column (0 * -inf in the unselected branch of a torch.where)."""
    return torch.where(x == float("-inf"), -1e4, x)


def reference_rows(spec, z, v, target, row_grad):
    """The reference's rows (float64, plus DIV_GRAD: the reverse KL itself, K = KL(q || m) for the JSD) and its
    gradient of sum_i row_grad_i * loss_i."""
    z64 = finite_for_reference(z).requires_grad_()
    v64 = finite_for_reference(v)
    rows = reference.loss_rows(z64, v64, target, **spec.reference_params())
    (rows["loss"] * row_grad).sum().backward()
    log_q = torch.log_softmax(z64.detach() * spec.student_scale, -1)
    log_p = torch.log_softmax(v64 * spec.teacher_scale, -1)
    if spec.jsd_beta == 0.0:
        div_grad = torch.zeros_like(rows["kl"])
    elif spec.jsd_beta == 1.0:
        div_grad = rows["kl"]
    else:
        log_m = torch.logaddexp(log_p + math.log(spec.jsd_beta), log_q + math.log1p(-spec.jsd_beta))
        div_grad = torch.where(rows["valid"], reference.divergence(log_q, log_m, 0.0), 0)
    rows = {name: rows[name].detach() for name in ("loss", "kl", "ce", "weight", "entropy")}
    return {**rows, "div_grad": div_grad}, z64.grad


STAT_ROWS = {"loss": Stat.LOSS, "kl": Stat.KL, "ce": Stat.CE, "weight": Stat.WEIGHT, "entropy": Stat.ENTROPY,
             "div_grad": Stat.DIV_GRAD}


def assert_close(name, ref, out, rtol, atol=0.0):
    """Max abs error relative to the reference's largest magnitude, plus NaN/inf parity."""
    ref, out = ref.double().cpu(), out.double().cpu()
    assert torch.equal(torch.isnan(ref), torch.isnan(out)), f"{name}: NaN pattern differs"
    assert torch.equal(torch.isinf(ref), torch.isinf(out)), f"{name}: inf pattern differs"
    finite = torch.isfinite(ref)
    if not finite.any():
        return
    err = (ref[finite] - out[finite]).abs().max().item()
    scale = ref[finite].abs().max().item()
    assert err <= rtol * scale + atol, f"{name}: max error {err:.3g} > {rtol:g} * {scale:.3g} + {atol:g}"


def grad_atol(spec, kl, weight, row_grad):
    """The reverse KL's gradient q_j (log(q_j / p_j) - D) subtracts the row's fp32 sum D from log-ratios of its
    size, so each entry carries D's rounding (the loss's 2e-6 relative) times the row's coefficient; the forward
    KL's and the JSD's (K <= log(1 / (1 - beta)) is small) need nothing beyond the relative tolerance."""
    if spec.jsd_beta != 1.0:
        return 1e-9
    coef = row_grad.double().cpu() * spec.kl_coef * weight.double().cpu() * spec.student_scale
    return 2e-6 * (coef * kl.double().cpu()).abs().max().item()


def check_against_reference(kernels, spec, z, v, target, row_grad, check_backward=True):
    ref_rows, ref_grad = reference_rows(spec, z, v, target, row_grad)
    n, V = z.shape
    student, teacher = z.float().to(DEVICE).view(1, n, V), v.float().to(DEVICE).view(1, n, V)
    target_rows, row_grad32 = target.to(DEVICE), row_grad.float().to(DEVICE)
    grad = torch.empty_like(student)
    stats = kernels.forward(student, teacher, target_rows, weighted=spec.weighted, grad=grad, row_grad=row_grad32,
                            **spec.kernel_params())
    loss_only = kernels.forward(student, teacher, target_rows, weighted=spec.weighted, **spec.kernel_params())
    for name, row in STAT_ROWS.items():
        assert_close(name, ref_rows[name], stats[row], 2e-6, 1e-6)
        assert_close(f"{name} without the gradient", ref_rows[name], loss_only[row], 2e-6, 1e-6)
    atol = grad_atol(spec, ref_rows["kl"], ref_rows["weight"], row_grad)
    assert_close("grad", ref_grad, grad.view(n, V), 1e-5, atol)
    assert (grad.view(n, V)[target_rows == -100] == 0).all()
    if check_backward:
        backward_grad = torch.full_like(student, float("nan"))
        kernels.backward(row_grad32, student, teacher, target_rows, stats, backward_grad, **spec.kernel_params())
        assert_close("backward grad", ref_grad, backward_grad.view(n, V), 1e-5, atol)
    return stats, grad


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("divergence", list(JSD_BETAS))
def test_triton_forward_divergence(kernels, divergence, kind, path):
    """Every statistics row (loss, divergence, CE, weight, entropy, the gradient's row sum), the gradient written
    by the forward and the one written by the backward from the statistics, with ignored rows."""
    n, V, width = PATHS[path]
    if width is not None:
        kernels.force_split(width)
    spec = SPECS[kind](JSD_BETAS[divergence])
    z, v, target, row_grad = make_inputs(n, V, seed=len(path) + len(kind))
    check_against_reference(kernels, spec, z, v, target, row_grad)


@pytest.mark.parametrize("path", ["one-block", "split-rows"])
@pytest.mark.parametrize("divergence", ["jsd0.3", "reverse-kl"])
def test_triton_forward_divergence_masked_logits(kernels, divergence, path):
    """-inf logits never give NaN: a masked tail (both), classes only the student rules out, classes only the
    teacher rules out (an infinite reverse KL: inf in the loss, as in the reference), a mask across pieces."""
    n, V, width = PATHS[path]
    if width is not None:
        kernels.force_split(width)
    z, v, target, row_grad = make_inputs(n, V, seed=11, ignored=(3,))
    z[:, V - 40:] = v[:, V - 40:] = float("-inf")
    z[0, 5:50] = float("-inf")
    z[2, V // 3 - 50:V // 3 + 50] = float("-inf")  # across the first piece's end on the split path
    target[:3] = torch.tensor([3, 70, V - 50])
    spec = SPECS["wttm"](JSD_BETAS[divergence])
    if divergence == "reverse-kl":
        check_against_reference(kernels, spec, z, v, target, row_grad)
        v[1, 10:20] = float("-inf")
        student, teacher = z.float().to(DEVICE).view(1, n, V), v.float().to(DEVICE).view(1, n, V)
        stats = kernels.forward(student, teacher, target.to(DEVICE), weighted=True, **spec.kernel_params())
        ref_kl = reference.loss_rows(z, v, target, **spec.reference_params())["kl"]
        assert ref_kl[1] == float("inf")
        assert_close("kl", ref_kl, stats[Stat.KL], 2e-6, 1e-6)
    else:
        v[1, 10:20] = float("-inf")
        v[2, V // 3 - 100:V // 3] = float("-inf")  # partly where the student is masked too
        check_against_reference(kernels, spec, z, v, target, row_grad)


@pytest.mark.parametrize("divergence", ["jsd0.3", "jsd0.5", "reverse-kl"])
def test_triton_forward_divergence_nan_teacher(kernels, divergence):
    """A NaN teacher makes its row's loss and gradient NaN; ignored rows stay exactly 0 whatever they hold."""
    spec = SPECS["ttm"](JSD_BETAS[divergence])
    z, v, target, row_grad = make_inputs(4, 700, seed=13, ignored=(2,))
    v[0, 10] = float("nan")
    v[2] = float("nan")
    z[2] = float("-inf")
    student, teacher = z.float().to(DEVICE).view(1, 4, 700), v.float().to(DEVICE).view(1, 4, 700)
    grad = torch.empty_like(student)
    stats = kernels.forward(student, teacher, target.to(DEVICE), weighted=spec.weighted, grad=grad,
                            row_grad=row_grad.float().to(DEVICE), **spec.kernel_params())
    assert stats[Stat.LOSS, 0].isnan() and grad[0, 0].isnan().all()
    assert (stats[:, 2] == 0).all() and (grad[0, 2] == 0).all()
    assert torch.isfinite(stats[:, [1, 3]]).all() and torch.isfinite(grad[0, [1, 3]]).all()


@pytest.mark.parametrize("divergence", ["jsd0.3", "jsd0.5", "reverse-kl"])
def test_triton_forward_small_divergence_keeps_its_digits(kernels, divergence):
    """A student that nearly matches the transformed teacher (D ~ 1e-7, far below log V): relative error 1e-4,
    as for the forward KL; the mixture's logarithm is formed from log(p / q) without cancelling."""
    v, noise, _, _ = make_inputs(8, 5000, seed=107)
    z = 0.2 * v + 1e-3 * noise / SPREAD
    spec = loss_spec.ttm(0.2, ce_weight=0.0, jsd_beta=JSD_BETAS[divergence])
    ref_rows, _ = reference_rows(spec, z.float().double(), v.float().double(), None, torch.ones(8))
    stats = kernels.forward(z.float().to(DEVICE).view(1, 8, 5000), v.float().to(DEVICE).view(1, 8, 5000), None,
                            weighted=False, **spec.kernel_params())
    assert 0 < ref_rows["kl"].max().item() < 1e-5
    assert ((stats[Stat.KL].double().cpu() - ref_rows["kl"]).abs() <= 1e-4 * ref_rows["kl"]).all()


BOUNDS = (0, 700, 701, 1900, 3001)  # uneven shards, one of a single column


@pytest.mark.parametrize("kind", ["wttm", "kd"])
@pytest.mark.parametrize("divergence", list(JSD_BETAS))
def test_triton_pieces_divergence_equal_whole_rows(kernels, divergence, kind):
    """Rows held in column shards (``partial`` / ``merge`` / ``pieces`` without a gradient / ``finish``, then
    ``pieces`` with the gradient, which reads the merged DIV_GRAD) give the whole rows' statistics and gradient."""
    spec = SPECS[kind](JSD_BETAS[divergence])
    params = spec.kernel_params()
    z, v, target, row_grad = make_inputs(7, BOUNDS[-1], seed=17, ignored=(4,))
    z[:, 2990:] = v[:, 2990:] = float("-inf")  # a masked tail
    v[1, 600:800] = float("-inf")  # a teacher mask across a shard boundary (JSD and forward KL only)
    if divergence == "reverse-kl":
        z[1, 600:800] = float("-inf")
    target[:4] = torch.tensor([5, 700, 701, 1899])
    student, teacher = z.float().to(DEVICE).view(1, 7, -1), v.float().to(DEVICE).view(1, 7, -1)
    target_rows, row_grad32 = target.to(DEVICE), row_grad.float().to(DEVICE)
    whole_grad = torch.empty_like(student)
    whole = kernels.forward(student, teacher, target_rows, weighted=spec.weighted, grad=whole_grad,
                            row_grad=row_grad32, **params)

    shards = list(zip(BOUNDS[:-1], BOUNDS[1:]))
    partials = torch.cat([kernels.partial(student[..., a:b], teacher[..., a:b], target_rows, weighted=spec.weighted,
                                          col_offset=a, **params) for a, b in reversed(shards)], -1)
    stats = kernels.merge(partials, target_rows, weighted=spec.weighted, vocab=BOUNDS[-1], **params)
    sums = torch.cat([kernels.pieces(student[..., a:b], teacher[..., a:b], target_rows, stats, col_offset=a,
                                     vocab=BOUNDS[-1], **params) for a, b in shards], -1)
    assert sums.shape[0] == NUM_PIECE_SUMS
    kernels.finish(stats, sums, **params)
    grad = torch.full_like(student, float("nan"))
    for a, b in shards:
        kernels.pieces(student[..., a:b], teacher[..., a:b], target_rows, stats, col_offset=a, vocab=BOUNDS[-1],
                       grad=grad[..., a:b], row_grad=row_grad32, **params)
    for row in Stat:
        torch.testing.assert_close(stats[row], whole[row], rtol=2e-6, atol=1e-6, msg=row.name)
    atol = grad_atol(spec, whole[Stat.KL], whole[Stat.WEIGHT], row_grad)
    torch.testing.assert_close(grad, whole_grad, rtol=1e-5, atol=1e-6 * whole_grad.abs().max().item() + atol)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("kind", ["wttm", "kd"])
def test_triton_topk_forward_entropy(tail, kind):
    """The top-k kernels' statistics hold the student's entropy as the reference defines it (over the k + 1
    outcomes with the bucket, over the vocabulary without: summed online over the columns outside the ids, across
    blocks whose maximum moves) and a DIV_GRAD of 0 (the forward KL's gradient needs no row sum); ignored rows 0."""
    from ttm_kernels import _topk_ops, triton_topk

    spec = SPECS[kind](0.0)
    n, V, k = 5, 5000, 16
    gen = torch.Generator().manual_seed(19)
    z = torch.randn(n, V, generator=gen, dtype=torch.float64) * SPREAD
    block = triton_topk.launch_config(V)["BLOCK_V"]
    z[0, :block] -= 40.0  # the first block far below the second: the online sum moves to the new maximum
    z[2, 100:200] = float("-inf")
    v = torch.randn(n, V, generator=gen, dtype=torch.float64) * SPREAD
    top = torch.log_softmax(v, -1).topk(k, dim=-1)
    ids, logprobs = top.indices, top.values.float().double()
    ids[3, k // 2:] = -1  # padding
    target = torch.randint(0, V, (n,), generator=gen)
    target[2], target[4] = 7, -100
    rows = reference.topk_loss_rows(z.float().double(), ids, logprobs, target, tail=tail, **spec.reference_params())
    sorted_ids, sorted_logprobs = _topk_ops.topk_rows(ids.to(DEVICE), logprobs.to(DEVICE))
    stats = triton_topk.topk_forward(z.float().to(DEVICE).view(1, n, V), sorted_ids, sorted_logprobs,
                                     target.to(DEVICE), weighted=spec.weighted, bucket=tail == "bucket",
                                     **spec.kernel_params())
    assert_close("entropy", rows["entropy"], stats[Stat.ENTROPY], 2e-6, 1e-6)
    assert_close("kl", rows["kl"], stats[Stat.KL], 2e-6, 1e-6)
    assert (stats[Stat.DIV_GRAD] == 0).all() and (stats[:, 4] == 0).all()


@pytest.mark.parametrize("divergence", list(JSD_BETAS))
@pytest.mark.parametrize("kind", ["wttm", "kd"])
def test_triton_topk_forward_divergence(kind, divergence):
    """A top-k teacher with the bucket: every divergence of the k + 1 outcomes, the forward's gradient and the
    backward's from the statistics, against the reference (padding, a masked student class, ignored rows)."""
    from ttm_kernels import _topk_ops, triton_topk

    spec = SPECS[kind](JSD_BETAS[divergence])
    n, V, k = 5, 5000, 16
    gen = torch.Generator().manual_seed(23)
    z = torch.randn(n, V, generator=gen, dtype=torch.float64) * SPREAD
    v = torch.randn(n, V, generator=gen, dtype=torch.float64) * SPREAD
    top = torch.log_softmax(v, -1).topk(k, dim=-1)
    ids, logprobs = top.indices, top.values.float().double()
    ids[3, k // 2:] = -1  # padding
    z[2, 100:200] = float("-inf")
    target = torch.randint(0, V, (n,), generator=gen)
    target[2], target[4] = 7, -100
    row_grad = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    z64 = finite_for_reference(z.float().double()).requires_grad_()
    rows = reference.topk_loss_rows(z64, ids, logprobs, target, tail="bucket", **spec.reference_params())
    (rows["loss"] * row_grad).sum().backward()
    # The padded row's reference gradient from its ids alone: through the padding slots (log-probabilities -inf
    # on both sides) the reference's autograd gives NaN for the reverse KL and the JSD.
    z_padded = z64.detach()[3:4].clone().requires_grad_()
    padded = reference.topk_loss_rows(z_padded, ids[3:4, :k // 2], logprobs[3:4, :k // 2], target[3:4], tail="bucket",
                                      **spec.reference_params())
    (padded["loss"] * row_grad[3]).sum().backward()
    z64.grad[3] = z_padded.grad[0]

    params = dict(spec.kernel_params(), bucket=True)
    student = z.float().to(DEVICE).view(1, n, V)
    sorted_ids, sorted_logprobs = _topk_ops.topk_rows(ids.to(DEVICE), logprobs.to(DEVICE))
    grad = torch.empty_like(student)
    stats = triton_topk.topk_forward(student, sorted_ids, sorted_logprobs, target.to(DEVICE), weighted=spec.weighted,
                                     grad=grad, row_grad=row_grad.float().to(DEVICE), **params)
    for name in ("loss", "kl", "ce", "weight", "entropy"):
        assert_close(name, rows[name], stats[STAT_ROWS[name]], 2e-6, 1e-6)
    atol = grad_atol(spec, rows["kl"].detach(), rows["weight"].detach(), row_grad)
    assert_close("grad", z64.grad, grad.view(n, V), 1e-5, atol)
    backward_grad = torch.full_like(student, float("nan"))
    triton_topk.topk_backward(row_grad.float().to(DEVICE), student, sorted_ids, sorted_logprobs, target.to(DEVICE),
                              stats, backward_grad, **params)
    assert_close("backward grad", z64.grad, backward_grad.view(n, V), 1e-5, atol)
    if JSD_BETAS[divergence] != 0.0:
        with pytest.raises(ValueError, match="jsd_beta=.* needs the bucket"):
            triton_topk.topk_forward(student, sorted_ids, sorted_logprobs, None, weighted=spec.weighted,
                                     **dict(params, bucket=False))
