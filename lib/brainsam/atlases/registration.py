"""Atlas registration: labelled images carried onto a new image, the classical first pass.

An atlas is an image with its label map in the label set's ids. Every image, atlas or target,
is placed once on a shared reference brain (brainsam.atlases.reference: Colin27, brain-masked mutual
information), so an atlas reaches a target through both placements composed; that affine is
refined on the deep brain (the box round the atlas's labels, `RegistrationSettings.local_*`) by
mutual information and a symmetric-forces demons step on histogram-matched intensities, the
demons kept only where its labels fit the target's intensities at least as well. Its labels
are resampled onto the target's canonical grid by nearest neighbour. Several atlases are fused
by their vote per voxel, weighed by the target's intensities where they disagree
(brainsam.atlases.fusion); how much they disagree says how sure the fusion is. Measured in
docs/day_zero.md (`python -m benchmarks.registration`).

Everything works in the canonical (R, A, S) voxel order of `brainsam.core.volume.Volume` with the
origin at voxel 0, so results map back to the stored grid with `Volume.to_stored`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from brainsam.atlases.atlas import Atlas, AtlasResult
from brainsam.atlases.fusion import fuse_with_intensity, with_borders
from brainsam.atlases.reference import (
    Placements,
    PlacementSettings,
    affine_by_mutual_information,
    as_affine,
    between,
    from_sitk,
    settings_key,
    to_sitk,
)
from brainsam.atlases.trust import agreement, agreements, misfit, trusted_indices
from brainsam.core.files import replaced_atomically
from brainsam.core.volume import Volume

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistrationSettings:
    """How an atlas is registered to a target.

    placement: how each image is placed on the reference brain (brainsam.atlases.reference); the
    atlas-to-target affine composes both placements.
    local_spacing_mm: isotropic resolution of the deep-brain stage, on the box round the atlas's
    labels grown by `local_margin_mm`.
    local_iterations, local_sampling: gradient steps per level (`local_shrink`) of that stage's
    affine and the fraction of voxels its metric samples; 0 iterations keep
    the composed placements.
    demons_iterations: iterations of that stage's deformable step; 0 keeps its affine only.
    demons_sigma_mm: smoothing of the demons displacement field.
    demons_tolerance: keep the demons step unless the labels it carries fit the target's
    intensities (`agreement`) worse than the affine's by more than this (`fitted_labels`);
    infinite: always keep it.
    threads: ITK threads (the project's CPU target has 2 cores).
    """

    placement: PlacementSettings = PlacementSettings()
    local_spacing_mm: float = 2.0
    local_margin_mm: float = 15.0
    local_iterations: int = 50
    local_shrink: tuple[int, ...] = (1,)
    local_sampling: float = 0.1
    demons_iterations: int = 30
    demons_sigma_mm: float = 2.0
    demons_tolerance: float = 0.03
    threads: int = 2

    def key(self) -> str:
        return hashlib.blake2b(repr(sorted(asdict(self).items())).encode(), digest_size=8).hexdigest()


@dataclass
class Registration:
    """An atlas registered to a target: transforms taking target points (canonical mm, origin
    at voxel 0) to atlas points, and the region of the target (an empty image) they were fitted on.

    affine: the composed placements refined on the deep brain. deformable: that affine after a
    demons displacement on the region (None without demons).
    """

    affine: sitk.Transform
    deformable: sitk.Transform | None
    region: sitk.Image


def register(
    atlas: Atlas,
    target: Volume,
    settings: RegistrationSettings = RegistrationSettings(),
    placements: Placements | None = None,
) -> Registration:
    """The atlas registered to `target`: both images' affines onto the reference brain composed
    (brainsam.atlases.reference, each computed once per image), refined on the deep brain (the box round
    the atlas's labels) by an affine and demons at `local_spacing_mm` (or the target's own
    spacing where that is coarser)."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(settings.threads)
    placements = placements or default_placements(settings, None)
    head = between(placements.of(target), placements.of(atlas.volume))
    spacing = max(settings.local_spacing_mm, min(target.spacing))
    region = deep_region(atlas, target, head, settings.local_margin_mm, spacing)
    fixed_region = resample_region(target, region)
    moving_smooth = smooth_to(
        cropped(atlas.volume, *atlas_box(atlas, settings.local_margin_mm + SMOOTHING_REACH_MM)), spacing
    )
    affine = head
    if settings.local_iterations > 0:
        affine = as_affine(
            affine_by_mutual_information(
                fixed_region,
                moving_smooth,
                head,
                settings.local_iterations,
                settings.local_sampling,
                shrink=settings.local_shrink,
            )
        )
    if settings.demons_iterations <= 0:
        return Registration(affine, None, region)
    field = demons(fixed_region, sitk.Resample(moving_smooth, fixed_region, affine, sitk.sitkLinear, 0.0), settings)
    # ITK composites apply the last transform first: displacement in target space, then affine
    return Registration(affine, sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(field)]), region)


