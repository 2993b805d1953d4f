"""The X-GRM training loss on a random sub-volume: volume MSE + rendered-projection L1 and D-SSIM.

For an :class:`~medgauss.nets.XGRMOutput` decoded on a box of the grid (``box_start``, ``box_size``) and
the batch's ground-truth volume on the whole grid::

    total = volume_weight * MSE(output.volume, gt[box])
            + lambda_l1 * L1(p, q) + lambda_ssim * (1 - SSIM(p, q)) / 2
            + lambda_opacity_l1 * mean(|output.volume|)

* ``gt[box]`` is the ground truth cropped to the same box (voxel indices).
* ``p = project(box Gaussians, G_box) / r`` and ``q = forward_project(gt[box], G_box) / r``, where
  ``G_box = subvolume_geometry(geometry, box_start, box_size)`` restricted to the rendered views: the
  input views (the ones the model saw) and ``render_views`` held-out views of the same case. Both sides
  are line integrals through the box only, in the same world frame and the same views, so they see the
  same region. (The measured projections of the whole volume cannot serve as the target of a sub-box:
  the rest of the volume lies on the same rays.)
* ``r = value_range * |box diagonal|`` (mm) is the largest line integral a box of values in
  ``[0, value_range]`` can produce, so the projections enter the L1 and SSIM as fractions of it: the
  render terms do not depend on the voxel size or the box size, and SSIM uses ``data_range = 1``.
* Both terms are averaged over the box's shadow: the smallest detector rectangle holding every non-zero
  pixel of either side in any rendered view (:func:`shadow_window`). Pixels outside it are exactly zero on
  both sides (the Gaussians are cut off at ``cutoff``, the voxel projection ends at the box), so this only
  sets what the mean is taken over: a quarter-grid box shadows a fraction of the detector, and a mean over
  the whole detector would scale the render terms by that fraction.
* SSIM is :func:`medgauss.metrics.projection_ssim` (Gaussian window 11 / sigma 1.5, valid region,
  differentiable) on that rectangle, averaged over the rendered views; both terms are averaged over the batch.

* The opacity L1 term (off by default) is the mean opacity of the decoded box (opacities are non-negative,
  so it is their L1 norm over the voxel count). It pulls the air of the prediction towards exactly 0, which is
  what lets inference skip empty blocks (``XGRM(skip_empty=...)``, exact only where a skipped block truly is
  empty). It biases the whole volume: against the volume MSE alone (``volume_weight`` 1) the optimum of a
  voxel of true value ``g`` moves from ``g`` to ``max(0, g - lambda_opacity_l1 / 2)``, so keep the weight at
  the scale of the error one accepts (e.g. ``1e-3`` for volumes in ``[0, 1]``).

Weights. X-GRM (see ``PAPERS.md``) writes ``L = L_volume + lambda_L1 L1 + lambda_ssim D-SSIM`` and leaves
both lambdas and the rendered views unspecified; it renders with R²-Gaussian's rasteriser, whose
published training loss is ``L1 + 0.25 (1 - SSIM)``. The defaults here are that weighting in this
module's ``D-SSIM = (1 - SSIM) / 2``: ``lambda_l1 = 1``, ``lambda_ssim = 0.5``. The paper's ``L_volume``
is a sum over voxels; here it is a mean (an MSE), so the weights do not change with the box size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from medgauss.ct import forward_project
from medgauss.metrics import projection_ssim
from medgauss.nets.voxgs import subvolume_geometry
from medgauss.nets.xgrm import XGRMOutput
from medgauss.render import project

__all__ = ["XGRMLoss", "XGRM_LAMBDA_L1", "XGRM_LAMBDA_SSIM", "box_line_integral_range", "shadow_window"]

XGRM_LAMBDA_L1 = 1.0
"""Default weight of the projection L1 (R²-Gaussian's; X-GRM does not state its own)."""
XGRM_LAMBDA_SSIM = 0.5
"""Default weight of D-SSIM = (1 - SSIM) / 2: R²-Gaussian's ``0.25 (1 - SSIM)``."""


def box_line_integral_range(geometry: Any, value_range: float = 1.0) -> float:
    """Largest line integral through ``geometry``'s volume of values in ``[0, value_range]``: the volume's
    diagonal (outer faces, mm) times ``value_range``. The render terms divide projections by it."""
    edges = [n * s for n, s in zip(geometry.vol_shape, geometry.vol_spacing)]
    return float(value_range) * math.sqrt(sum(e * e for e in edges))


def _check_weight(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _as_geometries(geometry: Any, batch: int) -> list[Any]:
    from medgauss.geometry import CircularGeometry

    geometries = [geometry] * batch if isinstance(geometry, CircularGeometry) else list(geometry)
    if len(geometries) != batch or not all(isinstance(g, CircularGeometry) for g in geometries):
        raise ValueError(f"geometry must be one ConeBeamGeometry / ParallelBeamGeometry or a sequence of B={batch} "
                         f"of them, got {type(geometry).__name__}"
                         + (f" of length {len(geometries)}" if isinstance(geometry, Sequence) else ""))
    return geometries


def _view_table(name: str, views: Any, batch: int, num_views: Sequence[int]) -> list[list[int]] | None:
    """``None`` or per-sample lists of view indices from ``[M]`` (shared) or ``[B, M]``."""
    if views is None:
        return None
    try:
        ids = torch.as_tensor(views).cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} must be integer view indices [M] or [B, M], got {views!r}") from exc
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer view indices, got dtype {ids.dtype}")
    if ids.ndim == 1:
        ids = ids.unsqueeze(0).expand(batch, -1)
    if ids.ndim != 2 or ids.shape[0] != batch:
        raise ValueError(f"{name} must have shape [M] or [B={batch}, M], got {tuple(ids.shape)}")
    table = ids.long().tolist()
    for b, row in enumerate(table):
        if any(i < 0 or i >= num_views[b] for i in row) or len(set(row)) != len(row):
            raise ValueError(f"{name} of sample {b} must be distinct indices in [0, {num_views[b] - 1}] (the views of "
                             f"its geometry), got {row}")
    return table


class XGRMLoss(nn.Module):
    """X-GRM's loss on a decoded sub-volume (see the module docstring for the formula and the defaults).

    Args:
        lambda_l1: weight of the L1 between the normalised rendered and target projections.
        lambda_ssim: weight of D-SSIM ``= (1 - SSIM) / 2`` between them. With both lambdas 0 nothing is
            rendered (volume loss only).
        render_views: held-out views rendered per sample besides the input views, drawn at random from the
            views of the case the model did not see (or given to :meth:`forward` as ``heldout_views``).
        volume_weight: weight of the volume MSE.
        cutoff: Mahalanobis truncation radius of :func:`medgauss.render.project` (``None``: none).
        value_range: largest volume value (1 for volumes normalised to ``[0, 1]``); sets the projection
            normalisation ``r`` (:func:`box_line_integral_range`).
        ssim_window: Gaussian SSIM window (odd; shrinks to the detector when larger).
        backend: ``project`` backend (``"auto"``, ``"torch"``, ``"numba"``, ``"triton"``); the voxel
            projector of the target uses it too when it has it (``"torch"``, ``"numba"``), else ``"auto"``.
        lambda_opacity_l1: weight of the mean opacity of the decoded box (0: the term is not added).

    ``forward(output, volume, geometry, input_views=None, *, heldout_views=None, generator=None)`` returns
    ``(total, parts)``: a scalar with gradients and a dict of detached scalars ``volume_mse``,
    ``render_l1``, ``render_dssim``, ``render``, ``opacity_l1`` (the unweighted mean opacity) and ``total``
    for logging.
    """

    def __init__(self, lambda_l1: float = XGRM_LAMBDA_L1, lambda_ssim: float = XGRM_LAMBDA_SSIM,
                 render_views: int = 4, *, volume_weight: float = 1.0, cutoff: float | None = 3.0,
                 value_range: float = 1.0, ssim_window: int = 11, backend: str = "auto",
                 lambda_opacity_l1: float = 0.0) -> None:
        super().__init__()
        self.lambda_opacity_l1 = _check_weight("lambda_opacity_l1", lambda_opacity_l1)
        self.lambda_l1 = _check_weight("lambda_l1", lambda_l1)
        self.lambda_ssim = _check_weight("lambda_ssim", lambda_ssim)
        self.volume_weight = _check_weight("volume_weight", volume_weight)
        if isinstance(render_views, bool) or not isinstance(render_views, int) or render_views < 0:
            raise ValueError(f"render_views must be an int >= 0 (held-out views rendered per sample), "
                             f"got {render_views!r}")
        self.render_views = render_views
        if cutoff is not None and not (isinstance(cutoff, (int, float)) and math.isfinite(cutoff) and cutoff > 0):
            raise ValueError(f"cutoff must be a positive number or None, got {cutoff!r}")
        self.cutoff = None if cutoff is None else float(cutoff)
        if not (isinstance(value_range, (int, float)) and math.isfinite(value_range) and value_range > 0):
            raise ValueError(f"value_range must be a positive number (largest volume value), got {value_range!r}")
        self.value_range = float(value_range)
        if isinstance(ssim_window, bool) or not isinstance(ssim_window, int) or ssim_window < 1 or ssim_window % 2 == 0:
            raise ValueError(f"ssim_window must be a positive odd int, got {ssim_window!r}")
        self.ssim_window = ssim_window
        from medgauss.dispatch import BACKENDS

        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    @property
    def renders(self) -> bool:
        """Whether the loss renders projections (a render weight is non-zero)."""
        return self.lambda_l1 > 0 or self.lambda_ssim > 0

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_output(output: Any) -> tuple[int, tuple[int, int, int]]:
        if not isinstance(output, XGRMOutput):
            raise ValueError(f"output must be an XGRMOutput (what XGRM returns), got {type(output).__name__}")
        size = tuple(int(s) for s in output.box_size)
        b = output.gaussians.batch_size
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"output.box_size must be three positive ints, got {output.box_size!r}")
        if tuple(output.volume.shape) != (b, 1, *size):
            raise ValueError(f"output.volume must have shape [B={b}, 1, {size[0]}, {size[1]}, {size[2]}] "
                             f"(output.box_size), got {tuple(output.volume.shape)}")
        if output.gaussians.num_gaussians != math.prod(size):
            raise ValueError(f"output.gaussians holds {output.gaussians.num_gaussians} Gaussians per sample, the box "
                             f"{size} has {math.prod(size)} voxels")
        if tuple(output.box_start.shape) != (b, 3) or tuple(output.affine.shape) != (b, 4, 4):
            raise ValueError(f"output.box_start must be [B={b}, 3] and output.affine [B, 4, 4], got "
                             f"{tuple(output.box_start.shape)} and {tuple(output.affine.shape)}")
        if not bool(torch.isfinite(output.volume).all()):
            raise ValueError("output.volume contains non-finite values (NaN or inf)")
        return b, size  # type: ignore[return-value]

    @staticmethod
    def _check_volume(volume: Any, batch: int, geometries: list[Any]) -> Tensor:
        if not isinstance(volume, Tensor) or not volume.is_floating_point():
            raise ValueError(f"volume must be a floating-point torch.Tensor [B, 1, D, H, W], got "
                             f"{type(volume).__name__} {getattr(volume, 'dtype', '')}")
        if volume.ndim != 5 or volume.shape[:2] != (batch, 1):
            raise ValueError(f"volume must have shape [B={batch}, 1, D, H, W] (the ground truth on the whole grid), "
                             f"got {tuple(volume.shape)}")
        for b, g in enumerate(geometries):
            if tuple(g.vol_shape) != tuple(volume.shape[2:]):
                raise ValueError(f"volume's grid {tuple(volume.shape[2:])} differs from geometry.vol_shape "
                                 f"{tuple(g.vol_shape)} of sample {b}")
        if not bool(torch.isfinite(volume).all()):
            raise ValueError("volume contains non-finite values (NaN or inf)")
        return volume

    @staticmethod
    def _box_geometries(output: XGRMOutput, geometries: list[Any], size: tuple[int, int, int]) -> list[Any]:
        """``subvolume_geometry`` of every sample's box, checked against the box affine the model used."""
        boxes = []
        for b, g in enumerate(geometries):
            box = subvolume_geometry(g, output.box_start[b].tolist(), size)
            expected = box.volume_affine
            got = output.affine[b].detach().to("cpu", torch.float64)
            tol = 1e-6 * max(1.0, float(expected.abs().max()))
            if not torch.allclose(got, expected, rtol=0.0, atol=tol):
                raise ValueError(f"output.affine of sample {b} is not the affine of box {output.box_start[b].tolist()} "
                                 f"of geometry's grid (the model decoded another grid): {got.tolist()} vs "
                                 f"{expected.tolist()}")
            boxes.append(box)
        return boxes

    # ------------------------------------------------------------------ views
    def choose_views(self, geometries: list[Any], input_views: Any = None, heldout_views: Any = None,
                     generator: torch.Generator | None = None) -> list[list[int]]:
        """Per-sample view indices to render: the input views, then the held-out ones.

        ``input_views`` ``None`` means every view of the geometry is an input view. ``heldout_views``
        ``None`` draws ``render_views`` of the remaining views uniformly without replacement (``generator``).
        """
        counts = [g.num_views for g in geometries]
        batch = len(geometries)
        inputs = _view_table("input_views", input_views, batch, counts) or [list(range(n)) for n in counts]
        held = _view_table("heldout_views", heldout_views, batch, counts)
        if held is not None:
            for b, (seen, extra) in enumerate(zip(inputs, held)):
                both = sorted(set(seen) & set(extra))
                if both:
                    raise ValueError(f"heldout_views of sample {b} include input views: {both}")
            return [seen + extra for seen, extra in zip(inputs, held)]
        out = []
        for b, seen in enumerate(inputs):
            rest = sorted(set(range(counts[b])) - set(seen))
            if self.render_views > len(rest):
                raise ValueError(f"render_views={self.render_views} held-out views requested but sample {b}'s geometry "
                                 f"has only {len(rest)} views besides input_views (pass the case's full geometry)")
            pick = torch.randperm(len(rest), generator=generator)[: self.render_views].tolist()
            out.append(seen + [rest[i] for i in pick])
        return out

    # ------------------------------------------------------------------ rendering
    def render_pair(self, output: XGRMOutput, volume: Tensor, geometry: Any,
                    view_ids: Any = None) -> tuple[Tensor, Tensor]:
        """Rendered and target projections of each sample's box, normalised by :func:`box_line_integral_range`.

        Args:
            output: the model's output on a box of the grid.
            volume: ``[B, 1, D, H, W]`` ground truth on the whole grid of ``geometry``.
            geometry: one geometry or ``B`` (the grid ``output`` was decoded on, ``vol_shape = (D, H, W)``).
            view_ids: ``[V']`` or ``[B, V']`` views to render (default: all views of the geometry).

        Returns:
            ``(rendered, target)``, each ``[B, V', rows, cols]`` in the Gaussians' dtype: ``project`` of the
            box's Gaussians and ``forward_project`` (no gradient) of ``volume`` cropped to the box, both
            through ``subvolume_geometry(geometry, box_start, box_size).subset(view_ids)``.
        """
        batch, size = self._check_output(output)
        geometries = _as_geometries(geometry, batch)
        volume = self._check_volume(volume, batch, geometries)
        boxes = self._box_geometries(output, geometries, size)
        table = _view_table("view_ids", view_ids, batch, [g.num_views for g in geometries])
        if table is None:
            table = [list(range(g.num_views)) for g in geometries]
        return self._render(output, volume, boxes, size, table)

    def _render(self, output: XGRMOutput, volume: Tensor, boxes: list[Any], size: tuple[int, int, int],
                table: list[list[int]]) -> tuple[Tensor, Tensor]:
        gaussians = output.gaussians
        target_backend = self.backend if self.backend in ("torch", "numba") else "auto"
        rendered, targets = [], []
        for b, (box, ids) in enumerate(zip(boxes, table)):
            views = box.subset(ids)
            scale = box_line_integral_range(box, self.value_range)
            pred = project(gaussians[b: b + 1], views, cutoff=self.cutoff, backend=self.backend)
            with torch.no_grad():
                crop = _crop(volume[b: b + 1], output.box_start[b].tolist(), size).to(pred.device, pred.dtype)
                target = forward_project(crop.contiguous(), views, backend=target_backend)
            rendered.append(pred / scale)
            targets.append(target / scale)
        return torch.cat(rendered), torch.cat(targets)

    # ------------------------------------------------------------------ loss
    def forward(self, output: XGRMOutput, volume: Tensor, geometry: Any, input_views: Any = None, *,
                heldout_views: Any = None, generator: torch.Generator | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one batch.

        Args:
            output: :class:`~medgauss.nets.XGRMOutput` of a box (``box_start [B, 3]``, ``box_size``) of the grid.
            volume: ``[B, 1, D, H, W]`` ground-truth volume on the whole grid (normalised values).
            geometry: the case's geometry with ALL its views (input and held-out), one shared or ``B``;
                its grid (``vol_shape``, ``volume_affine``) is the one the model decoded.
            input_views: ``[K]`` or ``[B, K]`` indices (into ``geometry``'s views) of the views the model
                saw; ``None`` = all of them.
            heldout_views: ``[M]`` or ``[B, M]`` held-out views to render instead of a random draw of
                ``render_views``.
            generator: random source of the held-out draw.

        Returns:
            ``(total, parts)``: scalar loss (dtype of ``output.volume``) and detached scalars
            ``volume_mse``, ``render_l1``, ``render_dssim``, ``render`` (= the weighted render terms),
            ``opacity_l1`` (mean ``|opacity|`` of the box, before its weight) and ``total``.

        Raises:
            ValueError: shapes that disagree (output vs box, volume vs geometry, views), non-finite inputs,
                an ``output.affine`` that is not the box of ``geometry``'s grid, too few held-out views.
        """
        batch, size = self._check_output(output)
        geometries = _as_geometries(geometry, batch)
        volume = self._check_volume(volume, batch, geometries)
        boxes = self._box_geometries(output, geometries, size)
        pred_volume = output.volume
        crops = torch.cat([_crop(volume[b: b + 1], output.box_start[b].tolist(), size) for b in range(batch)])
        volume_mse = (pred_volume - crops.to(pred_volume)).square().mean()
        zero = pred_volume.new_zeros(())
        l1 = dssim = zero
        if self.renders:
            table = self.choose_views(geometries, input_views, heldout_views, generator)
            rendered, target = self._render(output, volume, boxes, size, table)
            l1_terms, ssim_terms = [], []
            for b in range(batch):
                rows, cols = shadow_window(rendered[b], target[b])
                p, q = rendered[b: b + 1, :, rows, cols], target[b: b + 1, :, rows, cols]
                l1_terms.append((p - q).abs().mean())
                ssim_terms.append(projection_ssim(p, q, data_range=1.0, window=self.ssim_window)[0])
            l1 = torch.stack(l1_terms).mean().to(pred_volume.dtype)
            dssim = ((1.0 - torch.stack(ssim_terms).mean()) / 2.0).to(pred_volume.dtype)
        render = self.lambda_l1 * l1 + self.lambda_ssim * dssim
        total = self.volume_weight * volume_mse + render
        opacity_l1 = pred_volume.abs().mean()
        if self.lambda_opacity_l1 > 0:  # not added at 0: the default loss stays bit-identical
            total = total + self.lambda_opacity_l1 * opacity_l1
        parts = {"volume_mse": volume_mse, "render_l1": l1, "render_dssim": dssim, "render": render,
                 "opacity_l1": opacity_l1, "total": total}
        return total, {k: v.detach() for k, v in parts.items()}


def shadow_window(rendered: Tensor, target: Tensor) -> tuple[slice, slice]:
    """Rows and columns of the smallest detector rectangle holding every non-zero pixel of either stack.

    Args:
        rendered, target: ``[V, rows, cols]`` projections of one box (the rendered Gaussians are exactly zero
            beyond their cutoff, the voxel projection beyond the box's shadow).

    Returns:
        ``(rows, cols)`` slices, the same for every view (the whole detector when both stacks are all zero).
        Restricting L1 and SSIM to it changes only what they are averaged over: no non-zero pixel is left out.
    """
    seen = ((rendered.detach() != 0) | (target.detach() != 0)).any(dim=0)
    if not bool(seen.any()):
        return slice(None), slice(None)
    rows = torch.nonzero(seen.any(dim=1)).flatten()
    cols = torch.nonzero(seen.any(dim=0)).flatten()
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _crop(volume: Tensor, start: Sequence[int], size: Sequence[int]) -> Tensor:
    """``volume[..., d0:d0+d, h0:h0+h, w0:w0+w]`` of a ``[B, C, D, H, W]`` tensor."""
    (d0, h0, w0), (d, h, w) = start, size
    return volume[..., d0: d0 + d, h0: h0 + h, w0: w0 + w]
