"""ttm_kernels.integrations.hf against the unfused computation on the models' own logits.

Tiny causal LMs are built from configs (random weights, nothing downloaded); their LM heads are scaled so
that the logits spread over several units (a random init gives logits near 0, which no soft-cap touches).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from test_distill import readme_block  # noqa: E402
from ttm_kernels import FusedLinearDistillLoss, reference  # noqa: E402
from ttm_kernels.integrations import hf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 96
COMMON = dict(vocab_size=VOCAB, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=64, tie_word_embeddings=False)
# (config class, model class, extra config): one plain head and the three logit post-processings.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "gemma2-softcap": ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": 4.0, "head_dim": 8}),
    "cohere-logit-scale": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.5, "eos_token_id": 2}),
    "granite-logits-scaling": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),
}


def tiny_lm(family, hidden, layers, seed, head_std=1.0, vocab=VOCAB):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(hidden_size=hidden, num_hidden_layers=layers,
                                               **dict(COMMON, vocab_size=vocab), **extra)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, head_std)
    return model


def make_batch(seed, rows=3, length=12, pad=(0, 3, 7), prompt=2):
    """Right-padded sequences (``pad`` tokens of padding per row) whose first ``prompt`` labels are ignored."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (rows, length), generator=gen)
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    for row, n in enumerate(pad[:rows]):
        if n:
            attention_mask[row, -n:] = 0
            labels[row, -n:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def num_items(*batches):
    return sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def reference_rows(student, teacher, batch, loss_fn):
    """The models' own logits (soft-cap and logit scale included), shifted, and the float64 reference's rows."""
    model_inputs = {k: v for k, v in batch.items() if k != "labels"}
    z = student(**model_inputs).logits[:, :-1]
    with torch.no_grad():
        v = teacher(**model_inputs).logits[:, :-1]
    spec = loss_fn._spec()
    return reference.loss_rows(z.double(), v.double(), batch["labels"][:, 1:], student_scale=spec.student_scale,
                               teacher_scale=spec.teacher_scale, kl_scale=1.0, weighted=loss_fn.loss == "wttm",
                               beta=loss_fn.weight_soft_loss, ce_weight=loss_fn.weight_hard_loss,
                               jsd_beta=loss_fn.beta)


def unfused_loss(student, teacher, batch, loss_fn, denominator):
    return reference_rows(student, teacher, batch, loss_fn)["loss"].sum() / denominator


def expected_metrics(student, teacher, batch, loss_fn, prefix=""):
    """The logged loss and components on ``batch``, from the float64 reference: token means over its labels."""
    with torch.no_grad():
        rows = reference_rows(student, teacher, batch, loss_fn)
    tokens = num_items(batch)
    hard = loss_fn.weight_hard_loss * rows["ce"].sum() / tokens
    soft = loss_fn.weight_soft_loss * (rows["weight"] * rows["kl"]).sum() / tokens
    means = {"loss": rows["loss"].sum() / tokens, "distill/soft_loss": soft, "distill/hard_loss": hard,
             "distill/kl": rows["kl"].sum() / tokens, "distill/ce": rows["ce"].sum() / tokens,
             "distill/weight": rows["weight"].sum() / tokens, "distill/entropy": rows["entropy"].sum() / tokens}
    return {prefix + name: value.item() for name, value in means.items()}


def assert_metrics(logged, expected, rel):
    assert expected.keys() <= logged.keys(), sorted(logged)
    for name, value in expected.items():
        assert logged[name] == pytest.approx(value, rel=rel), name


def grads_of(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(ref, out, rtol):
    assert ref.keys() == out.keys()
    for name in ref:
        err = (ref[name].double() - out[name].double()).abs().max().item()
        scale = ref[name].abs().max().item()
        assert err <= rtol * scale + 1e-10, f"d {name}: max error {err:.3g} > {rtol:g} * {scale:.3g}"


@pytest.mark.parametrize("family,kind", [(family, "wttm") for family in FAMILIES] + [("gemma2-softcap", "kd")],
                         ids=[f"wttm-{family}" for family in FAMILIES] + ["kd-gemma2-softcap"])
def test_distillation_loss_matches_unfused_logits(family, kind):
    """Loss and every student gradient equal the unfused loss on ``model(...).logits``, the logit
    post-processing of each family included (read from the config by ``head_transform``)."""
    student = tiny_lm(family, hidden=16, layers=1, seed=0)
    teacher = tiny_lm(family, hidden=24, layers=2, seed=1).requires_grad_(False)
    softcap, logit_scale = hf.head_transform(student.config)
    extra = {"temperature": 2.0} if kind == "kd" else {"gamma": 0.3}
    loss_fn = FusedLinearDistillLoss(0.3, 0.8, 0.0, loss=kind, softcap=softcap, logit_scale=logit_scale,
                                     chunk_size=8, **extra)
    batch = make_batch(seed=2)
    count = torch.tensor(num_items(batch) + 5)  # as if other micro-batches held 5 more labelled tokens

    loss = hf.distillation_loss(student, teacher, batch, loss_fn, num_items_in_batch=count)
    loss.backward()
    fused = grads_of(student)
    student.zero_grad()
    ref = unfused_loss(student, teacher, batch, loss_fn, count.double())
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=1e-7)
    assert_grads_close(grads_of(student), fused, rtol=1e-4)


def test_head_transform_reads_the_configs():
    assert hf.head_transform(tiny_lm("llama", 16, 1, 0).config) == (None, 1.0)
    assert hf.head_transform(tiny_lm("gemma2-softcap", 16, 1, 0).config) == (4.0, 1.0)
    assert hf.head_transform(tiny_lm("cohere-logit-scale", 16, 1, 0).config) == (None, 0.5)
    assert hf.head_transform(tiny_lm("granite-logits-scaling", 16, 1, 0).config) == (None, 0.25)


def test_distillation_loss_refuses_a_loss_that_ignores_the_softcap():
    student, teacher = tiny_lm("gemma2-softcap", 16, 1, 0), tiny_lm("gemma2-softcap", 24, 1, 1)
    with pytest.raises(ValueError, match=r"softcap=4.0"):
        hf.distillation_loss(student, teacher, make_batch(3), FusedLinearDistillLoss())
    with pytest.raises(ValueError, match="labels"):
        batch = make_batch(3)
        del batch["labels"]
        hf.distillation_loss(student, teacher, batch, FusedLinearDistillLoss(softcap=4.0))


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def one_sgd_step(tmp_path, batch_size, accumulation, data, accepts_loss_kwargs=True, teacher=None, distill_loss=None,
                 **args):
    """The student's weights after one SGD step (lr 1) of FusedDistillationTrainer on ``data``."""
    student = tiny_lm("llama", hidden=16, layers=1, seed=0)
    teacher = tiny_lm("llama", hidden=24, layers=1, seed=1) if teacher is None else teacher
    training_args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0,
        disable_tqdm=True, **args)
    if distill_loss is None:
        distill_loss = FusedLinearDistillLoss(0.5, 1.0, 0.0, chunk_size=5, loss="wttm")
    trainer = hf.FusedDistillationTrainer(model=student, teacher_model=teacher, args=training_args,
                                          train_dataset=ListDataset(data), distill_loss=distill_loss)
    trainer.model_accepts_loss_kwargs = accepts_loss_kwargs
    trainer.train()
    return {name: p.detach().clone() for name, p in student.named_parameters()}, trainer


