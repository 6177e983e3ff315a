"""What an annotator has prompted so far on one structure, and what a new request asks for.

3D Slicer sends every click of the current segment with each request, not just the newest.
The engine segments from a first prompt and refines with corrective clicks it has not seen,
so each request is compared with the prompts already answered.
"""

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, Hashable, Optional, TypeVar

from brainsam.predictor import Segmentation

Click = tuple[int, int, int]
Value = TypeVar("Value")

SEGMENT, REFINE, UNCHANGED = "segment", "refine", "unchanged"


@dataclass(frozen=True)
class Prompts:
    """The prompts of one request: structure name, every click so far (stored voxel indices,
    duplicates removed) and the roi as sent ([i_min, i_max, j_min, j_max, k_min, k_max]) or None."""

    label: str
    foreground: tuple[Click, ...]
    background: tuple[Click, ...]
    roi: Optional[tuple[float, ...]]


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


class Lru(Generic[Value]):
    """A map holding at most `size` entries, forgetting the least recently used one first."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[Hashable, Value] = OrderedDict()

    def get(self, key: Hashable) -> Optional[Value]:
        """The value under `key` (now the most recently used), or None."""
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: Hashable, value: Value) -> None:
        """Store `value` under `key`, forgetting the oldest entry beyond `size`."""
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
