"""Benchmark the CT physics stack on the example chest CT, all rows measured in the same run.

The CT is the one shipped inside the package (``medgauss.data.example_ct_path()``: 3 mm, 120 x 97 x 110
voxels), so the commands below work from a fresh clone; ``--ct`` takes any other NIfTI CT in HU.
Every provider of a section is timed the same way: one untimed warm-up call on the same inputs (numba
compilation, torch's first-call allocations, DiffDRR's set-up), then the median of ``--repeats`` timed
calls in the forward section, one timed call per reconstruction (after a warm-up of each method on 2
views with one iteration, which compiles the same kernels).

1. Forward projection of the example CT (HU clipped to [-1000, 2000] and normalised to [0, 1], as in
   ``python -m medgauss.ct.prepare``) at 128^3 and 256^3 over a 400 mm FOV, to 50 cone-beam views of
   256^2 (dso 1000 mm, dsd 1500 mm): numba vs torch backend, and a peer DRR renderer, DiffDRR 0.6.1
   (Siddon), fed the *identical* source and pixel points through ``DRR.render`` on a torchio subject
   whose affine is our voxel-to-world map (so no pose / detector convention needs translating).
   Slow providers can be timed on the first ``--torch-views`` / ``--peer-views`` views; their seconds
   per view are then compared (stated in the table).
2. FDK / SART / ASD-POCS on 6, 8 and 10 views (evenly over 360 degrees): noisy projections (1e5
   photons) simulated from the fine grid, reconstructed on the coarse grid (no inverse crime), PSNR
   (3D) and mean axial-slice SSIM against the coarse ground truth, reconstructions clipped to [0, 1].
3. Gaussian X-ray projection rows from ``benchmarks/project_gaussians.py`` (``run(quick)``) when present.

    python benchmarks/projectors.py            # full sizes (tens of minutes on 2 busy cores)
    python benchmarks/projectors.py --quick    # small sizes, about a minute

Prints a table and writes ``benchmarks/results/projectors.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numba
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medgauss.ct import ProjectionNoise, add_noise, asd_pocs, fdk, forward_project, sart  # noqa: E402
from medgauss.ct.prepare import PrepareConfig, resample_to_grid  # noqa: E402
from medgauss.data import example_ct_path  # noqa: E402
from medgauss.geometry import ConeBeamGeometry  # noqa: E402
from medgauss.metrics import psnr, ssim_slices  # noqa: E402


def load_ct(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """HU array ``[I, J, K]`` (float32, in the file's voxel order) and its ``[4, 4]`` voxel-to-world affine (mm)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CT not found: {path}")
    img = nib.load(str(path))
    return np.asarray(img.get_fdata(dtype=np.float32)), np.asarray(img.affine)


def normalised_volume(data: np.ndarray, affine: np.ndarray, config: PrepareConfig) -> torch.Tensor:
    """``[1, 1, g, g, g]`` float32 volume in [0, 1] on ``config``'s grid (same recipe as prepare)."""
    hu = resample_to_grid(data, affine, config.geometry())
    return ((hu.clamp(config.hu_min, config.hu_max) - config.hu_min) / (config.hu_max - config.hu_min))[None, None]


def timed(fn: Callable[..., Any], *args: Any, repeats: int = 1, **kwargs: Any) -> tuple[Any, float]:
    """``(output, median seconds)`` of ``repeats`` calls of ``fn(*args, **kwargs)`` after one untimed warm-up."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    out = fn(*args, **kwargs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


# ----------------------------------------------------------------------------- peer: DiffDRR
def diffdrr_project(volume: torch.Tensor, geometry: ConeBeamGeometry) -> torch.Tensor:
    """DiffDRR 0.6.1 Siddon DRRs ``[V, rows, cols]`` of ``volume`` ``[1, 1, D, H, W]`` along our rays."""
    from diffdrr.drr import DRR
    from torchio import ScalarImage, Subject

    # DiffDRR indexes the density as (i, j, k) -> world through the subject affine; our array is
    # (d, h, w) = (z, y, x), so hand it the (w, h, d) transpose and the matching affine.
    perm = torch.zeros(4, 4, dtype=torch.float64)
    perm[0, 2] = perm[1, 1] = perm[2, 0] = perm[3, 3] = 1.0
    affine = (geometry.volume_affine @ perm).numpy()
    density = volume[0, 0].permute(2, 1, 0).contiguous()[None]
    subject = Subject(
        volume=ScalarImage(tensor=density, affine=affine),
        density=ScalarImage(tensor=density, affine=affine),
        mask=None,
        reorient=torch.eye(4),
    )
    rows, cols = geometry.det_shape
    drr = DRR(subject, sdd=geometry.dsd, height=rows, width=cols, delx=geometry.det_spacing[1])
    sources = geometry.source_positions().float()
    pixels = geometry.pixel_centers().float().reshape(geometry.num_views, -1, 3)
    out = []
    with torch.no_grad():
        for v in range(geometry.num_views):
            src = sources[v].expand(1, pixels.shape[1], 3)
            out.append(drr.render(drr.density, src, pixels[v : v + 1]).reshape(rows, cols))
    return torch.stack(out)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def bench_forward(data, affine, args) -> list[dict]:
    rows = []
    have_peer = importlib.util.find_spec("diffdrr") is not None
    if not have_peer:
        print("DiffDRR row skipped: diffdrr is not installed (pip install diffdrr==0.6.1 to include the peer)")
    for grid in args.grids:
        cfg = PrepareConfig(fov_mm=args.fov_mm, grid=grid, num_views=args.views, det_size=args.det)
        geo = cfg.geometry()
        vol = normalised_volume(data, affine, cfg)
        label = f"{grid}^3 -> {args.views}x{args.det}^2"
        ref, t_numba = timed(forward_project, vol, geo, backend="numba", repeats=args.repeats)
        per_view = t_numba / geo.num_views
        rows.append(
            dict(
                section="forward",
                case=label,
                provider="medgauss numba (Joseph)",
                views_timed=geo.num_views,
                seconds=t_numba,
                seconds_per_view=per_view,
                speedup_vs_peer=None,
                rel_diff_vs_numba=0.0,
            )
        )
        sub = geo.subset(range(min(args.torch_views, geo.num_views)))
        out, t = timed(forward_project, vol, sub, backend="torch", repeats=args.repeats)
        rows.append(
            dict(
                section="forward",
                case=label,
                provider="medgauss torch (Joseph, grid_sample)",
                views_timed=sub.num_views,
                seconds=t,
                seconds_per_view=t / sub.num_views,
                speedup_vs_peer=None,
                rel_diff_vs_numba=relative_difference(out, ref[:, : sub.num_views]),
            )
        )
        if have_peer:
            sub = geo.subset(range(min(args.peer_views, geo.num_views)))
            out, t = timed(diffdrr_project, vol, sub, repeats=args.repeats)
            peer = dict(
                section="forward",
                case=label,
                provider="DiffDRR 0.6.1 (Siddon)",
                views_timed=sub.num_views,
                seconds=t,
                seconds_per_view=t / sub.num_views,
                speedup_vs_peer=1.0,
                rel_diff_vs_numba=relative_difference(ref[0, : sub.num_views], out),
            )
            rows.append(peer)
            for row in rows:
                if row["case"] == label and row is not peer:
                    row["speedup_vs_peer"] = peer["seconds_per_view"] / row["seconds_per_view"]
        print(f"  forward {label} done", file=sys.stderr, flush=True)
    return rows


# ----------------------------------------------------------------------------- reconstruction
def bench_recon(data, affine, args) -> list[dict]:
    fine = PrepareConfig(fov_mm=args.fov_mm, grid=args.sim_grid, num_views=args.views, det_size=args.det)
    coarse = PrepareConfig(fov_mm=args.fov_mm, grid=args.recon_grid, num_views=args.views, det_size=args.det)
    truth = normalised_volume(data, affine, coarse)
    rows = []
    for n in args.recon_views:
        ids = [int(i * args.views // n) for i in range(n)]
        geo_fine = fine.geometry().subset(ids)
        clean = forward_project(normalised_volume(data, affine, fine), geo_fine)
        noisy = add_noise(clean, ProjectionNoise(photons=1e5), seed=n, scale=fine.attenuation_scale)
        geo = coarse.geometry().subset(ids)
        # name -> (method(projections, geometry, iterations, tv_iterations), iterations, tv_iterations)
        methods = {
            "FDK (ram-lak)": (lambda p, g, it, tv: fdk(p, g), 0, 0),
            f"SART ({args.sart_iters} it)": (
                lambda p, g, it, tv: sart(p, g, iterations=it, progress=False), args.sart_iters, 0
            ),
            f"ASD-POCS ({args.asd_iters} it x {args.tv_iters} TV)": (
                lambda p, g, it, tv: asd_pocs(p, g, iterations=it, tv_iterations=tv, progress=False),
                args.asd_iters,
                args.tv_iters,
            ),
        }
        for name, (method, iterations, tv_iterations) in methods.items():
            method(noisy[:, :2], geo.subset(range(2)), 1, 1)  # warm-up: the same kernels, 2 views, 1 iteration
            start = time.perf_counter()
            rec = method(noisy, geo, iterations, tv_iterations)
            t = time.perf_counter() - start
            rec = rec.clamp(0, 1)
            rows.append(
                dict(
                    section="recon",
                    case=f"{n} views, {args.recon_grid}^3",
                    provider=name,
                    seconds=t,
                    psnr_db=float(psnr(rec, truth, data_range=1.0)[0]),
                    ssim_slices=float(ssim_slices(rec, truth, data_range=1.0, axis=0)[0]),
                )
            )
            print(f"  recon {n} views {name} done", file=sys.stderr, flush=True)
    return rows


# ----------------------------------------------------------------------------- Gaussian rows
def bench_gaussians(quick: bool, torch_max_n: int | None) -> tuple[list[dict], str]:
    path = ROOT / "benchmarks" / "project_gaussians.py"
    if not path.is_file():
        return [], f"Gaussian projection rows missing: {path} does not exist"
    spec = importlib.util.spec_from_file_location("project_gaussians", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "run"):
        return [], f"Gaussian projection rows missing: {path} has no run(quick)"
    kwargs = {}
    if torch_max_n is not None and "torch_max_n" in inspect.signature(module.run).parameters:
        kwargs["torch_max_n"] = torch_max_n
    note = "" if not kwargs else f"(dense torch reference limited to N <= {torch_max_n})"
    return module.run(quick=quick, **kwargs), note


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_forward(forward: list[dict]) -> None:
    print("\nForward projection (example CT, cone beam)")
    print(f"{'case':<22} {'provider':<38} {'views':>5} {'s total':>9} {'s/view':>8} {'x vs peer':>9} {'rel diff':>9}")
    for r in forward:
        print(
            f"{r['case']:<22} {r['provider']:<38} {r['views_timed']:>5} {r['seconds']:>9.2f} "
            f"{r['seconds_per_view']:>8.3f} {fmt(r['speedup_vs_peer'], '.1f'):>9} "
            f"{fmt(r['rel_diff_vs_numba'], '.2%'):>9}"
        )
    print(
        "  (x vs peer: seconds per view of DiffDRR / this provider; rel diff: ||a - b|| / ||b|| against the "
        "numba projection on the same views)",
        flush=True,
    )


def print_recon(recon: list[dict]) -> None:
    print("\nSparse-view reconstruction (example CT, noisy projections from the fine grid)")
    print(f"{'case':<18} {'method':<32} {'seconds':>8} {'PSNR dB':>8} {'SSIM':>7}")
    for r in recon:
        print(f"{r['case']:<18} {r['provider']:<32} {r['seconds']:>8.1f} {r['psnr_db']:>8.2f} {r['ssim_slices']:>7.4f}")
    print("  (PSNR over the 3D volume, SSIM averaged over axial slices, data_range 1)", flush=True)


def print_gaussians(gaussians: list[dict], note: str) -> None:
    print("\nGaussian X-ray projection (benchmarks/project_gaussians.py)")
    if note:
        print("  " + note)
    for r in gaussians:
        print(
            f"  N={r.get('n_gaussians')!s:>7} {r.get('det', '')} {r.get('backend', ''):<7} {r.get('mode', ''):<8} "
            f"{fmt(r.get('seconds'), '.4f'):>9} s  {r.get('note', '')}"
        )


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--grids", type=int, nargs="+", default=None, help="forward-projection grids (default 128 256)")
    p.add_argument("--views", type=int, default=None, help="views of the full scan (default 50)")
    p.add_argument("--det", type=int, default=None, help="detector pixels per side (default 256)")
    p.add_argument("--fov-mm", type=float, default=400.0)
    p.add_argument("--torch-views", type=int, default=None, help="views timed for the torch backend (default 5)")
    p.add_argument("--peer-views", type=int, default=None, help="views timed for DiffDRR (default 5)")
    p.add_argument("--recon-grid", type=int, default=None, help="reconstruction grid (default 128)")
    p.add_argument("--sim-grid", type=int, default=None, help="grid the projections are simulated on (256)")
    p.add_argument("--recon-views", type=int, nargs="+", default=[6, 8, 10])
    p.add_argument("--sart-iters", type=int, default=None)
    p.add_argument("--asd-iters", type=int, default=None)
    p.add_argument("--tv-iters", type=int, default=None)
    p.add_argument("--skip-gaussians", action="store_true")
    p.add_argument("--ct", type=Path, default=None,
                   help="NIfTI CT in HU (default: the example CT shipped in the package)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per forward-projection row, after a warm-up (median; default 3, 1 in --quick)")
    p.add_argument(
        "--gaussian-torch-max-n",
        type=int,
        default=None,
        help="largest N for the dense torch reference in the Gaussian rows (default: 0 in full mode, where one "
        "4k-Gaussian torch pass takes minutes on 2 busy cores; the script's own default in --quick)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "projectors.json")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(
        grids=[48] if quick else [128, 256],
        views=10 if quick else 50,
        det=64 if quick else 256,
        torch_views=2 if quick else 5,
        peer_views=2 if quick else 5,
        recon_grid=32 if quick else 128,
        sim_grid=48 if quick else 256,
        sart_iters=3 if quick else 20,
        asd_iters=3 if quick else 10,
        tv_iters=5 if quick else 10,
        repeats=1 if quick else 3,
        ct=example_ct_path(),
    )
    if args.gaussian_torch_max_n is None and not quick:
        args.gaussian_torch_max_n = 0
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    data, affine = load_ct(args.ct)
    meta = dict(
        quick=args.quick,
        torch_threads=torch.get_num_threads(),
        numba_threads=numba.get_num_threads(),
        cpu_count=os.cpu_count(),
        load_average_at_start=os.getloadavg(),
        torch=torch.__version__,
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        detector_pixel_mm=PrepareConfig(fov_mm=args.fov_mm, det_size=args.det).geometry().det_spacing[0],
    )
    result = dict(meta=meta, forward=[], recon=[], gaussians=[])
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section, so a long run that is stopped keeps what it measured
        args.out.write_text(json.dumps(result, indent=2))

    result["forward"] = bench_forward(data, affine, args)
    print_forward(result["forward"])
    save()
    result["recon"] = bench_recon(data, affine, args)
    print_recon(result["recon"])
    save()
    if args.skip_gaussians:
        note = "skipped (--skip-gaussians)"
    else:
        result["gaussians"], note = bench_gaussians(args.quick, args.gaussian_torch_max_n)
    meta["note_gaussians"] = note
    print_gaussians(result["gaussians"], note)
    meta["load_average_at_end"] = os.getloadavg()
    save()
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
