"""The layout matrix: every tensor argument of the fused losses, in every memory layout a user can hand in,
on every backend, against the float64 reference on the same values.

One argument at a time is laid out as
  contiguous; sliced (a strided view of a larger tensor, e.g. ``labels[:, 0]`` or ``logits[:, :-1]``);
  expanded (stride 0, e.g. ``t[:1].expand(N)``); transposed (every dimension reversed, so that the
  last one is not contiguous either);
and index tensors also as int32. The other arguments stay contiguous. Gradients are compared on the leaf
tensor the view was taken from, so that autograd's handling of the view is part of what is checked.
"""
import pytest
import torch

import ttm_kernels
from ttm_kernels import (fused_linear_wttm_loss, fused_linear_wttm_loss_topk, fused_wttm_loss,
                         fused_wttm_loss_topk, reference)

BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not ttm_kernels.triton_available(), reason="triton not installed")),
    pytest.param("cpu", marks=pytest.mark.skipif(not ttm_kernels.cpu_extension_available(),
                                                 reason="C++ extension not built")),
    "torch",
]
LAYOUTS = ("contiguous", "sliced", "expanded", "transposed")


def device_of(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def lay_out(x: torch.Tensor, layout: str, requires_grad: bool = False, expanded_dim: int = 0):
    """(leaf, view): ``view`` has x's shape and dtype in ``layout`` and is a differentiable view of ``leaf``.
    Its values are x's, except for "expanded", which repeats x's first slice along ``expanded_dim``."""
    reverse = tuple(reversed(range(x.dim())))
    if layout == "contiguous":
        leaf = x.clone()
    elif layout == "sliced":
        # Every other index of the leading dimensions, and an offset window of the last (of a 1-D tensor:
        # every other element): rows further apart than a row, a first element not at the storage start.
        shape = [2 * n for n in x.shape[:-1]] + [x.shape[-1] + 3] if x.dim() > 1 else [2 * x.shape[0] + 1]
        index = (*(slice(None, None, 2),) * (x.dim() - 1), slice(1, x.shape[-1] + 1)) if x.dim() > 1 \
            else (slice(1, None, 2),)
        leaf = torch.zeros(shape, dtype=x.dtype, device=x.device)
        leaf[index] = x
    elif layout == "expanded":
        leaf = x.narrow(expanded_dim, 0, 1).clone()
    elif layout == "transposed":
        leaf = x.permute(reverse).contiguous()
    else:
        raise ValueError(layout)
    if requires_grad:
        leaf.requires_grad_()
    if layout == "sliced":
        view = leaf[index]
    elif layout == "expanded":
        view = leaf.expand(x.shape)
    elif layout == "transposed":
        view = leaf.permute(reverse)
    else:
        view = leaf
    return leaf, view


def randn(shape, seed, spread=1.0):
    """float32-representable float64 values, so that both sides see the same inputs."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * spread).float().double()


def assert_close(name, ref, out, rtol, atol=0.0, scale=None):
    """Max abs error within rtol of ``scale`` (default: the reference's largest magnitude) plus atol."""
    ref, out = ref.double().cpu(), out.double().cpu()
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: not finite"
    err = (ref - out).abs().max().item()
    scale = ref.abs().max().item() if scale is None else scale
    assert err <= rtol * scale + atol, f"{name}: max error {err:.3g} > {rtol:g} * {scale:.3g} + {atol:g}"


# (leading shape, argument, layout, index dtype): each argument in each layout that its rank allows, for
# (N, V) logits with an (N,) target (``labels[:, 0]``) and (B, T, V) logits with a (B, T) target.
DENSE_CASES = [(lead, arg, layout, None) for lead in ((12,), (3, 4))
               for arg in ("student_logits", "teacher_logits", "upstream") for layout in LAYOUTS
               if arg != "upstream" or len(lead) > 1 or layout != "transposed"]
DENSE_CASES += [(lead, "target", layout, dtype) for lead in ((12,), (3, 4)) for layout in LAYOUTS
                for dtype in (torch.int64, torch.int32) if len(lead) > 1 or layout != "transposed"]


def _case_id(case):
    *lead, arg, layout, dtype = case
    return "-".join([*(f"N{'x'.join(map(str, n))}" for n in lead), arg, layout,
                     *(() if dtype is None else (str(dtype).replace("torch.", ""),))])


def check_row_loss_layout(loss_fn, values, backend, arg, layout, index_dtype):
    """``loss_fn(args, backend)``, a (...) loss of reduction "none" of ``values`` with ``arg`` in ``layout`` (and
    ``index_dtype``), and its gradient of ``student_logits`` for the upstream gradient ``values["upstream"]``,
    against the float64 reference on the same values."""
    device = device_of(backend)

    def run(dtype, backend):
        args = {k: x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
                for k, x in values.items()}
        if index_dtype is not None:
            args[arg] = args[arg].to(index_dtype)
        leaf, args[arg] = lay_out(args[arg], layout, requires_grad=arg == "student_logits")
        if arg != "student_logits":
            leaf = args["student_logits"] = args["student_logits"].clone().requires_grad_()
        loss = loss_fn(args, backend)
        loss.backward(args["upstream"])
        return loss.detach(), leaf.grad

    ref_loss, ref_grad = run(torch.float64, "torch")
    loss, grad = run(torch.float32, backend)
    assert_close("loss", ref_loss, loss, 2e-6, 1e-6)
    assert_close("grad", ref_grad, grad, 1e-5, 1e-9)


def row_values(lead, V, seed, **teacher):
    """Student logits, a target (every fifth ignored) and an upstream gradient for rows of ``lead``, and the
    teacher's arguments."""
    gen = torch.Generator().manual_seed(seed + 3)
    target = torch.randint(0, V, lead, generator=gen)
    target.view(-1)[1::5] = -100
    return {"student_logits": randn((*lead, V), seed, 10.0), **teacher, "upstream": randn(lead, seed + 2),
            "target": target}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DENSE_CASES, ids=[_case_id(c) for c in DENSE_CASES])
def test_fused_wttm_loss_layout(backend, case):
    lead, arg, layout, index_dtype = case
    V = 300
    values = row_values(lead, V, 1, teacher_logits=randn((*lead, V), 2, 10.0))

    def loss_fn(args, backend):
        return fused_wttm_loss(args["student_logits"], args["teacher_logits"], args["target"], gamma=0.2, beta=2.0,
                               reduction="none", backend=backend)

    check_row_loss_layout(loss_fn, values, backend, arg, layout, index_dtype)


STUDENT = ("student_hidden", "student_weight", "student_bias")


def check_linear_loss_layout(loss_fn, values, backend, arg, layout, index_dtype):
    """``loss_fn(args, backend)``, a (N,) loss of reduction "none" of ``values`` with ``arg`` in ``layout`` (and
    ``index_dtype``), and its gradients of the student's hidden states, head and bias for the upstream gradient
    ``values["upstream"]``, against the float64 reference on the same values."""
    device = device_of(backend)
    # A weight expanded along its rows would give every class the same logit; expand it along H instead.
    expanded_dim = -1 if arg.endswith("weight") else 0

    def run(dtype, backend):
        args = {k: x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
                for k, x in values.items()}
        if index_dtype is not None:
            args[arg] = args[arg].to(index_dtype)
        leaves = {}
        for k in args:
            if k == arg:
                leaves[k], args[k] = lay_out(args[k], layout, requires_grad=k in STUDENT,
                                             expanded_dim=expanded_dim)
                if k in STUDENT:
                    args[k].retain_grad()
            elif k in STUDENT:
                leaves[k] = args[k] = args[k].clone().requires_grad_()
        loss = loss_fn(args, backend)
        loss.backward(args["upstream"])
        view_grad = args[arg].grad if arg in STUDENT else None
        return loss.detach(), {k: leaves[k].grad for k in STUDENT}, view_grad

    ref_loss, ref_grads, ref_view_grad = run(torch.float64, "torch")
    loss, grads, _ = run(torch.float32, backend)
    assert_close("loss", ref_loss, loss, 1e-5, 1e-6)
    for k in STUDENT:
        scale = None
        if k == arg and layout == "expanded":
            # Each entry sums the view's gradient along the expanded dimension, which may cancel to 0 (a bias
            # shared by every class has gradient 0): the error scale is the sum of the magnitudes.
            scale = ref_view_grad.abs().sum(expanded_dim).max().item()
        assert_close(f"d {k}", ref_grads[k], grads[k], 1e-4, 1e-7, scale=scale)


def student_head(N, H, V, seed, **teacher):
    """The student's (N, H) hidden states, (V, H) head and (V,) bias, a target (every fifth ignored) and an
    upstream gradient, and the teacher's arguments."""
    gen = torch.Generator().manual_seed(seed + 7)
    target = torch.randint(0, V, (N,), generator=gen)
    target[::5] = -100
    return {"student_hidden": randn((N, H), seed), "student_weight": randn((V, H), seed + 1, 10.0 / H**0.5),
            "student_bias": randn((V,), seed + 2), **teacher, "upstream": randn((N,), seed + 6), "target": target}


LINEAR_ARGS = (*STUDENT, "teacher_hidden", "teacher_weight", "teacher_bias", "upstream")
LINEAR_CASES = [(arg, layout, None) for arg in LINEAR_ARGS for layout in LAYOUTS
                if not (arg in ("student_bias", "teacher_bias", "upstream") and layout == "transposed")]
LINEAR_CASES += [("target", layout, dtype) for layout in ("contiguous", "sliced", "expanded")
                 for dtype in (torch.int64, torch.int32)]  # 1-D tensors: no other dimension order


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=[_case_id(c) for c in LINEAR_CASES])
def test_fused_linear_wttm_loss_layout(backend, case):
    arg, layout, index_dtype = case
    N, H, H_t, V = 22, 16, 20, 90
    values = student_head(N, H, V, 5, teacher_hidden=randn((N, H_t), 8),
                          teacher_weight=randn((V, H_t), 9, 10.0 / H_t**0.5), teacher_bias=randn((V,), 10))

    def loss_fn(args, backend):
        return fused_linear_wttm_loss(args["student_hidden"], args["student_weight"], args["teacher_hidden"],
                                      args["teacher_weight"], args["target"], student_bias=args["student_bias"],
                                      teacher_bias=args["teacher_bias"], gamma=0.2, reduction="none", chunk_size=8,
                                      backend=backend)

    check_linear_loss_layout(loss_fn, values, backend, arg, layout, index_dtype)


