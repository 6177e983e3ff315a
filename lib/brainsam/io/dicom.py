"""NIfTI volumes as DICOM MR series and DICOM series back as NIfTI, the geometry kept.

A NIfTI volume becomes one classic MR Image Storage series (one file per slice) that viewers
and MONAI Label's DICOMweb cache read back as the same image: every voxel keeps its value and
its position in the scanner (orientation, spacing, position). SimpleITK (GDCM) writes and reads
the files; pydicom reads headers only, to refuse what is not one 3D volume.

DICOM stacks slices along row x column direction, a right-handed frame. A NIfTI whose voxel
axes are left-handed (FreeSurfer's LIA, IXI's PSR) is written with its third axis reversed, so
the series read back is the same image with that one axis flipped (same world position per
voxel), never resampled.
"""

from __future__ import annotations

import hashlib
import locale
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import generate_uid

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
GEOMETRY_TOLERANCE = 1e-3
"""Relative tolerance on slice spacing and orientation differences within one series."""


class SeriesError(ValueError):
    """A DICOM series that is not one 3D MR volume; the message says why."""


@dataclass(frozen=True)
class SeriesNames:
    """What a converted series is called in the archive (patient, study and series)."""

    patient_id: str
    study_description: str = "brainsam"
    series_description: str = "T1"


@dataclass(frozen=True)
class Pixels:
    """Voxel values as DICOM stores them: value = stored * slope + intercept."""

    stored: np.ndarray
    slope: float
    intercept: float

    @property
    def rescaled(self) -> bool:
        return (self.slope, self.intercept) != (1.0, 0.0)


def pixels(values: np.ndarray) -> Pixels:
    """16-bit stored values for `values` (MR images allocate 16 bits). Whole numbers that fit
    are kept exactly; anything else spans 0..65535 linearly (error at most slope / 2)."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if np.array_equal(values, np.round(values)):
        if low >= 0 and high <= np.iinfo(np.uint16).max:
            return Pixels(values.astype(np.uint16), 1.0, 0.0)
        if low >= np.iinfo(np.int16).min and high <= np.iinfo(np.int16).max:
            return Pixels(values.astype(np.int16), 1.0, 0.0)
    slope = (high - low) / np.iinfo(np.uint16).max or 1.0
    return Pixels(np.round((values - low) / slope).astype(np.uint16), slope, low)


def lps_grid(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(direction 3x3, spacing 3, origin 3) in DICOM's LPS space for a NIfTI (RAS) affine;
    SeriesError when the axes are not orthogonal (DICOM images cannot shear)."""
    matrix = RAS_TO_LPS @ np.asarray(affine, dtype=float)[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    direction = matrix / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=GEOMETRY_TOLERANCE):
        raise SeriesError("the NIfTI affine shears its voxel axes: a DICOM series cannot hold that geometry")
    return direction, spacing, RAS_TO_LPS @ np.asarray(affine, dtype=float)[:3, 3]


