"""XGRM's parts from the LRM family: GRM's transformer upsampler (windowed attention against a brute-force
per-window attention), Long-LRM's token merge (4x fewer fusion tokens, a hand 2x2 stride-2 convolution, odd
grids refused) and empty-block skipping at inference (threshold 0 / None = the full decode; a volume with a
large empty region: skipped cells within the threshold of the full decode, the others equal to it); shapes for
K in {1, 6, 24}, view-permutation invariance, gradients, checkpointing and save / load with the options."""

import math

import pytest
import torch

from medgauss.geometry import ConeBeamGeometry, ParallelBeamGeometry
from medgauss.nets import XGRM, load_pretrained
from medgauss.nets.upsamplers import TransformerUpsampler, WindowAttention
from medgauss.nets.voxgs import coarse_block_samples, sample_views, voxel_centres
from tests.nets._xgrm_helpers import VOL_SHAPE, perturb, run
from tests.nets._xgrm_helpers import cone as shared_cone

SMALL = dict(img_size=64, patch_size=16, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, fusion_size=32,
             fusion_layers=1, fusion_heads=2, fusion_mlp_dim=64, pose_dim=16, feature_dim=8, upsample_factor=2,
             decoder_hidden=16, decoder_layers=2)
OPTIONS = {
    "transformer": dict(upsampler="transformer", upsampler_window=4, upsampler_head_dim=8),
    "merge": dict(token_merge=True),
    "merge+transformer": dict(token_merge=True, upsampler="transformer", upsampler_window=4, upsampler_head_dim=8),
}


def small_model(**overrides) -> XGRM:
    torch.manual_seed(0)
    return XGRM(**{**SMALL, **overrides})


def cone(num_views: int, seed: int = 0, **changes) -> ConeBeamGeometry:
    """The shared test geometry with a 64^2 detector of finer pixels (the models here take 64^2 views)."""
    return shared_cone(num_views, seed, **{"det_shape": (64, 64), "det_spacing": (1.0, 0.9), **changes})






# ------------------------------------------------------------------------------ shapes, invariance, gradients


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_shapes_for_k_1_6_24_with_each_option(name):
    model = small_model(**OPTIONS[name]).eval()
    assert model.feature_size == (8, 8)  # r H / p whatever the option
    assert model.fusion_grid == ((2, 2) if "merge" in name else (4, 4))
    for k in (1, 6, 24):
        geo = cone(k)
        projections = torch.rand(2, k, 64, 64)
        inputs = model.geometry_inputs(geo)
        with torch.no_grad():
            shape, affine = VOL_SHAPE, inputs["grid_affine"].expand(2, -1, -1)
            maps = model.encode_views(projections, inputs["plucker"].expand(2, -1, -1, -1, -1), shape, affine)
            out = model(projections, **inputs)
        assert maps.shape == (2, k, 8, 8, 8)
        assert out.volume.shape == (2, 1, *VOL_SHAPE) and out.skipped_fraction is None
        assert torch.isfinite(out.volume).all() and (out.volume >= 0).all()
        assert out.gaussians.means.shape == (2, math.prod(VOL_SHAPE), 3)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_permuting_the_views_leaves_the_output_unchanged(name):
    model = small_model(**OPTIONS[name]).eval()
    perturb(model)
    geo, perm = cone(6, seed=3), torch.tensor([3, 0, 5, 4, 2, 1])
    projections = torch.rand(1, 6, 64, 64)
    with torch.no_grad():
        a = run(model, geo, projections)
        b = run(model, geo.subset(perm), projections[:, perm])
        c = run(model, geo.subset(range(5)), projections[:, :5])
    torch.testing.assert_close(a.volume, b.volume, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.gaussians.scales, b.gaussians.scales, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.gaussians.quats, b.gaussians.quats, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a.volume, c.volume, atol=1e-4)  # ... while the views do matter


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_gradients_reach_every_parameter(name):
    model = small_model(**OPTIONS[name], fusion_size=48)  # fusion_in would be a Linear without the merge
    out = run(model, cone(3), torch.rand(2, 3, 64, 64))
    g = out.gaussians
    weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i)) for i, t in
               enumerate((g.scales, g.quats))]
    loss = out.volume.square().mean() + sum((w * t).sum() for w, t in zip(weights, (g.scales, g.quats)))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, f"parameters without gradient: {missing}"
    names = dict(model.named_parameters())
    assert ("token_merger.weight" in names) == ("merge" in name)
    assert any(n.startswith("upsample.blocks.") for n in names) == ("transformer" in name)