def assert_same_step(expected, out):
    start = {name: p.detach() for name, p in tiny_lm("llama", 16, 1, seed=0).named_parameters()}
    assert expected.keys() == out.keys()
    for name in expected:
        step_expected, step_out = expected[name] - start[name], out[name] - start[name]
        assert step_expected.abs().max() > 0, name
        torch.testing.assert_close(step_out, step_expected, rtol=1e-4, atol=1e-6, msg=name)


UNEVEN = dict(seed=4, rows=4, pad=(0, 2, 5, 9))  # 4 sequences, unevenly padded


def test_trainer_gradient_accumulation_equals_the_full_batch(tmp_path):
    """4 micro-batches of uneven padding, accumulated, take the SGD step of the one batch of 4."""
    data = make_batch(**UNEVEN)
    full, _ = one_sgd_step(tmp_path / "full", batch_size=4, accumulation=1, data=data)
    accumulated, _ = one_sgd_step(tmp_path / "accumulated", batch_size=1, accumulation=4, data=data)
    assert_same_step(full, accumulated)
    # The check has teeth: without num_items_in_batch (a mean per micro-batch, averaged over the
    # micro-batches) the unevenly padded step differs.
    averaged, _ = one_sgd_step(tmp_path / "averaged", batch_size=1, accumulation=4, data=data,
                               accepts_loss_kwargs=False)
    start = tiny_lm("llama", 16, 1, seed=0).state_dict()
    weight = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(averaged[weight] - start[weight], full[weight] - start[weight], rtol=1e-2)


