"""MRI volumes held in canonical (RAS) voxel order, with the exact way back to the stored grid.

Any stored orientation (FreeSurfer LIA, LPS, PSR, oblique) is brought to the closest RAS axis
order by permuting and flipping axes only, never by resampling, so a mask computed in canonical
order maps back voxel for voxel onto the image as stored.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


class VolumeError(ValueError):
    """An input image that cannot be segmented; the message says what is wrong with it."""


@dataclass(frozen=True)
class Volume:
    """A normalised 3D image in canonical order plus what is needed to return to the stored grid.

    data: float32 array in [0, 1], axes ordered (and flipped) as R, A, S.
    spacing: voxel size in mm along each canonical axis.
    ornt: nibabel orientation that maps stored axes onto canonical axes.
    stored_shape, affine: the grid of the image as stored on disk.
    content_hash: digest of data and spacing; identical scans in any orientation share it.
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    ornt: np.ndarray
    stored_shape: tuple[int, int, int]
    affine: np.ndarray
    content_hash: str

    def to_canonical_index(self, ijk: np.ndarray) -> np.ndarray:
        """Map stored voxel indices (N, 3) to canonical voxel indices (N, 3)."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.int64))
        out = np.empty_like(ijk)
        for stored_axis, (canonical_axis, flip) in enumerate(self.ornt.astype(int)):
            index = ijk[:, stored_axis]
            out[:, canonical_axis] = index if flip == 1 else self.stored_shape[stored_axis] - 1 - index
        return out

    def to_canonical(self, stored: np.ndarray) -> np.ndarray:
        """Put an array on the stored grid (e.g. a label file) in canonical order."""
        if tuple(stored.shape[:3]) != self.stored_shape:
            raise VolumeError(f"array of shape {tuple(stored.shape)} does not match the image grid {self.stored_shape}")
        return np.ascontiguousarray(apply_orientation(stored, self.ornt))

    def to_stored(self, canonical: np.ndarray, order: str = "C") -> np.ndarray:
        """Return a canonical-order array (e.g. a mask) on the stored grid, contiguous in memory
        `order` ("C" or "F")."""
        back = ornt_transform(RAS, self.ornt)
        return np.asarray(apply_orientation(canonical, back), order=order)


def normalise_intensity(data: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Scale intensities to [0, 1] between percentiles of the non-zero finite voxels.

    Zero voxels (background of skull-stripped or defaced scans) do not bias the percentiles.
    NaN and infinite values become 0. A constant image becomes all zeros; a single value on a
    zero background becomes 1.
    """
    data = np.nan_to_num(data.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    values = data[data != 0]
    if values.size == 0:
        return np.zeros_like(data)
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo and values.size < data.size:  # one value on a zero background: the contrast is against it
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi <= lo:
        return np.zeros_like(data)
    return np.clip((data - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _as_3d(array: np.ndarray) -> np.ndarray:
    """Drop trailing singleton dimensions; refuse anything that is not a 3D volume."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise VolumeError(f"expected a 3D image, got {array.ndim}D with shape {tuple(array.shape)}")
    if min(array.shape) < 2:
        raise VolumeError(f"image shape {tuple(array.shape)} is too small: every axis needs 2 voxels or more")
    return array


def from_array(array: np.ndarray, affine: np.ndarray) -> Volume:
    """Build a Volume from a stored-order array and its 4x4 voxel-to-world affine."""
    array = _as_3d(np.asarray(array))
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError("the image affine is not an invertible 4x4 matrix")
    ornt = io_orientation(affine)
    canonical = np.ascontiguousarray(apply_orientation(normalise_intensity(array), ornt))
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    spacing = [0.0, 0.0, 0.0]
    for stored_axis, (canonical_axis, _) in enumerate(ornt.astype(int)):
        spacing[canonical_axis] = float(zooms[stored_axis])
    digest = hashlib.blake2b(canonical.tobytes(), digest_size=16)
    digest.update(np.asarray(spacing, dtype=np.float32).round(4).tobytes())
    return Volume(
        data=canonical,
        spacing=(spacing[0], spacing[1], spacing[2]),
        ornt=ornt,
        stored_shape=tuple(int(n) for n in array.shape),
        affine=affine,
        content_hash=digest.hexdigest(),
    )


def load_volume(path: str | Path) -> Volume:
    """Read a NIfTI (or any format nibabel reads) into a canonical, normalised Volume."""
    path = Path(path)
    try:
        image = nib.load(str(path))
        array = np.asanyarray(image.dataobj)
    except FileNotFoundError:
        raise
    except Exception as error:  # nibabel raises many types for damaged files
        raise VolumeError(f"cannot read {path.name} as an image: {error}") from error
    volume = from_array(array, image.affine)
    if not volume.data.any():  # nothing a prompt could separate: refuse rather than answer noise
        raise VolumeError(
            f"{path.name} holds no contrast (every finite voxel has the same value): there is nothing to segment"
        )
    return volume


def stored_for_file(volume: Volume, canonical: np.ndarray, dtype: str | np.dtype) -> np.ndarray:
    """A canonical-order array on the stored grid of `volume` as `dtype`, in Fortran order: NIfTI
    and NRRD files hold voxels in that order, so their writers copy such an array out whole
    rather than reordering it piece by piece (docs/speed.md, "Writing the answer")."""
    return volume.to_stored(canonical, order="F").astype(dtype, copy=False)


def save_mask(volume: Volume, canonical_mask: np.ndarray, path: str | Path, dtype: str = "uint8") -> Path:
    """Write a canonical-order mask as NIfTI on the stored grid and affine of `volume`."""
    image = nib.Nifti1Image(stored_for_file(volume, canonical_mask, dtype), volume.affine)
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    nib.save(image, str(path))
    return Path(path)
