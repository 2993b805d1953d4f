"""X-GRM in the engine: sample ids -> (case, K views, sub-box, held-out views) deterministically; the task's loss
equals the per-sample loss assembled by hand; its loss parts are logged at the engine's log steps; the validator's
FDK / SART / model rows equal independent computations; the engine batches with a task's ``collate_fn``; and a
tiny model overfits one case far above FDK at 6 views."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.signal import correlate2d
from torch import nn

from medgauss.ct import fdk, load_case, sart
from medgauss.ct.dataset import evenly_spaced_views
from medgauss.data import XGRMSampleDataset, build_xgrm_dataset, collate_xgrm_samples
from medgauss.engines import (
    ReconstructionValidator,
    TrainingEngine,
    XGRMTask,
    build_optimizer,
)
from medgauss.engines.reconstruction import LOSS_PARTS
from medgauss.losses import XGRMLoss
from medgauss.nets import create_model

TINY = {"fov_mm": 72.0, "grid": 16, "num_views": 16, "det_size": 32}
PHANTOM = {"phantom_shape": (40, 36, 44), "phantom_spacing_mm": 4.0}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Two CT variants + two phantoms for training, the held-out CT + one phantom: 16^3, 16 views of 32^2."""
    return build_xgrm_dataset(tmp_path_factory.mktemp("xgrm") / "ds", num_ct_variants=2, num_phantoms=2,
                              heldout_phantoms=1, seed=3, prepare=TINY, **PHANTOM)


def tiny_model(**kw) -> nn.Module:
    torch.manual_seed(0)
    return create_model("xgrm_tiny", img_size=32, **kw)


def psnr_by_hand(pred: torch.Tensor, target: torch.Tensor) -> float:
    mse = np.mean((pred.double().numpy() - target.double().numpy()) ** 2)
    return float(10 * np.log10(1.0 / mse))


