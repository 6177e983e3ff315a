"""What the tests share: the real data and phantoms, and a real MONAI Label server started on
127.0.0.1 (stopped by PID) with the helpers that talk to it as 3D Slicer does."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException, MONAILabelUtils
from nibabel.orientations import apply_orientation, inv_ornt_aff, ornt_transform
from scipy import ndimage

from brainsam.core.labels import LabelSet, Structure, load_label_set, load_mapping
from brainsam.core.volume import RAS
from brainsam.evaluation.remote import read_mask
from brainsam.modeling.adapters import build_manifest, save_adapter
from brainsam.modeling.backbones import Backbone
from brainsam.modeling.lora import LoraSettings

ROOT = Path(__file__).resolve().parents[1]


MODEL = "brainsam"


STARTUP_S = 180


@dataclass
class Subject:
    """One image in the studies folder and its silver-standard labels.

    image_id: datastore id. shape, affine: the image's stored grid. labels: label volume on
    that grid. ids: structure name -> id in `labels`.
    """

    image_id: str
    shape: tuple[int, int, int]
    affine: np.ndarray
    labels: np.ndarray
    ids: dict[str, int]

    def truth(self, name: str) -> np.ndarray:
        return self.labels == self.ids[name]


@dataclass
class Server:
    """A running server: its address, the adapter folder it watches, its log file and process id."""

    url: str
    adapters: Path
    log: Path
    pid: int

    def client(self, client_id: str, tmp_path: Path) -> MONAILabelClient:
        return MONAILabelClient(self.url, tmpdir=str(tmp_path), client_id=client_id)


def load_subject(studies: Path, dataset: str, subject: str, label_file: str, mapping: str) -> Subject:
    """Copy `subject`'s T1 into the studies folder (id = subject name) and read its labels."""
    source = require_data(dataset, subject)
    shutil.copy(source / "T1.nii.gz", studies / f"{subject}.nii.gz")
    image = nib.load(source / "T1.nii.gz")
    labels = np.asarray(nib.load(source / label_file).dataobj)
    ids = load_mapping(ROOT / "configs" / "mappings" / mapping)
    return Subject(subject, tuple(image.shape), image.affine, labels, ids)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(
    studies: Path, work: Path, precompute: bool = False, conf: dict[str, str] | None = None
) -> Iterator[Server]:
    """The real server over `studies`, started as scripts/demo.sh starts it, watching an empty
    adapter folder under `work` (as the demo's default folder is on a fresh checkout) and
    keeping embeddings and registrations under `work` (first answers come from the model until
    scoring registers atlases there); stopped with its whole process group afterwards.

    precompute: run MONAI Label's scoring at start-up, which precomputes embeddings.
    conf: more --conf settings.
    """
    adapters, log = work / "adapters", work / "server.log"
    adapters.mkdir(parents=True)
    port = free_port()
    command = [
        sys.executable, "-m", "monailabel.main", "start_server",
        "--app", str(ROOT / "apps" / "brainsam"), "--studies", str(studies),
        "--host", "127.0.0.1", "--port", str(port),
        "--conf", "adapter", str(adapters), "--conf", "embedding_dir", str(work / "embeddings"),
        "--conf", "atlas_cache", str(work / "atlas_cache"),
    ]  # fmt: skip
    for key, value in (conf or {}).items():
        command += ["--conf", key, value]
    # no MLflow (it refuses the file store); a scoring subprocess at start-up only if asked
    env = {
        **os.environ,
        "MONAI_LABEL_TRACKING_ENABLED": "false",
        "MONAI_LABEL_AUTO_UPDATE_SCORING": str(precompute).lower(),
    }
    with open(log, "w") as output:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_info(url, process, log)
        yield Server(url, adapters, log, process.pid)
    finally:
        stop(process)


def wait_for_info(url: str, process: subprocess.Popen, log: Path) -> None:
    """Return once /info answers; fail with the log's tail if the server dies or takes too long."""
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            MONAILabelClient(url).info()
            return
        except (OSError, MONAILabelClientException):
            time.sleep(0.5)
    pytest.fail(f"server did not answer /info within {STARTUP_S} s:\n{log.read_text()[-3000:]}")


