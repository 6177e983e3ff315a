"""What an annotator has prompted so far on one structure, and what a new request asks for.

3D Slicer sends every click of the current segment with each request, not just the newest.
The engine segments from a first prompt and refines with corrective clicks it has not seen,
so each request is compared with the prompts already answered.
"""

from dataclasses import dataclass
from typing import Optional

from brainsam.core.prompts import Click, Prompts
from brainsam.inference.state import Segmentation

SEGMENT, REFINE, UNCHANGED = "segment", "refine", "unchanged"


@dataclass
class Interaction:
    """One annotator's segmentation of one structure on one image: the prompts answered so far
    and the engine's state for them."""

    prompts: Prompts
    state: Segmentation


def plan(previous: Optional[Interaction], prompts: Prompts) -> tuple[str, list[Click], list[Click]]:
    """Decide how to answer `prompts` given the `previous` interaction (None after a reset).

    Returns (SEGMENT, all foreground, all background) to start afresh, (REFINE, new foreground,
    new background) to apply only the clicks the engine has not seen, or (UNCHANGED, [], []).
    """
    everything = (SEGMENT, list(prompts.foreground), list(prompts.background))
    if previous is None or previous.prompts.label != prompts.label or previous.prompts.roi != prompts.roi:
        return everything
    seen_fg, seen_bg = set(previous.prompts.foreground), set(previous.prompts.background)
    if not (seen_fg <= set(prompts.foreground) and seen_bg <= set(prompts.background)):
        # a click was deleted: the engine cannot take a click back, so start again from those left
        return everything
    new_fg = [click for click in prompts.foreground if click not in seen_fg]
    new_bg = [click for click in prompts.background if click not in seen_bg]
    return (REFINE if new_fg or new_bg else UNCHANGED), new_fg, new_bg