def test_trainer_ddp_two_processes_equals_one(tmp_path):
    """DDP, 2 CPU processes (gloo), 2 micro-batches each: the count of all ranks' tokens, the loss multiplied
    by the world size and DDP's gradient averaging take the single-process step on the same 4 sequences, and
    the logged loss and components (gathered over the ranks) are the single process's. Evaluated on 3 sequences
    in batches of 2, the components are gathered as eval_loss is (the sample repeated to fill rank 1's batch
    dropped), so that their soft and hard terms add up to it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.abspath(__file__), str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    single, trainer = one_sgd_step(tmp_path / "single", batch_size=4, accumulation=1, data=make_batch(**UNEVEN),
                                   logging_steps=1)
    assert_same_step(single, torch.load(tmp_path / "ddp.pt"))
    with open(tmp_path / "ddp_log.json") as f:
        ddp_log = json.load(f)
    expected = {k: v for k, v in trainer.state.log_history[0].items() if k == "loss" or k.startswith("distill/")}
    assert len(expected) == 1 + len(hf.METRICS)
    assert_metrics(ddp_log["train"], expected, rel=1e-5)
    evaluated = ddp_log["eval"]
    assert evaluated["eval_distill/soft_loss"] + evaluated["eval_distill/hard_loss"] == pytest.approx(
        evaluated["eval_loss"], rel=1e-6)


def test_trainer_bf16_and_evaluate(tmp_path):
    """bf16 autocast: the heads run in bf16 as nn.Linear would, and the loss is within bf16 rounding of the
    unfused one under the same autocast; evaluation reports the distillation loss."""
    data = make_batch(seed=5, rows=4, pad=(0, 1, 4, 6))
    _, trainer = one_sgd_step(tmp_path, batch_size=2, accumulation=2, data=data, bf16=True)
    batch = make_batch(seed=6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = hf.distillation_loss(trainer.model, trainer.teacher_model, batch, trainer.distill_loss)
        ref = unfused_loss(trainer.model, trainer.teacher_model, batch, trainer.distill_loss, num_items(batch))
    torch.testing.assert_close(fused.double(), ref, rtol=2e-2, atol=0.0)
    metrics = trainer.evaluate(ListDataset(batch))
    with torch.no_grad():
        expected = hf.distillation_loss(trainer.model, trainer.teacher_model, batch, trainer.distill_loss)
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-2)


def test_readme_trainer_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(readme_block("### Hugging Face `Trainer`"), "README.md", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 2


def word_tokenizer(first_word=0):
    """A whitespace tokenizer over VOCAB words (w<first_word>, ...), the last two being padding and end of
    sequence."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i + first_word}": i for i in range(VOCAB - 2)}
    vocab.update({"<pad>": VOCAB - 2, "<eos>": VOCAB - 1})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def test_trl_sft_trainer_with_the_mixin(tmp_path):
    """The README's TRL lines: FusedDistillationMixin on trl.SFTTrainer distils through TRL's own data pipeline
    (tokenising, EOS, padding, labels), and its loss is the unfused one on the batch TRL collates."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")

    class DistillSFTTrainer(hf.FusedDistillationMixin, trl.SFTTrainer):
        pass

    gen = torch.Generator().manual_seed(7)
    texts = [" ".join(f"w{j}" for j in torch.randint(0, VOCAB - 2, (n,), generator=gen).tolist()) for n in (5, 9, 3, 7)]
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         max_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                         max_length=32, logging_steps=1)
    trainer = DistillSFTTrainer(model=tiny_lm("llama", 16, 1, 0), teacher_model=tiny_lm("llama", 24, 1, 1),
                                args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                                processing_class=word_tokenizer(),
                                distill_loss=FusedLinearDistillLoss(0.5, 1.0, 0.0, chunk_size=None, loss="wttm"))
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any(), "the batch should hold padding"
    count = num_items(batch)
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(count))
    with torch.no_grad():
        ref = unfused_loss(trainer.model, trainer.teacher_model, batch, trainer.distill_loss, count)
    torch.testing.assert_close(loss.detach().double(), ref, rtol=2e-5, atol=1e-7)
    trainer.train()
    assert trainer.state.global_step == 1
    assert {"loss", "distill/kl", "distill/weight"} <= trainer.state.log_history[0].keys()


def test_new_names_and_their_aliases():
    """The classes' names do not clash with TRL's DistillationTrainer; the first names are the same objects."""
    assert hf.DistillationTrainer is hf.FusedDistillationTrainer
    assert hf.DistillationMixin is hf.FusedDistillationMixin
    assert {"FusedDistillationTrainer", "FusedDistillationMixin", "DistillationTrainer", "DistillationMixin"} <= set(
        hf.__all__)


class StudentAtEachStep(transformers.TrainerCallback):
    """The student's weights at the start of every optimizer step."""

    def __init__(self):
        self.states = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.states.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def train_and_log(tmp_path, loss_fn, data, logging_steps):
    """Two SGD steps of 4 sequences in micro-batches of 2, logged every ``logging_steps``."""
    student, teacher = tiny_lm("llama", 16, 1, seed=0), tiny_lm("llama", 24, 1, seed=1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=2,
        gradient_accumulation_steps=2, max_steps=2, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant",
        max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        logging_steps=logging_steps)
    steps = StudentAtEachStep()
    trainer = hf.FusedDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                          train_dataset=ListDataset(data), distill_loss=loss_fn, callbacks=[steps])
    trainer.train()
    return trainer, steps.states