def fitted_labels(atlas: Atlas, target: Volume, registration: Registration, tolerance: float = 0.03) -> np.ndarray:
    """The atlas labels carried onto `target` by the registration's deformable transform, unless
    they fit the target's intensities (`agreement`) worse than the affine's by more than
    `tolerance` (infinite: never checked). Demons follow intensities: across scanners and
    labelling protocols they pull structures astray (fs-aseg atlases on ixi-muse images: mean
    Dice 0.66 with demons, 0.71 without; agreement drops 0.08-0.13), within one they gain
    (fs-aseg: 0.83 without, 0.88 with; agreement moves by under 0.01); docs/day_zero.md."""
    if registration.deformable is None:
        return warp_labels(atlas, target, registration.affine, registration.region)
    deformed = warp_labels(atlas, target, registration.deformable, registration.region)
    if not np.isfinite(tolerance):
        return deformed
    rigid = warp_labels(atlas, target, registration.affine, registration.region)
    return deformed if agreement(atlas, target, deformed) >= agreement(atlas, target, rigid) - tolerance else rigid


_PLACEMENTS: dict[tuple[str, str], Placements] = {}


def default_placements(settings: RegistrationSettings, cache: Path | None) -> Placements:
    """The process's placements on the reference for `settings.placement`, kept in memory and
    under `cache` when given: each image is placed once per process (once for all, with a cache)."""
    key = (settings_key(settings.placement), str(cache))
    if key not in _PLACEMENTS:
        _PLACEMENTS[key] = Placements(settings.placement, cache)
    return _PLACEMENTS[key]


SMOOTHING_REACH_MM = 6.0
"""How far outside a box the voxels that smoothing carries into it lie (3 sigma at 3 mm)."""


def atlas_box(atlas: Atlas, margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest corner (mm) of the box round the atlas's labels grown by `margin_mm`."""
    low, high = atlas.label_box
    return low - margin_mm, high + margin_mm


def cropped(volume: Volume, low_mm: np.ndarray, high_mm: np.ndarray) -> sitk.Image:
    """The part of `volume` between two corners (mm, kept inside the grid) as a SimpleITK
    image placed where it lies: only that part is then smoothed and sampled."""
    spacing = np.asarray(volume.spacing)
    start = np.clip(np.floor(np.asarray(low_mm) / spacing).astype(int), 0, np.asarray(volume.data.shape) - 1)
    stop = np.clip(np.ceil(np.asarray(high_mm) / spacing).astype(int) + 1, start + 1, volume.data.shape)
    image = to_sitk(volume.data[tuple(slice(a, b) for a, b in zip(start, stop))], volume.spacing)
    image.SetOrigin(tuple(float(v) for v in start * spacing))
    return image


def deep_region(atlas: Atlas, target: Volume, head: sitk.Transform, margin_mm: float, spacing_mm: float) -> sitk.Image:
    """An empty image on the target's part holding the atlas's labels (their box grown by
    `margin_mm`, carried over by the inverse of `head`), at `spacing_mm`."""
    low, high = atlas_box(atlas, margin_mm)
    corners = [(x, y, z) for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])]
    inverse = head.GetInverse()
    mapped = np.array([inverse.TransformPoint(tuple(float(v) for v in corner)) for corner in corners])
    extent = (np.asarray(target.data.shape) - 1) * np.asarray(target.spacing)
    start, stop = np.clip(mapped.min(axis=0), 0, extent), np.clip(mapped.max(axis=0), 0, extent)
    size = [max(int(np.ceil((b - a) / spacing_mm)) + 1, 2) for a, b in zip(start, stop)]
    region = sitk.Image(size, sitk.sitkFloat32)
    region.SetSpacing((spacing_mm,) * 3)
    region.SetOrigin(tuple(float(v) for v in start))
    return region


