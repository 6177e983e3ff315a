"""Does the automatic pass's uncertainty predict its error, and does picking by it help?

1. Leave-one-out automatic pass: each subject is labelled by the others as atlases
   (brainsam.inference.auto, atlases only); Dice per structure against its label file.
2. Spearman correlation between uncertainty and 1 - Dice, per image (the atlases' misfit,
   brainsam.inference.auto) and per structure (their disagreement).
3. Active-learning simulation: for each split, two subjects are held out for testing, two
   start labelled, and each round one more of the rest is labelled, chosen by the
   `most_uncertain` rule (highest image uncertainty under the current atlases) or at random;
   "retraining" is the atlas pool growing. Held-out Dice per round, both curves plotted.

Registrations are cached (`--cache`), so each pair of subjects is registered once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from brainsam.atlases.atlas import Atlas
from brainsam.atlases.fusion import AtlasFusion, fuse_with_intensity, grown_box
from brainsam.atlases.registration import carry_labels
from brainsam.atlases.trust import agreements, misfit
from brainsam.core.labels import LabelSet
from brainsam.core.metrics import dice
from brainsam.inference.auto import compose, disagreement
from brainsam.inference.engine import Engine

logger = logging.getLogger(__name__)

BOX_MARGIN = 8
"""Voxels kept round the labels when scoring: fusion learns background intensities there."""


@dataclass
class Assessment:
    """dice and uncertainty: per structure; image_uncertainty: the atlases' misfit (brainsam.inference.auto)."""

    dice: dict[str, float]
    uncertainty: dict[str, float]
    image_uncertainty: float


class Pairs:
    """Every subject's labels propagated onto every other subject, computed once (cached), and
    the assessment of each (target, atlas set), computed once."""

    def __init__(self, atlases: dict[str, Atlas], cache: Path):
        self.atlases = atlases
        self.cache = cache
        self._assessed: dict[tuple[str, frozenset], Assessment] = {}

    def onto(self, target: str, sources: list[str]) -> list[np.ndarray]:
        return [carry_labels(self.atlases[s], self.atlases[target].volume, cache=self.cache) for s in sources]

    def assess(self, target: str, sources: list[str], labels: LabelSet) -> Assessment:
        """How well `sources` label `target`, and how sure they are."""
        key = (target, frozenset(sources))
        if key not in self._assessed:
            truth, volume = self.atlases[target].labels, self.atlases[target].volume
            propagated = self.onto(target, sorted(sources))
            fit = misfit(agreements([self.atlases[s] for s in sorted(sources)], volume, propagated))
            box = grown_box(
                np.any(np.stack([truth, *propagated]) > 0, axis=0), BOX_MARGIN
            )  # outside: background in all maps
            propagated, truth = [p[box] for p in propagated], truth[box]
            fused = fuse_with_intensity(propagated, volume.data[box], volume.spacing)
            scores = {s.name: dice(fused == s.id, truth == s.id) for s in labels.structures if (truth == s.id).any()}
            self._assessed[key] = Assessment(scores, disagreement(propagated, {}, fused, labels), fit)
        return self._assessed[key]


def leave_one_out(pairs: Pairs, labels: LabelSet) -> list[dict]:
    """Rows {subject, structure, dice, uncertainty, image_uncertainty} with every other subject
    as atlas."""
    rows = []
    names = sorted(pairs.atlases)
    for target in names:
        found = pairs.assess(target, [n for n in names if n != target], labels)
        rows += [
            {
                "subject": target,
                "structure": s,
                "dice": d,
                "uncertainty": found.uncertainty[s],
                "image_uncertainty": found.image_uncertainty,
            }
            for s, d in found.dice.items()
        ]
        logger.info(
            "%s: mean Dice %.3f, uncertainty %.3f", target, np.mean(list(found.dice.values())), found.image_uncertainty
        )
    return rows


def correlations(rows: list[dict]) -> dict:
    """Spearman rho (and p) of uncertainty against 1 - Dice: per image (image uncertainty
    against the mean over structures), over all (image, structure) pairs, and within each
    structure across images."""

    def rho(u: list[float], e: list[float]) -> dict:
        result = spearmanr(u, e)
        return {"rho": float(result.statistic), "p": float(result.pvalue), "n": len(u)}

    subjects = sorted({r["subject"] for r in rows})
    per_image = [[r for r in rows if r["subject"] == s] for s in subjects]
    out = {
        "image": rho(
            [g[0]["image_uncertainty"] for g in per_image], [1 - np.mean([r["dice"] for r in g]) for g in per_image]
        ),
        "pairs": rho([r["uncertainty"] for r in rows], [1 - r["dice"] for r in rows]),
        "structure": {},
    }
    for structure in dict.fromkeys(r["structure"] for r in rows):
        group = [r for r in rows if r["structure"] == structure]
        out["structure"][structure] = rho([r["uncertainty"] for r in group], [1 - r["dice"] for r in group])
    return out