def wait_for_scoring(url: str, timeout_s: float) -> dict:
    """The scoring task (precomputation) started with the server, once it has finished; raise
    TimeoutError if it has not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, response, _, _ = MONAILabelUtils.http_method("GET", url, "/scoring/")
        task = json.loads(response) if status == 200 else {}
        if task.get("status") in ("DONE", "ERROR", "STOPPED"):
            return task
        time.sleep(1)
    raise TimeoutError(f"scoring did not finish within {timeout_s} s")


def stop(process: subprocess.Popen) -> None:
    """Stop the server's process group (it was started in its own session): TERM, then KILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


def infer(client: MONAILabelClient, subject: Subject, params: dict) -> tuple[np.ndarray, dict]:
    """One request as Slicer sends it -> (boolean mask, result params). Every mask must be a
    single-label mask on the image's own grid and affine."""
    path, result = client.infer(MODEL, subject.image_id, params)
    mask, affine = read_mask(path)
    assert mask.shape == subject.shape
    np.testing.assert_allclose(affine, subject.affine, atol=1e-4)
    assert set(np.unique(mask).tolist()) <= {0, 1}
    return mask.astype(bool), result


def deepest(region: np.ndarray) -> list[int]:
    """The voxel of `region` farthest from its border, where an annotator would click."""
    low = np.argwhere(region).min(axis=0)
    high = np.argwhere(region).max(axis=0) + 1
    crop = np.pad(region[tuple(slice(a, b) for a, b in zip(low, high))], 1)  # zero border: distances stay inside
    distance = ndimage.distance_transform_edt(crop)
    return (np.array(np.unravel_index(distance.argmax(), crop.shape)) - 1 + low).tolist()


def correction(mask: np.ndarray, truth: np.ndarray) -> tuple[str, list[int]]:
    """The next click of a simulated annotator: inside the larger error, foreground where the
    structure was missed, background where too much was taken."""
    missed, extra = truth & ~mask, mask & ~truth
    return ("foreground", deepest(missed)) if missed.sum() >= extra.sum() else ("background", deepest(extra))


def roi_of(truth: np.ndarray, margin: tuple[int, int, int] = (0, 0, 0)) -> list[int]:
    """A Slicer roi [i_min, i_max, j_min, j_max, k_min, k_max] round `truth`, grown by `margin`."""
    low = np.argwhere(truth).min(axis=0) - margin
    high = np.argwhere(truth).max(axis=0) + margin
    return [int(v) for pair in zip(low, high) for v in pair]


def refused(status: int, client: MONAILabelClient, subject: Subject, params: dict) -> str:
    """Send a request that must be refused with HTTP `status`; return the server's message."""
    with pytest.raises(MONAILabelClientException) as caught:
        client.infer(MODEL, subject.image_id, params)
    match = re.match(r"Status: (\d+); Response: (.*)", caught.value.msg, re.S)
    assert match and int(match.group(1)) == status, caught.value.msg
    return json.loads(match.group(2))["detail"]


def publish(model: Backbone, settings: LoraSettings, path: Path, mtime_s: float, backbone: str | None = None) -> None:
    """Write `model`'s LoRA adapter to `path` with modification time `mtime_s`; `backbone`
    overrides the one its manifest claims."""
    manifest = build_manifest(model, settings, labels=load_label_set().names)
    manifest["backbone"] = backbone or manifest["backbone"]
    save_adapter(model, manifest, path)
    os.utime(path, (mtime_s, mtime_s))


WAIT_S = 900


def train_stats(server: Server) -> dict:
    return MONAILabelClient(server.url).info()["train_stats"][MODEL]


