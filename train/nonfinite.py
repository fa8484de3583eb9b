"""Training steps whose loss or gradients are NaN or infinite: flagged on the device, kept out of the model,
reported at the check points, never saved.

Per step, without a host sync: a flag on the device says whether the loss or any gradient is non-finite (one
multi-tensor kernel, the one GradScaler uses). Under DDP the flag is all-reduced (max), a collective that does
not wait for the host: the gradients agree across ranks after DDP's all-reduce but the losses need not, and every
rank must skip the same steps or the replicas drift apart. The optimizer (fused: engine.build_optimizer) reads the
flag as ``found_inf``, GradScaler's mechanism, and leaves the weights and its own state (momentum, Adam moments
and step count) as they were. With on_nonfinite=skip the model's buffers (BatchNorm statistics, which a NaN
batch poisons in the forward pass) are restored as well, from a copy taken before the step.

The host reads the flags every ``log_every`` steps and at the end of each epoch, before anything of the epoch is
evaluated or written; on_nonfinite=error stops the run there, naming the first bad step, and the weights are
checked before every checkpoint (an update can overflow with finite gradients).

amp=fp16: GradScaler owns ``found_inf``: it skips the steps whose scaled gradients overflow, routine for fp16
and not a divergence, and lowers its scale; the flag then covers the loss only, and a non-finite loss is made to
reach the gradients (``backward_loss``) so that GradScaler skips its step too.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .errors import NonFiniteError


class StepGuard:
    """One per run. Per step: before_forward, backward_loss, after_backward; every log_every steps: check; per
    epoch: start_epoch, end_epoch, check_weights; a checkpoint inside an epoch saves epoch_state, and its resumption
    gives it back to resume_epoch."""

    def __init__(self, model, optimizer, scaler, on_nonfinite: str, log_every: int, world: int):
        self.params = [p for p in model.parameters() if p.requires_grad]
        device = self.params[0].device
        self.skip, self.log_every, self.world = on_nonfinite == "skip", log_every, world
        self.buffers = list(model.buffers()) if self.skip else []
        self.saved = [b.clone() for b in self.buffers]
        self.found_inf = torch.zeros((), device=device)
        self.one = torch.ones((), device=device)
        self.checks_grads = not scaler.is_enabled()
        if self.checks_grads:
            optimizer.found_inf = self.found_inf  # read by the fused step, updated in place every step

    def start_epoch(self, epoch: int, steps: int, kept: str):
        """``epoch`` counts from 0; ``kept`` says which checkpoint holds the last good state."""
        self.epoch, self.steps, self.kept = epoch, steps, kept
        self.count = torch.zeros((), dtype=torch.int64, device=self.found_inf.device)
        self.first = torch.full_like(self.count, -1)

    def epoch_state(self) -> dict:
        """The epoch's flags so far: how many steps were bad, and the first."""
        return {"count": self.count.cpu(), "first": self.first.cpu()}

    def resume_epoch(self, state: dict):
        self.count.copy_(state["count"])
        self.first.copy_(state["first"])

    def before_forward(self):
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def backward_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to differentiate. amp=fp16: a non-finite loss can have finite gradients (an overflowed sum, a
        constant term), which GradScaler would apply; times NaN, every gradient is NaN and GradScaler skips."""
        if self.checks_grads:
            return loss
        return loss * torch.where(torch.isfinite(loss.detach()), 1.0, math.nan)

    def after_backward(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """Flag step ``step`` (before the optimizer steps); returns the flag, a 0-dim bool tensor."""
        self.found_inf.copy_(~torch.isfinite(loss.detach()))
        if self.checks_grads:
            grads = [p.grad for p in self.params if p.grad is not None]
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, self.one)  # x 1: only checks
        if self.world > 1:
            dist.all_reduce(self.found_inf, op=dist.ReduceOp.MAX)
        bad = self.found_inf > 0
        for buffer, saved in zip(self.buffers, self.saved):
            buffer.copy_(torch.where(bad, saved, buffer))
        self.count += bad
        self.first = torch.where(bad & (self.first < 0), step, self.first)
        return bad

    def check(self, loss: torch.Tensor) -> float:
        """Read the flags and ``loss`` on the host (one sync); on_nonfinite=error raises if a step was bad."""
        value, count, first = torch.stack([loss.detach().double(), self.count.double(), self.first.double()]).tolist()
        if count and not self.skip:
            of = f" (the first of {int(count)})" if count > 1 else ""
            self._fail(f"non-finite training loss or gradient at epoch {self.epoch + 1}, step {int(first) + 1} of "
                       f"{self.steps}{of}", skipping_helps=True)
        return value

    def end_epoch(self, loss: torch.Tensor) -> int:
        """The check at the end of the epoch; returns the number of skipped steps (on_nonfinite=skip)."""
        self.check(loss)
        skipped = int(self.count)
        if skipped == self.steps:
            self._fail(f"every training step of epoch {self.epoch + 1} had a non-finite loss or gradient (all "
                       f"{skipped} skipped)", skipping_helps=False)
        return skipped

    def check_weights(self, model):
        """Before a checkpoint: the weights and buffers are finite (an update can overflow with finite gradients)."""
        # Each rank checks the tensors it holds (FSDP2's DTensors by their local shards, parallel tp's LM-head
        # rows), and the ranks decide together: a rank that stopped alone would leave the others waiting.
        tensors = [t.to_local() if hasattr(t, "to_local") else t for t in model.state_dict().values()
                   if t.is_floating_point()]
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all().to(self.found_inf.dtype)
        if self.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite:
            self._fail(f"the model's weights became non-finite in epoch {self.epoch + 1} (an update overflowed)",
                       skipping_helps=False)

    def _fail(self, what: str, skipping_helps: bool):
        fixes = "a lower lr or beta, or amp=off"
        if self.kept:
            how = (f"Continue from it without such steps (--resume on_nonfinite=skip), or start a new run in another "
                   f"out_dir with {fixes}" if skipping_helps else f"Start a new run in another out_dir with {fixes}")
            raise NonFiniteError(f"{what}: the run stopped; {self.kept} is the last good state. {how}")
        how = ", or with on_nonfinite=skip to skip such steps" if skipping_helps else ""
        raise NonFiniteError(f"{what}: the run stopped before writing a checkpoint. Start again with {fixes}{how}")
