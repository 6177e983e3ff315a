"""Training cases: the labelled subjects' structures as the segmenter meets them at inference.

Each labelled subject is registered onto by the other labelled subjects (leave one out, through
the same registration cache the server fills), their fusion is its prior, and the prior gives
the deep-brain window and, per structure, the slices and the crop of the token grid that a first
answer decodes (brainsam.inference.segmenter). The frozen part of the image encoder runs once per slice;
training runs the rest (brainsam.modeling.activations).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from brainsam.atlases.atlas import Atlas, relabel
from brainsam.atlases.fusion import AtlasFusion
from brainsam.atlases.registration import RegistrationSettings, carry_labels
from brainsam.atlases.trust import trusted
from brainsam.core.config import EngineConfig
from brainsam.core.files import replaced_atomically
from brainsam.core.labels import LabelSet
from brainsam.core.view import SliceView, Window, to_grid
from brainsam.core.volume import VolumeError, load_volume
from brainsam.inference.atlas_votes import AtlasVotes
from brainsam.inference.dense import Click, first_previous
from brainsam.inference.engine import AtlasPrompt
from brainsam.inference.segmenter import (
    Answer,
    grid_spacing,
    planes,
    prior_slices,
    token_box,
)
from brainsam.inference.votes import VoteShare
from brainsam.io.subjects import Subject, read_labels
from brainsam.modeling.activations import SplitEncoder
from brainsam.modeling.backbones import LOW_RES

logger = logging.getLogger(__name__)

ENCODE_BATCH = 4


@dataclass
class SubjectSlices:
    """A labelled subject's slices in its deep-brain window, encoded up to the first trained stage.

    first: view index of the first slice held. activations: (slices, ...) float16. grid_mm:
    spacing of slices and of the window's low-res rows and columns."""

    name: str
    window: Window
    grid_mm: tuple[float, float, float]
    first: int
    activations: torch.Tensor

    @property
    def held(self) -> range:
        """The view slices whose activations are held."""
        return range(self.first, self.first + len(self.activations))

    def of(self, slices: list[int]) -> torch.Tensor:
        """Activations (len(slices), ...) of view slices, as float32."""
        return self.activations[[i - self.first for i in slices]].float()


@dataclass
class TrainingCase:
    """One structure of one subject as a first answer meets it (brainsam.inference.segmenter.Segmenter.start):
    the slices decoded, the crop of the token grid, and on that crop of the low-res grid the
    prior (probabilities) and the truth (boolean), both (len(slices), rows, cols), and each
    atlas's vote where the prior is, members (atlases, len(slices), rows, cols) boolean, for
    clicks to re-weight (brainsam.inference.atlas_votes)."""

    subject: SubjectSlices
    label_id: int
    slices: list[int]
    tokens: tuple[int, int, int, int]
    prior: torch.Tensor
    truth: np.ndarray
    members: torch.Tensor

    def answer(self) -> Answer:
        """The case as an answer not decoded yet."""
        return Answer(
            self.subject.window, list(self.slices), self.tokens, self.prior.clone(), first_previous(self.prior)
        )

    def logits_of(self, answer: Answer) -> torch.Tensor:
        """An answer begun from this case (`answer`), on the case's slices and crop, though
        corrections may have grown it."""
        return answer.logits[self._within(answer)]

    def reweighted(self, prior: torch.Tensor, members: torch.Tensor, clicks: list[Click]) -> torch.Tensor:
        """`prior` (the case's, or as `shifted` moved it, with `members` moved alike) after
        `clicks` re-weight the atlases as at inference (brainsam.inference.atlas_votes), on the
        low-res grid; clicks off the case's slices count nowhere."""
        points = [
            (
                np.array(
                    [self.slices.index(c.slice), round(c.row) - 4 * self.tokens[0], round(c.col) - 4 * self.tokens[2]]
                ),
                c.foreground,
            )
            for c in clicks
            if c.slice in self.slices
        ]
        votes = AtlasVotes(
            members.numpy(), VoteShare(prior.numpy(), (0, 0, 0), tuple(prior.shape)), self.subject.grid_mm
        )
        return torch.from_numpy(votes.share(points).values)

    def prior_for(self, answer: Answer, prior: torch.Tensor) -> torch.Tensor:
        """A prior on the case's slices and crop (`prior`) placed on an answer begun from this
        case: the answer's own prior elsewhere."""
        out = answer.prior.clone()
        out[self._within(answer)] = prior
        return out

    def _within(self, answer: Answer) -> tuple[list[int], slice, slice]:
        """Where the case's slices and crop lie in an answer begun from it."""
        rows = 4 * (self.tokens[0] - answer.tokens[0])
        cols = 4 * (self.tokens[2] - answer.tokens[2])
        return (
            [answer.slices.index(i) for i in self.slices],
            slice(rows, rows + self.truth.shape[1]),
            slice(cols, cols + self.truth.shape[2]),
        )


