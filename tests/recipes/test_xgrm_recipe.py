"""recipes/xgrm_train.py: config keys map onto constructors (CPU and paper settings, the decoder option passes
through), a few steps end to end on a tiny built dataset (model export, validation records beside FDK, panels,
loss parts in TensorBoard), exact resume of an interrupted run, and ``medgauss-reconstruct --method xgrm / ilrm``
on the trained checkpoint."""

from __future__ import annotations

import importlib.util
import inspect
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medgauss.ct import load_case
from medgauss.ct.dataset import evenly_spaced_views
from medgauss.data import XGRMSampleDataset, build_xgrm_dataset
from medgauss.engines import CheckpointManager, ReconstructionValidator, TrainingEngine, XGRMTask, build_optimizer
from medgauss.losses import XGRMLoss
from medgauss.nets import XGRM, create_model, list_models, load_pretrained
from medgauss.nets.zoo import check_overrides
from medgauss.recon.cli import main as reconstruct_main

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "xgrm_train.py"
CONF = REPO / "recipes" / "conf_xgrm"
TINY_DATA = [
    "data.build.num_ct_variants=2",
    "data.build.num_phantoms=2",
    "data.build.heldout_phantoms=1",
    "data.build.seed=3",
    "data.build.prepare={fov_mm:72.0,grid:16,num_views:16,det_size:32}",
    "+data.build.phantom_shape=[40,36,44]",
    "+data.build.phantom_spacing_mm=4.0",
    "data.val.sart_iterations=1",
]
SMALL = [
    *TINY_DATA,
    "+model.img_size=32",
    "trainer.batch_size=2",
    "trainer.progress=false",
    "trainer.log_every=2",
]


