"""Each atlas's vote for one structure, re-weighted by the annotator's clicks.

A click says what its voxel is. The atlases that say otherwise there were registered worse
there, and likely round it too: near the click they lose weight, those that agree keep theirs,
and the structure's prior moves by how much the atlases' share changes. One click so moves the
prior along the whole stretch of border that the better-placed atlases draw, not only the
patch round the click that honouring it moves (brainsam.inference.dense). Where every atlas
agrees with the click, or none does, the prior stays as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from brainsam.inference.votes import VoteShare

DISCOUNT_MM = 10.0
"""Standard deviation of how far, round a click, the atlases it contradicts lose weight
(chosen on subjects the reported figures hold out: docs/segmenter.md)."""
FLOOR = 0.1
"""The weight a contradicted atlas keeps at the click itself."""

Point = tuple[np.ndarray, bool]
"""A click on the view: (slice, row, col) voxel index and whether it is foreground."""


@dataclass
class AtlasVotes:
    """Each atlas's vote for one structure on the box of its prior (view space).

    members: (atlases, *prior.values.shape) boolean, where each atlas gives the structure.
    prior: the fused probability (its box is the members'). spacing: mm of slices, rows, cols.
    """

    members: np.ndarray
    prior: VoteShare
    spacing: tuple[float, float, float]

    def share(self, points: list[Point]) -> VoteShare:
        """The prior moved by the change in the atlases' share when each atlas that contradicts
        a click in `points` is discounted round it (module docstring); same box as the prior."""
        weights = np.ones(self.members.shape, dtype=np.float32)
        for point, foreground in points:
            local = tuple(int(v) - c for v, c in zip(point, self.prior.corner))
            if not all(0 <= v < n for v, n in zip(local, self.members.shape[1:])):
                continue
            agree = self.members[(slice(None), *local)] == foreground
            if agree.all() or not agree.any():
                continue
            fading = 1 - (1 - FLOOR) * gaussian(self.members.shape[1:], local, self.spacing, DISCOUNT_MM)
            weights[~agree] *= fading
        votes = self.members.astype(np.float32)
        moved = (weights * votes).sum(axis=0) / weights.sum(axis=0) - votes.mean(axis=0)
        return VoteShare(np.clip(self.prior.values + moved, 0.0, 1.0), self.prior.corner, self.prior.shape)


def gaussian(
    shape: tuple[int, ...], centre: tuple[int, ...], spacing: tuple[float, ...], sigma_mm: float
) -> np.ndarray:
    """A Gaussian of `sigma_mm` round voxel `centre` on a grid of `shape` and `spacing` (float32)."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    squared = sum(((grid - c) * s) ** 2 for grid, c, s in zip(grids, centre, spacing))
    return np.exp(-squared / (2 * sigma_mm**2)).astype(np.float32)


def votes_of(
    maps: np.ndarray,
    corner: tuple[int, int, int],
    label_id: int,
    prior: VoteShare,
    spacing: tuple[float, float, float],
) -> AtlasVotes:
    """The votes for `label_id` of atlas label maps (atlases, slices, rows, cols) holding the
    block of the view that starts at `corner` and contains the prior's box; counted only where
    the prior is (where an roi cut it, no atlas may move it)."""
    box = tuple(slice(p - c, p - c + n) for p, c, n in zip(prior.corner, corner, prior.values.shape))
    members = (maps[(slice(None), *box)] == label_id) & (prior.values > 0)
    return AtlasVotes(members, prior, spacing)
