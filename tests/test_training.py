"""Training: the split encoder, prompt simulation, augmentation, schedule, and short real runs.

The runs use two or three real FreeSurfer subjects and a handful of steps: they check what a
run produces and publishes, not how accurate it gets (that is the benchmark in the README).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch
from segment_anything.modeling import ImageEncoderViT

from brainsam.activations import SplitEncoder, first_trained_stage
from brainsam.adapters import read_manifest
from brainsam.backbones import BACKBONES, load_backbone
from brainsam.config import load_config
from brainsam.engine import Engine
from brainsam.labels import load_label_set, load_mapping
from brainsam.lora import LoraSettings, add_lora
from brainsam.simulation import Prompt, corrective_click, jittered_box, mask_box, prior_sized_box
from brainsam.train import LearningRate, load_train_settings, split_subjects, subjects_in, train_and_publish
from brainsam.trainset import Augmentation, augment, mirrored_ids, read_labels
from brainsam.volume import VolumeError

from .conftest import require_data

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = dict(slices_per_subject=2, validation_slices_per_subject=2, iterations=3, validate_every=3, warmup_iterations=1)


def test_encoder_stages_compose_to_the_encoder() -> None:
    backbone = load_backbone("litemedsam")
    x = backbone.encoder_input(torch.rand(1, 256, 256))
    with torch.no_grad():
        y = x
        for _, stage in backbone.encoder_stages():
            y = stage(y)
        torch.testing.assert_close(y, backbone.image_encoder(x))


def test_vit_stages_compose_to_the_encoder() -> None:
    encoder = ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, out_chans=8, window_size=2, global_attn_indexes=(1,))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        y = x
        for _, stage in BACKBONES["sam_vit_b"].stages(encoder):
            y = stage(y)
        torch.testing.assert_close(y, encoder(x))


def test_split_encoder_caches_below_the_first_adapted_block() -> None:
    backbone = load_backbone("litemedsam")
    add_lora(backbone, LoraSettings(blocks=(8, 9)))
    split = SplitEncoder(backbone)
    assert split.trained_stage_names[0] == "layers.3.blocks.0"
    crops = torch.rand(1, 256, 256)
    with torch.no_grad():
        # fresh LoRA is the identity, so lower + upper equals the whole encoder
        torch.testing.assert_close(split.above(split.below(crops)), backbone.encode(crops))
    assert first_trained_stage(backbone.encoder_stages(), []) == len(backbone.encoder_stages())


def test_simulated_prompts_hold_the_structure() -> None:
    truth = np.zeros((64, 64), dtype=bool)
    truth[20:30, 10:40] = True
    rng = np.random.default_rng(0)
    x0, y0, x1, y1 = mask_box(truth)
    assert (x0, y0, x1, y1) == (10, 20, 40, 30)
    for _ in range(20):
        bx0, by0, bx1, by1 = jittered_box(truth, rng, shift_px=0.0)
        assert bx0 <= x0 and by0 <= y0 and bx1 >= x1 and by1 >= y1
    px0, py0, px1, py1 = prior_sized_box(truth, (3.0, 4.0), rng, shift_px=0.0)
    assert (px1 - px0, py1 - py0) == (9.0, 7.0)
    spill = truth.copy()
    spill[40:50, 40:50] = True
    point, label = corrective_click(truth, spill)
    assert label == 0 and spill[tuple(point)] and not truth[tuple(point)]
    assert corrective_click(truth, truth) is None
    prompt = Prompt(np.array([0, 0, 8, 8], dtype=np.float32)).with_click(np.array([2, 3]), 1)
    model = prompt.for_model(4.0)
    assert model["points"].tolist() == [[13.5, 9.5]] and model["box"].tolist() == [0, 0, 32, 32]


def test_mirror_swaps_left_and_right() -> None:
    ids = load_mapping(ROOT / "configs" / "mappings" / "aseg.yaml")
    mirrored = mirrored_ids(ids)
    assert mirrored["Left-Putamen"] == ids["Right-Putamen"] and mirrored["Right-Putamen"] == ids["Left-Putamen"]
    assert mirrored["Brain-Stem"] == ids["Brain-Stem"]


def test_augmentation_moves_image_and_masks_together() -> None:
    crop = torch.zeros(64, 64)
    crop[20:40, 24:36] = 1.0
    masks = (crop > 0.5)[None]
    for seed in range(5):
        settings = Augmentation(rotate_deg=30, scale=0.2, gamma=0.0, contrast=0.0)
        image, moved = augment(crop, masks, settings, np.random.default_rng(seed))
        bright = image > 0.5
        overlap = 2 * (bright & moved[0]).sum() / (bright.sum() + moved[0].sum())
        assert overlap > 0.9 and moved.dtype == torch.bool


def test_learning_rate_warms_up_then_decays_over_steps_or_time() -> None:
    settings = load_train_settings(iterations=100, warmup_iterations=10, learning_rate=1e-3)
    optimiser = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=settings.learning_rate)
    rate = LearningRate(optimiser, settings)
    rates = [rate.set(step, 0.0) for step in range(100)]
    assert rates[0] < rates[5] < rates[9] < rates[10] == pytest.approx(1e-3, rel=0.01)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:])) and rates[99] < 0.01 * rates[10]
    assert optimiser.param_groups[0]["lr"] == rates[99]
    # a slow machine: the time budget runs out at step 20 of 100, and the rate has decayed by then
    timed = LearningRate(optimiser, settings)
    late = [timed.set(step, step / 20) for step in range(21)]
    assert late[10] == pytest.approx(1e-3, rel=0.05) and late[20] == 0.0


def test_held_out_subjects() -> None:
    subjects = subjects_in(require_data("fs-aseg"), "T1.nii.gz", "aseg.nii.gz", {})
    train, held = split_subjects(subjects, 0.2)
    assert len(held) == 2 and not {s.name for s in train} & {s.name for s in held}
    assert split_subjects(subjects[:1], 0.2)[1] == []


def test_a_short_run_publishes_an_adapter_only_when_it_helps(tmp_path: Path) -> None:
    mapping = load_mapping(ROOT / "configs" / "mappings" / "aseg.yaml")
    subjects = [s for s in subjects_in(require_data("fs-aseg"), "T1.nii.gz", "aseg.nii.gz", mapping) if s.name in ("sub-01", "sub-02")]
    labels = load_label_set()

    # learning rate 0: nothing can beat the start, so nothing is published
    frozen = train_and_publish(subjects, load_train_settings(**TINY_RUN, learning_rate=0.0), labels, tmp_path)
    assert frozen.published is None and not list(tmp_path.glob("*.safetensors"))
    stats = json.loads((tmp_path / "train_stats.json").read_text())
    assert stats["state"] == "done" and stats["iteration"] == 3 and stats["held_out_subjects"] == ["sub-02"]

    result = train_and_publish(subjects, load_train_settings(**TINY_RUN, learning_rate=1e-3, publish_if_better=False), labels, tmp_path)
    assert result.published is not None and result.published.is_file()
    manifest = read_manifest(result.published)
    assert manifest["training"]["subjects"] == ["sub-01"] and manifest["validation"]["best"]["score"] > 0
    assert json.loads(result.published.with_suffix(".json").read_text()) == manifest
    assert 0 < result.trainable_parameters < result.total_parameters

    engine = Engine(load_config(), labels, adapter=result.published)  # it loads and serves
    assert engine.manifest == manifest


def test_label_files_read_from_nifti_and_nrrd(tmp_path: Path) -> None:
    labels = np.zeros((6, 7, 8), dtype=np.int16)
    labels[2:4, 3:5, 1:6] = 12
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "label.nii.gz")
    nrrd.write(str(tmp_path / "label.nrrd"), labels)
    for name in ("label.nii.gz", "label.nrrd"):
        np.testing.assert_array_equal(read_labels(tmp_path / name), labels)
    (tmp_path / "broken.nrrd").write_bytes(b"NRRD0004\nnonsense")
    with pytest.raises(VolumeError, match="broken.nrrd"):
        read_labels(tmp_path / "broken.nrrd")