def test_gradient_checkpointing_and_bf16_with_both_options():
    projections = torch.rand(1, 3, 64, 64)
    grads = []
    for flag in (False, True):
        model = small_model(**OPTIONS["merge+transformer"], grad_checkpointing=flag)
        out = run(model, cone(3), projections, chunk_size=64)
        (out.volume.square().sum() + out.gaussians.scales.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model.eval(), cone(3), projections)
    assert out.gaussians.dtype == torch.float32 and torch.isfinite(out.volume).all()


# --------------------------------------------------------------------------------- transformer upsampler


def brute_force_window_attention(attn: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Attention computed window by window with explicit softmax, over the real pixels of each window only."""
    n, h, w, c = x.shape
    wh, ww = min(attn.window, h), min(attn.window, w)
    heads, hd = attn.num_heads, c // attn.num_heads
    wq, wk, wv = attn.qkv.weight.chunk(3, dim=0)
    bq, bk, bv = attn.qkv.bias.chunk(3, dim=0)
    out = torch.zeros_like(x)
    for i in range(n):
        for r0 in range(0, h, wh):
            for c0 in range(0, w, ww):
                tokens = x[i, r0: r0 + wh, c0: c0 + ww]  # the real pixels of this window
                rows, cols = tokens.shape[:2]
                t = tokens.reshape(-1, c)
                q, k, v = t @ wq.T + bq, t @ wk.T + bk, t @ wv.T + bv
                mixed = []
                for head in range(heads):
                    s = slice(head * hd, (head + 1) * hd)
                    weights = torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(hd), dim=-1)
                    mixed.append(weights @ v[:, s])
                y = torch.cat(mixed, dim=1) @ attn.proj.weight.T + attn.proj.bias
                out[i, r0: r0 + rows, c0: c0 + cols] = y.reshape(rows, cols, c)
    return out


@pytest.mark.parametrize("size,window", [((8, 8), 4), ((6, 10), 4), ((3, 5), 8), ((7, 7), 3)])
def test_windowed_attention_equals_brute_force_per_window_attention(size, window):
    torch.manual_seed(2)
    attn = WindowAttention(12, 3, window).double()
    x = torch.randn(2, *size, 12, dtype=torch.float64)
    torch.testing.assert_close(attn(x), brute_force_window_attention(attn, x), rtol=1e-12, atol=1e-12)
    # pixels of other windows (and of other images) do not matter
    y = x.clone()
    y[1] += 1.0
    y[0, window:] += 1.0
    torch.testing.assert_close(attn(y)[0, :window, :window], attn(x)[0, :window, :window], rtol=1e-12, atol=1e-12)


def test_transformer_upsampler_steps_widths_and_errors():
    up = TransformerUpsampler(64, 8, factor=8, window=4, head_dim=8)
    assert up.widths == (64, 32, 16, 8) and len(up.blocks) == 3
    assert [b.attn.num_heads for b in up.blocks] == [4, 2, 1]
    assert up(torch.randn(3, 2 * 3, 64), (2, 3)).shape == (3, 8, 16, 24)
    one = TransformerUpsampler(64, 8, factor=1)
    assert len(one.blocks) == 0 and one(torch.randn(1, 4, 64), (2, 2)).shape == (1, 8, 2, 2)
    with pytest.raises(ValueError, match="power-of-2"):
        TransformerUpsampler(64, 8, factor=3)
    with pytest.raises(ValueError, match="upsample_factor"):
        small_model(upsampler="transformer", upsample_factor=3)
    with pytest.raises(ValueError, match="upsampler"):
        small_model(upsampler="conv")
    with pytest.raises(ValueError, match="upsampler_window"):
        small_model(upsampler="transformer", upsampler_window=0)


# ----------------------------------------------------------------------------------------------- token merge


def test_token_merge_is_a_2x2_stride_2_convolution_and_cuts_the_fusion_sequence_by_4():
    k = 6
    seen = {}
    for merge in (False, True):
        model = small_model(token_merge=merge).eval()
        hooks = [model.fusion[0].register_forward_pre_hook(lambda m, a, key=merge: seen.__setitem__(key, a[0])),
                 model.encoder.register_forward_hook(lambda m, a, out, key=merge: seen.__setitem__(("enc", key), out))]
        with torch.no_grad():
            run(model, cone(k), torch.rand(2, k, 64, 64))
        for h in hooks:
            h.remove()
    assert seen[False].shape == (2, k * 16, 32) and seen[True].shape == (2, k * 4, 32)
    assert seen[False].shape[1] == 4 * seen[True].shape[1]
    # the merged token (a, b) of view v is sum_ij W[:, :, i, j] t(2a + i, 2b + j) + bias (rows then columns)
    tokens = seen[("enc", True)].reshape(2, k, 4, 4, 32).double()
    weight, bias = model.token_merger.weight.double(), model.token_merger.bias.double()
    expected = torch.zeros(2, k, 2, 2, 32, dtype=torch.float64)
    for a in range(2):
        for b in range(2):
            expected[:, :, a, b] = bias + sum(tokens[:, :, 2 * a + i, 2 * b + j] @ weight[:, :, i, j].T
                                              for i in range(2) for j in range(2))
    torch.testing.assert_close(seen[True].double(), expected.reshape(2, k * 4, 32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("img_size", [48, (64, 48)])
def test_token_merge_refuses_odd_token_grids(img_size):
    with pytest.raises(ValueError, match="token_merge.*even"):
        small_model(img_size=img_size, token_merge=True)
    small_model(img_size=img_size)  # fine without the merge


# ----------------------------------------------------------------------------------------- empty-block skip


def test_coarse_block_samples_are_the_corners_and_centres_of_every_block():
    axes = coarse_block_samples((5, 8, 17), 8)
    assert [a.tolist() for a in axes] == [[0, 2, 4], [0, 3, 7], [0, 3, 7, 8, 11, 15, 16]]


def test_skip_threshold_zero_or_none_is_the_full_decode():
    model = small_model(shift=True).eval()
    perturb(model)
    geo, projections = cone(3, vol_shape=(9, 10, 11)), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        full = run(model, geo, projections, chunk_size=300)
        zero = run(model, geo, projections, chunk_size=300, skip_empty=0.0)
        off = run(model, geo, projections, chunk_size=300, skip_empty=None)
    assert full.skipped_fraction is None and off.skipped_fraction is None
    assert zero.skipped_fraction.tolist() == [0.0, 0.0]
    for out in (zero, off):
        for field in ("means", "scales", "quats", "intensities"):
            assert torch.equal(getattr(out.gaussians, field), getattr(full.gaussians, field))
    # the model's own setting applies in eval mode only
    model = small_model(skip_empty=0.0)
    with torch.no_grad():
        assert run(model.train(), geo, projections).skipped_fraction is None
        assert run(model.eval(), geo, projections).skipped_fraction.tolist() == [0.0, 0.0]
        assert run(model.eval(), geo, projections, skip_empty=None).skipped_fraction is None


def slab_model() -> XGRM:
    """A model whose opacity is ``softplus(40 GELU(mean feature) - 20)`` with positive features: 10-30 in every
    voxel a view sees and ``softplus(-20) = 2e-9`` in the voxels no view sees (pooled feature 0)."""
    model = small_model(img_size=16, patch_size=8, decoder_layers=2, decoder_hidden=16).eval()
    perturb(model)
    with torch.no_grad():
        model.upsample.weight.mul_(0.1)
        model.upsample.bias.fill_(1.0)
        first, last = model.decoder.mlp[0], model.decoder.mlp[-1]
        first.weight[0] = 1.0 / first.in_features
        first.bias[0] = 0.0
        last.weight[0] = 0.0
        last.weight[0, 0] = 40.0
        last.bias[0] = -20.0
    return model


def test_skip_on_a_volume_with_a_large_empty_region():
    """Parallel beams through a 16-pixel detector see a 16-voxel slab of a 32-voxel-wide grid (along h for the
    first sample, along w for the second): the rest of the grid is truly empty and is skipped."""
    model = slab_model()
    geos = [ParallelBeamGeometry(det_shape=(16, 16), det_spacing=(1.0, 1.0), vol_shape=(16, 32, 32),
                                 vol_spacing=(1.0,) * 3, angles=[a, a + math.pi]) for a in (0.0, math.pi / 2)]
    projections = torch.rand(2, 2, 16, 16)
    threshold, block = 1e-3, 6  # blocks of 6 straddle the slab's faces (at 8 and 24)
    with torch.no_grad():
        full = run(model, geos, projections, chunk_size=5000)
        skipped = run(model, geos, projections, chunk_size=5000, skip_empty=threshold)
        model.skip_block_size = block
        blocks = run(model, geos, projections, chunk_size=777, skip_empty=threshold)
    inputs = model.geometry_inputs(geos)
    centres = voxel_centres(inputs["grid_affine"], torch.zeros(2, 3, dtype=torch.long), (16, 32, 32))
    _, visible = sample_views(torch.ones(2, 2, 1, 4, 4), centres, inputs["projection_matrices"], (16, 16))
    seen = visible.any(dim=1).reshape(2, 16, 32, 32)
    assert seen.float().mean().item() == 0.5
    assert full.volume[:, 0][seen].min() > 10.0 and full.volume[:, 0][~seen].max() < 1e-8
    for out, size in ((skipped, 8), (blocks, block)):
        # expected: the blocks that hold no seen voxel
        occupied = torch.nn.functional.max_pool3d(seen[:, None].float(), size, size, ceil_mode=True)[:, 0] > 0
        kept = occupied
        for axis, n in enumerate((16, 32, 32)):
            kept = kept.repeat_interleave(size, dim=axis + 1).narrow(axis + 1, 0, n)
        torch.testing.assert_close(out.skipped_fraction, 1.0 - kept.flatten(1).double().mean(1))
        assert (out.skipped_fraction > 0.35).all()
        vol, ref = out.volume[:, 0], full.volume[:, 0]
        assert (vol[~kept] == 0).all() and ((ref[~kept] - vol[~kept]).abs() <= threshold).all()
        torch.testing.assert_close(vol[kept], ref[kept], rtol=1e-6, atol=0)  # the same computation, another batch
        for field in ("means", "scales", "quats"):
            got, want = getattr(out.gaussians, field), getattr(full.gaussians, field)
            torch.testing.assert_close(got[kept.flatten(1)], want[kept.flatten(1)], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.gaussians.means, full.gaussians.means, rtol=0, atol=0)
        assert torch.equal(out.gaussians.quats[~kept.flatten(1)], torch.tensor([1.0, 0, 0, 0]).expand(
            int((~kept).sum()), 4))


def test_skip_on_a_sub_box_and_errors():
    model = slab_model()
    geo = ParallelBeamGeometry(det_shape=(16, 16), det_spacing=(1.0, 1.0), vol_shape=(16, 32, 32),
                               vol_spacing=(1.0,) * 3, angles=[0.0, math.pi])
    projections = torch.rand(1, 2, 16, 16)
    with torch.no_grad():
        full = run(model, geo, projections, box_start=[2, 0, 5], box_size=(9, 16, 20))
        box = run(model, geo, projections, box_start=[2, 0, 5], box_size=(9, 16, 20), skip_empty=1e-3)
    assert box.skipped_fraction.item() == pytest.approx(0.5)  # rows 0-7 of the box are unseen
    kept = box.volume != 0
    assert ((full.volume[~kept]) <= 1e-3).all()
    torch.testing.assert_close(box.volume[kept], full.volume[kept], rtol=1e-6, atol=0)
    # it is differentiable where it decodes (an inference option, yet safe under autograd)
    out = run(model, geo, projections, box_start=[2, 0, 5], box_size=(9, 16, 20), skip_empty=1e-3)
    out.volume.sum().backward()
    grad = model.decoder.mlp[-1].bias.grad
    assert grad is not None and torch.isfinite(grad).all() and grad[0] > 0
    for bad in (-1.0, float("nan"), "always"):
        with pytest.raises(ValueError, match="skip_empty"):
            run(model, geo, projections, skip_empty=bad)
    with pytest.raises(ValueError, match="skip_empty"):
        small_model(skip_empty=-0.5)
    with pytest.raises(ValueError, match="skip_block_size"):
        small_model(skip_block_size=0)
    with pytest.raises(ValueError, match="decoder='voxgs'"):
        small_model(skip_empty=0.1, decoder="iterative", decoder_options=dict(
            hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, block_size=2, window_size=2))


# ---------------------------------------------------------------------------------------------- checkpoints


def test_save_pretrained_round_trip_with_the_options(tmp_path):
    model = small_model(**OPTIONS["merge+transformer"], skip_empty=1e-4, skip_block_size=4).eval()
    perturb(model)
    target = model.save_pretrained(tmp_path / "ckpt")
    projections = torch.rand(2, 6, 64, 64)
    for loaded in (XGRM.from_pretrained(target), load_pretrained(target)):
        assert type(loaded) is XGRM
        assert (loaded.upsampler, loaded.token_merge, loaded.skip_empty, loaded.skip_block_size) == \
            ("transformer", True, 1e-4, 4)
        loaded.eval()
        with torch.no_grad():
            a, b = run(model, cone(6), projections), run(loaded, cone(6), projections)
        for field in ("means", "scales", "quats", "intensities"):
            assert torch.equal(getattr(a.gaussians, field), getattr(b.gaussians, field))
        assert torch.equal(a.skipped_fraction, b.skipped_fraction)
