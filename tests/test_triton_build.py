"""The Triton kernels compile for a Hopper GPU (sm_90) with Triton's own toolchain, without a GPU.

The interpreter that runs the loss tests here accepts some programs the compiler rejects (types of
loop-carried values, early returns, constexpr branches), so every kernel variant is also compiled ahead of
time, in a subprocess without TRITON_INTERPRET. On a CUDA machine the loss tests compile and run them for
real instead.
"""
import itertools
import json
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

FLOATS = ("student_scale", "teacher_scale", "kl_coef", "ce_weight", "jsd_beta")


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


# The DIVERGENCE constexpr of each kind of LossSpec.jsd_beta (triton_kernels.divergence).
DIVERGENCES = {"forward-kl": 0, "reverse-kl": 1, "jsd": 2}


def compile_every_variant(student, teacher):
    from ttm_kernels import triton_kernels

    pointers = {"S": f"*{student}", "TCH": f"*{teacher}", "GRAD": f"*{student}", "Y": "*i64", "STATS": "*fp32",
                "ROW_GRAD": "*fp32", "PARTIAL": "*fp32", "SUMS": "*fp32"}
    # The reverse KL and the JSD share the statistics pass (WEIGHTED), the loads and the stores (the dtypes) with
    # the forward KL: they are compiled unweighted, for one pair of dtypes (each compile takes about a second).
    divergences = DIVERGENCES.values() if (student, teacher) == ("bf16", "bf16") else (DIVERGENCES["forward-kl"],)
    for has_target, weighted, separate_ce, has_grad in itertools.product((False, True), repeat=4):
        if separate_ce and not has_target:
            continue
        flags = {"HAS_TARGET": has_target, "SEPARATE_CE": separate_ce, "BLOCK_V": 4096}
        # Integer 1/scale (exponentials derived by powers) and not.
        powers = {"TEACHER_POWER": 5 if weighted else 0, "STUDENT_POWER": 4 if separate_ce else 0}
        exp_only = {k: 0 for k in powers}
        for divergence in divergences:
            if divergence != DIVERGENCES["forward-kl"] and weighted:
                continue
            variants = ((False, powers), (True, powers), (False, exp_only))
            for single_block, variant in variants if divergence == DIVERGENCES["forward-kl"] else variants[:2]:
                compile_for_sm90(triton_kernels.ttm_fwd_kernel, pointers,
                                 {**flags, **variant, "WEIGHTED": weighted, "HAS_GRAD": has_grad,
                                  "DIVERGENCE": divergence, "SINGLE_BLOCK": single_block})
            # The sums pass, the gradient alone (a backward) and both (given the row's merged sum).
            if divergence == DIVERGENCES["forward-kl"]:
                sums_options = (weighted,)
            else:
                sums_options = (True, False) if has_grad else (True,)
            for has_sums in sums_options:
                compile_for_sm90(triton_kernels.ttm_piece_kernel, pointers,
                                 {**flags, "STUDENT_POWER": powers["STUDENT_POWER"], "HAS_GRAD": has_grad,
                                  "HAS_SUMS": has_sums, "DIVERGENCE": divergence})
        compile_for_sm90(triton_kernels.ttm_partial_kernel, pointers, {**flags, **powers, "WEIGHTED": weighted})
        compile_for_sm90(triton_kernels.ttm_merge_kernel, pointers,
                         {"HAS_TARGET": has_target, "SEPARATE_CE": separate_ce, "WEIGHTED": weighted, "BLOCK_C": 16})
    compile_for_sm90(triton_kernels.ttm_loss_kernel, pointers, {"BLOCK_C": 16})
    compile_for_sm90(triton_kernels.scale_kernel, {"G": f"*{student}", "SCALE": "*fp32"}, {"BLOCK": 4096})


# Training-path variants (bf16, target, gradient, 4096-column blocks over 8 warps: 16 elements per thread)
# and the most exponentials per element each may issue (the count is per thread in the PTX; a few scalar
# ones per row come on top).
WTTM_GAMMA_02 = {"WEIGHTED": True, "SEPARATE_CE": False, "TEACHER_POWER": 5, "STUDENT_POWER": 0}
EXPONENTIAL_BUDGET = {
    "wttm-gamma0.2": ({**WTTM_GAMMA_02, "DIVERGENCE": 0, "SINGLE_BLOCK": False}, 4),
    "wttm-gamma0.2-one-block": ({**WTTM_GAMMA_02, "DIVERGENCE": 0, "SINGLE_BLOCK": True}, 2),
    "kd-T4-with-ce": ({"WEIGHTED": False, "SEPARATE_CE": True, "TEACHER_POWER": 0, "STUDENT_POWER": 4,
                       "DIVERGENCE": 0, "SINGLE_BLOCK": False}, 4),
    # Statistics 2, sums 2, gradient 1 (q; p is not needed there).
    "wttm-gamma0.2-reverse-kl": ({**WTTM_GAMMA_02, "DIVERGENCE": 1, "SINGLE_BLOCK": False}, 5),
    "wttm-gamma0.2-reverse-kl-one-block": ({**WTTM_GAMMA_02, "DIVERGENCE": 1, "SINGLE_BLOCK": True}, 2),
    # Statistics 2, sums 3 (q, p, e^-|log(p/q)|), gradient 2 (q, e^-|log(p/q)|).
    "wttm-gamma0.2-jsd": ({**WTTM_GAMMA_02, "DIVERGENCE": 2, "SINGLE_BLOCK": False}, 7),
    "wttm-gamma0.2-jsd-one-block": ({**WTTM_GAMMA_02, "DIVERGENCE": 2, "SINGLE_BLOCK": True}, 3),
}
ELEMENTS_PER_THREAD = 16
SCALAR_EXPONENTIALS = 8


