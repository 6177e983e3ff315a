"""Shared fixtures: the real data folder, a synthetic phantom, one engine for the whole session."""

from __future__ import annotations

import os

import pytest
import torch

from brainsam.core.config import load_config
from brainsam.inference.engine import Engine

from .support import PHANTOM_LABELS

torch.set_num_threads(2)
# compiling LiteMedSAM takes minutes on 2 cores: the tests (and the servers they start) run it
# eagerly; tests/test_runtime.py tests the compiled path on small networks
os.environ.setdefault("BRAINSAM_RUNTIME", "eager")


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The default engine: LiteMedSAM from the installed wheel, the default label set."""
    return Engine(load_config())


@pytest.fixture(scope="session")
def phantom_engine(engine: Engine) -> Engine:
    """An engine with a one-structure label set for phantoms, sharing the default engine's cache."""
    return Engine(load_config(), labels=PHANTOM_LABELS, cache=engine.predictor.cache)
