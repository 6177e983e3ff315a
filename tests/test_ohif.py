"""OHIF in headless Chromium against Orthanc's DICOMweb and the brainsam server, as scripts/ohif.sh runs them.

The archive holds the sample (the MNI152 template, 1 mm RAS) and the same head at 2 mm in IXI's PSR order.
Through OHIF's own pages (Playwright driving Debian's Chromium): the study list, the MR series,
the MONAI Label panel, the automatic model, a brainsam click inside the left putamen, saving the
segmentation as DICOM SEG from OHIF's segmentation panel (read back voxel for voxel as the label
Train's datalist holds), Update Model (the train process counts that label), Next Sample, and
the automatic model on the series handed out, which registers the saved label as its atlas.
What OHIF shows is read from its segmentation volume and compared with what the server answered
and the sample's AAL labels. Screenshots of each step go to runs/ohif/. The server runs without
background scoring and precomputation (`--conf embedding_dir none`,
MONAI_LABEL_AUTO_UPDATE_SCORING=false) to keep the lane short: the automatic model runs first and
registers the built-in atlas that names the clicked structure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelUtils
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    io_orientation,
    ornt_transform,
)
from pydicom.uid import generate_uid

from brainsam.core.labels import load_label_set
from brainsam.core.metrics import dice
from brainsam.io.dicom import SeriesNames, nifti_to_series

from .support import Subject, deepest, free_port, refused

pytestmark = pytest.mark.ohif

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample-data" / "studies" / "mni152.nii.gz"
REFERENCE = ROOT / "sample-data" / "reference" / "mni152.nii.gz"
SHOTS = ROOT / "runs" / "ohif"
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STARTUP_S, STEP_MS = 300, 300_000
CORE, TOOLS = 81985, 55139
"""webpack module ids of @cornerstonejs/core and /tools in the OHIF build of monailabel 0.8.5."""
REQUIRE = "() => { if (!window.__req) self.webpackChunk.push([[Symbol('brainsam-test')], {}, r => { window.__req = r; }]); return !!window.__req; }"
LABELS = load_label_set()


@dataclass
class Deployment:
    url: str
    dicomweb: str
    series: dict[str, str]  # image name -> SeriesInstanceUID
    log: Path
    work: Path


def psr_copy(source: Path, destination: Path) -> None:
    """`source` at 2 mm, stored in IXI's PSR axis order (a left-handed voxel frame)."""
    image = nib.as_closest_canonical(nib.load(str(source)))
    data = np.asanyarray(image.dataobj)[::2, ::2, ::2]
    half = nib.Nifti1Image(data, image.affine @ np.diag([2.0, 2.0, 2.0, 1.0]))
    nib.save(
        half.as_reoriented(ornt_transform(io_orientation(half.affine), axcodes2ornt(("P", "S", "R")))), str(destination)
    )


def stop_deployment(process: subprocess.Popen) -> None:
    """Stop scripts/ohif.sh by its PID (it stops the server's process group and Orthanc), then
    anything left of its own process group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """scripts/ohif.sh over the sample and its 2 mm PSR copy, on free ports."""
    if not SAMPLE.is_file():
        pytest.fail(f"{SAMPLE} is missing: run bash scripts/setup.sh")
    work = tmp_path_factory.mktemp("ohif")
    studies = work / "studies"
    studies.mkdir()
    shutil.copyfile(SAMPLE, studies / "mni152.nii.gz")
    psr_copy(SAMPLE, studies / "mni152-2mm-psr.nii.gz")
    port, orthanc = free_port(), free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "ORTHANC_PORT": str(orthanc),
        "STATE": str(work / "state"),
        "STUDIES": str(studies),
        "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
    }
    log = work / "ohif.log"
    with open(log, "w") as out:
        conf = [
            "--conf",
            "embedding_dir",
            "none",
            "--conf",
            "adapter",
            str(work / "adapters"),
            "--conf",
            "atlas_cache",
            str(work / "atlas_cache"),
        ]
        process = subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "ohif.sh"), *conf],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + STARTUP_S
        while True:
            try:
                urllib.request.urlopen(f"{url}/info/", timeout=5)
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    pytest.fail(f"scripts/ohif.sh did not start the server:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        series = {}
        for line in log.read_text().splitlines():
            if ": series " in line:
                name, rest = line.split(": series ")
                series[name.removesuffix(".nii.gz")] = rest.split(",")[0]
        yield Deployment(url, f"http://127.0.0.1:{orthanc}/dicom-web", series, log, work)
    finally:
        stop_deployment(process)


@pytest.fixture(scope="module")
def page(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory):
    """A page of headless Debian Chromium with a fresh profile."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1400, "height": 900},
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def on_grid(labels: Path, image: Path) -> np.ndarray:
    """The label file's voxels in the voxel order of `image` (same head, axes permuted or flipped)."""
    source, target = nib.load(str(labels)), nib.load(str(image))
    data = apply_orientation(
        np.asanyarray(source.dataobj), ornt_transform(io_orientation(source.affine), io_orientation(target.affine))
    )
    assert data.shape == target.shape
    return data


