"""LoRA fine-tuning on labelled subjects, validated on held-out ones, published as an adapter.

    python -m brainsam.train ../shared/data/fs-aseg --mapping configs/mappings/aseg.yaml \
        --out runs/adapters [--config litemedsam] [--set iterations=50 ...]

The image encoder is frozen except LoRA updates of chosen attention blocks; prompt encoder and
mask decoder are fine-tuned. AdamW, a linear warm-up ("preheating") then cosine or poly decay.
Each step takes one cached training slice, decodes a simulated prompt for several structures on
it, then corrective-click rounds with the previous logits fed back; the loss is Dice + focal on
the low-resolution logits plus the squared error of the predicted IoU. The adapter that scores
best on the held-out slices is published, and only if it beats the model it would replace.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceFocalLoss

from .activations import SplitEncoder
from .adapters import AdapterError, build_manifest, load_adapter, lora_settings_of, save_adapter
from .backbones import LOW_RES, Backbone, load_backbone
from .config import EngineConfig, load_config, read_yaml_config, with_overrides
from .labels import LabelSet, load_label_set, load_mapping
from .lora import LoraSettings, add_lora, count_parameters, trainable_state
from .simulation import Prompt, corrective_click, jittered_box, mask_box, prior_sized_box
from .trainset import Augmentation, Subject, TrainingSlice, build_slices

logger = logging.getLogger(__name__)

PROPAGATION_MARGIN_PX = 2.0
"""Slack of the tight validation box: propagation prompts with the neighbour's box plus a margin."""


@dataclass
class TrainSettings:
    """One training setting (configs/training/<name>.yaml); every field can be overridden.

    engine_config: the backbone config it trains (configs/backbones). lora: LoraSettings fields.
    learning_rate, weight_decay: AdamW. warmup_iterations: linear ramp from zero.
    schedule: decay after warm-up, cosine or poly. iterations: optimisation steps.
    max_minutes: time budget of the whole run (slices, steps, validation).
    structures_per_step: prompts per slice and step.
    click_rounds: corrective-click rounds after the first prompt. slices_per_subject,
    validation_slices_per_subject: slices sampled per subject. validate_every: steps between
    validations. validation_fraction: held-out share of subjects. augment: random rotation,
    zoom, gamma, contrast and left-right mirror. publish_if_better: publish only an adapter that
    beats where training started (else the last one). seed: of every random draw.
    """

    engine_config: str = "litemedsam"
    lora: dict[str, Any] = dataclasses.field(default_factory=dict)
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    warmup_iterations: int = 25
    schedule: str = "cosine"
    iterations: int = 300
    max_minutes: float = 28.0
    structures_per_step: int = 4
    click_rounds: int = 2
    slices_per_subject: int = 24
    validation_slices_per_subject: int = 8
    validate_every: int = 100
    validation_fraction: float = 0.2
    augment: bool = True
    publish_if_better: bool = True
    seed: int = 0

    def lora_settings(self) -> LoraSettings:
        values = dict(self.lora)
        if values.get("blocks") is not None:
            values["blocks"] = tuple(values["blocks"])
        return LoraSettings(**values)


def load_train_settings(name_or_path: str = "litemedsam", **overrides: Any) -> TrainSettings:
    """Read configs/training/<name>.yaml (or a YAML path) and apply overrides."""
    settings = with_overrides(TrainSettings(), read_yaml_config("training", name_or_path))
    return with_overrides(settings, overrides)


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


