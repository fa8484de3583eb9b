"""Hugging Face ``transformers``: distil a causal LM from a teacher with the fused linear loss.

``FusedDistillationTrainer`` is a ``transformers.Trainer`` that trains ``model`` to match ``teacher_model`` (WTTM
by default, any ``FusedLinearDistillLoss``). Both models run to their last hidden states; the fused loss
applies the LM heads a chunk at a time, so neither model's (tokens, V) logits are ever computed::

    from ttm_kernels import FusedLinearDistillLoss
    from ttm_kernels.integrations.hf import FusedDistillationTrainer

    trainer = FusedDistillationTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                                       train_dataset=train,
                                       distill_loss=FusedLinearDistillLoss(0.0, 1.0, 0.0, loss="wttm", gamma=0.2))
    trainer.train()

It is not TRL's ``DistillationTrainer`` (on-policy generation, a JSD loss): the names ``DistillationTrainer`` and
``DistillationMixin`` that this module used first remain as aliases of the same classes.

``teacher_model`` is a model or the path of a local model folder (``str`` or ``os.PathLike``), loaded with
``AutoModelForCausalLM.from_pretrained(path, local_files_only=True)`` in the student's dtype. At construction
the LM heads' vocabulary sizes are compared (a mismatch needs ``vocab_mismatch="truncate_teacher"``), as are
their soft-cap and logit scale, and, for a teacher folder holding a tokenizer, its token ids against the
Trainer's ``processing_class``.

Batches are those of causal-LM training: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding and
on any token not to learn), shifted here as Hugging Face's causal-LM loss shifts them (a ``shift_labels``
entry, as padding-free collators give, is used as is). Gradient accumulation is exact: the loss is divided by
the Trainer's ``num_items_in_batch`` (the labelled tokens of all micro-batches, and of all ranks with
``average_tokens_across_devices``), and multiplied by the number of processes under DDP as the Trainer does
for its own losses, so accumulated micro-batches give the gradient of the one big batch. Mixed precision
(``bf16=True``) applies to the heads as autocast applies it to ``nn.Linear``. Evaluation reports the
distillation loss as ``eval_loss``.

Every training log adds the loss's components (``METRICS``) to ``loss``, averaged as the Trainer averages
``loss`` (token means over each optimizer step's micro-batches and ranks, then the mean over the steps since the
last log): ``distill/soft_loss`` (``weight_soft_loss`` times the distillation term) and ``distill/hard_loss``
(``weight_hard_loss`` times the CE), which add up to ``loss``; ``distill/kl`` (the KL of the transformed
teacher and the student, tempered for KD), ``distill/ce`` (the CE of the untempered student, whatever its
weight), ``distill/weight`` (the mean WTTM weight U; 1 for TTM and KD) and ``distill/entropy`` (the student's
entropy, of its tempered distribution for KD, as TRL logs it). Evaluation reports them averaged as ``eval_loss``,
with its prefix: ``eval_distill/kl``, ... They all come from the loss's own pass over the logits.

``FusedDistillationMixin`` brings the same ``compute_loss`` and logging to another Trainer subclass, e.g. TRL's::

    class DistillSFTTrainer(FusedDistillationMixin, trl.SFTTrainer):
        pass

Needs ``transformers`` (``pip install "ttm-kernels[hf]"``).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

try:
    import transformers
    from accelerate.utils import extract_model_from_parallel
    from packaging import version
except ImportError as exc:  # pragma: no cover  (the message is the point)
    raise ImportError(f"ttm_kernels.integrations.hf needs transformers and accelerate ({exc}); "
                      'pip install "ttm-kernels[hf]"') from exc

from ..distill import FusedLinearDistillLoss
from ..functional import LossComponents
from ..linear import fused_linear_kd_loss, fused_linear_ttm_loss, fused_linear_wttm_loss

__all__ = ["FusedDistillationMixin", "FusedDistillationTrainer", "DistillationMixin", "DistillationTrainer",
           "METRICS", "distillation_loss", "head_transform", "last_hidden_states"]

LABEL_KEYS = ("labels", "shift_labels")
# The logged components, in the order of the trainers' per-micro-batch vectors; each is logged as distill/<name>.
METRICS = ("soft_loss", "hard_loss", "kl", "ce", "weight", "entropy")
METRIC_PREFIX = "distill/"
# transformers 4.56 renamed from_pretrained's torch_dtype to dtype (and 5.x warns on the old name).
DTYPE_KWARG = "dtype" if version.parse(transformers.__version__) >= version.parse("4.56") else "torch_dtype"


def head_transform(config) -> tuple:
    """``(softcap, logit_scale)``: how a causal LM's head post-processes its logits, read from its config.

    Soft-cap: ``final_logit_softcapping`` (Gemma 2 and 3). Scale: ``logit_scale`` (Cohere),
    ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1), or ``logits_scaling``, which Granite and
    MiniCPM3 divide by (HyperCLOVA X multiplies). ``(None, 1.0)`` for a plain head."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(config, name, None)
        if scale is not None:
            break
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1.0 / config.logits_scaling
    return (None if softcap is None else float(softcap)), (1.0 if scale is None else float(scale))


