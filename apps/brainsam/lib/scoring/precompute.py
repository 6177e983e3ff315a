"""Slice embeddings encoded before anyone clicks, as a MONAI Label scoring method.

MONAI Label runs scoring methods in a Python process of their own at start-up, after every
/activelearning request and after every training run, never on the request path: the place to
encode, for each datastore image without a final label (what *Next Sample* hands out), the
slices where deep brain structures lie, so that a first click finds them in the embedding store.
Labelled images are left out: with many of them the work would never reach the new ones, and a
click on one encodes what it needs, as without precomputation. Each run is incremental: an image whose slices are
stored for the encoder now served is skipped without being read, and after a new adapter is
published the next run (which follows training) encodes for it. The work runs on one thread
at lower priority, so clicks on the same CPU stay responsive; a bad image is logged and skipped.
"""

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from brainsam.config import EngineConfig
from brainsam.labels import LabelSet
from brainsam.store import StoreFullError
from lib.infers.adapters import AdapterWatcher

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

logger = logging.getLogger(__name__)

THREADS = 1  # of the 2 cores the project's CPU target has, one stays for clicks
BATCH = 1  # slices per encoder call: measured 1.4 GB peak memory against 1.9 GB with 4
NICENESS = 10
TASK_MODULE = "monailabel.interfaces.utils.app"  # what MONAI Label runs scoring subprocesses as


class PrecomputeEmbeddings(ScoringMethod):
    """Encodes the central slices (engine setting `precompute_mm`) of every unlabelled datastore
    image into the embedding store, for the encoder (backbone + newest usable adapter) the
    server serves."""

    def __init__(self, config: EngineConfig, labels: LabelSet, adapters: Optional[Path]):
        super().__init__("Encodes each image's central slices ahead of time, so a first click skips the image encoder")
        self.watcher = AdapterWatcher(config.replace(encode_batch=BATCH), labels, adapters)

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, int]:
        """Precompute every image in turn; return how many images there are, how many slices
        were encoded and how many images failed."""
        lower_priority()
        engine = self.watcher.engine()
        images = sorted(datastore.get_unlabeled_images())
        logger.info("precompute: %d images for encoder %s", len(images), engine.predictor.identity)
        summary = {"images": len(images), "encoded": 0, "failed": 0}
        began = time.perf_counter()
        for number, image_id in enumerate(images, 1):
            try:
                encoded = engine.precompute(datastore.get_image_uri(image_id))
            except StoreFullError as error:
                logger.warning("precompute: stopped before %s: %s; raise embedding_disk_mb to precompute more", image_id, error)
                break
            except Exception as error:  # a bad image must stop neither the others nor the server
                logger.warning("precompute: skipped %s: %s", image_id, error)
                summary["failed"] += 1
                continue
            summary["encoded"] += encoded
            log = logger.info if encoded else logger.debug  # runs after every /activelearning: stored images stay quiet
            log("precompute: %s: %d slices encoded (%d/%d images, %.0f s)", image_id, encoded, number, len(images), time.perf_counter() - began)
        return summary


def lower_priority() -> None:
    """Leave the CPU to interactive requests: one torch thread and a higher niceness, set before
    the engine runs anything. Only in MONAI Label's task subprocess: run synchronously inside
    the server (`run_sync`), the server keeps its priority and threads."""
    main = getattr(sys.modules["__main__"], "__spec__", None)
    if getattr(main, "name", None) != TASK_MODULE:
        logger.info("precompute: running inside the server process, priority left unchanged")
        return
    torch.set_num_threads(THREADS)
    os.nice(NICENESS)

