"""Registry of reconstruction methods behind ``medgauss-reconstruct``, their options and checkpoints.

A method is a function ``(projections [1, K, rows, cols], geometry, options, checkpoint) -> volume
[1, 1, D, H, W]`` registered under a name with :func:`register_method`. Its options (what
``--opt key=value`` may set) are the keyword parameters of the function it wraps, read from that
function's signature and type hints, so the command never lists them by hand. A method that needs a
trained model names the model classes its checkpoint may hold (``checkpoint_classes``); the checkpoint
folder's ``config.json`` (written by :meth:`medgauss.nets.pretrained.PretrainedMixin.save_pretrained`) is
checked against them before the method runs. Methods register when their module is imported: the
built-in analytic and iterative ones in :mod:`medgauss.recon.methods`.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medgauss.geometry import CircularGeometry

__all__ = [
    "MethodFn",
    "MethodOutput",
    "ReconMethod",
    "register_method",
    "available_methods",
    "get_method",
    "parse_option_value",
    "parse_options",
    "check_checkpoint",
    "resolve_checkpoint",
    "run_method",
    "run_method_output",
]

MethodFn = Callable[[Tensor, CircularGeometry, dict[str, Any], "Path | None"], "Tensor | MethodOutput"]
"""``(projections [1, K, rows, cols], geometry, options, checkpoint) -> volume [1, 1, D, H, W]`` (or a
:class:`MethodOutput` for a method that makes more than the volume)."""


@dataclass
class MethodOutput:
    """What a method made: the volume, and for Gaussian methods the fitted Gaussians.

    Attributes:
        volume: ``[1, 1, D, H, W]`` on the geometry's grid.
        gaussians: ``[1, N]`` Gaussians in the geometry's world frame (x, y, z mm), or ``None``.
        info: method-specific facts for the caller (e.g. iterations run), JSON-serialisable.
    """

    volume: Tensor
    gaussians: Any = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReconMethod:
    """A registered reconstruction method.

    Attributes:
        name: what ``--method`` calls it.
        fn: the method (see :data:`MethodFn`).
        option_types: option name -> accepted Python types (``type(None)`` when ``None`` is allowed).
        option_defaults: option name -> default value of the wrapped function.
        checkpoint_classes: model class names a checkpoint may hold; empty for a method that takes none.
        description: one line for ``--help``.
        checkpoint_optional: the method runs without a checkpoint too (one given is still checked).
        makes_gaussians: the method returns Gaussians (``--out-gaussians`` applies).
    """

    name: str
    fn: MethodFn
    option_types: Mapping[str, tuple[type, ...]] = field(default_factory=dict)
    option_defaults: Mapping[str, Any] = field(default_factory=dict)
    checkpoint_classes: tuple[str, ...] = ()
    description: str = ""
    checkpoint_optional: bool = False
    makes_gaussians: bool = False

    @property
    def takes_checkpoint(self) -> bool:
        return bool(self.checkpoint_classes)

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Typed options (ints promoted to float where a float is expected).

        Raises:
            ValueError: an option the method does not have (listing the valid ones) or a value of the
                wrong type.
        """
        out: dict[str, Any] = {}
        for key, value in options.items():
            out[key] = self._coerce(key, value, repr(value))
        return out

    def options_from_text(self, texts: Mapping[str, str]) -> dict[str, Any]:
        """Typed options from ``key -> text`` pairs (the right-hand sides of ``--opt key=value``).

        Text is parsed by :func:`parse_option_value`; an option that takes strings keeps text that parses
        to a type the option does not accept (``window=1`` is the string ``"1"``).
        """
        out: dict[str, Any] = {}
        for key, text in texts.items():
            self._check_key(key)
            try:
                out[key] = self._coerce(key, parse_option_value(text), text)
            except ValueError:
                if str not in self.option_types[key]:
                    raise
                out[key] = text  # a string option whose value looks like a number, a bool or None
        return out

    def _check_key(self, key: str) -> None:
        if key not in self.option_types:
            valid = ", ".join(sorted(self.option_types)) or "none"
            raise ValueError(f"method {self.name!r} has no option {key!r}; valid options: {valid}")

    def _coerce(self, key: str, value: Any, shown: str) -> Any:
        self._check_key(key)
        accepted = self.option_types[key]
        if value is None and type(None) in accepted:
            return None
        if isinstance(value, bool):
            if bool in accepted:
                return value
        elif isinstance(value, int):
            if int in accepted:
                return value
            if float in accepted:
                return float(value)
        elif isinstance(value, float):
            if float in accepted:
                return value
        elif isinstance(value, str) and str in accepted:
            return value
        wanted = " or ".join("None" if t is type(None) else t.__name__ for t in accepted)
        raise ValueError(f"option {key}={shown} of method {self.name!r} must be {wanted}")


_METHODS: dict[str, ReconMethod] = {}

