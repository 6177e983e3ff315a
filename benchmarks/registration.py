"""Atlas registration: Dice of the fused prior against seconds, within and across protocols.

    nice -n 5 .venv/bin/python -m benchmarks.registration fs-aseg fs-aseg          # leave one out
    nice -n 5 .venv/bin/python -m benchmarks.registration fs-aseg ixi-muse --most 5 # across scanners
    nice -n 5 .venv/bin/python -m benchmarks.registration builtin ixi-muse          # day zero

ATLASES and TARGETS name data sets under ../shared/data (`builtin`: the built-in prior, no
labelled subject); with the same data set each target is labelled by the others. Each target is
placed on the reference once (brainsam.atlases.reference) and the atlases (the first `--most` in name
order, the target left out) registered onto it with `--set` overrides of RegistrationSettings
(e.g. `--set local_spacing_mm=2 --set demons_iterations=30`). Prints, per target, the seconds
(CPU seconds of this process, all threads: less sensitive than wall time to
other work on the machine) of its placement and of each atlas's deep-brain stage, the mean Dice of the fused prior
(brainsam.atlases.fusion, weighed by intensity) against the target's own labels, and per structure at
the end; `--json` writes the rows. Registrations are cached under `--cache` by settings, so a
second run with the same settings prints Dice only (times then read "cached"). Needs
../shared/data.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from brainsam.atlases.atlas import Atlas, load_atlas
from brainsam.atlases.fusion import AtlasFusion, grown_box, with_borders
from brainsam.atlases.reference import Placements, PlacementSettings
from brainsam.atlases.registration import RegistrationSettings, cached, carry_labels
from brainsam.atlases.trust import agreements, trusted_indices
from brainsam.core.labels import CONFIGS, load_label_set, load_mapping
from brainsam.core.metrics import dice

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SETS = {
    "fs-aseg": ("aseg.nii.gz", CONFIGS / "mappings" / "aseg.yaml"),
    "ixi-muse": ("muse.nii.gz", CONFIGS / "mappings" / "muse.yaml"),
}


def subjects(name: str, label_set) -> list[Atlas]:
    """Every subject of data set `name` as an atlas (image and its labels in the label set's ids)."""
    labels, mapping = SETS[name]
    folder = DATA / name
    ids = load_mapping(mapping)
    return [
        load_atlas(p / "T1.nii.gz", p / labels, ids, label_set, name=p.name)
        for p in sorted(folder.iterdir())
        if (p / labels).is_file()
    ]


def settings_from(overrides: list[str]) -> RegistrationSettings:
    """RegistrationSettings with KEY=VALUE overrides (`placement.KEY` for the placement)."""
    settings, placement = RegistrationSettings(), PlacementSettings()
    for item in overrides:
        key, value = item.split("=", 1)
        parsed = yaml.safe_load(value)
        if key.startswith("placement."):
            placement = replace(placement, **{key.split(".", 1)[1]: parsed})
        else:
            settings = replace(settings, **{key: tuple(parsed) if isinstance(parsed, list) else parsed})
    return replace(settings, placement=placement)


def run(
    atlases: list[Atlas], targets: list[Atlas], most: int, settings: RegistrationSettings, cache: Path, label_set
) -> list[dict]:
    """One row per target: times, trusted atlases, mean and per-structure Dice of the fusion."""
    placements = Placements(settings.placement, cache)
    rows = []
    for target in targets:
        chosen = [a for a in atlases if a.name != target.name][:most]
        began, wall = time.process_time(), time.perf_counter()
        placements.of(target.volume)
        placed = time.process_time() - began
        times, maps = [], []
        for atlas in chosen:
            hit = cached(atlas, target.volume, settings, cache) is not None
            began = time.process_time()
            maps.append(carry_labels(atlas, target.volume, settings, cache, placements))
            times.append(None if hit else time.process_time() - began)
        wall = time.perf_counter() - wall
        kept = trusted_indices(agreements(chosen, target.volume, maps)) or list(range(len(maps)))
        scores = fused_dice([maps[i] for i in kept], target, label_set)
        every = fused_dice(maps, target, label_set)
        rows.append(
            {
                "target": target.name,
                "atlases": [a.name for a in chosen],
                "trusted": len(kept),
                "placement_s": placed,
                "atlas_s": times,
                "wall_s": wall,
                "dice": scores,
                "mean": float(np.mean(list(scores.values()))),
                "mean_all_atlases": float(np.mean(list(every.values()))),
            }
        )
        shown = " ".join("cached" if t is None else f"{t:.1f}" for t in times)
        print(
            f"{target.name}: mean Dice {rows[-1]['mean']:.3f} ({len(kept)}/{len(maps)} trusted; all {rows[-1]['mean_all_atlases']:.3f}); CPU s: placement {placed:.1f}, atlases {shown}; wall {wall:.1f} s in all; load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    return rows


def fused_dice(maps: list[np.ndarray], target: Atlas, label_set) -> dict[str, float]:
    """Dice per structure of the maps' fusion (weighed by intensity; a lone map with its borders,
    as the server fuses it) against the target's labels."""
    maps = with_borders(maps)
    box = grown_box(np.any(np.stack([target.labels, *maps]) > 0, axis=0), 8)
    fused = AtlasFusion([m[box] for m in maps], target.volume.data[box], target.volume.spacing).labels()
    truth = target.labels[box]
    return {s.name: dice(fused == s.id, truth == s.id) for s in label_set.structures if (truth == s.id).any()}


def report(rows: list[dict]) -> str:
    lines = [f"{'structure':22s}{'Dice':>7s}{'min':>7s}"]
    for name in rows[0]["dice"]:
        values = [r["dice"][name] for r in rows if name in r["dice"]]
        lines.append(f"{name:22s}{np.mean(values):7.3f}{np.min(values):7.3f}")
    lines.append(
        f"{'mean':22s}{np.mean([r['mean'] for r in rows]):7.3f}   (every atlas, none left out: {np.mean([r['mean_all_atlases'] for r in rows]):.3f})"
    )
    timed = [t for r in rows for t in r["atlas_s"] if t is not None]
    if timed:
        lines.append(
            f"CPU seconds: deep-brain stage per atlas median {np.median(timed):.1f} (n {len(timed)}); placement per image median {np.median([r['placement_s'] for r in rows]):.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.registration",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("atlases", choices=[*SETS, "builtin"])
    parser.add_argument("targets", choices=list(SETS))
    parser.add_argument("--subjects", nargs="*", help="targets to run (default: all)")
    parser.add_argument("--most", type=int, default=6, help="atlases per target")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="RegistrationSettings override")
    parser.add_argument("--cache", type=Path, default=Path("runs/registration_cache"))
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    label_set = load_label_set()
    targets = [t for t in subjects(args.targets, label_set) if not args.subjects or t.name in args.subjects]
    if args.atlases == "builtin":
        from brainsam.atlases.prior import builtin_atlas

        atlases = [builtin_atlas(label_set)]
    else:
        atlases = subjects(args.atlases, label_set)
    settings = settings_from(args.set)
    print(f"{args.atlases} -> {args.targets}, settings {settings}", flush=True)
    rows = run(atlases, targets, args.most, settings, args.cache, label_set)
    print(report(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": repr(settings), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
