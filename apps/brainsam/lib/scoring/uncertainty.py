"""How unsure the automatic model is on each unlabelled image, as a MONAI Label scoring method.

For every image without a final label, the automatic first pass (brainsam.inference.auto: the segmenter
prompted by the registered atlases) runs and its per-structure and per-image uncertainty are
written into the image's datastore info under `uncertainty`: {score, structures, model, image,
atlases, seconds}. A structure's uncertainty is the atlases' and the segmenter's disagreement
with the result; the image's, how poorly the atlases fit it. Registering the atlases and
encoding the slices the segmenter reads also readies the image for clicks.

Incremental: an image whose stored values were computed for the same atlas set and adapter and
the same image file is skipped. Ordered: images are scored in the order `most_uncertain` hands
them out, so the image an annotator gets next is ready first (without atlas guidance, the head
window of the image handed out next is precomputed after each score). Bounded: one run stops starting new images after
`budget_s`, the next run (after each /activelearning and after training) goes on. It runs in the
background, like precomputation.
"""

import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from brainsam.core.config import EngineConfig
from brainsam.core.labels import LabelSet
from brainsam.core.volume import load_volume
from brainsam.inference.auto import first_pass
from lib.activelearning.most_uncertain import KEY, handout_order
from lib.background import lower_priority
from lib.infers.adapters import AdapterWatcher
from lib.infers.atlases import AtlasPool, fingerprint

logger = logging.getLogger(__name__)


class UncertaintyScoring(ScoringMethod):
    """Scores every unlabelled image with the automatic model's uncertainty (see module doc)."""

    def __init__(
        self,
        config: EngineConfig,
        labels: LabelSet,
        adapters: Optional[Path],
        atlases: AtlasPool,
        cache: Path,
        budget_s: float,
        hold_s: float,
        ready_next: Optional[Callable[[Datastore], object]] = None,
    ):
        """hold_s: the strategy's hold (the order images are handed out in). ready_next: called
        after each image is scored, readies the image handed out next (precomputation)."""
        super().__init__(
            "Uncertainty of the automatic model on each unlabelled image (atlas and segmenter disagreement)"
        )
        self.watcher = AdapterWatcher(config, labels, adapters)
        self.labels = labels
        self.pool = atlases
        self.cache = cache
        self.budget_s = budget_s
        self.hold_s = hold_s
        self.ready_next = ready_next

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, int]:
        """Score the images whose values are missing or stale, until the time budget is spent;
        return how many were scored, skipped as current, failed, and left for the next run."""
        lower_priority("uncertainty")
        began = time.perf_counter()
        subjects = self.pool.subjects(datastore)
        model = f"{self.pool.signature(subjects)}+{self._adapter()}"
        pending = stale_images(datastore, model, self.hold_s)
        summary = {"scored": 0, "current": len(datastore.get_unlabeled_images()) - len(pending), "failed": 0, "left": 0}
        logger.info("uncertainty: %d images to score with %d atlases", len(pending), max(len(subjects), 1))
        for number, image_id in enumerate(pending):
            if time.perf_counter() - began > self.budget_s:
                summary["left"] = len(pending) - number
                logger.info(
                    "uncertainty: time budget (%.0f s) spent, %d images left for the next run",
                    self.budget_s,
                    summary["left"],
                )
                break
            try:
                values = self._score(datastore, image_id, subjects)
            except Exception as error:  # a bad image must stop neither the others nor the server
                logger.warning("uncertainty: skipped %s: %s", image_id, error)
                summary["failed"] += 1
                continue
            write_info(datastore, image_id, {**values, "model": model})
            summary["scored"] += 1
            logger.info(
                "uncertainty: %s: %.3f (%d/%d, %.0f s)",
                image_id,
                values["score"],
                number + 1,
                len(pending),
                time.perf_counter() - began,
            )
            if self.ready_next is not None:  # a score changes which image is handed out next
                self.ready_next(datastore)
        return summary

    def _adapter(self) -> str:
        """Name of the adapter the segmenter runs with now (loading the engine picks the newest)."""
        self.watcher.engine()
        return self.watcher.serving.name if self.watcher.serving else "base"

    def _score(self, datastore: Datastore, image_id: str, subjects: list) -> Dict[str, Any]:
        path = datastore.get_image_uri(image_id)
        started = time.perf_counter()
        result = first_pass(
            self.pool.atlases(subjects), load_volume(path), self.labels, self.watcher.engine(), cache=self.cache
        )
        return {
            "score": round(result.image_uncertainty, 4),
            "structures": {name: round(value, 4) for name, value in result.uncertainty.items()},
            "image": fingerprint(Path(path)),
            "atlases": max(len(subjects), 1),
            "seconds": round(time.perf_counter() - started, 1),
        }


def stale_images(datastore: Datastore, model: str, hold_s: float) -> List[str]:
    """Unlabelled images whose values are missing or were computed for another model or image
    file, in the order `most_uncertain` hands images out (see `handout_order`): the image an
    annotator gets next is scored, and readied, first."""
    pending = []
    for image_id in handout_order(datastore, hold_s):
        stored = datastore.get_image_info(image_id).get(KEY) or {}
        try:
            current = stored.get("model") == model and stored.get("image") == fingerprint(
                Path(datastore.get_image_uri(image_id))
            )
        except OSError:
            current = False
        if not current:
            pending.append(image_id)
    return pending


def write_info(datastore: Datastore, image_id: str, values: Dict[str, Any]) -> None:
    """Store `values` under KEY in the image's info. The datastore file is rewritten whole by
    every writer, so it is read again first: what the server wrote meanwhile (labels saved,
    images handed out) is kept."""
    reload = getattr(datastore, "_init_from_datastore_file", None)
    if reload is not None:
        reload()
    datastore.update_image_info(image_id, {KEY: values})
