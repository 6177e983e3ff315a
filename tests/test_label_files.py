"""Labels checked before they are stored, kept versions, and train settings checked before a run."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from brainsam.core.labels import load_label_set
from brainsam.io.label_files import LabelError, LabelValues, checked_label, label_values
from brainsam.io.versions import LabelVersions
from brainsam.training.settings import load_train_settings

LABEL_SET = load_label_set()
PUTAMEN = LABEL_SET["Left-Putamen"].id
SHAPE = (20, 24, 16)
AFFINE = np.array([[-1.0, 0, 0, 10], [0, 0, 1, -12], [0, -1, 0, 8], [0, 0, 0, 1]])  # LIA, as FreeSurfer stores


@pytest.fixture()
def image(tmp_path: Path) -> sitk.Image:
    path = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(SHAPE).astype(np.float32), AFFINE), path)
    return sitk.ReadImage(str(path))


def putamen(shape: tuple[int, ...] = SHAPE, value: float = PUTAMEN) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.float32 if isinstance(value, float) else np.int16)
    labels[5:9, 6:12, 4:8] = value
    return labels


def written(folder: Path, data: np.ndarray, affine: np.ndarray = AFFINE, name: str = "label.nii.gz") -> Path:
    path = folder / name
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def refusal(path: Path, image: sitk.Image, values: LabelValues | None = None, resample: bool = False) -> str:
    with pytest.raises(LabelError) as caught:
        checked_label(path, image, values or label_values(None, LABEL_SET), resample)
    return str(caught.value)


def test_a_label_on_the_images_grid_is_kept_voxel_for_voxel(image: sitk.Image, tmp_path: Path) -> None:
    data = putamen()
    label = checked_label(written(tmp_path, data), image, label_values(None, LABEL_SET))
    assert label.GetSize() == image.GetSize() and label.GetOrigin() == image.GetOrigin()
    assert label.GetDirection() == image.GetDirection()
    # SimpleITK's arrays are (z, y, x)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label).transpose(2, 1, 0), data)


def test_what_is_not_a_label_of_this_image_is_refused_with_the_reason(image: sitk.Image, tmp_path: Path) -> None:
    assert "shape 10x10x10 does not match the image's 20x24x16" in refusal(
        written(tmp_path, putamen((10, 10, 10))), image
    )
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a NIfTI at all" * 50))
    assert "not an image file" in refusal(garbage, image)
    noisy = np.where(np.random.default_rng(1).random(SHAPE) > 0.5, PUTAMEN, 0).astype(np.int16)
    for name in ("cut.nii.gz", "cut.nii"):  # an interrupted upload: SimpleITK alone reads it, zeros for the rest
        whole = written(tmp_path, noisy, name=name).read_bytes()
        (tmp_path / name).write_bytes(whole[: len(whole) // 2])
        assert "not an image file" in refusal(tmp_path / name, image), name
    moved = AFFINE.copy()
    moved[:3, 3] += 2.0  # two voxels off: a label of another image of the same shape
    assert "another grid" in refusal(written(tmp_path, putamen(), moved), image)
    cube = np.zeros((16, 16, 16), np.float32)
    swapped = np.array([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # same two opposite corners
    nib.save(nib.Nifti1Image(cube, np.eye(4)), tmp_path / "cube.nii.gz")
    label = putamen((16, 16, 16))
    assert "another grid" in refusal(written(tmp_path, label, swapped), sitk.ReadImage(str(tmp_path / "cube.nii.gz")))
    assert "one 3D volume" in refusal(written(tmp_path, np.stack([putamen()] * 2, -1)), image)
    assert "not whole numbers" in refusal(written(tmp_path, putamen(value=PUTAMEN + 0.5)), image)
    assert "values 7 that name no structure" in refusal(written(tmp_path, putamen(value=7)), image)
    assert "holds no structure" in refusal(written(tmp_path, np.zeros(SHAPE, np.uint8)), image)


def test_rounding_of_the_grid_is_tolerated_and_resampling_only_on_request(image: sitk.Image, tmp_path: Path) -> None:
    nudged = AFFINE.copy()
    nudged[:3, 3] += 1e-4  # float rounding in a writer
    assert checked_label(written(tmp_path, putamen(), nudged), image, label_values(None, LABEL_SET))
    coarse = AFFINE.copy()
    coarse[:3, :3] *= 2.0  # the same head at 2 mm
    path = written(tmp_path, putamen((10, 12, 8)), coarse)
    assert "does not match" in refusal(path, image)
    label = checked_label(path, image, label_values(None, LABEL_SET), resample=True)
    assert label.GetSize() == image.GetSize() and set(np.unique(sitk.GetArrayFromImage(label))) == {0, PUTAMEN}


def test_slicer_segments_are_read_through_label_info(image: sitk.Image, tmp_path: Path) -> None:
    data = putamen(value=1)
    data[12:14, 6:8, 4:6] = 2  # a segment named after no structure
    info = [{"name": "left-putamen", "idx": 1}, {"name": "Segment_2", "idx": 2}]
    assert "values 2 that name no structure" in refusal(written(tmp_path, data), image, label_values(info, LABEL_SET))
    label = checked_label(written(tmp_path, data), image, label_values(info, LABEL_SET, "background"))
    assert set(np.unique(sitk.GetArrayFromImage(label))) == {0, 1}, "the unnamed segment stored as background"
    with pytest.raises(LabelError, match="other_values"):
        label_values(info, LABEL_SET, "drop")
    with pytest.raises(LabelError, match="label_info must be a list"):
        label_values("Left-Putamen", LABEL_SET)


def test_versions_keep_every_replaced_label_in_order(tmp_path: Path) -> None:
    versions = LabelVersions(tmp_path / "versions")
    first, second = tmp_path / "first.nii.gz", tmp_path / "second.nrrd"
    first.write_bytes(b"first")
    second.write_bytes(b"second label")
    slicer = {"label_info": [{"name": "Left-Putamen", "idx": 1}]}
    names = [versions.keep("final", "sub-01", first, {}), versions.keep("final", "sub-01", second, slicer)]
    listed = versions.listed("final", "sub-01")
    assert [v.version for v in listed] == names and names == sorted(names) and names[0] != names[1]
    assert [v.bytes for v in listed] == [5, 12]
    assert versions.path("final", "sub-01", names[0]).read_bytes() == b"first"
    assert versions.path("final", "sub-01", names[1]).name.endswith(".nrrd")
    assert versions.info("final", "sub-01", names[1]) == slicer, "how to read its values, kept beside it"
    assert versions.listed("final", "sub-02") == []
    with pytest.raises(KeyError, match="versions: " + names[0]):
        versions.path("final", "sub-01", "20000101T000000000000Z")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"iterations": "many"}, "iterations must be a whole number, got 'many'"),
        ({"iterations": 2.5}, "iterations must be a whole number"),
        ({"publish_if_better": "maybe"}, "publish_if_better must be true or false"),
        ({"learning_rate": -1.0}, "learning_rate must be >= 0"),
        ({"schedule": "linear"}, "schedule must be cosine or poly"),
        ({"first_click": 1.5, "atlases": 0}, "first_click must be within 0..1, got 1.5; atlases must be >= 1"),
        ({"lora": {"rnk": 4}}, "unexpected keyword argument 'rnk'"),
        ({"epochs": 10}, "unknown setting 'epochs'"),
    ],
)
def test_train_settings_are_checked_before_a_run(overrides: dict, message: str) -> None:
    with pytest.raises((KeyError, TypeError, ValueError)) as caught:
        load_train_settings(**overrides)
    assert message in str(caught.value)


def test_train_settings_as_clients_send_them_are_taken() -> None:
    settings = load_train_settings(iterations="20", learning_rate=1, publish_if_better="false", lora={"rank": 4})
    assert (settings.iterations, settings.learning_rate, settings.publish_if_better) == (20, 1, False)
    assert settings.lora_settings().rank == 4


def test_a_label_slicer_wrote_as_nrrd_on_the_image_is_taken(image: sitk.Image, tmp_path: Path) -> None:
    """Slicer writes segmentations as NRRD in LPS space on the reference volume's grid."""
    lps = np.diag([-1.0, -1.0, 1.0])
    header = {
        "space": "left-posterior-superior",
        "space directions": (lps @ AFFINE[:3, :3]).T,  # one row per axis
        "space origin": lps @ AFFINE[:3, 3],
    }
    nrrd.write(str(tmp_path / "label.nrrd"), putamen(value=1).astype(np.uint8), header)
    values = label_values([{"name": "Left-Putamen", "idx": 1}], LABEL_SET)
    label = checked_label(tmp_path / "label.nrrd", image, values)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label).transpose(2, 1, 0), putamen(value=1))
