"""The segmenter: the LoRA-SAM decoding every slice of a structure from its prompts.

A structure's prompts are the registered atlases' probability of it (the prior), the
annotator's clicks and ROI, and the segmenter's own previous answer (brainsam.inference.dense). The
first answer decodes every slice the prior reaches, each from the prior on it (as dense prompt
and as the box it implies) and the clicks near it; a corrective click re-decodes only the slices
it reaches, each from its previous answer plus every click. Slices are decoded in batches, on
the crop of the token grid that holds the structure, from the image's shared slice embeddings
of the deep-brain window (`SliceView.window_round`), so all structures of an image reuse them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np
import torch

from brainsam.core.prompts import ViewBox
from brainsam.core.view import Window, from_grid, to_grid, to_model_box, to_model_xy
from brainsam.inference.atlas_votes import AtlasVotes, Point
from brainsam.inference.dense import (
    Click,
    click_spots,
    dense_prompt,
    first_previous,
    honour_clicks,
    reach,
)
from brainsam.inference.votes import VoteShare
from brainsam.modeling.backbones import LOW_RES, TOKENS, Backbone

TOKEN_MARGIN = 3
"""Tokens of context kept round the structure's crop of the token grid."""
SLICE_MARGIN = 2
"""Slices decoded beyond the last ones the prior reaches (it may stop short of the structure)."""
BOX_MARGIN = 2.0
"""Low-res pixels added round the prior's box."""
BATCH = 16
"""Slices decoded per decoder call."""
ABSENT = -20.0
"""Logit of a pixel no prompt reaches."""
PRIOR_MOVED = 0.02
"""A slice is decoded again when a click moves its prior by more than this anywhere."""
WINDOW_MARGIN_MM, WINDOW_SNAP_MM = 8.0, 8.0
"""The deep-brain window: round the atlases' labels with this margin, snapped to this grid."""

Embeddings = Callable[[list[int]], torch.Tensor]
"""Slice indices -> their embeddings in the window (len, 256, 64, 64)."""


