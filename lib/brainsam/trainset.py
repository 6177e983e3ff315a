"""Training slices: labelled subjects cut into the slices the engine sees, augmented, encoded
up to the first trained stage.

Each subject is read like the engine reads it (canonical orientation, working axis, default
field of view), slices holding labelled structures are sampled across their whole range, and
every slice keeps the mask of each structure on it at the decoder's low resolution.
Augmentations are drawn once, when a slice is made: the frozen encoder activations of the
augmented slice are cached, so every epoch reuses them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import torch
import torch.nn.functional as F

from .activations import SplitEncoder
from .backbones import LOW_RES
from .config import EngineConfig
from .labels import LabelSet
from .view import SliceView, crop_pixels, resample
from .volume import VolumeError, load_volume

logger = logging.getLogger(__name__)

MIN_AREA_PX = 4
"""Structures smaller than this on a slice (at low resolution) are not trained on there."""


@dataclass
class Subject:
    """A labelled image. ids: structure name -> value of that structure in the label file."""

    name: str
    image: Path
    labels: Path
    ids: dict[str, int]


@dataclass
class TrainingSlice:
    """One slice ready for training.

    activations: encoder activations below the first trained stage (1, ...).
    targets: structure name -> bool mask (LOW_RES, LOW_RES).
    half_extent_px: structure name -> typical half size (rows, cols) in target pixels.
    """

    subject: str
    index: int
    activations: torch.Tensor
    targets: dict[str, torch.Tensor]
    half_extent_px: dict[str, tuple[float, float]]


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random changes made to a training slice (0 or 1 turns one off).

    rotate_deg: in-plane rotation. scale: zoom factor spread. gamma: intensity gamma spread.
    contrast: intensity scale spread. mirror: probability of a left-right mirror of the subject.
    """

    rotate_deg: float = 10.0
    scale: float = 0.1
    gamma: float = 0.3
    contrast: float = 0.1
    mirror: float = 0.5


def mirrored_ids(ids: dict[str, int]) -> dict[str, int]:
    """Structure ids after a left-right mirror of the head: Left-X takes Right-X's id and back."""
    def partner(name: str) -> str:
        for side, other in (("Left-", "Right-"), ("Right-", "Left-")):
            if name.startswith(side) and other + name[len(side):] in ids:
                return other + name[len(side):]
        return name

    return {name: ids[partner(name)] for name in ids}