def wait_until(condition: Callable[[], bool], what: str, server: Server) -> None:
    """Poll `condition` every 2 s; fail with the server log's tail after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(2)
    pytest.fail(f"{what} did not happen within {WAIT_S} s:\n{server.log.read_text()[-3000:]}")


def training_ended(client: MONAILabelClient) -> bool:
    return client.train_status().get("status") not in ("SUBMITTED", "RUNNING")


def stored_copy(canonical: np.ndarray, spacing: tuple[float, float, float], name: str) -> tuple[np.ndarray, np.ndarray]:
    """The canonical (RAS) array re-stored in orientation `name`, with a matching affine."""
    target = np.array(ORIENTATIONS[name], dtype=float)
    stored = apply_orientation(canonical, ornt_transform(RAS, target))
    ras_affine = np.diag([*spacing, 1.0])
    ras_affine[:3, 3] = [-40.0, 12.0, -7.5]
    return stored, ras_affine @ inv_ornt_aff(ornt_transform(RAS, target), canonical.shape)


DATA = Path(os.environ.get("BRAINSAM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
"""The shared cohorts (fs-aseg, ixi-muse); BRAINSAM_DATA points elsewhere (or nowhere, to try a
fresh clone's lane)."""
SAMPLE = ROOT / "sample-data"
"""What scripts/setup.sh installs: the MNI152 template and AAL reference labels on it."""


@dataclass
class LabelledFiles:
    """A labelled image on disk: its name, image and label files, structure name -> label value."""

    name: str
    image: Path
    labels: Path
    ids: dict[str, int]


def real_or_sample(dataset: str, subject: str, label_file: str, mapping: str) -> LabelledFiles:
    """A subject of the shared cohorts or, where they are absent, the installed sample (its
    reference labels are in the label set's ids); skips the test when neither is there."""
    folder = DATA / dataset / subject
    if folder.exists():
        return LabelledFiles(
            subject, folder / "T1.nii.gz", folder / label_file, load_mapping(ROOT / "configs" / "mappings" / mapping)
        )
    image, labels = SAMPLE / "studies" / "mni152.nii.gz", SAMPLE / "reference" / "mni152.nii.gz"
    if not (image.exists() and labels.exists()):
        pytest.skip(f"neither {folder} nor the sample ({SAMPLE}, scripts/setup.sh) is present")
    return LabelledFiles("mni152", image, labels, {s.name: s.id for s in load_label_set().structures})


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


def make_phantom(
    shape: tuple[int, int, int] = (48, 48, 40), centre=(24, 26, 20), radii=(8, 10, 6)
) -> tuple[np.ndarray, np.ndarray]:
    """A head-like phantom in RAS order: a grey ellipsoid holding a bright ellipsoid (the structure).

    Returns (image float32, truth bool), both (x, y, z).
    """
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    head = (((grid - np.array(shape) / 2) / (np.array(shape) * 0.45)) ** 2).sum(-1) <= 1
    truth = (((grid - np.array(centre)) / np.array(radii)) ** 2).sum(-1) <= 1
    image = np.where(head, 300.0, 0.0) + np.where(truth, 700.0, 0.0)
    return image.astype(np.float32), truth


ORIENTATIONS = {
    "RAS": [[0, 1], [1, 1], [2, 1]],
    "LIA": [[0, -1], [2, -1], [1, 1]],
    "LPS": [[0, -1], [1, -1], [2, 1]],
    "PSR": [[1, -1], [2, 1], [0, 1]],
}


TEMPORARY_FOLDERS = re.compile(r"(\.{0,2}/[^/\s'\"]+)+/")  # the folder part of a path in a message


def without_folders(message: str) -> str:
    """`message` for a table cell: the folders of the test's temporary paths left out."""
    return TEMPORARY_FOLDERS.sub("…/", message)


class TableRows:
    """The rows a test module records for a table of docs/reliability.md: (case, what happens),
    each recorded only once the check behind it passed. With BRAINSAM_RELIABILITY_ROWS=FOLDER,
    `write` puts them in FOLDER/<name>.json (scripts/reliability_table.py reads them)."""

    def __init__(self, name: str):
        self.name, self.rows = name, []

    def record(self, case: str, outcome: str) -> None:
        self.rows.append({"case": case, "outcome": outcome})

    def write(self) -> None:
        folder = os.environ.get("BRAINSAM_RELIABILITY_ROWS")
        if folder:
            (Path(folder) / f"{self.name}.json").write_text(json.dumps(self.rows, indent=1) + "\n")