def _causal_lm(model):
    """The transformers model inside DDP / DeepSpeed / torch.compile / PEFT wrappers."""
    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def last_hidden_states(model, inputs: dict) -> torch.Tensor:
    """The (B, T, H) last hidden states (after the final norm) of a causal LM on ``inputs``, without its LM
    head: ``model`` runs as called in training (through any DDP wrapper, so that gradients are synchronised),
    with ``logits_to_keep`` empty, and a hook on its backbone keeps what the head would have read."""
    lm = _causal_lm(model)
    keep_none = torch.empty(0, dtype=torch.long, device=lm.get_output_embeddings().weight.device)
    captured = []
    handle = lm.base_model.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        model(**{**inputs, "logits_to_keep": keep_none, "use_cache": False})
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"{type(lm).__name__}: its backbone ran {len(captured)} times in one forward; "
                           "expected once")
    return captured[0]


def _head_operands(hidden: torch.Tensor, head: torch.nn.Module):
    """(hidden, weight, bias) in the dtype the head computes in: the autocast dtype when autocast is on (as
    for ``nn.Linear``), else the weight's. The casts are differentiable: gradients reach the fp32 weights."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = head.weight.dtype
    bias = getattr(head, "bias", None)
    return hidden.to(dtype), head.weight.to(dtype), None if bias is None else bias.to(dtype)


def _check_head_transform(lm, teacher_lm, loss_fn) -> None:
    student_head, teacher_head = head_transform(lm.config), head_transform(teacher_lm.config)
    if student_head != teacher_head:
        raise ValueError(f"the student's head post-processes its logits as (softcap, logit_scale) = {student_head} "
                         f"and the teacher's as {teacher_head}; the fused loss applies one to both")
    if (loss_fn.softcap, float(loss_fn.logit_scale)) != student_head:
        raise ValueError(f"the models' heads post-process their logits as (softcap, logit_scale) = {student_head}, "
                         f"but the loss has ({loss_fn.softcap}, {loss_fn.logit_scale}): pass "
                         f"FusedLinearDistillLoss(softcap={student_head[0]}, logit_scale={student_head[1]}), "
                         "else the loss would optimise other logits than the models produce")


def _check_vocabularies(lm, teacher_lm, loss_fn) -> None:
    vocab, teacher_vocab = (m.get_output_embeddings().weight.shape[0] for m in (lm, teacher_lm))
    if vocab != teacher_vocab and loss_fn.vocab_mismatch == "error":
        raise ValueError(f"the student's LM head has a vocabulary of {vocab} tokens and the teacher's of "
                         f"{teacher_vocab}: if they share a tokenizer (the heads padded to different sizes), pass "
                         'FusedLinearDistillLoss(vocab_mismatch="truncate_teacher") to align the teacher to the '
                         "student's vocabulary")


def _check_model_folder(path) -> None:
    """A clear error, before the Trainer is built, for a ``teacher_model`` path that holds no model."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"teacher_model={os.fspath(path)!r} is not a folder: pass a model, or the path of "
                                "a local model folder (save_pretrained's); nothing is downloaded")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"teacher_model={os.fspath(path)!r} holds no config.json: not a model folder "
                         "(save_pretrained's)")