def exponentials_per_variant():
    import re

    from ttm_kernels import triton_kernels

    pointers = {"S": "*bf16", "TCH": "*bf16", "GRAD": "*bf16", "Y": "*i64", "STATS": "*fp32", "ROW_GRAD": "*fp32"}
    counts = {}
    for name, (flags, _) in EXPONENTIAL_BUDGET.items():
        kernel = compile_for_sm90(triton_kernels.ttm_fwd_kernel, pointers,
                                  {**flags, "HAS_TARGET": True, "HAS_GRAD": True, "BLOCK_V": 4096})
        counts[name] = len(re.findall(r"\bex2\.approx", kernel.asm["ptx"]))
    return counts


# The sparse-teacher kernels: each flag with both values at least once (the full product takes minutes), the
# largest ids tile, and the backward. The training variant (WTTM, bucket, target, gradient) may issue two
# exponentials per element (the statistics pass and the gradient pass) and a few per row.
TOPK_FLAGS = ("HAS_TARGET", "WEIGHTED", "BUCKET", "SEPARATE_CE", "HAS_GRAD", "DIVERGENCE")
TOPK_VARIANTS = [
    # HAS_TARGET, WEIGHTED, BUCKET, SEPARATE_CE, HAS_GRAD, DIVERGENCE, STUDENT_POWER, BLOCK_K
    (True, True, True, False, True, 0, 0, 64),  # training WTTM (the exponential count below)
    (False, False, False, False, False, 0, 0, 1),
    (True, False, True, True, True, 0, 4, 4096),
    (True, False, False, True, False, 0, 0, 128),
    (True, True, True, False, True, DIVERGENCES["jsd"], 0, 64),  # training WTTM under the JSD (counted too)
    (True, False, True, True, True, DIVERGENCES["reverse-kl"], 4, 128),
]
TOPK_SCALAR_EXPONENTIALS = 16


def compile_topk_variants():
    import re

    from ttm_kernels import triton_topk

    pointers = {"S": "*bf16", "GRAD": "*bf16", "Y": "*i64", "STATS": "*fp32", "ROW_GRAD": "*fp32", "IDS": "*i32",
                "LOGP": "*fp32", "PARTIAL": "*fp32"}
    counts, partial_counts = [], []
    for *flags, power, block_k in TOPK_VARIANTS:
        constexprs = {**dict(zip(TOPK_FLAGS, flags)), "STUDENT_POWER": power, "BLOCK_K": block_k, "BLOCK_V": 4096}
        kernel = compile_for_sm90(triton_topk.topk_fwd_kernel, pointers, constexprs)
        counts.append(len(re.findall(r"\bex2\.approx", kernel.asm["ptx"])))
        del constexprs["WEIGHTED"], constexprs["HAS_GRAD"]
        compile_for_sm90(triton_topk.topk_bwd_kernel, pointers, constexprs)
        # A vocabulary shard's sums outside S (the renormalised tail's entropy sum with it).
        partial = {name: constexprs[name] for name in ("HAS_TARGET", "SEPARATE_CE", "STUDENT_POWER", "BLOCK_K",
                                                         "BLOCK_V")}
        kernel = compile_for_sm90(triton_topk.topk_partial_kernel, pointers,
                                  {**partial, "TAIL_ENTROPY": not constexprs["BUCKET"]})
        partial_counts.append(len(re.findall(r"\bex2\.approx", kernel.asm["ptx"])))
    return counts, partial_counts


def test_triton_topk_kernels_compile_for_sm90():
    counts, partial_counts = json.loads(_run_here("topk").strip().splitlines()[-1])
    assert counts[0] <= 2 * ELEMENTS_PER_THREAD + TOPK_SCALAR_EXPONENTIALS, counts
    # The JSD's terms are O(k): per element it costs what the KL does.
    assert counts[4] <= 2 * ELEMENTS_PER_THREAD + TOPK_SCALAR_EXPONENTIALS, counts
    # A shard's sums: the statistics pass alone, one exponential per element (two with the CE's lse(z) apart
    # from lse(s*z) without an integer power).
    assert partial_counts[0] <= ELEMENTS_PER_THREAD + TOPK_SCALAR_EXPONENTIALS, partial_counts
    assert max(partial_counts) <= 2 * ELEMENTS_PER_THREAD + TOPK_SCALAR_EXPONENTIALS, partial_counts


def _run_here(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.mark.parametrize("dtypes", [("bf16", "bf16"), ("fp16", "fp32"), ("fp32", "bf16")], ids="-".join)
def test_triton_kernels_compile_for_sm90(dtypes):
    _run_here(*dtypes)


def test_triton_kernels_exponentials_per_element():
    """The special-function units issue ~4.2e12 exponentials/s on an H200, HBM moves ~0.8e12 bf16 elements/s
    (3 touches): each exponential per element counts. Training WTTM at gamma = 1/5 used 5.25 per element. The
    reverse KL and the JSD make a third pass, whose gradient needs only the exponentials that involve q."""
    counts = json.loads(_run_here("count").strip().splitlines()[-1])
    for name, (_, per_element) in EXPONENTIAL_BUDGET.items():
        assert counts[name] <= per_element * ELEMENTS_PER_THREAD + SCALAR_EXPONENTIALS, (name, counts[name])


if __name__ == "__main__":
    if sys.argv[1] == "count":
        print(json.dumps(exponentials_per_variant()))
    elif sys.argv[1] == "topk":
        print(json.dumps(compile_topk_variants()))
    else:
        compile_every_variant(*sys.argv[1:3])
