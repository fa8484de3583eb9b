import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter on CPU tensors; it must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every float tensor from torch.empty starts as NaN, so an element a kernel forgets to write fails. Not while
    torch.compile traces: an allocation in traced code is the graph's own (the fill would be an in-place op on it in
    the traced graph, which AOTAutograd's functional-graph check refuses), while the custom ops' allocations run
    eagerly inside the compiled graph and are poisoned. The patch stays in place for every test: Dynamo keeps the
    torch.empty it saw first, so restoring the original within a test breaks its tracing later."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point() and not torch.compiler.is_compiling():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", nan_empty)
