"""Slice embeddings persisted on disk, so a first click on a precomputed image skips the encoder.

The second level behind the in-memory `EmbeddingCache`: one float16 `.npy` file per slice at

    <root>/<encoder>/<image content hash>/<axis>_<window>/<slice>.npy

where <encoder> is a digest of the predictor's identity (backbone + adapter), so embeddings made
with other weights are never read. Files are written to a temporary name and renamed, so readers
(the server and the precomputing subprocess share a store) never see half a file; one that fails
to read all the same is deleted and reported missing, to be encoded again. The bytes held are
bounded: the least recently used slices go first. Precomputation also records, per image file,
which slices it stored (`record`), so later runs skip that image without reading it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch

from brainsam.core.files import replaced_atomically
from brainsam.inference.cache import EmbeddingKey

logger = logging.getLogger(__name__)

LOW_WATER = 0.9
"""Eviction frees space down to this fraction of the bound; precomputation stops at it."""


class StoreFullError(RuntimeError):
    """The current encoder's embeddings fill the store: precomputing more would evict them."""


def digest(text: str) -> str:
    """A short, file-name-safe digest of `text`."""
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Create `path` through `write(handle)` on a temporary file in the same folder, then rename."""
    with replaced_atomically(path) as partial, partial.open("wb") as output:
        write(output)


class EmbeddingStore:
    """Slice embeddings under `root`, at most about `max_bytes` of them.

    The bound is kept per process from a running count, checked against the disk whenever it
    is crossed, so two processes writing at once may overshoot it briefly.
    """

    def __init__(self, root: str | Path, max_bytes: int):
        self.root = Path(root).expanduser()
        self.max_bytes = max_bytes
        self._bytes: int | None = None  # unknown until the first write

    def path(self, key: EmbeddingKey) -> Path:
        """The file of one slice embedding."""
        identity, content_hash, axis, index, window = key
        return self.root / digest(identity) / content_hash / "_".join(map(str, (axis, *window))) / f"{index:04d}.npy"

    def contains(self, key: EmbeddingKey) -> bool:
        """Whether the slice is stored (its file is not read)."""
        return self.path(key).is_file()

    def get(self, key: EmbeddingKey) -> torch.Tensor | None:
        """The stored float32 embedding (marking it recently used), or None when absent or damaged."""
        path = self.path(key)
        try:
            array = np.load(path, allow_pickle=False)
            if array.dtype != np.float16 or array.ndim != 3:
                raise ValueError(f"expected a float16 (C, H, W) array, got {array.dtype} {array.shape}")
            values = array.astype(np.float32)  # numpy converts and checks float32 fastest
            if not np.isfinite(values).all():
                raise ValueError("it holds values that are not finite")
            os.utime(path)
        except FileNotFoundError:
            return None
        except Exception as error:  # any damage (truncated, foreign, garbled): encode the slice again
            logger.warning("ignoring damaged embedding %s: %s", path, error)
            path.unlink(missing_ok=True)
            return None
        return torch.from_numpy(values)

    def put(self, key: EmbeddingKey, value: torch.Tensor) -> None:
        """Store an embedding as float16, evicting the least recently used beyond the bound. A
        failed write (disk full, read-only folder) is logged: the embedding is only not kept."""
        array = value.detach().cpu().to(torch.float16).numpy()
        if not np.isfinite(array).all():
            logger.warning("not storing slice %s: its embedding overflows float16", key[3])
            return
        try:
            write_atomic(self.path(key), lambda output: np.save(output, array, allow_pickle=False))
        except OSError as error:
            logger.warning("not storing slice %s: %s", key[3], error)
            return
        self._bytes = self.usage() if self._bytes is None else self._bytes + array.nbytes
        if self._bytes > self.max_bytes:
            self.evict()

    def usage(self, identity: str | None = None) -> int:
        """Bytes of embeddings on disk: all of them, or those of one encoder identity."""
        folder = self.root if identity is None else self.root / digest(identity)
        return sum(size for _, _, size in _files(folder))

    def evict(self) -> None:
        """Delete least recently used embeddings until the store holds LOW_WATER of its bound."""
        files = sorted(_files(self.root))
        total = sum(size for _, _, size in files)
        for _, path, size in files:
            if total <= LOW_WATER * self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
        self._bytes = total

    def check_room(self, identity: str) -> None:
        """Raise StoreFullError if `identity`'s embeddings already fill LOW_WATER of the bound."""
        used = self.usage(identity)
        if used >= LOW_WATER * self.max_bytes:
            raise StoreFullError(
                f"embedding store {self.root} holds {used >> 20} MB for this encoder, its bound is {self.max_bytes >> 20} MB"
            )

    def record(self, identity: str, source: str, keys: list[EmbeddingKey]) -> None:
        """Note that the slices `keys` of image file `source` (a name of its version) are stored."""
        files = [str(self.path(key).relative_to(self.root)) for key in keys]
        write_atomic(self._record_path(identity, source), lambda output: output.write(json.dumps(files).encode()))

    def recorded(self, identity: str, source: str) -> bool:
        """Whether every slice recorded for `source` under `identity` is still stored."""
        try:
            files = json.loads(self._record_path(identity, source).read_text())
            return all((self.root / name).is_file() for name in files)
        except (OSError, ValueError, TypeError):  # absent or damaged record: the image is checked again
            return False

    def _record_path(self, identity: str, source: str) -> Path:
        return self.root / digest(identity) / "images" / f"{digest(source)}.json"


def _files(folder: Path) -> list[tuple[float, Path, int]]:
    """(modification time, path, size) of every embedding file under `folder`."""
    found = []
    for path in folder.rglob("*.npy"):
        try:
            stat = path.stat()
        except FileNotFoundError:  # evicted by another process meanwhile
            continue
        found.append((stat.st_mtime, path, stat.st_size))
    return found