CONFIG_NAME = "config.json"
"""Model config file of a checkpoint folder (``medgauss.nets.pretrained.CONFIG_NAME``; not imported from
there, so the analytic methods do not load the network stack)."""

_SIMPLE_TYPES = (bool, int, float, str, type(None))


def _accepted_types(hint: Any, default: Any, where: str) -> tuple[type, ...]:
    """The simple types a type hint allows (``int | None`` -> ``(int, NoneType)``)."""
    if hint is inspect.Parameter.empty:
        if default is inspect.Parameter.empty or default is None:
            raise TypeError(f"{where} has neither a type hint nor a default to infer its type from")
        return (type(default),)
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if typing.get_origin(hint) is typing.Literal:
        members = tuple(type(v) for v in typing.get_args(hint))
    accepted = tuple(m for m in members if m in _SIMPLE_TYPES)
    if not accepted:
        raise TypeError(f"{where} has type {hint!r}, which --opt cannot express; exclude it")
    return accepted


def _options_of(fn: Callable[..., Any], exclude: Sequence[str]) -> tuple[dict[str, tuple[type, ...]], dict[str, Any]]:
    """Keyword options of ``fn`` (parameters with a default, minus ``exclude``) and their types."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: fall back to the defaults' types
        hints = {}
    types_: dict[str, tuple[type, ...]] = {}
    defaults: dict[str, Any] = {}
    for name, param in inspect.signature(fn).parameters.items():
        if name in exclude or param.default is inspect.Parameter.empty:
            continue
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        hint = hints.get(name, inspect.Parameter.empty)
        types_[name] = _accepted_types(hint, param.default, f"option {name!r} of {fn.__qualname__}")
        defaults[name] = param.default
    unknown = sorted(set(exclude) - set(inspect.signature(fn).parameters))
    if unknown:
        raise TypeError(f"exclude names parameters {fn.__qualname__} does not have: {unknown}")
    return types_, defaults


def register_method(
    name: str,
    *,
    options_from: Callable[..., Any] | None = None,
    exclude: Sequence[str] = (),
    checkpoint_classes: Sequence[str] = (),
    description: str = "",
    checkpoint_optional: bool = False,
    makes_gaussians: bool = False,
) -> Callable[[MethodFn], MethodFn]:
    """Decorator: register a reconstruction method under ``name``.

    Args:
        name: the ``--method`` name (lower case letters, digits, ``_``, ``-``).
        options_from: the function whose keyword parameters with defaults are the method's options
            (e.g. :func:`medgauss.ct.sart`); ``None`` for a method without options.
        exclude: parameters of ``options_from`` that are not options (e.g. ``initial``).
        checkpoint_classes: model class names (``config.json`` ``"class"``) a checkpoint for this method
            may hold; empty for a method that takes no checkpoint. A method with classes requires one unless
            ``checkpoint_optional``.
        description: one line for ``--help``.
        checkpoint_optional: a method with ``checkpoint_classes`` that also runs without a checkpoint (e.g.
            ``3dgr``, which needs one only to initialise from a pretrained decoder).
        makes_gaussians: the method returns a :class:`MethodOutput` with Gaussians.

    Raises:
        ValueError: a malformed or already registered name.
        TypeError: an option whose type ``--opt`` cannot express (exclude it).
    """
    if not re.fullmatch(r"[a-z0-9][a-z0-9_\-]*", name):
        raise ValueError(f"method name must be lower-case letters, digits, '_' or '-', got {name!r}")
    if name in _METHODS:
        raise ValueError(f"reconstruction method {name!r} is already registered")
    option_types, option_defaults = _options_of(options_from, exclude) if options_from is not None else ({}, {})

    def decorate(fn: MethodFn) -> MethodFn:
        _METHODS[name] = ReconMethod(
            name=name,
            fn=fn,
            option_types=option_types,
            option_defaults=option_defaults,
            checkpoint_classes=tuple(checkpoint_classes),
            description=description,
            checkpoint_optional=checkpoint_optional,
            makes_gaussians=makes_gaussians,
        )
        return fn

    return decorate


def available_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> ReconMethod:
    """The registered method ``name``.

    Raises:
        ValueError: no method of that name is registered (listing the registered ones).
    """
    if name not in _METHODS:
        raise ValueError(
            f"reconstruction method {name!r} is not registered (not installed in this medgauss); "
            f"registered methods: {', '.join(available_methods())}"
        )
    return _METHODS[name]


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)


def parse_option_value(text: str) -> Any:
    """``"true"``/``"false"`` -> bool, ``"none"``/``"null"`` -> None, integer text -> int, other numbers ->
    float, anything else -> the text itself (case-insensitive keywords)."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    if re.fullmatch(r"[+-]?\d+", lowered):
        return int(lowered)
    if _NUMBER.fullmatch(lowered):
        return float(lowered)
    return text


