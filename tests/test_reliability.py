"""Reliability through the real server: bad input, concurrent annotators, killed and failing
processes, and the basics of what a request may touch on the server's disk.

One server (restarted once, by SIGKILL, in the last test) serves a temporary studies folder
holding an ixi-muse subject (2 mm; the installed sample where the shared cohorts are absent) and small synthetic phantoms written with nibabel, some of them
broken on purpose. Every prompt on a valid image is a box over 3 slices, so each image costs at
most a few slice encodings.

Each check that passes records a row (case, what happens, as answered by the server); with
BRAINSAM_RELIABILITY_ROWS=FOLDER the rows are written to FOLDER/reliability.json at the end of
the module, which `python scripts/reliability_table.py` turns into the reliability table of
docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterator

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException, MONAILabelUtils
from monailabel.config import settings
from scipy import ndimage

from brainsam.core.metrics import dice

from .support import (
    MODEL,
    ROOT,
    LabelledFiles,
    Subject,
    TableRows,
    infer,
    publish,
    real_or_sample,
    refused,
    running_server,
    training_ended,
    wait_until,
    without_folders,
)
from .support import train_stats as stats

pytestmark = pytest.mark.server

IXI = "IXI012-HH-1211"
LABEL = "Left-Putamen"
PHANTOM_LABEL_INFO = [{"name": LABEL, "idx": 1}]  # phantom truths are saved with value 1, as Slicer names its segments
TRAIN_RUN = {"iterations": 100000, "validate_every": 100000, "warmup_iterations": 1, "publish_if_better": False}
TABLE = TableRows("reliability")
record = TABLE.record


@pytest.fixture(scope="module", autouse=True)
def table() -> Iterator[None]:
    yield
    TABLE.write()


def phantom(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], radii_mm: tuple[float, float, float] = (8, 10, 6)
) -> tuple[np.ndarray, np.ndarray]:
    """A head-like phantom on a grid of `shape` and voxel `spacing` (mm): a grey ellipsoid filling
    the grid holding a bright ellipsoid (the structure) of `radii_mm` at its centre.
    Returns (image uint8, truth bool); built axis by axis, so a 512^3 grid fits in memory."""
    x, y, z = np.ix_(*[(np.arange(n, dtype=np.float32) - (n - 1) / 2) * s for n, s in zip(shape, spacing)])
    half = [0.45 * n * s for n, s in zip(shape, spacing)]
    head = (x / half[0]) ** 2 + (y / half[1]) ** 2 + (z / half[2]) ** 2 <= 1
    truth = (x / radii_mm[0]) ** 2 + (y / radii_mm[1]) ** 2 + (z / radii_mm[2]) ** 2 <= 1
    image = np.where(truth, 200, np.where(head, 60, 0)).astype(np.uint8)
    return image, truth


def oblique(affine: np.ndarray, degrees: float) -> np.ndarray:
    """`affine` turned by `degrees` about the scanner's z axis (a tilted acquisition)."""
    angle = np.deg2rad(degrees)
    turn = np.eye(4)
    turn[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return turn @ affine


# name -> (shape, spacing in mm, tilt in degrees): valid images that must segment
VALID = {
    "phantom": ((48, 48, 40), (1.0, 1.0, 1.0), 0.0),
    "tiny": ((8, 8, 8), (1.0, 1.0, 1.0), 0.0),
    "anisotropic": ((96, 96, 12), (0.5, 0.5, 5.0), 0.0),
    "oblique": ((48, 48, 40), (1.0, 1.0, 1.0), 20.0),
    "large": ((512, 512, 512), (0.5, 0.5, 0.5), 0.0),
}
VALID_CASES = {
    "phantom": "phantom, 48x40 voxels at 1 mm (the reference)",
    "tiny": "tiny volume, 8^3 voxels",
    "anisotropic": "anisotropic voxels, 0.5 x 0.5 x 5 mm",
    "oblique": "oblique affine, tilted 20 degrees",
    "large": "large volume, 512^3 voxels at 0.5 mm",
    "nan": "NaN and +/-Inf intensities outside the structure",
}


def write_studies(studies: Path) -> dict[str, Subject]:
    """Write the synthetic images into `studies`; return the valid ones as Subjects (truth under LABEL)."""
    subjects = {}
    for name, (shape, spacing, tilt) in VALID.items():
        image, truth = phantom(shape, spacing, radii_mm=(2, 2, 2) if name == "tiny" else (8, 10, 6))
        affine = oblique(np.diag([*spacing, 1.0]), tilt)
        nib.save(nib.Nifti1Image(image, affine), studies / f"{name}.nii.gz")
        subjects[name] = Subject(name, shape, affine, truth.astype(np.uint8), {LABEL: 1})
    image, truth = phantom(*VALID["phantom"][:2])
    damaged = image.astype(np.float32)
    damaged[:4, :4, :4] = np.nan
    damaged[-4:, -4:, -4:] = np.inf
    damaged[0, -1, 0] = -np.inf
    nib.save(nib.Nifti1Image(damaged, np.eye(4)), studies / "nan.nii.gz")
    subjects["nan"] = Subject("nan", image.shape, np.eye(4), truth.astype(np.uint8), {LABEL: 1})
    whole = (studies / "phantom.nii.gz").read_bytes()
    (studies / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    (studies / "notimage.nii.gz").write_bytes(b"%PDF-1.4 a report, not an image\n")
    nib.save(nib.Nifti1Image(image[:, :, 20].astype(np.float32), np.eye(4)), studies / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([image] * 3, axis=-1), np.eye(4)), studies / "series.nii.gz")
    nib.save(nib.Nifti1Image(np.full((32, 32, 32), 500, np.int16), np.eye(4)), studies / "constant.nii.gz")
    return subjects


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reliability-studies")


@pytest.fixture(scope="module")
def subjects(studies: Path) -> dict[str, Subject]:
    return write_studies(studies)


@pytest.fixture(scope="module")
def labelled_files() -> LabelledFiles:
    return real_or_sample("ixi-muse", IXI, "muse.nii.gz", "muse.yaml")


@pytest.fixture(scope="module")
def labelled(studies: Path, labelled_files: LabelledFiles) -> Subject:
    """A real MRI with its labels in the studies folder: an ixi-muse subject, else the sample."""
    shutil.copy(labelled_files.image, studies / f"{labelled_files.name}.nii.gz")
    image = nib.load(labelled_files.image)
    labels = np.asarray(nib.load(labelled_files.labels).dataobj)
    return Subject(labelled_files.name, tuple(image.shape), image.affine, labels, labelled_files.ids)


class Restartable:
    """The real server over `studies`; `crash_and_restart` kills it with SIGKILL and starts a new
    one on the same studies, adapter folder and embedding store."""

    def __init__(self, studies: Path, work: Path):
        self.studies, self.work = studies, work
        self.stack = ExitStack()
        self.server = self.stack.enter_context(running_server(studies, work / "first"))
        self.adapters, self.embeddings = self.server.adapters, work / "first" / "embeddings"

    def crash_and_restart(self) -> None:
        os.killpg(self.server.pid, signal.SIGKILL)
        self.stack.close()
        conf = {"adapter": str(self.adapters), "embedding_dir": str(self.embeddings)}
        self.server = self.stack.enter_context(running_server(self.studies, self.work / "second", conf=conf))


@pytest.fixture(scope="module")
def server(
    studies: Path, subjects: dict[str, Subject], labelled: Subject, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Restartable]:
    running = Restartable(studies, tmp_path_factory.mktemp("reliability-server"))
    try:
        yield running
    finally:
        running.stack.close()


def box(subject: Subject) -> list[int]:
    """A Slicer roi round the truth, 3 slices thick along the working axis at its centre (the
    first, sagittal, axis; the 5 mm axis of the anisotropic phantom, which spans 3 slices anyway):
    few slices to encode, a tight box in each."""
    low, high = np.argwhere(subject.labels).min(axis=0), np.argwhere(subject.labels).max(axis=0)
    if subject.image_id != "anisotropic":
        centre = (low[0] + high[0]) // 2
        low[0], high[0] = centre - 1, centre + 1
    return [int(v) for pair in zip(low, high) for v in pair]


def boxed_truth(subject: Subject, roi: list[int]) -> np.ndarray:
    """The truth inside `roi`: what a box over a few slices can segment."""
    inside = np.zeros(subject.shape, bool)
    inside[roi[0] : roi[1] + 1, roi[2] : roi[3] + 1, roi[4] : roi[5] + 1] = True
    return subject.truth(LABEL) & inside


def answer(error: MONAILabelClientException) -> tuple[int, str]:
    """(HTTP status, message) of a refused client call."""
    match = re.match(r"Status: (\d+); Response: (.*)", error.msg, re.S)
    assert match, error.msg
    body = match.group(2)
    try:
        body = json.loads(body)["detail"]
    except (ValueError, KeyError, TypeError):
        pass
    return int(match.group(1)), str(body)


def shorten(text: str, limit: int = 110) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def refusal(status: int, message: str) -> str:
    """A table cell for a refused request; folders of the test's temporary paths left out."""
    return f"{status}: {shorten(without_folders(message))}"


def test_damaged_and_unsegmentable_files_are_refused(
    server: Restartable, subjects: dict[str, Subject], tmp_path: Path
) -> None:
    client = server.server.client("files", tmp_path)
    params = {"label": LABEL, "roi": box(subjects["phantom"])}
    cases = [
        ("truncated", "truncated NIfTI (first half of a .nii.gz)", "cannot read truncated.nii.gz as an image"),
        ("notimage", "non-image file named .nii.gz", "cannot read notimage.nii.gz as an image"),
        ("flat", "2D image", "expected a 3D image, got 2D"),
        ("series", "4D image (3 volumes)", "expected a 3D image, got 4D"),
        ("constant", "constant image (every voxel 500)", "holds no contrast"),
    ]
    for image_id, case, message in cases:
        detail = refused(422, client, Subject(image_id, (), np.eye(4), np.zeros(0), {}), params)
        assert message in detail, (image_id, detail)
        record(case, refusal(422, detail))
    mask, result = infer(client, subjects["phantom"], params)
    assert result["interaction"] == "segment" and mask.any()


def test_odd_but_valid_images_segment_on_their_own_grid(
    server: Restartable, subjects: dict[str, Subject], tmp_path: Path
) -> None:
    """A box over 3 slices of each phantom: a mask on the image's grid and affine (checked by
    `infer`) matching the structure inside the box."""
    client = server.server.client("odd-images", tmp_path)
    for name, case in VALID_CASES.items():
        subject = subjects[name]
        roi = box(subject)
        began = time.perf_counter()
        mask, result = infer(client, subject, {"label": LABEL, "roi": roi})
        seconds = time.perf_counter() - began
        score = dice(mask, boxed_truth(subject, roi))
        assert result["interaction"] == "segment"
        assert score > 0.3, (
            name,
            score,
        )  # a mask on a wrong grid or place scores ~0; measured values go into the table
        record(case, f"200: mask on the image's own grid and affine, Dice {score:.2f} inside the box ({seconds:.0f} s)")


def test_bad_prompts_answer_4xx_with_what_to_fix(
    server: Restartable, subjects: dict[str, Subject], tmp_path: Path
) -> None:
    client = server.server.client("prompts", tmp_path)
    subject = subjects["phantom"]
    click = [24, 24, 20]
    roi = box(subject)
    cases = [
        ("click outside the image", {"label": LABEL, "foreground": [[500, 0, 0]]}, "outside the image"),
        ("negative click", {"label": LABEL, "foreground": [[-1, 24, 20]]}, "outside the image"),
        ("non-integer click", {"label": LABEL, "foreground": [[1.5, 2, 3]]}, "whole voxel indices"),
        ("click with 2 coordinates", {"label": LABEL, "foreground": [[24, 24]]}, "3 numbers each"),
        ("clicks not a list", {"label": LABEL, "foreground": "here"}, "voxel indices"),
        ("only a background click", {"label": LABEL, "background": [click]}, "at least one foreground click or an roi"),
        ("unknown label", {"label": "Left-Nowhere", "foreground": [click]}, "choose one of"),
        ("no prompt at all", {"label": LABEL}, "at least one foreground click or an roi"),
        ("roi of 4 numbers", {"label": LABEL, "roi": [1, 2, 3, 4]}, "roi must be 6 numbers"),
        ("roi outside the image", {"label": LABEL, "roi": [900, 990, 0, 10, 0, 10]}, "outside the image"),
        ("zero-size roi (one voxel)", {"label": LABEL, "roi": [24, 24, 24, 24, 20, 20]}, "encloses no area"),
        (
            "reset_state not a boolean",
            {"label": LABEL, "foreground": [click], "reset_state": "maybe"},
            "reset_state must be true or false",
        ),
        (
            "unknown result format",
            {"label": LABEL, "foreground": [click], "result_extension": ".png"},
            "result_extension must be one of",
        ),
        (
            "non-numeric result_dtype",
            {"label": LABEL, "foreground": [click], "result_dtype": "text"},
            "result_dtype must name a numeric type",
        ),
    ]
    for case, params, message in cases:
        detail = refused(400, client, subject, params)
        assert message in detail, (case, detail)
        record(case, refusal(400, detail))
    # OHIF names no structure: the registered atlases name the clicked one, none is registered yet
    detail = refused(409, client, subject, {"foreground": [click]})
    assert "no atlas is registered on this image yet" in detail
    record("no label, a click (as OHIF sends), no atlas registered on the image yet", refusal(409, detail))
    straight, _ = infer(client, subject, {"label": LABEL, "roi": roi, "reset_state": True})
    inverted, result = infer(client, subject, {"label": LABEL, "roi": [roi[1], roi[0], roi[3], roi[2], roi[5], roi[4]]})
    assert result["interaction"] == "segment" and straight.any() and np.array_equal(inverted, straight)
    record("inverted roi (min and max swapped)", "200: the same mask as the straight roi")


def test_malformed_and_empty_params(server: Restartable, subjects: dict[str, Subject], tmp_path: Path) -> None:
    url = server.server.url
    for text, case, status, message in [
        ('{"label": "Left-Putamen", ', "malformed JSON params", 400, "params is not valid JSON"),
        ("", "empty params", 400, "label must name a structure"),
        ("{}", "params {}", 400, "label must name a structure"),
    ]:
        code, body, _, _ = MONAILabelUtils.http_multipart(
            "POST", url, f"/infer/{MODEL}?image=phantom", {"params": text}, {}
        )
        detail = json.loads(body)["detail"]
        assert code == status and message in detail, (text, code, body)
        record(case, refusal(code, detail))
    mask, _ = infer(
        server.server.client("params", tmp_path), subjects["phantom"], {"label": LABEL, "roi": box(subjects["phantom"])}
    )
    assert mask.any()


def test_images_only_through_the_datastore(
    server: Restartable, studies: Path, subjects: dict[str, Subject], tmp_path: Path
) -> None:
    """No request names a file to open or to write: paths and traversing ids are refused, and
    nothing is written outside the studies folder."""
    client = server.server.client("intruder", tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    elsewhere = outside / "secret.nii.gz"
    shutil.copy(studies / "phantom.nii.gz", elsewhere)
    request = {"label": LABEL, "roi": box(subjects["phantom"])}
    for image, params, case in [
        (str(elsewhere), request, "image = absolute path of a NIfTI outside the studies folder"),
        ("phantom", {**request, "image": str(elsewhere)}, 'params name a file: {"image": "/path/outside.nii.gz"}'),
        ("../../etc/passwd", request, "image id ../../etc/passwd"),
        ("no-such-image", request, "unknown image id"),
    ]:
        detail = refused(404, client, Subject(image, (), np.eye(4), np.zeros(0), {}), params)
        assert "image not found" in detail
        record(case, refusal(404, detail))
    escape = os.path.relpath(outside / "escaped", studies)
    tag = os.path.relpath(outside, studies / "labels")
    calls: list[tuple[str, Callable[[], Any], str]] = [
        (
            "upload with an image id climbing out of the studies folder (../…/escaped)",
            lambda: client.upload_image(str(elsewhere), image_id=escape),
            "image id must be a plain name",
        ),
        (
            "save a label with a tag climbing out of labels/ (../…)",
            lambda: client.save_label("phantom", str(elsewhere), tag=tag),
            "label tag must be a plain name",
        ),
        (
            "save a label for an unknown image id",
            lambda: client.save_label("no-such-image", str(elsewhere), tag="final"),
            "not found",
        ),
    ]
    for case, call, message in calls:
        with pytest.raises(MONAILabelClientException) as caught:
            call()
        status, detail = answer(caught.value)
        assert 400 <= status < 500 and message in detail, (case, status, detail)
        record(case, refusal(status, detail))
    assert sorted(p.name for p in outside.iterdir()) == ["secret.nii.gz"]


def test_readme_server_binds_localhost_and_names_the_auth_switch() -> None:
    """Every server command in the README and the demo script passes --host 127.0.0.1 (MONAI
    Label's own default is 0.0.0.0), and the README names the authentication setting that exists."""
    readme, demo = (ROOT / "README.md").read_text(), (ROOT / "scripts" / "demo.sh").read_text()
    commands = [line for text in (readme, demo) for line in text.splitlines() if "start_server --app" in line]
    assert commands and all("--host 127.0.0.1" in line for line in commands), commands
    assert "MONAI_LABEL_AUTH_ENABLE" in readme and hasattr(settings, "MONAI_LABEL_AUTH_ENABLE")
    record(
        "server command of README and demo.sh",
        f"binds 127.0.0.1 ({len(commands)} commands checked); README names MONAI_LABEL_AUTH_ENABLE",
    )


def run_in_threads(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run `calls` at the same moment, one thread each; return their results in order (or raise)."""
    results: list[Any] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(index: int) -> None:
        start.wait()
        try:
            results[index] = calls[index]()
        except BaseException as error:  # handed to the test thread below
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def centre(subject: Subject) -> list[int]:
    """The voxel at the centre of the structure, where a corrective foreground click goes."""
    return [int(v) for v in np.round(np.argwhere(subject.labels).mean(axis=0))]


def clicks_then_correction(client: MONAILabelClient, subject: Subject) -> list[tuple[np.ndarray, str]]:
    """A box, then the same box with a foreground click at the structure's centre, as Slicer sends them."""
    first = {"label": LABEL, "roi": box(subject), "reset_state": True}
    answers = []
    for params in (first, {**first, "reset_state": False, "foreground": [centre(subject)]}):
        mask, result = infer(client, subject, params)
        answers.append((mask, result["interaction"]))
    return answers


def test_two_annotators_click_on_different_images_at_once(
    server: Restartable, subjects: dict[str, Subject], tmp_path: Path
) -> None:
    """The same requests sent one after the other and then from two threads at once give the
    same masks: one annotator's state never leaks into the other's."""
    images = [
        subjects["phantom"],
        subjects["anisotropic"],
    ]  # other grids: a mask sent to the wrong client fails `infer`
    alone = [clicks_then_correction(server.server.client(f"alone-{s.image_id}", tmp_path), s) for s in images]
    together = run_in_threads(
        [
            lambda s=s: clicks_then_correction(server.server.client(f"together-{s.image_id}", tmp_path), s)
            for s in images
        ]
    )
    for one, other in zip(alone, together):
        assert [kind for _, kind in one] == [kind for _, kind in other] == ["segment", "refine"]
        assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(one, other))
    record(
        "two annotators clicking on different images at once (2 threads, box + correction each)",
        "both answered; masks identical to the same requests sent one at a time",
    )


def saved_label(studies: Path, image_id: str) -> np.ndarray:
    """The voxels of the image's saved final label (stored as NIfTI on the image's grid)."""
    return np.asarray(nib.load(studies / "labels" / "final" / f"{image_id}.nii.gz").dataobj)


def as_sent(path: Path | str, label_info: list[dict[str, Any]]) -> np.ndarray:
    """The voxels of a label file as the server stores it when asked to keep values that name
    no segment of `label_info` as background."""
    data = np.asarray(nib.load(path).dataobj)
    return np.where(np.isin(data, [entry["idx"] for entry in label_info]), data, 0)


def test_labels_saved_at_once_are_all_kept(
    server: Restartable,
    studies: Path,
    subjects: dict[str, Subject],
    labelled: Subject,
    labelled_files: LabelledFiles,
    tmp_path: Path,
) -> None:
    """Four annotators submit labels for four images at the same moment, then two submit for the
    same image at once: every label is listed and stored whole (the second pair: one of the two)."""
    client = server.server.client("labels", tmp_path)
    files = {}
    for name in ("phantom", "nan", "anisotropic"):
        files[name] = tmp_path / f"{name}-label.nii.gz"
        nib.save(nib.Nifti1Image(subjects[name].labels, subjects[name].affine), files[name])
    files[labelled.image_id] = labelled_files.labels
    label_info = [{"name": name, "idx": idx} for name, idx in labelled.ids.items()]
    infos = {name: PHANTOM_LABEL_INFO for name in files} | {labelled.image_id: label_info}
    # MUSE labels hold 148 regions: those that are no structure of the label set stored as background
    params = {name: {"label_info": infos[name], "other_values": "background"} for name in files}
    run_in_threads([lambda n=n: client.save_label(n, str(files[n]), tag="final", params=params[n]) for n in files])
    listed = client.datastore()["objects"]
    for name, path in files.items():
        assert "final" in listed[name]["labels"], name
        assert np.array_equal(saved_label(studies, name), as_sent(path, infos[name])), name
    record(
        "4 clients save labels for 4 images at the same moment",
        "all 4 listed in the datastore, each stored voxel for voxel as sent",
    )

    grown = tmp_path / "phantom-grown.nii.gz"
    nib.save(nib.Nifti1Image(ndimage.binary_dilation(subjects["phantom"].labels).astype(np.uint8), np.eye(4)), grown)
    run_in_threads(
        [
            lambda p=p: client.save_label("phantom", str(p), tag="final", params={"label_info": PHANTOM_LABEL_INFO})
            for p in (files["phantom"], grown)
        ]
    )
    saved = saved_label(studies, "phantom")
    assert any(np.array_equal(saved, as_sent(p, PHANTOM_LABEL_INFO)) for p in (files["phantom"], grown))
    record(
        "2 clients save a label for the same image at the same moment",
        "one of the two is kept whole (last writer wins), never a mix",
    )


def adapter_files(folder: Path) -> dict[str, int]:
    """Every file in the adapter folder (temporary ones included) -> modification time."""
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != "train_stats.json"}


def test_inference_while_training_then_training_killed_with_sigkill(
    server: Restartable, subjects: dict[str, Subject], tmp_path: Path
) -> None:
    """Training runs on the saved labels in MONAI Label's subprocess; clicks keep answering with
    the same masks meanwhile; SIGKILL of the training process mid-run publishes nothing, the
    run shows as stopped and the server keeps serving."""
    running = server.server
    client = running.client("while-training", tmp_path)
    requests = [
        (subjects[name], {"label": LABEL, "roi": box(subjects[name]), "reset_state": True})
        for name in ("phantom", "oblique")
    ]
    before = [infer(client, subject, params)[0] for subject, params in requests]
    published = adapter_files(server.adapters)
    client.train_start(MODEL, TRAIN_RUN)
    wait_until(lambda: stats(running).get("state") == "running", "training start", running)
    during = [infer(client, subject, params)[0] for subject, params in requests]
    assert all(np.array_equal(a, b) for a, b in zip(before, during))
    record("inference while training runs", "answers unchanged (identical masks before and during training)")

    wait_until(
        lambda: stats(running).get("iteration", 0) >= 1 or stats(running)["state"] != "running",
        "a training step",
        running,
    )
    assert stats(running)["state"] == "running", stats(running)
    os.kill(int(stats(running)["pid"]), signal.SIGKILL)
    wait_until(lambda: training_ended(client), "the task ending", running)
    assert stats(running)["state"] == "stopped"
    assert adapter_files(server.adapters) == published
    after = [infer(client, subject, params)[0] for subject, params in requests]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    record(
        "training process killed with SIGKILL after its first step",
        "nothing published, no temporary file left, run shown as stopped; clicks answer as before",
    )


def test_damaged_adapters_are_refused_and_the_last_good_one_serves(
    server: Restartable, subjects: dict[str, Subject], tmp_path: Path
) -> None:
    from brainsam.modeling.backbones import load_backbone
    from brainsam.modeling.lora import LoraSettings, add_lora

    running = server.server
    client = running.client("adapters", tmp_path)
    request = {"label": LABEL, "roi": box(subjects["phantom"]), "reset_state": True}
    model = load_backbone("litemedsam")
    settings_ = add_lora(
        model, LoraSettings(rank=2, alpha=4, blocks=(0,))
    )  # starts at zero: same masks as the base model
    now = time.time()
    good = server.adapters / "good.safetensors"
    publish(model, settings_, good, now + 1)
    served, result = infer(client, subjects["phantom"], request)
    assert result["adapter"] == "good.safetensors"

    truncated = server.adapters / "truncated.safetensors"
    whole = good.read_bytes()
    truncated.write_bytes(whole[: int(len(whole) * 0.9)])  # the header (manifest) survives, the weights do not
    os.utime(truncated, (now + 2, now + 2))
    mask, result = infer(client, subjects["phantom"], request)
    assert result["adapter"] == "good.safetensors" and np.array_equal(mask, served)
    assert "refused adapter" in running.log.read_text() and "truncated.safetensors" in running.log.read_text()
    record(
        "newer adapter file truncated (90 % of its bytes)",
        "refused with a log line; the last good adapter keeps serving",
    )

    with open(good, "r+b") as handle:  # the serving file itself damaged in place
        handle.seek(len(whole) // 2)
        handle.write(b"\0" * 4096)
    os.utime(good, (now + 3, now + 3))
    mask, result = infer(client, subjects["phantom"], request)
    assert result["adapter"] == "good.safetensors" and np.array_equal(mask, served)
    assert running.log.read_text().count("refused adapter") >= 2
    record(
        "the serving adapter file overwritten with zeros in place",
        "refused with a log line; the weights loaded before keep serving",
    )
    good.write_bytes(whole)  # put back, as a fresh publication would
    os.utime(good, (now + 4, now + 4))


PUBLISH_UNDER_LIMIT = """
import sys
from pathlib import Path
from brainsam.modeling.adapters import build_manifest, save_adapter
from brainsam.modeling.backbones import load_backbone
from brainsam.modeling.lora import LoraSettings, add_lora
model = load_backbone("litemedsam")
settings = add_lora(model, LoraSettings(rank=2, alpha=4, blocks=(0,)))
save_adapter(model, build_manifest(model, settings, labels=[]), Path(sys.argv[1]))
"""


def limit_file_size() -> None:
    """In the child before exec: files may not grow beyond 1 MB, and writing past that fails with
    EFBIG instead of killing the process (SIGXFSZ ignored), as a full disk fails a write."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_disk_full_while_publishing_leaves_the_published_adapter_intact(
    server: Restartable, subjects: dict[str, Subject], tmp_path: Path
) -> None:
    running = server.server
    before = {
        p.name: p.read_bytes()
        for p in server.adapters.iterdir()
        if p.suffix in (".safetensors", ".json") and p.name != "train_stats.json"
    }
    target = server.adapters / "brainsam-new.safetensors"
    done = subprocess.run(
        [sys.executable, "-c", PUBLISH_UNDER_LIMIT, str(target)],
        preexec_fn=limit_file_size,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode != 0 and "File too large" in done.stderr, done.stderr[-2000:]
    after = {
        p.name: p.read_bytes()
        for p in server.adapters.iterdir()
        if p.suffix in (".safetensors", ".json") and p.name != "train_stats.json"
    }
    assert after == before and not list(server.adapters.glob(".*.tmp*"))
    _, result = infer(
        running.client("disk-full", tmp_path),
        subjects["phantom"],
        {"label": LABEL, "roi": box(subjects["phantom"]), "reset_state": True},
    )
    assert result["adapter"] == "good.safetensors"
    error = done.stderr.strip().splitlines()[-1]
    record(
        "disk full while publishing an adapter (writes fail with EFBIG past 1 MB)",
        f"publishing fails ({shorten(error, 60)}); no file or temporary file left; the published adapter keeps serving",
    )


def test_server_killed_mid_session_keeps_every_label_and_clicks_work_after_restart(
    server: Restartable, studies: Path, subjects: dict[str, Subject], tmp_path: Path
) -> None:
    client = server.server.client("restart", tmp_path)
    subject = subjects["phantom"]
    roi = box(subject)
    prompts = {"label": LABEL, "roi": roi, "foreground": [centre(subject)], "reset_state": True}
    before, _ = infer(client, subject, prompts)
    labels = {p.name: p.read_bytes() for p in (studies / "labels" / "final").iterdir()}
    assert len(labels) == 4
    server.crash_and_restart()
    client = server.server.client("restart", tmp_path)
    listed = client.datastore()["objects"]
    assert all("final" in listed[name.removesuffix(".nii.gz")]["labels"] for name in labels)
    assert {p.name: p.read_bytes() for p in (studies / "labels" / "final").iterdir()} == labels
    after, result = infer(client, subject, {**prompts, "reset_state": False})
    assert result["interaction"] == "segment" and np.array_equal(after, before)
    assert result["adapter"] == "good.safetensors"
    record(
        "server killed with SIGKILL mid-session, then started again",
        f"all {len(labels)} saved labels listed and intact; the same clicks give the same mask",
    )
