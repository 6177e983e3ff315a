"""Print typical structure sizes (median bounding box along R, A, S in mm) over a labelled folder.

The `extent_mm` priors in configs/labels/freesurfer_subcortical.yaml come from:
    python scripts/size_priors.py ../shared/data/ixi-muse --labels muse.nii.gz --mapping configs/mappings/muse.yaml
(the cross-domain set, so the fs-aseg benchmark subjects do not inform their own prompts).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

from brainsam.core.labels import load_mapping
from brainsam.core.volume import from_array


def extents(label_path: Path, mapping: dict[str, int]) -> dict[str, np.ndarray]:
    """Bounding-box size (mm, canonical R, A, S) of every mapped structure in one label file."""
    image = nib.load(str(label_path))
    volume = from_array(np.zeros(image.shape[:3], np.float32), image.affine)
    canonical = nib.orientations.apply_orientation(np.asanyarray(image.dataobj), volume.ornt)
    sizes = {}
    for name, value in mapping.items():
        index = np.argwhere(canonical == value)
        if len(index):
            sizes[name] = (index.max(axis=0) - index.min(axis=0) + 1) * np.asarray(volume.spacing)
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder")
    parser.add_argument("--labels", default="muse.nii.gz")
    parser.add_argument("--mapping", required=True)
    args = parser.parse_args()
    mapping = load_mapping(args.mapping)
    collected: dict[str, list[np.ndarray]] = {name: [] for name in mapping}
    for label_path in sorted(Path(args.folder).glob(f"*/{args.labels}")):
        for name, size in extents(label_path, mapping).items():
            collected[name].append(size)
    for name, sizes in collected.items():
        median = np.median(np.stack(sizes), axis=0)
        print(f"{name}: [{median[0]:.0f}, {median[1]:.0f}, {median[2]:.0f}]  # n={len(sizes)}")


if __name__ == "__main__":
    main()