@pytest.mark.parametrize("loss_fn", [FusedLinearDistillLoss(0.5, 2.0, 0.0, chunk_size=None, loss="wttm", gamma=0.3),
                                     FusedLinearDistillLoss(0.3, 0.7, 0.0, temperature=2.0, chunk_size=5),
                                     FusedLinearDistillLoss(0.3, 0.7, 0.5, temperature=2.0, chunk_size=5)],
                         ids=["wttm", "kd", "liger-jsd"])
def test_trainer_logs_the_loss_components_of_each_step_and_evaluation(tmp_path, loss_fn):
    """Logged every step, the loss and its components (soft and hard terms, KL, CE, WTTM weight) are the token
    means of the reference on the step's 4 unevenly padded sequences (2 micro-batches) with the step's student;
    logged every 2 steps, their means. Evaluation reports them as eval_loss: the mean of its batches' means."""
    data = make_batch(**UNEVEN)
    trainer, states = train_and_log(tmp_path / "every-step", loss_fn, data, logging_steps=1)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == len(states) == 2
    teacher = trainer.teacher_model
    expected = []
    for state, logged in zip(states, logs):
        student = tiny_lm("llama", 16, 1, seed=0)
        student.load_state_dict(state)
        expected.append(expected_metrics(student, teacher, data, loss_fn))
        assert_metrics(logged, expected[-1], rel=2e-5)
        assert logged["distill/soft_loss"] + logged["distill/hard_loss"] == pytest.approx(logged["loss"], rel=1e-6)
    assert expected[0]["distill/kl"] != pytest.approx(expected[1]["distill/kl"], rel=1e-3)  # the steps differ

    trainer, _ = train_and_log(tmp_path / "every-2-steps", loss_fn, data, logging_steps=2)
    logged, = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert_metrics(logged, {k: (expected[0][k] + expected[1][k]) / 2 for k in expected[0]}, rel=2e-5)

    metrics = trainer.evaluate(ListDataset(data))
    halves = [expected_metrics(trainer.model, teacher, {k: v[rows] for k, v in data.items()}, loss_fn, "eval_")
              for rows in (slice(0, 2), slice(2, 4))]
    assert_metrics(metrics, {k: (halves[0][k] + halves[1][k]) / 2 for k in halves[0]}, rel=2e-5)
    assert trainer.state.log_history[-1]["eval_distill/kl"] == metrics["eval_distill/kl"]
    test_metrics = trainer.evaluate(ListDataset(data), metric_key_prefix="test")
    assert test_metrics["test_distill/ce"] == pytest.approx(metrics["eval_distill/ce"], rel=1e-6)


