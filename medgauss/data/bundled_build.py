"""How the bundled example CT (``medgauss/data/bundled/``) is derived from the full-resolution copy.

The package ships a small derived copy of one real chest CT so that the pretraining recipe runs
with no download. This module is the exact, re-runnable recipe for that copy::

    python -m medgauss.data.bundled_build /path/to/example_ct medgauss/data/bundled

Derivation (all in the RAS voxel grid of the source, 1.5 mm isotropic):

1. crop the anterior-posterior axis (array axis 1) to voxels ``[20, 214)``, which holds the whole body
   (the rest is air and table), and trim every axis to an even length;
2. downsample 2x2x2 to 3.0 mm: CT by the block mean (anti-aliased), labels by the block majority;
3. round the CT to int16 HU, clip to [-1024, 3071]; labels stay uint8.

The affine is updated so that world coordinates (mm, RAS) of every structure are unchanged.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["build_bundled_example", "AP_CROP", "BLOCK"]

AP_CROP = (20, 214)  # array axis 1 (posterior -> anterior) range kept, in source voxels
BLOCK = 2  # downsampling factor per axis (1.5 mm -> 3.0 mm)


def _even_crop(volume: np.ndarray) -> np.ndarray:
    """Crop ``volume [X, Y, Z]`` to the AP range and to a multiple of ``BLOCK`` along every axis."""
    volume = volume[:, AP_CROP[0] : AP_CROP[1], :]
    return volume[tuple(slice(0, (n // BLOCK) * BLOCK) for n in volume.shape)]


def _blocks(volume: np.ndarray) -> np.ndarray:
    """``[X, Y, Z]`` -> ``[X/b, Y/b, Z/b, b**3]``: the voxels of each ``b^3`` block on the last axis."""
    x, y, z = (n // BLOCK for n in volume.shape)
    v = volume.reshape(x, BLOCK, y, BLOCK, z, BLOCK)
    return v.transpose(0, 2, 4, 1, 3, 5).reshape(x, y, z, BLOCK**3)


def _block_majority(labels: np.ndarray) -> np.ndarray:
    """Most frequent label of each block (ties -> smallest label), ``uint8 [X/b, Y/b, Z/b]``."""
    blocks = _blocks(labels)
    counts = np.stack([(blocks == value).sum(-1) for value in np.unique(blocks)], axis=-1)
    return np.unique(blocks)[counts.argmax(-1)].astype(np.uint8)


def build_bundled_example(source_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write ``ct.nii.gz`` (int16 HU) and ``labels.nii.gz`` (uint8) at 3 mm into ``out_dir``.

    Args:
        source_dir: folder holding ``ct.nii.gz``, ``labels.nii.gz`` and ``structures.csv`` at 1.5 mm RAS.
        out_dir: destination folder (created).

    Returns:
        ``{"image": path, "label": path, "structures": path}``.
    """
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    ct_img = nib.load(source_dir / "ct.nii.gz")
    lab_img = nib.load(source_dir / "labels.nii.gz")
    ct = _even_crop(np.asanyarray(ct_img.dataobj).astype(np.float32))
    labels = _even_crop(np.asanyarray(lab_img.dataobj).astype(np.uint8))
    ct_small = np.clip(np.rint(_blocks(ct).mean(-1)), -1024, 3071).astype(np.int16)
    labels_small = _block_majority(labels)

    # New voxel (0,0,0) is the centre of source voxels (0..1, 20..21, 0..1): shift origin accordingly.
    affine = ct_img.affine.copy()
    first_centre = np.array([0.5 * (BLOCK - 1), AP_CROP[0] + 0.5 * (BLOCK - 1), 0.5 * (BLOCK - 1), 1.0])
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * BLOCK
    new_affine[:, 3] = affine @ first_centre

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"image": out_dir / "ct.nii.gz", "label": out_dir / "labels.nii.gz"}
    for array, path in ((ct_small, paths["image"]), (labels_small, paths["label"])):
        img = nib.Nifti1Image(array, new_affine)
        img.set_qform(new_affine, code=1)
        img.set_sform(new_affine, code=1)
        nib.save(img, path)
    paths["structures"] = out_dir / "structures.csv"
    shutil.copyfile(source_dir / "structures.csv", paths["structures"])
    return paths


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source_dir")
    parser.add_argument("out_dir")
    args = parser.parse_args()
    for key, path in build_bundled_example(args.source_dir, args.out_dir).items():
        print(f"{key}: {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    _main()