def _load_teacher(path, lm):
    """The causal LM saved in the folder ``path``, in the student ``lm``'s dtype."""
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **{DTYPE_KWARG: lm.dtype})
    except (OSError, ValueError) as exc:
        raise ValueError(f"teacher_model={os.fspath(path)!r}: no causal LM could be loaded from this folder "
                         f"({exc})") from exc


def _check_tokenizers(path, processing_class) -> None:
    """A teacher folder's tokenizer against the Trainer's: a token that both know must have one id (either may
    add tokens at the end, which ``vocab_mismatch="truncate_teacher"`` aligns)."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor holds its tokenizer
    files = ("tokenizer.json", "tokenizer_config.json")
    if not hasattr(tokenizer, "get_vocab") or not any(os.path.isfile(os.path.join(path, f)) for f in files):
        return
    vocab = tokenizer.get_vocab()
    teacher_vocab = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True).get_vocab()
    differ = sorted((token for token in vocab.keys() & teacher_vocab.keys() if vocab[token] != teacher_vocab[token]),
                    key=vocab.get)
    if differ:
        token = differ[0]
        raise ValueError(f"teacher_model={os.fspath(path)!r}: its tokenizer gives {len(differ)} tokens other ids "
                         f"than the Trainer's processing_class (e.g. {token!r}: {teacher_vocab[token]} against "
                         f"{vocab[token]}); distillation needs the student's tokenizer")


def _linear_loss_of(loss_fn: FusedLinearDistillLoss):
    """The public ``fused_linear_*_loss`` and keyword arguments computing ``loss_fn``'s loss (of which it is one
    configuration), for the ``LossComponents`` that ``loss_fn``'s own ``forward`` does not return."""
    loss_fn._spec()  # the configuration's own checks, e.g. no temperature with TTM
    kwargs = dict(beta=loss_fn.weight_soft_loss, ce_weight=loss_fn.weight_hard_loss, ignore_index=loss_fn.ignore_index,
                  chunk_size=loss_fn.chunk_size, vocab_mismatch=loss_fn.vocab_mismatch, backend=loss_fn.backend,
                  softcap=loss_fn.softcap, logit_scale=loss_fn.logit_scale, jsd_beta=loss_fn.beta)
    if loss_fn.loss == "kd":
        # Liger's convention: no T^2 factor, which fused_linear_kd_loss has.
        temperature = loss_fn.temperature
        return fused_linear_kd_loss, dict(kwargs, temperature=temperature,
                                          beta=loss_fn.weight_soft_loss / temperature**2)
    loss_call = fused_linear_wttm_loss if loss_fn.loss == "wttm" else fused_linear_ttm_loss
    return loss_call, dict(kwargs, gamma=loss_fn.gamma)


