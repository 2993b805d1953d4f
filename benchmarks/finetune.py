"""Does MedGMAE pretraining help downstream at CPU scale? Pretrained vs scratch fine-tuning, same budget, same seeds.

**Pretraining.** The benchmark makes its checkpoints with ``recipes/medgmae_pretrain.py --config-name
medgmae_cpu_30min`` (12,000 steps of batch 2 on 64^3 crops, 8^3 patches, the tiny 6-layer encoder), HU window
[-1000, 1000], on the bundled CT's inferior 55% only (every fine-tuning validation uses the superior 45%):

- ``medgmae``: ``gmae_tiny_anchored`` (MedGMAE, 512 anchored Gaussians);
- ``medgmae_star``: ``gmae_star_tiny_anchored`` (MedGMAE*, hierarchical residual levels);
- ``vmae``: ``vmae_tiny`` (voxel MAE, with the same visible-token pooling as the anchored queries).

A finished run under ``--pretrained-root`` is reused; its wall time (``config.yaml`` to ``model/``) and held-out
masked PSNR beside the non-learned fill are printed.

**Fine-tuning.** Every row runs the task's recipe (``recipes/finetune_<task>.py``) as it ships, changing only
``pretrained.checkpoint`` (``null`` = scratch: the same encoder architecture, randomly initialised),
``trainer.seed`` (the same seeds for every row; a seed fixes both the initialisation of the new layers and the
data draws) and, for scratch rows, ``optim.layer_decay=1.0`` (:data:`SCRATCH_OVERRIDES`). ``--quick`` runs
segmentation at 10% of the labels only (1% / 10% / 100% otherwise):

- **segmentation**: UNETR, Dice of the held-out superior 45% of the CT (6 classes), at 1% / 10% / 100% of the
  labelled crop pool (1 / 10 / 100 crops of 64^3), beside the intensity-histogram baseline;
- **registration**: TransMorph-style ViT registration of synthetic deformations, Dice of the warped labels and the
  % of non-positive Jacobian determinants, beside the identity (no deformation);
- **classification**: "which of 6 structures are present in this crop", macro AUC after fine-tuning, and of a
  linear probe on frozen features, beside the prior (0.5) and an intensity-histogram logistic regression.

Runs go to ``--out/<task>/<init>/<setting>/seed<k>`` (``runs/finetune_bench``); a finished run is reused, so the
table can be completed over several calls (e.g. after a pretraining run finishes). ``--workers N`` runs N recipes
at a time, each on one thread.

Usage::

    .venv/bin/python benchmarks/finetune.py --quick --workers 2     # segmentation at 10% labels only
    .venv/bin/python benchmarks/finetune.py                           # the recipes' default budgets
    .venv/bin/python benchmarks/finetune.py --inits scratch medgmae --tasks segmentation
    .venv/bin/python benchmarks/finetune.py --tables benchmarks/results/finetune_quick.json   # re-print

Prints the tables (mean ± sd over seeds, and pretrained - scratch with its verdict) and MedGMAE's paper numbers,
and writes ``benchmarks/results/finetune.json`` (``finetune_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pretrained import heldout_quality, pretrain, run_seconds  # noqa: E402  (benchmarks/_pretrained.py)

RESULTS = ROOT / "benchmarks" / "results"
PRETRAIN_CONFIG = "medgmae_cpu_30min"
PRETRAINED = {  # name -> (label, recipe overrides of the pretraining run)
    "medgmae": ("MedGMAE", ()),
    "medgmae_star": ("MedGMAE*", ("model=gmae_star_tiny_anchored",)),
    "vmae": ("voxel MAE", ("model=vmae_tiny", "~model.num_queries", "~model.max_scale", "model.mask_pool_sigma=1.0")),
}
INITS = ("scratch", *PRETRAINED)
LABELS = {"scratch": "scratch", **{k: v[0] for k, v in PRETRAINED.items()}}
TASKS = ("segmentation", "registration", "classification")
FRACTIONS = (0.01, 0.1, 1.0)
SEEDS = (41, 42, 43)
QUICK_FRACTIONS = (0.1,)
SCRATCH_OVERRIDES = ("optim.layer_decay=1.0",)
"""Scratch rows train without layer-wise lr decay: it protects pretrained features, and on a random encoder it only
slows the encoder down (classification from scratch: 0.673 macro AUC with decay 0.75 vs 0.776 without)."""

# MedGMAE paper numbers, for reference (PAPERS.md): AMOS Dice at 1/10/100% labels (UNETR), CT-RATE AUC (%),
# IXI / OASIS registration Dice (%).
PAPER = {
    "segmentation": {"scratch (UNETR)": (23.67, 60.06, 77.02), "MedGMAE": (58.79, 75.65, 84.90)},
    "classification": {"scratch (UNETR)": 71.43, "MedGMAE": 76.40},
    "registration": {"TransMorph (scratch)": (74.5, 81.6), "MedGMAE": (73.7, 85.7)},
}


def job_list(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (task, init, setting, seed) fine-tuning run of this call."""
    jobs = []
    for task in args.tasks:
        settings: list[tuple[str, list[str]]]
        if task == "segmentation":
            settings = [(f"{f:g}", [f"data.crops.label_fraction={f}"]) for f in args.fractions]
        elif task == "classification":
            settings = [("finetune", ["mode=finetune"]), ("linear_probe", ["mode=linear_probe"])]
        else:
            settings = [("default", [])]
        for name, overrides in settings:  # seed-major: a partial run still has whole seeds of every row
            for seed in args.seeds:
                for init in args.inits:
                    jobs.append({"task": task, "init": init, "setting": name, "seed": seed,
                                 "overrides": overrides, "run_dir": args.out / task / init / name / f"seed{seed}"})
    return jobs


