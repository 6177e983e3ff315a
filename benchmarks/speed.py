"""Eager float32 against the path brainsam.runtime chooses, side by side in one run.

    nice -n 5 .venv/bin/python -m benchmarks.speed [--parts encoder decoder train compile prepare] \
        [--repeats 3] [--atlases 5] [--runtime auto]

Prints, for each part, the seconds of eager float32 (today's path) and of the chosen path
(`--runtime`, default auto: what a server on this machine runs) and their ratio:
- encoder: the LiteMedSAM image encoder on a batch of 4 slices (what a click encodes at once),
  per slice, and the chosen path's relative error on the embeddings;
- decoder: prompt encoder + mask decoder on one slice's embedding: a box, a click (three
  candidate masks), 8 boxes at once;
- train: a training step, forward and backward through the LoRA-adapted upper stages of the
  encoder (configs/training/litemedsam.yaml: blocks 6-9, the neck) and the decoder, for 4
  structures and 3 rounds with the previous logits fed back, as brainsam.train steps;
- compile: what a server's warm-up (Predictor.warm_up) costs in a new process, with an empty
  compile cache (cold) and with the cache the cold one left (warm);
- prepare: a new 1 mm image made ready as the server's scoring makes it: `--atlases` labelled
  fs-aseg subjects registered onto fs-aseg sub-01 (brainsam.auto.first_pass, once: it runs no
  network) plus the precomputation of its slices (Engine.precompute), eager and chosen; also in
  units of the eager encoder's seconds per slice (the issue's goal: <= 45).
Rounds alternate between the paths, so load from other work hits both alike; the load average
is printed. Times are the best of `--repeats` (wall clock; CPU seconds beside them). Needs
../shared/data for `prepare`. Prints figures only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from monai.losses import DiceFocalLoss

from brainsam.activations import SplitEncoder
from brainsam.backbones import LOW_RES, Backbone, load_backbone
from brainsam.config import load_config
from brainsam.lora import add_lora
from brainsam.runtime import Choice, Runtime
from brainsam.train import load_train_settings

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "fs-aseg"
PARTS = ("encoder", "decoder", "train", "compile", "prepare")
BATCH = 4
TARGET = "sub-01"


def timed(paths: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Best (wall, CPU) seconds of each path over `repeats` rounds that alternate the paths;
    each path runs once before timing (compiling, if it compiles)."""
    for run in paths.values():
        run()
    best = {name: (float("inf"), float("inf")) for name in paths}
    for _ in range(repeats):
        for name, run in paths.items():
            cpu, wall = time.process_time(), time.perf_counter()
            run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def report(part: str, figures: dict[str, tuple[float, float]], per: int = 1, unit: str = "s") -> None:
    """One line per path, with the ratio of eager to it."""
    eager = figures["eager"][0]
    for name, (wall, cpu) in figures.items():
        print(f"  {part:<26} {name:<22} {wall / per:8.3f} {unit}  (CPU {cpu / per:7.3f})  x{eager / wall:5.2f}", flush=True)


def encoder(backbone: Backbone, chosen: Runtime, repeats: int) -> float:
    """Encoder lines; returns eager seconds per slice."""
    crops = torch.rand(BATCH, backbone.input_size, backbone.input_size)
    eager = Runtime(torch.device("cpu"), Choice(compiled=False, bf16=False)).encoder(backbone.encode)
    fast = chosen.encoder(backbone.encode)
    with torch.inference_mode():
        reference, result = eager(crops), fast(crops)
        figures = timed({"eager": lambda: eager(crops), str(chosen.choice): lambda: fast(crops)}, repeats)
    error = float((result - reference).norm() / reference.norm())
    report(f"encoder (batch {BATCH}), per slice", figures, BATCH)
    print(f"  {'':<26} relative error of the embeddings {error:.1e}")
    return figures["eager"][0] / BATCH


def decoder(backbone: Backbone, chosen: Runtime, repeats: int) -> None:
    """Decoder lines: a box, a click with three candidates, 8 boxes."""
    embedding = torch.randn(256, 64, 64)
    box = torch.tensor([60.0, 70.0, 120.0, 140.0])
    point, label = torch.tensor([[90.0, 100.0]]), torch.tensor([1])
    eager = backbone.decode_batch
    fast = chosen.decoder(backbone.decode_batch)
    cases = {
        "decoder: a box": lambda f: f(embedding, None, None, box[None], None),
        "decoder: a click (3 masks)": lambda f: f(embedding, point[None], label[None], None, None, True),
        "decoder: 8 boxes": lambda f: f(embedding, None, None, box.repeat(8, 1), None),
    }
    with torch.inference_mode():
        for name, case in cases.items():
            report(name, timed({"eager": lambda: case(eager), str(chosen.choice): lambda: case(fast)}, repeats), unit="s")


