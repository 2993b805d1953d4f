"""Recipe tests build Accelerators in-process: reset Accelerate's process-wide singletons around each."""

from tests._accelerate_state import fresh_accelerate_state  # noqa: F401  (autouse fixture)
