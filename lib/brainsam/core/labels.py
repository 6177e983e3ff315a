"""Label sets: structure names, ids, colours and size priors, read from YAML in configs/labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
DEFAULT_LABEL_SET = CONFIGS / "labels" / "freesurfer_subcortical.yaml"


@dataclass(frozen=True)
class Structure:
    """One structure of a label set.

    name: FreeSurfer LUT name (what clients send as `label`).
    id: value written in multi-label volumes.
    color: RGB 0-255 for viewers.
    extent_mm: typical bounding-box size along R, A, S in mm, the prior a click is grown with.
    """

    name: str
    id: int
    color: tuple[int, int, int]
    extent_mm: tuple[float, float, float]


@dataclass(frozen=True)
class LabelSet:
    """An ordered set of structures, looked up by name."""

    name: str
    structures: tuple[Structure, ...]
    default_extent_mm: tuple[float, float, float]

    def __getitem__(self, name: str) -> Structure:
        for structure in self.structures:
            if structure.name.lower() == name.lower():
                return structure
        raise KeyError(f"unknown label {name!r}; this label set ({self.name}) has: {', '.join(self.names)}")

    def __contains__(self, name: str) -> bool:
        return any(structure.name.lower() == name.lower() for structure in self.structures)

    @property
    def names(self) -> list[str]:
        return [structure.name for structure in self.structures]


def load_label_set(path: str | Path = DEFAULT_LABEL_SET) -> LabelSet:
    """Read a label set YAML (see configs/labels/freesurfer_subcortical.yaml for the format)."""
    with open(path) as handle:
        raw = yaml.safe_load(handle)
    default_extent = tuple(float(v) for v in raw.get("default_extent_mm", (20, 20, 20)))
    structures = tuple(
        Structure(
            name=entry["name"],
            id=int(entry["id"]),
            color=tuple(int(c) for c in entry.get("color", (255, 0, 0))),
            extent_mm=tuple(float(v) for v in entry.get("extent_mm", default_extent)),
        )
        for entry in raw["labels"]
    )
    return LabelSet(name=raw.get("name", Path(path).stem), structures=structures, default_extent_mm=default_extent)


def load_mapping(path: str | Path) -> dict[str, int]:
    """Read a label mapping YAML: structure name -> id used by a data set's label files."""
    with open(path) as handle:
        raw = yaml.safe_load(handle)
    return {name: int(value) for name, value in raw["ids"].items()}
