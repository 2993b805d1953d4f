"""X-GRM and its VoxGS decoder: shapes, view permutations, gradients, the voxel frame, the projection +
sampling step against a hand ray-detector intersection, chunking, sub-volumes, ModLN, errors, checkpoints."""

import math

import numpy as np
import pytest
import torch

from medgauss.frame import crop_affine
from medgauss.geometry import ParallelBeamGeometry
from medgauss.nets import XGRM, create_model, geometry_inputs, list_models, load_pretrained, subvolume_geometry
from medgauss.nets.voxgs import max_pool_views, random_box_starts, sample_views
from medgauss.nets.xgrm import modulated_layer_norm
from medgauss.nets.zoo import XGRM_GRID_SIZES, XGRM_SIZES
from medgauss.render import project
from tests.nets._xgrm_helpers import VOL_SHAPE, cone, perturb, run

SMALL = dict(img_size=32, patch_size=16, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, fusion_size=32,
             fusion_layers=1, fusion_heads=2, fusion_mlp_dim=64, pose_dim=16, feature_dim=8, upsample_factor=2,
             decoder_hidden=16, decoder_layers=2)


def small_model(**overrides) -> XGRM:
    torch.manual_seed(0)
    return XGRM(**{**SMALL, **overrides})










# ------------------------------------------------------------------------------------- shapes, invariance


def test_shapes_for_any_number_of_views_with_the_same_weights():
    model = small_model().eval()
    for k in (1, 3, 6):
        out = run(model, cone(k), torch.rand(2, k, 32, 32))
        assert out.volume.shape == (2, 1, *VOL_SHAPE)
        g = out.gaussians
        assert g.means.shape == (2, math.prod(VOL_SHAPE), 3) and g.scales.shape == (2, math.prod(VOL_SHAPE), 3)
        assert g.quats.shape == (2, math.prod(VOL_SHAPE), 4) and g.dtype == torch.float32
        assert torch.isfinite(out.volume).all() and (out.volume >= 0).all()
        assert torch.allclose(g.quats.norm(dim=-1), torch.ones(()))
        assert (g.scales > 0).all()


@pytest.mark.parametrize("mode", ["modln", "add"])
def test_permuting_the_views_leaves_the_output_unchanged(mode):
    model = small_model(pose_conditioning=mode).eval()
    perturb(model)
    geo, k = cone(5, seed=3), 5
    projections = torch.rand(2, k, 32, 32)
    inputs = model.geometry_inputs(geo)
    inputs["projection_matrices"] = inputs["projection_matrices"].expand(2, -1, -1, -1)
    inputs["plucker"] = inputs["plucker"].expand(2, -1, -1, -1, -1)
    perm = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        a = model(projections, **inputs)
        permuted = dict(inputs, projection_matrices=inputs["projection_matrices"][:, perm],
                        plucker=inputs["plucker"][:, perm])
        b = model(projections[:, perm], **permuted)
        # the geometry permuted the same way gives the same inputs
        c = run(model, geo.subset(perm), projections[:, perm])
    assert torch.allclose(a.volume, b.volume, atol=1e-5, rtol=1e-5)
    assert torch.allclose(a.gaussians.scales, b.gaussians.scales, atol=1e-5)
    assert torch.allclose(a.gaussians.quats, b.gaussians.quats, atol=1e-5)
    assert torch.allclose(a.volume, c.volume, atol=1e-5, rtol=1e-5)
    # ... while the views do matter
    assert not torch.allclose(a.volume, model(projections[:, :4], **model.geometry_inputs(geo.subset(range(4)))
                                              ).volume.detach(), atol=1e-4)


@pytest.mark.parametrize("mode,shift", [("modln", False), ("add", False), ("none", True)])
def test_gradients_reach_every_parameter(mode, shift):
    model = small_model(pose_conditioning=mode, shift=shift)
    out = run(model, cone(3), torch.rand(2, 3, 32, 32))
    g = out.gaussians
    weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i)) for i, t in
               enumerate((g.scales, g.quats, g.means))]
    loss = out.volume.square().mean() + sum((w * t).sum() for w, t in zip(weights, (g.scales, g.quats, g.means)))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, f"parameters without gradient: {missing}"
    assert (model.encoder.pose_embed is None) == (mode == "none")


