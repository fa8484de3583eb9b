"""fused_wttm_loss / fused_ttm_loss / fused_kd_loss against the float64 reference, on every compiled backend.

The Triton backend runs on CUDA tensors when a GPU is present, else in the Triton interpreter on CPU
tensors (conftest sets TRITON_INTERPRET=1). Every case checks the loss and the student gradient.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import ttm_kernels
from ttm_kernels import KDLoss, TTMLoss, WTTMLoss, fused_kd_loss, fused_ttm_loss, fused_wttm_loss, reference

BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not ttm_kernels.triton_available(), reason="triton not installed")),
    pytest.param("cpu", marks=pytest.mark.skipif(not ttm_kernels.cpu_extension_available(),
                                                 reason="C++ extension not built")),
]
FUSED = {"wttm": fused_wttm_loss, "ttm": fused_ttm_loss, "kd": fused_kd_loss}
REFERENCE = {"wttm": reference.wttm_loss, "ttm": reference.ttm_loss, "kd": reference.kd_loss}


@pytest.mark.skipif(not os.environ.get("CI"), reason="CI only: a developer may lack a backend")
def test_ci_has_every_backend():
    """In CI both compiled backends must load, so that no backend's tests are skipped unnoticed."""
    assert ttm_kernels.triton_available()
    assert ttm_kernels.cpu_extension_available()


def device_of(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def make_logits(shape, spread, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=gen, dtype=torch.float64) * spread
    v = torch.randn(shape, generator=gen, dtype=torch.float64) * spread
    return z.to(device), v.to(device)


def make_target(lead_shape, vocab, seed, ignore_fraction=0.25, ignore_index=-100, device="cpu"):
    gen = torch.Generator().manual_seed(seed + 1)
    target = torch.randint(0, vocab, lead_shape, generator=gen)
    target[torch.rand(lead_shape, generator=gen) < ignore_fraction] = ignore_index
    return target.to(device)


def reference_loss_and_grad(kind, z, v, target, upstream=None, **kw):
    """Loss and gradient of the float64 reference (inputs upcast; the masks survive the cast)."""
    z64 = z.detach().double().requires_grad_()
    loss = REFERENCE[kind](z64, v.double(), target, **kw)
    loss.backward(upstream.double() if upstream is not None else None)
    return loss.detach(), z64.grad


def fused_loss_and_grad(kind, z, v, target, backend, upstream=None, **kw):
    z = z.detach().clone().requires_grad_()
    loss = FUSED[kind](z, v, target, backend=backend, **kw)
    loss.backward(upstream if upstream is not None else None)
    return loss.detach(), z.grad


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


def scale_kw(kind, gamma):
    return {"temperature": 1.0 / gamma} if kind == "kd" else {"gamma": gamma}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [1.0, 0.5, 0.2, 0.1], ids=lambda g: f"gamma{g}")
@pytest.mark.parametrize("shape,spread", [((1, 1), 5.0), ((41, 1271), 10.0), ((3, 9000), 30.0), ((7, 64), 1.0)],
                         ids=["N1-V1", "N41-V1271", "N3-V9000-multiblock", "N7-V64-spread1"])
