"""Overlap of masks, one definition for inference, training and evaluation."""

from __future__ import annotations

import numpy as np
import torch


def dice(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Dice overlap of two boolean masks of one shape, numpy or torch (1.0 when both are empty:
    nothing to find, nothing found)."""
    a, b = (np.asarray(m.cpu()) if isinstance(m, torch.Tensor) else np.asarray(m) for m in (a, b))
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total
