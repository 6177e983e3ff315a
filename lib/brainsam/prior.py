"""The built-in atlas for a datastore without labels: Colin27 with AAL, completed by ellipsoids.

    python -m brainsam.prior ../shared/data/ixi-muse --labels muse.nii.gz --mapping configs/mappings/muse.yaml

How it works: brainsam.atlases.prior.
"""

from __future__ import annotations

import argparse

import yaml

from brainsam.atlases.prior import measure_centres
from brainsam.cli import add_labelled_folder_arguments
from brainsam.core.labels import load_label_set, load_mapping


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m brainsam.prior", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_labelled_folder_arguments(parser, "muse.nii.gz", "configs/mappings/muse.yaml")
    parser.add_argument(
        "--structures",
        nargs="+",
        default=["Left-Accumbens-area", "Right-Accumbens-area", "Left-VentralDC", "Right-VentralDC", "Brain-Stem"],
    )
    args = parser.parse_args(argv)
    subjects = sorted(p for p in args.folder.iterdir() if (p / args.image).is_file())
    centres = measure_centres(
        subjects, args.image, args.labels, load_mapping(args.mapping), args.structures, load_label_set()
    )
    print(yaml.safe_dump({"centres_mm": centres}, default_flow_style=None, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
