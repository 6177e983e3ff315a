"""Simulated prompts for training and validation, on a slice's low-resolution target grid.

They mirror how the predictor prompts the decoder: a tight box with some slack (propagation
prompts each slice with its neighbour's mask box plus a margin), a box of the structure's
typical size round a click (how a first click is answered), and the robot's corrective clicks
fed back with the previous logits (decoder-only rounds, as in SAM-Med2D).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .robot import interior_voxel, next_click


@dataclass
class Prompt:
    """A decoder prompt in target pixels.

    box: (x0, y0, x1, y1) pixel edges, or None. points: (N, 2) pixel (row, col).
    labels: (N,) 1 foreground, 0 background.
    """

    box: np.ndarray | None
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))

    def with_click(self, point: np.ndarray, label: int) -> "Prompt":
        """This prompt plus one click."""
        return Prompt(self.box, np.vstack([self.points, np.asarray(point).reshape(1, 2)]), np.append(self.labels, label))

    def for_model(self, scale: float) -> dict[str, torch.Tensor | None]:
        """Keyword arguments of `Backbone.decode` for a model input `scale` times the target grid."""
        points = labels = None
        if len(self.points):
            points = torch.as_tensor((self.points[:, ::-1] + 0.5) * scale - 0.5, dtype=torch.float32)
            labels = torch.as_tensor(self.labels, dtype=torch.int64)
        box = None if self.box is None else torch.as_tensor(self.box * scale, dtype=torch.float32)
        return {"points": points, "point_labels": labels, "box": box}


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Pixel-edge box (x0, y0, x1, y1) of a non-empty 2D mask."""
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.float32)


def jittered_box(mask: np.ndarray, rng: np.random.Generator, slack: float = 0.1, shift_px: float = 2.0) -> np.ndarray:
    """The mask's box, each side moved out by up to `slack` of the box size plus a pixel or two,
    and the whole box shifted by up to `shift_px`."""
    box = mask_box(mask)
    size = np.array([box[2] - box[0], box[3] - box[1]] * 2)
    grow = rng.uniform(0, slack, 4) * size + rng.uniform(0, 2, 4)
    shift = np.tile(rng.uniform(-shift_px, shift_px, 2), 2)
    box = box + np.array([-1, -1, 1, 1]) * grow + shift
    return np.clip(box, 0, mask.shape[0]).astype(np.float32)


def prior_sized_box(mask: np.ndarray, half_extent_px: tuple[float, float], rng: np.random.Generator, shift_px: float = 3.0) -> np.ndarray:
    """A box of the structure's typical half extent (rows, cols) centred near its most interior
    pixel: what a first click turns into."""
    row, col = interior_voxel(mask, (1.0, 1.0)) + rng.uniform(-shift_px, shift_px, 2)
    half_rows, half_cols = half_extent_px
    box = np.array([col - half_cols, row - half_rows, col + half_cols + 1, row + half_rows + 1])
    return np.clip(box, 0, mask.shape[0]).astype(np.float32)


def corrective_click(truth: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The robot's next click on a slice, (row, col) and label, or None when nothing is wrong."""
    click = next_click(truth, prediction, (1.0, 1.0))
    if click is None:
        return None
    point, is_foreground = click
    return point, int(is_foreground)
