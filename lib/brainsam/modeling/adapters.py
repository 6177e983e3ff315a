"""Adapter files: the trained weights only (safetensors) with a manifest saying what they fit.

The manifest travels inside the safetensors header, so one atomic rename publishes weights
and manifest together; a JSON copy beside it is for people. Loading checks the manifest
against the running backbone and refuses an adapter made for another one, and checks the
weights against the checksum written with them (safetensors has none: damaged weights would
otherwise load silently).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from brainsam.core.files import replaced_atomically
from brainsam.modeling.backbones import Backbone
from brainsam.modeling.lora import LoraSettings, add_lora, trainable_state

FORMAT_VERSION = 2
"""2: the prompt encoder takes brainsam's dense prompt (backbones.DENSE_CHANNELS); adapters of 1 do not fit."""
MANIFEST_KEY = "brainsam_manifest"
CHECKSUM_KEY = "brainsam_weights_sha256"


class AdapterError(RuntimeError):
    """An adapter file that cannot be used with this backbone; the message says why."""


ADAPTER_PATTERN = "*.safetensors"
"""Adapter files in a folder of published adapters."""


def newest_adapter(folder: Path) -> Path | None:
    """The most recently published adapter in `folder` (by modification time), or None."""
    adapters = list(folder.glob(ADAPTER_PATTERN))
    return max(adapters, key=lambda p: p.stat().st_mtime_ns) if adapters else None


def build_manifest(
    backbone: Backbone,
    settings: LoraSettings,
    labels: list[str],
    training: dict[str, Any] | None = None,
    validation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What an adapter fits and how it was made: backbone and checksum, LoRA settings, label set,
    training data summary, validation metrics, creation time."""
    return {
        "format_version": FORMAT_VERSION,
        "backbone": backbone.name,
        "backbone_sha256": backbone.weights_sha256,
        "lora": settings.to_dict(),
        "labels": list(labels),
        "training": training or {},
        "validation": validation or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save_adapter(backbone: Backbone, manifest: dict[str, Any], path: str | Path) -> Path:
    """Write the trainable weights and manifest to `path` (.safetensors) atomically, plus `path`.json."""
    path = Path(path)
    text = json.dumps(manifest, indent=2, sort_keys=True)
    weights = trainable_state(backbone)
    with replaced_atomically(path) as partial:
        save_file(weights, str(partial), metadata={MANIFEST_KEY: text, CHECKSUM_KEY: weights_sha256(weights)})
    path.with_suffix(".json").write_text(text + "\n")
    return path


def weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    """Checksum of named tensors: names and raw bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an adapter file's header; AdapterError if it holds no brainsam manifest."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise AdapterError(f"{path} is not a readable brainsam adapter: {error}") from error
    if MANIFEST_KEY not in metadata:
        raise AdapterError(f"{path} is not a readable brainsam adapter: it holds no {MANIFEST_KEY}")
    return metadata


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest stored inside an adapter file; AdapterError if the file is not a valid adapter."""
    try:
        return json.loads(read_metadata(path)[MANIFEST_KEY])
    except ValueError as error:
        raise AdapterError(f"{path} is not a readable brainsam adapter: {error}") from error


def check_compatible(manifest: dict[str, Any], backbone: Backbone, path: str | Path) -> None:
    """Refuse an adapter trained on another backbone or other base weights."""
    if manifest.get("format_version") != FORMAT_VERSION:
        raise AdapterError(
            f"{path} has adapter format {manifest.get('format_version')}, this brainsam reads {FORMAT_VERSION}"
        )
    if manifest.get("backbone") != backbone.name or manifest.get("backbone_sha256") != backbone.weights_sha256:
        raise AdapterError(
            f"{path} was trained for backbone {manifest.get('backbone')} "
            f"(weights sha256 {str(manifest.get('backbone_sha256'))[:12]}...), but this model runs "
            f"{backbone.name} (weights sha256 {backbone.weights_sha256[:12]}...)"
        )


def lora_settings_of(manifest: dict[str, Any], path: str | Path) -> LoraSettings:
    """The LoRA settings an adapter was made with; AdapterError if its manifest is malformed."""
    try:
        lora = dict(manifest["lora"])
        lora["blocks"] = None if lora.get("blocks") is None else tuple(lora["blocks"])
        lora["target_modules"] = tuple(lora.get("target_modules", ()))
        return LoraSettings(**lora)
    except (KeyError, TypeError, ValueError) as error:
        raise AdapterError(f"{path} has a malformed manifest (lora settings): {error!r}") from error


def load_adapter(backbone: Backbone, path: str | Path) -> dict[str, Any]:
    """Inject the adapter's LoRA layers into a fresh `backbone` and load its weights; return the manifest."""
    manifest = read_manifest(path)
    check_compatible(manifest, backbone, path)
    add_lora(backbone, lora_settings_of(manifest, path))
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise AdapterError(f"{path} is damaged: {error}") from error
    checksum = read_metadata(path).get(CHECKSUM_KEY)  # absent in adapters written before it was added
    if checksum is not None and weights_sha256(weights) != checksum:
        raise AdapterError(f"{path} is damaged: its weights do not match the checksum written when it was published")
    expected = set(trainable_state(backbone))
    if set(weights) != expected:
        raise AdapterError(
            f"{path} holds other weights than its manifest describes ({len(weights)} tensors, expected {len(expected)})"
        )
    try:
        backbone.load_state_dict(weights, strict=False)
    except RuntimeError as error:
        raise AdapterError(f"{path} does not fit this backbone: {error}") from error
    return manifest
