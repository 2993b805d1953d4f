"""The one threading and fork policy of every numba kernel (medgauss._parallel).

X-GRM-style training renders in the main process (validation, a first batch) and then in forked
DataLoader workers. With numba's ``parallel=True`` (GNU OpenMP / workqueue layers) a kernel run in
the parent before the fork and again in the child is the classic crash; here the three numba
backends (``splat``, ``project``, the voxel ``forward_project`` / ``back_project``) run in the parent,
then in forked workers, forward and backward, and must give the parent's values.
"""

from __future__ import annotations

import importlib

import numba
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from medgauss import _parallel
from medgauss.ct import back_project, forward_project
from medgauss.gaussians import Gaussians
from medgauss.geometry import ConeBeamGeometry, ParallelBeamGeometry
from medgauss.render import project, splat

NUMBA_MODULES = ("medgauss.render._numba_kernels", "medgauss.render._xray_numba_kernels",
                 "medgauss.ct._numba_proj")


def _gaussians(seed: int, world: bool) -> Gaussians:
    gen = torch.Generator().manual_seed(seed)
    n = 5
    if world:  # world mm, around the isocentre
        means = (torch.rand(1, n, 3, generator=gen, dtype=torch.float64) - 0.5) * 20
        scales = torch.rand(1, n, 3, generator=gen, dtype=torch.float64) * 4 + 2
    else:  # normalised volume coordinates
        means = torch.rand(1, n, 3, generator=gen, dtype=torch.float64) * 0.6 + 0.2
        scales = torch.rand(1, n, 3, generator=gen, dtype=torch.float64) * 0.2 + 0.08
    quats = torch.randn(1, n, 4, generator=gen, dtype=torch.float64)
    inten = torch.rand(1, n, generator=gen, dtype=torch.float64) + 0.5
    return Gaussians(means, scales, quats, inten)


def _render_all(seed: int) -> dict[str, torch.Tensor]:
    """Forward values and gradients of every numba backend, plus the thread count this process uses."""
    out: dict[str, torch.Tensor] = {"threads": torch.tensor(_parallel.num_threads())}
    for name, world in (("splat", False), ("project", True)):
        g = _gaussians(seed, world)
        leaves = [t.detach().clone().requires_grad_() for t in (g.means, g.scales, g.quats, g.intensities)]
        g = Gaussians(*leaves)
        if name == "splat":
            values = splat(g, (6, 7, 8), backend="numba")
        else:
            geo = ConeBeamGeometry(dso=300.0, dsd=500.0, det_shape=(12, 13), det_spacing=(4.0, 4.0),
                                   vol_shape=(8, 8, 8), vol_spacing=(4.0, 4.0, 4.0), angles=[0.3, 2.1])
            values = project(g, geo, backend="numba")
        weights = torch.linspace(-1.0, 2.0, values.numel(), dtype=values.dtype).reshape(values.shape)
        grads = torch.autograd.grad((values * weights).sum(), leaves)
        out[name] = values.detach()
        for field, grad in zip(("means", "scales", "quats", "intensities"), grads):
            out[f"{name}.d{field}"] = grad
    geo = ParallelBeamGeometry(det_shape=(7, 9), det_spacing=(1.3, 1.1), vol_shape=(5, 6, 7),
                               vol_spacing=(1.0, 1.2, 0.9), angles=[0.2, 1.9, 3.3])
    gen = torch.Generator().manual_seed(seed)
    volume = torch.rand(1, 1, 5, 6, 7, generator=gen, dtype=torch.float64)
    out["forward_project"] = forward_project(volume, geo, backend="numba")
    out["back_project"] = back_project(out["forward_project"], geo, backend="numba")
    return out


class _Renders(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return _render_all(seed=index)


def _two_pool_threads(_: int) -> None:
    """In the worker only: make the kernels use a (fresh, per-process) pool of 2 threads, while torch's
    own operations stay single-threaded (raising torch's count in a forked child hangs its OpenMP)."""
    _parallel.num_threads = lambda: 2


@pytest.mark.parametrize("worker_threads", [1, 2])
def test_every_numba_backend_in_forked_dataloader_workers_matches_the_parent(monkeypatch, worker_threads):
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 2)  # a pool in the parent even on one core
    # Run every kernel here first: compiles them and starts this process's thread pool (with
    # NUMBA_NUM_THREADS > 1 threads), then fork workers that run them again: inline in the default
    # worker (torch.get_num_threads() == 1 there), on the worker's own new pool with 2 threads.
    expected = [_render_all(seed) for seed in range(4)]
    assert all(bool(torch.isfinite(t).all()) for item in expected for t in item.values())
    loader = DataLoader(_Renders(), batch_size=None, num_workers=2, multiprocessing_context="fork",
                        worker_init_fn=_two_pool_threads if worker_threads == 2 else None, timeout=300)
    items = list(loader)
    assert len(items) == 4
    for want, got in zip(expected, items):
        assert int(got.pop("threads")) == worker_threads
        want = {k: v for k, v in want.items() if k != "threads"}
        assert got.keys() == want.keys()
        for key in want:
            assert want[key].abs().max() > 0, key
            torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-14, msg=key)


def test_no_numba_kernel_uses_parallel_true_and_all_release_the_gil():
    """Rule 1 and 2 of the policy, for every jitted function of the numba backends."""
    seen = 0
    for name in NUMBA_MODULES:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if isinstance(value, numba.core.registry.CPUDispatcher):
                seen += 1
                assert not value.targetoptions.get("parallel", False), f"{name}.{attr} uses parallel=True"
                assert value.targetoptions.get("nogil", False), f"{name}.{attr} holds the GIL"
    assert seen >= 20


def test_thread_count_and_task_split(monkeypatch):
    from numba.np.ufunc import parallel as numba_parallel

    monkeypatch.setattr(numba_parallel, "_is_initialized", False)
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 3)
    assert _parallel.num_threads() == 3  # outside a DataLoader worker: numba's setting
    assert _parallel.num_tasks(100) == _parallel.TASKS_PER_THREAD * 3
    assert _parallel.num_tasks(2) == 2 and _parallel.num_tasks(0) == 1
    assert _parallel.num_tasks(100, max_tasks=5) == 5


def test_numba_set_num_threads_is_honoured_in_a_spawned_process():
    """medgauss-prepare-ct's workers call numba.set_num_threads(k); the kernels then use k threads."""
    import subprocess
    import sys

    code = ("import numba; numba.set_num_threads(1); from medgauss import _parallel; "
            "print(_parallel.num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "1"


def test_run_tasks_covers_every_item_once_and_reraises():
    import numpy as np

    seen = np.zeros(37, dtype=np.int64)

    def kernel(hits, task, total, num_tasks):
        for i in range(task, total, num_tasks):
            hits[i] += 1

    _parallel.run_tasks(kernel, 37, seen, tasks=5)
    assert (seen == 1).all()

    def failing(task, total, num_tasks):
        if task == 3:
            raise RuntimeError("task 3 failed")

    with pytest.raises(RuntimeError, match="task 3 failed"):
        _parallel.run_tasks(failing, 10, tasks=4)
