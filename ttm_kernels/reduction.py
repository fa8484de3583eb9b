"""The reductions the losses share: the rows that count, the divisor of ``reduction="mean"`` (or
``num_items_in_batch``), and the logged ``LossComponents``. Used by every orchestrator (logits, head, top-k, and
their vocabulary-parallel forms), so that a reduction means the same thing for every teacher form."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import reference

REDUCTIONS = ("mean", "sum", "none")


class LossComponents(NamedTuple):
    """Detached per-batch terms for logging, each averaged over the rows that count (not ignored).

    ``kl``: the divergence (``jsd_beta``; by default KL(transformed teacher || student)), for KD of the tempered
    student and without the T^2 factor; ``ce``: hard-label cross-entropy of the untempered student (0 without a
    target); ``weight``: the WTTM weight U = sum(softmax(v)**gamma), 1 for TTM and KD; ``entropy``: the entropy
    of the student's distribution in the divergence (softmax of its scaled logits; TRL logs it).
    """

    kl: torch.Tensor
    ce: torch.Tensor
    weight: torch.Tensor
    entropy: torch.Tensor


def validate_num_items(num_items_in_batch, reduction) -> None:
    """``num_items_in_batch``: None, or a positive count (int, float, or a one-element tensor on any device, as
    Hugging Face's Trainer passes it) that only ``reduction="mean"`` uses; else a clear error.

    A tensor on the CPU is checked here; on another device the check is a device-side assertion (no host
    synchronisation), and under torch.compile it is skipped."""
    if num_items_in_batch is None:
        return
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch is the denominator of reduction='mean', got reduction={reduction!r}")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError("num_items_in_batch must be a number or a one-element tensor, got shape "
                             f"{tuple(num_items_in_batch.shape)}")
        if num_items_in_batch.dtype == torch.bool or num_items_in_batch.dtype.is_complex:
            raise TypeError(f"num_items_in_batch must hold a count, got dtype {num_items_in_batch.dtype}")
        if torch.compiler.is_compiling():
            return
        if num_items_in_batch.device.type == "cpu":
            value = num_items_in_batch.item()
        else:
            count = num_items_in_batch.reshape(())
            torch._assert_async((count > 0) & (count < math.inf),
                                "num_items_in_batch must be a finite positive count")
            return
    else:
        value = num_items_in_batch
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"num_items_in_batch must be None, a number or a tensor, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"num_items_in_batch must be a finite positive count, got {value}")


def mean_denominator(target, ignore_index, n_rows, device, num_items_in_batch=None,
                     dtype=torch.float32) -> torch.Tensor:
    """The divisor of ``reduction="mean"`` as a 0-dim ``dtype`` tensor on ``device``, computed without a host
    synchronisation: ``num_items_in_batch`` when given (validated by ``validate_num_items``; a tensor may sit
    on another device), else the rows whose target is not ``ignore_index`` (all ``n_rows`` without a target),
    at least 1."""
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            return num_items_in_batch.reshape(()).to(device=device, dtype=dtype, non_blocking=True)
        return torch.full((), float(num_items_in_batch), dtype=dtype, device=device)
    if target is None:
        return torch.full((), max(n_rows, 1), dtype=dtype, device=device)
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        # On the CPU reading the count costs no synchronisation, and saves two small tensor operations.
        return torch.full((), max(int((target != ignore_index).sum()), 1), dtype=dtype, device=device)
    return (target != ignore_index).sum().clamp_min(1).to(dtype)


def valid_rows(target, lead_shape, device, ignore_index) -> torch.Tensor:
    """The rows that count (bool, of ``lead_shape``): those whose target is not ``ignore_index``; all without a
    target."""
    if target is None:
        return torch.ones(lead_shape, dtype=torch.bool, device=device)
    return target != ignore_index


def components(rows, valid: torch.Tensor) -> LossComponents:
    """``LossComponents`` of the (kl, ce, weight, entropy) rows: detached means over the rows that count
    (``valid``, whose shape the rows take)."""
    return LossComponents(*(reference.reduce_rows(x.detach().view(valid.shape), valid, "mean") for x in rows))
