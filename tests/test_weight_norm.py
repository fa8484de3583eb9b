"""WTTM's ``weight_norm="vocab"``: U / V**max(0, 1 - gamma) in place of the paper's U, for every teacher form and
backend against the float64 reference, its range, its independence of the vocabulary where the maths says so,
gradient accumulation, and the refusals. The vocabulary-parallel forms are checked in the gloo spawns of
``test_distributed.py`` (``distributed_checks.py``, the ``weight_norm-*`` checks)."""
import math
import zlib

import pytest
import torch

import matrix
import ttm_kernels
from ttm_kernels import reference, spec as specs


def _backend_marks(backend):
    if backend == "triton" and not ttm_kernels.triton_available():
        return [pytest.mark.skip(reason="triton not installed")]
    if backend == "cpu" and not ttm_kernels.cpu_extension_available():
        return [pytest.mark.skip(reason="C++ extension not built")]
    return []


# Every teacher form on every backend, each with another reduction and head post-processing.
REDUCTIONS = {"logits": "mean_num_items", "head": "none", "topk": "sum", "head_topk": "mean"}
CELLS = [matrix.Cell("wttm", form, "3d" if form in ("logits", "topk") else "sliced", backend, REDUCTIONS[form],
                     "softcap" if backend == "torch" else "plain")
         for form in matrix.AXES["form"] for backend in matrix.AXES["backend"]]


@pytest.mark.parametrize("cell", [pytest.param(c, id=c.id, marks=_backend_marks(c.backend)) for c in CELLS])
def test_fused_wttm_loss_weight_norm_matches_the_float64_reference(cell):
    """Loss and gradients of every wttm entry point with weight_norm="vocab" equal the float64 reference's, whose
    weight is U / V**(1 - gamma) computed from its own logits' width; and they differ from the unnormalised loss."""
    inputs = matrix.make_inputs(cell, seed=zlib.crc32(cell.id.encode()))
    upstream = matrix.upstream(cell)
    loss, grads = matrix.run_cell(cell, inputs, upstream, weight_norm="vocab")
    ref_loss, ref_grads = matrix.reference_cell(cell, inputs, upstream, weight_norm="vocab")
    matrix.assert_matches(cell, loss, grads, ref_loss, ref_grads)
    plain_loss, _ = matrix.reference_cell(cell, inputs, upstream)
    assert not torch.allclose(plain_loss, ref_loss, rtol=1e-2)


@pytest.mark.parametrize("backend", [pytest.param(b, marks=_backend_marks(b)) for b in ("cpu", "torch")])
@pytest.mark.parametrize("form", matrix.AXES["form"])
def test_fused_wttm_loss_weight_norm_reports_the_normalised_weight(form, backend):
    """LossComponents.weight is the weight that multiplies the KL: the reference's normalised weight row, averaged
    over the rows that count; the KL and CE are those of the unnormalised loss."""
    cell = matrix.Cell("wttm", form, "2d", backend, "mean", "plain")
    inputs = matrix.make_inputs(cell, seed=31 + matrix.AXES["form"].index(form))
    args = [x.float() if x.is_floating_point() else x for x in inputs.values()]
    fn = matrix.PUBLIC[(form, "wttm")]
    kwargs = dict(matrix.HYPER["wttm"], backend=backend, return_components=True)
    if form in ("head", "head_topk"):
        kwargs["student_bias"] = inputs["student_bias"].float()
        args = [x for name, x in zip(inputs, args) if name != "student_bias"]
    _, normalised = fn(*args, weight_norm="vocab", **kwargs)
    _, plain = fn(*args, **kwargs)
    gamma = matrix.HYPER["wttm"]["gamma"]
    factor = matrix.VOCAB ** (gamma - 1)
    torch.testing.assert_close(normalised.weight.double(), plain.weight.double() * factor, rtol=1e-6, atol=0)
    assert torch.equal(normalised.kl, plain.kl) and torch.equal(normalised.ce, plain.ce)
    z = inputs["student_logits"] if "student_logits" in inputs else (
        inputs["student_hidden"] @ inputs["student_weight"].T + inputs["student_bias"])
    params = dict(matrix.reference_params("wttm"), weight_norm="vocab")
    if form == "logits":
        rows = reference.loss_rows(z, inputs["teacher_logits"], inputs["target"], **params)
    elif form == "head":
        v = inputs["teacher_hidden"] @ inputs["teacher_weight"].T
        rows = reference.loss_rows(z, v, inputs["target"], **params)
    else:
        rows = reference.topk_loss_rows(z, inputs["teacher_topk_ids"], inputs["teacher_topk_logprobs"],
                                        inputs["target"], **params)
    ref_weight = reference.reduce_rows(rows["weight"], rows["valid"], "mean")
    torch.testing.assert_close(normalised.weight.double(), ref_weight, rtol=2e-5, atol=0)


