"""LoRA fine-tuning of the segmenter on labelled subjects, validated on held-out ones, published
as an adapter.

Training teaches exactly the use the server makes of the model (brainsam.inference.segmenter): each
labelled subject gets its prior from the other labelled subjects registered onto it (leave one
out, brainsam.training.cases), sometimes shifted as a poorer registration would be; a step decodes a
slab of a structure's slices from that prior, the robot's first click (most of the time), then
rounds of the robot's corrective clicks on the model's own previous answer, each re-weighting the
atlases (brainsam.inference.atlas_votes) and the slab decoded afresh from the prior they move,
as the server corrects; validation corrects the same way. The image
encoder is frozen except LoRA updates of chosen attention blocks, whose frozen input is computed
once per slice; prompt encoder and mask decoder are fine-tuned. AdamW, a linear warm-up
("preheating"), then cosine or poly decay. The adapter that scores best on the held-out subjects
(Dice after the first click and after two and four corrections) is published, and only if it beats the
model it would replace.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss

from brainsam.core.config import (
    EngineConfig,
    load_config,
)
from brainsam.core.labels import LabelSet
from brainsam.core.metrics import dice
from brainsam.inference.dense import Click, first_previous
from brainsam.inference.segmenter import Segmenter, decode, support_box
from brainsam.io.subjects import Subject
from brainsam.modeling.activations import SplitEncoder
from brainsam.modeling.adapters import (
    AdapterError,
    build_manifest,
    load_adapter,
    lora_settings_of,
    save_adapter,
)
from brainsam.modeling.backbones import Backbone, load_backbone
from brainsam.modeling.lora import (
    LoraSettings,
    add_lora,
    count_parameters,
    trainable_state,
)
from brainsam.training.cases import TrainingCase, build_cases
from brainsam.training.progress import Progress
from brainsam.training.schedule import LearningRate
from brainsam.training.settings import TrainResult, TrainSettings
from brainsam.training.simulation import corrective_click, first_click, shifted

logger = logging.getLogger(__name__)


def split_subjects(subjects: list[Subject], fraction: float) -> tuple[list[Subject], list[Subject]]:
    """(training, held-out) subjects: the last ceil(fraction * n) in name order, at least one
    when there are two or more, none for a single subject."""
    ordered = sorted(subjects, key=lambda s: s.name)
    held = 0 if len(ordered) < 2 else min(len(ordered) - 1, max(1, math.ceil(fraction * len(ordered))))
    return ordered[: len(ordered) - held], ordered[len(ordered) - held :]


class Trainer:
    """One training run: cases, the optimisation loop, validation, the best trainable state.

    cache: the registration cache (the server's), so labelled subjects are registered onto each
    other once across runs."""

    def __init__(
        self,
        settings: TrainSettings,
        engine_config: EngineConfig,
        labels: LabelSet,
        subjects: list[Subject],
        progress: Progress | None = None,
        device: str | None = None,
        start_from: Path | None = None,
        cache: Path | None = None,
    ):
        self.settings = settings
        self.engine_config = engine_config
        self.labels = labels
        self.subjects = subjects
        self.train_subjects, self.held_out = split_subjects(subjects, settings.validation_fraction)
        self.progress = progress or Progress(None)
        self.device = device or engine_config.device
        self.cache = cache
        self.backbone, self.lora, self.started_from = self._adapted_backbone(start_from)
        self.split = SplitEncoder(self.backbone)
        self.loss = DiceCELoss(sigmoid=True, batch=True)
        self.rng = np.random.default_rng(settings.seed)
        self._first_clicks: dict[int, Click | None] = {}

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

    def cases(self, subjects: list[Subject]) -> list[TrainingCase]:
        """Training cases of `subjects`, priors from the other labelled subjects."""
        activations = None if self.cache is None else self.cache.parent / "train_activations"
        return build_cases(
            subjects,
            self.subjects,
            self.settings.atlases,
            self.split,
            self.engine_config,
            self.labels,
            self.cache,
            activations,
        )

    def run(self) -> tuple[dict[str, torch.Tensor] | None, TrainResult]:
        """Train, validating every `validate_every` steps and at the end.

        The baseline is step 0: the adapter training continues from, or the base model (fresh
        LoRA is the identity). Returns the best trainable state (None when nothing beat the
        baseline) and the result summary.
        """
        began = time.perf_counter()
        if len(self.subjects) < 2:
            raise ValueError(
                "training needs two labelled images or more: each one's prior comes from the others registered onto it"
            )
        train = self.cases(self.train_subjects)
        if not train:
            raise ValueError(
                "no training case: the labelled images hold none of the label set's structures, or none could be read"
            )
        held = self.cases(self.held_out)
        trainable, total = count_parameters(self.backbone)
        self.progress.update(
            phase="training",
            train_cases=len(train),
            validation_cases=len(held),
            train_subjects=[s.name for s in self.train_subjects],
            held_out_subjects=[s.name for s in self.held_out],
            trainable_parameters=trainable,
            total_parameters=total,
            cases_s=round(time.perf_counter() - began, 1),
        )
        if not held:
            logger.warning("no held-out subject: the last step is published unvalidated")
        validation_began = time.perf_counter()
        baseline = self.validate(held) if held else {"score": -1.0}
        validation_s = time.perf_counter() - validation_began
        best, best_state = dict(baseline), None
        # every validation with its time: what time-to-target-Dice figures are read from
        validations = [{"step": 0, "elapsed_s": round(time.perf_counter() - began, 1), **baseline}]
        self.progress.update(baseline=baseline, best=best, validations=validations)
        optimiser = torch.optim.AdamW(
            [p for p in self.backbone.parameters() if p.requires_grad],
            lr=self.settings.learning_rate,
            weight_decay=self.settings.weight_decay,
        )
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
                logger.info(
                    "step %d/%d: loss %.4f, validation %s (best %.4f)",
                    step,
                    self.settings.iterations,
                    float(loss.detach()),
                    _fmt(scores),
                    best["score"],
                )
                validations.append({"step": step, "elapsed_s": round(time.perf_counter() - began, 1), **scores})
                self.progress.update(best=best, last_validation={"step": step, **scores}, validations=validations)
            elif step % 10 == 0:
                logger.info(
                    "step %d/%d: loss %.4f, lr %.2e, %.0f s",
                    step,
                    self.settings.iterations,
                    float(loss.detach()),
                    lr,
                    time.perf_counter() - began,
                )
            steps_s = step / max(time.perf_counter() - loop_began, 1e-9)
            self.progress.update(
                iteration=step,
                iterations=self.settings.iterations,
                loss=float(loss.detach()),
                steps_per_s=round(steps_s, 3),
                elapsed_s=round(time.perf_counter() - began, 1),
            )
            if out_of_time:
                logger.info("time budget of %.0f min reached at step %d", self.settings.max_minutes, step)
                break
        result = TrainResult(None, baseline, best, step, time.perf_counter() - began, trainable, total)
        return best_state, result

    def step(self, case: TrainingCase) -> torch.Tensor:
        """Loss of one slab of a case: the first answer, then corrective rounds on it."""
        settings, rng = self.settings, self.rng
        centre = int(rng.integers(len(case.slices)))
        positions = list(range(max(centre - settings.slab, 0), min(centre + settings.slab + 1, len(case.slices))))
        slices = [case.slices[p] for p in positions]
        row0, row1, col0, col1 = case.tokens
        embeddings = self.split.above(case.subject.of(slices))[:, :, row0:row1, col0:col1]
        prior, members = case.prior, case.members
        if rng.random() < settings.shift:  # the atlases' votes move with the prior they make
            both = shifted(torch.cat([prior[None], members.float()]), rng, settings.shift_slices, settings.shift_pixels)
            prior, members = both[0], both[1:] > 0.5
        first = self._first_click(case)
        clicks = [first] if first is not None and rng.random() < settings.first_click else []
        target = torch.as_tensor(case.truth[positions], dtype=torch.float32, device=embeddings.device)[None, None]
        total = 0.0
        rounds = 1 + int(rng.integers(settings.click_rounds + 1))
        for round_ in range(rounds):
            # as the server answers: every round decoded afresh from the prior the clicks so far re-weighted
            logits = decode(
                self.backbone,
                embeddings,
                case.tokens,
                slices,
                prior[positions],
                first_previous(prior[positions]),
                clicks,
                support_box(prior, case.tokens),
                case.subject.grid_mm,
            )
            total = total + self.loss(logits[None, None], target)
            click = corrective_click(case, positions, logits.detach()) if round_ < rounds - 1 else None
            if click is None:
                break
            clicks.append(click)
            prior = case.reweighted(prior, members, clicks)
        return total / (round_ + 1)

    def _first_click(self, case: TrainingCase) -> Click | None:
        key = id(case)
        if key not in self._first_clicks:
            self._first_clicks[key] = first_click(case)
        return self._first_clicks[key]

    @torch.no_grad()
    def validate(self, cases: list[TrainingCase]) -> dict[str, float]:
        """Mean Dice (on the cases' crops of the low-res grid) of the first answer to the robot's
        first click, and after two and four corrections (the robot clicks as often as the
        benchmarks do: a model whose corrections pile up errors must not win); score: their mean."""
        scores: dict[str, list[float]] = {"click_1": [], "click_3": [], "click_5": []}
        embedded: dict[str, torch.Tensor] = {}
        for case in cases:
            subject = case.subject
            if subject.name not in embedded:
                embedded = {
                    subject.name: torch.cat(
                        [
                            self.split.above(subject.activations[i : i + 8].float()).cpu()
                            for i in range(0, len(subject.activations), 8)
                        ]
                    )
                }
            segmenter = Segmenter(
                self.backbone,
                subject.window,
                subject.held,
                subject.grid_mm,
                lambda indices, table=embedded[subject.name], first=subject.first: table[[i - first for i in indices]],
            )
            answer = case.answer()
            first = self._first_click(case)
            answer.clicks = [first] if first is not None else []
            segmenter.decode(answer, list(range(len(answer.slices))), fresh=True)
            scores["click_1"].append(dice(case.logits_of(answer) > 0, case.truth))
            for clicks in range(2, 6):
                click = corrective_click(case, list(range(len(case.slices))), case.logits_of(answer))
                if click is not None:  # as the server corrects: the atlases re-weighted
                    prior = case.reweighted(case.prior, case.members, [*answer.clicks, click])
                    segmenter.correct_prior(answer, click, partial(case.prior_for, prior=prior))
                if f"click_{clicks}" in scores:
                    scores[f"click_{clicks}"].append(dice(case.logits_of(answer) > 0, case.truth))
        means = {key: float(np.mean(values)) if values else 0.0 for key, values in scores.items()}
        means["score"] = float(np.mean(list(means.values())))
        return means


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
    cache: Path | None = None,
) -> TrainResult:
    """A whole run: train (from adapter `start_from` if given), publish the best adapter into
    `folder` if it beats where training started on the held-out subjects, keep
    `folder`/train_stats.json current. A run that fails or is killed publishes nothing.
    cache: the registration cache the labelled subjects' priors come from and go to."""
    progress = Progress(folder / "train_stats.json", subjects=len(subjects), settings=dataclasses.asdict(settings))
    try:
        engine_config = load_config(settings.engine_config, **(engine_overrides or {}))
        trainer = Trainer(settings, engine_config, labels, subjects, progress, start_from=start_from, cache=cache)
        state, result = trainer.run()
        if state is not None:
            result.published = publish(trainer, state, result, folder)
            logger.info(
                "published %s (validation %s, baseline %s)", result.published, _fmt(result.best), _fmt(result.baseline)
            )
        else:
            logger.info("nothing published: no step beat the baseline validation score %.4f", result.baseline["score"])
    except BaseException as error:
        progress.update(state="failed", error=f"{type(error).__name__}: {error}")
        raise
    progress.update(
        state="done",
        published=str(result.published) if result.published else None,
        seconds=round(result.seconds, 1),
        iteration=result.iterations,
    )
    return result


def _fmt(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
