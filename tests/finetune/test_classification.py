"""Classification fine-tuning and linear probe (issue 11): AUC against a float64 pairwise brute force, presence
targets against a brute-force count, crops as pure functions of (seed, id), the pretrained weights really copied,
a frozen encoder untouched, the linear probe's coefficients reproducing its scores, the recipe in both modes with
exact resume, and the errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medgauss.data.classification import (
    ImageTargetDataset,
    PresenceCropDataset,
    load_labelled_image_list,
    presence_targets,
    prevalence,
)
from medgauss.data.transforms import DataError
from medgauss.engines import build_optimizer
from medgauss.engines.classification import (
    ClassificationTask,
    ClassificationValidator,
    intensity_histograms,
    linear_probe,
)
from medgauss.frame import save_nifti
from medgauss.metrics.classification import multilabel_auc
from medgauss.nets import ViT3D, create_model, load_pretrained
from medgauss.nets.classification import ViTClassifier, classifier_from_encoder
from tests._accelerate_state import fresh_accelerate_state  # noqa: F401  (autouse fixture)
from tests.finetune.conftest import assert_resumes_exactly, compose_config, fresh_accelerate, load_recipe

REPO = Path(__file__).resolve().parents[2]
TINY = dict(img_size=16, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
TINY_OVERRIDES = [f"encoder.{k}={v}" for k, v in TINY.items()] + ["encoder.in_channels=1"]
SMALL = [*TINY_OVERRIDES, "data.min_voxels=200", "data.num_train_crops=24", "data.val.num_crops=24",
         "trainer.batch_size=2", "trainer.progress=false", "trainer.tensorboard=false", "trainer.log_every=2",
         "optim.warmup_steps=1"]


def brute_auc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of (positive, negative) pairs ranked correctly, ties 1/2 (float64)."""
    pos, neg = scores[targets == 1], scores[targets == 0]
    diff = pos[:, None].astype(np.float64) - neg[None, :].astype(np.float64)
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


# ------------------------------------------------------------------------------------------------ metric
def test_multilabel_auc_matches_pairwise_brute_force_with_ties_and_unscorable_classes():
    rng = np.random.default_rng(0)
    n, k = 57, 4
    targets = (rng.random((n, k)) < 0.4).astype(np.float64)
    scores = np.round(rng.normal(size=(n, k)) + targets, 1)  # rounded: many ties
    targets[:, 2] = 1.0  # always present: unscorable
    out = multilabel_auc(torch.tensor(scores), torch.tensor(targets), ["a", "b", "c", "d"])
    expect = {name: brute_auc(scores[:, j], targets[:, j]) for j, name in enumerate("abcd") if name != "c"}
    for name, value in expect.items():
        assert out[f"auc_{name}"] == pytest.approx(value, abs=1e-12)
    assert math.isnan(out["auc_c"]) and out["num_scored"] == 3.0
    assert out["auc_macro"] == pytest.approx(np.mean(list(expect.values())), abs=1e-12)
    with pytest.raises(ValueError, match="no class is scorable"):
        multilabel_auc(scores[:, 2:3], targets[:, 2:3])
    with pytest.raises(ValueError, match="same shape"):
        multilabel_auc(scores, targets[:, :2])
    with pytest.raises(ValueError, match="binary"):
        multilabel_auc(scores, targets * 2)
    with pytest.raises(ValueError, match="class_names"):
        multilabel_auc(scores, targets, ["a"])


# ------------------------------------------------------------------------------------------------ data
def test_presence_targets_against_brute_force_count():
    label = torch.zeros(6, 5, 7, dtype=torch.int64)
    label[0:2, 0:2, 0:3] = 1   # 12 voxels
    label[3, :, :] = 2         # 35 voxels
    label[5, 4, 6] = 3         # 1 voxel
    counts = [int((label == c).sum()) for c in (1, 2, 3, 4)]
    assert counts == [12, 35, 1, 0]
    for thresholds in ([1, 1, 1, 1], [12, 36, 1, 1], [13, 35, 2, 1]):
        expect = [float(c >= t) for c, t in zip(counts, thresholds, strict=True)]
        assert presence_targets(label[None], 4, thresholds).tolist() == expect
    assert presence_targets(label, 4, 12).tolist() == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="0..2"):
        presence_targets(label, 2, 1)
    with pytest.raises(ValueError, match="min_voxels"):
        presence_targets(label, 4, [1, 2])


def _coded_volume(shape=(20, 18, 22)):
    """Image = voxel's linear index (locates a crop), label = 3 boxes; a body that excludes the first slabs."""
    n = int(np.prod(shape))
    image = torch.arange(n, dtype=torch.float32).reshape(1, *shape)
    label = torch.zeros(1, *shape, dtype=torch.int64)
    label[0, 2:9, 3:10, 4:12] = 1
    label[0, 10:18, 0:5, 0:22] = 2
    label[0, 15:20, 12:18, 15:22] = 3
    return {"image": image, "label": label}


