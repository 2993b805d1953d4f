"""Time every Triton operation on a GPU against the torch reference, in one run.

Operations: ``splat`` into a dense volume, ``splat`` at query points, ``project`` (cone and parallel
beam), each forward only (``fwd``) and forward + backward (``fwd+bwd``). Every row, the torch
reference included, is timed the same way in the same process: one untimed warm-up call (Triton
compilation, numba compilation, first allocations), then the median of ``--repeat`` calls, each
ending with a device synchronisation. ``x torch`` is the reference's time over the row's (a speed-up);
``max rel diff`` is the row's largest deviation from the reference's forward output, over the
reference's largest value (a sanity check only: correctness is what ``TRITON_INTERPRET=0 pytest -m gpu``
validates; see CONTRIBUTING.md). ``peak MiB`` is the peak CUDA memory of one timed call.

    python benchmarks/gpu.py                          # on a CUDA machine: realistic sizes
    python benchmarks/gpu.py --quick                  # small sizes, well under a minute
    python benchmarks/gpu.py --device cpu --quick     # check the script on a CPU: torch and numba rows

Without a CUDA device (and ``--device cuda``, the default) it says so and exits with status 0. On a
CPU, Triton rows are skipped (its interpreter is for tests, not timing). The dense torch reference is
skipped above ``--torch-max-pairs`` (Gaussian, point) pairs. Prints a table and writes
``benchmarks/results/gpu.json`` (``gpu-cpu-check.json`` for ``--device cpu``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medgauss.dispatch import available_backends  # noqa: E402
from medgauss.gaussians import Gaussians  # noqa: E402
from medgauss.geometry import ConeBeamGeometry, ParallelBeamGeometry  # noqa: E402
from medgauss.render import project, splat  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ("means", "scales", "quats", "intensities")

# (volume edge, Gaussians, query points) for splat; (detector edge, views, Gaussians) for project.
SIZES = {
    "full": dict(splat=(96, 8192, 262144), project=(256, 4, 8192)),
    "quick": dict(splat=(32, 1024, 16384), project=(64, 2, 1024)),
}


# ------------------------------------------------------------------------------------------- inputs
def normalised_gaussians(n: int, edge: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Gaussians:
    """``n`` Gaussians filling ``[0, 1]^3`` like a trained volume: scales 0.3-0.9 of the mean spacing."""
    gen = torch.Generator().manual_seed(seed)
    spacing = 1.0 / n ** (1 / 3)
    means = torch.rand(1, n, 3, generator=gen, dtype=torch.float64)
    scales = spacing * (0.3 + 0.6 * torch.rand(1, n, 3, generator=gen, dtype=torch.float64))
    quats = torch.randn(1, n, 4, generator=gen, dtype=torch.float64)
    inten = torch.rand(1, n, generator=gen, dtype=torch.float64)
    return Gaussians(means, scales, quats, inten).to(device=device, dtype=dtype)


def world_gaussians(n: int, device: torch.device, dtype: torch.dtype, edge_mm: float = 256.0,
                    seed: int = 1) -> Gaussians:
    """``n`` Gaussians filling a cube of ``edge_mm`` (world mm), as a CT representation would."""
    g = normalised_gaussians(n, 0, torch.device("cpu"), torch.float64, seed)
    return Gaussians((g.means - 0.5) * edge_mm, g.scales * edge_mm, g.quats, g.intensities * 0.02).to(
        device=device, dtype=dtype)


def geometry(kind: str, det: int, views: int, edge_mm: float = 256.0):
    angles = torch.linspace(0.0, math.pi, views + 1)[:-1]
    if kind == "cone":
        pixel = edge_mm * 1.5 * 1.2 / det  # magnification 1.5, 20 % margin
        return ConeBeamGeometry(dso=1000.0, dsd=1500.0, det_shape=(det, det), det_spacing=(pixel, pixel),
                                vol_shape=(64, 64, 64), vol_spacing=(4.0, 4.0, 4.0), angles=angles)
    pixel = edge_mm * 1.2 / det
    return ParallelBeamGeometry(det_shape=(det, det), det_spacing=(pixel, pixel), vol_shape=(64, 64, 64),
                                vol_spacing=(4.0, 4.0, 4.0), angles=angles)


# ------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], torch.Tensor], device: torch.device, repeat: int) -> tuple[float, float | None]:
    """Median seconds of ``repeat`` calls after one warm-up call, and the peak CUDA MiB of one call."""
    fn()
    sync(device)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak


def make_call(op: Callable[[Gaussians, str], torch.Tensor], g: Gaussians, backend: str,
              mode: str) -> Callable[[], torch.Tensor]:
    """A closure running ``op`` once: forward under no_grad, or forward + backward to every parameter."""
    params = [getattr(g, f).detach().clone().requires_grad_(mode == "fwd+bwd") for f in FIELDS]
    cotangent: list[torch.Tensor] = []

    def call() -> torch.Tensor:
        gg = Gaussians(*params, validate=False)
        if mode == "fwd":
            with torch.no_grad():
                return op(gg, backend)
        out = op(gg, backend)
        if not cotangent:
            gen = torch.Generator().manual_seed(2)
            cotangent.append(torch.randn(out.shape, generator=gen).to(out))
        torch.autograd.grad((out * cotangent[0]).sum(), params)
        return out.detach()

    return call


# --------------------------------------------------------------------------------------------- rows
def operations(size: dict, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Every operation with its inputs, a label and its (Gaussian, point) pair count for the reference."""
    edge, n_splat, m = size["splat"]
    det, views, n_proj = size["project"]
    g_norm = normalised_gaussians(n_splat, edge, device, dtype)
    points = torch.rand(1, m, 3, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=dtype)
    g_world = world_gaussians(n_proj, device, dtype)
    cone, par = geometry("cone", det, views), geometry("parallel", det, views)
    return [
        dict(name="splat dense", shape=f"{edge}^3", n=n_splat, pairs=n_splat * edge**3, g=g_norm, kind="splat",
             op=lambda g, b: splat(g, (edge, edge, edge), cutoff=3.0, backend=b)),
        dict(name="splat points", shape=f"{m} pts", n=n_splat, pairs=n_splat * m, g=g_norm, kind="splat",
             op=lambda g, b: splat(g, (edge, edge, edge), points=points, cutoff=3.0, backend=b)),
        dict(name="project cone", shape=f"{views}x{det}^2", n=n_proj, pairs=n_proj * views * det * det, g=g_world,
             kind="project", op=lambda g, b: project(g, cone, cutoff=3.0, backend=b)),
        dict(name="project parallel", shape=f"{views}x{det}^2", n=n_proj, pairs=n_proj * views * det * det,
             g=g_world, kind="project", op=lambda g, b: project(g, par, cutoff=3.0, backend=b)),
    ]