def final_record(run_dir: Path) -> dict[str, Any] | None:
    """The last line of a run's ``validation.jsonl`` (``None``: no validation yet)."""
    path = run_dir / "validation.jsonl"
    if not path.is_file() or not path.read_text().strip():
        return None
    return json.loads(path.read_text().strip().splitlines()[-1])


def run_job(job: dict[str, Any], checkpoints: dict[str, Path | None], args: argparse.Namespace) -> dict[str, Any]:
    """Run (or reuse) one fine-tuning run; returns the job with its final metrics and seconds."""
    run_dir: Path = job["run_dir"]
    done = run_dir / "benchmark_done.json"
    if done.is_file():
        return {**job, **json.loads(done.read_text())}
    checkpoint = checkpoints[job["init"]]
    command = [sys.executable, str(ROOT / "recipes" / f"finetune_{job['task']}.py"), *job["overrides"],
               f"pretrained.checkpoint={'null' if checkpoint is None else checkpoint}",
               *(SCRATCH_OVERRIDES if checkpoint is None else ()),
               f"trainer.seed={job['seed']}", f"trainer.run_dir={run_dir}", "trainer.progress=false",
               "trainer.resume=auto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run_dir / "benchmark.log", "w") as log:
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - t0
    record = final_record(run_dir)
    if code != 0 or record is None:
        tail = (run_dir / "benchmark.log").read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(command)} failed (exit {code}):\n" + "\n".join(tail))
    outcome = {"seconds": seconds, "metrics": record["metrics"], "step": record["step"]}
    done.write_text(json.dumps(outcome))
    label = f"{job['task']}/{job['init']}/{job['setting']}/seed{job['seed']}"
    print(f"  done {label}: {seconds:.0f} s", flush=True)
    return {**job, **outcome}


# ---------------------------------------------------------------------------------------------- tables
def _stats(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    mean, sd = _stats([v * scale for v in values])
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f}±{sd:.{digits}f}"


def verdict(pre: list[float], scratch: list[float]) -> str:
    """``pretrained - scratch`` with the verdict of a two-standard-error rule over the seeds (none from one seed)."""
    (mp, sp), (ms, ss) = _stats(pre), _stats(scratch)
    if math.isnan(mp) or math.isnan(ms):
        return "n/a"
    n_p, n_s = len(pre), len(scratch)
    delta = mp - ms
    if min(n_p, n_s) < 2:
        return f"{delta:+.3f} (one seed: no verdict)"
    se = math.sqrt(sp**2 / n_p + ss**2 / n_s)
    word = "helps" if delta > 2 * se else ("hurts" if delta < -2 * se else "no clear difference")
    return f"{delta:+.3f} ({word}, 2 SE = {2 * se:.3f})"


def metric_of(run: dict[str, Any], group: str, key: str) -> float:
    value = run["metrics"].get(group, {}).get(key)
    return math.nan if value is None else float(value)


