"""The Hydra recipe: config keys map onto constructors, exact resume of a real run (gmae_tiny, bundled CT)
with its configuration kept and the resume recorded, and a 2-process ``accelerate launch`` with no
accelerate config sharing one run directory."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState
from hydra import compose, initialize_config_dir

from medgauss.data import build_pretrain_dataset
from medgauss.engines import CheckpointManager, TrainingEngine, build_optimizer
from medgauss.nets import GaussianMAE, VoxelMAE, list_models, load_pretrained
from medgauss.nets.zoo import check_overrides

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "medgmae_pretrain.py"
CONF = REPO / "recipes" / "conf"
# Small but real: gmae_tiny on 32^3 crops of the bundled CT (2x2x2 patches).
SMALL = [
    "model.img_size=32",
    "trainer.batch_size=1",
    "trainer.panel_every=0",
    "trainer.progress=false",
    "trainer.tensorboard=false",
    "trainer.log_every=1",
]


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="medgmae_pretrain", overrides=list(overrides))


def _recipe_module():
    spec = importlib.util.spec_from_file_location("medgmae_pretrain_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("data", ["bundled_ct", "decathlon", "nifti_folder", "phantom"])
def test_config_keys_are_constructor_arguments(data):
    cfg = _compose([f"data={data}"])
    assert cfg.model.name == "gmae_tiny" and cfg.model.img_size == 96
    assert cfg.optim.lr == 1e-4 and list(cfg.optim.betas) == [0.9, 0.95] and cfg.optim.weight_decay == 0.05
    assert cfg.trainer.seed == 41 and cfg.trainer.grad_clip == 1.0
    assert set(cfg.trainer) <= set(inspect.signature(TrainingEngine).parameters)
    assert set(cfg.optim) <= set(inspect.signature(build_optimizer).parameters) - {"model", "max_steps"}
    assert set(cfg.data.dataset) <= set(inspect.signature(build_pretrain_dataset).parameters) - {"datalist"}
    target = cfg.data.datalist["_target_"]
    module, name = target.rsplit(".", 1)
    builder = getattr(importlib.import_module(module), name)
    assert set(cfg.data.datalist) - {"_target_"} <= set(inspect.signature(builder).parameters)


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_model_config_names_a_registered_model_and_its_arguments(model):
    cfg = _compose([f"model={model}"]).model
    assert cfg.name == model and cfg.name in list_models()
    cls = GaussianMAE if model.startswith("gmae") else VoxelMAE
    check_overrides(cls, {k: v for k, v in cfg.items() if k != "name"})  # raises on a key that is no argument
    with pytest.raises(ValueError, match="not_an_argument"):  # (the check can fail)
        check_overrides(cls, {"not_an_argument": 1})
    # Both kinds of the same size share the crop and the Gaussian scale bound (compared like with like).
    size = model.removesuffix("_anchored").rsplit("_", 1)[1]
    gmae, star = _compose([f"model=gmae_{size}"]).model, _compose([f"model=gmae_star_{size}"]).model
    assert gmae.get("max_scale") == star.get("max_scale") and gmae.img_size == star.img_size == cfg.img_size


class Interrupted(Exception):
    """Stands in for a job killed between optimizer steps."""


def _interrupt_after(recipe, monkeypatch, calls: int) -> None:
    """Make the recipe's loss raise :class:`Interrupted` at call ``calls + 1`` (simulated preemption)."""
    build = recipe.pretrain_loss_for

    class StopAfter(torch.nn.Module):
        def __init__(self, loss: torch.nn.Module) -> None:
            super().__init__()
            self.loss, self.left = loss, calls

        def forward(self, out, images):
            self.left -= 1
            if self.left < 0:
                raise Interrupted
            return self.loss(out, images)

    monkeypatch.setattr(recipe, "pretrain_loss_for", lambda model, **kw: StopAfter(build(model, **kw)))


def _fresh_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_interrupted_run_resumes_exactly_and_keeps_its_original_config(tmp_path, monkeypatch):
    """20 steps straight vs. the same run killed after step 10 and resumed: steps 11-20 and the weights agree."""
    recipe = _recipe_module()
    common = [*SMALL, "trainer.max_steps=20", "trainer.checkpoint_every=5", "trainer.keep_checkpoints=0"]
    straight = recipe.run(_compose([*common, f"trainer.run_dir={tmp_path / 'a'}"]))
    assert len(straight.losses) == 20 and all(0.0 < v < 1.0 for v in straight.losses)

    run_dir = tmp_path / "b"
    _fresh_accelerate()
    with monkeypatch.context() as patch:
        _interrupt_after(recipe, patch, 10)  # dies in step 11, after the step-10 checkpoint
        with pytest.raises(Interrupted):
            recipe.run(_compose([*common, f"trainer.run_dir={run_dir}"]))
    assert CheckpointManager(run_dir).latest().name == "step_00000010"
    original = (run_dir / "config.yaml").read_text()

    _fresh_accelerate()
    resume_overrides = [*common, f"trainer.run_dir={run_dir}", "trainer.resume=latest", "trainer.log_every=5"]
    resumed = recipe.run(_compose(resume_overrides), overrides=resume_overrides)
    assert resumed.resumed_from.name == "step_00000010"
    assert len(resumed.losses) == 20
    # Steps 11-20 were computed again after the restore: bitwise equal to the uninterrupted run's.
    assert resumed.losses[10:] == straight.losses[10:]
    assert resumed.losses[:10] == straight.losses[:10]  # restored from the checkpoint
    weights_a = load_pretrained(tmp_path / "a" / "model").state_dict()
    weights_b = load_pretrained(run_dir / "model").state_dict()
    assert weights_a.keys() == weights_b.keys()
    for name, value in weights_a.items():
        assert torch.equal(value, weights_b[name]), name

    # The run's configuration survives the resume; the resume is recorded beside it.
    assert (run_dir / "config.yaml").read_text() == original
    start = yaml.safe_load(original)
    assert start["trainer"]["resume"] is None and start["trainer"]["log_every"] == 1
    assert start["model"]["name"] == "gmae_tiny" and start["trainer"]["run_dir"] == str(run_dir)
    again = yaml.safe_load((run_dir / "config.resume-1.yaml").read_text())
    assert again["trainer"]["resume"] == "latest" and again["trainer"]["log_every"] == 5
    (record,) = yaml.safe_load((run_dir / "resumes.yaml").read_text())
    assert record["resume"] == 1 and record["step"] == 10 and record["config"] == "config.resume-1.yaml"
    assert record["from_checkpoint"] == str(Path("checkpoints") / "step_00000010")
    assert record["overrides"] == resume_overrides
    assert record["changed"] == {
        "trainer.log_every": {"before": 1, "after": 5},
        "trainer.resume": {"before": None, "after": "latest"},
    }
    assert datetime.fromisoformat(record["time"]).tzinfo is not None


