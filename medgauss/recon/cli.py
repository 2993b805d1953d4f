"""``medgauss-reconstruct``: one command that reconstructs a CT volume with any registered method.

Usage::

    medgauss-reconstruct --method sart --case data/recon/case0 --views 8 --out out/case0_sart.nii.gz \\
        --opt iterations=20 --novel-views out/case0_sart_novel.npy
    medgauss-reconstruct --method fdk --projections p.npy --geometry g.json --out out/fdk.nii.gz
    medgauss-reconstruct --method 3dgr --init decoder --checkpoint runs/pretrain --case data/recon/case0 \\
        --views 80 --out out/case0_3dgr.nii.gz --out-gaussians out/case0_3dgr.safetensors
    python -m medgauss.recon.cli --method fdk ...

The input is a case folder written by ``medgauss-prepare-ct`` or a projection file with a geometry file
(see :mod:`medgauss.recon.inputs`); ``--views K`` keeps ``K`` evenly spaced views (default: all). The
output NIfTI carries the world affine of the volume (a case's scanner frame, so it overlays the source
CT). One line goes to stdout, ``key=value`` pairs: ``method``, ``views``, ``seconds`` (the method's run
time), and for a case ``psnr`` (3D, dB) and ``ssim`` (mean over axial slices) against the case's volume,
which is normalised to [0, 1] (data range 1; the reconstruction is not clipped). With
``--novel-views OUT.npy`` the reconstruction is forward-projected at the views not used as inputs
(ascending view order), saved as ``[V - K, rows, cols]`` float32, and ``novel_psnr`` against the
measured projections of those views is printed with its data range ``novel_range`` (max - min of those
measured projections). Method options pass through as ``--opt key=value`` (the keyword arguments of
:func:`medgauss.ct.fdk` / :func:`~medgauss.ct.sart` / :func:`~medgauss.ct.asd_pocs` /
:func:`medgauss.recon.gaussian.reconstruct_3dgr`). ``--checkpoint`` is a saved model folder or a training run
folder with a ``model/`` export. ``--init NAME`` is ``--opt init=NAME`` (the initialiser of a Gaussian method).
``--out-gaussians G.safetensors`` (Gaussian methods: ``3dgr``) writes the
fitted Gaussians in the output NIfTI's world frame, and the summary line adds the method's own facts
(Gaussian counts, iterations, init and fit seconds). User errors end with exit status 2 and a message on
stderr naming the argument or file.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medgauss.ct.projectors import forward_project
from medgauss.frame import save_nifti
from medgauss.gaussians.coords import transform_gaussians
from medgauss.metrics import projection_psnr, psnr, ssim_slices
from medgauss.recon.inputs import ReconInputs, load_case_inputs, load_file_inputs
from medgauss.recon.registry import (
    available_methods,
    check_checkpoint,
    get_method,
    parse_options,
    run_method_output,
)

__all__ = ["DATA_RANGE", "ReconstructionResult", "reconstruct", "main", "cli"]

DATA_RANGE = 1.0
"""Data range of prepared volumes (HU window normalised to [0, 1]) for PSNR and SSIM."""


@dataclass
class ReconstructionResult:
    """What :func:`reconstruct` did.

    Attributes:
        method: method name; views: number of input views ``K``; seconds: the method's run time.
        out: the NIfTI written; volume: ``[1, 1, D, H, W]`` the reconstruction.
        psnr, ssim: against the ground truth (``None`` without one).
        novel_views: the ``.npy`` of rendered novel views (``None`` when not asked).
        novel_psnr, novel_range: their PSNR (dB) against the measured novel views, and its data range.
    """

    method: str
    views: int
    seconds: float
    out: Path
    volume: Tensor
    psnr: float | None = None
    ssim: float | None = None
    novel_views: Path | None = None
    novel_psnr: float | None = None
    novel_range: float | None = None
    gaussians: Path | None = None
    info: dict[str, Any] | None = None

    def summary(self) -> str:
        """The one stdout line: ``method=... views=... seconds=... [psnr=... ssim=...] [novel_psnr=...]``."""
        parts = [f"method={self.method}", f"views={self.views}", f"seconds={self.seconds:.3f}"]
        if self.psnr is not None:
            parts += [f"psnr={self.psnr:.4f}", f"ssim={self.ssim:.5f}"]
        if self.novel_psnr is not None:
            parts += [f"novel_psnr={self.novel_psnr:.4f}", f"novel_range={self.novel_range:.6g}"]
        for key, value in (self.info or {}).items():
            parts.append(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}")
        return " ".join(parts)


def _check_out_path(path: Path, flag: str, suffixes: tuple[str, ...]) -> None:
    if not path.name.endswith(suffixes):
        raise ValueError(f"{flag} {path}: the file name must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name ending in {' or '.join(suffixes)}")


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp.npy")
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_gaussians(path: Path, gaussians: Any, inputs: ReconInputs) -> None:
    """Write geometry-frame Gaussians in the output NIfTI's world frame: ``affine @ volume_affine^-1``."""
    geometry_to_case = torch.as_tensor(inputs.affine, dtype=torch.float64) @ torch.linalg.inv(
        inputs.geometry.volume_affine)
    mapped = transform_gaussians(gaussians.detach().to("cpu", torch.float32), geometry_to_case)
    path.parent.mkdir(parents=True, exist_ok=True)
    mapped.save(path, metadata={"frame": "world (x, y, z) mm of the output NIfTI's affine",
                                "affine": json.dumps(np.asarray(inputs.affine).tolist())})


