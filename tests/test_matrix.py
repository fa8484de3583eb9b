"""Every cell of the variant registry (``matrix.py``) against the float64 reference, or raising its documented
error: spec x teacher form x shape x backend x reduction (with num_items_in_batch) x head post-processing,
covered pairwise. The vocabulary-parallel cells run in the gloo spawns of ``test_distributed.py``."""
import zlib

import pytest
import torch

import matrix
import ttm_kernels

# Cells of combinations not built yet (strict xfails, so that each becomes a failure the day it works): none.
NOT_YET = {}


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


@pytest.mark.parametrize("cell", [_param(cell) for cell in matrix.cells()])
def test_cell_matches_the_float64_reference(cell):
    inputs = matrix.make_inputs(cell, seed=zlib.crc32(cell.id.encode()))
    error = matrix.documented_error(cell)
    if error is not None:
        with pytest.raises(error[0], match=error[1]):
            matrix.run_cell(cell, inputs)
        return
    upstream = matrix.upstream(cell)
    loss, grads = matrix.run_cell(cell, inputs, upstream)
    ref_loss, ref_grads = matrix.reference_cell(cell, inputs, upstream)
    matrix.assert_matches(cell, loss, grads, ref_loss, ref_grads)


@pytest.mark.parametrize("form", matrix.AXES["form"])
def test_num_items_in_batch_needs_reduction_mean(form):
    """Every teacher form refuses num_items_in_batch with a reduction other than "mean", before any work."""
    cell = matrix.Cell("wttm", form, "2d", "torch", "sum", "plain")
    inputs = matrix.make_inputs(cell, seed=1)
    with pytest.raises(ValueError, match="num_items_in_batch is the denominator of reduction='mean'"):
        matrix.run_cell(cell, inputs, num_items_in_batch=5)


def test_softcap_refuses_inplace_backward():
    """The logits losses' post-processing reads a new tensor, so the gradient cannot be written into the
    logits' storage: a clear error, before any work."""
    z, v = torch.randn(4, 9) * 10, torch.randn(4, 9) * 10
    with pytest.raises(ValueError, match="inplace_backward=True cannot write the gradient into student_logits"):
        ttm_kernels.fused_wttm_loss(z * 1.0, v, softcap=5.0, inplace_backward=True)


@pytest.mark.parametrize("module,fn,scale", [(ttm_kernels.WTTMLoss, ttm_kernels.fused_wttm_loss, {"gamma": 0.3}),
                                             (ttm_kernels.KDLoss, ttm_kernels.fused_kd_loss, {"temperature": 2.0})])
def test_modules_take_the_heads_post_processing(module, fn, scale):
    gen = torch.Generator().manual_seed(5)
    z, v = torch.randn(5, 11, generator=gen) * 15, torch.randn(5, 11, generator=gen) * 15
    target = torch.tensor([1, -100, 3, 10, 0])
    post = dict(softcap=6.0, logit_scale=0.7)
    ours = module(**scale, **post)(z, v, target)
    assert torch.equal(ours, fn(z, v, target, **scale, **post))
    assert not torch.equal(ours, fn(z, v, target, **scale))
    assert "softcap=6.0, logit_scale=0.7" in repr(module(**scale, **post))


@pytest.mark.parametrize("form", matrix.AXES["form"])
def test_vocab_size_without_process_group_is_the_width(form):
    """vocab_size= (meant for process_group, where the ranks' slices must tile it) is checked against the one
    call's vocabulary too: the right size changes nothing, a wrong one is a clear error."""
    cell = matrix.Cell("ttm", form, "2d", "torch", "mean", "plain")
    inputs = matrix.make_inputs(cell, seed=2)
    assert torch.equal(matrix.run_cell(cell, inputs, vocab_size=matrix.VOCAB)[0], matrix.run_cell(cell, inputs)[0])
    with pytest.raises(ValueError, match=f"vocab_size={matrix.VOCAB + 1}, but the student's logits have "
                                         f"{matrix.VOCAB} columns"):  # (a head's: its V rows)
        matrix.run_cell(cell, inputs, vocab_size=matrix.VOCAB + 1)
    with pytest.raises(ValueError, match="vocab_size must be None or a positive int"):
        matrix.run_cell(cell, inputs, vocab_size=0)
