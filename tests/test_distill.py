"""FusedLinearDistillLoss (Liger's LigerFusedLinearJSDLoss, swapped by its import) against float64 oracles on
materialised logits, and against Liger's own class where liger-kernel is installed.

The Liger oracle (``liger_formula``) transcribes liger-kernel 0.8.5's formula (LigerFusedLinearJSDFunction on
LigerFusedLinearDistillationBase) in float64, independently of Liger and of ttm_kernels.reference, so that the
class's conventions (the divisor, the ignored rows, the temperature without T^2, Liger's beta) are pinned down
also where liger-kernel is not installed.
"""
import importlib.util
import inspect
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

from ttm_kernels import FusedLinearDistillLoss, fused_linear_kd_loss, reference
from test_linear import BACKENDS, assert_close, device_of, head, make_problem

STUDENT = ("student_hidden", "student_weight", "student_bias")
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_block(heading):
    """The first Python code block of the README after ``heading``."""
    with open(README) as f:
        text = f.read()
    return re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S).group(1)


def logits_of(p, softcap=None, logit_scale=1.0):
    """float64 student leaves and both models' logits (the teacher aligned to the student's vocabulary)."""
    leaves = {k: p[k].detach().double().requires_grad_() for k in STUDENT}
    z = head(leaves["student_hidden"] @ leaves["student_weight"].T + leaves["student_bias"], softcap, logit_scale)
    v = head(p["teacher_hidden"].double() @ p["teacher_weight"].double().T + p["teacher_bias"].double(), softcap,
             logit_scale)
    return leaves, z, v


def kl_rows(log_a, log_b):
    """KL(a || b) of each row, with 0 log 0 = 0 where a is 0 (a teacher's -inf columns; F.kl_div gives NaN)."""
    return torch.where(log_a > -torch.inf, log_a.exp() * (log_a - log_b), 0.0).sum(-1)


def liger_divergence(log_p, log_q, beta):
    """Liger's generalised JSD of the teacher's p and the student's q (jsd_loss.py, written out)."""
    if beta == 0:
        return kl_rows(log_p, log_q)
    if beta == 1:
        return kl_rows(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - beta), log_p + math.log(beta)]), 0)
    return beta * kl_rows(log_p, log_m) + (1 - beta) * kl_rows(log_q, log_m)


def oracle_terms(kind, z, v, target, gamma, temperature, beta=0.0):
    """Per-row (soft, hard) terms: the class's documented formulas, written out."""
    if kind == "kd":
        # Liger's term: its divergence of the tempered log-probabilities, with no T^2.
        soft = liger_divergence(F.log_softmax(v / temperature, -1), F.log_softmax(z / temperature, -1), beta)
    else:
        rows = reference.loss_rows(z, v, teacher_scale=gamma, weighted=kind == "wttm", jsd_beta=beta)
        soft = rows["weight"] * rows["kl"]
    hard = F.cross_entropy(z, target.clamp_min(0), reduction="none")
    valid = target != -100
    return torch.where(valid, soft, 0.0), torch.where(valid, hard, 0.0)


CASES = [
    ("wttm", {"gamma": 0.3}),
    ("ttm", {"gamma": 0.5}),
    ("kd", {"temperature": 2.0}),
    ("kd-T1", {"temperature": 1.0}),
]


# The reverse KL is infinite against the truncated teacher's -inf columns, so the vocabulary-mismatch case below
# takes the forward KL and the JSD; the Liger tests take all three.
DIVERGENCES = [("kl", 0.0), ("jsd", 0.5)]


