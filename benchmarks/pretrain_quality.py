"""Does masked pretraining learn? Held-out masked-region quality of MAE models beside trivial and oracle rows.

Trains each configuration with the real recipe (``recipes/medgmae_pretrain.py --config-name``, default
``medgmae_cpu``, the main job; each row adds its own Hydra overrides; the engine's held-out validation
every ``--val-every`` steps), then prints one table of held-out masked MSE / PSNR / SSIM on the same fixed
crops and masks:

- ``constant``: hidden voxels = mean of the visible ones; ``fill``: normalised-convolution box fill
  (:mod:`medgauss.metrics.fill`); neither learns anything;
- each trained model (its final validation, its training seconds, and the training time at which it first
  beat the fill by 1 dB and by 3 dB);
- ``oracle K``: K Gaussians fitted directly to each whole crop (Adam, ``--oracle-iterations``;
  :func:`medgauss.gaussians.fit_gaussians_to_volume`), an upper reference for what K Gaussians can show.

It also draws the learning curves (held-out masked PSNR against steps and against training seconds, the
fill and constant as lines) to ``benchmarks/results/pretrain_quality.png`` and writes everything to
``benchmarks/results/pretrain_quality.json``. Held-out data: the bundled CT's superior 45% (training uses
the inferior 55%, ``data=bundled_ct``), or phantoms of unseen seeds (``--data phantom``).

Usage::

    .venv/bin/python benchmarks/pretrain_quality.py                    # the study's five rows, ~35 min on 2 cores
    .venv/bin/python benchmarks/pretrain_quality.py --quick            # 300 steps, three rows
    .venv/bin/python benchmarks/pretrain_quality.py --configs "lr2e3=optim.lr=2e-3" "vmae=model=vmae_tiny ..."
    .venv/bin/python benchmarks/pretrain_quality.py --runs runs/medgmae_pretrain/<stamp> ...   # existing runs

Every row is scored on the held-out crops of the first run's own saved configuration; runs whose data or
crop size differ are refused (their numbers would not be comparable).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medgauss.data import heldout_crops  # noqa: E402
from medgauss.engines import MaskedReconstructionValidator  # noqa: E402
from medgauss.metrics import masked_mse, masked_psnr, masked_ssim  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RECIPE = ROOT / "recipes" / "medgmae_pretrain.py"
# The measurements on main before this benchmark existed (96^3 crops, 12 crops, data seed 123).
REFERENCE = {
    "constant (issue 8)": 10.4, "fill (issue 8)": 12.4, "gmae_tiny 2000 steps (issue 8)": 11.0,
    "oracle 128 (issue 8)": 20.2, "oracle 512 (issue 8)": 23.9,
}


# The study's rows: LABEL=space-separated Hydra overrides of --config-name (the main job, medgmae_cpu).
VMAE = "model=vmae_tiny ~model.num_queries ~model.max_scale"
CONFIGS = {
    "medgmae_anchored_pooled": "",
    "medgmae_star_anchored_pooled": "model=gmae_star_tiny_anchored",
    "medgmae_free_queries": "model=gmae_tiny",
    "voxel_mae": VMAE,
    "voxel_mae_pooled": f"{VMAE} model.mask_pool_sigma=1.0",
}
QUICK = ("medgmae_anchored_pooled", "medgmae_free_queries", "voxel_mae_pooled")


def parse_config(entry: str) -> tuple[str, list[str]]:
    """``"LABEL=override override ..."`` (or a label of :data:`CONFIGS`) -> (label, overrides)."""
    if "=" not in entry:
        if entry not in CONFIGS:
            raise ValueError(f"--configs: {entry!r} is neither LABEL=OVERRIDES nor one of {sorted(CONFIGS)}")
        return entry, CONFIGS[entry].split()
    label, overrides = entry.split("=", 1)
    if not label or "/" in label:
        raise ValueError(f"--configs: bad label {label!r} in {entry!r}")
    return label, overrides.split()


def train(config_name: str, label: str, overrides: list[str], steps: int | None, val_every: int, out: Path,
          extra: list[str]) -> Path:
    """Run the recipe for one row; returns its run directory (reused when it holds a finished run)."""
    run_dir = out / label
    if (run_dir / "model").is_dir() and (run_dir / "validation.jsonl").is_file():
        print(f"[{label}] reusing {run_dir}", flush=True)
        return run_dir
    budget = [] if steps is None else [f"trainer.max_steps={steps}", f"trainer.checkpoint_every={steps}"]
    cmd = [sys.executable, str(RECIPE), "--config-name", config_name, *overrides, *budget,
           f"trainer.val_every={val_every}", f"trainer.run_dir={run_dir}", "trainer.progress=false",
           "trainer.panel_every=0", *extra]
    print(f"[{label}] {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    print(f"[{label}] trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def heldout_validator(runs: list[Path]) -> MaskedReconstructionValidator:
    """The held-out crops and masks of the first run's saved configuration (``config.yaml``: its
    ``data`` and crop size), after checking that every run validated on the same ones."""
    import yaml
    from hydra.utils import instantiate

    configs = {}
    for run in runs:
        path = run / "config.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"{run}: no config.yaml (not a run directory of the recipe)")
        cfg = yaml.safe_load(path.read_text())
        configs[run] = (cfg["data"], cfg["model"]["img_size"], cfg["model"].get("patch_size"))
    first_run, (data, img_size, _) = next(iter(configs.items()))
    for run, (other, size, _) in configs.items():
        if (other.get("val"), other.get("dataset"), size) != (data.get("val"), data.get("dataset"), img_size):
            raise ValueError(f"{run} validated on other data or crops than {first_run}: not comparable")
    val = data.get("val")
    if val is None:
        raise ValueError(f"{first_run}: its data option has no held-out set (data.val is null)")
    pipeline = {**data["dataset"], "region": val["region"]}
    pipeline.pop("seed")
    crops = heldout_crops(instantiate(val["datalist"]), num_crops=val["num_crops"], seed=val["seed"], **pipeline)
    return MaskedReconstructionValidator(crops["image"], mask_seed=val["mask_seed"], fill_box=val["fill_box"])


def seconds_to_margin(curve: list[dict], margin_db: float) -> float | None:
    """Training seconds of the first validation at least ``margin_db`` above the fill (None: never)."""
    hit = next((r for r in curve if r["margin_db"] >= margin_db), None)
    return None if hit is None else float(hit["train_seconds"])


def read_curve(run_dir: Path) -> list[dict]:
    lines = (run_dir / "validation.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def oracle_rows(images: torch.Tensor, counts: list[int], iterations: int, validator, model_dir: Path | None):
    """K Gaussians fitted to each whole crop, scored on the hidden voxels of the validator's masks."""
    from medgauss.gaussians import fit_gaussians_to_volume
    from medgauss.nets import load_pretrained
    from medgauss.render import splat

    model = load_pretrained(model_dir) if model_dir is not None else None
    if model is None:
        raise ValueError("the oracle rows need one trained model for its masks (patch grid)")
    noise = validator.noise(model.encoder.num_patches)
    with torch.no_grad():
        hidden = model.mask_to_volume(model(images, noise=noise).mask)
    rows = []
    for k in counts:
        t0 = time.perf_counter()
        fit = fit_gaussians_to_volume(images, k, iterations=iterations, seed=0)  # every crop at once
        with torch.no_grad():
            pred = splat(fit.gaussians, tuple(images.shape[2:])).float()
        rows.append({
            "name": f"oracle {k} Gaussians ({iterations} it)", "gaussians": k,
            "mse": float(masked_mse(pred, images, hidden).mean()),
            "psnr": float(masked_psnr(pred, images, hidden, data_range=1.0).mean()),
            "ssim": float(masked_ssim(pred, images, hidden, data_range=1.0).mean()),
            "seconds": time.perf_counter() - t0,
        })
        print(f"  oracle {k}: {rows[-1]['psnr']:.2f} dB in {rows[-1]['seconds']:.0f} s", flush=True)
    return rows