def nrrd_voxels(body: bytes) -> np.ndarray:
    with tempfile.NamedTemporaryFile(suffix=".nrrd") as handle:
        handle.write(body)
        handle.flush()
        return nrrd.read(handle.name)[0]


def download(url: str, path: Path) -> Path:
    with urllib.request.urlopen(url, timeout=120) as response:
        path.write_bytes(response.read())
    return path


def shown(page) -> dict[int, tuple[int, int]]:
    """What OHIF shows: per segment index of its labelmap, (voxel count, sum of voxel indices)."""
    return {
        int(k): tuple(v)
        for k, v in page.evaluate(
            f"""() => {{ const tools = window.__req({TOOLS}), core = window.__req({CORE});
            const s = tools.segmentation.state.getSegmentation('1');
            const data = core.cache.getVolume(s.representationData.Labelmap.volumeId).voxelManager.getCompleteScalarDataArray();
            const out = {{}};
            for (let i = 0; i < data.length; i++) {{ const v = data[i]; if (v) {{ if (!out[v]) out[v] = [0, 0]; out[v][0]++; out[v][1] += i; }} }}
            return out; }}"""
        ).items()
    }


def summary(labels: np.ndarray, index_of: dict[int, int]) -> dict[int, tuple[int, int]]:
    """The same summary for a label volume (x fastest, as OHIF stores it), values mapped by `index_of`."""
    flat = labels.reshape(-1, order="F")
    out = {}
    for value, index in index_of.items():
        where = np.flatnonzero(flat == value)
        if where.size:
            out[index] = (int(where.size), int(where.sum()))
    return out


def segment_indices(page) -> dict[str, int]:
    """OHIF's segment index of each structure name."""
    return page.evaluate(
        f"""() => {{ const s = window.__req({TOOLS}).segmentation.state.getSegmentation('1');
        const out = {{}}; for (const [k, v] of Object.entries(s.segments)) if (v) out[v.label] = Number(k); return out; }}"""
    )


def click_voxel(page, ijk: list[int]) -> None:
    """Click the axial viewport on voxel `ijk` of the displayed volume (scrolled to its slice)."""
    x, y = page.evaluate(
        f"""(ijk) => {{ const core = window.__req({CORE});
        const element = document.querySelectorAll('.cornerstone-viewport-element')[0];
        const viewport = core.getEnabledElement(element).viewport;
        const volume = core.cache.getVolumes().find(v => v.volumeId.startsWith('cornerstoneStreamingImageVolume'));
        const world = volume.imageData.indexToWorld(ijk);
        viewport.jumpToWorld(world); viewport.render();
        const [cx, cy] = viewport.worldToCanvas(world), box = element.getBoundingClientRect();
        return [box.left + cx, box.top + cy]; }}""",
        ijk,
    )
    page.wait_for_timeout(500)
    page.mouse.click(x, y)


def form_params(body: str) -> dict:
    """The JSON `params` field of a multipart form as OHIF posts it."""
    part = body.split('name="params"', 1)[1].split("\r\n\r\n", 1)[1]
    return json.loads(part.split("\r\n--", 1)[0])


def wait_for_volume(page) -> None:
    """Wait until OHIF has loaded the displayed MR volume (webpack's module table reached first)."""
    page.wait_for_function(
        f"() => window.webpackChunk && ({REQUIRE})() && window.__req({CORE}).cache.getVolumes().some(v => v.volumeId.startsWith('cornerstoneStreamingImageVolume') && v.loadStatus && v.loadStatus.loaded)",
        timeout=STEP_MS,
    )
    page.wait_for_timeout(1000)


