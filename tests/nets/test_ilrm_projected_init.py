"""IterativeGaussianDecoder(query_init="projected"): each query starts from the view-pooled feature-map samples
at the projection of its block's centre (medgauss/nets/ilrm.py). References: a float64 loop written here
(projection matrices, bilinear sampling, pooling over the visible views) and the "learned" decoder, whose
parameters and outputs the option leaves untouched. View-order invariance of every start is tested with the
other options in test_ilrm.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medgauss.nets import XGRM, IterativeGaussianDecoder, create_model
from medgauss.nets.ilrm import QUERY_INIT_POOLINGS, mean_pool_views
from medgauss.nets.voxgs import check_box, check_grid
from medgauss.nets.xgrm import grid_frame
from tests.nets._xgrm_helpers import VOL_SHAPE, cone, perturb, run

SMALL = dict(img_size=32, patch_size=16, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, fusion_size=32,
             fusion_layers=1, fusion_heads=2, fusion_mlp_dim=64, pose_dim=16, feature_dim=8, upsample_factor=2)
ITERATIVE = dict(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32, block_size=2, window_size=2, cell_dim=8)
FIELDS = ("means", "scales", "quats", "intensities")


def small_model(**options) -> XGRM:
    torch.manual_seed(0)
    return XGRM(**SMALL, decoder="iterative", decoder_options={**ITERATIVE, **options})


def decoder(feature_dim: int = 8, dtype: torch.dtype = torch.float64, **options) -> IterativeGaussianDecoder:
    torch.manual_seed(0)
    return IterativeGaussianDecoder(feature_dim, **{**ITERATIVE, **options}).to(dtype)


def all_cells(lattice) -> torch.Tensor:
    """``[1, N, 3]`` int64 every cell of the query lattice in C order."""
    axes = [torch.arange(n) for n in lattice]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(1, -1, 3)


def reference_pool(maps: np.ndarray, matrices: np.ndarray, image_size, points: np.ndarray, pooling: str):
    """Float64 loop: project each point with each ``[3, 4]`` matrix; skip views where it lies behind the source
    or off the ``H x W`` detector (pixel centres at integers, edges at -1/2 and W - 1/2); sample the view's
    ``[C, h, w]`` map bilinearly (the map covers the detector; the outer half texel reads the edge); mean (and
    max) over the views that see it, zeros where none does. Returns ``(pooled [N, C or 2C], counts [N])``."""
    rows, cols = image_size
    k, c, h, w = maps.shape
    pooled, counts = [], []
    for point in points:
        seen = []
        for view in range(k):
            u, v, depth = matrices[view] @ np.append(point, 1.0)
            if depth <= 0:
                continue
            col, row = u / depth, v / depth
            if not (-0.5 <= col <= cols - 0.5 and -0.5 <= row <= rows - 0.5):
                continue
            x = min(max((col + 0.5) * w / cols - 0.5, 0.0), w - 1.0)  # feature-map texel coordinates
            y = min(max((row + 0.5) * h / rows - 0.5, 0.0), h - 1.0)
            x0, y0 = int(math.floor(x)), int(math.floor(y))
            x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
            fx, fy = x - x0, y - y0
            m = maps[view]
            seen.append(m[:, y0, x0] * (1 - fx) * (1 - fy) + m[:, y0, x1] * fx * (1 - fy)
                        + m[:, y1, x0] * (1 - fx) * fy + m[:, y1, x1] * fx * fy)
        counts.append(len(seen))
        mean = np.mean(seen, axis=0) if seen else np.zeros(c)
        largest = np.max(seen, axis=0) if seen else np.zeros(c)
        pooled.append(mean if pooling == "mean" else np.concatenate((mean, largest)))
    return np.array(pooled), np.array(counts)


def block_centres(affine: np.ndarray, lattice, block: int) -> np.ndarray:
    """World centres of the ``block^3`` voxel blocks of every lattice cell (C order), by hand."""
    out = []
    for cell in np.ndindex(*lattice):
        index = [i * block + (block - 1) / 2 for i in cell]
        out.append((affine @ np.array([*index, 1.0]))[:3])
    return np.array(out)


# -------------------------------------------------------------------------------------- the sampled features


@pytest.mark.parametrize("pooling", QUERY_INIT_POOLINGS)
def test_pooled_samples_equal_a_float64_loop_with_hidden_views_masked(pooling):
    # a detector too small for the volume: block centres fall off some views; view 4 is view 1's matrix negated
    # (every point behind its source) with its own feature map
    geo = cone(4, seed=5, det_shape=(8, 6))
    matrices = geo.projection_matrices().to(torch.float64)
    matrices = torch.cat((matrices, -matrices[1:2]))[None]  # [1, 5, 3, 4]
    gen = torch.Generator().manual_seed(2)
    maps = torch.randn(1, 5, 3, 5, 4, generator=gen, dtype=torch.float64)  # odd map size, not the detector's
    dec = decoder(feature_dim=3, query_init="projected", query_init_pooling=pooling)
    lattice = [math.ceil(n / dec.block_size) for n in VOL_SHAPE]
    cells = all_cells(lattice)
    affine = geo.volume_affine.to(torch.float64)[None]
    centres = dec.query_centres(cells, affine)
    points = block_centres(geo.volume_affine.numpy(), lattice, dec.block_size)
    np.testing.assert_allclose(centres[0].numpy(), points, rtol=0, atol=1e-12)

    pooled = dec.projected_features(maps, matrices, geo.det_shape, centres)
    expected, counts = reference_pool(maps[0].numpy(), matrices[0].numpy(), geo.det_shape, points, pooling)
    assert pooled.dtype == torch.float64 and pooled.shape == (1, len(points), 3 * (1 + (pooling == "mean_max")))
    np.testing.assert_allclose(pooled[0].numpy(), expected, rtol=1e-10, atol=1e-12)
    # the case is a real test of the masking: unseen, partly seen and fully seen (4 of 5) centres
    assert counts.min() == 0 and counts.max() == 4 and len(set(counts.tolist())) >= 3
    # with the behind-the-source view counted, the means would differ
    everything = torch.ones(1, 5, len(points), dtype=torch.bool)
    samples = torch.randn(1, 5, len(points), 3, dtype=torch.float64)
    assert torch.allclose(mean_pool_views(samples, everything), samples.mean(dim=1))


def test_projected_queries_add_the_projection_of_the_pooled_samples():
    geo = cone(3, seed=1)
    learned, projected = decoder(query_init="learned"), decoder(query_init="projected", query_init_pooling="mean")
    with torch.no_grad():
        projected.init_proj.weight.normal_()
        projected.init_proj.bias.normal_()
    shape, affine = check_grid(VOL_SHAPE, geo.volume_affine, 1)
    centre, radius = grid_frame(shape, affine)
    cells = all_cells([math.ceil(n / 2) for n in VOL_SHAPE])
    maps = torch.randn(1, 3, 8, 4, 4, dtype=torch.float64)
    pooled = projected.projected_features(maps, geo.projection_matrices()[None], geo.det_shape,
                                          projected.query_centres(cells, affine))
    with torch.no_grad():
        x = projected.initial_queries(cells, affine, centre, radius, pooled)
        base = learned.initial_queries(cells, affine, centre, radius)
        by_hand = pooled @ projected.init_proj.weight.T + projected.init_proj.bias
    torch.testing.assert_close(x, base + by_hand, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="query_init"):
        projected.initial_queries(cells, affine, centre, radius)  # pooled features are required
    with pytest.raises(ValueError, match="query_init"):
        learned.initial_queries(cells, affine, centre, radius, pooled)  # and refused without the option


# ------------------------------------------------------------------- "projected" is the default, "learned" the ablation


def test_projected_is_the_default_and_it_adds_only_init_proj():
    default = decoder()
    assert default.query_init == "projected" and default.query_init_pooling == "mean_max"
    learned = decoder(query_init="learned")
    assert learned.init_proj is None
    explicit = decoder(query_init="learned", query_init_pooling="mean")
    projected = decoder(query_init="projected")
    d = default.state_dict()
    assert all(torch.equal(d[k], v) for k, v in projected.state_dict().items())
    a, b, c = learned.state_dict(), explicit.state_dict(), projected.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("init_proj" in k for k in a)
    assert set(c) - set(a) == {"init_proj.weight", "init_proj.bias"}
    assert all(torch.equal(a[k], c[k]) for k in a)  # the other parameters draw the same initial values
    assert projected.init_proj.in_features == 2 * 8  # mean_max: mean and max concatenated


def test_a_zero_init_proj_decodes_exactly_as_learned_and_a_nonzero_one_does_not():
    learned = small_model(query_init="learned").eval()
    projected = small_model(query_init="projected").eval()
    perturb(learned)
    perturb(projected)  # the same seeded noise on the shared parameters (init_proj is registered last)
    with torch.no_grad():
        projected.decoder.init_proj.weight.zero_()
        projected.decoder.init_proj.bias.zero_()
    geo, projections = cone(3, seed=2), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = run(learned, geo, projections), run(projected, geo, projections)
        for field in FIELDS:
            assert torch.equal(getattr(a.gaussians, field), getattr(b.gaussians, field)), field
        projected.decoder.init_proj.weight.normal_(std=0.5)
        assert not torch.allclose(run(projected, geo, projections).volume, a.volume, atol=1e-4)


# ------------------------------------------------------------------------------ invariance, boxes, gradients


def test_chunks_and_sub_boxes_equal_the_full_decode():
    dec = decoder(query_init="projected").eval()
    perturb(dec)
    geo = cone(3, seed=4)
    shape, affine = check_grid(VOL_SHAPE, geo.volume_affine, 2)
    maps = torch.randn(2, 3, 8, 4, 4, dtype=torch.float64)
    common = dict(feature_maps=maps, projection_matrices=geo.projection_matrices()[None].expand(2, -1, -1, -1),
                  image_size=geo.det_shape, grid_affine=affine, grid_shape=shape)
    start, size = check_box(None, None, shape, 2)
    with torch.no_grad():
        full = dec(**common, box_start=start, box_size=size, chunk_size=10 ** 6).intensities.reshape(2, *shape)
        chunked = dec(**common, box_start=start, box_size=size, chunk_size=8).intensities.reshape(2, *shape)
        box_start = torch.tensor([[1, 2, 0], [3, 0, 1]])
        box = dec(**common, box_start=box_start, box_size=(3, 4, 4), chunk_size=8).intensities.reshape(2, 3, 4, 4)
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-12)
    for b, (d, h, w) in enumerate(box_start.tolist()):
        torch.testing.assert_close(box[b], full[b, d:d + 3, h:h + 4, w:w + 4], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pooling", QUERY_INIT_POOLINGS)
def test_gradients_reach_every_parameter_and_the_new_one(pooling):
    model = small_model(query_init="projected", query_init_pooling=pooling)
    out = run(model, cone(3), torch.rand(2, 3, 32, 32))
    g = out.gaussians
    gen = torch.Generator().manual_seed(0)
    loss = out.volume.square().mean() + sum((torch.randn(t.shape, generator=gen) * t).sum()
                                            for t in (g.scales, g.quats))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, f"parameters without gradient: {missing}"
    assert "decoder.init_proj.weight" in dict(model.named_parameters())


def test_gradient_checkpointing_and_bf16_autocast():
    plain = small_model(query_init="projected")
    perturb(plain)
    checkpointed = small_model(query_init="projected")
    perturb(checkpointed)
    checkpointed.grad_checkpointing = True
    geo, projections = cone(3), torch.rand(1, 3, 32, 32)
    grads = []
    for model in (plain, checkpointed):
        run(model, geo, projections, chunk_size=8).volume.square().sum().backward()
        grads.append(model.decoder.init_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(plain.eval(), geo, projections)
    assert out.gaussians.dtype == torch.float32 and torch.isfinite(out.volume).all()


# ------------------------------------------------------------------------------------ arguments, registry


def test_bad_options_raise_value_errors_naming_them():
    with pytest.raises(ValueError, match="query_init"):
        IterativeGaussianDecoder(8, **ITERATIVE, query_init="anchored")
    with pytest.raises(ValueError, match="query_init_pooling"):
        IterativeGaussianDecoder(8, **ITERATIVE, query_init="projected", query_init_pooling="sum")


def test_the_option_passes_through_xgrm_and_the_registry(tmp_path):
    model = create_model("xgrm_tiny_iterative", **SMALL,
                         decoder_options={**ITERATIVE, "query_init": "projected", "query_init_pooling": "mean"})
    assert model.decoder.query_init == "projected" and model.decoder.init_proj.in_features == SMALL["feature_dim"]
    loaded = XGRM.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    assert loaded.decoder.query_init == "projected" and loaded.decoder.query_init_pooling == "mean"
    assert torch.equal(loaded.decoder.init_proj.weight, model.decoder.init_proj.weight)
