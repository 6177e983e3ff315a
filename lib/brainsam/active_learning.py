"""Does the automatic pass's uncertainty predict its error, and does picking by it help?

    python -m brainsam.active_learning ../shared/data/fs-aseg --out runs/auto_fs

How it works: brainsam.evaluation.active_learning.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from brainsam.atlases.atlas import load_atlas
from brainsam.cli import add_labelled_folder_arguments
from brainsam.core.config import load_config
from brainsam.core.labels import load_label_set, load_mapping
from brainsam.evaluation.active_learning import (
    Pairs,
    correlations,
    leave_one_out,
    plot,
    report,
    simulation,
    with_sam,
)
from brainsam.inference.engine import Engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m brainsam.active_learning",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_labelled_folder_arguments(parser, "aseg.nii.gz", "configs/mappings/aseg.yaml")
    parser.add_argument("--cache", type=Path, default=Path("runs/atlas_cache"), help="registration results")
    parser.add_argument("--repeats", type=int, default=10, help="random runs per split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/auto"), help="results.json goes here")
    parser.add_argument("--plot", type=Path, help="write the active-learning curves (PNG) here")
    parser.add_argument(
        "--sam",
        nargs="*",
        default=[],
        metavar="SUBJECT",
        help="also answer these subjects with the segmenter prompted by the atlases and compare",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="engine setting for --sam, e.g. embedding_dir=runs/embeddings",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    labels = load_label_set()
    mapping = load_mapping(args.mapping)
    subjects = sorted(p for p in args.folder.iterdir() if (p / args.image).is_file() and (p / args.labels).is_file())
    pairs = Pairs(
        {s.name: load_atlas(s / args.image, s / args.labels, mapping, labels, name=s.name) for s in subjects},
        args.cache,
    )
    rows = leave_one_out(pairs, labels)
    result = {
        "leave_one_out": rows,
        "spearman": correlations(rows),
        "simulation": simulation(pairs, labels, args.repeats, args.seed),
    }
    if args.sam:
        engine = Engine(load_config("litemedsam", **dict(item.split("=", 1) for item in args.set)), labels)
        result["sam"] = with_sam(pairs, labels, engine, args.sam)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result["simulation"], 2, args.plot)
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
