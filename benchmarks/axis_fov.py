"""Which working axis and field of view suit LiteMedSAM on deep brain structures?

For each structure, its largest slice along each axis gets a tight box (the label's 2D bounding
box); Dice of the decoded mask on that slice is averaged per axis and field of view.

    python benchmarks/axis_fov.py ../shared/data/fs-aseg/sub-01 ../shared/data/fs-aseg/sub-04
"""

from __future__ import annotations

import argparse
import itertools
import json

import nibabel as nib
import numpy as np

from brainsam.core.config import load_config
from brainsam.core.labels import load_mapping
from brainsam.core.metrics import dice
from brainsam.core.view import SliceView
from brainsam.core.volume import load_volume
from brainsam.inference.engine import Engine
from brainsam.inference.propagation import SlicePrompt, bounding_box


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("subjects", nargs="+", help="folders holding T1.nii.gz and aseg.nii.gz")
    parser.add_argument("--fov", type=float, nargs="+", default=[120, 160, 256])
    parser.add_argument("--axes", nargs="+", default=["axial", "coronal", "sagittal"])
    parser.add_argument("--mapping", default="configs/mappings/aseg.yaml")
    args = parser.parse_args()
    engine = Engine(load_config())
    mapping = load_mapping(args.mapping)
    scores: dict[tuple[str, float], list[float]] = {}
    for subject in args.subjects:
        volume = load_volume(f"{subject}/T1.nii.gz")
        labels = nib.orientations.apply_orientation(
            np.asanyarray(nib.load(f"{subject}/aseg.nii.gz").dataobj), volume.ornt
        )
        for axis, fov in itertools.product(args.axes, args.fov):
            engine.predictor.config.axis, engine.predictor.config.fov_mm = axis, fov
            image = engine.prepare(volume)
            truth_view = SliceView(labels, volume.spacing, axis).stack
            for value in mapping.values():
                truth = truth_view == value
                index = int(truth.sum(axis=(1, 2)).argmax())
                box = bounding_box(truth[index])
                window = image.view.window_for(image.window, box[0], box[1])
                result = engine.predictor.predict(image, window, index, SlicePrompt(box))
                scores.setdefault((axis, fov), []).append(dice(result.mask, truth[index]))
            print(subject, axis, fov, f"{np.mean(scores[(axis, fov)]):.3f}", flush=True)
    print(
        json.dumps({f"{axis} fov{fov:g}": round(float(np.mean(v)), 3) for (axis, fov), v in scores.items()}, indent=1)
    )


if __name__ == "__main__":
    main()
