"""fused_{wttm,ttm,kd}_loss_topk: the sparse-teacher losses against their float64 reference, and the reference
against independent formulas (the dense loss, the power transform written out).

The Triton backend runs on CUDA tensors when a GPU is present, else in the Triton interpreter on CPU tensors
(conftest sets TRITON_INTERPRET=1). Every case checks the loss and the student gradient.
"""
import math

import pytest
import torch

import ttm_kernels
from ttm_kernels import reference
from ttm_kernels._stats import Stat, TopkStat
from ttm_kernels.topk import fused_kd_loss_topk, fused_ttm_loss_topk, fused_wttm_loss_topk, logprob_slack

from test_fused_loss import assert_close

COMPILED = [
    pytest.param("triton", marks=pytest.mark.skipif(not ttm_kernels.triton_available(), reason="triton not installed")),
    pytest.param("cpu", marks=pytest.mark.skipif(not ttm_kernels.cpu_extension_available(),
                                                 reason="C++ extension not built")),
]
BACKENDS = [*COMPILED, "torch"]
FUSED = {"wttm": fused_wttm_loss_topk, "ttm": fused_ttm_loss_topk, "kd": fused_kd_loss_topk}
REFERENCE = {"wttm": reference.wttm_loss_topk, "ttm": reference.ttm_loss_topk, "kd": reference.kd_loss_topk}
DENSE = {"wttm": reference.wttm_loss, "ttm": reference.ttm_loss, "kd": reference.kd_loss}
HYPER = {"wttm": {"gamma": 0.2}, "ttm": {"gamma": 0.1}, "kd": {"temperature": 4.0}}
TAILS = ["bucket", "renormalize"]


