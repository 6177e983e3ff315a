"""The `brainsam` task: engine settings, label set and adapter location, read from --conf."""

import os
from pathlib import Path
from typing import Any, Dict, Optional

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from brainsam.core.config import load_config
from brainsam.core.labels import CONFIGS, DEFAULT_LABEL_SET, load_label_set
from lib.activelearning import MostUncertain
from lib.infers import BrainSamInfer
from lib.infers.atlases import AtlasPool, AtlasVotes
from lib.infers.auto import BrainSamAuto
from lib.scoring import PrecomputeEmbeddings
from lib.scoring.uncertainty import UncertaintyScoring
from lib.trainers import BrainSamTrain

ENGINE_OVERRIDES = ("device", "cache_mb", "checkpoint", "embedding_disk_mb", "precompute_mm", "answer", "runtime")
"""--conf keys passed through to the engine config as overrides."""
STORED_CACHE_MB = "512"
"""Default memory cache bound when embeddings persist on disk: a stored slice reloads in ~5 ms,
so memory holds only the slices being clicked (a 1 mm head's precomputed slab is 400 MB), and
the server with its precomputing subprocess stays within 4 GB."""


class BrainSam(TaskConfig):
    """Settings of the brainsam model, all optional (--conf KEY VALUE):

    engine_config (alias backbone): engine config name in configs/backbones, or a YAML path;
        default litemedsam.
    device, cache_mb, checkpoint, embedding_disk_mb, precompute_mm, runtime: override that
        engine config's fields (runtime: how the networks run, brainsam.core.runtime; default auto).
    compile_cache: where compiled networks persist, shared by the server and its scoring and
        training processes; default <app>/model/compile_cache.
    embedding_dir: where slice embeddings persist and are precomputed into (a scoring method
        run at start-up, after /activelearning and after training); `none` turns both off.
        Default: <app>/model/embeddings. While it is on, cache_mb defaults to STORED_CACHE_MB.
    adapter: a LoRA adapter (.safetensors) or a folder of them, the newest compatible one is
        served and a newer one is picked up without restart; `none` serves the base model.
        Default: <app>/model/brainsam, where published adapters go.
    labels: label set YAML; default configs/labels/freesurfer_subcortical.yaml.
    train_config: training settings in configs/training, or a YAML path; default the one named
        like the engine config, else litemedsam's (always applied to the served backbone).
    guide_atlases: whether the atlases registered already (by uncertainty scoring or
        brainsam_auto) prompt the segmenter where they hold the first click; default true.
    answer: "segmenter" (default) or "atlases": with "atlases" their vote answers on its own
        (brainsam.inference.votes), the ablation of the segmenter.
    auto_atlases: most labelled images registered per image by the automatic model; default 5.
    atlas_cache: folder keeping each registration's labels; default <app>/model/atlas_cache.
    uncertainty_budget_s: seconds one uncertainty scoring run may start new images for; 300.
    strategy_hold_s: seconds an image handed out by most_uncertain is held back from others; 1800.

    Everything here is cheap (YAML only), so a bad setting stops the server at start-up.
    """

    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        config_name = conf.get("engine_config") or conf.get("backbone") or "litemedsam"
        overrides = {key: conf[key] for key in ENGINE_OVERRIDES if key in conf}
        embedding_dir = conf.get("embedding_dir", os.path.join(model_dir, "embeddings"))
        compile_cache = conf.get("compile_cache", os.path.join(model_dir, "compile_cache"))
        self.engine_config = load_config(
            config_name, **overrides, embedding_dir=embedding_dir, compile_cache=compile_cache
        )
        if self.engine_config.embedding_dir is not None and "cache_mb" not in conf:
            self.engine_config = self.engine_config.replace(cache_mb=STORED_CACHE_MB)
        self.label_set = load_label_set(conf.get("labels", DEFAULT_LABEL_SET))
        adapter = conf.get("adapter", os.path.join(model_dir, name))
        self.path = None if adapter.lower() == "none" else Path(adapter)
        self.config_name, self.engine_overrides = config_name, {**overrides, "compile_cache": compile_cache}
        default_training = config_name if (CONFIGS / "training" / f"{config_name}.yaml").is_file() else "litemedsam"
        self.train_config = conf.get("train_config", default_training)
        # training publishes where inference looks, unless that is a single file or `none`
        watched = self.path is not None and self.path.suffix != ".safetensors"
        self.adapter_folder = self.path if watched else Path(model_dir) / name
        self.guide_atlases = conf.get("guide_atlases", "true").lower() == "true"
        self.atlas_pool = AtlasPool(self.label_set, int(conf.get("auto_atlases", 5)))
        self.atlas_cache = Path(conf.get("atlas_cache", os.path.join(model_dir, "atlas_cache")))
        self.uncertainty_budget_s = float(conf.get("uncertainty_budget_s", 300))
        self.strategy_hold_s = float(conf.get("strategy_hold_s", 1800))

    def infer(self, datastore: Datastore) -> BrainSamInfer:
        """The interactive model, guided by the atlases registered already unless guide_atlases is false."""
        votes = AtlasVotes(datastore, self.atlas_pool, self.atlas_cache) if self.guide_atlases else None
        return BrainSamInfer(self.engine_config.replace(interactive=True), self.label_set, self.path, votes)

    def auto_infer(self, datastore: Datastore) -> BrainSamAuto:
        """The automatic model: the segmenter prompted by the datastore's labelled images as atlases."""
        return BrainSamAuto(
            self.engine_config.replace(interactive=True),
            self.label_set,
            self.path,
            datastore,
            self.atlas_pool,
            self.atlas_cache,
        )

    def uncertainty_scoring(self) -> UncertaintyScoring:
        """Uncertainty scoring; without atlas guidance, readying the image handed out next after each score."""
        precompute = self.scoring_method()
        return UncertaintyScoring(self.engine_config, self.label_set, self.path, self.atlas_pool, self.atlas_cache, self.uncertainty_budget_s,
                                  self.strategy_hold_s, precompute.ready_next if precompute else None)  # fmt: skip

    def strategy(self) -> MostUncertain:
        return MostUncertain(self.strategy_hold_s)

    def trainer(self) -> Optional[TrainTask]:
        return BrainSamTrain(
            self.train_config,
            self.config_name,
            self.engine_overrides,
            self.label_set,
            self.adapter_folder,
            self.atlas_cache,
        )

    def scoring_method(self) -> Optional[PrecomputeEmbeddings]:
        """Precomputation of the head window's slice embeddings, which clicks read when the atlases
        do not guide them; none when embeddings do not persist (embedding_dir unset). With
        guide_atlases on, clicks read the segmenter's deep-brain window, which the uncertainty
        scoring encodes and stores as it scores each image: precomputing the head window would
        only take the CPU from it."""
        if self.engine_config.embedding_dir is None or self.guide_atlases:
            return None
        return PrecomputeEmbeddings(self.engine_config, self.label_set, self.path, self.strategy_hold_s)
