"""Pretraining step benchmark: MedGMAE vs MedGMAE* vs voxel-MAE with the same encoder.

Each model is built exactly as the recipe builds it: ``create_model(**cfg.model)`` with the model group
``recipes/conf/model/<kind>_<size>.yaml`` composed by Hydra (``max_scale`` included, so the Gaussians,
and the (Gaussian, voxel) pairs the loss evaluates, are the recipe's); ``--img-size`` overrides the
config's crop size. The table shows each model's ``max_scale`` and an estimate of those pairs.

Measures one training step (forward + loss + backward + AdamW step) and peak memory for each model
at each size, on CPU and (when available) CUDA, in one run, and reports each time as a ratio to the
voxel-MAE step of the same size and device. Each configuration runs in its own subprocess, so peak
memory (max RSS on CPU, ``max_memory_allocated`` on CUDA) belongs to that configuration alone.

    python benchmarks/pretrain_step.py            # tiny and base, CPU (+ CUDA if present)
    python benchmarks/pretrain_step.py --quick    # tiny only, fewer steps
    python benchmarks/pretrain_step.py --config-name medgmae_cpu   # the main job's own model, batch, loss

Prints a table and writes ``benchmarks/results/pretrain_step.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE_CONF = ROOT / "recipes" / "conf"
KINDS = ("gmae", "gmae_star", "vmae")
LABELS = {"gmae": "MedGMAE", "gmae_star": "MedGMAE*", "vmae": "voxel-MAE"}


def recipe_model_config(name: str, img_size: int | None = None) -> dict:
    """The recipe's model group ``name`` (``recipes/conf/model/<name>.yaml``), composed and resolved by Hydra.

    Returns the keyword arguments of ``create_model`` (``name`` included); ``img_size`` replaces the
    config's crop size when given. Raises ``FileNotFoundError`` when the recipe has no such model group.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    if not (RECIPE_CONF / "model" / f"{name}.yaml").is_file():
        raise FileNotFoundError(f"the recipe has no model config {RECIPE_CONF / 'model' / f'{name}.yaml'}")
    overrides = [f"model={name}"] + ([] if img_size is None else [f"model.img_size={img_size}"])
    with initialize_config_dir(config_dir=str(RECIPE_CONF), version_base="1.3"):
        cfg = compose(config_name="medgmae_pretrain", overrides=overrides)
    return OmegaConf.to_container(cfg.model, resolve=True)


