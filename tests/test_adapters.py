"""LoRA injection, adapter files and their manifests, and checkpoint verification."""

from __future__ import annotations

import json

import pytest
import torch

from brainsam.modeling.adapters import (
    AdapterError,
    build_manifest,
    load_adapter,
    read_manifest,
    save_adapter,
)
from brainsam.modeling.backbones import BACKBONES, load_backbone
from brainsam.modeling.lora import (
    LoraSettings,
    add_lora,
    count_parameters,
    trainable_state,
)
from brainsam.modeling.weights import WeightsError, WeightsSource, resolve, verify


def decode_once(backbone, embedding: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        logits, _ = backbone.decode(embedding, box=torch.tensor([60.0, 60.0, 160.0, 170.0]))
    return logits


@pytest.fixture(scope="module")
def crop() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(1, 256, 256, generator=generator)


def test_lora_starts_as_identity_and_trains_only_adapters(crop: torch.Tensor) -> None:
    backbone = load_backbone("litemedsam")
    with torch.inference_mode():
        before = backbone.encode(crop)
    settings = add_lora(backbone, LoraSettings(rank=4, alpha=8, blocks=(0, 2)))
    assert len(settings.target_modules) == 2 and all(name.endswith("attn.qkv") for name in settings.target_modules)
    with torch.inference_mode():
        after = backbone.encode(crop)
    torch.testing.assert_close(before, after)  # LoRA's B matrix starts at zero
    trainable, total = count_parameters(backbone)
    names = list(trainable_state(backbone))
    assert any("lora_A" in n for n in names) and any(n.startswith("mask_decoder.") for n in names)
    assert not any(n.startswith("image_encoder.") and "lora_" not in n for n in names)
    assert 0 < trainable < total


def test_trainable_state_is_a_copy_training_does_not_change() -> None:
    backbone = load_backbone("litemedsam")
    add_lora(backbone, LoraSettings(rank=4, alpha=8))
    best = trainable_state(backbone)
    with torch.no_grad():  # training goes on after the best validation
        for parameter in backbone.parameters():
            if parameter.requires_grad:
                parameter.add_(1.0)
    later = trainable_state(backbone)
    assert all(torch.equal(later[name], best[name] + 1.0) for name in best)


def test_adapter_round_trip_restores_outputs_and_manifest(tmp_path, crop: torch.Tensor) -> None:
    trained = load_backbone("litemedsam")
    settings = add_lora(trained, LoraSettings(rank=4, alpha=8))
    with torch.no_grad():
        for parameter in trained.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01 * torch.randn_like(parameter))
    manifest = build_manifest(trained, settings, ["Left-Thalamus"], training={"images": 2}, validation={"dice": 0.5})
    path = save_adapter(trained, manifest, tmp_path / "adapter.safetensors")
    assert json.loads(path.with_suffix(".json").read_text()) == read_manifest(path)
    stored = read_manifest(path)
    for key in ("backbone", "backbone_sha256", "lora", "labels", "training", "validation", "created"):
        assert key in stored
    assert stored["backbone_sha256"] == BACKBONES["litemedsam"].weights.sha256
    # only trainable weights: far smaller than the 39 MB checkpoint's encoder
    encoder_bytes = sum(p.numel() * 4 for p in trained.image_encoder.parameters())
    assert path.stat().st_size < encoder_bytes

    fresh = load_backbone("litemedsam")
    load_adapter(fresh, path)
    with torch.inference_mode():
        expected, actual = trained.encode(crop), fresh.encode(crop)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(decode_once(fresh, actual[0]), decode_once(trained, expected[0]))


def test_adapter_for_another_backbone_is_refused(tmp_path) -> None:
    backbone = load_backbone("litemedsam")
    settings = add_lora(backbone, LoraSettings(rank=2))
    manifest = build_manifest(backbone, settings, [])
    path = save_adapter(backbone, {**manifest, "backbone": "sam_vit_b"}, tmp_path / "vitb.safetensors")
    with pytest.raises(AdapterError, match="trained for backbone sam_vit_b"):
        load_adapter(load_backbone("litemedsam"), path)
    other = save_adapter(backbone, {**manifest, "backbone_sha256": "0" * 64}, tmp_path / "other.safetensors")
    with pytest.raises(AdapterError, match="weights sha256"):
        load_adapter(load_backbone("litemedsam"), other)