# ------------------------------------------------------------------------------------------ voxel frame


def brute_force_centres(affine: np.ndarray, start, size) -> np.ndarray:
    rows = []
    for d in range(size[0]):
        for h in range(size[1]):
            for w in range(size[2]):
                index = np.array([start[0] + d, start[1] + h, start[2] + w, 1.0])
                rows.append((affine @ index)[:3])
    return np.array(rows)


def test_volume_is_the_opacities_and_means_are_the_voxel_centres():
    model = small_model().eval()
    geo = cone(3)
    with torch.no_grad():
        out = run(model, geo, torch.rand(1, 3, 32, 32))
    assert torch.equal(out.volume.reshape(1, -1), out.gaussians.intensities)
    assert out.volume.data_ptr() == out.gaussians.intensities.data_ptr()  # indexing, not a copy
    expected = brute_force_centres(geo.volume_affine.numpy(), (0, 0, 0), VOL_SHAPE)
    np.testing.assert_allclose(out.gaussians.means[0].double().numpy(), expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(out.affine[0].numpy(), geo.volume_affine.numpy())
    # the grid is where the CT projector puts the volume: volume_affine is the geometry contract's placement
    origin = np.array(geo.volume_origin)[::-1]  # (x, y, z) of voxel (0, 0, 0)
    np.testing.assert_allclose(expected[0], origin)
    # scales: bounded in units of the voxel edge |det A|^(1/3), converted to mm
    voxel_mm = abs(np.linalg.det(geo.volume_affine.numpy()[:3, :3])) ** (1 / 3)
    s = out.gaussians.scales / voxel_mm
    assert (s >= 0.25).all() and (s <= 1.0).all()


def test_one_geometry_per_sample_and_float64_inputs():
    model = small_model().eval()
    geos = [cone(3, seed=1), cone(3, seed=2, vol_offset=(-4.0, 5.0, 0.5))]
    projections = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model.reconstruct(projections, geos)
        alone = model.reconstruct(projections[1:], geos[1])
        as_float64 = model(projections, **model.geometry_inputs(geos, dtype=torch.float64))
        double = model.double()(projections.double(), **model.geometry_inputs(geos, dtype=torch.float64))
    for b, geo in enumerate(geos):
        expected = brute_force_centres(geo.volume_affine.numpy(), (0, 0, 0), VOL_SHAPE)
        np.testing.assert_allclose(out.gaussians.means[b].double().numpy(), expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(double.gaussians.means[b].numpy(), expected, rtol=0, atol=1e-12)
    assert torch.allclose(out.volume[1:], alone.volume, atol=1e-6)
    assert torch.allclose(out.volume, as_float64.volume, atol=1e-5)
    assert double.volume.dtype == torch.float64 and torch.allclose(out.volume.double(), double.volume, atol=1e-4)


def test_shift_variant_stays_within_its_bound():
    model = small_model(shift=True, max_shift=0.3).eval()
    with torch.no_grad():
        model.decoder.mlp[-1].weight.mul_(200.0)  # saturate the tanh: offsets reach the bound
        geo = cone(3)
        out = run(model, geo, torch.rand(1, 3, 32, 32))
    inv = np.linalg.inv(geo.volume_affine.numpy())
    means = out.gaussians.means[0].double().numpy()
    index = means @ inv[:3, :3].T + inv[:3, 3]
    grid_index = np.stack(np.meshgrid(*[np.arange(n) for n in VOL_SHAPE], indexing="ij"), -1).reshape(-1, 3)
    offset = np.abs(index - grid_index)
    assert offset.max() <= 0.3 + 1e-5
    assert offset.max() > 0.29  # it does move
    assert torch.equal(out.volume.reshape(1, -1), out.gaussians.intensities)


# --------------------------------------------------------------------- projection and sampling of features


def hand_pixel(geometry, view: int, point: np.ndarray) -> tuple[float, float, bool]:
    """(col, row, in front) of a world point: the ray from the source (or along the beam) meets the detector."""
    vec = geometry.vectors()[view].numpy()
    src, d00, du, dv = vec[0:3], vec[3:6], vec[6:9], vec[9:12]
    normal = np.cross(du, dv)
    if geometry.is_cone:
        direction = point - src
        t = normal @ (d00 - src) / (normal @ direction)
        hit, in_front = src + t * direction, t > 0
    else:
        t = normal @ (d00 - point) / (normal @ src)
        hit, in_front = point + t * src, True
    rel = hit - d00
    return float(rel @ du / (du @ du)), float(rel @ dv / (dv @ dv)), bool(in_front)


@pytest.mark.parametrize("kind", ["cone", "cone_posed", "parallel"])
def test_sampling_matches_a_hand_projection_of_each_voxel_centre(kind):
    if kind == "parallel":
        geo = ParallelBeamGeometry(det_shape=(32, 40), det_spacing=(1.5, 1.2), vol_shape=VOL_SHAPE,
                                   vol_spacing=(3.0, 2.5, 2.0), angles=[0.3, 1.9, 4.0], det_offset=(0.7, -1.1),
                                   vol_offset=(1.5, -2.0, 3.0))
    else:
        geo = cone(3, seed=5, posed=kind == "cone_posed", det_shape=(32, 40))
    rows, cols = geo.det_shape
    factor = 4  # feature maps at a quarter of the detector resolution
    fh, fw = rows // factor, cols // factor
    # linear ramps: each feature pixel holds the full-resolution (col, row) coordinate of its centre
    col_ramp = (factor * torch.arange(fw, dtype=torch.float64) + (factor - 1) / 2).expand(fh, fw)
    row_ramp = (factor * torch.arange(fh, dtype=torch.float64) + (factor - 1) / 2)[:, None].expand(fh, fw)
    maps = torch.stack((col_ramp, row_ramp))[None, None].expand(1, geo.num_views, 2, fh, fw)
    centres = brute_force_centres(geo.volume_affine.numpy(), (0, 0, 0), VOL_SHAPE)
    far = np.array([[900.0, 900.0, 0.0]])  # off every detector
    points = np.concatenate([centres, far])
    samples, visible = sample_views(maps, torch.from_numpy(points)[None], geo.projection_matrices()[None],
                                    geo.det_shape)
    lo = (factor - 1) / 2  # a bilinear ramp is exact between the first and last feature pixel centres
    checked = 0
    for v in range(geo.num_views):
        for n, point in enumerate(points):
            col, row, in_front = hand_pixel(geo, v, point)
            inside = in_front and -0.5 <= col <= cols - 0.5 and -0.5 <= row <= rows - 0.5
            assert bool(visible[0, v, n]) == inside
            if lo <= col <= cols - 1 - lo and lo <= row <= rows - 1 - lo:
                assert samples[0, v, n, 0].item() == pytest.approx(col, abs=1e-9)
                assert samples[0, v, n, 1].item() == pytest.approx(row, abs=1e-9)
                checked += 1
    assert checked > 0.9 * len(centres) * geo.num_views
    assert not visible[0, :, -1].any()


def test_max_pool_uses_visible_views_only():
    samples = torch.tensor([[[[1.0, -2.0]], [[5.0, -7.0]], [[3.0, 4.0]]]])  # [B=1, K=3, N=1, C=2]
    visible = torch.tensor([[[True], [False], [True]]])
    assert torch.equal(max_pool_views(samples, visible), torch.tensor([[[3.0, 4.0]]]))
    assert torch.equal(max_pool_views(samples, torch.zeros_like(visible)), torch.zeros(1, 1, 2))


def test_plucker_downsample_is_patch_centres():
    geo, p = cone(2, posed=True), 16
    plucker = geo.plucker(downsample=p, dtype=torch.float64)  # [V, 6, rows / p, cols / p]
    vec = geo.vectors()
    for v in range(geo.num_views):
        src, d00, du, dv = vec[v, 0:3], vec[v, 3:6], vec[v, 6:9], vec[v, 9:12]
        for i in range(2):
            for j in range(2):
                centre = d00 + (p * j + (p - 1) / 2) * du + (p * i + (p - 1) / 2) * dv  # patch (i, j) centre
                d = (centre - src) / (centre - src).norm()
                expected = torch.cat((d, torch.linalg.cross(src, d)))
                assert torch.allclose(plucker[v, :, i, j], expected, atol=1e-9)


# -------------------------------------------------------------------------------- chunks and sub-volumes


def test_chunked_decoding_equals_one_chunk_and_sub_boxes_equal_the_full_decode():
    model = small_model(shift=True).eval()
    perturb(model)
    geo = cone(4, seed=2)
    projections = torch.rand(2, 4, 32, 32)
    with torch.no_grad():
        full = run(model, geo, projections, chunk_size=10 ** 6)
        chunked = run(model, geo, projections, chunk_size=7)
        starts = torch.tensor([[1, 2, 0], [3, 0, 1]])
        box = run(model, geo, projections, box_start=starts, box_size=(3, 4, 4), chunk_size=11)
    for field in ("means", "scales", "quats", "intensities"):
        assert torch.allclose(getattr(full.gaussians, field), getattr(chunked.gaussians, field), atol=1e-6)
    for b, (d, h, w) in enumerate(starts.tolist()):
        expected = full.volume[b, :, d:d + 3, h:h + 4, w:w + 4]
        assert torch.allclose(box.volume[b], expected, atol=1e-6)
        full_means = full.gaussians.means[b].reshape(*VOL_SHAPE, 3)[d:d + 3, h:h + 4, w:w + 4]
        assert torch.allclose(box.gaussians.means[b].reshape(3, 4, 4, 3), full_means, atol=1e-5)
        affine = crop_affine(geo.volume_affine.numpy(), (d, h, w))
        np.testing.assert_allclose(box.affine[b].numpy(), affine)
        sub = subvolume_geometry(geo, (d, h, w), (3, 4, 4))
        np.testing.assert_allclose(sub.volume_affine.numpy(), affine, atol=1e-12)
    assert box.volume.shape == (2, 1, 3, 4, 4)


def test_random_box_starts_cover_the_grid_and_stay_inside():
    starts = random_box_starts((6, 7, 5), (3, 4, 5), 400, torch.Generator().manual_seed(0))
    assert starts.shape == (400, 3) and starts.min() == 0
    assert starts.amax(0).tolist() == [3, 3, 0]


def test_gradient_checkpointing_gives_the_same_gradients():
    projections = torch.rand(1, 3, 32, 32)
    grads = []
    for flag in (False, True):
        model = small_model(grad_checkpointing=flag)
        out = run(model, cone(3), projections, chunk_size=50)
        (out.volume.square().sum() + out.gaussians.scales.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6, rtol=1e-5), name


def test_bf16_autocast_keeps_gaussians_float32():
    model = small_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, cone(3), torch.rand(1, 3, 32, 32))
    g = out.gaussians
    assert g.means.dtype == g.scales.dtype == g.quats.dtype == g.intensities.dtype == torch.float32
    assert all(torch.isfinite(t).all() for t in (g.means, g.scales, g.quats, g.intensities))
    out.volume.mean().backward()


# ----------------------------------------------------------------------------------------------- ModLN


def test_modln_is_layer_norm_modulated_and_reduces_to_it_when_zeroed():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(8)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    h, gamma, beta = torch.randn(3, 5, 8), torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    by_hand = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + norm.eps)
    by_hand = by_hand * norm.weight + norm.bias
    assert torch.allclose(modulated_layer_norm(norm, h, gamma, beta), by_hand * (1 + gamma) + beta, atol=1e-5)
    assert torch.equal(modulated_layer_norm(norm, h, torch.zeros(()), torch.zeros(())), norm(h))

    model = small_model()
    encoder = model.encoder
    images, plucker = torch.rand(4, 1, 32, 32), torch.randn(4, 6, 2, 2)
    with torch.no_grad():
        conditioned = encoder(images, plucker)
        for mod in encoder.modulation:
            for p in mod.parameters():
                p.zero_()
        zeroed = encoder(images, plucker)
        x = encoder.patch_embed(images).flatten(2).transpose(1, 2) + encoder.pos_embed
        for block in encoder.blocks:
            x = block(x)  # the plain timm block: LN without modulation
        plain = encoder.norm(x)
    assert torch.allclose(zeroed, plain, atol=1e-6)
    assert not torch.allclose(conditioned, plain, atol=1e-6)  # the rays do modulate the untouched model
    assert torch.allclose(encoder(images, torch.randn(4, 6, 2, 2)), plain, atol=1e-6)  # zeroed: rays ignored


