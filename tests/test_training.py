"""Training: the split encoder, the simulated annotator and poorer priors, the schedule, and
short real runs.

The runs use three real 2 mm subjects and a handful of steps: they check what a run produces and
publishes, not how accurate it gets (that is the benchmark in the README).
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

from brainsam.core.config import load_config
from brainsam.core.labels import load_label_set, load_mapping
from brainsam.core.view import Window
from brainsam.core.volume import VolumeError
from brainsam.inference.dense import Click
from brainsam.inference.engine import Engine
from brainsam.io.subjects import read_labels, subjects_in
from brainsam.modeling.activations import SplitEncoder, first_trained_stage
from brainsam.modeling.adapters import read_manifest
from brainsam.modeling.backbones import BACKBONES, load_backbone
from brainsam.modeling.lora import LoraSettings, add_lora
from brainsam.training.cases import SubjectSlices, TrainingCase
from brainsam.training.schedule import LearningRate
from brainsam.training.settings import load_train_settings
from brainsam.training.simulation import corrective_click, first_click, shifted
from brainsam.training.trainer import split_subjects, train_and_publish

from .support import require_data

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = dict(iterations=2, validate_every=2, warmup_iterations=1)
IXI = ("IXI012-HH-1211", "IXI013-HH-1212", "IXI014-HH-1236")


def test_encoder_stages_compose_to_the_encoder() -> None:
    backbone = load_backbone("litemedsam")
    x = backbone.encoder_input(torch.rand(1, 256, 256))
    with torch.no_grad():
        y = x
        for _, stage in backbone.encoder_stages():
            y = stage(y)
        torch.testing.assert_close(y, backbone.image_encoder(x))


def test_vit_stages_compose_to_the_encoder() -> None:
    encoder = ImageEncoderViT(
        img_size=64,
        patch_size=16,
        embed_dim=32,
        depth=2,
        num_heads=2,
        out_chans=8,
        window_size=2,
        global_attn_indexes=(1,),
    )
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


def test_the_simulated_annotator_clicks_inside_then_on_the_largest_error() -> None:
    truth = np.zeros((5, 16, 16), dtype=bool)
    truth[0:5, 3:8, 3:8] = True
    subject = SubjectSlices("phantom", Window(0, 0, 64, 64), (1.0, 1.0, 1.0), 10, torch.zeros(5, 1))
    case = TrainingCase(
        subject,
        1,
        list(range(10, 15)),
        (2, 6, 3, 7),
        torch.from_numpy(truth).float(),
        truth,
        torch.from_numpy(truth)[None],
    )
    first = first_click(case)
    assert first.foreground and (first.slice, first.row, first.col) == (12, 5 + 8, 5 + 12), (
        "the most interior voxel, on the whole grid"
    )
    spill = torch.full(truth.shape, -1.0)
    spill[truth] = 1.0
    spill[2, 13:16, 13:16] = 1.0
    click = corrective_click(case, list(range(5)), spill)
    assert not click.foreground and click.slice == 12 and truth.shape[1] > click.row - 8 >= 13
    assert corrective_click(case, list(range(5)), torch.where(torch.from_numpy(truth), 1.0, -1.0)) is None


def test_a_poorer_registration_moves_the_prior_without_growing_it() -> None:
    prior = torch.zeros(6, 20, 20)
    prior[2:4, 8:12, 8:12] = 1.0
    rng = np.random.default_rng(0)
    moved = [shifted(prior, rng, 1, 3) for _ in range(20)]
    assert all(m.sum() <= prior.sum() for m in moved) and any(not torch.equal(m, prior) for m in moved)
    assert all(torch.equal(shifted(prior, rng, 0, 0), prior) for _ in range(3))


def test_a_poorer_registration_moves_the_atlases_votes_with_the_prior() -> None:
    prior = torch.zeros(6, 20, 20)
    prior[2:4, 8:12, 8:12] = 1.0
    stack = shifted(torch.stack([prior, prior, 0.5 * prior]), np.random.default_rng(1), 1, 3)
    assert (
        not torch.equal(stack[0], prior) and torch.equal(stack[0], stack[1]) and torch.equal(stack[2], 0.5 * stack[0])
    )


def test_a_click_re_weights_the_cases_atlases_round_it_on_the_grid() -> None:
    # two atlases: one draws the structure where it is, the other 4 pixels too far right
    truth = np.zeros((5, 24, 24), dtype=bool)
    truth[:, 8:16, 6:14] = True
    wrong = np.zeros_like(truth)
    wrong[:, 8:16, 10:18] = True
    members = torch.from_numpy(np.stack([truth, wrong]))
    prior = members.float().mean(dim=0)
    subject = SubjectSlices("phantom", Window(0, 0, 64, 64), (1.0, 1.0, 1.0), 10, torch.zeros(5, 1))
    case = TrainingCase(subject, 1, list(range(10, 15)), (2, 8, 3, 9), prior, truth, members)
    # a background click where only the misplaced atlas says yes: slice 12, crop row 12, col 16
    click = Click(12, 12.0 + 8, 16.0 + 12, False)
    moved = case.reweighted(prior, members, [click])
    assert moved[2, 12, 16] < 0.15 and moved[2, 12, 16] < prior[2, 12, 16], "the misplaced atlas loses its vote there"
    assert (moved[torch.from_numpy(truth & ~wrong)] > prior[torch.from_numpy(truth & ~wrong)]).all(), (
        "where only the well-placed atlas votes, its share grows"
    )
    assert torch.allclose(case.reweighted(prior, members, [Click(12, 12.0 + 8, 10.0 + 12, True)]), prior), (
        "a click both atlases agree with moves nothing"
    )
    assert torch.allclose(case.reweighted(prior, members, [Click(20, 12.0 + 8, 16.0 + 12, False)]), prior), (
        "a click off the case's slices counts nowhere"
    )


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
    mapping = load_mapping(ROOT / "configs" / "mappings" / "muse.yaml")
    subjects = [s for s in subjects_in(require_data("ixi-muse"), "T1.nii.gz", "muse.nii.gz", mapping) if s.name in IXI]
    labels = load_label_set()
    cache = tmp_path / "atlas_cache"  # registrations and frozen activations, shared by both runs

    # learning rate 0: nothing can beat the start, so nothing is published
    frozen = train_and_publish(
        subjects, load_train_settings(**TINY_RUN, learning_rate=0.0), labels, tmp_path / "frozen", cache=cache
    )
    assert frozen.published is None and not list((tmp_path / "frozen").glob("*.safetensors"))
    stats = json.loads((tmp_path / "frozen" / "train_stats.json").read_text())
    assert (
        stats["state"] == "done"
        and stats["iteration"] == 2
        and stats["held_out_subjects"] == [IXI[-1]]
        and stats["steps_per_s"] > 0
    )
    assert 0.3 < stats["baseline"]["click_1"] <= 1.0, (
        "the base model prompted by two registered subjects finds the structures"
    )
    assert list((tmp_path / "train_activations").glob("*.pt")), "frozen activations are kept for the next run"

    result = train_and_publish(
        subjects,
        load_train_settings(**TINY_RUN, learning_rate=1e-3, publish_if_better=False),
        labels,
        tmp_path / "adapters",
        cache=cache,
    )
    assert result.published is not None and result.published.is_file()
    manifest = read_manifest(result.published)
    assert manifest["training"]["subjects"] == list(IXI[:2]) and manifest["validation"]["best"]["score"] > 0
    assert json.loads(result.published.with_suffix(".json").read_text()) == manifest
    assert 0 < result.trainable_parameters < result.total_parameters

    engine = Engine(load_config(), labels, adapter=result.published)  # it loads and serves
    assert engine.manifest == manifest


def test_training_needs_two_labelled_subjects(tmp_path: Path) -> None:
    mapping = load_mapping(ROOT / "configs" / "mappings" / "muse.yaml")
    one = [s for s in subjects_in(require_data("ixi-muse"), "T1.nii.gz", "muse.nii.gz", mapping) if s.name == IXI[0]]
    with pytest.raises(ValueError, match="two labelled images"):
        train_and_publish(one, load_train_settings(**TINY_RUN), load_label_set(), tmp_path)
    assert json.loads((tmp_path / "train_stats.json").read_text())["state"] == "failed"


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
