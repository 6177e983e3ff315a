"""The built-in sample: Colin27 (single-subject MNI T1, 1 mm) from Debian's `mricron-data`.

    python -m brainsam.sample sample-data

writes `sample-data/studies/colin27.nii.gz` (the studies folder the demo server opens) and
`sample-data/reference/colin27.nii.gz`: the AAL atlas drawn on that brain, mapped to the label
set's ids for the 12 deep structures AAL has (no accumbens, ventral DC or brainstem).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from .labels import CONFIGS, load_label_set, load_mapping

MRICRON = Path("/usr/share/mricron/templates")
INSTALL_HINT = "install it with: sudo apt-get install mricron-data (Debian/Ubuntu)"


def write_sample(destination: Path, source: Path = MRICRON) -> tuple[Path, Path]:
    """Copy Colin27 into `destination`/studies and its relabelled AAL into `destination`/reference."""
    image, atlas = source / "ch2.nii.gz", source / "aal.nii.gz"
    for path in (image, atlas):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the sample comes from the mricron-data package; {INSTALL_HINT}")
    studies, reference = destination / "studies", destination / "reference"
    studies.mkdir(parents=True, exist_ok=True)
    reference.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(image, studies / "colin27.nii.gz")
    aal = nib.load(str(atlas))
    values = np.asanyarray(aal.dataobj)
    labels = np.zeros(values.shape, dtype=np.uint8)
    label_set = load_label_set()
    for name, aal_id in load_mapping(CONFIGS / "mappings" / "aal.yaml").items():
        labels[values == aal_id] = label_set[name].id
    nib.save(nib.Nifti1Image(labels, aal.affine), str(reference / "colin27.nii.gz"))
    return studies / "colin27.nii.gz", reference / "colin27.nii.gz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m brainsam.sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("destination", type=Path, nargs="?", default=Path("sample-data"))
    args = parser.parse_args(argv)
    try:
        image, labels = write_sample(args.destination)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"sample image {image}\nreference labels {labels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
