"""The engine to answer with: built at the first request, moved to the newest usable adapter.

Training publishes adapters (.safetensors, written atomically) into the model folder. Each
request looks for a newer one (a directory listing, no file reads), so a new adapter serves
from the next click on, without a restart. An adapter that cannot be used is refused once
with a log line, and whatever served before keeps serving.
"""

import logging
from pathlib import Path
from typing import Optional

from brainsam.core.config import EngineConfig
from brainsam.core.labels import LabelSet
from brainsam.inference.engine import Engine
from brainsam.modeling.adapters import ADAPTER_PATTERN, AdapterError, read_manifest

logger = logging.getLogger(__name__)

Fingerprint = tuple[Path, int, int]
"""(path, mtime in ns, size) of an adapter file: a rewritten file is a new candidate."""


class AdapterWatcher:
    """Owns the engine and keeps it on the newest adapter in `source` that loads.

    source: an adapter file, a folder of them, or None for the base model only.
    """

    def __init__(self, config: EngineConfig, labels: LabelSet, source: Optional[Path]):
        self.config = config
        self.labels = labels
        self.source = source
        self.serving: Optional[Path] = None
        self._engine: Optional[Engine] = None
        self._served: Optional[Fingerprint] = None
        self._refused: set[Fingerprint] = set()

    def engine(self) -> Engine:
        """The engine for this request: on the newest usable adapter, else on what served before,
        else the base model."""
        for candidate in self._candidates():
            if candidate == self._served or (candidate not in self._refused and self._load(candidate)):
                break
        if self._engine is None:
            logger.info(
                "no usable adapter (adapter %s): serving the base %s model", self.source or "none", self.config.backbone
            )
            self._engine = Engine(self.config, self.labels)
        return self._engine

    def _candidates(self) -> list[Fingerprint]:
        """Adapter files in `source`, newest first."""
        if self.source is None:
            return []
        paths = list(self.source.glob(ADAPTER_PATTERN)) if self.source.is_dir() else [self.source]
        found = []
        for path in paths:
            try:
                stat = path.stat()
            except FileNotFoundError:  # absent, or removed since the listing
                continue
            found.append((path, stat.st_mtime_ns, stat.st_size))
        return sorted(found, key=lambda item: (item[1], item[0].name), reverse=True)

    def _load(self, candidate: Fingerprint) -> bool:
        """Build an engine on adapter `candidate`; on failure refuse the file and return False."""
        path = candidate[0]
        try:
            backbone = read_manifest(path).get("backbone")
            if backbone != self.config.backbone:
                raise AdapterError(f"it was trained for backbone {backbone}, this server runs {self.config.backbone}")
            engine = Engine(self.config, self.labels, adapter=path)
        except Exception as error:  # an unusable file must never stop the server: any failure refuses it
            self._refused.add(candidate)
            logger.warning("refused adapter %s: %s; still serving %s", path, error, self.serving or "the base model")
            return False
        self._engine, self._served, self.serving = engine, candidate, path
        logger.info("serving adapter %s (created %s)", path, engine.manifest.get("created"))
        return True
