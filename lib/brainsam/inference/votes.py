"""The atlases' vote as a guide: first answers and corrective clicks without the model.

Registered atlases (brainsam.atlases.registration) vote per voxel; their share of the vote for a structure,
weighed by the image's intensities where they disagree (brainsam.atlases.fusion.AtlasFusion.probability),
says how likely each voxel is to belong to it: below, "share". Where an annotator's first click
lies in the majority's answer (share above 1/2), the connected piece of it holding the click is
the first answer (on fs-aseg it beats the model's: README, "Atlas-guided clicks"). A corrective
click then moves the answer's border near the click, in 3D, along the vote:

- foreground at a voxel of share q: the voxels outside the answer with share >= min(q, 1/2)
  (where no atlas voted: a band of BAND voxels round the answer) join it;
- background at share q: the answer's voxels with share <= max(q, 1/2) leave it;

in either case only the connected region holding the click, within `radius_mm` of it; the
clicked voxel always obeys, and the voxels of earlier clicks of the other kind keep their side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

MARGIN = 8
"""Voxels kept round the voted region: corrections reach past it by up to their radius."""
BAND = 2
"""Voxels a foreground click may add round the answer where no atlas voted."""
CONNECTED = np.ones((3, 3, 3), dtype=bool)


@dataclass
class VoteShare:
    """Share of atlases voting for one structure, on a box of a view stack (slice, row, col).

    values: float32 shares in [0, 1] inside the box (zero outside). corner: the box's first
    index. shape: the whole stack's shape.
    """

    values: np.ndarray
    corner: tuple[int, int, int]
    shape: tuple[int, int, int]

    @classmethod
    def of(cls, share: np.ndarray) -> "VoteShare | None":
        """The voted part of a whole-stack share array, or None where no atlas voted."""
        index = np.argwhere(share > 0)
        if not len(index):
            return None
        low = np.maximum(index.min(axis=0) - MARGIN, 0)
        high = np.minimum(index.max(axis=0) + MARGIN + 1, share.shape)
        box = tuple(slice(a, b) for a, b in zip(low, high))
        return cls(share[box].astype(np.float32), tuple(int(v) for v in low), tuple(share.shape))

    def region(self, box: tuple[slice, ...]) -> np.ndarray:
        """Shares on `box` (slices of the whole stack), zero outside the voted part."""
        out = np.zeros([s.stop - s.start for s in box], dtype=np.float32)
        source = tuple(
            slice(max(s.start, c), min(s.stop, c + n)) for s, c, n in zip(box, self.corner, self.values.shape)
        )
        if all(s.stop > s.start for s in source):
            target = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(source, box))
            out[target] = self.values[tuple(slice(s.start - c, s.stop - c) for s, c in zip(source, self.corner))]
        return out

    def majority(self) -> np.ndarray:
        """Boolean whole-stack mask of the voxels most atlases vote for."""
        return self.region(tuple(slice(0, n) for n in self.shape)) > 0.5


def first_answer(
    votes: VoteShare, click: np.ndarray | None, within: tuple[slice, ...] | None = None
) -> np.ndarray | None:
    """The majority's answer (whole-stack boolean mask) cut to `within` (an ROI) and, with a
    click, reduced to its connected piece holding the click; None when the click lies outside
    it or nothing is left."""
    mask = votes.majority()
    if within is not None:
        mask &= ~outside_of(within, mask.shape)
    if not mask.any() or (click is not None and not mask[tuple(click)]):
        return None
    if click is None:
        return mask
    box = bounding_slices(mask)
    pieces, _ = ndimage.label(mask[box], structure=CONNECTED)
    out = np.zeros_like(mask)
    out[box] = pieces == pieces[tuple(np.asarray(click) - [s.start for s in box])]
    return out


def correct(
    mask: np.ndarray,
    votes: VoteShare,
    click: np.ndarray,
    foreground: bool,
    spacing: tuple[float, float, float],
    radius_mm: float,
    keep: np.ndarray | None = None,
) -> None:
    """Apply one corrective click (stack index) to a whole-stack boolean `mask`, in place; see
    the module docstring. keep: (N, 3) stack indices of earlier clicks of the other kind,
    which this one must not undo."""
    centre = np.asarray(click, dtype=int)
    reach = np.ceil(radius_mm / np.asarray(spacing)).astype(int)
    box = tuple(slice(max(c - r, 0), min(c + r + 1, n)) for c, r, n in zip(centre, reach, mask.shape))
    local, share = mask[box], votes.region(box)
    at = tuple(centre - [s.start for s in box])
    grid = np.indices(local.shape, sparse=True)
    ball = sum(((g - a) * s) ** 2 for g, a, s in zip(grid, at, spacing)) <= radius_mm**2
    level = share[at]
    if foreground:
        allowed = share >= min(level, 0.5) if level > 0 else ndimage.binary_dilation(local, CONNECTED, iterations=BAND)
        candidates = allowed & ~local
    else:
        candidates = local & (share <= max(level, 0.5))
    for voxel in np.asarray(keep if keep is not None else [], dtype=int).reshape(-1, 3) - [s.start for s in box]:
        if np.all((voxel >= 0) & (voxel < local.shape)):
            candidates[tuple(voxel)] = False
    candidates[at] = True
    pieces, _ = ndimage.label(candidates & ball, structure=CONNECTED)
    piece = pieces == pieces[at]
    mask[box] = (local | piece) if foreground else (local & ~piece)


def bounding_slices(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box (slices) holding every True voxel of a non-empty mask."""
    index = np.argwhere(mask)
    return tuple(slice(a, b + 1) for a, b in zip(index.min(axis=0), index.max(axis=0)))


def outside_of(box: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Boolean array of `shape`, True outside `box`."""
    out = np.ones(shape, dtype=bool)
    out[box] = False
    return out
