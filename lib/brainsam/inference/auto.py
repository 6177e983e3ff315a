"""The automatic first pass: every structure of the label set without clicks, and how sure it is.

Atlases (labelled images) are registered to the image; their fusion (brainsam.atlases.registration,
brainsam.atlases.fusion) prompts the segmenter (brainsam.inference.segmenter), which answers each structure as it
answers a click, without one. Without an engine (or with its `answer` "atlases") the fused label
map answers on its own. A structure's uncertainty is how much the voters disagree with the
result: one minus the mean Dice of each atlas (and of the segmenter's answer) with it. The
image's uncertainty is how poorly the registered atlases fit its intensities
(`brainsam.atlases.atlas.AtlasResult.misfit`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brainsam.atlases.atlas import Atlas
from brainsam.atlases.fusion import AtlasFusion
from brainsam.atlases.registration import RegistrationSettings, register_atlases
from brainsam.core.labels import LabelSet
from brainsam.core.metrics import dice
from brainsam.core.volume import Volume
from brainsam.inference.engine import Engine

logger = logging.getLogger(__name__)


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
    settings: RegistrationSettings = RegistrationSettings(),
    cache: Path | None = None,
) -> AutoResult:
    """Segment every structure of `labels` on `volume` from `atlases`, answered by `engine`'s
    segmenter when given; see the module docstring."""
    began = time.perf_counter()
    atlas = register_atlases(atlases, volume, settings, cache)
    seconds = {"atlas": time.perf_counter() - began}
    answered = {}
    if engine is not None and engine.config.answer == "segmenter":
        answered = engine.automatic(engine.prepare(volume), AtlasFusion(atlas.propagated, volume.data, volume.spacing))
    seconds["segmenter"] = time.perf_counter() - began - seconds["atlas"]
    result = compose(answered, atlas.fused, labels) if answered else atlas.fused
    uncertainty = disagreement(atlas.propagated, answered, result, labels)
    return AutoResult(result, uncertainty, atlas.misfit, seconds)


def compose(masks: dict[str, np.ndarray], fused: np.ndarray, labels: LabelSet) -> np.ndarray:
    """One label map from per-structure canonical masks; where two overlap, the atlases' fused
    label settles it when it is one of them, else the structure listed first."""
    out = np.zeros(fused.shape, dtype=np.uint8)
    for structure in labels.structures:
        mask = masks.get(structure.name)
        if mask is None:
            continue
        out[mask & ((out == 0) | (fused == structure.id))] = structure.id
    return out


def disagreement(
    propagated: list[np.ndarray], sam: dict[str, np.ndarray], fused: np.ndarray, labels: LabelSet
) -> dict[str, float]:
    """Per structure, 1 - mean Dice of each voter (every atlas, and the segmenter's answer in
    `sam`) with the result. A lone atlas without the segmenter cannot disagree with itself:
    such structures get no value."""
    out = {}
    for structure in labels.structures:
        result = fused == structure.id
        voters = [p == structure.id for p in propagated] if len(propagated) > 1 else []
        if structure.name in sam:
            voters.append(sam[structure.name])
        if voters:
            out[structure.name] = 1.0 - float(np.mean([dice(v, result) for v in voters]))
    return out
