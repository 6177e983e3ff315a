"""The engine on a synthetic phantom with the real LiteMedSAM weights: segmentation, orientation
round trips, propagation limits, the embedding cache, corrective clicks and the CLI."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from brainsam.core.metrics import dice
from brainsam.core.prompts import PromptError
from brainsam.core.volume import from_array, load_volume
from brainsam.inference.cache import EmbeddingCache
from brainsam.inference.engine import Engine

from .support import make_phantom, stored_copy


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray]:
    return make_phantom()


def truth_box(truth: np.ndarray) -> list[int]:
    """Slicer ROI [i_min, i_max, j_min, j_max, k_min, k_max] of a stored-order mask."""
    index = np.argwhere(truth)
    low, high = index.min(axis=0), index.max(axis=0)
    return [int(v) for pair in zip(low, high) for v in pair]


def segment_stored(engine: Engine, image: np.ndarray, affine: np.ndarray, **prompts) -> np.ndarray:
    prepared = engine.prepare(from_array(image, affine))
    return engine.stored_mask(prepared, engine.segment(prepared, "Blob", **prompts)) > 0


def test_box_on_phantom_segments_the_blob(phantom_engine: Engine, phantom) -> None:
    image, truth = phantom
    mask = segment_stored(phantom_engine, image, np.eye(4), roi=truth_box(truth))
    # measured 0.9+ on this phantom; a bright ellipsoid in a tight box is the easiest case SAM meets
    assert dice(mask, truth) > 0.85
    # never outside the box
    box = truth_box(truth)
    outside = mask.copy()
    outside[box[0] : box[1] + 1, box[2] : box[3] + 1, box[4] : box[5] + 1] = False
    assert not outside.any()


@pytest.mark.parametrize("orientation", ["LIA", "PSR", "LPS"])
def test_result_is_the_same_in_any_stored_orientation(phantom_engine: Engine, phantom, orientation: str) -> None:
    image, truth = phantom
    reference = segment_stored(phantom_engine, image, np.eye(4), roi=truth_box(truth))
    stored_image, affine = stored_copy(image, (1.0, 1.0, 1.0), orientation)
    stored_truth, _ = stored_copy(truth, (1.0, 1.0, 1.0), orientation)
    encoded = phantom_engine.predictor.counts["encode"]
    mask = segment_stored(phantom_engine, stored_image, affine, roi=truth_box(stored_truth))
    assert mask.shape == stored_image.shape
    # same canonical content: every slice embedding comes from the cache
    assert phantom_engine.predictor.counts["encode"] == encoded
    reference_stored, _ = stored_copy(reference.astype(np.uint8), (1.0, 1.0, 1.0), orientation)
    np.testing.assert_array_equal(mask, reference_stored > 0)


def test_one_click_grows_into_the_structure(phantom_engine: Engine, phantom) -> None:
    image, truth = phantom
    mask = segment_stored(phantom_engine, image, np.eye(4), foreground=[[24, 26, 20]])
    # measured ~0.9: the click becomes a box of the structure's typical size (PHANTOM_EXTENT)
    assert dice(mask, truth) > 0.8
    slices = np.flatnonzero(mask.any(axis=(0, 1)))
    truth_slices = np.flatnonzero(truth.any(axis=(0, 1)))
    # propagation stops where the blob ends, within a slice
    assert slices.min() >= truth_slices.min() - 1 and slices.max() <= truth_slices.max() + 1


def test_corrective_click_reuses_embeddings_and_is_honoured(phantom_engine: Engine, phantom) -> None:
    image, truth = phantom
    prepared = phantom_engine.prepare(from_array(image, np.eye(4)))
    state = phantom_engine.segment(prepared, "Blob", foreground=[[24, 26, 20]])
    before = phantom_engine.stored_mask(prepared, state) > 0
    encoded = phantom_engine.predictor.counts["encode"]
    inside = np.argwhere(before & truth)
    target = inside[len(inside) // 2]
    state = phantom_engine.refine(prepared, state, background=[target.tolist()])
    after = phantom_engine.stored_mask(prepared, state) > 0
    assert phantom_engine.predictor.counts["encode"] == encoded
    assert not after[tuple(target)]


def test_a_prompt_is_required(phantom_engine: Engine, phantom) -> None:
    image, _ = phantom
    prepared = phantom_engine.prepare(from_array(image, np.eye(4)))
    with pytest.raises(PromptError, match="foreground click or an roi"):
        phantom_engine.segment(prepared, "Blob")
    with pytest.raises(KeyError, match="unknown label"):
        phantom_engine.segment(prepared, "Left-Nowhere", foreground=[[1, 1, 1]])


def test_cache_is_bounded_and_counts_hits() -> None:
    cache = EmbeddingCache(max_bytes=3 * 4 * 100)
    for i in range(5):
        cache.put(i, torch.zeros(100))
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes
    assert cache.get(0) is None and cache.get(4) is not None
    assert (cache.hits, cache.misses) == (1, 1)
    cache.get(2)
    cache.put(5, torch.zeros(100))
    assert cache.get(2) is not None and cache.get(3) is None  # 3 was least recently used


def test_cli_writes_a_mask_on_the_input_grid(tmp_path, phantom) -> None:
    image, truth = phantom
    stored_image, affine = stored_copy(image, (1.0, 1.0, 1.0), "LIA")
    stored_truth, _ = stored_copy(truth, (1.0, 1.0, 1.0), "LIA")
    source = tmp_path / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(stored_image, affine), source)
    output = tmp_path / "mask.nii.gz"
    roi = ",".join(map(str, truth_box(stored_truth)))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "brainsam.segment",
            str(source),
            "--label",
            "Left-Thalamus",
            "--box",
            roi,
            "-o",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    for stage in ("load", "encode", "decode", "propagate"):
        assert stage in run.stdout
    written = nib.load(output)
    assert written.shape == stored_image.shape and np.allclose(written.affine, affine)
    assert dice(np.asanyarray(written.dataobj) > 0, stored_truth) > 0.85
    bad = subprocess.run(
        [sys.executable, "-m", "brainsam.segment", str(source), "--label", "Nowhere", "--click", "1,1,1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2 and "unknown label" in bad.stderr
    assert load_volume(source).stored_shape == stored_image.shape
