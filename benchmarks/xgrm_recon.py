"""X-GRM's Table-2 protocol at CPU scale: held-out sparse-view CT reconstruction by FDK, SART, ASD-POCS and the
trained feed-forward models (X-GRM's VoxGS decoder, and the iLRM-style iterative decoder when given).

Inputs: ``--checkpoint RUN/model`` (an X-GRM export of ``recipes/xgrm_train.py``, VoxGS decoder) and optionally
``--checkpoint-iterative RUN/model`` (``model.decoder=iterative``); or ``--train``, which first trains both with the
recipe (``--config-name``, default ``xgrm_cpu``; ``--steps`` overrides ``trainer.max_steps``; the same budget for
both) into ``--out``. The held-out cases are those of the runs' own saved ``config.yaml`` (``data.val.root``); runs
that trained or validated on other data are refused (their numbers would not be comparable).

Tables:

- **Reconstruction**, per held-out group (phantoms of unseen seeds; the superior CT region excluded from training)
  and K in 6 / 8 / 10 evenly spaced views: mean 3D PSNR and slice-averaged SSIM (axial slices, data range 1) against
  the case volume, and seconds per volume. Every row is timed the same way: the wall clock of the registered method
  (``medgauss.recon.reconstruct`` -> ``run_method``, exactly what ``medgauss-reconstruct`` runs; for the learned
  methods this includes reading the checkpoint), one untimed warm-up call per (method, K) first, median over the
  group's cases; ``vs SART`` = SART's seconds / the row's (above 1: faster than SART). Learned rows also show the
  model's forward pass alone (``model s``: the loaded model's ``reconstruct``, timed the same way).
- **Novel views**: X-ray PSNR at the case's views not used as inputs (data range: max - min of those measured
  projections, as ``medgauss-reconstruct --novel-views``), rendered two ways: ``voxel fp`` = ``forward_project`` of
  the reconstructed volume (every method); ``Gaussians`` = the learned model's Gaussians through
  ``medgauss.render.project`` (learned methods; the training loss's ``cutoff``). ``ground truth fp`` is
  ``forward_project`` of the true volume: the noise ceiling of the measured views.
- **Scaling**: inference seconds (registry path, median of ``--repeats`` after a warm-up) and peak memory for
  K = 6, 12, 24, 48 on one case, each configuration in its own subprocess (peak = that process's resident-memory
  high-water mark, ``VmHWM``, beside the same before its first reconstruction; ``max_memory_allocated`` on CUDA;
  not ``ru_maxrss``, which Linux carries over ``exec`` from the large parent process). The case's K
  evenly spaced measured views are used while it has enough; beyond that, K views evenly spaced over the case's
  arc are simulated (``forward_project`` of the case volume with the case's noise model and seed).
- **X-GRM paper Table 2** beside ours, with the difference in scale.

Usage::

    .venv/bin/python benchmarks/xgrm_recon.py --checkpoint runs/xgrm_train/A/model \\
        --checkpoint-iterative runs/xgrm_train/B/model
    .venv/bin/python benchmarks/xgrm_recon.py --train --steps 6000 --out runs/xgrm_recon
    .venv/bin/python benchmarks/xgrm_recon.py --checkpoint RUN/model --quick      # ~1 minute

Prints the tables and writes ``benchmarks/results/xgrm_recon.json`` (``xgrm_recon_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _memory import memory_mib  # noqa: E402  (benchmarks/_memory.py, shared with pretrain_step.py)

RESULTS = ROOT / "benchmarks" / "results"
RECIPE = ROOT / "recipes" / "xgrm_train.py"
VIEW_COUNTS = (6, 8, 10)
SCALING_VIEWS = (6, 12, 24, 48)
LABELS = {"fdk": "FDK", "sart": "SART", "asd_pocs": "ASD-POCS", "xgrm": "X-GRM (VoxGS)",
          "ilrm": "iterative decoder"}
LEARNED = ("xgrm", "ilrm")
GROUPS = {"phantom": "phantoms (unseen seeds)", "ct": "CT region (superior, unseen)"}
# SART at this size (32^3, 64^2 detector, 50 noisy views per case; 4 held-out cases, one thread): mean PSNR at 6 / 10
# views 25.31 / 28.97 dB after 20 sweeps, 25.98 / 29.46 after 50, 26.28 / 29.55 after 100, 26.33 / 29.30 after 200,
# then falling (noise); slice SSIM is highest at 50. ASD-POCS: 26.67 / 31.74 after 20 iterations, 28.05 / 33.53
# after 50 (still rising, 1.6-2.3 s per volume).
SART_ITERATIONS = 50
ASD_POCS_ITERATIONS = 50

# X-GRM paper, Table 2 (Setting 1: 680 test volumes of ReconX-15K, one A100): seconds, {K: (PSNR, SSIM)}.
PAPER_TABLE2 = {
    "fdk": (0.297, {6: (14.65, 0.297), 8: (15.50, 0.295), 10: (16.23, 0.314)}),
    "asd_pocs": (5.704, {6: (21.47, 0.498), 8: (22.32, 0.560), 10: (22.62, 0.653)}),
    "sart": (21.091, {6: (21.89, 0.634), 8: (22.52, 0.642), 10: (23.66, 0.685)}),
    "xgrm": (0.928, {6: (28.39, 0.873), 8: (28.86, 0.879), 10: (29.21, 0.886)}),
}
PAPER_SCALE = {
    "training_volumes": 13612, "dataset": "ReconX-15K (14,972 CT volumes, 13,612 for training)", "grid": 256,
    "detector": 256, "views_per_case": 50, "model": "xgrm_base: ViT-B/16 encoder + 12-layer 768-dim fusion ViT",
    "epochs": 100, "batch": 8, "hardware": "4x A100-40G (training), one A100 (0.93 s per 256^3 volume)",
}


# ------------------------------------------------------------------------------------------- runs and data


def train_run(label: str, overrides: list[str], config_name: str, steps: int | None, out: Path,
              extra: list[str]) -> Path:
    """Train one model with the recipe into ``out / label``; returns its ``model/`` export (reused when present)."""
    run_dir = out / label
    if (run_dir / "model" / "config.json").is_file() and (run_dir / "config.yaml").is_file():
        print(f"[{label}] reusing {run_dir}", flush=True)
        return run_dir / "model"
    budget = [] if steps is None else [f"trainer.max_steps={steps}"]
    cmd = [sys.executable, str(RECIPE), "--config-name", config_name, *overrides, *budget,
           f"trainer.run_dir={run_dir}", "trainer.progress=false", "trainer.panel_every=0", *extra]
    print(f"[{label}] {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    print(f"[{label}] trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir / "model"


def _resolve(path: str | None) -> Path | None:
    """A path of a saved config: relative ones are relative to the repository root (where the recipe runs)."""
    if path is None:
        return None
    p = Path(path)
    return (p if p.is_absolute() else ROOT / p).resolve()


def run_record(checkpoint: Path) -> dict[str, Any]:
    """What the benchmark needs from the run of a model export ``RUN/model``: its saved ``config.yaml`` (data roots,
    training budget), the model's registry name and size, and the run's last training seconds.

    Raises:
        FileNotFoundError: no ``config.json`` in ``checkpoint`` or no ``config.yaml`` in its run folder.
    """
    import yaml

    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no config.json (not a saved model folder)")
    run_dir = checkpoint.resolve().parent
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no {config_path} (give the model/ export of a "
                                "recipes/xgrm_train.py run, whose config names the held-out data)")
    cfg = yaml.safe_load(config_path.read_text())
    model_config = json.loads((checkpoint / "config.json").read_text())
    data = cfg.get("data") or {}
    val = data.get("val") or {}
    train_seconds = None
    curve = run_dir / "validation.jsonl"
    if curve.is_file():
        lines = [json.loads(x) for x in curve.read_text().splitlines() if x.strip()]
        train_seconds = lines[-1].get("train_seconds") if lines else None
    trainer = cfg.get("trainer") or {}
    return {
        "checkpoint": str(checkpoint), "run_dir": str(run_dir), "model": model_config.get("registry_name"),
        "decoder": model_config.get("kwargs", {}).get("decoder", "voxgs"),
        "heldout_root": _resolve(val.get("root")), "train_root": _resolve((data.get("samples") or {}).get("root")),
        "build": data.get("build"), "max_steps": trainer.get("max_steps"), "batch_size": trainer.get("batch_size"),
        "train_seconds": train_seconds, "cutoff": (cfg.get("loss") or {}).get("cutoff", 3.0),
    }


def check_same_data(records: dict[str, dict[str, Any]]) -> Path:
    """The held-out folder every run validated on, after refusing runs that trained or validated on other data.

    Raises:
        ValueError: a run without a held-out set, or runs whose held-out folder, training folder or dataset build
            settings differ (naming both runs).
    """
    first_label, first = next(iter(records.items()))
    for label, record in records.items():
        if record["heldout_root"] is None:
            raise ValueError(f"{record['run_dir']}: its config has no held-out set (data.val is null)")
        key = (record["heldout_root"], record["train_root"], record["build"])
        if key != (first["heldout_root"], first["train_root"], first["build"]):
            raise ValueError(f"{label} ({record['run_dir']}) trained or validated on other data than {first_label} "
                             f"({first['run_dir']}): held-out {record['heldout_root']} vs {first['heldout_root']}, "
                             f"training {record['train_root']} vs {first['train_root']}; not comparable")
    root = first["heldout_root"]
    if not (root / "dataset.json").is_file():
        raise FileNotFoundError(f"held-out folder {root} (data.val.root of {first['run_dir']}) has no dataset.json")
    return root


def case_groups(root: Path) -> dict[str, list[str]]:
    """Held-out case ids by group (``"phantom"``, ``"ct"``), from the build manifest ``xgrm_cases.json`` beside
    ``root`` when present, else from the case ids (``heldout_<kind>_<i>``)."""
    cases = json.loads((root / "dataset.json").read_text())["cases"]
    kinds: dict[str, str] = {}
    manifest = root.parent / "xgrm_cases.json"
    if manifest.is_file():
        kinds = {cid: rec.get("kind") for cid, rec in json.loads(manifest.read_text()).get("cases", {}).items()}
    groups: dict[str, list[str]] = {}
    for cid in cases:
        kind = kinds.get(cid) or ("phantom" if "phantom" in cid else "ct" if "_ct_" in cid else "other")
        groups.setdefault(kind, []).append(cid)
    return {k: groups[k] for k in (*GROUPS, *sorted(set(groups) - set(GROUPS))) if k in groups}


def training_cases(record: dict[str, Any]) -> int | None:
    path = record["train_root"] / "dataset.json" if record["train_root"] else None
    return len(json.loads(path.read_text())["cases"]) if path is not None and path.is_file() else None


# ------------------------------------------------------------------------------------------- reconstruction table


def method_options(name: str, args: argparse.Namespace) -> dict[str, Any]:
    if name == "sart":
        return {"iterations": args.sart_iterations, "progress": False}
    if name == "asd_pocs":
        return {"iterations": args.asd_pocs_iterations, "progress": False}
    if name in LEARNED:
        return {"device": args.device}
    return {}


def evaluate(root: Path, groups: dict[str, list[str]], view_counts: list[int], methods: dict[str, dict[str, Any]],
             cutoffs: dict[str, float], device: str) -> dict[str, Any]:
    """Per (group, K, method): the per-case scores and timings (see the module docstring)."""
    import torch

    from medgauss.ct import forward_project
    from medgauss.metrics import projection_psnr
    from medgauss.recon import load_case_inputs
    from medgauss.recon.cli import reconstruct
    from medgauss.recon.learned import load_reconstruction_model

    models = {m: load_reconstruction_model(spec["checkpoint"], m, device) for m, spec in methods.items()
              if m in LEARNED}
    per: dict[str, dict[int, dict[str, list[dict[str, float]]]]] = {
        g: {k: {m: [] for m in [*methods, "ground_truth"]} for k in view_counts} for g in groups}
    first_case = root / next(iter(groups.values()))[0]
    with tempfile.TemporaryDirectory(prefix="xgrm_recon_") as tmp:
        out, novel = Path(tmp) / "recon.nii.gz", Path(tmp) / "novel.npy"

        def run(inputs, name):
            spec = methods[name]
            return reconstruct(inputs, name, out, options=spec["options"], checkpoint=spec.get("checkpoint"),
                               novel_views=novel)

        def forward(inputs, name):
            model = models[name]
            target = next(model.parameters()).device
            with torch.no_grad():
                t0 = time.perf_counter()
                result = model.reconstruct(inputs.projections.to(target), inputs.geometry)
                seconds = time.perf_counter() - t0
                t0 = time.perf_counter()
                rendered = model.render(result.gaussians, inputs.novel_geometry(), cutoff=cutoffs[name])
                render_seconds = time.perf_counter() - t0
            return result.volume.float().cpu(), seconds, rendered.float().cpu(), render_seconds

        for k in view_counts:
            warm = load_case_inputs(first_case, k)
            for name in methods:  # warm-up (numba compilation, thread pools, file cache): not timed
                run(warm, name)
                if name in models:
                    forward(warm, name)
            for group, case_ids in groups.items():
                for cid in case_ids:
                    inputs = load_case_inputs(root / cid, k)
                    measured = inputs.novel_measured()
                    data_range = float(measured.max() - measured.min())
                    truth = forward_project(inputs.reference, inputs.novel_geometry())
                    per[group][k]["ground_truth"].append(
                        {"novel_psnr": float(projection_psnr(truth, measured, data_range=data_range)[0])})
                    for name in methods:
                        result = run(inputs, name)
                        row = {"case": cid, "psnr": result.psnr, "ssim": result.ssim, "seconds": result.seconds,
                               "novel_psnr": result.novel_psnr}
                        if name in models:
                            volume, seconds, rendered, render_seconds = forward(inputs, name)
                            gaussian_psnr = projection_psnr(rendered, measured, data_range=data_range)
                            row.update(model_seconds=seconds,
                                       render_seconds_per_view=render_seconds / len(inputs.novel_ids),
                                       registry_vs_model_max_abs=float((volume - result.volume).abs().max()),
                                       novel_psnr_gaussians=float(gaussian_psnr[0]))
                        per[group][k][name].append(row)
                print(f"  K={k} {group}: {len(case_ids)} cases done", flush=True)
    return per


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(per: dict[str, Any]) -> dict[str, Any]:
    """Means of the scores and medians of the timings over each group's cases, and the speed ratio to SART."""
    table: dict[str, Any] = {}
    for group, by_k in per.items():
        for k, by_method in by_k.items():
            cell: dict[str, dict[str, Any]] = {}
            for name, rows in by_method.items():
                cell[name] = {"cases": len(rows), "psnr": _mean(rows, "psnr"), "ssim": _mean(rows, "ssim"),
                              "seconds": _median(rows, "seconds"), "model_seconds": _median(rows, "model_seconds"),
                              "novel_psnr": _mean(rows, "novel_psnr"),
                              "novel_psnr_gaussians": _mean(rows, "novel_psnr_gaussians"),
                              "render_seconds_per_view": _median(rows, "render_seconds_per_view")}
            sart = cell.get("sart", {}).get("seconds")
            for row in cell.values():
                row["speed_vs_sart"] = sart / row["seconds"] if sart and row.get("seconds") else None
            table.setdefault(group, {})[k] = cell
    return table


