"""Training settings (configs/training/<name>.yaml) and what a run reports."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brainsam.core.config import read_yaml_config, with_overrides
from brainsam.modeling.lora import LoraSettings


@dataclass
class TrainSettings:
    """One training setting (configs/training/<name>.yaml); every field can be overridden.

    engine_config: the backbone config it trains (configs/backbones). lora: LoraSettings fields.
    learning_rate, weight_decay: AdamW. warmup_iterations: linear ramp from zero.
    schedule: decay after warm-up, cosine or poly. iterations: optimisation steps.
    max_minutes: time budget of the whole run (registrations, encoding, steps, validation).
    slab: a step decodes the slices this far either side of a random one of a structure's.
    click_rounds: most corrective-click rounds after the first answer in a step.
    first_click: how often a step's first answer has the robot's first click.
    shift, shift_slices, shift_pixels: how often, and by how much at most, a step's prior is
    moved (a poorer registration). atlases: most labelled subjects registered onto each one.
    validate_every: steps between validations. validation_fraction: held-out share of subjects.
    publish_if_better: publish only an adapter that beats where training started (else the last
    one). seed: of every random draw.
    """

    engine_config: str = "litemedsam"
    lora: dict[str, Any] = dataclasses.field(default_factory=dict)
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    warmup_iterations: int = 50
    schedule: str = "cosine"
    iterations: int = 1000
    max_minutes: float = 28.0
    slab: int = 3
    click_rounds: int = 2
    first_click: float = 0.7
    shift: float = 0.3
    shift_slices: int = 1
    shift_pixels: int = 4
    atlases: int = 5
    validate_every: int = 250
    validation_fraction: float = 0.2
    publish_if_better: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        """ValueError naming every setting out of its range (checked before a run starts)."""
        problems = [
            f"{name} must be {rule}, got {getattr(self, name)!r}" for name, rule, ok in self._ranges() if not ok
        ]
        try:
            self.lora_settings()
        except TypeError as error:
            problems.append(f"lora: {error}")
        if problems:
            raise ValueError("; ".join(problems))

    def _ranges(self) -> list[tuple[str, str, bool]]:
        """(setting, its range in words, whether the value is in it)."""
        return [
            ("learning_rate", ">= 0", self.learning_rate >= 0),
            ("weight_decay", ">= 0", self.weight_decay >= 0),
            ("warmup_iterations", ">= 0", self.warmup_iterations >= 0),
            ("schedule", "cosine or poly", self.schedule in ("cosine", "poly")),
            ("iterations", ">= 0", self.iterations >= 0),
            ("max_minutes", "> 0", self.max_minutes > 0),
            ("slab", ">= 0", self.slab >= 0),
            ("click_rounds", ">= 0", self.click_rounds >= 0),
            ("first_click", "within 0..1", 0.0 <= self.first_click <= 1.0),
            ("shift", "within 0..1", 0.0 <= self.shift <= 1.0),
            ("shift_slices", ">= 0", self.shift_slices >= 0),
            ("shift_pixels", ">= 0", self.shift_pixels >= 0),
            ("atlases", ">= 1", self.atlases >= 1),
            ("validate_every", ">= 1", self.validate_every >= 1),
            ("validation_fraction", "0 or more and below 1", 0.0 <= self.validation_fraction < 1.0),
        ]

    def lora_settings(self) -> LoraSettings:
        values = dict(self.lora)
        if values.get("blocks") is not None:
            values["blocks"] = tuple(values["blocks"])
        return LoraSettings(**values)


@dataclass
class TrainResult:
    """What a run did. published: the adapter written, or None when none beat the baseline."""

    published: Path | None
    baseline: dict[str, float]
    best: dict[str, float]
    iterations: int
    seconds: float
    trainable_parameters: int
    total_parameters: int


def load_train_settings(name_or_path: str = "litemedsam", **overrides: Any) -> TrainSettings:
    """Read configs/training/<name>.yaml (or a YAML path) and apply overrides."""
    settings = with_overrides(TrainSettings(), read_yaml_config("training", name_or_path))
    return with_overrides(settings, overrides)