def reconstruct(
    inputs: ReconInputs,
    method: str,
    out: str | Path,
    *,
    options: Mapping[str, Any] | None = None,
    checkpoint: str | Path | None = None,
    novel_views: str | Path | None = None,
    out_gaussians: str | Path | None = None,
) -> ReconstructionResult:
    """Reconstruct ``inputs`` with ``method``, write the NIfTI (and novel views), and score them.

    Args:
        inputs: from :func:`~medgauss.recon.inputs.load_case_inputs` or
            :func:`~medgauss.recon.inputs.load_file_inputs`.
        method: a registered method name.
        out: ``.nii.gz`` / ``.nii`` output (parent folders created, written atomically) with ``inputs.affine``.
        options: typed method options.
        checkpoint: model folder for methods that take one.
        novel_views: ``.npy`` for the reconstruction forward-projected at ``inputs.novel_ids``
            (``[V - K, rows, cols]`` float32).
        out_gaussians: ``.safetensors`` for the fitted Gaussians of a Gaussian method (``3dgr``), written by
            :meth:`medgauss.gaussians.Gaussians.save` in the output NIfTI's world frame (``inputs.affine``'s,
            x, y, z mm), so they overlay the volume and the source CT.

    Returns:
        :class:`ReconstructionResult`.

    Raises:
        ValueError / FileNotFoundError: a bad output name, an unregistered method, bad options or
            checkpoint, or ``novel_views`` asked when every view is an input.
    """
    out = Path(out)
    _check_out_path(out, "--out", (".nii.gz", ".nii"))
    novel_path = None if novel_views is None else Path(novel_views)
    novel_geometry = None
    if novel_path is not None:
        _check_out_path(novel_path, "--novel-views", (".npy",))
        novel_geometry = inputs.novel_geometry()
    gaussians_path = None if out_gaussians is None else Path(out_gaussians)
    if gaussians_path is not None:
        _check_out_path(gaussians_path, "--out-gaussians", (".safetensors",))
        if not get_method(method).makes_gaussians:
            raise ValueError(f"--out-gaussians: method {method!r} makes no Gaussians (only the Gaussian methods do, "
                             f"e.g. 3dgr)")
    start = time.perf_counter()
    output = run_method_output(method, inputs.projections, inputs.geometry, options, checkpoint)
    seconds = time.perf_counter() - start
    volume = output.volume.detach().float().cpu()
    save_nifti(out, volume[0, 0].numpy(), inputs.affine)
    result = ReconstructionResult(method=method, views=len(inputs.view_ids), seconds=seconds, out=out, volume=volume,
                                  info=output.info or None)
    if gaussians_path is not None and output.gaussians is not None:
        _save_gaussians(gaussians_path, output.gaussians, inputs)
        result.gaussians = gaussians_path
    if inputs.reference is not None:
        result.psnr = float(psnr(volume, inputs.reference, data_range=DATA_RANGE)[0])
        result.ssim = float(ssim_slices(volume, inputs.reference, data_range=DATA_RANGE, axis=0)[0])
    if novel_path is not None and novel_geometry is not None:
        rendered = forward_project(volume, novel_geometry)
        _save_npy(novel_path, rendered[0].numpy().astype(np.float32))
        measured = inputs.novel_measured()
        data_range = float(measured.max() - measured.min())
        result.novel_views = novel_path
        if data_range > 0:
            result.novel_range = data_range
            result.novel_psnr = float(projection_psnr(rendered, measured, data_range=data_range)[0])
    return result


