"""Turn CT NIfTI files into a sparse-view reconstruction dataset (the X-GRM recipe).

Per case: resample to a fixed field of view and grid (isotropic, centred on the image centre,
trilinear, air outside the scan), clip HU to a window and normalise to [0, 1], simulate cone-beam
projections of the normalised volume with photon noise, and store everything in the format of
:mod:`medgauss.ct.dataset`. Parallel over cases, tqdm progress, resumable: finished cases are skipped
and a case is written under a temporary name and renamed, so a half-written case never looks finished.

Usage::

    python -m medgauss.ct.prepare --folder /data/ct_nifti --out /data/recon --grid 256 --views 50
    python -m medgauss.ct.prepare --datalist dataset.json --key training --out /data/recon --workers 2
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import uuid
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from medgauss.ct.dataset import FORMAT, FORMAT_VERSION
from medgauss.ct.projectors import forward_project
from medgauss.ct.simulate import MU_WATER, ProjectionNoise, add_noise
from medgauss.geometry import ConeBeamGeometry

__all__ = ["PrepareConfig", "case_id_for", "resample_to_grid", "prepare_case", "prepare_dataset", "main"]


@dataclass(frozen=True)
class PrepareConfig:
    """Settings of a prepared dataset (stored in its ``dataset.json``).

    Attributes:
        fov_mm: edge of the cubic field of view in mm (isotropic voxels of ``fov_mm / grid``).
        grid: voxels per edge of the output volume.
        hu_min, hu_max: HU window; values are clipped to it and mapped linearly to [0, 1].
        num_views: projections per case, evenly over ``arc_deg`` starting at angle 0.
        arc_deg: angular range in degrees (360 for a full scan).
        det_size: detector pixels per side (square detector).
        det_spacing_mm: pixel size; ``None`` picks the size whose detector just covers the fan of a
            cylinder of diameter ``fov_mm`` (``2 dsd tan(asin(fov/2 / dso)) / det_size``).
        dso, dsd: source-isocentre and source-detector distances, mm.
        photons: incident photons per pixel for Poisson noise (``None``: noiseless).
        electronic_std: Gaussian electronic noise in counts.
        mu_water: attenuation of water per mm; a normalised value ``v`` has attenuation
            ``v * attenuation_scale`` with ``attenuation_scale = mu_water (hu_max - hu_min) / 1000``
            (exact for ``hu_min = -1000``), which sets the photon statistics.
        seed: base noise seed (each case adds a stable hash of its id).
    """

    fov_mm: float = 500.0
    grid: int = 256
    hu_min: float = -1000.0
    hu_max: float = 2000.0
    num_views: int = 50
    arc_deg: float = 360.0
    det_size: int = 256
    det_spacing_mm: float | None = None
    dso: float = 1000.0
    dsd: float = 1500.0
    photons: float | None = 1e5
    electronic_std: float = 0.0
    mu_water: float = MU_WATER
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.fov_mm > 0 and self.grid > 0 and self.num_views > 0 and self.det_size > 0):
            raise ValueError(f"fov_mm, grid, num_views and det_size must be positive, got {self}")
        if not self.hu_max > self.hu_min:
            raise ValueError(f"hu_max ({self.hu_max}) must exceed hu_min ({self.hu_min})")
        if not 0 < self.arc_deg <= 360:
            raise ValueError(f"arc_deg must lie in (0, 360], got {self.arc_deg}")
        if self.fov_mm / 2 >= self.dso:
            raise ValueError(f"fov_mm / 2 ({self.fov_mm / 2}) must be smaller than dso ({self.dso})")

    @property
    def attenuation_scale(self) -> float:
        """Attenuation per mm of normalised value 1."""
        return self.mu_water * (self.hu_max - self.hu_min) / 1000.0

    def geometry(self) -> ConeBeamGeometry:
        """The cone-beam geometry every case of the dataset uses."""
        spacing = self.det_spacing_mm
        if spacing is None:
            spacing = 2 * self.dsd * math.tan(math.asin(self.fov_mm / 2 / self.dso)) / self.det_size
        step = math.radians(self.arc_deg) / self.num_views
        voxel = self.fov_mm / self.grid
        return ConeBeamGeometry(
            dso=self.dso,
            dsd=self.dsd,
            det_shape=(self.det_size, self.det_size),
            det_spacing=(spacing, spacing),
            vol_shape=(self.grid,) * 3,
            vol_spacing=(voxel,) * 3,
            angles=torch.arange(self.num_views, dtype=torch.float64) * step,
        )


def case_id_for(path: str | Path) -> str:
    """Case id of an image file: its name without ``.nii`` / ``.nii.gz``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def resample_to_grid(
    image_hu: np.ndarray, image_affine: np.ndarray, geometry: ConeBeamGeometry
) -> torch.Tensor:
    """Resample a HU image onto ``geometry``'s volume grid, centred on the image centre.

    The geometry's world frame is the scanner frame of the NIfTI affine translated so that the
    image centre sits at the isocentre (geometry x, y, z = scanner x, y, z; RAS for RAS images).

    Args:
        image_hu: ``[I, J, K]`` HU array in NIfTI voxel order.
        image_affine: ``[4, 4]`` NIfTI voxel-to-world affine (mm).
        geometry: target grid (``vol_shape``, ``vol_spacing``).

    Returns:
        ``[D, H, W]`` float32 HU (trilinear; -1000 HU, air, outside the image).
    """
    if image_hu.ndim != 3:
        raise ValueError(f"image must be a 3-D volume, got shape {image_hu.shape}")
    affine = torch.as_tensor(np.asarray(image_affine, dtype=np.float64))
    centre_index = torch.tensor([(n - 1) / 2 for n in image_hu.shape] + [1.0], dtype=torch.float64)
    centre = (affine @ centre_index)[:3]
    shift = torch.eye(4, dtype=torch.float64)
    shift[:3, 3] = centre
    to_image = torch.linalg.inv(affine) @ shift @ geometry.volume_affine  # (d, h, w, 1) -> (i, j, k, 1)
    d, h, w = geometry.vol_shape
    out = torch.empty(d, h, w, dtype=torch.float32)
    image = torch.from_numpy(np.ascontiguousarray(image_hu, dtype=np.float32)) + 1000.0  # air -> 0 padding
    sizes = torch.tensor(image_hu.shape, dtype=torch.float64)
    hh, ww = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    slab = max(1, (1 << 22) // (h * w))
    for z0 in range(0, d, slab):
        zz = torch.arange(z0, min(d, z0 + slab), dtype=torch.float64)[:, None, None].expand(-1, h, w)
        idx = (
            torch.stack((zz, hh.expand_as(zz), ww.expand_as(zz)), dim=-1) @ to_image[:3, :3].T
            + to_image[:3, 3]
        )
        grid = (2 * idx / (sizes - 1).clamp_min(1) - 1).flip(-1).float()  # (k, j, i) for grid_sample
        vals = F.grid_sample(
            image[None, None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=True
        )
        out[z0 : z0 + zz.shape[0]] = vals[0, 0] - 1000.0
    return out


def _load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"CT image not found: {path}")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise ValueError(f"could not read NIfTI file {path}: {exc}") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path} is not a 3-D image (shape {data.shape})")
    return data, np.asarray(img.affine, dtype=np.float64)


