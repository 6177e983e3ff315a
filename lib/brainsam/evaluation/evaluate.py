"""Accuracy and cost under a simulated annotator, beside peers, on folders of labelled subjects.

Each folder holds subject folders with an image and a label file; the label file and its
mapping onto the label set (configs/mappings) are recognised by name (aseg.nii.gz: FreeSurfer
aseg, muse.nii.gz: MUSE/MALC) or given with --labels/--mapping. Modes, per structure:
- clicks: the robot annotator clicks first at the most interior voxel of the structure, then
  each time at the most interior voxel of the largest error region (foreground where the
  structure was missed, background where the mask spilled over); a row after every click;
- box: a tight 3D box (the label's bounding box, as a Slicer ROI) alone;
- box+clicks: that box (its row at 0 clicks is mode box's), then the robot's corrective clicks;
- atlas (with --atlas SUBJECT ...): the classical baseline, registration of a labelled subject
  of the same data set (brainsam.atlases.registration), no learning and no prompt;
- auto (with --auto): the automatic pass (brainsam.inference.auto), that registration refined by the
  model prompted with the box of each registered structure, no click.
With --guide-atlases, the prompt modes run as the server runs them when its datastore holds
labelled images: other subjects of the same folder (or the built-in atlas) registered onto the
subject guide first answers and corrections where they fit (brainsam.inference.votes).
Every row holds Dice and HD95 (mm; empty when the mask is empty) and what the request cost.
Models: zero-shot (`none`) and/or adapters (a file, or a folder: its newest *.safetensors),
in-process; or, with --server, whatever that running server serves, over REST as 3D Slicer
sends (images missing from its datastore are uploaded). Peers: --deepedit times MONAI Label's
radiology DeepEdit (random weights: latency only) on the same images and clicks.

Writes OUTPUT (.json: rows, summaries, the git commit and machine), OUTPUT with .csv (rows)
and with .png (Dice against clicks), and prints the tables (again: python -m brainsam.report).
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
from monailabel.client import MONAILabelClient
from scipy import ndimage
from tqdm import tqdm

from brainsam.atlases.fusion import AtlasFusion
from brainsam.core.config import load_config
from brainsam.core.labels import CONFIGS, LabelSet, load_label_set, load_mapping
from brainsam.core.metrics import dice
from brainsam.core.prompts import Prompts
from brainsam.core.volume import load_volume
from brainsam.evaluation.remote import PeakMemory, ensure_image, server_pid
from brainsam.evaluation.sessions import EngineSession, Reply, ServerSession
from brainsam.inference.engine import Engine
from brainsam.modeling import adapters
from brainsam.training.robot import next_click

KNOWN_LABEL_FILES = {"aseg.nii.gz": "aseg.yaml", "muse.nii.gz": "muse.yaml"}
MODES = ("box", "clicks", "box+clicks")
FAST_STRUCTURES = ["Left-Putamen", "Left-Pallidum"]
FAST_CLICKS = 3
BUILTIN = "builtin"


def hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> float:
    """95th percentile symmetric surface distance in mm (inf when one mask is empty)."""
    if not a.any() or not b.any():
        return float("inf")
    index = np.argwhere(a | b)
    box = tuple(slice(max(lo - 2, 0), hi + 3) for lo, hi in zip(index.min(axis=0), index.max(axis=0)))
    a, b = a[box], b[box]
    surface_a, surface_b = a & ~ndimage.binary_erosion(a), b & ~ndimage.binary_erosion(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)[surface_a]
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)[surface_b]
    return float(np.percentile(np.concatenate([to_b, to_a]), 95))


def roi_of(truth: np.ndarray) -> list[int]:
    """Tight Slicer ROI [i_min, i_max, j_min, j_max, k_min, k_max] of a stored-grid mask."""
    index = np.argwhere(truth)
    return [int(v) for pair in zip(index.min(axis=0), index.max(axis=0)) for v in pair]


@dataclass
class Dataset:
    """A folder of subject folders, each with an `image` and a `labels` file whose values are
    `ids` (structure name -> value)."""

    name: str
    folder: Path
    image: str
    labels: str
    ids: dict[str, int]

    def subjects(self, only: list[str] | None) -> list[Path]:
        """Subject folders holding both files (only those named in `only`, when given)."""
        found = sorted(p for p in self.folder.iterdir() if (p / self.image).is_file() and (p / self.labels).is_file())
        return [p for p in found if not only or p.name in only]


def dataset_of(folder: Path, image: str, labels: str | None, mapping: str | None) -> Dataset:
    """The data set in `folder`; label file and mapping recognised by name when not given."""
    if labels is None:
        present = {p.name for p in folder.glob("*/*.nii.gz")}
        labels = next((name for name in KNOWN_LABEL_FILES if name in present), None)
        if labels is None:
            raise SystemExit(
                f"{folder}: no known label file ({', '.join(KNOWN_LABEL_FILES)}) in its subject folders; give --labels and --mapping"
            )
    mapping = mapping or str(CONFIGS / "mappings" / KNOWN_LABEL_FILES.get(labels, ""))
    if not Path(mapping).is_file():
        raise SystemExit(f"no mapping for label file {labels}: give --mapping (see configs/mappings)")
    return Dataset(folder.resolve().name, folder, image, labels, load_mapping(mapping))


@dataclass
class LabelledImage:
    """One labelled image: stored-grid labels and voxel size (mm)."""

    dataset: str
    name: str
    image: Path
    labels: np.ndarray
    spacing: tuple[float, float, float]


def load_labelled_image(dataset: Dataset, folder: Path) -> LabelledImage:
    header = nib.load(str(folder / dataset.image)).header
    labels = np.asanyarray(nib.load(str(folder / dataset.labels)).dataobj)
    return LabelledImage(
        dataset.name, folder.name, folder / dataset.image, labels, tuple(float(z) for z in header.get_zooms()[:3])
    )


def scored(answer: Reply, truth: np.ndarray, spacing: tuple[float, ...], clicks: int, request: str) -> dict:
    """A row's measurements for one answer."""
    return {
        "clicks": clicks, "request": request, "dice": dice(answer.mask, truth), "hd95": hd95(answer.mask, truth, spacing),
        "seconds": answer.seconds, "encoded": answer.encoded, "decoded": answer.decoded, "encode_s": answer.encode_s, "decode_s": answer.decode_s,
    }  # fmt: skip


