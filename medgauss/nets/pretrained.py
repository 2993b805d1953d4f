"""Saving and rebuilding models: ``model.safetensors`` + ``config.json`` in one directory.

``config.json`` holds ``{"format": "medgauss.nets", "format_version": 1, "class": <class name>,
"registry_name": <name given to create_model, or null>, "kwargs": <constructor kwargs>}``.
Weights are read with safetensors (never unpickled).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["PretrainedMixin", "load_pretrained", "config_from_locals"]

_FORMAT = "medgauss.nets"
_FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# class name -> class, filled by PretrainedMixin.__init_subclass__ (the classes load_pretrained can rebuild)
_CLASSES: dict[str, type] = {}

T = TypeVar("T", bound="PretrainedMixin")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ValueError(f"constructor argument value {value!r} ({type(value).__name__}) cannot be saved in "
                     "config.json; use plain numbers, strings, lists or dicts")


def config_from_locals(local_vars: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor kwargs from an ``__init__``'s ``locals()`` (drops ``self``/``__class__``), JSON-ready."""
    return {k: _jsonable(v) for k, v in local_vars.items() if k not in ("self", "__class__")}


class PretrainedMixin:
    """Adds ``save_pretrained`` / ``from_pretrained`` to an ``nn.Module`` that sets ``self.init_config``.

    Subclasses store their constructor kwargs in ``self.init_config`` (``config_from_locals(locals())``
    first thing in ``__init__``); :func:`medgauss.nets.create_model` also sets ``self.registry_name``.
    """

    init_config: dict[str, Any]
    registry_name: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _CLASSES[cls.__name__] = cls

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` atomically.

        Files are written to a temporary sibling directory that then replaces ``directory`` by
        rename, so a reader never sees a half-written checkpoint. Returns the directory path.
        """
        from safetensors.torch import save_file

        assert isinstance(self, nn.Module)
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        config = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "class": type(self).__name__,
                  "registry_name": self.registry_name, "kwargs": self.init_config}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": _FORMAT})
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
            old = None
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
                directory.rename(old)
            tmp.rename(directory)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return directory

    @classmethod
    def from_pretrained(cls: type[T], directory: str | Path, map_location: str | torch.device = "cpu") -> T:
        """Rebuild a model written by :meth:`save_pretrained` (must be this class or a subclass)."""
        model = load_pretrained(directory, map_location=map_location)
        if not isinstance(model, cls):
            raise ValueError(f"{directory} holds a {type(model).__name__}, not a {cls.__name__}; "
                             "use medgauss.nets.load_pretrained to load any model")
        return model


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file {path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != _FORMAT or "kwargs" not in config:
        raise ValueError(f"{path} is not a medgauss.nets config (expected keys format, class, kwargs)")
    if config.get("class") not in _CLASSES:
        raise ValueError(f"{path} names unknown model class {config.get('class')!r}; "
                         f"known: {sorted(_CLASSES)}")
    return config


def load_pretrained(directory: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild any medgauss model saved with ``save_pretrained`` (class read from ``config.json``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"pretrained model directory not found: {directory}")
    config = _read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    model = _CLASSES[config["class"]](**config["kwargs"])
    model.registry_name = config.get("registry_name")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"cannot read weights file {weights}: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights in {weights} do not match the model in "
                         f"{directory / CONFIG_NAME}: {exc}") from exc
    return model.to(map_location)
