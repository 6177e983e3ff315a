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
    ) -> Segmentation:
        """First answer for structure `label` from stored-index clicks and/or a Slicer ROI.

        Raises KeyError for an unknown label and PromptError for unusable prompts.
        """
        structure = self.labels[label]
        fg, bg = self._clicks(image, foreground, background)
        box = None if roi is None else parse_roi(roi, image.volume, image.view)
        return self.predictor.segment(image, structure.extent_mm, fg, bg, box)

    def refine(self, image: PreparedImage, state: Segmentation, foreground: object = None, background: object = None) -> Segmentation:
        """Apply corrective stored-index clicks to an earlier segmentation."""
        fg, bg = self._clicks(image, foreground, background)
        return self.predictor.refine(image, state, fg, bg)

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

