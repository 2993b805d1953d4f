"""The segmentation recipe end to end at tiny size on phantoms (from a pretraining run and from scratch): trains,
validates beside the intensity baseline, resumes bit for bit; ``medgauss-segment`` writes labels on the image's own
grid, and maps them there correctly (a model that segments by intensity reproduces a threshold of the file)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medgauss.inference.segment import main as segment_main
from medgauss.nets import load_pretrained
from medgauss.nets.unetr import PretrainedUNETR
from tests._accelerate_state import fresh_accelerate_state  # noqa: F401  (autouse fixture)
from tests.finetune.conftest import (
    TINY_ENCODER,
    assert_resumes_exactly,
    compose_config,
    fresh_accelerate,
    load_recipe,
    write_pretraining_run,
)

ROOT = Path(__file__).resolve().parents[2]


def run_segmentation(overrides):
    fresh_accelerate()
    return load_recipe("segmentation").run(compose_config("segmentation", overrides))


def _common(tmp):
    return [*(f"encoder.{k}={v}" for k, v in TINY_ENCODER.items()), "data=segmentation_phantom",
            "data.datalist.num_cases=1", "data.datalist.shape=[24,24,24]", "data.datalist.spacing=6.0",
            "data.crops.pool_size=8", "model.feature_size=4", "trainer.max_steps=4", "trainer.checkpoint_every=2",
            "trainer.keep_checkpoints=0", "trainer.val_every=2", "trainer.panel_every=2", "trainer.log_every=1",
            "trainer.progress=false", "trainer.tensorboard=false", "trainer.batch_size=1", "optim.warmup_steps=1",
            "val.sw_batch_size=8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg")
    pretrained = write_pretraining_run(tmp / "pretrain", pixdim=6.0)
    common = [*_common(tmp), f"pretrained.checkpoint={pretrained}"]
    result = run_segmentation([*common, f"trainer.run_dir={tmp / 'a'}"])
    return tmp, common, result


def test_the_recipe_trains_validates_and_exports(trained):
    tmp, _, result = trained
    run = tmp / "a"
    assert len(result.losses) == 4 and all(np.isfinite(result.losses))
    lines = [json.loads(x) for x in (run / "validation.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4]
    metrics = lines[-1]["metrics"]
    assert set(metrics) == {"model", "intensity"}
    assert {"dice_mean", "dice_class_1", "dice_class_13"} <= set(metrics["model"])
    assert 0.0 <= metrics["intensity"]["dice_mean"] <= 1.0
    model = load_pretrained(run / "model")
    assert isinstance(model, PretrainedUNETR) and model.class_names[:2] == ["background", "class_1"]
    assert sorted(p.name for p in (run / "panels").glob("*.png"))
    pre = yaml.safe_load((run / "config.yaml").read_text())["data"]["preprocessing"]
    assert {k: pre[k] for k in ("pixdim", "a_min", "a_max")} == {"pixdim": 6.0, "a_min": -1000.0, "a_max": 1000.0}


def test_an_interrupted_run_resumes_with_bitwise_equal_losses(trained, monkeypatch):
    tmp, common, straight = trained
    assert_resumes_exactly("segmentation", "SegmentationTask", "segmentation", common, straight, tmp / "a", tmp / "b",
                           monkeypatch)


def test_from_scratch_and_wrong_checkpoints(tmp_path):
    result = run_segmentation([*_common(tmp_path), "trainer.max_steps=1", "trainer.val_every=0",
                               "data.preprocessing.pixdim=6.0", f"trainer.run_dir={tmp_path / 'scratch'}"])
    assert len(result.losses) == 1 and result.validation is not None
    other = write_pretraining_run(tmp_path / "wide", pixdim=6.0, hidden_size=48)
    with pytest.raises(ValueError, match="hidden_size"):
        run_segmentation([*_common(tmp_path), f"pretrained.checkpoint={other}", f"trainer.run_dir={tmp_path / 'x'}"])
    with pytest.raises(ValueError, match="swinunetr is the from-scratch reference"):
        run_segmentation([*_common(tmp_path), "model.arch=swinunetr", f"pretrained.checkpoint={other}",
                          f"trainer.run_dir={tmp_path / 'swin'}"])


def test_paper_config_is_monai_unetr_on_vit_b():
    cfg = compose_config("segmentation_paper", ["data.datalist.path=/data/amos.json", "data.num_classes=16"])
    assert dict(cfg.encoder) == {"img_size": 96, "patch_size": 16, "in_channels": 1, "hidden_size": 768,
                                 "num_layers": 12, "num_heads": 12, "mlp_dim": 3072}
    assert cfg.model.feature_size == 16 and cfg.data.datalist.key == "training"


class IntensityNet(PretrainedUNETR):
    """A 'segmentation network' that labels voxels above 0.5 (normalised) as class 1: a known answer."""

    def forward(self, x):
        above = (x > 0.5).float()
        return torch.cat([1.0 - above, above, torch.zeros_like(x)], dim=1) * 10.0


def test_medgauss_segment_maps_labels_onto_the_image_grid(tmp_path, capsys):
    # an image in LPS order (not the medgauss frame), 3 mm, with a bright block; the model runs at 2 mm
    affine = np.array([[-3.0, 0, 0, 40], [0, -3.0, 0, 30], [0, 0, 3.0, -20], [0, 0, 0, 1]])
    ct = np.full((14, 12, 10), -500.0, np.float32)
    ct[3:9, 4:10, 2:7] = 700.0
    nib.save(nib.Nifti1Image(ct, affine), str(tmp_path / "ct.nii.gz"))
    run = tmp_path / "run"
    net = IntensityNet(3, img_size=16, patch_size=8, hidden_size=32, num_layers=4, num_heads=2, mlp_dim=64,
                       feature_size=4, class_names=["background", "bright", "unused"])
    net.save_pretrained(run / "model")  # IntensityNet is a registered PretrainedUNETR subclass: it loads back as is
    pre = dict(pixdim=2.0, a_min=-1000.0, a_max=1000.0, b_min=0.0, b_max=1.0, clip=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"preprocessing": pre}}))
    result = segment_main(["--checkpoint", str(run), "--image", str(tmp_path / "ct.nii.gz"), "--out",
                           str(tmp_path / "labels.nii.gz"), "--probabilities", str(tmp_path / "p.nii.gz")])
    out = nib.load(str(tmp_path / "labels.nii.gz"))
    assert out.shape == ct.shape and np.allclose(out.affine, affine)
    labels = np.asarray(out.dataobj)
    expected = (ct > 0).astype(np.uint8)
    # resampled 3 mm -> 2 mm -> 3 mm: identical away from the block's one-voxel border
    interior = np.zeros_like(expected, bool)
    interior[4:8, 5:9, 3:6] = True
    exterior = np.ones_like(expected, bool)
    exterior[2:10, 3:11, 1:8] = False
    assert (labels[interior] == 1).all() and (labels[exterior] == 0).all()
    assert result.voxels["bright"] == int(labels.sum())
    probs = nib.load(str(tmp_path / "p.nii.gz"))
    assert probs.shape == (*ct.shape, 3)
    assert "classes: 0=background, 1=bright, 2=unused" in capsys.readouterr().out


def test_medgauss_segment_errors_name_the_file(trained, tmp_path, capsys):
    tmp, _, _ = trained
    with pytest.raises(SystemExit):
        segment_main(["--checkpoint", str(tmp / "a"), "--image", str(tmp_path / "none.nii.gz"), "--out",
                      str(tmp_path / "o.nii.gz")])
    assert "none.nii.gz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        segment_main(["--checkpoint", str(tmp / "pretrain"), "--image", str(tmp_path / "none.nii.gz"), "--out",
                      str(tmp_path / "o.nii.gz")])
    assert "not a segmentation network" in capsys.readouterr().err
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    shutil.copytree(tmp / "a" / "model", tmp_path / "run" / "model")
    (tmp_path / "run" / "config.yaml").write_text("data: {}\n")
    with pytest.raises(SystemExit):
        segment_main(["--checkpoint", str(tmp_path / "run"), "--image", str(bad), "--out", str(tmp_path / "o.nii")])
    assert "data.preprocessing" in capsys.readouterr().err
