"""Accuracy and cost under a simulated annotator, beside peers, on folders of labelled subjects.

    python -m brainsam.evaluate ../shared/data/fs-aseg ../shared/data/ixi-muse \
        --subjects sub-06 IXI012-HH-1211 --modes box clicks box+clicks --clicks 5 \
        --adapters none runs/adapters_fs5b --atlas ../shared/data/fs-aseg/sub-01 --deepedit \
        --train-stats runs/adapters_fs5b/train_stats.json -o docs/evaluation.json
    python -m brainsam.evaluate ../shared/data/fs-aseg --modes clicks box+clicks --clicks 5 --guide-atlases 6 -o runs/guided.json
    python -m brainsam.evaluate ../shared/data/ixi-muse --fast -o runs/fast.json
    python -m brainsam.evaluate ../shared/data/ixi-muse --server http://127.0.0.1:8000 ...

How it works: brainsam.evaluation.evaluate.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from brainsam.core.labels import CONFIGS
from brainsam.evaluation.evaluate import (
    BUILTIN,
    FAST_CLICKS,
    FAST_STRUCTURES,
    MODES,
    EvaluationSettings,
    chosen_adapter,
    dataset_of,
    deepedit_latency,
    engine_of,
    evaluate_models,
    load_labelled_image,
    registration_rows,
)
from brainsam.evaluation.report import (
    accuracy_summary,
    latency_summary,
    plot_dice_vs_clicks,
    print_report,
    to_json,
    write_csv,
)
from brainsam.evaluation.train_figures import training_figures

ROOT = CONFIGS.parent
"""The repository: where provenance is read from git and the registration cache lives."""


def guide_count(value: str) -> int | str:
    """--guide-atlases: a number of atlases, or `builtin`."""
    return value if value == BUILTIN else int(value)


def provenance(argv: list[str]) -> dict:
    """Git commit (and whether the tree differed from it), machine and software of a run."""

    def git(*command: str) -> str:
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "command": "python -m brainsam.evaluate " + " ".join(argv), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": f"{os.cpu_count()} CPU cores ({cpu}), {'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "load_average_start": os.getloadavg()[0],
    }  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m brainsam.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "folders", type=Path, nargs="+", help="folders of subject folders, each with an image and a label file"
    )
    parser.add_argument("--image", default="T1.nii.gz", help="image file name in each subject folder")
    parser.add_argument("--labels", help="label file name in each subject folder (default: recognised, see above)")
    parser.add_argument("--mapping", help="structure name -> label id YAML (default: from the label file's name)")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=["clicks"],
        help="prompt modes; one run shares the slice embeddings",
    )
    parser.add_argument(
        "--clicks",
        type=int,
        help=f"robot clicks per structure (modes clicks, box+clicks; default 1, --fast {FAST_CLICKS})",
    )
    parser.add_argument("--structures", nargs="+", help="only these structures")
    parser.add_argument("--subjects", nargs="+", help="only these subject folder names")
    parser.add_argument(
        "--fast",
        action="store_true",
        help=f"one subject per folder, {', '.join(FAST_STRUCTURES)}, {FAST_CLICKS} clicks (CI)",
    )
    parser.add_argument(
        "--adapters",
        nargs="*",
        default=["none"],
        help="models: none (zero-shot) and/or adapter files or folders; none given: peers only",
    )
    parser.add_argument("--server", help="URL of a running brainsam server to evaluate over REST instead of in-process")
    parser.add_argument(
        "--atlas",
        type=Path,
        nargs="+",
        help="labelled subject folders registered onto the subjects of their own data set (classical baseline)",
    )
    parser.add_argument(
        "--auto",
        action="store_true",
        help="the automatic pass: --atlas registration refined by the (first) model's box prompts",
    )
    parser.add_argument(
        "--guide-atlases",
        type=guide_count,
        metavar="N|builtin",
        help="guide clicks by up to N other subjects of the same folder registered onto each subject, as the server does by its labelled images; builtin: by the built-in atlas, as with none labelled",
    )
    parser.add_argument(
        "--atlas-cache", type=Path, default=ROOT / "runs" / "atlas_cache", help="registration results kept between runs"
    )
    parser.add_argument(
        "--deepedit", action="store_true", help="time MONAI Label's radiology DeepEdit on the same images and clicks"
    )
    parser.add_argument(
        "--train-stats", type=Path, help="a training run's train_stats.json: throughput and time to --target-dice"
    )
    parser.add_argument("--target-dice", type=float, default=0.6, help="validation Dice the training figures time")
    parser.add_argument(
        "--target-metric", default="click_1", help="validation metric of --target-dice (click_1, click_3, click_5)"
    )
    parser.add_argument("--config", default="litemedsam")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an engine setting, e.g. embedding_dir=runs/embeddings",
    )
    parser.add_argument(
        "-o", "--output", type=Path, required=True, help="results JSON; .csv and .png are written beside it"
    )
    args = parser.parse_args(argv)
    args.clicks = args.clicks or (FAST_CLICKS if args.fast else 1)
    if args.auto and not args.atlas:
        parser.error("--auto needs --atlas: the automatic pass starts from registered atlases")
    if args.fast:
        args.structures = args.structures or FAST_STRUCTURES
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    meta = provenance(argv)
    datasets = [dataset_of(folder, args.image, args.labels, args.mapping) for folder in args.folders]
    subjects = []
    for dataset in datasets:
        folders = dataset.subjects(args.subjects)
        if not folders:
            raise SystemExit(
                f"{dataset.folder}: no subject with {dataset.image} and {dataset.labels}"
                + (f" among {args.subjects}" if args.subjects else "")
            )
        subjects += [load_labelled_image(dataset, folder) for folder in folders[: 1 if args.fast else None]]
    ids = {d.name: d.ids for d in datasets}
    structures = args.structures or list(datasets[0].ids)
    settings = EvaluationSettings(
        modes=args.modes,
        clicks=args.clicks,
        adapters=args.adapters,
        config=args.config,
        overrides=args.set,
        server=args.server,
        guide_atlases=args.guide_atlases or 0,
        image=args.image,
        labels=args.labels,
        mapping=args.mapping,
        atlas_cache=args.atlas_cache,
    )
    rows, memory = evaluate_models(settings, subjects, structures, ids)
    peers: dict = {}
    if args.atlas:
        atlas, peers["atlas"] = registration_rows(args.atlas, settings, subjects, structures, ids)
        rows += atlas
    if args.auto:
        engine = engine_of(settings, chosen_adapter(args.adapters[0]) if args.adapters else None)
        auto, peers["auto"] = registration_rows(args.atlas, settings, subjects, structures, ids, engine)
        rows += auto
    if args.deepedit:
        peers["deepedit"] = deepedit_latency(subjects, structures, ids, args.clicks)
    results = to_json({
        "meta": meta, "rows": rows, "accuracy": accuracy_summary(rows), "latency": latency_summary(rows), "memory": memory, "peers": peers,
        "training": training_figures(args.train_stats, args.target_metric, args.target_dice) if args.train_stats else None,
    })  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    write_csv(results["rows"], args.output.with_suffix(".csv"))
    plot_dice_vs_clicks(results["accuracy"], args.output.with_suffix(".png"))
    print_report(results)
    print(f"\nwrote {args.output} and its .csv and .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
