"""The shared reference space (brainsam.atlases.reference) and registration across scanners.

Composition is checked exactly on made-up affines; placement and a cross-scanner registration
on real subjects from ../shared/data (skipped with a reason when absent, or when mricron-data,
which holds the reference brain, is not installed).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from brainsam.atlases.atlas import Atlas, load_atlas
from brainsam.atlases.reference import Placements, between, downsample, load_reference
from brainsam.atlases.registration import RegistrationSettings, cache_path, cached, carry_labels
from brainsam.core.labels import CONFIGS, load_label_set, load_mapping
from brainsam.core.metrics import dice
from brainsam.core.volume import from_array
from brainsam.io.sample import INSTALL_HINT, MRICRON

from .support import make_phantom, require_data


def affine(matrix: np.ndarray, translation: np.ndarray, centre: np.ndarray) -> sitk.AffineTransform:
    out = sitk.AffineTransform(3)
    out.SetMatrix(matrix.ravel().tolist())
    out.SetTranslation(translation.tolist())
    out.SetCenter(centre.tolist())
    return out


def test_between_composes_the_source_placement_after_the_inverse_of_the_target() -> None:
    rng = np.random.default_rng(0)
    target = affine(
        np.eye(3) + 0.1 * rng.standard_normal((3, 3)), rng.standard_normal(3) * 10, np.array([90.0, 100.0, 80.0])
    )
    source = affine(
        np.eye(3) + 0.1 * rng.standard_normal((3, 3)), rng.standard_normal(3) * 10, np.array([10.0, -5.0, 3.0])
    )
    combined = between(target, source)
    for reference_point in rng.uniform(0, 200, (5, 3)):
        # a reference point seen in the target must land where the source sees it
        seen_in_target = target.TransformPoint(reference_point.tolist())
        np.testing.assert_allclose(
            combined.TransformPoint(seen_in_target), source.TransformPoint(reference_point.tolist()), atol=1e-6
        )
    identity = between(target, target)
    np.testing.assert_allclose(identity.TransformPoint((3.0, 4.0, 5.0)), (3.0, 4.0, 5.0), atol=1e-6)


def require_reference() -> None:
    try:
        load_reference()
    except FileNotFoundError as error:
        pytest.skip(f"reference brain not available ({INSTALL_HINT}): {error}")


@pytest.mark.realdata
def test_downsampling_a_grid_coarser_than_the_target_along_one_axis_keeps_its_extent() -> None:
    """A 0.5 x 0.5 x 5 mm grid brought to 4 mm: the 5 mm axis needs no smoothing (ITK refuses a zero
    sigma), the others do; the extent is kept and a constant image stays constant."""
    image = sitk.GetImageFromArray(np.full((12, 96, 96), 7.0, np.float32))
    image.SetSpacing((0.5, 0.5, 5.0))
    coarse = downsample(image, 4.0)
    assert coarse.GetSize() == (12, 12, 15)
    assert np.allclose(sitk.GetArrayFromImage(coarse)[2:-2, 2:-2, 2:-2], 7.0, atol=1e-3)


def test_a_2mm_scan_of_another_scanner_is_placed_on_the_reference_brain(tmp_path) -> None:
    """IXI012 (2 mm, PSR, neck in view) placed on Colin27: its MUSE thalami land on AAL's."""
    folder = require_data("ixi-muse", "IXI012-HH-1211")
    require_reference()
    labels = load_label_set()
    subject = load_atlas(
        folder / "T1.nii.gz", folder / "muse.nii.gz", load_mapping(CONFIGS / "mappings" / "muse.yaml"), labels
    )
    aal = load_atlas(
        MRICRON / "ch2.nii.gz", MRICRON / "aal.nii.gz", load_mapping(CONFIGS / "mappings" / "aal.yaml"), labels
    )
    placements = Placements(cache=tmp_path)
    placement = placements.of(subject.volume)
    assert list(tmp_path.glob("placement-*.tfm")), "the placement is kept on disk"
    for name in ("Left-Thalamus", "Right-Thalamus"):
        in_reference = np.argwhere(aal.labels == labels[name].id).mean(axis=0) * np.asarray(aal.volume.spacing)
        in_subject = np.argwhere(subject.labels == labels[name].id).mean(axis=0) * np.asarray(subject.volume.spacing)
        # measured 1.7 / 1.9 mm apart; the registration before placements missed by centimetres
        assert np.linalg.norm(np.asarray(placement.TransformPoint(in_reference.tolist())) - in_subject) < 6.0


@pytest.mark.realdata
def test_a_freesurfer_atlas_labels_a_scan_of_another_scanner() -> None:
    """fs-aseg sub-01 (1 mm FreeSurfer conformed) registered onto IXI012 (2 mm, other scanner,
    neck in view) finds the deep structures: whole-head registration gave Dice 0.00-0.27 here."""
    atlas_folder, target_folder = require_data("fs-aseg", "sub-01"), require_data("ixi-muse", "IXI012-HH-1211")
    require_reference()
    labels = load_label_set()
    atlas = load_atlas(
        atlas_folder / "T1.nii.gz",
        atlas_folder / "aseg.nii.gz",
        load_mapping(CONFIGS / "mappings" / "aseg.yaml"),
        labels,
    )
    target = load_atlas(
        target_folder / "T1.nii.gz",
        target_folder / "muse.nii.gz",
        load_mapping(CONFIGS / "mappings" / "muse.yaml"),
        labels,
    )
    carried = carry_labels(atlas, target.volume, RegistrationSettings())
    scores = {
        name: dice(carried == labels[name].id, target.labels == labels[name].id)
        for name in ("Left-Thalamus", "Right-Thalamus", "Brain-Stem", "Right-Putamen")
    }
    # measured 0.79 / 0.82 / 0.79 / 0.73 against MUSE labels (another labelling protocol)
    assert min(scores.values()) > 0.6, scores


@pytest.mark.parametrize("damage", [b"PK\x03\x04 cut short", b"not an npz at all"])
def test_a_damaged_kept_registration_is_registered_again_not_served(tmp_path, damage: bytes) -> None:
    image, truth = make_phantom()
    target = from_array(image, np.eye(4))
    atlas = Atlas("phantom-atlas", from_array(image, np.eye(4)), truth.astype(np.uint8))
    settings = RegistrationSettings()
    path = cache_path(atlas, target, settings, tmp_path)
    np.savez_compressed(path, labels=truth.astype(np.uint8))
    assert np.array_equal(cached(atlas, target, settings, tmp_path), truth)
    path.write_bytes(damage)
    assert cached(atlas, target, settings, tmp_path) is None and not path.exists()
    np.savez_compressed(path, labels=truth[:-1].astype(np.uint8))  # another image's labels
    assert cached(atlas, target, settings, tmp_path) is None
