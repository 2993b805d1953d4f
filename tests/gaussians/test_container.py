"""Gaussians container: validation, algebra against scipy's rotations, selection, persistence."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from medgauss.gaussians import Gaussians


def random_gaussians(b=2, n=5, dtype=torch.float64, seed=0) -> Gaussians:
    gen = torch.Generator().manual_seed(seed)
    return Gaussians(
        torch.rand(b, n, 3, generator=gen, dtype=dtype),
        torch.rand(b, n, 3, generator=gen, dtype=dtype) * 0.2 + 0.01,
        torch.randn(b, n, 4, generator=gen, dtype=dtype),
        torch.rand(b, n, generator=gen, dtype=dtype),
    )


def test_quaternions_are_normalised_and_covariance_matches_scipy():
    g = random_gaussians()
    assert torch.allclose(g.quats.norm(dim=-1), torch.ones(2, 5, dtype=torch.float64))
    q = g.quats.reshape(-1, 4).numpy()
    rot = Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix()  # scipy is (x, y, z, w)
    s2 = g.scales.reshape(-1, 3).numpy() ** 2
    expected = np.einsum("nij,nj,nkj->nik", rot, s2, rot)
    np.testing.assert_allclose(g.covariance().reshape(-1, 3, 3).numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(g.precision().reshape(-1, 3, 3).numpy(), np.linalg.inv(expected), rtol=1e-9)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("means", torch.zeros(2, 5, 2), "means must have shape"),
        ("scales", torch.ones(2, 4, 3), "scales must have shape"),
        ("quats", torch.ones(2, 5, 3), "quats must have shape"),
        ("intensities", torch.ones(2, 5, 1), "intensities must have shape"),
        ("intensities", torch.ones(3, 5), "intensities must have shape"),
        ("scales", -torch.ones(2, 5, 3), "scales must be strictly positive"),
        ("scales", torch.zeros(2, 5, 3), "scales must be strictly positive"),
        ("quats", torch.zeros(2, 5, 4), "zero-norm quaternion"),
        ("means", torch.full((2, 5, 3), float("nan")), "means contains non-finite"),
        ("intensities", torch.full((2, 5), float("inf")), "intensities contains non-finite"),
        ("means", torch.zeros(2, 5, 3, dtype=torch.int64), "floating-point"),
        ("scales", torch.ones(2, 5, 3, dtype=torch.float64), "dtype"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(field, value, match):
    args = {"means": torch.rand(2, 5, 3), "scales": torch.ones(2, 5, 3) * 0.1,
            "quats": torch.tensor([1.0, 0, 0, 0]).repeat(2, 5, 1), "intensities": torch.ones(2, 5)}
    args[field] = value
    with pytest.raises(ValueError, match=match):
        Gaussians(**args)


def test_indexing_select_and_cat():
    g = random_gaussians(b=3, n=6)
    sub = g[:, torch.tensor([0, 2])]
    assert sub.num_gaussians == 2 and sub.batch_size == 3
    assert torch.equal(sub.means, g.means[:, [0, 2]])
    assert g[1:2].batch_size == 1
    mask = torch.tensor([True, False, True, True, False, False])
    assert g[:, mask].num_gaussians == 3
    with pytest.raises(IndexError):
        g[0]
    idx = torch.tensor([[5, 0], [1, 1], [3, 2]])
    sel = g.select(idx)
    for b in range(3):
        assert torch.equal(sel.scales[b], g.scales[b, idx[b]])
        assert torch.equal(sel.intensities[b], g.intensities[b, idx[b]])
    both = Gaussians.cat([g, sub], dim=1)
    assert both.num_gaussians == 8 and torch.equal(both.means[:, 6:], sub.means)
    assert Gaussians.cat([g, g], dim=0).batch_size == 6
    with pytest.raises(ValueError, match="indices must have shape"):
        g.select(torch.zeros(2, 2, dtype=torch.long))


def test_to_detach_keep_values_and_gradients_flow_through_covariance():
    g = random_gaussians(dtype=torch.float32)
    g64 = g.to(torch.float64)
    assert g64.dtype == torch.float64 and torch.allclose(g64.means.float(), g.means)
    scales = g64.scales.clone().requires_grad_()
    g2 = Gaussians(g64.means, scales, g64.quats, g64.intensities)
    g2.covariance().sum().backward()
    assert scales.grad is not None and torch.isfinite(scales.grad).all()
    assert not g2.detach().scales.requires_grad


def test_save_load_round_trip(tmp_path):
    g = random_gaussians(dtype=torch.float32)
    path = tmp_path / "g.safetensors"
    g.save(path, metadata={"source": "test"})
    h = Gaussians.load(path)
    for f in ("means", "scales", "intensities"):
        assert torch.equal(getattr(g, f), getattr(h, f))
    # quats are re-normalised on load, which may move the last bit of an already-unit float32 quaternion
    assert torch.allclose(g.quats, h.quats, rtol=0, atol=1e-7)
    assert not list(tmp_path.glob("*.tmp"))


def test_load_reports_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        Gaussians.load(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="bad.safetensors"):
        Gaussians.load(bad)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a medgauss Gaussians file"):
        Gaussians.load(other)
