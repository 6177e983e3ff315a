"""LoRA fine-tuning of the segmenter on labelled subjects, validated on held-out ones, published
as an adapter.

    python -m brainsam.train ../shared/data/fs-aseg --mapping configs/mappings/aseg.yaml \
        --out runs/adapters [--config litemedsam] [--set iterations=50 ...]

How it works: brainsam.training.trainer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from brainsam.core.labels import load_label_set, load_mapping
from brainsam.io.subjects import subjects_in
from brainsam.training.settings import load_train_settings
from brainsam.training.trainer import train_and_publish


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m brainsam.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path, help="folder of subject folders, each with an image and a label file")
    parser.add_argument("--image", default="T1.nii.gz")
    parser.add_argument("--labels", default="aseg.nii.gz")
    parser.add_argument("--mapping", default="configs/mappings/aseg.yaml", help="structure name -> label id YAML")
    parser.add_argument("--subjects", nargs="+", help="only these subject folder names")
    parser.add_argument("--config", default="litemedsam", help="training config in configs/training, or a YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a training setting")
    parser.add_argument("--device", help="torch device (default: the engine config's)")
    parser.add_argument("--out", type=Path, required=True, help="folder the adapter and train_stats.json go to")
    parser.add_argument(
        "--atlas-cache",
        type=Path,
        default=Path("runs/atlas_cache"),
        help="where registrations of the subjects onto each other are kept",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    settings = load_train_settings(args.config, **dict(item.split("=", 1) for item in args.set))
    subjects = [
        s
        for s in subjects_in(args.folder, args.image, args.labels, load_mapping(args.mapping))
        if not args.subjects or s.name in args.subjects
    ]
    result = train_and_publish(
        subjects,
        settings,
        load_label_set(),
        args.out,
        {"device": args.device} if args.device else None,
        cache=args.atlas_cache,
    )
    print(json.dumps(dataclasses.asdict(result), indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
