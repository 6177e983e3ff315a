"""The atlases' vote as a guide (brainsam.inference.votes): first answers and corrective clicks, exact
voxel bookkeeping on small synthetic votes, no model needed."""

from __future__ import annotations

import numpy as np
import pytest

from brainsam.atlases.atlas import Atlas
from brainsam.atlases.fusion import share_of
from brainsam.atlases.trust import MIN_AGREEMENT, agreement, agreements, trusted_indices
from brainsam.core.metrics import dice
from brainsam.core.volume import from_array
from brainsam.inference.votes import VoteShare, correct, first_answer

SHAPE = (40, 40, 40)
SPACING = (1.0, 1.0, 1.0)


def ball(centre: tuple[int, int, int], radius: float) -> np.ndarray:
    grid = np.indices(SHAPE)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


@pytest.fixture()
def votes() -> VoteShare:
    """Three atlases: all agree on a ball of radius 5 at (20, 20, 20), one reaches 3 voxels
    further along the first axis, two also label a far ball at (20, 20, 5)."""
    core = ball((20, 20, 20), 5)
    maps = [core | ball((20, 20, 5), 3), core | ball((20, 20, 5), 3), core | ball((23, 20, 20), 5)]
    return VoteShare.of(share_of([m.astype(np.uint8) * 7 for m in maps], 7))


def test_share_counts_the_atlases_voting_for_a_label() -> None:
    maps = [np.array([[[0, 7, 7]]], np.uint8), np.array([[[7, 7, 0]]], np.uint8)]
    np.testing.assert_allclose(share_of(maps, 7), [[[0.5, 1.0, 0.5]]])


def test_vote_share_keeps_only_the_voted_box_and_reads_zero_outside(votes: VoteShare) -> None:
    assert all(kept <= whole for kept, whole in zip(votes.values.shape, SHAPE)) and votes.values.size < np.prod(SHAPE)
    assert votes.majority().shape == SHAPE
    region = votes.region((slice(0, 3), slice(0, 3), slice(0, 3)))
    assert region.shape == (3, 3, 3) and not region.any()
    assert votes.region((slice(20, 21), slice(20, 21), slice(20, 21)))[0, 0, 0] == 1.0
    assert VoteShare.of(np.zeros(SHAPE, np.float32)) is None


def test_first_answer_is_the_majority_piece_holding_the_click(votes: VoteShare) -> None:
    answer = first_answer(votes, np.array([20, 20, 20]))
    np.testing.assert_array_equal(answer, ball((20, 20, 20), 5))  # the far ball is another piece
    assert first_answer(votes, np.array([2, 2, 2])) is None  # a click the atlases miss
    inside = (slice(0, 40), slice(0, 40), slice(0, 20))
    cut = first_answer(votes, None, inside)
    assert cut[:, :, 20:].sum() == 0 and cut[20, 20, 19] and cut[20, 20, 5]


def test_foreground_click_adds_the_minority_vote_near_it_only(votes: VoteShare) -> None:
    mask = first_answer(votes, np.array([20, 20, 20]))
    truth = ball((20, 20, 20), 5) | ball((23, 20, 20), 5)
    before = dice(mask, truth)
    click = np.array([27, 20, 20])  # voted for by one atlas of three
    correct(mask, votes, click, True, SPACING, radius_mm=4.0)
    assert mask[tuple(click)] and dice(mask, truth) > before
    added = np.argwhere(mask & ~ball((20, 20, 20), 5))
    assert np.all(np.linalg.norm(added - click, axis=1) <= 4.0)  # nothing beyond the radius
    assert not (mask & ~truth).any()  # only voted voxels join


def test_foreground_click_where_no_atlas_voted_adds_a_band_round_the_answer(votes: VoteShare) -> None:
    mask = first_answer(votes, np.array([20, 20, 20]))
    click = np.array([20, 26, 20])  # one voxel outside the core, no vote
    correct(mask, votes, click, True, SPACING, radius_mm=3.0)
    added = np.argwhere(mask & ~ball((20, 20, 20), 5))
    assert mask[tuple(click)] and len(added) > 1
    assert np.all(np.linalg.norm(added - click, axis=1) <= 3.0)
    assert np.all(np.linalg.norm(added - 20, axis=1) <= 5 + 2 * np.sqrt(3))  # within the band round the answer


def test_a_correction_never_undoes_an_earlier_click_of_the_other_kind(votes: VoteShare) -> None:
    """A foreground click adds part of the lobe one atlas of three voted for; a background click
    two voxels away removes the weak vote round it, but not the voxel clicked before."""
    mask = first_answer(votes, np.array([20, 20, 20]))
    added, removed = np.array([27, 20, 20]), np.array([25, 20, 20])
    correct(mask, votes, added, True, SPACING, radius_mm=4.0)
    unguarded = mask.copy()
    correct(unguarded, votes, removed, False, SPACING, radius_mm=4.0)
    assert not unguarded[tuple(added)]  # without `keep` the later click would undo the earlier
    correct(mask, votes, removed, False, SPACING, radius_mm=4.0, keep=added[None])
    assert mask[tuple(added)] and not mask[tuple(removed)]


def test_background_click_removes_the_weaker_vote_near_it_and_keeps_the_core() -> None:
    core, spill = ball((20, 20, 20), 5), ball((25, 20, 20), 4)
    maps = [core | spill, core | spill, core]  # the spill has two votes of three
    votes = VoteShare.of(share_of([m.astype(np.uint8) for m in maps], 1))
    mask = votes.majority()
    click = np.array([28, 20, 20])
    correct(mask, votes, click, False, SPACING, radius_mm=6.0)
    assert not mask[tuple(click)]
    assert mask[core].all()  # the unanimous core stays
    assert (spill & ~core & mask).sum() < (spill & ~core).sum()


def test_background_click_against_a_unanimous_vote_removes_the_ball_round_it(votes: VoteShare) -> None:
    """The annotator overrules every atlas there: what lies within the radius goes."""
    mask = first_answer(votes, np.array([20, 20, 20]))
    correct(mask, votes, np.array([20, 20, 20]), False, SPACING, radius_mm=2.0)
    np.testing.assert_array_equal(mask, ball((20, 20, 20), 5) & ~ball((20, 20, 20), 2))


def test_a_registration_onto_another_contrast_is_not_trusted() -> None:
    """Structures of distinct brightness: carried onto the same image they agree; onto its
    negative (another contrast, as IXI's images are to FreeSurfer's) they do not."""
    labels = np.zeros(SHAPE, np.uint8)
    image = np.full(SHAPE, 50.0, np.float32)
    for number, centre in enumerate([(10, 10, 10), (30, 10, 10), (10, 30, 10), (30, 30, 30)], 1):
        region = ball(centre, 4)
        labels[region], image[region] = number, 40.0 * number
    atlas = Atlas("synthetic", from_array(image, np.eye(4)), labels)
    assert agreement(atlas, atlas.volume, labels) > 0.99
    assert agreement(atlas, from_array(image.max() - image, np.eye(4)), labels) < MIN_AGREEMENT
    assert agreement(atlas, atlas.volume, np.zeros_like(labels)) == 0.0
    fits = agreements([atlas, atlas], atlas.volume, [labels, np.zeros_like(labels)])
    assert fits[0] > 0.99 and fits[1] == 0.0 and trusted_indices(fits) == [0]
