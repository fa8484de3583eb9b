"""``jsd_beta``: the divergence between the teacher's and the student's distributions (``reference.divergence``),
TRL's and Liger's generalised JSD, checked against an independent transcription of their formula, and the
unfused path that runs it (``backend="torch"``, which ``"auto"`` picks where a kernel lacks it)."""
import math

import pytest
import torch
import torch.nn.functional as F

from ttm_kernels import fused_kd_loss, fused_wttm_loss, reference

JSD_BETAS = {"forward-kl": 0.0, "jsd0.3": 0.3, "jsd0.5": 0.5, "reverse-kl": 1.0}


def trl_generalized_jsd(student_logits, teacher_logits, beta):
    """TRL GKD's generalized_jsd_loss per row (temperature 1), as its code writes it."""
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        return F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True).sum(-1)
    beta_t = torch.tensor(beta, dtype=student_log_probs.dtype)
    mixture = torch.logsumexp(torch.stack([student_log_probs + torch.log(1 - beta_t),
                                           teacher_log_probs + torch.log(beta_t)]), dim=0)
    kl_teacher = F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True).sum(-1)
    kl_student = F.kl_div(mixture, student_log_probs, reduction="none", log_target=True).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


@pytest.mark.parametrize("jsd_beta", JSD_BETAS.values(), ids=JSD_BETAS.keys())
@pytest.mark.parametrize("spread", [1.0, 30.0], ids=["spread1", "spread30"])
def test_divergence_is_trls_generalized_jsd(jsd_beta, spread):
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(16, 300, generator=gen, dtype=torch.float64) * spread
    v = torch.randn(16, 300, generator=gen, dtype=torch.float64) * spread
    got = reference.divergence(F.log_softmax(v, -1), F.log_softmax(z, -1), jsd_beta)
    expected = trl_generalized_jsd(z, v, jsd_beta)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert (got >= 0).all()


@pytest.mark.parametrize("jsd_beta", JSD_BETAS.values(), ids=JSD_BETAS.keys())
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_fused_kd_loss_jsd_beta_minus_inf_logits_keep_a_finite_gradient(jsd_beta, backend):
    """Classes that one distribution or both rule out (-inf logits) give a finite loss and gradient wherever the
    divergence is finite, as the forward KL always did: the reverse KL's and the JSD's q log q at q = 0 must
    not leak 0 * inf into the gradient."""
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(6, 50, generator=gen) * 10
    v = torch.randn(6, 50, generator=gen) * 10
    z[0, :7] = v[0, :7] = float("-inf")  # ruled out by both
    if jsd_beta == 1.0:
        z[1, 3:9] = v[1, 3:9] = float("-inf")  # the reverse KL is finite where the student rules out the teacher's
    else:
        v[1, 3:9] = float("-inf")  # ruled out by the teacher only
    if 0.0 < jsd_beta < 1.0:
        z[4, 1:3] = float("-inf")  # by the student only: the mixture keeps the teacher's mass
    target = torch.randint(10, 50, (6,), generator=gen)
    target[3] = -100
    z64 = z.double().requires_grad_()
    expected = fused_kd_loss(z64, v.double(), target, temperature=2.0, jsd_beta=jsd_beta, backend="torch")
    (expected_grad,) = torch.autograd.grad(expected, z64)
    z32 = z.clone().requires_grad_()
    loss = fused_kd_loss(z32, v, target, temperature=2.0, jsd_beta=jsd_beta, backend=backend)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(z32.grad).all()
    assert torch.isfinite(expected_grad).all()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z32.grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("jsd_beta", [-0.5, 1.5], ids=["negative", "above-1"])
def test_fused_wttm_loss_jsd_beta_outside_0_1_is_refused(jsd_beta):
    z = torch.randn(3, 20) * 5
    with pytest.raises(ValueError, match="jsd_beta"):
        fused_wttm_loss(z, torch.randn(3, 20) * 5, jsd_beta=jsd_beta)