def open_series(page, deployment: Deployment, patient: str) -> None:
    page.goto(f"{deployment.url}/ohif/", wait_until="networkidle", timeout=STEP_MS)
    page.get_by_text(patient, exact=True).first.wait_for(timeout=STEP_MS)
    hide = page.get_by_text("Confirm and Hide")
    if hide.count():
        hide.click()
    page.get_by_text(patient, exact=True).first.click()
    page.get_by_role("button", name="MONAI Label").click()
    wait_for_volume(page)


def connect(page, deployment: Deployment) -> None:
    """Connect the MONAI Label panel to the server (it forgets it whenever it is shown anew)."""
    page.fill("#monailabelServerURL", deployment.url + "/")
    page.locator(".settingsTable button").click()
    page.get_by_text("Point Prompts").wait_for(timeout=STEP_MS)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=120) as response:
        return json.load(response)


def train_ended(deployment: Deployment) -> dict:
    """The train task's progress once its process has listed the labelled images it trains on
    and ended."""
    client = MONAILabelClient(deployment.url)
    deadline = time.time() + STEP_MS / 1000
    while time.time() < deadline:
        stats = client.info()["train_stats"].get("brainsam", {})
        if "subjects" in stats and stats.get("state") != "running":
            return stats
        if "subjects" not in stats and client.train_status().get("status") not in ("SUBMITTED", "RUNNING"):
            break
        time.sleep(1)
    pytest.fail(f"the train process did not start or end:\n{deployment.log.read_text()[-3000:]}")


