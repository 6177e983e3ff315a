"""A training run's progress file (train_stats.json), which the server shows while it runs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from brainsam.core.files import replaced_atomically


class Progress:
    """Where a run stands, written atomically as JSON after every event so the server can show it."""

    def __init__(self, path: Path | None, **fields: Any):
        self.path = path
        self.state: dict[str, Any] = {
            "state": "running",
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **fields,
        }
        self.update()

    def update(self, **fields: Any) -> None:
        self.state.update(fields)
        if self.path is None:
            return
        with replaced_atomically(self.path) as partial:
            partial.write_text(json.dumps(self.state, indent=1, default=str))
