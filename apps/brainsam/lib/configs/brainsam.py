"""The `brainsam` task: engine settings, label set and adapter location, read from --conf."""

import os
from pathlib import Path
from typing import Any, Dict, Optional

from brainsam.config import load_config
from brainsam.labels import DEFAULT_LABEL_SET, load_label_set
from lib.infers import BrainSamInfer

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.train import TrainTask

ENGINE_OVERRIDES = ("device", "cache_mb", "checkpoint")
"""--conf keys passed through to the engine config as overrides."""


class BrainSam(TaskConfig):
    """Settings of the brainsam model, all optional (--conf KEY VALUE):

    engine_config (alias backbone): engine config name in configs/backbones, or a YAML path;
        default litemedsam.
    device, cache_mb, checkpoint: override that engine config's fields.
    adapter: a LoRA adapter (.safetensors) or a folder of them, the newest compatible one is
        served and a newer one is picked up without restart; `none` serves the base model.
        Default: <app>/model/brainsam, where published adapters go.
    labels: label set YAML; default configs/labels/freesurfer_subcortical.yaml.

    Everything here is cheap (YAML only), so a bad setting stops the server at start-up.
    """

    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        config_name = conf.get("engine_config") or conf.get("backbone") or "litemedsam"
        overrides = {key: conf[key] for key in ENGINE_OVERRIDES if key in conf}
        self.engine_config = load_config(config_name, **overrides)
        self.label_set = load_label_set(conf.get("labels", DEFAULT_LABEL_SET))
        adapter = conf.get("adapter", os.path.join(model_dir, name))
        self.path = None if adapter.lower() == "none" else Path(adapter)

    def infer(self) -> BrainSamInfer:
        return BrainSamInfer(self.engine_config, self.label_set, self.path)

    def trainer(self) -> Optional[TrainTask]:
        return None
