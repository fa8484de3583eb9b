"""Hugging Face ``transformers``: distil a causal LM from a teacher with the fused linear loss.

``DistillationTrainer`` is a ``transformers.Trainer`` that trains ``model`` to match ``teacher_model`` (WTTM
by default, any ``FusedLinearDistillLoss``). Both models run to their last hidden states; the fused loss
applies the LM heads a chunk at a time, so neither model's (tokens, V) logits are ever computed::

    from ttm_kernels import FusedLinearDistillLoss
    from ttm_kernels.integrations.hf import DistillationTrainer

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                                  train_dataset=train, distill_loss=FusedLinearDistillLoss(loss="wttm", gamma=0.2))
    trainer.train()

Batches are those of causal-LM training: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding and
on any token not to learn), shifted here as Hugging Face's causal-LM loss shifts them (a ``shift_labels``
entry, as padding-free collators give, is used as is). Gradient accumulation is exact: the loss is divided by
the Trainer's ``num_items_in_batch`` (the labelled tokens of all micro-batches, and of all ranks with
``average_tokens_across_devices``), and multiplied by the number of processes under DDP as the Trainer does
for its own losses, so accumulated micro-batches give the gradient of the one big batch. Mixed precision
(``bf16=True``) applies to the heads as autocast applies it to ``nn.Linear``. Evaluation reports the
distillation loss as ``eval_loss``.

``DistillationMixin`` brings the same ``compute_loss`` to another Trainer subclass, e.g. TRL's::

    class DistillSFTTrainer(DistillationMixin, trl.SFTTrainer):
        pass

Needs ``transformers`` (``pip install "ttm-kernels[hf]"``).
"""
from __future__ import annotations

from typing import Optional

import torch

try:
    import transformers
    from accelerate.utils import extract_model_from_parallel
except ImportError as exc:  # pragma: no cover  (the message is the point)
    raise ImportError(f"ttm_kernels.integrations.hf needs transformers and accelerate ({exc}); "
                      'pip install "ttm-kernels[hf]"') from exc

from ..distill import FusedLinearDistillLoss

__all__ = ["DistillationMixin", "DistillationTrainer", "distillation_loss", "head_transform", "last_hidden_states"]

LABEL_KEYS = ("labels", "shift_labels")


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


def distillation_loss(model, teacher_model, inputs: dict, loss_fn: FusedLinearDistillLoss,
                      num_items_in_batch=None):
    """``loss_fn`` on one batch of causal-LM ``inputs`` (``input_ids``, ``labels``, ...): the student's hidden
    states with grad, the teacher's under ``torch.no_grad()``, labels shifted as the models' own loss does
    (``shift_labels`` used as is), and the heads' weights, biases and post-processing. Returns what
    ``loss_fn`` returns (the loss, or ``(loss, soft, hard)``)."""
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
    with torch.autocast(hidden.device.type, enabled=False):
        return loss_fn(hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), labels.to(hidden.device),
                       bias, None if teacher_bias is None else teacher_bias.detach(),
                       num_items_in_batch=num_items_in_batch)


class DistillationMixin:
    """``compute_loss`` for a ``transformers.Trainer`` subclass: ``distillation_loss`` of ``model`` against
    ``teacher_model``, normalised for gradient accumulation and DDP as the Trainer normalises its own.

    Keyword arguments: ``teacher_model`` (a causal LM with the student's tokenizer; frozen, put in eval mode
    and on the training device) and ``distill_loss`` (default: ``FusedLinearDistillLoss()``, WTTM with
    gamma 0.2, with the models' soft-cap and logit scale). The rest goes to the Trainer."""

    def __init__(self, *args, teacher_model=None, distill_loss: Optional[FusedLinearDistillLoss] = None, **kwargs):
        if teacher_model is None:
            raise ValueError("teacher_model is required: the causal LM to distil from")
        super().__init__(*args, **kwargs)
        if self.args.n_gpu > 1:
            # nn.DataParallel runs replicas of the model, whose backbones the hidden-state hook never sees.
            raise ValueError(f"{type(self).__name__} does not support DataParallel ({self.args.n_gpu} GPUs in "
                             "one process): launch one process per GPU with torchrun (DDP)")
        if distill_loss is None:
            softcap, logit_scale = head_transform(_causal_lm(self.model).config)
            distill_loss = FusedLinearDistillLoss(softcap=softcap, logit_scale=logit_scale)
        if distill_loss.return_soft_hard_loss:
            raise ValueError("the Trainer needs the loss alone: pass a loss with return_soft_hard_loss=False")
        self.distill_loss = distill_loss
        if not getattr(teacher_model, "hf_device_map", None):
            teacher_model = teacher_model.to(self.args.device)
        self.teacher_model = teacher_model.eval().requires_grad_(False)
        # The Trainer then counts num_items_in_batch and does not divide the loss by the accumulation steps:
        # compute_loss divides by the count instead. The count is of the shifted labels (transformers >= 5
        # reads this flag; older versions count labels[:, 0] too, for their own loss as for this one).
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = distillation_loss(model, self.teacher_model, inputs, self.distill_loss, num_items_in_batch)
        if num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices", False):
            # num_items_in_batch counts the tokens of every rank, and DDP averages the ranks' gradients.
            loss = loss * self.accelerator.num_processes
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the distillation loss only (no logits are computed)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


class DistillationTrainer(DistillationMixin, transformers.Trainer):
    """``transformers.Trainer`` distilling ``model`` from ``teacher_model`` through the fused linear loss:
    ``DistillationTrainer(model=student, teacher_model=teacher, args=..., train_dataset=...,
    distill_loss=FusedLinearDistillLoss(...))``. See the module docstring."""
