"""Slices of a canonical volume along a working axis, laid out as radiologists display them.

A `SliceView` turns the canonical (R, A, S) array into a stack indexed [slice, row, col] where
every slice looks like a scanner display (anterior or superior up, patient's right on the
image's left), the layout SAM-family models met during training. A `Window` is the square
field of view, in mm, that is resampled to the model's input size; one window per volume lets
every structure share the cached slice embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
HEAD_LEVEL = 0.05
"""Normalised intensity above which a voxel counts as head rather than background."""


@dataclass(frozen=True)
class Window:
    """A rectangle of a slice, in pixels: top row, left column, height and width.

    It may reach outside the slice; what lies outside reads as zero.
    """

    row: int
    col: int
    height: int
    width: int

    def key(self) -> tuple[int, int, int, int]:
        """Hashable identity of the window, part of the embedding cache key."""
        return (self.row, self.col, self.height, self.width)


class SliceView:
    """The volume seen as a stack of display-oriented slices along one canonical axis."""

    def __init__(self, canonical: np.ndarray, spacing: tuple[float, float, float], axis: str):
        if axis not in AXES:
            raise ValueError(f"axis must be one of {sorted(AXES)}, got {axis!r}")
        self.axis = axis
        self.axis_index = AXES[axis]
        self.stack = self.to_view(canonical)
        in_plane = [a for a in range(3) if a != self.axis_index]
        # rows follow the second in-plane canonical axis, columns the first (see to_view)
        self.spacing = (spacing[self.axis_index], spacing[in_plane[1]], spacing[in_plane[0]])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, cols) of the stack."""
        return tuple(self.stack.shape)

    def to_view(self, canonical: np.ndarray) -> np.ndarray:
        """Canonical (R, A, S) array -> [slice, row, col] stack, display oriented."""
        moved = np.moveaxis(canonical, self.axis_index, 0).transpose(0, 2, 1)
        return np.ascontiguousarray(moved[:, ::-1, ::-1])

    def from_view(self, stack: np.ndarray) -> np.ndarray:
        """Inverse of `to_view`: [slice, row, col] stack -> canonical (R, A, S) array."""
        unflipped = stack[:, ::-1, ::-1].transpose(0, 2, 1)
        return np.ascontiguousarray(np.moveaxis(unflipped, 0, self.axis_index))

    def index_to_view(self, canonical_ijk: np.ndarray) -> np.ndarray:
        """Canonical voxel indices (N, 3) -> (slice, row, col) indices (N, 3)."""
        canonical_ijk = np.atleast_2d(canonical_ijk)
        in_plane = [a for a in range(3) if a != self.axis_index]
        n_slices, n_rows, n_cols = self.shape
        return np.stack(
            [
                canonical_ijk[:, self.axis_index],
                n_rows - 1 - canonical_ijk[:, in_plane[1]],
                n_cols - 1 - canonical_ijk[:, in_plane[0]],
            ],
            axis=1,
        )

    def default_window(self, fov_mm: float) -> Window:
        """Square field of view of `fov_mm` centred on the head (non-zero voxels) in the slice plane.

        Deep brain structures lie near the centre of the head, so one window serves them all and
        their slices are encoded once.
        """
        _, n_rows, n_cols = self.shape
        footprint = self.stack.max(axis=0) > HEAD_LEVEL
        rows, cols = np.nonzero(footprint)
        centre_r = (rows.min() + rows.max()) / 2 if rows.size else (n_rows - 1) / 2
        centre_c = (cols.min() + cols.max()) / 2 if cols.size else (n_cols - 1) / 2
        height = max(8, int(round(fov_mm / self.spacing[1])))
        width = max(8, int(round(fov_mm / self.spacing[2])))
        return Window(int(round(centre_r - height / 2)), int(round(centre_c - width / 2)), height, width)

    def central_slices(self, half_width_mm: float) -> list[int]:
        """Slices within `half_width_mm` of the centre of the head (non-zero voxels) along the
        slice axis, nearest the centre first.

        Along the sagittal axis deep brain structures lie within about 45 mm of the midline (the
        subcortical labels of the fs-aseg and ixi-muse subjects, and the reach of a click's walk,
        span -45 to +51 mm from the head's left-right centre), so these are the slices worth
        encoding before anyone clicks.
        """
        present = np.nonzero(self.stack.max(axis=(1, 2)) > HEAD_LEVEL)[0]
        centre = (present.min() + present.max()) / 2 if present.size else (self.shape[0] - 1) / 2
        reach = half_width_mm / self.spacing[0]
        inside = [i for i in range(self.shape[0]) if abs(i - centre) <= reach]
        return sorted(inside, key=lambda i: abs(i - centre))

    def window_round(self, region: np.ndarray, margin_mm: float, snap_mm: float) -> Window:
        """Square field of view holding a [slice, row, col] boolean `region` of the stack with
        `margin_mm` to spare, its side rounded up to and its centre snapped to `snap_mm`, so that
        a region that moves a little (another set of atlases) keeps the same window, and the
        same slice embeddings."""
        rows, cols = np.nonzero(region.any(axis=0))
        if not rows.size:
            raise ValueError("the region is empty: no window holds it")
        extent = max((rows.max() - rows.min() + 1) * self.spacing[1], (cols.max() - cols.min() + 1) * self.spacing[2])
        side_mm = math.ceil((extent + 2 * margin_mm) / snap_mm) * snap_mm
        centre_mm = [
            round((low + high) / 2 * mm / snap_mm) * snap_mm
            for low, high, mm in ((rows.min(), rows.max(), self.spacing[1]), (cols.min(), cols.max(), self.spacing[2]))
        ]
        height, width = int(round(side_mm / self.spacing[1])), int(round(side_mm / self.spacing[2]))
        return Window(
            int(round(centre_mm[0] / self.spacing[1] - height / 2)),
            int(round(centre_mm[1] / self.spacing[2] - width / 2)),
            height,
            width,
        )

    def window_for(self, base: Window, rows: tuple[int, int], cols: tuple[int, int]) -> Window:
        """`base`, shifted by whole quarters of its size until it holds the given pixel ranges.

        Shifts snap to quarters so that nearby prompts outside the default window still share
        embeddings. A range larger than the window gets a window grown to hold it.
        """
        height = max(base.height, rows[1] - rows[0] + 1)
        width = max(base.width, cols[1] - cols[0] + 1)
        row = _shift_to_hold(base.row, height, rows)
        col = _shift_to_hold(base.col, width, cols)
        return Window(row, col, height, width)

    def crop(self, slice_index: int, window: Window, size: int) -> torch.Tensor:
        """The window of one slice resampled to a (size, size) float tensor."""
        return resample(crop_pixels(self.stack[slice_index], window), size)


