"""What is specific to the C++ extension ttm_kernels._C (the losses themselves are tested, on every backend,
in test_fused_loss.py): op registration, input checks, results independent of the thread count and of
the instruction set the kernels were compiled for, and the in-place gradient."""
import json
import os
import subprocess
import sys

import pytest
import torch

import ttm_kernels

pytestmark = pytest.mark.skipif(not ttm_kernels.cpu_extension_available(), reason="C++ extension not built")

PARAMS = dict(student_scale=1.0, teacher_scale=0.2, kl_coef=2.0, ce_weight=1.0, ignore_index=-100, jsd_beta=0.0)


def cpu_kernels():
    from ttm_kernels import cpu_kernels
    return cpu_kernels


def inputs(rows=6, vocab=5000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(1, rows, vocab, generator=gen) * 4
    v = torch.randn(1, rows, vocab, generator=gen) * 4
    y = torch.randint(0, vocab, (rows,), generator=gen)
    y[1] = PARAMS["ignore_index"]
    return z, v, y


def forward_and_backward(z, v, y):
    kernels = cpu_kernels()
    stats = kernels.forward(z, v, y, weighted=True, **PARAMS)
    grad = torch.empty_like(z)
    row_grad = torch.linspace(0.5, 2.0, z.shape[1])
    kernels.backward(row_grad, z, v, y, stats, grad, **PARAMS)
    return stats, grad


def test_ops_registered_in_their_own_namespace():
    cpu_kernels()
    for op in ("forward", "partial", "merge", "pieces"):
        assert hasattr(torch.ops.ttm_kernels_C, op)
    assert cpu_kernels().cpu_isa() in ("avx512", "avx2", "baseline")


def test_results_do_not_depend_on_the_thread_count():
    z, v, y = inputs(rows=37, vocab=3001)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(forward_and_backward(z, v, y))
    finally:
        torch.set_num_threads(previous)
    for stats, grad in results[1:]:
        assert torch.equal(stats, results[0][0])
        assert torch.equal(grad, results[0][1])


_ISA_SCRIPT = """
import json, torch
from ttm_kernels import cpu_kernels
gen = torch.Generator().manual_seed(0)
z = torch.randn(1, 5, 4099, generator=gen) * 4
v = torch.randn(1, 5, 4099, generator=gen) * 4
y = torch.randint(0, 4099, (5,), generator=gen)
p = dict(student_scale=0.25, teacher_scale=0.25, kl_coef=16.0, ce_weight=0.5, ignore_index=-100, jsd_beta=0.0)
stats = cpu_kernels.forward(z, v, y, weighted=True, **p)
grad = torch.empty_like(z)
cpu_kernels.backward(torch.ones(5), z, v, y, stats, grad, **p)
print(json.dumps([cpu_kernels.cpu_isa(), stats.tolist(), grad.flatten()[::7].tolist()]))
"""


def test_every_instruction_set_agrees():
    """The baseline, AVX2 and AVX-512 builds differ only in rounding (lane count of the sums, FMA)."""
    results = {}
    for isa in ("baseline", "avx2", "avx512"):
        env = dict(os.environ, TTM_KERNELS_CPU_ISA=isa)
        out = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, check=True, capture_output=True,
                             text=True).stdout
        ran, stats, grad = json.loads(out.strip().splitlines()[-1])
        results[ran] = (torch.tensor(stats), torch.tensor(grad))
    assert "baseline" in results
    stats0, grad0 = results["baseline"]
    for stats, grad in results.values():
        torch.testing.assert_close(stats, stats0, rtol=1e-5, atol=1e-6)
        # Entries that are differences of two near-equal probabilities agree to the largest entry's precision.
        torch.testing.assert_close(grad, grad0, rtol=1e-4, atol=1e-6 * grad0.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradient_written_over_the_student(dtype):
    z, v, y = inputs()
    z = z.to(dtype)
    stats, grad = forward_and_backward(z, v, y)
    in_place = z.clone()
    cpu_kernels().backward(torch.linspace(0.5, 2.0, z.shape[1]), in_place, v, y, stats, in_place, **PARAMS)
    assert torch.equal(in_place, grad)
    assert grad[0, 1].abs().max() == 0  # the ignored row


def test_forward_with_gradient_matches_backward():
    z, v, y = inputs()
    stats, grad = forward_and_backward(z, v, y)
    fused_grad = torch.empty_like(z)
    fused_stats = cpu_kernels().forward(z, v, y, weighted=True, grad=fused_grad,
                                        row_grad=torch.linspace(0.5, 2.0, z.shape[1]), **PARAMS)
    assert torch.equal(fused_stats, stats)
    assert torch.equal(fused_grad, grad)


def test_rejects_bad_inputs():
    z, v, y = inputs()
    kernels = cpu_kernels()
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        kernels.forward(z.transpose(1, 2), v.transpose(1, 2), None, weighted=True, **PARAMS)
    with pytest.raises(RuntimeError, match="rows"):
        kernels.forward(z, v[:, :-1], y, weighted=True, **PARAMS)
    # The Python launcher normalises the target (ttm_kernels._ops); the op only checks that it did.
    with pytest.raises(RuntimeError, match="target must be a contiguous int64"):
        kernels.forward(z, v, y.float(), weighted=True, **PARAMS)
    with pytest.raises(RuntimeError, match="target must be a contiguous int64"):
        kernels.forward(z, v, torch.stack([y, y], 1)[:, 0], weighted=True, **PARAMS)
    with pytest.raises(RuntimeError, match="float32, bfloat16, float16 or float64"):
        kernels.forward(z.to(torch.int32), v, y, weighted=True, **PARAMS)
