"""The ONE place a compute backend is chosen, for every operation that has several: argument >
``MEDGAUSS_BACKEND`` > automatic.

``auto`` picks ``triton`` for CUDA tensors, ``numba`` for CPU tensors, and falls back to the
pure-torch reference only when the preferred backend cannot run here. A backend asked for by
name (argument or environment variable) that cannot run raises ``RuntimeError`` saying why;
it never falls back silently.

It lives at the top of the package, importing no medgauss module (implementations are named as
``"module:function"`` strings and imported on first use), so that :mod:`medgauss.render` (splat,
X-ray projection of Gaussians) and :mod:`medgauss.ct` (voxel projectors) both use it without
depending on each other.

Adding a backend or an operation: add its ``"module:function"`` to ``_IMPLEMENTATIONS`` (same
signature as the torch reference) and, for a new backend, a rule in ``_unavailable_reason``. How
numba kernels run in parallel (threads, fork safety) is decided in :mod:`medgauss._parallel`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from functools import cache

import torch

__all__ = ["BACKENDS", "ENV_VAR", "resolve_backend", "get_implementation", "available_backends"]

BACKENDS = ("torch", "numba", "triton")
ENV_VAR = "MEDGAUSS_BACKEND"

# operation -> backend -> "module:function". Every function has the torch reference's signature.
_IMPLEMENTATIONS: dict[str, dict[str, str]] = {
    "splat": {
        "torch": "medgauss.render._torch_ref:splat",
        "numba": "medgauss.render._numba:splat",
        "triton": "medgauss.render._triton:splat",
    },
    "project": {
        "torch": "medgauss.render._xray_torch:project",
        "numba": "medgauss.render._xray_numba:project",
        "triton": "medgauss.render._xray_triton:project",
    },
    "forward_project": {
        "torch": "medgauss.ct._torch_proj:forward_project",
        "numba": "medgauss.ct._numba_proj:forward_project",
    },
    "back_project": {
        "torch": "medgauss.ct._torch_proj:back_project",
        "numba": "medgauss.ct._numba_proj:back_project",
    },
}

_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("numba", "torch")}


@cache
def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` here, or ``None`` if it can."""
    if backend == "torch":
        return None
    if backend == "numba":
        if device.type != "cpu":
            return f"the numba backend runs on CPU tensors only (got {device})"
        if not _has_module("numba"):
            return "numba is not installed"
        return None
    if backend == "triton":
        if not _has_module("triton"):
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}"
    return f"unknown backend {backend!r}; choose from {BACKENDS} or 'auto'"


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """Name of the backend that runs ``op`` for tensors on ``device``.

    Args:
        op: operation name, e.g. ``"splat"``.
        backend: ``"auto"`` or one of :data:`BACKENDS`.
        device: device of the input tensors.
    """
    if op not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown operation {op!r}; known: {sorted(_IMPLEMENTATIONS)}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    source = "argument"
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"{ENV_VAR}={env!r} is not one of {BACKENDS} or 'auto'")
            backend, source = env, f"environment variable {ENV_VAR}"
    if backend != "auto":
        if backend not in _IMPLEMENTATIONS[op]:
            raise RuntimeError(f"backend {backend!r} ({source}) does not implement {op!r}")
        reason = _unavailable_reason(backend, device)
        if reason is not None:
            raise RuntimeError(f"backend {backend!r} requested by {source} cannot run {op!r}: {reason}")
        return backend
    for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
        if candidate in _IMPLEMENTATIONS[op] and _unavailable_reason(candidate, device) is None:
            return candidate
    return "torch"


@cache
def _load(path: str) -> Callable:
    module, _, function = path.partition(":")
    return getattr(importlib.import_module(module), function)


def get_implementation(op: str, backend: str) -> Callable:
    """The function implementing ``op`` on an already resolved ``backend``."""
    return _load(_IMPLEMENTATIONS[op][backend])


def available_backends(op: str, device: torch.device | str = "cpu") -> list[str]:
    """Backends able to run ``op`` for tensors on ``device`` in this process."""
    dev = torch.device(device)
    return [b for b in _IMPLEMENTATIONS[op] if _unavailable_reason(b, dev) is None]