def _f(value: float | None, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}{fmt}}"


def print_reconstruction(table: dict[str, Any], groups: dict[str, list[str]], methods: dict[str, dict[str, Any]],
                         args: argparse.Namespace) -> None:
    print(f"\nheld-out reconstruction: 3D PSNR (dB), slice-averaged SSIM (axial, data range 1); seconds per volume = "
          f"median wall clock of the registered method (medgauss.recon.reconstruct), warm-up excluded; vs SART = "
          f"SART s / row s; SART {args.sart_iterations} sweeps, ASD-POCS {args.asd_pocs_iterations} iterations")
    header = (f"{'group':34s} {'K':>3s} {'method':18s} {'PSNR':>7s} {'SSIM':>6s} {'s/vol':>8s} {'vs SART':>8s} "
              f"{'model s':>8s}")
    print(header)
    print("-" * len(header))
    for group, by_k in table.items():
        name = f"{GROUPS.get(group, group)} ({len(groups[group])})"
        for k, cell in by_k.items():
            for m in methods:
                r = cell[m]
                ratio = "-" if r["speed_vs_sart"] is None else f"{r['speed_vs_sart']:.2f}x"
                print(f"{name:34s} {k:3d} {LABELS[m]:18s} {_f(r['psnr'], '.2f', 7)} {_f(r['ssim'], '.3f', 6)} "
                      f"{_f(r['seconds'], '.3f', 8)} {ratio:>8s} {_f(r['model_seconds'], '.3f', 8)}")
    print("  model s: the loaded model's forward pass alone (learned methods); s/vol of a learned method also reads "
          "its checkpoint, as medgauss-reconstruct does")


