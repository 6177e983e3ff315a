"""Prompts as clients send them (stored voxel indices, Slicer ROI) mapped onto the slice view.

A `ViewBox` is an inclusive box in [slice, row, col] indices of a `SliceView`. Clicks become
(slice, row, col) points. Both are validated against the image: a bad prompt raises
`PromptError` with a message that tells the user what to fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from brainsam.core.view import SliceView
from brainsam.core.volume import Volume

Click = tuple[int, int, int]
"""A click as a stored voxel index (i, j, k)."""


@dataclass(frozen=True)
class Prompts:
    """One annotator's prompts on one structure so far, as 3D Slicer sends them with every
    request: the structure's name, every click (stored voxel indices, the newest last) and the
    roi [i_min, i_max, j_min, j_max, k_min, k_max] or None."""

    label: str
    foreground: tuple[Click, ...] = ()
    background: tuple[Click, ...] = ()
    roi: tuple[float, ...] | None = None

    def with_click(self, point: np.ndarray | list[int], is_foreground: bool) -> Prompts:
        """These prompts and one more click, at stored voxel index `point`."""
        side = "foreground" if is_foreground else "background"
        click = tuple(int(v) for v in point)
        return dataclasses.replace(self, **{side: (*getattr(self, side), click)})

    @property
    def count(self) -> int:
        return len(self.foreground) + len(self.background)


class PromptError(ValueError):
    """A click or box that cannot be used; the message says what is wrong."""


@dataclass(frozen=True)
class ViewBox:
    """Inclusive index ranges of a box in a slice view: slices, rows, cols as (min, max)."""

    slices: tuple[int, int]
    rows: tuple[int, int]
    cols: tuple[int, int]

    def clip(self, shape: tuple[int, int, int]) -> "ViewBox":
        """The part of the box inside a stack of `shape`."""
        bounds = [(max(lo, 0), min(hi, n - 1)) for (lo, hi), n in zip((self.slices, self.rows, self.cols), shape)]
        return ViewBox(*bounds)

    @property
    def region(self) -> tuple[slice, slice, slice]:
        """The box as index slices of a stack."""
        return tuple(slice(lo, hi + 1) for lo, hi in (self.slices, self.rows, self.cols))

    @property
    def centre_slice(self) -> int:
        return (self.slices[0] + self.slices[1]) // 2


def parse_points(points: object, volume: Volume, what: str) -> np.ndarray:
    """Validate a list of [i, j, k] stored voxel indices; return them as an (N, 3) int array."""
    if points is None:
        return np.zeros((0, 3), dtype=np.int64)
    try:
        array = np.asarray(points, dtype=float)
    except (TypeError, ValueError):
        raise PromptError(f"{what} must be a list of [i, j, k] voxel indices, got {points!r}") from None
    if array.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != 3:
        raise PromptError(f"{what} must be a list of [i, j, k] voxel indices (3 numbers each), got {points!r}")
    if not np.all(np.isfinite(array)) or not np.allclose(array, np.round(array)):
        raise PromptError(f"{what} must hold whole voxel indices, got {points!r}")
    array = np.round(array).astype(np.int64)
    shape = np.asarray(volume.stored_shape)
    outside = np.any((array < 0) | (array >= shape), axis=1)
    if outside.any():
        raise PromptError(f"{what} point {array[outside][0].tolist()} lies outside the image of shape {list(shape)}")
    return array


def points_to_view(points: np.ndarray, volume: Volume, view: SliceView) -> np.ndarray:
    """Stored voxel indices (N, 3) -> (slice, row, col) indices (N, 3) of the view."""
    if len(points) == 0:
        return np.zeros((0, 3), dtype=np.int64)
    return view.index_to_view(volume.to_canonical_index(points))


def parse_roi(roi: object, volume: Volume, view: SliceView) -> ViewBox:
    """Slicer ROI [i_min, i_max, j_min, j_max, k_min, k_max] (stored indices) -> ViewBox.

    Swapped min/max (Slicer sends them so on flipped axes) are tolerated; the box is clipped to
    the image and must keep at least one voxel.
    """
    try:
        values = np.asarray(roi, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise PromptError(f"roi must be 6 numbers [i_min, i_max, j_min, j_max, k_min, k_max], got {roi!r}") from None
    if values.size != 6 or not np.all(np.isfinite(values)):
        raise PromptError(f"roi must be 6 numbers [i_min, i_max, j_min, j_max, k_min, k_max], got {roi!r}")
    pairs = np.sort(np.round(values).astype(np.int64).reshape(3, 2), axis=1)
    shape = np.asarray(volume.stored_shape)
    lower = np.clip(pairs[:, 0], 0, shape - 1)
    upper = np.clip(pairs[:, 1], 0, shape - 1)
    if np.any(pairs[:, 1] < 0) or np.any(pairs[:, 0] > shape - 1):
        raise PromptError(f"roi {values.tolist()} lies outside the image of shape {shape.tolist()}")
    corners = points_to_view(np.stack([lower, upper]), volume, view)
    low, high = corners.min(axis=0), corners.max(axis=0)
    if np.any(high[1:] == low[1:]):  # a line or a point in the slices: no area for the model to box
        raise PromptError(
            f"roi {values.tolist()} encloses no area in the slices brainsam segments: draw it around the structure"
        )
    return ViewBox((int(low[0]), int(high[0])), (int(low[1]), int(high[1])), (int(low[2]), int(high[2])))


def prior_box(
    centre: np.ndarray, extent_mm: tuple[float, float, float], view: SliceView, scale: float = 1.0
) -> ViewBox:
    """Box of a structure's typical size, in view indices, centred on a click.

    centre: (slice, row, col). extent_mm: typical size along canonical R, A, S.
    """
    axis = view.axis_index
    in_plane = [a for a in range(3) if a != axis]
    extent_view = np.array([extent_mm[axis], extent_mm[in_plane[1]], extent_mm[in_plane[0]]]) * scale
    half = np.maximum(1, np.round(extent_view / np.asarray(view.spacing) / 2)).astype(int)
    low, high = np.asarray(centre) - half, np.asarray(centre) + half
    return ViewBox((int(low[0]), int(high[0])), (int(low[1]), int(high[1])), (int(low[2]), int(high[2]))).clip(
        view.shape
    )
