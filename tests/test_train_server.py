"""The train task through the real server: labels saved as Slicer saves them, POST /train/brainsam,
the adapter it publishes served at the next click without a restart, and a run killed with
DELETE /train/ leaving the published adapter serving."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from .support import (
    MODEL,
    Server,
    Subject,
    infer,
    load_subject,
    require_data,
    roi_of,
    running_server,
    train_stats,
    training_ended,
    wait_until,
)

pytestmark = pytest.mark.server

SUBJECTS = ("sub-02", "sub-03")
TINY_RUN = {"iterations": 3, "validate_every": 3, "warmup_iterations": 1, "learning_rate": 1e-3}


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train-studies")


@pytest.fixture(scope="module")
def subjects(studies: Path) -> list[Subject]:
    return [load_subject(studies, "fs-aseg", name, "aseg.nii.gz", "aseg.yaml") for name in SUBJECTS]


@pytest.fixture(scope="module")
def server(studies: Path, subjects: list[Subject], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real server over the copied subjects, with no label saved yet."""
    with running_server(studies, tmp_path_factory.mktemp("train-server")) as running:
        yield running


def test_training_publishes_an_adapter_the_next_click_uses(
    server: Server, subjects: list[Subject], tmp_path: Path
) -> None:
    client = server.client("trainer", tmp_path)
    for subject in subjects:
        aseg = require_data("fs-aseg", subject.image_id, "aseg.nii.gz")  # cortex and the rest stored as background
        client.save_label(subject.image_id, str(aseg), tag="final", params={"other_values": "background"})
    patient = subjects[0]
    roi = roi_of(patient.truth("Left-Putamen"))
    centre = (roi[0] + roi[1]) // 2
    request = {"label": "Left-Putamen", "roi": [centre - 1, centre + 1, *roi[2:]]}  # three slices: cheap to encode
    before, result = infer(client, patient, request)
    assert result["adapter"] is None and before.any()

    client.train_start(MODEL, {**TINY_RUN, "publish_if_better": False})
    wait_until(lambda: training_ended(client), "training", server)
    assert client.train_status()["status"] == "DONE", server.log.read_text()[-3000:]
    (adapter,) = server.adapters.glob("*.safetensors")
    assert adapter.with_suffix(".json").is_file()
    stats = train_stats(server)
    assert stats["state"] == "done" and stats["published"] == str(adapter)
    assert stats["iteration"] == 3 and stats["held_out_subjects"] == ["sub-03"] and stats["best_metric"] > 0

    after, result = infer(client, patient, {**request, "reset_state": True})
    assert result["adapter"] == adapter.name
    assert (after != before).any()


def test_a_stopped_run_leaves_the_published_adapter_serving(
    server: Server, subjects: list[Subject], tmp_path: Path
) -> None:
    client = server.client("stopper", tmp_path)
    published = {p.name: p.stat().st_mtime_ns for p in server.adapters.glob("*.safetensors")}
    assert published, "runs after the training test, which publishes an adapter"
    client.train_start(MODEL, {**TINY_RUN, "iterations": 100000, "validate_every": 100000, "publish_if_better": False})
    wait_until(
        lambda: train_stats(server).get("iteration", 0) >= 1 and train_stats(server)["state"] == "running",
        "a training step",
        server,
    )
    client.train_stop()
    assert training_ended(client)
    wait_until(lambda: train_stats(server)["state"] == "stopped", "the killed run showing as stopped", server)
    assert {p.name: p.stat().st_mtime_ns for p in server.adapters.glob("*.safetensors")} == published
    patient = subjects[1]
    roi = roi_of(patient.truth("Left-Caudate"))
    centre = (roi[0] + roi[1]) // 2
    mask, result = infer(client, patient, {"label": "Left-Caudate", "roi": [centre - 1, centre + 1, *roi[2:]]})
    assert result["adapter"] in published and mask.any()
