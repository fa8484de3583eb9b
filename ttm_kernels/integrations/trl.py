"""TRL: ``trl.DistillationTrainer`` (TRL >= 1.16, on-policy distillation) and GKD's loss on this project's kernels.

``chunked_divergence_loss`` takes the arguments of TRL's ``trl.trainer.distillation_trainer._chunked_divergence_loss``
and returns what it returns, ``(loss, entropy_sum, n_valid)``: the generalised JSD of TRL and Liger (``beta`` 0:
the forward KL(teacher || student), 1: the reverse KL(student || teacher), in between: ``beta * KL(p || m) + (1 -
beta) * KL(q || m)``, ``m = beta * p + (1 - beta) * q``) between the tempered distributions (``temperature``
divides both models' logits, no T^2 factor), each head with its own soft-cap and logit scale, summed over the
completion tokens and divided by ``num_items_in_batch`` (else by those tokens); the student's entropy (at that
temperature) summed over them, and their count. It runs on ``fused_linear_kd_loss``'s chunk loop (or TTM / WTTM,
``loss=``), which never forms either model's (tokens, V) logits::

    from ttm_kernels.integrations import trl as ttm_trl

    with ttm_trl.install():                       # TRL's objective on ttm_kernels
        trainer = trl.DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data)
        trainer.train()

``install(loss="wttm", gamma=0.2)`` trains the student with WTTM (``loss="ttm"``: TTM) in place of the tempered
divergence: the teacher's distribution is ``softmax(gamma * v)`` (the paper's power transform), the student's
untempered, ``beta`` still picks the divergence, WTTM multiplies each token's divergence by its weight ``U``; the
trainer's ``temperature`` must then be 1 (it also sets the sampling temperature of the student's generations).
A top-k teacher store has no use there: the trainer is on-policy, the completions exist only once the student
generated them. For stored teachers (off-policy), see ``ttm_kernels.fused_linear_*_loss_topk`` and
``ttm_kernels.integrations.hf.FusedDistillationTrainer``.

Differences from TRL's own function, all of precision or of what is refused: the logits are computed in the
heads' dtype (TRL projects in fp32; the same numbers for fp32 models), the loss is float32 for any input
dtype; an empty ``num_items_in_batch`` (0) is refused instead of dividing by it. DTensor LM heads (FSDP2) are
gathered as TRL gathers them (``full_tensor()``, the weight cast to the hidden states' dtype).

``generalized_jsd_loss`` has the arguments and the numbers of ``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss``
on (tokens, V) logits, every reduction but ``"none"`` (which returns per-vocabulary-entry terms that the fused
kernels never form); ``GKDTrainer`` takes it as ``generalized_jsd_loss = staticmethod(ttm_trl.generalized_jsd_loss)``
in a subclass.

Needs no TRL except for ``install``.
"""
from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch

from .. import spec as specs
from ..functional import DenseLogits, is_dtensor, logits_loss
from ..linear import _fused_linear_loss
from ..spec import DEFAULT_GAMMA, LossSpec

__all__ = ["chunked_divergence_loss", "generalized_jsd_loss", "install", "Installed", "LOSSES"]

LOSSES = ("kd", "ttm", "wttm")
# Where TRL's DistillationTrainer finds its loss: a module global, looked up at each call.
TRL_MODULE = "trl.trainer.distillation_trainer"
TRL_FUNCTION = "_chunked_divergence_loss"
GKD_REDUCTIONS = ("batchmean", "sum", "mean")
GKD_IGNORE_INDEX = -100  # GKD masks the tokens whose label is -100, whatever the collator's ignore_index


def _loss_spec(loss: str, gamma: float, beta: float, temperature: float, **heads) -> LossSpec:
    """The spec of TRL's divergence (``loss="kd"``: both models tempered, no T^2) or of TTM / WTTM, with the
    divergence ``beta`` picks and no cross-entropy."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    options = dict(ce_weight=0.0, jsd_beta=beta, **heads)
    if loss == "kd":
        return specs.kd(temperature, t_squared=False, **options)
    temperature = specs.check_finite("temperature", temperature, positive=True)
    if temperature != 1.0:
        raise ValueError(f"temperature={temperature}: TTM and WTTM have no student temperature, their teacher "
                         f"transform is gamma (= 1/T); set the trainer's temperature to 1 and pass gamma (e.g. "
                         f"gamma={1.0 / temperature:g} for T={temperature:g}) to install()")
    return specs.from_scales(loss, gamma, **options)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype a head computes in, as TRL's: the autocast dtype when autocast is on, else the hidden states'."""
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


