"""A DICOMweb archive (Orthanc, a PACS) as the datastore: MR series are the images, DICOM SEG
series referring to them are their final labels.

Built on MONAI Label's DICOMWebDatastore, which caches each series as NIfTI under an id that is
its SeriesInstanceUID. What changes here:
- ids must be DICOM UIDs (400 otherwise: the id names a cache folder), an unknown series
  answers 404 and a series that is not one 3D MR volume 422, each with the reason;
- series and labels are asked of the archive every time (MONAI Label keeps its lists for 2 h,
  so a SEG saved from OHIF would stay unseen);
- a SEG is read through its segment names (brainsam.io.seg) onto the series' grid, so the
  cached label holds the label set's ids whichever viewer numbered the segments; an image's
  label is its newest SEG; a SEG deleted from the archive takes its label away;
- saving a final label writes the SEG with pydicom-seg (MONAI Label runs dcmqi's
  itkimage2segimage, downloaded at start-up, which is not allowed here) and stores it (STOW-RS);
- downloads and conversions land atomically, so the scoring and train processes that read the
  same cache never see half a series.
"""

import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pydicom
import SimpleITK as sitk
from fastapi import HTTPException
from filelock import FileLock
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import binary_to_image
from monailabel.datastore.utils.dicom import dicom_web_download_series
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

from brainsam.core.labels import LabelSet
from brainsam.io.dicom import SeriesError, series_to_nifti
from brainsam.io.label_files import LabelError, checked_label, label_values
from brainsam.io.seg import labels_to_seg, seg_to_labels
from lib.datastore import SAVE_OPTIONS

logger = logging.getLogger(__name__)

UID = re.compile(r"[0-9]+(\.[0-9]+)*")
SERIES_UID, STUDY_UID, MODALITY = "0020000E", "0020000D", "00080060"
SERIES_DATE, SERIES_TIME = "00080021", "00080031"


def series_uid(value: Any) -> str:
    """`value` if it is a DICOM UID (digits and dots, at most 64 characters); 400 otherwise."""
    if not isinstance(value, str) or len(value) > 64 or not UID.fullmatch(value):
        raise HTTPException(
            400, f"image must be a SeriesInstanceUID (digits and dots) on this DICOMweb datastore, got {value!r}"
        )
    return value


def attribute(entry: Dict[str, Any], tag: str) -> str:
    """The first value of `tag` in a DICOM JSON entry (a QIDO-RS answer), or ''."""
    values = entry.get(tag, {}).get("Value") or [""]
    return str(values[0])


