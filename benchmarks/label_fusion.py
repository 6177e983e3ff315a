"""Label fusion on the same registrations: ours, a plain majority vote, and ANTs' joint label fusion.

    nice -n 5 .venv/bin/python -m benchmarks.label_fusion fs-aseg [--subjects sub-01 ...] [--most 5]

Each target of the data set (under ../shared/data) is labelled by the first `--most` others in
name order, registered as the server registers them (brainsam.atlases.registration, default
settings, demons kept or dropped as `fitted_labels` decides), each atlas's image carried along
the same transform. In the box round the atlases' and the target's labels (grown by 8 voxels, as
benchmarks.registration scores) three fusions are scored against the target's labels, mean Dice
over the label set's structures:
- ours: brainsam.atlases.fusion (votes weighed by the target's intensities), as the server fuses;
- vote: the label most atlases give each voxel;
- lwvH (with `--lwv H ...`): each atlas's vote weighed by exp(-(1 - r) / H), r the local
  correlation of its image with the target's over a 5-voxel cube, background a label too (a
  candidate of our own for what JLF does, without its search or its joint error model);
- jlf: ants.joint_label_fusion (Wang et al. 2013; patch radius 2, search radius 3, beta 4),
  within the atlases' labels grown by 2 voxels, with background as a label of its own and
  patches compared by correlation. Its defaults leave background out (every voxel of the mask
  gets a structure) and compare raw intensities: fs-aseg sub-01 0.666, against 0.887 so.
Prints a line per target with the seconds each fusion took, and the means. Needs antspyx, which
is not a project requirement (`pip install antspyx==0.6.3`; it declares scipy<1.16 and runs with
the project's 1.17.1 for this).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import ants
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from benchmarks.registration import subjects
from brainsam.atlases.atlas import Atlas
from brainsam.atlases.fusion import AtlasFusion, grown_box, with_borders
from brainsam.atlases.reference import Placements, from_sitk, to_sitk
from brainsam.atlases.registration import RegistrationSettings, fitted_labels, register, warp_labels
from brainsam.core.labels import load_label_set
from brainsam.core.metrics import dice


def carried(atlas: Atlas, target: Atlas, settings: RegistrationSettings, placements: Placements) -> tuple:
    """(labels, image) of the atlas on the target's canonical grid, through the transform the
    server keeps (the demons one unless it fits the target's intensities worse)."""
    registration = register(atlas, target.volume, settings, placements)
    labels = fitted_labels(atlas, target.volume, registration, settings.demons_tolerance)
    transform = registration.affine
    if registration.deformable is not None:
        deformed = warp_labels(atlas, target.volume, registration.deformable, registration.region)
        transform = registration.deformable if np.array_equal(labels, deformed) else registration.affine
    moving = to_sitk(atlas.volume.data.astype(np.float32), atlas.volume.spacing)
    grid = to_sitk(np.zeros(target.volume.data.shape, np.float32), target.volume.spacing)
    return labels, from_sitk(sitk.Resample(moving, grid, transform, sitk.sitkLinear, 0.0))


def vote(maps: list[np.ndarray]) -> np.ndarray:
    """The label most maps give each voxel (background included)."""
    ids = np.unique(np.stack(maps))
    counts = np.stack([sum((m == i).astype(np.int16) for m in maps) for i in ids])
    return ids[np.argmax(counts, axis=0)]


def joint_label_fusion(maps: list[np.ndarray], images: list[np.ndarray], target: np.ndarray, spacing) -> np.ndarray:
    """ANTs' joint label fusion of the maps and their images onto `target`, within the maps'
    labels grown by 2 voxels."""
    mask = ndimage.binary_dilation(np.any(np.stack(maps) > 0, axis=0), iterations=2)

    def image(array: np.ndarray) -> ants.ANTsImage:
        return ants.from_numpy(np.ascontiguousarray(array, dtype=np.float32), spacing=tuple(spacing))

    result = ants.joint_label_fusion(
        image(target),
        image(mask),
        [image(i) for i in images],
        label_list=[image(m) for m in maps],
        usecor=True,  # patches compared by correlation: atlases of another session or scanner
        max_lab_plus_one=True,  # background competes as a label (else every masked voxel gets a structure)
    )
    fused = np.rint(result["segmentation"].numpy()).astype(np.int32)
    return np.where(fused > max(int(m.max()) for m in maps), 0, fused)


def local_correlation(a: np.ndarray, b: np.ndarray, radius: int) -> np.ndarray:
    """Pearson correlation of `a` and `b` over the cube of side 2 * radius + 1 round each voxel."""

    def mean(x: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(x, 2 * radius + 1)

    ma, mb = mean(a), mean(b)
    covariance = mean(a * b) - ma * mb
    variance = (mean(a * a) - ma * ma) * (mean(b * b) - mb * mb)
    return covariance / np.sqrt(np.maximum(variance, 1e-12))


def weighted_vote(maps: list[np.ndarray], images: list[np.ndarray], target: np.ndarray, h: float) -> np.ndarray:
    """Local weighted voting: each atlas's vote weighed by exp(-(1 - r) / h), r its image's local
    correlation with the target's (patch radius 2, no search), background a label of its own."""
    target = target.astype(np.float32)
    weights = [np.exp(-(1.0 - local_correlation(target, i.astype(np.float32), 2)) / h) for i in images]
    ids = np.unique(np.stack(maps))
    scores = np.stack([sum(w * (m == i) for w, m in zip(weights, maps)) for i in ids])
    return ids[np.argmax(scores, axis=0)]


def fusions(
    maps: list[np.ndarray], images: list[np.ndarray], target: np.ndarray, spacing, widths: list[float]
) -> dict[str, tuple]:
    """Each fusion of the maps on the target's box: name -> (labels, seconds it took)."""
    candidates = {
        "ours": lambda: AtlasFusion(with_borders(maps), target, spacing).labels(),
        "vote": lambda: vote(maps),
        "jlf": lambda: joint_label_fusion(maps, images, target, spacing),
        **{f"lwv{h:g}": lambda h=h: weighted_vote(maps, images, target, h) for h in widths},
    }
    out = {}
    for name, fuse in candidates.items():
        began = time.perf_counter()
        fused = fuse()
        out[name] = (fused, time.perf_counter() - began)
    return out


def scores(fused: np.ndarray, truth: np.ndarray, label_set) -> float:
    """Mean Dice over the structures the truth holds."""
    return float(np.mean([dice(fused == s.id, truth == s.id) for s in label_set.structures if (truth == s.id).any()]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.label_fusion", description=__doc__.splitlines()[0])
    parser.add_argument("data_set", choices=["fs-aseg", "ixi-muse"])
    parser.add_argument("--subjects", nargs="*", help="targets to run (default: all)")
    parser.add_argument("--most", type=int, default=5, help="atlases per target")
    parser.add_argument(
        "--lwv", type=float, nargs="*", default=[], metavar="H", help="also local weighted voting with these widths h"
    )
    args = parser.parse_args(argv)
    label_set = load_label_set()
    everyone = subjects(args.data_set, label_set)
    settings = RegistrationSettings()
    placements = Placements(settings.placement, None)
    means: dict[str, list[float]] = defaultdict(list)
    for target in [t for t in everyone if not args.subjects or t.name in args.subjects]:
        began = time.perf_counter()
        chosen = [a for a in everyone if a.name != target.name][: args.most]
        maps, images = zip(*(carried(a, target, settings, placements) for a in chosen))
        registered = time.perf_counter() - began
        box = grown_box(np.any(np.stack([target.labels, *maps]) > 0, axis=0), 8)
        times: dict[str, float] = {}
        for name, (fused, seconds) in fusions(
            [m[box] for m in maps], [i[box] for i in images], target.volume.data[box], target.volume.spacing, args.lwv
        ).items():
            means[name].append(scores(fused, target.labels[box], label_set))
            times[name] = seconds
        shown = ", ".join(f"{n} {means[n][-1]:.3f} ({times[n]:.1f} s)" for n in means)
        print(f"{target.name}: {shown}; registrations {registered:.0f} s", flush=True)
    print("mean: " + ", ".join(f"{n} {np.mean(v):.3f}" for n, v in means.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
