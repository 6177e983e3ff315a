"""A label file checked against its image before anything is stored.

A label replaces an annotator's saved work, so it is stored only if it is what it claims to be:
a 3D volume that parses, on the image's grid (shape, and position within GRID_TOLERANCE of a
voxel), holding whole numbers that each mean a structure. Anything else raises LabelError with
what is wrong, and nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from brainsam.core.labels import LabelSet

GRID_TOLERANCE = 0.01
"""How far (as a fraction of the image's smallest voxel side) a label's origin and axes may sit
from the image's: a label Slicer or nibabel wrote on the image's own grid differs by float
rounding only, far below this; a label of another image or a resampled one differs by more."""


class LabelError(ValueError):
    """The label cannot be stored: the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class LabelValues:
    """What the values of a label file mean. named: value -> structure name (from Slicer's
    `label_info`, or the label set's own ids). others_as_background: values not named are
    stored as 0 instead of refused (the request asked for it)."""

    named: dict[int, str]
    others_as_background: bool = False


def read_image(path: str | Path, what: str) -> sitk.Image:
    """The image at `path`; LabelError when it does not parse as one, or is cut short."""
    try:
        if str(path).endswith((".nii", ".nii.gz")):
            whole_nifti(path)
        return sitk.ReadImage(str(path))
    except (RuntimeError, OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise LabelError(f"the {what} is not an image file brainsam can read (NIfTI or NRRD): {reason}") from None


def whole_nifti(path: str | Path) -> None:
    """Raise unless the NIfTI file holds all its voxels: SimpleITK reads a file cut short (an
    interrupted upload) without a word, the missing voxels as zeros; nibabel refuses it."""
    np.asanyarray(nib.load(str(path)).dataobj)


def checked_label(label_path: str | Path, image: sitk.Image, values: LabelValues, resample: bool = False) -> sitk.Image:
    """The label at `label_path` on `image`'s grid with the values it holds, once it passed every
    check: it parses, is 3D, lies on the image's grid (or is resampled onto it with nearest
    neighbours when `resample`), and holds whole numbers that `values` names, not only zeros.
    Raises LabelError otherwise."""
    label = read_image(label_path, "label")
    if label.GetDimension() != 3 or label.GetNumberOfComponentsPerPixel() != 1:
        size = "x".join(map(str, label.GetSize()))
        raise LabelError(
            f"the label must be one 3D volume, got {label.GetDimension()}D {size} with {label.GetNumberOfComponentsPerPixel()} component(s)"
        )
    mismatch = grid_mismatch(label, image)
    if mismatch and not resample:
        raise LabelError(
            f'{mismatch}: save the label on the image\'s grid, or send params {{"resample": true}} to resample it onto it'
        )
    if mismatch:
        label = sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return with_known_values(label, image, values)


def grid_mismatch(label: sitk.Image, image: sitk.Image) -> str:
    """Why `label` is not on `image`'s grid, or "" when it is."""
    size, expected = label.GetSize(), image.GetSize()
    if size != expected:
        return f"label shape {'x'.join(map(str, size))} does not match the image's {'x'.join(map(str, expected))}"
    tolerance = GRID_TOLERANCE * min(image.GetSpacing())
    # every corner: two opposite ones agree for a grid with two axes swapped
    corners = [(x, y, z) for x in (0, size[0] - 1) for y in (0, size[1] - 1) for z in (0, size[2] - 1)]
    for index in corners:
        moved = np.subtract(
            label.TransformContinuousIndexToPhysicalPoint(index), image.TransformContinuousIndexToPhysicalPoint(index)
        )
        if np.abs(moved).max() > tolerance:
            return f"the label's voxel {list(index)} lies {np.abs(moved).max():.3g} mm from the image's (it is on another grid)"
    return ""


def with_known_values(label: sitk.Image, image: sitk.Image, values: LabelValues) -> sitk.Image:
    """`label` as unsigned 16-bit integers with `image`'s geometry, unnamed values set to 0 when
    `values` allows it; LabelError for fractions, negative or unnamed values, or no structure."""
    data = sitk.GetArrayViewFromImage(label)
    if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
        raise LabelError(
            "the label holds values that are not whole numbers: send a label map of integer structure values"
        )
    found = {int(v) for v in np.unique(data)} - {0}
    unknown = sorted(found - set(values.named))
    if unknown and not values.others_as_background:
        known = ", ".join(f"{v} {n}" for v, n in sorted(values.named.items()))
        raise LabelError(
            f"the label holds values {shorten_values(unknown)} that name no structure (known: {known}): "
            'name each segment after a structure, or send params {"other_values": "background"} to store them as 0'
        )
    if not found - set(unknown):
        raise LabelError("the label holds no structure (every voxel is background): nothing to save")
    out = np.where(np.isin(data, unknown), 0, data).astype(np.uint16)
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)
    return result


def shorten_values(values: list[int], most: int = 8) -> str:
    """`values` as text, the first `most` of them and how many more."""
    shown = ", ".join(map(str, values[:most]))
    return shown if len(values) <= most else f"{shown} and {len(values) - most} more"


def label_values(label_info: object, label_set: LabelSet, other_values: object = None) -> LabelValues:
    """What a label file's values mean: Slicer's `label_info` ([{"name", "idx"}], segments named
    after a structure of `label_set`) when the request has one, else the label set's ids.
    other_values: "background" stores values that name no structure as 0; None refuses them."""
    if other_values not in (None, "background"):
        raise LabelError(f'other_values must be "background" (or left out), got {other_values!r}')
    if isinstance(label_info, list):
        named = {
            int(entry["idx"]): label_set[str(entry["name"])].name
            for entry in label_info
            if isinstance(entry, dict) and isinstance(entry.get("idx"), int) and str(entry.get("name")) in label_set
        }
    elif label_info is None:
        named = {structure.id: structure.name for structure in label_set.structures}
    else:
        raise LabelError(f'label_info must be a list of {{"name", "idx"}} segments, got {label_info!r}')
    return LabelValues(named, other_values == "background")
