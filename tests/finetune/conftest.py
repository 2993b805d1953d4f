"""Shared fixtures of the fine-tuning tests: a tiny pretraining run folder (config.yaml + model/ export)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from medgauss.nets import create_model

TINY_ENCODER = dict(img_size=16, patch_size=8, hidden_size=32, num_layers=4, num_heads=2, mlp_dim=64)
"""A 4-layer encoder on 16^3 crops with 8^3 patches (2^3 tokens): the smallest UNETR-compatible layout."""


def write_pretraining_run(root: Path, *, model_name: str = "gmae_tiny", pixdim: float = 4.0, a_min: float = -1000.0,
                          a_max: float = 1000.0, seed: int = 0, **model_overrides) -> Path:
    """A run folder like recipes/medgmae_pretrain.py leaves: config.yaml (data.dataset) + model/ (save_pretrained)."""
    torch.manual_seed(seed)
    overrides = {**TINY_ENCODER, **model_overrides}
    if model_name.startswith("gmae"):
        overrides.setdefault("num_queries", 8)
    model = create_model(model_name, **overrides)
    root.mkdir(parents=True, exist_ok=True)
    dataset = dict(spatial_size=overrides["img_size"], pixdim=pixdim, a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0,
                   clip=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"model": {"name": model_name, **overrides},
                                                      "data": {"dataset": dataset}}))
    model.save_pretrained(root / "model")
    return root


@pytest.fixture
def pretraining_run(tmp_path):
    """Factory: ``pretraining_run(name="run", **kwargs)`` -> a tiny pretraining run folder under ``tmp_path``."""

    def make(name: str = "run", **kwargs) -> Path:
        return write_pretraining_run(tmp_path / name, **kwargs)

    return make


# ------------------------------------------------------------------------------------------ recipe helpers
ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "recipes" / "conf_finetune"


def load_recipe(task: str):
    """``recipes/finetune_<task>.py`` as a module (recipes are scripts, not package modules)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"finetune_{task}_recipe", ROOT / "recipes" / f"finetune_{task}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose_config(name: str, overrides=()):
    """The Hydra config ``recipes/conf_finetune/<name>.yaml`` with ``overrides``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def fresh_accelerate() -> None:
    """Reset Accelerate's process-wide state between two recipe runs in one test."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class Interrupted(Exception):
    """Raised by a task to simulate a run killed mid-training."""


def assert_resumes_exactly(task: str, task_class: str, config: str, common, straight, straight_dir: Path,
                           run_dir: Path, monkeypatch, *, stop_after: int = 3, checkpoint: str = "step_00000002"):
    """Run ``task``'s recipe with ``common`` overrides into ``run_dir``, kill it after ``stop_after`` steps (the
    recipe's ``task_class`` raises), resume from ``checkpoint``, and check the losses and the exported weights equal
    the uninterrupted run's (``straight`` = its TrainResult, exported in ``straight_dir``)."""
    from medgauss.engines import CheckpointManager
    from medgauss.nets import load_pretrained

    recipe = load_recipe(task)
    base = getattr(recipe, task_class)
    calls = {"left": stop_after}

    class StopAfter(base):
        def compute_loss(self, model, batch, device):
            calls["left"] -= 1
            if calls["left"] < 0:
                raise Interrupted
            return super().compute_loss(model, batch, device)

    fresh_accelerate()
    with monkeypatch.context() as patch:
        patch.setattr(recipe, task_class, StopAfter)
        with pytest.raises(Interrupted):
            recipe.run(compose_config(config, [*common, f"trainer.run_dir={run_dir}"]))
    assert CheckpointManager(run_dir).latest().name == checkpoint
    fresh_accelerate()
    resumed = recipe.run(compose_config(config, [*common, f"trainer.run_dir={run_dir}", "trainer.resume=latest"]))
    assert resumed.resumed_from.name == checkpoint
    assert resumed.losses == straight.losses
    a, b = (load_pretrained(folder / "model").state_dict() for folder in (straight_dir, run_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)
    return resumed
