"""The studies folder as the only source of images, closed to names that would leave it.

MONAI Label's local datastore joins the image ids and label tags of requests onto its folders
unchecked (PUT /datastore/?image=../../x writes outside the studies folder), and its infer
endpoint opens any existing path given as `image`, in the query or inside `params`. Here every
name a request writes under must be a plain file name, and inference reads only images of the
datastore (or of a session, which the server itself stored).
"""

import os
from typing import Any, Dict, Optional

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import Datastore
from monailabel.utils.sessions import Sessions


def plain_name(value: Any, what: str) -> str:
    """`value` if it can name a file inside one folder; 400 otherwise (path separators, `..`)."""
    if not isinstance(value, str) or value in ("", ".", "..") or any(c in value for c in "/\\\0"):
        raise HTTPException(400, f"{what} must be a plain name without path separators, got {value!r}")
    return value


class StudiesDatastore(LocalDatastore):
    """MONAI Label's local datastore over `studies` (with the server's datastore settings),
    refusing image ids and label tags that are not plain names before anything is written."""

    def __init__(self, studies: str):
        super().__init__(
            studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        if image_id:  # empty: MONAI Label names the image after the uploaded file's base name
            plain_name(image_id, "image id")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        plain_name(label_tag, "label tag")
        return super().save_label(image_id, label_filename, label_tag, label_info)


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