def smooth_to(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """`image` smoothed against aliasing before it is sampled at `spacing_mm`."""
    sigma = [max((spacing_mm - s) / 2.0, 0.01) for s in image.GetSpacing()]
    return sitk.Cast(sitk.SmoothingRecursiveGaussian(image, sigma), sitk.sitkFloat32)


def resample_region(volume: Volume, region: sitk.Image) -> sitk.Image:
    """The part of `volume` under `region`, smoothed and resampled onto its grid."""
    low = np.asarray(region.GetOrigin())
    high = low + (np.asarray(region.GetSize()) - 1) * np.asarray(region.GetSpacing())
    part = cropped(volume, low - SMOOTHING_REACH_MM, high + SMOOTHING_REACH_MM)
    return sitk.Resample(smooth_to(part, region.GetSpacing()[0]), region, sitk.Transform(), sitk.sitkLinear, 0.0)


def demons(fixed: sitk.Image, warped: sitk.Image, settings: RegistrationSettings) -> sitk.Image:
    """Displacement field (target grid, mm) from fast symmetric-forces demons on intensities
    histogram-matched to the target."""
    matched = sitk.HistogramMatching(
        warped, fixed, numberOfHistogramLevels=64, numberOfMatchPoints=7, thresholdAtMeanIntensity=True
    )
    step = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    step.SetNumberOfIterations(settings.demons_iterations)
    step.SetSmoothDisplacementField(True)
    step.SetStandardDeviations(settings.demons_sigma_mm / fixed.GetSpacing()[0])
    return sitk.Cast(step.Execute(fixed, matched), sitk.sitkVectorFloat64)


def warp_labels(
    atlas: Atlas, target: Volume, transform: sitk.Transform, region: sitk.Image | None = None
) -> np.ndarray:
    """The atlas labels resampled (nearest neighbour) onto the target's canonical grid, within
    `region` (a box in target mm; zero outside it) when given."""
    shape, spacing = np.asarray(target.data.shape), np.asarray(target.spacing)
    start, stop = np.zeros(3, int), shape
    if region is not None:
        low = np.asarray(region.GetOrigin())
        high = low + (np.asarray(region.GetSize()) - 1) * np.asarray(region.GetSpacing())
        start = np.clip(np.floor(low / spacing).astype(int), 0, shape - 1)
        stop = np.clip(np.ceil(high / spacing).astype(int) + 1, start + 1, shape)
    reference = sitk.Image([int(n) for n in stop - start], sitk.sitkUInt8)
    reference.SetSpacing(tuple(float(s) for s in spacing))
    reference.SetOrigin(tuple(float(v) for v in start * spacing))
    low, high = atlas.label_box
    labels = sitk.Resample(cropped_labels(atlas, low, high), reference, transform, sitk.sitkNearestNeighbor, 0)
    out = np.zeros(target.data.shape, dtype=np.uint8)
    out[tuple(slice(a, b) for a, b in zip(start, stop))] = from_sitk(labels)
    return out


def cropped_labels(atlas: Atlas, low_mm: np.ndarray, high_mm: np.ndarray) -> sitk.Image:
    """The atlas's labels between two corners (mm) as a uint8 SimpleITK image placed where they lie."""
    spacing = np.asarray(atlas.volume.spacing)
    start = np.clip(np.floor(low_mm / spacing).astype(int) - 1, 0, None)
    stop = np.minimum(np.ceil(high_mm / spacing).astype(int) + 2, atlas.labels.shape)
    image = to_sitk(atlas.labels[tuple(slice(a, b) for a, b in zip(start, stop))], atlas.volume.spacing)
    image.SetOrigin(tuple(float(v) for v in start * spacing))
    return image


def carry_labels(
    atlas: Atlas,
    target: Volume,
    settings: RegistrationSettings = RegistrationSettings(),
    cache: Path | None = None,
    placements: Placements | None = None,
) -> np.ndarray:
    """The atlas labels on the target (canonical, label-set ids), registering once: with
    `cache`, the result is kept there under the atlas, target and settings digests, and so are
    the images' placements on the reference (unless `placements` are given)."""
    found = cached(atlas, target, settings, cache) if cache is not None else None
    if found is not None:
        return found
    began = time.perf_counter()
    labels = fitted_labels(
        atlas,
        target,
        register(atlas, target, settings, placements or default_placements(settings, cache)),
        settings.demons_tolerance,
    )
    logger.info("atlas %s registered in %.1f s", atlas.name, time.perf_counter() - began)
    if cache is not None:
        with replaced_atomically(cache_path(atlas, target, settings, cache)) as partial:
            np.savez_compressed(partial, labels=labels)
    return labels


def cache_path(atlas: Atlas, target: Volume, settings: RegistrationSettings, cache: Path) -> Path:
    """Where the atlas's labels on the target are kept: named by atlas, target and settings digests."""
    return Path(cache) / f"{atlas.key[:16]}-{target.content_hash[:16]}-{settings.key()}.npz"


def cached(atlas: Atlas, target: Volume, settings: RegistrationSettings, cache: Path) -> np.ndarray | None:
    """The atlas labels on the target if an earlier `carry_labels` kept them in `cache`, else None
    (also when the kept file is damaged: it is removed, and the atlas registered again)."""
    path = cache_path(atlas, target, settings, cache)
    try:
        with np.load(path, allow_pickle=False) as kept:
            labels = kept["labels"]
        if labels.shape != target.data.shape:
            raise ValueError(f"labels of shape {labels.shape} for an image of shape {target.data.shape}")
        return labels
    except FileNotFoundError:
        return None
    except Exception as error:  # any damage (truncated, foreign, garbled): register again
        logger.warning("ignoring damaged registration %s: %s", path, error)
        path.unlink(missing_ok=True)
        return None


def register_atlases(
    atlases: list[Atlas],
    target: Volume,
    settings: RegistrationSettings = RegistrationSettings(),
    cache: Path | None = None,
) -> AtlasResult:
    """Every atlas registered to `target` and fused, those whose registration failed
    (`trusted`) left out unless all did; see `carry_labels` for `cache`."""
    if not atlases:
        raise ValueError("atlas segmentation needs at least one atlas")
    propagated = [carry_labels(atlas, target, settings, cache) for atlas in atlases]
    fits = agreements(atlases, target, propagated)
    kept = trusted_indices(fits)
    if not kept:
        logger.warning("no atlas registered onto the image with matching intensities: keeping all %d", len(propagated))
        kept = list(range(len(propagated)))
    maps = [propagated[i] for i in kept]
    return AtlasResult(
        fuse_with_intensity(with_borders(maps), target.data, target.spacing), maps, misfit([fits[i] for i in kept])
    )
