"""Adaptive density control for per-case Gaussian reconstruction: clone, split, prune, bounded count.

The idea is 3DGS's, as R²-Gaussian adapts it to additive X-ray densities; the rules and code are ours:

* **Statistics:** each step adds the norm of every Gaussian's positional gradient (scene units, see
  :mod:`medgauss.recon.gaussian.params`) to a running sum. 3DGS uses the screen-space gradient instead.
  That suits one camera per step; here a step renders several views, or a voxel grid.
* **Candidates:** Gaussians whose mean gradient exceeds ``grad_ratio`` times the mean over all Gaussians.
  A ratio, not 3DGS's absolute threshold, because the size of the gradient depends on the projections'
  units and the loss, and an absolute threshold would need retuning for every dataset.
* **Clone:** a candidate whose largest scale is at most ``split_scale`` (scene units) is duplicated. Both
  copies get half the intensity, so the rendered volume is unchanged at the moment of cloning.
* **Split:** a larger candidate is replaced by two children.
  - Centres are drawn from the parent's own distribution.
  - Scales are divided by ``split_factor`` (1.6, as in 3DGS).
  - Each child gets intensity ``I * split_factor^3 / 2``, so the pair has the parent's mass (its integral
    ``I (2 pi)^{3/2} s_x s_y s_z``). Mass is what every projection measures.
* **Prune:** a Gaussian is removed when any of these holds:
  - its intensity is below ``min_intensity`` times the case's amplitude;
  - its largest scale is above ``max_scale``, or its smallest below ``min_scale`` (degenerate);
  - its centre has left the reconstruction box by more than ``box_margin`` (scene units).
* **Bounded count:** at most ``max_gaussians`` after any step. When candidates would exceed it, those with
  the largest gradients win.

Adam's moment estimates follow the Gaussians. Kept rows keep theirs; new rows start at zero.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from medgauss.gaussians.quaternions import quat_to_rotmat
from medgauss.recon.gaussian.params import PARAM_NAMES, GaussianParameters, _softplus_inverse

__all__ = ["DensityControl", "GradientStats", "DensityReport"]


@dataclass
class DensityControl:
    """When and how the Gaussians are cloned, split and pruned (see the module docstring).

    Attributes:
        every: iterations between two density steps (0 disables density control).
        start: first iteration at which density control may act.
        stop: last iteration at which it may act. ``None`` means half of the fit's iterations; pruning keeps
            acting until then too.
        grad_ratio: densify Gaussians whose mean positional gradient exceeds this many times the mean.
        split_scale: largest scale (fraction of the box edge) up to which a candidate is cloned, not split.
        split_factor: scale divisor of split children.
        min_intensity: prune below this fraction of the amplitude.
        max_scale, min_scale: prune above / below these scales (fractions of the box edge).
        box_margin: prune centres this far outside the box (fraction of its longest edge).
        max_gaussians: the most Gaussians at any time. ``None`` means 4x the initial count.
    """

    every: int = 100
    start: int = 100
    stop: int | None = None
    grad_ratio: float = 2.0
    split_scale: float = 0.02
    split_factor: float = 1.6
    min_intensity: float = 1e-3
    max_scale: float = 0.5
    min_scale: float = 1e-4
    box_margin: float = 0.1
    max_gaussians: int | None = None

    def __post_init__(self) -> None:
        for name in ("every", "start"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"density.{name} must be a non-negative int, got {value!r}")
        if self.stop is not None and (not isinstance(self.stop, int) or self.stop < 0):
            raise ValueError(f"density.stop must be None or a non-negative int, got {self.stop!r}")
        for name in ("grad_ratio", "split_scale", "split_factor", "max_scale", "min_scale"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise ValueError(f"density.{name} must be positive, got {getattr(self, name)!r}")
        if not self.split_factor > 1:
            raise ValueError(f"density.split_factor must exceed 1, got {self.split_factor}")
        if not 0 <= self.min_intensity < 1:
            raise ValueError(f"density.min_intensity must lie in [0, 1), got {self.min_intensity}")
        if self.max_gaussians is not None and (not isinstance(self.max_gaussians, int) or self.max_gaussians < 1):
            raise ValueError(f"density.max_gaussians must be None or a positive int, got {self.max_gaussians!r}")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def active(self, iteration: int, iterations: int) -> bool:
        """Whether a density step runs after ``iteration`` (1-based) of a fit of ``iterations``."""
        stop = iterations // 2 if self.stop is None else self.stop
        return self.every > 0 and self.start <= iteration <= stop and iteration % self.every == 0


@dataclass
class DensityReport:
    """What one density step did: Gaussians cloned, split (parents), pruned, and the count after it."""

    iteration: int
    cloned: int
    split: int
    pruned: int
    count: int


class GradientStats:
    """Running sum of each Gaussian's positional-gradient norm, and of the steps it was counted in."""

    def __init__(self, count: int, device: torch.device, dtype: torch.dtype) -> None:
        self.total = torch.zeros(count, dtype=dtype, device=device)
        self.steps = 0

    def add(self, mean_grad: Tensor | None) -> None:
        if mean_grad is not None:
            self.total += mean_grad.detach().norm(dim=-1)
            self.steps += 1

    def mean(self) -> Tensor:
        return self.total / max(self.steps, 1)

    def state_dict(self) -> dict[str, object]:
        return {"total": self.total.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.total = state["total"].clone()  # type: ignore[union-attr]
        self.steps = int(state["steps"])  # type: ignore[arg-type]


def _adam_state_rows(optimizer: torch.optim.Optimizer, old: Tensor, keep: Tensor, added: int) -> dict[str, Tensor]:
    state = optimizer.state.pop(old, {})
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape[:1] == old.shape[:1] and value.ndim == old.ndim:
            zeros = value.new_zeros((added, *value.shape[1:]))
            out[key] = torch.cat((value[keep], zeros), dim=0)
        else:  # Adam's scalar step count
            out[key] = value
    return out


def rebuild(params: GaussianParameters, optimizer: torch.optim.Optimizer, keep: Tensor,
            new_rows: dict[str, Tensor]) -> None:
    """Replace every parameter by ``cat(old[keep], new_rows[name])`` in place, in ``params`` and ``optimizer``."""
    added = int(new_rows["means"].shape[0])
    for group in optimizer.param_groups:
        old = group["params"][0]
        name = group["name"]
        fresh = torch.cat((old.detach()[keep], new_rows[name].to(old)), dim=0).requires_grad_(True)
        state = _adam_state_rows(optimizer, old, keep, added)
        group["params"][0] = fresh
        if state:
            optimizer.state[fresh] = state
        params.tensors[name] = fresh


def density_step(control: DensityControl, params: GaussianParameters, optimizer: torch.optim.Optimizer,
                 stats: GradientStats, generator: torch.Generator, iteration: int,
                 max_gaussians: int) -> DensityReport:
    """Clone / split the candidates and prune the rest of the rules, in place (see the module docstring)."""
    t = {k: v.detach() for k, v in params.tensors.items()}
    intens = params.intensities()
    scales = params.scales_scene()
    prune = (intens < control.min_intensity * params.frame.amplitude)
    prune |= scales.max(dim=-1).values > control.max_scale
    prune |= scales.min(dim=-1).values < control.min_scale
    prune |= (t["means"].abs() > 0.5 + control.box_margin).any(dim=-1)
    if bool(prune.all()):  # never remove the last Gaussian: keep the brightest
        prune[int(intens.argmax())] = False
    grad = stats.mean()
    cand = (grad > control.grad_ratio * grad.mean()) & ~prune
    budget = max_gaussians - int((~prune).sum())
    order = torch.argsort(grad[cand], descending=True)
    chosen = torch.nonzero(cand).flatten()[order][:max(budget, 0)]
    big = scales[chosen].max(dim=-1).values > control.split_scale
    clone_idx, split_idx = chosen[~big], chosen[big]
    # Clones: a copy with half the intensity, and the original halved too.
    half = _softplus_inverse(intens[clone_idx] / 2 / params.frame.amplitude)
    raw = t["raw_intensities"].clone()
    raw[clone_idx] = half
    clones = {"means": t["means"][clone_idx], "log_scales": t["log_scales"][clone_idx],
              "quats": t["quats"][clone_idx], "raw_intensities": half}
    # Splits: two children drawn from the parent, smaller by split_factor, together the parent's mass.
    parents = {k: v[split_idx].repeat(2, *([1] * (v.ndim - 1))) for k, v in t.items()}
    rot = quat_to_rotmat(parents["quats"] / parents["quats"].norm(dim=-1, keepdim=True))
    noise = torch.randn(parents["means"].shape, generator=generator, dtype=torch.float64).to(rot)
    offsets = (rot @ (noise * torch.exp(parents["log_scales"])).unsqueeze(-1)).squeeze(-1)
    child_intens = intens[split_idx].repeat(2) * control.split_factor ** 3 / 2
    children = {"means": parents["means"] + offsets,
                "log_scales": parents["log_scales"] - math.log(control.split_factor),
                "quats": parents["quats"],
                "raw_intensities": _softplus_inverse(child_intens / params.frame.amplitude)}
    remove = prune.clone()
    remove[split_idx] = True
    keep = torch.nonzero(~remove).flatten()
    with torch.no_grad():
        params.tensors["raw_intensities"].copy_(raw)
    new_rows = {k: torch.cat((clones[k], children[k]), dim=0) for k in PARAM_NAMES}
    rebuild(params, optimizer, keep, new_rows)
    stats.total = torch.zeros(params.count, dtype=stats.total.dtype, device=stats.total.device)
    stats.steps = 0
    return DensityReport(iteration, int(clone_idx.numel()), int(split_idx.numel()), int(prune.sum()), params.count)