def _compose(name="xgrm_cpu", overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def _recipe_module():
    spec = importlib.util.spec_from_file_location("xgrm_train_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fresh_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _params(fn, drop=()):
    return set(inspect.signature(fn).parameters) - set(drop)


@pytest.mark.parametrize("name", ["xgrm_cpu", "xgrm_paper"])
def test_config_keys_are_constructor_arguments(name):
    cfg = _compose(name)
    assert set(cfg.trainer) <= _params(TrainingEngine)
    assert set(cfg.optim) <= _params(build_optimizer, ("model", "max_steps"))
    assert set(cfg.loss) <= _params(XGRMLoss)
    assert set(cfg.task) <= _params(XGRMTask, ("loss_fn",))
    assert set(cfg.data.samples) <= _params(XGRMSampleDataset, ("batch_size", "rank", "world_size"))
    assert set(cfg.data.val) <= _params(ReconstructionValidator)
    if cfg.data.build is not None:
        assert set(cfg.data.build) <= _params(build_xgrm_dataset)
    model = OmegaConf.to_container(cfg.model)
    assert model.pop("name") in list_models()
    check_overrides(XGRM, model)  # raises on a key that is no argument
    # X-GRM's optimiser: AdamW (0.9, 0.95), lr 1e-4 cosine to 1e-6; quarter-grid boxes, K in {6, 8, 10}.
    assert cfg.optim.lr == 1e-4 and list(cfg.optim.betas) == [0.9, 0.95] and cfg.optim.min_lr_ratio == 0.01
    assert cfg.data.samples.box_fraction == 0.25 and list(cfg.data.samples.view_counts) == [6, 8, 10]
    assert cfg.loss.render_views == cfg.data.samples.render_views


def test_the_cpu_and_paper_settings():
    cpu, paper = _compose("xgrm_cpu"), _compose("xgrm_paper")
    assert cpu.model.name == "xgrm_tiny" and cpu.trainer.mixed_precision == "no" and not cpu.model.grad_checkpointing
    assert cpu.data.build.out_dir and cpu.data.samples.root == f"{cpu.data.build.out_dir}/train"
    assert paper.model.name == "xgrm_base" and paper.model.grad_checkpointing
    assert paper.trainer.mixed_precision == "bf16" and paper.trainer.batch_size * 4 == 8  # 4 ranks, batch 8
    assert paper.data.build is None and OmegaConf.is_missing(paper.data.samples, "root")
    assert paper.trainer.max_steps == -(-13612 * 100 // 8)  # 100 epochs of ReconX's training set at batch 8


def test_the_decoder_option_passes_through_to_the_model():
    cfg = _compose("xgrm_cpu", ["model.decoder=iterative", "+model.img_size=32"])
    model = create_model(**OmegaConf.to_container(cfg.model))
    assert model.init_config["decoder"] == "iterative" and model.decoder_kind == "iterative"
    assert create_model(**OmegaConf.to_container(_compose("xgrm_cpu").model)).decoder_kind == "voxgs"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """6 steps of the recipe on a tiny dataset built by the recipe itself (validation at steps 3 and 6)."""
    root = tmp_path_factory.mktemp("xgrm_recipe")
    overrides = [*SMALL, f"data.build.out_dir={root / 'data'}", f"trainer.run_dir={root / 'run'}",
                 "trainer.max_steps=6", "trainer.val_every=3", "trainer.panel_every=3", "trainer.checkpoint_every=3"]
    _fresh_accelerate()  # module-scoped: runs before the per-test reset of conftest.py
    result = _recipe_module().run(_compose("xgrm_cpu", overrides))
    return root, result


def test_the_recipe_trains_validates_and_exports(trained):
    root, result = trained
    run = root / "run"
    assert len(result.losses) == 6 and all(np.isfinite(result.losses))
    assert result.summary.startswith("X-GRM loss: start")
    assert isinstance(load_pretrained(run / "model"), XGRM)
    records = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    last = records[-1]
    assert set(last["table"]) == {"model", "fdk", "sart"} and set(last["table"]["fdk"]) == {"6", "8", "10"}
    assert last["num_cases"] == 2 and last["case_ids"] == ["heldout_ct_000", "heldout_phantom_000"]
    assert last["margin_db"] == pytest.approx(
        np.mean([last["table"]["model"][k]["psnr"] - last["table"]["fdk"][k]["psnr"] for k in ("6", "8", "10")]))
    assert records[0]["table"]["fdk"] == last["table"]["fdk"]  # the baselines are fixed
    assert sorted(p.name for p in (run / "panels").iterdir()) == [f"step_{s:08d}.png" for s in (1, 3, 6)]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/xgrm_loss", "train/volume_mse", "train/render_l1", "train/render_dssim", "val/psnr_over_fdk_db",
            "val/model_6v_psnr", "val/fdk_10v_ssim", "val/sart_psnr"} <= tags
    assert [e.step for e in events.Scalars("train/volume_mse")] == [1, 2, 4, 6]
    config = json.loads(json.dumps(OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))))
    assert config["model"]["name"] == "xgrm_tiny" and config["trainer"]["run_dir"] == str(run)


class Interrupted(Exception):
    """Stands in for a job killed during a step."""


