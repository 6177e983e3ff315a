"""Label fusion: the atlases' label maps on one image made into one label map.

Where the atlases agree, their label stands. Where they disagree (registration errs at the
borders of structures), the image has a say too: each label voted for at the voxel scores

    (share of atlases voting for it) ** PRIOR_POWER  x  likelihood of the voxel's intensity,

the likelihood being the label's intensity histogram on this same image, learnt from the voxels
every atlas gives that label. That is one step of the classic atlas-prior EM segmentation with
non-parametric intensity models; no label nobody voted for can win.

Measured (fs-aseg, leave one out, 6 atlases, 17 structures): mean Dice 0.847 by majority vote,
0.864 refined; README, "Automatic first pass".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

PRIOR_POWER = 2.0
"""Weight of the vote against intensity: 2..6 were within 0.003 of each other on fs-aseg; 1
let intensity override the atlases too often (0.849), 0.5 more so (0.832)."""
BINS = 64
"""Intensity histogram bins over the range the labels cover."""
SMOOTHING_BINS = 1.5
"""Gaussian smoothing of each histogram (bins): a few hundred voxels leave gaps."""
BACKGROUND_BAND_MM = 3.0
"""Background intensities are learnt this close to the structures only: what lies further out
(skull, scalp, cortex) never competes with a structure."""
MIN_SURE = 20
"""Fewest agreed voxels a histogram is learnt from; with fewer, intensity does not judge."""


def fuse(propagated: list[np.ndarray]) -> np.ndarray:
    """Majority vote per voxel among label maps of one grid (ties: the lower id; a lone map is
    returned as it is). Only the box holding any label is voted on."""
    if len(propagated) == 1:
        return propagated[0].copy()
    out = np.zeros(propagated[0].shape, dtype=np.uint8)
    labelled = any_label(propagated)
    if not labelled.any():
        return out
    box = grown_box(labelled, 0)
    crops = [p[box] for p in propagated]
    ids = np.unique(np.concatenate([np.unique(c) for c in crops]))
    votes = np.zeros((len(ids), *crops[0].shape), dtype=np.uint8)  # counts of at most 255 maps
    for row, value in enumerate(ids):
        for crop in crops:
            votes[row] += crop == value
    out[box] = ids[votes.argmax(axis=0)]
    return out


def any_label(propagated: list[np.ndarray]) -> np.ndarray:
    """Boolean map of the voxels any of the label maps labels."""
    labelled = propagated[0] > 0
    for labels in propagated[1:]:
        labelled |= labels > 0
    return labelled


@dataclass
class Dispute:
    """Where label maps of one grid disagree, and how each label voted for there scores.

    box: the part of the grid examined. where: boolean on `box`, the voxels in dispute.
    labels: (L,) the labels voted for there. scores: (L, M) share ** PRIOR_POWER x intensity
    likelihood of each label at each of the M disputed voxels (zero where it has no vote).
    majority: the majority vote on `box` (`fuse`); outside `box` no map labels anything.
    """

    box: tuple[slice, ...]
    where: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    majority: np.ndarray


def dispute(propagated: list[np.ndarray], image: np.ndarray, spacing: tuple[float, float, float]) -> Dispute | None:
    """The disputed voxels of label maps (uint8, one grid) on `image` (float, same grid,
    `spacing` mm) and their labels' scores (module docstring); None where all agree."""
    if len(propagated) == 1 or not any(p.any() for p in propagated):
        return None
    band = max(1, round(BACKGROUND_BAND_MM / min(spacing)))
    box = grown_box(any_label(propagated), band)
    stack = np.stack([p[box] for p in propagated])
    where = (stack != stack[0]).any(axis=0)
    if not where.any():
        return None
    bins = intensity_bins(image[box])
    majority = fuse(list(stack))
    near_structures = ndimage.binary_dilation(majority > 0, iterations=band)
    candidates, disputed_bins = stack[:, where], bins[where]
    labels = np.unique(candidates)
    scores = np.empty((len(labels), len(disputed_bins)), dtype=np.float32)
    for row, label in enumerate(labels):
        sure = ~where & (stack[0] == label)
        if label == 0:
            sure &= near_structures
        scores[row] = np.mean(candidates == label, axis=0) ** PRIOR_POWER * histogram(bins[sure])[disputed_bins]
    return Dispute(box, where, labels, scores, majority)