def call_or_skip_refused(loss_fn, *args, **kwargs):
    """``loss_fn(*args, **kwargs)``; skipped where an explicit compiled backend refuses the divergence (until its
    kernel computes it: then the test runs)."""
    try:
        return loss_fn(*args, **kwargs)
    except ValueError as error:
        if "computes the forward KL only" in str(error):
            pytest.skip(f"backend={loss_fn.backend!r} does not compute beta={loss_fn.beta} yet: {error}")
        raise


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES, ids=[d[0] for d in DIVERGENCES])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_linear_distill_loss(backend, divergence, case):
    """loss = weight_hard_loss * CE + weight_soft_loss * D over the labelled rows (or num_items_in_batch),
    with the soft and hard parts returned as documented; H and V differ between the models."""
    name, scale = case
    kind = name.split("-")[0]
    beta = divergence[1]
    p = make_problem(n=29, vocab=70, teacher_vocab=66, seed=51, spread=8.0)
    device = device_of(backend)
    loss_fn = FusedLinearDistillLoss(0.4, 1.7, beta, chunk_size=8, loss=kind, softcap=6.0, logit_scale=1.5,
                                     return_soft_hard_loss=True, vocab_mismatch="truncate_teacher", backend=backend,
                                     **scale)
    args = {k: x.to(device) for k, x in p.items()}
    leaves = {k: args[k].float().requires_grad_() for k in STUDENT}
    count = int((p["target"] != -100).sum()) + 3
    loss, soft, hard = call_or_skip_refused(
        loss_fn, leaves["student_hidden"], leaves["student_weight"], args["teacher_hidden"].float(),
        args["teacher_weight"].float(), args["target"], leaves["student_bias"], args["teacher_bias"].float(),
        num_items_in_batch=torch.tensor(count))
    loss.backward()

    ref_leaves, z, v = logits_of(p, softcap=6.0, logit_scale=1.5)
    v = torch.cat([v, v.new_full((v.shape[0], 4), float("-inf"))], -1)
    soft_rows, hard_rows = oracle_terms(kind, z, v, p["target"], scale.get("gamma"), scale.get("temperature"), beta)
    ref_soft, ref_hard = soft_rows.sum() / count, hard_rows.sum() / count
    ref = 0.4 * ref_hard + 1.7 * ref_soft
    ref.backward()
    assert not soft.requires_grad and not hard.requires_grad
    assert_close("loss", ref.detach(), loss.detach())
    assert_close("soft", ref_soft.detach(), soft)
    assert_close("hard", ref_hard.detach(), hard)
    for k in STUDENT:
        assert_close(f"d {k}", ref_leaves[k].grad, leaves[k].grad)


def test_fused_linear_distill_loss_kd_has_no_t_squared():
    """The class follows Liger's temperature (no T^2); fused_linear_kd_loss keeps Hinton's T^2."""
    p = {k: x.float() if x is not None and x.is_floating_point() else x for k, x in make_problem(seed=52).items()}
    args = (p["student_hidden"], p["student_weight"], p["teacher_hidden"], p["teacher_weight"], p["target"])
    for beta in (0.0, 0.5, 1.0):
        liger_style = FusedLinearDistillLoss(0.0, 1.0, beta, temperature=3.0)(*args)
        hinton = fused_linear_kd_loss(*args, temperature=3.0, beta=1.0 / 9.0, ce_weight=0.0, jsd_beta=beta)
        torch.testing.assert_close(liger_style, hinton, rtol=1e-6, atol=1e-7)


def test_fused_linear_distill_loss_liger_call():
    """Liger's constructor and forward keywords are accepted, and mean the public function's arguments."""
    p = {k: x.float() if x is not None and x.is_floating_point() else x for k, x in make_problem(seed=53).items()}
    loss_fn = FusedLinearDistillLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.0, ignore_index=-100,
                                     temperature=1.0, compiled=True, chunk_size=1024, return_soft_hard_loss=False)
    out = loss_fn(student_input=p["student_hidden"], student_weight=p["student_weight"],
                  teacher_input=p["teacher_hidden"], teacher_weight=p["teacher_weight"], true_labels=p["target"],
                  student_bias=None, teacher_bias=None)
    expected = fused_linear_kd_loss(p["student_hidden"], p["student_weight"], p["teacher_hidden"],
                                    p["teacher_weight"], p["target"], temperature=1.0, beta=0.5, ce_weight=0.5,
                                    chunk_size=1024)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert "beta=0.0" in repr(loss_fn) and "loss='kd', temperature=1.0" in repr(loss_fn)


