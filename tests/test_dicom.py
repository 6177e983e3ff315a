"""NIfTI -> DICOM MR series -> NIfTI as the DICOMweb datastore reads it: the same voxels at the
same positions, for the sample (RAS), FreeSurfer's LIA and IXI's 2 mm PSR; SEG labels by name."""

from __future__ import annotations

import locale
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from brainsam.core.labels import load_label_set
from brainsam.io.dicom import (
    SeriesError,
    SeriesNames,
    check_volume,
    nifti_to_series,
    series_to_nifti,
)
from brainsam.io.seg import labels_to_seg, seg_to_labels
from tests.support import require_data

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample-data" / "studies" / "mni152.nii.gz"


def round_trip(source: Path, tmp_path: Path) -> tuple[nib.Nifti1Image, nib.Nifti1Image, list[Path]]:
    files = nifti_to_series(source, tmp_path / "series", SeriesNames("test"))
    return nib.load(str(source)), nib.load(str(series_to_nifti(tmp_path / "series", tmp_path / "back.nii.gz"))), files


def assert_same_image(a: nib.Nifti1Image, b: nib.Nifti1Image, tolerance: float = 0.0) -> None:
    """Same voxel values at the same world positions (axes may come back flipped or permuted)."""
    ca, cb = nib.as_closest_canonical(a), nib.as_closest_canonical(b)
    np.testing.assert_allclose(ca.affine, cb.affine, atol=1e-4)
    difference = np.abs(np.asanyarray(ca.dataobj).astype(float) - np.asanyarray(cb.dataobj).astype(float)).max()
    assert difference <= tolerance


def test_sample_comes_back_voxel_for_voxel(tmp_path: Path) -> None:
    before = locale.setlocale(locale.LC_ALL)
    source, back, files = round_trip(SAMPLE, tmp_path)
    assert locale.setlocale(locale.LC_ALL) == before  # GDCM's writer sets "C"; text files would then read as ASCII
    assert len(files) == source.shape[2]
    header = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
    assert (header.SOPClassUID, header.Modality, header.BitsAllocated) == ("1.2.840.10008.5.1.4.1.1.4", "MR", 16)
    np.testing.assert_array_equal(np.asanyarray(source.dataobj), np.asanyarray(back.dataobj))  # right-handed: as stored
    np.testing.assert_allclose(source.affine, back.affine, atol=1e-4)


@pytest.mark.realdata
def test_freesurfer_lia_keeps_voxels_and_positions(tmp_path: Path) -> None:
    source, back, _ = round_trip(require_data("fs-aseg", "sub-01", "T1.nii.gz"), tmp_path)
    assert nib.aff2axcodes(source.affine) == ("L", "I", "A")
    assert nib.aff2axcodes(back.affine) == ("L", "I", "P")  # left-handed: the slice axis comes back reversed
    assert_same_image(source, back)


@pytest.mark.realdata
def test_ixi_psr_real_values_within_the_rescale_step(tmp_path: Path) -> None:
    source, back, files = round_trip(require_data("ixi-muse", "IXI012-HH-1211", "T1.nii.gz"), tmp_path)
    assert nib.aff2axcodes(source.affine) == ("P", "S", "R")
    slope = float(pydicom.dcmread(str(files[0]), stop_before_pixels=True).RescaleSlope)
    assert_same_image(source, back, tolerance=slope / 2)


def test_series_that_are_not_one_mr_volume_are_refused(tmp_path: Path) -> None:
    files = nifti_to_series(SAMPLE, tmp_path / "series", SeriesNames("test"))
    with pytest.raises(SeriesError, match="2 slices"):
        check_volume(files[:1])
    with pytest.raises(SeriesError, match="evenly spaced"):
        check_volume(files[:3] + files[5:8])
    other = pydicom.dcmread(str(files[0]))
    other.Modality = "CT"
    other.save_as(str(tmp_path / "ct.dcm"))
    with pytest.raises(SeriesError, match="CT"):
        check_volume([tmp_path / "ct.dcm", files[1]])


def test_seg_segments_are_read_by_name_onto_the_series_grid(tmp_path: Path) -> None:
    labels_set = load_label_set()
    files = nifti_to_series(SAMPLE, tmp_path / "series", SeriesNames("test"))
    reference = sitk.ReadImage(str(series_to_nifti(tmp_path / "series", tmp_path / "image.nii.gz")))
    labels = sitk.ReadImage(str(ROOT / "sample-data" / "reference" / "mni152.nii.gz"))
    labels.CopyInformation(reference)
    seg = labels_to_seg(labels, labels_set, files)
    for number, segment in enumerate(seg.SegmentSequence, start=1):  # renumber as a viewer might
        segment.SegmentNumber = number
    for frame in seg.PerFrameFunctionalGroupsSequence:
        old = frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber = [
            s.id
            for s in sorted(labels_set.structures, key=lambda s: s.id)
            if (sitk.GetArrayViewFromImage(labels) == s.id).any()
        ].index(old) + 1
    back, found = seg_to_labels(seg, reference, labels_set)
    assert len(found) == 12
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labels))