class AtlasFusion:
    """Atlases' label maps on one image (uint8, canonical, one grid) with their disputes worked
    out once on the image's intensities: the fused label map and each structure's probability
    both come from it (module docstring)."""

    def __init__(self, propagated: list[np.ndarray], image: np.ndarray, spacing: tuple[float, float, float]):
        self.propagated = propagated
        self.dispute = dispute(propagated, image, spacing)

    def labels(self) -> np.ndarray:
        """The majority vote where all agree, the label of highest score where they disagree."""
        found = self.dispute
        if found is None:
            return fuse(self.propagated)
        fused = np.zeros(self.propagated[0].shape, dtype=np.uint8)
        fused[found.box] = found.majority
        fused[found.box][found.where] = found.labels[found.scores.argmax(axis=0)]
        return fused

    def probability(self, label_id: int) -> np.ndarray:
        """Per voxel, how likely (float32, 0..1) it is to be `label_id`: 1 or 0 where the maps
        agree, the label's share of all scores where they disagree; above 1/2 wherever
        `labels` gives it and it faces one rival."""
        probability = share_of(self.propagated, label_id)
        found = self.dispute
        if found is not None and label_id in found.labels:
            scores = found.scores[int(np.flatnonzero(found.labels == label_id)[0])]
            probability[found.box][found.where] = scores / found.scores.sum(axis=0)
        return probability


def fuse_with_intensity(
    propagated: list[np.ndarray], image: np.ndarray, spacing: tuple[float, float, float]
) -> np.ndarray:
    """Label maps (uint8, one grid) fused on `image` (float, same grid, `spacing` mm):
    `AtlasFusion.labels`. A lone map is returned as it is."""
    return AtlasFusion(propagated, image, spacing).labels()


def with_borders(propagated: list[np.ndarray]) -> list[np.ndarray]:
    """Label maps for fusion: several are returned as they are; a lone map (the built-in atlas,
    or a datastore's only labelled image) becomes three, itself, its structures shrunk by one
    voxel and grown by one voxel into the background, so that the voxels along every border are
    in dispute and the image's intensities settle them (module docstring). Measured with the
    built-in atlas (all subjects, no held-out set): fs-aseg mean Dice 0.619 -> 0.640, ixi-muse
    0.562 -> 0.567; shrinking and growing by two voxels gained less (0.626, 0.564)."""
    if len(propagated) != 1 or not propagated[0].any():
        return propagated
    labels = propagated[0]
    box = grown_box(labels > 0, 2)
    part = labels[box]
    shrunk, grown = labels.copy(), labels.copy()
    shrunk[box] = np.where(ndimage.minimum_filter(part, 3) == ndimage.maximum_filter(part, 3), part, 0)
    distance, nearest = ndimage.distance_transform_edt(part == 0, return_indices=True)
    grown[box] = np.where((part == 0) & (distance <= 1), part[tuple(nearest)], part)
    return [shrunk, labels, grown]


def share_of(propagated: list[np.ndarray], label_id: int) -> np.ndarray:
    """Per voxel, the share (float32, 0..1) of label maps that give it `label_id`."""
    votes = np.zeros(propagated[0].shape, dtype=np.float32)
    for labels in propagated:
        votes += labels == label_id
    return votes / len(propagated)


def grown_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The box round the True voxels of a non-empty mask, grown by `margin` voxels and kept
    inside the array."""
    index = np.argwhere(mask)
    low = np.maximum(index.min(axis=0) - margin, 0)
    high = np.minimum(index.max(axis=0) + margin + 1, mask.shape)
    return tuple(slice(a, b) for a, b in zip(low, high))


def intensity_bins(values: np.ndarray) -> np.ndarray:
    """Histogram bin (0..BINS-1) of each value, the bins spanning the values' range."""
    edges = np.linspace(values.min(), values.max(), BINS + 1)
    return np.clip(np.digitize(values, edges) - 1, 0, BINS - 1)


def histogram(bins: np.ndarray) -> np.ndarray:
    """Smoothed probability of each bin among `bins` (flat when fewer than MIN_SURE)."""
    if len(bins) < MIN_SURE:
        return np.full(BINS, 1.0 / BINS)
    counts = np.bincount(bins, minlength=BINS) / len(bins)
    return ndimage.gaussian_filter1d(counts, SMOOTHING_BINS) + 1e-6