def distillation_loss(model, teacher_model, inputs: dict, loss_fn: FusedLinearDistillLoss,
                      num_items_in_batch=None, return_components: bool = False):
    """``loss_fn`` on one batch of causal-LM ``inputs`` (``input_ids``, ``labels``, ...): the student's hidden
    states with grad, the teacher's under ``torch.no_grad()``, labels shifted as the models' own loss does
    (``shift_labels`` used as is), and the heads' weights, biases and post-processing. Returns what
    ``loss_fn`` returns (the loss, or ``(loss, soft, hard)``).

    ``return_components=True`` returns ``(loss, LossComponents(kl, ce, weight, entropy))`` instead, from the same
    single pass: the loss of ``loss_fn``'s configuration computed by the ``fused_linear_*_loss`` it configures (its
    ``return_soft_hard_loss`` does not apply), and its detached components averaged like the loss (their sums
    over the labelled tokens divided by ``num_items_in_batch``, else their means over this batch's)."""
    if "labels" not in inputs and "shift_labels" not in inputs:
        raise ValueError("distillation needs labels in the batch (the tokens to learn, -100 elsewhere); got keys "
                         f"{sorted(inputs)}")
    lm, teacher_lm = _causal_lm(model), _causal_lm(teacher_model)
    _check_head_transform(lm, teacher_lm, loss_fn)
    model_inputs = {k: v for k, v in inputs.items() if k not in LABEL_KEYS}
    hidden = last_hidden_states(model, model_inputs)
    with torch.no_grad():
        teacher_hidden = last_hidden_states(teacher_model, model_inputs)
    if "shift_labels" in inputs:
        labels = inputs["shift_labels"]
    else:  # position t predicts token t + 1
        hidden, teacher_hidden, labels = hidden[:, :-1], teacher_hidden[:, :-1], inputs["labels"][:, 1:]
    hidden, weight, bias = _head_operands(hidden, lm.get_output_embeddings())
    teacher_hidden, teacher_weight, teacher_bias = _head_operands(teacher_hidden, teacher_lm.get_output_embeddings())
    labels = labels.to(hidden.device)
    teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    with torch.autocast(hidden.device.type, enabled=False):
        if not return_components:
            return loss_fn(hidden, weight, teacher_hidden, teacher_weight, labels, bias, teacher_bias,
                           num_items_in_batch=num_items_in_batch)
        loss_call, kwargs = _linear_loss_of(loss_fn)
        loss, parts = loss_call(hidden, weight, teacher_hidden, teacher_weight, labels, student_bias=bias,
                                teacher_bias=teacher_bias, return_components=True,
                                num_items_in_batch=num_items_in_batch, **kwargs)
    if num_items_in_batch is not None:
        # The parts are means over this batch's labelled tokens; the loss divides its sum by the count instead.
        share = (labels != loss_fn.ignore_index).sum() / num_items_in_batch
        parts = LossComponents(*(x * share for x in parts))
    return loss, parts