def plot(curves: dict[str, list[dict]], baselines: dict[str, float], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "step", "training steps"), (axes[1], "train_seconds", "training seconds")):
        for name, curve in curves.items():
            ax.plot([r[key] for r in curve], [r["metrics"]["model"]["psnr"] for r in curve], marker="o", label=name)
        for name, value in baselines.items():
            ax.axhline(value, linestyle="--", color="grey" if name == "constant" else "black", label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out masked PSNR (dB)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("MedGMAE pretraining on this CPU: held-out masked PSNR vs trivial fills")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-name", default="medgmae_cpu", help="recipe config every row starts from")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS),
                   help="rows: names of the study's rows or LABEL=OVERRIDES (space-separated Hydra overrides)")
    p.add_argument("--steps", type=int, default=None, help="training steps of every row (default: the config's)")
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--data", default="bundled_ct", help="recipe data option (bundled_ct | phantom)")
    p.add_argument("--runs", nargs="*", type=Path, default=[], help="evaluate these existing run dirs instead")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "pretrain_quality")
    p.add_argument("--oracle", nargs="*", type=int, default=[512], help="Gaussian counts of the oracle rows")
    p.add_argument("--oracle-iterations", type=int, default=200)
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every training run")
    p.add_argument("--quick", action="store_true", help="300 steps, three rows, a 100-iteration oracle")
    p.add_argument("--plot", type=Path, default=RESULTS / "pretrain_quality.png")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.val_every, args.oracle_iterations = 300, 100, 100
        args.configs = [c for c in args.configs if c in QUICK] or list(QUICK)

    extra = [f"data={args.data}", *args.override]
    rows_to_train = [parse_config(c) for c in args.configs]
    runs = list(args.runs) or [train(args.config_name, label, overrides, args.steps, args.val_every, args.out,
                                     extra) for label, overrides in rows_to_train]
    curves = {run.name: read_curve(run) for run in runs}
    validator = heldout_validator(runs)
    crops = validator.images

    rows, baselines = [], {}
    last = {name: curve[-1] for name, curve in curves.items()}
    first = next(iter(last.values()))["metrics"]
    for name in ("constant", "fill"):
        baselines[name] = first[name]["psnr"]
        rows.append({"name": name, "gaussians": None, **first[name], "seconds": 0.0})
    for name, record in last.items():
        m = record["metrics"]["model"]
        rows.append({"name": f"{name} ({record['step']} steps)", "gaussians": None, **m,
                     "seconds": record["train_seconds"], "to_1db": seconds_to_margin(curves[name], 1.0),
                     "to_3db": seconds_to_margin(curves[name], 3.0)})
    if args.oracle:
        rows += oracle_rows(crops, args.oracle, args.oracle_iterations, validator, runs[0] / "model")

    print(f"\nheld-out masked-region quality, {crops.shape[0]} crops of {tuple(crops.shape[2:])}, data={args.data}")
    print(f"{'predictor':46s} {'MSE':>8s} {'PSNR dB':>8s} {'SSIM':>6s} {'vs fill':>8s} {'seconds':>8s} "
          f"{'s to +1dB':>9s} {'s to +3dB':>9s}")
    when = lambda v: "-" if v is None else f"{v:.0f}"
    for r in rows:
        ssim = "-" if r.get("ssim") is None else f"{r['ssim']:.3f}"
        reach = f"{when(r['to_1db']):>9s} {when(r['to_3db']):>9s}" if "to_1db" in r else ""
        print(f"{r['name']:46s} {r['mse']:8.4f} {r['psnr']:8.2f} {ssim:>6s} "
              f"{r['psnr'] - baselines['fill']:+8.2f} {r['seconds']:8.0f} {reach}")
    print("  seconds: training time (validation excluded) as each run measured it; 's to +1dB': training time "
          "of the first validation 1 dB above the fill ('-': never)")
    print("\nthe MedGMAE paper reports no masked-reconstruction quality (its tables are downstream results: "
          "Dice, AUC, 3DGR convergence), so there is no paper row here")
    print("for reference, the issue's numbers on main before this work (96^3, 12 crops):")
    for name, value in REFERENCE.items():
        print(f"  {name:40s} {value:5.1f} dB")
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = args.plot
    plot(curves, baselines, png)
    result = {"rows": rows, "curves": curves, "baselines": baselines, "reference": REFERENCE,
              "args": {k: str(v) for k, v in vars(args).items()}}
    (RESULTS / "pretrain_quality.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {png} and {RESULTS / 'pretrain_quality.json'}")
    return result


if __name__ == "__main__":
    main()