def test_trainer_accepts_a_loss_that_returns_soft_and_hard(tmp_path):
    """return_soft_hard_loss=True, once refused, trains and logs exactly as False does."""
    data = make_batch(**UNEVEN)
    logs = []
    for flag in (False, True):
        loss_fn = FusedLinearDistillLoss(0.5, 1.0, 0.0, chunk_size=5, return_soft_hard_loss=flag, loss="wttm")
        weights, trainer = one_sgd_step(tmp_path / str(flag), batch_size=2, accumulation=2, data=data,
                                        distill_loss=loss_fn, logging_steps=1)
        logs.append(trainer.state.log_history[0])
    assert_same_step(weights, one_sgd_step(tmp_path / "ref", batch_size=2, accumulation=2, data=data)[0])
    assert {k: v for k, v in logs[0].items() if k != "train_runtime"} == {
        k: v for k, v in logs[1].items() if k != "train_runtime"}
    assert logs[1]["distill/hard_loss"] > 0 and logs[1]["distill/soft_loss"] > 0


def test_logged_components_follow_the_loss_without_a_token_count(tmp_path):
    """Without num_items_in_batch the Trainer divides the logged loss by the accumulation steps; the logged
    components are divided as well, so that the soft and hard terms still add up to it."""
    _, trainer = one_sgd_step(tmp_path, batch_size=2, accumulation=2, data=make_batch(**UNEVEN),
                              accepts_loss_kwargs=False, logging_steps=1)
    logged = trainer.state.log_history[0]
    assert logged["distill/soft_loss"] + logged["distill/hard_loss"] == pytest.approx(logged["loss"], rel=1e-6)


def trainer_args(tmp_path):
    return transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True)


def test_teacher_model_from_a_local_folder(tmp_path):
    """A teacher given as a folder (str or Path) is loaded in the student's dtype, frozen, in eval mode, and
    takes the same step as the same teacher given as a model."""
    teacher = tiny_lm("llama", 24, 1, seed=1)
    teacher.save_pretrained(tmp_path / "teacher")
    data = make_batch(**UNEVEN)
    expected, _ = one_sgd_step(tmp_path / "object", batch_size=4, accumulation=1, data=data, teacher=teacher)
    for path in (str(tmp_path / "teacher"), tmp_path / "teacher"):
        weights, trainer = one_sgd_step(tmp_path / "path", batch_size=4, accumulation=1, data=data, teacher=path)
        assert_same_step(expected, weights)
        assert not trainer.teacher_model.training
        assert not any(p.requires_grad for p in trainer.teacher_model.parameters())
    bf16 = hf.FusedDistillationTrainer(model=tiny_lm("llama", 16, 1, seed=0).to(torch.bfloat16),
                                       teacher_model=tmp_path / "teacher", args=trainer_args(tmp_path / "bf16"))
    assert {p.dtype for p in bf16.teacher_model.parameters()} == {torch.bfloat16}
    assert {p.device for p in bf16.teacher_model.parameters()} == {bf16.args.device}


