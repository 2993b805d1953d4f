"""Feed-forward sparse-view CT reconstruction in the training engine: the X-GRM task and its held-out validator.

* :class:`XGRMTask` (a :class:`~medgauss.engines.tasks.TrainTask`): one micro-batch of
  :class:`~medgauss.data.XGRMSampleDataset` samples -> the model decodes only each sample's sub-box from its
  ``K`` input views -> :class:`~medgauss.losses.XGRMLoss` against the ground truth (volume MSE on the box,
  L1 + D-SSIM of the box's rendered projections at the input and the sample's held-out views). It hands the
  engine its ``collate_fn`` (:func:`~medgauss.data.collate_xgrm_samples`), returns the loss parts for the
  engine to log, and draws panels (prediction / ground truth / FDK slices of sample 0 of
  the micro-batch, full-grid decode).
* :class:`ReconstructionValidator` (a :class:`~medgauss.engines.validation.Validator`): held-out cases at
  6 / 8 / 10 evenly spaced views, full-grid decode in chunks, 3D PSNR and slice-averaged SSIM of the model beside
  FDK (and optionally SART) on the same cases and views; headline = model PSNR - FDK PSNR.

Neither draws from the global random generators: the sample's randomness lives in the batch (sample ids), the
panel and the validator run the model in eval mode without gradients.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor, nn

from medgauss.ct import fdk, sart
from medgauss.ct.dataset import CTReconstructionDataset, evenly_spaced_views, load_case
from medgauss.data.xgrm_samples import XGRM_VIEW_COUNTS, collate_xgrm_samples
from medgauss.engines.panels import axial_display, save_figure
from medgauss.metrics import psnr, ssim_slices

__all__ = [
    "LOSS_PARTS",
    "XGRMTask",
    "ReconstructionReport",
    "ReconstructionValidator",
    "save_reconstruction_panel",
]

LOSS_PARTS = ("volume_mse", "render_l1", "render_dssim", "render", "opacity_l1")
"""Loss parts of :class:`~medgauss.losses.XGRMLoss` that :class:`XGRMTask` hands the engine to log."""


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (for its attributes; call the wrapper itself)."""
    return getattr(model, "module", model)


# ------------------------------------------------------------------------------------------- the task


class XGRMTask:
    """X-GRM training step: decode each sample's sub-box from its input views, :class:`~medgauss.losses.XGRMLoss`.

    Args:
        loss_fn: an :class:`~medgauss.losses.XGRMLoss` (its ``render_views`` is unused: the batch names the
            held-out views, drawn by the dataset from the sample id).
        chunk_size: voxels decoded at once for the full-grid panel decode (``None``: the model's default).

    :meth:`compute_loss` also returns the loss parts named in ``LOSS_PARTS`` (``volume_mse``, ``render_l1``,
    ...), which the engine logs at its log steps (TensorBoard ``train/<part>`` and the log line).

    Batches are :func:`~medgauss.data.collate_xgrm_samples` of :class:`~medgauss.data.XGRMSampleDataset`
    items (``collate_fn`` hands it to the engine). The model is an :class:`~medgauss.nets.XGRM` (either
    decoder), called as ``model(projections, **geometry_inputs, box_start=..., box_size=...)``.
    """

    loss_label = "X-GRM loss"
    loss_tag = "xgrm_loss"
    collate_fn = staticmethod(collate_xgrm_samples)

    def __init__(self, loss_fn: nn.Module, *, chunk_size: int | None = None) -> None:
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be a callable loss module (XGRMLoss), got {type(loss_fn).__name__}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.loss_fn, self.chunk_size = loss_fn, chunk_size
        self._device: torch.device | None = None

    @staticmethod
    def input_geometries(batch: Mapping[str, Any]) -> list[Any]:
        """Each sample's geometry restricted to its input views (the ``K`` the model sees), in order."""
        return [g.subset(ids) for g, ids in zip(batch["geometry"], batch["input_views"].tolist())]

    def compute_loss(self, model: nn.Module, batch: Mapping[str, Any],
                     device: torch.device) -> tuple[Tensor, Any, dict[str, float]]:
        """``(total loss, model output, loss parts)`` of one micro-batch (the output of the sub-boxes,
        ``XGRMOutput``; the parts of ``LOSS_PARTS`` the loss reported, as floats)."""
        core = _unwrapped(model)
        projections = batch["projections"].to(device, non_blocking=True)
        inputs = core.geometry_inputs(self.input_geometries(batch), device=device)
        out = model(projections, **inputs, box_start=batch["box_start"].to(device), box_size=batch["box_size"])
        if self._device != device and isinstance(self.loss_fn, nn.Module):
            self.loss_fn = self.loss_fn.to(device)
        self._device = device
        total, parts = self.loss_fn(out, batch["volume"].to(device, non_blocking=True), batch["geometry"],
                                    batch["input_views"], heldout_views=batch["heldout_views"])
        return total, out, {name: float(parts[name]) for name in LOSS_PARTS if name in parts}

    @torch.no_grad()
    def panel(self, model: nn.Module, out: Any, batch: Mapping[str, Any], path: Path, step: int) -> None:
        """Middle axial and coronal slices of sample 0: full-grid prediction from its ``K`` input views, ground
        truth (the training sub-box outlined), FDK of the same views; PSNR of both in the titles."""
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            geometry = self.input_geometries(batch)[0]
            projections = batch["projections"][:1]
            prediction = model.reconstruct(projections.to(device), geometry, chunk_size=self.chunk_size).volume
        finally:
            model.train(was_training)
        analytic = fdk(projections.float(), geometry)
        truth = batch["volume"][:1].float()
        k = projections.shape[1]
        save_reconstruction_panel(
            path,
            {"prediction": prediction[0, 0].float().cpu(), "ground truth": truth[0, 0], f"FDK ({k} views)":
             analytic[0, 0]},
            reference="ground truth",
            box=(batch["box_start"][0].tolist(), tuple(batch["box_size"])),
            title=f"step {step}: {batch['case_id'][0]}, {k} views",
        )


