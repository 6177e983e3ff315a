"""The studies folder as the only source of images, closed to names that would leave it, and a
label store that loses nothing.

MONAI Label's local datastore joins the image ids and label tags of requests onto its folders
unchecked (PUT /datastore/?image=../../x writes outside the studies folder), and its infer
endpoint opens any existing path given as `image`, in the query or inside `params`. Here every
name a request writes under must be a plain file name, and inference reads only images of the
datastore (or of a session, which the server itself stored).

It also writes whatever label arrives, over the saved one, with a plain copy. Here a label is
checked against its image first (brainsam.io.label_files: 422 with the reason, nothing
written), the label it replaces or a delete removes is kept as a version
(labels/.versions/<tag>/<image>/, brainsam.io.versions), and the label and the datastore's
bookkeeping are written under a temporary name and renamed, so a killed server leaves the old
file or the new one, never a part.
"""

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import SimpleITK as sitk
from fastapi import HTTPException
from filelock import FileLock
from monailabel.config import settings
from monailabel.datastore.local import DataModel, LocalDatastore
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException
from monailabel.utils.sessions import Sessions
from watchdog.events import FileModifiedEvent, FileSystemMovedEvent

from brainsam.core.files import replaced_atomically
from brainsam.core.labels import LabelSet
from brainsam.io.label_files import LabelError, checked_label, label_values, read_image
from brainsam.io.versions import LabelVersions, Version

SAVE_OPTIONS = ("resample", "other_values")
"""Keys of a label save's params that say how to check it, not what to store with it."""


def plain_name(value: Any, what: str) -> str:
    """`value` if it can name a file inside one folder; 400 otherwise (path separators, `..`)."""
    if not isinstance(value, str) or value in ("", ".", "..") or any(c in value for c in "/\\\0"):
        raise HTTPException(400, f"{what} must be a plain name without path separators, got {value!r}")
    return value