def slice_ssim_by_hand(pred: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean over axial slices of the mean SSIM map (Gaussian window, valid region, data range 1), float64."""
    x = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-x**2 / (2 * sigma**2))
    kernel = np.outer(g / g.sum(), g / g.sum())
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for a, b in zip(pred.double().numpy()[0, 0], target.double().numpy()[0, 0]):
        f = lambda im: correlate2d(im, kernel, mode="valid")
        ma, mb = f(a), f(b)
        saa, sbb, sab = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
        ssim = ((2 * ma * mb + c1) * (2 * sab + c2)) / ((ma**2 + mb**2 + c1) * (saa + sbb + c2))
        values.append(ssim.mean())
    return float(np.mean(values))


# ------------------------------------------------------------------------------------------- samples


def test_a_sample_is_a_function_of_the_seed_and_the_sample_id(cases):
    ds = XGRMSampleDataset(cases.train_dir, batch_size=3, seed=7, rank=0, world_size=1)
    again = XGRMSampleDataset(cases.train_dir, batch_size=3, seed=7, rank=0, world_size=1)
    assert ds.box_size == (4, 4, 4) and ds.grid_shape == (16, 16, 16) and ds.num_views == 16
    for sample_id in (0, 5, 11):
        a, b = ds[sample_id], again[sample_id]
        for key in ("volume", "projections", "input_views", "heldout_views", "box_start"):
            assert torch.equal(a[key], b[key]), key
        assert a["case_id"] == b["case_id"]
    assert torch.equal(ds[5]["input_views"], ds[5]["input_views"])  # reading other ids in between changes nothing
    draws = [ds.draw(i) for i in range(30)]
    other_seed = [XGRMSampleDataset(cases.train_dir, batch_size=3, seed=8, rank=0, world_size=1).draw(i)
                  for i in range(30)]
    assert [d["box_start"] for d in draws] != [d["box_start"] for d in other_seed]
    assert len({tuple(d["box_start"]) for d in draws}) > 10 and len({d["view_offset"] for d in draws}) > 5

    for i, d in enumerate(draws):
        k, inputs = len(d["input_views"]), d["input_views"]
        assert k == ds.num_input_views(i) and k in (6, 8, 10)
        # K evenly spaced views rotated by the offset
        assert sorted((v - d["view_offset"]) % 16 for v in inputs) == evenly_spaced_views(16, k)
        assert inputs == sorted(inputs)
        assert len(d["heldout_views"]) == 4 and not set(d["heldout_views"]) & set(inputs)
        assert all(0 <= s <= 12 for s in d["box_start"])
    ks = [len(d["input_views"]) for d in draws]
    assert all(len(set(ks[j: j + 3])) == 1 for j in range(0, 30, 3))  # constant within each batch of 3
    assert set(ks) == {6, 8, 10}
    cases_drawn = [d["case_index"] for d in draws]
    assert all(sorted(cases_drawn[j: j + 4]) == [0, 1, 2, 3] for j in range(0, 28, 4))  # every case once per epoch

    item = ds[4]
    case = load_case(cases.train_dir / item["case_id"])
    assert torch.equal(item["projections"], torch.from_numpy(np.array(case["projections"][draws[4]["input_views"]])))
    assert torch.equal(item["volume"][0], torch.from_numpy(np.array(case["volume"])))
    assert item["geometry"].num_views == 16 and tuple(item["box_size"].tolist()) == (4, 4, 4)


def test_k_is_shared_by_the_ranks_of_a_step_and_ids_of_other_ranks_are_refused(cases):
    ranks = [XGRMSampleDataset(cases.train_dir, batch_size=2, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for step in range(6):  # rank r's micro-batch j holds ids r + 2 (2 j + i), i = 0, 1
        ks = {ranks[r].num_input_views(r + 2 * (2 * step + i)) for r in (0, 1) for i in (0, 1)}
        assert len(ks) == 1
    with pytest.raises(ValueError, match="belongs to rank 0 of 2"):
        ranks[1][4]
    assert ranks[1][5]["sample_id"] == 5
    with pytest.raises(ValueError, match="view_counts"):
        XGRMSampleDataset(cases.train_dir, batch_size=2, view_counts=(14,), rank=0, world_size=1)
    with pytest.raises(ValueError, match="box_fraction"):
        XGRMSampleDataset(cases.train_dir, batch_size=2, box_fraction=0.0, rank=0, world_size=1)


def test_collate_stacks_one_k_and_refuses_mixed_k(cases):
    ds = XGRMSampleDataset(cases.train_dir, batch_size=3, seed=7, rank=0, world_size=1)
    batch = collate_xgrm_samples([ds[i] for i in range(3)])
    k = len(ds.draw(0)["input_views"])
    assert batch["projections"].shape == (3, k, 32, 32) and batch["volume"].shape == (3, 1, 16, 16, 16)
    assert batch["input_views"].shape == (3, k) and batch["heldout_views"].shape == (3, 4)
    assert batch["box_start"].shape == (3, 3) and batch["box_size"] == (4, 4, 4)
    assert batch["sample_id"].tolist() == [0, 1, 2] and len(batch["geometry"]) == 3
    mixed = next(j for j in range(3, 60, 3) if ds.num_input_views(j) != k)
    with pytest.raises(ValueError, match="K must be constant"):
        collate_xgrm_samples([ds[0], ds[mixed]])


# ------------------------------------------------------------------------------------------- the task


def test_task_loss_is_the_mean_of_the_per_sample_losses_assembled_by_hand(cases):
    ds = XGRMSampleDataset(cases.train_dir, batch_size=3, seed=2, rank=0, world_size=1)
    items = [ds[i] for i in range(3)]
    batch = collate_xgrm_samples(items)
    model = tiny_model()
    task = XGRMTask(XGRMLoss())
    loss, out, parts = task.compute_loss(model, batch, torch.device("cpu"))
    assert out.volume.shape == (3, 1, 4, 4, 4) and torch.equal(out.box_start, batch["box_start"])

    loss_fn, totals, volume_mse = XGRMLoss(), [], []
    with torch.no_grad():
        for item in items:
            geometry = item["geometry"].subset(item["input_views"].tolist())
            own = model.reconstruct(item["projections"][None], geometry, box_start=item["box_start"],
                                    box_size=(4, 4, 4))
            total, own_parts = loss_fn(own, item["volume"][None], item["geometry"], item["input_views"],
                                       heldout_views=item["heldout_views"])
            totals.append(float(total))
            volume_mse.append(float(own_parts["volume_mse"]))
    assert float(loss.detach()) == pytest.approx(sum(totals) / 3, rel=1e-5)
    assert list(parts) == [name for name in LOSS_PARTS if name in parts] and "render_l1" in parts
    assert parts["volume_mse"] == pytest.approx(sum(volume_mse) / 3, rel=1e-5)


def test_panel_writes_a_png_and_draws_no_random_numbers(cases, tmp_path):
    ds = XGRMSampleDataset(cases.train_dir, batch_size=2, seed=2, rank=0, world_size=1)
    batch = collate_xgrm_samples([ds[0], ds[1]])
    model, task = tiny_model(), XGRMTask(XGRMLoss(lambda_l1=0.0, lambda_ssim=0.0))
    _, out, _ = task.compute_loss(model, batch, torch.device("cpu"))
    state = torch.get_rng_state()
    task.panel(model, out, batch, tmp_path / "panels" / "step_00000001.png", 1)
    assert torch.equal(state, torch.get_rng_state()) and model.training
    assert (tmp_path / "panels" / "step_00000001.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------- validation


def test_validator_rows_equal_independent_fdk_sart_and_model_reconstructions(cases):
    validator = ReconstructionValidator(cases.heldout_dir, view_counts=(6, 10), sart_iterations=2)
    model = tiny_model()
    state = torch.get_rng_state()
    report = validator.evaluate(model, final=False)
    assert torch.equal(state, torch.get_rng_state()) and model.training
    assert validator.case_ids == ["heldout_ct_000", "heldout_phantom_000"]
    expected = {"model": {}, "fdk": {}, "sart": {}}
    model.eval()
    for k in (6, 10):
        rows = {m: [] for m in expected}
        for case_id in validator.case_ids:
            case = load_case(cases.heldout_dir / case_id)
            ids = evenly_spaced_views(16, k)
            geometry = case["geometry"].subset(ids)
            projections = torch.from_numpy(np.asarray(case["projections"])[ids].copy())[None]
            truth = torch.from_numpy(np.asarray(case["volume"]).copy())[None, None]
            with torch.no_grad():
                recons = {"model": model.reconstruct(projections, geometry).volume, "fdk": fdk(projections, geometry),
                          "sart": sart(projections, geometry, iterations=2, progress=False)}
            for method, volume in recons.items():
                rows[method].append((psnr_by_hand(volume, truth), slice_ssim_by_hand(volume, truth)))
        for method, values in rows.items():
            expected[method][k] = (np.mean([v[0] for v in values]), np.mean([v[1] for v in values]))
    for method in expected:
        for k in (6, 10):
            assert report.table[method][k]["psnr"] == pytest.approx(expected[method][k][0], abs=1e-6), (method, k)
            assert report.table[method][k]["ssim"] == pytest.approx(expected[method][k][1], abs=1e-6), (method, k)
    margin = np.mean([expected["model"][k][0] - expected["fdk"][k][0] for k in (6, 10)])
    assert report.headline == ("psnr_over_fdk_db", pytest.approx(margin, abs=1e-6))
    assert report.metrics["fdk_6v"]["psnr"] == report.table["fdk"][6]["psnr"]
    assert ("model beats FDK" if margin > 0 else "model does NOT beat FDK") in report.summary()
    record = report.as_dict()
    assert record["table"]["sart"]["10"] == report.table["sart"][10] and record["num_cases"] == 2
    with pytest.raises(ValueError, match="num_views=20 exceeds"):
        ReconstructionValidator(cases.heldout_dir, view_counts=(20,))


# ------------------------------------------------------------------------------------------- the engine hook


class Tagged:
    """An item payload the default collate cannot batch."""

    def __init__(self, value: float) -> None:
        self.value = Fraction(value).limit_denominator(100)


class TaggedSamples(torch.utils.data.Dataset):
    def __getitem__(self, sample_id: int) -> dict:
        return {"x": torch.full((2,), float(sample_id % 7)), "tag": Tagged(sample_id % 3), "sample_id": int(sample_id)}


class CollatingTask:
    loss_label = "tagged MSE"

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    @staticmethod
    def collate_fn(items):
        return {"x": torch.stack([i["x"] for i in items]), "tags": [i["tag"] for i in items],
                "sample_id": [i["sample_id"] for i in items]}

    def compute_loss(self, model, batch, device):
        self.batches.append(list(batch["sample_id"]))
        target = torch.tensor([[float(t.value)] for t in batch["tags"]])
        pred = model(batch["x"].to(device))
        return ((pred - target) ** 2).mean(), pred


def test_the_engine_batches_with_the_task_collate_fn(tmp_path):
    with pytest.raises(TypeError):  # the default collate cannot batch these items
        torch.utils.data.default_collate([TaggedSamples()[0], TaggedSamples()[1]])
    engine = TrainingEngine(run_dir=tmp_path, max_steps=3, batch_size=2, cpu=True, progress=False, tensorboard=False,
                            panel_every=0, checkpoint_every=0)
    model, task = nn.Linear(2, 1), CollatingTask()
    optimizer, scheduler = build_optimizer(model, max_steps=3)
    result = engine.fit(model, task, TaggedSamples(), optimizer, scheduler)
    assert task.batches == [[0, 1], [2, 3], [4, 5]] and len(result.losses) == 3
    assert all(math.isfinite(v) for v in result.losses)


# ------------------------------------------------------------------------------------------- overfitting


def test_a_tiny_model_overfits_one_case_far_above_fdk_at_6_views(cases):
    """The issue's overfitting test through the task and the validator: 250 full-grid steps on one case's 6 evenly
    spaced views (about 10 s on one thread)."""
    case_id = "train_phantom_000"
    ds = XGRMSampleDataset(cases.train_dir, batch_size=1, view_counts=(6,), box_fraction=1.0, render_views=0,
                           cases=[case_id], rank=0, world_size=1)
    item = ds[0]
    ids = evenly_spaced_views(16, 6)
    item["input_views"] = torch.tensor(ids)
    item["projections"] = torch.from_numpy(np.asarray(load_case(cases.train_dir / case_id)["projections"])[ids].copy())
    batch = collate_xgrm_samples([item])
    model = tiny_model()
    task = XGRMTask(XGRMLoss(lambda_l1=0.0, lambda_ssim=0.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(250):
        loss, *_ = task.compute_loss(model, batch, torch.device("cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    report = ReconstructionValidator(cases.train_dir, view_counts=(6,), cases=[case_id]).evaluate(model)
    model_psnr, fdk_psnr = report.table["model"][6]["psnr"], report.table["fdk"][6]["psnr"]
    assert model_psnr > fdk_psnr + 10.0, report.summary()
    assert report.table["model"][6]["ssim"] > report.table["fdk"][6]["ssim"] + 0.2, report.summary()