def device_of(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def make_problem(lead, vocab, k, spread=10.0, seed=0, pad_rows=0.0, ignore_fraction=0.25, device="cpu"):
    """float64 student logits, a teacher's top-k (ids shuffled, log-probabilities of its full softmax), a target
    (some ignored, some among the ids); a ``pad_rows`` fraction of rows keeps a random number of ids only."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(*lead, vocab, generator=gen, dtype=torch.float64) * spread
    v = torch.randn(*lead, vocab, generator=gen, dtype=torch.float64) * spread
    top = torch.log_softmax(v, -1).topk(k, dim=-1)
    order = torch.argsort(torch.rand(*lead, k, generator=gen), dim=-1)
    ids, logprobs = top.indices.gather(-1, order), top.values.gather(-1, order)
    padded = torch.rand(lead, generator=gen) < pad_rows
    keep = torch.randint(0, k, lead, generator=gen)
    slots = torch.arange(k).expand(*lead, k)
    ids = torch.where(padded.unsqueeze(-1) & (slots >= keep.unsqueeze(-1)), -1, ids)
    target = torch.randint(0, vocab, lead, generator=gen)
    from_ids = torch.rand(lead, generator=gen) < 0.3
    target = torch.where(from_ids & (ids[..., 0] >= 0), ids[..., 0], target)
    target[torch.rand(lead, generator=gen) < ignore_fraction] = -100
    return z.to(device), ids.to(device), logprobs.to(device), target.to(device)


def reference_loss_and_grad(kind, z, ids, logprobs, target, upstream=None, **kw):
    z64 = z.detach().double().requires_grad_()
    loss = REFERENCE[kind](z64, ids, logprobs.double(), target, **HYPER[kind], **kw)
    loss.backward(None if upstream is None else upstream.double())
    return loss.detach(), z64.grad


def fused_loss_and_grad(kind, z, ids, logprobs, target, backend, upstream=None, **kw):
    z = z.detach().clone().requires_grad_()
    loss = FUSED[kind](z, ids, logprobs, target, backend=backend, **HYPER[kind], **kw)
    loss.backward(None if upstream is None else upstream)
    return loss.detach(), z.grad


def check(kind, z, ids, logprobs, target, backend, upstream=None, loss_rtol=2e-6, grad_rtol=1e-5, **kw):
    """The backend on fp32 logits and log-probabilities against the reference on the same rounded values (what
    is compared is the arithmetic: the stored log-probabilities' rounding moves the tail mass by ~1e-7, which
    the power transform magnifies, see the storage study in benchmarks/RESULTS.md)."""
    z, logprobs = z.float(), logprobs.float()
    ref_loss, ref_grad = reference_loss_and_grad(kind, z, ids, logprobs, target, upstream, **kw)
    loss, grad = fused_loss_and_grad(kind, z, ids, logprobs, target, backend, upstream, **kw)
    assert_close("loss", ref_loss, loss, loss_rtol, 1e-6)
    assert_close("grad", ref_grad, grad, grad_rtol, 1e-9)
    return loss, grad


# --- The reference against independent formulas (float64) ---

@pytest.mark.parametrize("kind", ["wttm", "ttm", "kd"])
def test_topk_reference_full_vocabulary_is_the_dense_loss(kind):
    """k = V (ids permuted): R is empty, the loss and its gradient are the dense ones."""
    gen = torch.Generator().manual_seed(1)
    z, v = (torch.randn(2, 5, 300, generator=gen, dtype=torch.float64) * 10 for _ in range(2))
    ids = torch.argsort(torch.rand(2, 5, 300, generator=gen), -1)
    logprobs = torch.log_softmax(v, -1).gather(-1, ids)
    target = torch.randint(0, 300, (2, 5), generator=gen)
    target[0, 1] = -100
    for tail in TAILS:
        z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
        sparse = REFERENCE[kind](z1, ids, logprobs, target, tail=tail, **HYPER[kind])
        dense = DENSE[kind](z2, v, target, **HYPER[kind])
        sparse.backward(), dense.backward()
        assert math.isclose(sparse.item(), dense.item(), rel_tol=1e-12)
        torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", ["wttm", "ttm", "kd"])
def test_topk_reference_renormalize_is_the_dense_loss_of_the_masked_teacher(kind):
    z, ids, logprobs, target = make_problem((6,), 400, 20, seed=2, pad_rows=0.5)
    teacher = torch.full((6, 401), float("-inf"), dtype=torch.float64)
    teacher = teacher.scatter(-1, torch.where(ids >= 0, ids, 400), logprobs)[:, :400]
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    sparse = REFERENCE[kind](z1, ids, logprobs, target, tail="renormalize", reduction="none", **HYPER[kind])
    dense = DENSE[kind](z2, teacher, target, reduction="none", **HYPER[kind])
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
    sparse.sum().backward(), dense.sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-10, atol=1e-14)


def power_transform_loss(kind, z, ids, logprobs, target, gamma=None, temperature=None):
    """The bucket definition written out as the paper's code would (probabilities, powers, q_R = 1 - q_S):
    fine in float64 for moderate logits, where nothing cancels."""
    scale = 1.0 / temperature if kind == "kd" else 1.0
    g = 1.0 / temperature if kind == "kd" else gamma
    q = torch.softmax(z * scale, -1)
    losses = []
    for row in range(z.shape[0]):
        if target[row] == -100:
            continue
        keep = ids[row] >= 0
        s, p = ids[row][keep], logprobs[row][keep].exp()
        p = torch.cat([p, (1 - p.sum()).clamp_min(0).reshape(1)])
        q_b = torch.cat([q[row, s], (1 - q[row, s].sum()).reshape(1)])
        u = (p**g).sum()
        pt = p**g / u
        kl = (pt * (pt.log() - q_b.log())).sum()
        distill = {"wttm": u * kl, "ttm": kl, "kd": (1 / g)**2 * kl}[kind]
        losses.append(distill - torch.log_softmax(z[row], -1)[target[row]])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("kind", ["wttm", "ttm", "kd"])
def test_topk_reference_bucket_is_the_power_transform(kind):
    z, ids, logprobs, target = make_problem((9,), 200, 12, spread=3.0, seed=3, pad_rows=0.3)
    expected = power_transform_loss(kind, z, ids, logprobs, target, **HYPER[kind])
    assert math.isclose(REFERENCE[kind](z, ids, logprobs, target, **HYPER[kind]).item(), expected.item(),
                        rel_tol=1e-11)


# --- Every backend against the float64 reference ---

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", ["wttm", "ttm", "kd"])
def test_fused_loss_topk(backend, tail, kind):
    device = device_of(backend)
    z, ids, logprobs, target = make_problem((13,), 5000, 64, spread=10.0, seed=4, pad_rows=0.3, device=device)
    check(kind, z, ids, logprobs, target, backend, tail=tail, beta=1.5, ce_weight=0.7)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("kind", ["wttm", "kd"])
def test_fused_loss_topk_full_vocabulary_equals_the_dense_loss(backend, kind):
    """k = V, ids permuted: the dense fused loss, to fp32 precision."""
    device = device_of(backend)
    z, ids, logprobs, target = make_problem((7,), 1500, 1500, seed=5, device=device)
    v = torch.full_like(z, float("nan")).scatter(-1, ids, logprobs)
    loss, grad = check(kind, z, ids, logprobs, target, backend)
    dense_z = z.float().requires_grad_()
    dense = getattr(ttm_kernels, f"fused_{kind}_loss")(dense_z, v.float(), target, backend=backend, **HYPER[kind])
    dense.backward()
    assert_close("loss vs dense", dense.detach(), loss, 2e-6)
    assert_close("grad vs dense", dense_z.grad, grad, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["tail-mass-zero", "tail-mass-near-one", "confident-student", "k1", "k1024"])
def test_fused_wttm_loss_topk_tail_extremes(backend, case):
    """p_R = 0 (a teacher with no mass outside S); p_R near 1 (a flat teacher); a student confident on S
    (q_R ~ 1e-7, which 1 - q_S would lose) against a teacher that keeps a large pt_R; k = 1; k = 1024."""
    device = device_of(backend)
    k = {"k1": 1, "k1024": 1024}.get(case, 16)
    z, ids, logprobs, target = make_problem((8,), 3000, k, seed=6, device=device)
    if case == "tail-mass-zero":
        logprobs = torch.log_softmax(logprobs, -1)  # the teacher's mass all on S
    elif case == "tail-mass-near-one":
        logprobs = torch.full_like(logprobs, -math.log(3000.0))
    elif case == "confident-student":
        z = z.scatter(-1, ids, 40.0 + z.gather(-1, ids))
    loss, _ = check("wttm", z, ids, logprobs, target, backend, tail="bucket")
    if case == "confident-student":
        q_tail = torch.softmax(z, -1).scatter(-1, ids, 0.0).sum(-1)
        assert q_tail.max() < 1e-6  # the student's tail, next to a teacher tail of ~0.95


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_wttm_loss_topk_reduction_and_upstream_grad(backend, reduction):
    device = device_of(backend)
    z, ids, logprobs, target = make_problem((4, 6), 700, 32, seed=7, pad_rows=0.3, ignore_fraction=0.3,
                                            device=device)
    gen = torch.Generator().manual_seed(0)
    upstream = (torch.randn((4, 6), generator=gen) if reduction == "none" else torch.tensor(2.5)).to(device)
    _, grad = check("wttm", z, ids, logprobs, target, backend, upstream=upstream, reduction=reduction, beta=3.0)
    assert (grad[target == -100] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_wttm_loss_topk_ignored_rows(backend, reduction):
    """Ignored rows contribute exactly nothing, whatever they hold: all -inf logits, NaN log-probabilities, a
    row of padding; all rows ignored gives 0."""
    device = device_of(backend)
    z, ids, logprobs, target = make_problem((6,), 500, 8, seed=8, ignore_fraction=0.0, device=device)
    target[[1, 2, 4]] = -100
    z[1] = float("-inf")
    logprobs[2, 3] = float("nan")
    ids[4] = -1
    kw = dict(reduction=reduction, tail="renormalize")
    upstream = torch.ones(6, device=device) if reduction == "none" else None
    loss, grad = check("wttm", z, ids, logprobs, target, backend, upstream=upstream, **kw)
    assert (grad[[1, 2, 4]] == 0).all() and torch.isfinite(grad).all()
    loss, grad = fused_loss_and_grad("wttm", z.float(), ids, logprobs.float(), torch.full_like(target, -100),
                                     backend, upstream, **kw)
    assert (loss == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
def test_fused_kd_loss_topk_masked_student_logits(backend, tail):
    """-inf student logits: padding columns outside S, a teacher id the student masks (where the teacher gives
    it probability 0), and a masked target; never NaN, 0 gradient on masked columns."""
    device = device_of(backend)
    z, ids, logprobs, target = make_problem((5,), 2100, 24, seed=9, ignore_fraction=0.0, device=device)
    z[:, 2000:] = float("-inf")
    ids = torch.where(ids >= 2000, -1, ids)
    z[0] = z[0].scatter(0, ids[0, :1], float("-inf"))
    logprobs[0, 0] = float("-inf")
    target = torch.where((target >= 2000) | (target == ids[0, 0]), 7, target)
    loss, grad = check("kd", z, ids, logprobs, target, backend, tail=tail)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[:, 2000:] == 0).all()


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype,logprob_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                                 (torch.bfloat16, torch.float16)],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_fused_wttm_loss_topk_low_precision(backend, dtype, logprob_dtype):
    """Low-precision student logits and stored log-probabilities: the kernels' error against float64 on the same
    rounded inputs is the fp32 arithmetic's, and the gradient is rounded once to the student's dtype."""
    device = device_of(backend)
    z, ids, logprobs, target = make_problem((16,), 2500, 48, spread=8.0, seed=10, device=device)
    z, logprobs = z.to(dtype).double(), logprobs.to(logprob_dtype).double()
    ref_loss, ref_grad = reference_loss_and_grad("wttm", z, ids, logprobs, target)
    loss, grad = fused_loss_and_grad("wttm", z.to(dtype), ids, logprobs.to(logprob_dtype), target, backend)
    assert grad.dtype == dtype and loss.dtype == torch.float32
    assert_close("loss", ref_loss, loss, 2e-6, 1e-6)
    assert_close("grad", ref_grad, grad, torch.finfo(dtype).eps, 1e-9)


@pytest.mark.parametrize("backend", COMPILED)
def test_fused_wttm_loss_topk_components(backend):
    device = device_of(backend)
    z, ids, logprobs, target = make_problem((12,), 480, 10, seed=11, device=device)
    loss, parts = fused_wttm_loss_topk(z.float(), ids, logprobs.float(), target, beta=2.0, ce_weight=0.5,
                                       backend=backend, return_components=True)
    rows = reference.topk_loss_rows(z, ids, logprobs, target, teacher_scale=0.2, weighted=True, beta=2.0,
                                    ce_weight=0.5)
    valid = rows["valid"]
    for name in ("kl", "ce", "weight"):
        assert_close(name, rows[name][valid].mean(), getattr(parts, name), 2e-6)
    assert_close("loss", 0.5 * parts.ce + 2.0 * (rows["weight"] * rows["kl"])[valid].mean(), loss, 2e-6)


def test_fused_wttm_loss_topk_float64_runs_the_reference():
    z, ids, logprobs, target = make_problem((3,), 40, 5, spread=5.0, seed=12)
    assert torch.autograd.gradcheck(lambda x: fused_wttm_loss_topk(x, ids, logprobs, target, tail="bucket"),
                                    (z.clone().requires_grad_(),))
    assert fused_wttm_loss_topk(z, ids, logprobs, target).dtype == torch.float64


def _bad(**overrides):
    gen = torch.Generator().manual_seed(0)
    args = dict(student_logits=(torch.randn(4, 10, generator=gen) * 5).requires_grad_(),
                teacher_topk_ids=torch.tensor([[1, 2, -1], [3, 0, 9], [5, 4, 6], [7, 8, -1]]),
                teacher_topk_logprobs=torch.log(torch.full((4, 3), 0.2)), target=torch.tensor([1, 2, 3, 4]))
    args.update(overrides)
    return args


@pytest.mark.parametrize("args,kwargs,error,match", [
    (_bad(teacher_topk_ids=torch.tensor([[1, 2, 10]] * 4)), {}, ValueError, r"ids outside \[0, 10\)"),
    (_bad(teacher_topk_ids=torch.tensor([[1, 2, -2]] * 4)), {}, ValueError, "padding id -1"),
    (_bad(teacher_topk_ids=torch.tensor([[1, 2, 1]] * 4)), {}, ValueError, "an id twice"),
    (_bad(teacher_topk_ids=torch.ones(4, 3)), {}, TypeError, "teacher_topk_ids must hold integer"),
    (_bad(teacher_topk_logprobs=torch.zeros(4, 2)), {}, ValueError, "same shape"),
    (_bad(teacher_topk_ids=torch.zeros(4, 0, dtype=torch.long), teacher_topk_logprobs=torch.zeros(4, 0)), {},
     ValueError, "k >= 1"),
    (_bad(teacher_topk_ids=torch.tensor([[1, 2, -1]] * 3), teacher_topk_logprobs=torch.zeros(3, 3)), {},
     ValueError, "student's leading shape"),
    (_bad(teacher_topk_logprobs=torch.full((4, 3), 0.01)), {}, ValueError, "above 0"),
    (_bad(teacher_topk_logprobs=torch.log(torch.full((4, 3), 0.4))), {}, ValueError, "sum to a probability above 1"),
    (_bad(teacher_topk_logprobs=torch.zeros(4, 3, dtype=torch.long)), {}, TypeError, "floating-point"),
    (_bad(teacher_topk_logprobs=torch.log(torch.full((4, 3), 0.2)).requires_grad_()), {}, ValueError, "requires grad"),
    (_bad(teacher_topk_ids=torch.tensor([[1, 2, -1], [-1, -1, -1], [5, 4, 6], [7, 8, -1]])), {"tail": "renormalize"},
     ValueError, "at least one id"),
    (_bad(), {"tail": "uniform"}, ValueError, "tail must be one of"),
    (_bad(target=torch.tensor([1, 2, 10, 4])), {}, ValueError, r"target holds class indices outside \[0, 10\)"),
    (_bad(), {"reduction": "batchmean"}, ValueError, "reduction must be one of"),
    (_bad(), {"gamma": 0.0}, ValueError, "gamma must be a finite positive"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_fused_wttm_loss_topk_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fused_wttm_loss_topk(**args, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_wttm_loss_topk_int64_ids_beyond_int32_are_refused(backend):
    """An int64 id of 2**32 + c is checked before the kernels' int32 narrows it: an error naming it, never the
    loss of id c (nor a raw index error from the reference)."""
    args = _bad(teacher_topk_ids=torch.tensor([[1, 2, -1], [3, 0, 2**32 + 9], [5, 4, 6], [7, 8, -1]]))
    with pytest.raises(ValueError, match=rf"teacher_topk_ids holds ids outside \[0, 10\).*e.g. {2**32 + 9}"):
        fused_wttm_loss_topk(**args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_wttm_loss_topk_renormalize_row_without_mass_is_refused(backend):
    """tail='renormalize' on a row whose ids all have log-probability -inf: the clear error of a row of
    padding, not a NaN loss."""
    logprobs = torch.log(torch.full((4, 3), 0.2))
    logprobs[2] = float("-inf")
    args = _bad(teacher_topk_logprobs=logprobs)
    with pytest.raises(ValueError, match="at least one id in teacher_topk_ids with a finite log-probability"):
        fused_wttm_loss_topk(**args, tail="renormalize", backend=backend)
    args["target"] = torch.tensor([1, 2, -100, 4])  # the row ignored: nothing to refuse
    assert torch.isfinite(fused_wttm_loss_topk(**args, tail="renormalize", backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["wttm", "kd"])
def test_fused_loss_topk_renormalize_logprobs_below_float64_underflow(backend, kind):
    """Renormalising is invariant under a shift of a row's log-probabilities, so rows whose log-probabilities all
    lie near -800 (each exp underflows in float64) have the loss and gradient of the same rows shifted back:
    finite, not inf."""
    z, ids, logprobs, target = make_problem((6,), 50, 4, seed=31)
    deep = logprobs.float() - 800.0
    loss, grad = check(kind, z, ids, deep, target, backend, tail="renormalize")
    shifted_loss, shifted_grad = fused_loss_and_grad(kind, z.float(), ids, deep + 800.0, target, backend,
                                                     tail="renormalize")
    assert torch.isfinite(loss)
    assert_close("loss vs the shifted rows", shifted_loss, loss, 2e-6, 1e-6)
    assert_close("grad vs the shifted rows", shifted_grad, grad, 1e-5, 1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_wttm_loss_topk_target_out_of_range_poisons_compiled_rows(backend):
    """Under torch.compile the target's range check is left to the kernels (and to the reference backend
    alike): a bad row gets a NaN loss and NaN gradient."""
    device = device_of(backend)
    z, ids, logprobs, _ = make_problem((4,), 60, 5, seed=33, device=device)
    target = torch.tensor([1, 60, -100, 7], device=device)

    @torch.compile(fullgraph=True, dynamic=False)
    def rows(student, topk_ids, topk_logprobs, tgt):
        return fused_wttm_loss_topk(student, topk_ids, topk_logprobs, tgt, reduction="none", backend=backend)

    student = z.float().requires_grad_()
    loss = rows(student, ids, logprobs.float(), target)
    loss.backward(torch.ones(4, device=device))
    assert torch.isfinite(loss[[0, 2, 3]]).all() and loss[1].isnan()
    assert torch.isfinite(student.grad[[0, 2, 3]]).all() and student.grad[1].isnan().all()


def test_fused_wttm_loss_topk_takes_rows_of_padding_and_rounding_slack():
    """tail='bucket' takes a row without ids (all mass in the bucket: KL 0); log-probabilities a rounding above
    0 pass and leave a tail of 0."""
    args = _bad(teacher_topk_ids=torch.tensor([[1, 2, -1], [-1, -1, -1], [5, 4, 6], [7, 8, -1]]))
    rows = fused_wttm_loss_topk(**args, reduction="none", ce_weight=0.0)
    assert rows[1] == 0 and (rows[[0, 2, 3]] > 0).all()
    slack, _ = logprob_slack(torch.float32, 1)
    args = _bad(teacher_topk_ids=torch.tensor([[3]] * 4), teacher_topk_logprobs=torch.full((4, 1), slack / 2))
    assert torch.isfinite(fused_wttm_loss_topk(**args))


# --- The fused linear variant against materialised logits ---

LINEAR = {"wttm": ttm_kernels.fused_linear_wttm_loss_topk, "ttm": ttm_kernels.fused_linear_ttm_loss_topk,
          "kd": ttm_kernels.fused_linear_kd_loss_topk}
STUDENT = ("student_hidden", "student_weight", "student_bias")
LINEAR_CASES = {
    # name: (kind, lead shape, loss kwargs, upstream kind)
    "wttm-mean-chunk5": ("wttm", (23,), dict(chunk_size=5), None),
    "ttm-sum-renormalize": ("ttm", (23,), dict(reduction="sum", tail="renormalize", chunk_size=23), None),
    "kd-none-3d-chunk7": ("kd", (3, 7), dict(reduction="none", chunk_size=7, ce_weight=0.5), "randn"),
    "wttm-default-chunk-nobias": ("wttm", (23,), dict(beta=2.0), None),
}


def make_linear_problem(lead, vocab=300, hidden=16, k=12, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    p = {"student_hidden": torch.randn(*lead, hidden, generator=gen, dtype=torch.float64),
         "student_weight": torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * 10 / hidden**0.5,
         "student_bias": torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None}
    _, ids, logprobs, target = make_problem(lead, vocab, k, seed=seed, pad_rows=0.3)
    return p, ids, logprobs.float().double(), target


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_fused_linear_loss_topk(backend, case):
    """The loss and the gradients of the hidden states, the head and its bias against the float64 reference on
    the materialised logits."""
    kind, lead, kw, upstream = LINEAR_CASES[case]
    device = device_of(backend)
    p, ids, logprobs, target = make_linear_problem(lead, seed=len(case), bias="nobias" not in case)
    upstream = torch.randn(lead, generator=torch.Generator().manual_seed(1)) if upstream else None
    leaves = {k: x.clone().requires_grad_() for k, x in p.items() if x is not None}
    z = leaves["student_hidden"] @ leaves["student_weight"].T
    if "student_bias" in leaves:
        z = z + leaves["student_bias"]
    loss_kw = {k: v for k, v in kw.items() if k != "chunk_size"}
    ref = REFERENCE[kind](z, ids, logprobs, target, **HYPER[kind], **loss_kw)
    ref.backward(upstream)

    args = {k: None if x is None else x.float().to(device).requires_grad_() for k, x in p.items()}
    loss = LINEAR[kind](args["student_hidden"], args["student_weight"], ids.to(device), logprobs.float().to(device),
                        target.to(device), student_bias=args["student_bias"], backend=backend, **HYPER[kind], **kw)
    loss.backward(None if upstream is None else upstream.to(device))
    assert loss.dtype == torch.float32
    assert_close("loss", ref.detach(), loss.detach(), 2e-5)
    for k, leaf in leaves.items():
        assert_close(f"d {k}", leaf.grad, args[k].grad, 2e-4)


@pytest.mark.parametrize("backend", COMPILED)
def test_fused_linear_wttm_loss_topk_matches_the_logits_loss(backend):
    """On the same fp32 logits, the chunked loss equals the logits loss, components included."""
    device = device_of(backend)
    p, ids, logprobs, target = make_linear_problem((40,), seed=3)
    h, w = p["student_hidden"].float().to(device), p["student_weight"].float().to(device)
    ids, logprobs, target = ids.to(device), logprobs.float().to(device), target.to(device)
    loss, parts = ttm_kernels.fused_linear_wttm_loss_topk(h, w, ids, logprobs, target, chunk_size=16,
                                                          backend=backend, return_components=True)
    expected, expected_parts = fused_wttm_loss_topk(h @ w.T, ids, logprobs, target, backend=backend,
                                                    return_components=True)
    assert_close("loss", expected, loss, 1e-6)
    for name in ("kl", "ce", "weight"):
        assert_close(name, getattr(expected_parts, name), getattr(parts, name), 1e-6)


def test_topk_statistics_share_the_dense_rows():
    """The public layer reads LOSS..WEIGHT of either layout alike, and the Triton kernels reuse Stat's rows."""
    shared = {name: value for name, value in TopkStat.__members__.items() if name in Stat.__members__}
    assert shared == {name: Stat[name] for name in shared} and len(shared) == len(TopkStat) - 2


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_wttm_loss_topk_inplace_backward(backend, tail, reduction):
    """The gradient written into the student logits' own storage (in the forward for "mean", in the backward from
    the statistics for "none"), equal to the float64 reference's."""
    device = device_of(backend)
    z, ids, logprobs, target = make_problem((2, 5), 900, 24, seed=31, pad_rows=0.2, device=device)
    upstream = (torch.randn(2, 5, generator=torch.Generator().manual_seed(32)).to(device) if reduction == "none"
                else None)
    kw = {"tail": tail, "reduction": reduction}
    ref_loss, ref_grad = reference_loss_and_grad("wttm", z, ids, logprobs.float(), target, upstream, **kw)
    leaf = z.float().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, as the output of a model's last layer would be
    loss = fused_wttm_loss_topk(logits, ids, logprobs.float(), target, backend=backend, inplace_backward=True,
                                **HYPER["wttm"], **kw)
    loss.backward(upstream)
    assert_close("loss", ref_loss, loss.detach(), 2e-5, 1e-6)
    assert_close("grad", ref_grad, leaf.grad, 1e-4, 1e-9)
    assert torch.equal(logits.detach(), leaf.grad), "the gradient was not written into the logits' storage"