@pytest.mark.parametrize("gamma", [0.1, 0.5, 1.0, 1.5], ids=lambda g: f"gamma-{g}")
def test_fused_wttm_loss_weight_norm_range(gamma):
    """The normalised weight lies in (0, 1] at V = 100 for every spread of the logits, is 1 for a uniform teacher
    (constant logits: U is largest there when gamma < 1), and, for gamma < 1, approaches its floor V**(gamma - 1)
    (U = 1) for a teacher whose first logit dominates; the paper's U reaches V**(1 - gamma) where this reaches 1."""
    vocab, gen = 100, torch.Generator().manual_seed(int(gamma * 10))
    spreads = torch.tensor([1.0, 3.0, 10.0, 30.0]).repeat_interleave(8).unsqueeze(-1)
    teacher = torch.randn(32, vocab, generator=gen) * spreads
    constant = torch.randn(4, 1, generator=gen).expand(4, vocab) * 10  # uniform teachers
    peaked = torch.randn(4, vocab, generator=gen)
    peaked[:, 0] += 1000.0  # the others: p**gamma < e**-90 (gamma >= 0.1), U = 1 to float64
    teacher = torch.cat([teacher, constant, peaked])
    student = torch.randn(teacher.shape, generator=gen) * 5

    def weights(weight_norm):
        return reference.loss_rows(student.double(), teacher.double(), teacher_scale=gamma, weighted=True,
                                   weight_norm=weight_norm)["weight"]

    normalised, plain = weights("vocab"), weights("none")
    assert ((normalised > 0) & (normalised <= 1 + 1e-12)).all()
    top = max(1.0, vocab ** (1 - gamma))
    torch.testing.assert_close(normalised, plain / top, rtol=1e-12, atol=0)
    if gamma < 1:
        torch.testing.assert_close(normalised[32:36], torch.ones(4, dtype=torch.float64), rtol=1e-12, atol=0)
        torch.testing.assert_close(plain[32:36], torch.full((4,), top, dtype=torch.float64), rtol=1e-12, atol=0)
        torch.testing.assert_close(normalised[36:], torch.full((4,), 1 / top, dtype=torch.float64), rtol=1e-9,
                                   atol=0)
    else:  # U <= 1 already: the normalisation is the identity
        assert torch.equal(normalised, plain)
    # The public loss carries the same weight (float32 arithmetic).
    _, parts = ttm_kernels.fused_wttm_loss(student, teacher, gamma=gamma, weight_norm="vocab", return_components=True)
    torch.testing.assert_close(parts.weight.double(), normalised.mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", [pytest.param(b, marks=_backend_marks(b)) for b in ("cpu", "torch")])
def test_fused_wttm_loss_weight_norm_is_vocabulary_free(backend):
    """What the normalisation buys, where the maths says it exactly: for rows of i.i.d. N(0, s**2) logits (student
    and teacher), as V grows U -> V**(1 - g) * exp(-g (1 - g) s**2 / 2) and KL(softmax(g v) || softmax(z)) tends
    to a limit free of V (the log V of the teacher's entropy and of the student's log-sum-exp cancel; law of large
    numbers). So the paper's WTTM loss grows as V**(1 - g) while the normalised one stays put, its weight at
    exp(-g (1 - g) s**2 / 2). This shows the V**(1 - g) growth removed for such rows; it does not show that a beta
    tuned at one vocabulary is the best at another for real teachers (peaked, with long tails): that is an
    experiment (demo-lm), not a unit test."""
    gamma, spread, rows = 0.3, 1.0, 48
    gen = torch.Generator().manual_seed(7)
    normalised, plain, weight = {}, {}, {}
    for vocab in (500, 4000, 32000):
        z = torch.randn(rows, vocab, generator=gen) * spread
        v = torch.randn(rows, vocab, generator=gen) * spread
        for norm, out in (("vocab", normalised), ("none", plain)):
            loss, parts = ttm_kernels.fused_wttm_loss(z, v, gamma=gamma, backend=backend, weight_norm=norm,
                                                      return_components=True)
            out[vocab] = loss.item()
            if norm == "vocab":
                weight[vocab] = parts.weight.item()
    limit_weight = math.exp(-gamma * (1 - gamma) * spread**2 / 2)
    for vocab in weight:
        assert abs(weight[vocab] / limit_weight - 1) < 0.02, (vocab, weight[vocab], limit_weight)
    assert max(normalised.values()) / min(normalised.values()) < 1.05, normalised
    growth = plain[32000] / plain[500]
    assert abs(growth / 64 ** (1 - gamma) - 1) < 0.05, (growth, 64 ** (1 - gamma))


@pytest.mark.parametrize("backend", [pytest.param(b, marks=_backend_marks(b)) for b in ("cpu", "torch")])
def test_fused_wttm_loss_weight_norm_gradient_accumulation(backend):
    """The factor is a constant of (gamma, V), no batch statistic: micro-batches summed with num_items_in_batch
    give the whole batch's loss and gradient."""
    gen = torch.Generator().manual_seed(11)
    z, v = torch.randn(10, 53, generator=gen) * 8, torch.randn(10, 53, generator=gen) * 8
    target = torch.randint(0, 53, (10,), generator=gen)
    target[[2, 7]] = -100
    kwargs = dict(gamma=0.25, beta=3.0, backend=backend, weight_norm="vocab")
    whole = z.clone().requires_grad_()
    loss = ttm_kernels.fused_wttm_loss(whole, v, target, **kwargs)
    loss.backward()
    parts = z.clone().requires_grad_()
    total = sum(ttm_kernels.fused_wttm_loss(parts[rows], v[rows], target[rows], num_items_in_batch=8, **kwargs)
                for rows in (slice(0, 3), slice(3, 10)))
    total.backward()
    torch.testing.assert_close(total, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-6, atol=1e-9)


def test_wttm_weight_norm_modules():
    """The module forms take weight_norm, pass it on and show it; a bad value is refused at construction."""
    gen = torch.Generator().manual_seed(13)
    z, v = torch.randn(4, 19, generator=gen) * 6, torch.randn(4, 19, generator=gen) * 6
    module = ttm_kernels.WTTMLoss(0.3, weight_norm="vocab")
    assert torch.equal(module(z, v), ttm_kernels.fused_wttm_loss(z, v, gamma=0.3, weight_norm="vocab"))
    assert "weight_norm='vocab'" in repr(module)
    h_s, w_s = torch.randn(4, 6, generator=gen), torch.randn(19, 6, generator=gen)
    h_t, w_t = torch.randn(4, 7, generator=gen), torch.randn(19, 7, generator=gen)
    linear = ttm_kernels.LinearWTTMLoss(0.3, weight_norm="vocab")
    assert torch.equal(linear(h_s, w_s, h_t, w_t),
                       ttm_kernels.fused_linear_wttm_loss(h_s, w_s, h_t, w_t, gamma=0.3, weight_norm="vocab"))
    assert "weight_norm='vocab'" in repr(linear)
    for module_class in (ttm_kernels.WTTMLoss, ttm_kernels.LinearWTTMLoss):
        with pytest.raises(ValueError, match="weight_norm must be one of"):
            module_class(weight_norm="batch")


def test_loss_spec_weight_norm_refusals():
    """weight_norm is WTTM's: TTM and KD (weight 1 at every V) refuse it; an unknown value is refused; the
    default is the paper's U; an unresolved spec never reaches a kernel with an unnormalised weight."""
    with pytest.raises(ValueError, match="weight_norm must be one of"):
        ttm_kernels.fused_wttm_loss(torch.randn(2, 5), torch.randn(2, 5), weight_norm="V")
    for build in (lambda: specs.ttm(0.3, weight_norm="vocab"), lambda: specs.kd(2.0, weight_norm="vocab")):
        with pytest.raises(ValueError, match="normalises WTTM's weight U"):
            build()
    with pytest.raises(TypeError):  # the TTM and KD functions have no such keyword
        ttm_kernels.fused_ttm_loss(torch.randn(2, 5), torch.randn(2, 5), weight_norm="vocab")
    assert specs.wttm(0.3).weight_norm == "none" and specs.wttm(0.3).at_vocab(50).kl_coef == 1.0
    unresolved = specs.wttm(0.3, beta=2.0, weight_norm="vocab")
    with pytest.raises(RuntimeError, match="at_vocab"):
        unresolved.kl_coef
    assert unresolved.at_vocab(50).kl_coef == pytest.approx(2.0 * 50 ** -0.7, rel=1e-15)
    assert specs.wttm(1.5, weight_norm="vocab").at_vocab(50).kl_coef == 1.0