def recipe_job_models(config_name: str) -> tuple[dict[str, dict], dict, int]:
    """The models a recipe configuration trains, and what to compare it with at the same crop.

    Composes ``recipes/conf/<config_name>.yaml`` (e.g. ``medgmae_cpu``, the main job) and returns
    ``({kind: create_model kwargs}, loss kwargs, batch size)``: ``gmae`` is the job's model exactly,
    ``gmae_star`` the same model with MedGMAE*'s residual levels (its ``gmae_star_*`` registry name), and
    ``vmae`` the voxel-MAE of the same size with the job's crop, patch and mask ratio. The loss options
    (``cfg.loss``) apply to every row.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    if not (RECIPE_CONF / f"{config_name}.yaml").is_file():
        raise FileNotFoundError(f"the recipe has no config {RECIPE_CONF / f'{config_name}.yaml'}")
    with initialize_config_dir(config_dir=str(RECIPE_CONF), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name=config_name), resolve=True)
    gmae = dict(cfg["model"])
    name = gmae["name"]
    if not name.startswith("gmae_") or name.startswith("gmae_star_"):
        raise ValueError(f"{config_name}: expected a plain MedGMAE model (gmae_*), got {name!r}")
    size = name.split("_")[1]
    shared = {k: gmae[k] for k in ("img_size", "patch_size", "mask_ratio") if k in gmae}
    models = {"gmae": gmae, "gmae_star": {**gmae, "name": name.replace("gmae_", "gmae_star_", 1)},
              "vmae": {"name": f"vmae_{size}", **shared}}
    return models, dict(cfg.get("loss") or {}), int(cfg["trainer"]["batch_size"])


def splat_pairs(out, img_size: tuple[int, int, int], cutoff: float | None) -> float:
    """Estimated (Gaussian, voxel) pairs of sample 0 inside the loss's cutoff ellipsoids and the crop.

    Monte Carlo, by ``benchmarks/splat.py``'s ``estimate_pairs``; the loss evaluates the hidden share of
    them (about ``mask_ratio``).
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_splat", ROOT / "benchmarks" / "splat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    g = out.gaussians.detach()
    if len(set(img_size)) != 1:
        raise ValueError(f"img_size: the pair estimate needs a cubic crop, got {img_size}")
    if cutoff is None:  # dense: every voxel
        return float(g.num_gaussians * img_size[0] ** 3)
    return module.estimate_pairs(g, img_size[0], cutoff)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_worker(cfg: dict) -> dict:
    """Build one model, run warm-up + timed steps, return timings (ms) and memory (MiB)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from medgauss.losses import pretrain_loss_for
    from medgauss.nets import GaussianMAE, create_model

    torch.manual_seed(0)
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = cfg["device"]
    model_cfg = dict(cfg["model"])
    name = model_cfg["name"]
    model = create_model(**model_cfg).to(device).train()
    img_size = tuple(model.encoder.img_size)  # the model's crop (D, H, W) as built from its config
    loss_kwargs = dict(cfg.get("loss", {}))
    if isinstance(model, GaussianMAE):
        loss_kwargs["backend"] = cfg["backend"]
    loss_fn = pretrain_loss_for(model, **loss_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95))
    images = torch.rand(cfg["batch_size"], 1, *img_size, device=device)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _memory import memory_mib  # benchmarks/_memory.py: VmHWM, not ru_maxrss (which exec inherits)

    rss_before = memory_mib()["peak"]
    phases: dict[str, list[float]] = {"forward": [], "loss": [], "backward": [], "optimizer": [], "step": []}
    for step in range(cfg["warmup"] + cfg["steps"]):
        if step == cfg["warmup"] and device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t0 = time.perf_counter()
        out = model(images)
        _sync(device)
        t1 = time.perf_counter()
        loss = loss_fn(out, images)
        _sync(device)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _sync(device)
        t3 = time.perf_counter()
        opt.step()
        _sync(device)
        t4 = time.perf_counter()
        if step >= cfg["warmup"]:
            for key, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                phases[key].append(1e3 * dt)
    if not torch.isfinite(loss):
        raise RuntimeError(f"{name}: non-finite loss {loss.item()}")
    pairs = None
    if hasattr(out, "gaussians"):
        outputs = out.gaussians.num_gaussians * 11  # 3 centre + 3 scale + 4 quaternion + 1 intensity
        pairs = splat_pairs(out, img_size, loss_fn.cutoff)
    else:
        outputs = out.pred[0].numel()
    result = {k: statistics.median(v) for k, v in phases.items()}
    result.update(
        model=name, kind=cfg["kind"], size=cfg["size"], device=device, batch_size=cfg["batch_size"],
        img_size=img_size, backend=cfg["backend"], outputs_per_sample=outputs, model_config=model_cfg,
        max_scale=model.init_config.get("max_scale"), splat_pairs_sample0=pairs,
        parameters=sum(p.numel() for p in model.parameters()), final_loss=float(loss),
        peak_rss_mib=memory_mib()["peak"],
        rss_before_steps_mib=rss_before,
        step_ms_all=phases["step"], threads=torch.get_num_threads(),
    )
    if device == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
    return result


def run_config(cfg: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(cfg)]
    env = dict(os.environ)
    if cfg.get("threads"):  # numba reads its thread count at import time
        env["NUMBA_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(cfg["threads"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if proc.returncode != 0:
        error = proc.stderr.strip().splitlines()[-1:]
        return {**cfg, "model": f"{cfg['kind']}_{cfg['size']}", "error": error}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(results: list[dict]) -> None:
    header = (f"{'device':6} {'size':5} {'model':10} {'step ms':>9} {'x vMAE':>7} {'fwd':>8} {'loss':>8} "
              f"{'bwd':>8} {'opt':>7} {'peak MiB':>9} {'outputs/sample':>15} {'max_scale':>9} {'pairs/sample':>12}")
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['device']:6} {r['size']:5} {LABELS[r['kind']]:10} failed: {r['error']}")
            continue
        ratio = r.get("ratio_to_vmae")
        mem = r.get("peak_cuda_mib", r["peak_rss_mib"])
        scale = "-" if r["max_scale"] is None else f"{r['max_scale']:.2f}"
        pairs = "-" if r["splat_pairs_sample0"] is None else f"{r['splat_pairs_sample0']:.3g}"
        print(f"{r['device']:6} {r['size']:5} {LABELS[r['kind']]:10} {r['step']:9.1f} "
              f"{'' if ratio is None else f'{ratio:6.2f}x':>7} {r['forward']:8.1f} {r['loss']:8.1f} "
              f"{r['backward']:8.1f} {r['optimizer']:7.1f} {mem:9.0f} {r['outputs_per_sample']:15,d} "
              f"{scale:>9} {pairs:>12}")
    print("  (max_scale, and every other model argument, as the recipe composes them: recipes/conf/model/<model>.yaml, "
          "or the model block of --config-name; pairs/sample: "
          "(Gaussian, voxel) pairs inside the loss's cutoff and the crop, sample 0 of the last step, Monte "
          "Carlo estimate; the loss evaluates the hidden share of them)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=["tiny", "base", "large"])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--config-name", default=None,
                        help="a recipe config (e.g. medgmae_cpu, the main job): time its model, batch and loss "
                             "beside MedGMAE* and voxel-MAE at the same crop (ignores --sizes / --img-size)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 2, or the config's")
    parser.add_argument("--img-size", type=int, default=None, help="crop edge (default: the recipe's model config)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (JIT compilation)")
    parser.add_argument("--backend", default="auto", help="splat backend for the Gaussian losses")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch / numba CPU threads (0: library default)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    parser.add_argument("--quick", action="store_true", help="tiny only, 3 timed steps")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "pretrain_step.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return

    import torch

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    sizes = ["tiny"] if args.quick else args.sizes
    steps = 3 if args.quick else args.steps
    loss: dict = {}
    batch_size = args.batch_size or 2
    if args.config_name:
        job_models, loss, job_batch = recipe_job_models(args.config_name)
        sizes = [job_models["gmae"]["name"].split("_")[1]]
        batch_size = args.batch_size or job_batch
    results = []
    for device in devices:
        for size in sizes:
            rows = []
            for kind in args.kinds:
                model = (job_models[kind] if args.config_name
                         else recipe_model_config(f"{kind}_{size}", args.img_size))
                cfg = dict(kind=kind, size=size, device=device, batch_size=batch_size, model=model,
                           steps=steps, warmup=args.warmup, backend=args.backend, threads=args.threads,
                           loss=loss)
                rows.append(run_config(cfg, args.timeout))
                print(f"  done {device} {size} {kind}", file=sys.stderr, flush=True)
            vmae = next((r for r in rows if r["kind"] == "vmae" and "error" not in r), None)
            for r in rows:
                if vmae is not None and "error" not in r:
                    r["ratio_to_vmae"] = r["step"] / vmae["step"]
            results.extend(rows)
    crops = sorted({tuple(r["img_size"]) for r in results if "error" not in r})
    crop = ", ".join("x".join(map(str, c)) for c in crops) or "-"
    job = f"recipe config {args.config_name!r}, " if args.config_name else ""
    print(f"\npretrain step (forward+loss+backward+AdamW), {job}batch {batch_size}, crop {crop}, "
          f"median of {steps} steps, times in ms; splat backend {args.backend!r}; "
          f"{os.cpu_count()} CPU cores, threads {args.threads or 'default'}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print_table(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "argv": sys.argv[1:]}
    args.output.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
