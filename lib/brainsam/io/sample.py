"""The built-in sample: the MNI152 2009c T1 template (nilearn's wheel), not the built-in atlas.

The `brainsam.sample` command writes `sample-data/studies/mni152.nii.gz` (the studies folder the demo server opens) and
`sample-data/reference/mni152.nii.gz`: the AAL atlas (mricron-data, drawn on Colin27) carried
onto the template's grid through MNI coordinates, in the label set's ids for the 12 deep
structures AAL has. That reference is Colin27's anatomy placed by coordinates, not a labelling
of this template: a sanity check, not a measure of accuracy (docs/day_zero.md). The built-in
prior (brainsam.atlases.prior) is Colin27 itself, so the sample is an image the prior has never seen:
an average of 152 skull-stripped brains, smoother than any scan.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from brainsam.core.labels import CONFIGS, load_label_set, load_mapping

MRICRON = Path("/usr/share/mricron/templates")
INSTALL_HINT = "install it with: sudo apt-get install mricron-data (Debian/Ubuntu)"
TEMPLATE = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
TEMPLATE_HINT = "the sample comes from the nilearn wheel; install it with: .venv/bin/python -m pip install nilearn==0.14.1 (pinned in requirements.txt)"


def template_path() -> Path:
    """The MNI152 T1 template inside the installed nilearn package (FileNotFoundError if absent)."""
    try:
        path = Path(str(resources.files("nilearn") / TEMPLATE))
    except ModuleNotFoundError:
        raise FileNotFoundError(f"nilearn is not installed: {TEMPLATE_HINT}") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {TEMPLATE_HINT}")
    return path


def aal_on(grid: nib.Nifti1Image, source: Path = MRICRON) -> np.ndarray:
    """mricron-data's AAL (label-set ids, the 12 structures it has) resampled by nearest
    neighbour through world (MNI) coordinates onto `grid`'s voxels."""
    atlas_path = source / "aal.nii.gz"
    if not atlas_path.is_file():
        raise FileNotFoundError(
            f"{atlas_path} not found: the sample's reference comes from the mricron-data package; {INSTALL_HINT}"
        )
    aal = nib.load(str(atlas_path))
    values = np.asanyarray(aal.dataobj)
    labels = np.zeros(values.shape, dtype=np.uint8)
    label_set = load_label_set()
    for name, aal_id in load_mapping(CONFIGS / "mappings" / "aal.yaml").items():
        labels[values == aal_id] = label_set[name].id
    grid_to_aal = np.linalg.inv(aal.affine) @ grid.affine
    return ndimage.affine_transform(
        labels, grid_to_aal[:3, :3], grid_to_aal[:3, 3], output_shape=grid.shape[:3], order=0, mode="constant", cval=0
    )


def write_sample(destination: Path, source: Path = MRICRON) -> tuple[Path, Path]:
    """Write the template into `destination`/studies and AAL on its grid into `destination`/reference."""
    template = nib.load(str(template_path()))
    studies, reference = destination / "studies", destination / "reference"
    studies.mkdir(parents=True, exist_ok=True)
    reference.mkdir(parents=True, exist_ok=True)
    labels = aal_on(template, source)
    image_path, reference_path = studies / "mni152.nii.gz", reference / "mni152.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(template.dataobj), template.affine, template.header), str(image_path))
    nib.save(nib.Nifti1Image(labels, template.affine), str(reference_path))
    return image_path, reference_path
