"""Orientation, slice view and prompt mapping: exact index bookkeeping, no model needed."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from brainsam.core.prompts import (
    PromptError,
    parse_points,
    parse_roi,
    points_to_view,
    prior_box,
)
from brainsam.core.view import AXES, SliceView
from brainsam.core.volume import VolumeError, from_array, normalise_intensity, save_mask
from brainsam.inference.propagation import SlicePrompt, SliceResult, StopRule, propagate

from .support import ORIENTATIONS, stored_copy

# Orientations met in practice: FreeSurfer conformed (LIA), DICOM (LPS), IXI sagittal (PSR), and RAS.


@pytest.fixture()
def canonical() -> np.ndarray:
    return np.random.default_rng(0).random((9, 11, 7)).astype(np.float32) + 0.5


@pytest.mark.parametrize("name", ORIENTATIONS)
def test_any_orientation_gives_the_same_canonical_volume(canonical: np.ndarray, name: str) -> None:
    stored, affine = stored_copy(canonical, (1.0, 2.0, 3.0), name)
    volume = from_array(stored, affine)
    reference = from_array(canonical, np.diag([1.0, 2.0, 3.0, 1.0]))
    np.testing.assert_array_equal(volume.data, reference.data)
    assert volume.spacing == pytest.approx((1.0, 2.0, 3.0))
    assert volume.content_hash == reference.content_hash
    # back to the stored grid, voxel for voxel
    np.testing.assert_array_equal(volume.to_stored(volume.data), volume.to_stored(reference.data))
    assert volume.to_stored(volume.data).shape == stored.shape


@pytest.mark.parametrize("name", ORIENTATIONS)
def test_a_saved_mask_lies_on_the_stored_grid(canonical: np.ndarray, name: str, tmp_path) -> None:
    stored, affine = stored_copy(canonical, (1.0, 2.0, 3.0), name)
    volume = from_array(stored, affine)
    mask = (stored > 1.0).astype(np.uint8)
    path = save_mask(volume, volume.to_canonical(mask), tmp_path / "mask.nii.gz", dtype="int16")
    written = nib.load(path)
    np.testing.assert_array_equal(np.asarray(written.dataobj), mask)
    assert written.get_data_dtype() == np.int16
    np.testing.assert_allclose(written.affine, affine)


@pytest.mark.parametrize("name", ORIENTATIONS)
def test_stored_indices_map_onto_the_same_voxel(canonical: np.ndarray, name: str) -> None:
    stored, affine = stored_copy(canonical, (1.0, 1.0, 1.0), name)
    volume = from_array(stored, affine)
    normalised = normalise_intensity(stored)
    for ijk in np.argwhere(np.ones(stored.shape, bool))[::17]:
        (c,) = volume.to_canonical_index(ijk[None])
        assert volume.data[tuple(c)] == normalised[tuple(ijk)]
        # world position agrees too: the canonical voxel is the same point in space
        world = affine @ np.r_[ijk, 1.0]
        assert np.allclose(
            from_array(canonical, stored_copy(canonical, (1, 1, 1), "RAS")[1]).affine @ np.r_[c, 1.0], world
        )


def test_oblique_affine_maps_to_the_closest_axes(canonical: np.ndarray) -> None:
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.0, 1.0, 2.0])
    volume = from_array(canonical, affine)
    np.testing.assert_array_equal(volume.data, normalise_intensity(canonical))
    assert volume.spacing == pytest.approx((1.0, 1.0, 2.0))


@pytest.mark.parametrize("axis", AXES)
def test_slice_view_round_trip_and_index_mapping(canonical: np.ndarray, axis: str) -> None:
    view = SliceView(canonical, (1.0, 2.0, 3.0), axis)
    np.testing.assert_array_equal(view.from_view(view.stack), canonical)
    for ijk in [(0, 0, 0), (8, 10, 6), (3, 7, 2)]:
        s, r, c = view.index_to_view(np.array([ijk]))[0]
        assert view.stack[s, r, c] == canonical[ijk]
    assert view.spacing[0] == (1.0, 2.0, 3.0)[AXES[axis]]


def test_axial_slices_are_display_oriented() -> None:
    """Patient right on the image's left, anterior at the top, as scanners display axial slices."""
    canonical = np.zeros((5, 6, 3), np.float32)
    canonical[4, 5, 1] = 1  # rightmost, most anterior voxel
    view = SliceView(canonical, (1, 1, 1), "axial")
    assert view.stack[1, 0, 0] == 1