def test_fused_wttm_loss(backend, gamma, shape, spread):
    device = device_of(backend)
    z, v = make_logits(shape, spread, seed=hash((shape, gamma)) % 1000, device=device)
    target = make_target(shape[:-1], shape[-1], seed=3, device=device)
    kw = dict(gamma=gamma, beta=4.0, ce_weight=0.7)
    ref_loss, ref_grad = reference_loss_and_grad("wttm", z, v, target, **kw)
    loss, grad = fused_loss_and_grad("wttm", z.float(), v.float(), target, backend, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert_close("loss", ref_loss, loss, 2e-6, 1e-6)
    assert_close("grad", ref_grad, grad, 1e-5, 1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["wttm", "ttm", "kd"])
@pytest.mark.parametrize("with_target", [True, False], ids=["target", "no-target"])
def test_fused_loss_variants(backend, kind, with_target):
    device = device_of(backend)
    z, v = make_logits((19, 3001), 20.0, seed=5, device=device)
    target = make_target((19,), 3001, seed=5, device=device) if with_target else None
    kw = dict(beta=0.9, ce_weight=0.1, **scale_kw(kind, 0.25))
    ref_loss, ref_grad = reference_loss_and_grad(kind, z, v, target, **kw)
    loss, grad = fused_loss_and_grad(kind, z.float(), v.float(), target, backend, **kw)
    assert_close("loss", ref_loss, loss, 2e-6, 1e-6)
    assert_close("grad", ref_grad, grad, 1e-5, 1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_wttm_loss_gamma1_is_plain_kl(backend):
    device = device_of(backend)
    z, v = make_logits((9, 777), 10.0, seed=11, device=device)
    kl = F.kl_div(F.log_softmax(z, -1), F.log_softmax(v, -1), reduction="batchmean", log_target=True)
    loss = fused_ttm_loss(z.float(), v.float(), gamma=1.0, backend=backend)
    assert_close("ttm(gamma=1) vs kl_div", kl, loss, 2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_wttm_loss_large_vocab(backend):
    device = device_of(backend)
    z, v = make_logits((2, 262144), 30.0, seed=13, device=device)
    target = torch.tensor([5, 262143], device=device)
    ref_loss, ref_grad = reference_loss_and_grad("wttm", z, v, target, gamma=0.2, beta=2.0)
    loss, grad = fused_loss_and_grad("wttm", z.float(), v.float(), target, backend, gamma=0.2, beta=2.0)
    assert_close("loss", ref_loss, loss, 5e-6, 1e-6)
    assert_close("grad", ref_grad, grad, 2e-5, 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_wttm_loss_reduction_and_upstream_grad(backend, reduction):
    device = device_of(backend)
    z, v = make_logits((4, 6, 533), 15.0, seed=17, device=device)
    target = make_target((4, 6), 533, seed=17, ignore_fraction=0.3, device=device)
    gen = torch.Generator().manual_seed(0)
    upstream = (torch.randn((4, 6), generator=gen) if reduction == "none" else torch.tensor(2.5)).to(device)
    kw = dict(gamma=0.1, beta=3.0, reduction=reduction)
    ref_loss, ref_grad = reference_loss_and_grad("wttm", z, v, target, upstream=upstream, **kw)
    loss, grad = fused_loss_and_grad("wttm", z.float(), v.float(), target, backend, upstream=upstream, **kw)
    assert loss.shape == ref_loss.shape
    assert_close("loss", ref_loss, loss, 2e-6, 1e-6)
    assert_close("grad", ref_grad, grad, 1e-5, 1e-9)
    ignored = target == -100
    assert (grad[ignored] == 0).all()
    if reduction == "none":
        assert (loss[ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_wttm_loss_all_rows_ignored(backend, reduction):
    device = device_of(backend)
    z, v = make_logits((5, 300), 10.0, seed=19, device=device)
    z = z.float().requires_grad_()
    target = torch.full((5,), 7, device=device)
    loss = fused_wttm_loss(z, v.float(), target, ignore_index=7, reduction=reduction, backend=backend)
    loss.sum().backward()
    assert (loss == 0).all() and not loss.isnan().any()
    assert (z.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["shifted", "transposed", "row-strided"])
def test_fused_wttm_loss_strided_rows(backend, layout):
    """Sliced (B, T, V) batches are read in place; the result equals that of contiguous copies."""
    device = device_of(backend)
    z, v = make_logits((3, 8, 1100), 12.0, seed=23, device=device)
    if layout == "shifted":
        z, v = z[:, :-1], v[:, 1:]
    elif layout == "transposed":
        z, v = z.transpose(0, 1), v.transpose(0, 1)
    else:
        z, v = z[:, :, :1000], v[:, :, 50:1050]
    target = make_target(z.shape[:-1], z.shape[-1], seed=23, device=device)
    ref_loss, ref_grad = reference_loss_and_grad("wttm", z, v, target, gamma=0.2)
    loss, grad = fused_loss_and_grad("wttm", z.float(), v.float(), target, backend, gamma=0.2)
    assert grad.shape == z.shape
    assert_close("loss", ref_loss, loss, 2e-6, 1e-6)
    assert_close("grad", ref_grad, grad, 1e-5, 1e-9)


def eager_error(kind, z64, v64, target, dtype, teacher_dtype, ref_loss, ref_grad, **kw):
    """Error of the reference itself computed in the low-precision dtypes: the bar the kernel must meet."""
    z = z64.to(dtype).requires_grad_()
    loss = REFERENCE[kind](z, v64.to(teacher_dtype), target, **kw)
    loss.backward()
    return (loss.double() - ref_loss).abs().item(), (z.grad.double() - ref_grad).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,teacher_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
], ids=lambda d: str(d).replace("torch.", ""))
def test_fused_wttm_loss_low_precision(backend, dtype, teacher_dtype):
    """Fused error vs float64 is no worse than the eager reference's own error in the same dtypes."""
    device = device_of(backend)
    z64, v64 = make_logits((16, 2500), 8.0, seed=29, device=device)
    # Round the inputs first so both sides see the same values: what is compared is the arithmetic.
    z64, v64 = z64.to(dtype).double(), v64.to(teacher_dtype).double()
    target = make_target((16,), 2500, seed=29, device=device)
    kw = dict(gamma=0.2, beta=2.0)
    ref_loss, ref_grad = reference_loss_and_grad("wttm", z64, v64, target, **kw)
    eager_loss_err, eager_grad_err = eager_error("wttm", z64, v64, target, dtype, teacher_dtype, ref_loss,
                                                 ref_grad, **kw)
    loss, grad = fused_loss_and_grad("wttm", z64.to(dtype), v64.to(teacher_dtype), target, backend, **kw)
    assert grad.dtype == dtype
    grad_eps = torch.finfo(dtype).eps * ref_grad.abs().max().item()
    assert (loss.double() - ref_loss).abs().item() <= eager_loss_err + 1e-5 * ref_loss.abs().item()
    assert (grad.double() - ref_grad).abs().max().item() <= eager_grad_err + grad_eps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["wttm", "kd"])
def test_fused_loss_masked_vocabulary(backend, kind):
    """-inf logits: masked in both (padding), or in the teacher only; never NaN."""
    device = device_of(backend)
    z, v = make_logits((6, 2100), 10.0, seed=31, device=device)
    z[:, 2000:] = float("-inf")
    v[:, 2000:] = float("-inf")
    v[:3, :1500] = float("-inf")  # a teacher that rules out most classes, including whole blocks
    z[4, 100:600] = float("-inf")  # student-only masks where the teacher is also masked ...
    v[4, 100:600] = float("-inf")
    v[5, 0] = float("-inf")  # ... and a teacher-only one
    target = torch.tensor([1700, 1999, -100, 5, 50, 1], device=device)
    kw = dict(beta=1.5, **scale_kw(kind, 0.2))
    ref_loss, ref_grad = reference_loss_and_grad(kind, z, v, target, **kw)
    loss, grad = fused_loss_and_grad(kind, z.float(), v.float(), target, backend, **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close("loss", ref_loss, loss, 2e-6, 1e-6)
    assert_close("grad", ref_grad, grad, 1e-5, 1e-9)
    assert (grad[:, 2000:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_wttm_loss_extreme_logits(backend):
    device = device_of(backend)
    z, v = make_logits((8, 700), 3.0, seed=37, device=device)
    z[:, :5] = 1e4
    z[:, 5:10] = -1e4
    v[::2, 100] = 1e4
    v[1::2, 200:210] = -1e4
    target = make_target((8,), 700, seed=37, device=device)
    kw = dict(gamma=0.1, beta=2.0)
    ref_loss, ref_grad = reference_loss_and_grad("wttm", z, v, target, **kw)
    loss, grad = fused_loss_and_grad("wttm", z.float(), v.float(), target, backend, **kw)
    assert_close("loss", ref_loss, loss, 1e-5, 1e-3)
    assert_close("grad", ref_grad, grad, 1e-5, 1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_wttm_loss_components(backend):
    device = device_of(backend)
    z, v = make_logits((12, 480), 10.0, seed=41, device=device)
    target = make_target((12,), 480, seed=41, device=device)
    loss, parts = fused_wttm_loss(z.float(), v.float(), target, gamma=0.2, beta=2.0, ce_weight=0.5,
                                  backend=backend, return_components=True)
    rows = reference.loss_rows(z, v, target, teacher_scale=0.2, weighted=True, beta=2.0, ce_weight=0.5)
    valid = rows["valid"]
    for name in ("kl", "ce", "weight"):
        assert_close(name, rows[name][valid].mean(), getattr(parts, name), 2e-6)
        assert not getattr(parts, name).requires_grad
    assert_close("loss", 0.5 * parts.ce + 2.0 * (rows["weight"] * rows["kl"])[valid].mean(), loss, 2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_wttm_loss_inplace_backward(backend):
    device = device_of(backend)
    z, v = make_logits((2, 5, 900), 10.0, seed=43, device=device)
    target = make_target((2, 5), 900, seed=43, device=device)
    ref_loss, ref_grad = reference_loss_and_grad("wttm", z, v, target, gamma=0.2)
    leaf = z.float().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, as the output of a model's last layer would be
    loss = fused_wttm_loss(logits, v.float(), target, gamma=0.2, backend=backend, inplace_backward=True)
    loss.backward()
    assert_close("loss", ref_loss, loss.detach(), 2e-6, 1e-6)
    assert_close("grad", ref_grad, leaf.grad, 1e-5, 1e-9)
    assert torch.equal(logits.detach(), leaf.grad), "the gradient was not written into the logits' storage"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_wttm_loss_torch_compile(backend):
    device = device_of(backend)
    z, v = make_logits((4, 3, 300), 10.0, seed=47, device=device)
    target = make_target((4, 3), 300, seed=47, device=device)

    @torch.compile(fullgraph=True, dynamic=False)
    def step(student, teacher, tgt):
        loss = fused_wttm_loss(student, teacher, tgt, gamma=0.2, beta=2.0, backend=backend)
        return loss * 1.5

    zc = z.float().requires_grad_()
    step(zc, v.float(), target).backward()
    ref_loss, ref_grad = reference_loss_and_grad("wttm", z, v, target, upstream=torch.tensor(1.5), gamma=0.2,
                                                 beta=2.0)
    assert_close("grad", ref_grad, zc.grad, 1e-5, 1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_match_functional(backend):
    device = device_of(backend)
    z, v = make_logits((10, 250), 10.0, seed=53, device=device)
    z, v = z.float(), v.float()
    target = make_target((10,), 250, seed=53, device=device)
    for module, fn, kw in [(WTTMLoss(0.3, beta=2.0, backend=backend), fused_wttm_loss, {"gamma": 0.3}),
                           (TTMLoss(0.3, beta=2.0, backend=backend), fused_ttm_loss, {"gamma": 0.3}),
                           (KDLoss(3.0, beta=2.0, backend=backend), fused_kd_loss, {"temperature": 3.0})]:
        assert torch.equal(module(z, v, target), fn(z, v, target, beta=2.0, backend=backend, **kw))


def test_torch_backend_is_the_reference():
    z, v = make_logits((6, 100), 10.0, seed=59)
    target = make_target((6,), 100, seed=59)
    assert torch.equal(fused_wttm_loss(z, v, target, backend="torch"), reference.wttm_loss(z, v, target))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_wttm_loss_no_rows(backend):
    device = device_of(backend)
    z = torch.zeros((0, 10), device=device, requires_grad=True)
    loss = fused_wttm_loss(z, torch.zeros((0, 10), device=device), backend=backend)
    loss.backward()
    assert loss.item() == 0 and z.grad.shape == (0, 10)


def _bad(**overrides):
    z = torch.randn(4, 10) * 5
    args = dict(student_logits=z.requires_grad_(), teacher_logits=torch.randn(4, 10) * 5,
                target=torch.tensor([1, 2, 3, 4]))
    args.update(overrides)
    return args


@pytest.mark.parametrize("args,kwargs,error,match", [
    (_bad(teacher_logits=torch.randn(4, 11)), {}, ValueError, "same shape"),
    (_bad(student_logits=torch.randint(0, 5, (4, 10))), {}, TypeError, "student_logits must be a floating"),
    (_bad(teacher_logits=torch.randint(0, 5, (4, 10))), {}, TypeError, "teacher_logits must be a floating"),
    (_bad(student_logits=[1.0]), {}, TypeError, "student_logits must be a torch.Tensor"),
    (_bad(target=torch.tensor([1, 2, 3])), {}, ValueError, "target must have the leading shape"),
    (_bad(target=torch.tensor([1.0, 2, 3, 4])), {}, TypeError, "target must hold integer"),
    (_bad(target=torch.tensor([1, 2, 10, 4])), {}, ValueError, r"outside \[0, 10\)"),
    (_bad(target=torch.tensor([1, -1, 3, 4])), {}, ValueError, "ignore_index=-100"),
    (_bad(teacher_logits=(torch.randn(4, 10) * 5).requires_grad_()), {}, ValueError, "teacher_logits requires grad"),
    (_bad(), {"gamma": 0.0}, ValueError, "gamma must be a finite positive"),
    (_bad(), {"gamma": -0.5}, ValueError, "gamma"),
    (_bad(), {"gamma": float("nan")}, ValueError, "gamma"),
    (_bad(), {"gamma": float("inf")}, ValueError, "gamma"),
    (_bad(), {"beta": float("nan")}, ValueError, "beta"),
    (_bad(), {"ce_weight": float("inf")}, ValueError, "ce_weight"),
    (_bad(), {"reduction": "batchmean"}, ValueError, "reduction must be one of"),
    (_bad(), {"backend": "cuda"}, ValueError, "backend must be one of"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_fused_wttm_loss_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fused_wttm_loss(**args, **kwargs)


def test_fused_kd_loss_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        fused_kd_loss(**_bad(), temperature=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_wttm_loss_different_devices():
    z, v = make_logits((4, 10), 5.0, seed=1)
    with pytest.raises(ValueError, match="same device"):
        fused_wttm_loss(z.float().cuda(), v.float())
    with pytest.raises(ValueError, match="backend='cpu' got tensors on cuda"):
        fused_wttm_loss(z.float().cuda(), v.float().cuda(), backend="cpu")


def test_paper_code_matches_reference():
    """The ported paper code and the log-space reference agree in float64 (two independent oracles)."""
    z, v = make_logits((32, 100), 5.0, seed=61)
    target = make_target((32,), 100, seed=61, ignore_fraction=0.0)
    for gamma in (1.0, 0.2, 0.1):
        for paper, ref in ((reference.paper_wttm_loss, reference.wttm_loss),
                           (reference.paper_ttm_loss, reference.ttm_loss)):
            assert math.isclose(paper(z, v, target, gamma=gamma, beta=45.0).item(),
                                ref(z, v, target, gamma=gamma, beta=45.0).item(), rel_tol=1e-12)
    assert math.isclose(reference.paper_kd_loss(z, v, target, temperature=4.0, beta=0.9, ce_weight=0.1).item(),
                        reference.kd_loss(z, v, target, temperature=4.0, beta=0.9, ce_weight=0.1).item(),
                        rel_tol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_wttm_loss_backward_twice(backend):
    """mean/sum scale the forward's gradient in place: autograd refuses a second backward through it."""
    device = device_of(backend)
    z, v = make_logits((3, 50), 5.0, seed=67, device=device)
    z = z.float().requires_grad_()
    loss = fused_wttm_loss(z, v.float(), backend=backend) * 2.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    rows = fused_wttm_loss(z, v.float(), backend=backend, reduction="none").mean()
    rows.backward(retain_graph=True)
    rows.backward()  # the recomputing path supports it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_wttm_loss_memory_contract(reduction):
    """Forward plus backward allocate one (N, V) gradient and O(N) besides; with "mean" the teacher logits
    are not kept by the graph."""
    N, V = 2048, 32000
    z = (torch.randn(N, V, device="cuda") * 5).bfloat16().requires_grad_()
    v = (torch.randn(N, V, device="cuda") * 5).bfloat16()
    target = torch.randint(0, V, (N,), device="cuda")
    grad_bytes = N * V * 2
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fused_wttm_loss(z, v, target, reduction=reduction).sum()
    if reduction == "mean":
        teacher_bytes = v.untyped_storage().nbytes()
        del v
        assert torch.cuda.memory_allocated() <= base - teacher_bytes + grad_bytes + (1 << 20)
    (grad,) = torch.autograd.grad(loss, z)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= grad_bytes + (1 << 20)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_kd_loss_components_without_ce_weight(backend):
    """The logged CE is CE(z) (untempered) even when it carries no weight in the loss."""
    device = device_of(backend)
    z, v = make_logits((9, 333), 10.0, seed=71, device=device)
    target = make_target((9,), 333, seed=71, device=device)
    _, parts = fused_kd_loss(z.float(), v.float(), target, temperature=4.0, ce_weight=0.0, backend=backend,
                             return_components=True)
    valid = target != -100
    assert_close("ce", F.cross_entropy(z[valid], target[valid]), parts.ce, 2e-6)


# --- Hardening: each test below failed on the code before the fix it covers. ---


def _issue_second_order(z, v, target, backend):
    """The issue's example: a gradient penalty, which needs the second derivative through the loss."""
    z = z.detach().clone().requires_grad_()
    loss = fused_wttm_loss(z, v, target, gamma=0.2, beta=2.0, backend=backend)
    (g,) = torch.autograd.grad(loss, z, create_graph=True)
    ((g**2).sum() + (z**2).sum()).backward()
    return z.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_wttm_loss_double_backward_is_refused(backend, reduction):
    """The kernels' gradients are first-order: asking autograd for a graph through them raises instead of
    silently dropping the second-order term."""
    device = device_of(backend)
    z, v = make_logits((5, 300), 10.0, seed=73, device=device)
    target = make_target((5,), 300, seed=73, device=device)
    z = z.float().requires_grad_()
    loss = fused_wttm_loss(z, v.float(), target, reduction=reduction, backend=backend).sum()
    with pytest.raises(RuntimeError, match="first-order gradients only.*backend='torch'"):
        torch.autograd.grad(loss, z, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        _issue_second_order(z, v.float(), target, backend)


def test_fused_wttm_loss_double_backward_reference():
    """backend='torch' (and 'auto' on float64) is differentiable to any order: the issue's gradient penalty
    and gradgradcheck."""
    z, v = make_logits((4, 50), 5.0, seed=79)
    target = make_target((4,), 50, seed=79)
    expected = _issue_second_order(z, v, target, "torch")
    z64 = z.clone().requires_grad_()
    loss = reference.wttm_loss(z64, v, target, gamma=0.2, beta=2.0)
    (g,) = torch.autograd.grad(loss, z64, create_graph=True)
    ((g**2).sum() + (z64**2).sum()).backward()
    assert_close("second order", z64.grad, expected, 1e-12)
    assert_close("second order (float32)", z64.grad, _issue_second_order(z.float(), v.float(), target, "torch"), 1e-5)
    small_z, small_v = z[:2, :10], v[:2, :10]
    assert torch.autograd.gradgradcheck(lambda x: fused_wttm_loss(x, small_v, gamma=0.2),
                                        (small_z.clone().requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_wttm_loss_torch_backend_keeps_the_kernels_contract(dtype):
    """The reference backend computes half-precision inputs in float32 and returns a float32 loss, as the
    kernels do; the gradient has the student's dtype."""
    z64, v64 = make_logits((16, 2500), 8.0, seed=83)
    z64, v64 = z64.to(dtype).double(), v64.to(dtype).double()
    target = make_target((16,), 2500, seed=83)
    ref_loss, ref_grad = reference_loss_and_grad("wttm", z64, v64, target, gamma=0.2, beta=2.0)
    loss, grad = fused_loss_and_grad("wttm", z64.to(dtype), v64.to(dtype), target, "torch", gamma=0.2, beta=2.0)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close("loss", ref_loss, loss, 2e-6, 1e-6)
    # float32 arithmetic, then one rounding to the student's dtype.
    assert_close("grad", ref_grad, grad, torch.finfo(dtype).eps, 1e-9)


@pytest.mark.parametrize("backend", [*BACKENDS, "torch"])
@pytest.mark.parametrize("kind", ["wttm", "ttm", "kd"])
def test_fused_loss_non_finite_inputs(backend, kind):
    """Ignored rows contribute exactly nothing, whatever they hold (all -inf student logits, a NaN or -inf
    teacher); a NaN teacher in a row that counts makes that row's loss and gradient NaN, on every backend."""
    device = device_of(backend)
    z, v = make_logits((6, 700), 10.0, seed=89, device=device)
    z, v = z.float(), v.float()
    target = torch.tensor([3, -100, -100, 7, -100, 9], device=device)
    z[1] = float("-inf")
    v[2, 10] = float("nan")
    v[4] = float("-inf")
    kw = scale_kw(kind, 0.25)
    ref_loss, ref_grad = reference_loss_and_grad(kind, z.double(), v.double(), target, **kw)
    loss, grad = fused_loss_and_grad(kind, z, v, target, backend, **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close("loss", ref_loss, loss, 2e-6, 1e-6)
    assert_close("grad", ref_grad, grad, 1e-5, 1e-9)
    assert (grad[[1, 2, 4]] == 0).all()

    v[3, 100] = float("nan")
    rows, grad = fused_loss_and_grad(kind, z, v, target, backend, reduction="none",
                                     upstream=torch.ones(6, device=device), **kw)
    assert rows[3].isnan() and grad[3].isnan().all(), "a NaN teacher must not give a finite loss or gradient"
    assert torch.isfinite(rows[[0, 1, 2, 4, 5]]).all() and torch.isfinite(grad[[0, 1, 2, 4, 5]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_wttm_loss_float64_needs_the_reference(backend):
    """The kernels compute in float32: an explicit compiled backend refuses float64 inputs, which 'auto'
    gives to the reference."""
    device = device_of(backend)
    z, v = make_logits((3, 40), 5.0, seed=97, device=device)
    target = make_target((3,), 40, seed=97, device=device)
    with pytest.raises(ValueError, match=f"backend='{backend}' computes in float32.*'torch'"):
        fused_wttm_loss(z, v, target, backend=backend)
    assert ttm_kernels.resolve_backend("auto", z.device, torch.float64) == "torch"


def test_fused_loss_float64_gradcheck():
    """float64 inputs are computed in float64, so that gradcheck passes at its default tolerances."""
    z, v = make_logits((2, 12), 5.0, seed=97)
    target = torch.tensor([3, -100])
    for kind in ("wttm", "ttm", "kd"):
        assert FUSED[kind](z, v, target).dtype == torch.float64
        assert torch.autograd.gradcheck(lambda x: FUSED[kind](x, v, target, **scale_kw(kind, 0.3)),
                                        (z.clone().requires_grad_(),))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_wttm_loss_inplace_backward_misuse(backend):
    device = device_of(backend)
    z, v = make_logits((4, 300), 10.0, seed=101, device=device)
    z, v = z.float(), v.float()
    leaf = z.clone().requires_grad_()
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        fused_wttm_loss(leaf, v, backend=backend, inplace_backward=True)
    row = z[:1].clone().requires_grad_()
    with pytest.raises(ValueError, match="expanded or overlapping"):
        fused_wttm_loss(row.expand(4, 300), v, backend=backend, inplace_backward=True)
    with pytest.raises(TypeError, match="inplace_backward must be True or False, got 'no'"):
        fused_wttm_loss(leaf * 1.0, v, backend=backend, inplace_backward="no")
    with pytest.raises(TypeError, match="return_components must be True or False"):
        fused_wttm_loss(leaf * 1.0, v, backend=backend, return_components=1)


@pytest.mark.parametrize("backend", [*BACKENDS, "torch"])
@pytest.mark.parametrize("temperature", [1e2, 1e3, 1e4], ids=lambda t: f"T{t:g}")
@pytest.mark.parametrize("spread", [1.0, 10.0], ids=lambda s: f"spread{s:g}")
def test_fused_kd_loss_large_temperature(backend, temperature, spread):
    """T^2 * KL(softmax(v/T) || softmax(z/T)) stays accurate as T grows: the KL is summed from non-negative
    terms, so its digits never cancel against lse terms of size log V."""
    device = device_of(backend)
    z, v = make_logits((8, 4000), spread, seed=103, device=device)
    target = make_target((8,), 4000, seed=103, device=device)
    kw = dict(temperature=temperature, ce_weight=0.0)
    ref_loss, ref_grad = reference_loss_and_grad("kd", z, v, target, **kw)
    loss, grad = fused_loss_and_grad("kd", z.float(), v.float(), target, backend, **kw)
    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * abs(ref_loss.item())
    # The gradient T * (q - p) is a difference of near-equal fp32 probabilities: as accurate as the paper's
    # eager code in fp32 (RepDistiller's DistillKL), what users would run instead.
    z32 = z.float().requires_grad_()
    reference.paper_kd_loss(z32, v.float(), temperature=temperature, ce_weight=0.0).backward()
    eager_grad_err = (z32.grad.double() - ref_grad).abs().max().item()
    grad_err = (grad.double() - ref_grad).abs().max().item()
    assert grad_err <= 2 * eager_grad_err + 1e-6 * ref_grad.abs().max().item()


@pytest.mark.parametrize("backend", [*BACKENDS, "torch"])
def test_fused_ttm_loss_small_kl_keeps_its_digits(backend):
    """A student that nearly matches the transformed teacher (KL ~ 1e-6, far below log V): relative error
    1e-4, where the one-pass formula lost every digit."""
    device = device_of(backend)
    v, noise = make_logits((8, 5000), 10.0, seed=107, device=device)
    z = 0.2 * v + 1e-3 * noise / 10.0
    ref_loss, _ = reference_loss_and_grad("ttm", z.float().double(), v.float().double(), None, gamma=0.2)
    loss, _ = fused_loss_and_grad("ttm", z.float(), v.float(), None, backend, gamma=0.2)
    assert 0 < ref_loss.item() < 1e-5
    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * ref_loss.item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_wttm_loss_rounds_the_gradient_to_nearest(backend, dtype):
    """A low-precision gradient is the fp32 gradient rounded to nearest once, as the GPU stores it (the Triton
    interpreter truncates fp32 -> bf16 unless the kernel rounds the bits itself)."""
    device = device_of(backend)
    z, v = make_logits((8, 3000), 10.0, seed=109, device=device)
    z, v = z.to(dtype).float(), v.float()
    target = make_target((8,), 3000, seed=109, device=device)
    _, grad = fused_loss_and_grad("wttm", z.to(dtype), v, target, backend, gamma=0.2)
    _, grad32 = fused_loss_and_grad("wttm", z, v, target, backend, gamma=0.2)
    same = (grad == grad32.to(dtype)).float().mean().item()
    assert same >= 0.99, f"only {same:.1%} of the gradient equals the fp32 gradient rounded to nearest"


@pytest.mark.parametrize("backend", [*BACKENDS, "torch"])
def test_fused_wttm_loss_target_out_of_range_poisons_compiled_rows(backend):
    """Under torch.compile the range check is the kernels': a bad row gets a NaN loss and a NaN gradient,
    never a finite wrong one (nor, with the reference backend, a raw index error)."""
    device = device_of(backend)
    z, v = make_logits((4, 100), 5.0, seed=113, device=device)
    target = torch.tensor([1, 100, -100, -1], device=device)

    @torch.compile(fullgraph=True, dynamic=False)
    def rows(student, teacher, tgt):
        return fused_wttm_loss(student, teacher, tgt, reduction="none", backend=backend)

    student = z.float().requires_grad_()
    loss = rows(student, v.float(), target)
    loss.backward(torch.ones(4, device=device))
    assert torch.isfinite(loss[[0, 2]]).all() and loss[[1, 3]].isnan().all()
    assert torch.isfinite(student.grad[[0, 2]]).all() and student.grad[[1, 3]].isnan().all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_wttm_loss_no_host_sync_and_cuda_graph():
    """A training step with the loss never makes the host wait for the device (the target check included)
    and can be captured in a CUDA graph and replayed."""
    N, V = 64, 5000
    z = (torch.randn(N, V, device="cuda") * 5).requires_grad_()
    v = torch.randn(N, V, device="cuda") * 5
    target = torch.randint(0, V, (N,), device="cuda")
    target[::7] = -100
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_wttm_loss(z, v, target, gamma=0.2, beta=2.0).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = z.grad.clone()

    static_z = z.detach().clone().requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (compilation, allocations)
        for _ in range(2):
            static_z.grad = None
            fused_wttm_loss(static_z, v, target, gamma=0.2, beta=2.0).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    static_z.grad = None
    with torch.cuda.graph(graph):
        loss = fused_wttm_loss(static_z, v, target, gamma=0.2, beta=2.0)
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_z.grad, expected, rtol=1e-6, atol=1e-9)


# --- The split-row path (few long rows): pieces of a row merged, then the KL/gradient pass per piece. ---

TRITON = BACKENDS[:1]


@pytest.fixture
def split_rows(monkeypatch):
    """Forces the Triton split-row path with pieces of ``width`` columns (not a power of two, so that pieces
    end inside a block)."""
    from ttm_kernels import triton_kernels

    def force(width=1000):
        monkeypatch.setattr(triton_kernels, "row_split", lambda n_rows, V, device: min(width, V))
    return force


SPLIT_CASES = {
    # name: (shape, spread, kind, kwargs, target kind, layout)
    "wttm-multipiece": ((5, 4321), 10.0, "wttm", dict(gamma=0.2, beta=2.0, ce_weight=0.7), "random", None),
    "kd-separate-ce": ((4, 3001), 20.0, "kd", dict(temperature=4.0, ce_weight=0.5), "random", None),
    "ttm-no-target-sum": ((3, 2500), 5.0, "ttm", dict(gamma=0.1, reduction="sum"), None, None),
    "wttm-none-upstream": ((2, 3, 2100), 15.0, "wttm", dict(gamma=0.3, reduction="none"), "random", None),
    "target-in-last-piece": ((3, 2999), 10.0, "wttm", dict(gamma=0.2), "last", None),
    "masks-across-pieces": ((6, 3100), 10.0, "wttm", dict(gamma=0.2, beta=1.5), "masked", None),
    "strided-rows": ((3, 8, 2200), 12.0, "wttm", dict(gamma=0.2), "random", "sliced"),
    "all-ignored": ((4, 2048), 10.0, "wttm", dict(gamma=0.2), "ignored", None),
}


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_fused_loss_split_rows(backend, case, split_rows):
    split_rows()
    shape, spread, kind, kw, target_kind, layout = SPLIT_CASES[case]
    device = device_of(backend)
    z, v = make_logits(shape, spread, seed=len(case), device=device)
    lead, V = shape[:-1], shape[-1]
    target = None if target_kind is None else make_target(lead, V, seed=5, device=device)
    if target_kind == "last":
        target = torch.full(lead, V - 1, device=device)
    elif target_kind == "ignored":
        target = torch.full(lead, -100, device=device)
    elif target_kind == "masked":
        z[:, 2000:] = v[:, 2000:] = float("-inf")  # a masked tail spanning two pieces
        v[:2, :1500] = float("-inf")  # a teacher that rules out whole pieces
        z[3, 900:1100] = v[3, 900:1100] = float("-inf")  # a mask across a piece boundary
        target[:] = torch.tensor([1700, 1999, -100, 5, 50, 1], device=device)
    if layout == "sliced":
        z, v = z[:, :-1, 50:2150], v[:, 1:, :2100]
        target = target[:, :-1]
    upstream = None
    if kw.get("reduction") == "none":
        upstream = torch.randn(z.shape[:-1], generator=torch.Generator().manual_seed(1)).to(device)
    ref_loss, ref_grad = reference_loss_and_grad(kind, z, v, target, upstream=upstream, **kw)
    loss, grad = fused_loss_and_grad(kind, z.float(), v.float(), target, backend, upstream=upstream, **kw)
    assert_close("loss", ref_loss, loss, 2e-6, 1e-6)
    assert_close("grad", ref_grad, grad, 1e-5, 1e-9)
    if target is not None:
        assert (grad[target == -100] == 0).all()


@pytest.mark.parametrize("backend", TRITON)
def test_fused_wttm_loss_split_rows_bf16_and_poisoned_target(backend, split_rows):
    """bf16 gradients rounded to nearest and out-of-range targets poisoned, piece by piece."""
    split_rows(700)
    device = device_of(backend)
    z, v = make_logits((4, 2300), 10.0, seed=3, device=device)
    z = z.bfloat16().float()
    target = torch.tensor([3, 2299, 5000, -100], device=device)

    @torch.compile(fullgraph=True, dynamic=False)  # the range check is then the kernels'
    def rows(student, teacher, tgt):
        return fused_wttm_loss(student, teacher, tgt, reduction="none", backend=backend)

    student = z.bfloat16().requires_grad_()
    loss = rows(student, v.float(), target)
    loss.backward(torch.ones(4, device=device))
    assert loss[2].isnan() and student.grad[2].isnan().all()
    z32 = z.clone().requires_grad_()
    fused_wttm_loss(z32, v.float(), target.clamp(max=2299), reduction="none", backend=backend).backward(
        torch.ones(4, device=device))
    same = (student.grad[[0, 1, 3]] == z32.grad[[0, 1, 3]].bfloat16()).float().mean().item()
    assert same >= 0.99


def test_row_split_fills_the_device(monkeypatch):
    """One program per row while rows fill the SMs; pieces of whole blocks otherwise."""
    from ttm_kernels import triton_kernels

    monkeypatch.setattr(triton_kernels, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    assert triton_kernels.row_split(4096, 262144, cuda) == 262144
    assert triton_kernels.row_split(4096, 32000, cuda) == 32000
    width = triton_kernels.row_split(64, 262144, cuda)
    assert width < 262144 and width % triton_kernels.MAX_BLOCK_V == 0
    assert 64 * math.ceil(262144 / width) >= 2 * 132  # at least two programs per SM
    assert triton_kernels.row_split(64, 20000, cuda) == 20000  # too short to split


@pytest.mark.parametrize("backend", [*BACKENDS, "torch"])
@pytest.mark.parametrize("kind", ["wttm", "kd"])
def test_fused_loss_num_items_in_batch_accumulates_to_the_full_batch(backend, kind):
    """4 micro-batches of uneven padding (one all padding), each divided by the labelled rows of all four
    (a tensor, as Hugging Face's Trainer passes it, or a number), accumulate to the full batch's loss and
    gradient; module and functional agree."""
    device = device_of(backend)
    z, v = make_logits((4, 9, 301), 10.0, seed=71, device=device)
    target = make_target((4, 9), 301, seed=71, ignore_fraction=0.0, device=device)
    for batch, pad in enumerate((0, 2, 5, 9)):
        target[batch, 9 - pad:] = -100
    kw = dict(beta=2.0, ce_weight=0.5, **scale_kw(kind, 0.25))
    full_loss, full_grad = fused_loss_and_grad(kind, z.float(), v.float(), target, backend, **kw)
    count = (target != -100).sum()
    student = z.float().requires_grad_()
    total = 0.0
    for batch, num_items in enumerate((count, int(count), float(count), count.float())):
        loss = FUSED[kind](student[batch], v[batch].float(), target[batch], backend=backend,
                           num_items_in_batch=num_items, **kw)
        loss.backward()
        total += loss.item()
    assert_close("loss", full_loss, torch.tensor(total), 2e-6, 1e-7)
    assert_close("grad", full_grad, student.grad, 1e-6, 1e-9)
    module = (WTTMLoss(0.25, beta=2.0, ce_weight=0.5, backend=backend) if kind == "wttm"
              else KDLoss(4.0, beta=2.0, ce_weight=0.5, backend=backend))
    with torch.no_grad():
        assert torch.equal(module(z[1].float(), v[1].float(), target[1], num_items_in_batch=count),
                           FUSED[kind](z[1].float(), v[1].float(), target[1], backend=backend,
                                       num_items_in_batch=count, **kw))


@pytest.mark.parametrize("num_items,kwargs,error,match", [
    (0, {}, ValueError, "finite positive count, got 0"),
    (-3.0, {}, ValueError, "finite positive"),
    (float("nan"), {}, ValueError, "finite positive"),
    (torch.tensor(0), {}, ValueError, "finite positive"),
    (torch.tensor([3, 4]), {}, ValueError, "one-element tensor"),
    (torch.tensor(True), {}, TypeError, "must hold a count"),
    (True, {}, TypeError, "num_items_in_batch must be None, a number or a tensor"),
    ("12", {}, TypeError, "num_items_in_batch must be None"),
    (12, {"reduction": "sum"}, ValueError, "denominator of reduction='mean'"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_fused_wttm_loss_bad_num_items_in_batch(num_items, kwargs, error, match):
    with pytest.raises(error, match=match):
        fused_wttm_loss(**_bad(), num_items_in_batch=num_items, **kwargs)


def test_fused_wttm_loss_fast_target_check_still_refuses():
    """The one-reduction check of well-formed targets passes ignored rows to the full check, which still
    finds an out-of-range index among them."""
    args = _bad(target=torch.tensor([1, -100, -7, 4]))
    with pytest.raises(ValueError, match=r"outside \[0, 10\).*e.g. -7"):
        fused_wttm_loss(**args)
    fused_wttm_loss(**_bad(target=torch.tensor([1, -100, 9, 0])))