def _parser() -> argparse.ArgumentParser:
    lines = []
    for name in available_methods():
        method = get_method(name)
        opts = ", ".join(f"{k}={v!r}" for k, v in method.option_defaults.items()) or "none"
        optional = " (optional)" if method.checkpoint_optional else ""
        ckpt = (f"; --checkpoint{optional}: a {' or '.join(method.checkpoint_classes)}"
                if method.takes_checkpoint else "")
        lines.append(f"  {name}: {method.description} (--opt defaults: {opts}{ckpt})")
    p = argparse.ArgumentParser(
        prog="medgauss-reconstruct",
        description="Reconstruct a CT volume from sparse projections with any registered method.",
        epilog="methods:\n" + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--method", required=True, help=f"reconstruction method (registered: {', '.join(available_methods())})"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--case", type=Path, help="case folder written by medgauss-prepare-ct")
    source.add_argument("--projections", type=Path, help=".npy [views, rows, cols] line integrals (with --geometry)")
    p.add_argument("--geometry", type=Path, help="geometry JSON of --projections (may carry an 'affine')")
    p.add_argument("--views", type=int, default=None, help="input views K, evenly spaced (default: all)")
    p.add_argument("--out", type=Path, required=True, help="output NIfTI (.nii.gz or .nii)")
    p.add_argument("--checkpoint", type=Path, default=None, help="model folder, for learned methods")
    p.add_argument("--novel-views", type=Path, default=None, help=".npy for the views not used as inputs")
    p.add_argument("--out-gaussians", type=Path, default=None,
                   help=".safetensors for the fitted Gaussians (Gaussian methods: 3dgr), in the output's world frame")
    p.add_argument("--init", default=None,
                   help="initialiser of a Gaussian method (3dgr: fbp, r2, random, volume_fit, decoder); "
                        "the same as --opt init=...")
    p.add_argument(
        "--opt", action="append", default=[], metavar="KEY=VALUE", help="method option (repeatable), e.g. iterations=20"
    )
    return p


def main(argv: Sequence[str] | None = None) -> ReconstructionResult:
    """Command-line entry point (see the module docstring); prints the summary line and returns the result.

    Raises:
        SystemExit: status 2 with the message on stderr for any user error (as argparse does).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.projections is not None and args.geometry is None:
        parser.error("--projections needs --geometry G.json (the views' geometry)")
    if args.case is not None and args.geometry is not None:
        parser.error("--geometry goes with --projections; a --case folder holds its own geometry")
    try:
        method = get_method(args.method)
        texts = parse_options(args.opt)
        if args.init is not None:
            if "init" not in method.option_types:
                raise ValueError(f"--init: method {method.name!r} has no initialiser (only the Gaussian methods, "
                                 "e.g. 3dgr)")
            if "init" in texts:
                raise ValueError(f"--init {args.init} and --opt init={texts['init']}: give the initialiser once")
            texts["init"] = args.init
        options = method.options_from_text(texts)
        model_dir = check_checkpoint(method, args.checkpoint)
        if args.case is not None:
            inputs = load_case_inputs(args.case, args.views)
        else:
            inputs = load_file_inputs(args.projections, args.geometry, args.views)
        result = reconstruct(
            inputs, args.method, args.out, options=options, checkpoint=model_dir, novel_views=args.novel_views,
            out_gaussians=args.out_gaussians,
        )
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    print(result.summary(), flush=True)
    return result


def cli() -> None:
    """Console-script entry point (``medgauss-reconstruct``): exit status 0 on success, 2 on a user error."""
    main()


if __name__ == "__main__":
    cli()
