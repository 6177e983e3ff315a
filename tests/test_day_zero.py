"""Day zero: the demo sample is not the built-in atlas, and the built-in prior labels real subjects.

Skipped with a reason when nilearn (the sample template), mricron-data (the built-in atlas) or
../shared/data is absent.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainsam.atlases.atlas import load_atlas
from brainsam.atlases.prior import builtin_atlas
from brainsam.atlases.registration import carry_labels
from brainsam.core.labels import CONFIGS, load_label_set, load_mapping
from brainsam.core.metrics import dice
from brainsam.io.sample import INSTALL_HINT, MRICRON, template_path, write_sample

from .support import require_data


def require_builtin() -> None:
    for path in (MRICRON / "ch2.nii.gz", MRICRON / "ch2bet.nii.gz", MRICRON / "aal.nii.gz"):
        if not path.is_file():
            pytest.skip(f"built-in atlas not available: {path} is absent; {INSTALL_HINT}")


def test_the_sample_is_a_template_the_builtin_atlas_was_not_drawn_on(tmp_path: Path) -> None:
    try:
        template_path()
    except FileNotFoundError as error:
        pytest.skip(f"sample not available: {error}")
    require_builtin()
    image_path, reference_path = write_sample(tmp_path)
    assert image_path.parent == tmp_path / "studies" and [p.name for p in (tmp_path / "studies").iterdir()] == [
        "mni152.nii.gz"
    ]
    image, colin = nib.load(image_path), nib.load(MRICRON / "ch2.nii.gz")
    assert image.shape != colin.shape, "the sample must not be Colin27, the built-in atlas itself"
    reference = np.asarray(nib.load(reference_path).dataobj)
    assert reference.shape == image.shape
    labels = load_label_set()
    found = {s.name for s in labels.structures if (reference == s.id).any()}
    assert found == set(load_mapping(CONFIGS / "mappings" / "aal.yaml")), (
        "the 12 structures AAL has, in the label set's ids"
    )
    # AAL carried by MNI coordinates lies on the template's grey matter: the putamen is brighter
    # than the background and darker than the white matter round it (template 0..255)
    data = np.asanyarray(image.dataobj).astype(float)
    putamen = data[reference == labels["Left-Putamen"].id].mean()
    assert 0.3 * data.max() < putamen < 0.9 * data.max()


@pytest.mark.realdata
def test_the_builtin_prior_labels_a_freesurfer_subject_it_has_never_seen() -> None:
    folder = require_data("fs-aseg", "sub-04")
    require_builtin()
    labels = load_label_set()
    subject = load_atlas(
        folder / "T1.nii.gz", folder / "aseg.nii.gz", load_mapping(CONFIGS / "mappings" / "aseg.yaml"), labels
    )
    carried = carry_labels(builtin_atlas(labels), subject.volume)
    scores = [dice(carried == s.id, subject.labels == s.id) for s in labels.structures]
    # measured 0.618 on sub-04 (docs/day_zero.md: 0.605-0.630 over the 7 fs-aseg subjects)
    assert np.mean(scores) > 0.55