def test_crops_are_pure_functions_of_seed_and_id_with_brute_force_targets():
    volume = _coded_volume()
    size, thresholds = 8, [40, 40, 40]
    ds = PresenceCropDataset([volume], size, num_classes=3, min_voxels=thresholds, seed=5, flip=False,
                             body_threshold=-1.0)
    flipped = PresenceCropDataset([volume], size, num_classes=3, min_voxels=thresholds, seed=5, flip=True,
                                  body_threshold=-1.0)
    shape = volume["image"].shape[1:]
    positives, flips = torch.zeros(3), 0
    for i in range(40):
        item = ds[i]
        start = np.unravel_index(int(item["image"][0, 0, 0, 0]), shape)
        window = tuple(slice(s, s + size) for s in start)
        assert torch.equal(item["image"][0], volume["image"][0][window])
        crop = volume["label"][0][window].numpy()
        assert item["target"].tolist() == [float((crop == c).sum() >= 40) for c in (1, 2, 3)]
        positives += item["target"]
        again, other = ds[i], flipped[i]
        assert torch.equal(again["image"], item["image"]) and torch.equal(other["target"], item["target"])
        variants = [torch.flip(item["image"], dims) for dims in ([], [1], [2], [3], [1, 2], [1, 3], [2, 3],
                                                                   [1, 2, 3])]
        assert any(torch.equal(other["image"], v) for v in variants)
        flips += not torch.equal(other["image"], item["image"])
    assert 0 < positives.min() and positives.max() < 40  # both target values occur for every class
    assert flips > 20
    other_seed = PresenceCropDataset([volume], size, num_classes=3, min_voxels=thresholds, seed=6, flip=False,
                                     body_threshold=-1.0)
    assert any(not torch.equal(other_seed[i]["image"], ds[i]["image"]) for i in range(5))
    # centres drawn in the body only: a body of the last 4 slabs puts every crop at the far end along axis 0
    body_only = {"image": (torch.arange(20) >= 16).float().view(1, 20, 1, 1).expand(1, 20, 18, 22).clone(),
                 "label": torch.zeros(1, 20, 18, 22, dtype=torch.int64)}
    body_ds = PresenceCropDataset([body_only], size, num_classes=3, min_voxels=1, seed=1, flip=False,
                                  body_threshold=0.5)
    for i in range(10):
        assert body_ds[i]["image"][0, -1].min() == 1.0  # the crop reaches into the body slabs
    assert prevalence(torch.tensor([[1.0, 0.0], [1.0, 1.0]])) == [1.0, 0.5]


def test_labelled_image_list_loads_windows_resizes_and_names_errors(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for name, value in (("a", -1000.0), ("b", 1000.0)):
        save_nifti(tmp_path / f"{name}.nii.gz", np.full((10, 12, 14), value, dtype=np.float32), affine)
    entries = [{"image": "a.nii.gz", "labels": [0, 1]}, {"image": "b.nii.gz", "labels": [1, 1]}]
    (tmp_path / "list.json").write_text(json.dumps(entries))
    out = load_labelled_image_list(tmp_path / "list.json", num_labels=2, img_size=8)
    assert out["image"].shape == (2, 1, 8, 8, 8) and out["target"].tolist() == [[0, 1], [1, 1]]
    assert torch.allclose(out["image"][0], torch.zeros(1, 8, 8, 8)) and torch.allclose(out["image"][1],
                                                                                       torch.ones(1, 8, 8, 8))
    ds = ImageTargetDataset(out["image"], out["target"], seed=0)
    assert sorted(int(ds[i]["target"][0]) for i in range(2)) == [0, 1]  # one pass = each image once
    assert torch.equal(ds[3]["image"], ImageTargetDataset(out["image"], out["target"], seed=0)[3]["image"])
    (tmp_path / "bad.json").write_text(json.dumps([*entries, {"image": "gone.nii.gz", "labels": [0, 0]},
                                                   {"image": "also_gone.nii.gz", "labels": [1, 0]}]))
    with pytest.raises(FileNotFoundError, match=r"gone.nii.gz.*also_gone.nii.gz"):
        load_labelled_image_list(tmp_path / "bad.json", num_labels=2, img_size=8)
    with pytest.raises(DataError, match=r"entry 0 \(a.nii.gz\) has 2 labels, expected 3"):
        load_labelled_image_list(tmp_path / "list.json", num_labels=3, img_size=8)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_labelled_image_list(tmp_path / "nope.json", num_labels=2, img_size=8)
    with pytest.raises(DataError, match="0 or 1"):
        load_labelled_image_list([{"image": str(tmp_path / "a.nii.gz"), "labels": [2, 0]}], num_labels=2, img_size=8)


# ------------------------------------------------------------------------------------------------ model
def test_pretrained_weights_are_copied_features_equal_mean_pooled_tokens_and_export_round_trips(tmp_path):
    torch.manual_seed(0)
    encoder = create_model("gmae_tiny", **TINY).encoder
    images = torch.rand(3, 1, 16, 16, 16)
    model = classifier_from_encoder(encoder, 4)
    assert model.lr_decay_prefix == "encoder."
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder.state_dict().items())
    model.eval()
    with torch.no_grad():
        tokens = encoder.forward_features(images, include_cls=False)
        assert torch.allclose(model.features(images), tokens.mean(dim=1), atol=1e-6)
        cls_model = classifier_from_encoder(encoder, 4, pooling="cls").eval()
        assert torch.allclose(cls_model.features(images), encoder.forward_features(images)[:, 0], atol=1e-6)
        logits = model(images)
        head = model.head(model.fc_norm(tokens.mean(dim=1)))
    assert logits.shape == (3, 4) and torch.allclose(logits, head, atol=1e-6)
    model.save_pretrained(tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded, ViTClassifier)
    with torch.no_grad():
        assert torch.equal(loaded(images), logits)
    with pytest.raises(ValueError, match="ViT3D"):
        classifier_from_encoder(torch.nn.Linear(2, 2), 3)
    with pytest.raises(ValueError, match="num_classes"):
        ViTClassifier(0, encoder=TINY)
    with pytest.raises(ValueError, match="pooling"):
        ViTClassifier(2, encoder=TINY, pooling="max")


