"""Does masked pretraining learn? Held-out masked-region quality of MAE models beside trivial and oracle rows.

Trains each configuration with the real recipe (``recipes/medgmae_pretrain.py``, its Hydra configs, the
engine's held-out validation every ``--val-every`` steps), then prints one table of held-out masked MSE /
PSNR / SSIM on the same fixed crops and masks:

- ``constant``: hidden voxels = mean of the visible ones; ``fill``: normalised-convolution box fill
  (:mod:`medgauss.metrics.fill`); neither learns anything;
- each trained model (its final validation, with its training seconds);
- ``oracle K``: K Gaussians fitted directly to each whole crop (Adam, ``--oracle-iterations``;
  :func:`medgauss.gaussians.fit_gaussians_to_volume`), an upper reference for what K Gaussians can show.

It also draws the learning curves (held-out masked PSNR against steps and against training seconds, the
fill and constant as lines) to ``benchmarks/results/pretrain_quality.png`` and writes everything to
``benchmarks/results/pretrain_quality.json``. Held-out data: the bundled CT's superior 45% (training uses
the inferior 55%, ``data=bundled_ct``), or phantoms of unseen seeds (``--data phantom``).

Usage::

    .venv/bin/python benchmarks/pretrain_quality.py --quick            # ~10 min on 2 cores
    .venv/bin/python benchmarks/pretrain_quality.py --steps 2000 --configs gmae_tiny gmae_tiny_anchored vmae_tiny
    .venv/bin/python benchmarks/pretrain_quality.py --runs runs/medgmae_pretrain/<stamp> ...   # existing runs
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


def train(config: str, steps: int, val_every: int, out: Path, extra: list[str]) -> Path:
    """Run the recipe for one model config; returns its run directory."""
    run_dir = out / config
    if (run_dir / "model").is_dir() and (run_dir / "validation.jsonl").is_file():
        print(f"[{config}] reusing {run_dir}", flush=True)
        return run_dir
    cmd = [sys.executable, str(RECIPE), f"model={config}", f"trainer.max_steps={steps}",
           f"trainer.val_every={val_every}", f"trainer.run_dir={run_dir}", "trainer.progress=false",
           "trainer.panel_every=0", f"trainer.checkpoint_every={steps}", *extra]
    print(f"[{config}] {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    print(f"[{config}] trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


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
    p.add_argument("--configs", nargs="+", default=["gmae_tiny", "gmae_tiny_anchored", "vmae_tiny"])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--data", default="bundled_ct", help="recipe data option (bundled_ct | phantom)")
    p.add_argument("--runs", nargs="*", type=Path, default=[], help="evaluate these existing run dirs instead")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "pretrain_quality")
    p.add_argument("--oracle", nargs="*", type=int, default=[128, 512], help="Gaussian counts of the oracle rows")
    p.add_argument("--oracle-iterations", type=int, default=400)
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every training run")
    p.add_argument("--quick", action="store_true", help="300 steps, 3 configs, a 100-iteration 128 oracle")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.val_every, args.oracle, args.oracle_iterations = 300, 100, [128], 100

    extra = [f"data={args.data}", *args.override]
    runs = list(args.runs) or [train(c, args.steps, args.val_every, args.out, extra) for c in args.configs]
    curves = {run.name: read_curve(run) for run in runs}

    # The held-out crops and masks every row is scored on: the recipe's own validation set.
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "recipes" / "conf"), version_base="1.3"):
        cfg = compose(config_name="medgmae_pretrain", overrides=[f"model={args.configs[0]}", *extra,
                                                                 "trainer.run_dir=" + str(args.out / "_val")])
    from hydra.utils import instantiate

    val = cfg.data.val
    pipeline = {**OmegaConf.to_container(cfg.data.dataset, resolve=True), "region": val.region}
    pipeline.pop("seed")
    crops = heldout_crops(instantiate(val.datalist), num_crops=val.num_crops, seed=val.seed, **pipeline)["image"]
    validator = MaskedReconstructionValidator(crops, mask_seed=val.mask_seed, fill_box=val.fill_box)

    rows, baselines = [], {}
    last = {name: curve[-1] for name, curve in curves.items()}
    first = next(iter(last.values()))["metrics"]
    for name in ("constant", "fill"):
        baselines[name] = first[name]["psnr"]
        rows.append({"name": name, "gaussians": None, **first[name], "seconds": 0.0})
    for name, record in last.items():
        m = record["metrics"]["model"]
        rows.append({"name": f"{name} ({record['step']} steps)", "gaussians": None, **m,
                     "seconds": record["train_seconds"]})
    if args.oracle:
        rows += oracle_rows(crops, args.oracle, args.oracle_iterations, validator, runs[0] / "model")

    print(f"\nheld-out masked-region quality, {crops.shape[0]} crops of {tuple(crops.shape[2:])}, data={args.data}")
    print(f"{'predictor':44s} {'MSE':>8s} {'PSNR dB':>8s} {'SSIM':>6s} {'vs fill':>8s} {'seconds':>8s}")
    for r in rows:
        ssim = "-" if r.get("ssim") is None else f"{r['ssim']:.3f}"
        print(f"{r['name']:44s} {r['mse']:8.4f} {r['psnr']:8.2f} {ssim:>6s} "
              f"{r['psnr'] - baselines['fill']:+8.2f} {r['seconds']:8.0f}")
    print("\nfor reference, the issue's numbers on main before this work (96^3, 12 crops):")
    for name, value in REFERENCE.items():
        print(f"  {name:40s} {value:5.1f} dB")
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / "pretrain_quality.png"
    plot(curves, baselines, png)
    result = {"rows": rows, "curves": curves, "baselines": baselines, "reference": REFERENCE,
              "args": {k: str(v) for k, v in vars(args).items()}}
    (RESULTS / "pretrain_quality.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {png} and {RESULTS / 'pretrain_quality.json'}")
    return result


if __name__ == "__main__":
    main()