def issue_target(table: dict[str, Any]) -> dict[str, Any] | None:
    """The issue's target: at 10 views on the held-out phantoms X-GRM beats FDK by >= 3 dB and is faster than SART."""
    cell = table.get("phantom", {}).get(10)
    if not cell or "xgrm" not in cell:
        return None
    margin = cell["xgrm"]["psnr"] - cell["fdk"]["psnr"]
    faster = cell["xgrm"]["seconds"] < cell["sart"]["seconds"]
    met = margin >= 3.0 and faster
    line = (f"target (10 views, held-out phantoms): X-GRM - FDK = {margin:+.2f} dB (needs >= +3), X-GRM "
            f"{cell['xgrm']['seconds']:.3f} s vs SART {cell['sart']['seconds']:.3f} s per volume: "
            f"{'MET' if met else 'NOT met'}")
    return {"margin_db": margin, "faster_than_sart": faster, "met": met, "line": line}


def print_novel(table: dict[str, Any], methods: dict[str, dict[str, Any]]) -> None:
    print("\nnovel-view X-ray PSNR (dB) at each case's views not used as inputs (data range: max - min of the measured "
          "novel views); voxel fp = forward_project of the reconstructed volume; Gaussians = the model's Gaussians "
          "through medgauss.render.project")
    header = f"{'group':10s} {'K':>3s} {'method':18s} {'voxel fp':>9s} {'Gaussians':>10s} {'render s/view':>14s}"
    print(header)
    print("-" * len(header))
    for group, by_k in table.items():
        for k, cell in by_k.items():
            for m in [*methods, "ground_truth"]:
                r = cell[m]
                label = "ground truth fp" if m == "ground_truth" else LABELS[m]
                print(f"{group:10s} {k:3d} {label:18s} {_f(r['novel_psnr'], '.2f', 9)} "
                      f"{_f(r['novel_psnr_gaussians'], '.2f', 10)} {_f(r['render_seconds_per_view'], '.4f', 14)}")
    print("  ground truth fp: forward_project of the true volume against the noisy measured views (the noise ceiling)")