def with_sam(pairs: Pairs, labels: LabelSet, engine: Engine, targets: list[str]) -> list[dict]:
    """Rows {subject, structure, atlas, sam}: Dice of the atlases' fusion (leave one out) and of
    the segmenter's automatic answer prompted by it (brainsam.inference.auto)."""
    rows = []
    names = sorted(pairs.atlases)
    for target in targets:
        propagated, volume = pairs.onto(target, [n for n in names if n != target]), pairs.atlases[target].volume
        fusion = AtlasFusion(propagated, volume.data, volume.spacing)
        fused, truth = fusion.labels(), pairs.atlases[target].labels
        answered = compose(engine.automatic(engine.prepare(volume), fusion), fused, labels)
        for s in labels.structures:
            found = truth == s.id
            rows.append(
                {
                    "subject": target,
                    "structure": s.name,
                    "atlas": dice(fused == s.id, found),
                    "sam": dice(answered == s.id, found),
                }
            )
        logger.info(
            "%s with the segmenter: %s",
            target,
            {k: round(float(np.mean([r[k] for r in rows if r["subject"] == target])), 3) for k in ("atlas", "sam")},
        )
    return rows


def simulate(
    pairs: Pairs,
    labels: LabelSet,
    test: list[str],
    start: list[str],
    pool: list[str],
    pick: str,
    rng: np.random.Generator,
) -> list[float]:
    """Held-out mean Dice after each round (the first with `start` labelled), labelling one
    subject of `pool` per round, chosen by `pick`: "uncertain" or "random"."""
    labelled, pool = list(start), list(pool)
    curve = []
    while True:
        curve.append(float(np.mean([np.mean(list(pairs.assess(t, labelled, labels).dice.values())) for t in test])))
        if not pool:
            return curve
        if pick == "random":
            chosen = pool[rng.integers(len(pool))]
        else:
            chosen = max(pool, key=lambda s: pairs.assess(s, labelled, labels).image_uncertainty)
        labelled.append(chosen)
        pool.remove(chosen)


def simulation(pairs: Pairs, labels: LabelSet, repeats: int, seed: int) -> dict:
    """Both pick rules over every split (consecutive pairs held out, the next two start);
    random picks repeated `repeats` times per split."""
    names = sorted(pairs.atlases)
    rng = np.random.default_rng(seed)
    curves: dict[str, list[list[float]]] = {"uncertain": [], "random": []}
    for i in range(len(names)):
        order = names[i:] + names[:i]
        test, start, pool = order[:2], order[2:4], order[4:]
        curves["uncertain"].append(simulate(pairs, labels, test, start, pool, "uncertain", rng))
        curves["random"] += [simulate(pairs, labels, test, start, pool, "random", rng) for _ in range(repeats)]
        logger.info("split %d/%d: uncertain %s", i + 1, len(names), np.round(curves["uncertain"][-1], 3).tolist())
    return {
        pick: {"mean": np.mean(c, axis=0).tolist(), "std": np.std(c, axis=0).tolist(), "runs": len(c)}
        for pick, c in curves.items()
    }


def plot(result: dict, start: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for pick, style in (("uncertain", "o-"), ("random", "s--")):
        mean, std = np.asarray(result[pick]["mean"]), np.asarray(result[pick]["std"])
        x = np.arange(start, start + len(mean))
        axis.errorbar(
            x,
            mean,
            yerr=std,
            fmt=style,
            capsize=3,
            label=f"{'most uncertain' if pick == 'uncertain' else 'random'} ({result[pick]['runs']} runs)",
        )
    axis.set_xlabel("labelled subjects (atlases)")
    axis.set_ylabel("held-out mean Dice, 17 structures")
    axis.set_xticks(range(start, start + len(result["uncertain"]["mean"])))
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def report(result: dict) -> str:
    """Text summary: Dice and uncertainty per structure, correlations, simulation curves."""
    rows, rho = result["leave_one_out"], result["spearman"]
    lines = [f"{'structure':22s}{'Dice':>8s}{'uncert.':>9s}{'rho':>7s}"]
    for structure, r in rho["structure"].items():
        group = [row for row in rows if row["structure"] == structure]
        lines.append(
            f"{structure:22s}{np.mean([g['dice'] for g in group]):8.3f}{np.mean([g['uncertainty'] for g in group]):9.3f}{r['rho']:7.2f}"
        )
    lines.append(f"{'mean':22s}{np.mean([r['dice'] for r in rows]):8.3f}")
    lines.append(
        f"Spearman(uncertainty, 1 - Dice): per image rho {rho['image']['rho']:.2f} (p {rho['image']['p']:.3f}, n {rho['image']['n']}); "
        f"all (image, structure) pairs rho {rho['pairs']['rho']:.2f} (p {rho['pairs']['p']:.1e}, n {rho['pairs']['n']})"
    )
    for pick, curve in result["simulation"].items():
        lines.append(f"held-out Dice by round, {pick:9s}: " + " ".join(f"{m:.3f}" for m in curve["mean"]))
    if result.get("sam"):
        means = {k: np.mean([r[k] for r in result["sam"]]) for k in ("atlas", "sam", "vote")}
        lines.append(
            f"with SAM on {sorted({r['subject'] for r in result['sam']})}: mean Dice atlases {means['atlas']:.3f}, SAM in their boxes {means['sam']:.3f}, SAM voting with them {means['vote']:.3f}"
        )
    return "\n".join(lines)
