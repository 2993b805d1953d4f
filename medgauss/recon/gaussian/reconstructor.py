"""``GaussianReconstructor``: fit 3D Gaussians in world mm to one case's measured projections (3DGR).

Each iteration does the following:
- draws ``views_per_step`` of the measured views (all of them when ``None``);
- renders the current Gaussians into those views by one of two routes (``route``):
  - ``"project"``: exact line integrals of the Gaussians (:func:`medgauss.render.xray.project`);
  - ``"splat"``: voxelise on the reconstruction grid (:func:`medgauss.render.splat`), then cone-beam
    project the voxels (:func:`medgauss.ct.projectors.forward_project`). This is 3DGR-CT's route.
    Gaussians outside the grid contribute nothing, and the volume is what the output NIfTI holds anyway;
- takes the loss: L1 or MSE on the projections, plus ``lambda_dssim * (1 - SSIM) / 2``, plus an optional 3D
  total variation on a random sub-volume;
- takes one Adam step with per-parameter learning rates: 3DGR-CT's, the position rate decaying exponentially
  from ``lr_means`` to ``lr_means_final``;
- every ``density.every`` iterations, applies adaptive density control
  (:mod:`medgauss.recon.gaussian.density`).

``route="auto"`` is ``"splat"`` on the CPU, the faster route at every size ``benchmarks/recon_3dgr.py``
measures; it is ``"project"`` on a GPU, which is not measured here. Parameters live in a scene frame (see
:mod:`medgauss.recon.gaussian.params`), so the learning rates do not depend on millimetres or on the
projections' units.

A fit is a per-case solver, like SART, not a training run. It has no dataset, no model to export, and its
parameter count changes under density control. So it does not run in
:class:`medgauss.engines.TrainingEngine`. It keeps the engine's guarantees in its own small form:
- checkpoints written atomically (a temp folder, then a rename);
- exact resume: parameters, Adam moments, density statistics, RNG state and the iteration;
- a tqdm progress bar;
- reference metrics at ``eval_every``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from medgauss.ct.iterative import total_variation
from medgauss.ct.projectors import check_projections, forward_project
from medgauss.gaussians import Gaussians
from medgauss.gaussians.coords import gaussians_to_normalized
from medgauss.geometry import CircularGeometry
from medgauss.metrics import projection_ssim, psnr, ssim_slices
from medgauss.recon.gaussian.density import DensityControl, DensityReport, GradientStats, density_step
from medgauss.recon.gaussian.params import GaussianParameters, SceneFrame
from medgauss.render import splat
from medgauss.render.xray import project

__all__ = ["GaussianReconConfig", "GaussianReconstructor", "FitRecord", "ROUTES", "LOSSES",
           "default_route", "splat_world"]

ROUTES = ("auto", "project", "splat")
LOSSES = ("l1", "mse")
_STATE_FILE = "state.pt"
_GAUSSIANS_FILE = "gaussians.safetensors"
_CONFIG_FILE = "config.json"


@dataclass
class GaussianReconConfig:
    """Settings of one per-case Gaussian reconstruction.

    Attributes:
        iterations: Adam steps of :meth:`GaussianReconstructor.fit`.
        route: ``"auto"`` | ``"project"`` | ``"splat"`` (see the module docstring).
        views_per_step: views rendered per iteration, drawn at random without replacement (``None`` = all).
        loss: ``"l1"`` or ``"mse"`` on the projections.
        lambda_dssim: weight of ``(1 - SSIM) / 2`` on the projections (R²-Gaussian: 0.25).
        lambda_tv: weight of the mean smoothed 3D total variation of the splat on a random ``tv_box``^3
            sub-volume (0 disables; 3DGR-CT and R²-Gaussian use TV).
        tv_box: edge of that sub-volume in voxels (clipped to the grid).
        lr_means, lr_means_final: position learning rate, decayed exponentially from the first to the second
            over ``iterations`` (scene units; 3DGR-CT: 2e-3 -> 2e-6).
        lr_intensities, lr_scales, lr_quats: constant learning rates (3DGR-CT: 0.05, 0.005, 0.001).
        density: adaptive density control.
        eval_every: iterations between reference evaluations (0: only at the start and the end).
        checkpoint_every: iterations between checkpoints when fitting with a checkpoint folder (0: only at the end).
        seed: seed of view sampling and splitting.
        cutoff: Mahalanobis truncation of both renderers.
        backend: render backend (``"auto"`` | ``"torch"`` | ``"numba"`` | ``"triton"``).
    """

    iterations: int = 1000
    route: str = "auto"
    views_per_step: int | None = 8
    loss: str = "l1"
    lambda_dssim: float = 0.25
    lambda_tv: float = 0.0
    tv_box: int = 32
    lr_means: float = 2e-3
    lr_means_final: float = 2e-6
    lr_intensities: float = 0.05
    lr_scales: float = 0.005
    lr_quats: float = 0.001
    density: DensityControl = field(default_factory=DensityControl)
    eval_every: int = 50
    checkpoint_every: int = 0
    seed: int = 0
    cutoff: float = 3.0
    backend: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.density, dict):
            self.density = DensityControl(**self.density)
        if self.route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {self.route!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("iterations", "eval_every", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.views_per_step is not None and (not isinstance(self.views_per_step, int) or self.views_per_step < 1):
            raise ValueError(f"views_per_step must be None or a positive int, got {self.views_per_step!r}")
        for name in ("lambda_dssim", "lambda_tv"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite non-negative number, got {getattr(self, name)!r}")
        for name in ("lr_means", "lr_means_final", "lr_intensities", "lr_scales", "lr_quats", "cutoff"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        if not isinstance(self.tv_box, int) or self.tv_box < 2:
            raise ValueError(f"tv_box must be an int >= 2, got {self.tv_box!r}")

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["density"] = self.density.as_dict()
        return out


@dataclass
class FitRecord:
    """One evaluation of a fit: ``seconds`` counts fitting time only (evaluations and checkpoints excluded)."""

    iteration: int
    seconds: float
    loss: float | None
    num_gaussians: int
    psnr: float | None = None
    ssim: float | None = None


def default_route(device: torch.device) -> str:
    """The faster route on ``device``: ``"splat"`` on the CPU (measured), ``"project"`` elsewhere (not measured)."""
    return "splat" if device.type == "cpu" else "project"


def splat_world(gaussians: Gaussians, shape: tuple[int, int, int], affine: Tensor, *, cutoff: float = 3.0,
                backend: str = "auto") -> Tensor:
    """World-mm Gaussians evaluated on any voxel grid: ``shape`` (D, H, W) with ``affine`` voxel (d, h, w) ->
    world (x, y, z) mm -> ``[B, 1, D, H, W]`` (differentiable)."""
    normalised = gaussians_to_normalized(gaussians, shape, affine=affine)
    return splat(normalised, shape, cutoff=cutoff, backend=backend)


def _exp_decay(start: float, end: float, fraction: float) -> float:
    fraction = min(max(fraction, 0.0), 1.0)
    return math.exp((1 - fraction) * math.log(start) + fraction * math.log(end))


class GaussianReconstructor:
    """Fit Gaussians to one case's projections (see the module docstring).

    Args:
        projections: ``[1, V, rows, cols]`` measured line integrals of ``geometry`` (finite).
        geometry: the ``V`` views' :class:`~medgauss.geometry.CircularGeometry`; its volume grid is the
            output grid and defines the scene frame.
        initial: ``[1, N]`` world-mm Gaussians from an initialiser (:mod:`medgauss.recon.gaussian.init`,
            :func:`~medgauss.recon.gaussian.decoder_init.init_from_decoder`), intensities in volume units.
        config: :class:`GaussianReconConfig`.
        reference: optional ``[1, 1, D, H, W]`` ground truth on the geometry's grid, for PSNR / SSIM logging.
        data_range: data range of those metrics (prepared cases: 1).

    Raises:
        ValueError: projections that disagree with the geometry or are not finite, an empty or non-finite
            initial set, a reference of the wrong shape, a bad config.
    """

    def __init__(self, projections: Tensor, geometry: CircularGeometry, initial: Gaussians,
                 config: GaussianReconConfig | None = None, *, reference: Tensor | None = None,
                 data_range: float = 1.0) -> None:
        self.config = config or GaussianReconConfig()
        projections, geometry = check_projections(projections, geometry)  # shape, dtype, NaN / inf
        if projections.shape[0] != 1:
            raise ValueError(f"projections must hold one case ([1, V, rows, cols]), got {tuple(projections.shape)}")
        if not isinstance(initial, Gaussians):
            raise ValueError(f"initial must be Gaussians, got {type(initial).__name__}")
        if initial.batch_size != 1 or initial.num_gaussians < 1:
            raise ValueError(f"initial Gaussians must be [1, N] with N >= 1, got {initial!r}")
        if reference is not None and tuple(reference.shape) != (1, 1, *geometry.vol_shape):
            raise ValueError(f"reference must have shape {[1, 1, *geometry.vol_shape]}, got {tuple(reference.shape)}")
        if not (math.isfinite(data_range) and data_range > 0):
            raise ValueError(f"data_range must be positive, got {data_range}")
        self.projections = projections.detach()
        self.geometry = geometry
        self.device = projections.device
        self.dtype = projections.dtype
        self.reference = None if reference is None else reference.detach().to(self.device, self.dtype)
        self.data_range = float(data_range)
        self.route = default_route(self.device) if self.config.route == "auto" else self.config.route
        self.affine = geometry.volume_affine.to(self.device)
        amplitude = float(initial.intensities.detach().abs().max())
        frame = SceneFrame.of(geometry, amplitude if amplitude > 0 else 1.0)
        self.params = GaussianParameters.from_gaussians(initial.to(self.device), frame, self.dtype)
        self.initial_count = self.params.count
        self.max_gaussians = self.config.density.max_gaussians or 4 * self.initial_count
        self.optimizer = self._build_optimizer()
        self.stats = GradientStats(self.params.count, self.device, self.dtype)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.iteration = 0
        self.seconds = 0.0
        self.history: list[FitRecord] = []
        self.density_log: list[DensityReport] = []
        self.measured_range = float(self.projections.max() - self.projections.min()) or 1.0

    # ------------------------------------------------------------------ building blocks
    def _build_optimizer(self) -> torch.optim.Adam:
        c, t = self.config, self.params.tensors
        groups = [
            {"params": [t["means"]], "lr": c.lr_means, "name": "means"},
            {"params": [t["log_scales"]], "lr": c.lr_scales, "name": "log_scales"},
            {"params": [t["quats"]], "lr": c.lr_quats, "name": "quats"},
            {"params": [t["raw_intensities"]], "lr": c.lr_intensities, "name": "raw_intensities"},
        ]
        return torch.optim.Adam(groups, eps=1e-15)

    @property
    def gaussians(self) -> Gaussians:
        """``[1, N]`` world-mm Gaussians, detached."""
        return self.params.gaussians().detach()

    def render(self, view_ids: Tensor | None = None, gaussians: Gaussians | None = None) -> Tensor:
        """``[1, V', rows, cols]`` projections of ``view_ids`` (all views when ``None``) by the configured route."""
        g = self.params.gaussians() if gaussians is None else gaussians
        geometry = self.geometry if view_ids is None else self.geometry.subset(view_ids)
        if self.route == "project":
            return project(g, geometry, cutoff=self.config.cutoff, backend=self.config.backend)
        volume = splat_world(g, self.geometry.vol_shape, self.affine, cutoff=self.config.cutoff,
                             backend=self.config.backend)
        return forward_project(volume, geometry)

    def volume(self, shape: tuple[int, int, int] | None = None, affine: Tensor | None = None) -> Tensor:
        """The reconstruction on any grid (default: the geometry's): ``[1, 1, D, H, W]``, detached.

        ``affine`` maps voxel (d, h, w) to the geometry's world (x, y, z) mm; give both or neither.
        """
        if (shape is None) != (affine is None):
            raise ValueError("give both shape and affine (a grid in the geometry's world frame), or neither")
        shape = self.geometry.vol_shape if shape is None else tuple(int(s) for s in shape)  # type: ignore[assignment]
        affine = self.affine if affine is None else torch.as_tensor(affine, dtype=torch.float64)
        with torch.no_grad():
            return splat_world(self.gaussians, shape, affine, cutoff=self.config.cutoff,  # type: ignore[arg-type]
                               backend=self.config.backend)

    def _tv_term(self) -> Tensor:
        d, h, w = self.geometry.vol_shape
        size = [min(self.config.tv_box, n) for n in (d, h, w)]
        start = [int(torch.randint(0, n - s + 1, (1,), generator=self.generator)) for n, s in zip((d, h, w), size)]
        box_affine = self.affine.clone()
        box_affine[:3, 3] = self.affine[:3, :3] @ torch.tensor(start, dtype=torch.float64) + self.affine[:3, 3]
        box = splat_world(self.params.gaussians(), tuple(size), box_affine, cutoff=self.config.cutoff,
                          backend=self.config.backend)
        return total_variation(box).mean() / math.prod(size)

    def loss(self, rendered: Tensor, measured: Tensor) -> Tensor:
        """Projection loss of ``rendered`` against ``measured`` (both ``[1, V', rows, cols]``)."""
        diff = rendered - measured
        value = diff.abs().mean() if self.config.loss == "l1" else diff.square().mean()
        if self.config.lambda_dssim > 0:
            ssim = projection_ssim(rendered, measured, data_range=self.measured_range).mean()
            value = value + self.config.lambda_dssim * (1 - ssim.to(value.dtype)) / 2
        return value

    # ------------------------------------------------------------------ optimisation
    def _set_learning_rates(self, iterations: int) -> None:
        lr = _exp_decay(self.config.lr_means, self.config.lr_means_final, self.iteration / max(iterations, 1))
        for group in self.optimizer.param_groups:
            if group["name"] == "means":
                group["lr"] = lr

    def step(self) -> float:
        """One Adam step (and a density step when due); returns the loss. The schedules (position learning
        rate, density control) run over ``config.iterations`` whatever a fit stops at, so a fit stopped and
        resumed takes exactly the steps of one that ran through."""
        total = self.config.iterations
        self._set_learning_rates(total)
        num_views = self.geometry.num_views
        k = num_views if self.config.views_per_step is None else min(self.config.views_per_step, num_views)
        ids = torch.randperm(num_views, generator=self.generator)[:k].sort().values
        self.optimizer.zero_grad(set_to_none=True)
        rendered = self.render(ids)
        loss = self.loss(rendered, self.projections[:, ids.to(self.device)])
        if self.config.lambda_tv > 0:
            loss = loss + self.config.lambda_tv * self._tv_term()
        loss.backward()
        self.stats.add(self.params.tensors["means"].grad)
        self.optimizer.step()
        self.iteration += 1
        if self.config.density.active(self.iteration, total):
            report = density_step(self.config.density, self.params, self.optimizer, self.stats, self.generator,
                                  self.iteration, self.max_gaussians)
            self.density_log.append(report)
        return float(loss.detach())

    def evaluate(self, loss: float | None = None) -> FitRecord:
        """A :class:`FitRecord` of the current state (PSNR / SSIM against the reference when there is one)."""
        record = FitRecord(self.iteration, self.seconds, loss, self.params.count)
        if self.reference is not None:
            volume = self.volume()
            record.psnr = float(psnr(volume, self.reference, data_range=self.data_range)[0])
            record.ssim = float(ssim_slices(volume, self.reference, data_range=self.data_range, axis=0)[0])
        return record

    def fit(self, until: int | None = None, *, checkpoint_dir: str | Path | None = None,
            callback: Callable[[FitRecord, GaussianReconstructor], bool | None] | None = None,
            progress: bool = True) -> list[FitRecord]:
        """Run until iteration ``until`` (default ``config.iterations``; the schedules always span
        ``config.iterations``); returns the history.

        With ``checkpoint_dir``, a checkpoint there is resumed first (exactly) and one is written every
        ``config.checkpoint_every`` iterations and at the end. ``callback(record, self)`` runs after every
        evaluation; returning ``True`` stops the fit (after a final checkpoint).
        """
        total = self.config.iterations if until is None else int(until)
        folder = None if checkpoint_dir is None else Path(checkpoint_dir)
        if folder is not None and (folder / _STATE_FILE).is_file():
            self.load_checkpoint(folder)
        if not self.history or self.history[-1].iteration != self.iteration:
            self._record(self.evaluate(), callback)
        bar = tqdm(total=total, initial=self.iteration, disable=not progress, desc="3DGR", leave=False)
        stop = False
        while self.iteration < total and not stop:
            start = time.perf_counter()
            loss = self.step()
            self.seconds += time.perf_counter() - start
            bar.update(1)
            evaluate = (self.config.eval_every and self.iteration % self.config.eval_every == 0) \
                or self.iteration == total
            if evaluate:
                record = self.evaluate(loss)
                bar.set_postfix(loss=f"{loss:.4g}", n=record.num_gaussians,
                                **({"psnr": f"{record.psnr:.2f}"} if record.psnr is not None else {}))
                stop = self._record(record, callback)
            every = self.config.checkpoint_every
            if folder is not None and every and self.iteration % every == 0:
                self.save_checkpoint(folder)
        bar.close()
        if folder is not None:
            self.save_checkpoint(folder)
        return self.history

    def _record(self, record: FitRecord, callback: Callable[..., bool | None] | None) -> bool:
        self.history.append(record)
        return bool(callback(record, self)) if callback is not None else False

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything exact resume needs (tensors on the CPU)."""
        return {
            "iteration": self.iteration,
            "seconds": self.seconds,
            "params": {k: v.detach().cpu() for k, v in self.params.tensors.items()},
            "frame": self.params.frame.as_dict(),
            "optimizer": self.optimizer.state_dict(),
            "stats": self.stats.state_dict(),
            "generator": self.generator.get_state(),
            "history": [asdict(r) for r in self.history],
            "density_log": [asdict(r) for r in self.density_log],
            "config": self.config.as_dict(),
            "initial_count": self.initial_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the parameter count may differ from the current one)."""
        frame = SceneFrame(tuple(state["frame"]["centre"]), state["frame"]["extent"], state["frame"]["amplitude"])
        self.params = GaussianParameters({k: v.to(self.device, self.dtype) for k, v in state["params"].items()},
                                         frame)
        self.optimizer = self._build_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.stats = GradientStats(self.params.count, self.device, self.dtype)
        self.stats.load_state_dict(state["stats"])
        self.generator.set_state(state["generator"])
        self.iteration = int(state["iteration"])
        self.seconds = float(state["seconds"])
        self.history = [FitRecord(**r) for r in state["history"]]
        self.density_log = [DensityReport(**r) for r in state["density_log"]]
        self.initial_count = int(state["initial_count"])
        self.max_gaussians = self.config.density.max_gaussians or 4 * self.initial_count

    def save_checkpoint(self, folder: str | Path) -> Path:
        """Write ``gaussians.safetensors`` (:meth:`Gaussians.save`), ``state.pt`` and ``config.json`` into
        ``folder`` atomically: a temp sibling folder replaces ``folder`` by rename."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            self.gaussians.save(tmp / _GAUSSIANS_FILE, metadata={"iteration": str(self.iteration),
                                                                 "frame": "geometry world (x, y, z) mm"})
            torch.save(self.state_dict(), tmp / _STATE_FILE)
            (tmp / _CONFIG_FILE).write_text(json.dumps({"config": self.config.as_dict(),
                                                        "geometry": json.loads(self.geometry.to_json())}, indent=2))
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            if folder.exists():
                os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def load_checkpoint(self, folder: str | Path) -> None:
        """Resume from :meth:`save_checkpoint`'s folder (``FileNotFoundError`` / ``ValueError`` naming it)."""
        path = Path(folder) / _STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no 3DGR checkpoint in {folder}: {path} is missing")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a truncated or foreign file
            raise ValueError(f"cannot read 3DGR checkpoint {path}: {exc}") from exc
        if not isinstance(state, dict) or "params" not in state:
            raise ValueError(f"{path} is not a 3DGR checkpoint")
        self.load_state_dict(state)