def parse_options(pairs: Sequence[str]) -> dict[str, str]:
    """``["iterations=20", "lam=0.5"]`` -> ``{"iterations": "20", "lam": "0.5"}`` (values still text).

    Raises:
        ValueError: an entry without ``=`` or with an empty key, or a key given twice.
    """
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--opt expects key=value, got {pair!r}")
        if key in out:
            raise ValueError(f"--opt {key} is given twice ({key}={out[key]} and {pair})")
        out[key] = value.strip()
    return out


def resolve_checkpoint(checkpoint: Path) -> Path:
    """The model folder of ``--checkpoint``: the folder itself when it holds ``config.json``, else its
    ``model/`` export (a training run folder of ``recipes/*``).

    Raises:
        FileNotFoundError naming ``--checkpoint`` when neither exists.
    """
    if (checkpoint / CONFIG_NAME).is_file():
        return checkpoint
    if (checkpoint / "model" / CONFIG_NAME).is_file():
        return checkpoint / "model"
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"--checkpoint: folder not found: {checkpoint}")
    raise FileNotFoundError(
        f"--checkpoint: {checkpoint / CONFIG_NAME} is missing (not a saved medgauss model, nor a training run "
        "folder with a model/ export)"
    )


def check_checkpoint(method: ReconMethod, checkpoint: Path | None) -> Path | None:
    """Refuse a checkpoint given to a method that takes none, and a missing, unreadable or wrong-class one.

    Returns:
        The model folder (see :func:`resolve_checkpoint`), or ``None`` without a checkpoint.

    Raises:
        ValueError / FileNotFoundError naming ``--checkpoint`` and the file at fault.
    """
    if not method.takes_checkpoint:
        if checkpoint is not None:
            raise ValueError(
                f"--checkpoint {checkpoint}: method {method.name!r} takes no checkpoint (it reconstructs from "
                "the projections alone); drop --checkpoint"
            )
        return None
    if checkpoint is None:
        if method.checkpoint_optional:
            return None
        raise ValueError(
            f"method {method.name!r} needs --checkpoint DIR (a trained {' or '.join(method.checkpoint_classes)})"
        )
    model_dir = resolve_checkpoint(checkpoint)
    config_path = model_dir / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--checkpoint: {config_path} is not valid JSON: {exc}") from exc
    held = config.get("class") if isinstance(config, dict) else None
    if held not in method.checkpoint_classes:
        raise ValueError(
            f"--checkpoint: {config_path} holds a model of class {held!r}, but method {method.name!r} needs "
            f"{' or '.join(method.checkpoint_classes)}"
        )
    return model_dir


def run_method(
    name: str,
    projections: Tensor,
    geometry: CircularGeometry,
    options: Mapping[str, Any] | None = None,
    checkpoint: str | Path | None = None,
) -> Tensor:
    """Reconstruct with the registered method ``name``: the volume of :func:`run_method_output`."""
    return run_method_output(name, projections, geometry, options, checkpoint).volume


def run_method_output(
    name: str,
    projections: Tensor,
    geometry: CircularGeometry,
    options: Mapping[str, Any] | None = None,
    checkpoint: str | Path | None = None,
) -> MethodOutput:
    """Reconstruct with the registered method ``name``.

    Args:
        name: a registered method (see :func:`available_methods`).
        projections: ``[1, K, rows, cols]`` float line integrals measured with ``geometry``.
        geometry: the ``K`` views' geometry.
        options: typed method options (checked against the method's; text goes through
            :meth:`ReconMethod.options_from_text` first).
        checkpoint: folder of a saved model (or a training run folder with a ``model/`` export), for methods
            that take one.

    Returns:
        :class:`MethodOutput` whose ``volume`` is ``[1, 1, D, H, W]`` on ``geometry``'s grid
        (``geometry.vol_shape``).

    Raises:
        ValueError / FileNotFoundError: an unregistered method, a bad option, a checkpoint given to a
            method that takes none (or missing, unreadable or of the wrong model class), or projections
            whose shape disagrees with ``geometry``.
    """
    method = get_method(name)
    typed = method.check_options(options or {})
    model_dir = check_checkpoint(method, None if checkpoint is None else Path(checkpoint))
    want = (1, *geometry.output_shape())
    if not isinstance(projections, Tensor) or tuple(projections.shape) != want:
        raise ValueError(
            f"projections must have shape {list(want)} ([1, views, rows, cols] of the geometry), got "
            f"{tuple(getattr(projections, 'shape', ()))}"
        )
    with torch.no_grad():
        made = method.fn(projections, geometry, typed, model_dir)
    output = made if isinstance(made, MethodOutput) else MethodOutput(made)
    expected = (1, 1, *geometry.vol_shape)
    if not isinstance(output.volume, Tensor) or tuple(output.volume.shape) != expected:
        raise RuntimeError(
            f"method {name!r} returned shape {tuple(getattr(output.volume, 'shape', ()))}, expected {list(expected)}"
        )
    return output