def test_an_interrupted_run_resumes_with_bitwise_equal_losses(trained, tmp_path, monkeypatch):
    """8 steps straight vs. killed in step 5 (after the step-4 checkpoint) and resumed: same losses and weights."""
    data = trained[0] / "data"  # the dataset the recipe built above (reused, settings checked)
    common = [*SMALL, f"data.build.out_dir={data}", "trainer.max_steps=8", "trainer.checkpoint_every=4",
              "trainer.keep_checkpoints=0", "trainer.val_every=4", "trainer.panel_every=4"]
    recipe = _recipe_module()
    straight = recipe.run(_compose("xgrm_cpu", [*common, f"trainer.run_dir={tmp_path / 'a'}"]))

    class StopAfter(recipe.XGRMTask):
        calls_left = 4

        def compute_loss(self, model, batch, device):
            StopAfter.calls_left -= 1
            if StopAfter.calls_left < 0:
                raise Interrupted
            return super().compute_loss(model, batch, device)

    _fresh_accelerate()
    with monkeypatch.context() as patch:
        patch.setattr(recipe, "XGRMTask", StopAfter)
        with pytest.raises(Interrupted):
            recipe.run(_compose("xgrm_cpu", [*common, f"trainer.run_dir={tmp_path / 'b'}"]))
    assert CheckpointManager(tmp_path / "b").latest().name == "step_00000004"
    _fresh_accelerate()
    resumed = recipe.run(_compose("xgrm_cpu", [*common, f"trainer.run_dir={tmp_path / 'b'}", "trainer.resume=latest"]))
    assert resumed.resumed_from.name == "step_00000004"
    assert resumed.losses == straight.losses  # steps 5-8 recomputed after the restore, bit for bit
    a, b = (load_pretrained(tmp_path / run / "model").state_dict() for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    val_a = (tmp_path / "a" / "validation.jsonl").read_text().splitlines()
    val_b = (tmp_path / "b" / "validation.jsonl").read_text().splitlines()
    metrics = lambda line: json.loads(line)["metrics"]
    assert [metrics(x) for x in val_a] == [metrics(x) for x in val_b]


# ------------------------------------------------------------------------------------------- reconstruction


def test_medgauss_reconstruct_xgrm_round_trip_on_the_trained_checkpoint(trained, tmp_path, capsys):
    root, _ = trained
    checkpoint, case_dir = root / "run" / "model", root / "data" / "heldout" / "heldout_phantom_000"
    out = tmp_path / "xgrm.nii.gz"
    result = reconstruct_main(["--method", "xgrm", "--checkpoint", str(checkpoint), "--case", str(case_dir),
                               "--views", "6", "--out", str(out), "--opt", "chunk_size=1000", "--opt", "device=cpu"])
    line = capsys.readouterr().out
    assert line.startswith("method=xgrm views=6 seconds=") and "psnr=" in line and "ssim=" in line

    # Independently: the saved model on the case's 6 evenly spaced views, decoded in one chunk.
    case = load_case(case_dir)
    ids = evenly_spaced_views(case["geometry"].num_views, 6)
    model = XGRM.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        expected = model.reconstruct(torch.from_numpy(np.array(case["projections"][ids]))[None],
                                     case["geometry"].subset(ids), chunk_size=1 << 20).volume[0, 0]
    image = nib.load(str(out))
    np.testing.assert_allclose(image.affine, case["affine"].numpy(), rtol=0, atol=1e-5)
    volume = np.asarray(image.dataobj, dtype=np.float32)
    assert volume.shape == (16, 16, 16)
    np.testing.assert_allclose(volume, expected.numpy(), rtol=1e-5, atol=1e-6)
    truth = np.array(case["volume"], dtype=np.float64)
    assert result.psnr == pytest.approx(10 * np.log10(1 / np.mean((expected.double().numpy() - truth) ** 2)), abs=1e-4)


def test_medgauss_reconstruct_ilrm_needs_an_iterative_decoder_checkpoint(trained, tmp_path, capsys):
    root, _ = trained
    checkpoint, case_dir = root / "run" / "model", root / "data" / "heldout" / "heldout_ct_000"
    args = ["--case", str(case_dir), "--views", "8", "--out", str(tmp_path / "o.nii.gz")]
    with pytest.raises(SystemExit) as exit_info:
        reconstruct_main(["--method", "ilrm", "--checkpoint", str(checkpoint), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert str(checkpoint) in err and "decoder='voxgs'" in err and "--method xgrm" in err

    iterative = create_model("xgrm_tiny", img_size=32, decoder="iterative").save_pretrained(tmp_path / "ilrm")
    result = reconstruct_main(["--method", "ilrm", "--checkpoint", str(iterative), *args])
    assert result.volume.shape == (1, 1, 16, 16, 16) and capsys.readouterr().out.startswith("method=ilrm views=8")
    with pytest.raises(SystemExit):
        reconstruct_main(["--method", "xgrm", "--checkpoint", str(iterative), *args])
    assert "decoder='iterative'" in capsys.readouterr().err



def test_validation_on_training_cases_is_refused(trained, tmp_path):
    data = trained[0] / "data"
    train = XGRMSampleDataset(data / "train", batch_size=1, rank=0, world_size=1)
    check = _recipe_module().check_heldout
    check(train, ReconstructionValidator(data / "heldout"))  # disjoint: accepted
    with pytest.raises(ValueError, match="same folder"):
        check(train, ReconstructionValidator(data / "train"))
    copy = tmp_path / "copy"  # another folder holding a training case under its id
    shutil.copytree(data / "train", copy)
    with pytest.raises(ValueError, match=r"case ids \['train_ct_000'\] are in both"):
        check(train, ReconstructionValidator(copy, cases=["train_ct_000"]))
