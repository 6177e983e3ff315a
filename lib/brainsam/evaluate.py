"""Accuracy under a simulated annotator: Dice and HD95 per structure after a box or k clicks.

    python -m brainsam.evaluate ../shared/data/fs-aseg --labels aseg.nii.gz \
        --mapping configs/mappings/aseg.yaml --modes box clicks --clicks 3 -o results.json

The robot annotator clicks first at the most interior voxel of the structure, then each time at
the most interior voxel of the largest error region: foreground where the structure was missed,
background where the mask spilled over. Mode `box` gives a tight 3D box (the label's bounding
box, as a Slicer ROI) and nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .config import load_config
from .engine import Engine
from .labels import load_mapping
from .propagation import dice
from .robot import next_click
from .volume import load_volume


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


def evaluate_structure(engine: Engine, image, truth: np.ndarray, name: str, mode: str, clicks: int, spacing) -> list[dict]:
    """Rows {mode, clicks, dice, hd95, seconds} for one structure: one for a box, one per click."""
    rows = []
    began = time.perf_counter()
    if mode == "box":
        state = engine.segment(image, name, roi=roi_of(truth))
        mask = engine.stored_mask(image, state) > 0
        return [{"mode": "box", "clicks": 0, "dice": dice(mask, truth), "hd95": hd95(mask, truth, spacing), "seconds": time.perf_counter() - began}]
    state, mask = None, np.zeros_like(truth)
    for k in range(1, clicks + 1):
        click = next_click(truth, mask, spacing)
        if click is not None:
            point, is_foreground = click
            fg, bg = ([point.tolist()], []) if is_foreground else ([], [point.tolist()])
            state = engine.segment(image, name, fg, bg) if state is None else engine.refine(image, state, fg, bg)
            mask = engine.stored_mask(image, state) > 0
        rows.append({"mode": "clicks", "clicks": k, "dice": dice(mask, truth), "hd95": hd95(mask, truth, spacing), "seconds": time.perf_counter() - began})
        began = time.perf_counter()
    return rows


def subjects_in(folder: Path, image_name: str, labels_name: str) -> list[Path]:
    """Subject folders holding both the image and the label file."""
    return sorted(p for p in folder.iterdir() if (p / image_name).is_file() and (p / labels_name).is_file())


def summarise(rows: list[dict]) -> str:
    """A text table: mean Dice per structure (rows) and setting (columns)."""
    table: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        setting = "box" if row["mode"] == "box" else f"{row['clicks']} click"
        table[row["structure"]][setting].append(row["dice"])
    settings = sorted({s for by in table.values() for s in by}, key=lambda s: (s != "box", s))
    lines = [f"{'structure':22s}" + "".join(f"{s:>10s}" for s in settings)]
    for structure, by in table.items():
        lines.append(f"{structure:22s}" + "".join(f"{np.mean(by[s]):10.3f}" for s in settings))
    overall = {s: np.mean([np.mean(by[s]) for by in table.values() if by[s]]) for s in settings}
    lines.append(f"{'mean':22s}" + "".join(f"{overall[s]:10.3f}" for s in settings))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m brainsam.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="folder of subject folders, each with an image and a label file")
    parser.add_argument("--image", default="T1.nii.gz", help="image file name in each subject folder")
    parser.add_argument("--labels", default="aseg.nii.gz", help="label file name in each subject folder")
    parser.add_argument("--mapping", default="configs/mappings/aseg.yaml", help="structure name -> label id YAML")
    parser.add_argument("--modes", nargs="+", choices=["box", "clicks"], default=["clicks"], help="box and/or clicks; one run shares the slice embeddings")
    parser.add_argument("--clicks", type=int, default=1, help="robot clicks per structure (mode clicks)")
    parser.add_argument("--structures", nargs="+", help="only these structures")
    parser.add_argument("--subjects", nargs="+", help="only these subject folder names")
    parser.add_argument("--config", default="litemedsam")
    parser.add_argument("--adapter")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an engine setting")
    parser.add_argument("-o", "--output", type=Path, help="write all rows as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engine = Engine(load_config(args.config, **dict(item.split("=", 1) for item in args.set)), adapter=args.adapter)
    mapping = load_mapping(args.mapping)
    names = args.structures or list(mapping)
    rows: list[dict] = []
    subjects = [s for s in subjects_in(args.folder, args.image, args.labels) if not args.subjects or s.name in args.subjects]
    for subject in subjects:
        volume = load_volume(subject / args.image)
        image = engine.prepare(volume)
        labels = np.asanyarray(nib.load(str(subject / args.labels)).dataobj)
        spacing = tuple(float(z) for z in nib.load(str(subject / args.image)).header.get_zooms()[:3])
        for name in names:
            truth = labels == mapping[name]
            if not truth.any():
                continue
            for mode in args.modes:
                for row in evaluate_structure(engine, image, truth, name, mode, args.clicks, spacing):
                    rows.append({"subject": subject.name, "structure": name, **row})
                    print(f"{subject.name} {name:22s} {mode} {row['clicks']} dice {row['dice']:.3f} ({row['seconds']:.1f} s)", file=sys.stderr, flush=True)
        engine.predictor.cache.clear()
    print(summarise(rows))
    timings, counts = engine.predictor.timings, engine.predictor.counts
    print(f"encoder {timings['encode'] / max(counts['encode'], 1):.2f} s/slice ({counts['encode']} slices), "
          f"decoder {timings['decode'] / max(counts['decode'], 1) * 1000:.0f} ms/prompt ({counts['decode']} prompts)")
    if args.output:
        args.output.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