def test_frozen_encoder_gets_no_gradient_and_does_not_change_while_the_head_trains():
    torch.manual_seed(1)
    model = classifier_from_encoder(ViT3D(**TINY, drop_path_rate=0.5), 3, freeze_encoder=True, head_dropout=0.1)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = model.head.weight.detach().clone()
    optimizer, scheduler = build_optimizer(model, max_steps=5, lr=1e-2, warmup_steps=0)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith("encoder."))
    model.train()
    assert not model.encoder.training and model.head_drop.training  # no drop path in a frozen encoder
    batch = {"image": torch.rand(2, 1, 16, 16, 16), "target": torch.tensor([[1.0, 0, 1], [0, 1, 0]])}
    for _ in range(3):
        loss, _ = ClassificationTask().compute_loss(model, batch, torch.device("cpu"))
        loss.backward()
        assert all(p.grad is None for p in model.encoder.parameters())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(head_before, model.head.weight)
    # layer-wise decay finds the encoder's blocks under lr_decay_prefix
    decayed, _ = build_optimizer(classifier_from_encoder(ViT3D(**TINY), 3), max_steps=5, layer_decay=0.5)
    assert sorted({g["lr_scale"] for g in decayed.param_groups}) == [0.125, 0.25, 0.5, 1.0]


# ------------------------------------------------------------------------------------------------ evaluation
def test_histogram_baseline_prior_and_linear_probe_against_independent_computations():
    torch.manual_seed(2)
    n_train, n_val = 40, 30
    images = torch.rand(n_train + n_val, 1, 16, 16, 16) * 0.5
    targets = (torch.rand(n_train + n_val, 2) < 0.5).float()
    images[targets[:, 0] == 1, :, :8] += 0.5  # class 0: a bright half, visible to every predictor
    hist = intensity_histograms(images[:3], bins=8)
    expect = np.stack([np.histogram(im.numpy().ravel(), bins=8, range=(0, 1))[0] / 4096 for im in images[:3]])
    assert np.allclose(hist.numpy(), expect)
    encoder = ViT3D(**TINY)
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    report = linear_probe(encoder, images[:n_train], targets[:n_train], images[n_train:], targets[n_train:],
                          C=0.5, class_names=["bright", "noise"])
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in state.items())
    assert report.metrics["prior"]["auc_bright"] == 0.5 and report.metrics["prior"]["auc_macro"] == 0.5
    # the stored coefficients reproduce the probe's held-out AUC from independently computed features
    with torch.no_grad():
        feats = encoder.eval().forward_features(images[n_train:], include_cls=False).mean(dim=1).double().numpy()
    probe = report.probe
    z = (feats - np.array(probe["feature_mean"])) / np.array(probe["feature_std"])
    scores = z @ np.array(probe["coef"]).T + np.array(probe["intercept"])
    for j, name in enumerate(["bright", "noise"]):
        assert report.metrics["model"][f"auc_{name}"] == pytest.approx(
            brute_auc(scores[:, j], targets[n_train:, j].numpy()), abs=1e-9)
    assert report.metrics["model"]["auc_bright"] > 0.9 and report.metrics["intensity_histogram"]["auc_bright"] > 0.9
    record = json.loads(json.dumps(report.as_dict()))
    assert set(record["metrics"]) == {"model", "prior", "intensity_histogram"}
    # the validator scores a model's logits; the same constant logits as the prior give the prior's AUC
    validator = ClassificationValidator(images[n_train:], targets[n_train:], train_images=images[:n_train],
                                        train_targets=targets[:n_train])

    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return self.w.expand(x.shape[0], -1)

    out = validator.evaluate(Constant(), final=True)
    assert out.metrics["model"]["auc_macro"] == 0.5 and out.headline == ("auc_macro", 0.5)
    assert out.metrics["intensity_histogram"]["auc_0"] > 0.9 and math.isfinite(out.metrics["model"]["auc_1"])
    with pytest.raises(ValueError, match="train_targets"):
        linear_probe(encoder, images[:4], targets[:3], images[4:8], targets[4:8])
    with pytest.raises(ValueError, match="encoder must be"):
        linear_probe(torch.nn.Linear(2, 2), images[:4], targets[:4], images[4:8], targets[4:8])


