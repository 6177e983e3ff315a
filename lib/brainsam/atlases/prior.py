"""The built-in atlas for a datastore without labels: Colin27 with AAL, completed by ellipsoids.

AAL (mricron-data's aal.nii.gz on Colin27) has 12 of the 17 deep structures; accumbens, ventral
DC and brainstem are added as ellipsoids of the label set's typical size (`extent_mm`) at
centres measured on labelled subjects registered to Colin27 and stored in
configs/atlas/colin27.yaml. The `brainsam.prior` command measures them again.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import yaml

from brainsam.atlases.atlas import Atlas, load_atlas
from brainsam.atlases.registration import carry_labels
from brainsam.core.labels import CONFIGS, LabelSet, load_mapping
from brainsam.core.volume import load_volume
from brainsam.io.sample import INSTALL_HINT, MRICRON

PRIOR_FILE = CONFIGS / "atlas" / "colin27.yaml"
STRIATUM = ("Left-Caudate", "Right-Caudate", "Left-Putamen", "Right-Putamen")


def builtin_atlas(label_set: LabelSet, source: Path = MRICRON, prior: Path = PRIOR_FILE) -> Atlas:
    """Colin27 with AAL's structures and the prior's ellipsoids, in `label_set`'s ids."""
    image, aal = source / "ch2.nii.gz", source / "aal.nii.gz"
    for path in (image, aal):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: the built-in atlas comes from the mricron-data package; {INSTALL_HINT}"
            )
    atlas = load_atlas(image, aal, load_mapping(CONFIGS / "mappings" / "aal.yaml"), label_set, name="colin27-aal")
    centres = yaml.safe_load(prior.read_text())["centres_mm"]
    labels = atlas.labels.copy()
    # AAL's caudate and putamen reach down into the ventral striatum, which FreeSurfer and MUSE
    # call accumbens: the ellipsoids are drawn over them (drawn only where AAL had nothing, the
    # accumbens kept a sliver: Dice 0.02-0.03 on fs-aseg)
    free = np.isin(labels, [0, *(label_set[name].id for name in STRIATUM if name in label_set)])
    for name, centre in centres.items():
        if name in label_set:
            ellipsoid = ellipsoid_mask(
                labels.shape, atlas.volume.spacing, np.asarray(centre, float), np.asarray(label_set[name].extent_mm) / 2
            )
            labels[ellipsoid & free] = label_set[name].id
    return Atlas(atlas.name, atlas.volume, labels)


def ellipsoid_mask(
    shape: tuple[int, ...], spacing: tuple[float, float, float], centre_mm: np.ndarray, radii_mm: np.ndarray
) -> np.ndarray:
    """Boolean ellipsoid on a canonical grid (mm measured from voxel 0)."""
    axes = [np.arange(n) * s for n, s in zip(shape, spacing)]
    distance = sum(
        ((a - c) / r)[tuple(slice(None) if i == k else None for k in range(3))] ** 2
        for i, (a, c, r) in enumerate(zip(axes, centre_mm, radii_mm))
    )
    return distance <= 1.0


def measure_centres(
    subjects: list[Path],
    image_name: str,
    labels_name: str,
    mapping: dict[str, int],
    names: list[str],
    label_set: LabelSet,
) -> dict[str, list[float]]:
    """Median centre (Colin27 canonical mm) of each structure in `names` over `subjects`
    registered to Colin27."""
    colin = load_volume(MRICRON / "ch2.nii.gz")
    found: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for subject in subjects:
        atlas = load_atlas(subject / image_name, subject / labels_name, mapping, label_set, name=subject.name)
        labels = carry_labels(atlas, colin)
        for name in names:
            voxels = np.argwhere(labels == label_set[name].id)
            if len(voxels):
                found[name].append(voxels.mean(axis=0) * np.asarray(colin.spacing))
        print(f"{subject.name}: done", file=sys.stderr, flush=True)
    return {name: [round(float(v), 1) for v in np.median(points, axis=0)] for name, points in found.items() if points}