def test_damaged_adapter_files_are_refused(tmp_path) -> None:
    backbone = load_backbone("litemedsam")
    settings = add_lora(backbone, LoraSettings(rank=2))
    path = save_adapter(backbone, build_manifest(backbone, settings, []), tmp_path / "a.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError):
        load_adapter(load_backbone("litemedsam"), path)
    zeroed = bytearray(data)
    zeroed[len(data) // 2 : len(data) // 2 + 4096] = bytes(
        4096
    )  # weights damaged, header intact: loads without the checksum
    path.write_bytes(bytes(zeroed))
    with pytest.raises(AdapterError, match="checksum"):
        load_adapter(load_backbone("litemedsam"), path)
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not an adapter")
    with pytest.raises(AdapterError, match="not a readable brainsam adapter"):
        read_manifest(junk)


def test_checkpoint_digest_mismatch_names_the_file(tmp_path) -> None:
    fake = tmp_path / "sam_vit_b_01ec64.pth"
    fake.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="MD5 prefix 01ec64"):
        verify(fake, BACKBONES["sam_vit_b"].weights)
    with pytest.raises(WeightsError, match="checkpoint=.*no such file"):
        resolve(BACKBONES["sam_vit_b"].weights, str(tmp_path / "missing.pth"), tmp_path, "checkpoint")


def test_failed_download_names_file_url_and_setting(tmp_path) -> None:
    # port 9 (discard) on loopback refuses at once: a real failed fetch, no internet needed
    source = WeightsSource("sam_vit_b_01ec64.pth", url="http://127.0.0.1:9/sam_vit_b_01ec64.pth", md5_prefix="01ec64")
    with pytest.raises(WeightsError) as error:
        resolve(source, None, tmp_path, "checkpoint")
    message = str(error.value)
    assert "sam_vit_b_01ec64.pth" in message and "http://127.0.0.1:9/" in message and "checkpoint" in message
    assert not list(tmp_path.iterdir())  # no partial file left behind


def test_user_provided_medsam_checkpoint_is_required(tmp_path) -> None:
    with pytest.raises(WeightsError, match="medsam_vit_b.pth not found.*set checkpoint"):
        load_backbone("medsam_vit_b", checkpoint_dir=str(tmp_path))


def test_vit_b_checkpoint_from_the_user_runs_through_the_same_interface(tmp_path) -> None:
    """The paper-setting architecture (SAM ViT-B at 1024) behind the same encode/decode calls.

    Random weights stand in for the user's medsam_vit_b.pth: the file path, loading, input size
    and output shapes are what is under test, not accuracy.
    """
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    checkpoint = tmp_path / "medsam_vit_b.pth"
    torch.save(sam_model_registry["vit_b"]().state_dict(), checkpoint)
    backbone = load_backbone("medsam_vit_b", checkpoint=str(checkpoint))
    assert backbone.input_size == 1024
    with torch.inference_mode():
        embedding = backbone.encode(torch.rand(1, 1024, 1024))
        logits, iou = backbone.decode(embedding[0], box=torch.tensor([100.0, 100.0, 400.0, 500.0]), multimask=True)
    assert embedding.shape == (1, 256, 64, 64)
    assert logits.shape == (3, 256, 256) and iou.shape == (3,)
    settings = add_lora(backbone, LoraSettings(rank=4))
    assert len(settings.target_modules) == 12  # one qkv per ViT-B block


def test_malformed_manifest_is_an_adapter_error(tmp_path) -> None:
    backbone = load_backbone("litemedsam")
    settings = add_lora(backbone, LoraSettings(rank=2))
    manifest = build_manifest(backbone, settings, [])
    for broken in (
        {k: v for k, v in manifest.items() if k != "lora"},
        {**manifest, "lora": {"rank": 2, "colour": "red"}},
    ):
        path = save_adapter(backbone, broken, tmp_path / "broken.safetensors")
        with pytest.raises(AdapterError, match="malformed manifest"):
            load_adapter(load_backbone("litemedsam"), path)
