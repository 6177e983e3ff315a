"""The atlases the automatic model registers: the datastore's labelled images, else the built-in one.

Every image with a final label is an atlas (its labels read as the train task reads them:
through Slicer's segment names, else the label set's ids). Without any, the built-in Colin27
atlas (brainsam.atlases.prior) stands in. Atlases stay in memory while their files are unchanged.
`AtlasVotes` hands the interactive model the registrations made already (by uncertainty
scoring or the automatic model), never registering on a click.
"""

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Hashable, List, Optional

from cachetools import LRUCache
from monailabel.interfaces.datastore import Datastore

from brainsam.atlases.atlas import Atlas, load_atlas
from brainsam.atlases.fusion import AtlasFusion, with_borders
from brainsam.atlases.prior import builtin_atlas
from brainsam.atlases.registration import RegistrationSettings, cached
from brainsam.atlases.trust import trusted
from brainsam.core.labels import LabelSet
from brainsam.core.volume import Volume
from brainsam.io.subjects import Subject
from lib.trainers.brainsam import labelled_subjects

logger = logging.getLogger(__name__)

BUILTIN = "builtin"
IMAGES_KEPT = 3
"""Images whose atlas fusions stay in memory (5 label maps of a 1 mm head and their disputes: 85 MB)."""


def fingerprint(*paths: Path) -> str:
    """Digest of the paths, modification times and sizes of files: a changed file changes it."""
    digest = hashlib.blake2b(digest_size=8)
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{Path(path).resolve()}:{stat.st_mtime_ns}:{stat.st_size};".encode())
    return digest.hexdigest()


class AtlasPool:
    """Atlases for one label set drawn from a datastore.

    most: the largest number of atlases registered per image (each costs ~4-6 CPU s once the
    image is placed on the reference brain, ~7 CPU s at 1 mm, once per image: brainsam.atlases.reference);
    with more labelled images, the most recently labelled ones are used.
    """

    def __init__(self, labels: LabelSet, most: int):
        self.labels = labels
        self.most = most
        self._loaded: LRUCache[Hashable, Atlas] = LRUCache(most + 1)
        self._lock = threading.Lock()  # the interactive and the automatic model share the pool

    def subjects(self, datastore: Datastore, exclude: Optional[str] = None) -> List[Subject]:
        """The labelled images serving as atlases (not `exclude`, the image being segmented)."""
        subjects = [s for s in labelled_subjects(datastore, self.labels) if s.name != exclude and s.ids]
        subjects.sort(key=lambda s: os.stat(s.labels).st_mtime_ns)
        return subjects[-self.most :]

    def signature(self, subjects: List[Subject]) -> str:
        """What the atlas set is: changes when a label is added, replaced or removed."""
        if not subjects:
            return BUILTIN
        return fingerprint(*(path for s in subjects for path in (s.image, s.labels)))

    def atlases(self, subjects: List[Subject]) -> List[Atlas]:
        """The atlases of `subjects`, or the built-in one when there are none. Raises
        FileNotFoundError when the built-in atlas is needed but not installed."""
        if not subjects:
            return [self._get(BUILTIN, lambda: builtin_atlas(self.labels))]
        return [
            self._get(self.signature([s]), lambda s=s: load_atlas(s.image, s.labels, s.ids, self.labels, name=s.name))
            for s in subjects
        ]

    def _get(self, key: str, load) -> Atlas:
        with self._lock:
            atlas = self._loaded.get(key)
        if atlas is None:
            atlas = load().prepared()
            with self._lock:
                self._loaded[key] = atlas
            logger.info("atlas %s loaded", atlas.name)
        return atlas


class AtlasVotes:
    """The atlases' label maps on an image, as far as they were registered already.

    datastore, pool: where atlases come from (as for the automatic model). cache: the
    registration cache the scoring and the automatic model fill.
    """

    def __init__(self, datastore: Datastore, pool: AtlasPool, cache: Path):
        self.datastore, self.pool, self.cache = datastore, pool, cache
        self._found: LRUCache[Hashable, AtlasFusion] = LRUCache(IMAGES_KEPT)

    def load(self) -> int:
        """Load the current atlases into memory (loading costs ~2 s each at 1 mm); return how many."""
        try:
            return len(self.pool.atlases(self.pool.subjects(self.datastore)))
        except FileNotFoundError:
            return 0

    def on(self, path: str, volume: Volume) -> Optional[AtlasFusion]:
        """The fusion on `volume` of the current atlases (not the image itself) registered onto
        it already (cached) and fitting it (`brainsam.atlases.trust.trusted`: a failed registration must
        not answer a click); None when none is."""
        subjects = self.pool.subjects(self.datastore, exclude=image_id(path))
        try:
            atlases = self.pool.atlases(subjects)
        except FileNotFoundError:  # no labelled image and no built-in atlas: the model answers alone
            return None
        key = (volume.content_hash, self.pool.signature(subjects))
        fusion = self._found.get(key)
        if fusion is None:
            found = [(atlas, cached(atlas, volume, RegistrationSettings(), self.cache)) for atlas in atlases]
            found = [(atlas, labels) for atlas, labels in found if labels is not None]
            maps = trusted([atlas for atlas, _ in found], volume, [labels for _, labels in found])
            if not maps:
                return None
            fusion = AtlasFusion(with_borders(maps), volume.data, volume.spacing)
            if len(found) == len(atlases):  # complete: later registrations cannot change it
                self._found[key] = fusion
        return fusion


def image_id(path: str) -> str:
    """The datastore id of an image file (its name without the NIfTI extension)."""
    name = Path(path).name
    for extension in (".nii.gz", ".nii", ".nrrd"):
        if name.endswith(extension):
            return name[: -len(extension)]
    return Path(name).stem
