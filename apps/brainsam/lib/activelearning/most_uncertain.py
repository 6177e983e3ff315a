"""The `most_uncertain` strategy: the next image to label is the one the automatic model is
least sure of.

Reads the values the `uncertainty` scoring method writes into each image's info. Images with a
final label are never returned. An image handed out (by any strategy: MONAI Label records
`strategy.<name>.ts` and `client_id` on every /activelearning answer) less than `hold_s` ago is
skipped, so two annotators asking in turn get different images; when every unlabelled image is
held, the one handed out longest ago comes back. Images not scored yet come after scored ones.
"""

import logging
import time
from typing import Any, Dict, Optional

from lib.scoring.uncertainty import KEY

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

logger = logging.getLogger(__name__)


class MostUncertain(Strategy):
    """Returns the unlabelled image with the highest uncertainty that nobody was handed recently."""

    def __init__(self, hold_s: float):
        super().__init__("Unlabelled image the automatic model is least sure of, not handed to anyone recently")
        self.hold_s = hold_s

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Optional[Dict[str, Any]]:
        images = datastore.get_unlabeled_images()
        if not images:
            return None
        now = time.time()
        infos = {image_id: datastore.get_image_info(image_id) for image_id in images}
        handed = {image_id: last_handed_out(info) for image_id, info in infos.items()}
        free = [image_id for image_id in images if now - handed[image_id] >= self.hold_s]
        if not free:
            chosen = min(images, key=lambda image_id: handed[image_id])
            logger.info("most_uncertain: every unlabelled image is held; %s was handed out longest ago", chosen)
            return {"id": chosen, "uncertainty": score(infos[chosen])}
        chosen = max(free, key=lambda image_id: (score(infos[image_id]) is not None, score(infos[image_id]) or 0.0, image_id))
        logger.info("most_uncertain: %s (uncertainty %s) for %s; %d of %d unlabelled images held", chosen, score(infos[chosen]), request.get("client_id"), len(images) - len(free), len(images))
        return {"id": chosen, "uncertainty": score(infos[chosen])}


def score(info: Dict[str, Any]) -> Optional[float]:
    """The image's uncertainty as the scoring method stored it, or None."""
    value = (info.get(KEY) or {}).get("score")
    return float(value) if isinstance(value, (int, float)) else None


def last_handed_out(info: Dict[str, Any]) -> float:
    """When the image was last returned by any strategy (0 if never)."""
    stamps = [entry.get("ts", 0) for entry in (info.get("strategy") or {}).values() if isinstance(entry, dict)]
    return float(max(stamps, default=0))