# ---------------------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_value_errors_naming_the_argument():
    model = small_model()
    geo = cone(3)
    inputs = model.geometry_inputs(geo)
    good = torch.rand(1, 3, 32, 32)
    cases = [
        (torch.rand(3, 32, 32), inputs, "projections"),
        (torch.rand(1, 3, 32, 48), inputs, "projections"),
        (torch.rand(1, 3, 32, 32).int(), inputs, "projections"),
        (good.clone().index_fill_(3, torch.tensor([5]), float("nan")), inputs, "projections"),
        (good, dict(inputs, projection_matrices=inputs["projection_matrices"][:, :2]), "projection_matrices"),
        (good, dict(inputs, projection_matrices=inputs["projection_matrices"][..., :3]), "projection_matrices"),
        (good, dict(inputs, plucker=inputs["plucker"][:, :, :3]), "plucker"),
        (good, dict(inputs, plucker=None), "plucker"),
        (good, dict(inputs, plucker=inputs["plucker"] * float("inf")), "plucker"),
        (good, dict(inputs, grid_shape=(6, 7)), "grid_shape"),
        (good, dict(inputs, grid_affine=torch.zeros(4, 4)), "grid_affine"),
        (good, dict(inputs, grid_affine=torch.eye(4).expand(2, 4, 4)), "grid_affine"),
    ]
    for projections, kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            model(projections, **kwargs)
    with pytest.raises(ValueError, match="box_start"):
        model(good, **inputs, box_start=(4, 0, 0), box_size=(3, 3, 3))
    with pytest.raises(ValueError, match="box_size"):
        model(good, **inputs, box_size=(0, 3, 3))
    with pytest.raises(ValueError, match="chunk_size"):
        model(good, **inputs, chunk_size=0)
    with pytest.raises(ValueError, match="img_size"):
        model.geometry_inputs(cone(3, det_shape=(48, 48)))
    with pytest.raises(ValueError, match="geometry"):
        geometry_inputs([cone(3), cone(4)], 16)
    with pytest.raises(ValueError, match="pose_conditioning"):
        XGRM(**{**SMALL, "pose_conditioning": "concat"})
    with pytest.raises(ValueError, match="patch_size"):
        XGRM(**{**SMALL, "img_size": 40})
    # no pose conditioning: the Plücker maps may be left out
    out = small_model(pose_conditioning="none")(good, **dict(inputs, plucker=None))
    assert out.volume.shape == (1, 1, *VOL_SHAPE)