def print_paper(table: dict[str, Any], records: dict[str, dict[str, Any]], view_counts: list[int],
                train_cases: int | None, grid: tuple[int, ...], det: tuple[int, ...], params: dict[str, int]) -> dict:
    print("\nX-GRM paper Table 2 (Setting 1) beside ours (PSNR/SSIM; paper seconds on an A100 at 256^3, ours on this "
          "CPU at the grid below)")
    groups = list(table)
    header = f"{'method':18s} {'paper s':>8s} " + " ".join(f"{'paper ' + str(k):>12s}" for k in VIEW_COUNTS)
    header += "".join(" " + " ".join(f"{g[:7] + ' ' + str(k):>12s}" for k in view_counts) + f" {g[:7] + ' s':>10s}"
                      for g in groups)
    print(header)
    print("-" * len(header))
    for m in LABELS:
        if m not in PAPER_TABLE2 and not any(m in table[g][view_counts[0]] for g in groups):
            continue
        seconds, paper = PAPER_TABLE2.get(m, (None, {}))
        line = f"{LABELS[m]:18s} {_f(seconds, '.3f', 8)} " + " ".join(
            f"{paper[k][0]:6.2f}/{paper[k][1]:.3f}" if k in paper else f"{'-':>12s}" for k in VIEW_COUNTS)
        for g in groups:
            cells = [table[g][k].get(m) for k in view_counts]
            line += " " + " ".join(f"{c['psnr']:6.2f}/{c['ssim']:.3f}" if c else f"{'-':>12s}" for c in cells)
            line += " " + (_f(cells[-1]["seconds"], ".3f", 10) if cells[-1] else f"{'-':>10s}")
        print(line)
    record = records.get("xgrm") or next(iter(records.values()))
    steps, batch = record["max_steps"], record["batch_size"]
    seen = steps * batch if steps and batch else None
    paper_seen = PAPER_SCALE["training_volumes"] * PAPER_SCALE["epochs"]
    scale = {
        "paper": PAPER_SCALE, "ours_training_cases": train_cases, "ours_grid": list(grid), "ours_detector": list(det),
        "ours_steps": steps, "ours_batch": batch, "ours_samples_seen": seen, "ours_parameters": params,
        "training_volume_ratio": PAPER_SCALE["training_volumes"] / train_cases if train_cases else None,
        "voxel_ratio": PAPER_SCALE["grid"] ** 3 / (grid[0] * grid[1] * grid[2]),
        "samples_seen_ratio": paper_seen / seen if seen else None,
    }
    print(f"scale: the paper trains {PAPER_SCALE['model']} on {PAPER_SCALE['dataset']}, {PAPER_SCALE['grid']}^3 "
          f"volumes, {PAPER_SCALE['views_per_case']} views of {PAPER_SCALE['detector']}^2, {PAPER_SCALE['epochs']} "
          f"epochs of batch {PAPER_SCALE['batch']} (~{paper_seen / 1e6:.2f}M samples) on {PAPER_SCALE['hardware']}.")
    size = ", ".join(f"{LABELS[m]} {records[m]['model']} {n / 1e6:.2f}M parameters" for m, n in params.items())
    print(f"       ours: {size}; {train_cases} training cases (bundled-CT variants + phantoms), "
          f"{'x'.join(map(str, grid))} volumes, views of {'x'.join(map(str, det))}, {steps} steps of batch {batch} "
          f"({seen} samples) on this CPU.")
    if scale["training_volume_ratio"]:
        print(f"       the paper has {scale['training_volume_ratio']:.0f}x our training volumes, "
              f"{scale['voxel_ratio']:.0f}x our voxels per volume"
              + (f" and {scale['samples_seen_ratio']:.0f}x our training samples" if seen else "")
              + "; its cases are real CTs of 8 datasets, ours are one chest CT moved / cropped and procedural phantoms,"
              " so the numbers are a reference, not a comparison.")
    return scale