def annotate(
    session: EngineSession | ServerSession,
    truth: np.ndarray,
    structure: str,
    spacing: tuple[float, ...],
    mode: str,
    clicks: int,
) -> list[dict]:
    """The robot on one structure in `mode` (box, clicks, box+clicks): a row per request. Once
    the mask is perfect the robot stops clicking and the last row stands for the rest."""
    prompts = Prompts(structure, roi=tuple(roi_of(truth)) if mode != "clicks" else None)
    rows, mask = [], np.zeros_like(truth)
    if prompts.roi is not None:
        answer = session.ask(prompts)
        mask = answer.mask
        rows.append({"mode": mode, **scored(answer, truth, spacing, 0, "first")})
    for k in range(1, clicks + 1 if mode != "box" else 1):
        click = next_click(truth, mask, spacing)
        if click is None:
            rows.append({**rows[-1], "clicks": k, "request": None, "seconds": 0.0})
            continue
        prompts = prompts.with_click(*click)
        answer = session.ask(prompts)
        mask = answer.mask
        rows.append({"mode": mode, **scored(answer, truth, spacing, k, "first" if not rows else "corrective")})
    return rows


def chosen_adapter(path: str) -> Path | None:
    """None for `none`; a folder's newest *.safetensors; else the file itself."""
    if path == "none":
        return None
    folder = Path(path)
    if not folder.is_dir():
        return folder
    found = adapters.newest_adapter(folder)
    if found is None:
        raise SystemExit(f"no {adapters.ADAPTER_PATTERN} adapter in {folder}")
    return found


@dataclass
class EvaluationSettings:
    """What an evaluation runs (the `brainsam.evaluate` command's options).

    modes: box, clicks and/or box+clicks. clicks: robot clicks per structure. adapters: model
    choices (`chosen_adapter`). config, overrides: the engine config and its KEY=VALUE changes.
    server: a running server's URL to evaluate over REST as well. guide_atlases: how many other
    subjects guide the clicks, `builtin` for the built-in atlas, 0 for none. image, labels,
    mapping: file names in each subject folder and the label mapping (None: recognised).
    atlas_cache: where registrations are kept.
    """

    modes: list[str]
    clicks: int
    adapters: list[str]
    config: str = "litemedsam"
    overrides: list[str] = field(default_factory=list)
    server: str | None = None
    guide_atlases: int | str = 0
    image: str = "T1.nii.gz"
    labels: str | None = None
    mapping: str | None = None
    atlas_cache: Path | None = None


def engine_of(settings: EvaluationSettings, adapter: Path | None) -> Engine:
    """The engine of --config and --set overrides, with `adapter` (None: zero-shot)."""
    return Engine(
        load_config(settings.config, **dict(item.split("=", 1) for item in settings.overrides)), adapter=adapter
    )


