"""Shared fixtures for engine tests: a small phantom dataset and a clean Accelerate state per test."""

from __future__ import annotations

import pytest
from accelerate.state import AcceleratorState, GradientState, PartialState

from medgauss.data import build_pretrain_dataset, write_phantom_dataset


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Every engine builds its own Accelerator; reset the process-wide singletons around each test."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="session")
def phantom_datalist(tmp_path_factory):
    """Two 32^3 phantoms at 4 mm (small, fast to preprocess)."""
    return write_phantom_dataset(
        tmp_path_factory.mktemp("phantoms"), 2, shape=(32, 32, 32), spacing=4.0, seed=3
    )


@pytest.fixture(scope="session")
def tiny_dataset(phantom_datalist):
    """16^3 crops at 4 mm of the phantoms, every augmentation on."""
    return build_pretrain_dataset(phantom_datalist, spatial_size=16, pixdim=4.0, samples_per_volume=8, seed=5)