class FusedDistillationMixin:
    """``compute_loss`` for a ``transformers.Trainer`` subclass: ``distillation_loss`` of ``model`` against
    ``teacher_model``, normalised for gradient accumulation and DDP as the Trainer normalises its own, with its
    components logged beside ``loss`` (see the module docstring and ``METRICS``).

    Keyword arguments: ``teacher_model`` (a causal LM with the student's tokenizer, or the path of a local folder
    holding one; frozen, put in eval mode and on the training device) and ``distill_loss`` (default:
    ``FusedLinearDistillLoss(0.0, 1.0, 0.0, chunk_size=None, loss="wttm")``, the paper's WTTM with gamma 0.2 and no
    CE term, with the models' soft-cap and logit scale; its ``return_soft_hard_loss`` makes no difference here,
    since the soft and hard terms are logged either way).
    The rest goes to the Trainer."""

    def __init__(self, *args, teacher_model=None, distill_loss: Optional[FusedLinearDistillLoss] = None, **kwargs):
        if teacher_model is None:
            raise ValueError("teacher_model is required: the causal LM to distil from, or a local folder holding it")
        teacher_path = teacher_model if isinstance(teacher_model, (str, os.PathLike)) else None
        if teacher_path is not None:
            _check_model_folder(teacher_path)
        super().__init__(*args, **kwargs)
        if self.args.n_gpu > 1:
            # nn.DataParallel runs replicas of the model, whose backbones the hidden-state hook never sees.
            raise ValueError(f"{type(self).__name__} does not support DataParallel ({self.args.n_gpu} GPUs in "
                             "one process): launch one process per GPU with torchrun (DDP)")
        lm = _causal_lm(self.model)
        if distill_loss is None:
            softcap, logit_scale = head_transform(lm.config)
            distill_loss = FusedLinearDistillLoss(0.0, 1.0, 0.0, chunk_size=None, loss="wttm", softcap=softcap,
                                                  logit_scale=logit_scale)
        self.distill_loss = distill_loss
        if teacher_path is not None:
            _check_tokenizers(teacher_path, self.processing_class)
            teacher_model = _load_teacher(teacher_path, lm)
        # Refused here rather than by the first training step.
        _check_vocabularies(lm, _causal_lm(teacher_model), distill_loss)
        _check_head_transform(lm, _causal_lm(teacher_model), distill_loss)
        if not getattr(teacher_model, "hf_device_map", None):
            teacher_model = teacher_model.to(self.args.device)
        self.teacher_model = teacher_model.eval().requires_grad_(False)
        # The Trainer then counts num_items_in_batch and does not divide the loss by the accumulation steps:
        # compute_loss divides by the count instead. The count is of the shifted labels (transformers >= 5
        # reads this flag; older versions count labels[:, 0] too, for their own loss as for this one).
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        # Per mode, the components' vectors (in METRICS order) not yet logged: apart from TRL's self._metrics,
        # whose entries TRL's log() averages as plain means, not as the Trainer averages the loss.
        self._distill_metrics = {"train": [], "eval": []}
        self._distill_since_step = 0
        self._distill_last = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, parts = distillation_loss(model, self.teacher_model, inputs, self.distill_loss, num_items_in_batch,
                                        return_components=True)
        hard = self.distill_loss.weight_hard_loss * parts.ce
        terms = torch.stack((loss.detach() - hard, hard, parts.kl, parts.ce, parts.weight, parts.entropy))
        if num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices", False):
            # num_items_in_batch counts the tokens of every rank, and DDP averages the ranks' gradients.
            loss = loss * self.accelerator.num_processes
            terms = terms * self.accelerator.num_processes
        self._distill_last = (loss.detach(), terms)
        return (loss, {}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        step_loss = super().training_step(model, inputs, num_items_in_batch)
        loss, terms = self._distill_last
        if not self._distill_metrics["train"]:
            self._distill_since_step = self.state.global_step
        # training_step returns what the Trainer adds to the logged loss: compute_loss's, divided by the
        # accumulation steps when it was not normalised by num_items_in_batch. The components take the same
        # factor, read off the two (a loss of 0, all of its tokens ignored, has components 0).
        self._distill_metrics["train"].append(terms * (step_loss / torch.where(loss == 0, 1.0, loss)))
        return step_loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the distillation loss only (no logits are computed)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        # Gathered as evaluation_loop gathers the loss: repeated eval_batch_size times, so that gather_for_metrics
        # drops the same samples repeated to fill the last batch of every rank.
        terms = self._distill_last[1]
        self._distill_metrics["eval"].append(self.gather_function(terms.repeat(self.args.eval_batch_size, 1)))
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._distill_metrics["eval"].clear()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        # Added to the loop's metrics (rather than by log(), as TRL does) so that evaluate() returns them and
        # they take its metric_key_prefix.
        if self._distill_metrics["eval"]:
            means = torch.cat(self._distill_metrics["eval"]).mean(0).tolist()
            output.metrics.update({f"{metric_key_prefix}_{METRIC_PREFIX}{name}": value
                                   for name, value in zip(METRICS, means)})
            self._distill_metrics["eval"].clear()
        return output

    def train(self, *args, **kwargs):
        self._distill_metrics["train"].clear()  # as the Trainer starts its logged loss from 0
        return super().train(*args, **kwargs)

    def log(self, logs, start_time=None):
        # "loss" marks the Trainer's periodic training log, averaged as here: each rank's sum over the steps since
        # the last log, the mean over the ranks, divided by the steps.
        if "loss" in logs and self._distill_metrics["train"]:
            total = torch.stack(self._distill_metrics["train"]).sum(0)
            total = self.accelerator.gather(total[None]).mean(0)
            steps = self.state.global_step - self._distill_since_step
            logs = {**logs, **{METRIC_PREFIX + name: value / steps for name, value in zip(METRICS, total.tolist())}}
            self._distill_metrics["train"].clear()
        super().log(logs, start_time)


class FusedDistillationTrainer(FusedDistillationMixin, transformers.Trainer):
    """``transformers.Trainer`` distilling ``model`` from ``teacher_model`` through the fused linear loss:
    ``FusedDistillationTrainer(model=student, teacher_model=teacher, args=..., train_dataset=...,
    distill_loss=FusedLinearDistillLoss(...))``. See the module docstring."""


# The first names of the two classes, kept for code written against them (the same objects).
DistillationMixin = FusedDistillationMixin
DistillationTrainer = FusedDistillationTrainer
