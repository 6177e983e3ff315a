"""Regenerate the tables of docs/reliability.md from a run of the tests that record them.

    .venv/bin/python scripts/reliability_table.py [--rows FOLDER]

Runs tests/test_reliability.py and tests/test_saved_work.py (about 6 minutes on 2 idle cores)
with BRAINSAM_RELIABILITY_ROWS set to a folder, so each passing check writes its row (case, what
the server answered) to <folder>/<table>.json, and replaces each table between its markers in
docs/reliability.md. If a test fails, the file is left as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE_FILE = ROOT / "docs" / "reliability.md"


@dataclass(frozen=True)
class Table:
    """One generated table: the test module that records it, the name it records under
    (tests/support.TableRows), and the marker name round it in docs/reliability.md."""

    module: str
    rows: str
    marker: str

    def markers(self) -> tuple[str, str]:
        return f"<!-- {self.marker}: start -->", f"<!-- {self.marker}: end -->"


TABLES = (
    Table("tests/test_reliability.py", "reliability", "reliability-table"),
    Table("tests/test_saved_work.py", "saved_work", "fault-injection-table"),
)
INTRO = (
    "Each row is a check of `{module}` against the real server, written by the test once its\n"
    "assertions passed; `.venv/bin/python scripts/reliability_table.py` reruns the tests and\n"
    "rewrites this table ({date})."
)


def run_tests(folder: Path) -> int:
    command = [sys.executable, "-m", "pytest", *(t.module for t in TABLES), "-q", "-p", "no:cacheprovider"]
    return subprocess.call(command, cwd=ROOT, env={**os.environ, "BRAINSAM_RELIABILITY_ROWS": str(folder)})


def cell(text: str) -> str:
    """`text` as one markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def render(table: Table, rows: list[dict[str, str]]) -> str:
    """The generated text: a line saying where it comes from and a markdown table of the rows."""
    intro = INTRO.format(module=table.module, date=time.strftime("%Y-%m-%d"))
    lines = [intro, "", "| case | what happens |", "|---|---|"]
    lines += [f"| {cell(row['case'])} | {cell(row['outcome'])} |" for row in rows]
    return "\n".join(lines) + "\n"


def replace_table(text: str, table: Table, body: str) -> str:
    """`text` with the text between the table's markers replaced by `body`."""
    start, end = table.markers()
    if text.count(start) != 1 or text.count(end) != 1:
        raise SystemExit(f"{TABLE_FILE.name} must hold the markers {start} and {end} once each")
    head, rest = text.split(start)
    return f"{head}{start}\n{body}{end}{rest.split(end)[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--rows",
        type=Path,
        help="a folder of rows written by an earlier run (BRAINSAM_RELIABILITY_ROWS) instead of running the tests",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.rows or Path(scratch)
        files = [folder / f"{t.rows}.json" for t in TABLES]
        if args.rows is None and run_tests(folder) != 0 or not all(f.is_file() for f in files):
            print(f"tests failed: {TABLE_FILE} left unchanged", file=sys.stderr)
            return 1
        text = TABLE_FILE.read_text()
        for table, rows in zip(TABLES, files):
            text = replace_table(text, table, render(table, json.loads(rows.read_text())))
    TABLE_FILE.write_text(text)
    print(f"{TABLE_FILE.relative_to(ROOT)}: {len(TABLES)} tables rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
