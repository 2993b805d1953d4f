"""Registry of named model factories (timm style): ``create_model(name, **overrides)``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["register_model", "create_model", "list_models"]

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn(**overrides) -> nn.Module`` under its function name."""
    name = fn.__name__
    if name in _FACTORIES:
        raise ValueError(f"model name {name!r} is already registered")
    _FACTORIES[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching the shell-style ``pattern``, sorted."""
    return sorted(n for n in _FACTORIES if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the registered model ``name``; ``overrides`` replace its constructor kwargs
    (e.g. ``img_size=64``). Raises ``ValueError`` for an unknown name."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown model name {name!r}; registered: {list_models()}")
    try:
        model = _FACTORIES[name](**overrides)
    except TypeError as exc:  # an override that is no constructor argument
        raise ValueError(f"invalid overrides for model {name!r} ({sorted(overrides)}): {exc}") from exc
    model.registry_name = name
    return model
