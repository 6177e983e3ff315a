"""Evaluation results as files and tables: JSON, CSV, the Dice-vs-clicks plot, text tables.

Rows are one request each (see `brainsam.evaluation.evaluate`); summaries average Dice and HD95 first over
the subjects of a structure, then over structures, so every structure weighs the same.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROW_FIELDS = [
    "dataset",
    "subject",
    "structure",
    "model",
    "backend",
    "mode",
    "clicks",
    "request",
    "dice",
    "hd95",
    "seconds",
    "encoded",
    "decoded",
    "encode_s",
    "decode_s",
]
GROUP = ("dataset", "model", "backend")


def setting(row: dict) -> str:
    """Column name of a row's prompt setting: box, k click, box+k, or the mode (auto, atlas)."""
    if row["mode"] == "clicks":
        return f"{row['clicks']} click"
    if row["mode"] == "box+clicks":
        return "box" if row["clicks"] == 0 else f"box+{row['clicks']}"
    return row["mode"]


def _order(name: str) -> tuple:
    kind = 0 if name == "box" else 1 if name.endswith("click") else 2 if name.startswith("box+") else 3
    return kind, int("".join(c for c in name if c.isdigit()) or 0), name


def accuracy_summary(rows: list[dict]) -> list[dict]:
    """Per (dataset, model, backend, setting): mean Dice and HD95 over structures (each the mean
    over its subjects), structures, subjects, and how many masks were empty (HD95 undefined)."""
    by: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by[(*[row[k] for k in GROUP], setting(row))][row["structure"]].append(row)
    out = []
    for key, structures in by.items():
        dices = [np.mean([r["dice"] for r in rs]) for rs in structures.values()]
        hd = [
            np.mean(finite)
            for rs in structures.values()
            if (finite := [r["hd95"] for r in rs if r["hd95"] is not None])
        ]
        out.append({
            **dict(zip(GROUP, key[:3])), "setting": key[3],
            "dice": float(np.mean(dices)), "hd95": float(np.mean(hd)) if hd else None,
            "structures": len(structures), "subjects": len({r["subject"] for rs in structures.values() for r in rs}),
            "empty": sum(r["hd95"] is None for rs in structures.values() for r in rs),
        })  # fmt: skip
    return sorted(out, key=lambda s: (*[s[k] for k in GROUP], _order(s["setting"])))


def latency_summary(rows: list[dict]) -> list[dict]:
    """Per (dataset, model, backend, request kind first/corrective): p50/p95 seconds, and the
    encoder's seconds per slice and decoder's per prompt where the backend measured them."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("request"):
            by[(*[row[k] for k in GROUP], row["request"])].append(row)
    out = []
    for key, group in sorted(by.items()):
        seconds = [r["seconds"] for r in group]
        encoded = sum(r["encoded"] or 0 for r in group)
        decoded = sum(r["decoded"] or 0 for r in group)
        encode_s = sum(r["encode_s"] or 0.0 for r in group)
        decode_s = sum(r["decode_s"] or 0.0 for r in group)
        measured = all(r["encode_s"] is not None for r in group)
        out.append({
            **dict(zip(GROUP, key[:3])), "request": key[3], "n": len(group),
            "p50_s": float(np.percentile(seconds, 50)), "p95_s": float(np.percentile(seconds, 95)),
            "encoded_per_request": encoded / len(group),
            "encoder_s_per_slice": encode_s / encoded if measured and encoded else None,
            "decoder_ms_per_prompt": 1000 * decode_s / decoded if measured and decoded else None,
        })  # fmt: skip
    return out


def write_csv(rows: list[dict], path: Path) -> None:
    """All rows, one request each, with the columns of ROW_FIELDS (empty where undefined)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ROW_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: ("" if row.get(k) is None else row[k]) for k in ROW_FIELDS} for row in rows)


