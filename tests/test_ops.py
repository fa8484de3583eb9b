"""The ``torch.library`` ops of ``ttm_kernels._ops``: at most four, shared by the dense and the top-k teacher forms,
each path through them traced whole by torch.compile with the float64 reference's loss and gradient."""
import importlib
import pkgutil

import pytest
import torch

import ttm_kernels
from ttm_kernels import fused_wttm_loss, fused_wttm_loss_topk, reference

BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not ttm_kernels.triton_available(), reason="triton not installed")),
    pytest.param("cpu", marks=pytest.mark.skipif(not ttm_kernels.cpu_extension_available(),
                                                 reason="C++ extension not built")),
]
MAX_OPS = 4


def test_at_most_four_custom_ops():
    """Every module imported, the package's namespace holds at most four ops (the C++ extension's own namespace,
    ttm_kernels_C, is the kernels', not autograd's or torch.compile's)."""
    for module in pkgutil.walk_packages(ttm_kernels.__path__, "ttm_kernels."):
        if module.name != "ttm_kernels.demo":
            importlib.import_module(module.name)
    ops = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("ttm_kernels::"))
    assert 0 < len(ops) <= MAX_OPS, ops


def _problem(seed):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(4, 3, 300, generator=gen, dtype=torch.float64) * 10
    v = torch.randn(4, 3, 300, generator=gen, dtype=torch.float64) * 10
    target = torch.randint(0, 300, (4, 3), generator=gen)
    target[torch.rand(4, 3, generator=gen) < 0.25] = -100
    top = torch.log_softmax(v, -1).topk(16, -1)
    return z, v, target, top.indices, top.values


# (form, reduction, inplace_backward): the paths of fused_rows_loss through the ops - the gradient in the forward
# (loss_fwd with row_grad, then scale_grad_), the statistics then the backward (loss_fwd, loss_bwd), and both
# writing into the student's storage (loss_into_student_).
PATHS = [("dense", "mean", False), ("dense", "none", False), ("dense", "sum", True), ("dense", "none", True),
         ("topk", "mean", False), ("topk", "none", False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form,reduction,inplace", PATHS, ids=["-".join(map(str, p)) for p in PATHS])
def test_fused_rows_loss_torch_compile(backend, form, reduction, inplace):
    torch._dynamo.reset()  # each case compiles the same loss functions afresh: no recompile limit across cases
    z, v, target, ids, logprobs = _problem(seed=len(form) + len(reduction) + inplace)
    upstream = torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    upstream = upstream if reduction == "none" else torch.tensor(1.5, dtype=torch.float64)

    def loss_of(student, teacher, topk_ids, topk_logprobs, tgt, reference_loss=False):
        if form == "dense":
            if reference_loss:
                return reference.wttm_loss(student, teacher, tgt, gamma=0.2, beta=2.0, reduction=reduction)
            return fused_wttm_loss(student, teacher, tgt, gamma=0.2, beta=2.0, reduction=reduction, backend=backend,
                                   inplace_backward=inplace)
        if reference_loss:
            return reference.wttm_loss_topk(student, topk_ids, topk_logprobs, tgt, gamma=0.2, beta=2.0,
                                            reduction=reduction)
        return fused_wttm_loss_topk(student, topk_ids, topk_logprobs, tgt, gamma=0.2, beta=2.0, reduction=reduction,
                                    backend=backend)

    @torch.compile(fullgraph=True, dynamic=False)
    def step(student, teacher, topk_ids, topk_logprobs, tgt):
        # Through a product, so that an in-place student is a non-leaf, as a model's logits are.
        return loss_of(student * 1.0, teacher, topk_ids, topk_logprobs, tgt)

    z64 = z.clone().requires_grad_()
    ref = loss_of(z64, v, ids, logprobs, target, reference_loss=True)
    ref.backward(upstream)
    student = z.float().requires_grad_()
    loss = step(student, v.float(), ids, logprobs.float(), target)
    loss.backward(upstream.float())
    torch.testing.assert_close(loss.detach().double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), z64.grad, rtol=1e-4, atol=1e-7)
