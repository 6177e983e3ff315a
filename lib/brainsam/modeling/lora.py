"""LoRA on the image encoder's attention (through peft), and which weights train.

The method: freeze the image encoder, learn low-rank updates of its attention `qkv`
projections, and fine-tune the prompt encoder and mask decoder (or, optionally, LoRA on the
decoder's attention too instead of full fine-tuning).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from brainsam.modeling.backbones import Backbone

DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters.

    rank, alpha, dropout: as in the LoRA paper. blocks: indices of the encoder attention blocks
    to adapt, in network order (None: all). decoder_lora: adapt the mask decoder's attention with
    LoRA and freeze its other weights, instead of training it whole.
    """

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    blocks: tuple[int, ...] | None = None
    decoder_lora: bool = False
    target_modules: tuple[str, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict:
        return asdict(self)


def attention_modules(module: torch.nn.Module, suffix: str = "attn.qkv") -> list[str]:
    """Names of the encoder's attention projections, in network order."""
    return [name for name, _ in module.named_modules() if name.endswith(suffix)]


def add_lora(backbone: Backbone, settings: LoraSettings) -> LoraSettings:
    """Inject LoRA layers into `backbone` in place and set which parameters train.

    Returns the settings with `target_modules` filled in (the adapted module names).
    """
    names = attention_modules(backbone.image_encoder)
    if settings.blocks is not None:
        unknown = [b for b in settings.blocks if not 0 <= b < len(names)]
        if unknown:
            raise ValueError(f"lora blocks {unknown} do not exist; the encoder has {len(names)} attention blocks")
        names = [names[b] for b in settings.blocks]
    if names:  # no block: the encoder stays as it is, only the prompt encoder and decoder train
        inject_adapter_in_model(
            LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=names),
            backbone.image_encoder,
        )
    if settings.decoder_lora:
        decoder_names = [n for n, _ in backbone.mask_decoder.named_modules() if n.split(".")[-1] in DECODER_TARGETS]
        inject_adapter_in_model(
            LoraConfig(
                r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=decoder_names
            ),
            backbone.mask_decoder,
        )
    for name, parameter in backbone.named_parameters():
        parameter.requires_grad = _trains(name, settings.decoder_lora)
    return replace(settings, target_modules=tuple(names))


def _trains(name: str, decoder_lora: bool) -> bool:
    """Whether parameter `name` is trained: LoRA weights always, prompt encoder always,
    mask decoder unless it is itself LoRA-adapted."""
    if "lora_" in name:
        return True
    if name.startswith("prompt_encoder."):
        return True
    return name.startswith("mask_decoder.") and not decoder_lora


def trainable_state(backbone: Backbone) -> dict[str, torch.Tensor]:
    """The trained parameters by name, exactly what an adapter file stores: a copy, so that the
    best state of a run stays as it was while training goes on (`.cpu()` of a CPU tensor is the
    tensor itself)."""
    return {
        name: p.detach().to("cpu", copy=True).contiguous() for name, p in backbone.named_parameters() if p.requires_grad
    }


def merge_lora(backbone: Backbone) -> int:
    """Fold every LoRA update into the weight it adapts and put the plain layer back, in place,
    for inference: the same answers (to float rounding), no extra products per call, and the
    base network's structure, so one compiled graph (brainsam.core.runtime) serves the base model
    and every adapter. Returns how many layers were merged; the backbone no longer trains."""
    merged = 0
    for name, module in list(backbone.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent), child, module.get_base_layer())
            merged += 1
    return merged


def count_parameters(backbone: Backbone) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in backbone.parameters())