def augment(crop: torch.Tensor, targets: torch.Tensor, settings: Augmentation, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate/zoom an image crop (S, S) and its masks (K, T, T) together; change the crop's
    gamma and contrast. Returns (crop, masks as bool)."""
    angle = math.radians(rng.uniform(-settings.rotate_deg, settings.rotate_deg))
    zoom = 1.0 + rng.uniform(-settings.scale, settings.scale)
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]], dtype=torch.float32)

    def warp(image: torch.Tensor) -> torch.Tensor:
        grid = F.affine_grid(theta, [1, image.shape[0], *image.shape[-2:]], align_corners=False)
        return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]

    image = warp(crop[None].float())[0].clamp(0, 1)
    image = image ** math.exp(rng.uniform(-settings.gamma, settings.gamma))
    image = (image * (1.0 + rng.uniform(-settings.contrast, settings.contrast))).clamp(0, 1)
    masks = warp(targets.float()) > 0.5 if len(targets) else targets.bool()
    return image, masks


def read_labels(path: Path) -> np.ndarray:
    """A label file (NIfTI, or NRRD as 3D Slicer saves labels) as an int32 array on its stored grid."""
    try:
        array = nrrd.read(str(path))[0] if path.name.endswith(".nrrd") else np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as error:  # nibabel and pynrrd raise many types for damaged files
        raise VolumeError(f"cannot read label file {path.name}: {error}") from error
    array = np.squeeze(array)
    if array.ndim != 3:
        raise VolumeError(f"label file {path.name} is {array.ndim}D; expected one 3D label map")
    return array.astype(np.int32)


def read_subject(subject: Subject, config: EngineConfig, mirror: bool) -> tuple[SliceView, np.ndarray, dict[str, int]]:
    """A subject as the engine sees it: (image view, label stack in the same view, structure ids).

    mirror: flip the head left-right, with Left/Right ids swapped to match.
    """
    volume = load_volume(subject.image)
    labels = volume.to_canonical(read_labels(subject.labels))
    data, ids = volume.data, dict(subject.ids)
    if mirror:
        data, labels, ids = data[::-1], labels[::-1], mirrored_ids(ids)
    view = SliceView(np.ascontiguousarray(data), volume.spacing, config.axis_for(volume.spacing))
    return view, view.to_view(labels), ids


def pick_slices(label_stack: np.ndarray, ids: dict[str, int], count: int, rng: np.random.Generator) -> list[int]:
    """Up to `count` slice indices spread evenly over the slices holding any labelled structure."""
    present = np.isin(label_stack, list(ids.values())).any(axis=(1, 2))
    candidates = np.flatnonzero(present)
    if len(candidates) <= count:
        return candidates.tolist()
    edges = np.linspace(0, len(candidates), count + 1)
    return [int(candidates[int(rng.integers(int(a), max(int(a) + 1, int(b))))]) for a, b in zip(edges[:-1], edges[1:])]


def half_extents(view: SliceView, labels: LabelSet, window_px: tuple[int, int]) -> dict[str, tuple[float, float]]:
    """Each structure's typical half size (rows, cols) in target pixels of this view and window."""
    in_plane = [a for a in range(3) if a != view.axis_index]
    mm_per_px = (window_px[0] * view.spacing[1] / LOW_RES, window_px[1] * view.spacing[2] / LOW_RES)
    return {
        s.name: (s.extent_mm[in_plane[1]] / 2 / mm_per_px[0], s.extent_mm[in_plane[0]] / 2 / mm_per_px[1])
        for s in labels.structures
    }


def subject_slices(
    subject: Subject,
    split: SplitEncoder,
    config: EngineConfig,
    labels: LabelSet,
    count: int,
    rng: np.random.Generator,
    augmentation: Augmentation | None,
) -> list[TrainingSlice]:
    """Sample, augment and encode (up to the first trained stage) `count` slices of a subject."""
    mirror = augmentation is not None and rng.random() < augmentation.mirror
    view, label_stack, ids = read_subject(subject, config, mirror)
    ids = {name: value for name, value in ids.items() if name in labels}
    window = view.default_window(config.fov_mm)
    extents = half_extents(view, labels, (window.height, window.width))
    size = split.backbone.input_size
    out = []
    for index in pick_slices(label_stack, ids, count, rng):
        crop = view.crop(index, window, size)
        label_crop = crop_pixels(label_stack[index], window)
        names = list(ids)
        masks = torch.stack([resample((label_crop == ids[n]).astype(np.float32), LOW_RES) > 0.5 for n in names])
        if augmentation is not None:
            crop, masks = augment(crop, masks, augmentation, rng)
        targets = {n: m for n, m in zip(names, masks) if int(m.sum()) >= MIN_AREA_PX}
        if targets:
            out.append(TrainingSlice(subject.name, index, split.below(crop[None]), targets, extents))
    return out


def build_slices(
    subjects: list[Subject],
    split: SplitEncoder,
    config: EngineConfig,
    labels: LabelSet,
    per_subject: int,
    seed: int,
    augmentation: Augmentation | None,
) -> list[TrainingSlice]:
    """Training slices of all subjects, logging progress; unreadable subjects are skipped with a
    log line (a lab's datastore can hold a bad file; training the rest beats failing)."""
    rng = np.random.default_rng(seed)
    slices: list[TrainingSlice] = []
    for number, subject in enumerate(subjects, start=1):
        try:
            made = subject_slices(subject, split, config, labels, per_subject, rng, augmentation)
        except (VolumeError, OSError, ValueError) as error:
            logger.warning("skipped %s: %s", subject.name, error)
            continue
        slices += made
        logger.info("slices of %s ready (%d/%d subjects, %d slices)", subject.name, number, len(subjects), len(slices))
    return slices
