"""brainsam's dense prompt: the prior, the previous answer and the clicks, per low-res pixel.

The decoder of every slice sees, besides its image embedding and its box, a stack of
`backbones.DENSE_CHANNELS` on its crop of the low-res grid:

- prior: the registered atlases' probability of the structure, as a logit;
- previous: the answer's logits so far (on the first answer, the prior's logit times
  PRIOR_SCALE, the range of a confident SAM answer; `first_previous`); the decoder's output
  corrects `first_previous` of the prior, never the previous answer itself, so that decoding a
  slice again and again does not pile up corrections;
- positive / negative: the annotator's clicks, each a Gaussian spot round its pixel, fading
  with the distance in mm to the slice it was made on, so one click reaches the neighbouring
  slices it concerns and training learns how far that is.

The decoder's answer is then made to honour every click (`honour_clicks`): the clicked pixel
always ends on the click's side, the change fading within a few millimetres.

Slices are indexed along the working axis; rows and columns are low-res pixels of the window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from brainsam.modeling.backbones import DENSE_CHANNELS

PRIOR_SCALE = 4.0
"""Logits of a prior probability are multiplied by this to serve as the first previous answer."""
CLAMP = 0.02
"""Probabilities are clamped to [CLAMP, 1 - CLAMP] before their logit is taken (±3.9)."""
SPOT_MM = 2.0
"""In-plane standard deviation of a click's spot."""
REACH_MM = 3.0
"""Standard deviation, across slices, of how a click's spot fades."""
FAINTEST = 0.01
"""A click reaches the slices where its spot is at least this strong (2.9 REACH_MM away)."""
CLICK_MARGIN = 2.0
"""The logit a click's own pixel ends with at least, on the click's side (probability 0.88)."""
HONOUR_MM = 3.0
"""Standard deviation, in the plane and across slices, of how far honouring a click moves the
logits: the border moves to just past the click there, less further along it (chosen on
subjects other than those the reported figures hold out: docs/segmenter.md)."""

CHANNEL = {name: index for index, name in enumerate(DENSE_CHANNELS)}


@dataclass(frozen=True)
class Click:
    """A click in the dense prompt's frame: slice index, low-res row and column, foreground or not."""

    slice: int
    row: float
    col: float
    foreground: bool


def prior_logits(probability: torch.Tensor) -> torch.Tensor:
    """Probabilities in [0, 1] -> clamped logits (same shape)."""
    clamped = probability.float().clamp(CLAMP, 1 - CLAMP)
    return torch.log(clamped / (1 - clamped))


def reach(slice_mm: float) -> int:
    """How many slices either side of its own a click reaches, for slices `slice_mm` apart."""
    return int(REACH_MM * math.sqrt(-2 * math.log(FAINTEST)) / slice_mm)


def click_spots(
    clicks: list[Click],
    slices: list[int],
    shape: tuple[int, int],
    origin: tuple[int, int],
    mm: tuple[float, float, float],
) -> torch.Tensor:
    """Positive and negative click spots on `slices`: (len(slices), 2, rows, cols).

    shape, origin: size and first (row, col) of the crop of the low-res grid. mm: spacing of
    slices, rows and columns. Where spots overlap, the strongest holds."""
    out = torch.zeros(len(slices), 2, *shape)
    for click in clicks:
        channel = 0 if click.foreground else 1
        out[:, channel] = torch.maximum(out[:, channel], click_spot(click, slices, shape, origin, mm))
    return out


def click_spot(
    click: Click,
    slices: list[int],
    shape: tuple[int, int],
    origin: tuple[int, int],
    mm: tuple[float, float, float],
    in_plane_mm: float = SPOT_MM,
    across_mm: float = REACH_MM,
) -> torch.Tensor:
    """One click's spot on `slices` (len(slices), rows, cols): 1 at its pixel, a Gaussian of
    `in_plane_mm` in the plane, fading by `across_mm` across slices, zero below FAINTEST."""
    rows = torch.arange(origin[0], origin[0] + shape[0], dtype=torch.float32)[:, None]
    cols = torch.arange(origin[1], origin[1] + shape[1], dtype=torch.float32)[None, :]
    spot = torch.exp(-(((rows - click.row) * mm[1]) ** 2 + ((cols - click.col) * mm[2]) ** 2) / (2 * in_plane_mm**2))
    across = torch.tensor([math.exp(-(((index - click.slice) * mm[0]) ** 2) / (2 * across_mm**2)) for index in slices])
    across[across < FAINTEST] = 0.0
    return across[:, None, None] * spot


def honour_clicks(
    logits: torch.Tensor,
    clicks: list[Click],
    slices: list[int],
    origin: tuple[int, int],
    mm: tuple[float, float, float],
) -> torch.Tensor:
    """`logits` (len(slices), rows, cols) moved by each click in turn just enough that the
    click's pixel and the 8 round it end CLICK_MARGIN on its side (a mask resampled to the
    image's voxels reads the click's voxel from those), the move fading within HONOUR_MM.
    Whatever the network learned, the answer follows the annotator where they clicked; where
    the network already agrees, nothing moves. Clicks off these slices or off the crop are
    left to the network."""
    for click in clicks:
        row, col = round(click.row) - origin[0], round(click.col) - origin[1]
        if click.slice not in slices or not (0 <= row < logits.shape[1] and 0 <= col < logits.shape[2]):
            continue
        position, sign = slices.index(click.slice), 1.0 if click.foreground else -1.0
        spot = click_spot(click, slices, tuple(logits.shape[1:]), origin, mm, HONOUR_MM, HONOUR_MM).to(logits.device)
        around = (position, slice(max(row - 1, 0), row + 2), slice(max(col - 1, 0), col + 2))
        needed = float(((CLICK_MARGIN - sign * logits[around].detach()) / spot[around]).max())
        if needed > 0:
            logits = logits + sign * needed * spot
    return logits


def dense_prompt(prior: torch.Tensor | None, previous: torch.Tensor | None, spots: torch.Tensor) -> torch.Tensor:
    """The dense prompt (S, len(DENSE_CHANNELS), rows, cols) from the prior's probability and the
    previous logits (S, rows, cols each, or None where there is none) and `click_spots`."""
    out = torch.zeros(len(spots), len(DENSE_CHANNELS), *spots.shape[-2:])
    if prior is not None:
        out[:, CHANNEL["prior"]], out[:, CHANNEL["has_prior"]] = prior_logits(prior), 1.0
    if previous is not None:
        out[:, CHANNEL["previous"]], out[:, CHANNEL["has_previous"]] = previous, 1.0
    out[:, CHANNEL["positive"] : CHANNEL["negative"] + 1] = spots
    return out


def first_previous(prior: torch.Tensor | None) -> torch.Tensor | None:
    """The previous answer a first answer starts from: the prior's scaled logits, or None."""
    return None if prior is None else PRIOR_SCALE * prior_logits(prior)
