"""The learning rate over a run: warm-up ("preheating"), then decay by steps or by time."""

from __future__ import annotations

import math

import torch

from brainsam.training.settings import TrainSettings


class LearningRate:
    """Linear warm-up ("preheating") over `warmup_iterations`, then cosine or poly decay to zero
    as the run uses up its iterations or its time budget, whichever goes first, so that a slow
    machine still ends on a decayed rate."""

    def __init__(self, optimiser: torch.optim.Optimizer, settings: TrainSettings):
        if settings.schedule not in ("cosine", "poly"):
            raise ValueError(f"schedule must be cosine or poly, got {settings.schedule!r}")
        self.optimiser = optimiser
        self.settings = settings
        self.decay_from = 0.0

    def set(self, step: int, time_used: float) -> float:
        """Set and return the rate for `step` (0-based) with `time_used` of the budget spent (0..1)."""
        peak, warmup = self.settings.learning_rate, self.settings.warmup_iterations
        used = min(1.0, max(step / max(1, self.settings.iterations), time_used))
        if step < warmup:
            rate, self.decay_from = peak * (step + 1) / (warmup + 1), used
        else:
            progress = min(1.0, (used - self.decay_from) / max(1e-9, 1.0 - self.decay_from))
            shape = (
                0.5 * (1 + math.cos(math.pi * progress))
                if self.settings.schedule == "cosine"
                else (1 - progress) ** 0.9
            )
            rate = peak * shape
        for group in self.optimiser.param_groups:
            group["lr"] = rate
        return rate