class DicomWebStudies(DICOMWebDatastore):
    """The archive at `url` (its DICOMweb root) with images filtered by MONAI Label's search
    filter (set MONAI_LABEL_DICOMWEB_SEARCH_FILTER='{"Modality":"MR"}'), labels in the
    structures of `label_set`, cached under `cache_path` (default ~/.cache/monailabel/dicom)."""

    def __init__(self, url: str, label_set: LabelSet, cache_path: Optional[str] = None):
        client = DICOMwebClientX(
            url=url,
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
        )
        super().__init__(client, settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER, cache_path or None)
        self.label_set = label_set
        self._refers: Dict[str, str] = {}  # SEG series -> the series it labels ('' if none)
        self._unreadable: set = set()  # SEG series reported once as unusable
        self._sync = threading.Lock()

    # images ---------------------------------------------------------------------------------

    def list_images(self) -> List[str]:
        """The series matching the search filter, as the archive holds them now."""
        return [
            attribute(entry, SERIES_UID) for entry in self._client.search_for_series(search_filters=self._search_filter)
        ]

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        raise HTTPException(
            405, "this datastore is a DICOMweb archive: store images there (STOW-RS), e.g. with brainsam-nifti2dicom"
        )

    def get_image_uri(self, image_id: str) -> str:
        """The cached NIfTI of series `image_id`, downloaded and converted at first use (by one
        process at a time: the scoring and train processes share the cache)."""
        image_id = series_uid(image_id)
        cached = self._cached(image_id)
        if cached:
            return cached
        entry = self._series(image_id)
        modality = attribute(entry, MODALITY)
        if modality != "MR":
            raise HTTPException(
                422, f"series {image_id} is not a 3D MR volume: its modality is {modality or 'missing'}"
            )
        with FileLock(os.path.join(self._datastore.image_path(), f".{image_id}.lock")):
            self._init_from_datastore_file()  # another process may have converted it meanwhile
            cached = self._cached(image_id)
            if cached:
                return cached
            folder = self._download(attribute(entry, STUDY_UID), image_id)
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    nifti = series_to_nifti(folder, Path(tmp) / f"{image_id}.nii.gz")
                except SeriesError as error:
                    raise HTTPException(422, f"series {image_id} is not a 3D MR volume: {error}") from error
                LocalDatastore.add_image(self, image_id, str(nifti), self._dicom_info(image_id))
        return self._cached(image_id)

    def _cached(self, image_id: str) -> str:
        """The cached NIfTI of `image_id` if this process knows it, else ''."""
        uri = LocalDatastore.get_image_uri(self, image_id)
        return uri if uri and os.path.isfile(uri) else ""

    def _series(self, image_id: str) -> Dict[str, Any]:
        """The archive's QIDO-RS entry of series `image_id`; 404 when it holds no such series."""
        entries = self._client.search_for_series(search_filters={"SeriesInstanceUID": image_id})
        for entry in entries:
            if attribute(entry, SERIES_UID) == image_id:
                return entry
        raise HTTPException(404, f"series {image_id} not found in the DICOMweb archive {self._client.base_url}")

    def _download(self, study: str, series: str) -> Path:
        """The folder of the series' DICOM files in the cache (kept: a saved label's SEG refers
        to them), downloaded once; a download lands whole or not at all."""
        folder = Path(self._datastore.image_path()) / series
        if folder.is_dir() and any(folder.iterdir()):
            return folder
        partial = Path(tempfile.mkdtemp(prefix=f".{series}-", dir=self._datastore.image_path()))
        try:
            dicom_web_download_series(study, series, str(partial), self._client)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(partial, folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return folder

    # labels ---------------------------------------------------------------------------------

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        """Images whose final label (a SEG in the archive) is cached, after bringing the cache up to date."""
        self.sync_labels()
        images = set(self.list_images())
        return [
            image_id for image_id in LocalDatastore.get_labeled_images(self, label_tag, labels) if image_id in images
        ]

    def get_unlabeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        labelled = set(self.get_labeled_images())
        return [image_id for image_id in self.list_images() if image_id not in labelled]

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """The cached label file (label ids are image ids, as in the local datastore)."""
        return LocalDatastore.get_label_uri(self, label_id, label_tag)

    def datalist(self, full_path: bool = True) -> List[Dict[str, Any]]:
        self.sync_labels()
        return LocalDatastore.datalist(self, full_path)

    def _download_labeled_data(self) -> None:
        self.sync_labels()

    def sync_labels(self) -> None:
        """Make the cached final labels those of the archive: per image, its newest SEG (by
        series date and time) read into label set ids; labels whose SEG left the archive go."""
        with self._sync:
            newest: Dict[str, Tuple[str, str, str, str]] = {}
            segs = self._client.search_for_series(
                search_filters={"Modality": "SEG"}, fields=["SeriesDate", "SeriesTime"]
            )
            for entry in segs:
                seg, study = attribute(entry, SERIES_UID), attribute(entry, STUDY_UID)
                if seg not in self._refers:
                    self._refers[seg] = self._referenced_series(study, seg)
                image_id = self._refers[seg]
                if image_id:
                    newest[image_id] = max(
                        newest.get(image_id, ("",) * 4),
                        (attribute(entry, SERIES_DATE), attribute(entry, SERIES_TIME), seg, study),
                    )
            for image_id in LocalDatastore.get_labeled_images(self):
                if image_id not in newest:
                    logger.info("label of %s: its SEG is no longer in the archive; label removed", image_id)
                    self._drop_label(image_id)
            for image_id, (_, _, seg, study) in newest.items():
                if seg != self._label_seg(image_id) and seg not in self._unreadable:
                    self._import(image_id, study, seg)

    def _referenced_series(self, study: str, seg: str) -> str:
        """The series a SEG labels, from its ReferencedSeriesSequence ('' if it names none)."""
        meta = Dataset.from_json(self._client.retrieve_series_metadata(study, seg)[0])
        referenced = meta.get("ReferencedSeriesSequence")
        return str(referenced[0].SeriesInstanceUID) if referenced else ""

    def _label_seg(self, image_id: str) -> str:
        """The SEG series the cached final label of `image_id` came from ('' if none)."""
        return str(self.get_label_info(image_id, DefaultLabelTag.FINAL).get("SeriesInstanceUID", ""))

    def _drop_label(self, image_id: str) -> None:
        LocalDatastore.remove_label(self, image_id, DefaultLabelTag.FINAL)
        self._datastore.objects[image_id].labels.pop(DefaultLabelTag.FINAL, None)
        self._update_datastore_file()

    def _import(self, image_id: str, study: str, seg: str) -> None:
        """Cache SEG `seg` as the final label of `image_id`; a SEG that cannot be used (not
        readable, no segment named after a structure, image not a volume) is logged once."""
        try:
            reference = sitk.ReadImage(self.get_image_uri(image_id))
            with tempfile.TemporaryDirectory() as tmp:
                dicom_web_download_series(study, seg, tmp, self._client)
                dataset = pydicom.dcmread(str(next(Path(tmp).glob("*.dcm"))))
                labels, found = seg_to_labels(dataset, reference, self.label_set)
                path = Path(tmp) / f"{image_id}.nii.gz"
                sitk.WriteImage(labels, str(path), True)
                info = {"SeriesInstanceUID": seg, "structures": found, "source": "DICOM SEG"}
                LocalDatastore.save_label(self, image_id, str(path), DefaultLabelTag.FINAL, info)
            logger.info("label of %s: SEG %s with %d structures", image_id, seg, len(found))
        except (HTTPException, ValueError, OSError, StopIteration, AttributeError, KeyError) as error:
            self._unreadable.add(seg)
            detail = error.detail if isinstance(error, HTTPException) else error
            logger.warning("SEG %s (labels %s) left out: %s", seg, image_id, detail)

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any], label_id: str = ""
    ) -> str:
        """Save a label of series `image_id` (NIfTI/NRRD on its grid, or OHIF's raw .bin) once it
        passed the checks of brainsam.io.label_files (422 with the reason, nothing stored). It is
        kept in label set ids (Slicer's segments read through `label_info`); a final label is
        also stored in the archive as a DICOM SEG, where the SEGs it replaces stay."""
        if not isinstance(label_info, dict):
            raise HTTPException(400, f"params must be a JSON object, got {label_info!r}")
        image = self.get_image_uri(image_id)
        reference = sitk.ReadImage(image)
        if "".join(Path(label_filename).suffixes) == ".bin":
            try:
                label_filename = binary_to_image(image, label_filename)
            except (RuntimeError, ValueError) as error:
                raise HTTPException(
                    422, f"label for {image_id} not saved: not a labelmap of the series ({error})"
                ) from None
        labels = self._in_label_set_ids(image_id, label_filename, reference, label_info)
        info = {key: value for key, value in label_info.items() if key not in ("label_info", *SAVE_OPTIONS)}
        if label_tag == DefaultLabelTag.FINAL:
            info["SeriesInstanceUID"] = self._store_seg(image_id, labels)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{image_id}.nii.gz"
            sitk.WriteImage(labels, str(path), True)
            return LocalDatastore.save_label(self, image_id, str(path), label_tag, info)

    def _in_label_set_ids(
        self, image_id: str, label_filename: str, reference: sitk.Image, params: Dict[str, Any]
    ) -> sitk.Image:
        """The label checked against the series (brainsam.io.label_files; 422 with the reason),
        its values turned into the label set's ids."""
        try:
            values = label_values(params.get("label_info"), self.label_set, params.get("other_values"))
            label = checked_label(label_filename, reference, values, params.get("resample") is True)
        except LabelError as error:
            raise HTTPException(422, f"label for {image_id} not saved, the stored one is unchanged: {error}") from None
        found = sitk.GetArrayViewFromImage(label)
        mapped = np.zeros(found.shape, dtype=np.uint16)
        for value, name in values.named.items():
            mapped[found == value] = self.label_set[name].id
        result = sitk.GetImageFromArray(mapped)
        result.CopyInformation(reference)
        return result

    def _store_seg(self, image_id: str, labels: sitk.Image) -> str:
        """Store `labels` in the archive as a SEG of series `image_id`; return its SeriesInstanceUID."""
        series = sorted((Path(self._datastore.image_path()) / image_id).glob("*.dcm"))
        try:
            seg = labels_to_seg(labels, self.label_set, series)
        except ValueError as error:
            raise HTTPException(422, str(error)) from error
        seg.SeriesDate, seg.SeriesTime = seg.ContentDate, seg.ContentTime  # newest SEG wins
        self._client.store_instances([seg])
        self._refers[str(seg.SeriesInstanceUID)] = image_id
        logger.info("label of %s stored as SEG %s", image_id, seg.SeriesInstanceUID)
        return str(seg.SeriesInstanceUID)
