"""Which rank draws which sample, and from which volume: the sample-id scheme of pretraining.

A drawn sample is identified by a global integer ``sample_id``. Rank ``r`` of ``W`` draws the ids
``r, r + W, r + 2W, ...`` (:class:`ShardedSampleSampler`), and :class:`SampleSchedule` maps every id to a
volume so that each rank reads only its shard of the volumes while every volume is still drawn equally
often per epoch (the scheme is described in :mod:`medgauss.data.dataset`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from medgauss.data.datalist import shard_datalist

__all__ = ["SampleSchedule", "ShardedSampleSampler", "distributed_rank", "check_rank"]


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised ``torch.distributed`` process group, else ``(0, 1)``.

    Accelerate initialises the group when the ``Accelerator`` is created, so a dataset built after it
    picks up the launch's rank.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank()), int(torch.distributed.get_world_size())
    return 0, 1


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


# ---------------------------------------------------------------------------------------- schedule
class SampleSchedule:
    """Which volume each global sample id is cropped from, with volumes sharded over ranks.

    See the module docstring for the scheme. Pure function of the constructor arguments and the id.

    Args:
        num_volumes: ``N``, volumes in the datalist.
        samples_per_epoch: ids per epoch, a positive multiple ``s N`` of ``num_volumes``.
        world_size: ``W``, ranks drawing ids ``r, r + W, ...``.
        seed: data seed.

    Raises:
        ValueError: ``num_volumes < 1``, ``world_size < 1`` or ``samples_per_epoch`` not a positive
            multiple of ``num_volumes``.
    """

    def __init__(self, num_volumes: int, samples_per_epoch: int, *, world_size: int = 1, seed: int = 41) -> None:
        n, spe, w = int(num_volumes), int(samples_per_epoch), int(world_size)
        if n < 1:
            raise ValueError(f"num_volumes must be >= 1, got {num_volumes}")
        if w < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if spe < n or spe % n:
            raise ValueError(
                f"samples_per_epoch must be a positive multiple of the number of volumes ({n}), "
                f"got {samples_per_epoch}"
            )
        self.num_volumes, self.samples_per_epoch, self.world_size, self.seed = n, spe, w, int(seed)
        self.samples_per_volume = spe // n
        self._owned, self._shared = divmod(n, w)  # q own volumes per rank, m shared
        self._order: tuple[tuple[int, int], np.ndarray] | None = None  # (epoch, rank) -> volume per draw

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_order": None}  # a per-process memo: DataLoader workers rebuild it

    def own_volumes(self, rank: int) -> list[int]:
        """Volume indices only ``rank`` reads (disjoint across ranks)."""
        check_rank(rank, self.world_size)
        split = self._owned * self.world_size
        return shard_datalist(range(split), rank, self.world_size) if split else []

    def shared_volumes(self) -> list[int]:
        """Volume indices every rank may read: the last ``N mod W`` (none when ``W`` divides ``N``)."""
        return list(range(self._owned * self.world_size, self.num_volumes))

    def rank_volumes(self, rank: int) -> list[int]:
        """Every volume index ``rank`` may draw from: its own volumes, then the shared ones (sorted)."""
        return sorted(self.own_volumes(rank) + self.shared_volumes())

    def _first_position(self, epoch: int, rank: int) -> int:
        """Position in ``epoch`` of the rank's first id: ids ``e S + p`` with ``(e S + p) mod W = rank``."""
        return (rank - epoch * self.samples_per_epoch) % self.world_size

    def _draws(self, epoch: int, rank: int) -> int:
        return len(range(self._first_position(epoch, rank), self.samples_per_epoch, self.world_size))

    def _rank_order(self, epoch: int, rank: int) -> np.ndarray:
        """Volume index of each of ``rank``'s draws in ``epoch``, in id order."""
        w, s, q = self.world_size, self.samples_per_volume, self._owned
        own = np.tile(np.asarray(self.own_volumes(rank), dtype=np.int64), s)
        if self._shared:
            shared = np.tile(np.asarray(self.shared_volumes(), dtype=np.int64), s)
            pool = shared[np.random.default_rng([self.seed, epoch, w, w]).permutation(len(shared))]
            extra = [self._draws(epoch, r) - s * q for r in range(w)]  # sums to s m
            start = sum(extra[:rank])
            own = np.concatenate([own, pool[start : start + extra[rank]]])
        # One process reproduces the pre-sharding order exactly (volume = permutation[p] mod N).
        entropy = [self.seed, epoch] if w == 1 else [self.seed, epoch, w, rank]
        return own[np.random.default_rng(entropy).permutation(len(own))]

    def volume_index(self, sample_id: int) -> int:
        """Volume that sample ``sample_id`` (drawn by rank ``sample_id mod W``) is cropped from."""
        sample_id = int(sample_id)
        if sample_id < 0:
            raise IndexError(f"sample_id must be >= 0, got {sample_id}")
        epoch, position = divmod(sample_id, self.samples_per_epoch)
        rank = sample_id % self.world_size
        if self._order is None or self._order[0] != (epoch, rank):
            self._order = ((epoch, rank), self._rank_order(epoch, rank))
        return int(self._order[1][(position - self._first_position(epoch, rank)) // self.world_size])


class ShardedSampleSampler(Sampler[int]):
    """Infinite stream of sample ids for one rank: ``rank + world_size * k`` for ``k = start, start+1, ...``.

    Args:
        rank, world_size: this process and the number of processes.
        start: samples this rank has already consumed (resume position).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        check_rank(rank, world_size)
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.rank, self.world_size, self.start = rank, world_size, start

    def __iter__(self) -> Iterator[int]:
        k = self.start
        while True:
            yield self.rank + self.world_size * k
            k += 1
