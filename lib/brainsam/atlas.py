"""Atlas registration: labelled images carried onto a new image, the classical first pass.

    python -m brainsam.atlas TARGET.nii.gz --atlas IMAGE LABELS MAPPING [--atlas ...] -o labels.nii.gz

How it works: brainsam.atlases.registration.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from brainsam.atlases.atlas import load_atlas
from brainsam.atlases.registration import RegistrationSettings, register_atlases
from brainsam.core.labels import load_label_set, load_mapping
from brainsam.core.volume import load_volume, save_mask


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m brainsam.atlas", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("target", type=Path, help="image to label")
    parser.add_argument(
        "--atlas",
        nargs=3,
        action="append",
        required=True,
        metavar=("IMAGE", "LABELS", "MAPPING"),
        help="an atlas: image, label file, mapping YAML (configs/mappings)",
    )
    parser.add_argument(
        "--labels", default=None, help="label set YAML (default: configs/labels/freesurfer_subcortical.yaml)"
    )
    parser.add_argument(
        "--demons", type=int, default=RegistrationSettings.demons_iterations, help="demons iterations (0: affine only)"
    )
    parser.add_argument(
        "-o", "--output", type=Path, required=True, help="fused label map, written on the target's grid"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    label_set = load_label_set(args.labels) if args.labels else load_label_set()
    atlases = [load_atlas(image, labels, load_mapping(mapping), label_set) for image, labels, mapping in args.atlas]
    target = load_volume(args.target)
    began = time.perf_counter()
    result = register_atlases(atlases, target, RegistrationSettings(demons_iterations=args.demons))
    save_mask(target, result.fused, args.output)
    print(f"{len(atlases)} atlas(es) registered and fused in {time.perf_counter() - began:.1f} s: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