class Progress:
    """Where a run stands, written atomically as JSON after every event so the server can show it."""

    def __init__(self, path: Path | None, **fields: Any):
        self.path = path
        self.state: dict[str, Any] = {"state": "running", "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
        self.update()

    def update(self, **fields: Any) -> None:
        self.state.update(fields)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temp.write_text(json.dumps(self.state, indent=1, default=str))
        os.replace(temp, self.path)


def split_subjects(subjects: list[Subject], fraction: float) -> tuple[list[Subject], list[Subject]]:
    """(training, held-out) subjects: the last ceil(fraction * n) in name order, at least one
    when there are two or more, none for a single subject."""
    ordered = sorted(subjects, key=lambda s: s.name)
    held = 0 if len(ordered) < 2 else min(len(ordered) - 1, max(1, math.ceil(fraction * len(ordered))))
    return ordered[: len(ordered) - held], ordered[len(ordered) - held :]


def decode_prompts(backbone: Backbone, embedding: torch.Tensor, prompts: list[Prompt], mask_logits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode prompts (one per structure) against one slice embedding -> (logits (B, T, T), IoU (B,)).

    Click lists of unequal length are padded with SAM's 'not a point' label -1."""
    scale = backbone.input_size / LOW_RES
    parts = [p.for_model(scale) for p in prompts]
    boxes = torch.stack([p["box"] for p in parts]) if parts[0]["box"] is not None else None
    count = max(len(p.points) for p in prompts)
    points = labels = None
    if count:
        points = torch.zeros(len(prompts), count, 2)
        labels = torch.full((len(prompts), count), -1, dtype=torch.int64)
        for row, part in enumerate(parts):
            if part["points"] is not None:
                points[row, : len(part["points"])] = part["points"]
                labels[row, : len(part["points"])] = part["point_labels"]
    logits, iou = backbone.decode_batch(embedding, points, labels, boxes, mask_logits)
    return logits[:, 0], iou[:, 0]


def first_prompts(slice_: TrainingSlice, names: list[str], rng: np.random.Generator | None) -> list[Prompt]:
    """The first prompt per structure. Training (rng given): a jittered tight box or a box of
    typical size round the structure's interior, half and half. Validation (rng None): both
    kinds, unjittered, the tight one first."""
    prompts = []
    for name in names:
        truth = slice_.targets[name].numpy()
        if rng is None:
            prompts.append(Prompt(grown_box(mask_box(truth), PROPAGATION_MARGIN_PX, truth.shape[0])))
            prompts.append(Prompt(prior_sized_box(truth, slice_.half_extent_px[name], np.random.default_rng(0), shift_px=0.0)))
        elif rng.random() < 0.5:
            prompts.append(Prompt(jittered_box(truth, rng)))
        else:
            prompts.append(Prompt(prior_sized_box(truth, slice_.half_extent_px[name], rng)))
    return prompts


def grown_box(box: np.ndarray, margin: float, size: int) -> np.ndarray:
    """A box with every side moved out by `margin` pixels, kept inside the grid."""
    return np.clip(box + np.array([-margin, -margin, margin, margin]), 0, size).astype(np.float32)


def with_corrections(prompts: list[Prompt], truths: list[np.ndarray], logits: torch.Tensor) -> list[Prompt]:
    """Each prompt plus the robot's next click on its current prediction (none if it is perfect)."""
    out = []
    for prompt, truth, current in zip(prompts, truths, logits):
        click = corrective_click(truth, (current > 0).cpu().numpy())
        out.append(prompt if click is None else prompt.with_click(*click))
    return out


def soft_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice of thresholded predictions per row: logits and boolean targets (B, T, T) -> (B,)."""
    predicted = logits > 0
    overlap = (predicted & targets).sum(dim=(1, 2)).float()
    total = (predicted.sum(dim=(1, 2)) + targets.sum(dim=(1, 2))).float()
    return torch.where(total > 0, 2 * overlap / total.clamp(min=1), torch.ones_like(total))


def iou_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of thresholded predictions per row (B,), the target of the IoU head."""
    predicted = logits > 0
    union = (predicted | targets).sum(dim=(1, 2)).float()
    return (predicted & targets).sum(dim=(1, 2)).float() / union.clamp(min=1)


class Trainer:
    """One training run: slices, the optimisation loop, validation, the best trainable state."""

    def __init__(
        self,
        settings: TrainSettings,
        engine_config: EngineConfig,
        labels: LabelSet,
        subjects: list[Subject],
        progress: Progress | None = None,
        device: str | None = None,
        start_from: Path | None = None,
    ):
        self.settings = settings
        self.engine_config = engine_config
        self.labels = labels
        self.train_subjects, self.held_out = split_subjects(subjects, settings.validation_fraction)
        self.progress = progress or Progress(None)
        self.device = device or engine_config.device
        self.backbone, self.lora, self.started_from = self._adapted_backbone(start_from)
        self.split = SplitEncoder(self.backbone)
        self.loss = DiceFocalLoss(sigmoid=True)
        self.rng = np.random.default_rng(settings.seed)

    def _adapted_backbone(self, start_from: Path | None) -> tuple[Backbone, LoraSettings, Path | None]:
        """The backbone with LoRA layers: continuing from adapter `start_from` (with its LoRA
        settings) when it loads, else fresh with the configured settings. It stays in eval mode:
        batch statistics of one slice must not move the encoder's frozen batch norms."""
        config = self.engine_config
        backbone = load_backbone(config.backbone, config.checkpoint, config.checkpoint_dir, self.device)
        if start_from is not None:
            try:
                manifest = load_adapter(backbone, start_from)
                logger.info("continuing from adapter %s", start_from)
                return backbone, lora_settings_of(manifest, start_from), start_from
            except AdapterError as error:
                logger.warning("starting from the base model: %s", error)
                backbone = load_backbone(config.backbone, config.checkpoint, config.checkpoint_dir, self.device)
        return backbone, add_lora(backbone, self.settings.lora_settings()), None

    def run(self) -> tuple[dict[str, torch.Tensor] | None, TrainResult]:
        """Train, validating every `validate_every` steps and at the end.

        The baseline is step 0: the adapter training continues from, or the base model (fresh
        LoRA is the identity). Returns the best trainable state (None when nothing beat the
        baseline) and the result summary.
        """
        began = time.perf_counter()
        augmentation = Augmentation() if self.settings.augment else None
        train = build_slices(self.train_subjects, self.split, self.engine_config, self.labels, self.settings.slices_per_subject, self.settings.seed, augmentation)
        if not train:
            raise ValueError("no labelled slices to train on: the labels hold none of the label set's structures")
        held = build_slices(self.held_out, self.split, self.engine_config, self.labels, self.settings.validation_slices_per_subject, self.settings.seed + 1, None)
        trainable, total = count_parameters(self.backbone)
        self.progress.update(phase="training", train_slices=len(train), validation_slices=len(held), train_subjects=[s.name for s in self.train_subjects],
                             held_out_subjects=[s.name for s in self.held_out], trainable_parameters=trainable, total_parameters=total,
                             slices_s=round(time.perf_counter() - began, 1))
        if not held:
            logger.warning("no held-out subject (one labelled subject): the last step is published unvalidated")
        validation_began = time.perf_counter()
        baseline = self.validate(held) if held else {"score": -1.0}
        validation_s = time.perf_counter() - validation_began
        best, best_state = dict(baseline), None
        # every validation with its time: what time-to-target-Dice figures are read from
        validations = [{"step": 0, "elapsed_s": round(time.perf_counter() - began, 1), **baseline}]
        self.progress.update(baseline=baseline, best=best, validations=validations)
        optimiser = torch.optim.AdamW([p for p in self.backbone.parameters() if p.requires_grad], lr=self.settings.learning_rate, weight_decay=self.settings.weight_decay)
        rate = LearningRate(optimiser, self.settings)
        # the whole run keeps to max_minutes: the loop ends in time for the last validation
        loop_began = time.perf_counter()
        budget_s = max(1.0, began + 60 * self.settings.max_minutes - validation_s - loop_began)
        step = 0
        for step in range(1, self.settings.iterations + 1):
            lr = rate.set(step - 1, (time.perf_counter() - loop_began) / budget_s)
            loss = self.step(train[int(self.rng.integers(len(train)))])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            out_of_time = time.perf_counter() - loop_began > budget_s
            if step % self.settings.validate_every == 0 or step == self.settings.iterations or out_of_time:
                scores = self.validate(held) if held else {"score": float(step)}
                if scores["score"] > best["score"] or not self.settings.publish_if_better:
                    best, best_state = scores, trainable_state(self.backbone)
                logger.info("step %d/%d: loss %.4f, validation %s (best %.4f)", step, self.settings.iterations, float(loss.detach()), _fmt(scores), best["score"])
                validations.append({"step": step, "elapsed_s": round(time.perf_counter() - began, 1), **scores})
                self.progress.update(best=best, last_validation={"step": step, **scores}, validations=validations)
            elif step % 10 == 0:
                logger.info("step %d/%d: loss %.4f, lr %.2e, %.0f s", step, self.settings.iterations, float(loss.detach()), lr, time.perf_counter() - began)
            self.progress.update(iteration=step, iterations=self.settings.iterations, loss=float(loss.detach()), elapsed_s=round(time.perf_counter() - began, 1))
            if out_of_time:
                logger.info("time budget of %.0f min reached at step %d", self.settings.max_minutes, step)
                break
        result = TrainResult(None, baseline, best, step, time.perf_counter() - began, trainable, total)
        return best_state, result

    def step(self, slice_: TrainingSlice) -> torch.Tensor:
        """Loss of one slice: first prompts and corrective rounds for up to `structures_per_step` structures."""
        names = list(slice_.targets)
        if len(names) > self.settings.structures_per_step:
            names = [names[i] for i in self.rng.choice(len(names), self.settings.structures_per_step, replace=False)]
        truths = [slice_.targets[n].numpy() for n in names]
        targets = torch.stack([slice_.targets[n] for n in names]).to(self.backbone.device)
        with autocast(self.backbone.device):
            embedding = self.split.above(slice_.activations)[0]
            prompts = first_prompts(slice_, names, self.rng)
            previous, total = None, 0.0
            for _ in range(self.settings.click_rounds + 1):
                if previous is not None:
                    prompts = with_corrections(prompts, truths, previous)
                logits, iou = decode_prompts(self.backbone, embedding, prompts, previous)
                segmentation = self.loss(logits[:, None].float(), targets[:, None].float())
                total = total + segmentation + F.mse_loss(iou.float(), iou_of(logits.detach(), targets))
                previous = logits.detach()
        return total / (self.settings.click_rounds + 1)

    @torch.no_grad()
    def validate(self, slices: list[TrainingSlice]) -> dict[str, float]:
        """Mean Dice on held-out slices: tight box; typical-size box round the interior (a first
        click); that plus two robot corrections. score: the mean of the three."""
        scores: dict[str, list[float]] = {"box": [], "click_1": [], "click_3": []}
        for slice_ in slices:
            names = list(slice_.targets)
            embedding = self.split.above(slice_.activations)[0]
            prompts = first_prompts(slice_, names, None)
            targets = torch.stack([slice_.targets[n] for n in names for _ in (0, 1)])
            logits, _ = decode_prompts(self.backbone, embedding, prompts, None)
            dice = soft_dice(logits.cpu(), targets)
            scores["box"] += dice[0::2].tolist()
            scores["click_1"] += dice[1::2].tolist()
            clicks, truths, current = prompts[1::2], [t.numpy() for t in targets[1::2]], logits[1::2]
            for _ in range(2):
                clicks = with_corrections(clicks, truths, current)
                current, _ = decode_prompts(self.backbone, embedding, clicks, current)
            scores["click_3"] += soft_dice(current.cpu(), targets[1::2]).tolist()
        means = {key: float(np.mean(values)) if values else 0.0 for key, values in scores.items()}
        means["score"] = float(np.mean(list(means.values())))
        return means


def autocast(device: torch.device) -> torch.autocast:
    """bfloat16 mixed precision on a GPU; full precision on CPU, where bf16 is slower here."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class LearningRate:
    """Linear warm-up ("preheating") over `warmup_iterations`, then cosine or poly decay to zero
    as the run uses up its iterations or its time budget, whichever goes first, so that a slow
    machine still ends on a decayed rate."""

    def __init__(self, optimiser: torch.optim.Optimizer, settings: TrainSettings):
        if settings.schedule not in ("cosine", "poly"):
            raise ValueError(f"schedule must be cosine or poly, got {settings.schedule!r}")
        self.optimiser = optimiser
        self.settings = settings
        self.decay_from = 0.0

    def set(self, step: int, time_used: float) -> float:
        """Set and return the rate for `step` (0-based) with `time_used` of the budget spent (0..1)."""
        peak, warmup = self.settings.learning_rate, self.settings.warmup_iterations
        used = min(1.0, max(step / max(1, self.settings.iterations), time_used))
        if step < warmup:
            rate, self.decay_from = peak * (step + 1) / (warmup + 1), used
        else:
            progress = min(1.0, (used - self.decay_from) / max(1e-9, 1.0 - self.decay_from))
            shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.settings.schedule == "cosine" else (1 - progress) ** 0.9
            rate = peak * shape
        for group in self.optimiser.param_groups:
            group["lr"] = rate
        return rate


def publish(trainer: Trainer, state: dict[str, torch.Tensor], result: TrainResult, folder: Path) -> Path:
    """Load the best state into the backbone and write it as a new adapter in `folder`
    (atomically; earlier adapters stay)."""
    trainer.backbone.load_state_dict(state, strict=False)
    manifest = build_manifest(
        trainer.backbone,
        trainer.lora,
        trainer.labels.names,
        training={
            "subjects": [s.name for s in trainer.train_subjects],
            "held_out": [s.name for s in trainer.held_out],
            "started_from": trainer.started_from.name if trainer.started_from else None,
            "iterations": result.iterations,
            "seconds": round(result.seconds, 1),
            "settings": dataclasses.asdict(trainer.settings),
            "trainable_parameters": result.trainable_parameters,
            "total_parameters": result.total_parameters,
        },
        validation={"baseline": result.baseline, "best": result.best},
    )
    return save_adapter(trainer.backbone, manifest, folder / f"brainsam-{time.strftime('%Y%m%d-%H%M%S')}.safetensors")


def train_and_publish(
    subjects: list[Subject],
    settings: TrainSettings,
    labels: LabelSet,
    folder: Path,
    engine_overrides: dict[str, Any] | None = None,
    start_from: Path | None = None,
) -> TrainResult:
    """A whole run: train (from adapter `start_from` if given), publish the best adapter into
    `folder` if it beats where training started on the held-out slices, keep
    `folder`/train_stats.json current. A run that fails or is killed publishes nothing."""
    progress = Progress(folder / "train_stats.json", subjects=len(subjects), settings=dataclasses.asdict(settings))
    try:
        engine_config = load_config(settings.engine_config, **(engine_overrides or {}))
        trainer = Trainer(settings, engine_config, labels, subjects, progress, start_from=start_from)
        state, result = trainer.run()
        if state is not None:
            result.published = publish(trainer, state, result, folder)
            logger.info("published %s (validation %s, baseline %s)", result.published, _fmt(result.best), _fmt(result.baseline))
        else:
            logger.info("nothing published: no step beat the baseline validation score %.4f", result.baseline["score"])
    except BaseException as error:
        progress.update(state="failed", error=f"{type(error).__name__}: {error}")
        raise
    progress.update(state="done", published=str(result.published) if result.published else None, seconds=round(result.seconds, 1), iteration=result.iterations)
    return result


def _fmt(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in scores.items())


def subjects_in(folder: Path, image_name: str, labels_name: str, mapping: dict[str, int]) -> list[Subject]:
    """Subject folders of a data set that hold both the image and the label file."""
    return [
        Subject(p.name, p / image_name, p / labels_name, mapping)
        for p in sorted(folder.iterdir())
        if (p / image_name).is_file() and (p / labels_name).is_file()
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m brainsam.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="folder of subject folders, each with an image and a label file")
    parser.add_argument("--image", default="T1.nii.gz")
    parser.add_argument("--labels", default="aseg.nii.gz")
    parser.add_argument("--mapping", default="configs/mappings/aseg.yaml", help="structure name -> label id YAML")
    parser.add_argument("--subjects", nargs="+", help="only these subject folder names")
    parser.add_argument("--config", default="litemedsam", help="training config in configs/training, or a YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a training setting")
    parser.add_argument("--device", help="torch device (default: the engine config's)")
    parser.add_argument("--out", type=Path, required=True, help="folder the adapter and train_stats.json go to")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    settings = load_train_settings(args.config, **dict(item.split("=", 1) for item in args.set))
    subjects = [s for s in subjects_in(args.folder, args.image, args.labels, load_mapping(args.mapping)) if not args.subjects or s.name in args.subjects]
    result = train_and_publish(subjects, settings, load_label_set(), args.out, {"device": args.device} if args.device else None)
    print(json.dumps(dataclasses.asdict(result), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