def test_fused_wttm_loss_topk_inplace_backward_misuse():
    z, ids, logprobs, target = make_problem((4,), 50, 8, seed=33)
    z = z.float()
    for kw, match in [({"backend": "torch"}, "needs a compiled backend"),
                      ({"jsd_beta": 0.5}, "needs a compiled backend"),
                      ({"softcap": 5.0}, "softcap or logit_scale"),
                      ({"inplace_backward": 1}, "inplace_backward must be True or False")]:
        with pytest.raises((ValueError, TypeError), match=match):
            fused_wttm_loss_topk((z.requires_grad_() * 1.0), ids, logprobs.float(), target,
                                 **{"inplace_backward": True, **kw})
    with pytest.raises(ValueError, match="a leaf tensor that requires grad"):
        fused_wttm_loss_topk(z.requires_grad_(), ids, logprobs.float(), target, inplace_backward=True)


@pytest.mark.parametrize("backend", COMPILED)
def test_fused_wttm_loss_topk_torch_compile(backend):
    device = device_of(backend)
    z, ids, logprobs, target = make_problem((4, 3), 300, 16, seed=13, pad_rows=0.3, device=device)

    @torch.compile(fullgraph=True, dynamic=False)
    def step(student, topk_ids, topk_logprobs, tgt):
        return fused_wttm_loss_topk(student, topk_ids, topk_logprobs, tgt, beta=2.0, backend=backend) * 1.5

    student = z.float().requires_grad_()
    step(student, ids, logprobs.float(), target).backward()
    _, ref_grad = reference_loss_and_grad("wttm", z.float(), ids, logprobs.float(), target, torch.tensor(1.5),
                                          beta=2.0)
    assert_close("grad", ref_grad, student.grad, 1e-5, 1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_wttm_loss_topk_memory_and_no_host_sync():
    """Forward plus backward allocate the (N, V) gradient and O(N k) besides, and never make the host wait for
    the device (the checks of the ids and log-probabilities are device-side assertions)."""
    N, V, k = 2048, 32000, 64
    z = (torch.randn(N, V, device="cuda") * 5).bfloat16().requires_grad_()
    top = torch.log_softmax(torch.randn(N, V, device="cuda") * 5, -1).topk(k, -1)
    ids, logprobs = top.indices, top.values
    target = torch.randint(0, V, (N,), device="cuda")
    del top
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fused_wttm_loss_topk(z, ids, logprobs, target)
        (grad,) = torch.autograd.grad(loss, z)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= N * V * 2 + (4 << 20)
