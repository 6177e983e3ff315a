"""The shared reference space: every image's affine onto one brain, worked out once per image.

The reference is Colin27 (mricron-data's ch2.nii.gz) with its brain mask (ch2bet.nii.gz, the
same grid). An image is placed on it by an affine found by Mattes mutual information: first the
whole heads (started by aligning the tops of the heads), then only the reference's brain (the
mask grown by BRAIN_MARGIN_MM), so a neck, a wider field of view, a skull-stripped image or
another scanner's contrast outside the brain no longer pulls the fit. Two images are then
aligned by composing their affines (`between`), so a new image costs one such registration
however many atlases it meets, and an atlas's is computed once for all images.

Everything works in the canonical (R, A, S) voxel order of `brainsam.core.volume.Volume` with the
origin at voxel 0 (`brainsam.atlases.registration.to_sitk`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from brainsam.core.files import replaced_atomically
from brainsam.core.volume import Volume, load_volume
from brainsam.io.sample import INSTALL_HINT, MRICRON

logger = logging.getLogger(__name__)

BRAIN_MARGIN_MM = 6.0
"""How far round the reference's brain mask the brain-stage metric looks: a little skull and
CSF give the fit its edges."""


@dataclass(frozen=True)
class Reference:
    """The reference image (canonical, normalised) and its brain mask (bool, same grid)."""

    volume: Volume
    brain: np.ndarray


@lru_cache(maxsize=2)
def load_reference(source: Path = MRICRON) -> Reference:
    """Colin27 and its brain mask from mricron-data. Raises FileNotFoundError when absent."""
    image, brain = source / "ch2.nii.gz", source / "ch2bet.nii.gz"
    for path in (image, brain):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: the reference brain comes from the mricron-data package; {INSTALL_HINT}"
            )
    volume = load_volume(image)
    return Reference(volume, volume.to_canonical(np.asanyarray(nib.load(str(brain)).dataobj)) > 0)


def to_sitk(array: np.ndarray, spacing: tuple[float, float, float]) -> sitk.Image:
    """A canonical (R, A, S) array as a SimpleITK image with origin 0 and identity direction
    (SimpleITK's arrays are z, y, x, hence the transpose)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    return image


def from_sitk(image: sitk.Image) -> np.ndarray:
    """A SimpleITK image's voxels as a canonical (R, A, S) array (`to_sitk` undone)."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def downsample(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Smooth (against aliasing) and resample to an isotropic grid covering the same extent."""
    old = np.array(image.GetSpacing())
    size = [max(int(round(n * s / spacing_mm)), 2) for n, s in zip(image.GetSize(), old)]
    smoothed = sitk.Cast(image, sitk.sitkFloat32)
    for axis, spacing in enumerate(old):
        # axis by axis: ITK's recursive Gaussian refuses a zero sigma, and an axis already
        # coarser than the target (a 5 mm slice direction) needs none
        if spacing < spacing_mm:
            smoothed = sitk.RecursiveGaussian(smoothed, (spacing_mm - spacing) / 2.0, direction=axis)
    return sitk.Resample(
        smoothed,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        (spacing_mm,) * 3,
        image.GetDirection(),
        0.0,
        sitk.sitkFloat32,
    )


HEAD_DEPTH_MM = 120.0
"""How far below the top of the head the part that starts registrations is centred on: fields of
view differ below (a neck or not), never at the top."""


def head_centre(image: sitk.Image) -> np.ndarray:
    """Centre (mm) of the head's upper HEAD_DEPTH_MM (Otsu foreground, canonical S up)."""
    head = from_sitk(sitk.OtsuThreshold(image, 0, 1)) > 0
    index = np.argwhere(head)
    spacing = np.asarray(image.GetSpacing())
    top = index[:, 2].max()
    upper = index[index[:, 2] >= top - HEAD_DEPTH_MM / spacing[2]]
    return upper.mean(axis=0) * spacing


def affine_by_mutual_information(
    fixed: sitk.Image,
    moving: sitk.Image,
    initial: sitk.Transform,
    iterations: int,
    sampling: float,
    shrink: tuple[int, ...],
    mask: sitk.Image | None = None,
) -> sitk.Transform:
    """The affine from `initial` maximising Mattes mutual information between `fixed` and
    `moving` (within `mask` on `fixed` when given), one level per `shrink` factor (smoothed by
    half as many voxels), `iterations` gradient steps per level on a `sampling` fraction of voxels."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling, seed=7)
    if mask is not None:
        method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-3, numberOfIterations=iterations, relaxationFactor=0.6
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(shrink))
    method.SetSmoothingSigmasPerLevel([factor // 2 for factor in shrink])
    method.SetInitialTransform(initial, inPlace=False)
    return method.Execute(fixed, moving)


@dataclass(frozen=True)
class PlacementSettings:
    """How an image is placed on the reference.

    head_mm: resolution of the whole-head stage (levels at 2x and 1x of it).
    brain_mm: resolution of the brain stage (levels at 2x and 1x of it).
    iterations: gradient steps per level.
    sampling: fraction of voxels the mutual information is estimated from.
    """

    head_mm: float = 4.0
    brain_mm: float = 3.0
    iterations: int = 100
    sampling: float = 0.2


def place(volume: Volume, settings: PlacementSettings = PlacementSettings()) -> sitk.AffineTransform:
    """The affine taking reference points (canonical mm, origin at voxel 0) to `volume`'s."""
    moving = to_sitk(volume.data, volume.spacing)
    fixed_head, moving_head = reference_at(settings.head_mm), downsample(moving, settings.head_mm)
    initial = sitk.AffineTransform(3)
    centre = head_centre(fixed_head)
    initial.SetCenter(centre.tolist())
    initial.SetTranslation((head_centre(moving_head) - centre).tolist())
    head = affine_by_mutual_information(
        fixed_head, moving_head, initial, settings.iterations, settings.sampling, shrink=(2, 1)
    )
    fixed_brain = reference_at(settings.brain_mm)
    brain = affine_by_mutual_information(
        fixed_brain,
        downsample(moving, settings.brain_mm),
        as_affine(head),
        settings.iterations,
        settings.sampling,
        shrink=(2, 1),
        mask=brain_mask(fixed_brain),
    )
    return as_affine(brain)


@lru_cache(maxsize=4)
def reference_at(spacing_mm: float) -> sitk.Image:
    """The reference image downsampled to `spacing_mm` (computed once per process)."""
    reference = load_reference()
    return downsample(to_sitk(reference.volume.data, reference.volume.spacing), spacing_mm)


def brain_mask(grid: sitk.Image) -> sitk.Image:
    """The reference's brain grown by BRAIN_MARGIN_MM, as a uint8 mask on `grid`."""
    reference = load_reference()
    grown = ndimage.binary_dilation(
        reference.brain, iterations=int(round(BRAIN_MARGIN_MM / min(reference.volume.spacing)))
    )
    mask = to_sitk(grown.astype(np.uint8), reference.volume.spacing)
    return sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def as_affine(transform: sitk.Transform) -> sitk.AffineTransform:
    """The affine a registration returned (wrapped in a composite by SimpleITK) as such."""
    flat = transform.Downcast()
    if isinstance(flat, sitk.CompositeTransform):
        flat = flat.GetNthTransform(0).Downcast()
    return sitk.AffineTransform(flat)


def between(target: sitk.AffineTransform, source: sitk.AffineTransform) -> sitk.AffineTransform:
    """The affine taking target points to source points, from both placements (reference ->
    image): source placement after the inverse of the target's."""

    def matrix(transform: sitk.AffineTransform) -> np.ndarray:
        out = np.eye(4)
        a = np.asarray(transform.GetMatrix()).reshape(3, 3)
        c, t = np.asarray(transform.GetCenter()), np.asarray(transform.GetTranslation())
        out[:3, :3], out[:3, 3] = a, t + c - a @ c
        return out

    combined = matrix(source) @ np.linalg.inv(matrix(target))
    out = sitk.AffineTransform(3)
    out.SetMatrix(combined[:3, :3].ravel().tolist())
    out.SetTranslation(combined[:3, 3].tolist())
    return out


class Placements:
    """Placements on the reference kept per image content (in memory, and on disk under `cache`)."""

    def __init__(self, settings: PlacementSettings = PlacementSettings(), cache: Path | None = None, most: int = 64):
        self.settings, self.cache, self.most = settings, cache, most
        self._kept: dict[str, sitk.AffineTransform] = {}
        self._lock = threading.Lock()

    def of(self, volume: Volume) -> sitk.AffineTransform:
        """`place(volume)`, computed once."""
        key = f"{volume.content_hash[:16]}-{settings_key(self.settings)}"
        with self._lock:
            found = self._kept.get(key)
        if found is not None:
            return found
        path = Path(self.cache) / f"placement-{key}.tfm" if self.cache is not None else None
        if path is not None and path.is_file():
            try:
                found = as_affine(sitk.ReadTransform(str(path)))
            except RuntimeError:  # a damaged file: the image is placed again
                logger.warning("unreadable placement %s: placing the image again", path)
        if found is None:
            began = time.perf_counter()
            found = place(volume, self.settings)
            logger.info("image placed on the reference in %.1f s", time.perf_counter() - began)
            if path is not None:
                with replaced_atomically(path) as partial:
                    sitk.WriteTransform(found, str(partial))
        with self._lock:
            if len(self._kept) >= self.most:
                self._kept.pop(next(iter(self._kept)))
            self._kept[key] = found
        return found


def settings_key(settings: PlacementSettings) -> str:
    """Digest of the placement settings: placements made otherwise are kept apart."""
    return hashlib.blake2b(repr(sorted(asdict(settings).items())).encode(), digest_size=6).hexdigest()