def print_tables(results: dict[str, Any]) -> None:
    runs = results["runs"]
    inits = [i for i in INITS if any(r["init"] == i for r in runs)]

    def select(task, init, setting):
        return [r for r in runs if (r["task"], r["init"], r["setting"]) == (task, init, setting)]

    print("\nPretraining runs (recipes/medgmae_pretrain.py --config-name medgmae_cpu_30min, HU [-1000, 1000]):")
    for name, info in results["pretrained"].items():
        quality = info.get("heldout") or {}
        minutes = "unfinished" if info.get("minutes") is None else f"{info['minutes']:.1f} min wall"
        train = quality.get("train_seconds")
        minutes += "" if train is None else f", {train / 60:.1f} min of training steps"
        print(f"  {LABELS[name]:<10} {info['run_dir']}: {minutes}; held-out masked PSNR "
              f"{quality.get('model', math.nan):.2f} dB vs fill {quality.get('fill', math.nan):.2f} dB "
              f"(step {quality.get('step')})")

    if any(r["task"] == "segmentation" for r in runs):
        fractions = sorted({r["setting"] for r in runs if r["task"] == "segmentation"}, key=float)
        print("\nSegmentation: held-out mean Dice (6 classes, superior 45% of the CT), mean±sd over seeds")
        print(f"{'init':<12}" + "".join(f"{f'{float(f):.0%} labels':>22}" for f in fractions) + f"{'s/run':>8}")
        for init in inits:
            cells = [_cell([metric_of(r, "model", "dice_mean") for r in select("segmentation", init, f)])
                     for f in fractions]
            secs = _stats([r["seconds"] for r in runs if r["task"] == "segmentation" and r["init"] == init])[0]
            print(f"{LABELS[init]:<12}" + "".join(f"{c:>22}" for c in cells) + f"{secs:>8.0f}")
        cells = [_cell([metric_of(r, "intensity", "dice_mean") for r in runs if r["task"] == "segmentation"
                        and r["setting"] == f]) for f in fractions]
        print(f"{'intensity':<12}" + "".join(f"{c:>22}" for c in cells) + "   (histogram baseline, no training)")
        for init in inits[1:] if inits and inits[0] == "scratch" else []:
            parts = [verdict([metric_of(r, "model", "dice_mean") for r in select("segmentation", init, f)],
                             [metric_of(r, "model", "dice_mean") for r in select("segmentation", "scratch", f)])
                     for f in fractions]
            text = " | ".join(f"{float(f):.0%}: {part}" for f, part in zip(fractions, parts))
            print(f"  {LABELS[init]} - scratch: {text}")
        paper = PAPER["segmentation"]
        print("  paper (AMOS, Dice % at 1/10/100% labels; ViT encoder dim 1536 pretrained on 5,195 CTs): " + "; ".join(
            f"{k} {'/'.join(f'{v:.2f}' for v in vals)}" for k, vals in paper.items()))

    if any(r["task"] == "registration" for r in runs):
        print("\nRegistration: held-out Dice of warped labels and % non-positive Jacobian, mean±sd over seeds")
        print(f"{'init':<12}{'Dice':>18}{'% |J|<=0':>18}{'s/run':>8}")
        for init in inits:
            sel = select("registration", init, "default")
            print(f"{LABELS[init]:<12}{_cell([metric_of(r, 'model', 'dice') for r in sel]):>18}"
                  f"{_cell([metric_of(r, 'model', 'nonpositive_jacobian_pct') for r in sel]):>18}"
                  f"{_stats([r['seconds'] for r in sel])[0]:>8.0f}")
        sel = [r for r in runs if r["task"] == "registration"]
        print(f"{'identity':<12}{_cell([metric_of(r, 'identity', 'dice') for r in sel]):>18}{'0':>18}"
              "   (no deformation)")
        for init in inits[1:] if inits and inits[0] == "scratch" else []:
            print(f"  {LABELS[init]} - scratch: " + verdict(
                [metric_of(r, "model", "dice") for r in select("registration", init, "default")],
                [metric_of(r, "model", "dice") for r in select("registration", "scratch", "default")]))
        print("  paper (IXI / OASIS MRI, Dice %): " + "; ".join(
            f"{k} {v[0]}/{v[1]}" for k, v in PAPER["registration"].items()))

    if any(r["task"] == "classification" for r in runs):
        print("\nClassification: held-out macro AUC (structure presence, 6 classes), mean±sd over seeds")
        print(f"{'init':<12}{'fine-tuned':>18}{'linear probe':>18}{'s/run (ft)':>12}")
        for init in inits:
            ft, lp = select("classification", init, "finetune"), select("classification", init, "linear_probe")
            print(f"{LABELS[init]:<12}{_cell([metric_of(r, 'model', 'auc_macro') for r in ft]):>18}"
                  f"{_cell([metric_of(r, 'model', 'auc_macro') for r in lp]):>18}"
                  f"{_stats([r['seconds'] for r in ft])[0]:>12.0f}")
        sel = [r for r in runs if r["task"] == "classification"]
        print(f"{'histogram':<12}{_cell([metric_of(r, 'intensity_histogram', 'auc_macro') for r in sel]):>18}"
              "   (logistic regression on a 32-bin intensity histogram)")
        print(f"{'prior':<12}{_cell([metric_of(r, 'prior', 'auc_macro') for r in sel]):>18}")
        for init in inits[1:] if inits and inits[0] == "scratch" else []:
            for mode in ("finetune", "linear_probe"):
                print(f"  {LABELS[init]} - scratch ({mode}): " + verdict(
                    [metric_of(r, "model", "auc_macro") for r in select("classification", init, mode)],
                    [metric_of(r, "model", "auc_macro") for r in select("classification", "scratch", mode)]))
        paper = PAPER["classification"]
        print("  paper (CT-RATE AUC %): " + "; ".join(f"{k} {v}" for k, v in paper.items()))
    print(f"\nsettings: {results['settings']}")


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    p.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--pretrained-root", type=Path, default=ROOT / "runs" / "pretrained")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "finetune_bench",
                   help="fine-tuning runs (shared by --quick and full calls: a finished run is reused)")
    p.add_argument("--workers", type=int, default=1, help="fine-tuning runs at a time (one thread each)")
    p.add_argument("--pretrain-threads", type=int, default=0, help="threads of a pretraining run (0: default)")
    p.add_argument("--quick", action="store_true",
                   help=f"segmentation at {QUICK_FRACTIONS} of the labels only (the recipes' budgets, every seed)")
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--tables", type=Path, default=None, help="print the tables of a results JSON, run nothing")
    p.add_argument("--collect", action="store_true",
                   help="no new runs and no pretraining: table the finished runs under --out (the rest are listed)")
    if "--quick" in (sys.argv[1:] if argv is None else argv):  # new defaults; flags given explicitly still win
        p.set_defaults(fractions=list(QUICK_FRACTIONS))
    args = p.parse_args(argv)
    if args.tables is not None:
        results = json.loads(args.tables.read_text())
        print_tables(results)
        return results
    started = time.perf_counter()

    checkpoints: dict[str, Path | None] = {"scratch": None}
    pretrained: dict[str, Any] = {}
    for name in [i for i in args.inits if i != "scratch"]:
        run_dir = args.pretrained_root / f"{name}_cpu_30min"
        if not args.collect:
            pretrain(PRETRAIN_CONFIG, run_dir, PRETRAINED[name][1], args.pretrain_threads)
        checkpoints[name] = run_dir
        seconds = run_seconds(run_dir)
        pretrained[name] = {"run_dir": str(run_dir), "minutes": None if seconds is None else seconds / 60,
                            "heldout": heldout_quality(run_dir)}
    jobs = job_list(args)
    if args.collect:
        done = [job for job in jobs if (job["run_dir"] / "benchmark_done.json").is_file()]
        missing = [job for job in jobs if job not in done]
        runs = [{**job, **json.loads((job["run_dir"] / "benchmark_done.json").read_text())} for job in done]
        print(f"{len(done)} of {len(jobs)} fine-tuning runs finished; not run: " + (", ".join(
            f"{j['task']}/{j['init']}/{j['setting']}/seed{j['seed']}" for j in missing) or "none"), flush=True)
    else:
        print(f"{len(jobs)} fine-tuning runs, {args.workers} at a time", flush=True)
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            runs = list(pool.map(lambda job: run_job(job, checkpoints, args), jobs))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = {"settings": settings, "pretrained": pretrained,
               "runs": [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in runs],
               "wall_minutes": (time.perf_counter() - started) / 60}
    print_tables(results)
    print(f"wall time {results['wall_minutes']:.1f} min")
    output = args.output or RESULTS / ("finetune_quick.json" if args.quick else "finetune.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1))
    print(f"wrote {output}")
    return results


if __name__ == "__main__":
    main()
