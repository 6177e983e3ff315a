"""Arguments shared by the commands (every other top-level module of brainsam is one)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_labelled_folder_arguments(parser: argparse.ArgumentParser, label_file: str, mapping: str) -> None:
    """The command-line arguments naming a folder of labelled subject folders: `folder`,
    `--image`, `--labels` (default `label_file`) and `--mapping` (default `mapping`)."""
    parser.add_argument("folder", type=Path, help="folder of subject folders, each with an image and a label file")
    parser.add_argument("--image", default="T1.nii.gz", help="image file name in each subject folder")
    parser.add_argument("--labels", default=label_file, help="label file name in each subject folder")
    parser.add_argument("--mapping", default=mapping, help="structure name -> label value YAML (configs/mappings)")
