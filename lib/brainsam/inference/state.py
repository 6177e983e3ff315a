"""What the predictor keeps between requests: an image ready for prompting and a structure's
segmentation on it so far."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from brainsam.core.prompts import ViewBox
from brainsam.core.view import SliceView, Window
from brainsam.core.volume import Volume
from brainsam.inference.propagation import SliceResult
from brainsam.inference.votes import VoteShare


@dataclass
class PreparedImage:
    """A volume ready for prompting: its slice view and the default field of view."""

    volume: Volume
    view: SliceView
    window: Window


@dataclass
class Segmentation:
    """The state of one structure on one image: per-slice results and the prompts so far.

    clicks: (slice, row, col, label) with label 1 foreground, 0 background.
    box: the user's box, if any; results never leave it.
    limits: first and last slice the walk may reach.
    seed: the slice the first answer grew from.
    """

    window: Window
    slices: dict[int, SliceResult] = field(default_factory=dict)
    clicks: list[tuple[int, int, int, int]] = field(default_factory=list)
    box: ViewBox | None = None
    limits: tuple[int, int] = (0, 0)
    seed: int = 0
    votes: VoteShare | None = None

    def stack(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The 3D mask as a uint8 [slice, row, col] stack of `shape`."""
        out = np.zeros(shape, dtype=np.uint8)
        for index, result in self.slices.items():
            out[index] = result.mask
        return out

    def paint(self, mask: np.ndarray) -> None:
        """Make a boolean [slice, row, col] mask found without the model (no logits, predicted
        IoU 1) the result."""
        self.slices = {int(i): SliceResult(mask[i].copy(), None, 1.0) for i in np.flatnonzero(mask.any(axis=(1, 2)))}
