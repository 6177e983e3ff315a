"""One annotator's prompts on one structure, answered in-process (engine) or by a server (REST).

Both backends take the prompts as 3D Slicer sends them (every click so far, the newest last,
plus an optional ROI) and answer with the mask on the image's stored grid and what the request
cost, so the evaluation drives them with the same robot and compares them row by row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from monailabel.client import MONAILabelClient

from brainsam.atlases.fusion import AtlasFusion
from brainsam.core.prompts import Prompts
from brainsam.evaluation.remote import MODEL, read_mask
from brainsam.inference.engine import Engine
from brainsam.inference.state import PreparedImage, Segmentation


@dataclass
class Reply:
    """One request's result: boolean mask on the stored grid, seconds as the client saw them,
    slices encoded and prompts decoded for it, encoder and decoder seconds (None when the
    backend does not tell)."""

    mask: np.ndarray
    seconds: float
    encoded: int
    decoded: int | None = None
    encode_s: float | None = None
    decode_s: float | None = None


class EngineSession:
    """Prompts on one structure answered by an in-process engine: the first request segments
    (guided by `atlases`, the registered atlases' fusion on the image, when given:
    `Engine.segment`), each later one refines with the clicks added since."""

    def __init__(self, engine: Engine, image: PreparedImage, atlases: AtlasFusion | None = None):
        self.engine, self.image, self.atlases = engine, image, atlases
        self.state: Segmentation | None = None
        self.seen = (0, 0)

    def ask(self, prompts: Prompts) -> Reply:
        timings, counts = self.engine.predictor.timings, self.engine.predictor.counts
        before = (timings["encode"], timings["decode"], counts["encode"], counts["decode"])
        began = time.perf_counter()
        fg, bg = prompts.foreground[self.seen[0] :], prompts.background[self.seen[1] :]
        if self.state is None:
            self.state = self.engine.segment(self.image, prompts.label, fg, bg, prompts.roi, self.atlases)
        else:
            self.state = self.engine.refine(self.image, self.state, fg, bg)
        mask = self.engine.stored_mask(self.image, self.state) > 0
        seconds = time.perf_counter() - began
        self.seen = (len(prompts.foreground), len(prompts.background))
        return Reply(
            mask,
            seconds,
            encoded=counts["encode"] - before[2],
            decoded=counts["decode"] - before[3],
            encode_s=timings["encode"] - before[0],
            decode_s=timings["decode"] - before[1],
        )


class ServerSession:
    """Prompts on one structure sent to a running server as Slicer sends them: all clicks so
    far on every request, reset_state on the first."""

    def __init__(self, client: MONAILabelClient, image_id: str):
        self.client, self.image_id = client, image_id
        self.first = True

    def ask(self, prompts: Prompts) -> Reply:
        params = {
            "label": prompts.label,
            "foreground": prompts.foreground,
            "background": prompts.background,
            "reset_state": self.first,
        }
        if prompts.roi is not None:
            params["roi"] = prompts.roi
        began = time.perf_counter()
        path, result = self.client.infer(MODEL, self.image_id, params)
        seconds = time.perf_counter() - began
        self.first = False
        mask, _ = read_mask(path)
        Path(path).unlink(missing_ok=True)
        return Reply(mask > 0, seconds, encoded=int(result.get("encoded_slices", 0)))