def right_handed(
    array: np.ndarray, direction: np.ndarray, origin: np.ndarray, spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same image with its third axis reversed when the voxel axes are left-handed, so that
    slices follow row x column as DICOM readers stack them: (array, direction, origin)."""
    if np.linalg.det(direction) > 0:
        return array, direction, origin
    last = origin + direction[:, 2] * spacing[2] * (array.shape[2] - 1)
    return array[:, :, ::-1], direction * np.array([1.0, 1.0, -1.0]), last


def ds(value: float) -> str:
    """A number as a DICOM decimal string (at most 16 characters)."""
    return f"{value:.10g}"


def uid(digest: str, *parts: object) -> str:
    """A UID derived from the volume's digest: converting the same file again gives the same UIDs."""
    return generate_uid(prefix=None, entropy_srcs=[digest, *map(str, parts)])


@contextmanager
def locale_kept() -> Iterator[None]:
    """Restore the process's locale on leaving: GDCM's writer sets it to "C" and leaves it so,
    after which Python reads text files as ASCII."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def nifti_to_series(nifti: str | Path, folder: str | Path, names: SeriesNames) -> list[Path]:
    """Write the NIfTI volume at `nifti` as an MR series into `folder`; return the files, in
    slice order. UIDs derive from the file's content. Raises SeriesError for images DICOM cannot
    hold (not 3D, sheared axes)."""
    image = nib.load(str(nifti))
    array = np.asanyarray(image.dataobj)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise SeriesError(f"{Path(nifti).name} is {array.ndim}D: only 3D volumes convert to an MR series")
    direction, spacing, origin = lps_grid(image.affine)
    array, direction, origin = right_handed(array, direction, origin, spacing)
    values = pixels(array)
    digest = hashlib.sha256(Path(nifti).read_bytes()).hexdigest()
    study, series = uid(digest, "study"), uid(digest, "series")
    orientation = "\\".join(ds(v) for v in (*direction[:, 0], *direction[:, 1]))
    fixed = {
        "0008|0016": MR_IMAGE_STORAGE,
        "0008|0060": "MR",
        "0010|0010": names.patient_id,
        "0010|0020": names.patient_id,
        "0008|1030": names.study_description,
        "0008|103e": names.series_description,
        "0020|000d": study,
        "0020|000e": series,
        "0020|0052": uid(digest, "frame of reference"),
        "0020|0010": "1",
        "0020|0011": "1",
        "0020|0037": orientation,
        "0018|0050": ds(spacing[2]),
        "0018|0088": ds(spacing[2]),
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # the UIDs set here, not fresh ones per write
    files = []
    for k in range(array.shape[2]):
        # SimpleITK arrays are (row, column); row r runs along the second voxel axis
        plane = sitk.GetImageFromArray(np.ascontiguousarray(values.stored[:, :, k].T))
        plane.SetSpacing((float(spacing[0]), float(spacing[1])))
        position = origin + direction[:, 2] * spacing[2] * k
        for tag, value in fixed.items():
            plane.SetMetaData(tag, value)
        plane.SetMetaData("0008|0018", uid(digest, "slice", k))
        plane.SetMetaData("0020|0013", str(k + 1))
        plane.SetMetaData("0020|0032", "\\".join(ds(v) for v in position))
        files.append(folder / f"{k + 1:04d}.dcm")
        writer.SetFileName(str(files[-1]))
        with locale_kept():
            writer.Execute(plane)
        if values.rescaled:
            add_rescale(files[-1], values)
    return files


def add_rescale(path: Path, values: Pixels) -> None:
    """Add the rescale of real-valued pixels to a written slice. GDCM would turn an MR image
    with a rescale into Enhanced MR, which viewers read less reliably than classic MR, so the
    tags are added afterwards (GDCM and cornerstone apply them when reading)."""
    dataset = pydicom.dcmread(str(path))
    dataset.RescaleIntercept = ds(values.intercept)
    dataset.RescaleSlope = ds(values.slope)
    dataset.RescaleType = "US"  # unspecified units, as MR intensities are
    dataset.save_as(str(path))


def check_volume(files: list[Path]) -> None:
    """Raise SeriesError unless `files` hold one 3D MR volume: single-frame MR images of one
    series, at least 2 of them, sharing size, pixel spacing and orientation, evenly spaced
    along the slice normal."""
    if len(files) < 2:
        raise SeriesError(f"it has {len(files)} image(s): a 3D volume needs 2 slices or more")
    headers = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    first = headers[0]
    modality = str(first.get("Modality", ""))
    if modality != "MR":
        raise SeriesError(f"its modality is {modality or 'missing'}, not MR")
    if len({str(h.get("SeriesInstanceUID")) for h in headers}) != 1:
        raise SeriesError("its files belong to more than one series")
    if any(int(h.get("NumberOfFrames", 1) or 1) != 1 for h in headers):
        raise SeriesError("it holds multi-frame images: only single-frame MR slices are read")
    try:
        shapes = {(int(h.Rows), int(h.Columns), *map(float, h.PixelSpacing)) for h in headers}
        orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    except (AttributeError, TypeError, ValueError) as error:
        raise SeriesError(f"a slice lacks its geometry ({error})") from error
    if len(shapes) != 1:
        raise SeriesError("its slices differ in size or pixel spacing")
    if np.abs(orientations - orientations[0]).max() > GEOMETRY_TOLERANCE:
        raise SeriesError("its slices differ in orientation")
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    steps = np.diff(np.sort(positions @ normal))
    if steps.min() <= GEOMETRY_TOLERANCE or np.abs(steps - steps.mean()).max() > GEOMETRY_TOLERANCE * max(
        steps.mean(), 1.0
    ):
        raise SeriesError("its slices are not evenly spaced along the slice normal (repeated or missing slices)")


def series_to_nifti(folder: str | Path, nifti: str | Path) -> Path:
    """Read the DICOM series in `folder` (the only one there) as MONAI Label's DICOMweb cache
    does (SimpleITK, slices stacked along row x column) and write it as NIfTI to `nifti`.
    Raises SeriesError when the files are not one 3D MR volume."""
    files = sorted(Path(folder).glob("*.dcm"))
    check_volume(files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    sitk.WriteImage(reader.Execute(), str(nifti))
    return Path(nifti)
