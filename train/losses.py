"""The training objective: ``total = ce_weight * CE + beta * distillation term``, through ``ttm_kernels``.

kd:   beta * T^2 * KL(softmax(v/T) || softmax(z/T))             (T^2 inside the loss)
ttm:  beta * KL(softmax(gamma v) || softmax(z))
wttm: beta * U * KL(softmax(gamma v) || softmax(z)), U = sum(softmax(v)^gamma); with config key weight_norm=vocab
      U / V^(1-gamma) in place of U (ttm_kernels' weight_norm: a weight in (0, 1] at every vocabulary V)
ce:   CE only, no teacher.
Each term is a batch mean over samples (tokens for language models, whose loss is the fused linear one on
the final hidden states and the LM head: the logits are never materialised).
"""
import torch
import torch.nn.functional as F

import ttm_kernels
from ttm_kernels import (fused_kd_loss, fused_linear_kd_loss, fused_linear_kd_loss_topk, fused_linear_ttm_loss,
                         fused_linear_ttm_loss_topk, fused_linear_wttm_loss, fused_linear_wttm_loss_topk,
                         fused_ttm_loss, fused_wttm_loss)

from .errors import ConfigError

DISTILL_FNS = {"kd": fused_kd_loss, "ttm": fused_ttm_loss, "wttm": fused_wttm_loss}
LINEAR_FNS = {"kd": fused_linear_kd_loss, "ttm": fused_linear_ttm_loss, "wttm": fused_linear_wttm_loss}
LINEAR_TOPK_FNS = {"kd": fused_linear_kd_loss_topk, "ttm": fused_linear_ttm_loss_topk,
                   "wttm": fused_linear_wttm_loss_topk}


class Objective:
    def __init__(self, cfg):
        self.kind = cfg["loss"]
        self.ce_weight = cfg["ce_weight"]
        self.kwargs = {"beta": cfg["beta"], "ce_weight": cfg["ce_weight"], "backend": cfg["loss_backend"]}
        self.vocab_mismatch = cfg["vocab_mismatch"]
        if self.kind == "kd":
            self.kwargs["temperature"] = cfg["temperature"]
        elif self.kind in ("ttm", "wttm"):
            self.kwargs["gamma"] = cfg["gamma"]
        if self.kind == "wttm":  # TTM and KD have no weight to normalise (config.validate refuses the key there)
            self.kwargs["weight_norm"] = cfg.get("weight_norm", "none")

    @property
    def needs_teacher(self) -> bool:
        return self.kind != "ce"

    def backend_on(self, device: torch.device) -> str:
        """The ttm_kernels backend the loss runs with on ``device``; ConfigError if the configured one cannot."""
        try:
            return ttm_kernels.resolve_backend(self.kwargs["backend"], device)
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"loss_backend {self.kwargs['backend']!r} cannot run on {device.type} ({exc}); set "
                              "loss_backend=auto, which picks the fastest backend the device has") from exc

    def __call__(self, student_logits, target, teacher_logits=None):
        """The loss and its detached batch-mean components: ce, and with a teacher kl and kl_weight (the mean
        per-sample KL weight as ttm_kernels reports it: U (or U / V^(1-gamma)) for WTTM, 1 for TTM and KD)."""
        if self.kind == "ce":
            ce = F.cross_entropy(student_logits.float(), target)
            return self.ce_weight * ce, {"ce": ce.detach()}
        loss, parts = DISTILL_FNS[self.kind](student_logits, teacher_logits, target, return_components=True,
                                             **self.kwargs)
        return loss, {"ce": parts.ce, "kl": parts.kl, "kl_weight": parts.weight}


    def linear(self, hidden, head, target, teacher_hidden=None, teacher_head=None, dtype=None):
        """The loss from final hidden states and LM heads (nn.Linear), fused (ttm_kernels.fused_linear_*), as a
        mean over the targets that are not -100, and its detached components as ``__call__`` gives them.
        ``dtype``: the GEMMs' dtype (autocast's), else the head's."""
        dtype = dtype or head.weight.dtype

        def cast(x):
            return None if x is None else x.to(dtype)

        hidden, weight, bias = cast(hidden), cast(head.weight), cast(head.bias)
        # A vocabulary-parallel head (parallel tp, train/parallel.py) holds this rank's rows of the LM heads.
        group = getattr(head, "process_group", None)
        sharded = {} if group is None else {"process_group": group}
        if self.kind == "ce":
            # CE alone through the same fused path (no (tokens, V) logits either): beta 0 drops the distillation
            # term of a constant teacher (width-1 zeros, a broadcast view: no memory and next to no GEMM).
            zero = hidden.new_zeros(())
            loss, parts = fused_linear_wttm_loss(
                hidden, weight, zero.expand(*hidden.shape[:-1], 1), zero.expand(weight.shape[0], 1), target,
                student_bias=bias, beta=0.0, ce_weight=self.ce_weight, backend=self.kwargs["backend"],
                return_components=True, **sharded)
            return loss, {"ce": parts.ce}
        loss, parts = LINEAR_FNS[self.kind](hidden, weight, cast(teacher_hidden), cast(teacher_head.weight), target,
                                            student_bias=bias, teacher_bias=cast(teacher_head.bias),
                                            vocab_mismatch=self.vocab_mismatch, return_components=True,
                                            **self.kwargs, **sharded)
        return loss, {"ce": parts.ce, "kl": parts.kl, "kl_weight": parts.weight}

    def linear_topk(self, hidden, head, target, topk_ids, topk_logprobs, dtype=None, tail="bucket"):
        """``linear`` against a teacher's top-k ids and log-probabilities (a ``teacher_topk`` store) in place of
        its hidden states and head; ``tail`` as ttm_kernels' (config key topk_tail)."""
        dtype = dtype or head.weight.dtype
        loss, parts = LINEAR_TOPK_FNS[self.kind](
            hidden.to(dtype), head.weight.to(dtype), topk_ids, topk_logprobs, target,
            student_bias=None if head.bias is None else head.bias.to(dtype), tail=tail,
            return_components=True, **self.kwargs)
        return loss, {"ce": parts.ce, "kl": parts.kl, "kl_weight": parts.weight}


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list:
    """Number of samples whose target is among the top-k logits, for each k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    hits = top == target[:, None]
    return [hits[:, :k].any(-1).sum() for k in ks]
