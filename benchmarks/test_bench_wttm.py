"""pytest-benchmark suite of the WTTM loss: ``pytest benchmarks/ --benchmark-only``.

The same providers and mode closures as ``python -m benchmarks`` (``benchmarks.providers``), grouped per
(dtype, N, V, mode) so that pytest-benchmark's table compares the providers side by side. Small CPU
shapes by default, LLM-sized ones on CUDA; ``TTM_BENCH_SHAPES="N:V,N:V"`` and ``TTM_BENCH_DTYPE=fp32|bf16``
override them. Each test makes two warm-up calls (compilation, autotuning) before the measured rounds;
only ``run`` is timed, with a device synchronize inside it (``prepare``, e.g. the forward of a ``bwd``
round, is pedantic's untimed setup).

Not collected by ``python -m pytest tests`` (pytest.ini: ``testpaths = tests``). Without
``--benchmark-only`` pytest-benchmark still runs them, as tests; the CPU shapes keep that to seconds.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from benchmarks import providers as P

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"


def _shapes():
    text = os.environ.get("TTM_BENCH_SHAPES")
    if text:
        return [tuple(int(x) for x in item.split(":")) for item in text.split(",") if item]
    return [(4096, 32000), (4096, 128256)] if CUDA else [(64, 1000), (64, 32000)]


SHAPES = _shapes()
DTYPE_NAME = os.environ.get("TTM_BENCH_DTYPE", "bf16" if CUDA else "fp32")
DTYPE = P.DTYPES[DTYPE_NAME]
ROUNDS = 20 if CUDA else 8


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", P.MODES)
@pytest.mark.parametrize("provider", P.DEFAULT_PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-V{v}" for n, v in SHAPES])
def test_wttm_loss(benchmark, shape, provider, mode):
    try:
        prov = P.get_provider(provider, DEVICE)
    except P.Unavailable as exc:
        pytest.skip(str(exc))
    n, v = shape
    case = P.make_case(n, v, DTYPE, DEVICE)
    prepare, run = P.mode_fns(prov, case, mode)
    loss = prov.loss(case.z[0], case.t[0], case.y[0])
    assert math.isfinite(loss.item()), f"{provider} gave a non-finite loss"
    del loss
    for _ in range(2):
        run(0, prepare(0))
    _sync()

    def setup():
        state = prepare(0)
        _sync()
        return (state,), {}

    def target(state):
        out = run(0, state)
        _sync()
        return out  # released outside the timer, as in python -m benchmarks

    benchmark.group = f"wttm {DTYPE_NAME} N={n} V={v} {mode}"
    benchmark.extra_info.update(provider=provider, backend=prov.backend, device=str(DEVICE),
                                bytes_model=P.bytes_moved(mode, n, v, DTYPE))
    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=0)
