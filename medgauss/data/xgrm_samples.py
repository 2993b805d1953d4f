"""X-GRM training samples over prepared reconstruction cases, addressed by a global sample id.

Each sample id of :class:`XGRMSampleDataset` is one training example of X-GRM: a case, ``K`` input views, a
random sub-box of the grid and the held-out views its render loss compares. Everything is a pure function of
``(seed, sample id)`` (and of the dataset's constructor arguments), so the engine's resume by skipping sample
ids repeats an uninterrupted run exactly:

* **case**: :class:`~medgauss.data.sampling.SampleSchedule` (every case drawn equally often per epoch; on ``W``
  ranks each rank reads its shard of the cases, as pretraining does);
* **K** (number of input views): drawn from ``view_counts`` once per *batch group*, the ``batch_size`` ids a
  rank puts in one micro-batch: ``group = sample_id // (world_size * batch_size)``. Rank ``r`` draws ids
  ``r + W k`` (:class:`~medgauss.data.sampling.ShardedSampleSampler`) and batches ``k = jB .. jB + B - 1``, so
  every id of micro-batch ``j`` has group ``j``: ``K`` is constant within a batch (and the same on every rank);
* **input views**: ``K`` of the case's ``V`` views, evenly spaced (:func:`medgauss.ct.dataset.evenly_spaced_views`)
  and rotated by a random start offset ``o`` in ``[0, V)``: ``sorted((o + evenly_spaced_views(V, K)) mod V)``;
* **sub-box**: ``box_fraction`` of the grid per axis (X-GRM trains on ``M/4 x N/4 x L/4`` sub-volumes), at a
  uniformly random start (:func:`medgauss.nets.voxgs.random_box_starts`);
* **held-out render views**: ``render_views`` of the other ``V - K`` views, without replacement (the views
  :class:`medgauss.losses.XGRMLoss` renders besides the input views).

Items are dicts (see :meth:`XGRMSampleDataset.__getitem__`) holding a geometry object, so batches need
:func:`collate_xgrm_samples` (the :class:`medgauss.engines.XGRMTask` hands it to the engine's DataLoader).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medgauss.ct.dataset import CTReconstructionDataset, evenly_spaced_views, load_case
from medgauss.data.sampling import SampleSchedule, ShardedSampleSampler, check_rank, distributed_rank
from medgauss.geometry import CircularGeometry

__all__ = ["XGRM_VIEW_COUNTS", "XGRMSampleDataset", "collate_xgrm_samples", "rotated_even_views", "box_size_for"]

XGRM_VIEW_COUNTS = (6, 8, 10)
"""Input view counts X-GRM trains with (drawn per batch)."""


def rotated_even_views(total: int, count: int, offset: int) -> list[int]:
    """``count`` evenly spaced view indices of ``total``, rotated by ``offset``, ascending.

    ``sorted((offset + evenly_spaced_views(total, count)) mod total)``; ``offset = 0`` gives
    :func:`~medgauss.ct.dataset.evenly_spaced_views` itself.
    """
    return sorted((int(offset) + i) % total for i in evenly_spaced_views(total, count))


def box_size_for(grid_shape: Sequence[int], box_fraction: float) -> tuple[int, int, int]:
    """Sub-box ``(d, h, w)``: ``max(1, round(box_fraction * n))`` voxels per grid axis ``n``."""
    return tuple(max(1, int(round(box_fraction * int(n)))) for n in grid_shape)  # type: ignore[return-value]


def _int_tuple(name: str, values: Any) -> tuple[int, ...]:
    try:
        out = tuple(values)
    except TypeError as exc:
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {values!r}") from exc
    if not out or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in out):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {values!r}")
    return tuple(int(v) for v in out)


class XGRMSampleDataset(Dataset):
    """Random X-GRM training samples of the prepared cases in ``root`` (see the module docstring).

    Args:
        root: a dataset folder written by ``medgauss-prepare-ct`` (e.g. ``build_xgrm_dataset(...).train_dir``).
        batch_size: samples per rank per micro-batch (the engine's ``batch_size``): ``K`` is drawn once per
            such group of ids.
        view_counts: the input view counts ``K`` to draw from (each at most the cases' view count minus
            ``render_views``).
        box_fraction: sub-box edge as a fraction of each grid axis (X-GRM: 1/4), in ``(0, 1]``.
        render_views: held-out views per sample for the render loss (``0``: none).
        samples_per_epoch: ids per epoch, a multiple of the number of cases (default: one per case).
        seed: data seed.
        cases: restrict to these case ids (default: every case of the folder).
        rank, world_size: the process this dataset serves and the number of processes drawing ids (default:
            from ``torch.distributed``, :func:`~medgauss.data.sampling.distributed_rank`).

    Raises:
        ValueError / FileNotFoundError: a bad argument (naming it), an unreadable folder or case, cases whose
            grids, detectors or view counts differ, or a view count the cases cannot serve.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        batch_size: int,
        view_counts: Sequence[int] = XGRM_VIEW_COUNTS,
        box_fraction: float = 0.25,
        render_views: int = 4,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        cases: Sequence[str] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.view_counts = _int_tuple("view_counts", view_counts)
        if isinstance(box_fraction, bool) or not isinstance(box_fraction, numbers.Real) or not 0 < box_fraction <= 1:
            raise ValueError(f"box_fraction must be a number in (0, 1], got {box_fraction!r}")
        if isinstance(render_views, bool) or not isinstance(render_views, numbers.Integral) or render_views < 0:
            raise ValueError(f"render_views must be an int >= 0, got {render_views!r}")
        if rank is None or world_size is None:
            found = distributed_rank()
            rank = found[0] if rank is None else rank
            world_size = found[1] if world_size is None else world_size
        check_rank(int(rank), int(world_size))
        self.cases = CTReconstructionDataset(root, cases=None if cases is None else list(cases))
        self.root = self.cases.root
        headers = [load_case(self.root / c)["geometry"] for c in self.cases.case_ids]
        first = headers[0]
        for case_id, g in zip(self.cases.case_ids, headers):
            if (type(g), g.num_views, tuple(g.det_shape), tuple(g.vol_shape)) != (
                    type(first), first.num_views, tuple(first.det_shape), tuple(first.vol_shape)):
                raise ValueError(f"{self.root}: case {case_id!r} has {g.num_views} views, detector {g.det_shape} and "
                                 f"grid {g.vol_shape}; case {self.cases.case_ids[0]!r} has {first.num_views}, "
                                 f"{first.det_shape} and {first.vol_shape} (batched cases must agree)")
        self.num_views = first.num_views
        too_many = [k for k in self.view_counts if k + int(render_views) > self.num_views]
        if too_many:
            raise ValueError(f"view_counts {list(too_many)} plus render_views={render_views} exceed the "
                             f"{self.num_views} views of the cases in {self.root}")
        self.grid_shape = tuple(int(n) for n in first.vol_shape)
        self.box_size = box_size_for(self.grid_shape, float(box_fraction))
        n = len(self.cases)
        self.schedule = SampleSchedule(n, n if samples_per_epoch is None else int(samples_per_epoch),
                                       world_size=int(world_size), seed=int(seed))
        self.batch_size, self.box_fraction, self.render_views = int(batch_size), float(box_fraction), int(render_views)
        self.samples_per_epoch, self.seed = self.schedule.samples_per_epoch, int(seed)
        self.rank, self.world_size = int(rank), int(world_size)

    @property
    def case_ids(self) -> list[str]:
        return list(self.cases.case_ids)

    def __len__(self) -> int:
        """Samples per epoch over all ranks (the sampler is infinite; this is the epoch length)."""
        return self.samples_per_epoch

    def batch_group(self, sample_id: int) -> int:
        """Index of the micro-batch (of its rank) that ``sample_id`` falls in: ``sample_id // (W batch_size)``."""
        return int(sample_id) // (self.world_size * self.batch_size)

    def num_input_views(self, sample_id: int) -> int:
        """``K`` of ``sample_id``: one draw from ``view_counts`` per batch group."""
        rng = np.random.default_rng([self.seed, 1, self.batch_group(sample_id)])
        return self.view_counts[int(rng.integers(len(self.view_counts)))]

    def draw(self, sample_id: int) -> dict[str, Any]:
        """The random choices of ``sample_id`` (no file is read).

        Returns:
            ``{"case_index": int, "input_views": list[int] (K, ascending), "view_offset": int,
            "box_start": list[int] (d, h, w), "heldout_views": list[int] (render_views)}``.
        """
        sample_id = int(sample_id)
        if sample_id < 0:
            raise IndexError(f"sample_id must be >= 0, got {sample_id}")
        k = self.num_input_views(sample_id)
        rng = np.random.default_rng([self.seed, 2, sample_id])
        offset = int(rng.integers(self.num_views))
        inputs = rotated_even_views(self.num_views, k, offset)
        start = [int(rng.integers(g - b + 1)) for g, b in zip(self.grid_shape, self.box_size)]
        rest = sorted(set(range(self.num_views)) - set(inputs))
        held = [rest[i] for i in rng.permutation(len(rest))[: self.render_views]]
        return {"case_index": self.schedule.volume_index(sample_id), "input_views": inputs, "view_offset": offset,
                "box_start": start, "heldout_views": held}

    def __getitem__(self, sample_id: int) -> dict[str, Any]:
        """One sample.

        Returns:
            ``{"sample_id": int, "case_id": str, "volume": [1, D, H, W] float32 (ground truth on the whole grid),
            "projections": [K, rows, cols] float32 (the input views' measurements), "geometry": the case's
            geometry with ALL its views, "input_views": [K] int64, "heldout_views": [render_views] int64
            (indices into the geometry's views), "box_start": [3] int64, "box_size": [3] int64,
            "affine": [4, 4] float64 (voxel -> scanner mm)}``.
        """
        sample_id = int(sample_id)
        if sample_id % self.world_size != self.rank:
            raise ValueError(f"sample_id {sample_id} belongs to rank {sample_id % self.world_size} of "
                             f"{self.world_size}, but this dataset serves rank {self.rank}; use "
                             f"ShardedSampleSampler({self.rank}, {self.world_size})")
        choice = self.draw(sample_id)
        case_id = self.cases.case_ids[choice["case_index"]]
        case = load_case(self.root / case_id, mmap=True)
        return {
            "sample_id": sample_id,
            "case_id": case_id,
            "volume": torch.from_numpy(np.array(case["volume"], dtype=np.float32))[None],
            "projections": torch.from_numpy(np.array(case["projections"][choice["input_views"]], dtype=np.float32)),
            "geometry": case["geometry"],
            "input_views": torch.tensor(choice["input_views"], dtype=torch.long),
            "heldout_views": torch.tensor(choice["heldout_views"], dtype=torch.long),
            "box_start": torch.tensor(choice["box_start"], dtype=torch.long),
            "box_size": torch.tensor(self.box_size, dtype=torch.long),
            "affine": torch.as_tensor(case["affine"], dtype=torch.float64),
        }

    def sampler(self, start: int = 0) -> ShardedSampleSampler:
        """The sample-id stream of this dataset's rank from its ``start``-th sample (resume position)."""
        return ShardedSampleSampler(self.rank, self.world_size, start=start)


_STACKED = ("volume", "projections", "input_views", "heldout_views", "box_start", "affine")


def collate_xgrm_samples(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch :class:`XGRMSampleDataset` items (``DataLoader(..., collate_fn=collate_xgrm_samples)``).

    Returns:
        ``{"sample_id": [B] int64, "case_id": list[str], "volume": [B, 1, D, H, W], "projections": [B, K, rows,
        cols], "input_views": [B, K] int64, "heldout_views": [B, M] int64, "box_start": [B, 3] int64,
        "box_size": (d, h, w), "affine": [B, 4, 4] float64, "geometry": list of B full geometries}``.

    Raises:
        ValueError: no items, or items whose shapes differ (``K``, held-out count, grid, detector, box), naming
            their sample ids.
    """
    if len(items) == 0:
        raise ValueError("collate_xgrm_samples needs at least one item")
    ids = [int(item["sample_id"]) for item in items]
    counts = [len(item["input_views"]) for item in items]
    if len(set(counts)) > 1:
        raise ValueError(f"cannot batch samples {ids} with different numbers of input views {counts}: K must be "
                         "constant within a batch (XGRMSampleDataset draws one K per batch_size ids)")
    for key in (*_STACKED, "box_size"):
        shapes = [tuple(item[key].shape) for item in items]
        if len(set(shapes)) > 1:
            raise ValueError(f"cannot batch samples {ids} with different {key} shapes {shapes}")
    sizes = {tuple(int(v) for v in item["box_size"]) for item in items}
    if len(sizes) > 1:
        raise ValueError(f"cannot batch samples {ids} with different box sizes {sorted(sizes)}")
    geometries: list[CircularGeometry] = [item["geometry"] for item in items]
    kinds = {(type(g).__name__, g.num_views, tuple(g.det_shape), tuple(g.vol_shape)) for g in geometries}
    if len(kinds) > 1:
        raise ValueError(f"cannot batch samples {ids} whose geometries differ in kind, views, detector or grid: "
                         f"{sorted(kinds)}")
    batch = {key: torch.stack([item[key] for item in items]) for key in _STACKED}
    batch.update(sample_id=torch.tensor(ids, dtype=torch.long), case_id=[item["case_id"] for item in items],
                 box_size=sizes.pop(), geometry=geometries)
    return batch