def cut(grid: torch.Tensor, tokens: tuple[int, int, int, int]) -> torch.Tensor:
    """A (S, 256, 256) low-res array cut to a crop of the token grid."""
    return grid[:, 4 * tokens[0] : 4 * tokens[1], 4 * tokens[2] : 4 * tokens[3]]


def load_subject_atlas(subject: Subject, labels: LabelSet) -> Atlas:
    """A labelled subject as an atlas (canonical volume, labels in the label set's ids)."""
    volume = load_volume(subject.image)
    return Atlas(subject.name, volume, relabel(volume.to_canonical(read_labels(subject.labels)), subject.ids, labels))


def subject_cases(
    atlas: Atlas,
    others: list[Atlas],
    split: SplitEncoder,
    config: EngineConfig,
    labels: LabelSet,
    cache: Path | None,
    activations: Path | None,
) -> tuple[SubjectSlices, list[TrainingCase]]:
    """A labelled subject (as `atlas`: its volume and labels) prepared for training: `others`
    registered onto it and fused as its prior (registrations come from, and go to, `cache`),
    its slices encoded below the trained stages (kept in `activations`, see `encode_below`)."""
    volume = atlas.volume
    propagated = [carry_labels(other, volume, RegistrationSettings(), cache) for other in others]
    maps = trusted(others, volume, propagated) or propagated
    fusion = AtlasFusion(maps, volume.data, volume.spacing)
    view = SliceView(volume.data, volume.spacing, config.axis_for(volume.spacing))
    prompt = AtlasPrompt.of(view, fusion)
    window = prompt.window
    grid_mm = grid_spacing(view.spacing, window)
    truth = view.to_view(atlas.labels)
    shares = {s.id: VoteShare.of(view.to_view(fusion.probability(s.id))) for s in labels.structures}
    ranges = {i: prior_slices(share) for i, share in shares.items() if share is not None}
    first = min(low for low, _ in ranges.values())
    last = max(high for _, high in ranges.values())
    slices = SubjectSlices(
        atlas.name,
        window,
        grid_mm,
        first,
        encode_below(view, window, range(first, last + 1), split, activations, volume.content_hash),
    )
    cases = [
        structure_case(
            slices, label_id, shares[label_id], list(range(low, high + 1)), truth, prompt.maps, prompt.corner
        )
        for label_id, (low, high) in ranges.items()
    ]
    return slices, cases


def structure_case(
    subject: SubjectSlices,
    label_id: int,
    share: VoteShare,
    indices: list[int],
    truth: np.ndarray,
    maps: np.ndarray,
    corner: tuple[int, int, int],
) -> TrainingCase:
    """The case of one structure of a subject: its prior `share` and its `truth` (the view's
    labels) on view slices `indices`, and the votes of atlas label maps (atlases, slices, rows,
    cols) that hold the block of the view starting at `corner`, on the low-res crop."""
    prior = to_grid(planes(share, indices), subject.window, LOW_RES)
    tokens = token_box(prior, [], None)
    target = to_grid((truth[indices] == label_id).astype(np.float32), subject.window, LOW_RES) > 0.5
    members = torch.stack(
        [cut(vote, tokens) for vote in atlas_votes_on_grid(maps, corner, label_id, share, indices, subject.window)]
    )
    prior = cut(prior, tokens).clone()
    return TrainingCase(subject, label_id, indices, tokens, prior, cut(target, tokens).numpy(), members & (prior > 0))


