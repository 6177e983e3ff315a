"""Leave-one-out accuracy of the segmenter, before and after Train, with the robot in 3D.

    nice -n 5 .venv/bin/python -m benchmarks.segmenter_fold prepare fs-aseg aseg.nii.gz aseg
    nice -n 5 .venv/bin/python -m benchmarks.segmenter_fold fold fs-aseg --held sub-07 --set iterations=600 --tag trained
    nice -n 5 .venv/bin/python -m benchmarks.segmenter_fold fold fs-aseg --held sub-07 --set iterations=0 --tag base
    nice -n 5 .venv/bin/python -m benchmarks.segmenter_fold fold ixi-muse --held IXI051-HH-1328 --set iterations=600 \
        --start runs/segmenter_fold/fs-aseg-sub-07-trained.state.pt --tag from-fs-aseg

`prepare` keeps, per subject of ../shared/data/<data set>, what a fold needs under
runs/segmenter_fold/<data set>/<subject>.pt: the image, its label and every other subject's labels
registered onto it (brainsam.atlases.registration.carry_labels, as the server registers), cropped to the deep brain
in the working view, and the embeddings of those slices in the deep-brain window (compiled
float32 encoder, no adapter). Encoding is the long part (~2 min a 1 mm subject on one core).

`fold` trains on every subject but `--held` (priors from the others, as brainsam.training.trainer gives them;
the prompt encoder and mask decoder only: the embeddings are the base encoder's, so `lora` blocks
must stay empty) with brainsam.training.trainer.Trainer, then answers every structure of the held-out
subject as the server does (brainsam.inference.segmenter.Segmenter prompted by `--atlases` of the others
fused), with the robot of brainsam.training.robot: a first click at the structure's most interior voxel,
then corrective clicks at the largest error, each re-weighting the atlases as the server's do
(`--fixed-atlases`: not; `--discount-mm` and `--honour-mm` set how far round a click the atlases
lose weight and how far honouring it moves the logits, as chosen in docs/segmenter.md). It prints and appends to `--out` the Dice of the
fused prior and after each click (view grid, the whole volume), and keeps the trained state
beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainsam.atlases.atlas import load_atlas
from brainsam.atlases.fusion import AtlasFusion
from brainsam.atlases.registration import carry_labels
from brainsam.core.config import load_config
from brainsam.core.labels import Structure, load_label_set, load_mapping
from brainsam.core.metrics import dice
from brainsam.core.view import SliceView, Window
from brainsam.inference import atlas_votes, dense
from brainsam.inference.atlas_votes import votes_of
from brainsam.inference.segmenter import (
    WINDOW_MARGIN_MM,
    WINDOW_SNAP_MM,
    Segmenter,
    grid_spacing,
    prior_slices,
)
from brainsam.inference.votes import VoteShare
from brainsam.io.subjects import Subject
from brainsam.modeling.backbones import Backbone, load_backbone
from brainsam.modeling.lora import trainable_state
from brainsam.training.cases import SubjectSlices, TrainingCase, structure_case
from brainsam.training.robot import interior_voxel, next_click
from brainsam.training.settings import load_train_settings
from brainsam.training.trainer import Trainer, split_subjects

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
FOLDS = ROOT / "runs" / "segmenter_fold"
MARGIN_MM = 12.0
"""The deep-brain crop: every other subject's labels on this one, grown by this much."""


