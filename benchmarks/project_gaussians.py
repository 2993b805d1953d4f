"""Benchmark :func:`medgauss.render.project`: Gaussians -> one cone-beam view, every backend, fwd and fwd+bwd.

Gaussians fill a 256 mm cube like a trained CT representation (spacing ~ edge / N^(1/3), scales 0.3-0.9
of the spacing, random rotations), seen by a 256^2 detector (dso 1000 mm, dsd 1500 mm) that covers the
cube. Every backend, the dense torch reference included, is timed the same way in the same run: one
warm-up call (numba compilation, Triton autotuning, torch's first-call allocations), then the median of
``--repeats`` timed calls (``--torch-repeats`` for the reference, default the same count: fewer samples
of a slow row, same statistic); ratios are to the torch reference where it ran. The reference
evaluates every (ray, Gaussian) pair, so it is skipped above ``--torch-max-n`` Gaussians (its time
grows as N x rays). Triton runs only on CUDA (its CPU interpreter is for tests, not timing).

    python benchmarks/project_gaussians.py            # 4k / 32k / 128k Gaussians, 256^2
    python benchmarks/project_gaussians.py --quick    # 512 / 2k Gaussians, 64^2

Prints a table and writes ``benchmarks/results/project_gaussians.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numba
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medgauss.dispatch import available_backends  # noqa: E402
from medgauss.gaussians import Gaussians  # noqa: E402
from medgauss.geometry import ConeBeamGeometry  # noqa: E402
from medgauss.render.xray import project  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "project_gaussians.json"
EDGE_MM = 256.0


def make_gaussians(n: int, device: torch.device, seed: int = 0) -> Gaussians:
    """``n`` Gaussians spread over a cube of ``EDGE_MM`` (world mm, float32)."""
    gen = torch.Generator().manual_seed(seed)
    spacing = EDGE_MM / n ** (1 / 3)
    means = (torch.rand(1, n, 3, generator=gen) - 0.5) * EDGE_MM
    scales = spacing * (0.3 + 0.6 * torch.rand(1, n, 3, generator=gen))
    quats = torch.randn(1, n, 4, generator=gen)
    inten = 0.02 * torch.rand(1, n, generator=gen)
    return Gaussians(means, scales, quats, inten).to(device)


def make_geometry(det: int) -> ConeBeamGeometry:
    pixel = EDGE_MM * 1.5 * 1.2 / det  # magnification 1.5, 20 % margin
    return ConeBeamGeometry(dso=1000.0, dsd=1500.0, det_shape=(det, det), det_spacing=(pixel, pixel),
                            vol_shape=(64, 64, 64), vol_spacing=(4.0, 4.0, 4.0), angles=[0.7])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_backend(g: Gaussians, geo, backend: str, mode: str, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``mode`` ("fwd" or "fwd+bwd"), after one untimed warm-up call."""
    grad = mode == "fwd+bwd"
    params = [t.clone().requires_grad_(grad) for t in (g.means, g.scales, g.quats, g.intensities)]
    cot = torch.randn(1, 1, *geo.det_shape, device=g.device)

    def once() -> None:
        gg = Gaussians(*params, validate=False)
        if mode == "fwd":
            with torch.no_grad():
                project(gg, geo, backend=backend)
        else:
            out = project(gg, geo, backend=backend)
            torch.autograd.grad((out * cot).sum(), params)

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    once()
    times = []
    for _ in range(repeats):
        _sync(g.device)
        t0 = time.perf_counter()
        once()
        _sync(g.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(quick: bool = False, sizes: list[int] | None = None, det: int | None = None,
        repeats: int | None = None, torch_max_n: int | None = None,
        backends: list[str] | None = None, torch_repeats: int | None = None,
        on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Time every backend; one row per (N, backend, mode) with ``seconds`` and ``ratio_to_torch``.

    Args:
        quick: small sizes (512 / 2k Gaussians, 64^2 detector).
        sizes, det, repeats, torch_max_n, backends: override the defaults of the chosen mode.
        torch_repeats: timed calls of the dense reference (``None``: ``repeats``); like every backend, it
            gets one warm-up call first.
        on_row: called with the rows so far after each measurement (e.g. to save partial results).
    """
    sizes = sizes or ([512, 2048] if quick else [4096, 32768, 131072])
    det = det or (64 if quick else 256)
    repeats = repeats or 3
    torch_repeats = torch_repeats or repeats
    torch_max_n = torch_max_n if torch_max_n is not None else 4096
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = backends or ["torch", "numba", "triton"]
    usable = set(available_backends("project", device))
    if device.type == "cpu":
        usable.discard("triton")  # the CPU interpreter is not a timing target
    geo = make_geometry(det)
    rows: list[dict] = []
    for n in sizes:
        g = make_gaussians(n, device)
        for mode in ("fwd", "fwd+bwd"):
            ref = None
            for name in names:
                row = dict(op="project", n_gaussians=n, det=f"{det}x{det}", views=1, backend=name, mode=mode,
                           device=str(device), seconds=None, ratio_to_torch=None, note="")
                if name not in usable:
                    row["note"] = "unavailable on this machine"
                elif name == "torch" and n > torch_max_n:
                    row["note"] = f"skipped: dense reference above --torch-max-n={torch_max_n}"
                elif name == "torch":
                    row["seconds"] = ref = time_backend(g, geo, name, mode, torch_repeats)
                else:
                    row["seconds"] = time_backend(g, geo, name, mode, repeats)
                if row["seconds"] is not None and ref is not None:
                    row["ratio_to_torch"] = ref / row["seconds"]
                rows.append(row)
                print(f"  measured N={n} {name} {mode}: {row['seconds']}", file=sys.stderr, flush=True)
                if on_row is not None:
                    on_row(rows)
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'N':>7} {'det':>8} {'backend':>7} {'mode':>8} {'seconds':>9} {'x torch':>8}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        sec = "-" if r["seconds"] is None else f"{r['seconds']:.4f}"
        ratio = "-" if r["ratio_to_torch"] is None else f"{r['ratio_to_torch']:.1f}"
        lines.append(f"{r['n_gaussians']:>7} {r['det']:>8} {r['backend']:>7} {r['mode']:>8} {sec:>9} "
                     f"{ratio:>8}  {r['note']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--sizes", type=int, nargs="+", help="numbers of Gaussians")
    parser.add_argument("--det", type=int, help="detector rows = cols")
    parser.add_argument("--repeats", type=int, help="timed repeats per measurement, after a warm-up (median; 3)")
    parser.add_argument("--torch-max-n", type=int, help="largest N for the dense torch reference")
    parser.add_argument("--backends", nargs="+", choices=["torch", "numba", "triton"])
    parser.add_argument("--torch-repeats", type=int, default=None,
                        help="timed calls of the dense reference, after a warm-up (median; default --repeats)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                numba_threads=numba.get_num_threads(), quick=args.quick)

    def save(rows: list[dict]) -> None:
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))

    rows = run(args.quick, args.sizes, args.det, args.repeats, args.torch_max_n, args.backends,
               args.torch_repeats, on_row=save)
    save(rows)
    print(format_table(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
