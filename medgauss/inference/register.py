"""``medgauss-register``: register a moving NIfTI image to a fixed one with a fine-tuned registration run.

::

    medgauss-register --checkpoint RUN_DIR --fixed F.nii.gz --moving M.nii.gz --out-warped W.nii.gz \\
        --out-ddf DDF.nii.gz [--moving-label ML.nii.gz --out-warped-label WL.nii.gz]

``RUN_DIR`` is a run of ``recipes/finetune_registration.py`` (its ``model/`` export and ``config.yaml``; the
``model/`` folder itself also works when ``config.yaml`` is beside it).

**How.** Fixed and moving must share one grid (same shape and affine: e.g. after an affine pre-alignment). Both are
windowed like training (``data.preprocessing`` of the run's resolved config) and resampled onto the model grid
(:func:`medgauss.data.registration.model_grid_affine`: the model's ``img_size`` voxels of ``pixdim`` mm centred on
the fixed image; exactly the resampling of the pair-list training data). The network predicts the displacement on
that grid; it is carried back to every voxel of the fixed image's own grid by trilinear interpolation in world
coordinates, and is **zero (identity) outside the model grid's field of view** (a message says so when the image
extends beyond it). The moving image (trilinear, border values) and label (nearest) are then warped at the fixed
image's native resolution, so the outputs have the fixed file's shape and affine (its own voxel order).

**DDF file.** A 5-D NIfTI ``[X, Y, Z, 1, 3]`` (intent ``vector``) on the fixed file's grid (its shape and affine):
component ``c`` is the displacement along world axis ``x, y, z`` (RAS+, nibabel's world, **millimetres**), such
that ``warped(p) = moving(p + ddf(p))`` for every world point ``p`` of the fixed grid. ITK / ANTs displacement
fields are in LPS: negate the first two components to use it there.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml
from nibabel import orientations

from medgauss.data.registration import check_same_grid, model_grid_affine, window_intensity
from medgauss.data.transforms import DataError
from medgauss.frame import AXCODES, grid_coords, load_nifti, resample_to_grid, sample_at, save_nifti
from medgauss.nets.pretrained import load_pretrained
from medgauss.nets.pretrained_runs import find_run_config, model_dir
from medgauss.nets.registration import ViTRegistrationNet

__all__ = ["cli", "load_registration_run", "register_arrays"]

_PRE_KEYS = ("pixdim", "a_min", "a_max", "b_min", "b_max")


def load_registration_run(checkpoint: str | Path) -> tuple[ViTRegistrationNet, dict[str, float]]:
    """``(model in eval mode, preprocessing {pixdim, a_min, a_max, b_min, b_max})`` of a registration run.

    Raises:
        FileNotFoundError: no ``model/`` export or ``config.yaml`` (naming the places looked in).
        ValueError: the export is not a :class:`ViTRegistrationNet`, or the config lacks
            ``data.preprocessing`` values (naming the file).
    """
    checkpoint = Path(checkpoint)
    folder = model_dir(checkpoint)
    model = load_pretrained(folder)
    if not isinstance(model, ViTRegistrationNet):
        raise ValueError(f"{folder} holds a {type(model).__name__}, not a ViTRegistrationNet (is it a registration "
                         "run of recipes/finetune_registration.py?)")
    path = find_run_config(checkpoint)
    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file {path} is not valid YAML: {exc}") from exc
    pre = ((config or {}).get("data") or {}).get("preprocessing") if isinstance(config, dict) else None
    if not isinstance(pre, dict) or any(not isinstance(pre.get(k), int | float) for k in _PRE_KEYS):
        raise ValueError(f"{path} lacks numeric data.preprocessing.{{{', '.join(_PRE_KEYS)}}}: is it the config of a "
                         "registration run?")
    return model.eval(), {k: float(pre[k]) for k in _PRE_KEYS}


@torch.no_grad()
def register_arrays(model: ViTRegistrationNet, fixed: np.ndarray, moving: np.ndarray, affine: np.ndarray,
                    preprocessing: dict[str, float]) -> tuple[torch.Tensor, dict[str, object]]:
    """Displacement of every voxel of the (shared) grid, world mm.

    Args:
        model: the registration network (eval mode).
        fixed, moving: ``[D, H, W]`` raw intensities (HU) on one grid, medgauss frame.
        affine: ``[4, 4]`` voxel -> world of that grid.
        preprocessing: ``{pixdim, a_min, a_max, b_min, b_max}``.

    Returns:
        ``(ddf_world [3, D, H, W] float64 (x, y, z) mm, info {"outside_fov": bool})``.
    """
    device = next(model.parameters()).device
    shape = fixed.shape
    size = tuple(model.img_size)
    target = model_grid_affine(affine, shape, size, preprocessing["pixdim"])
    a_min, a_max, b_min, b_max = (preprocessing[k] for k in ("a_min", "a_max", "b_min", "b_max"))

    def to_model(array: np.ndarray) -> torch.Tensor:
        image = window_intensity(torch.from_numpy(np.ascontiguousarray(array)).float()[None], a_min, a_max, b_min,
                                 b_max)
        return resample_to_grid(image, affine, target, size, pad_value=b_min)[None].to(device)

    ddf_model = model(to_model(fixed), to_model(moving)).double().cpu()[0]  # [3, *size] model voxels
    coords = grid_coords(target, affine, shape)  # [D, H, W, 3] model-grid coordinates of every native voxel
    inside = ((coords >= 0) & (coords <= torch.tensor(size, dtype=coords.dtype) - 1)).all(-1)
    ddf_voxels = sample_at(ddf_model, coords, mode="bilinear", pad_value=0.0)  # zero outside the model grid
    linear = torch.from_numpy(np.asarray(target, dtype=np.float64)[:3, :3])  # model voxel (d, h, w) -> world mm
    ddf_world = torch.einsum("ij,j...->i...", linear, ddf_voxels)
    return ddf_world, {"outside_fov": not bool(inside.all())}


def _native_orientation(array: np.ndarray, native_affine: np.ndarray, native_shape: Sequence[int]) -> np.ndarray:
    """A medgauss-frame array ``[D, H, W, ...]`` put back into the voxel order of the file it came from."""
    current = orientations.axcodes2ornt(AXCODES)
    target = orientations.io_orientation(native_affine)
    out = orientations.apply_orientation(array, orientations.ornt_transform(current, target))
    if tuple(out.shape[:3]) != tuple(native_shape):
        raise RuntimeError(f"reorientation gave shape {out.shape[:3]}, expected {tuple(native_shape)}")
    return np.ascontiguousarray(out)


def _native_grid(path: Path) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The file's own affine and 3-D shape (header only)."""
    img = nib.load(str(path))
    return np.asarray(img.affine, dtype=np.float64), tuple(int(s) for s in img.shape[:3])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medgauss-register",
        description="Register a moving NIfTI image to a fixed one (same grid) with a recipes/finetune_registration.py "
                    "run; writes the warped image (and label) on the fixed image's grid and the displacement field "
                    "(5-D NIfTI, world RAS mm, warped(p) = moving(p + ddf(p))).")
    p.add_argument("--checkpoint", required=True, help="registration run directory (model/ + config.yaml)")
    p.add_argument("--fixed", required=True, help="fixed image NIfTI")
    p.add_argument("--moving", required=True, help="moving image NIfTI (same grid as --fixed)")
    p.add_argument("--out-warped", required=True, help="output: warped moving image NIfTI")
    p.add_argument("--out-ddf", required=True, help="output: displacement field NIfTI [X, Y, Z, 1, 3], mm")
    p.add_argument("--moving-label", help="moving label map NIfTI (warped with nearest neighbour)")
    p.add_argument("--out-warped-label", help="output: warped moving label map NIfTI")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return p


