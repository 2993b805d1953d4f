"""Pretraining data at scale: peak memory per rank and epoch times, in-memory vs on-disk volume cache.

Writes ``max(--sizes)`` CT phantoms once, then for each dataset size and each way of holding the
preprocessed volumes starts ``--world-size`` rank processes at once (subprocesses of this script), each
building its dataset with its rank (``build_pretrain_dataset(rank=r, world_size=W)``) and drawing its
sample ids through a DataLoader for ``--epochs`` epochs. Modes:

* ``memory, every rank all`` - the cache before sharding: every rank preprocesses and holds every volume;
* ``memory, sharded``         - each rank holds only its shard in RAM;
* ``disk, cold``              - on-disk cache, empty: each rank preprocesses its shard lazily during epoch 1;
* ``disk, warm``              - new processes on the cache the cold run filled (a second run, or a resume);
* ``disk, cold, N workers``   - as ``disk, cold`` with DataLoader workers (largest size only).

Reported per rank: peak RSS (``ru_maxrss``; worker processes separately), the time to build the dataset,
of epoch 1 and of the later epochs, and a checksum of the crops (the sharded modes must agree: the cache
does not change a sample).

    python benchmarks/data_scaling.py            # 50 / 100 / 200 phantoms of 64^3, 2 ranks
    python benchmarks/data_scaling.py --quick    # 8 / 16 / 32 phantoms of 48^3

Prints a table and writes ``benchmarks/results/data_scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("memory, every rank all", "memory, sharded", "disk, cold", "disk, warm")


def _peak_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def run_rank(cfg: dict) -> dict:
    """One rank: build its dataset, draw ``epochs`` epochs of its sample ids, report memory and times."""
    import torch

    sys.path.insert(0, str(ROOT))
    from torch.utils.data import DataLoader

    from medgauss.data import ShardedSampleSampler, build_pretrain_dataset

    torch.set_num_threads(1)
    rss_import = _peak_mib(resource.RUSAGE_SELF)
    rank, world = cfg["rank"], cfg["world_size"]
    if cfg["mode"].startswith("memory, every rank all"):
        kw = {"cache": "memory", "rank": 0, "world_size": 1}  # every rank holds every volume
    elif cfg["mode"].startswith("memory"):
        kw = {"cache": "memory", "rank": rank, "world_size": world}
    else:
        kw = {"cache": "disk", "cache_dir": cfg["cache_dir"], "rank": rank, "world_size": world}
    t0 = time.perf_counter()
    dataset = build_pretrain_dataset(
        cfg["datalist"],
        spatial_size=cfg["crop"],
        pixdim=cfg["pixdim"],
        samples_per_volume=cfg["samples_per_volume"],
        seed=0,
        **kw,
    )
    build_s = time.perf_counter() - t0
    per_rank = dataset.samples_per_epoch // world
    batch = cfg["batch_size"]
    loader = DataLoader(
        dataset,
        batch_size=batch,
        sampler=ShardedSampleSampler(rank, world),  # the engine's sampler: ids rank + W k
        num_workers=cfg["workers"],
        persistent_workers=cfg["workers"] > 0,
    )
    batches = iter(loader)
    epochs, checksum = [], 0.0
    for _ in range(cfg["epochs"]):
        t = time.perf_counter()
        for b in islice(batches, per_rank // batch):
            checksum += float(b["image"].double().sum())
        epochs.append(time.perf_counter() - t)
    del batches, loader  # joins the workers, so RUSAGE_CHILDREN holds their peak
    return {
        "mode": cfg["mode"],
        "volumes": len(cfg["datalist"]),
        "rank": rank,
        "volumes_held": len(dataset.volumes.indices),
        "rss_after_import_mib": rss_import,
        "peak_rss_mib": _peak_mib(resource.RUSAGE_SELF),
        "workers_peak_rss_mib": _peak_mib(resource.RUSAGE_CHILDREN) if cfg["workers"] else None,
        "build_s": build_s,
        "epoch_s": epochs,
        "samples_per_epoch_per_rank": per_rank // batch * batch,
        "checksum": checksum,
    }


def launch(cfg: dict, world: int) -> list[dict]:
    """Run ``world`` rank processes of ``cfg`` at once; return their reports (rank order)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps({**cfg, "rank": r, "world_size": world})],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(world)
    ]
    reports = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"rank process failed ({cfg['mode']}, {len(cfg['datalist'])} volumes)")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def print_table(rows: list[dict], world: int) -> None:
    ranks = "/".join(f"r{r}" for r in range(world))
    head = (
        f"{'mode':<26} {'vols':>5} {'held/rank':>9} {'peak RSS ' + ranks + ' MiB':>20} {'+import':>8} "
        f"{'build s':>8} {'epoch 1 s':>9} {'cold s':>7} {'later s':>8} {'workers MiB':>11} {'crops':>6}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        reps = row["ranks"]
        peaks = "/".join(f"{r['peak_rss_mib']:.0f}" for r in reps)
        growth = max(r["peak_rss_mib"] - r["rss_after_import_mib"] for r in reps)
        build = max(r["build_s"] for r in reps)
        first = max(r["epoch_s"][0] for r in reps)
        cold = max(r["build_s"] + r["epoch_s"][0] for r in reps)
        later = max(sum(r["epoch_s"][1:]) / max(len(r["epoch_s"]) - 1, 1) for r in reps)
        workers = reps[0]["workers_peak_rss_mib"]
        wtxt = "/".join(f"{r['workers_peak_rss_mib']:.0f}" for r in reps) if workers is not None else "-"
        held = "/".join(str(r["volumes_held"]) for r in reps)
        print(
            f"{row['mode']:<26} {row['volumes']:>5} {held:>9} {peaks:>20} {growth:>8.0f} {build:>8.2f} "
            f"{first:>9.2f} {cold:>7.2f} {later:>8.2f} {wtxt:>11} {row['crops']:>6}"
        )
    print(
        "peak RSS: ru_maxrss of each rank process; +import: the largest growth over the RSS right after the "
        "imports; cold s: build + epoch 1 (the preprocessing); later s: mean of epochs 2..; times are the "
        "slower rank's. crops: 'same' when both ranks' crop checksums equal those of 'memory, sharded'."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 / 16 / 32 phantoms of 48^3, 24^3 crops")
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200], help="volumes per dataset")
    parser.add_argument("--shape", type=int, default=64, help="phantom grid (voxels per axis)")
    parser.add_argument("--spacing", type=float, default=2.5, help="phantom voxel size, mm")
    parser.add_argument("--pixdim", type=float, default=2.5, help="preprocessing voxel size, mm")
    parser.add_argument("--crop", type=int, default=32, help="crop size (voxels per axis)")
    parser.add_argument("--samples-per-volume", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the last row (0: no row)")
    parser.add_argument("--data-dir", type=Path, default=None, help="where to write phantoms + caches (temp)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "data_scaling.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_rank(json.loads(args.worker))))
        return
    if args.quick:
        args.sizes, args.shape, args.crop = [8, 16, 32], 48, 24
    sys.path.insert(0, str(ROOT))
    from medgauss.data import write_phantom_dataset

    work = Path(tempfile.mkdtemp(prefix="medgauss-data-scaling-", dir=args.data_dir))
    try:
        t = time.perf_counter()
        datalist = write_phantom_dataset(
            work / "phantoms", max(args.sizes), shape=[args.shape] * 3, spacing=args.spacing, seed=0
        )
        print(f"wrote {len(datalist)} phantoms of {args.shape}^3 in {time.perf_counter() - t:.1f} s ({work})")
        base = {
            "crop": args.crop,
            "pixdim": args.pixdim,
            "samples_per_volume": args.samples_per_volume,
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "workers": 0,
        }
        plan = [(n, mode, 0) for n in sorted(args.sizes) for mode in MODES]
        if args.workers:
            plan.append((max(args.sizes), f"disk, cold, {args.workers} workers", args.workers))
        rows, reference = [], {}
        for n, mode, workers in plan:
            cache_dir = work / f"cache-{n}-{workers}"
            if mode.startswith("disk, cold"):
                shutil.rmtree(cache_dir, ignore_errors=True)
            cfg = {**base, "mode": mode, "workers": workers, "datalist": datalist[:n], "cache_dir": str(cache_dir)}
            reports = launch(cfg, args.world_size)
            sums = [r["checksum"] for r in reports]
            if mode == "memory, sharded":
                reference[n] = sums
            crops = "ref" if mode == "memory, sharded" else ("same" if sums == reference.get(n) else "other")
            rows.append({"mode": mode, "volumes": n, "workers": workers, "crops": crops, "ranks": reports})
            print(f"  done: {mode}, {n} volumes", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print_table(rows, args.world_size)
    import monai
    import torch

    meta = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "platform": platform.platform(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