def prepare(data_set: str, label_file: str, mapping: str, only: list[str]) -> None:
    """Write runs/segmenter_fold/<data set>/<subject>.pt for each subject (or those in `only`)."""
    labels = load_label_set()
    folders = sorted(p for p in (DATA / data_set).iterdir() if p.is_dir())
    atlases = {
        f.name: load_atlas(
            f / "T1.nii.gz",
            f / label_file,
            load_mapping(ROOT / "configs" / "mappings" / f"{mapping}.yaml"),
            labels,
            f.name,
        )
        for f in folders
    }
    backbone = load_backbone("litemedsam")
    encoder = torch.compile(backbone.image_encoder)
    out = FOLDS / data_set
    out.mkdir(parents=True, exist_ok=True)
    for name, atlas in atlases.items():
        if only and name not in only:
            continue
        began = time.perf_counter()
        view = SliceView(atlas.volume.data, atlas.volume.spacing, load_config().axis_for(atlas.volume.spacing))
        maps = {
            other: view.to_view(carry_labels(atlases[other], atlas.volume, cache=ROOT / "runs" / "atlas_cache"))
            for other in atlases
            if other != name
        }
        union = np.any([m > 0 for m in maps.values()], axis=0)
        box = deep_box(union, view.spacing)
        window = view.window_round(union, WINDOW_MARGIN_MM, WINDOW_SNAP_MM)
        slices = list(range(box[0].start, box[0].stop))
        embeddings = encode(backbone, encoder, view, slices, window)
        torch.save({"name": name, "spacing": tuple(view.spacing), "shape": view.shape, "box": [(s.start, s.stop) for s in box],
                    "window": (window.row, window.col, window.height, window.width), "image": torch.from_numpy(view.stack[box].copy()).half(),
                    "truth": torch.from_numpy(view.to_view(atlas.labels)[box].astype(np.uint8)),
                    "maps": {other: torch.from_numpy(m[box].astype(np.uint8)) for other, m in maps.items()},
                    "slices": slices, "embeddings": embeddings}, out / f"{name}.pt")  # fmt: skip
        print(f"{name}: {len(slices)} slices in {window}, {time.perf_counter() - began:.0f} s", flush=True)


def encode(
    backbone: Backbone, encoder: torch.nn.Module, view: SliceView, slices: list[int], window: Window
) -> torch.Tensor:
    """Float16 embeddings (len(slices), 256, 64, 64) of `slices` in `window`, 4 at a time."""
    batches = []
    with torch.no_grad():
        for i in range(0, len(slices), 4):
            crops = torch.stack([view.crop(k, window, backbone.input_size) for k in slices[i : i + 4]])
            batches.append(encoder(backbone.encoder_input(crops)).half())
    return torch.cat(batches)


