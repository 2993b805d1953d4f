"""TrainingEngine mechanics with a tiny contract-following model: exact resume, crash-safe checkpoints,
gradient accumulation, outputs (panels, TensorBoard, export), run-dir and argument checks, and the run's
configuration record across resumes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from accelerate import Accelerator

from medgauss.engines import TRAINER_STATE_FILE, CheckpointManager, TrainingEngine, build_optimizer
from medgauss.engines.training import config_changes
from tests.engines.tiny_mae import TinyMAE, TinyMaskedLoss


class Interrupted(Exception):
    """Stands in for a job killed between steps."""


class StopAfter(torch.nn.Module):
    """Loss wrapper raising :class:`Interrupted` at its ``calls``-th call (simulated preemption)."""

    def __init__(self, loss: torch.nn.Module, calls: int) -> None:
        super().__init__()
        self.loss, self.calls = loss, calls

    def forward(self, out, images):
        self.calls -= 1
        if self.calls < 0:
            raise Interrupted
        return self.loss(out, images)


def _train(run_dir, dataset, *, max_steps, resume=None, stop_after_calls=None, dropout=0.1, **engine_kw):
    engine_kw = {
        "batch_size": 2,
        "log_every": 1,
        "panel_every": 0,
        "tensorboard": False,
        "progress": False,
        "checkpoint_every": 2,
        **engine_kw,
    }
    engine = TrainingEngine(run_dir=run_dir, max_steps=max_steps, resume=resume, cpu=True, **engine_kw)
    model = TinyMAE(dropout=dropout)
    loss = TinyMaskedLoss(model)
    if stop_after_calls is not None:
        loss = StopAfter(loss, stop_after_calls)
    optimizer, scheduler = build_optimizer(model, max_steps=max_steps, lr=3e-3, warmup_steps=2)
    return engine.fit(model, loss, dataset, optimizer, scheduler), model


def test_resume_reproduces_the_uninterrupted_loss_sequence_exactly(tmp_path, tiny_dataset):
    straight, model_a = _train(tmp_path / "a", tiny_dataset, max_steps=6)
    assert len(straight.losses) == 6

    with pytest.raises(Interrupted):  # killed during step 5, after the step-4 checkpoint
        _train(tmp_path / "b", tiny_dataset, max_steps=6, stop_after_calls=4)
    assert CheckpointManager(tmp_path / "b").latest().name == "step_00000004"
    resumed, model_b = _train(tmp_path / "b", tiny_dataset, max_steps=6, resume="latest")

    assert resumed.resumed_from.name == "step_00000004"
    assert resumed.losses == straight.losses  # bitwise: same data, same masking RNG, same optimizer state
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name


def test_crash_during_save_never_becomes_latest(tmp_path, tiny_dataset, monkeypatch):
    original = Accelerator.save_state
    calls = {"n": 0}

    def flaky_save_state(self, output_dir=None, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # second checkpoint (step 4): write part of it, then die
            original(self, output_dir, **kw)
            (tmp_path / "marker").write_text(output_dir)
            raise OSError("disk full (simulated)")
        return original(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", flaky_save_state)
    with pytest.raises(OSError, match="simulated"):
        _train(tmp_path / "run", tiny_dataset, max_steps=6)
    manager = CheckpointManager(tmp_path / "run")
    assert manager.latest().name == "step_00000002"
    assert [p.name for p in manager.complete_checkpoints()] == ["step_00000002"]
    assert not (manager.root / "step_00000004").exists()
    half_written = manager.root / ".tmp-step_00000004"
    assert half_written.is_dir() and not (half_written / TRAINER_STATE_FILE).exists()

    monkeypatch.setattr(Accelerator, "save_state", original)
    result, _ = _train(tmp_path / "run", tiny_dataset, max_steps=6, resume="latest")
    assert result.resumed_from.name == "step_00000002" and len(result.losses) == 6
    assert not half_written.exists()  # stale temp dir cleaned by the next save
    assert manager.latest().name == "step_00000006"
    assert [p.name for p in manager.complete_checkpoints()] == ["step_00000004", "step_00000006"]  # keep 2


def test_gradient_accumulation_matches_the_large_batch_step(tmp_path, tiny_dataset):
    torch.manual_seed(0)
    big, model_big = _train(tmp_path / "big", tiny_dataset, max_steps=1, batch_size=4, dropout=0.0)
    small, model_small = _train(
        tmp_path / "acc", tiny_dataset, max_steps=1, batch_size=2, grad_accum_steps=2, dropout=0.0
    )
    # Same 4 samples, same masks (mask noise is drawn sample by sample in the same order), equal-size
    # hidden sets per sample: the mean of the micro-batch losses and the averaged gradient equal the big
    # batch's up to float rounding.
    assert small.losses[0] == pytest.approx(big.losses[0], rel=1e-6)
    for a, b in zip(model_big.parameters(), model_small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_run_directory_outputs(tmp_path, tiny_dataset):
    result, _ = _train(
        tmp_path / "run",
        tiny_dataset,
        max_steps=3,
        panel_every=2,
        tensorboard=True,
        checkpoint_every=1,
        keep_checkpoints=1,
    )
    run = tmp_path / "run"
    assert result.run_dir == run.resolve()
    assert sorted(p.name for p in (run / "panels").glob("*.png")) == [
        "step_00000001.png",
        "step_00000002.png",
        "step_00000003.png",
    ]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((run / "model" / "config.json").read_text())["img_size"] == 16
    ckpts = CheckpointManager(run).complete_checkpoints()
    assert [p.name for p in ckpts] == ["step_00000003"]
    state = json.loads((ckpts[0] / TRAINER_STATE_FILE).read_text())
    assert state["step"] == 3 and state["samples_per_rank"] == 6 and state["losses"] == result.losses
    assert "masked-region loss: start" in result.summary


def test_resume_errors_are_explicit(tmp_path, tiny_dataset):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        _train(tmp_path / "empty", tiny_dataset, max_steps=1, resume="latest")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        _train(tmp_path / "x", tiny_dataset, max_steps=1, resume=str(tmp_path / "nowhere"))
    result, _ = _train(tmp_path / "auto", tiny_dataset, max_steps=1, resume="auto")  # nothing yet: fresh
    assert result.resumed_from is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_steps": 0}, "max_steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"grad_accum_steps": 0}, "grad_accum_steps"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"grad_clip": -1.0}, "grad_clip"),
    ],
)
def test_engine_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainingEngine(**{"run_dir": tmp_path, "max_steps": 1, "cpu": True, **kwargs})


def test_bf16_autocast_trains_on_cpu(tmp_path, tiny_dataset):
    result, model = _train(tmp_path / "bf16", tiny_dataset, max_steps=2, mixed_precision="bf16")
    assert len(result.losses) == 2 and all(0.0 < v < 10.0 for v in result.losses)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())  # fp32 master


def test_resumes_keep_the_original_config_and_are_recorded_beside_it(tmp_path, tiny_dataset):
    run = tmp_path / "run"
    config = {"model": {"name": "tiny", "widths": [4, 8]}, "trainer": {"max_steps": 2, "resume": None}}
    engine = TrainingEngine(run_dir=run, max_steps=2, cpu=True)
    assert engine.save_config(config) == run.resolve() / "config.yaml"
    original = (run / "config.yaml").read_text()
    assert yaml.safe_load(original) == config
    _train(run, tiny_dataset, max_steps=2)  # a checkpoint at step 2

    for k, max_steps in ((1, 3), (2, 4)):
        later = {"model": config["model"], "trainer": {"max_steps": max_steps, "resume": "latest"}, "new": k}
        engine = TrainingEngine(run_dir=run, max_steps=max_steps, cpu=True, resume="latest")
        overrides = [f"trainer.max_steps={max_steps}", "trainer.resume=latest"]
        assert engine.save_config(later, overrides) == run.resolve() / f"config.resume-{k}.yaml"
        assert (run / "config.yaml").read_text() == original
        assert yaml.safe_load((run / f"config.resume-{k}.yaml").read_text()) == later
    records = yaml.safe_load((run / "resumes.yaml").read_text())
    assert [r["resume"] for r in records] == [1, 2]
    assert [r["config"] for r in records] == ["config.resume-1.yaml", "config.resume-2.yaml"]
    assert all(r["step"] == 2 and r["from_checkpoint"] == "checkpoints/step_00000002" for r in records)
    assert records[1]["overrides"] == ["trainer.max_steps=4", "trainer.resume=latest"]
    assert records[1]["changed"] == {  # against config.yaml, not against the previous resume
        "new": {"before": None, "after": 2},
        "trainer.max_steps": {"before": 2, "after": 4},
        "trainer.resume": {"before": None, "after": "latest"},
    }

    # A fresh start in the same directory is a new run: its config replaces the old one and its records.
    TrainingEngine(run_dir=run, max_steps=1, cpu=True).save_config({"fresh": True})
    assert yaml.safe_load((run / "config.yaml").read_text()) == {"fresh": True}
    assert not (run / "resumes.yaml").exists() and not list(run.glob("config.resume-*.yaml"))


def test_resume_without_an_original_config_is_still_recorded(tmp_path, tiny_dataset):
    _train(tmp_path / "run", tiny_dataset, max_steps=1)  # engine used without save_config
    engine = TrainingEngine(run_dir=tmp_path / "run", max_steps=2, cpu=True, resume="latest")
    engine.save_config({"a": 1})
    (record,) = yaml.safe_load((tmp_path / "run" / "resumes.yaml").read_text())
    assert record["changed"] is None and record["overrides"] is None and record["step"] == 1
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_save_config_rejects_what_it_cannot_write(tmp_path):
    engine = TrainingEngine(run_dir=tmp_path, max_steps=1, cpu=True)
    with pytest.raises(ValueError, match="config must be a mapping"):
        engine.save_config(["not", "a", "mapping"])
    with pytest.raises(ValueError, match="plain values"):
        engine.save_config({"path": tmp_path})
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        TrainingEngine(run_dir=tmp_path, max_steps=1, cpu=True, resume="latest").save_config({})


def test_config_changes_lists_dotted_keys_that_differ():
    before = {"a": {"b": 1, "c": [1, 2], "gone": 0}, "d": None}
    after = {"a": {"b": 1, "c": [1, 3], "added": "x"}, "d": None}
    assert config_changes(before, after) == {
        "a.added": {"before": None, "after": "x"},
        "a.c": {"before": [1, 2], "after": [1, 3]},
        "a.gone": {"before": 0, "after": None},
    }
    assert config_changes(after, after) == {}
    assert config_changes({"k": None}, {}) == {"k": {"before": None, "after": None}}  # presence counts
