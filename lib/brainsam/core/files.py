"""Files that appear whole or not at all: written under a temporary name, then renamed."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TEMPORARY_MARK = ".tmp"
"""In every temporary name (before the target's suffix, which writers such as SimpleITK and numpy
read the format from)."""


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temporary path in `path`'s folder (created if needed) for the block to write; renamed onto
    `path` when the block ends, removed when it raises. Readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_MARK + suffix)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
