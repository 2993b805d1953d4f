"""The engine runs any task, not only masked pretraining: a tiny supervised regression (no images, no MAE) with
its own validator and panel hook trains through ``TrainingEngine``, resumes bit for bit, records its
validation, panels and sample ids; the task / validator contracts are checked at the door."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn

from medgauss.engines import (
    CheckpointManager,
    MaskedPretrainTask,
    TrainingEngine,
    TrainTask,
    Validator,
    as_task,
    build_optimizer,
)
from tests.engines.tiny_mae import TinyMAE, TinyMaskedLoss

FEATURES = 4
WEIGHTS = torch.tensor([0.5, -1.0, 2.0, 0.25])


def _sample(seed: int, sample_id: int) -> tuple[Tensor, Tensor]:
    """``x [FEATURES]`` ~ N(0, 1) and ``y [1] = WEIGHTS . x + 0.3``, a pure function of ``(seed, sample_id)``."""
    x = torch.randn(FEATURES, generator=torch.Generator().manual_seed(seed * 1_000_003 + sample_id))
    return x, (x @ WEIGHTS + 0.3).reshape(1)


class RegressionSamples(torch.utils.data.Dataset):
    """Map-style, addressed by global sample id, for every rank (no ``rank`` / ``world_size`` attributes)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __getitem__(self, sample_id: int) -> dict:
        x, y = _sample(self.seed, int(sample_id))
        return {"x": x, "y": y, "sample_id": int(sample_id)}


class RegressionTask:
    """Squared error of ``model(x)`` against ``y``; the panel hook records its calls instead of drawing."""

    loss_label = "regression MSE"
    loss_tag = "mse"

    def __init__(self, stop_after_calls: int | None = None) -> None:
        self.calls_left = stop_after_calls
        self.panels: list[tuple[int, Path, int]] = []

    def compute_loss(self, model: nn.Module, batch: dict, device: torch.device) -> tuple[Tensor, Tensor]:
        if self.calls_left is not None:
            self.calls_left -= 1
            if self.calls_left < 0:
                raise Interrupted
        pred = model(batch["x"].to(device))
        return ((pred - batch["y"].to(device)) ** 2).mean(), pred

    def panel(self, model: nn.Module, out: Tensor, batch: dict, path: Path, step: int) -> None:
        assert isinstance(model, MLP) and out.shape == batch["y"].shape  # unwrapped model, this batch's output
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"step {step}")
        self.panels.append((step, path, len(batch["sample_id"])))


class Interrupted(Exception):
    """Stands in for a job killed during a step."""


class MLP(nn.Module):
    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@dataclass
class RegressionReport:
    model_mse: float
    zero_mse: float
    final: bool

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        return {"model": {"mse": self.model_mse}, "zero": {"mse": self.zero_mse}}

    @property
    def headline(self) -> tuple[str, float]:
        return "mse_ratio", self.model_mse / self.zero_mse

    def summary(self) -> str:
        return f"held-out MSE {self.model_mse:.4f} (predicting 0: {self.zero_mse:.4f})"

    def as_dict(self) -> dict:
        return {"metrics": self.metrics, "final": self.final}


class RegressionValidator:
    """Held-out samples of another seed; MSE of the model and of the zero predictor."""

    def __init__(self, num: int = 32) -> None:
        pairs = [_sample(99, i) for i in range(num)]
        self.x, self.y = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        self.calls: list[bool] = []

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, final: bool) -> RegressionReport:
        self.calls.append(final)
        was_training = model.training
        model.eval()
        try:
            pred = model(self.x).float()
        finally:
            model.train(was_training)
        return RegressionReport(float(((pred - self.y) ** 2).mean()), float((self.y**2).mean()), final)


def _fit(run_dir, *, max_steps, resume=None, task=None, validator=None, dropout=0.1, **kw):
    kw = {"batch_size": 4, "log_every": 1, "panel_every": 0, "tensorboard": False, "progress": False,
          "checkpoint_every": 2, **kw}
    engine = TrainingEngine(run_dir=run_dir, max_steps=max_steps, resume=resume, cpu=True, **kw)
    model = MLP(dropout)  # built after the engine seeded the RNGs
    optimizer, scheduler = build_optimizer(model, max_steps=max_steps, lr=3e-2, warmup_steps=2, weight_decay=0.0)
    task = RegressionTask() if task is None else task
    return engine.fit(model, task, RegressionSamples(), optimizer, scheduler, validator=validator), model, task


