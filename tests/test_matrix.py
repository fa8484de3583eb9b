"""Every cell of the variant registry (``matrix.py``) against the float64 reference, or raising its documented
error: spec x teacher form x shape x backend x reduction (with num_items_in_batch) x head post-processing,
covered pairwise. The vocabulary-parallel cells run in the gloo spawns of ``test_distributed.py``."""
import zlib

import pytest
import torch

import matrix
import ttm_kernels

# Cells of combinations not built yet: strict, so that each becomes a failure the day it works.
NOT_YET = {
    lambda cell: cell.form in ("topk", "head_topk") and cell.num_items:
        "the top-k losses do not take num_items_in_batch yet",
    lambda cell: cell.form != "head" and cell.post != "plain":
        "softcap and logit_scale are taken by the dense fused linear losses only, so far",
}


def _param(cell):
    marks = []
    if cell.backend == "triton" and not ttm_kernels.triton_available():
        marks.append(pytest.mark.skip(reason="triton not installed"))
    if cell.backend == "cpu" and not ttm_kernels.cpu_extension_available():
        marks.append(pytest.mark.skip(reason="C++ extension not built"))
    for predicate, reason in NOT_YET.items():
        if predicate(cell):
            marks.append(pytest.mark.xfail(strict=True, reason=reason))
    return pytest.param(cell, id=cell.id, marks=marks)


# Head forms run GEMMs in float32 before the loss: their tolerance is the fused linear tests' own.
RTOL = {"logits": (1e-5, 1e-4), "topk": (1e-5, 1e-4), "head": (2e-4, 2e-4), "head_topk": (2e-4, 2e-4)}


@pytest.mark.parametrize("cell", [_param(cell) for cell in matrix.cells()])
def test_cell_matches_the_float64_reference(cell):
    inputs = matrix.make_inputs(cell, seed=zlib.crc32(cell.id.encode()))
    error = matrix.documented_error(cell)
    if error is not None:
        with pytest.raises(error[0], match=error[1]):
            matrix.run_cell(cell, inputs)
        return
    upstream = None
    if cell.reduction == "none":
        upstream = torch.linspace(0.5, 2.0, 6, dtype=torch.float32).view(matrix.LEAD[cell.shape])
        upstream = upstream.to(matrix.device_of(cell.backend))
    loss, grads = matrix.run_cell(cell, inputs, upstream)
    ref_loss, ref_grads = matrix.reference_cell(cell, inputs, upstream)
    loss_rtol, grad_rtol = RTOL[cell.form]
    matrix.assert_close("loss", ref_loss, loss, loss_rtol, 1e-6)
    assert loss.dtype == torch.float32
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        matrix.assert_close(f"d loss / d {name}", ref, grads[name], grad_rtol, 1e-7)


@pytest.mark.parametrize("form", [
    form if "topk" not in form else
    pytest.param(form, marks=pytest.mark.xfail(strict=True, reason="top-k losses lack num_items_in_batch yet"))
    for form in matrix.AXES["form"]])
def test_num_items_in_batch_needs_reduction_mean(form):
    """Every teacher form refuses num_items_in_batch with a reduction other than "mean", before any work."""
    cell = matrix.Cell("wttm", form, "2d", "torch", "sum", "plain")
    inputs = matrix.make_inputs(cell, seed=1)
    with pytest.raises(ValueError, match="num_items_in_batch is the denominator of reduction='mean'"):
        matrix.run_cell(cell, inputs, num_items_in_batch=5)
