"""Benchmark of medgauss.render.splat: every backend on the same Gaussians, in one run.

Rows: backend x N x volume edge x Gaussian size (small sigma ~2 voxels, medium ~6 voxels, initial
~0.2 of the edge). Columns: forward ms, forward+backward ms, evaluated (Gaussian, voxel) pairs per
second (pairs inside the cutoff ellipsoid and the volume, estimated by Monte Carlo per Gaussian),
peak extra memory, and ratios to the torch reference measured in the same run (where the reference
is affordable: it evaluates every pair, so rows above --torch-max-pairs skip it). Every row, the
torch reference included, is measured the same way (``bench_row``): one warm-up forward and one
warm-up forward+backward (numba compilation or cache loading, Triton autotuning, torch's first-call
allocations), then the median over up to --repeat timed calls (fewer when the calls of a slow row
exceed the time budget: same statistic, fewer samples), timed without memory tracing, and last the
peak memory on one more call of each under the tracer. The machine's ceiling, torch.exp elements per
second on a large float32 tensor, is measured in the same run by the same statistic: once at the
start (printed, with its best call) and, for each row's /exp column, in calls alternating with the
row's forward calls (a shared machine's speed changes from second to second: on the 2-vCPU VM this
was written on, compute-bound code gains anywhere from nothing to all of the second core, in streaks
of seconds, while torch.exp always gains ~1.9x; only alternating calls see the same machine).

    python benchmarks/splat.py --quick          # a few rows, ~10 minutes on 2 busy cores (the torch rows)
    python benchmarks/splat.py                  # the full grid of the foundation issue
    python benchmarks/splat.py --device cuda    # GPU rows (triton vs torch)
    NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/splat.py ...   # per-core figures
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medgauss.gaussians import Gaussians  # noqa: E402
from medgauss.render import available_backends, splat  # noqa: E402

SIGMA_VOXELS = {"small": 2.0, "medium": 6.0}
INITIAL_FRACTION = 0.2


def make_gaussians(n: int, edge: int, size: str, device: str, seed: int = 0) -> Gaussians:
    """Random rotated, mildly anisotropic Gaussians of a named size, centres inside the volume."""
    gen = torch.Generator().manual_seed(seed)
    sigma = INITIAL_FRACTION if size == "initial" else SIGMA_VOXELS[size] / edge
    aniso = 0.7 + 0.6 * torch.rand(1, n, 3, generator=gen)
    return Gaussians(
        0.1 + 0.8 * torch.rand(1, n, 3, generator=gen),
        sigma * aniso,
        torch.randn(1, n, 4, generator=gen),
        torch.rand(1, n, generator=gen) + 0.1,
    ).to(device)


def estimate_pairs(g: Gaussians, edge: int, cutoff: float, samples: int = 2048) -> float:
    """Expected number of voxels inside each Gaussian's cutoff ellipsoid and the volume, summed (Monte Carlo)."""
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(samples, 3, generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True) * torch.rand(samples, 1, generator=gen, dtype=torch.float64) ** (1 / 3)
    g = g.to("cpu", torch.float64)
    axes = g.rotation_matrices()[0] * g.scales[0].unsqueeze(-2) * cutoff  # [N,3,3]
    pts = g.means[0][:, None, :] + torch.einsum("nij,sj->nsi", axes, u)  # [N,S,3] uniform in the ellipsoid
    inside = ((pts >= 0) & (pts <= 1)).all(-1).double().mean(-1)
    vol_voxels = 4 / 3 * math.pi * cutoff**3 * g.scales[0].prod(-1) * edge**3
    return float((inside * vol_voxels).sum())


