"""Turn CT NIfTI files into a sparse-view reconstruction dataset (the X-GRM recipe).

Per case: read the NIfTI into the library frame (:func:`medgauss.frame.load_nifti`: non-finite voxels
are refused, naming the file, before any work), resample to a fixed field of view and grid (isotropic,
centred on the image centre, trilinear, air outside the scan), clip HU to a window and normalise to
[0, 1], simulate cone-beam projections of the normalised volume with photon noise, and store everything
in the format of :mod:`medgauss.ct.dataset`, with the case's scanner frame (``meta["affine"]``). Parallel
over cases, tqdm progress, resumable: finished cases are skipped and a case is written under a temporary
name and renamed, so a half-written case never looks finished.

Case ids are unique and map one-to-one onto the inputs (:func:`case_ids_for`). Every finished case
records the settings it was prepared with (``meta.json`` ``"settings"``), so a re-run into the same
folder with other settings, interrupted or not, is refused (``ValueError`` naming the folder and the
differing settings) instead of mixing grids: a dataset holds one grid and one geometry. So is a re-run
in which a finished case id would now come from another input file.

Usage::

    python -m medgauss.ct.prepare --folder /data/ct_nifti --out /data/recon --grid 256 --views 50
    python -m medgauss.ct.prepare --datalist dataset.json --key training --out /data/recon --workers 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from medgauss.ct.dataset import FORMAT, FORMAT_VERSION, _read_json
from medgauss.ct.projectors import forward_project
from medgauss.ct.simulate import MU_WATER, ProjectionNoise, add_noise
from medgauss.frame import load_nifti
from medgauss.geometry import ConeBeamGeometry

__all__ = [
    "PrepareConfig",
    "case_id_for",
    "case_ids_for",
    "image_centre",
    "case_affine",
    "resample_to_grid",
    "prepare_case",
    "prepare_dataset",
    "main",
]


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
        self.geometry()  # the geometry's own checks (source and detector outside the volume, ...)

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
    """Case id of an image file alone: its name without ``.nii`` / ``.nii.gz`` (see :func:`case_ids_for`)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _path_hash(path: Path) -> str:
    return hashlib.sha1(str(path).encode()).hexdigest()[:8]


def case_ids_for(images: Sequence[str | Path]) -> list[str]:
    """Unique case ids, one per input image, that depend only on the set of inputs (not their order).

    An image's id is :func:`case_id_for` (its name without ``.nii`` / ``.nii.gz``). Images sharing that
    name are named by their path relative to their deepest common folder, folders joined by ``"__"``
    (``BDMAP_0001/ct.nii.gz`` -> ``BDMAP_0001__ct``), keeping the whole file name where two of them sit
    in one folder (``a.nii`` and ``a.nii.gz`` -> ``a.nii``, ``a.nii.gz``). Any id still shared after that
    gets ``-`` and 8 hex digits of a hash of the absolute path.

    Args:
        images: image paths.

    Returns:
        ``len(images)`` distinct ids, in the order of ``images``.

    Raises:
        ValueError: an image listed twice (same absolute path), or an id that is empty or starts with
            ``"."`` (hidden folders are reserved for unfinished cases).
    """
    paths = [Path(p).absolute() for p in images]
    resolved = [p.resolve() for p in paths]
    twice = [str(p) for p, n in Counter(resolved).items() if n > 1]
    if twice:
        raise ValueError(f"images lists the same file more than once: {twice}")
    ids = [case_id_for(p) for p in paths]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, case_id in enumerate(ids):
        groups[case_id].append(i)
    for stem, members in groups.items():
        if len(members) < 2:
            continue
        common = Path(os.path.commonpath([str(paths[i].parent) for i in members]))
        per_folder = Counter(paths[i].parent for i in members)
        for i in members:
            leaf = paths[i].name if per_folder[paths[i].parent] > 1 else stem
            ids[i] = "__".join((*paths[i].parent.relative_to(common).parts, leaf))
    counts = Counter(ids)
    ids = [f"{c}-{_path_hash(r)}" if counts[c] > 1 else c for c, r in zip(ids, resolved)]
    for path, case_id in zip(paths, ids):
        if not case_id or case_id.startswith("."):
            raise ValueError(f"{path} gives the case id {case_id!r}: rename the file (no leading dot)")
    if len(set(ids)) != len(ids):  # only a hash collision could get here
        raise ValueError(f"could not give the images distinct case ids: {sorted(ids)}")
    return ids