def teacher_topk(lead, V, k, seed):
    """A sparse teacher's arguments: the top-k of V in shuffled order (a few slots padded with -1) and the
    float32-representable float64 log-probabilities of its full softmax."""
    gen = torch.Generator().manual_seed(seed)
    top = torch.log_softmax(randn((*lead, V), seed, 10.0), -1).topk(k, dim=-1)
    order = torch.argsort(torch.rand(*lead, k, generator=gen), dim=-1)
    ids, logprobs = top.indices.gather(-1, order), top.values.gather(-1, order).float().double()
    ids.view(-1, k)[::4, -2:] = -1
    return {"teacher_topk_ids": ids, "teacher_topk_logprobs": logprobs}


# The sparse teacher's (..., k) ids (an index: int64 and int32) and log-probabilities, beside the student's.
TOPK_CASES = [(lead, arg, layout, None) for lead in ((12,), (3, 4))
              for arg in ("student_logits", "teacher_topk_logprobs", "upstream") for layout in LAYOUTS
              if arg != "upstream" or len(lead) > 1 or layout != "transposed"]
TOPK_CASES += [(lead, arg, layout, dtype) for lead in ((12,), (3, 4)) for arg in ("teacher_topk_ids", "target")
               for layout in LAYOUTS for dtype in (torch.int64, torch.int32)
               if arg != "target" or len(lead) > 1 or layout != "transposed"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", TOPK_CASES, ids=[_case_id(c) for c in TOPK_CASES])
def test_fused_wttm_loss_topk_layout(backend, case):
    lead, arg, layout, index_dtype = case
    V = 300
    values = row_values(lead, V, 22, **teacher_topk(lead, V, 16, 21))

    def loss_fn(args, backend):
        return fused_wttm_loss_topk(args["student_logits"], args["teacher_topk_ids"], args["teacher_topk_logprobs"],
                                    args["target"], gamma=0.2, beta=2.0, reduction="none", backend=backend)

    check_row_loss_layout(loss_fn, values, backend, arg, layout, index_dtype)


LINEAR_TOPK_CASES = [(arg, layout, None) for arg in (*STUDENT, "teacher_topk_logprobs", "upstream")
                     for layout in LAYOUTS if not (arg in ("student_bias", "upstream") and layout == "transposed")]
LINEAR_TOPK_CASES += [(arg, layout, dtype) for arg in ("teacher_topk_ids", "target") for layout in LAYOUTS
                      for dtype in (torch.int64, torch.int32) if not (arg == "target" and layout == "transposed")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LINEAR_TOPK_CASES, ids=[_case_id(c) for c in LINEAR_TOPK_CASES])
def test_fused_linear_wttm_loss_topk_layout(backend, case):
    arg, layout, index_dtype = case
    N, H, V = 22, 16, 90
    values = student_head(N, H, V, 32, **teacher_topk((N,), V, 8, 31))

    def loss_fn(args, backend):
        return fused_linear_wttm_loss_topk(args["student_hidden"], args["student_weight"], args["teacher_topk_ids"],
                                           args["teacher_topk_logprobs"], args["target"],
                                           student_bias=args["student_bias"], gamma=0.2, reduction="none",
                                           chunk_size=8, backend=backend)

    check_linear_loss_layout(loss_fn, values, backend, arg, layout, index_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_wttm_loss_strided_target_under_torch_compile(backend):
    """``labels[:, 0]``-style targets inside a compiled training step (the custom ops' own launch path)."""
    device = device_of(backend)
    z, v = randn((6, 200), 13, 10.0).float().to(device), randn((6, 200), 14, 10.0).float().to(device)
    labels = torch.randint(0, 200, (6, 2), generator=torch.Generator().manual_seed(15)).to(device)

    @torch.compile(fullgraph=True, dynamic=False)
    def step(student, teacher, target):
        return fused_wttm_loss(student, teacher, target, gamma=0.2, backend=backend)

    student = z.clone().requires_grad_()
    step(student, v, labels[:, 0]).backward()
    z64 = z.double().requires_grad_()
    reference.wttm_loss(z64, v.double(), labels[:, 0].contiguous(), gamma=0.2).backward()
    assert_close("grad", z64.grad, student.grad, 1e-5, 1e-9)