def plot_dice_vs_clicks(summary: list[dict], path: Path) -> None:
    """One panel per data set: mean Dice after k clicks per model (solid: clicks alone, dashed:
    a tight box then clicks, the box alone at 0), atlas and automatic passes as flat lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    datasets = sorted({s["dataset"] for s in summary})
    figure, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False, sharey=True)
    for axis, dataset in zip(axes[0], datasets):
        lines: dict[tuple, dict[int, float]] = defaultdict(dict)
        flat: dict[str, float] = {}
        for s in (s for s in summary if s["dataset"] == dataset):
            name = s["model"].removesuffix(".safetensors") + ("" if s["backend"] == "engine" else f" ({s['backend']})")
            k = int("".join(c for c in s["setting"] if c.isdigit()) or 0)
            if s["setting"].endswith("click"):
                lines[(name, "clicks")][k] = s["dice"]
            elif s["setting"] == "box" or s["setting"].startswith("box+"):
                lines[(name, "box+clicks")][k] = s["dice"]
            else:
                flat[f"{name} ({s['setting']})" if s["setting"] != s["model"] else name] = s["dice"]
        colours = {name: f"C{i}" for i, name in enumerate(sorted({name for name, _ in lines}))}
        for (name, kind), points in sorted(lines.items()):
            ks = sorted(points)
            label = name if kind == "clicks" else (f"{name}, box" if ks == [0] else f"{name}, box + clicks")
            axis.plot(
                ks, [points[k] for k in ks], "o-" if kind == "clicks" else "s--", color=colours[name], label=label
            )
        for name, value in sorted(flat.items()):
            axis.axhline(value, linestyle=":", color="grey" if "atlas" in name else "black", label=name)
        axis.set(title=dataset, xlabel="robot clicks (0: box only)", ylim=(0, 1))
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="best", framealpha=0.6)
    axes[0][0].set_ylabel("mean Dice over structures")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def accuracy_table(summary: list[dict], value: str = "dice") -> str:
    """Text table of mean `value` (dice or hd95): a row per (dataset, model, backend), a column
    per setting."""
    settings = sorted({s["setting"] for s in summary}, key=_order)
    cells = {(*[s[k] for k in GROUP], s["setting"]): s[value] for s in summary}
    groups = sorted({tuple(s[k] for k in GROUP) for s in summary})
    width = max([len(" / ".join(g)) for g in groups] + [10]) + 2
    lines = [f"{'mean ' + value:{width}s}" + "".join(f"{c:>9s}" for c in settings)]
    for group in groups:
        values = [cells.get((*group, c)) for c in settings]
        lines.append(
            f"{' / '.join(group):{width}s}" + "".join("        -" if v is None else f"{v:9.3f}" for v in values)
        )
    return "\n".join(lines)


def structure_table(rows: list[dict], dataset: str, model: str, backend: str = "engine") -> str:
    """Text table of mean Dice per structure (rows) and setting (columns) for one model."""
    table: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if (row["dataset"], row["model"], row["backend"]) == (dataset, model, backend):
            table[row["structure"]][setting(row)].append(row["dice"])
    settings = sorted({c for by in table.values() for c in by}, key=_order)
    lines = [f"{dataset} / {model}", f"{'structure':22s}" + "".join(f"{c:>9s}" for c in settings)]
    for structure, by in table.items():
        lines.append(f"{structure:22s}" + "".join(f"{np.mean(by[c]):9.3f}" if by[c] else "        -" for c in settings))
    return "\n".join(lines)


def latency_table(latency: list[dict]) -> str:
    """Text table of request latency and per-stage cost."""
    lines = [
        f"{'dataset / model / backend':40s} {'request':>10s} {'n':>4s} {'p50 s':>7s} {'p95 s':>7s} {'slices':>7s} {'enc s/sl':>9s} {'dec ms':>7s}"
    ]
    for s in latency:
        enc, dec = s["encoder_s_per_slice"], s["decoder_ms_per_prompt"]
        lines.append(f"{' / '.join(s[k] for k in GROUP):40s} {s['request']:>10s} {s['n']:4d} {s['p50_s']:7.2f} {s['p95_s']:7.2f} {s['encoded_per_request']:7.1f} "
                     + ("        -" if enc is None else f"{enc:9.2f}") + ("       -" if dec is None else f"{dec:8.0f}"))  # fmt: skip
    return "\n".join(lines)


def print_report(results: dict, out=sys.stdout) -> None:
    """Every table of a results dictionary (as `brainsam.evaluation.evaluate` writes it)."""
    print(accuracy_table(results["accuracy"]), file=out)
    print(file=out)
    print(accuracy_table(results["accuracy"], "hd95").replace("mean hd95", "HD95 mm "), file=out)
    for group in sorted({tuple(s[k] for k in GROUP) for s in results["accuracy"]}):
        print(file=out)
        print(structure_table(results["rows"], *group), file=out)
    if results["latency"]:
        print(file=out)
        print(latency_table(results["latency"]), file=out)
    for key in ("memory", "peers", "training"):
        if results.get(key):
            print(f"\n{key}: {json.dumps(results[key], indent=1)}", file=out)


def to_json(value: object) -> object:
    """Values JSON can hold: infinities and NaN become None (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def combine(results: list[dict]) -> dict:
    """Several results files as one: rows joined, summaries recomputed, the rest by file."""
    rows = [row for r in results for row in r["rows"]]
    return {
        "meta": [r["meta"] for r in results], "rows": rows, "accuracy": accuracy_summary(rows), "latency": latency_summary(rows),
        "memory": [r.get("memory") for r in results], "peers": [r["peers"] for r in results if r.get("peers")],
        "training": next((r["training"] for r in results if r.get("training")), None),
    }  # fmt: skip