def test_bad_volumes_are_refused_with_a_reason() -> None:
    with pytest.raises(VolumeError, match="3D"):
        from_array(np.zeros((4, 4)), np.eye(4))
    with pytest.raises(VolumeError, match="3D"):
        from_array(np.zeros((4, 4, 4, 2)), np.eye(4))
    with pytest.raises(VolumeError, match="affine"):
        from_array(np.zeros((4, 4, 4)), np.zeros((4, 4)))
    assert from_array(np.zeros((4, 4, 4, 1)), np.eye(4)).data.shape == (4, 4, 4)


def test_nan_and_constant_images_normalise_to_finite_values() -> None:
    data = np.full((4, 4, 4), 7.0)
    data[0, 0, 0] = np.nan
    data[1, 1, 1] = np.inf
    assert np.all(np.isfinite(normalise_intensity(data)))
    assert normalise_intensity(np.full((4, 4, 4), 3.0)).max() == 0


def test_roi_with_swapped_bounds_maps_to_the_same_box(canonical: np.ndarray) -> None:
    stored, affine = stored_copy(canonical, (1, 1, 1), "LIA")
    volume = from_array(stored, affine)
    view = SliceView(volume.data, volume.spacing, "axial")
    straight = parse_roi([1, 5, 2, 4, 3, 8], volume, view)
    swapped = parse_roi([5, 1, 4, 2, 8, 3], volume, view)
    assert straight == swapped
    corners = points_to_view(np.array([[1, 2, 3], [5, 4, 8]]), volume, view)
    assert straight.slices == (corners[:, 0].min(), corners[:, 0].max())
    assert straight.rows == (corners[:, 1].min(), corners[:, 1].max())


def test_bad_prompts_raise_prompt_errors(canonical: np.ndarray) -> None:
    volume = from_array(canonical, np.eye(4))
    view = SliceView(volume.data, volume.spacing, "axial")
    for points, match in [
        ([[9, 0, 0]], "outside"),
        ([[-1, 0, 0]], "outside"),
        ([[1.5, 2, 3]], "whole"),
        ([[1, 2]], "3 numbers"),
        ("abc", "voxel indices"),
    ]:
        with pytest.raises(PromptError, match=match):
            parse_points(points, volume, "foreground")
    for roi, match in [([1, 2, 3], "6 numbers"), ([20, 30, 0, 3, 0, 3], "outside"), ("x", "6 numbers")]:
        with pytest.raises(PromptError, match=match):
            parse_roi(roi, volume, view)
    assert parse_points([], volume, "foreground").shape == (0, 3)


def test_prior_box_has_the_typical_size_in_voxels() -> None:
    view = SliceView(np.zeros((64, 64, 64), np.float32), (2.0, 1.0, 1.0), "axial")
    box = prior_box(np.array([30, 30, 30]), (20.0, 10.0, 8.0), view)
    # slices along S (8 mm at 1 mm), rows along A (10 mm at 1 mm), cols along R (20 mm at 2 mm)
    assert box.slices == (26, 34) and box.rows == (25, 35) and box.cols == (25, 35)


def _walk(outward: bool, found: str) -> dict[int, SliceResult]:
    """Slices 0..6 of a square, re-walked from slice 3 toward slice 0 by a model that finds
    `found` from slice 2 on: "nothing" (a correction's walk that fades out) or "elsewhere"
    (one that strays onto another object), under a rule that calls Dice < 0.3 another object."""
    square = np.zeros((12, 12), dtype=bool)
    square[3:9, 3:9] = True
    results = {i: SliceResult(square.copy(), torch.zeros(1), 0.9) for i in range(7)}
    answer = np.roll(square, 5, axis=1) if found == "elsewhere" else np.zeros_like(square)

    def model(index: int, prompt: SlicePrompt) -> SliceResult:
        return SliceResult(answer.copy(), torch.zeros(1), 0.9)

    propagate(model, results, 3, -1, 0, StopRule(jump_dice=0.3), outward=outward)
    return results


@pytest.mark.parametrize("found", ["nothing", "elsewhere"])
def test_a_walk_toward_the_seed_that_fades_or_strays_keeps_what_lies_beyond(found: str) -> None:
    kept = _walk(outward=False, found=found)
    assert sorted(kept) == list(range(7))
    assert all(kept[i].mask[3:9, 3:9].all() for i in range(3))
    assert sorted(_walk(outward=True, found=found)) == [3, 4, 5, 6]