def atlas_votes_on_grid(
    maps: np.ndarray, corner: tuple[int, int, int], label_id: int, share: VoteShare, indices: list[int], window: Window
) -> list[torch.Tensor]:
    """Each atlas's vote for `label_id` on view slices `indices`, resampled to the window's
    low-res grid (len(indices), LOW_RES, LOW_RES) boolean, as the prior is; `maps` hold the
    block of a view of `share`'s shape that starts at `corner`."""
    return [
        to_grid(
            planes(VoteShare((labels == label_id).astype(np.float32), corner, share.shape), indices), window, LOW_RES
        )
        > 0.5
        for labels in maps
    ]


def encode_below(
    view: SliceView, window: Window, indices: range, split: SplitEncoder, folder: Path | None, image: str
) -> torch.Tensor:
    """Activations (len(indices), ...) float16 of the frozen encoder stages for view slices in
    `window`; kept in `folder` (when given) under a digest of everything they depend on (`image`:
    the volume's content hash), so a later run, or another fold, encodes nothing again."""
    key = hashlib.blake2b(
        repr(
            (
                image,
                view.axis,
                window.key(),
                indices.start,
                indices.stop,
                split.first_trained,
                split.backbone.name,
                split.backbone.weights_sha256,
            )
        ).encode(),
        digest_size=16,
    ).hexdigest()
    path = None if folder is None else Path(folder) / f"{key}.pt"
    if path is not None and path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except (RuntimeError, OSError, EOFError) as error:  # a damaged file is encoded again
            logger.warning("re-encoding %s: %s", path.name, error)
    encoded = []
    for start in range(indices.start, indices.stop, ENCODE_BATCH):
        crops = torch.stack(
            [
                view.crop(i, window, split.backbone.input_size)
                for i in range(start, min(start + ENCODE_BATCH, indices.stop))
            ]
        )
        encoded.append(split.below(crops).half())
    out = torch.cat(encoded)
    if path is not None:
        with replaced_atomically(path) as partial:
            torch.save(out, partial)
    return out


def build_cases(
    subjects: list[Subject],
    atlases: list[Subject],
    most_atlases: int,
    split: SplitEncoder,
    config: EngineConfig,
    labels: LabelSet,
    cache: Path | None,
    activations: Path | None = None,
) -> list[TrainingCase]:
    """Training cases of `subjects`, each with up to `most_atlases` of `atlases` (never itself)
    as its prior (`subject_cases`); unreadable subjects are skipped with a log line (a lab's datastore can hold a
    bad file; training the rest beats failing)."""
    loaded: dict[str, Atlas] = {}

    def atlas_of(subject: Subject) -> Atlas:
        if subject.name not in loaded:
            loaded[subject.name] = load_subject_atlas(subject, labels)
        return loaded[subject.name]

    cases: list[TrainingCase] = []
    for number, subject in enumerate(subjects, start=1):
        try:
            others = [atlas_of(a) for a in atlases if a.name != subject.name][:most_atlases]
            if not others:
                raise ValueError("no other labelled subject to register onto it as its prior")
            _, made = subject_cases(atlas_of(subject), others, split, config, labels, cache, activations)
        except (VolumeError, OSError, ValueError) as error:
            logger.warning("skipped %s: %s", subject.name, error)
            continue
        cases += made
        logger.info("cases of %s ready (%d/%d subjects, %d cases)", subject.name, number, len(subjects), len(cases))
    return cases