# ------------------------------------------------------------------------------------------- scaling (subprocesses)


def scaling_inputs(case_dir: Path, views: int):
    """``(ReconInputs, source)`` with ``views`` input views of a case: its evenly spaced measured views when it has
    that many, else ``views`` views simulated evenly over the case's arc (``forward_project`` of its volume plus its
    recorded noise model, seed and attenuation scale)."""
    import math

    import numpy as np
    import torch

    from medgauss.ct import ProjectionNoise, add_noise, forward_project, load_case
    from medgauss.recon import ReconInputs, load_case_inputs

    case = load_case(case_dir, mmap=True)
    total = case["geometry"].num_views
    if views <= total:
        return load_case_inputs(case_dir, views), f"{views} of the case's {total} measured views (evenly spaced)"
    meta = case["meta"]
    arc = math.radians(meta.get("settings", {}).get("arc_deg", 360.0))
    angles = torch.arange(views, dtype=torch.float64) * arc / views + float(case["geometry"].angles[0])
    geometry = case["geometry"].replace(angles=angles, poses=None)
    volume = torch.from_numpy(np.array(case["volume"], dtype=np.float32))[None, None]
    projections = forward_project(volume, geometry)
    noise = meta.get("noise")
    if noise is not None:
        projections = add_noise(projections, ProjectionNoise(**noise), seed=meta.get("seed", 0),
                                scale=meta.get("attenuation_scale", 1.0))
    inputs = ReconInputs(projections=projections.float(), geometry=geometry, affine=case["affine"].numpy(),
                         view_ids=list(range(views)), novel_ids=[], full_geometry=geometry,
                         measured=projections[0].numpy(), reference=volume, source=str(case_dir))
    return inputs, (f"{views} views simulated evenly over the case's {math.degrees(arc):.0f} deg arc "
                    f"(forward_project of its volume + its noise model)")


