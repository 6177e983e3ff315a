"""Latency of first and corrective clicks on the real server, with and without precomputation.

    nice -n 10 .venv/bin/python -m benchmarks.latency [--no-precompute] [--atlases N]
    nice -n 10 .venv/bin/python -m benchmarks.latency --during train|scoring --atlases 3

Starts the server as tests/test_server.py does, over a temporary studies folder holding one
1 mm FreeSurfer subject (fs-aseg sub-01, 256^3) and one 2 mm IXI subject (IXI012-HH-1211), lets
MONAI Label's start-up scoring precompute the embeddings (unless --no-precompute) and waits for
it, then drives the server with monailabel's client as 3D Slicer does: per subject and
structure a first click at the structure's deepest voxel, then corrective clicks where the mask
is most wrong (every click so far sent, the newest appended). Prints each click's time as the
client sees it, the CPU time the server process spent on it (less sensitive than wall time to
other work on the machine: the load average is printed too) and the slices the server encoded
for it; p50/p95 of first and corrective clicks; and the peak resident memory of the server with
its children (the precomputing subprocess), sampled every 0.2 s. With --atlases N, N more
fs-aseg subjects lie in the studies folder with final labels, so start-up scoring registers them
onto the two images and prompt the segmenter (each line says who answered: `segmenter`,
`atlases` or `model`, brainsam's `answer` result field).
With --during train or scoring, the clicks run three times: alone (filling the caches), while
background work runs (training: POST /train on the labelled subjects; scoring: uncertainty
scoring and precomputation of BACKGROUND_SUBJECTS, placed unlabelled in the studies folder),
and alone again once it is stopped; the last two hold the same caches, so their figures
compare what the background work costs a click. Needs ../shared/data. Prints figures only:
nothing is asserted on time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import psutil
from monailabel.client.client import MONAILabelUtils

from brainsam.atlases.atlas import relabel
from brainsam.core.labels import load_label_set, load_mapping
from brainsam.evaluation.remote import MODEL, PeakMemory, read_mask
from tests.support import (
    ROOT,
    Server,
    Subject,
    correction,
    deepest,
    load_subject,
    running_server,
    wait_for_scoring,
)

STRUCTURES = ["Left-Putamen", "Right-Thalamus", "Left-Hippocampus", "Brain-Stem"]
ATLAS_SUBJECTS = ["sub-02", "sub-03", "sub-04", "sub-05", "sub-06", "sub-07"]
BACKGROUND_SUBJECTS = ["sub-07", "sub-06"]
"""Unlabelled images that give scoring work during --during scoring."""
PRECOMPUTE_TIMEOUT_S = 3600
BACKGROUND_START_S = 20
"""Background work runs this long before the clicks start (past a subprocess's start-up)."""


@dataclass
class Click:
    """One request as the benchmark saw it: first or corrective, seconds at the client (until
    the mask file is on its disk, as 3D Slicer then loads it), CPU
    seconds the server process spent on it, slices the server encoded for it, and what
    answered (atlases or model)."""

    kind: str
    seconds: float
    cpu_seconds: float
    encoded: int
    answered_by: str


def click_session(server: Server, subject: Subject, structure: str, corrections: int, work: Path) -> Iterator[Click]:
    """One annotator's first click and `corrections` corrective clicks on `structure`."""
    client = server.client(f"bench-{subject.image_id}-{structure}", work)
    process = psutil.Process(server.pid)
    truth = subject.truth(structure)
    prompts = {"label": structure, "foreground": [deepest(truth)], "background": [], "reset_state": True}
    for number in range(corrections + 1):
        cpu, began = sum(process.cpu_times()[:2]), time.perf_counter()
        path, result = client.infer(MODEL, subject.image_id, prompts)
        seconds, cpu = time.perf_counter() - began, sum(process.cpu_times()[:2]) - cpu
        mask = read_mask(path)[0] > 0
        yield Click("first" if number == 0 else "corrective", seconds, cpu, result["encoded_slices"], result["answer"])
        kind, click = correction(mask, truth)
        prompts = {**prompts, kind: prompts[kind] + [click], "reset_state": False}


def place_labelled(studies: Path, name: str) -> None:
    """An fs-aseg subject's image and its labels, in the label set's ids, as a final label."""
    source = ROOT.parent / "shared" / "data" / "fs-aseg" / name
    shutil.copy(source / "T1.nii.gz", studies / f"{name}.nii.gz")
    final = studies / "labels" / "final"
    final.mkdir(parents=True, exist_ok=True)
    label_set = load_label_set()
    stored = nib.load(source / "aseg.nii.gz")
    labels = relabel(np.asarray(stored.dataobj), load_mapping(ROOT / "configs" / "mappings" / "aseg.yaml"), label_set)
    nib.save(nib.Nifti1Image(labels, stored.affine), final / f"{name}.nii.gz")


def start_background(server: Server, kind: str) -> None:
    """Start training (long enough to outlast the clicks) or every scoring method."""
    if kind == "train":
        server.client("bench-trainer", Path(".")).train_start(
            MODEL, {"iterations": 100000, "max_minutes": 60, "validate_every": 100000}
        )
        return
    status, response, _, _ = MONAILabelUtils.http_method("POST", server.url, "/scoring/uncertainty")
    assert status == 200, f"scoring did not start: {status} {response}"


def stop_background(server: Server, kind: str) -> bool:
    """Stop it; whether it was still running (else the clicks partly ran without it)."""
    path = "/train/" if kind == "train" else "/scoring/"
    status, response, _, _ = MONAILabelUtils.http_method("GET", server.url, path + "?check_if_running=true")
    running = status == 200
    MONAILabelUtils.http_method("DELETE", server.url, path)
    return running


def summary(kind: str, clicks: list[Click]) -> str:
    """p50/p95 of the wall and CPU seconds of the clicks of one kind."""
    wall = np.percentile([c.seconds for c in clicks if c.kind == kind], [50, 95])
    cpu = np.percentile([c.cpu_seconds for c in clicks if c.kind == kind], [50, 95])
    count = sum(c.kind == kind for c in clicks)
    return f"{kind:<11} n={count:<3} p50 {wall[0]:6.2f} s  p95 {wall[1]:6.2f} s   server CPU p50 {cpu[0]:6.2f} s  p95 {cpu[1]:6.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--no-precompute", action="store_true", help="no scoring at start-up: every first click encodes"
    )
    parser.add_argument("--structures", nargs="+", default=STRUCTURES)
    parser.add_argument("--corrections", type=int, default=2, help="corrective clicks per structure")
    parser.add_argument(
        "--atlases", type=int, default=0, help="fs-aseg subjects (after sub-01) labelled in the studies folder"
    )
    parser.add_argument(
        "--during", choices=("train", "scoring"), help="also click while training or scoring runs (see above)"
    )
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPU cores")
    phases: dict[str, list[Click]] = {}
    with tempfile.TemporaryDirectory() as folder:
        work, studies = Path(folder), Path(folder) / "studies"
        studies.mkdir()
        subjects = [
            load_subject(studies, "fs-aseg", "sub-01", "aseg.nii.gz", "aseg.yaml"),
            load_subject(studies, "ixi-muse", "IXI012-HH-1211", "muse.nii.gz", "muse.yaml"),
        ]
        for name in ATLAS_SUBJECTS[: args.atlases]:
            place_labelled(studies, name)
        with (
            running_server(studies, work / "server", precompute=not args.no_precompute) as server,
            PeakMemory(server.pid) as memory,
        ):
            if not args.no_precompute:
                began = time.perf_counter()
                task = wait_for_scoring(server.url, PRECOMPUTE_TIMEOUT_S)
                print(f"precomputation {task['status']} after {time.perf_counter() - began:.0f} s")
            if args.during == "scoring":  # new unlabelled images: work for the next scoring run
                for name in BACKGROUND_SUBJECTS:
                    shutil.copy(
                        ROOT.parent / "shared" / "data" / "fs-aseg" / name / "T1.nii.gz", studies / f"new-{name}.nii.gz"
                    )
            for phase in ["alone"] + ([f"during {args.during}", "alone again"] if args.during else []):
                if phase.startswith("during"):
                    start_background(server, args.during)
                    time.sleep(BACKGROUND_START_S)
                print(f"-- {phase}", flush=True)
                clicks = phases.setdefault(phase, [])
                for subject in subjects:
                    for structure in args.structures:
                        for click in click_session(server, subject, structure, args.corrections, work):
                            clicks.append(click)
                            print(f"{subject.image_id:<15} {structure:<18} {click.kind:<10} {click.seconds:6.2f} s  "
                                  f"server CPU {click.cpu_seconds:6.2f} s  {click.encoded:3d} slices encoded  by {click.answered_by}", flush=True)  # fmt: skip
                if phase.startswith("during"):
                    print(
                        f"background {'still ran' if stop_background(server, args.during) else 'had ENDED'} when the clicks were done",
                        flush=True,
                    )
    print(
        f"{'precomputed' if not args.no_precompute else 'no precomputation'}; load average at the end {os.getloadavg()[0]:.2f}"
    )
    for phase, clicks in phases.items():
        for kind in ("first", "corrective"):
            print(f"{phase:<14} {summary(kind, clicks)}")
    print(f"peak RSS: server {memory.server_peak / 2**30:.2f} GiB, with children {memory.total_peak / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
