"""The `brainsam` inference task: 3D Slicer's deepgrow requests in, a single-structure mask out.

A request (POST /infer/brainsam?image=<id>, params as 3D Slicer sends them) carries `label`,
`foreground` and `background` clicks (stored voxel indices), optionally `roi`, `reset_state`,
`result_extension`, `result_dtype` and `client_id`. The first prompt segments the structure in
3D; later clicks refine it. Where labelled images registered onto the image already give the
structure under the first click, their probability of it prompts the LoRA-SAM segmenter with the
clicks (brainsam.inference.segmenter); elsewhere the model answers from the clicks and box alone. The
result says which (`answer`). Each
(client_id, image) keeps the state of its current structure, so annotators never see each
other's work (requests without client_id share one state).

Requests run one at a time on the server's event loop, so the image and the prompts are
checked before any slow work, and a bad request answers 4xx with what to fix.
"""

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Hashable, Optional

import numpy as np
from cachetools import LRUCache
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType

from brainsam.core.config import EngineConfig
from brainsam.core.labels import LabelSet
from brainsam.core.prompts import PromptError, Prompts, parse_points, parse_roi
from brainsam.core.volume import VolumeError, load_volume
from brainsam.inference.engine import Engine
from brainsam.inference.segmenter import Answer
from brainsam.inference.state import PreparedImage, Segmentation
from lib.infers.adapters import AdapterWatcher
from lib.infers.atlases import AtlasVotes
from lib.infers.interaction import REFINE, SEGMENT, Interaction, plan
from lib.infers.labelled import LabelSetInfer
from lib.infers.results import EXTENSIONS, write_mask

logger = logging.getLogger(__name__)

IMAGES_KEPT = 3  # a prepared 256^3 volume holds ~130 MB and costs ~1 s to load again
INTERACTIONS_KEPT = 32  # (annotator, image) pairs whose segmentation can still be refined

ImageKey = tuple[str, int, int]
"""(path, mtime in ns, size) of an image file: a replaced file is a new image."""


@dataclass(frozen=True)
class Options:
    """How to answer a request: structure name, whether to forget the earlier state, format of
    the returned mask, and whose request it is."""

    label: str
    reset: bool
    extension: str
    dtype: np.dtype
    client: str


class BrainSamInfer(LabelSetInfer):
    """Interactive 3D segmentation of the structures of one label set (MONAI Label type deepgrow).

    config, labels: the engine's settings and label set. adapters: an adapter file or folder
    (see AdapterWatcher), or None for the base model. atlases: registered atlases that prompt
    first answers and their corrections where they hold the click (`Engine.segment`), or None.
    """

    def __init__(
        self, config: EngineConfig, labels: LabelSet, adapters: Optional[Path], atlases: Optional[AtlasVotes] = None
    ):
        super().__init__(
            type=InferType.DEEPGROW,
            labels={structure.name: structure.id for structure in labels.structures},
            dimension=3,
            description=f"Click or box a deep brain structure, get its 3D mask (SAM backbone {config.backbone})",
        )
        self.label_set = labels
        self.watcher = AdapterWatcher(config, labels, adapters)
        self.atlases = atlases
        self.images: LRUCache[Hashable, PreparedImage] = LRUCache(IMAGES_KEPT)
        self.interactions: LRUCache[Hashable, Interaction] = LRUCache(INTERACTIONS_KEPT)
        self._lock = threading.Lock()  # one request at a time even with MONAI_LABEL_INFER_CONCURRENCY

    def __call__(self, request: Dict[str, Any]) -> tuple[str, Dict[str, Any]]:
        """Answer one request: (path of the mask file, result params)."""
        began = time.perf_counter()
        options = read_options(request, self.label_set)
        with self._lock:
            engine = self.watcher.engine()
            encoded_before = engine.predictor.counts["encode"]
            key, image = self._image(request.get("image"), engine)
            prompts = read_prompts(request, options.label, image)
            action, interaction = self._interact(engine, image, (options.client, key), options.reset, prompts)
            mask = engine.canonical_mask(image, interaction.state)
            encoded = engine.predictor.counts["encode"] - encoded_before
        path = write_mask(image.volume, mask, options.extension, options.dtype)
        seconds = time.perf_counter() - began
        logger.info(
            "%s %s for %s on %s: %.2f s, %d slices encoded",
            action,
            options.label,
            options.client or "anonymous client",
            Path(key[0]).name,
            seconds,
            encoded,
        )
        return path, {
            "label_names": {options.label: 1},
            "interaction": action,
            "answer": answered_by(interaction.state),
            "adapter": self.watcher.serving.name if self.watcher.serving else None,
            "latencies": {"total": round(seconds, 3)},
            "encoded_slices": encoded,
        }

    def warm_up(self) -> None:
        """Load the network and the atlases, and compile what clicks run, ahead of the first
        click (the server runs this in a thread at start-up; a click arriving meanwhile waits
        for it rather than loading twice; clicks never compile, brainsam.core.runtime)."""
        began = time.perf_counter()
        try:
            with self._lock:
                engine = self.watcher.engine()
                loaded = time.perf_counter()
                engine.predictor.warm_up()
                compiled = time.perf_counter()
                atlases = self.atlases.load() if self.atlases is not None else 0
        except Exception:  # the first click will meet and report the same problem
            logger.exception("warm-up failed")
            return
        logger.info("warm-up: network loaded in %.1f s, compiled (%s) in %.1f s, %d atlases loaded in %.1f s",
                    loaded - began, engine.predictor.runtime.choice, compiled - loaded, atlases, time.perf_counter() - compiled)  # fmt: skip

    def _image(self, path: Optional[str], engine: Engine) -> tuple[ImageKey, PreparedImage]:
        """The prepared image at `path` (from the LRU when the file is unchanged); 404 if absent,
        422 if it cannot be read as a 3D image."""
        if not path or not os.path.isfile(path):
            raise HTTPException(404, "image not found: give the id of an image in this server's datastore")
        stat = os.stat(path)
        key = (path, stat.st_mtime_ns, stat.st_size)
        image = self.images.get(key)
        if image is None:
            try:
                image = engine.prepare(load_volume(path))
            except VolumeError as error:
                raise HTTPException(422, str(error)) from error
            self.images[key] = image
        return key, image

    def _interact(
        self, engine: Engine, image: PreparedImage, key: tuple, reset: bool, prompts: Prompts
    ) -> tuple[str, Interaction]:
        """Segment, refine or keep the state under `key` for `prompts`; return what was done and
        the interaction now stored."""
        previous = None if reset else self.interactions.get(key)
        action, foreground, background = plan(previous, prompts)
        try:
            if action == SEGMENT:
                atlases = self.atlases.on(key[0], image.volume) if self.atlases is not None else None
                state = engine.segment(image, prompts.label, foreground, background, prompts.roi, atlases)
            elif action == REFINE:
                state = engine.refine(image, previous.state, foreground, background)
            else:
                state = previous.state
        except PromptError as error:
            raise HTTPException(400, str(error)) from error
        interaction = Interaction(prompts, state)
        self.interactions[key] = interaction
        return action, interaction


