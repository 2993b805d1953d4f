"""HU -> attenuation, noiseless line integrals of a water block, photon noise statistics and seeding."""

import pytest
import torch

from medgauss.ct import MU_WATER, ProjectionNoise, add_noise, hu_to_attenuation, simulate_projections
from medgauss.geometry import ParallelBeamGeometry


def test_hu_to_attenuation():
    hu = torch.tensor([-1000.0, -1200.0, 0.0, 1000.0])
    torch.testing.assert_close(hu_to_attenuation(hu, 0.02), torch.tensor([0.0, 0.0, 0.02, 0.04]))
    with pytest.raises(ValueError, match="mu_water"):
        hu_to_attenuation(hu, -1.0)


def test_water_block_line_integral():
    geo = ParallelBeamGeometry(
        det_shape=(4, 4),
        det_spacing=(1.0, 1.0),
        vol_shape=(8, 10, 12),
        vol_spacing=(1.0, 1.0, 2.0),
        angles=[0.0],
    )
    proj = simulate_projections(torch.zeros(1, 1, 8, 10, 12, dtype=torch.float64), geo)
    # rays along -x through 12 voxels of 2 mm of water
    torch.testing.assert_close(proj, torch.full((1, 1, 4, 4), 24.0 * MU_WATER, dtype=torch.float64))


def test_poisson_noise_statistics_and_seed():
    p = torch.full((200, 200), 2.0, dtype=torch.float64)
    noise = ProjectionNoise(photons=1e4)
    noisy = add_noise(p, noise, seed=3)
    # delta method: var(-log(N/I0)) = 1 / (I0 exp(-p))
    expected_var = 1.0 / (1e4 * torch.exp(torch.tensor(-2.0, dtype=torch.float64)))
    assert abs(float(noisy.var()) / float(expected_var) - 1) < 0.05
    assert abs(float(noisy.mean()) - 2.0) < 0.01
    torch.testing.assert_close(add_noise(p, noise, seed=3), noisy)
    assert not torch.equal(add_noise(p, noise, seed=4), noisy)
    louder = add_noise(p, ProjectionNoise(photons=1e4, electronic_std=20.0), seed=3)
    assert float(louder.var()) > float(noisy.var())


def test_noise_validation():
    with pytest.raises(ValueError, match="photons"):
        ProjectionNoise(photons=0.0)
    with pytest.raises(ValueError, match="electronic_std"):
        ProjectionNoise(electronic_std=-1.0)
