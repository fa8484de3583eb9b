"""The training objective: ``total = ce_weight * CE + beta * distillation term``, through ``ttm_kernels``.

kd:   beta * T^2 * KL(softmax(v/T) || softmax(z/T))             (T^2 inside the loss)
ttm:  beta * KL(softmax(gamma v) || softmax(z))
wttm: beta * U * KL(softmax(gamma v) || softmax(z)), U = sum(softmax(v)^gamma)
ce:   CE only, no teacher.
Each term is a batch mean over samples.
"""
import torch
import torch.nn.functional as F

import ttm_kernels
from ttm_kernels import fused_kd_loss, fused_ttm_loss, fused_wttm_loss

DISTILL_FNS = {"kd": fused_kd_loss, "ttm": fused_ttm_loss, "wttm": fused_wttm_loss}


class Objective:
    def __init__(self, cfg):
        self.kind = cfg["loss"]
        self.ce_weight = cfg["ce_weight"]
        self.kwargs = {"beta": cfg["beta"], "ce_weight": cfg["ce_weight"], "backend": cfg["loss_backend"]}
        if self.kind == "kd":
            self.kwargs["temperature"] = cfg["temperature"]
        elif self.kind in ("ttm", "wttm"):
            self.kwargs["gamma"] = cfg["gamma"]

    @property
    def needs_teacher(self) -> bool:
        return self.kind != "ce"

    def backend_on(self, device: torch.device) -> str:
        """The ttm_kernels backend the loss runs with on ``device`` ("auto" resolved as ttm_kernels does)."""
        backend = self.kwargs["backend"]
        if backend != "auto":
            return backend
        if device.type == "cuda" and ttm_kernels.triton_available():
            return "triton"
        if device.type == "cpu" and ttm_kernels.cpu_extension_available():
            return "cpu"
        return "torch"

    def __call__(self, student_logits, target, teacher_logits=None):
        """The loss and its detached batch-mean components: ce, and with a teacher kl and kl_weight (the mean
        per-sample KL weight as ttm_kernels reports it: U for WTTM, 1 for TTM and KD)."""
        if self.kind == "ce":
            ce = F.cross_entropy(student_logits.float(), target)
            return self.ce_weight * ce, {"ce": ce.detach()}
        loss, parts = DISTILL_FNS[self.kind](student_logits, teacher_logits, target, return_components=True,
                                             **self.kwargs)
        return loss, {"ce": parts.ce, "kl": parts.kl, "kl_weight": parts.weight}


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list:
    """Number of samples whose target is among the top-k logits, for each k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    hits = top == target[:, None]
    return [hits[:, :k].any(-1).sum() for k in ks]
