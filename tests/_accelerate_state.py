"""Fixture shared by tests that build Accelerators in-process (engines, recipes)."""

from __future__ import annotations

import pytest
from accelerate.state import AcceleratorState, GradientState, PartialState


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Every engine builds its own Accelerator; reset Accelerate's process-wide singletons around each test."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
