"""The structure under a click, for clients that send clicks without naming the structure.

OHIF's MONAI Label panel (monailabel 0.8.5) sends a deepgrow model only `foreground` and
`background` clicks: the segment chosen in its list stays in the browser. brainsam answers one
structure per request, so it names the structure that the atlases registered on the image
already (by uncertainty scoring or the automatic model: `AtlasVotes`) place under the first
foreground click. The first click stays the same while the annotator corrects, so the name is
kept per (image file, first click).
"""

import os
from typing import Any, Hashable, Optional

from cachetools import LRUCache
from fastapi import HTTPException

from brainsam.core.labels import LabelSet
from brainsam.core.volume import VolumeError, load_volume
from lib.infers.atlases import AtlasVotes

NAMES_KEPT = 64


class ClickedStructure:
    """Names the structure under a request's first foreground click (see module doc).

    votes: the registered atlases of the datastore, or None when atlas guidance is off.
    """

    def __init__(self, votes: Optional[AtlasVotes], labels: LabelSet):
        self.votes, self.labels = votes, labels
        self._names: LRUCache[Hashable, str] = LRUCache(NAMES_KEPT)

    def __call__(self, path: str, foreground: Any) -> str:
        """The structure's name; 400 without a usable first click or with atlas guidance off,
        409 while no atlas is registered on the image, 422 where the atlases place no
        structure of the label set."""
        if self.votes is None:
            raise HTTPException(
                400,
                "label must name a structure: this server runs with guide_atlases false, so no registered atlas names the one clicked",
            )
        click = first_click(foreground)
        stat = os.stat(path)
        key = (path, stat.st_mtime_ns, stat.st_size, click)
        name = self._names.get(key)
        if name is None:
            name = self._find(path, click)
            self._names[key] = name
        return name

    def _find(self, path: str, click: tuple[int, int, int]) -> str:
        try:
            volume = load_volume(path)
        except VolumeError as error:
            raise HTTPException(422, str(error)) from error
        if any(not 0 <= c < n for c, n in zip(click, volume.stored_shape)):
            raise HTTPException(
                400, f"foreground click {list(click)} lies outside the image (shape {list(volume.stored_shape)})"
            )
        fusion = self.votes.on(path, volume)
        if fusion is None:
            raise HTTPException(
                409,
                "no structure name was sent (OHIF sends clicks only) and no atlas is registered on this image yet to name the one clicked: wait for the server's background scoring, or run brainsam_auto once, then click again",
            )
        value = int(fusion.labels()[tuple(volume.to_canonical_index(click)[0])])
        names = {structure.id: structure.name for structure in self.labels.structures}
        if value not in names:
            raise HTTPException(
                422,
                f"the atlases place no deep brain structure at {list(click)}: click inside one, or send its name as `label`",
            )
        return names[value]


def first_click(foreground: Any) -> tuple[int, int, int]:
    """The first [i, j, k] of `foreground`; 400 when there is none."""
    try:
        i, j, k = (int(v) for v in foreground[0])
    except (TypeError, ValueError, IndexError, KeyError) as error:
        raise HTTPException(
            400,
            "label must name a structure, or a foreground click lie inside one for the registered atlases to name it: neither was sent",
        ) from error
    return i, j, k
