"""The one threading and fork policy of every numba kernel in medgauss.

It covers the splat (:mod:`medgauss.render._numba`), the X-ray projection of Gaussians
(:mod:`medgauss.render._xray_numba`) and the voxel projectors (:mod:`medgauss.ct._numba_proj`):

1. **No kernel is compiled with** ``parallel=True``. Each of numba's threading layers is unsafe
   somewhere: GNU OpenMP (the ``omp`` layer on Linux) cannot run again in a child forked after the
   parent ran a parallel region (the child aborts or hangs), ``workqueue`` aborts when two threads
   enter it at once, and TBB is an optional extra. Yet this is exactly how training calls the kernels:
   the main process renders (validation, a first batch), then a ``torch.utils.data.DataLoader`` with
   ``num_workers > 0`` forks its workers (the default start method on Linux), which render again.
   (Serial compilation is also several times faster than ``parallel=True``'s.)
2. **Kernels are serial** ``nogil`` **functions over an interleaved share of their work items**: their
   last three arguments are ``(task, total, num_tasks)`` and they process the items
   ``range(task, total, num_tasks)`` (slabs, rows, tiles, Gaussians, ...). Every item writes only
   its own outputs (or the task's private buffer), so results never depend on the number of tasks or
   threads, and interleaved ranges give every task a like share of work that varies smoothly.
3. :func:`run_tasks` **runs the tasks on this process's thread pool** (the kernels release the GIL), a
   few tasks per thread so that the pool balances what interleaving does not. The pool belongs to
   the process that created it: a forked child discards the inherited one (whose threads did not
   survive the fork) and creates its own on first use.
4. **Threads:** numba's thread count in an ordinary process: ``numba.set_num_threads(k)`` if the
   calling thread has called it, else ``NUMBA_NUM_THREADS`` (the environment variable, default all
   cores); this module never starts numba's own threading layer to find out. In a DataLoader
   worker, ``torch.get_num_threads()``, which DataLoader sets to 1 in each worker so that
   ``num_workers`` processes do not oversubscribe the cores: the kernels follow the same rule as
   torch's own operations there. (Do not raise it in a forked worker: torch's own OpenMP operations
   then hang in the child, whatever medgauss does.)

The pool only needs the kernels to release the GIL (``nogil=True``); numba is read for its settings.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import get_worker_info

__all__ = ["num_threads", "num_tasks", "run_tasks", "map_tasks", "TASKS_PER_THREAD"]

# Tasks handed to the pool per worker thread (load balancing).
TASKS_PER_THREAD = 2


def _numba_threads() -> int:
    try:
        import numba
        from numba.np.ufunc import parallel as numba_parallel
    except ImportError:  # pragma: no cover - numba is a dependency; this only keeps the policy importable
        return max(1, os.cpu_count() or 1)
    if getattr(numba_parallel, "_is_initialized", False):  # someone started it, e.g. numba.set_num_threads
        return max(1, int(numba.get_num_threads()))
    return max(1, int(numba.config.NUMBA_NUM_THREADS))


def num_threads() -> int:
    """Worker threads the numba kernels use in this process (see the module docstring, rule 4)."""
    if get_worker_info() is not None:
        return max(1, torch.get_num_threads())
    return _numba_threads()


def num_tasks(total: int, max_tasks: int | None = None) -> int:
    """How many interleaved tasks share ``range(total)``: at most ``max_tasks`` (default
    ``TASKS_PER_THREAD * num_threads()``), at least one, never an empty one when ``total > 0``."""
    limit = TASKS_PER_THREAD * num_threads() if max_tasks is None else int(max_tasks)
    return max(1, min(int(total), limit))


_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
_POOL_THREADS = 0


def _forget_pool_after_fork() -> None:
    """In a forked child: the parent's pool threads do not exist here (and the lock may be held)."""
    global _LOCK, _POOL, _POOL_THREADS
    _LOCK = threading.Lock()
    _POOL, _POOL_THREADS = None, 0


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _pool(threads: int) -> ThreadPoolExecutor:
    """This process's pool, with at least ``threads`` workers (re-created when more are asked for)."""
    global _POOL, _POOL_THREADS
    with _LOCK:
        if _POOL is None or _POOL_THREADS < threads:
            old = _POOL
            _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="medgauss-numba")
            _POOL_THREADS = threads
            if old is not None:
                old.shutdown(wait=False)
        return _POOL


def map_tasks(fn: Callable[[int], None], tasks: int) -> None:
    """Call ``fn(t)`` for every ``t < tasks`` concurrently on this process's pool and wait for all.

    With one task or one thread everything runs in the calling thread. The first exception raised by
    a task is re-raised here (after every task has finished).
    """
    threads = num_threads()
    if tasks <= 1 or threads == 1:
        for t in range(tasks):
            fn(t)
        return
    futures = [_pool(threads).submit(fn, t) for t in range(tasks)]
    error: BaseException | None = None
    for future in futures:
        exc = future.exception()
        if exc is not None and error is None:
            error = exc
    if error is not None:
        raise error


def run_tasks(kernel: Callable[..., None], total: int, *args: object, tasks: int | None = None) -> None:
    """Run ``kernel(*args, t, total, n)`` for every ``t < n`` concurrently, ``n = tasks or num_tasks(total)``.

    ``kernel`` is a serial ``nogil`` numba function that processes ``range(t, total, n)``.
    """
    n = num_tasks(total) if tasks is None else max(1, int(tasks))
    map_tasks(lambda t: kernel(*args, t, total, n), n)