def image_centre(image_shape: Sequence[int], image_affine: np.ndarray) -> Tensor:
    """``[3]`` float64 scanner position (mm) of an image's centre, the isocentre of its prepared case.

    Args:
        image_shape: ``(I, J, K)`` voxels.
        image_affine: ``[4, 4]`` voxel-to-world affine (mm) of the image.
    """
    affine = torch.as_tensor(np.asarray(image_affine, dtype=np.float64))
    centre_index = torch.tensor([(n - 1) / 2 for n in image_shape] + [1.0], dtype=torch.float64)
    return (affine @ centre_index)[:3]


def case_affine(image_shape: Sequence[int], image_affine: np.ndarray, geometry: ConeBeamGeometry) -> Tensor:
    """``[4, 4]`` float64 map from voxel ``(d, h, w, 1)`` of ``geometry``'s grid to scanner ``(x, y, z, 1)`` mm.

    The geometry's world frame is the image's scanner frame translated so the image centre sits at the
    isocentre: this is ``translate(image_centre) @ geometry.volume_affine`` (see
    :mod:`medgauss.ct.dataset`).
    """
    shift = torch.eye(4, dtype=torch.float64)
    shift[:3, 3] = image_centre(image_shape, image_affine)
    return shift @ geometry.volume_affine


def resample_to_grid(
    image_hu: np.ndarray, image_affine: np.ndarray, geometry: ConeBeamGeometry
) -> torch.Tensor:
    """Resample a HU image onto ``geometry``'s volume grid, centred on the image centre.

    The geometry's world frame is the scanner frame of the image affine translated so that the
    image centre sits at the isocentre (geometry x, y, z = scanner x, y, z: RAS for NIfTI images);
    voxel ``(d, h, w)`` of the output sits at scanner ``case_affine(...) @ (d, h, w, 1)``.

    Args:
        image_hu: ``[I, J, K]`` HU array in the voxel order of ``image_affine``.
        image_affine: ``[4, 4]`` voxel-to-world affine (mm).
        geometry: target grid (``vol_shape``, ``vol_spacing``).

    Returns:
        ``[D, H, W]`` float32 HU (trilinear; -1000 HU, air, outside the image).
    """
    if image_hu.ndim != 3:
        raise ValueError(f"image must be a 3-D volume, got shape {image_hu.shape}")
    affine = torch.as_tensor(np.asarray(image_affine, dtype=np.float64))
    to_image = torch.linalg.inv(affine) @ case_affine(image_hu.shape, image_affine, geometry)  # (d,h,w)->(i,j,k)
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


def _settings_record(config: PrepareConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config)))


def _check_settings(recorded: Any, config: PrepareConfig, where: Path, folder: Path) -> None:
    """Refuse to add ``config``'s cases to ``folder`` when ``where`` records other settings."""
    if not isinstance(recorded, dict):
        raise ValueError(
            f"{where} records no preparation settings (written by a medgauss-prepare-ct older than format "
            f"version {FORMAT_VERSION}), so {folder} cannot be resumed safely: prepare into a new --out folder"
        )
    wanted = _settings_record(config)
    differ = [k for k in sorted(set(recorded) | set(wanted)) if recorded.get(k) != wanted.get(k)]
    if differ:
        details = "; ".join(f"{k}: {recorded.get(k)!r} recorded, {wanted.get(k)!r} requested" for k in differ)
        raise ValueError(
            f"{folder} was prepared with other settings ({details}; recorded in {where}). A dataset holds "
            "one grid and one geometry: use a new --out folder to change them, or the recorded settings to "
            "resume"
        )


