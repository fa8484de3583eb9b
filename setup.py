"""Builds ttm_kernels and its compiled extension ttm_kernels._C (C++ CPU kernels, with ninja).

Needs torch at build time: install with ``pip install --no-build-isolation -e .`` (scripts/bootstrap.sh
does), so that the extension is built against the torch already installed and never replaces it.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return []
    return [CppExtension(
        "ttm_kernels._C",
        sources,
        # -ffp-contract=off: no automatic FMA, the kernels subtract running maxima from products rounded like
        # them. -fno-trapping-math: nobody reads the FP exception flags, so GCC may evaluate both arms of the
        # loops' selects and vectorises them without AVX-512 masking too (results are unchanged).
        extra_compile_args={"cxx": ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]},
        extra_link_args=["-fopenmp"],
    )]


setup(
    name="ttm-kernels",
    version="0.1.0",
    description="Fused TTM / WTTM / KD distillation losses: Triton GPU kernels and a C++ CPU kernel",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ttm_kernels", "ttm_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.6"],
        # The test suite (triton for its interpreter); the tests of an extra not installed are skipped.
        "test": ["pytest", "triton>=3.6", "numpy"],
        "train": ["pyyaml", "tqdm", "matplotlib", "tokenizers"],
        "bench": ["pytest-benchmark", "matplotlib", "tqdm"],
        # ttm_kernels.integrations.hf (logits_to_keep as an index tensor: transformers >= 4.50); trl for the
        # test of the README's TRL lines (tests/test_hf_integration.py); liger-kernel (Python >= 3.10) for the
        # tests of FusedLinearDistillLoss against Liger's own class (tests/test_distill.py).
        "hf": ["transformers>=4.50", "accelerate>=1.0", "trl", "liger-kernel; python_version >= '3.10'"],
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
