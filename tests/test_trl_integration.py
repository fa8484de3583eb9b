"""ttm_kernels.integrations.trl against TRL's own functions and the float64 reference, and inside TRL's trainer.

TRL's ``_chunked_divergence_loss`` and GKD's ``generalized_jsd_loss`` run on the same inputs as ours: the losses,
the entropy sums, the counts and the student gradients must agree, and both must agree with the float64 reference
(``reference.loss_rows`` on the materialised logits). The trainer runs are TRL's ``DistillationTrainer`` with tiny
local Llamas (built from configs, nothing downloaded), once with TRL's loss and once with ours installed.
"""
import inspect
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the TRL integration's tests need transformers")
trl = pytest.importorskip("trl", reason="the TRL integration's tests compare against TRL (pip install trl)")
datasets = pytest.importorskip("datasets", reason="TRL's DistillationTrainer takes a datasets.Dataset")
distillation_trainer = pytest.importorskip("trl.trainer.distillation_trainer",
                                           reason="TRL >= 1.16 has trl.trainer.distillation_trainer")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # trl.experimental warns that its APIs are unstable
    gkd = pytest.importorskip("trl.experimental.gkd", reason="TRL's GKD trainer (trl.experimental.gkd)")

from test_hf_integration import VOCAB, tiny_lm, word_tokenizer  # noqa: E402
from ttm_kernels import reference  # noqa: E402
from ttm_kernels.integrations import trl as ttm_trl  # noqa: E402

TRL_CHUNKED = distillation_trainer._chunked_divergence_loss
TRL_GKD = gkd.GKDTrainer.generalized_jsd_loss
BETAS = [0.0, 0.5, 1.0]
BETA_IDS = ["forward-kl", "jsd0.5", "reverse-kl"]
STUDENT = ("student_hidden_states", "student_lm_head_weight", "student_lm_head_bias")


def make_heads(seed, batch=3, length=7, hidden=16, teacher_hidden=20, vocab=50, spread=10.0, bias=True,
               masked_fraction=0.3):
    """Hidden states and LM heads whose logits spread over about ``spread`` units, and a completion mask."""
    gen = torch.Generator().manual_seed(seed)
    p = {
        "student_hidden_states": torch.randn(batch, length, hidden, generator=gen),
        "teacher_hidden_states": torch.randn(batch, length, teacher_hidden, generator=gen),
        "student_lm_head_weight": torch.randn(vocab, hidden, generator=gen) * spread / hidden**0.5,
        "teacher_lm_head_weight": torch.randn(vocab, teacher_hidden, generator=gen) * spread / teacher_hidden**0.5,
        "student_lm_head_bias": torch.randn(vocab, generator=gen) if bias else None,
        "teacher_lm_head_bias": torch.randn(vocab, generator=gen) if bias else None,
    }
    p["completion_mask"] = (torch.rand(batch, length, generator=gen) >= masked_fraction).long()
    return p


def call(fn, p, beta, **kw):
    """``fn``'s (loss, entropy_sum, n_valid) and the gradients of the student's leaves."""
    args = {k: (None if x is None else x.clone()) for k, x in p.items()}
    for k in STUDENT:
        if args[k] is not None:
            args[k].requires_grad_()
    loss, entropy_sum, n_valid = fn(beta=beta, **args, **kw)
    loss.backward()
    return (loss.detach(), entropy_sum, n_valid), {k: args[k].grad for k in STUDENT if args[k] is not None}


