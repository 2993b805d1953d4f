"""The learned methods of ``medgauss-reconstruct``: ``xgrm`` and ``ilrm`` (feed-forward, from a checkpoint).

Both run a trained :class:`medgauss.nets.XGRM` (a folder written by ``save_pretrained``, e.g. the ``model/`` export
of ``recipes/xgrm_train.py``) on the ``K`` input views and decode the full grid of the geometry
(``geometry.vol_shape``, placed by ``geometry.volume_affine``) in chunks of ``chunk_size`` voxels, so memory
does not grow with the grid. They differ only in the decoder the checkpoint must hold:

- ``xgrm``: the VoxGS decoder (``decoder="voxgs"``, X-GRM's);
- ``ilrm``: the iLRM-style iterative decoder (``decoder="iterative"``).

The decoder is read from the checkpoint's ``config.json`` before any weight is loaded; a checkpoint of the
other decoder raises ``ValueError`` naming the checkpoint and the method to use instead. Options
(``--opt``): ``chunk_size`` (voxels decoded at once; default the model's) and ``device`` (``"auto"``: CUDA
when present, else ``"cpu"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medgauss.geometry import CircularGeometry
from medgauss.recon.registry import CONFIG_NAME, register_method

__all__ = ["DECODER_OF_METHOD", "checkpoint_decoder", "load_reconstruction_model", "learned_reconstruction",
           "reconstruct_xgrm", "reconstruct_ilrm"]

DECODER_OF_METHOD = {"xgrm": "voxgs", "ilrm": "iterative"}
"""The ``XGRM(decoder=...)`` each learned method requires of its checkpoint."""

_METHOD_OF_DECODER = {v: k for k, v in DECODER_OF_METHOD.items()}


def checkpoint_decoder(checkpoint: str | Path) -> str:
    """The decoder (``"voxgs"`` / ``"iterative"``) recorded in an XGRM checkpoint's ``config.json``.

    A checkpoint saved before the decoder option existed records none: it is ``"voxgs"``.

    Raises:
        FileNotFoundError / ValueError: no readable ``config.json``, or it holds no XGRM.
    """
    path = Path(checkpoint) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: {path} is missing (not a saved medgauss model)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--checkpoint: {path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("class") != "XGRM" or not isinstance(config.get("kwargs"), dict):
        raise ValueError(f"--checkpoint: {path} does not hold an XGRM model (class {config.get('class')!r})"
                         if isinstance(config, dict) else f"--checkpoint: {path} does not hold a model config")
    return str(config["kwargs"].get("decoder", "voxgs"))


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"option device={device!r} is not a torch device ('auto', 'cpu', 'cuda', 'cuda:1', "
                         "...)") from exc


def load_reconstruction_model(checkpoint: str | Path, method: str, device: str = "auto") -> torch.nn.Module:
    """Load the XGRM of ``checkpoint`` for ``method`` (``"xgrm"`` / ``"ilrm"``), in eval mode on ``device``.

    Raises:
        ValueError: ``method`` unknown, or the checkpoint's decoder is not the one ``method`` needs (naming the
            checkpoint and the method that fits it).
        FileNotFoundError: missing checkpoint files.
    """
    if method not in DECODER_OF_METHOD:
        raise ValueError(f"method must be one of {sorted(DECODER_OF_METHOD)}, got {method!r}")
    wanted, held = DECODER_OF_METHOD[method], checkpoint_decoder(checkpoint)
    if held != wanted:
        other = _METHOD_OF_DECODER.get(held)
        hint = f"; use --method {other}" if other else ""
        raise ValueError(f"--checkpoint {checkpoint}: holds an XGRM with decoder={held!r}, but method {method!r} needs "
                         f"decoder={wanted!r}{hint}")
    from medgauss.nets import XGRM

    return XGRM.from_pretrained(checkpoint, map_location=_device(device)).eval()


def learned_reconstruction(projections: Tensor, geometry: CircularGeometry, checkpoint: str | Path, method: str, *,
                           chunk_size: int | None = None, device: str = "auto") -> Tensor:
    """Reconstruct ``projections`` ``[1, K, rows, cols]`` with the trained model of ``checkpoint``.

    Args:
        projections: line integrals of the ``K`` views of ``geometry`` (the model's detector size).
        geometry: the ``K`` views; the output grid is its ``vol_shape`` placed by ``volume_affine``.
        checkpoint: a ``save_pretrained`` folder of an :class:`~medgauss.nets.XGRM`.
        method: ``"xgrm"`` or ``"ilrm"`` (the decoder the checkpoint must hold).
        chunk_size: voxels decoded at once (``None``: the model's ``chunk_size``).
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ...

    Returns:
        ``[1, 1, D, H, W]`` float32 volume on the CPU.

    Raises:
        ValueError: wrong decoder (see :func:`load_reconstruction_model`), a bad ``chunk_size``, or projections /
            geometry the model cannot take (detector size, non-finite values), naming the argument.
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"option chunk_size must be a positive int, got {chunk_size!r}")
    model = load_reconstruction_model(checkpoint, method, device)
    target = next(model.parameters()).device
    with torch.no_grad():
        out = model.reconstruct(projections.to(target, torch.float32), geometry, chunk_size=chunk_size)
    return out.volume.detach().float().cpu()


def _checked_checkpoint(checkpoint: Path | None, method: str) -> Path:
    if checkpoint is None:  # run_method checks this first; kept for direct calls
        raise ValueError(f"method {method!r} needs --checkpoint DIR (a trained XGRM)")
    return checkpoint


@register_method("xgrm", options_from=learned_reconstruction, checkpoint_classes=("XGRM",),
                 description="X-GRM feed-forward (VoxGS decoder), trained checkpoint")
def reconstruct_xgrm(projections: Tensor, geometry: CircularGeometry, options: dict[str, Any],
                     checkpoint: Path | None) -> Tensor:
    """:func:`learned_reconstruction` with an XGRM of the VoxGS decoder -> ``[1, 1, D, H, W]``."""
    return learned_reconstruction(projections, geometry, _checked_checkpoint(checkpoint, "xgrm"), "xgrm", **options)


@register_method("ilrm", options_from=learned_reconstruction, checkpoint_classes=("XGRM",),
                 description="X-GRM encoder + iLRM-style iterative Gaussian decoder, trained checkpoint")
def reconstruct_ilrm(projections: Tensor, geometry: CircularGeometry, options: dict[str, Any],
                     checkpoint: Path | None) -> Tensor:
    """:func:`learned_reconstruction` with an XGRM of the iterative decoder -> ``[1, 1, D, H, W]``."""
    return learned_reconstruction(projections, geometry, _checked_checkpoint(checkpoint, "ilrm"), "ilrm", **options)