def test_ohif_annotates_saves_and_hands_out_series(deployment: Deployment, page, tmp_path: Path) -> None:
    series = deployment.series["mni152"]
    image = download(f"{deployment.url}/datastore/image?image={series}", tmp_path / "mni152.nii.gz")
    reference = on_grid(REFERENCE, image)

    # the study list, then the MR series in OHIF's MONAI Label mode
    page.goto(f"{deployment.url}/ohif/", wait_until="networkidle", timeout=STEP_MS)
    page.get_by_text("mni152-2mm-psr", exact=True).first.wait_for(timeout=STEP_MS)  # both studies listed
    shot(page, "1-study-list")
    open_series(page, deployment, "mni152")
    shot(page, "2-series")

    # the MONAI Label panel, connected to this server
    connect(page, deployment)
    shot(page, "3-monai-label-panel")

    # the automatic model: all structures, shown as the server answered
    with page.expect_response(lambda r: "/infer/brainsam_auto" in r.url, timeout=STEP_MS) as answer:
        page.locator("button[title='Run Segmentation']").click()
    assert answer.value.status == 200
    auto = nrrd_voxels(answer.value.body())
    assert auto.shape == reference.shape
    scores = {s.name: dice(auto == s.id, reference == s.id) for s in LABELS.structures if (reference == s.id).any()}
    assert len(scores) == 12 and min(scores.values()) > 0.3 and np.mean(list(scores.values())) > 0.55, (
        scores
    )  # AAL by coordinates: docs/day_zero.md
    print(
        f"brainsam_auto from OHIF, Dice vs AAL per structure: min {min(scores.values()):.3f}, mean {np.mean(list(scores.values())):.3f}"
    )
    page.wait_for_timeout(2000)
    index = segment_indices(page)
    ids_to_index = {s.id: index[s.name] for s in LABELS.structures}
    assert shown(page) == summary(auto, ids_to_index)
    shot(page, "4-brainsam-auto")

    # a brainsam click inside the left putamen: the structure comes from the registered atlas
    putamen = LABELS["Left-Putamen"]
    target = deepest(reference == putamen.id)
    page.get_by_text("Point Prompts").click()
    page.wait_for_timeout(1000)  # the panel switches OHIF to its click tool
    page.get_by_text("Left-Putamen", exact=True).first.click()
    page.wait_for_timeout(1000)
    click_voxel(page, target)
    page.wait_for_timeout(500)
    with page.expect_response(lambda r: "/infer/brainsam?" in r.url, timeout=STEP_MS) as answer:
        page.locator("button[title='Run PointPrompts']").click()
    assert answer.value.status == 200, answer.value.text()
    assert form_params(answer.value.request.post_data)["foreground"] == [
        target
    ]  # OHIF's voxel indices are the datastore's
    mask = nrrd_voxels(answer.value.body()) > 0
    score = dice(mask, reference == putamen.id)
    assert score > 0.5
    print(f"brainsam click from OHIF, Left-Putamen Dice vs AAL: {score:.3f}")
    page.wait_for_timeout(2000)
    expected = np.where(auto == putamen.id, 0, auto)  # OHIF replaces the segment, keeps the others
    expected[mask & (expected == 0)] = putamen.id
    assert shown(page) == summary(expected, ids_to_index)
    shot(page, "5-brainsam-click")

    # save from OHIF's segmentation panel (Export DICOM SEG): the final label Train reads, voxel for voxel
    page.locator("[data-cy='panelSegmentation-btn']").click()
    page.locator("button[aria-haspopup='menu']:visible").filter(
        has=page.locator("title", has_text="icon-more")
    ).first.click()
    page.get_by_text("Export & Download").hover()
    page.wait_for_timeout(500)
    page.get_by_text("Export DICOM SEG").click()
    page.wait_for_timeout(1000)
    shot(page, "6-export-dialog")
    page.locator("input:visible").last.fill("brainsam labels")
    with page.expect_response(
        lambda r: "/proxy/dicom/" in r.url and r.request.method == "POST", timeout=STEP_MS
    ) as stored:
        page.get_by_role("button", name="Save").click()
    assert stored.value.status == 200, stored.value.text()
    (entry,) = get_json(f"{deployment.url}/datastore/?output=train")  # what Train's datalist holds
    assert Path(entry["image"]).name == f"{series}.nii.gz"
    np.testing.assert_array_equal(np.asanyarray(nib.load(entry["label"]).dataobj), expected)
    shot(page, "7-saved")

    # Update Model: the train process finds the saved label and, with no other labelled image to
    # make its prior from, says so (tests/test_train_server.py trains on two and stops a run)
    page.locator("[data-cy='monailabel-btn']").click()
    connect(page, deployment)
    page.get_by_text("Active Learning").click()
    with page.expect_response(
        lambda r: r.url.endswith("/train/") and r.request.method == "POST", timeout=STEP_MS
    ) as started:
        page.get_by_role("button", name="Update Model").click()
    assert started.value.status == 200, started.value.text()
    stats = train_ended(deployment)
    assert stats["subjects"] == 1 and stats["state"] == "failed", stats
    assert "two labelled images" in stats["error"], stats

    # Next Sample hands out the other series, and OHIF opens it
    page.locator("select.actionInput").select_option("most_uncertain")
    with page.expect_response(lambda r: "/activelearning/" in r.url, timeout=STEP_MS) as sample:
        page.get_by_role("button", name="Next Sample").click()
    other, handed = deployment.series["mni152-2mm-psr"], sample.value.json()
    assert sample.value.url.endswith("/activelearning/most_uncertain") and handed["id"] == other
    page.get_by_text(other).wait_for(timeout=STEP_MS)
    shot(page, "8-next-sample")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="OK").click()
    page.wait_for_url(f"**{handed['StudyInstanceUID']}**", timeout=STEP_MS)
    wait_for_volume(page)

    # the automatic model there registers the label saved from OHIF as its atlas
    connect(page, deployment)
    with page.expect_response(lambda r: "/infer/brainsam_auto" in r.url, timeout=STEP_MS) as answer:
        page.locator("button[title='Run Segmentation']").click()
    assert answer.value.status == 200
    auto = nrrd_voxels(answer.value.body())
    second = download(f"{deployment.url}/datastore/image?image={other}", tmp_path / "other.nii.gz")
    saved = tmp_path / "saved-2mm.nii.gz"  # the saved label as the 2 mm copy was made (every second voxel)
    nib.save(
        nib.Nifti1Image(expected[::2, ::2, ::2], nib.load(str(image)).affine @ np.diag([2.0, 2.0, 2.0, 1.0])),
        str(saved),
    )
    truth = on_grid(saved, second)
    scores = {s.name: dice(auto == s.id, truth == s.id) for s in LABELS.structures if (truth == s.id).any()}
    assert len(scores) == 17 and min(scores.values()) > 0.6, scores
    print(
        f"brainsam_auto on the 2 mm PSR series (atlas: the label saved from OHIF), Dice vs that label per structure: min {min(scores.values()):.3f}, mean {np.mean(list(scores.values())):.3f}"
    )
    _, result = MONAILabelClient(deployment.url).infer(
        "brainsam_auto", other, {}
    )  # the same request: the atlases it used
    assert result["atlases"] == [series]
    page.wait_for_timeout(2000)
    index = segment_indices(page)
    assert shown(page) == summary(auto, {s.id: index[s.name] for s in LABELS.structures})
    shot(page, "9-next-sample-auto")