def test_a_custom_task_trains_validates_and_draws_panels(tmp_path):
    validator = RegressionValidator()
    result, model, task = _fit(tmp_path / "run", max_steps=40, validator=validator, val_every=15, panel_every=15,
                               tensorboard=True, checkpoint_every=0, record_samples=True, batch_size=8)
    assert len(result.losses) == 40
    start, end = sum(result.losses[:5]) / 5, sum(result.losses[-10:]) / 10
    assert end < 0.25 * start  # it learns the linear map (dropout keeps the training loss noisy)
    assert result.summary.startswith("regression MSE: start")

    # Validation: every 15 steps and at the last, final only there; jsonl holds the validator's record.
    assert validator.calls == [False, False, True]
    lines = [json.loads(x) for x in (result.run_dir / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [15, 30, 40] and [r["final"] for r in lines] == [False, False, True]
    assert all(r["train_seconds"] > 0 for r in lines)
    assert lines[-1]["metrics"] == result.validation.metrics
    assert lines[-1]["metrics"]["model"]["mse"] < 0.2 * lines[-1]["metrics"]["zero"]["mse"]
    assert lines[0]["metrics"]["zero"] == lines[-1]["metrics"]["zero"]
    # An independent recomputation of the final held-out MSE with the trained weights.
    model.eval()
    with torch.no_grad():
        mse = float(((model(validator.x).double() - validator.y.double()) ** 2).mean())
    assert result.validation.model_mse == pytest.approx(mse, rel=1e-5)

    # Panels at step 1, every panel_every and at the last step, each with its step and path.
    assert [(s, p.name, n) for s, p, n in task.panels] == [
        (s, f"step_{s:08d}.png", 8) for s in (1, 15, 30, 40)
    ]
    assert all(p.parent == result.run_dir / "panels" and p.read_text() == f"step {s}" for s, p, _ in task.panels)

    # TensorBoard: the task's loss tag, the validator's metrics and headline.
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/mse", "train/lr", "val/model_mse", "val/zero_mse", "val/mse_ratio"} <= tags
    assert "train/masked_loss" not in tags
    assert [e.step for e in events.Scalars("val/mse_ratio")] == [15, 30, 40]

    # The sampler addressed a dataset without rank attributes: ids 0, 1, 2, ... in order, none skipped.
    ids = json.loads((result.run_dir / "sample_ids_00000001-00000040.json").read_text())
    assert ids == {"0": list(range(320))}


def test_the_first_step_loss_is_the_mean_over_micro_batches_of_the_initial_model(tmp_path):
    engine = TrainingEngine(run_dir=tmp_path, max_steps=1, batch_size=2, grad_accum_steps=2, cpu=True,
                            progress=False, tensorboard=False, panel_every=0)
    model = MLP(dropout=0.0)
    initial = copy.deepcopy(model).double()
    optimizer, scheduler = build_optimizer(model, max_steps=1, lr=1e-2)
    result = engine.fit(model, RegressionTask(), RegressionSamples(), optimizer, scheduler)
    data = [_sample(0, i) for i in range(4)]
    x, y = torch.stack([d[0] for d in data]).double(), torch.stack([d[1] for d in data]).double()
    with torch.no_grad():
        per_sample = ((initial(x) - y) ** 2).flatten()
    expected = 0.5 * (per_sample[:2].mean() + per_sample[2:].mean())
    assert result.losses[0] == pytest.approx(float(expected), rel=1e-5)


def test_a_custom_task_resumes_exactly(tmp_path):
    straight, model_a, _ = _fit(tmp_path / "a", max_steps=8, validator=RegressionValidator(), val_every=4)

    with pytest.raises(Interrupted):  # killed during step 6, after the step-4 checkpoint
        _fit(tmp_path / "b", max_steps=8, task=RegressionTask(stop_after_calls=5), validator=RegressionValidator(),
             val_every=4)
    assert CheckpointManager(tmp_path / "b").latest().name == "step_00000004"
    resumed, model_b, _ = _fit(tmp_path / "b", max_steps=8, resume="latest", validator=RegressionValidator(),
                               val_every=4, record_samples=True)

    assert resumed.resumed_from.name == "step_00000004"
    assert resumed.losses == straight.losses  # bitwise: same data, same dropout RNG, same optimizer state
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.validation.metrics == straight.validation.metrics
    # The resumed call continued the data stream where the checkpoint left it (4 steps x 4 samples).
    ids = json.loads((resumed.run_dir / "sample_ids_00000005-00000008.json").read_text())
    assert ids == {"0": list(range(16, 32))}
    steps = [json.loads(x)["step"] for x in (resumed.run_dir / "validation.jsonl").read_text().splitlines()]
    assert steps == [4, 8]  # step 4 before the crash, step 8 after the resume


def test_masked_pretraining_keeps_its_names(tmp_path, tiny_dataset):
    """A bare loss module still means masked pretraining: label, TensorBoard tag and panels as before."""
    engine = TrainingEngine(run_dir=tmp_path, max_steps=2, batch_size=2, cpu=True, progress=False,
                            panel_every=1, log_every=1)
    model = TinyMAE()
    optimizer, scheduler = build_optimizer(model, max_steps=2, lr=1e-3)
    result = engine.fit(model, TinyMaskedLoss(model), tiny_dataset, optimizer, scheduler)
    assert result.summary.startswith("masked-region loss: start")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/masked_loss", "train/lr", "train/step_time_s", "train/grad_norm"} <= set(events.Tags()["scalars"])
    assert sorted(p.name for p in (tmp_path / "panels").glob("*.png")) == ["step_00000001.png", "step_00000002.png"]


def test_tasks_and_validators_are_checked_at_the_door(tmp_path):
    loss = nn.MSELoss()
    wrapped = as_task(loss)
    assert isinstance(wrapped, MaskedPretrainTask) and wrapped.loss_fn is loss
    task = RegressionTask()
    assert as_task(task) is task and isinstance(task, TrainTask)
    assert isinstance(RegressionValidator(), Validator)
    with pytest.raises(ValueError, match="task must be a TrainTask"):
        as_task(lambda out, images: 0.0)

    class VectorLoss(RegressionTask):
        def compute_loss(self, model, batch, device):
            pred = model(batch["x"].to(device))
            return (pred - batch["y"].to(device)) ** 2, pred  # forgot the mean

    with pytest.raises(ValueError, match="scalar loss tensor"):
        _fit(tmp_path / "vector", max_steps=1, task=VectorLoss())

    class NanLoss(RegressionTask):
        def compute_loss(self, model, batch, device):
            loss, out = super().compute_loss(model, batch, device)
            return loss * math.nan, out

    with pytest.raises(FloatingPointError, match="non-finite loss"):
        _fit(tmp_path / "nan", max_steps=1, task=NanLoss())


def test_record_samples_needs_sample_ids(tmp_path):
    class NoIds(RegressionSamples):
        def __getitem__(self, sample_id):
            item = super().__getitem__(sample_id)
            return {"x": item["x"], "y": item["y"]}

    engine = TrainingEngine(run_dir=tmp_path, max_steps=1, batch_size=2, cpu=True, progress=False,
                            tensorboard=False, record_samples=True)
    model = MLP()
    optimizer, scheduler = build_optimizer(model, max_steps=1)
    with pytest.raises(ValueError, match="'sample_id' entry"):
        engine.fit(model, RegressionTask(), NoIds(), optimizer, scheduler)


def test_extra_scalars_of_a_task_are_averaged_over_micro_batches_and_logged_at_log_steps(tmp_path):
    """A task's third return value: the engine writes ``train/<name>`` at its log steps (1, every
    ``log_every``-th, the last) with the mean over the step's micro-batches, and appends it to the log line."""

    class WithParts(RegressionTask):
        def compute_loss(self, model, batch, device):
            loss, out = super().compute_loss(model, batch, device)
            first = int(batch["sample_id"][0])  # micro-batches of 2: ids 0-1, 2-3 in step 1, 4-5, 6-7 in step 2, ...
            return loss, out, {"first_id": float(first), "constant": 0.5}

    lines: list[str] = []
    engine = TrainingEngine(run_dir=tmp_path, max_steps=5, batch_size=2, grad_accum_steps=2, cpu=True,
                            progress=False, log_every=2, panel_every=0, checkpoint_every=0)
    engine.print = lines.append
    model = MLP(dropout=0.0)
    optimizer, scheduler = build_optimizer(model, max_steps=5, lr=1e-2)
    engine.fit(model, WithParts(), RegressionSamples(), optimizer, scheduler)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    # step s holds ids 4(s-1) .. 4s-1 in micro-batches starting at 4(s-1) and 4(s-1)+2: mean first id 4s-3
    assert [(e.step, e.value) for e in events.Scalars("train/first_id")] == [(1, 1.0), (2, 5.0), (4, 13.0), (5, 17.0)]
    assert [e.value for e in events.Scalars("train/constant")] == [0.5] * 4
    logged = [line for line in lines if line.startswith("step ")]
    assert len(logged) == 4 and logged[1].endswith("| first_id 5.00000 | constant 0.50000")

    class FourValues(RegressionTask):
        def compute_loss(self, model, batch, device):
            loss, out = super().compute_loss(model, batch, device)
            return loss, out, {}, None

    with pytest.raises(ValueError, match=r"\(scalar loss tensor, out\[, scalars\]\)"):
        _fit(tmp_path / "four", max_steps=1, task=FourValues())
