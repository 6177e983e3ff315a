"""Talking to a running brainsam server as 3D Slicer does, and measuring what it costs.

Shared by the evaluation (`brainsam.evaluation.evaluate --server URL`), the latency benchmark and the
server tests: masks returned by the server are read back on their own grid, and a sampler
records the peak resident memory of the server process with its children (MONAI Label runs
scoring and training in subprocesses).
"""

from __future__ import annotations

import threading
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import psutil
from monailabel.client import MONAILabelClient

MODEL = "brainsam"
LPS = np.diag([-1.0, -1.0, 1.0])


def read_mask(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A returned mask file (NIfTI or NRRD) -> (array on its stored grid, RAS affine)."""
    if path.endswith(".nrrd"):
        data, header = nrrd.read(path)
        affine = np.eye(4)
        affine[:3, :3] = LPS @ np.asarray(header["space directions"], dtype=float).T
        affine[:3, 3] = LPS @ np.asarray(header["space origin"], dtype=float)
        return data, affine
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


def ensure_image(client: MONAILabelClient, image_id: str, path: Path) -> None:
    """Make image `path` available in the server's datastore as `image_id` (uploaded when the
    datastore lacks it, as Slicer's "upload volume" does)."""
    if image_id not in client.datastore().get("objects", {}):
        client.upload_image(str(path), image_id=image_id)


def server_pid(url: str) -> int | None:
    """Process id of this user's process listening on the port of `url` (None if not found)."""
    port = int(url.rstrip("/").rsplit(":", 1)[-1])
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            return connection.pid
    return None


class PeakMemory:
    """Samples the resident memory of a process and its children in a background thread.

    server_peak: peak RSS of the process itself; total_peak: of the process with its children.
    """

    def __init__(self, pid: int, interval_s: float = 0.2):
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.server_peak = self.total_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                server = self.process.memory_info().rss
                children = sum(child.memory_info().rss for child in self.process.children(recursive=True))
            except psutil.NoSuchProcess:  # a child ended between listing and reading
                continue
            self.server_peak = max(self.server_peak, server)
            self.total_peak = max(self.total_peak, server + children)