def run(device: torch.device, quick: bool, repeat: int, torch_max_pairs: float, dtype: torch.dtype,
        backends: list[str] | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """One row per (operation, backend, mode); the torch reference first, ratios to it."""
    size = SIZES["quick" if quick else "full"]
    rows: list[dict] = []
    for spec in operations(size, device, dtype):
        usable = set(available_backends(spec["kind"], device))
        if device.type == "cpu":
            usable.discard("triton")  # the interpreter is for tests, not timing
        names = backends or (["torch", "triton"] if device.type == "cuda" else ["torch", "numba"])
        names = ["torch"] + [b for b in names if b != "torch"]
        for mode in ("fwd", "fwd+bwd"):
            ref_time, ref_out = None, None
            for backend in names:
                row = dict(op=spec["name"], size=spec["shape"], n_gaussians=spec["n"], backend=backend, mode=mode,
                           dtype=str(dtype).replace("torch.", ""), seconds=None, x_torch=None, max_rel_diff=None,
                           peak_mib=None, note="")
                if backend not in usable:
                    row["note"] = f"unavailable on {device.type}"
                elif backend == "torch" and spec["pairs"] > torch_max_pairs:
                    row["note"] = f"skipped: {spec['pairs']:.2g} pairs > --torch-max-pairs"
                else:
                    call = make_call(spec["op"], spec["g"], backend, mode)
                    row["seconds"], row["peak_mib"] = time_call(call, device, repeat)
                    out = call().float()
                    if backend == "torch":
                        ref_time, ref_out = row["seconds"], out
                    elif ref_out is not None:
                        row["x_torch"] = ref_time / row["seconds"]
                        scale = ref_out.abs().max().clamp_min(1e-30)
                        row["max_rel_diff"] = float(((out - ref_out).abs().max() / scale).item())
                rows.append(row)
                log(f"  measured {row['op']} {backend} {mode}: {row['seconds']}")
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'operation':<17} {'size':>10} {'N':>6} {'backend':>7} {'mode':>8} {'seconds':>9} {'x torch':>8} "
            f"{'max rel diff':>12} {'peak MiB':>9}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        sec = "-" if r["seconds"] is None else f"{r['seconds']:.4f}"
        ratio = "-" if r["x_torch"] is None else f"{r['x_torch']:.1f}"
        diff = "-" if r["max_rel_diff"] is None else f"{r['max_rel_diff']:.1e}"
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"{r['op']:<17} {r['size']:>10} {r['n_gaussians']:>6} {r['backend']:>7} {r['mode']:>8} "
                     f"{sec:>9} {ratio:>8} {diff:>12} {peak:>9}  {r['note']}")
    return "\n".join(lines)


def machine(device: torch.device) -> dict:
    info = dict(python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                triton_interpret=os.environ.get("TRITON_INTERPRET"))
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cuda (default; exits cleanly without one) or cpu (checks the script: torch, numba)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per row after one warm-up (median)")
    parser.add_argument("--torch-max-pairs", type=float, default=1e10,
                        help="skip the dense torch reference above this many (Gaussian, point) pairs")
    parser.add_argument("--backends", nargs="+", choices=["torch", "numba", "triton"],
                        help="default: torch and triton on cuda, torch and numba on cpu")
    parser.add_argument("--json", type=Path, default=None, help="output path (default under benchmarks/results/)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here, nothing to time. On a GPU machine run it as is; "
              "to check the script on a CPU run it with --device cpu --quick.")
        return 0
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        print("benchmarks/gpu.py: TRITON_INTERPRET=1 is set, so Triton would run in its interpreter; "
              "unset it (or set TRITON_INTERPRET=0) to time the compiled kernels.")
        return 2
    dtype = getattr(torch, args.dtype)
    info = machine(device)
    print(f"device: {info.get('gpu', 'cpu')}  torch {info['torch']}  triton {info['triton']}  "
          f"threads {info['torch_threads']}  load {info['load_average']}", flush=True)
    rows = run(device, args.quick, args.repeat, args.torch_max_pairs, dtype, args.backends,
               log=lambda s: print(s, file=sys.stderr, flush=True))
    table = format_table(rows)
    print(table)
    out = args.json or RESULTS / ("gpu.json" if device.type == "cuda" else "gpu-cpu-check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(machine=info, quick=args.quick, repeat=args.repeat, rows=rows), indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
