"""The engine facade: configuration, backbone (plus adapter), label set and predictor together.

Clients speak in stored voxel indices and Slicer ROIs; the engine maps them onto the working
view, runs the predictor and hands back canonical masks that `Volume.to_stored` puts on the
image's own grid.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cachetools import LRUCache

from brainsam.atlases.fusion import AtlasFusion, any_label, grown_box
from brainsam.core.config import EngineConfig
from brainsam.core.labels import LabelSet, load_label_set
from brainsam.core.prompts import ViewBox, parse_points, parse_roi, points_to_view
from brainsam.core.view import SliceView, Window
from brainsam.core.volume import Volume, load_volume
from brainsam.inference.atlas_votes import AtlasVotes, votes_of
from brainsam.inference.cache import EmbeddingCache
from brainsam.inference.predictor import Predictor
from brainsam.inference.segmenter import (
    WINDOW_MARGIN_MM,
    WINDOW_SNAP_MM,
    Answer,
    Segmenter,
    grid_spacing,
)
from brainsam.inference.state import PreparedImage, Segmentation
from brainsam.inference.votes import MARGIN as VOTE_MARGIN
from brainsam.inference.votes import VoteShare, correct, first_answer, outside_of
from brainsam.modeling.adapters import load_adapter
from brainsam.modeling.backbones import Backbone, load_backbone
from brainsam.modeling.lora import merge_lora

logger = logging.getLogger(__name__)

PROMPTS_KEPT = 4
"""Images whose atlas prompts (the fusion and its window) the engine keeps."""


@dataclass(frozen=True)
class AtlasPrompt:
    """The registered atlases as the segmenter's prompt on one image: their fusion and the
    deep-brain window their labels imply (every structure of the image shares its embeddings)."""

    fusion: AtlasFusion
    window: Window
    maps: np.ndarray
    corner: tuple[int, int, int]

    @classmethod
    def of(cls, view: SliceView, fusion: AtlasFusion) -> "AtlasPrompt":
        """maps: each atlas's labels on the view, on the box of everything they label (grown by
        as much as a prior's box is, so that it holds every prior's); corner: where the box starts."""
        region = view.to_view(any_label(fusion.propagated))
        box = grown_box(region, VOTE_MARGIN)
        maps = np.stack([view.to_view(labels)[box] for labels in fusion.propagated])
        window = view.window_round(region, WINDOW_MARGIN_MM, WINDOW_SNAP_MM)
        return cls(fusion, window, maps, tuple(b.start for b in box))

    def prior(self, image: PreparedImage, label_id: int, roi: ViewBox | None) -> VoteShare | None:
        """The structure's probability on the view, cut to the roi; None where no atlas has it."""
        probability = image.view.to_view(self.fusion.probability(label_id))
        if roi is not None:
            probability[outside_of(roi.region, probability.shape)] = 0
        return VoteShare.of(probability)

    def votes(self, label_id: int, prior: VoteShare, spacing: tuple[float, float, float]) -> AtlasVotes:
        """Each atlas's vote for the structure on its prior's box (`prior` as `prior` gave it)."""
        return votes_of(self.maps, self.corner, label_id, prior, spacing)


def holds(prior: VoteShare, click: np.ndarray | None, roi: ViewBox | None) -> bool:
    """Whether the atlases' answer is where the annotator points: their probability is above
    zero at the first foreground click, or (without one) inside the roi."""
    if click is not None:
        return prior.region(tuple(slice(int(c), int(c) + 1) for c in click)).item() > 0
    return roi is not None


class Engine:
    """Segments structures of one label set with one backbone and, optionally, one adapter."""

    def __init__(
        self,
        config: EngineConfig,
        labels: LabelSet | None = None,
        adapter: str | Path | None = None,
        cache: EmbeddingCache | None = None,
    ):
        self.config = config
        self.labels = labels or load_label_set()
        self.backbone: Backbone = load_backbone(
            config.backbone, config.checkpoint, config.checkpoint_dir, config.device
        )
        self.manifest: dict | None = None
        identity = config.backbone
        if adapter is not None:
            self.manifest = load_adapter(self.backbone, adapter)
            merge_lora(self.backbone)  # inference only: the base network's compiled graph serves
            identity = f"{config.backbone}+{Path(adapter).name}@{self.manifest.get('created')}"
            logger.info("adapter %s loaded (created %s)", adapter, self.manifest.get("created"))
        self.backbone.eval()
        self.predictor = Predictor(self.backbone, config, cache, identity)
        self._prompts: LRUCache = LRUCache(PROMPTS_KEPT)

    def prepare(self, volume: Volume) -> PreparedImage:
        """Ready a volume for prompting (slice view, field of view)."""
        return self.predictor.prepare(volume)

    def precompute(self, path: str | Path) -> int:
        """Encode into the embedding store the central slices (`precompute_mm`) of the image file
        at `path`, in its default window, skipping the slices stored already; return how many
        were encoded. An image whose recorded slices are all stored is not even read.

        Raises ValueError without a store (`embedding_dir`), StoreFullError when this encoder's
        embeddings fill the store, VolumeError when the file is not a usable 3D image.
        """
        store, identity = self.predictor.store, self.predictor.identity
        if store is None:
            raise ValueError("precomputing embeddings needs a store: set embedding_dir")
        stat = os.stat(path)
        source = f"{Path(path).resolve()}:{stat.st_mtime_ns}:{stat.st_size}"
        if store.recorded(identity, source):
            return 0
        store.check_room(identity)
        image = self.prepare(load_volume(path))
        keys, encoded = self.predictor.precompute(
            image, image.window, image.view.central_slices(self.config.precompute_mm)
        )
        store.record(identity, source, keys)
        return encoded

    def segment(
        self,
        image: PreparedImage,
        label: str,
        foreground: object = None,
        background: object = None,
        roi: object = None,
        atlases: AtlasFusion | None = None,
    ) -> Segmentation | Answer:
        """First answer for structure `label` from stored-index clicks and/or a Slicer ROI.

        atlases: the labelled images registered onto this one (brainsam.atlases.fusion). Their
        probability of the structure prompts the segmenter (brainsam.inference.segmenter) wherever it
        holds the first foreground click (or, without clicks, meets the ROI); elsewhere, and
        without atlases, the model answers from the clicks and box alone (brainsam.inference.predictor).
        With `config.answer` "atlases" their vote answers on its own (brainsam.inference.votes): an ablation.

        Raises KeyError for an unknown label and PromptError for unusable prompts.
        """
        structure = self.labels[label]
        fg, bg = self._clicks(image, foreground, background)
        box = None if roi is None else parse_roi(roi, image.volume, image.view)
        prompt = None if atlases is None else self.atlas_prompt(image, atlases)
        prior = None if prompt is None else prompt.prior(image, structure.id, box)
        if prior is not None and not holds(prior, fg[0] if len(fg) else None, box):
            prior = None
        if prior is None:
            return self.predictor.segment(image, structure.extent_mm, fg, bg, box)
        if self.config.answer == "atlases":
            return self._vote(image, prior, fg, bg, box)
        segmenter = self.segmenter(image, prompt.window)
        points = [(p, True) for p in fg] + [(p, False) for p in bg]
        answer = segmenter.first(prior, [segmenter.to_click(*p) for p in points[:1]], box)
        answer.votes, answer.points = prompt.votes(structure.id, prior, image.view.spacing), points[:1]
        return segmenter.correct_with_atlases(answer, points[1:])

    def refine(
        self, image: PreparedImage, state: Segmentation | Answer, foreground: object = None, background: object = None
    ) -> Segmentation | Answer:
        """Apply corrective stored-index clicks to an earlier answer."""
        fg, bg = self._clicks(image, foreground, background)
        if isinstance(state, Answer):
            segmenter = self.segmenter(image, state.window)
            return segmenter.correct_with_atlases(state, [(p, True) for p in fg] + [(p, False) for p in bg])
        if state.votes is None:
            return self.predictor.refine(image, state, fg, bg)
        return self._correct(image, state, fg, bg)

    def automatic(self, image: PreparedImage, atlases: AtlasFusion) -> dict[str, np.ndarray]:
        """Every structure the atlases hold, answered by the segmenter without a click:
        structure name -> canonical boolean mask."""
        prompt = self.atlas_prompt(image, atlases)
        segmenter = self.segmenter(image, prompt.window)
        out = {}
        for structure in self.labels.structures:
            prior = prompt.prior(image, structure.id, None)
            if prior is not None:
                out[structure.name] = self.canonical_mask(image, segmenter.first(prior, [], None)) > 0
        return out

    def segmenter(self, image: PreparedImage, window: Window) -> Segmenter:
        """The segmenter on `image` in `window`, its slice embeddings from this engine's caches."""

        def embeddings(indices: list[int]) -> torch.Tensor:
            return torch.stack(self.predictor.embeddings(image, window, indices))

        return Segmenter(
            self.backbone,
            window,
            range(image.view.shape[0]),
            grid_spacing(image.view.spacing, window),
            embeddings,
            self.predictor.timings,
            self.predictor.counts,
            bf16=self.predictor.runtime.choice.bf16,
        )

    def atlas_prompt(self, image: PreparedImage, atlases: AtlasFusion) -> AtlasPrompt:
        """The atlases as prompts on `image`, kept while the same fusion is asked again."""
        key = (image.volume.content_hash, id(atlases))
        found = self._prompts.get(key)
        if found is None or found.fusion is not atlases:
            found = self._prompts[key] = AtlasPrompt.of(image.view, atlases)
        return found

    def _vote(
        self,
        image: PreparedImage,
        prior: VoteShare,
        foreground: np.ndarray,
        background: np.ndarray,
        box: ViewBox | None,
    ) -> Segmentation:
        """The atlases' vote answering on its own (the ablation of the segmenter)."""
        answer = first_answer(prior, foreground[0] if len(foreground) else None, box.region if box else None)
        state = self.predictor.adopt(image, answer, foreground[:1], box, prior)
        return (
            self._correct(image, state, foreground[1:], background) if len(foreground) > 1 or len(background) else state
        )

    def _correct(
        self, image: PreparedImage, state: Segmentation, foreground: np.ndarray, background: np.ndarray
    ) -> Segmentation:
        """Corrective view-space clicks applied along the atlases' vote (brainsam.inference.votes),
        kept inside the user's box."""
        mask = state.stack(image.view.shape) > 0
        for point, is_foreground in [(p, True) for p in foreground] + [(p, False) for p in background]:
            other_kind = np.array([click[:3] for click in state.clicks if click[3] != is_foreground], dtype=int)
            correct(
                mask, state.votes, point, is_foreground, image.view.spacing, self.config.vote_radius_mm, keep=other_kind
            )
            state.clicks.append((*map(int, point), int(is_foreground)))
        if state.box is not None:
            mask &= ~outside_of(state.box.region, mask.shape)
        state.paint(mask)
        return state

    def canonical_mask(self, image: PreparedImage, state: Segmentation | Answer) -> np.ndarray:
        """The segmentation as a uint8 mask in canonical (R, A, S) order."""
        return image.view.from_view(state.stack(image.view.shape))

    def stored_mask(self, image: PreparedImage, state: Segmentation | Answer) -> np.ndarray:
        """The segmentation as a uint8 mask on the image's stored grid."""
        return image.volume.to_stored(self.canonical_mask(image, state))

    @staticmethod
    def _clicks(image: PreparedImage, foreground: object, background: object) -> tuple[np.ndarray, np.ndarray]:
        fg = parse_points(foreground, image.volume, "foreground")
        bg = parse_points(background, image.volume, "background")
        return points_to_view(fg, image.volume, image.view), points_to_view(bg, image.volume, image.view)
