"""Training cost from a run's train_stats.json (brainsam.training.progress.Progress): throughput and time to a
target validation Dice.

Slices are cached once (frozen encoder activations), then each optimisation step trains on one
slice (up to `structures_per_step` prompts, `click_rounds` + 1 decoder passes). Runs record
`slices_s` (caching time) and every validation with its elapsed time (`validations`); for
older runs, which recorded only the baseline and the last validation, step throughput covers
the whole run and the time to target is known only at the end.
"""

from __future__ import annotations

import json
from pathlib import Path


def validations_of(stats: dict) -> list[dict]:
    """Validation records {step, elapsed_s, metrics...} in order; elapsed_s None where unknown."""
    if stats.get("validations"):
        return stats["validations"]
    found = [{"step": 0, "elapsed_s": None, **stats["baseline"]}] if stats.get("baseline") else []
    last = stats.get("last_validation")
    if last:
        found.append({"elapsed_s": stats.get("elapsed_s"), **last})
    return found


def training_figures(path: Path, metric: str = "click_1", target: float = 0.6) -> dict:
    """Throughput and time to `target` on validation `metric` of the run whose train_stats.json
    is at `path`."""
    stats = json.loads(Path(path).read_text())
    elapsed, steps = stats.get("elapsed_s") or stats.get("seconds"), stats.get("iteration", 0)
    cached = stats.get("train_slices", 0) + stats.get("validation_slices", 0)
    caching_s = stats.get("slices_s")
    loop_s = elapsed - caching_s if caching_s is not None else elapsed
    validations = validations_of(stats)
    reached = next((v for v in validations if v.get(metric, -1.0) >= target), None)
    return {
        "run": str(path), "state": stats.get("state"), "train_subjects": stats.get("train_subjects"), "held_out": stats.get("held_out_subjects"),
        "steps": steps, "elapsed_s": elapsed, "cached_slices": cached,
        "caching_slices_per_s": cached / caching_s if caching_s else None,
        "training_slices_per_s": steps / loop_s if elapsed else None,
        "steps_include_caching": caching_s is None,
        "baseline": stats.get("baseline"), "best": stats.get("best"),
        "target": {"metric": metric, "dice": target, "reached_at_step": reached and reached["step"], "reached_after_s": reached and reached["elapsed_s"]},
        "validations": validations,
    }  # fmt: skip