def test_two_process_launch_without_accelerate_config_shares_one_run_dir(tmp_path):
    home = tmp_path / "home"  # fresh HOME: no ~/.cache/huggingface/accelerate/default_config.yaml
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_CONFIG_FILE", None)
    # `--multi_gpu` on a machine without GPUs = multi-process CPU (gloo); `--cpu --num_processes 2`
    # would start a single process (Accelerate's simple launcher). The launcher runs as a module of
    # this interpreter, not through the `accelerate` script, whose shebang holds the path of the venv
    # it was installed into (wrong for a relocated environment, e.g. CI's cached one).
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(RECIPE),
        *SMALL,
        "model=vmae_tiny",
        "trainer.max_steps=2",
        "trainer.batch_size=2",
        "trainer.record_samples=true",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # The default run_dir is timestamped and resolved by each rank; still exactly one run dir exists.
    runs = list((tmp_path / "runs" / "medgmae_pretrain").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    assert (run / "config.yaml").is_file() and (run / "model" / "config.json").is_file()
    ckpt = CheckpointManager(run).latest()
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    ids = json.loads((run / "sample_ids_00000001-00000002.json").read_text())
    assert set(ids) == {"0", "1"} and len(ids["0"]) == len(ids["1"]) == 4
    assert not set(ids["0"]) & set(ids["1"])  # each rank trains on its own samples
    assert sorted(ids["0"] + ids["1"]) == list(range(8))
    assert "world size 2" in out and "masked-region loss: start" in out


def test_single_process_cpu_launch_is_flagged(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.warns(RuntimeWarning, match="started ONE process"):
        TrainingEngine(run_dir=tmp_path, max_steps=1, cpu=True)


def test_ranks_that_fail_to_form_one_group_are_refused(monkeypatch):
    from medgauss.engines.training import _check_world_size

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 .* group of 1"):
        _check_world_size(1)
    _check_world_size(2)


def test_short_training_of_the_main_job_beats_every_constant_on_held_out_crops(tmp_path, monkeypatch):
    """The main job's model (anchored queries with anchor pooling), shrunk to 32^3 crops and 300 steps
    (~20 s here), against held-out crops of the bundled CT (the superior 45% training never sees).

    The bar is the *best* constant, the mean of each crop's hidden voxels, not the validator's constant
    (the visible mean): no model that outputs a constant can beat it, so this test fails for one.
    """
    from medgauss.metrics import masked_psnr

    recipe = _recipe_module()
    seen = {}
    build = recipe.build_validator
    monkeypatch.setattr(recipe, "build_validator",
                        lambda cfg, engine: seen.setdefault("validator", build(cfg, engine)))
    overrides = ["model.img_size=32", "model.num_queries=64", "model.max_scale=0.15", "optim.warmup_steps=20",
                 "trainer.max_steps=300", "trainer.val_every=300", "trainer.checkpoint_every=1000",
                 "trainer.panel_every=0", "trainer.progress=false", "trainer.tensorboard=false",
                 "trainer.log_every=100", "data.val.num_crops=6", f"trainer.run_dir={tmp_path / 'run'}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="medgmae_cpu", overrides=overrides)
    result = recipe.run(cfg)

    validator = seen["validator"]
    model = load_pretrained(result.export_dir).eval()
    images = validator.images
    with torch.no_grad():
        hidden = model.mask_to_volume(model(images, noise=validator.noise(model.encoder.num_patches)).mask)
    best_constant = torch.stack([images[i][hidden[i]].mean() for i in range(len(images))])
    best_constant_psnr = float(masked_psnr(best_constant.view(-1, 1, 1, 1, 1).expand_as(images), images,
                                           hidden, data_range=1.0).mean())
    model_psnr = result.validation.metrics["model"]["psnr"]
    assert best_constant_psnr >= result.validation.metrics["constant"]["psnr"] - 1e-6  # it is the best one
    assert model_psnr > best_constant_psnr + 1.0, result.validation.summary()
