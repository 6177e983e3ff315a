"""Label fusion (brainsam.atlases.fusion): the atlases' vote, weighed by intensity where they disagree;
small synthetic images with a known answer."""

from __future__ import annotations

import numpy as np

from brainsam.atlases.fusion import AtlasFusion, fuse, fuse_with_intensity, with_borders
from brainsam.core.metrics import dice

SHAPE = (40, 40, 40)
SPACING = (1.0, 1.0, 1.0)


def ball(centre: tuple[int, int, int], radius: float) -> np.ndarray:
    grid = np.indices(SHAPE)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def image_of(truth: np.ndarray, seed: int = 0) -> np.ndarray:
    """Bright structure (0.8) on dark background (0.2), mild noise."""
    noise = np.random.default_rng(seed).normal(0, 0.03, SHAPE)
    return (np.where(truth > 0, 0.8, 0.2) + noise).astype(np.float32)


def test_intensity_undoes_a_majority_that_overreaches() -> None:
    truth = ball((20, 20, 20), 6).astype(np.uint8) * 3
    too_big = ball((20, 20, 20), 8).astype(np.uint8) * 3
    maps = [too_big, too_big, truth]  # two of three atlases reach two voxels too far
    majority = fuse(maps)
    assert (majority == too_big).all()
    fused = fuse_with_intensity(maps, image_of(truth), SPACING)
    assert (fused == truth).all()
    probability = AtlasFusion(maps, image_of(truth), SPACING).probability(3)
    assert ((probability > 0.5) == (fused == 3)).all()
    ring = ball((20, 20, 20), 8) & ~ball((20, 20, 20), 6)
    assert (probability[ring] < 0.1).all() and (probability[~ring] == (truth[~ring] == 3)).all()


def test_intensity_decides_between_neighbouring_structures() -> None:
    """Two structures of different brightness; the atlases disagree on their border."""
    grid = np.indices(SHAPE)[0]
    block = ball((20, 20, 20), 10)
    truth = np.where(block & (grid < 20), 1, np.where(block, 2, 0)).astype(np.uint8)
    shifted = np.where(block & (grid < 23), 1, np.where(block, 2, 0)).astype(np.uint8)
    image = np.where(truth == 1, 0.5, np.where(truth == 2, 0.9, 0.1)).astype(np.float32)
    fused = fuse_with_intensity([shifted, shifted, truth], image, SPACING)
    assert (fuse([shifted, shifted, truth]) == shifted).all()
    assert (fused == truth).all()


def test_only_labels_voted_for_at_a_voxel_compete_there() -> None:
    """The image shows structure 3 out to radius 8; the atlases give it radius 6, and in the ring
    between one atlas says 5, the others background. Intensity fits 3 best, yet 3 has no vote
    in the ring: the ring goes to 5, whose intensities are unknown, over background, whose
    learnt intensities are dark."""
    core, ring = ball((20, 20, 20), 6), ball((20, 20, 20), 8) & ~ball((20, 20, 20), 6)
    atlas = core.astype(np.uint8) * 3
    other = np.where(core, 3, np.where(ring, 5, 0)).astype(np.uint8)
    fused = fuse_with_intensity([atlas, atlas, other], image_of(core | ring), SPACING)
    assert (fused[ring] == 5).all()
    assert (fused[~ring] == atlas[~ring]).all()


def test_a_lone_map_or_agreeing_maps_are_returned_unchanged() -> None:
    truth = ball((20, 20, 20), 6).astype(np.uint8) * 3
    image = image_of(ball((20, 20, 20), 3).astype(np.uint8))  # intensity disagrees with the labels
    assert (fuse_with_intensity([truth], image, SPACING) == truth).all()
    assert (fuse_with_intensity([truth, truth], image, SPACING) == truth).all()
    empty = np.zeros(SHAPE, dtype=np.uint8)
    assert not fuse_with_intensity([empty, empty], image, SPACING).any()


def test_a_lone_map_with_its_borders_lets_intensity_move_them_by_a_voxel() -> None:
    truth = ball((20, 20, 20), 6).astype(np.uint8) * 3
    shifted = np.roll(truth, 1, axis=0)  # a lone atlas one voxel off
    image = image_of(truth)
    maps = with_borders([shifted])
    assert len(maps) == 3 and maps[1] is shifted
    assert (maps[0] <= shifted).all() and maps[0].sum() < shifted.sum() < maps[2].sum()
    fused = fuse_with_intensity(maps, image, SPACING)
    assert dice(fused == 3, truth == 3) > dice(shifted == 3, truth == 3) + 0.05
    fusion = AtlasFusion(maps, image, SPACING)
    edge = (shifted == 3) & (truth == 0)  # what the atlas took of the background
    assert fusion.probability(3)[edge].max() < 0.5 < fusion.probability(3)[truth == 3].min()
    several = [shifted, truth]
    assert with_borders(several) is several