def _case_seed(base: int, case_id: str) -> int:
    return (base * 1_000_003 + sum((i + 1) * ord(ch) for i, ch in enumerate(case_id))) % (2**31)


def prepare_case(image_path: str | Path, out_dir: str | Path, config: PrepareConfig, case_id: str) -> str:
    """Prepare one case into ``out_dir / case_id`` (skipped if already finished). Returns the case id."""
    out_dir = Path(out_dir)
    final = out_dir / case_id
    if (final / "meta.json").is_file():
        return case_id
    geometry = config.geometry()
    data, affine = _load_nifti(Path(image_path))
    hu = resample_to_grid(data, affine, geometry)
    volume = (
        (hu.clamp(config.hu_min, config.hu_max) - config.hu_min) / (config.hu_max - config.hu_min)
    ).float()
    projections = forward_project(volume[None, None], geometry)[0]
    if config.photons is not None:
        noise = ProjectionNoise(photons=config.photons, electronic_std=config.electronic_std)
        projections = add_noise(
            projections, noise, seed=_case_seed(config.seed, case_id), scale=config.attenuation_scale
        )
    tmp = out_dir / f".tmp-{case_id}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "volume.npy", volume.numpy().astype(np.float32))
        np.save(tmp / "projections.npy", projections.numpy().astype(np.float32))
        (tmp / "geometry.json").write_text(geometry.to_json())
        meta = {
            "case_id": case_id,
            "source": str(Path(image_path).resolve()),
            "source_shape": list(data.shape),
            "hu_window": [config.hu_min, config.hu_max],
            "attenuation_scale": config.attenuation_scale,
            "noise": None
            if config.photons is None
            else {"photons": config.photons, "electronic_std": config.electronic_std},
            "seed": _case_seed(config.seed, case_id),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if final.exists():  # an unfinished leftover (no meta.json) from an interrupted run
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return case_id


def _assign_case_ids(images: Sequence[str]) -> list[str]:
    ids, seen = [], {}
    for path in images:
        base = case_id_for(path)
        count = seen.get(base, 0)
        seen[base] = count + 1
        ids.append(base if count == 0 else f"{base}_{count}")
    return ids


def _worker_init(threads: int) -> None:
    import numba

    torch.set_num_threads(threads)
    numba.set_num_threads(threads)


def prepare_dataset(
    images: Sequence[str | Path],
    out_dir: str | Path,
    config: PrepareConfig,
    *,
    workers: int = 1,
    progress: bool = True,
) -> list[str]:
    """Prepare every image (resumable) and write ``out_dir/dataset.json``. Returns the finished case ids.

    Args:
        images: CT NIfTI paths (HU).
        out_dir: output folder (created).
        config: dataset settings.
        workers: processes working on cases in parallel (CPU threads are split between them).
        progress: show a tqdm bar.
    """
    if not images:
        raise ValueError("no images to prepare")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / "dataset.json"
    if index_path.is_file():
        previous = json.loads(index_path.read_text()).get("settings")
        if previous is not None and previous != json.loads(json.dumps(asdict(config))):
            raise ValueError(
                f"{index_path} was prepared with other settings ({previous}); "
                "use a new --out folder to change them"
            )
    for leftover in out_dir.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    case_ids = _assign_case_ids([str(p) for p in images])
    todo = [(p, c) for p, c in zip(images, case_ids) if not (out_dir / c / "meta.json").is_file()]
    bar = tqdm(total=len(case_ids), initial=len(case_ids) - len(todo), desc="prepare", disable=not progress)
    if workers <= 1 or len(todo) <= 1:
        for path, case_id in todo:
            prepare_case(path, out_dir, config, case_id)
            bar.update()
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_worker_init, initargs=(threads,)
        ) as pool:
            futures = [pool.submit(prepare_case, p, out_dir, config, c) for p, c in todo]
            for future in as_completed(futures):
                future.result()
                bar.update()
    bar.close()
    index = {"format": FORMAT, "version": FORMAT_VERSION, "cases": case_ids, "settings": asdict(config)}
    index_path.write_text(json.dumps(index, indent=2))
    return case_ids


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = PrepareConfig()
    p = argparse.ArgumentParser(prog="python -m medgauss.ct.prepare", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--datalist", type=Path, help="Decathlon-style dataset JSON")
    src.add_argument("--folder", type=Path, help="folder of CT NIfTI files (HU)")
    p.add_argument("--key", default="training", help="list of the datalist JSON to read")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--fov-mm", type=float, default=defaults.fov_mm)
    p.add_argument("--grid", type=int, default=defaults.grid)
    p.add_argument("--hu-min", type=float, default=defaults.hu_min)
    p.add_argument("--hu-max", type=float, default=defaults.hu_max)
    p.add_argument("--views", type=int, default=defaults.num_views)
    p.add_argument("--arc-deg", type=float, default=defaults.arc_deg)
    p.add_argument("--det-size", type=int, default=defaults.det_size)
    p.add_argument("--det-spacing-mm", type=float, default=None)
    p.add_argument("--dso", type=float, default=defaults.dso)
    p.add_argument("--dsd", type=float, default=defaults.dsd)
    p.add_argument("--photons", type=float, default=defaults.photons, help="I0 per pixel; 0 for noiseless")
    p.add_argument("--electronic-std", type=float, default=defaults.electronic_std)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Command-line entry point (see the module docstring)."""
    args = _parse(argv)
    from medgauss.data.datalist import load_decathlon_datalist, nifti_folder_datalist

    if args.datalist is not None:
        entries = load_decathlon_datalist(args.datalist, key=args.key, use_labels=False)
    else:
        entries = nifti_folder_datalist(args.folder)
    config = PrepareConfig(
        fov_mm=args.fov_mm,
        grid=args.grid,
        hu_min=args.hu_min,
        hu_max=args.hu_max,
        num_views=args.views,
        arc_deg=args.arc_deg,
        det_size=args.det_size,
        det_spacing_mm=args.det_spacing_mm,
        dso=args.dso,
        dsd=args.dsd,
        photons=args.photons if args.photons > 0 else None,
        electronic_std=args.electronic_std,
        seed=args.seed,
    )
    images = [e["image"] for e in entries]
    done = prepare_dataset(images, args.out, config, workers=args.workers, progress=not args.no_progress)
    print(f"prepared {len(done)} case(s) in {args.out}")
    return done


def cli() -> None:
    """Console-script entry point (``medgauss-prepare-ct``): exit status 0 on success.

    ``main`` returns the prepared case ids for programmatic use; a console script hands its return
    value to ``sys.exit``, which would turn that list into an error exit, hence this wrapper.
    """
    main()


if __name__ == "__main__":
    cli()
