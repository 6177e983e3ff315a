"""Label maps as DICOM SEG and back, each segment matched to a structure by its name.

A viewer numbers the segments of a SEG as it pleases (OHIF in the alphabetical order of its
segment list, 3D Slicer in the order they were added), so a SEG is read through its segment
labels: a segment named like a structure of the label set becomes that structure's id, other
segments are left out. pydicom-seg reads and writes the files; what it reads is put back on the
grid of the series the SEG refers to (a SEG may hold only the slices its segments touch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pydicom_seg
import SimpleITK as sitk

from brainsam.core.labels import LabelSet

ANATOMICAL_STRUCTURE = {
    "CodeValue": "123037004",
    "CodingSchemeDesignator": "SCT",
    "CodeMeaning": "Anatomical Structure",
}


def seg_template(label_set: LabelSet, ids: list[int], algorithm: str) -> pydicom.Dataset:
    """The SEG's description (dcmqi's metadata format) for the structures of `label_set` whose
    ids are in `ids`, each segment numbered with its structure's id."""
    segments = [
        {
            "labelID": structure.id,
            "SegmentLabel": structure.name,
            "SegmentDescription": structure.name,
            "SegmentAlgorithmType": "SEMIAUTOMATIC",
            "SegmentAlgorithmName": algorithm,
            "SegmentedPropertyCategoryCodeSequence": ANATOMICAL_STRUCTURE,
            "SegmentedPropertyTypeCodeSequence": {
                "CodeValue": str(structure.id),
                "CodingSchemeDesignator": "99BRAINSAM",
                "CodeMeaning": structure.name,
            },
            "recommendedDisplayRGBValue": list(structure.color),
        }
        for structure in sorted(label_set.structures, key=lambda s: s.id)  # readers expect increasing numbers
        if structure.id in ids
    ]
    return pydicom_seg.template.from_dcmqi_metainfo(
        {
            "ContentCreatorName": "brainsam",
            "SeriesDescription": f"{algorithm} labels",
            "SeriesNumber": "300",
            "InstanceNumber": "1",
            "segmentAttributes": [segments],
            "ContentLabel": "SEGMENTATION",
            "ContentDescription": "Deep brain structures",
            "ClinicalTrialCoordinatingCenterName": "brainsam",
            "BodyPartExamined": "BRAIN",
        }
    )


def labels_to_seg(
    labels: sitk.Image, label_set: LabelSet, series: list[Path], algorithm: str = "brainsam"
) -> pydicom.Dataset:
    """A DICOM SEG of `labels` (label set ids, on the grid of the DICOM `series`) referring to
    that series. Raises ValueError when `labels` holds no structure of the label set."""
    values = np.unique(sitk.GetArrayViewFromImage(labels))
    ids = [int(v) for v in values if v and any(s.id == v for s in label_set.structures)]
    if not ids:
        raise ValueError(f"the label holds no structure of label set {label_set.name}: nothing to save as DICOM SEG")
    known = np.isin(sitk.GetArrayViewFromImage(labels), ids)
    mask = sitk.GetImageFromArray(np.where(known, sitk.GetArrayViewFromImage(labels), 0).astype(np.uint16))
    mask.CopyInformation(labels)
    writer = pydicom_seg.MultiClassWriter(
        seg_template(label_set, ids, algorithm),
        inplane_cropping=False,
        skip_empty_slices=True,
        skip_missing_segment=False,
    )
    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in series]
    return writer.write(mask, sources)


def seg_to_labels(
    seg: pydicom.Dataset, reference: sitk.Image, label_set: LabelSet
) -> tuple[sitk.Image, dict[str, int]]:
    """The SEG's segments as one label map in label set ids on the grid of `reference` (the
    image the SEG refers to), and the structures found {name: id}. Segments whose label names
    no structure are left out; raises ValueError when none is left."""
    result = pydicom_seg.MultiClassReader().read(seg)
    lookup = np.zeros(max(result.segment_infos, default=0) + 1, dtype=np.uint16)
    found = {}
    for number, segment in result.segment_infos.items():
        name = str(segment.get("SegmentLabel", ""))
        if name in label_set:
            structure = label_set[name]
            lookup[number] = structure.id
            found[structure.name] = structure.id
    if not found:
        named = ", ".join(str(s.get("SegmentLabel", "")) for s in result.segment_infos.values())
        raise ValueError(
            f"no segment is named after a structure of label set {label_set.name} (segments: {named or 'none'})"
        )
    on_grid = sitk.Resample(result.image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    labels = sitk.GetImageFromArray(lookup[sitk.GetArrayViewFromImage(on_grid)])
    labels.CopyInformation(reference)
    return labels, found