# ------------------------------------------------------------------------------------------- panels


def _coronal_display(volume: np.ndarray, index: int) -> np.ndarray:
    """Coronal slice ``index`` (array axis 1) of ``[D, H, W]`` as displayed: superior at the top, the patient's
    right on the left."""
    return volume[::-1, index, ::-1]


def save_reconstruction_panel(path: str | Path, volumes: Mapping[str, Tensor], *, reference: str | None = None,
                              box: tuple[Sequence[int], Sequence[int]] | None = None, title: str = "") -> Path:
    """A 2 x N PNG: middle axial (top) and coronal (bottom) slices of each volume, grey scale ``[0, 1]``.

    Args:
        path: output PNG (parent folders created); drawn on its own Agg canvas.
        volumes: column title -> ``[D, H, W]`` volume (same shape for all), frame of :mod:`medgauss.frame`.
        reference: the column whose volume the others' PSNR (data range 1) is computed against, shown in their
            titles (``None``: none).
        box: ``(start, size)`` voxel box ``(d, h, w)`` outlined in red on the ``reference`` column (or the first).
        title: figure title.

    Returns:
        ``path``.
    """
    arrays = {name: v.detach().float().cpu().numpy() for name, v in volumes.items()}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"volumes must be [D, H, W] volumes of one shape, got {sorted(shapes)}")
    if reference is not None and reference not in arrays:
        raise ValueError(f"reference {reference!r} is not one of the volumes {list(arrays)}")
    d, h, w = next(iter(shapes))
    fig = Figure(figsize=(3.2 * len(arrays), 6.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(arrays), squeeze=False)
    for col, (name, array) in enumerate(arrays.items()):
        label = name
        if reference is not None and name != reference:
            mse = float(np.mean((array.astype(np.float64) - arrays[reference]) ** 2))
            label += f"\nPSNR {10 * math.log10(1.0 / mse):.2f} dB" if mse > 0 else "\nPSNR inf"
        for row, view in enumerate((axial_display(array, d // 2), _coronal_display(array, h // 2))):
            axes[row, col].imshow(view, cmap="gray", vmin=0.0, vmax=1.0)
            axes[row, col].set_axis_off()
        axes[0, col].set_title(label)
    if box is not None:
        (d0, h0, w0), (bd, bh, bw) = box
        col = list(arrays).index(reference) if reference is not None else 0
        if d0 <= d // 2 < d0 + bd:  # axial: displayed row = h - 1 - index, column = w - 1 - index
            axes[0, col].add_patch(Rectangle((w - w0 - bw - 0.5, h - h0 - bh - 0.5), bw, bh, fill=False,
                                             color="red"))
        if h0 <= h // 2 < h0 + bh:  # coronal: displayed row = d - 1 - index
            axes[1, col].add_patch(Rectangle((w - w0 - bw - 0.5, d - d0 - bd - 0.5), bw, bd, fill=False,
                                             color="red"))
    return save_figure(fig, path, title)


# ------------------------------------------------------------------------------------------- validation


def _view_key(k: int) -> str:
    return f"{k}v"


@dataclass
class ReconstructionReport:
    """Held-out reconstruction quality of a model beside the analytic (and iterative) baselines.

    Attributes:
        table: ``{method: {K: {"psnr": dB, "ssim": slice SSIM}}}``, means over the cases; methods ``"model"``,
            ``"fdk"`` and (with SART iterations) ``"sart"``.
        case_ids: the held-out cases.
        per_case_psnr: ``{method: {"<K>v": [per-case PSNR]}}`` in ``case_ids`` order.
        model_seconds: mean seconds per volume of the model's full-grid decode.
        sart_iterations: SART sweeps of the ``"sart"`` row (0: no SART row).
    """

    table: dict[str, dict[int, dict[str, float]]]
    case_ids: list[str]
    per_case_psnr: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    model_seconds: float = math.nan
    sart_iterations: int = 0

    @property
    def view_counts(self) -> list[int]:
        return sorted(self.table["model"])

    def mean(self, method: str, metric: str) -> float:
        """Mean of ``metric`` of ``method`` over the view counts (each a mean over the cases)."""
        return float(np.mean([self.table[method][k][metric] for k in self.view_counts]))

    @property
    def margin_db(self) -> float:
        """Model PSNR minus FDK PSNR (dB, averaged over the view counts); positive: the model beats FDK."""
        return self.mean("model", "psnr") - self.mean("fdk", "psnr")

    @property
    def beats_fdk(self) -> bool:
        return self.margin_db > 0

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        """``{method: {"psnr", "ssim"}}`` (means over K) and ``{"<method>_<K>v": {"psnr", "ssim"}}`` per K."""
        out: dict[str, dict[str, float]] = {}
        for method, rows in self.table.items():
            out[method] = {"psnr": self.mean(method, "psnr"), "ssim": self.mean(method, "ssim")}
            for k, row in sorted(rows.items()):
                out[f"{method}_{_view_key(k)}"] = dict(row)
        return out

    @property
    def headline(self) -> tuple[str, float]:
        """``("psnr_over_fdk_db", margin_db)``: TensorBoard ``val/psnr_over_fdk_db``."""
        return "psnr_over_fdk_db", self.margin_db

    def summary(self) -> str:
        """One line: PSNR / SSIM per view count for each method, and whether the model beats FDK."""
        views = self.view_counts
        names = {"model": "model", "fdk": "FDK", "sart": f"SART({self.sart_iterations})"}
        cells = []
        for method in self.table:
            values = " | ".join(f"{self.table[method][k]['psnr']:.2f}/{self.table[method][k]['ssim']:.3f}"
                                for k in views)
            cells.append(f"{names.get(method, method)} {values}")
        verdict = (f"model beats FDK by {self.margin_db:+.2f} dB" if self.beats_fdk
                   else f"model does NOT beat FDK ({self.margin_db:+.2f} dB): not learned yet")
        return (f"held-out PSNR/SSIM at {'/'.join(map(str, views))} views: " + "; ".join(cells)
                + f"; {len(self.case_ids)} cases: {verdict}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready record (``validation.jsonl``)."""
        return {
            "metrics": self.metrics,
            "table": {m: {str(k): v for k, v in rows.items()} for m, rows in self.table.items()},
            "margin_db": self.margin_db,
            "beats_fdk": self.beats_fdk,
            "num_cases": len(self.case_ids),
            "case_ids": list(self.case_ids),
            "per_case_psnr": self.per_case_psnr,
            "model_seconds_per_volume": self.model_seconds,
            "sart_iterations": self.sart_iterations,
        }


class ReconstructionValidator:
    """Held-out sparse-view reconstruction quality of a feed-forward model, beside FDK (and SART).

    For every held-out case and every ``K`` in ``view_counts``: the ``K`` evenly spaced views
    (:func:`~medgauss.ct.dataset.evenly_spaced_views`, the views ``medgauss-reconstruct --views K`` uses) are
    reconstructed by the model (full grid, ``chunk_size`` voxels at a time, eval mode, no gradient), by
    :func:`~medgauss.ct.fdk` and, with ``sart_iterations > 0``, by :func:`~medgauss.ct.sart` from zeros; each
    is scored against the case's volume by 3D PSNR and SSIM averaged over axial slices
    (:func:`~medgauss.metrics.psnr`, :func:`~medgauss.metrics.ssim_slices`, ``data_range``). The baselines are
    computed at the first evaluation and kept. Nothing draws from the global random generators.

    Args:
        root: held-out dataset folder written by ``medgauss-prepare-ct`` (e.g.
            ``build_xgrm_dataset(...).heldout_dir``); its cases must never be trained on.
        view_counts: the ``K`` values of the table.
        cases: restrict to these case ids (default: every case of ``root``).
        chunk_size: voxels decoded at once (``None``: the model's default).
        sart_iterations: SART sweeps of the optional SART row (0: none).
        data_range: volume data range for PSNR / SSIM (1 for prepared volumes).

    Raises:
        ValueError / FileNotFoundError: an unreadable folder or case, or a ``K`` larger than a case's views.
    """

    def __init__(self, root: str | Path, *, view_counts: Sequence[int] = XGRM_VIEW_COUNTS,
                 cases: Sequence[str] | None = None, chunk_size: int | None = None, sart_iterations: int = 0,
                 data_range: float = 1.0) -> None:
        counts = tuple(view_counts)
        if not counts or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in counts):
            raise ValueError(f"view_counts must be a non-empty sequence of positive ints, got {view_counts!r}")
        if isinstance(sart_iterations, bool) or not isinstance(sart_iterations, int) or sart_iterations < 0:
            raise ValueError(f"sart_iterations must be an int >= 0, got {sart_iterations!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if not (isinstance(data_range, (int, float)) and math.isfinite(data_range) and data_range > 0):
            raise ValueError(f"data_range must be a positive number, got {data_range!r}")
        self.dataset = CTReconstructionDataset(root, num_views=max(counts),
                                               cases=None if cases is None else list(cases))
        self.view_counts = tuple(sorted(set(counts)))
        self.chunk_size, self.sart_iterations, self.data_range = chunk_size, sart_iterations, float(data_range)
        self._baselines: dict[str, dict[int, list[tuple[float, float]]]] | None = None

    @property
    def case_ids(self) -> list[str]:
        return list(self.dataset.case_ids)

    def inputs(self, case_id: str, k: int) -> tuple[Tensor, Any, Tensor]:
        """``(projections [1, K, rows, cols] float32, K-view geometry, volume [1, 1, D, H, W] float32)`` of a case."""
        case = load_case(self.dataset.root / case_id, mmap=True)
        ids = evenly_spaced_views(case["geometry"].num_views, k)
        projections = torch.from_numpy(np.array(case["projections"][ids], dtype=np.float32))[None]
        volume = torch.from_numpy(np.array(case["volume"], dtype=np.float32))[None, None]
        return projections, case["geometry"].subset(ids), volume

    def _score(self, prediction: Tensor, volume: Tensor) -> tuple[float, float]:
        prediction = prediction.detach().float().cpu()
        return (float(psnr(prediction, volume, data_range=self.data_range)[0]),
                float(ssim_slices(prediction, volume, data_range=self.data_range, axis=0)[0]))

    def baselines(self) -> dict[str, dict[int, list[tuple[float, float]]]]:
        """``{"fdk" (, "sart"): {K: [(psnr, ssim) per case]}}``, computed once (float32, outside autocast)."""
        if self._baselines is None:
            methods = ["fdk"] + (["sart"] if self.sart_iterations else [])
            scores: dict[str, dict[int, list[tuple[float, float]]]] = {m: {k: [] for k in self.view_counts}
                                                                        for m in methods}
            with torch.autocast("cpu", enabled=False):
                for case_id in self.case_ids:
                    for k in self.view_counts:
                        projections, geometry, volume = self.inputs(case_id, k)
                        scores["fdk"][k].append(self._score(fdk(projections, geometry), volume))
                        if self.sart_iterations:
                            recon = sart(projections, geometry, iterations=self.sart_iterations, progress=False)
                            scores["sart"][k].append(self._score(recon, volume))
            self._baselines = scores
        return self._baselines

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, final: bool = True) -> ReconstructionReport:
        """Score ``model`` (left in the train / eval mode it came in) on every held-out case and ``K``.

        ``model.reconstruct(projections, geometry, chunk_size=...)`` must return an object with ``volume``
        ``[1, 1, D, H, W]`` (:class:`~medgauss.nets.XGRM`). ``final`` is accepted for the engine's protocol
        (every metric is computed at every call).
        """
        baselines = self.baselines()
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        scores: dict[int, list[tuple[float, float]]] = {k: [] for k in self.view_counts}
        seconds: list[float] = []
        try:
            for case_id in self.case_ids:
                for k in self.view_counts:
                    projections, geometry, volume = self.inputs(case_id, k)
                    start = time.perf_counter()
                    out = model.reconstruct(projections.to(device), geometry, chunk_size=self.chunk_size)
                    prediction = out.volume.float().cpu()
                    seconds.append(time.perf_counter() - start)
                    scores[k].append(self._score(prediction, volume))
        finally:
            model.train(was_training)
        every = {"model": scores, **baselines}
        table = {m: {k: {"psnr": float(np.mean([s[0] for s in rows[k]])),
                         "ssim": float(np.mean([s[1] for s in rows[k]]))} for k in self.view_counts}
                 for m, rows in every.items()}
        per_case = {m: {_view_key(k): [round(s[0], 4) for s in rows[k]] for k in self.view_counts}
                    for m, rows in every.items()}
        return ReconstructionReport(table, self.case_ids, per_case, float(np.mean(seconds)), self.sart_iterations)