def train_step(backbone: Backbone, chosen: Runtime, repeats: int) -> None:
    """Training step lines (see module doc)."""
    settings = load_train_settings("litemedsam")
    add_lora(backbone, settings.lora_settings())
    split = SplitEncoder(backbone)
    activations = split.below(torch.rand(1, backbone.input_size, backbone.input_size))
    boxes = torch.tensor([[40.0, 40.0, 90.0, 100.0], [120.0, 60.0, 160.0, 110.0], [60.0, 130.0, 110.0, 170.0], [150.0, 150.0, 200.0, 190.0]])
    targets = torch.zeros(4, 1, LOW_RES, LOW_RES)
    for row, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        targets[row, 0, y0 + 5 : y1 - 5, x0 + 5 : x1 - 5] = 1
    loss = DiceFocalLoss(sigmoid=True)

    def step(above: Callable, decode: Callable) -> None:
        embedding = above(activations)[0]
        previous, total = None, 0.0
        for _ in range(3):
            logits, iou = decode(embedding, None, None, boxes, previous)
            total = total + loss(logits[:, :1], targets) + (iou[:, 0] - 0.5).square().mean()
            previous = logits[:, 0].detach()
        total.backward()
        backbone.zero_grad(set_to_none=True)

    above, decode = chosen.train_step(split.above), chosen.train_step(backbone.decode_batch)
    report("train step (4 x 3 decodes)", timed({"eager": lambda: step(split.above, backbone.decode_batch), str(chosen.choice): lambda: step(above, decode)}, repeats))


PROBE = """
import sys, time
began = time.perf_counter()
from brainsam.config import load_config
from brainsam.engine import Engine
engine = Engine(load_config(runtime=sys.argv[1], compile_cache=sys.argv[2], interactive=True))
loaded = time.perf_counter()
engine.predictor.warm_up()
print(f"{loaded - began:.1f} {time.perf_counter() - loaded:.1f}")
"""


def compile_cost(setting: str) -> None:
    """Warm-up seconds of a new server process, cold and warm compile cache."""
    with tempfile.TemporaryDirectory() as folder:
        for state in ("cold", "warm"):
            done = subprocess.run([sys.executable, "-c", PROBE, setting, folder], capture_output=True, text=True, check=True)
            load, warm = done.stdout.split()[-2:]
            print(f"  {'server warm-up, ' + state + ' cache':<26} {setting:<22} {float(warm):8.1f} s  (network loaded in {load} s before)", flush=True)


def prepare(setting: str, atlases: int, eager_per_slice: float | None) -> None:
    """A new image made ready: registrations once, then precomputation eager and chosen."""
    from brainsam.atlas import load_atlas
    from brainsam.auto import first_pass
    from brainsam.engine import Engine
    from brainsam.labels import load_label_set, load_mapping
    from brainsam.volume import load_volume

    labels = load_label_set()
    mapping = load_mapping(ROOT / "configs" / "mappings" / "aseg.yaml")
    names = [p.name for p in sorted(DATA.iterdir()) if p.name != TARGET][:atlases]
    image = DATA / TARGET / "T1.nii.gz"
    with tempfile.TemporaryDirectory() as folder:
        began = time.perf_counter()
        found = [load_atlas(DATA / n / "T1.nii.gz", DATA / n / "aseg.nii.gz", mapping, labels, name=n).prepared() for n in names]
        first_pass(found, load_volume(image), labels, None, cache=Path(folder) / "atlas_cache")
        registration = time.perf_counter() - began
        print(f"  {'registration':<26} {len(found)} atlases onto {TARGET}: {registration:.1f} s (no network: the same for both paths)", flush=True)
        seconds = {}
        for path in ("eager", setting):
            engine = Engine(load_config(runtime=path, embedding_dir=str(Path(folder) / path), encode_batch=1))
            with torch.inference_mode():
                engine.predictor.warm_up()  # compiled before: the server's scoring finds the cache warm
            began = time.perf_counter()
            encoded = engine.precompute(image)
            seconds[path] = time.perf_counter() - began
            print(f"  {'precompute':<26} {str(engine.predictor.runtime.choice):<22} {seconds[path]:8.1f} s for {encoded} slices", flush=True)
        for path, value in seconds.items():
            total = registration + value
            relative = f", {total / eager_per_slice:.0f}x the eager encoder's s/slice" if eager_per_slice else ""
            print(f"  {'new image ready':<26} {path:<22} {total:8.1f} s  x{(registration + seconds['eager']) / total:5.2f}{relative}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--atlases", type=int, default=5, help="labelled fs-aseg subjects registered in `prepare`")
    parser.add_argument("--runtime", default="auto", help="the path compared with eager (brainsam.runtime SETTINGS)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chosen = Runtime.for_device("cpu", args.runtime)
    print(f"chosen: {chosen.choice} (setting {args.runtime}); {args.threads} threads; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    eager_per_slice = None
    if "encoder" in args.parts:
        eager_per_slice = encoder(load_backbone("litemedsam"), chosen, args.repeats)
    if "decoder" in args.parts:
        decoder(load_backbone("litemedsam"), chosen, args.repeats)
    if "train" in args.parts:
        train_step(load_backbone("litemedsam"), chosen, args.repeats)
    if "compile" in args.parts:
        compile_cost(args.runtime)
    if "prepare" in args.parts:
        prepare(args.runtime, args.atlases, eager_per_slice)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
