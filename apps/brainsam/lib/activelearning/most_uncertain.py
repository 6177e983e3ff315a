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
from typing import Any, Dict, List, Optional

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

logger = logging.getLogger(__name__)

KEY = "uncertainty"
"""Where the `uncertainty` scoring method stores its values in each image's info."""


class MostUncertain(Strategy):
    """Returns the unlabelled image with the highest uncertainty that nobody was handed recently."""

    def __init__(self, hold_s: float):
        super().__init__("Unlabelled image the automatic model is least sure of, not handed to anyone recently")
        self.hold_s = hold_s

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Optional[Dict[str, Any]]:
        order = handout_order(datastore, self.hold_s)
        if not order:
            return None
        chosen, info = order[0], datastore.get_image_info(order[0])
        if time.time() - last_handed_out(info) < self.hold_s:
            logger.info("most_uncertain: every unlabelled image is held; %s was handed out longest ago", chosen)
        else:
            logger.info("most_uncertain: %s (uncertainty %s) for %s", chosen, score(info), request.get("client_id"))
        return {"id": chosen, "uncertainty": score(info)}


def handout_order(datastore: Datastore, hold_s: float) -> List[str]:
    """The unlabelled images in the order the strategy would hand them out if asked again and
    again now: those nobody was handed in the last `hold_s` seconds first, scored before
    unscored, the most uncertain first (ties: the greater id); then the held ones, handed out
    longest ago first. Scoring prepares images in this order (lib.scoring)."""
    now = time.time()
    infos = {image_id: datastore.get_image_info(image_id) for image_id in datastore.get_unlabeled_images()}
    handed = {image_id: last_handed_out(info) for image_id, info in infos.items()}
    free = [i for i in infos if now - handed[i] >= hold_s]
    held = sorted((i for i in infos if now - handed[i] < hold_s), key=lambda i: (handed[i], i))
    return sorted(free, key=lambda i: (score(infos[i]) is not None, score(infos[i]) or 0.0, i), reverse=True) + held


def score(info: Dict[str, Any]) -> Optional[float]:
    """The image's uncertainty as the scoring method stored it, or None."""
    value = (info.get(KEY) or {}).get("score")
    return float(value) if isinstance(value, (int, float)) else None


def last_handed_out(info: Dict[str, Any]) -> float:
    """When the image was last returned by any strategy (0 if never)."""
    stamps = [entry.get("ts", 0) for entry in (info.get("strategy") or {}).values() if isinstance(entry, dict)]
    return float(max(stamps, default=0))
