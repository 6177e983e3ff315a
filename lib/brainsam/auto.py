"""The automatic first pass: every structure of the label set without clicks, and how sure it is.

Atlases (labelled images) are registered to the image and vote per voxel, the image's
intensities settling where they disagree (brainsam.atlas, brainsam.fusion). Optionally the
SAM engine then refines each structure: the box round the atlases' answer prompts it (as a
Slicer ROI would) and its mask joins the vote with weight `sam_weight`.
A structure's uncertainty is how much the voters disagree with the result: one minus the mean
Dice of each atlas (and of SAM) with the fused mask. The image's uncertainty is how poorly the
registered atlases fit its intensities (`brainsam.atlas.AtlasResult.misfit`): it ranks images by
error better than the mean over structures did (README, "Automatic first pass").
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atlas import Atlas, RegistrationSettings, segment
from .engine import Engine
from .labels import LabelSet
from .propagation import dice
from .volume import Volume

logger = logging.getLogger(__name__)

ROI_MARGIN_MM = 2.0
"""Margin round the atlases' box when it prompts SAM: registration misses edges by a voxel or two."""


@dataclass
class AutoResult:
    """labels: canonical uint8 map in label-set ids. uncertainty: structure name -> 0 (every
    voter agrees) .. 1 (none overlaps the result). image_uncertainty: the atlases' misfit (module
    docstring). seconds: time per stage."""

    labels: np.ndarray
    uncertainty: dict[str, float]
    image_uncertainty: float
    seconds: dict[str, float] = field(default_factory=dict)


def first_pass(
    atlases: list[Atlas],
    volume: Volume,
    labels: LabelSet,
    engine: Engine | None = None,
    sam_weight: float = 1.0,
    settings: RegistrationSettings = RegistrationSettings(),
    cache: Path | None = None,
) -> AutoResult:
    """Segment every structure of `labels` on `volume` from `atlases`, refined by `engine`
    (SAM) when given; see the module docstring."""
    began = time.perf_counter()
    atlas = segment(atlases, volume, settings, cache)
    seconds = {"atlas": time.perf_counter() - began}
    sam = refine(engine, volume, atlas.fused, labels) if engine is not None else {}
    seconds["sam"] = time.perf_counter() - began - seconds["atlas"]
    fused = vote(atlas.propagated, atlas.fused, sam, labels, sam_weight)
    uncertainty = disagreement(atlas.propagated, sam, fused, labels)
    return AutoResult(fused, uncertainty, atlas.misfit, seconds)


def refine(engine: Engine, volume: Volume, fused: np.ndarray, labels: LabelSet) -> dict[str, np.ndarray]:
    """SAM's canonical mask of each structure the atlases found, prompted by their box."""
    image = engine.prepare(volume)
    margin = np.ceil(ROI_MARGIN_MM / np.asarray(volume.spacing)).astype(int)
    masks = {}
    for number, structure in enumerate(labels.structures, 1):
        found = fused == structure.id
        if not found.any():
            continue
        state = engine.segment(image, structure.name, roi=stored_roi(volume, found, margin))
        masks[structure.name] = engine.canonical_mask(image, state) > 0
        logger.info("first pass: SAM refined %s (%d/%d)", structure.name, number, len(labels.structures))
    return masks


def stored_roi(volume: Volume, canonical_mask: np.ndarray, margin: np.ndarray) -> list[int]:
    """Slicer ROI [i_min, i_max, j_min, j_max, k_min, k_max] (stored indices) round a canonical
    mask, grown by `margin` canonical voxels and kept inside the image."""
    index = np.argwhere(canonical_mask)
    low = np.maximum(index.min(axis=0) - margin, 0)
    high = np.minimum(index.max(axis=0) + margin, np.asarray(canonical_mask.shape) - 1)
    stored = stored_index(volume, np.stack([low, high]))  # axes are permuted and flipped only
    return [int(v) for pair in zip(stored.min(axis=0), stored.max(axis=0)) for v in pair]


def stored_index(volume: Volume, canonical_ijk: np.ndarray) -> np.ndarray:
    """Canonical voxel indices (N, 3) -> stored voxel indices (N, 3); inverse of
    `Volume.to_canonical_index`."""
    out = np.empty_like(canonical_ijk)
    for stored_axis, (canonical_axis, flip) in enumerate(volume.ornt.astype(int)):
        index = canonical_ijk[:, canonical_axis]
        out[:, stored_axis] = index if flip == 1 else volume.stored_shape[stored_axis] - 1 - index
    return out


def vote(propagated: list[np.ndarray], fused: np.ndarray, sam: dict[str, np.ndarray], labels: LabelSet, sam_weight: float) -> np.ndarray:
    """Each voxel takes the structure with the largest weighted vote of atlases and SAM when
    that vote exceeds half; on an exact half the atlases' majority decides."""
    if not sam or sam_weight <= 0:
        return fused
    total = len(propagated) + sam_weight
    best = np.zeros(fused.shape, dtype=np.float32)
    out = np.zeros_like(fused)
    for structure in labels.structures:
        if structure.name not in sam:
            out[(fused == structure.id) & (best == 0)] = structure.id
            continue
        share = (sum((p == structure.id).astype(np.float32) for p in propagated) + sam_weight * sam[structure.name]) / total
        wins = ((share > 0.5) | ((share == 0.5) & (fused == structure.id))) & (share > best)
        out[wins], best[wins] = structure.id, share[wins]
    return out


def disagreement(propagated: list[np.ndarray], sam: dict[str, np.ndarray], fused: np.ndarray, labels: LabelSet) -> dict[str, float]:
    """Per structure, 1 - mean Dice of each voter with the result. A lone atlas without SAM
    cannot disagree with itself: such structures get no value."""
    out = {}
    for structure in labels.structures:
        result = fused == structure.id
        voters = [p == structure.id for p in propagated] if len(propagated) > 1 else []
        if structure.name in sam:
            voters.append(sam[structure.name])
        if voters:
            out[structure.name] = 1.0 - float(np.mean([dice(v, result) for v in voters]))
    return out
