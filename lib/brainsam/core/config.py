"""Engine settings: one YAML per backbone/setting in configs/backbones, overridable by key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from brainsam.core.labels import CONFIGS
from brainsam.core.view import AXES

ANISOTROPY_LIMIT = 1.5
ANSWERS = ("segmenter", "atlases")


@dataclass
class EngineConfig:
    """How the engine runs. Every field can be set in YAML or overridden as a string.

    backbone: key of brainsam.modeling.backbones.BACKBONES. checkpoint: explicit weights file.
    checkpoint_dir: where downloaded weights are kept. device: torch device.
    axis: working axis for slices (sagittal, coronal, axial).
    fov_mm: side of the square field of view resampled to the encoder input.
    cache_mb: memory bound of the embedding cache. encode_batch: slices per encoder call.
    embedding_dir: folder where slice embeddings persist (brainsam.inference.store); None keeps them in
    memory only. embedding_disk_mb: bound of that folder, least recently used slices go first.
    precompute_mm: precomputation encodes the slices within this distance of the head's centre
    along the working axis (where deep structures lie, see `SliceView.central_slices`).
    stop_iou, min_area_px: where propagation decides a structure ended.
    box_margin_px: margin added round a mask's box when it prompts the next slice.
    agree_dice: a rerun after corrective clicks stops where it agrees this well with before.
    jump_dice: a walk ends where a slice's mask overlaps the previous slice's less than this
    (it jumped onto a neighbouring structure); a rerun toward the seed ends where it overlaps
    the earlier result less than this.
    feed_mask: feed the previous logits back as mask prompt.
    points_with_box: pass clicks as point prompts along with a box.
    seed_refinements: times the seed slice is re-prompted with the box of its own mask.
    extent_scale: scale of the structure's typical size when a click is grown into a box.
    walk_scale: how far (in typical sizes) propagation may go from a lone click.
    vote_radius_mm: how far from a corrective click the atlases' vote moves when it answers on
    its own (answer "atlases").
    answer: what answers where registered atlases are known: "segmenter" (the LoRA-SAM prompted
    by them, brainsam.inference.segmenter) or "atlases" (their vote alone, brainsam.inference.votes: an ablation).
    runtime: how the networks run (brainsam.core.runtime): auto, eager, compiled, eager+bf16 or
    compiled+bf16. compile_cache: folder where compiled code persists between processes (None:
    torch's default). interactive: never compile on a call, only in a warm-up (the server's
    click path).
    """

    backbone: str = "litemedsam"
    checkpoint: str | None = None
    checkpoint_dir: str = "~/.cache/brainsam"
    device: str = "cpu"
    axis: str = "sagittal"
    fov_mm: float = 160.0
    cache_mb: int = 2048
    encode_batch: int = 4
    embedding_dir: str | None = None
    embedding_disk_mb: int = 10240
    precompute_mm: float = 50.0
    stop_iou: float = 0.5
    min_area_px: int = 4
    box_margin_px: int = 2
    agree_dice: float = 0.9
    jump_dice: float = 0.3
    feed_mask: bool = False
    points_with_box: bool = False
    seed_refinements: int = 1
    extent_scale: float = 1.0
    walk_scale: float = 1.5
    vote_radius_mm: float = 3.0
    answer: str = "segmenter"
    runtime: str = "auto"
    compile_cache: str | None = None
    interactive: bool = False

    def __post_init__(self) -> None:
        if self.answer not in ANSWERS:
            raise ValueError(f"answer must be one of {', '.join(ANSWERS)}, got {self.answer!r}")

    def axis_for(self, spacing: tuple[float, float, float]) -> str:
        """The working axis for a volume: the configured one, unless voxels are strongly
        anisotropic, where slicing along the coarsest axis keeps full resolution in-plane."""
        coarsest = max(range(3), key=lambda a: spacing[a])
        if spacing[coarsest] > ANISOTROPY_LIMIT * min(spacing):
            return next(name for name, index in AXES.items() if index == coarsest)
        return self.axis

    def replace(self, **overrides: Any) -> "EngineConfig":
        """A copy with fields overridden; string values (from --conf) are converted to each field's type."""
        return with_overrides(self, overrides)


def with_overrides(settings: Any, overrides: dict[str, Any]) -> Any:
    """A copy of dataclass `settings` with fields overridden; string values (from --conf or a
    REST request) are converted to each field's type, other values must already be of it.
    Unknown keys raise KeyError; values of the wrong type TypeError or ValueError, naming the key."""
    fields = {f.name for f in dataclasses.fields(settings)}
    converted = {}
    for key, value in overrides.items():
        if key not in fields:
            raise KeyError(f"unknown setting {key!r}; known: {', '.join(sorted(fields))}")
        converted[key] = _convert(key, value, getattr(settings, key))
    return dataclasses.replace(settings, **converted)


def _convert(key: str, value: Any, current: Any) -> Any:
    """`value` for the field `key` whose current value is `current`: a string turned into the
    field's type, any other value checked against it (an int is a float, a list a tuple)."""
    if current is None:
        return None if value in ("", "none", "None") else value
    kind = type(current)
    if isinstance(value, str) and kind is not str:
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return yaml.safe_load(value) if kind in (dict, list, tuple) else kind(value)
        except (ValueError, yaml.YAMLError):
            raise ValueError(f"{key} must be {_kind_name(kind)}, got {value!r}") from None
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    fits = {
        bool: isinstance(value, bool),
        int: numeric and float(value).is_integer(),
        float: numeric,
        tuple: isinstance(value, (list, tuple)),
        list: isinstance(value, (list, tuple)),
    }.get(kind, isinstance(value, kind))
    if not fits:
        raise TypeError(f"{key} must be {_kind_name(kind)}, got {value!r}")
    return int(value) if kind is int else value


def _kind_name(kind: type) -> str:
    """How a setting's type reads in a message."""
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text", dict: "a mapping"}.get(
        kind, kind.__name__
    )


def read_yaml_config(kind: str, name_or_path: str) -> dict[str, Any]:
    """Values of configs/<kind>/<name>.yaml, or of a YAML file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIGS / kind / f"{name_or_path}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (CONFIGS / kind).glob("*.yaml"))
        raise FileNotFoundError(f"no {kind} config {path}; available: {', '.join(available)}")
    with open(path) as handle:
        return yaml.safe_load(handle) or {}


def load_config(name_or_path: str = "litemedsam", **overrides: Any) -> EngineConfig:
    """Read configs/backbones/<name>.yaml (or a YAML path) and apply overrides."""
    return EngineConfig().replace(**read_yaml_config("backbones", name_or_path)).replace(**overrides)