def deep_box(union: np.ndarray, spacing: tuple[float, float, float]) -> tuple[slice, slice, slice]:
    """The box of `union` grown by MARGIN_MM, within the volume."""
    index = np.argwhere(union)
    grow = np.ceil(MARGIN_MM / np.asarray(spacing)).astype(int)
    low, high = np.maximum(index.min(0) - grow, 0), np.minimum(index.max(0) + grow + 1, union.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def whole(subject: dict[str, Any], crop: np.ndarray) -> np.ndarray:
    """A crop of the deep box placed in a zero volume of the view's shape."""
    out = np.zeros(subject["shape"], dtype=np.float32)
    out[tuple(slice(a, b) for a, b in subject["box"])] = crop
    return out


def priors(subject: dict[str, Any], others: list[str], structures: list[Structure]) -> dict[int, VoteShare | None]:
    """Each structure's fused prior from the labels of `others` registered onto `subject`."""
    fusion = AtlasFusion(
        [subject["maps"][o].numpy() for o in others], subject["image"].float().numpy(), subject["spacing"]
    )
    return {s.id: VoteShare.of(whole(subject, fusion.probability(s.id))) for s in structures}


def slices_of(subject: dict[str, Any]) -> SubjectSlices:
    """The prepared subject's embeddings as brainsam.training.cases holds a subject's slices."""
    window = Window(*subject["window"])
    return SubjectSlices(
        subject["name"], window, grid_spacing(subject["spacing"], window), subject["slices"][0], subject["embeddings"]
    )


def cases_of(subject: dict[str, Any], others: list[str], structures: list[Structure]) -> list[TrainingCase]:
    """Training cases of a subject as brainsam.training.cases builds them, from prepared data."""
    encoded, truth = slices_of(subject), whole(subject, subject["truth"].numpy().astype(np.float32))
    maps = np.stack([subject["maps"][o].numpy() for o in others])  # on the deep box
    corner = tuple(a for a, _ in subject["box"])
    out = []
    for label_id, share in priors(subject, others, structures).items():
        if share is None:
            continue
        low, high = prior_slices(share)
        indices = list(range(max(low, encoded.held.start), min(high + 1, encoded.held.stop)))
        out.append(structure_case(encoded, label_id, share, indices, truth, maps, corner))
    return out


@torch.no_grad()
def evaluate(
    backbone: Backbone,
    subject: dict[str, Any],
    others: list[str],
    structures: list[Structure],
    clicks: int,
    fixed_atlases: bool = False,
    bf16: bool = False,
) -> list[dict[str, Any]]:
    """Per structure: the prior's Dice and the segmenter's after each of `clicks` robot clicks,
    which re-weight the atlases as in the server (brainsam.inference.atlas_votes) unless
    `fixed_atlases`; decoded under bfloat16 autocast with `bf16`, as the server decodes where
    the CPU computes bf16 natively."""
    encoded, shape = slices_of(subject), tuple(subject["shape"])
    truth = whole(subject, subject["truth"].numpy().astype(np.float32))
    maps = np.stack([whole(subject, subject["maps"][o].numpy()).astype(np.uint8) for o in others])
    segmenter = Segmenter(backbone, encoded.window, encoded.held, encoded.grid_mm, encoded.of, bf16=bf16)
    rows = []
    for label_id, share in priors(subject, others, structures).items():
        target = truth == label_id
        if share is None or not target.any():
            continue
        first = interior_voxel(target, subject["spacing"])
        answer = segmenter.first(share, [segmenter.to_click(first, True)], None)
        if not fixed_atlases:
            answer.votes, answer.points = (
                votes_of(maps, (0, 0, 0), label_id, share, subject["spacing"]),
                [(first, True)],
            )
        scores = [dice(answer.stack(shape) > 0, target)]
        for _ in range(clicks - 1):
            click = next_click(target, answer.stack(shape) > 0, subject["spacing"])
            if click is not None and fixed_atlases:
                segmenter.correct(answer, [segmenter.to_click(*click)])
            elif click is not None:
                segmenter.correct_with_atlases(answer, [click])
            scores.append(dice(answer.stack(shape) > 0, target))
        rows.append({"label": int(label_id), "prior": dice(share.majority(), target), "dice": scores})
    return rows


class PreparedTrainer(Trainer):
    """brainsam.training.trainer.Trainer on cases built from prepared data rather than from datastore files."""

    def __init__(self, fit: list[TrainingCase], held_out: list[TrainingCase], *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.prepared = {"fit": fit, "held_out": held_out}

    def cases(self, subjects: list[Subject]) -> list[TrainingCase]:
        return self.prepared["fit" if subjects is self.train_subjects else "held_out"]


def fold(
    data_set: str,
    held: str,
    overrides: dict[str, str],
    atlases: int,
    clicks: int,
    tag: str,
    out: Path,
    start: Path | None = None,
    fixed_atlases: bool = False,
    bf16: bool = False,
) -> dict[str, Any]:
    """Train without `held` (from the trained state `start`, another fold's, if given), evaluate
    on it; return (and append to `out`) the summary."""
    structures = load_label_set().structures
    data = {p.stem: torch.load(p, weights_only=False) for p in sorted((FOLDS / data_set).glob("*.pt"))}
    names = [n for n in sorted(data) if n != held]
    settings = load_train_settings("litemedsam", **overrides)
    if settings.lora_settings().blocks != ():
        raise SystemExit("prepared embeddings are the base encoder's: train with --set 'lora={blocks: []}'")
    subjects = [Subject(n, Path(n), Path(n), {}) for n in names]
    fit, validation = split_subjects(subjects, settings.validation_fraction)
    cases = {
        part: [
            c for s in group for c in cases_of(data[s.name], [n for n in names if n != s.name][:atlases], structures)
        ]
        for part, group in (("fit", fit), ("validation", validation))
    }
    trainer = PreparedTrainer(cases["fit"], cases["validation"], settings, load_config(), load_label_set(), subjects)
    if start is not None:
        trainer.backbone.load_state_dict(torch.load(start), strict=False)
    kept = trainable_state(trainer.backbone)  # what the server keeps serving when nothing beats it
    state, result = trainer.run()
    trainer.backbone.load_state_dict(kept if state is None else state, strict=False)
    if state is not None:
        torch.save(state, out.with_name(f"{data_set}-{held}-{tag or 'trained'}.state.pt"))
    trainer.backbone.eval()
    rows = evaluate(trainer.backbone, data[held], names[:atlases], structures, clicks, fixed_atlases, bf16)
    summary = {"tag": tag, "data_set": data_set, "held": held, "overrides": overrides, "start": start and start.name, "steps": result.iterations, "published": state is not None, "train_s": round(result.seconds), "honour_mm": dense.HONOUR_MM,
               "discount_mm": None if fixed_atlases else atlas_votes.DISCOUNT_MM, "bf16": bf16,
               "validation": {"baseline": result.baseline, "best": result.best}, "prior": float(np.mean([r["prior"] for r in rows])),
               "dice": np.mean([r["dice"] for r in rows], axis=0).round(4).tolist(), "rows": rows}  # fmt: skip
    with open(out, "a") as handle:
        handle.write(json.dumps(summary, default=float) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    ready = commands.add_parser("prepare")
    ready.add_argument("data_set")
    ready.add_argument("label_file", help="e.g. aseg.nii.gz, muse.nii.gz")
    ready.add_argument("mapping", help="a name in configs/mappings, e.g. aseg, muse")
    ready.add_argument(
        "--only", nargs="*", default=[], help="prepare these subjects only (all are registered onto them)"
    )
    run = commands.add_parser("fold")
    run.add_argument("data_set")
    run.add_argument("--held", required=True)
    run.add_argument("--set", action="append", default=[], help="a training setting, key=value (YAML value)")
    run.add_argument("--atlases", type=int, default=5)
    run.add_argument("--clicks", type=int, default=5)
    run.add_argument("--tag", default="")
    run.add_argument("--start", type=Path, help="a trained state another fold kept (*.state.pt) to start from")
    run.add_argument("--out", type=Path, default=FOLDS / "results.jsonl")
    run.add_argument(
        "--honour-mm", type=float, help=f"how far honouring a click moves the logits (default {dense.HONOUR_MM})"
    )
    run.add_argument(
        "--discount-mm",
        type=float,
        help=f"how far round a click the atlases it contradicts lose weight (default {atlas_votes.DISCOUNT_MM})",
    )
    run.add_argument("--fixed-atlases", action="store_true", help="clicks do not re-weight the atlases (ablation)")
    run.add_argument(
        "--bf16",
        action="store_true",
        help="evaluate decoding under bfloat16 autocast, as the server does on a CPU with native bf16",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.command == "prepare":
        prepare(args.data_set, args.label_file, args.mapping, args.only)
        return
    overrides = dict(item.split("=", 1) for item in args.set)
    if args.honour_mm is not None:
        # read by dense.honour_clicks at every call, in training and in the evaluation alike
        dense.HONOUR_MM = args.honour_mm
        args.tag = f"{args.tag}-honour{args.honour_mm:g}"
    if args.discount_mm is not None:
        atlas_votes.DISCOUNT_MM = args.discount_mm  # read by AtlasVotes.share at every call
        args.tag = f"{args.tag}-discount{args.discount_mm:g}"
    summary = fold(
        args.data_set,
        args.held,
        {"lora": "{blocks: []}", **overrides},
        args.atlases,
        args.clicks,
        args.tag,
        args.out,
        args.start,
        args.fixed_atlases,
        args.bf16,
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, default=float))


if __name__ == "__main__":
    main()
