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
    """Build the registered model ``name``; ``overrides`` replace its constructor kwargs (e.g. ``img_size=64``).

    Raises:
        ValueError: unknown ``name``, or an override that is no argument of the model's constructor (the
            factory checks this against the constructor's signature, e.g. ``medgauss.nets.zoo``).
        Any error the constructor itself raises, unchanged.
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown model name {name!r}; registered: {list_models()}")
    model = _FACTORIES[name](**overrides)
    model.registry_name = name
    return model
