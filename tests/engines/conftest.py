"""Shared fixtures for engine tests: a small phantom dataset and a clean Accelerate state per test."""

from __future__ import annotations

import pytest

from medgauss.data import build_pretrain_dataset, write_phantom_dataset
from tests._accelerate_state import fresh_accelerate_state  # noqa: F401  (autouse fixture)


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