class StudiesDatastore(LocalDatastore):
    """MONAI Label's local datastore over `studies` (with the server's datastore settings),
    refusing image ids and label tags that are not plain names, and labels that do not fit
    their image or `label_set`, before anything is written; keeping every replaced label."""

    def __init__(self, studies: str, label_set: LabelSet):
        super().__init__(
            studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )
        self.label_set = label_set
        self.versions = LabelVersions(Path(self._datastore.label_path(None)) / ".versions")
        if getattr(self, "_handler", None) is not None:  # the file watcher of auto_reload
            self._handler.on_moved = self._on_moved_event

    def _on_moved_event(self, event: FileSystemMovedEvent) -> None:
        """A file renamed into place, as every write here (and in the scoring and train
        processes) lands: for the bookkeeping, what MONAI Label does when it is modified (read
        it again, unless this process wrote it); for an image or a label, what it does when one
        is created."""
        if event.dest_path == self._datastore_config_path:
            self._on_modify_event(FileModifiedEvent(event.dest_path))
        else:
            self._on_any_event(event)

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        if image_id:  # empty: MONAI Label names the image after the uploaded file's base name
            plain_name(image_id, "image id")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        """Store the label file as the `label_tag` label of `image_id` once it passed the checks
        (params `resample` and `other_values` relax two of them, brainsam.io.label_files), as
        NIfTI on the image's grid, keeping the label it replaces as a version."""
        plain_name(label_tag, "label tag")
        label = self.checked(image_id, label_filename, label_info)
        info = {key: value for key, value in label_info.items() if key not in SAVE_OPTIONS}
        with disk_full_refused(f"label for {image_id} not saved"), FileLock(self._lock_file):
            obj = self._datastore.objects.get(image_id)
            if obj is None:
                raise ImageNotFoundException(f"Image {image_id} not found")
            previous = self._keep_current(image_id, label_tag)
            label_path = Path(self._datastore.label_path(label_tag))
            name = self._filename(image_id, ".nii.gz")
            with tempfile.TemporaryDirectory() as scratch, replaced_atomically(label_path / name) as temporary:
                # SimpleITK reports a full disk as a RuntimeError: a plain copy reports it as such
                sitk.WriteImage(label, os.path.join(scratch, name), True)
                shutil.copyfile(os.path.join(scratch, name), temporary)
            if previous is not None and previous.name != name:  # e.g. a .nrrd label, kept as a version
                previous.unlink()
            obj.labels[label_tag] = DataModel(
                info={**info, "ts": int(os.path.getmtime(label_path / name)), "name": name}, ext=".nii.gz"
            )
            self._update_datastore_file(lock=False)
        return image_id

    def checked(self, image_id: str, label_filename: str, params: Any) -> sitk.Image:
        """The label file as it will be stored (brainsam.io.label_files.checked_label); 404 for
        an unknown image, 422 with the reason for a label that does not fit it."""
        if not isinstance(params, dict):
            raise HTTPException(400, f"params must be a JSON object, got {params!r}")
        uri = self.get_image_uri(image_id)
        if not uri:
            raise ImageNotFoundException(f"Image {image_id} not found")
        try:
            values = label_values(params.get("label_info"), self.label_set, params.get("other_values"))
            return checked_label(label_filename, read_image(uri, "image"), values, params.get("resample") is True)
        except LabelError as error:
            raise HTTPException(422, f"label for {image_id} not saved, the stored one is unchanged: {error}") from None

    def remove_label(self, label_id: str, label_tag: str) -> None:
        """Remove the label, kept as a version first (restore brings it back)."""
        plain_name(label_tag, "label tag")
        with disk_full_refused(f"label of {label_id} not removed"), FileLock(self._lock_file):
            current = self._current(label_id, label_tag)
            if current is None:
                raise LabelNotFoundException(f"no {label_tag} label of {label_id}")
            self.versions.keep(label_tag, label_id, current, self.get_label_info(label_id, label_tag))
            current.unlink()
            self._datastore.objects[label_id].labels.pop(label_tag, None)
            self._update_datastore_file(lock=False)

    def label_versions(self, image_id: str, label_tag: str) -> List[Version]:
        """The kept versions of a label, oldest first (404 for an unknown image)."""
        if not self.get_image_uri(image_id):
            raise ImageNotFoundException(f"Image {image_id} not found")
        return self.versions.listed(plain_name(label_tag, "label tag"), image_id)

    def restore_label(self, image_id: str, label_tag: str, version: str) -> str:
        """Make a kept version the label again; the label it replaces is kept in turn."""
        try:
            path = self.versions.path(plain_name(label_tag, "label tag"), image_id, plain_name(version, "version"))
        except KeyError as error:
            raise HTTPException(404, error.args[0]) from None
        info = self.versions.info(label_tag, image_id, version)
        options = {"label_info": info.get("label_info"), "other_values": "background", "restored": version}
        return self.save_label(image_id, str(path), label_tag, {k: v for k, v in options.items() if v is not None})

    def _current(self, image_id: str, label_tag: str) -> Optional[Path]:
        """The file of the image's `label_tag` label, if there is one."""
        uri = self.get_label_uri(image_id, label_tag) if image_id in self._datastore.objects else ""
        return Path(uri) if uri and os.path.isfile(uri) else None

    def _keep_current(self, image_id: str, label_tag: str) -> Optional[Path]:
        """Keep the current label as a version; return its file, or None when there is none."""
        current = self._current(image_id, label_tag)
        if current is not None:
            self.versions.keep(label_tag, image_id, current, self.get_label_info(image_id, label_tag))
        return current

    def _update_datastore_file(self, lock: bool = True) -> None:
        """The bookkeeping (datastore_v2.json) written under a temporary name and renamed: a
        server killed while writing it leaves the previous one."""
        path = Path(self._datastore_config_path)

        def write() -> None:
            self._ignore_event_config = True
            with replaced_atomically(path) as temporary:
                temporary.write_text(
                    json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
                )
            self._config_ts = os.stat(path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()


@contextmanager
def disk_full_refused(what: str) -> Iterator[None]:
    """413 for a write that found the disk full (or a file size limit): `what` did not happen and
    the stored files are as they were (every write goes to a temporary file first). A 4xx, not
    a 507: the client learns its request was not carried out and can send it again later."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        raise HTTPException(
            413, f"{what}: the server's disk is full ({error.strerror}); the stored label is unchanged"
        ) from None


def datastore_image(image: Any, datastore: Datastore, sessions: Optional[Sessions]) -> str:
    """The file to infer on for request field `image`: the datastore image of that id, or a file
    the server stored for a session; 404 for anything else (another path, an unknown id)."""
    if isinstance(image, str):
        uri = datastore.get_image_uri(image) if image else ""
        if uri:
            return uri
        if sessions is not None and os.path.isfile(image):
            store = os.path.realpath(sessions.store_path) + os.sep
            if os.path.realpath(image).startswith(store):
                return image
    raise HTTPException(404, f"image not found: give the id of an image in this server's datastore, got {image!r}")
