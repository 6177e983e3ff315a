"""Pretrained checkpoints: where each comes from and how it is verified before use.

Three sources, tried in order: a file the user configured, a file shipped inside an installed
package, and an official download URL. Every file is checked (full SHA-256, or the MD5 prefix
that Meta puts in SAM file names) before torch reads it.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from brainsam.core.files import replaced_atomically

logger = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    """A checkpoint that cannot be found, fetched or verified; the message says how to fix it."""


@dataclass(frozen=True)
class WeightsSource:
    """Where a checkpoint can come from and the digest it must have.

    file_name: name of the checkpoint file.
    package: an installed package shipping the file as package data, if any.
    url: official download address, if any.
    sha256: full SHA-256 digest, if published.
    md5_prefix: leading hex digits of the MD5 digest (SAM names its files by it), if published.
    """

    file_name: str
    package: str | None = None
    url: str | None = None
    sha256: str | None = None
    md5_prefix: str | None = None


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, source: WeightsSource) -> str:
    """Check a checkpoint against its published digest; return its SHA-256.

    Raises WeightsError naming the file when the digest differs.
    """
    sha256 = file_digest(path, "sha256")
    if source.sha256 and sha256 != source.sha256:
        raise WeightsError(
            f"{path} has SHA-256 {sha256}, expected {source.sha256}: the file is damaged or not {source.file_name}"
        )
    if source.md5_prefix and not file_digest(path, "md5").startswith(source.md5_prefix):
        raise WeightsError(
            f"{path} does not match the MD5 prefix {source.md5_prefix} of {source.file_name}: the file is damaged or another checkpoint"
        )
    return sha256


def _packaged(source: WeightsSource) -> Path | None:
    """Path of the checkpoint inside its installed package, or None when not installed."""
    if not source.package:
        return None
    try:
        resource = importlib.resources.files(source.package).joinpath(source.file_name)
    except ModuleNotFoundError:
        return None
    path = Path(str(resource))
    return path if path.is_file() else None


def _download(url: str, destination: Path) -> None:
    """Fetch `url` into `destination` through a temporary file renamed into place when complete."""
    logger.info("downloading %s to %s", url, destination)
    with replaced_atomically(destination) as partial:
        urllib.request.urlretrieve(url, partial)


def resolve(
    source: WeightsSource, checkpoint: str | None, checkpoint_dir: str | Path, config_key: str
) -> tuple[Path, str]:
    """Find, fetch if needed, and verify a checkpoint; return (path, sha256).

    checkpoint: explicit file path from the configuration (`config_key`), or None.
    checkpoint_dir: folder where downloaded checkpoints are kept.
    """
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise WeightsError(f"{config_key}={checkpoint}: no such file")
        return path, verify(path, source)
    packaged = _packaged(source)
    if packaged is not None:
        return packaged, verify(packaged, source)
    path = Path(checkpoint_dir).expanduser() / source.file_name
    if not path.is_file():
        if not source.url:
            raise WeightsError(
                f"{source.file_name} not found in {path.parent}; download it yourself and set {config_key} to its path"
            )
        try:
            _download(source.url, path)
        except OSError as error:
            raise WeightsError(
                f"could not download {source.file_name} from {source.url} ({error}); "
                f"download it yourself and set {config_key} to its path, or place it in {path.parent}"
            ) from error
    return path, verify(path, source)
