"""Simulated annotation for training and validation, on a case's crop of the low-res grid.

The annotator is the benchmark's robot (brainsam.training.robot): a first click at the most interior
voxel of the structure, then each click at the most interior voxel of the largest error of the
segmenter's own previous answer. Registrations that went worse than the leave-one-out ones are
simulated by shifting the prior.
"""

from __future__ import annotations

import numpy as np
import torch

from brainsam.inference.dense import Click
from brainsam.training.cases import TrainingCase
from brainsam.training.robot import interior_voxel, next_click


def as_click(case: TrainingCase, positions: list[int], index: np.ndarray, foreground: bool) -> Click:
    """A robot's voxel (position in `positions`, crop row, crop col) as a Click of the grid."""
    return Click(
        case.slices[positions[int(index[0])]],
        float(index[1] + 4 * case.tokens[0]),
        float(index[2] + 4 * case.tokens[2]),
        bool(foreground),
    )


def first_click(case: TrainingCase) -> Click | None:
    """The robot's first click: the most interior voxel of the structure; None where the case's
    crop holds none of it."""
    if not case.truth.any():
        return None
    return as_click(case, list(range(len(case.slices))), interior_voxel(case.truth, case.subject.grid_mm), True)


def corrective_click(case: TrainingCase, positions: list[int], logits: torch.Tensor) -> Click | None:
    """The robot's next click on the case's slices at `positions`, answered with `logits`
    (len(positions), rows, cols); None when that answer is right everywhere."""
    found = next_click(case.truth[positions], (logits > 0).cpu().numpy(), case.subject.grid_mm)
    return None if found is None else as_click(case, positions, found[0], found[1])


def shifted(prior: torch.Tensor, rng: np.random.Generator, slices: int, pixels: int) -> torch.Tensor:
    """The prior (..., S, rows, cols: a stack of them moves as one) moved by up to `slices`
    slices and `pixels` pixels each way, as a registration that missed by that much would give
    (zero where it moved away from)."""
    moves = [int(rng.integers(-limit, limit + 1)) for limit in (slices, pixels, pixels)]
    out = torch.zeros_like(prior)
    source = tuple(slice(max(-m, 0), n - max(m, 0)) for m, n in zip(moves, prior.shape[-3:]))
    target = tuple(slice(max(m, 0), n - max(-m, 0)) for m, n in zip(moves, prior.shape[-3:]))
    out[(..., *target)] = prior[(..., *source)]
    return out
