"""The `brainsam_auto` inference task: every structure of the label set, without clicks.

POST /infer/brainsam_auto?image=<id> (3D Slicer's auto-segmentation, type `segmentation`)
answers one multi-label volume in the label set's ids on the image's grid. The datastore's
labelled images (the built-in atlas while there are none) are registered to the image and their
fusion prompts the segmenter, which answers every structure (brainsam.inference.auto). The result params
carry each structure's confidence (1 - uncertainty) and the image's uncertainty.

Optional params: `result_extension`, `result_dtype`.
"""

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional

from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferType

from brainsam.atlases.registration import RegistrationSettings
from brainsam.core.config import EngineConfig
from brainsam.core.labels import LabelSet
from brainsam.core.volume import VolumeError, load_volume
from brainsam.inference.auto import first_pass
from lib.infers.adapters import AdapterWatcher
from lib.infers.atlases import AtlasPool, image_id
from lib.infers.brainsam import read_dtype, read_extension
from lib.infers.labelled import LabelSetInfer
from lib.infers.results import write_mask

logger = logging.getLogger(__name__)


class BrainSamAuto(LabelSetInfer):
    """Automatic segmentation of all structures of one label set (MONAI Label type segmentation).

    config, labels, adapters: as for the interactive task (the newest adapter answers).
    datastore: where labelled images (atlases) are found. atlases: pool of them. cache: folder
    keeping each registration's labels, so an image is registered to an atlas once.
    """

    def __init__(
        self,
        config: EngineConfig,
        labels: LabelSet,
        adapters: Optional[Path],
        datastore: Datastore,
        atlases: AtlasPool,
        cache: Path,
    ):
        super().__init__(
            type=InferType.SEGMENTATION,
            labels={structure.name: structure.id for structure in labels.structures},
            dimension=3,
            description="All deep brain structures without clicks: the segmenter prompted by the labelled images registered as atlases",
        )
        self.label_set = labels
        self.watcher = AdapterWatcher(config, labels, adapters)
        self.datastore = datastore
        self.pool = atlases
        self.cache = cache
        self._lock = threading.Lock()

    def __call__(self, request: Dict[str, Any]) -> tuple[str, Dict[str, Any]]:
        """Answer one request: (path of the label volume, result params)."""
        began = time.perf_counter()
        path = request.get("image")
        if not path or not os.path.isfile(path):
            raise HTTPException(404, "image not found: give the id of an image in this server's datastore")
        extension = read_extension(request.get("result_extension") or ".nii.gz")
        dtype = read_dtype(request.get("result_dtype") or "uint8")
        try:
            volume = load_volume(path)
        except VolumeError as error:
            raise HTTPException(422, str(error)) from error
        with self._lock:
            subjects = self.pool.subjects(self.datastore, exclude=image_id(path))
            try:
                atlases = self.pool.atlases(subjects)
            except FileNotFoundError as error:
                raise HTTPException(503, f"no labelled image to use as atlas yet, and {error}") from error
            engine = self.watcher.engine()
            result = first_pass(
                atlases, volume, self.label_set, engine, settings=RegistrationSettings(), cache=self.cache
            )
        out = write_mask(volume, result.labels, extension, dtype)
        seconds = time.perf_counter() - began
        logger.info(
            "automatic pass on %s: %d atlases, answered by the %s, uncertainty %.3f, %.1f s",
            Path(path).name,
            len(atlases),
            engine.config.answer,
            result.image_uncertainty,
            seconds,
        )
        present = {s.name: s.id for s in self.label_set.structures if (result.labels == s.id).any()}
        return out, {
            "label_names": present,
            "confidence": {name: round(1.0 - value, 3) for name, value in result.uncertainty.items()},
            "uncertainty": round(result.image_uncertainty, 3),
            "atlases": [atlas.name for atlas in atlases],
            "answer": engine.config.answer,
            "adapter": self.watcher.serving.name if self.watcher.serving else None,
            "latencies": {"total": round(seconds, 3), **{k: round(v, 3) for k, v in result.seconds.items()}},
        }