# ------------------------------------------------------------------------------------------------ recipe
def _compose(overrides=(), name="classification"):
    return compose_config(name, overrides)


def test_recipe_finetunes_resumes_exactly_and_probes_a_pretrained_run(tmp_path, monkeypatch):
    recipe = load_recipe("classification")
    common = [*SMALL, "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=0",
              "trainer.val_every=2"]
    straight = recipe.run(_compose([*common, f"trainer.run_dir={tmp_path / 'a'}"]))
    lines = [json.loads(x) for x in (tmp_path / "a" / "validation.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4]
    assert set(lines[-1]["metrics"]) == {"model", "prior", "intensity_histogram"}
    assert lines[-1]["metrics"]["prior"]["auc_macro"] == 0.5
    assert isinstance(load_pretrained(tmp_path / "a" / "model"), ViTClassifier)

    assert_resumes_exactly("classification", "ClassificationTask", "classification", common, straight,
                           tmp_path / "a", tmp_path / "b", monkeypatch)
    metrics = lambda run: [json.loads(x)["metrics"] for x in (tmp_path / run / "validation.jsonl").read_text()
                           .splitlines()]
    assert metrics("a") == metrics("b")

    # a fake pretraining run (config.yaml + model/) -> linear probe: one validation line + the coefficients
    torch.manual_seed(3)
    pretrained = create_model("gmae_tiny", **TINY)
    run = tmp_path / "pre"
    run.mkdir()
    ds = dict(pixdim=1.5, a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True, spatial_size=16)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"img_size": 16}, "data": {"dataset": ds}}))
    pretrained.save_pretrained(run / "model")
    fresh_accelerate()
    probe = recipe.run(_compose([*SMALL, "mode=linear_probe", f"pretrained.checkpoint={run}",
                                 f"trainer.run_dir={tmp_path / 'probe'}"]))
    lines = (tmp_path / "probe" / "validation.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 0
    record = json.loads(lines[0])
    assert record["metrics"]["model"]["auc_macro"] == probe.validation.headline[1]
    coefficients = json.loads((tmp_path / "probe" / "linear_probe.json").read_text())
    assert np.array(coefficients["coef"]).shape == (6, TINY["hidden_size"])
    assert not (tmp_path / "probe" / "checkpoints").exists()
    # a checkpoint of another architecture than the config asks for
    fresh_accelerate()
    with pytest.raises(ValueError, match="hidden_size"):
        recipe.run(_compose([*SMALL, "mode=linear_probe", f"pretrained.checkpoint={run}", "encoder.hidden_size=48",
                             f"trainer.run_dir={tmp_path / 'bad'}"]))
    fresh_accelerate()
    with pytest.raises(ValueError, match="mode must be"):
        recipe.run(_compose([*SMALL, "mode=train", f"trainer.run_dir={tmp_path / 'bad'}"]))


def test_paper_config_holds_the_ct_rate_setting():
    cfg = _compose(name="classification_paper")
    assert list(cfg.data.dataset.pixdim) == [3.0, 1.5, 1.5]  # (z, y, x): 1.5 x 1.5 in-plane, 3 mm slices
    assert list(cfg.encoder.img_size) == [96, 192, 192] and cfg.trainer.batch_size * 1 == 96
    assert (cfg.data.dataset.a_min, cfg.data.dataset.a_max) == (-1000, 1000)
    assert cfg.optim.lr == 3.0e-2 and cfg.optim.weight_decay == 0.05