def test_teacher_model_path_that_holds_no_model_is_refused(tmp_path):
    student = tiny_lm("llama", 16, 1, seed=0)
    with pytest.raises(FileNotFoundError, match="teacher_model=.*missing"):
        hf.FusedDistillationTrainer(model=student, teacher_model=str(tmp_path / "missing"), args=trainer_args(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="teacher_model=.*empty.*config.json"):
        hf.FusedDistillationTrainer(model=student, teacher_model=tmp_path / "empty", args=trainer_args(tmp_path))
    tiny_lm("llama", 24, 1, seed=1).config.save_pretrained(tmp_path / "no-weights")
    with pytest.raises(ValueError, match="teacher_model=.*no-weights.*no causal LM"):
        hf.FusedDistillationTrainer(model=student, teacher_model=tmp_path / "no-weights", args=trainer_args(tmp_path))


def test_vocabulary_mismatch_is_refused_at_construction(tmp_path):
    """A teacher head of 100 tokens against the student's 96: a ValueError at construction naming both and
    vocab_mismatch="truncate_teacher", with which the trainer is built and trains."""
    teacher = tiny_lm("llama", 24, 1, seed=1, vocab=VOCAB + 4)
    with pytest.raises(ValueError, match=r"96 tokens and the teacher's of 100.*vocab_mismatch=\"truncate_teacher\""):
        hf.FusedDistillationTrainer(model=tiny_lm("llama", 16, 1, seed=0), teacher_model=teacher,
                                    args=trainer_args(tmp_path))
    _, trainer = one_sgd_step(tmp_path, batch_size=4, accumulation=1, data=make_batch(**UNEVEN), teacher=teacher,
                              distill_loss=FusedLinearDistillLoss(0.0, 1.0, 0.0, loss="wttm",
                                                                  vocab_mismatch="truncate_teacher"))
    assert trainer.state.global_step == 1


def test_teacher_folder_with_another_tokenizer_is_refused(tmp_path):
    """A teacher folder's tokenizer must give the tokens the Trainer's processing_class knows the same ids."""
    tiny_lm("llama", 24, 1, seed=1).save_pretrained(tmp_path / "teacher")
    word_tokenizer().save_pretrained(tmp_path / "teacher")
    student = tiny_lm("llama", 16, 1, seed=0)
    trainer = hf.FusedDistillationTrainer(model=student, teacher_model=tmp_path / "teacher",
                                          args=trainer_args(tmp_path), processing_class=word_tokenizer())
    assert trainer.teacher_model.config.vocab_size == VOCAB
    word_tokenizer(first_word=1).save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match=r"teacher_model=.*tokenizer gives \d+ tokens other ids"):
        hf.FusedDistillationTrainer(model=student, teacher_model=tmp_path / "teacher", args=trainer_args(tmp_path),
                                    processing_class=word_tokenizer())


if __name__ == "__main__":  # one rank of test_trainer_ddp_two_processes_equals_one, under torchrun
    out = sys.argv[1]
    weights, trainer = one_sgd_step(out, batch_size=1, accumulation=2, data=make_batch(**UNEVEN), ddp_backend="gloo",
                                    logging_steps=1, per_device_eval_batch_size=2)
    assert trainer.accelerator.num_processes == 2
    evaluated = trainer.evaluate(ListDataset(make_batch(seed=8, rows=3)))
    if trainer.is_world_process_zero():
        torch.save(weights, os.path.join(out, "ddp.pt"))
        with open(os.path.join(out, "ddp_log.json"), "w") as f:
            json.dump({"train": trainer.state.log_history[0], "eval": evaluated}, f)