def evaluate_models(
    settings: EvaluationSettings, subjects: list[LabelledImage], structures: list[str], ids: dict[str, dict[str, int]]
) -> tuple[list[dict], dict]:
    """Rows of every model (engine) or of the server, and the peak memory they took."""
    rows: list[dict] = []
    tasks = [(s, name) for s in subjects for name in structures if (s.labels == ids[s.dataset].get(name, -1)).any()]
    if settings.server:
        pid = server_pid(settings.server)
        # a folder of our own: on one machine the client would save each mask under the name of
        # the server's temporary file, which the server deletes once sent
        with tempfile.TemporaryDirectory() as folder, PeakMemory(pid) if pid else nullcontext() as memory:
            client = MONAILabelClient(settings.server, tmpdir=folder, client_id="brainsam-evaluate")
            for subject in {s.name: s for s in subjects}.values():
                ensure_image(client, subject.name, subject.image)
            rows += run_tasks(
                tasks, "server", "server", settings, ids, lambda subject: ServerSession(client, subject.name)
            )
        return rows, {"server_peak_rss_gb": memory.total_peak / 2**30 if pid else None}
    priors = AtlasPriors(settings, subjects) if settings.guide_atlases else None
    for adapter in settings.adapters:
        path = chosen_adapter(adapter)
        engine = engine_of(settings, path)
        model = ("zero-shot" if path is None else path.name) + (
            f" + atlases ({settings.guide_atlases})" if priors else ""
        )
        rows += run_tasks(tasks, model, "engine", settings, ids, PreparedImages(engine, priors).session)
    return rows, {"engine_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class PreparedImages:
    """Engine sessions on the current subject's prepared image (one image at a time: a 1 mm head
    holds ~130 MB), guided by its registered atlases when `priors` are given."""

    def __init__(self, engine: Engine, priors: "AtlasPriors | None" = None):
        self.engine, self.priors, self.name, self.image, self.atlases = engine, priors, None, None, None

    def session(self, subject: LabelledImage) -> EngineSession:
        if subject.name != self.name:
            volume = load_volume(subject.image)
            self.name, self.image = subject.name, self.engine.prepare(volume)
            self.atlases = self.priors.of(subject, volume) if self.priors else None
        return EngineSession(self.engine, self.image, self.atlases)


class AtlasPriors:
    """What guides the server's clicks: for each subject, up to `--guide-atlases` other subjects
    of its own folder (leave-one-out) registered onto it, or the built-in atlas; registrations
    cached in `--atlas-cache`."""

    def __init__(self, settings: EvaluationSettings, subjects: list[LabelledImage]):
        self.settings, self.datasets = settings, {}
        for subject in subjects:
            folder = subject.image.parent.parent
            self.datasets.setdefault(
                subject.dataset, dataset_of(folder, settings.image, settings.labels, settings.mapping)
            )

    def of(self, subject: LabelledImage, volume) -> AtlasFusion | None:
        """The other subjects' label maps registered onto `subject` (canonical, label-set ids)
        and fused on it, those the server would not trust left out; None when none is left."""
        from brainsam.atlases.atlas import load_atlas  # SimpleITK: imported only when asked for
        from brainsam.atlases.prior import builtin_atlas
        from brainsam.atlases.registration import carry_labels
        from brainsam.atlases.trust import trusted

        dataset, label_set = self.datasets[subject.dataset], load_label_set()
        if self.settings.guide_atlases == BUILTIN:
            atlases = [builtin_atlas(label_set)]
        else:
            others = [f for f in dataset.subjects(None) if f.name != subject.name][: self.settings.guide_atlases]
            atlases = [
                load_atlas(f / dataset.image, f / dataset.labels, dataset.ids, label_set, name=f.name) for f in others
            ]
        maps = trusted(
            atlases, volume, [carry_labels(atlas, volume, cache=self.settings.atlas_cache) for atlas in atlases]
        )
        return AtlasFusion(maps, volume.data, volume.spacing) if maps else None


def run_tasks(
    tasks: list[tuple[LabelledImage, str]],
    model: str,
    backend: str,
    settings: EvaluationSettings,
    ids: dict,
    new_session: Callable,
) -> list[dict]:
    """The robot over (subject, structure) tasks in every mode, a new session per mode, with a
    progress bar. new_session: LabelledImage -> EngineSession or ServerSession."""
    rows = []
    bar = tqdm(tasks, desc=f"{model} ({backend})", unit="structure", file=sys.stderr, mininterval=5)
    for subject, name in bar:
        truth = subject.labels == ids[subject.dataset][name]
        for mode in settings.modes:
            for row in annotate(new_session(subject), truth, name, subject.spacing, mode, settings.clicks):
                rows.append(
                    {
                        "dataset": subject.dataset,
                        "subject": subject.name,
                        "structure": name,
                        "model": model,
                        "backend": backend,
                        **row,
                    }
                )
        bar.set_postfix_str(f"{subject.name} {name} dice {rows[-1]['dice']:.2f}")
    return rows


def registration_rows(
    folders: list[Path],
    settings: EvaluationSettings,
    subjects: list[LabelledImage],
    structures: list[str],
    ids: dict,
    engine: Engine | None = None,
) -> tuple[list[dict], dict]:
    """The classical baseline (engine None: a labelled subject registered onto each subject,
    brainsam.atlases.registration) or the automatic pass (brainsam.inference.auto: that registration's labels refined by
    the engine prompted with their boxes), scored per structure like the prompts. Each subject
    gets the atlas from its own data set when one of `folders` is (same scanner and protocol),
    else the first; never itself."""
    from brainsam.atlases.atlas import load_atlas  # SimpleITK: imported only when asked for
    from brainsam.atlases.registration import register_atlases
    from brainsam.inference.auto import first_pass

    label_set = load_label_set()
    chosen = LabelSet(
        label_set.name, tuple(s for s in label_set.structures if s.name in structures), label_set.default_extent_mm
    )
    mode = "atlas" if engine is None else "auto"
    atlases = {}
    for folder in folders:
        source = dataset_of(folder.parent, settings.image, None, None)
        atlases[source.name] = load_atlas(
            folder / settings.image, folder / source.labels, source.ids, label_set, name=folder.name
        )
    rows, seconds = [], []
    for subject in tqdm(subjects, desc=mode, unit="subject", file=sys.stderr):
        reference = atlases.get(subject.dataset, next(iter(atlases.values())))
        if reference.name == subject.name:
            continue
        target = load_volume(subject.image)
        began = time.perf_counter()
        found = (
            register_atlases([reference], target).fused
            if engine is None
            else first_pass([reference], target, chosen, engine).labels
        )
        labels = target.to_stored(found)
        seconds.append(time.perf_counter() - began)
        for name in structures:
            truth = subject.labels == ids[subject.dataset].get(name, -1)
            if truth.any():
                mask = labels == label_set[name].id
                rows.append({"dataset": subject.dataset, "subject": subject.name, "structure": name, "model": mode, "backend": "engine",
                             "mode": mode, "clicks": 0, "request": None, "dice": dice(mask, truth), "hd95": hd95(mask, truth, subject.spacing),
                             "seconds": seconds[-1], "encoded": None, "decoded": None, "encode_s": None, "decode_s": None, "atlas": reference.name})  # fmt: skip
    return rows, {
        "atlases": [f.name for f in folders],
        "seconds_mean": float(np.mean(seconds)) if seconds else None,
        "subjects": len(seconds),
    }


def deepedit_latency(subjects: list[LabelledImage], structures: list[str], ids: dict, clicks: int) -> dict:
    """Seconds of MONAI Label's radiology DeepEdit (random weights) on the same images: per
    subject a first click at the deepest voxel of the first structure, then `clicks - 1` more
    (at least one); p50/p95. One structure suffices: every DeepEdit request runs the network
    over the whole resized volume, whatever the structure."""
    from brainsam.evaluation.peers import deepedit_click, deepedit_task

    task = deepedit_task(
        load_label_set().names
    )  # a lab's DeepEdit would label the whole set: its input has a channel per label
    first, corrective = [], []
    for subject in tqdm(subjects, desc="deepedit", unit="subject", file=sys.stderr):
        name = next((n for n in structures if (subject.labels == ids[subject.dataset].get(n, -1)).any()), None)
        if name is None:
            continue
        truth = subject.labels == ids[subject.dataset][name]
        mask, points = np.zeros_like(truth), []
        for k in range(max(clicks, 2)):  # random weights: each next click goes where the truth is not yet clicked
            click = next_click(truth, mask, subject.spacing)
            points.append([int(v) for v in click[0]])
            (first if k == 0 else corrective).append(deepedit_click(task, subject.image, name, points))
            mask[tuple(points[-1])] = True
    return {
        "model": "MONAI Label radiology deepedit (DynUNet, 128^3 input, random weights: latency only)",
        "first_p50_s": float(np.percentile(first, 50)), "first_p95_s": float(np.percentile(first, 95)),
        "corrective_p50_s": float(np.percentile(corrective, 50)), "corrective_p95_s": float(np.percentile(corrective, 95)),
        "requests": len(first) + len(corrective),
    }  # fmt: skip
