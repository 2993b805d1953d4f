"""Test-session setup shared by every test module.

Triton kernels run in its interpreter on CPU tensors; the variable must be set before
``triton`` is first imported, so it is set here, at collection start.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".numba_cache"))
