"""Command line: segment one structure of one MRI from clicks and/or a box, timing each stage.

python -m brainsam.segment IMAGE --label Left-Thalamus --click 120,130,128 -o mask.nii.gz
python -m brainsam.segment IMAGE --label Brain-Stem --box 110,145,90,160,100,140 -o mask.nii.gz
"""

from __future__ import annotations

import argparse
import sys
import time

from brainsam.core.config import load_config
from brainsam.core.prompts import PromptError
from brainsam.core.volume import VolumeError, load_volume, save_mask
from brainsam.inference.engine import Engine


def _triple(text: str) -> list[int]:
    values = [int(v) for v in text.split(",")]
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected i,j,k, got {text!r}")
    return values


def _box(text: str) -> list[int]:
    values = [int(v) for v in text.split(",")]
    if len(values) != 6:
        raise argparse.ArgumentTypeError(f"expected i_min,i_max,j_min,j_max,k_min,k_max, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m brainsam.segment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("image", help="NIfTI image (any orientation)")
    parser.add_argument("--label", required=True, help="structure name from the label set, e.g. Left-Thalamus")
    parser.add_argument(
        "--click",
        type=_triple,
        action="append",
        default=[],
        help="foreground click i,j,k (stored voxel indices); repeatable",
    )
    parser.add_argument(
        "--background", type=_triple, action="append", default=[], help="background click i,j,k; repeatable"
    )
    parser.add_argument("--box", type=_box, help="3D box i_min,i_max,j_min,j_max,k_min,k_max (3D Slicer ROI order)")
    parser.add_argument("-o", "--output", default="mask.nii.gz", help="where to write the mask (default mask.nii.gz)")
    parser.add_argument("--config", default="litemedsam", help="engine config name in configs/backbones or a YAML path")
    parser.add_argument("--adapter", help="LoRA adapter (.safetensors) to apply")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an engine setting")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    began = time.perf_counter()
    engine = Engine(load_config(args.config, **overrides), adapter=args.adapter)
    model_s = time.perf_counter() - began
    try:
        began = time.perf_counter()
        volume = load_volume(args.image)
        image = engine.prepare(volume)
        load_s = time.perf_counter() - began
        began = time.perf_counter()
        state = engine.segment(image, args.label, args.click, [], args.box)
        if args.background:
            state = engine.refine(image, state, [], args.background)
        segment_s = time.perf_counter() - began
    except (KeyError, PromptError, VolumeError) as error:
        print(f"error: {error.args[0] if error.args else error}", file=sys.stderr)
        return 2
    mask = engine.canonical_mask(image, state)
    save_mask(volume, mask, args.output)
    timings, counts = engine.predictor.timings, engine.predictor.counts
    print(f"model   {model_s:7.2f} s  ({engine.config.backbone})")
    print(f"load    {load_s:7.2f} s  ({volume.stored_shape}, axis {image.view.axis})")
    print(f"encode  {timings['encode']:7.2f} s  ({counts['encode']} slices)")
    print(f"decode  {timings['decode']:7.2f} s  ({counts['decode']} prompts)")
    print(
        f"propagate total {segment_s:7.2f} s  ({len(state.slices)} slices, {int(mask.sum())} voxels) -> {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