BAD = [
    ({"loss": "jsd"}, ValueError, "loss must be one of"),
    ({"beta": 1.5}, ValueError, r"beta must lie in \[0, 1\]"),
    ({"loss": "wttm", "temperature": 2.0}, ValueError, "TTM and WTTM have no student temperature.*gamma=0.5"),
    ({"gamma": 0.5}, ValueError, "gamma=0.5 is the TTM/WTTM exponent: pass loss='ttm' or 'wttm'"),
    ({"temperature": 0.0}, ValueError, "temperature must be a finite positive"),
    ({"weight_soft_loss": float("nan")}, ValueError, "weight_soft_loss"),
    ({"vocab_mismatch": "pad"}, ValueError, "vocab_mismatch must be one of"),
    ({"return_soft_hard_loss": 1}, TypeError, "return_soft_hard_loss must be True or False"),
    ({"compiled": None}, TypeError, "compiled must be True or False"),
    ({"chunk_size": 0}, ValueError, "chunk_size must be None or a positive int"),
    ({"weight_hard_loss": "wttm"}, TypeError, "first positional argument is Liger's weight_hard_loss"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD, ids=[m.split(":")[0][:40] for _, _, m in BAD])
def test_fused_linear_distill_loss_bad_configuration(kwargs, error, match):
    with pytest.raises(error, match=match):
        FusedLinearDistillLoss(**kwargs)


def test_fused_linear_distill_loss_hard_loss_needs_labels():
    p = {k: x.float() if x is not None and x.is_floating_point() else x for k, x in make_problem(seed=54).items()}
    args = (p["student_hidden"], p["student_weight"], p["teacher_hidden"], p["teacher_weight"])
    with pytest.raises(ValueError, match="weight_hard_loss=0.5 needs true_labels"):
        FusedLinearDistillLoss()(*args)
    loss, soft, hard = FusedLinearDistillLoss(0.0, 1.0, return_soft_hard_loss=True)(*args)
    assert hard.item() == 0.0 and soft.item() == pytest.approx(loss.item())


# --- Liger's class: its constructor and forward, and its numbers.

LIGER_INIT = (("weight_hard_loss", 0.5), ("weight_soft_loss", 0.5), ("beta", 0.5), ("ignore_index", -100),
              ("temperature", 1.0), ("compiled", True), ("chunk_size", 1024), ("return_soft_hard_loss", False))
LIGER_FORWARD = ("student_input", "student_weight", "teacher_input", "teacher_weight", "true_labels", "student_bias",
                 "teacher_bias")
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
needs_liger = pytest.mark.skipif(not HAS_LIGER, reason="liger-kernel is not installed (the 'hf' extra installs it)")


def liger_class():
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    return LigerFusedLinearJSDLoss


def positional(signature):
    return [(name, param.default) for name, param in signature.parameters.items()
            if name != "self" and param.kind == param.POSITIONAL_OR_KEYWORD]


def test_fused_linear_distill_loss_has_liger_signature():
    """Liger's constructor arguments in its order with its defaults, its forward's in its order; every other
    argument keyword-only."""
    assert tuple(positional(inspect.signature(FusedLinearDistillLoss.__init__))) == LIGER_INIT
    assert tuple(name for name, _ in positional(inspect.signature(FusedLinearDistillLoss.forward))) == LIGER_FORWARD
    if HAS_LIGER:
        liger = liger_class()
        assert positional(inspect.signature(liger.__init__)) == positional(
            inspect.signature(FusedLinearDistillLoss.__init__))
        assert [name for name, _ in positional(inspect.signature(liger.forward))] == list(LIGER_FORWARD)


def liger_problem(seed, bias=True, ignore_index=-100, ignore_fraction=0.25, spread=10.0):
    """float32 leaves of a (37, H) problem of V = 50 (teacher H + 3), logits of standard deviation ``spread``."""
    p = make_problem(n=37, hidden=16, vocab=50, spread=spread, seed=seed, bias=bias, ignore_index=ignore_index,
                     ignore_fraction=ignore_fraction)
    return {k: x.float() if x is not None and x.is_floating_point() else x for k, x in p.items()}


def liger_formula(p, weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, ignore_index=-100, temperature=1.0):
    """float64 (loss, soft, hard) and the student leaves: liger-kernel 0.8.5's LigerFusedLinearJSDLoss written
    out (chunk_forward, _compute_loss and distillation_loss_fn of one chunk holding every row)."""
    leaves = {k: p[k].detach().double().requires_grad_() for k in STUDENT if p[k] is not None}
    z = leaves["student_hidden"] @ leaves["student_weight"].T
    v = p["teacher_hidden"].double() @ p["teacher_weight"].double().T
    if p["student_bias"] is not None:
        z, v = z + leaves["student_bias"], v + p["teacher_bias"].double()
    target = p["target"]
    hard = F.nll_loss(F.log_softmax(z, -1), target, reduction="sum", ignore_index=ignore_index)
    jsd = liger_divergence(F.log_softmax(v / temperature, -1), F.log_softmax(z / temperature, -1), beta)
    soft = jsd.masked_fill(target == ignore_index, 0.0).sum()
    count = (target != ignore_index).sum().clamp_min(1)
    hard, soft = hard / count, soft / count
    return weight_hard_loss * hard + weight_soft_loss * soft, soft, hard, leaves


def run_loss(cls, p, init_args, bias=True):
    """``cls(*init_args)`` called positionally on float32 student leaves: (loss, soft, hard) (soft and hard
    None without return_soft_hard_loss) and the leaves' gradients after ``loss.backward()``."""
    leaves = {k: p[k].clone().requires_grad_() for k in STUDENT if p[k] is not None}
    out = cls(*init_args)(leaves["student_hidden"], leaves["student_weight"], p["teacher_hidden"],
                          p["teacher_weight"], p["target"], leaves.get("student_bias"), p["teacher_bias"])
    loss, soft, hard = out if isinstance(out, tuple) else (out, None, None)
    loss.backward()
    return loss, soft, hard, {k: x.grad for k, x in leaves.items()}


# (weight_hard_loss, weight_soft_loss, beta, ignore_index, temperature, compiled, chunk_size, return_soft_hard_loss)
LIGER_CONFIGS = [(wh, ws, beta, -100, t, False, 8, True) for beta in (0.0, 0.5, 1.0) for t in (1.0, 2.0)
                 for wh, ws in ((0.5, 0.5), (0.0, 1.0), (1.0, 0.0))]
LIGER_CONFIGS += [(0.3, 0.7, 0.25, -1, 2.0, False, 1024, True), (0.5, 0.5, 0.5, -100, 1.0, False, 16, False)]
LIGER_IDS = [f"beta{c[2]}-T{c[4]:g}-hard{c[0]}-soft{c[1]}-ignore{c[3]}-chunk{c[6]}" + ("" if c[7] else "-loss-only")
             for c in LIGER_CONFIGS]
BIAS = [True, False]


def assert_same_results(name, expected, out):
    """(loss, soft, hard, grads) of ``out`` against ``expected``'s, to fp32 precision."""
    for term, ref, got in zip(("loss", "soft", "hard"), expected[:3], out[:3]):
        assert (ref is None) == (got is None), f"{name}: {term} returned by one side only"
        if ref is not None:
            assert got.dtype == torch.float32
            assert_close(f"{name} {term}", ref.detach(), got.detach())
    assert expected[3].keys() == out[3].keys()
    for k, grad in out[3].items():
        assert grad.dtype == torch.float32
        assert_close(f"{name} d {k}", expected[3][k], grad)


@pytest.mark.parametrize("bias", BIAS, ids=["bias", "no-bias"])
@pytest.mark.parametrize("config", LIGER_CONFIGS, ids=LIGER_IDS)
def test_fused_linear_distill_loss_matches_liger_formula(config, bias):
    """Constructed positionally in Liger's order: the loss, soft and hard terms and the student's gradients
    equal the float64 transcription of Liger's formula."""
    p = liger_problem(seed=60 + LIGER_CONFIGS.index(config), bias=bias, ignore_index=config[3])
    out = run_loss(FusedLinearDistillLoss, p, config)
    loss, soft, hard, leaves = liger_formula(p, *config[:5])
    loss.backward()
    expected = (loss, soft if config[7] else None, hard if config[7] else None,
                {k: x.grad for k, x in leaves.items()})
    assert_same_results("formula", expected, out)


@needs_liger
@pytest.mark.parametrize("bias", BIAS, ids=["bias", "no-bias"])
@pytest.mark.parametrize("config", LIGER_CONFIGS, ids=LIGER_IDS)
def test_fused_linear_distill_loss_matches_liger(config, bias):
    """The import swapped: Liger's class and ours, constructed and called alike, give the same loss, soft and
    hard terms and student gradients (Liger's chunked class on the CPU, compiled=False)."""
    p = liger_problem(seed=80 + LIGER_CONFIGS.index(config), bias=bias, ignore_index=config[3])
    assert_same_results("liger", run_loss(liger_class(), p, config), run_loss(FusedLinearDistillLoss, p, config))


@needs_liger
def test_fused_linear_distill_loss_default_constructor_matches_liger():
    """No arguments on either side (Liger's compiled=True asks for torch.compile, which it alone would run:
    its compiled=False computes the same loss) and every row ignored: Liger's 0 and zero gradients."""
    for seed, ignore_fraction in ((70, 0.25), (71, 1.0)):
        p = liger_problem(seed, ignore_fraction=ignore_fraction)
        ours = run_loss(FusedLinearDistillLoss, p, ())
        liger = run_loss(liger_class(), p, tuple(value for _, value in LIGER_INIT[:5]) + (False,))
        assert_same_results("liger", liger, ours)
        formula = liger_formula(p)
        assert_close("formula loss", formula[0].detach(), ours[0])


def test_fused_linear_distill_loss_keeps_the_teacher_constant():
    """As Liger's, the class takes a teacher_input that requires grad and gives it no gradient; the upstream
    gradient scales the student's."""
    p = liger_problem(seed=72, bias=False)
    teacher_input = p["teacher_hidden"].clone().requires_grad_()
    student_input = p["student_hidden"].clone().requires_grad_()
    loss = FusedLinearDistillLoss()(student_input, p["student_weight"], teacher_input, p["teacher_weight"],
                                    p["target"])
    (2.5 * loss).backward()
    assert teacher_input.grad is None
    formula, _, _, leaves = liger_formula(p)
    (2.5 * formula).backward()
    assert_close("d student_input", leaves["student_hidden"].grad, student_input.grad)


def test_readme_liger_example_runs():
    namespace = {}
    exec(compile(readme_block("### Liger's `LigerFusedLinearJSDLoss`"), "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"]) and namespace["student_head"].grad is not None
