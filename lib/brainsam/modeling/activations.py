"""The image encoder split where training starts to change it.

Everything below the first adapted (trainable) stage is frozen, so what it produces for a
training slice never changes: it is computed once and cached, and each training step runs, and
backpropagates through, only the stages from the first adapted one up.
"""

from __future__ import annotations

import torch

from brainsam.modeling.backbones import Backbone, Stage


class SplitEncoder:
    """A backbone's image encoder as a frozen lower part and a trained upper part."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        stages = backbone.encoder_stages()
        self.first_trained = first_trained_stage(stages, trained_module_names(backbone))
        self.lower, self.upper = stages[: self.first_trained], stages[self.first_trained :]

    @torch.no_grad()
    def below(self, crops: torch.Tensor) -> torch.Tensor:
        """Grey [0, 1] crops (B, S, S) -> activations entering the first trained stage (on CPU)."""
        x = self.backbone.encoder_input(crops)
        for _, stage in self.lower:
            x = stage(x)
        return x.cpu()

    def above(self, activations: torch.Tensor) -> torch.Tensor:
        """Cached activations (B, ...) -> image embeddings (B, 256, 64, 64), with gradients."""
        x = activations.to(self.backbone.device)
        for _, stage in self.upper:
            x = stage(x)
        return x

    @property
    def trained_stage_names(self) -> list[str]:
        return [name for name, _ in self.upper]


def trained_module_names(backbone: Backbone) -> list[str]:
    """Encoder modules (paths inside the encoder) that own a trainable parameter."""
    return sorted({name.rsplit(".", 1)[0] for name, p in backbone.image_encoder.named_parameters() if p.requires_grad})


def first_trained_stage(stages: list[Stage], trained: list[str]) -> int:
    """Index of the first stage holding a trained module; len(stages) when the encoder is frozen."""
    for index, (name, _) in enumerate(stages):
        if any(module == name or module.startswith(name + ".") for module in trained):
            return index
    return len(stages)
