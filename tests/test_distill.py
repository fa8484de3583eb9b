"""FusedLinearDistillLoss (the Liger-shaped class) against float64 oracles on materialised logits.

The KD oracle is written as Liger computes its JSD at beta=0 (the KL of the tempered log-probabilities, no
T^2), independently of ttm_kernels.reference, so that the class's temperature convention is pinned down.
"""
import os
import re

import pytest
import torch
import torch.nn.functional as F

import ttm_kernels
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


def oracle_terms(kind, z, v, target, gamma, temperature):
    """Per-row (soft, hard) terms: the class's documented formulas, written out."""
    if kind == "kd":
        # Liger's beta=0 term, F.kl_div(log_q, log_p, log_target=True) with no T^2, where 0 log 0 = 0 for the
        # teacher's -inf columns (F.kl_div would give NaN there).
        log_q, log_p = F.log_softmax(z / temperature, -1), F.log_softmax(v / temperature, -1)
        soft = torch.where(log_p > -torch.inf, log_p.exp() * (log_p - log_q), 0.0).sum(-1)
    else:
        rows = reference.loss_rows(z, v, teacher_scale=gamma, weighted=kind == "wttm")
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_linear_distill_loss(backend, case):
    """loss = weight_hard_loss * CE + weight_soft_loss * D over the labelled rows (or num_items_in_batch),
    with the soft and hard parts returned as documented; H and V differ between the models."""
    name, scale = case
    kind = name.split("-")[0]
    p = make_problem(n=29, vocab=70, teacher_vocab=66, seed=51, spread=8.0)
    device = device_of(backend)
    loss_fn = FusedLinearDistillLoss(loss=kind, weight_hard_loss=0.4, weight_soft_loss=1.7, chunk_size=8,
                                     softcap=6.0, logit_scale=1.5, return_soft_hard_loss=True,
                                     vocab_mismatch="truncate_teacher", backend=backend, **scale)
    args = {k: x.to(device) for k, x in p.items()}
    leaves = {k: args[k].float().requires_grad_() for k in STUDENT}
    count = int((p["target"] != -100).sum()) + 3
    loss, soft, hard = loss_fn(leaves["student_hidden"], leaves["student_weight"], args["teacher_hidden"].float(),
                               args["teacher_weight"].float(), args["target"], leaves["student_bias"],
                               args["teacher_bias"].float(), num_items_in_batch=torch.tensor(count))
    loss.backward()

    ref_leaves, z, v = logits_of(p, softcap=6.0, logit_scale=1.5)
    v = torch.cat([v, v.new_full((v.shape[0], 4), float("-inf"))], -1)
    soft_rows, hard_rows = oracle_terms(kind, z, v, p["target"], scale.get("gamma"), scale.get("temperature"))
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
    liger_style = FusedLinearDistillLoss(loss="kd", temperature=3.0, weight_soft_loss=1.0)(*args)
    hinton = fused_linear_kd_loss(*args, temperature=3.0, beta=1.0 / 9.0, ce_weight=0.0)
    torch.testing.assert_close(liger_style, hinton, rtol=1e-6, atol=1e-7)


def test_fused_linear_distill_loss_liger_call():
    """Liger's constructor and forward keywords, and its beta=0 (forward KL) and compiled, are accepted."""
    p = {k: x.float() if x is not None and x.is_floating_point() else x for k, x in make_problem(seed=53).items()}
    loss_fn = FusedLinearDistillLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.0, ignore_index=-100,
                                     temperature=1.0, compiled=True, chunk_size=1024, return_soft_hard_loss=False)
    out = loss_fn(student_input=p["student_hidden"], student_weight=p["student_weight"],
                  teacher_input=p["teacher_hidden"], teacher_weight=p["teacher_weight"], true_labels=p["target"],
                  student_bias=None, teacher_bias=None)
    expected = ttm_kernels.fused_linear_wttm_loss(p["student_hidden"], p["student_weight"], p["teacher_hidden"],
                                                  p["teacher_weight"], p["target"], beta=0.5, ce_weight=0.5)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert "loss='wttm', gamma=0.2" in repr(loss_fn)


BAD = [
    ({"loss": "jsd"}, ValueError, "loss must be one of"),
    ({"beta": 0.5}, ValueError, "beta=0.5: Liger's JSD interpolation is not computed"),
    ({"temperature": 2.0}, ValueError, "TTM and WTTM have no student temperature.*gamma=0.5"),
    ({"loss": "kd", "gamma": 0.5}, ValueError, "loss='kd' uses temperature"),
    ({"temperature": 0.0, "loss": "kd"}, ValueError, "temperature must be a finite positive"),
    ({"weight_soft_loss": float("nan")}, ValueError, "weight_soft_loss"),
    ({"vocab_mismatch": "pad"}, ValueError, "vocab_mismatch must be one of"),
    ({"return_soft_hard_loss": 1}, TypeError, "return_soft_hard_loss must be True or False"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD, ids=[m.split(":")[0][:40] for _, _, m in BAD])
def test_fused_linear_distill_loss_bad_configuration(kwargs, error, match):
    with pytest.raises(error, match=match):
        FusedLinearDistillLoss(**kwargs)


def test_fused_linear_distill_loss_hard_loss_needs_labels():
    p = {k: x.float() if x is not None and x.is_floating_point() else x for k, x in make_problem(seed=54).items()}
    args = (p["student_hidden"], p["student_weight"], p["teacher_hidden"], p["teacher_weight"])
    with pytest.raises(ValueError, match="weight_hard_loss=0.5 needs true_labels"):
        FusedLinearDistillLoss(weight_hard_loss=0.5)(*args)
    loss, soft, hard = FusedLinearDistillLoss(return_soft_hard_loss=True)(*args)
    assert hard.item() == 0.0 and soft.item() == pytest.approx(loss.item())


def test_readme_liger_example_runs():
    namespace = {}
    exec(compile(readme_block("### Drop-in for Liger"), "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"]) and namespace["student_head"].grad is not None