def _check_finished_case(meta_path: Path, config: PrepareConfig, source: Path | None) -> None:
    """A finished case may be kept only if it has ``config``'s settings and comes from ``source``."""
    meta = _read_json(meta_path)
    folder = meta_path.parent.parent
    _check_settings(meta.get("settings"), config, meta_path, folder)
    if source is not None and meta.get("source") != str(source.resolve()):
        raise ValueError(
            f"case {meta_path.parent.name!r} in {folder} was prepared from {meta.get('source')}, not from "
            f"{source.resolve()} (recorded in {meta_path}): case ids map one-to-one onto input files, so "
            "prepare this list of images into a new --out folder"
        )


def _case_seed(base: int, case_id: str) -> int:
    return (base * 1_000_003 + sum((i + 1) * ord(ch) for i, ch in enumerate(case_id))) % (2**31)


def prepare_case(image_path: str | Path, out_dir: str | Path, config: PrepareConfig, case_id: str) -> str:
    """Prepare one case into ``out_dir / case_id`` (skipped if already finished). Returns the case id.

    Raises:
        FileNotFoundError / ValueError naming the image (missing, unreadable, not 3-D, non-finite voxels),
        or ValueError when a finished ``case_id`` was prepared with other settings or from another file.
    """
    out_dir = Path(out_dir)
    final = out_dir / case_id
    if (final / "meta.json").is_file():
        _check_finished_case(final / "meta.json", config, Path(image_path))
        return case_id
    geometry = config.geometry()
    data, affine = load_nifti(image_path)  # library frame; refuses non-finite voxels naming the file
    frame = case_affine(data.shape, affine, geometry)
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
            "source_affine": affine.tolist(),
            "affine": frame.tolist(),
            "isocentre_mm": image_centre(data.shape, affine).tolist(),
            "settings": _settings_record(config),
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


def _worker_init(threads: int) -> None:
    import numba

    torch.set_num_threads(threads)
    numba.set_num_threads(threads)


def _check_folder(out_dir: Path, config: PrepareConfig, sources: dict[str, Path]) -> None:
    """Refuse a folder whose index or finished cases record other settings, or other sources for our ids."""
    index_path = out_dir / "dataset.json"
    if index_path.is_file():
        index = _read_json(index_path)
        if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{index_path} is not a version-{FORMAT_VERSION} {FORMAT} index (format="
                f"{index.get('format')!r}, version={index.get('version')!r}): prepare into a new --out folder"
            )
        _check_settings(index.get("settings"), config, index_path, out_dir)
    for meta_path in sorted(out_dir.glob("*/meta.json")):
        case_id = meta_path.parent.name
        if not case_id.startswith("."):  # hidden folders are unfinished leftovers
            _check_finished_case(meta_path, config, sources.get(case_id))


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
        images: CT NIfTI paths (HU), each listed once; case ids come from :func:`case_ids_for`.
        out_dir: output folder (created).
        config: dataset settings.
        workers: processes working on cases in parallel (CPU threads are split between them).
        progress: show a tqdm bar.

    Raises:
        ValueError: ``out_dir``'s index or one of its finished cases records other settings than
            ``config`` (naming the folder and each differing setting), a finished case id that came from
            another input, or an input that cannot be prepared (naming the file; the cases finished
            before it are kept).
        FileNotFoundError: a missing image.
    """
    if not images:
        raise ValueError("no images to prepare")
    case_ids = case_ids_for(images)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_folder(out_dir, config, {c: Path(p) for c, p in zip(case_ids, images)})
    for leftover in out_dir.glob(".tmp-*"):  # unfinished cases (folders) and index files of a crashed run
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
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
    index = {"format": FORMAT, "version": FORMAT_VERSION, "cases": case_ids, "settings": _settings_record(config)}
    tmp = out_dir / f".tmp-dataset-{uuid.uuid4().hex[:8]}.json"
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, out_dir / "dataset.json")
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