def head(logits, softcap, scale):
    logits = logits * scale
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def reference_call(p, beta, num_items_in_batch=None, student_logit_scale=1.0, teacher_logit_scale=1.0,
                   student_final_logit_softcapping=None, teacher_final_logit_softcapping=None, temperature=1.0,
                   loss="kd", gamma=0.2):
    """The float64 reference on the materialised logits: (loss, entropy_sum, n_valid) and the student gradients."""
    leaves = {k: p[k].double().requires_grad_() for k in STUDENT if p[k] is not None}
    z = leaves["student_hidden_states"] @ leaves["student_lm_head_weight"].T
    v = p["teacher_hidden_states"].double() @ p["teacher_lm_head_weight"].double().T
    if "student_lm_head_bias" in leaves:
        z, v = z + leaves["student_lm_head_bias"], v + p["teacher_lm_head_bias"].double()
    z = head(z, student_final_logit_softcapping, student_logit_scale)
    v = head(v, teacher_final_logit_softcapping, teacher_logit_scale)
    if loss == "kd":
        scales = dict(student_scale=1.0 / temperature, teacher_scale=1.0 / temperature, weighted=False)
    else:
        scales = dict(student_scale=1.0, teacher_scale=gamma, weighted=loss == "wttm")
    rows = reference.loss_rows(z, v, None, kl_scale=1.0, ce_weight=0.0, jsd_beta=beta, **scales)
    valid = p["completion_mask"] != 0
    total = torch.where(valid, rows["loss"], 0).sum()
    denominator = valid.sum().clamp_min(1) if num_items_in_batch is None else num_items_in_batch
    value = total / denominator
    value.backward()
    entropy_sum = torch.where(valid, rows["entropy"], 0).sum().detach()
    return (value.detach(), entropy_sum, valid.sum()), {k: x.grad for k, x in leaves.items()}


def assert_close(name, expected, out, rtol):
    """Max abs error relative to the expected's largest magnitude."""
    expected, out = expected.double(), out.double()
    assert out.shape == expected.shape, f"{name}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    err = (expected - out).abs().max().item() if out.numel() else 0.0
    scale = expected.abs().max().item() if out.numel() else 0.0
    assert err <= rtol * scale + 1e-12, f"{name}: max error {err:.3g} > {rtol:g} * {scale:.3g}"


def assert_same_result(expected, out, rtol, grad_rtol=5e-4):
    """Loss and entropy sum within ``rtol``; the gradients within ``grad_rtol`` of their largest magnitude: the
    JSD's gradients can be 1e-4 of the probabilities they are differences of, so that the fp32 rounding of the
    logits moves them by 2.5e-4 of their size (TRL's own as much as ours, against the float64 reference)."""
    (loss_e, entropy_e, count_e), grads_e = expected
    (loss_o, entropy_o, count_o), grads_o = out
    assert loss_o.dtype == torch.float32
    assert_close("loss", loss_e, loss_o, rtol)
    assert_close("entropy_sum", entropy_e, entropy_o, rtol)
    assert int(count_o) == int(count_e) and count_o.dtype == torch.int64
    assert grads_o.keys() == grads_e.keys()
    for k in grads_o:
        assert grads_o[k].dtype == torch.float32
        assert_close(f"d {k}", grads_e[k], grads_o[k], grad_rtol)


# (name, make_heads kwargs, call kwargs): temperature, each head's own soft-cap and scale, the divisor, no bias.
CASES = [
    ("T1", {}, {}),
    ("T2", {"seed": 1}, {"temperature": 2.0}),
    ("student-softcap5-teacher-scale0.5", {"seed": 2},
     {"student_final_logit_softcapping": 5.0, "teacher_logit_scale": 0.5}),
    ("teacher-softcap4-student-scale1.5-T2", {"seed": 3},
     {"teacher_final_logit_softcapping": 4.0, "student_logit_scale": 1.5, "temperature": 2.0}),
    ("num-items-tensor", {"seed": 4}, {"num_items_in_batch": torch.tensor(40.0)}),
    ("num-items-int-nobias", {"seed": 5, "bias": False}, {"num_items_in_batch": 33}),
    ("spread30-half-masked", {"seed": 6, "spread": 30.0, "masked_fraction": 0.5}, {}),
]


