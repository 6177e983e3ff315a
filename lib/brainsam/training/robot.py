"""The simulated annotator ("robot") of the benchmark, in 2D or 3D.

It clicks first at the most interior voxel of the structure, then each time at the most
interior voxel of the largest error region: foreground where the structure was missed,
background where the mask spilled over. Training simulates corrective clicks the same way.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def interior_voxel(region: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """The voxel of `region` farthest from its border (ties: the first), as an index array."""
    index = np.argwhere(region)
    low, high = index.min(axis=0), index.max(axis=0) + 1
    crop = np.pad(region[tuple(slice(a, b) for a, b in zip(low, high))], 1)
    distance = ndimage.distance_transform_edt(crop, sampling=spacing)
    return np.array(np.unravel_index(distance.argmax(), crop.shape)) - 1 + low


def next_click(truth: np.ndarray, mask: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, bool] | None:
    """The robot's next click (index, is_foreground) at the largest error region, or None if perfect."""
    best, best_size, foreground = None, 0, True
    for error, is_foreground in ((truth & ~mask, True), (mask & ~truth, False)):
        pieces, count = ndimage.label(error)
        if count == 0:
            continue
        sizes = np.bincount(pieces.ravel())[1:]
        if sizes.max() > best_size:
            best, best_size, foreground = pieces == sizes.argmax() + 1, sizes.max(), is_foreground
    if best is None:
        return None
    return interior_voxel(best, spacing), foreground
