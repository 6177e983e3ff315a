"""Does bfloat16 cost Dice? The encoder's bf16 arithmetic, emulated on any CPU, against float32.

    nice -n 5 .venv/bin/python -m benchmarks.bf16_accuracy ../shared/data/fs-aseg \
        --subjects sub-06 sub-07 [--modes box] [--paths eager compiled bf16]

The runtime (brainsam.core.runtime) runs the image encoder under bf16 autocast only where the CPU
computes bf16 natively (AMX or AVX512-BF16); elsewhere bf16 is emulated by oneDNN, 13x slower
than float32. So that its accuracy can be measured on any machine, `bf16` here runs the encoder
in float32 with the roundings bf16 autocast makes: the inputs of convolutions and matrix
products rounded to bf16, and every floating result (eager bf16's roundings; a compiled bf16
graph rounds less often, inside its fused kernels). The script first compares that emulation
with real bf16 autocast on one slice, then runs brainsam.evaluation.evaluate's robot in each mode on every
structure of each subject with each path (`eager` float32, `compiled` float32, `bf16` emulated;
the decoder float32 in all, as the runtime runs it on a CPU) and prints the mean Dice of each
path and its difference from eager float32. Prints figures only.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from brainsam.core.config import load_config
from brainsam.core.labels import load_label_set
from brainsam.core.volume import load_volume
from brainsam.evaluation.evaluate import MODES, annotate, dataset_of, load_subject
from brainsam.evaluation.sessions import EngineSession
from brainsam.inference.engine import Engine

aten = torch.ops.aten
PRODUCTS = {aten.convolution.default, aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
"""The operations bf16 autocast runs in bf16 (what the encoder calls of its list)."""


def to_bf16(value: object) -> object:
    """A float32 tensor rounded to the nearest bfloat16 (kept float32); anything else as is."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.to(torch.bfloat16).to(torch.float32)
    return value


class Bf16Rounding(TorchDispatchMode):
    """Float32 arithmetic with bf16 autocast's roundings (see module doc)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in PRODUCTS:
            args, kwargs = tree_map(to_bf16, args), tree_map(to_bf16, kwargs)
        return tree_map(to_bf16, func(*args, **kwargs))


def emulated(encode):
    """`encode` run under Bf16Rounding."""

    def run(crops: torch.Tensor) -> torch.Tensor:
        with Bf16Rounding():
            return encode(crops)

    return run


def check_emulation(engine: Engine) -> None:
    """Relative errors against float32 of real bf16 autocast and of the emulation, and between them, on one slice."""
    crops = torch.rand(1, engine.backbone.input_size, engine.backbone.input_size)
    with torch.inference_mode():
        reference = engine.backbone.encode(crops)
        began = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            real = engine.backbone.encode(crops).float()
        seconds = time.perf_counter() - began
        emulation = emulated(engine.backbone.encode)(crops)
    error = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    print(f"one slice: real bf16 autocast vs float32 {error(real, reference):.2e} ({seconds:.0f} s), "
          f"emulation vs float32 {error(emulation, reference):.2e}, emulation vs real bf16 {error(emulation, real):.2e}", flush=True)  # fmt: skip


def engines(paths: list[str]) -> dict[str, Engine]:
    """An engine per path, each with its own embedding cache."""
    out = {}
    for path in paths:
        engine = Engine(load_config(runtime="compiled" if path == "compiled" else "eager"))
        if path == "bf16":
            engine.predictor.encode = emulated(engine.backbone.encode)
        out[path] = engine
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--subjects", nargs="+", required=True)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["box"])
    parser.add_argument("--paths", nargs="+", choices=("eager", "compiled", "bf16"), default=["eager", "bf16"])
    parser.add_argument(
        "--no-check", action="store_true", help="skip the one-slice check against real bf16 (slow without native bf16)"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(
        f"load average {os.getloadavg()[0]:.2f}; paths {args.paths}; modes {args.modes}; subjects {args.subjects}",
        flush=True,
    )
    dataset = dataset_of(args.folder, "T1.nii.gz", None, None)
    label_set = load_label_set()
    models = engines(args.paths)
    if not args.no_check:
        check_emulation(next(iter(models.values())))
    dice: dict[str, list[float]] = {path: [] for path in models}
    for folder in dataset.subjects(args.subjects):
        subject = load_subject(dataset, folder)
        volume = load_volume(subject.image)
        for path, engine in models.items():
            began, image = time.perf_counter(), engine.prepare(volume)
            scores = []
            for name in label_set.names:
                truth = subject.labels == dataset.ids.get(name, -1)
                if not truth.any():
                    continue
                for mode in args.modes:
                    scores.append(
                        annotate(EngineSession(engine, image), truth, name, subject.spacing, mode, 1)[-1]["dice"]
                    )
            dice[path] += scores
            print(
                f"{subject.name} {path:<9} mean Dice {np.mean(scores):.4f} over {len(scores)} structure-modes ({time.perf_counter() - began:.0f} s)",
                flush=True,
            )
    for path, scores in dice.items():
        print(
            f"{path:<9} mean Dice {np.mean(scores):.4f}  difference from eager {np.mean(scores) - np.mean(dice['eager']):+.4f}  largest |difference| per structure {np.max(np.abs(np.array(scores) - np.array(dice['eager']))):.4f}"
        )


if __name__ == "__main__":
    main()