def _head(hidden, weight, bias):
    """(hidden, weight, bias) in the head's compute dtype; a DTensor head (FSDP2) gathered as TRL gathers it. The
    casts are differentiable: gradients reach the weights in their own dtype."""
    if is_dtensor(weight):
        weight = weight.full_tensor().to(hidden.dtype)
    if is_dtensor(bias):
        bias = bias.full_tensor()
    dtype = _compute_dtype(hidden)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def chunked_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    *,
    loss: str = "kd",
    gamma: float = DEFAULT_GAMMA,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's ``_chunked_divergence_loss`` on the fused linear loss (see the module docstring).

    Args:
        student_hidden_states, teacher_hidden_states: (B, K, H_s) and (B, K, H_t) last hidden states at the
            completion tokens (any leading shape, the same for both).
        student_lm_head_weight, teacher_lm_head_weight: (V, H_s) and (V, H_t) LM heads (DTensors gathered);
            ``student_lm_head_bias``, ``teacher_lm_head_bias``: optional (V,).
        completion_mask: the leading shape; a token counts where it is not 0.
        beta: the divergence: 0 forward KL, 1 reverse KL, else the generalised JSD.
        num_items_in_batch: the divisor of the summed divergence (a positive number or one-element tensor); None:
            the tokens that count (at least 1).
        student_logit_scale, teacher_logit_scale, student_final_logit_softcapping,
            teacher_final_logit_softcapping: each head's post-processing, ``softcap * tanh(scale * x / softcap)``.
        temperature: divides both models' post-processed logits (``loss="kd"``; must be 1 for TTM / WTTM).
        loss: ``"kd"`` (TRL's objective), ``"ttm"`` or ``"wttm"``; ``gamma``: their teacher exponent.
        chunk_size, backend: as ``fused_linear_kd_loss``'s.

    Returns:
        ``(loss, entropy_sum, n_valid)``: the float32 loss (gradients reach the student's hidden states, weight
        and bias), the detached sum of the student's per-token entropy (nats) over the tokens that count, and
        their number (an int64 tensor); over this process's batch, as TRL's.
    """
    if not isinstance(completion_mask, torch.Tensor):
        raise TypeError(f"completion_mask must be a torch.Tensor, got {type(completion_mask).__name__}")
    for name, hidden in (("student_hidden_states", student_hidden_states),
                         ("teacher_hidden_states", teacher_hidden_states)):
        if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1 or hidden.shape[:-1] != completion_mask.shape:
            shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise ValueError(f"{name} must have shape (*completion_mask.shape, H) = "
                             f"({', '.join(map(str, completion_mask.shape))}, H), got {shape}")
    spec = _loss_spec(loss, gamma, beta, temperature, softcap=student_final_logit_softcapping,
                      logit_scale=student_logit_scale, teacher_softcap=teacher_final_logit_softcapping,
                      teacher_logit_scale=teacher_logit_scale)
    student = _head(student_hidden_states, student_lm_head_weight, student_lm_head_bias)
    teacher = _head(teacher_hidden_states, teacher_lm_head_weight, teacher_lm_head_bias)
    # Only the tokens that count are projected (TRL's Triton path does the same; its CPU path projects every
    # token and zeroes the masked ones' terms, which gives these numbers).
    valid = completion_mask.reshape(-1).to(student[0].device) != 0
    n_valid = valid.sum()
    student_hidden = student[0].reshape(-1, student[0].shape[-1])[valid]
    teacher_hidden = teacher[0].reshape(-1, teacher[0].shape[-1])[valid]
    value, parts = _fused_linear_loss(
        student_hidden, student[1], teacher_hidden, teacher[1], None, spec, student_bias=student[2],
        teacher_bias=teacher[2], reduction="mean", chunk_size=chunk_size, vocab_mismatch="error", backend=backend,
        return_components=True, num_items_in_batch=num_items_in_batch)
    # The components are means over the tokens that count; TRL returns the entropy's sum over them.
    entropy_sum = parts.entropy * n_valid
    return value, entropy_sum, n_valid


def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         labels: Optional[torch.Tensor] = None, beta: float = 0.5, temperature: float = 1.0,
                         reduction: str = "batchmean", num_items_in_batch=None) -> torch.Tensor:
    """TRL GKD's ``generalized_jsd_loss`` on the fused logits loss: the generalised JSD (``beta`` as in
    ``chunked_divergence_loss``) of ``softmax(teacher_logits / temperature)`` and ``softmax(student_logits /
    temperature)`` per token, without T^2, summed over the tokens whose label is not -100 (all without
    ``labels``) and reduced as GKD reduces it: divided by ``num_items_in_batch`` when given, else
    ``"batchmean"``: by the tokens that count (at least 1), or without labels by ``student_logits.shape[0]``;
    ``"sum"``: not divided; ``"mean"``: by the count of (token, vocabulary entry) terms, as ``jsd.mean()``.
    ``"none"`` (GKD's per-entry terms) is refused: the kernels sum each row's terms in one pass.

    The float32 loss (float64 for float64 logits) for any logits dtype; gradients reach ``student_logits``.
    """
    if reduction not in GKD_REDUCTIONS:
        raise ValueError(f"reduction must be one of {GKD_REDUCTIONS} (with num_items_in_batch, which replaces it: "
                         f"any of them), got {reduction!r}; GKD's per-(token, vocabulary entry) terms are not "
                         "formed by the fused loss")
    spec = specs.kd(temperature, t_squared=False, ce_weight=0.0, jsd_beta=beta)
    rows = logits_loss(student_logits, DenseLogits(teacher_logits), None, spec, reduction="none", backend="auto",
                       inplace_backward=False, return_components=False, num_items_in_batch=None)
    if labels is None:
        total = rows.sum()
        count = rows.numel()
        rows_of_batch = max(student_logits.shape[0], 1)
    else:
        if not isinstance(labels, torch.Tensor) or labels.shape != rows.shape:
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must have the logits' leading shape {tuple(rows.shape)}, got {shape}")
        counted = labels.to(rows.device) != GKD_IGNORE_INDEX
        total = torch.where(counted, rows, 0).sum()
        count = counted.sum()
        rows_of_batch = count.clamp_min(1)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "batchmean":
        return total / rows_of_batch
    if reduction == "sum":
        return total
    return total / (count * student_logits.shape[-1])


class Installed:
    """What ``install`` did; ``uninstall()``, or the end of a ``with`` block, gives TRL its own function back."""

    def __init__(self, module, previous, installed):
        self.module, self.previous, self.installed = module, previous, installed

    def uninstall(self) -> None:
        current = getattr(self.module, TRL_FUNCTION)
        if current is self.previous:
            return  # already uninstalled
        if current is not self.installed:
            raise RuntimeError(f"{TRL_MODULE}.{TRL_FUNCTION} was replaced again after this install(); uninstall "
                               "the later installation first")
        setattr(self.module, TRL_FUNCTION, self.previous)

    def __enter__(self) -> "Installed":
        return self

    def __exit__(self, *exc_info) -> None:
        self.uninstall()


def install(loss: str = "kd", gamma: float = DEFAULT_GAMMA, *, chunk_size: Optional[int] = None,
            backend: str = "auto") -> Installed:
    """Make ``trl.DistillationTrainer`` compute its loss with ``chunked_divergence_loss`` (every trainer of this
    process, until ``uninstall()``): TRL's objective for ``loss="kd"`` (default), TTM or WTTM with ``gamma`` for
    ``loss="ttm"`` / ``"wttm"`` (the trainer's ``temperature`` must be 1). ``chunk_size`` and ``backend`` as
    ``fused_linear_kd_loss``'s. Returns an ``Installed``, also a context manager."""
    _loss_spec(loss, gamma, 0.0, 1.0)  # refuse a bad configuration now, not at the first training step
    try:
        module = importlib.import_module(TRL_MODULE)
    except ImportError as exc:
        raise ImportError(f"ttm_kernels.integrations.trl.install needs TRL >= 1.16 ({exc}); pip install trl") from exc
    previous = getattr(module, TRL_FUNCTION, None)
    if previous is None:
        raise ImportError(f"{TRL_MODULE} has no {TRL_FUNCTION}: this TRL computes its DistillationTrainer's loss "
                          "another way (TRL 1.16's is the one this integration replaces)")
    installed = functools.partial(chunked_divergence_loss, loss=loss, gamma=gamma, chunk_size=chunk_size,
                                  backend=backend)
    setattr(module, TRL_FUNCTION, installed)
    return Installed(module, previous, installed)
