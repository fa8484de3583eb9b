"""Row views shared by the compiled backends.

Kernels see logits of shape (..., V) as a 3-D view (B, T, V) whose last dimension is contiguous and whose
two leading strides are free, so that a sliced (B, T, V) batch (``logits[:, :-1]``, the usual LLM shift)
is read in place instead of being copied. Only layouts that no two strides describe are copied.
"""
from __future__ import annotations

import torch


def row_view(x: torch.Tensor) -> torch.Tensor:
    """A (B, T, V) view of ``x`` with ``stride(-1) == 1``; a copy only when no such view exists."""
    if x.dim() == 2 and x.shape[0] > 1 and x.is_contiguous():  # the usual (N, V) batch, without the loop below
        return x.as_strided((1, x.shape[0], x.shape[1]), (0, x.shape[1], 1))
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    sizes, strides = [], []
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if sizes and strides[-1] == stride * size:
            sizes[-1] *= size
            strides[-1] = stride
        else:
            sizes.append(size)
            strides.append(stride)
    if len(sizes) > 2:
        return row_view(x.contiguous())
    while len(sizes) < 2:
        sizes.insert(0, 1)
        strides.insert(0, 0)
    return x.as_strided((sizes[0], sizes[1], x.shape[-1]), (strides[0], strides[1], 1))


def rows_overlap(view: torch.Tensor) -> bool:
    """Whether two elements of a (B, T, V) row view may share memory (stride 0, or rows closer than a row).

    The classic sufficient test: with the leading dimensions sorted by stride, each stride must reach past
    everything the smaller ones span. Exotic interleavings that pass no such test count as overlapping."""
    extent = view.shape[-1]
    for stride, size in sorted((st, n) for n, st in zip(view.shape[:-1], view.stride()[:-1]) if n > 1):
        if stride < extent:
            return True
        extent = stride * (size - 1) + extent
    return False
