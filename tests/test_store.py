"""The on-disk embedding store behind the memory cache, with the real LiteMedSAM encoder.

A few slices of a small phantom keep each test to seconds: encoding costs ~2 s a slice on CPU.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brainsam.core.config import load_config
from brainsam.core.volume import from_array
from brainsam.inference.engine import Engine
from brainsam.inference.predictor import Predictor
from brainsam.inference.state import PreparedImage
from brainsam.inference.store import EmbeddingStore, StoreFullError

from .support import NARROW_PHANTOM, PHANTOM_LABELS, make_phantom

SLICES = [23, 25]


def phantom_image(predictor: Predictor) -> PreparedImage:
    image, _ = make_phantom(**NARROW_PHANTOM)
    return predictor.prepare(from_array(image, np.eye(4)))


def stored_predictor(engine: Engine, folder: Path, identity: str = "litemedsam") -> Predictor:
    """A predictor on the session's backbone with an empty memory cache over the store `folder`."""
    return Predictor(engine.backbone, load_config(embedding_dir=str(folder)), identity=identity)


@pytest.fixture(scope="module")
def filled(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[torch.Tensor]]:
    """A store holding SLICES of the phantom, and their embeddings as encoded."""
    folder = tmp_path_factory.mktemp("store")
    predictor = stored_predictor(engine, folder)
    image = phantom_image(predictor)
    encoded = predictor.embeddings(image, image.window, SLICES)
    assert predictor.counts["encode"] == len(SLICES)
    return folder, encoded


def test_a_fresh_predictor_reads_stored_slices_instead_of_encoding(
    engine: Engine, filled: tuple[Path, list[torch.Tensor]]
) -> None:
    folder, encoded = filled
    predictor = stored_predictor(engine, folder)
    image = phantom_image(predictor)
    stored = predictor.embeddings(image, image.window, SLICES)
    assert predictor.counts["encode"] == 0 and predictor.counts["stored"] == len(SLICES)
    for got, want in zip(stored, encoded):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-3)  # float16 on disk


def test_damaged_files_are_encoded_again(
    engine: Engine, filled: tuple[Path, list[torch.Tensor]], tmp_path: Path
) -> None:
    shutil.copytree(filled[0], tmp_path / "store")
    predictor = stored_predictor(engine, tmp_path / "store")
    image = phantom_image(predictor)
    keys = [(predictor.identity, image.volume.content_hash, image.view.axis, i, image.window.key()) for i in SLICES]
    truncated, garbled = (predictor.store.path(key) for key in keys)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    garbled.write_bytes(b"\x93NUMPY garbage")
    embeddings = predictor.embeddings(image, image.window, SLICES)
    assert predictor.counts["encode"] == 2 and predictor.counts["stored"] == 0
    torch.testing.assert_close(embeddings[0], filled[1][0])
    assert all(predictor.store.get(key) is not None for key in keys)  # written again, whole


def test_another_encoder_identity_does_not_reuse_stored_slices(
    engine: Engine, filled: tuple[Path, list[torch.Tensor]]
) -> None:
    folder, _ = filled
    predictor = stored_predictor(engine, folder, identity="litemedsam+other-adapter.safetensors@2025-01-01")
    image = phantom_image(predictor)
    predictor.embeddings(image, image.window, SLICES[:1])
    assert predictor.counts["encode"] == 1 and predictor.counts["stored"] == 0


def test_precomputed_image_is_segmented_without_encoding(engine: Engine, tmp_path: Path) -> None:
    """Engine.precompute stores the central slices; a second run skips the image unread; a
    fresh engine then segments a structure inside them (a box keeps the walk there) from the
    store alone."""
    image, truth = make_phantom(**NARROW_PHANTOM)
    path = tmp_path / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(image, np.eye(4)), path)
    config = load_config(embedding_dir=str(tmp_path / "store"), precompute_mm=1.0)
    first = Engine(config, labels=PHANTOM_LABELS)
    assert first.precompute(path) == 3  # slices 23..25 round the head's centre, 24
    assert first.precompute(path) == 0
    clicker = Engine(config, labels=PHANTOM_LABELS)
    prepared = clicker.prepare(from_array(image, np.eye(4)))
    state = clicker.segment(prepared, "Blob", foreground=[[24, 26, 20]], roi=[23, 25, 14, 38, 12, 28])
    assert clicker.predictor.counts["encode"] == 0 and clicker.predictor.counts["stored"] == 3
    mask = clicker.canonical_mask(prepared, state).astype(bool)
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.5


def test_least_recently_used_slices_are_evicted_beyond_the_bound(tmp_path: Path) -> None:
    """No model needed: small tensors stand in for embeddings."""
    value = torch.ones(1, 10, 100)
    keys = [("encoder", "image", "sagittal", i, (0, 0, 8, 8)) for i in range(4)]
    file = io.BytesIO()
    np.save(file, value.half().numpy())
    size = len(file.getvalue())
    store = EmbeddingStore(tmp_path, max_bytes=3 * size + 100)
    for age, key in enumerate(keys[:3]):
        store.put(key, value)
        os.utime(store.path(key), (1000 + age, 1000 + age))
    assert store.get(keys[0]) is not None  # read: now the most recently used
    store.put(keys[3], value)  # over the bound: down to 90% of it, oldest first
    assert [store.contains(key) for key in keys] == [True, False, False, True]
    with pytest.raises(StoreFullError):
        EmbeddingStore(tmp_path, max_bytes=2 * size).check_room("encoder")