def answered_by(state: Segmentation | Answer) -> str:
    """Who answered: "segmenter" (the LoRA-SAM prompted by the registered atlases), "atlases"
    (their vote alone, the `answer atlases` ablation) or "model" (the LoRA-SAM from the clicks
    and box alone, where no atlas holds the click)."""
    if isinstance(state, Answer):
        return "segmenter"
    return "atlases" if state.votes is not None else "model"


def read_options(request: Dict[str, Any], labels: LabelSet) -> Options:
    """Check the request's other parameters; 400 with what to fix if one is unusable."""
    label = request.get("label")
    if not isinstance(label, str) or label not in labels:
        raise HTTPException(
            400,
            f"label must name a structure of label set {labels.name}, got {label!r}; choose one of {', '.join(labels.names)}",
        )
    return Options(
        label=labels[label].name,
        reset=read_flag(request.get("reset_state", False), "reset_state"),
        extension=read_extension(request.get("result_extension") or ".nii.gz"),
        dtype=read_dtype(request.get("result_dtype") or "uint8"),
        client=str(request.get("client_id") or ""),
    )


def read_flag(value: Any, name: str) -> bool:
    """A boolean parameter, sent as JSON true/false or as the string "true"/"false"."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise HTTPException(400, f"{name} must be true or false, got {value!r}")
    return value


def read_extension(value: Any) -> str:
    """The result file extension, with or without its leading dot."""
    extension = str(value) if str(value).startswith(".") else f".{value}"
    if extension not in EXTENSIONS:
        raise HTTPException(400, f"result_extension must be one of {', '.join(EXTENSIONS)}, got {value!r}")
    return extension


def read_dtype(value: Any) -> np.dtype:
    """The numeric type of the result voxels, e.g. uint8."""
    try:
        dtype = np.dtype(value)
        numeric = bool(np.issubdtype(dtype, np.number))
    except (TypeError, ValueError):
        numeric = False
    if not numeric:
        raise HTTPException(400, f"result_dtype must name a numeric type such as uint8, got {value!r}")
    return dtype


def read_prompts(request: Dict[str, Any], label: str, image: PreparedImage) -> Prompts:
    """Check the clicks and roi against the image; 400 with what to fix if one is unusable.
    An absent or empty roi means none."""
    roi = request.get("roi") or None
    try:
        foreground = parse_points(request.get("foreground"), image.volume, "foreground")
        background = parse_points(request.get("background"), image.volume, "background")
        if roi is not None:
            parse_roi(roi, image.volume, image.view)
    except PromptError as error:
        raise HTTPException(400, str(error)) from error
    return Prompts(
        label=label,
        foreground=tuple(dict.fromkeys(map(tuple, foreground.tolist()))),
        background=tuple(dict.fromkeys(map(tuple, background.tolist()))),
        roi=tuple(np.asarray(roi, dtype=float).reshape(-1)) if roi is not None else None,
    )
