"""The Triton kernels compile for a Hopper GPU (sm_90) with Triton's own toolchain, without a GPU.

The interpreter that runs the loss tests here accepts some programs the compiler rejects (types of
loop-carried values, early returns, constexpr branches), so every kernel variant is also compiled ahead of
time, in a subprocess without TRITON_INTERPRET. On a CUDA machine the loss tests compile and run them for
real instead.
"""
import itertools
import os
import subprocess
import sys

import pytest
import torch

import ttm_kernels

pytestmark = [
    pytest.mark.skipif(not ttm_kernels.triton_available(), reason="triton not installed"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="the loss tests compile the kernels on this GPU"),
]

FLOATS = ("student_scale", "teacher_scale", "kl_coef", "ce_weight")


def compile_for_sm90(kernel, pointer_types, constexprs, num_warps=8):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
        else:
            signature[name] = "fp32" if name in FLOATS else ("i64" if "stride" in name else "i32")
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def compile_every_variant(student, teacher):
    from ttm_kernels import triton_kernels

    pointers = {"S": f"*{student}", "TCH": f"*{teacher}", "GRAD": f"*{student}", "Y": "*i64", "STATS": "*fp32",
                "ROW_GRAD": "*fp32"}
    for has_target, weighted, separate_ce, has_grad in itertools.product((False, True), repeat=4):
        if separate_ce and not has_target:
            continue
        flags = {"HAS_TARGET": has_target, "SEPARATE_CE": separate_ce, "BLOCK_V": 4096}
        compile_for_sm90(triton_kernels.ttm_fwd_kernel, pointers,
                         {**flags, "WEIGHTED": weighted, "HAS_GRAD": has_grad})
        if not weighted and not has_grad:
            compile_for_sm90(triton_kernels.ttm_bwd_kernel, pointers, flags)
    compile_for_sm90(triton_kernels.scale_kernel, {"G": f"*{student}", "SCALE": "*fp32"}, {"BLOCK": 4096})


@pytest.mark.parametrize("dtypes", [("bf16", "bf16"), ("fp16", "fp32"), ("fp32", "bf16")], ids="-".join)
def test_triton_kernels_compile_for_sm90(dtypes):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, __file__, *dtypes], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


if __name__ == "__main__":
    compile_every_variant(*sys.argv[1:3])
