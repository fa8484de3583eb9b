"""Time estimates of long commands: the wall time per step, measured over the first steps after a warm-up step
(allocations, lazy initialisation and cold caches make the first one slow), times the steps that remain."""
from __future__ import annotations

import time

import torch

MEASURED_STEPS = 20


def duration(seconds: float) -> str:
    """'40 s', '14 min' or '2.5 h' (never '0 s')."""
    if seconds < 60:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 100 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class FirstSteps:
    """Call ``step_done()`` after each step: it returns the mean seconds per step once, after the
    ``MEASURED_STEPS`` steps that follow the first (fewer when only ``available`` steps come), else None."""

    def __init__(self, available: int, device: torch.device | None = None):
        self.steps = min(MEASURED_STEPS, available - 1)
        self.device = device
        self.done = 0
        self.start = 0.0

    def step_done(self) -> float | None:
        self.done += 1
        if self.done == 1:
            self.start = self._now()
        elif self.done == self.steps + 1:
            return (self._now() - self.start) / self.steps
        return None

    def _now(self) -> float:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the steps ran, not only were queued (twice per run)
        return time.perf_counter()
