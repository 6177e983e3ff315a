"""The 3D predictor: clicks and boxes on an MRI volume in, a 3D mask of one structure out.

`Predictor.segment` answers a first prompt: the seed slice is segmented (a lone click is grown
into a box of the structure's typical size, since box-trained MedSAM models answer boxes far
better than points), then the result is propagated through neighbouring slices.
`Predictor.refine` applies corrective clicks to an existing `Segmentation` and recomputes only
the slices they affect. Slice embeddings come from the cache, or the on-disk store, whenever
possible.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Iterator

import numpy as np
import torch
from scipy import ndimage

from brainsam.core.config import EngineConfig
from brainsam.core.prompts import PromptError, ViewBox, prior_box
from brainsam.core.runtime import Runtime
from brainsam.core.view import (
    SliceView,
    Window,
    paste_pixels,
    resample,
    to_model_box,
    to_model_xy,
)
from brainsam.core.volume import Volume
from brainsam.inference.cache import EmbeddingCache, EmbeddingKey
from brainsam.inference.propagation import (
    SlicePrompt,
    SliceResult,
    StopRule,
    bounding_box,
    grow,
    propagate,
)
from brainsam.inference.state import PreparedImage, Segmentation
from brainsam.inference.store import EmbeddingStore
from brainsam.inference.votes import VoteShare
from brainsam.modeling.backbones import LOW_RES, Backbone


class Predictor:
    """Runs a backbone slice by slice over a volume, caching slice embeddings.

    identity: names the encoder weights (backbone + adapter) in cache keys, so embeddings made
    with another adapter are never reused. With `config.embedding_dir` set, embeddings are also
    kept on disk (`EmbeddingStore`), behind the memory cache.
    """

    def __init__(
        self, backbone: Backbone, config: EngineConfig, cache: EmbeddingCache | None = None, identity: str | None = None
    ):
        self.backbone = backbone
        self.config = config
        self.cache = cache if cache is not None else EmbeddingCache(config.cache_mb << 20)
        self.identity = identity or backbone.name
        self.store = (
            EmbeddingStore(config.embedding_dir, config.embedding_disk_mb << 20) if config.embedding_dir else None
        )
        self.runtime = Runtime.for_device(backbone.device, config.runtime, config.compile_cache, config.interactive)
        self.encode = self.runtime.encoder(backbone.encode)
        self.decode = self.runtime.decoder(backbone.decode)
        self.rule = StopRule(
            min_area=config.min_area_px,
            min_iou=config.stop_iou,
            margin=config.box_margin_px,
            agree_dice=config.agree_dice,
            jump_dice=config.jump_dice,
        )
        self.timings: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile what clicks run, ahead of them (an interactive runtime compiles nothing on a
        click): the encoder on one slice and on a batch, the decoder on a box and on one and
        on two clicks, with the prompts this configuration adds."""
        size = self.backbone.input_size
        with self.runtime.warming():
            for batch in sorted({1, min(2, self.config.encode_batch)}):
                embedding = self.encode(torch.zeros(batch, size, size))[0]
            box = torch.tensor([size / 4, size / 4, size / 2, size / 2])
            mask = torch.zeros(LOW_RES, LOW_RES) if self.config.feed_mask else None
            for count in (1, 2):
                points, labels = torch.full((count, 2), size / 3), torch.ones(count, dtype=torch.int64)
                self.decode(embedding, points, labels, None, mask, multimask=True)
                if self.config.points_with_box:
                    self.decode(embedding, points, labels, box, mask, multimask=False)
            self.decode(embedding, None, None, box, mask, multimask=False)

    def prepare(self, volume: Volume) -> PreparedImage:
        """Slice view along the configured axis and default field of view of a volume."""
        view = SliceView(volume.data, volume.spacing, self.config.axis_for(volume.spacing))
        return PreparedImage(volume, view, view.default_window(self.config.fov_mm))

    @torch.inference_mode()
    def embeddings(self, image: PreparedImage, window: Window, indices: list[int]) -> list[torch.Tensor]:
        """Embeddings of slices `indices` in `window`: from memory, else the store, else encoded
        in batches (and then kept in both)."""
        keys = self._keys(image, window, indices)
        found = {key: self._lookup(key) for key in keys}
        missing = [(i, key) for i, key in zip(indices, keys) if found[key] is None]
        for key, embedding in self._encode(image, window, missing):
            found[key] = embedding
            self.cache.put(key, embedding)
        return [found[key] for key in keys]

    @torch.inference_mode()
    def precompute(self, image: PreparedImage, window: Window, indices: list[int]) -> tuple[list[EmbeddingKey], int]:
        """Encode into the store those of slices `indices` it lacks, leaving the memory cache
        alone; return the keys of all of them and how many were encoded. Needs `self.store`."""
        keys = self._keys(image, window, indices)
        missing = [(i, key) for i, key in zip(indices, keys) if not self.store.contains(key)]
        for _ in self._encode(image, window, missing):
            pass
        return keys, len(missing)

    def _keys(self, image: PreparedImage, window: Window, indices: list[int]) -> list[EmbeddingKey]:
        return [(self.identity, image.volume.content_hash, image.view.axis, i, window.key()) for i in indices]

    def _lookup(self, key: EmbeddingKey) -> torch.Tensor | None:
        """An embedding from memory, else from the store (then kept in memory), else None."""
        embedding = self.cache.get(key)
        if embedding is None and self.store is not None:
            embedding = self.store.get(key)
            if embedding is not None:
                self.counts["stored"] += 1
                self.cache.put(key, embedding)
        return embedding

    def _encode(
        self, image: PreparedImage, window: Window, slices: list[tuple[int, EmbeddingKey]]
    ) -> Iterator[tuple[EmbeddingKey, torch.Tensor]]:
        """Encode (index, key) slices in batches, writing each to the store; yield (key, embedding)."""
        size = self.backbone.input_size
        for start in range(0, len(slices), self.config.encode_batch):
            chunk = slices[start : start + self.config.encode_batch]
            began = time.perf_counter()
            crops = torch.stack([image.view.crop(i, window, size) for i, _ in chunk])
            encoded = self.encode(crops).cpu()
            self.timings["encode"] += time.perf_counter() - began
            self.counts["encode"] += len(chunk)
            for (_, key), embedding in zip(chunk, encoded):
                embedding = embedding.clone()
                if self.store is not None:
                    self.store.put(key, embedding)
                yield key, embedding

    @torch.inference_mode()
    def predict(self, image: PreparedImage, window: Window, index: int, prompt: SlicePrompt) -> SliceResult:
        """Decode one slice's prompt into a full-slice mask, choosing among multimask outputs."""
        (embedding,) = self.embeddings(image, window, [index])
        size = self.backbone.input_size
        began = time.perf_counter()
        points = labels = box = None
        if len(prompt.points):
            points = torch.as_tensor(to_model_xy(prompt.points[:, 0], prompt.points[:, 1], window, size))
            labels = torch.as_tensor(prompt.labels)
        if prompt.box is not None:
            box = torch.as_tensor(to_model_box(prompt.box[0], prompt.box[1], window, size))
        multimask = box is None
        logits, iou = self.decode(embedding, points, labels, box, prompt.mask_logits, multimask=multimask)
        choice = self._choose(logits, iou, window, prompt)
        patch = resample(logits[choice], (window.height, window.width)).numpy() > 0
        mask = np.zeros(image.view.shape[1:], dtype=bool)
        paste_pixels(mask, patch, window)
        self.timings["decode"] += time.perf_counter() - began
        self.counts["decode"] += 1
        return SliceResult(mask, logits[choice].cpu(), float(iou[choice]))

    def _choose(self, logits: torch.Tensor, iou: torch.Tensor, window: Window, prompt: SlicePrompt) -> int:
        """Index of the candidate mask that honours the most clicks, ties broken by predicted IoU."""
        if logits.shape[0] == 1 or not len(prompt.points):
            return int(iou.argmax())
        size = logits.shape[-1]
        xy = np.clip(
            np.round(to_model_xy(prompt.points[:, 0], prompt.points[:, 1], window, size)).astype(int), 0, size - 1
        )
        inside = (logits[:, xy[:, 1], xy[:, 0]] > 0).numpy()
        honoured = (inside == (prompt.labels[None] == 1)).sum(axis=1)
        return int(np.lexsort((iou.numpy(), honoured))[-1])

    def segment(
        self,
        image: PreparedImage,
        extent_mm: tuple[float, float, float],
        foreground: np.ndarray,
        background: np.ndarray,
        box: ViewBox | None = None,
    ) -> Segmentation:
        """First answer for a structure from view-space clicks (N, 3) and/or a box.

        extent_mm: the structure's typical size (R, A, S), used to grow a lone click into a box.
        """
        if box is None and len(foreground) == 0:
            raise PromptError("give at least one foreground click or an roi")
        seed_point = foreground[0] if len(foreground) else None
        if box is not None:
            region = box
            seed_slice = (
                int(seed_point[0])
                if seed_point is not None and box.slices[0] <= seed_point[0] <= box.slices[1]
                else box.centre_slice
            )
        else:
            region = prior_box(seed_point, extent_mm, image.view, self.config.extent_scale)
            seed_slice = int(seed_point[0])
        window = image.view.window_for(image.window, region.rows, region.cols)
        limits = (
            box.slices
            if box is not None
            else prior_box(seed_point, extent_mm, image.view, self.config.walk_scale).slices
        )
        state = Segmentation(window=window, box=box, limits=limits, seed=seed_slice)
        state.clicks = [(*map(int, p), 1) for p in foreground] + [(*map(int, p), 0) for p in background]
        seed = self._seed(image, state, seed_slice, (region.rows, region.cols))
        if seed is None:
            return state
        state.slices[seed_slice] = seed
        self._walk_from(image, state, seed_slice)
        return state

    def adopt(
        self,
        image: PreparedImage,
        mask: np.ndarray,
        foreground: np.ndarray,
        box: ViewBox | None,
        votes: VoteShare | None,
    ) -> Segmentation:
        """First answer taken from a non-empty view-space mask found without the model (the
        atlases'), for the view-space clicks (N, 3) and box that asked for it; `votes` guide
        its corrections (brainsam.inference.votes)."""
        present = np.flatnonzero(mask.any(axis=(1, 2)))
        rows, cols = bounding_box(mask.any(axis=0))
        seed = int(foreground[0][0]) if len(foreground) else int(present[len(present) // 2])
        state = Segmentation(
            window=image.view.window_for(image.window, rows, cols),
            box=box,
            limits=(int(present[0]), int(present[-1])),
            seed=seed,
            votes=votes,
        )
        state.clicks = [(*map(int, p), 1) for p in foreground]
        state.paint(mask)
        return state

    def refine(
        self, image: PreparedImage, state: Segmentation, foreground: np.ndarray, background: np.ndarray
    ) -> Segmentation:
        """Apply corrective clicks (view-space (N, 3)) to `state`; only affected slices change."""
        new = [(*map(int, p), 1) for p in foreground] + [(*map(int, p), 0) for p in background]
        state.clicks.extend(new)
        for index in sorted({click[0] for click in new}):
            state.limits = (min(state.limits[0], index), max(state.limits[1], index))
            current = state.slices.get(index)
            box = self._corrected_box(image, state, index, current)
            result = self._predict_with_clicks(image, state, index, box, current)
            if result.area < self.rule.min_area:
                state.slices.pop(index, None)
                self._truncate_after_empty(state, index)
                continue
            state.slices[index] = result
            self._walk_from(image, state, index)
        return state

    def _seed(self, image: PreparedImage, state: Segmentation, index: int, box: tuple) -> SliceResult | None:
        """Segment the seed slice: the prior or user box, then re-boxed around its own answer."""
        result = self._predict_with_clicks(image, state, index, box, None)
        for _ in range(self.config.seed_refinements):
            if result.area < self.rule.min_area:
                break
            tight = grow(bounding_box(result.mask), self.rule.margin, self._clamp(state))
            refined = self._predict_with_clicks(image, state, index, tight, result)
            result = refined if refined.area >= self.rule.min_area else result
        return result if result.area >= self.rule.min_area else None

    def _predict_with_clicks(
        self, image: PreparedImage, state: Segmentation, index: int, box: tuple | None, earlier: SliceResult | None
    ) -> SliceResult:
        """Predict slice `index` with `box`, the clicks on it and, if configured, `earlier`'s logits.

        A background click the model does not honour must hold all the same: the mask is cut
        to the box where the box excludes the click (the part beyond the box's edge goes),
        otherwise the largest disc round the click that fits in the mask goes. (Removing the
        whole connected piece would erase the structure, which a spill is usually joined to.)
        """
        on_slice = [c for c in state.clicks if c[0] == index]
        points = np.array([[c[1], c[2]] for c in on_slice], dtype=np.int64).reshape(-1, 2)
        labels = np.array([c[3] for c in on_slice], dtype=np.int64)
        prompted = box is None or self.config.points_with_box
        mask_logits = earlier.logits if (earlier is not None and self.config.feed_mask) else None
        prompt = SlicePrompt(box, points if prompted else points[:0], labels if prompted else labels[:0], mask_logits)
        result = self.predict(image, state.window, index, prompt)
        for row, col in points[labels == 0]:
            if not result.mask[row, col]:
                continue
            if box is not None and not (box[0][0] <= row <= box[0][1] and box[1][0] <= col <= box[1][1]):
                inside = np.zeros_like(result.mask)
                inside[max(box[0][0], 0) : box[0][1] + 1, max(box[1][0], 0) : box[1][1] + 1] = True
                result.mask &= inside
            else:
                result.mask &= ~_inscribed_disc(result.mask, row, col)
        return result

    def _corrected_box(
        self, image: PreparedImage, state: Segmentation, index: int, current: SliceResult | None
    ) -> tuple:
        """Box for a slice that received clicks: its current box grown to hold foreground clicks
        and shrunk to exclude background clicks; a prior-sized box where nothing was found."""
        clicks = [c for c in state.clicks if c[0] == index]
        base = bounding_box(current.mask) if current is not None else self._neighbour_box(state, index)
        (r0, r1), (c0, c1) = base
        for _, row, col, label in clicks:
            if label == 1:
                r0, r1, c0, c1 = min(r0, row), max(r1, row), min(c0, col), max(c1, col)
        for _, row, col, label in clicks:
            inside = r0 <= row <= r1 and c0 <= col <= c1
            if label == 0 and inside:
                cuts = {"top": row + 1 - r0, "bottom": r1 - row + 1, "left": col + 1 - c0, "right": c1 - col + 1}
                side = min(cuts, key=cuts.get)
                if cuts[side] < 0.5 * max(r1 - r0 + 1, c1 - c0 + 1):
                    r0, r1, c0, c1 = {
                        "top": (row + 1, r1, c0, c1),
                        "bottom": (r0, row - 1, c0, c1),
                        "left": (r0, r1, col + 1, c1),
                        "right": (r0, r1, c0, col - 1),
                    }[side]
        return grow(((r0, r1), (c0, c1)), self.rule.margin, self._clamp(state))

    def _neighbour_box(self, state: Segmentation, index: int) -> tuple:
        """Box of the nearest slice that has a result, or a small box round the slice's clicks."""
        if state.slices:
            nearest = min(state.slices, key=lambda k: abs(k - index))
            return bounding_box(state.slices[nearest].mask)
        rows = [c[1] for c in state.clicks if c[0] == index]
        cols = [c[2] for c in state.clicks if c[0] == index]
        return (min(rows) - 4, max(rows) + 4), (min(cols) - 4, max(cols) + 4)

    def _walk_from(self, image: PreparedImage, state: Segmentation, index: int) -> None:
        """Propagate from slice `index` both ways to the end of the allowed range or to the
        next slice holding clicks (the user's word there stands), whichever comes first. Only
        a walk away from the seed with no clicked slice ahead may erase what lies beyond its end."""

        def predict(slice_index: int, prompt: SlicePrompt) -> SliceResult:
            return self._predict_with_clicks(image, state, slice_index, prompt.box, prompt.earlier)

        clamp = self._clamp(state)
        clicked = {click[0] for click in state.clicks} | {state.seed}
        for step, limit in ((+1, state.limits[1]), (-1, state.limits[0])):
            ahead = [k for k in clicked if (k - index) * step > 0]
            anchor = min(ahead, key=lambda k: abs(k - index)) if ahead else None
            if anchor is not None:
                limit = anchor - step
            outward = anchor is None and (index - state.seed) * step >= 0
            propagate(predict, state.slices, index, step, limit, self.rule, clamp, outward=outward)

    def _truncate_after_empty(self, state: Segmentation, index: int) -> None:
        """After a slice was emptied, drop the slices beyond it, away from the seed: the
        structure cannot skip a slice on its way out."""
        step = np.sign(index - state.seed)
        for key in [k for k in state.slices if step and (k - index) * step > 0]:
            del state.slices[key]

    @staticmethod
    def _clamp(state: Segmentation) -> tuple | None:
        return (state.box.rows, state.box.cols) if state.box is not None else None


def _inscribed_disc(mask: np.ndarray, row: int, col: int) -> np.ndarray:
    """The largest disc centred on pixel (row, col) of a 2D mask that the mask contains
    (at least the pixel itself), as a boolean array of the mask's shape."""
    radius = max(float(ndimage.distance_transform_edt(mask)[row, col]), 1.0)
    rows, cols = np.ogrid[: mask.shape[0], : mask.shape[1]]
    return (rows - row) ** 2 + (cols - col) ** 2 < radius**2
