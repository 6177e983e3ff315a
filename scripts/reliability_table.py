"""Regenerate the reliability table (docs/reliability.md) from a run of tests/test_reliability.py.

    .venv/bin/python scripts/reliability_table.py [--rows FILE]

Runs the tests (about 5 minutes on 2 idle cores) with BRAINSAM_RELIABILITY_ROWS set, so each
passing check writes its row (case, what the server answered), and replaces the table between
the markers START and END of docs/reliability.md (section SECTION). If a test fails, the file is
left as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "# Reliability: what was tried and what happens"
TABLE_FILE = ROOT / "docs" / "reliability.md"
START, END = "<!-- reliability-table: start -->", "<!-- reliability-table: end -->"
INTRO = (
    "Each row is a check of `tests/test_reliability.py` against the real server (and its train\n"
    "subprocess), written by the test once its assertions passed; `.venv/bin/python\n"
    "scripts/reliability_table.py` reruns the tests and rewrites this table ({date})."
)


def run_tests(rows: Path) -> int:
    command = [sys.executable, "-m", "pytest", "tests/test_reliability.py", "-q", "-p", "no:cacheprovider"]
    return subprocess.call(command, cwd=ROOT, env={**os.environ, "BRAINSAM_RELIABILITY_ROWS": str(rows)})


def cell(text: str) -> str:
    """`text` as one markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: list[dict[str, str]]) -> str:
    """The generated text: a line saying where it comes from and a markdown table of the rows."""
    lines = [INTRO.format(date=time.strftime("%Y-%m-%d")), "", "| case | what happens |", "|---|---|"]
    lines += [f"| {cell(row['case'])} | {cell(row['outcome'])} |" for row in rows]
    return "\n".join(lines) + "\n"


def replace_table(text: str, body: str) -> str:
    """`text` with the text between START and END (in SECTION) replaced by `body`."""
    if text.count(START) != 1 or text.count(END) != 1:
        raise SystemExit(f"{TABLE_FILE.name} must hold the markers {START} and {END} once each, in {SECTION}")
    head, rest = text.split(START)
    return f"{head}{START}\n{body}{END}{rest.split(END)[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--rows",
        type=Path,
        help="rows written by an earlier run (BRAINSAM_RELIABILITY_ROWS) instead of running the tests",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        rows = args.rows or Path(folder) / "rows.json"
        if args.rows is None and run_tests(rows) != 0 or not rows.is_file():
            print(f"tests failed: {TABLE_FILE} left unchanged", file=sys.stderr)
            return 1
        body = render(json.loads(rows.read_text()))
    TABLE_FILE.write_text(replace_table(TABLE_FILE.read_text(), body))
    print(f"{TABLE_FILE.relative_to(ROOT)}: the table of {SECTION!r} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
