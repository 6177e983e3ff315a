"""Nothing lost, through the real server: every way of writing a label, and every request checked
before work starts.

One server over a studies folder on a small tmpfs (so that the disk can be filled), holding
small phantoms: these tests check what is stored, not how well anything segments. After every
refused request the test checks that the saved label, its kept versions and the datastore's
bookkeeping are byte for byte as they were. The server is killed with SIGKILL once, in the middle
of a stream of saves, and started again on the same folder.

Each check that passes records a row (tests/support.TableRows, as tests/test_reliability.py
does) for the fault-injection table of docs/reliability.md (scripts/reliability_table.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterator

import nibabel as nib
import numpy as np
import pytest
from monailabel.client.client import MONAILabelUtils

from brainsam.core.labels import load_label_set

from .support import Server, TableRows, make_phantom, running_server, wait_for_scoring, without_folders

pytestmark = pytest.mark.server

LABEL_SET = load_label_set()
PUTAMEN = LABEL_SET["Left-Putamen"].id
SHAPE = (48, 48, 40)
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])
TMPFS_MB = 16
TABLE = TableRows("saved_work")
record = TABLE.record


@pytest.fixture(scope="module", autouse=True)
def table() -> Iterator[None]:
    yield
    TABLE.write()


def small_disk(folder: Path) -> bool:
    """Mount a TMPFS_MB tmpfs on `folder`; False when this machine does not allow it."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "tmpfs", str(folder)], capture_output=True, text=True
    )
    return done.returncode == 0


class Deployment:
    """The real server over `studies`; `kill_and_restart` kills it with SIGKILL and starts a new
    one on the same studies folder."""

    def __init__(self, studies: Path, work: Path, tmpfs: bool):
        self.studies, self.work, self.tmpfs = studies, work, tmpfs
        self.caches = {"embedding_dir": str(work / "embeddings"), "atlas_cache": str(work / "atlas_cache")}
        self.stack = ExitStack()
        self.starts = 0
        self.server = self._start()

    def _start(self) -> Server:
        self.starts += 1
        return self.stack.enter_context(
            running_server(self.studies, self.work / f"run-{self.starts}", conf=self.caches)
        )

    def kill_and_restart(self, while_down: Callable[[], None] = lambda: None) -> None:
        """SIGKILL, `while_down`, then a new server on the same studies folder and caches."""
        os.killpg(self.server.pid, signal.SIGKILL)
        self.stack.close()
        while_down()
        self.server = self._start()

    def call(self, method: str, path: str, body: Any = None, files: dict[str, Path] | None = None) -> tuple[int, Any]:
        """(status, JSON answer or text) of one request, as MONAI Label's client sends it."""
        if files:
            fields = {"params": json.dumps(body if body is not None else {})}
            status, response = MONAILabelUtils.http_multipart(
                method, self.server.url, path, fields, {k: str(v) for k, v in files.items()}
            )[:2]
        else:
            status, response = MONAILabelUtils.http_method(
                method, self.server.url, path, json.dumps(body) if body is not None else None, None, "application/json"
            )[:2]
        text = response.decode() if isinstance(response, bytes) else response
        try:
            return status, json.loads(text)
        except (TypeError, ValueError):
            return status, text


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("saved-work")
    studies = work / "studies"
    tmpfs = small_disk(studies)
    image, _ = make_phantom(SHAPE)
    for name in ("phantom", "other", "fresh"):  # fresh: never labelled, so scored and registered
        nib.save(nib.Nifti1Image(image.astype(np.uint8), AFFINE), studies / f"{name}.nii.gz")
    running = Deployment(studies, work, tmpfs)
    try:
        yield running
    finally:
        running.stack.close()
        if tmpfs:
            subprocess.run(["umount", "-l", str(studies)], check=False)


