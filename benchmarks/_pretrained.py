"""Pretraining runs the benchmarks make themselves, with ``recipes/medgmae_pretrain.py`` (shared by
``recon_3dgr.py`` and ``finetune.py``): a finished run is reused, an unfinished one resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "medgmae_pretrain.py"
HU_WINDOW = ("data.dataset.a_min=-1000", "data.dataset.a_max=1000")
"""The benchmarks pretrain with the HU window [-1000, 1000] (MedGMAE's CT-RATE / AMOS window): intensities then map
linearly onto attenuation (3DGR) and the fine-tuning tasks see the whole HU range (air, lungs, bone)."""


def run_seconds(run_dir: Path) -> float | None:
    """Wall time of a pretraining run: its ``config.yaml`` (written at step 0) to its ``model/`` export."""
    start, end = run_dir / "config.yaml", run_dir / "model" / "config.json"
    if not (start.is_file() and end.is_file()):
        return None
    return end.stat().st_mtime - start.stat().st_mtime


def heldout_quality(run_dir: Path) -> dict | None:
    """The run's last held-out validation: masked PSNR of the model, the fill and the constant (dB), and the
    engine's training seconds up to it (``train_seconds``: optimisation only, no validation)."""
    path = run_dir / "validation.jsonl"
    if not path.is_file():
        return None
    lines = path.read_text().strip().splitlines()
    if not lines:
        return None
    last = json.loads(lines[-1])
    return {"step": last["step"], "train_seconds": last.get("train_seconds"),
            **{name: m["psnr"] for name, m in last["metrics"].items()}}


def pretrain(config_name: str, run_dir: Path, overrides: Sequence[str] = (), threads: int = 0) -> Path:
    """The run folder of ``recipes/medgmae_pretrain.py --config-name config_name`` with the [-1000, 1000] HU window
    and ``overrides``, made (or resumed) here unless it has finished already.

    Raises:
        SystemExit: a finished run in ``run_dir`` was pretrained with another HU window.
    """
    if (run_dir / "model" / "config.json").is_file():
        dataset = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["dataset"]
        if (dataset["a_min"], dataset["a_max"]) != (-1000.0, 1000.0):
            raise SystemExit(f"{run_dir} was pretrained with the HU window [{dataset['a_min']}, {dataset['a_max']}], "
                             "not [-1000, 1000]: use another folder")
        print(f"pretraining: reusing the finished run {run_dir}", flush=True)
        return run_dir
    command = [sys.executable, str(RECIPE), "--config-name", config_name, f"trainer.run_dir={run_dir}",
               *HU_WINDOW, *overrides, "trainer.resume=auto", "trainer.progress=false"]
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print("pretraining: " + " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    return run_dir
