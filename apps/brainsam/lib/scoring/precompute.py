"""Slice embeddings encoded before anyone clicks, as a MONAI Label scoring method.

MONAI Label runs scoring methods in a Python process of their own at start-up, after every
/activelearning request and after every training run, never on the request path: the place to
encode, for each datastore image without a final label (what *Next Sample* hands out), the
slices where deep brain structures lie, so that a first click finds them in the embedding store.
Labelled images are left out: with many of them the work would never reach the new ones, and a
click on one encodes what it needs, as without precomputation. Images go in the order
`most_uncertain` hands them out, so the one an annotator gets next is ready first; uncertainty
scoring also readies that image after each score (`ready_next`). Each run is incremental: an image whose slices are
stored for the encoder now served is skipped without being read, and after a new adapter is
published the next run (which follows training) encodes for it. The work runs in the
background (lib.background: a click preempts it at once); a bad image is logged and skipped.
"""

import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from brainsam.core.config import EngineConfig
from brainsam.core.labels import LabelSet
from brainsam.inference.store import StoreFullError
from lib.activelearning.most_uncertain import handout_order
from lib.background import lower_priority
from lib.infers.adapters import AdapterWatcher

logger = logging.getLogger(__name__)

BATCH = 1  # slices per encoder call: measured 1.4 GB peak memory against 1.9 GB with 4


class PrecomputeEmbeddings(ScoringMethod):
    """Encodes the central slices (engine setting `precompute_mm`) of every unlabelled datastore
    image into the embedding store, for the encoder (backbone + newest usable adapter) the
    server serves."""

    def __init__(self, config: EngineConfig, labels: LabelSet, adapters: Optional[Path], hold_s: float):
        """hold_s: the strategy's hold (the order images are handed out in, `handout_order`)."""
        super().__init__("Encodes each image's central slices ahead of time, so a first click skips the image encoder")
        self.watcher = AdapterWatcher(config.replace(encode_batch=BATCH), labels, adapters)
        self.hold_s = hold_s

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, int]:
        """Precompute every image in turn, in the order `most_uncertain` hands them out; return
        how many images there are, how many slices were encoded and how many images failed."""
        lower_priority("precompute")
        engine = self.watcher.engine()
        images = handout_order(datastore, self.hold_s)
        logger.info("precompute: %d images for encoder %s", len(images), engine.predictor.identity)
        summary = {"images": len(images), "encoded": 0, "failed": 0}
        began = time.perf_counter()
        for number, image_id in enumerate(images, 1):
            try:
                encoded = engine.precompute(datastore.get_image_uri(image_id))
            except StoreFullError as error:
                logger.warning(
                    "precompute: stopped before %s: %s; raise embedding_disk_mb to precompute more", image_id, error
                )
                break
            except Exception as error:  # a bad image must stop neither the others nor the server
                logger.warning("precompute: skipped %s: %s", image_id, error)
                summary["failed"] += 1
                continue
            summary["encoded"] += encoded
            log = logger.info if encoded else logger.debug  # runs after every /activelearning: stored images stay quiet
            log(
                "precompute: %s: %d slices encoded (%d/%d images, %.0f s)",
                image_id,
                encoded,
                number,
                len(images),
                time.perf_counter() - began,
            )
        return summary

    def ready_next(self, datastore: Datastore) -> int:
        """Precompute the image `most_uncertain` hands out next, if it lacks any slice; return
        how many slices were encoded. A failure is only logged: the run over every image meets
        it again."""
        order = handout_order(datastore, self.hold_s)
        if not order:
            return 0
        began = time.perf_counter()
        try:
            encoded = self.watcher.engine().precompute(datastore.get_image_uri(order[0]))
        except Exception as error:  # scoring goes on whatever the next image holds
            logger.warning("precompute: could not ready %s, the image handed out next: %s", order[0], error)
            return 0
        if encoded:
            logger.info(
                "precompute: %s, the image handed out next: %d slices encoded in %.0f s",
                order[0],
                encoded,
                time.perf_counter() - began,
            )
        return encoded
