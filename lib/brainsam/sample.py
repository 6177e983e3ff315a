"""The built-in sample: the MNI152 2009c T1 template (nilearn's wheel), not the built-in atlas.

    python -m brainsam.sample sample-data

How it works: brainsam.io.sample.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from brainsam.io.sample import write_sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m brainsam.sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("destination", type=Path, nargs="?", default=Path("sample-data"))
    args = parser.parse_args(argv)
    try:
        image, labels = write_sample(args.destination)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"sample image {image}\nreference labels (AAL by MNI coordinates, approximate) {labels}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
