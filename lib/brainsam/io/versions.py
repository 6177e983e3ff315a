"""Earlier versions of saved labels: a label a save or a delete replaces is kept, and can be restored.

    <folder>/<tag>/<image id>/<version><extension>      the label file as it was
    <folder>/<tag>/<image id>/<version>.json            what the datastore said of it (its info)

A version is named after the moment it stopped being current (UTC, microseconds, so names sort
in time), with the replaced file's own extension; its info says how to read its values (Slicer's
`label_info`). Versions are copied in atomically, never changed, and removed only by hand.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from brainsam.core.files import replaced_atomically


@dataclass(frozen=True)
class Version:
    """One kept label: its name (what restore takes), when it was replaced, and its size."""

    version: str
    replaced: str
    bytes: int


class LabelVersions:
    """The versions kept under `folder` (e.g. the studies folder's labels/.versions)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def keep(self, tag: str, image_id: str, current: Path, info: dict[str, Any]) -> str:
        """Copy the label file `current`, with its datastore `info`, in as a new version of
        (`tag`, `image_id`); return its name."""
        version = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        extension = "".join(current.suffixes[-2:]) if current.name.endswith(".nii.gz") else current.suffix
        folder = self.folder / tag / image_id
        while (folder / f"{version}{extension}").exists():  # two saves within a microsecond
            version += "-"
        with replaced_atomically(folder / f"{version}.json") as temporary:
            temporary.write_text(json.dumps(info, default=str))
        with replaced_atomically(folder / f"{version}{extension}") as temporary:
            shutil.copyfile(current, temporary)
        return version

    def listed(self, tag: str, image_id: str) -> list[Version]:
        """The versions of (`tag`, `image_id`), oldest first."""
        folder = self.folder / tag / image_id
        files = sorted(p for p in folder.glob("*") if is_label(p)) if folder.is_dir() else []
        return [Version(version_of(p), replaced_at(version_of(p)), p.stat().st_size) for p in files]

    def path(self, tag: str, image_id: str, version: str) -> Path:
        """The file of one version; KeyError naming the versions there are when it does not exist."""
        for path in (self.folder / tag / image_id).glob(f"{version}.*"):
            if version_of(path) == version and is_label(path):
                return path
        known = [v.version for v in self.listed(tag, image_id)]
        raise KeyError(
            f"no version {version!r} of the {tag} label of {image_id}; versions: {', '.join(known) or 'none'}"
        )

    def info(self, tag: str, image_id: str, version: str) -> dict[str, Any]:
        """What the datastore said of a version's label ({} when that was not kept)."""
        try:
            return json.loads((self.folder / tag / image_id / f"{version}.json").read_text())
        except (OSError, ValueError):
            return {}


def is_label(path: Path) -> bool:
    """Whether a file of a version folder is a kept label (not its info, nor a temporary file)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix != ".json"


def version_of(path: Path) -> str:
    """The version name of a kept file (its name without the extension)."""
    return path.name.split(".", 1)[0]


def replaced_at(version: str) -> str:
    """When version `version` was replaced, as ISO 8601 UTC."""
    stamp = datetime.strptime(version.rstrip("-"), "%Y%m%dT%H%M%S%fZ").replace(tzinfo=timezone.utc)
    return stamp.isoformat(timespec="seconds")