def scaling_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One (method, K) configuration: warm-up + timed reconstructions through the registry, and peak memory."""
    import torch

    from medgauss.recon.cli import reconstruct

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    inputs, source = scaling_inputs(Path(cfg["case"]), cfg["views"])
    cuda = cfg["options"].get("device") == "cuda" or (cfg["options"].get("device") == "auto"
                                                       and torch.cuda.is_available())
    before = memory_mib()
    times = []
    with tempfile.TemporaryDirectory(prefix="xgrm_scaling_") as tmp:
        for i in range(1 + cfg["repeats"]):
            if i == 1 and cuda:
                torch.cuda.reset_peak_memory_stats()
            result = reconstruct(inputs, cfg["method"], Path(tmp) / "out.nii.gz", options=cfg["options"],
                                 checkpoint=cfg["checkpoint"])
            if i:
                times.append(result.seconds)
    out = {"method": cfg["method"], "views": cfg["views"], "source": source, "seconds": statistics.median(times),
           "seconds_all": times, "peak_rss_mib": memory_mib()["peak"], "rss_before_mib": before["peak"],
           "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "psnr": result.psnr,
           "threads": torch.get_num_threads()}
    if cuda:
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_scaling(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    if cfg.get("threads"):  # numba reads its thread count at import time
        env["NUMBA_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(cfg["threads"])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if proc.returncode != 0:
        return {"method": cfg["method"], "views": cfg["views"], "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_scaling(rows: list[dict[str, Any]], case: str) -> None:
    print(f"\nscaling with the number of input views, case {case}: seconds = median registry wall clock after a "
          "warm-up; peak = resident-memory high-water mark (VmHWM) of the configuration's own process; before = "
          "the same before its first reconstruction (interpreter, torch, inputs)")
    header = (f"{'method':18s} {'K':>3s} {'s/vol':>8s} {'x K=first':>9s} {'peak MiB':>9s} {'before':>7s} "
              f"{'+MiB':>6s}  views")
    print(header)
    print("-" * len(header))
    first: dict[str, float] = {}
    for r in rows:
        if "error" in r:
            print(f"{LABELS[r['method']]:18s} {r['views']:3d} failed: {r['error']}")
            continue
        base = first.setdefault(r["method"], r["seconds"])
        peak = r.get("peak_cuda_mib", r["peak_rss_mib"])
        print(f"{LABELS[r['method']]:18s} {r['views']:3d} {r['seconds']:8.3f} {r['seconds'] / base:8.2f}x "
              f"{peak:9.0f} {r['rss_before_mib']:7.0f} {r['peak_rss_mib'] - r['rss_before_mib']:6.0f}  {r['source']}")


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="X-GRM model export (VoxGS decoder), e.g. RUN/model")
    p.add_argument("--checkpoint-iterative", type=Path, help="model export with the iterative decoder")
    p.add_argument("--train", action="store_true", help="train both models with the recipe first (into --out)")
    p.add_argument("--config-name", default="xgrm_cpu", help="recipe config of --train")
    p.add_argument("--steps", type=int, default=None, help="--train: trainer.max_steps of both (default: config's)")
    p.add_argument("--override", nargs="*", default=[], help="--train: extra Hydra overrides for both runs")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "xgrm_recon", help="--train: run folders")
    p.add_argument("--views", nargs="+", type=int, default=list(VIEW_COUNTS), help="K of the reconstruction table")
    p.add_argument("--cases", type=int, default=None, help="at most this many held-out cases per group")
    p.add_argument("--sart-iterations", type=int, default=SART_ITERATIONS)
    p.add_argument("--asd-pocs-iterations", type=int, default=ASD_POCS_ITERATIONS)
    p.add_argument("--scaling-views", nargs="*", type=int, default=list(SCALING_VIEWS))
    p.add_argument("--scaling-case", default=None, help="held-out case id (default: the first phantom)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per scaling configuration")
    p.add_argument("--device", default="cpu", help="device of the learned methods (cpu, cuda, auto)")
    p.add_argument("--threads", type=int, default=0, help="torch / numba threads of the scaling subprocesses")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per scaling configuration")
    p.add_argument("--quick", action="store_true", help="2 phantoms + the CT case, K=10, scaling at K=6 and 48")
    p.add_argument("--output", type=Path, default=None,
                   help="JSON (default benchmarks/results/xgrm_recon.json, xgrm_recon_quick.json with --quick)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(scaling_worker(json.loads(args.worker))))
        return {}
    if args.train == (args.checkpoint is not None):
        p.error("give --checkpoint DIR (and optionally --checkpoint-iterative DIR), or --train")
    if args.quick:
        args.views, args.cases, args.scaling_views, args.repeats = [10], args.cases or 2, [6, 48], 1
    output = args.output or RESULTS / ("xgrm_recon_quick.json" if args.quick else "xgrm_recon.json")

    import torch

    from medgauss.nets import XGRM

    if args.train:
        extra = list(args.override)
        checkpoints = {"xgrm": train_run("xgrm", [], args.config_name, args.steps, args.out, extra),
                       "ilrm": train_run("ilrm", ["model.name=xgrm_tiny_iterative", "model.decoder=iterative"],
                                         args.config_name, args.steps, args.out, extra)}
    else:
        checkpoints = {"xgrm": args.checkpoint}
        if args.checkpoint_iterative is not None:
            checkpoints["ilrm"] = args.checkpoint_iterative
    records = {m: run_record(c) for m, c in checkpoints.items()}
    for m, r in records.items():
        want = {"xgrm": "voxgs", "ilrm": "iterative"}[m]
        if r["decoder"] != want:
            raise ValueError(f"{r['checkpoint']} holds decoder={r['decoder']!r}; "
                             f"{'--checkpoint' if m == 'xgrm' else '--checkpoint-iterative'} needs {want!r}")
    budgets = {(r["max_steps"], r["batch_size"]) for r in records.values()}
    root = check_same_data(records)
    groups = case_groups(root)
    if args.cases:
        groups = {g: ids[: args.cases] for g, ids in groups.items()}
    params = {m: sum(t.numel() for t in XGRM.from_pretrained(r["checkpoint"]).parameters()) for m, r in records.items()}

    methods = {m: {"options": method_options(m, args)} for m in ("fdk", "sart", "asd_pocs")}
    for m, c in checkpoints.items():
        methods[m] = {"options": method_options(m, args), "checkpoint": c}
    from medgauss.ct import load_case

    sample = load_case(root / next(iter(groups.values()))[0])
    grid, det = tuple(sample["geometry"].vol_shape), tuple(sample["geometry"].det_shape)
    print(f"held-out data {root}: " + ", ".join(f"{len(v)} {g}" for g, v in groups.items())
          + f"; grid {'x'.join(map(str, grid))}, detector {'x'.join(map(str, det))}, "
          f"{sample['geometry'].num_views} views per case; torch threads {torch.get_num_threads()}, "
          f"NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', 'default')}, {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    for m, r in records.items():
        print(f"  {LABELS[m]}: {r['model']} ({params[m] / 1e6:.2f}M parameters), {r['max_steps']} steps of batch "
              f"{r['batch_size']}, {r['train_seconds']} s of training; {r['checkpoint']}")
    if len(budgets) > 1:
        print(f"  WARNING: the runs have different training budgets (steps, batch): {sorted(budgets)}")

    t0 = time.perf_counter()
    per = evaluate(root, groups, args.views, methods, {m: r["cutoff"] for m, r in records.items()}, args.device)
    table = summarise(per)
    print_reconstruction(table, groups, methods, args)
    target = issue_target(table)
    if target is not None:
        print(target["line"])
    print_novel(table, methods)
    scale = print_paper(table, records, args.views, training_cases(records["xgrm"]), grid, det, params)

    scaling_case = args.scaling_case or (groups.get("phantom") or next(iter(groups.values())))[0]
    scaling = []
    for m in checkpoints:
        for k in args.scaling_views:
            cfg = {"method": m, "views": k, "case": str(root / scaling_case), "checkpoint": str(checkpoints[m]),
                   "options": methods[m]["options"], "repeats": args.repeats, "threads": args.threads}
            scaling.append(run_scaling(cfg, args.timeout))
    print_scaling(scaling, scaling_case)
    print(f"\nbenchmark wall time {time.perf_counter() - t0:.0f} s")

    result = {
        "meta": {"torch": torch.__version__, "cpu_count": os.cpu_count(), "argv": sys.argv[1:],
                 "threads": torch.get_num_threads(), "heldout_root": str(root), "grid": list(grid),
                 "detector": list(det)},
        "runs": {m: {k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for m, r in records.items()},
        "parameters": params, "groups": groups, "table": table, "per_case": per, "scaling": scaling,
        "target": target, "paper_table2": {m: {"seconds": s, **{str(k): v for k, v in rows.items()}} for m, (s, rows) in
                         PAPER_TABLE2.items()}, "scale": scale,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    main()