@pytest.mark.parametrize("beta", BETAS, ids=BETA_IDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_chunked_divergence_loss_equals_trls(beta, case):
    """Loss, entropy sum, count and student gradients equal TRL's _chunked_divergence_loss, and both equal the
    float64 reference."""
    _, heads_kw, kw = case
    p = make_heads(**{"seed": 0, **heads_kw})
    ours = call(ttm_trl.chunked_divergence_loss, p, beta, chunk_size=8, **kw)
    theirs = call(TRL_CHUNKED, p, beta, **kw)
    expected = reference_call(p, beta, **kw)
    assert_same_result(expected, ours, rtol=2e-5)
    assert_same_result(expected, theirs, rtol=2e-5)
    assert_same_result(theirs, ours, rtol=2e-5)


def test_chunked_divergence_loss_has_trls_signature():
    """TRL's parameters, in TRL's order, with TRL's defaults; ours adds keyword-only ones after them."""
    theirs = list(inspect.signature(TRL_CHUNKED).parameters.values())
    ours = list(inspect.signature(ttm_trl.chunked_divergence_loss).parameters.values())
    assert [(q.name, q.kind, q.default) for q in ours[:len(theirs)]] == [(q.name, q.kind, q.default) for q in theirs]
    assert all(q.kind == inspect.Parameter.KEYWORD_ONLY for q in ours[len(theirs):])


@pytest.mark.parametrize("beta", BETAS, ids=BETA_IDS)
def test_chunked_divergence_loss_with_every_token_masked(beta):
    """A micro-batch with no completion token: loss 0 with zero gradients, entropy 0, count 0, as TRL's."""
    p = make_heads(seed=7, masked_fraction=1.1)
    ours = call(ttm_trl.chunked_divergence_loss, p, beta)
    theirs = call(TRL_CHUNKED, p, beta)
    (loss, entropy_sum, count), grads = ours
    assert loss.item() == 0.0 and entropy_sum.item() == 0.0 and int(count) == 0
    assert all(not g.any() for g in grads.values())
    assert_same_result(theirs, ours, rtol=0.0)


@pytest.mark.parametrize("beta", BETAS, ids=BETA_IDS)
@pytest.mark.parametrize("loss", ["wttm", "ttm"])
def test_chunked_divergence_loss_ttm_and_wttm(loss, beta):
    """loss="ttm" / "wttm": the teacher transformed by gamma (WTTM weighted by U), beta's divergence, no CE."""
    p = make_heads(seed=8)
    kw = dict(student_final_logit_softcapping=6.0, teacher_logit_scale=0.8)
    ours = call(ttm_trl.chunked_divergence_loss, p, beta, loss=loss, gamma=0.3, **kw)
    assert_same_result(reference_call(p, beta, loss=loss, gamma=0.3, **kw), ours, rtol=2e-5)


@pytest.mark.parametrize("kw,error,match", [
    (dict(loss="ttm", temperature=2.0), ValueError, "temperature=2.0: TTM and WTTM have no student temperature"),
    (dict(loss="jsd"), ValueError, "loss must be one of"),
    (dict(beta=1.5), ValueError, "jsd_beta must lie in"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch must be a finite positive count"),
    (dict(student_final_logit_softcapping=-1.0), ValueError, "softcap must be a finite positive number"),
    (dict(teacher_logit_scale=0.0), ValueError, "teacher_logit_scale must be a finite positive number"),
    (dict(completion_mask=torch.ones(3, 6)), ValueError, r"student_hidden_states must have shape .* = \(3, 6, H\)"),
], ids=["ttm-temperature", "unknown-loss", "beta-above-1", "num-items-0", "negative-softcap", "teacher-scale-0",
        "mask-shape"])
def test_chunked_divergence_loss_refuses_bad_arguments(kw, error, match):
    p = make_heads(seed=9)
    p.update({k: kw.pop(k) for k in ("completion_mask",) if k in kw})
    with pytest.raises(error, match=match):
        ttm_trl.chunked_divergence_loss(beta=kw.pop("beta", 0.5), **p, **kw)


@pytest.fixture
def world_of_one():
    """A one-process gloo group, for DTensor LM heads on the CPU."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.device_mesh.init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("beta", BETAS, ids=BETA_IDS)
def test_chunked_divergence_loss_dtensor_heads(world_of_one, beta):
    """FSDP2's DTensor LM heads (Shard(0)) are gathered as TRL gathers them: TRL's numbers and gradients."""
    from torch.distributed.tensor import Shard, distribute_tensor

    p = make_heads(seed=10)
    results = []
    for fn in (TRL_CHUNKED, ttm_trl.chunked_divergence_loss):
        args = dict(p)
        for k in ("student_lm_head_weight", "student_lm_head_bias", "teacher_lm_head_weight", "teacher_lm_head_bias"):
            args[k] = distribute_tensor(p[k].clone(), world_of_one, [Shard(0)])
        args["student_lm_head_weight"].requires_grad_()
        args["student_hidden_states"] = p["student_hidden_states"].clone().requires_grad_()
        loss, entropy_sum, count = fn(beta=beta, **args)
        loss.backward()
        grads = {k: args[k].grad for k in ("student_hidden_states", "student_lm_head_weight")}
        grads["student_lm_head_weight"] = grads["student_lm_head_weight"].full_tensor()
        results.append(((loss.detach(), entropy_sum, count), grads))
    assert_same_result(*results, rtol=2e-5)


# --- GKD's generalized_jsd_loss on logits.

GKD_CASES = [
    ("batchmean-labels", {}, True),
    ("batchmean-nolabels", {}, False),
    ("T2-labels", {"temperature": 2.0}, True),
    ("sum-labels", {"reduction": "sum"}, True),
    ("mean-labels", {"reduction": "mean"}, True),
    ("mean-nolabels", {"reduction": "mean"}, False),
    ("num-items-tensor", {"num_items_in_batch": torch.tensor(17)}, True),
    ("num-items-int-nolabels", {"num_items_in_batch": 9}, False),
]


@pytest.mark.parametrize("beta", BETAS, ids=BETA_IDS)
@pytest.mark.parametrize("case", GKD_CASES, ids=[c[0] for c in GKD_CASES])
def test_generalized_jsd_loss_equals_gkds(beta, case):
    """The loss and the student logits' gradient equal GKDTrainer.generalized_jsd_loss on (B, T, V) logits with
    -100 labels, every reduction, the temperature and num_items_in_batch."""
    _, kw, with_labels = case
    gen = torch.Generator().manual_seed(11)
    student = torch.randn(3, 6, 40, generator=gen) * 8
    teacher = torch.randn(3, 6, 40, generator=gen) * 8
    labels = torch.randint(0, 40, (3, 6), generator=gen)
    labels[torch.rand(3, 6, generator=gen) < 0.3] = -100
    results = []
    for fn in (TRL_GKD, ttm_trl.generalized_jsd_loss):
        leaf = student.clone().requires_grad_()
        loss = fn(leaf, teacher, labels if with_labels else None, beta=beta, **kw)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    (loss_t, grad_t), (loss_o, grad_o) = results
    assert_close("loss", loss_t, loss_o, rtol=2e-6)
    assert_close("d student_logits", grad_t, grad_o, rtol=2e-5)


def test_generalized_jsd_loss_has_gkds_signature_and_refuses_none():
    theirs = [(q.name, q.default) for q in inspect.signature(TRL_GKD).parameters.values()]
    assert [(q.name, q.default) for q in inspect.signature(ttm_trl.generalized_jsd_loss).parameters.values()] == theirs
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="reduction must be one of"):
        ttm_trl.generalized_jsd_loss(logits, logits, reduction="none")


# --- The installer, and TRL's DistillationTrainer with ours installed.

def test_install_patches_trls_function_and_uninstall_restores_it():
    original = distillation_trainer._chunked_divergence_loss
    with ttm_trl.install(loss="wttm", gamma=0.3) as outer:
        patched = distillation_trainer._chunked_divergence_loss
        assert patched is not original and patched.keywords["loss"] == "wttm"
        inner = ttm_trl.install()
        with pytest.raises(RuntimeError, match="uninstall the later installation first"):
            outer.uninstall()
        inner.uninstall()
        assert distillation_trainer._chunked_divergence_loss is patched
    assert distillation_trainer._chunked_divergence_loss is original
    outer.uninstall()  # a second uninstall changes nothing
    assert distillation_trainer._chunked_divergence_loss is original
    with pytest.raises(ValueError, match="loss must be one of"):
        ttm_trl.install(loss="jsd")
    assert distillation_trainer._chunked_divergence_loss is original


def train_distillation(tmp_path, beta, steps=2, install=None, temperature=1.0):
    """TRL's DistillationTrainer, 2 on-policy steps (SGD) of a tiny Llama student from a tiny Llama teacher,
    generations of up to 8 tokens that end at any of 12 end-of-sequence ids (so that some completions are
    masked before their end); with ``install`` (install()'s keyword arguments) ours computes the loss."""
    student = tiny_lm("llama", hidden=16, layers=1, seed=0)
    teacher = tiny_lm("llama", hidden=24, layers=1, seed=1)
    student.generation_config.eos_token_id = list(range(11)) + [VOCAB - 1]
    gen = torch.Generator().manual_seed(7)
    prompts = [" ".join(f"w{j}" for j in torch.randint(11, VOCAB - 2, (n,), generator=gen).tolist())
               for n in (3, 5, 4, 6)]
    args = trl.DistillationConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=steps, max_completion_length=8,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1, bf16=False,
        gradient_checkpointing=False, beta=beta, temperature=temperature, optim="sgd", learning_rate=0.1,
        lr_scheduler_type="constant", seed=0)
    tokenizer = word_tokenizer()
    tokenizer.padding_side = "left"
    trainer = trl.DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                                      train_dataset=datasets.Dataset.from_dict({"prompt": prompts}))
    if install is None:
        trainer.train()
    else:
        with ttm_trl.install(**install):
            trainer.train()
    return [log for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize("beta", BETAS, ids=BETA_IDS)
def test_distillation_trainer_logs_trls_losses_with_ours_installed(tmp_path, beta):
    """Each step's logged loss, student entropy and gradient norm equal TRL's own run's."""
    theirs = train_distillation(tmp_path / "trl", beta)
    ours = train_distillation(tmp_path / "ours", beta, install={})
    assert len(theirs) == len(ours) == 2
    assert any(log["completions/clipped_ratio"] < 1 for log in theirs), "no completion ended before its limit"
    for log_theirs, log_ours in zip(theirs, ours):
        for key in ("loss", "entropy", "grad_norm"):
            assert log_ours[key] == pytest.approx(log_theirs[key], rel=2e-5), key
        assert log_ours["num_tokens"] == log_theirs["num_tokens"]


def test_distillation_trainer_with_wttm_installed(tmp_path):
    """install(loss="wttm"): the call of TRL's trainer computes WTTM on the tokens it passes (the float64 reference
    on the same arguments), and the trainer logs it."""
    calls = []
    names = list(inspect.signature(TRL_CHUNKED).parameters)
    with ttm_trl.install(loss="wttm", gamma=0.3) as installed:
        def recording(*args, **kwargs):
            result = installed.installed(*args, **kwargs)
            # Copies: the optimizer step updates the student's LM head in place afterwards.
            arguments = {k: x.detach().clone() if isinstance(x, torch.Tensor) else x
                         for k, x in {**dict(zip(names, args)), **kwargs}.items()}
            calls.append((arguments, result))
            return result

        distillation_trainer._chunked_divergence_loss = recording
        try:
            logs = train_distillation(tmp_path, beta=0.0, steps=1)
        finally:
            distillation_trainer._chunked_divergence_loss = installed.installed
    assert len(calls) == 1
    p, (loss, entropy_sum, count) = calls[0]
    inputs = {k: p[k] for k in names[:5] + ["student_lm_head_bias", "teacher_lm_head_bias"]}
    options = {k: p[k] for k in names[9:] + ["num_items_in_batch"]}
    (expected, expected_entropy, expected_count), _ = reference_call(inputs, p["beta"], loss="wttm", gamma=0.3,
                                                                     **options)
    assert loss.item() == pytest.approx(expected.item(), rel=2e-5)
    assert entropy_sum.item() == pytest.approx(expected_entropy.item(), rel=2e-5)
    assert int(count) == int(expected_count)
    assert logs[0]["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert math.isfinite(logs[0]["grad_norm"])
