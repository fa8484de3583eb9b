"""What is timed: the providers (loss implementations), their inputs, and one closure pair per mode.

Every provider computes the same WTTM loss of the paper (gamma=0.2, beta=1, ce_weight=1, with a hard-label
cross-entropy target), on 2-D (N, V) student logits ``z`` (a leaf that requires grad), teacher logits
``v`` (no grad) and int64 targets ``y``:

    loss = beta * mean_rows(U * KL(softmax(gamma * v) || softmax(z))) + ce_weight * CE(z, y)

Modes (``mode_fns``):

* ``fwd``: the training forward (inputs require grad, so the autograd graph is built and whatever the
  provider saves for the backward is allocated and counted in peak memory).
* ``bwd``: the backward alone; the forward runs before the timer starts (untimed), so no provider needs
  ``retain_graph`` (torch.compile's donated buffers forbid it).
* ``full``: forward and backward together.

The backward is ``torch.autograd.grad(loss, z)``: the gradient is returned, as the next layer's backward
(the LM head's matmul) would receive it in training, where the logits are not a leaf. ``loss.backward()``
on the leaf ``z`` would add AccumulateGrad, which *copies* a gradient that the graph still references
(``fused`` returns the buffer its forward saved, ``fused_inplace`` returns z's own storage): one extra
(N, V) pass and allocation that training never pays and the other providers do not get charged for.

Bytes model (``bytes_moved``): the traffic no implementation can avoid, split between the modes so that
fwd + bwd = full; effective bandwidth is this over the measured time, whatever the provider really moves:

* ``fwd``:  2 * N * V * b  (read z and v once; b = bytes per element of the input dtype)
* ``bwd``:  1 * N * V * b  (write dz once)
* ``full``: 3 * N * V * b  (z and v read once, dz written once: the headline metric)

Where a provider does its work matters for the split, not for ``full``: ttm_kernels with reduction
"mean"/"sum" computes the gradient inside the forward launch (as Liger's cross-entropy does), so its ``fwd`` carries the
gradient write (at best 3 N V b: both rows re-read from cache for the gradient pass; 5 N V b when they have
left it) and its ``bwd`` only scales that gradient (no pass when the scale is 1), so its ``bwd`` fraction
means little and can exceed 1. A recompute-style backward (reads z and v, writes dz) is at best at 1/3 of
the copy bandwidth on the ``bwd`` metric. Compare providers on ``full``.

The targets (8 * N bytes) and the per-row statistics are left out: under 0.1% of the traffic for V >= 100.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

GAMMA = 0.2
BETA = 1.0
CE_WEIGHT = 1.0

PROVIDERS = ("fused", "eager", "compile", "liger", "fused_inplace")
DEFAULT_PROVIDERS = ("fused", "eager", "compile", "liger")
MODES = ("fwd", "bwd", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Extra peak bytes a provider may allocate beyond its inputs, in units of one (N, V) tensor of the input
# dtype, used only to skip combinations that cannot fit before trying them (an OOM is still caught).
# Deliberately pessimistic: eager's paper code keeps ~6 (N, V) tensors for its backward and makes ~4 more
# transient ones; compile fuses most of them away; Liger keeps two log-softmax outputs plus its own.
EXTRA_TENSORS = {"fused": 2.0, "fused_inplace": 1.0, "eager": 12.0, "compile": 6.0, "liger": 10.0,
                 "torch-fallback": 14.0}


class Unavailable(RuntimeError):
    """The provider cannot run here (missing package, wrong device); the runner records a skip."""


@dataclass
class Provider:
    name: str
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    backend: str  # what actually runs, for the results ("triton", "cpu", "torch-fallback", "inductor", ...)
    extra_tensors: float
    destroys_input: bool = False  # fused_inplace overwrites z with its gradient


def bytes_moved(mode: str, n: int, v: int, dtype: torch.dtype) -> int:
    """The ideal traffic of ``mode`` (see the module docstring)."""
    elem = torch.empty((), dtype=dtype).element_size()
    per = {"fwd": 2, "bwd": 1, "full": 3}[mode]
    return per * n * v * elem


def _fused_backend(device: torch.device) -> str:
    from ttm_kernels import _ops

    backend = _ops.resolve_backend("auto", device)
    return "torch-fallback" if backend == "torch" else backend


def _fused(inplace: bool, device: torch.device) -> Provider:
    from ttm_kernels import fused_wttm_loss

    backend = _fused_backend(device)
    if inplace and backend == "torch-fallback":
        raise Unavailable("inplace_backward needs a compiled backend (Triton on CUDA, the C++ kernel on CPU)")

    def loss(z, v, y):
        return fused_wttm_loss(z, v, y, gamma=GAMMA, beta=BETA, ce_weight=CE_WEIGHT, inplace_backward=inplace)

    extra = EXTRA_TENSORS["torch-fallback" if backend == "torch-fallback" else
                          ("fused_inplace" if inplace else "fused")]
    return Provider("fused_inplace" if inplace else "fused", loss, backend, extra, destroys_input=inplace)


def _eager() -> Provider:
    from ttm_kernels.reference import paper_wttm_loss

    def loss(z, v, y):
        return paper_wttm_loss(z, v, y, gamma=GAMMA, beta=BETA, ce_weight=CE_WEIGHT)

    return Provider("eager", loss, "eager", EXTRA_TENSORS["eager"])


@functools.cache
def _compiled(dynamic: bool):
    import torch._dynamo

    from ttm_kernels.reference import paper_wttm_loss

    # One compiled function serves the whole sweep; static shapes recompile per (N, V, dtype), so lift the
    # recompile limit (named cache_size_limit before torch 2.6).
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = max(4096, torch._dynamo.config.accumulated_recompile_limit)
    return torch.compile(paper_wttm_loss, dynamic=dynamic)


def _compile(dynamic: bool) -> Provider:
    fn = _compiled(dynamic)

    def loss(z, v, y):
        return fn(z, v, y, gamma=GAMMA, beta=BETA, ce_weight=CE_WEIGHT)

    return Provider("compile", loss, "inductor-dynamic" if dynamic else "inductor", EXTRA_TENSORS["compile"])


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def kl_weighted_wttm(z, v, y, kl_div):
    """WTTM through a batch-mean KL over log-probabilities, ``kl_div(log_q, log_target)`` =
    ``sum_rows sum_j exp(t_j) * (t_j - x_j) / N`` (``LigerKLDIVLoss(reduction="batchmean", log_target=True)``,
    or ``F.kl_div(..., reduction="batchmean", log_target=True)``, the same formula, in the tests).

    Such a KL needs log_softmax(z) and the log of the target distribution from outside. WTTM's per-row
    weight U (a constant of the teacher) is folded into the target, t = log_softmax(gamma * v) + log U, which
    gives sum_j U pt_j (log pt_j + log U - log q_j) = U * KL + U log U per row; subtracting the teacher-only
    constant mean(U log U) leaves the WTTM value, and the gradient is unchanged.
    """
    with torch.no_grad():
        gv = v * GAMMA
        acc = torch.promote_types(v.dtype, torch.float32)
        log_u = torch.logsumexp(gv, -1).to(acc) - GAMMA * torch.logsumexp(v, -1).to(acc)
        target = torch.log_softmax(gv, -1) + log_u.to(v.dtype).unsqueeze(-1)
        const = (log_u.exp() * log_u).mean()
    log_q = torch.log_softmax(z, -1)
    return BETA * (kl_div(log_q, target) - const) + CE_WEIGHT * F.cross_entropy(z, y)


def _liger(device: torch.device) -> Provider:
    if not liger_available():
        raise Unavailable("liger_kernel is not installed")
    if device.type != "cuda":
        # (Its kernels do not run in Triton's CPU interpreter either.)
        raise Unavailable("Liger's Triton kernels need CUDA tensors")
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except Exception as exc:  # noqa: BLE001  (any import failure means: skip)
        raise Unavailable(f"liger_kernel failed to import: {exc}") from exc
    kl_div = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def loss(z, v, y):
        return kl_weighted_wttm(z, v, y, kl_div)

    return Provider("liger", loss, "liger", EXTRA_TENSORS["liger"])


def get_provider(name: str, device: torch.device, *, compile_dynamic: bool = False) -> Provider:
    """The provider ``name`` on ``device``; raises ``Unavailable`` when it cannot run there."""
    device = torch.device(device)
    if name == "fused":
        return _fused(False, device)
    if name == "fused_inplace":
        return _fused(True, device)
    if name == "eager":
        return _eager()
    if name == "compile":
        return _compile(compile_dynamic)
    if name == "liger":
        return _liger(device)
    raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS}")


@dataclass
class Case:
    """``copies`` independent input sets; the timers rotate among them so that a small problem is not
    served from a cache a real training step would have evicted."""

    n: int
    v: int
    dtype: torch.dtype
    device: torch.device
    copies: int
    z: list = field(default_factory=list)
    t: list = field(default_factory=list)
    y: list = field(default_factory=list)

    @property
    def input_bytes(self) -> int:
        return self.copies * input_bytes(self.n, self.v, self.dtype)


def input_bytes(n: int, v: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * n * v * elem + 8 * n


def make_case(n: int, v: int, dtype: torch.dtype, device, copies: int = 1, seed: int = 0) -> Case:
    device = torch.device(device)
    case = Case(n, v, dtype, device, copies)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for _ in range(copies):
        # Logits of a trained model are spread over a few units; scale 2 keeps softmax away from uniform.
        z = (torch.randn((n, v), generator=gen, device=device, dtype=torch.float32) * 2).to(dtype)
        t = (torch.randn((n, v), generator=gen, device=device, dtype=torch.float32) * 2).to(dtype)
        case.z.append(z.requires_grad_(True))
        case.t.append(t)
        case.y.append(torch.randint(0, v, (n,), generator=gen, device=device))
    return case


def mode_fns(provider: Provider, case: Case, mode: str):
    """``(prepare, run)``: ``state = prepare(i)`` is untimed, ``run(i, state)`` is what the timers measure,
    on input copy ``i``."""
    loss_fn = provider.loss
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")

    def prepare(i: int) -> Optional[torch.Tensor]:
        if mode == "bwd":
            return loss_fn(case.z[i], case.t[i], case.y[i])
        return None

    if mode == "fwd":
        def run(i, state):
            return loss_fn(case.z[i], case.t[i], case.y[i])
    elif mode == "bwd":
        def run(i, state):
            return torch.autograd.grad(state, case.z[i])[0]
    else:
        def run(i, state):
            return torch.autograd.grad(loss_fn(case.z[i], case.t[i], case.y[i]), case.z[i])[0]
    return prepare, run


def estimate_peak_bytes(provider: Provider, case_n: int, case_v: int, dtype: torch.dtype, copies: int) -> int:
    """Pessimistic bytes needed: the inputs of every copy plus the provider's extra (N, V) tensors."""
    elem = torch.empty((), dtype=dtype).element_size()
    return copies * input_bytes(case_n, case_v, dtype) + int(provider.extra_tensors * case_n * case_v * max(elem, 2))