def test_series_that_cannot_be_segmented_are_refused_with_the_reason(deployment: Deployment, tmp_path: Path) -> None:
    """Through the server on the archive: an id that is not a UID, an unknown series, and series
    that are not one 3D MR volume (a single MR slice, a CT slice) answer 4xx with the reason.
    The two series stored here are deleted from Orthanc afterwards (Next Sample must not see them)."""
    files = nifti_to_series(SAMPLE, tmp_path / "series", SeriesNames("refused"))
    single, ct = pydicom.dcmread(str(files[0])), pydicom.dcmread(str(files[1]))
    for dataset, modality in ((single, "MR"), (ct, "CT")):
        dataset.SeriesInstanceUID, dataset.SOPInstanceUID, dataset.Modality = generate_uid(), generate_uid(), modality
    DICOMwebClient(deployment.dicomweb).store_instances([single, ct])
    try:
        client = MONAILabelClient(deployment.url)
        request = {"label": "Left-Putamen", "foreground": [[90, 120, 80]]}
        for image, status, reason in [
            ("../../etc/passwd", 400, "image must be a SeriesInstanceUID"),
            ("1.2.3.4", 404, "series 1.2.3.4 not found in the DICOMweb archive"),
            (single.SeriesInstanceUID, 422, "a 3D volume needs 2 slices or more"),
            (ct.SeriesInstanceUID, 422, "its modality is CT"),
        ]:
            assert reason in refused(status, client, Subject(image, (), np.eye(4), np.zeros(0), {}), request), image
    finally:
        orthanc = deployment.dicomweb.removesuffix("/dicom-web")
        for dataset in (single, ct):
            lookup = urllib.request.Request(
                f"{orthanc}/tools/lookup", data=dataset.SeriesInstanceUID.encode(), method="POST"
            )
            with urllib.request.urlopen(lookup, timeout=60) as response:
                for found in json.load(response):
                    urllib.request.urlopen(
                        urllib.request.Request(f"{orthanc}/series/{found['ID']}", method="DELETE"), timeout=60
                    ).close()


def test_labels_that_do_not_fit_the_series_are_refused_and_the_archive_keeps_its_segs(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A label sent for a series of the archive (PUT /datastore/label, as Slicer saves against a
    DICOMweb server) that does not fit it answers 422 with the reason; no SEG is stored and the
    series' final label, if it has one, stays as it was."""
    series = deployment.series["mni152"]
    archive = DICOMwebClient(deployment.dicomweb)

    def state() -> tuple[list[str], list[Any]]:
        segs = sorted(s["0020000E"]["Value"][0] for s in archive.search_for_series(search_filters={"Modality": "SEG"}))
        return segs, get_json(f"{deployment.url}/datastore/?output=train")

    shape = nib.load(str(SAMPLE)).shape
    cortex = np.zeros(shape, np.int16)
    cortex[80:90, 100:110, 70:80] = 3  # aseg's left cortex: no structure of the label set
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.int16), np.eye(4)), small)
    other = tmp_path / "cortex.nii.gz"
    nib.save(nib.Nifti1Image(cortex, nib.load(str(SAMPLE)).affine), other)
    report = tmp_path / "report.nii.gz"
    report.write_bytes(b"%PDF-1.4 not a label\n")
    before = state()
    for path, reason in [
        (small, "label shape 10x10x10 does not match"),
        (report, "not an image file"),
        (other, "values 3 that name no structure"),
    ]:
        status, response = MONAILabelUtils.http_multipart(
            "PUT", deployment.url, f"/datastore/label?image={series}&tag=final", {"params": "{}"}, {"label": str(path)}
        )[:2]
        assert status == 422 and reason in json.loads(response)["detail"], (path.name, status, response)
        assert state() == before, f"{path.name}: the archive or the final label changed"
