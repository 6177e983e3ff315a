"""Shared fixtures: the real data folder, a synthetic phantom, one engine for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from brainsam.config import load_config
from brainsam.engine import Engine
from brainsam.labels import LabelSet, Structure

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

torch.set_num_threads(2)
# compiling LiteMedSAM takes minutes on 2 cores: the tests (and the servers they start) run it
# eagerly; tests/test_runtime.py tests the compiled path on small networks
os.environ.setdefault("BRAINSAM_RUNTIME", "eager")


def require_data(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason when it is absent."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent")
    return path


PHANTOM_EXTENT = (16.0, 20.0, 12.0)
PHANTOM_LABELS = LabelSet("phantom", (Structure("Blob", 1, (255, 0, 0), PHANTOM_EXTENT),), (20.0, 20.0, 20.0))
NARROW_PHANTOM = {"centre": (24, 26, 20), "radii": (2, 10, 6)}
"""make_phantom arguments for a structure on only 5 sagittal slices (x 22..26), centred in the
head: few slices to encode where a test needs them all."""


def make_phantom(shape: tuple[int, int, int] = (48, 48, 40), centre=(24, 26, 20), radii=(8, 10, 6)) -> tuple[np.ndarray, np.ndarray]:
    """A head-like phantom in RAS order: a grey ellipsoid holding a bright ellipsoid (the structure).

    Returns (image float32, truth bool), both (x, y, z).
    """
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    head = (((grid - np.array(shape) / 2) / (np.array(shape) * 0.45)) ** 2).sum(-1) <= 1
    truth = (((grid - np.array(centre)) / np.array(radii)) ** 2).sum(-1) <= 1
    image = np.where(head, 300.0, 0.0) + np.where(truth, 700.0, 0.0)
    return image.astype(np.float32), truth


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The default engine: LiteMedSAM from the installed wheel, the default label set."""
    return Engine(load_config())


@pytest.fixture(scope="session")
def phantom_engine(engine: Engine) -> Engine:
    """An engine with a one-structure label set for phantoms, sharing the default engine's cache."""
    return Engine(load_config(), labels=PHANTOM_LABELS, cache=engine.predictor.cache)
