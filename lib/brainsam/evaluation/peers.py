"""MONAI Label's radiology `deepedit`, the interactive peer timed beside brainsam on the same data.

The infer task is the radiology sample app's own `lib.infers.DeepEdit` from the installed
monailabel wheel (`<venv>/monailabel/sample-apps/radiology`), with the DynUNet and the 128^3
input its config builds, here for brainsam's label set. The weights are left at their random
initialisation: the sample's pretrained weights are an abdominal CT model, and a network's
speed does not depend on its weight values, so the figures are latency only, never accuracy.
"""

from __future__ import annotations

import importlib
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from monai.networks.nets import DynUNet

RADIOLOGY = Path(sys.prefix) / "monailabel" / "sample-apps" / "radiology"
SPATIAL_SIZE = (128, 128, 128)


def deepedit_network(label_count: int) -> DynUNet:
    """The radiology config's DeepEdit DynUNet for `label_count` labels (background included)."""
    return DynUNet(
        spatial_dims=3,
        in_channels=label_count + 1,  # the image plus one guidance channel per label
        out_channels=label_count,
        kernel_size=[3, 3, 3, 3, 3, 3],
        strides=[1, 2, 2, 2, 2, [2, 2, 1]],
        upsample_kernel_size=[2, 2, 2, 2, [2, 2, 1]],
        norm_name="instance",
        deep_supervision=False,
        res_block=True,
    )


def deepedit_task(structures: list[str]):
    """The sample app's DeepEdit infer task over `structures` plus background, randomly
    initialised, configured as the radiology config serves it (cached pre-transforms).

    Raises FileNotFoundError when the installed monailabel has no radiology sample app.
    """
    if not (RADIOLOGY / "lib" / "infers" / "deepedit.py").is_file():
        raise FileNotFoundError(
            f"MONAI Label's radiology sample app is not installed at {RADIOLOGY}; install monailabel into this venv"
        )
    if "lib" in sys.modules and not str(getattr(sys.modules["lib"], "__file__", "")).startswith(str(RADIOLOGY)):
        raise RuntimeError(
            "another app's `lib` package is imported in this process; time deepedit in a process of its own"
        )
    sys.path.insert(0, str(RADIOLOGY))
    try:
        deepedit = importlib.import_module("lib.infers.deepedit")
    finally:
        sys.path.remove(str(RADIOLOGY))
    logging.getLogger("monailabel").setLevel(logging.WARNING)  # it logs every transform of every request
    labels = {name: index for index, name in enumerate(structures, start=1)} | {"background": 0}
    return deepedit.DeepEdit(
        path=[
            str(Path(tempfile.gettempdir()) / "brainsam-deepedit-untrained.pt")
        ],  # absent: the network keeps its random weights
        network=deepedit_network(len(labels)),
        labels=labels,
        spatial_size=SPATIAL_SIZE,
        target_spacing=(1.0, 1.0, 1.0),
        config={"cache_transforms": True, "cache_transforms_in_memory": True, "cache_transforms_ttl": 300},
    )


def deepedit_click(task, image: Path, structure: str, clicks: list[list[int]]) -> float:
    """Seconds of one DeepEdit request on `image` with all `clicks` so far on `structure`
    (stored voxel indices, as Slicer sends them)."""
    request = {
        "image": str(image),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        structure: clicks,
        "label": structure,
        "result_extension": ".nii.gz",
    }
    began = time.perf_counter()
    path, _ = task(request)
    seconds = time.perf_counter() - began
    Path(path).unlink(missing_ok=True)
    return seconds
