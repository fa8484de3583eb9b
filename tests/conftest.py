import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter on CPU tensors; it must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every float tensor from torch.empty starts as NaN, so an element a kernel forgets to write fails."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", nan_empty)
