"""Labelled subjects as training and the atlases read them: an image, a label file, and which
value in it is which structure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np

from brainsam.core.volume import VolumeError


@dataclass
class Subject:
    """A labelled image. ids: structure name -> value of that structure in the label file."""

    name: str
    image: Path
    labels: Path
    ids: dict[str, int]


def read_labels(path: Path) -> np.ndarray:
    """A label file (NIfTI, or NRRD as 3D Slicer saves labels) as an int32 array on its stored grid."""
    try:
        array = nrrd.read(str(path))[0] if path.name.endswith(".nrrd") else np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as error:  # nibabel and pynrrd raise many types for damaged files
        raise VolumeError(f"cannot read label file {path.name}: {error}") from error
    array = np.squeeze(array)
    if array.ndim != 3:
        raise VolumeError(f"label file {path.name} is {array.ndim}D; expected one 3D label map")
    return array.astype(np.int32)


def subjects_in(folder: Path, image_name: str, labels_name: str, mapping: dict[str, int]) -> list[Subject]:
    """Subject folders of a data set that hold both the image and the label file."""
    return [
        Subject(p.name, p / image_name, p / labels_name, mapping)
        for p in sorted(folder.iterdir())
        if (p / image_name).is_file() and (p / labels_name).is_file()
    ]
