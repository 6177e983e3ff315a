"""Atlases: labelled images whose labels can be carried onto a new image."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from brainsam.core.labels import LabelSet
from brainsam.core.volume import Volume, load_volume
from brainsam.io.subjects import read_labels


@dataclass(frozen=True)
class Atlas:
    """A labelled image: volume (canonical, normalised) and labels (canonical, label-set ids)."""

    name: str
    volume: Volume
    labels: np.ndarray

    @cached_property
    def key(self) -> str:
        """Digest of image and labels: a changed atlas is a new atlas."""
        digest = hashlib.blake2b(self.volume.content_hash.encode(), digest_size=16)
        digest.update(np.ascontiguousarray(self.labels, dtype=np.uint8).tobytes())
        return digest.hexdigest()

    @cached_property
    def label_box(self) -> tuple[np.ndarray, np.ndarray]:
        """Lowest and highest corner (mm) of the box round the labels."""
        index = np.argwhere(self.labels > 0)
        spacing = np.asarray(self.volume.spacing)
        return index.min(axis=0) * spacing, index.max(axis=0) * spacing

    @cached_property
    def means(self) -> np.ndarray:
        """Mean intensity within each label value 1..255 (`label_means`)."""
        return label_means(self.volume.data, self.labels)

    def prepared(self) -> "Atlas":
        """The atlas with its digest and means computed now (off the click path); itself."""
        _ = self.key, self.means, self.label_box
        return self


@dataclass
class AtlasResult:
    """Labels of a target from one or more atlases, canonical order, label-set ids.

    fused: their fusion (brainsam.atlases.fusion.fuse_with_intensity). propagated: each atlas's labels
    on the target, in atlas order. misfit: how poorly they fit the target's intensities, 1 - their
    mean `agreement` (0: as well as an image fits its own labels).
    """

    fused: np.ndarray
    propagated: list[np.ndarray]
    misfit: float


def load_atlas(
    image: str | Path, labels: str | Path, ids: dict[str, int], label_set: LabelSet, name: str | None = None
) -> Atlas:
    """An atlas from an image file and a label file whose values are `ids` (structure name ->
    value in the file, e.g. from configs/mappings); structures not in `label_set` are dropped."""
    volume = load_volume(image)
    return Atlas(
        name or Path(image).name, volume, relabel(volume.to_canonical(read_labels(Path(labels))), ids, label_set)
    )


def relabel(values: np.ndarray, ids: dict[str, int], label_set: LabelSet) -> np.ndarray:
    """A label map in a data set's ids -> uint8 map in the label set's ids (others -> 0)."""
    out = np.zeros(values.shape, dtype=np.uint8)
    for name, value in ids.items():
        if name in label_set:
            out[values == value] = label_set[name].id
    return out


def label_means(data: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean of `data` within each label value 1..255 of a uint8 label map (NaN where absent)."""
    counts = np.bincount(labels.ravel(), minlength=256)[1:]
    sums = np.bincount(labels.ravel(), weights=data.ravel(), minlength=256)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts
