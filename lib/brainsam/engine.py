"""The engine facade: configuration, backbone (plus adapter), label set and predictor together.

Clients speak in stored voxel indices and Slicer ROIs; the engine maps them onto the working
view, runs the predictor and hands back canonical masks that `Volume.to_stored` puts on the
image's own grid.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .adapters import load_adapter
from .backbones import Backbone, load_backbone
from .cache import EmbeddingCache
from .config import EngineConfig
from .labels import LabelSet, load_label_set
from .predictor import PreparedImage, Predictor, Segmentation
from .prompts import parse_points, parse_roi, points_to_view
from .volume import Volume, load_volume
from .votes import VoteShare, correct, first_answer, outside_of

logger = logging.getLogger(__name__)


class Engine:
    """Segments structures of one label set with one backbone and, optionally, one adapter."""

    def __init__(self, config: EngineConfig, labels: LabelSet | None = None, adapter: str | Path | None = None, cache: EmbeddingCache | None = None):
        self.config = config
        self.labels = labels or load_label_set()
        self.backbone: Backbone = load_backbone(config.backbone, config.checkpoint, config.checkpoint_dir, config.device)
        self.manifest: dict | None = None
        identity = config.backbone
        if adapter is not None:
            self.manifest = load_adapter(self.backbone, adapter)
            identity = f"{config.backbone}+{Path(adapter).name}@{self.manifest.get('created')}"
            logger.info("adapter %s loaded (created %s)", adapter, self.manifest.get("created"))
        self.backbone.eval()
        self.predictor = Predictor(self.backbone, config, cache, identity)

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
        keys, encoded = self.predictor.precompute(image, image.window, image.view.central_slices(self.config.precompute_mm))
        store.record(identity, source, keys)
        return encoded

    def segment(
        self,
        image: PreparedImage,
        label: str,
        foreground: object = None,
        background: object = None,
        roi: object = None,
        votes: np.ndarray | None = None,
    ) -> Segmentation:
        """First answer for structure `label` from stored-index clicks and/or a Slicer ROI.

        votes: canonical probability per voxel of the structure by registered atlases
        (brainsam.fusion.AtlasFusion.probability). Where its majority (above 1/2) holds the
        first foreground click (or, without clicks, meets the ROI), its piece there is the
        first answer, later clicks correct it along the vote (brainsam.votes); elsewhere the
        model answers.

        Raises KeyError for an unknown label and PromptError for unusable prompts.
        """
        structure = self.labels[label]
        fg, bg = self._clicks(image, foreground, background)
        box = None if roi is None else parse_roi(roi, image.volume, image.view)
        guide = None if votes is None else VoteShare.of(image.view.to_view(votes))
        answer = None if guide is None else first_answer(guide, fg[0] if len(fg) else None, box.region if box else None)
        if answer is None:
            return self.predictor.segment(image, structure.extent_mm, fg, bg, box)
        state = self.predictor.adopt(image, answer, fg[:1], box, guide)
        return self._correct(image, state, fg[1:], bg) if len(fg) > 1 or len(bg) else state

    def refine(self, image: PreparedImage, state: Segmentation, foreground: object = None, background: object = None) -> Segmentation:
        """Apply corrective stored-index clicks to an earlier segmentation."""
        fg, bg = self._clicks(image, foreground, background)
        if state.votes is None:
            return self.predictor.refine(image, state, fg, bg)
        return self._correct(image, state, fg, bg)

    def _correct(self, image: PreparedImage, state: Segmentation, foreground: np.ndarray, background: np.ndarray) -> Segmentation:
        """Corrective view-space clicks applied along the atlases' vote (brainsam.votes),
        kept inside the user's box."""
        mask = state.stack(image.view.shape) > 0
        for point, is_foreground in [(p, True) for p in foreground] + [(p, False) for p in background]:
            other_kind = np.array([click[:3] for click in state.clicks if click[3] != is_foreground], dtype=int)
            correct(mask, state.votes, point, is_foreground, image.view.spacing, self.config.vote_radius_mm, keep=other_kind)
            state.clicks.append((*map(int, point), int(is_foreground)))
        if state.box is not None:
            mask &= ~outside_of(state.box.region, mask.shape)
        state.paint(mask)
        return state

    def canonical_mask(self, image: PreparedImage, state: Segmentation) -> np.ndarray:
        """The segmentation as a uint8 mask in canonical (R, A, S) order."""
        return image.view.from_view(state.stack(image.view.shape))

    def stored_mask(self, image: PreparedImage, state: Segmentation) -> np.ndarray:
        """The segmentation as a uint8 mask on the image's stored grid."""
        return image.volume.to_stored(self.canonical_mask(image, state))

    @staticmethod
    def _clicks(image: PreparedImage, foreground: object, background: object) -> tuple[np.ndarray, np.ndarray]:
        fg = parse_points(foreground, image.volume, "foreground")
        bg = parse_points(background, image.volume, "background")
        return points_to_view(fg, image.volume, image.view), points_to_view(bg, image.volume, image.view)


