"""Masks written on the image's own grid and affine, in the format the client asked for."""

import os
import tempfile

import nrrd
import numpy as np

from brainsam.core.volume import Volume, save_mask, stored_for_file

EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def write_mask(volume: Volume, canonical_mask: np.ndarray, extension: str, dtype: np.dtype) -> str:
    """Write a canonical-order mask as `extension` (one of EXTENSIONS) on the stored grid of
    `volume`; return the path of a temporary file (the server deletes it once sent)."""
    handle, path = tempfile.mkstemp(prefix="brainsam-", suffix=extension)
    os.close(handle)
    if extension == ".nrrd":
        write_nrrd(stored_for_file(volume, canonical_mask, dtype), volume.affine, path)
    else:
        save_mask(volume, canonical_mask, path, dtype=dtype.name)
    return path


def write_nrrd(stored: np.ndarray, affine: np.ndarray, path: str) -> None:
    """Write a stored-order array as NRRD; NRRD geometry is LPS, NIfTI affines are RAS."""
    lps = RAS_TO_LPS @ affine[:3]
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:, :3].T,  # one row per array axis
        "space origin": lps[:, 3],
        "kinds": ["domain"] * 3,
        "encoding": "gzip",
    }
    nrrd.write(path, stored, header)


def uncompress_nrrd(path: str) -> None:
    """Rewrite a gzip-encoded NRRD file with raw encoding. OHIF asks for uncompressed results
    (`result_compress: false`) and its reader cannot inflate a gzip NRRD whose voxel count is
    odd (it views the bytes as 16-bit values)."""
    data, header = nrrd.read(path)
    if header.get("encoding") == "gzip":
        nrrd.write(path, data, {**header, "encoding": "raw"})
