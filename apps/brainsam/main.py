"""MONAI Label app: click or box a deep brain structure in 3D Slicer or OHIF, get its 3D mask from brainsam.

    monailabel start_server --app apps/brainsam --studies DIR|DICOMWEB_URL [--conf KEY VALUE ...]

Settings (--conf) are listed in lib/configs/brainsam.py.
"""

import os
import threading
from importlib.metadata import version
from typing import Any, Dict, Optional

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from lib.configs import BrainSam
from lib.datastore import StudiesDatastore, datastore_image
from lib.dicomweb import DicomWebStudies
from lib.errors import install_error_handlers
from lib.infers.atlases import AtlasVotes
from lib.infers.clicked import ClickedStructure
from lib.infers.results import uncompress_nrrd
from lib.ohif import serve_fixed_ohif
from lib.routes import install_checked_routes, known


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

    def init_datastore(self) -> Datastore:
        """A local studies folder refuses ids and tags that would name files outside it; a
        DICOMweb archive (OHIF's datastore) serves MR series with DICOM SEG labels."""
        if self.studies.startswith(("http://", "https://")):
            self.studies = self.studies.rstrip("/")
            cache = settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or settings.MONAI_LABEL_DATASTORE_CACHE_PATH
            return DicomWebStudies(self.studies, self.task.label_set, cache)
        return StudiesDatastore(self.studies, self.task.label_set)

    def on_init_complete(self) -> None:
        """Server only: 4xx for bad requests (names and train settings checked before any work
        starts), OHIF's fixed scripts, and the network and atlases loaded before the first click."""
        from monailabel.app import (
            app,  # the server's FastAPI app; only the server calls this
        )

        install_error_handlers(app)
        install_checked_routes(app, self, {name: task.check_settings for name, task in self._trainers.items()})
        serve_fixed_ohif(app)
        threading.Thread(target=self._infers[self.task.name].warm_up, name="warm-up", daemon=True).start()
        super().on_init_complete()

    def infer(self, request: Dict[str, Any], datastore: Optional[Datastore] = None) -> Dict[str, Any]:
        """Inference reads datastore images only: `image` (query or params) is an id, never a path.
        An unknown model answers 404 with the models there are."""
        known("model", request.get("model"), self._infers)
        image = datastore_image(request.get("image"), datastore or self.datastore(), self.sessions())
        request = {**request, "image": image}
        if request.get("model") == self.task.name and not request.get("label"):
            request["label"] = self.clicked_structure(image, request.get("foreground"))  # OHIF names none
        result = super().infer(request, datastore)
        if request.get("result_compress") is False and str(result.get("file")).endswith(".nrrd"):
            uncompress_nrrd(result["file"])
        return result

    def init_infers(self) -> Dict[str, InferTask]:
        datastore = self.datastore()
        votes = AtlasVotes(datastore, self.task.atlas_pool, self.task.atlas_cache) if self.task.guide_atlases else None
        self.clicked_structure = ClickedStructure(votes, self.task.label_set)
        return {self.task.name: self.task.infer(datastore), f"{self.task.name}_auto": self.task.auto_infer(datastore)}

    def init_trainers(self) -> Dict[str, TrainTask]:
        return {self.task.name: self.task.trainer()}

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        """MONAI Label runs them in this order: registrations (which also guide clicks) first."""
        method = self.task.scoring_method()
        precompute = {"precompute_embeddings": method} if method else {}
        return {"uncertainty": self.task.uncertainty_scoring(), **precompute}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {**super().init_strategies(), "most_uncertain": self.task.strategy()}
