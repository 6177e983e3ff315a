"""MONAI Label app: click or box a deep brain structure in 3D Slicer, get its 3D mask from brainsam.

    monailabel start_server --app apps/brainsam --studies DIR [--conf KEY VALUE ...]

Settings (--conf) are listed in lib/configs/brainsam.py.
"""

import os
from importlib.metadata import version
from typing import Dict

from lib.configs import BrainSam

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask


class BrainSamApp(MONAILabelApp):
    """Serves the interactive model `brainsam` with its train task, the automatic model
    `brainsam_auto`, uncertainty scoring and the `most_uncertain` strategy.

    Construction only reads settings: train, scoring and batch-infer subprocesses build the app
    again, so the network loads at the first inference request.
    """

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        self.task = BrainSam()
        self.task.init("brainsam", os.path.join(app_dir, "model"), conf, planner=None)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="brainsam",
            description="Deep brain structures in MRI with a LoRA-adapted Segment Anything",
            version=version("brainsam"),
            labels=self.task.label_set.names,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        return {self.task.name: self.task.infer(), f"{self.task.name}_auto": self.task.auto_infer(self.datastore())}

    def init_trainers(self) -> Dict[str, TrainTask]:
        return {self.task.name: self.task.trainer()}

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        method = self.task.scoring_method()
        precompute = {"precompute_embeddings": method} if method else {}
        return {**precompute, "uncertainty": self.task.uncertainty_scoring()}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {**super().init_strategies(), "most_uncertain": self.task.strategy()}
