"""Whether a registration worked: how well carried labels fit the target's intensities."""

from __future__ import annotations

import numpy as np

from brainsam.atlases.atlas import Atlas, label_means
from brainsam.core.volume import Volume

MIN_AGREEMENT = 0.6
"""Least `agreement` of a registration that is used: measured 0.65-1.0 where registrations
worked (Dice 0.46-0.79), -0.09-0.78 for fs-aseg atlases on ixi-muse images (Dice 0.00-0.34):
it keeps out what clearly failed, not every poor registration."""


def agreement(atlas: Atlas, target: Volume, labels: np.ndarray) -> float:
    """How well the atlas's labels carried onto `target` fit it: the correlation, over the
    structures, of the atlas's mean intensity in each with the target's in its carried-over
    label. Near 1 when registration found the structures in an image of the same contrast;
    lower when it failed (measured: README, "Atlas-guided clicks")."""
    own, carried = atlas.means, label_means(target.data, labels)
    both = np.isfinite(own) & np.isfinite(carried)
    own, carried = own[both], carried[both]
    if len(own) < 3 or own.std() == 0 or carried.std() == 0:
        return 0.0
    return float(np.corrcoef(own, carried)[0, 1])


def trusted(atlases: list[Atlas], target: Volume, propagated: list[np.ndarray]) -> list[np.ndarray]:
    """Those of the atlases' label maps on `target` (`propagated`, in atlas order) that reach
    MIN_AGREEMENT (see `agreement`)."""
    return [propagated[i] for i in trusted_indices(agreements(atlases, target, propagated))]


def agreements(atlases: list[Atlas], target: Volume, propagated: list[np.ndarray]) -> list[float]:
    """`agreement` of each atlas with its label map on `target` (`propagated`, in atlas order)."""
    return [agreement(atlas, target, labels) for atlas, labels in zip(atlases, propagated)]


def trusted_indices(fits: list[float]) -> list[int]:
    """Positions of the `agreements` that reach MIN_AGREEMENT."""
    return [i for i, fit in enumerate(fits) if fit >= MIN_AGREEMENT]


def misfit(fits: list[float]) -> float:
    """How poorly registrations fit a target, from their `agreements`: 1 - their mean."""
    return 1.0 - float(np.mean(fits))
