"""Clicks re-weighting the atlases (brainsam.inference.atlas_votes), on small synthetic votes."""

from __future__ import annotations

import numpy as np

from brainsam.inference.atlas_votes import DISCOUNT_MM, votes_of
from brainsam.inference.votes import VoteShare


def two_atlases() -> tuple[np.ndarray, VoteShare]:
    """Two atlases on a (1, 1, 120) line of 1 mm voxels: one labels 20..79, the other 30..89;
    the prior is their share."""
    maps = np.zeros((2, 1, 1, 120), dtype=np.uint8)
    maps[0, ..., 20:80] = 7
    maps[1, ..., 30:90] = 7
    prior = VoteShare((maps == 7).mean(axis=0).astype(np.float32), (0, 0, 0), (1, 1, 120))
    return maps, prior


def test_a_click_moves_the_prior_towards_the_atlases_that_agree_with_it_near_it_only() -> None:
    maps, prior = two_atlases()
    votes = votes_of(maps, (0, 0, 0), 7, prior, (1.0, 1.0, 1.0))
    moved = votes.share([(np.array([0, 0, 25]), True)]).values[0, 0]
    assert moved[25] > 0.9 and prior.values[0, 0, 25] == 0.5, "the agreeing atlas carries the click's voxel"
    assert moved[20] > 0.8 and moved[29] > 0.8, "and the stretch of border it draws round the click"
    assert moved[25] > moved[20], "less further out"
    assert np.array_equal(moved[30:80], prior.values[0, 0, 30:80]), "where both agree nothing moves"
    assert np.allclose(moved[80:90], 0.5), f"the far border, {55 / DISCOUNT_MM:.1f} sigma away, stays"


def test_a_click_every_atlas_or_none_agrees_with_moves_nothing() -> None:
    maps, prior = two_atlases()
    votes = votes_of(maps, (0, 0, 0), 7, prior, (1.0, 1.0, 1.0))
    for point in ([0, 0, 50], [0, 0, 5]):
        for foreground in (True, False):
            assert np.array_equal(votes.share([(np.array(point), foreground)]).values, prior.values)


def test_votes_are_counted_only_where_the_prior_is() -> None:
    maps, prior = two_atlases()
    prior.values[..., 60:] = 0  # an roi cut it
    votes = votes_of(maps, (0, 0, 0), 7, prior, (1.0, 1.0, 1.0))
    moved = votes.share([(np.array([0, 0, 85]), True)]).values
    assert not moved[..., 60:].any()