def cli(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``medgauss-register`` (module doc). Returns 0; errors exit with a message naming the file."""
    args = _parser().parse_args(argv)
    if (args.moving_label is None) != (args.out_warped_label is None):
        _parser().error("--moving-label and --out-warped-label go together")
    try:
        model, pre = load_registration_run(args.checkpoint)
        model = model.to(args.device)
        fixed_path, moving_path = Path(args.fixed), Path(args.moving)
        fixed, affine = load_nifti(fixed_path)
        moving, moving_affine = load_nifti(moving_path)
        check_same_grid(fixed.shape, affine, moving.shape, moving_affine,
                        f"--fixed {fixed_path} and --moving {moving_path}")
        label = None
        if args.moving_label is not None:
            label, label_affine = load_nifti(args.moving_label)
            check_same_grid(label.shape, label_affine, moving.shape, moving_affine,
                            f"--moving-label {args.moving_label} and --moving {moving_path}")
            if not np.array_equal(label, np.round(label)):
                raise DataError(f"--moving-label {args.moving_label} holds non-integer values (a label map)")
        ddf_world, info = register_arrays(model, fixed, moving, affine, pre)
        if info["outside_fov"]:
            print(f"note: {fixed_path} extends beyond the model's field of view ({list(model.img_size)} voxels of "
                  f"{pre['pixdim']} mm); the displacement is zero (identity) outside it", file=sys.stderr)
        # warp at native resolution: moving voxel coordinates of p + ddf(p)
        inv_linear = torch.from_numpy(np.linalg.inv(affine[:3, :3]))
        ddf_native_voxels = torch.einsum("ij,j...->...i", inv_linear, ddf_world)  # [D, H, W, 3]
        axes = [torch.arange(n, dtype=torch.float64) for n in fixed.shape]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1) + ddf_native_voxels
        clamp = torch.tensor(fixed.shape, dtype=torch.float64) - 1
        coords_border = torch.minimum(coords.clamp_min(0.0), clamp)  # border padding: nearest edge value
        warped = sample_at(torch.from_numpy(np.ascontiguousarray(moving)).double()[None], coords_border)[0]
        native_affine, native_shape = _native_grid(fixed_path)
        save_nifti(args.out_warped, _native_orientation(warped.numpy().astype(np.float32), native_affine,
                                                        native_shape), native_affine)
        if label is not None:
            warped_label = sample_at(torch.from_numpy(np.ascontiguousarray(label)).double()[None], coords_border,
                                     mode="nearest")[0].round()
            dtype = np.int16 if float(label.max()) < 32768 and float(label.min()) >= -32768 else np.int32
            save_nifti(args.out_warped_label, _native_orientation(warped_label.numpy().astype(dtype), native_affine,
                                                                  native_shape), native_affine)
        ddf_last = ddf_world.permute(1, 2, 3, 0).numpy()  # [D, H, W, 3] (x, y, z) mm
        save_nifti(args.out_ddf, _native_orientation(ddf_last, native_affine, native_shape).astype(np.float32),
                   native_affine, vector=True)
    except (FileNotFoundError, DataError, ValueError) as exc:
        print(f"medgauss-register: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    print(f"wrote {args.out_warped}, {args.out_ddf}" + (f", {args.out_warped_label}" if label is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
