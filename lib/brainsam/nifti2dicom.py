"""Convert NIfTI volumes to DICOM MR series (brainsam.io.dicom) and store them in a DICOMweb archive.

    brainsam-nifti2dicom sample-data/studies --stow http://127.0.0.1:8042/dicom-web
    python -m brainsam.nifti2dicom IMAGE.nii.gz ... --out DICOM_FOLDER

Each image becomes one study with one series, its patient named after the file. UIDs derive
from the file's content, so storing the same file again replaces its series instead of adding one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pydicom
from dicomweb_client import DICOMwebClient

from brainsam.io.dicom import SeriesError, SeriesNames, nifti_to_series

NIFTI = ("*.nii.gz", "*.nii")
BATCH = 32
"""Slices per STOW-RS request (a 1 mm slice is ~130 kB)."""


def images(paths: list[Path]) -> list[Path]:
    """The NIfTI files named, folders replaced by the NIfTI files they hold."""
    found = []
    for path in paths:
        found += sorted(f for pattern in NIFTI for f in path.glob(pattern)) if path.is_dir() else [path]
    return found


def name_of(path: Path) -> str:
    """The file name without its NIfTI extension."""
    return path.name.removesuffix(".gz").removesuffix(".nii")


def store(files: list[Path], client: DICOMwebClient) -> None:
    """Store the DICOM `files` in the archive, BATCH at a time."""
    for start in range(0, len(files), BATCH):
        client.store_instances([pydicom.dcmread(str(f)) for f in files[start : start + BATCH]])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="brainsam-nifti2dicom", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("images", type=Path, nargs="+", help="NIfTI files or folders of them")
    parser.add_argument("--stow", metavar="URL", help="DICOMweb root to store the series in (STOW-RS)")
    parser.add_argument("--out", type=Path, help="folder to keep the DICOM files in (one subfolder per image)")
    args = parser.parse_args(argv)
    if not args.stow and not args.out:
        parser.error("give --stow URL, --out DIR or both")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = DICOMwebClient(args.stow) if args.stow else None
    found = images(args.images)
    if not found:
        print(f"error: no NIfTI image in {' '.join(map(str, args.images))}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        for image in found:
            folder = (args.out or Path(tmp)) / name_of(image)
            try:
                files = nifti_to_series(image, folder, SeriesNames(patient_id=name_of(image)))
            except (SeriesError, OSError) as error:
                print(f"error: {image}: {error}", file=sys.stderr)
                return 1
            if client is not None:
                store(files, client)
            series = pydicom.dcmread(str(files[0]), stop_before_pixels=True).SeriesInstanceUID
            print(f"{image.name}: series {series}, {len(files)} slices{' stored' if client else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
