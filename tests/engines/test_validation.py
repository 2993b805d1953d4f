"""Held-out validation: the verdict separates a model that predicts hidden voxels from one that does not,
is deterministic, draws no global random numbers, and the engine logs it without changing training."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn

from medgauss.data import heldout_crops
from medgauss.engines import MaskedReconstructionValidator, TrainingEngine, build_optimizer
from medgauss.nets.masking import random_masking
from medgauss.nets.patches import mask_to_volume, patchify
from tests.engines.tiny_mae import TinyMAE, TinyMaskedLoss


@dataclass
class _Out:
    mask: Tensor


class _Encoder(nn.Module):
    def __init__(self, grid: int) -> None:
        super().__init__()
        self.num_patches = grid**3


class FixedMAE(nn.Module):
    """Contract-following stand-in: ``mode="oracle"`` predicts the hidden voxels exactly (it peeks at the
    target), ``"constant"`` predicts 0.5 everywhere."""

    def __init__(self, mode: str, size: int = 16, patch: int = 4) -> None:
        super().__init__()
        self.mode, self.patch, self.grid = mode, (patch,) * 3, (size // patch,) * 3
        self.encoder = _Encoder(size // patch)
        self.weight = nn.Parameter(torch.zeros(()))
        self._images: Tensor | None = None

    def forward(self, images: Tensor, noise: Tensor | None = None) -> _Out:
        self._images = images
        return _Out(random_masking(patchify(images, self.patch), 0.75, noise).mask)

    def reconstruct(self, out: _Out, shape) -> Tensor:
        return self._images.clone() if self.mode == "oracle" else torch.full(tuple(shape), 0.5)

    def mask_to_volume(self, mask: Tensor) -> Tensor:
        return mask_to_volume(mask, self.grid, self.patch)


@pytest.fixture(scope="module")
def crops(phantom_datalist):
    return heldout_crops(phantom_datalist, num_crops=4, seed=7, spatial_size=16, pixdim=4.0)["image"]


def test_heldout_crops_are_fixed_by_seed_and_unaugmented(phantom_datalist, crops):
    again = heldout_crops(phantom_datalist, num_crops=4, seed=7, spatial_size=16, pixdim=4.0)
    assert crops.shape == (4, 1, 16, 16, 16) and torch.equal(crops, again["image"])
    other = heldout_crops(phantom_datalist, num_crops=4, seed=8, spatial_size=16, pixdim=4.0)["image"]
    assert not torch.equal(crops, other)
    with pytest.raises(ValueError, match="num_crops"):
        heldout_crops(phantom_datalist, num_crops=0, spatial_size=16, pixdim=4.0)


def test_verdict_separates_an_oracle_from_a_constant(crops):
    validator = MaskedReconstructionValidator(crops, fill_box=5)
    oracle = validator.evaluate(FixedMAE("oracle"))
    constant = validator.evaluate(FixedMAE("constant"))
    assert oracle.beats_fill and math.isinf(oracle.metrics["model"]["psnr"])
    assert oracle.metrics["model"]["ssim"] == pytest.approx(1.0)
    assert not constant.beats_fill and "does NOT beat" in constant.summary()
    # the baselines are the same for both models (same crops, same masks)
    assert oracle.metrics["fill"] == constant.metrics["fill"]
    # an independent recomputation of the constant model's masked MSE
    hidden = FixedMAE("constant").mask_to_volume(
        random_masking(patchify(crops, (4, 4, 4)), 0.75, validator.noise(64)).mask)
    mse = ((crops - 0.5) ** 2 * hidden).flatten(1).sum(1) / hidden.flatten(1).sum(1)
    assert constant.metrics["model"]["mse"] == pytest.approx(float(mse.double().mean()), rel=1e-6)
    assert validator.evaluate(FixedMAE("oracle"), with_ssim=False).as_dict()["metrics"]["model"]["ssim"] is None
    # the engine's protocol: final=False skips the SSIM unless asked for; the headline is the margin
    assert math.isnan(validator.evaluate(FixedMAE("oracle"), final=False).metrics["model"]["ssim"])
    asked = validator.evaluate(FixedMAE("oracle"), final=False, with_ssim=True)
    assert asked.metrics["model"]["ssim"] == pytest.approx(1.0)
    assert constant.headline == ("margin_over_fill_db", constant.margin_db)


def test_evaluation_is_deterministic_and_leaves_the_global_rng_alone(crops):
    validator = MaskedReconstructionValidator(crops, fill_box=5)
    model = FixedMAE("constant")
    state = torch.get_rng_state()
    first = validator.evaluate(model)
    assert torch.equal(torch.get_rng_state(), state)
    assert validator.evaluate(model).metrics == first.metrics
    with pytest.raises(ValueError, match="held-out crops"):
        MaskedReconstructionValidator(crops[:0])
    bad = crops.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        MaskedReconstructionValidator(bad)


class _TinyWithNoise(TinyMAE):
    """The engine tests' TinyMAE with the validator's contract (noise argument, encoder.num_patches)."""

    def __init__(self, **kw):
        super().__init__(dropout=0.0, **kw)
        self.encoder = _Encoder(self.grid)

    def forward(self, images: Tensor, noise: Tensor | None = None):
        if noise is None:
            return super().forward(images)
        state = torch.get_rng_state()
        torch.manual_seed(int(noise.sum() * 1e6) % (2**31))  # deterministic mask from the given noise
        try:
            return super().forward(images)
        finally:
            torch.set_rng_state(state)


def _fit(run_dir, dataset, validator, max_steps=6, **kw):
    engine = TrainingEngine(run_dir=run_dir, max_steps=max_steps, cpu=True, batch_size=2, log_every=1,
                            panel_every=0, progress=False, checkpoint_every=3, **kw)
    torch.manual_seed(0)
    model = _TinyWithNoise()
    optimizer, scheduler = build_optimizer(model, max_steps=max_steps, lr=3e-3, warmup_steps=2)
    return engine.fit(model, TinyMaskedLoss(model), dataset, optimizer, scheduler, validator=validator)


def test_engine_validates_every_n_steps_without_changing_training(tmp_path, tiny_dataset, crops):
    validator = MaskedReconstructionValidator(crops, fill_box=5)
    plain = _fit(tmp_path / "plain", tiny_dataset, None)
    checked = _fit(tmp_path / "val", tiny_dataset, validator, val_every=2, tensorboard=True)
    assert checked.losses == plain.losses  # validation consumed no training randomness
    lines = [json.loads(x) for x in (checked.run_dir / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6]
    assert all(r["train_seconds"] > 0 for r in lines) and lines[0]["train_seconds"] < lines[-1]["train_seconds"]
    assert lines[0]["metrics"]["model"]["ssim"] is None and lines[-1]["metrics"]["model"]["ssim"] is not None
    assert checked.validation is not None and checked.validation.metrics["model"]["psnr"] == pytest.approx(
        lines[-1]["metrics"]["model"]["psnr"])
    events = EventAccumulator(str(checked.run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/masked_loss", "val/margin_over_fill_db"} <= tags
    assert {f"val/{p}_{m}" for p in ("model", "constant", "fill") for m in ("mse", "psnr", "ssim")} <= tags
    assert [e.step for e in events.Scalars("val/margin_over_fill_db")] == [2, 4, 6]
    assert [e.step for e in events.Scalars("val/model_ssim")] == [6]  # SSIM at the last step only
    assert events.Scalars("val/margin_over_fill_db")[-1].value == pytest.approx(lines[-1]["margin_db"])
    with pytest.raises(ValueError, match="val_every"):
        TrainingEngine(run_dir=tmp_path / "bad", max_steps=2, cpu=True, val_every=-1)