# --------------------------------------------------------------------------- checkpoints, registry, render


def test_save_pretrained_round_trip_gives_identical_outputs(tmp_path):
    model = create_model("xgrm_tiny", **SMALL, shift=True).eval()
    perturb(model)
    target = model.save_pretrained(tmp_path / "ckpt")
    projections = torch.rand(2, 3, 32, 32)
    for loaded in (XGRM.from_pretrained(target), load_pretrained(target)):
        assert type(loaded) is XGRM and loaded.registry_name == "xgrm_tiny"
        loaded.eval()
        with torch.no_grad():
            a, b = run(model, cone(3), projections), run(loaded, cone(3), projections)
        for field in ("means", "scales", "quats", "intensities"):
            assert torch.equal(getattr(a.gaussians, field), getattr(b.gaussians, field))


def test_registered_sizes():
    assert {"xgrm_tiny", "xgrm_base"} <= set(list_models("xgrm_*"))
    base = XGRM_SIZES["base"]
    assert (base["img_size"], base["patch_size"], base["hidden_size"], base["num_layers"], base["num_heads"]) == \
        (256, 16, 768, 12, 12)
    assert (base["fusion_size"], base["fusion_layers"], base["fusion_heads"]) == (768, 12, 12)
    assert XGRM_GRID_SIZES == {"tiny": 32, "base": 256}
    with pytest.raises(ValueError, match="hidden_dim"):
        create_model("xgrm_tiny", hidden_dim=3)
    model = create_model("xgrm_tiny").eval()  # the CPU size runs on its 32^3 grid
    geo = cone(6, det_shape=(64, 64), vol_shape=(32,) * 3, vol_spacing=(1.0,) * 3, vol_offset=(0.0,) * 3)
    with torch.no_grad():
        out = model.reconstruct(torch.rand(2, 6, 64, 64), geo)
    assert out.volume.shape == (2, 1, 32, 32, 32)


