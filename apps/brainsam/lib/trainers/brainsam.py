"""The `brainsam` train task: POST /train/brainsam fine-tunes LoRA on the datastore's final labels.

MONAI Label runs it in a subprocess. Each labelled image is prompted as the server prompts an
unlabelled one: by the other labelled images registered onto it (brainsam.training.cases). The run continues from the newest published adapter, holds
out part of the labelled images for validation, and publishes a new adapter (atomically, next
to the earlier ones) only when it beats where it started. The infer task picks it up at the
next click. DELETE /train/ kills the subprocess: nothing half-written is ever published. It runs
in the background (lib.background): a click preempts it at once.
"""

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Dict, List

import psutil
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.train import TrainTask

from brainsam.core.labels import LabelSet
from brainsam.io.subjects import Subject
from brainsam.modeling.adapters import newest_adapter
from brainsam.training.settings import TrainSettings, load_train_settings
from brainsam.training.trainer import train_and_publish
from lib.background import lower_priority

logger = logging.getLogger(__name__)

STATS_FILE = "train_stats.json"


class BrainSamTrain(TrainTask):
    """Trains the `brainsam` model's adapter.

    settings: training config name (configs/training) or YAML path. engine_config,
    engine_overrides: the engine config the server runs and its overrides (device,
    checkpoint): a server trains what it serves. labels: the served label set; label files hold
    its ids. folder: where adapters are published (the infer task watches it). cache: the
    registration cache the scoring fills; the labelled images' priors come from it.
    """

    def __init__(
        self,
        settings: str,
        engine_config: str,
        engine_overrides: Dict[str, str],
        labels: LabelSet,
        folder: Path,
        cache: Path,
    ):
        super().__init__("LoRA fine-tuning of the brainsam model on the datastore's final labels")
        self.settings = settings
        self.engine_config = engine_config
        self.engine_overrides = engine_overrides
        self.labels = labels
        self.folder = folder
        self.cache = cache

    def config(self) -> Dict[str, Any]:
        """The training settings; a train request may override any of them."""
        return dataclasses.asdict(load_train_settings(self.settings, engine_config=self.engine_config))

    def stats(self) -> Dict[str, Any]:
        """The last run's progress file, with a run whose process is gone marked as stopped."""
        try:
            stats = json.loads((self.folder / STATS_FILE).read_text())
        except (OSError, ValueError):
            return {}
        if stats.get("state") == "running" and not alive(int(stats.get("pid", 0))):
            stats["state"] = "stopped"
        # the keys 3D Slicer's MONAILabel module reads for its progress and accuracy bars
        stats.update(
            epoch=stats.get("iteration", 0),
            total_epochs=stats.get("iterations", 1),
            best_metric=stats.get("best", {}).get("score", 0),
        )
        return stats

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        lower_priority("train")
        settings = self._settings(request)
        subjects = labelled_subjects(datastore, self.labels)
        if not subjects:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT, "no image has a final label yet: save at least one label, then train"
            )
        logger.info("training on %d labelled images with %s", len(subjects), settings)
        result = train_and_publish(
            subjects, settings, self.labels, self.folder, self.engine_overrides, newest_adapter(self.folder), self.cache
        )
        return json.loads(json.dumps(dataclasses.asdict(result), default=str))

    def check_settings(self, overrides: Dict[str, Any]) -> None:
        """Raise KeyError, TypeError or ValueError naming what is wrong with a request's settings
        (unknown, of the wrong type or out of range), before a run starts. The server trains the
        backbone it serves, whatever `engine_config` says."""
        load_train_settings(self.settings, **{**overrides, "engine_config": self.engine_config})

    def _settings(self, request: Dict[str, Any]) -> TrainSettings:
        """Training settings with the request's overrides; request keys that are not settings
        (MONAI Label adds its own, e.g. `model`) are ignored."""
        fields = {f.name for f in dataclasses.fields(TrainSettings)}
        overrides = {key: value for key, value in request.items() if key in fields}
        overrides["engine_config"] = self.engine_config
        try:
            return load_train_settings(self.settings, **overrides)
        except (KeyError, TypeError, ValueError) as error:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"bad training setting: {error}") from error


def alive(pid: int) -> bool:
    """Whether process `pid` still runs (a killed one not yet reaped by its parent does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def labelled_subjects(datastore: Datastore, labels: LabelSet) -> List[Subject]:
    """Every image with a final label. A label saved by 3D Slicer numbers its segments 1..N
    and says which is which in its `label_info`; other label files hold the label set's ids."""
    default = {s.name: s.id for s in labels.structures}
    subjects = []
    for image_id in datastore.get_labeled_images(DefaultLabelTag.FINAL):
        label_id = datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL)
        info = datastore.get_label_info(label_id, DefaultLabelTag.FINAL) or {}
        subjects.append(
            Subject(
                image_id,
                Path(datastore.get_image_uri(image_id)),
                Path(datastore.get_label_uri(label_id, DefaultLabelTag.FINAL)),
                segment_ids(info.get("label_info"), default),
            )
        )
    return subjects


def segment_ids(label_info: Any, default: Dict[str, int]) -> Dict[str, int]:
    """Structure name -> value in the label file: from Slicer's [{"name", "idx"}] when present
    (segments named otherwise are not trained on), else the label set's ids."""
    if not isinstance(label_info, list):
        return default
    named = {str(e.get("name")).lower(): e.get("idx") for e in label_info if isinstance(e, dict)}
    return {name: int(named[name.lower()]) for name in default if isinstance(named.get(name.lower()), int)}
