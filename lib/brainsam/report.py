"""Evaluation results as files and tables: JSON, CSV, the Dice-vs-clicks plot, text tables.

    python -m brainsam.report docs/evaluation.json        # print the tables of a results file
    python -m brainsam.report A.json B.json --plot both.png  # several runs together

How it works: brainsam.evaluation.report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from brainsam.evaluation.report import combine, plot_dice_vs_clicks, print_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m brainsam.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", type=Path, nargs="+", help="JSON files written by python -m brainsam.evaluate")
    parser.add_argument("--plot", type=Path, help="write the Dice-vs-clicks plot of all of them here (PNG)")
    args = parser.parse_args(argv)
    results = [json.loads(path.read_text()) for path in args.results]
    combined = results[0] if len(results) == 1 else combine(results)
    print_report(combined)
    if args.plot:
        plot_dice_vs_clicks(combined["accuracy"], args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