@pytest.mark.parametrize("spacing", [(2.0, 2.0, 2.0), (3.0, 2.5, 2.0)])
def test_render_goes_through_project_and_matches_the_voxel_projector_at_the_initial_scale(spacing):
    """With every scale at UNIT_MASS_SCALE voxels (the initial scale), each Gaussian holds its voxel's mass:
    the rendered X-rays of a constant block agree with ``forward_project`` of the extracted volume."""
    from medgauss.ct import forward_project

    model = small_model().eval()
    geo = cone(2, seed=4, vol_shape=(12, 12, 12), vol_spacing=spacing, vol_offset=(0.0, 0.0, 0.0),
               det_spacing=(2.0, 2.0))
    with torch.no_grad():
        model.decoder.mlp[-1].weight.zero_()  # every voxel: the head's biases (initial scale, identity rotation)
        model.decoder.mlp[-1].bias[0] = math.log(math.expm1(0.5))  # opacity 0.5
        g = run(model, geo, torch.rand(1, 2, 32, 32)).gaussians
        volume = g.intensities.reshape(1, 1, 12, 12, 12)
        rendered = model.render(g, geo, backend="torch", cutoff=None)
        assert torch.equal(rendered, project(g, geo, backend="torch", cutoff=None))
        reference = forward_project(volume, geo, backend="torch")
    assert torch.allclose(volume, torch.full_like(volume, 0.5))
    assert rendered.shape == reference.shape == (1, 2, 32, 32)
    assert rendered.sum().item() == pytest.approx(reference.sum().item(), rel=5e-3)  # same total mass
    centre = reference > 0.9 * reference.max()  # rays through the middle of the block: same values on average
    assert rendered[centre].mean().item() == pytest.approx(reference[centre].mean().item(), rel=1e-2)


def test_pretrained_vit_file_initialises_the_encoder_and_is_never_needed_again(tmp_path):
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                            qkv_bias=True, num_classes=0)
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    save_file(state, str(tmp_path / "vit.safetensors"))
    torch.save({"model": {"module." + k: v for k, v in state.items()}}, tmp_path / "vit.pth")
    for name in ("vit.safetensors", "vit.pth"):
        model = XGRM(**{**SMALL, "qkv_bias": True, "pretrained": str(tmp_path / name)})
        enc = model.encoder
        for key, value in enc.blocks.state_dict().items():
            assert torch.equal(value, state[f"blocks.{key}"]), key
        assert torch.equal(enc.norm.weight, state["norm.weight"])
        assert torch.allclose(enc.patch_embed.weight, state["patch_embed.proj.weight"].sum(1, keepdim=True))
        assert enc.pos_embed.shape == (1, 4, 32)  # 4x4 grid (+ class token) resized to 2x2
        assert model.init_config["pretrained"] is None
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        XGRM(**{**SMALL, "pretrained": str(tmp_path / "missing.safetensors")})
    save_file({"head.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors"):
        XGRM(**{**SMALL, "pretrained": str(tmp_path / "other.safetensors")})
