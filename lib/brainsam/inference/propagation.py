"""Tying 2D slice predictions into a 3D mask by walking from a seed slice to both ends.

Each next slice is prompted by the previous slice's result (its box, grown by a margin, and
optionally its logits as mask prompt). The walk stops where the structure ends (the mask
vanishes or the model's predicted IoU drops), at a given limit, and never leaves a clamp box.
When an earlier result exists (corrective clicks), the walk also stops as soon as the new
result agrees with the old one, so only the affected range is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from brainsam.core.metrics import dice

Range = tuple[int, int]


@dataclass
class SliceResult:
    """A slice's prediction: boolean mask on the full slice, low-res logits (None for a mask
    found without the model), predicted IoU."""

    mask: np.ndarray
    logits: torch.Tensor | None
    iou: float

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class SlicePrompt:
    """What the decoder gets for one slice.

    box: (rows, cols) inclusive ranges. points: (N, 2) rows/cols with labels (N,) 1/0.
    mask_logits: low-res logits fed back as mask prompt. earlier: the neighbouring slice's result
    the prompt was derived from.
    """

    box: tuple[Range, Range] | None
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    mask_logits: torch.Tensor | None = None
    earlier: "SliceResult | None" = None


@dataclass(frozen=True)
class StopRule:
    """How a walk goes: it ends at a mask under `min_area` pixels or predicted IoU under
    `min_iou`, or one whose Dice with the previous slice's is under `jump_dice` (the walk
    jumped onto a neighbouring structure); each box is the previous mask's grown by `margin`
    pixels; a rerun stops where its result reaches `agree_dice` with the earlier one."""

    min_area: int = 4
    min_iou: float = 0.5
    margin: int = 2
    agree_dice: float = 0.9
    jump_dice: float = 0.0


PredictFn = Callable[[int, SlicePrompt], SliceResult]


def bounding_box(mask: np.ndarray) -> tuple[Range, Range] | None:
    """Inclusive (rows, cols) ranges of the True pixels of a 2D mask, or None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return (int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))


def grow(box: tuple[Range, Range], margin: int, clamp: tuple[Range, Range] | None) -> tuple[Range, Range]:
    """Box widened by `margin` pixels on each side, kept inside `clamp` when given."""
    (r0, r1), (c0, c1) = box
    r0, r1, c0, c1 = r0 - margin, r1 + margin, c0 - margin, c1 + margin
    if clamp is not None:
        (cr0, cr1), (cc0, cc1) = clamp
        r0, r1, c0, c1 = max(r0, cr0), min(r1, cr1), max(c0, cc0), min(c1, cc1)
    return (r0, r1), (c0, c1)


def ends(result: SliceResult, previous: SliceResult, rule: StopRule) -> bool:
    """Whether a slice result, next to `previous`, means the structure has ended."""
    return result.area < rule.min_area or result.iou < rule.min_iou or dice(result.mask, previous.mask) < rule.jump_dice


def propagate(
    predict: PredictFn,
    results: dict[int, SliceResult],
    start: int,
    step: int,
    limit: int,
    rule: StopRule,
    clamp: tuple[Range, Range] | None = None,
    outward: bool = True,
) -> None:
    """Walk from `results[start]` in direction `step` (+1/-1) up to slice `limit`, inclusive.

    `results` is updated in place; a new result that agrees with an earlier one ends the walk
    early. Walking `outward` (away from the seed), slices beyond the structure's end that an
    earlier walk left are removed. Walking back toward the seed they are kept, and the walk
    also ends where its result is another object than the earlier one (Dice under
    `jump_dice`): a correction's walk that fades out or strays must not erase the part of the
    structure the first answer found.
    """
    previous = results[start]
    index = start + step
    while (index - limit) * step <= 0:
        box = bounding_box(previous.mask)
        if box is None:
            break
        prompt = SlicePrompt(grow(box, rule.margin, clamp), earlier=previous)
        result = predict(index, prompt)
        earlier = results.get(index)
        strays = not outward and earlier is not None and dice(earlier.mask, result.mask) < rule.jump_dice
        if ends(result, previous, rule) or strays:
            if outward:
                _drop_beyond(results, index, step)
            return
        results[index] = result
        if earlier is not None and dice(earlier.mask, result.mask) >= rule.agree_dice:
            return
        previous = result
        index += step
    if outward:
        _drop_beyond(results, index, step)


def _drop_beyond(results: dict[int, SliceResult], index: int, step: int) -> None:
    """Remove results from `index` onwards in direction `step`."""
    for key in [k for k in results if (k - index) * step >= 0]:
        del results[key]