def _shift_to_hold(start: int, length: int, span: tuple[int, int]) -> int:
    """New start for an interval of `length` so it covers `span`, moving in quarter steps."""
    step = max(1, length // 4)
    while span[0] < start:
        start -= step
    while span[1] >= start + length:
        start += step
    return start


def crop_pixels(image: np.ndarray, window: Window) -> np.ndarray:
    """Copy the window out of a 2D array, zero where the window leaves the array."""
    out = np.zeros((window.height, window.width), dtype=image.dtype)
    r0, c0 = max(window.row, 0), max(window.col, 0)
    r1 = min(window.row + window.height, image.shape[0])
    c1 = min(window.col + window.width, image.shape[1])
    if r1 > r0 and c1 > c0:
        out[r0 - window.row : r1 - window.row, c0 - window.col : c1 - window.col] = image[r0:r1, c0:c1]
    return out


def paste_pixels(target: np.ndarray, patch: np.ndarray, window: Window) -> None:
    """Write a window-sized patch back into a 2D array, clipping what lies outside."""
    r0, c0 = max(window.row, 0), max(window.col, 0)
    r1 = min(window.row + window.height, target.shape[0])
    c1 = min(window.col + window.width, target.shape[1])
    if r1 > r0 and c1 > c0:
        target[r0:r1, c0:c1] = patch[r0 - window.row : r1 - window.row, c0 - window.col : c1 - window.col]


def resample(image: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a 2D array to `size` (int for square), returned as float32 tensor."""
    tensor = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32)[None, None]
    shape = (size, size) if isinstance(size, int) else size
    return F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False)[0, 0]


def to_grid(stack: np.ndarray, window: Window, size: int) -> torch.Tensor:
    """The window of every slice of a [slice, row, col] stack resampled to (slices, size, size)."""
    crops = (
        np.stack([crop_pixels(plane, window) for plane in stack])
        if len(stack)
        else np.zeros((0, window.height, window.width))
    )
    tensor = torch.as_tensor(crops, dtype=torch.float32)[:, None]
    return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def from_grid(grid: torch.Tensor, window: Window, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of `to_grid` for values > 0: (slices, size, size) -> boolean (slices, *shape) slices."""
    back = (
        F.interpolate(grid[:, None].float(), size=(window.height, window.width), mode="bilinear", align_corners=False)[
            :, 0
        ]
        > 0
    )
    out = np.zeros((len(grid), *shape), dtype=bool)
    for plane, patch in zip(out, back.numpy()):
        paste_pixels(plane, patch, window)
    return out


def to_model_xy(rows: np.ndarray, cols: np.ndarray, window: Window, size: int) -> np.ndarray:
    """Pixel centres (row, col) of a slice -> SAM point coordinates (x, y) in the model input."""
    x = (np.asarray(cols) - window.col + 0.5) * size / window.width - 0.5
    y = (np.asarray(rows) - window.row + 0.5) * size / window.height - 0.5
    return np.stack([x, y], axis=-1)


def to_model_box(rows: tuple[int, int], cols: tuple[int, int], window: Window, size: int) -> np.ndarray:
    """Inclusive pixel ranges of a slice -> SAM box (x0, y0, x1, y1) in the model input, edges."""
    x0 = (cols[0] - window.col) * size / window.width
    x1 = (cols[1] + 1 - window.col) * size / window.width
    y0 = (rows[0] - window.row) * size / window.height
    y1 = (rows[1] + 1 - window.row) * size / window.height
    return np.array([x0, y0, x1, y1], dtype=np.float32)
