import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter on CPU tensors; it must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


_real_empty = torch.empty


def _nan_empty(*args, **kwargs):
    out = _real_empty(*args, **kwargs)
    if out.is_floating_point() and not torch.compiler.is_compiling():
        out.fill_(float("nan"))
    return out


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every float tensor from torch.empty starts as NaN, so an element a kernel forgets to write fails. Not while
    torch.compile traces: an allocation in traced code is the graph's own (the fill would be an in-place op on it in
    the traced graph, which AOTAutograd's functional-graph check refuses), while the custom ops' allocations run
    eagerly inside the compiled graph and are poisoned. One function object for every test: Dynamo records the
    torch.empty it first sees, and a new one per test would later be traced into a torch.empty it no longer
    knows."""
    monkeypatch.setattr(torch, "empty", _nan_empty)