class PeakMemory:
    """Peak extra memory during a block.

    CUDA: the caching allocator's peak. CPU: the larger of the process RSS growth (sampled every 2 ms;
    it misses memory that glibc reuses from earlier rows) and the tracemalloc peak, which sees every
    numpy allocation (the numba backends allocate through numpy; torch's CPU allocator is not traced).
    """

    def __init__(self, device: str):
        self.device = device
        self.peak_mib = self.traced_mib = self.rss_mib = 0.0

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            import psutil

            tracemalloc.start()
            self._proc = psutil.Process()
            self._base = self._proc.memory_info().rss
            self._peak = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self.traced_mib = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            self.rss_mib = (self._peak - self._base) / 2**20
            self.peak_mib = max(self.rss_mib, self.traced_mib)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class ExpCeiling:
    """The machine's ceiling: ``torch.exp`` on a 2^25-element float32 tensor; each call times one exp, in seconds."""

    elements = 1 << 25

    def __init__(self, device: str):
        self.device = device
        self.x = torch.rand(self.elements, device=device)
        self.out = torch.empty_like(self.x)
        torch.exp(self.x, out=self.out)

    def __call__(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        torch.exp(self.x, out=self.out)
        sync(self.device)
        return time.perf_counter() - t0

    def rate(self, repeat: int = 7) -> tuple[float, float]:
        """Elements per second: ``(median, best)`` over ``repeat`` calls."""
        times = [self() for _ in range(repeat)]
        return self.elements / statistics.median(times), self.elements / min(times)


def time_call(fn, device: str, repeat: int, budget_s: float = 3.0, ceiling: ExpCeiling | None = None
              ) -> tuple[float, float | None]:
    """Median wall time in ms over up to ``repeat`` calls (fewer when one call exceeds ``budget_s / repeat``).

    With ``ceiling``, one exp call is timed right before each call, and the second value is the
    ceiling's median rate over those calls (elements/s), else ``None``: a shared machine's speed
    changes from second to second, so a ratio is only fair between calls that alternate.
    """
    times: list[float] = []
    exp_times: list[float] = []
    while len(times) < repeat:
        if ceiling is not None:
            exp_times.append(ceiling())
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if sum(times) > budget_s * 1e3:
            break
    rate = ExpCeiling.elements / statistics.median(exp_times) if exp_times else None
    return statistics.median(times), rate


def bench_row(backend: str, g: Gaussians, edge: int, cutoff: float, device: str, repeat: int,
              ceiling: ExpCeiling) -> dict:
    """Times and memory of one row, measured the same way for every backend (module docstring).

    The timed forward calls alternate with ``ceiling``'s exp calls. Returns times in ms and peak extra
    memory in MiB.
    """
    shape = (edge, edge, edge)
    leaves = [t.detach().clone().requires_grad_() for t in (g.means, g.scales, g.quats, g.intensities)]

    def forward():
        with torch.no_grad():
            splat(g, shape, cutoff=cutoff, backend=backend)

    def forward_backward():
        out = splat(Gaussians(*leaves, validate=False), shape, cutoff=cutoff, backend=backend)
        out.backward(torch.ones_like(out))

    # The same sequence for every backend, the torch reference included. Warm-up outside every measurement;
    # times without tracemalloc and the RSS-sampling thread (they slow the Python glue and torch's
    # allocations); then memory, in a separate pass of one call each.
    forward()
    forward_backward()
    sync(device)
    fwd, rate = time_call(forward, device, repeat, ceiling=ceiling)
    fb = time_call(forward_backward, device, repeat)[0]
    with PeakMemory(device) as mem_f:
        forward()
    with PeakMemory(device) as mem_fb:
        forward_backward()
    return {"fwd_ms": fwd, "fwd_bwd_ms": fb, "exp_elements_per_s": rate, "peak_fwd_mib": mem_f.peak_mib,
            "peak_fwd_bwd_mib": mem_fb.peak_mib, "traced_fwd_bwd_mib": mem_fb.traced_mib,
            "rss_fwd_bwd_mib": mem_fb.rss_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small grid (N=512, 64^3 and 96^3, medium/small)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backends", nargs="*", help="default: every backend available on the device")
    parser.add_argument("--n", nargs="*", type=int, default=None, help="numbers of Gaussians")
    parser.add_argument("--edges", nargs="*", type=int, default=None, help="volume edges (cubic volumes)")
    parser.add_argument("--sizes", nargs="*", default=None, choices=["small", "medium", "initial"])
    parser.add_argument("--cutoff", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--torch-max-pairs", type=float, default=5e8,
                        help="skip the torch reference when N x voxels exceeds this (it evaluates every pair)")
    parser.add_argument("--max-pairs", type=float, default=4e9,
                        help="skip any backend when the estimated evaluated pairs exceed this")
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "splat.json"))
    args = parser.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    backends = args.backends or available_backends("splat", args.device)
    ns = args.n or ([512] if args.quick else [512, 4096, 32768])
    edges = args.edges or ([64, 96] if args.quick else [64, 96, 128])
    sizes = args.sizes or (["small", "medium"] if args.quick else ["small", "medium", "initial"])

    exp = ExpCeiling(args.device)
    ceiling, ceiling_best = exp.rate()
    header = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "numba_threads": os.environ.get("NUMBA_NUM_THREADS", "default"),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "exp_elements_per_s": ceiling,
        "exp_elements_per_s_best": ceiling_best,
        "cutoff": args.cutoff,
    }
    print(f"# splat benchmark on {header['device']} ({header['threads']} torch threads, load {header['load_average']})")
    print(f"# ceiling: torch.exp {ceiling:.3g} float32 elements/s (median call; best {ceiling_best:.3g}); "
          f"cutoff {args.cutoff}")
    cols = (f"{'backend':<7} {'N':>6} {'vol':>5} {'size':<8} {'fwd ms':>10} {'fwd+bwd ms':>11} {'pairs/s':>9} "
            f"{'/exp':>5} {'MiB np/rss':>11} {'fwd x':>7} {'f+b x':>7}")
    print(cols)
    print("-" * len(cols))
    rows = []
    for n in ns:
        for edge in edges:
            for size in sizes:
                g = make_gaussians(n, edge, size, args.device)
                pairs = estimate_pairs(g, edge, args.cutoff)
                ref = None
                order = ["torch"] + [b for b in backends if b != "torch"] if "torch" in backends else backends
                for backend in order:
                    dense_pairs = n * edge**3
                    if (backend == "torch" and dense_pairs > args.torch_max_pairs) or pairs > args.max_pairs:
                        rows.append({"backend": backend, "n": n, "edge": edge, "size": size, "skipped": True})
                        print(f"{backend:<7} {n:>6} {edge:>4}^3 {size:<8}   skipped (too many pairs for this backend)")
                        continue
                    res = bench_row(backend, g, edge, args.cutoff, args.device, args.repeat, exp)
                    res.update(backend=backend, n=n, edge=edge, size=size, pairs=pairs,
                               pairs_per_s=pairs / (res["fwd_ms"] / 1e3))
                    row_ceiling = res["exp_elements_per_s"]
                    if backend == "torch":
                        ref = res
                    res["fwd_speedup_vs_torch"] = ref["fwd_ms"] / res["fwd_ms"] if ref else None
                    res["fwd_bwd_speedup_vs_torch"] = ref["fwd_bwd_ms"] / res["fwd_bwd_ms"] if ref else None
                    rows.append(res)
                    fx = f"{res['fwd_speedup_vs_torch']:.0f}x" if ref else "-"
                    fbx = f"{res['fwd_bwd_speedup_vs_torch']:.0f}x" if ref else "-"
                    print(f"{backend:<7} {n:>6} {edge:>4}^3 {size:<8} "
                          f"{res['fwd_ms']:>10.1f} {res['fwd_bwd_ms']:>11.1f} "
                          f"{res['pairs_per_s']:>9.2e} {res['pairs_per_s'] / row_ceiling:>5.2f} "
                          f"{res['traced_fwd_bwd_mib']:>5.0f}/{res['rss_fwd_bwd_mib']:<5.0f} {fx:>7} {fbx:>7}",
                          flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