def blob(grow: int = 0, value: int = PUTAMEN, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """A putamen-like block, grown by `grow` voxels each way."""
    labels = np.zeros(shape, dtype=np.int16)
    labels[18 - grow : 28 + grow, 20 - grow : 30 + grow, 14 - grow : 24 + grow] = value
    return labels


def label_file(folder: Path, data: np.ndarray, name: str, affine: np.ndarray = AFFINE) -> Path:
    path = folder / name
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def save(deployment: Deployment, image: str, path: Path, params: dict | None = None) -> tuple[int, Any]:
    return deployment.call("PUT", f"/datastore/label?image={image}&tag=final", params or {}, {"label": path})


def stored(deployment: Deployment, image: str = "phantom") -> np.ndarray:
    """The voxels of the image's saved final label."""
    return np.asarray(nib.load(deployment.studies / "labels" / "final" / f"{image}.nii.gz").dataobj)


def snapshot(deployment: Deployment) -> dict[str, bytes]:
    """Every file under labels/ (versions included) and the datastore's bookkeeping, byte for byte."""
    files = [p for p in (deployment.studies / "labels").rglob("*") if p.is_file()]
    files.append(deployment.studies / "datastore_v2.json")
    return {str(p.relative_to(deployment.studies)): p.read_bytes() for p in files}


def versions(deployment: Deployment, image: str = "phantom") -> list[dict]:
    status, answer = deployment.call("GET", f"/datastore/label/versions?image={image}&tag=final")
    assert status == 200, answer
    return answer["versions"]


def brief(text: str, limit: int = 160) -> str:
    """`text` cut to `limit` characters for a table cell."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def detail(answer: Any) -> str:
    """The reason in an answer, the folders of temporary paths left out."""
    return without_folders(answer.get("detail", "") if isinstance(answer, dict) else str(answer))


def test_a_save_keeps_the_label_it_replaces_and_restore_brings_it_back(deployment: Deployment, tmp_path: Path) -> None:
    first, second = blob(value=1), blob(grow=2)  # Slicer's segment values, then the label set's ids
    slicer = {"label_info": [{"name": "Left-Putamen", "idx": 1}]}
    assert save(deployment, "phantom", label_file(tmp_path, first, "first.nii.gz"), slicer)[0] == 200
    assert np.array_equal(stored(deployment), first) and versions(deployment) == []
    assert save(deployment, "phantom", label_file(tmp_path, second, "second.nii.gz"))[0] == 200
    assert np.array_equal(stored(deployment), second)
    (kept,) = versions(deployment)
    status, answer = deployment.call("PUT", f"/datastore/label/restore?image=phantom&version={kept['version']}")
    assert status == 200 and answer["restored"] == kept["version"], answer
    assert np.array_equal(stored(deployment), first) and len(versions(deployment)) == 2, "the replaced one kept too"
    status, info = deployment.call("GET", "/datastore/label/info?label=phantom&tag=final")
    assert info["label_info"] == slicer["label_info"], "read as it was saved: value 1 is the putamen"
    record(
        "a label saved over a saved one, then the earlier one restored",
        "the replaced label is kept as a version (GET /datastore/label/versions); "
        "PUT /datastore/label/restore brings it back and keeps the one it replaces",
    )
    status, answer = deployment.call("PUT", "/datastore/label/restore?image=phantom&version=19990101T000000000000Z")
    assert status == 404 and "versions:" in detail(answer)
    record("restore of a version that does not exist", f"{status}: {brief(detail(answer), 90)}")


def test_bad_labels_are_refused_and_nothing_stored_changes(deployment: Deployment, tmp_path: Path) -> None:
    if not (deployment.studies / "labels" / "final" / "phantom.nii.gz").is_file():
        assert save(deployment, "phantom", label_file(tmp_path, blob(), "good.nii.gz"))[0] == 200
    moved = AFFINE.copy()
    moved[:3, 3] = 5.0
    noisy = np.where(np.random.default_rng(0).random(SHAPE) > 0.5, PUTAMEN, 0).astype(np.int16)
    cut = label_file(tmp_path, noisy, "cut.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(cut[: len(cut) // 2])
    (tmp_path / "report.nii.gz").write_bytes(b"%PDF-1.4 a report, not a label\n")
    segments = blob(value=1)
    segments[30:34, 30:34, 30:34] = 2
    cases: list[tuple[str, str, dict, str, str]] = [
        ("label of the wrong shape (10x10x10 for 48x48x40)", "small.nii.gz", {}, "label shape 10x10x10 does not match", "phantom"),
        ("bytes that are not NIfTI", "report.nii.gz", {}, "not an image file", "phantom"),
        ("upload cut short (half a .nii.gz)", "cut.nii.gz", {}, "not an image file", "phantom"),
        ("label on another grid (same shape, moved 5 mm)", "moved.nii.gz", {}, "another grid", "phantom"),
        ("4D label", "series.nii.gz", {}, "one 3D volume", "phantom"),
        ("fractional values", "fraction.nii.gz", {}, "not whole numbers", "phantom"),
        ("values that name no structure (aseg's cortex, 3)", "cortex.nii.gz", {}, "values 3 that name no structure", "phantom"),
        ("a Slicer segment named after no structure", "segments.nii.gz", {"label_info": [{"name": "Left-Putamen", "idx": 1}, {"name": "Segment_2", "idx": 2}]}, "values 2 that name no structure", "phantom"),
        ("an empty label (every voxel 0)", "empty.nii.gz", {}, "holds no structure", "phantom"),
        ("label_info that is not a list", "good.nii.gz", {"label_info": "Left-Putamen"}, "label_info must be a list", "phantom"),
        ("other_values that is not \"background\"", "cortex.nii.gz", {"other_values": "drop"}, "other_values must be", "phantom"),
        ("a label for an image that does not exist", "good.nii.gz", {}, "not found", "no-such-image"),
        ("a label tag that climbs out of labels/", "good.nii.gz", {}, "plain name", "phantom"),
    ]  # fmt: skip
    label_file(tmp_path, blob(), "good.nii.gz")
    label_file(tmp_path, blob()[:10, :10, :10], "small.nii.gz")
    label_file(tmp_path, blob(), "moved.nii.gz", moved)
    label_file(tmp_path, np.stack([blob()] * 2, axis=-1), "series.nii.gz")
    label_file(tmp_path, blob().astype(np.float32) + 0.5 * (blob() > 0), "fraction.nii.gz")
    label_file(tmp_path, blob() + 3 * (blob() == 0).astype(np.int16), "cortex.nii.gz")
    label_file(tmp_path, segments, "segments.nii.gz")
    label_file(tmp_path, np.zeros(SHAPE, np.int16), "empty.nii.gz")
    before = snapshot(deployment)
    for case, name, params, reason, image in cases:
        tag = "../../outside" if "climbs" in case else "final"
        status, answer = deployment.call(
            "PUT", f"/datastore/label?image={image}&tag={tag}", params, {"label": tmp_path / name}
        )
        assert 400 <= status < 500 and reason in detail(answer), (case, status, answer)
        assert snapshot(deployment) == before, f"{case}: something stored changed"
        reason = detail(answer).split("the stored one is unchanged: ")[-1]
        record(case, f"{status}: {brief(reason)}; stored label, versions and datastore unchanged")
    status, answer = deployment.call("PUT", "/datastore/label?image=phantom&tag=final", None, None)
    assert 400 <= status < 500 and snapshot(deployment) == before, (status, answer)
    record("a save with no label file", f"{status}; nothing stored changed")


def test_a_coarser_label_is_resampled_only_when_asked(deployment: Deployment, tmp_path: Path) -> None:
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = 0.5  # voxel centres of a 2 mm grid over the same 1 mm head
    path = label_file(
        tmp_path, np.where(blob(shape=(24, 24, 20)) > 0, PUTAMEN, 0).astype(np.int16), "2mm.nii.gz", affine
    )
    assert save(deployment, "other", path)[0] == 422
    status, answer = save(deployment, "other", path, {"resample": True})
    assert status == 200, answer
    data = stored(deployment, "other")
    assert data.shape == SHAPE and set(np.unique(data)) == {0, PUTAMEN}
    record('a 2 mm label for a 1 mm image, with params {"resample": true}', "200: stored on the image's grid")


def test_a_deleted_label_is_kept_and_can_be_restored(deployment: Deployment, tmp_path: Path) -> None:
    assert save(deployment, "other", label_file(tmp_path, blob(), "other.nii.gz"))[0] == 200
    count = len(versions(deployment, "other"))
    status, answer = deployment.call("DELETE", "/datastore/label?id=other&tag=final")
    assert status == 200, answer
    assert not (deployment.studies / "labels" / "final" / "other.nii.gz").exists()
    status, listed = deployment.call("GET", "/datastore/?output=all")
    assert "final" not in listed["objects"]["other"]["labels"]
    kept = versions(deployment, "other")
    assert len(kept) == count + 1
    status, answer = deployment.call("PUT", f"/datastore/label/restore?image=other&version={kept[-1]['version']}")
    assert status == 200 and np.array_equal(stored(deployment, "other"), blob())
    status, answer = deployment.call("DELETE", "/datastore/label?id=other&tag=nothing-here")
    assert status == 404, answer
    record(
        "DELETE of a final label, then restore",
        "the label is kept as a version before it is removed; restore brings it back; "
        f"DELETE of a label that does not exist: {status}",
    )


def test_concurrent_writers_to_one_image_lose_nothing(deployment: Deployment, tmp_path: Path) -> None:
    previous = stored(deployment)
    sent = [blob(grow=g) for g in range(1, 7)]
    assert not any(np.array_equal(previous, data) for data in sent)
    paths = [label_file(tmp_path, data, f"writer-{g}.nii.gz") for g, data in enumerate(sent)]
    count = len(versions(deployment))
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda p=p: statuses.append(save(deployment, "phantom", p)[0])) for p in paths]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * len(paths)
    assert len(versions(deployment)) == count + len(paths), "every replaced label kept"
    folder = deployment.studies / "labels" / ".versions" / "final" / "phantom"
    kept = [np.asarray(nib.load(p).dataobj) for p in sorted(folder.glob("*.nii.gz"))[-len(paths) :]]
    assert np.array_equal(kept[0], previous), "the label stored before, whole"
    everything = [*kept[1:], stored(deployment)]
    assert all(sum(np.array_equal(a, data) for a in everything) == 1 for data in sent), "each one sent, once, whole"
    record(
        "6 clients save labels for the same image at once",
        "all answered 200; one is stored whole, the label before and the 5 others are kept whole as versions",
    )


def test_train_and_next_sample_requests_are_checked_before_work_starts(deployment: Deployment) -> None:
    train_before = deployment.call("GET", "/train/")
    cases = [
        ("POST", "/train/brainsam", {"iterations": "many"}, 422, "iterations must be a whole number"),
        ("POST", "/train/brainsam", {"iterations": -5, "first_click": 3}, 422, "iterations must be >= 0"),
        ("POST", "/train/brainsam", {"epochs": 10}, 422, "unknown setting 'epochs'"),
        ("POST", "/train/brainsam", {"lora": {"rnk": 4}}, 422, "rnk"),
        ("POST", "/train/", {"brainsam": {"schedule": "linear"}}, 422, "schedule must be cosine or poly"),
        ("POST", "/train/nosuchmodel", {}, 404, "no trainer 'nosuchmodel'; this server has: brainsam"),
        ("POST", "/activelearning/nosuchstrategy", {}, 404, "most_uncertain"),
        ("POST", "/scoring/nosuchmethod", {}, 404, "uncertainty"),
        ("POST", "/infer/nosuchmodel?image=phantom", None, 404, "brainsam_auto"),
    ]
    for method, path, body, expected, reason in cases:
        status, answer = deployment.call(method, path, body)
        assert status == expected and reason in detail(answer), (path, body, status, answer)
        record(f"{method} {path} {json.dumps(body) if body else ''}".strip(), f"{status}: {brief(detail(answer))}")
    time.sleep(1)
    assert deployment.call("GET", "/train/") == train_before, "no train run started"
    assert not (deployment.server.adapters / "train_stats.json").exists()


def test_a_full_disk_refuses_the_save_and_keeps_the_stored_label(deployment: Deployment, tmp_path: Path) -> None:
    if not deployment.tmpfs:
        pytest.skip("this machine does not allow a tmpfs mount (needs root): the full disk cannot be made")
    before = snapshot(deployment)
    filler = deployment.studies / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
        except OSError:
            pass
    try:
        status, answer = save(deployment, "phantom", label_file(tmp_path, blob(grow=3), "late.nii.gz"))
        assert status == 413 and "disk is full" in detail(answer), (status, answer)
        assert snapshot(deployment) == before
        assert not [p for p in (deployment.studies / "labels").rglob(".*tmp*")], "no temporary file left"
        status, _ = deployment.call("GET", "/info/")
        assert status == 200
    finally:
        filler.unlink()
    assert save(deployment, "phantom", tmp_path / "late.nii.gz")[0] == 200
    record(
        "disk full while saving a label (the studies folder on a full tmpfs)",
        f"413: {brief(detail(answer))}; the stored label, versions and datastore unchanged; "
        "the same save succeeds once there is room",
    )


def test_a_server_killed_mid_save_keeps_a_whole_label_and_its_bookkeeping(
    deployment: Deployment, tmp_path: Path
) -> None:
    sent = [blob(grow=g % 4) for g in range(40)]
    paths = [label_file(tmp_path, data, f"stream-{g}.nii.gz") for g, data in enumerate(sent)]
    answered: list[int] = []

    def stream() -> None:
        for path in paths:
            try:
                answered.append(save(deployment, "phantom", path)[0])
            except OSError:
                return

    writer = threading.Thread(target=stream)
    writer.start()
    deadline = time.monotonic() + 60
    while len(answered) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    deployment.kill_and_restart()
    writer.join()
    assert 3 <= len(answered) < len(paths) and set(answered) == {200}, answered
    json.loads((deployment.studies / "datastore_v2.json").read_text())
    status, listed = deployment.call("GET", "/datastore/?output=all")
    assert status == 200 and "final" in listed["objects"]["phantom"]["labels"]
    assert any(np.array_equal(stored(deployment), data) for data in sent), "a whole label, one that was sent"
    folder = deployment.studies / "labels" / ".versions" / "final" / "phantom"
    for kept in folder.glob("*.nii.gz"):
        np.asarray(nib.load(kept).dataobj)  # every version parses whole
    assert not [
        p for p in (deployment.studies / "labels").rglob("*") if ".tmp" in p.name and not p.name.startswith(".")
    ]
    assert save(deployment, "phantom", paths[0])[0] == 200
    record(
        "server killed with SIGKILL during a stream of label saves, then started again",
        f"{len(answered)} saves answered before the kill; the stored label is one that was sent, whole; "
        "datastore_v2.json parses; every kept version parses; saving works again",
    )


def click(deployment: Deployment) -> tuple[int, Any]:
    """A box over 4 slices of the unlabelled phantom's putamen, as Slicer sends it."""
    params = {"label": "Left-Putamen", "roi": [18, 27, 20, 29, 17, 20], "result_extension": ".nii.gz"}
    status, answer = MONAILabelUtils.http_multipart(
        "POST", deployment.server.url, "/infer/brainsam?image=fresh", {"params": json.dumps(params)}, {}
    )[:2]
    return status, answer


def test_damaged_caches_are_rebuilt_not_served(deployment: Deployment) -> None:
    """The registration and embedding caches the server keeps on disk (filled by the scoring and
    a click), cut short while it was down: the first click after the restart recomputes what it
    needs instead of failing."""
    status, answer = deployment.call("POST", "/scoring/uncertainty", {})
    assert status == 200, answer
    assert wait_for_scoring(deployment.server.url, 300)["status"] == "DONE"
    assert click(deployment)[0] == 200
    caches = {key: [p for p in Path(deployment.caches[key]).rglob("*") if p.is_file()] for key in deployment.caches}
    assert all(caches.values()), f"the scoring and the click left files in both caches: {caches}"

    def cut_short() -> None:
        for path in (p for files in caches.values() for p in files):
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    deployment.kill_and_restart(cut_short)
    status, answer = click(deployment)
    assert status == 200, answer
    log = deployment.server.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    record(
        f"registration and embedding cache files cut short on disk ({len(caches['atlas_cache'])} and "
        f"{len(caches['embedding_dir'])} files) while the server was down, then a click",
        "200: the damaged files are ignored and recomputed (a warning in the log)",
    )