@dataclass
class Answer:
    """One structure's answer on one image, on its crop of the window's low-res grid.

    slices: view slice indices decoded so far (ascending). tokens: the crop of the token grid
    (row0, row1, col0, col1); prior and logits are on the matching low-res crop,
    (len(slices), 4 (row1 - row0), 4 (col1 - col0)): the atlases' probability (None without
    atlases) and the answer. clicks: every click so far. roi: the annotator's box, if any: the
    answer never leaves it. share: the prior on the view, for slices added later.
    """

    window: Window
    slices: list[int]
    tokens: tuple[int, int, int, int]
    prior: torch.Tensor | None
    logits: torch.Tensor
    clicks: list[Click] = field(default_factory=list)
    roi: ViewBox | None = None
    share: VoteShare | None = None
    votes: AtlasVotes | None = None
    points: list[Point] = field(default_factory=list)

    def grid(self) -> torch.Tensor:
        """The logits on the whole low-res grid (len(slices), 256, 256), ABSENT off the crop."""
        out = torch.full((len(self.slices), LOW_RES, LOW_RES), ABSENT)
        row0, row1, col0, col1 = self.tokens
        out[:, 4 * row0 : 4 * row1, 4 * col0 : 4 * col1] = self.logits
        return out

    def stack(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The answer as a uint8 [slice, row, col] stack of `shape`."""
        out = np.zeros(shape, dtype=np.uint8)
        out[self.slices] = from_grid(self.grid(), self.window, shape[1:])
        if self.roi is not None:
            keep = np.zeros(shape, dtype=bool)
            keep[self.roi.region] = True
            out &= keep
        return out

    def recrop(self, tokens: tuple[int, int, int, int]) -> None:
        """Move to a larger crop of the token grid: the prior is zero, the answer absent, where new."""
        if tokens == self.tokens:
            return
        old, self.tokens = self.tokens, tokens
        place = (
            slice(None),
            slice(4 * (old[0] - tokens[0]), 4 * (old[1] - tokens[0])),
            slice(4 * (old[2] - tokens[2]), 4 * (old[3] - tokens[2])),
        )
        shape = (len(self.slices), 4 * (tokens[1] - tokens[0]), 4 * (tokens[3] - tokens[2]))
        logits = torch.full(shape, ABSENT)
        logits[place] = self.logits
        self.logits = logits
        if self.prior is not None:
            prior = torch.zeros(shape)
            prior[place] = self.prior
            self.prior = prior


class Segmenter:
    """Decodes structures slice by slice from their prompts with one backbone.

    window: the image's deep-brain window. slices: the view slices it may decode (all of the
    view's, or those a training subject holds embeddings of). grid_mm: spacing of
    slices and of the window's low-res rows and columns (`grid_spacing`). embeddings: where
    slice embeddings in that window come from (cache, store or encoder). timings, counts: where
    the seconds spent and the slices decoded add up (e.g. the engine's, across segmenters).
    bf16: decode under bfloat16 autocast, where the device computes it natively (the runtime's
    choice, brainsam.core.runtime); the logits stay float32.
    """

    def __init__(
        self,
        backbone: Backbone,
        window: Window,
        slices: range,
        grid_mm: tuple[float, float, float],
        embeddings: Embeddings,
        timings: dict[str, float] | None = None,
        counts: dict[str, int] | None = None,
        bf16: bool = False,
    ):
        self.backbone = backbone
        self.bf16 = bf16
        self.slices = slices
        self.window = window
        self.grid_mm = grid_mm
        self.embeddings = embeddings
        self.timings = timings if timings is not None else defaultdict(float)
        self.counts = counts if counts is not None else defaultdict(int)

    def to_click(self, point: np.ndarray, foreground: bool) -> Click:
        """A view-space (slice, row, col) click on the low-res grid."""
        x, y = to_model_xy(np.array([point[1]]), np.array([point[2]]), self.window, LOW_RES)[0]
        return Click(int(point[0]), float(y), float(x), bool(foreground))

    def start(self, prior: VoteShare | None, clicks: list[Click], roi: ViewBox | None) -> Answer:
        """An answer not decoded yet: the slices and crop a first answer from the prior (the
        atlases' probability of the structure on the view, None without atlases), clicks and
        roi decodes. Without a prior, a click or roi must say where the structure is."""
        slices = self._first_slices(prior, clicks, roi)
        low = None if prior is None else to_grid(planes(prior, slices), self.window, LOW_RES)
        tokens = token_box(low, clicks, roi_box(roi, self.window))
        crop = (slice(None), slice(4 * tokens[0], 4 * tokens[1]), slice(4 * tokens[2], 4 * tokens[3]))
        low = None if low is None else low[crop].clone()
        logits = (
            first_previous(low)
            if low is not None
            else torch.full((len(slices), 4 * (tokens[1] - tokens[0]), 4 * (tokens[3] - tokens[2])), ABSENT)
        )
        return Answer(self.window, slices, tokens, low, logits, list(clicks), roi, prior)

    @torch.inference_mode()
    def first(self, prior: VoteShare | None, clicks: list[Click], roi: ViewBox | None) -> Answer:
        """The first answer (see `start`): every slice decoded."""
        answer = self.start(prior, clicks, roi)
        self.decode(answer, list(range(len(answer.slices))), fresh=True)
        return answer

    @torch.inference_mode()
    def correct(self, answer: Answer, clicks: list[Click]) -> Answer:
        """`answer` corrected by new clicks, in place: the slices each click reaches are decoded
        again from their previous answer and every click so far."""
        for click in clicks:
            near = self._take(answer, click)
            self.decode(answer, near, fresh=False)
        return answer

    @torch.inference_mode()
    def correct_with_atlases(self, answer: Answer, points: list[Point]) -> Answer:
        """`answer` (with atlas votes) corrected by view-space clicks, in place: each click
        re-weights the atlases (brainsam.inference.atlas_votes); the slices whose prior moves and
        those the click reaches are decoded again as a first answer is, from the new prior and
        every click. The other slices' prompts are as they were: they keep their answer."""
        for point, foreground in points:
            answer.points.append((point, foreground))
            share = answer.votes.share(answer.points)
            self.correct_prior(answer, self.to_click(point, foreground), partial(self._on_crop, share))
            answer.share = share
        return answer

    @torch.inference_mode()
    def correct_prior(self, answer: Answer, click: Click, prior: Callable[[Answer], torch.Tensor]) -> Answer:
        """`answer` corrected by a click that also moves its prior, in place: `prior` gives the
        new prior on the answer once the click has grown it. The slices the click reaches and
        those whose prior moved by more than PRIOR_MOVED are decoded again as a first answer
        is, from the new prior and every click; the others keep their answer."""
        near = self._take(answer, click)
        moved = self._reprior(answer, prior(answer))
        positions = sorted(set(near) | set(moved))
        answer.logits[positions] = first_previous(answer.prior[positions])
        self.decode(answer, positions, fresh=False)
        return answer

    def _take(self, answer: Answer, click: Click) -> list[int]:
        """Add `click` to the answer, its crop and slices grown to hold what it reaches; return
        the positions of the slices it reaches."""
        answer.clicks.append(click)
        near = range(
            max(click.slice - reach(self.grid_mm[0]), self.slices.start),
            min(click.slice + reach(self.grid_mm[0]) + 1, self.slices.stop),
        )
        answer.recrop(token_box(None, [click], None, answer.tokens))
        self._extend(answer, [i for i in near if i not in answer.slices])
        return [answer.slices.index(i) for i in near]

    def _on_crop(self, share: VoteShare, answer: Answer) -> torch.Tensor:
        """A prior on the view (`share`) on the answer's slices and crop of the low-res grid."""
        row0, row1, col0, col1 = answer.tokens
        return to_grid(planes(share, answer.slices), self.window, LOW_RES)[:, 4 * row0 : 4 * row1, 4 * col0 : 4 * col1]

    @staticmethod
    def _reprior(answer: Answer, prior: torch.Tensor) -> list[int]:
        """Make `prior` (on the answer's slices and crop) its prior; return the positions of the
        slices where it moved by more than PRIOR_MOVED."""
        moved = (prior - answer.prior).abs().amax(dim=(1, 2)) > PRIOR_MOVED
        answer.prior = prior
        return [int(p) for p in torch.nonzero(moved).flatten()]

    def _first_slices(self, prior: VoteShare | None, clicks: list[Click], roi: ViewBox | None) -> list[int]:
        """Slices a first answer decodes: the prior's (`prior_slices`), cut to the roi; without a
        prior, the roi's, or those the clicks reach."""
        if prior is not None:
            low, high = prior_slices(prior)
        elif roi is not None:
            low, high = roi.slices
        else:
            low = min(c.slice for c in clicks) - reach(self.grid_mm[0])
            high = max(c.slice for c in clicks) + reach(self.grid_mm[0])
        if roi is not None:
            low, high = max(low, roi.slices[0]), min(high, roi.slices[1])
        return list(range(max(low, self.slices.start), min(high, self.slices.stop - 1) + 1))

    def _extend(self, answer: Answer, slices: list[int]) -> None:
        """Add view slices to the answer (kept in order), with their prior and no answer yet."""
        if not slices:
            return
        row0, row1, col0, col1 = answer.tokens
        crop = (slice(None), slice(4 * row0, 4 * row1), slice(4 * col0, 4 * col1))
        order = sorted(answer.slices + slices)
        positions = [order.index(i) for i in answer.slices]
        added = [order.index(i) for i in slices]
        shape = (len(order), 4 * (row1 - row0), 4 * (col1 - col0))
        logits = torch.full(shape, ABSENT)
        logits[positions] = answer.logits
        if answer.prior is not None:
            prior = torch.zeros(shape)
            prior[positions] = answer.prior
            if answer.share is not None:
                prior[added] = to_grid(planes(answer.share, slices), self.window, LOW_RES)[crop]
            logits[added] = first_previous(prior[added])
            answer.prior = prior
        answer.slices, answer.logits = order, logits

    def decode(self, answer: Answer, positions: list[int], fresh: bool) -> None:
        """Decode the answer's slices at `positions` in batches, writing their logits.

        fresh: a first answer, whose previous logits are the prior's (or none)."""
        box = prior_box(answer, self.window)
        for start in range(0, len(positions), BATCH):
            chunk = positions[start : start + BATCH]
            slices = [answer.slices[p] for p in chunk]
            row0, row1, col0, col1 = answer.tokens
            embeddings = self.embeddings(slices)[:, :, row0:row1, col0:col1]
            began = time.perf_counter()
            prior = None if answer.prior is None else answer.prior[chunk]
            previous = None if fresh and answer.prior is None else answer.logits[chunk]
            with torch.autocast(self.backbone.device.type, torch.bfloat16, enabled=self.bf16):
                logits = decode(
                    self.backbone, embeddings, answer.tokens, slices, prior, previous, answer.clicks, box, self.grid_mm
                )
            answer.logits[chunk] = logits.float().detach().cpu()
            self.timings["decode"] += time.perf_counter() - began
            self.counts["decode"] += len(chunk)


def decode(
    backbone: Backbone,
    embeddings: torch.Tensor,
    tokens: tuple[int, int, int, int],
    slices: list[int],
    prior: torch.Tensor | None,
    previous: torch.Tensor | None,
    clicks: list[Click],
    box: np.ndarray | None,
    grid_mm: tuple[float, float, float],
) -> torch.Tensor:
    """Logits (len(slices), 4h, 4w) of slices from their prompts, on the crop `tokens` of the grid.

    embeddings: (len(slices), 256, h, w) cut to `tokens`. prior, previous: probabilities and
    logits on the matching low-res crop, or None. clicks: all of the structure's. box: shared
    box prompt (low-res pixels) or None. grid_mm: spacing of slices and low-res rows and columns.
    Differentiable: training runs exactly this."""
    row0, row1, col0, col1 = tokens
    spots = click_spots(clicks, slices, (4 * (row1 - row0), 4 * (col1 - col0)), (4 * row0, 4 * col0), grid_mm)
    scale = backbone.input_size / LOW_RES
    points, labels = point_prompts(clicks, slices, scale)
    boxes = None if box is None else torch.as_tensor(box * scale, dtype=torch.float32).repeat(len(slices), 1)
    dense = dense_prompt(prior, previous, spots)
    logits, _ = backbone.decode_dense(embeddings, tokens, dense, boxes, points, labels, first_previous(prior))
    return honour_clicks(logits, clicks, slices, (4 * row0, 4 * col0), grid_mm)


def grid_spacing(view_mm: tuple[float, float, float], window: Window) -> tuple[float, float, float]:
    """Spacing (mm) of a view's slices and of `window`'s low-res rows and columns."""
    return (view_mm[0], view_mm[1] * window.height / LOW_RES, view_mm[2] * window.width / LOW_RES)


def prior_slices(prior: VoteShare) -> tuple[int, int]:
    """First and last slice a structure's first answer decodes: those its prior reaches, grown by
    SLICE_MARGIN and kept inside the view."""
    present = prior.corner[0] + np.flatnonzero(prior.values.reshape(len(prior.values), -1).max(axis=1) > 0)
    return max(int(present.min()) - SLICE_MARGIN, 0), min(int(present.max()) + SLICE_MARGIN, prior.shape[0] - 1)


def planes(prior: VoteShare, slices: list[int]) -> np.ndarray:
    """The prior on whole slices of the view: (len(slices), rows, cols) float32."""
    low, high = min(slices), max(slices) + 1
    block = prior.region((slice(low, high), slice(0, prior.shape[1]), slice(0, prior.shape[2])))
    return block[[i - low for i in slices]]


def token_box(
    prior: torch.Tensor | None,
    clicks: list[Click],
    roi: np.ndarray | None,
    around: tuple[int, int, int, int] | None = None,
) -> tuple[int, int, int, int]:
    """The crop of the token grid (row0, row1, col0, col1) holding the low-res prior's support,
    the clicks, the roi's box (x0, y0, x1, y1 low-res pixels) and an earlier crop `around`,
    with TOKEN_MARGIN tokens to spare round what is new."""
    rows, cols = [], []
    if prior is not None and (prior > 0).any():
        r, c = torch.nonzero((prior > 0).any(dim=0), as_tuple=True)
        rows += [int(r.min()), int(r.max())]
        cols += [int(c.min()), int(c.max())]
    rows += [click.row for click in clicks]
    cols += [click.col for click in clicks]
    if roi is not None:
        rows += [roi[1], roi[3] - 1]
        cols += [roi[0], roi[2] - 1]
    if not rows:
        raise ValueError("nothing says where the structure is: no prior, click or roi")
    low_row, high_row = int(min(rows)) // 4 - TOKEN_MARGIN, int(max(rows)) // 4 + 1 + TOKEN_MARGIN
    low_col, high_col = int(min(cols)) // 4 - TOKEN_MARGIN, int(max(cols)) // 4 + 1 + TOKEN_MARGIN
    if around is not None:
        low_row, high_row = min(low_row, around[0]), max(high_row, around[1])
        low_col, high_col = min(low_col, around[2]), max(high_col, around[3])
    return max(low_row, 0), min(high_row, TOKENS), max(low_col, 0), min(high_col, TOKENS)


def roi_box(roi: ViewBox | None, window: Window) -> np.ndarray | None:
    """A roi's in-plane extent as a box (x0, y0, x1, y1) of low-res pixel edges, or None."""
    return None if roi is None else to_model_box(roi.rows, roi.cols, window, LOW_RES)


def prior_box(answer: Answer, window: Window) -> np.ndarray | None:
    """The box prompt shared by a structure's slices: the roi, else `support_box` of its prior;
    None without either."""
    if answer.roi is not None:
        return roi_box(answer.roi, window)
    return None if answer.prior is None else support_box(answer.prior, answer.tokens)


def support_box(prior: torch.Tensor, tokens: tuple[int, int, int, int]) -> np.ndarray | None:
    """The box (x0, y0, x1, y1 low-res pixels of the whole grid) round the support of a prior
    (S, rows, cols) on the crop `tokens`, over all its slices, grown by BOX_MARGIN; None where
    it is empty."""
    if not (prior > 0).any():
        return None
    rows, cols = torch.nonzero((prior > 0).any(dim=0), as_tuple=True)
    rows, cols = rows + 4 * tokens[0], cols + 4 * tokens[2]
    box = np.array(
        [
            int(cols.min()) - BOX_MARGIN,
            int(rows.min()) - BOX_MARGIN,
            int(cols.max()) + 1 + BOX_MARGIN,
            int(rows.max()) + 1 + BOX_MARGIN,
        ],
        dtype=np.float32,
    )
    return np.clip(box, 0, LOW_RES)


def point_prompts(
    clicks: list[Click], slices: list[int], scale: float
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """SAM point prompts of the clicks on each slice, (len(slices), N, 2) x, y input pixels with
    labels (len(slices), N), padded with -1; (None, None) when no slice holds a click."""
    on = [[c for c in clicks if c.slice == index] for index in slices]
    count = max(len(c) for c in on)
    if count == 0:
        return None, None
    points = torch.zeros(len(slices), count, 2)
    labels = torch.full((len(slices), count), -1, dtype=torch.int64)
    for row, found in enumerate(on):
        for column, click in enumerate(found):
            points[row, column] = torch.tensor([(click.col + 0.5) * scale - 0.5, (click.row + 0.5) * scale - 0.5])
            labels[row, column] = int(click.foreground)
    return points, labels
