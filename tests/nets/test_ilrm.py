"""The iLRM-style IterativeGaussianDecoder, alone and as XGRM(decoder="iterative"): rays from projection
matrices against the geometry's, the VoxGS activation, shapes, view permutations, gradients, the voxel frame,
chunks and sub-boxes, mini-batch cross-attention against masked attention, token uplifting, the swap with
VoxGS by config, errors, checkpoints."""

import math

import numpy as np
import pytest
import torch

from medgauss.frame import crop_affine
from medgauss.gaussians import Gaussians
from medgauss.geometry import ParallelBeamGeometry
from medgauss.nets import XGRM, IterativeGaussianDecoder, XGRMOutput, create_model, ilrm, list_models, load_pretrained
from medgauss.nets.blocks import sincos_pos_embed_3d
from medgauss.nets.ilrm import (
    Attention,
    feature_map_rays,
    mini_batch_cross_attention,
    pixel_rays,
    sincos_embed_points,
)
from medgauss.nets.voxgs import VoxGSDecoder, activate_voxel_gaussians, check_box, check_grid
from medgauss.nets.xgrm import grid_frame, normalize_plucker
from medgauss.nets.zoo import XGRM_GRID_SIZES, XGRM_ITERATIVE_OPTIONS
from tests.nets._xgrm_helpers import VOL_SHAPE, cone, perturb, run

SMALL = dict(img_size=32, patch_size=16, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, fusion_size=32,
             fusion_layers=1, fusion_heads=2, fusion_mlp_dim=64, pose_dim=16, feature_dim=8, upsample_factor=2)
ITERATIVE = dict(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32, block_size=2, window_size=2, cell_dim=8)
OPTIONS = {
    "plain": {},
    "groups_layer": dict(cross_attention_groups=2),
    "groups_query_uplift": dict(cross_attention_groups=4, cross_attention_schedule="query", uplift=2),
    "uplift_no_rays": dict(uplift=2, ray_embedding=False, qk_norm=False),
}


def small_model(options: dict | None = None, decoder: str = "iterative", **overrides) -> XGRM:
    torch.manual_seed(0)
    kwargs = {**SMALL, **overrides, "decoder": decoder}
    if decoder == "iterative":
        kwargs["decoder_options"] = {**ITERATIVE, **(options or {})}
    return XGRM(**kwargs)








def brute_force_centres(affine: np.ndarray, start, size) -> np.ndarray:
    rows = []
    for d in range(size[0]):
        for h in range(size[1]):
            for w in range(size[2]):
                rows.append((affine @ np.array([start[0] + d, start[1] + h, start[2] + w, 1.0]))[:3])
    return np.array(rows)


FIELDS = ("means", "scales", "quats", "intensities")


# ------------------------------------------------------------------------------- geometry and embeddings


@pytest.mark.parametrize("kind", ["cone", "cone_posed", "parallel"])
def test_rays_from_projection_matrices_are_the_geometry_rays(kind):
    if kind == "parallel":
        geo = ParallelBeamGeometry(det_shape=(32, 40), det_spacing=(1.5, 1.2), vol_shape=VOL_SHAPE,
                                   vol_spacing=(3.0, 2.5, 2.0), angles=[0.3, 1.9, 4.0], det_offset=(0.7, -1.1),
                                   vol_offset=(1.5, -2.0, 3.0))
    else:
        poses = None
        if kind == "cone_posed":
            poses = np.tile(np.eye(4), (3, 1, 1))
            for i, angle in enumerate((0.1, -0.2, 0.3)):
                c, s = math.cos(angle), math.sin(angle)
                poses[i, :3, :3] = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
                poses[i, :3, 3] = (2.0 * i, -1.0, 0.5)
        geo = cone(3, seed=5, det_shape=(32, 40), poses=poses)
    rows, cols = geo.det_shape
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    pixels = torch.stack((c, r), dim=-1).reshape(-1, 2)
    rays = pixel_rays(geo.projection_matrices()[None], pixels)[0]  # [V, P, 6]
    expected = geo.plucker(dtype=torch.float64).flatten(2).transpose(1, 2)  # [V, P, 6]: (d, o x d)
    assert torch.allclose(rays, expected, atol=1e-9, rtol=0)
    # feature-map pixels at the patch centres: geometry.plucker(downsample=8), in X-GRM's normalised frame
    affine = geo.volume_affine[None]
    got = feature_map_rays(geo.projection_matrices()[None], geo.det_shape, (4, 5), VOL_SHAPE, affine)
    centre, radius = grid_frame(VOL_SHAPE, affine)
    want = normalize_plucker(geo.plucker(downsample=8, dtype=torch.float64)[None], centre, radius)
    assert got.shape == (1, 3, 6, 4, 5) and torch.allclose(got, want, atol=1e-9, rtol=0)


def test_sincos_of_points_is_the_blocks_table_anywhere():
    for grid, dim in (((3, 4, 2), 20), ((2, 2, 5), 18)):
        cells = torch.stack(torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij"), -1).reshape(-1, 3)
        assert torch.equal(sincos_embed_points(cells.double(), dim), sincos_pos_embed_3d(grid, dim))
    point = torch.tensor([[0.25, 1.5, -2.0]], dtype=torch.float64)  # not a lattice point
    by_hand = []  # dim 13: 4 channels per axis, (sin, sin, cos, cos) at frequencies 1 and 1/100, one zero
    for p in point[0].tolist():
        by_hand += [math.sin(p), math.sin(p / 100), math.cos(p), math.cos(p / 100)]
    assert torch.allclose(sincos_embed_points(point, 13)[0], torch.tensor(by_hand + [0.0]), atol=1e-7)


@pytest.mark.parametrize("shift", [False, True])
def test_shared_voxel_activation_by_hand_and_initial_head_is_voxgs(shift):
    """Both decoders activate through voxgs.activate_voxel_gaussians: checked here against the formulas
    written out per Gaussian, and the iterative head starts from VoxGS's initial Gaussians."""
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 30, 11 if shift else 8, generator=gen)
    centres = torch.randn(2, 30, 3, generator=gen) * 50
    affine = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    affine[0, :3, :3] = torch.tensor([[0.0, 0.0, 2.0], [0.0, 2.5, 0.0], [3.0, 0.0, 0.0]])
    affine[1, :3, :3] = torch.diag(torch.tensor([1.0, -1.5, 0.7], dtype=torch.float64))
    for min_scale, max_scale in ((0.25, 1.0), (0.5, 2.0)):
        g = activate_voxel_gaussians(raw, centres, affine, min_scale, max_scale, shift, 0.3)
        for b in range(2):
            voxel_mm = abs(float(torch.linalg.det(affine[b, :3, :3]))) ** (1 / 3)
            for n in range(30):
                r = raw[b, n].double()
                assert math.isclose(float(g.intensities[b, n]), math.log1p(math.exp(float(r[0]))), rel_tol=1e-5)
                for a in range(3):
                    sig = 1 / (1 + math.exp(-float(r[1 + a])))
                    expected = (min_scale + (max_scale - min_scale) * sig) * voxel_mm
                    assert math.isclose(float(g.scales[b, n, a]), expected, rel_tol=1e-5)
                q = r[4:8] / r[4:8].norm()
                assert torch.allclose(g.quats[b, n].double(), q, atol=1e-6)
                mean = centres[b, n].double()
                if shift:
                    mean = mean + affine[b, :3, :3] @ (0.3 * torch.tanh(r[8:11]))
                assert torch.allclose(g.means[b, n].double(), mean, atol=1e-4)
        voxgs = VoxGSDecoder(8, min_scale=min_scale, max_scale=max_scale, shift=shift, max_shift=0.3)
        ours = IterativeGaussianDecoder(8, min_scale=min_scale, max_scale=max_scale, shift=shift, max_shift=0.3,
                                        **ITERATIVE)
        assert ours.num_outputs == voxgs.num_outputs
        assert torch.equal(ours.cell_mlp[-1].bias, voxgs.mlp[-1].bias)  # the same initial Gaussians


def test_mini_batch_cross_attention_is_masked_attention_and_one_group_is_plain():
    torch.manual_seed(0)
    attention = Attention(12, 3).double()
    perturb(attention, 0.2)
    decoder = IterativeGaussianDecoder(4, hidden_size=12, num_heads=3, cross_attention_groups=4)
    groups = decoder.token_groups(3, (4, 6), torch.device("cpu"))  # 3 views of 4 x 6 tokens, 2 x 2 strides
    assert sorted(torch.cat(groups).tolist()) == list(range(72))  # a partition of the tokens
    pixel = torch.arange(72) % 24
    for g, tokens in enumerate(groups):  # the same strided pixels of every view
        rows, cols = pixel[tokens] // 6, pixel[tokens] % 6
        assert ((rows % 2) * 2 + cols % 2 == g).all() and tokens.numel() == 18
    x, context = torch.randn(2, 10, 12, dtype=torch.float64), torch.randn(2, 72, 12, dtype=torch.float64)
    keys, values = attention.keys_values(context)
    targets = torch.tensor([0, 3, 1, 1, 2, 0, 3, 3, 2, 1])
    out = mini_batch_cross_attention(attention, x, keys, values, groups, targets)
    group_of = torch.empty(72, dtype=torch.long)
    for g, tokens in enumerate(groups):
        group_of[tokens] = g
    mask = group_of[None, :] == targets[:, None]  # [N, T]
    q = attention.queries(x)
    logits = torch.einsum("bhnd,bhtd->bhnt", q, keys) / math.sqrt(4)
    weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    by_hand = attention.proj(torch.einsum("bhnt,bhtd->bhnd", weights, values).transpose(1, 2).flatten(2))
    assert torch.allclose(out, by_hand, atol=1e-12, rtol=0)
    assert torch.allclose(out, attention.attend(q, keys, values, mask), atol=1e-12, rtol=0)
    # one group of every token: exactly plain cross-attention with the same weights
    one = mini_batch_cross_attention(attention, x, keys, values, [torch.arange(72)], torch.zeros(10, dtype=torch.long))
    assert torch.equal(one, attention(x, context))


def test_query_schedules_assign_subsets_by_layer_or_by_position_in_the_window():
    for schedule in ("layer", "query"):
        decoder = IterativeGaussianDecoder(4, hidden_size=12, num_heads=3, window_size=3, cross_attention_groups=4,
                                           cross_attention_schedule=schedule)
        for layer in range(5):
            targets = decoder.query_targets(layer, 2, torch.device("cpu"))
            expected = [(layer + (a + b + c if schedule == "query" else 0)) % 4
                        for _ in range(2) for a in range(3) for b in range(3) for c in range(3)]
            assert targets.tolist() == expected


def test_decoder_wires_mini_batch_cross_attention_as_masked_attention(monkeypatch):
    """The whole model with mini-batch cross-attention equals the same model whose cross-attention is plain
    attention under the subset mask (float64)."""
    model = small_model(OPTIONS["groups_query_uplift"]).double().eval()
    perturb(model)
    geo = cone(3, seed=1)
    projections = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    inputs = model.geometry_inputs(geo, dtype=torch.float64)
    with torch.no_grad():
        fast = model(projections, **inputs)

        def masked(attention, x, keys, values, token_groups, targets):
            group_of = torch.empty(keys.shape[2], dtype=torch.long)
            for g, tokens in enumerate(token_groups):
                group_of[tokens] = g
            return attention.attend(attention.queries(x), keys, values, group_of[None, :] == targets[:, None])

        monkeypatch.setattr(ilrm, "mini_batch_cross_attention", masked)
        reference = model(projections, **inputs)
        monkeypatch.undo()
        model.decoder.cross_attention_groups = 1  # the same weights, plain cross-attention: a different output
        plain = model(projections, **inputs)
    for field in FIELDS:
        assert torch.allclose(getattr(fast.gaussians, field), getattr(reference.gaussians, field), atol=1e-10)
    assert not torch.allclose(fast.volume, plain.volume, atol=1e-6)


def test_uplifting_with_copied_children_and_a_mean_merge_is_no_uplifting():
    base = small_model().double().eval()
    perturb(base)
    uplifted = small_model({"uplift": 2}).double().eval()
    missing, unexpected = uplifted.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(k.split(".")[-2] in ("up", "merge") or k.endswith("uplift_embed")
                                              for k in missing)
    dim, children = ITERATIVE["hidden_size"], 8
    with torch.no_grad():
        for layer in uplifted.decoder.layers:
            layer.up.weight.copy_(torch.eye(dim, dtype=torch.float64).repeat(children, 1))  # every child = parent
            layer.up.bias.zero_()
            layer.uplift_embed.zero_()
            layer.merge.weight.copy_(torch.eye(dim, dtype=torch.float64).repeat(1, children) / children)  # mean
            layer.merge.bias.zero_()
    projections = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    inputs = base.geometry_inputs(cone(3), dtype=torch.float64)
    with torch.no_grad():
        a, b = base(projections, **inputs), uplifted(projections, **inputs)
        for field in FIELDS:
            assert torch.allclose(getattr(a.gaussians, field), getattr(b.gaussians, field), atol=1e-12), field
        uplifted.decoder.layers[0].uplift_embed.normal_()  # children that differ change the output
        assert not torch.allclose(uplifted(projections, **inputs).volume, a.volume, atol=1e-6)


# ------------------------------------------------------------------------------------- shapes, invariance


def test_shapes_for_any_number_of_views_with_the_same_weights():
    model = small_model(OPTIONS["groups_query_uplift"]).eval()
    n = math.prod(VOL_SHAPE)
    for k in (1, 3, 6):
        with torch.no_grad():
            out = run(model, cone(k), torch.rand(2, k, 32, 32))
        assert isinstance(out, XGRMOutput) and isinstance(out.gaussians, Gaussians)
        assert out.volume.shape == (2, 1, *VOL_SHAPE) and out.box_size == VOL_SHAPE
        g = out.gaussians
        assert g.means.shape == (2, n, 3) and g.scales.shape == (2, n, 3) and g.quats.shape == (2, n, 4)
        assert g.dtype == torch.float32 and torch.isfinite(out.volume).all() and (out.volume >= 0).all()
        assert torch.allclose(g.quats.norm(dim=-1), torch.ones(()))


@pytest.mark.parametrize("options", ["plain", "groups_query_uplift", "mean_pooled_start", "learned_start"])
def test_permuting_the_views_leaves_the_output_unchanged(options):
    starts = {"mean_pooled_start": dict(query_init_pooling="mean"), "learned_start": dict(query_init="learned")}
    model = small_model(OPTIONS.get(options, starts.get(options))).eval()
    perturb(model)
    geo, k = cone(5, seed=3), 5
    projections = torch.rand(2, k, 32, 32)
    perm = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        a = run(model, geo, projections)
        b = run(model, geo.subset(perm), projections[:, perm])
        fewer = run(model, geo.subset(range(4)), projections[:, :4])
    for field in FIELDS:
        assert torch.allclose(getattr(a.gaussians, field), getattr(b.gaussians, field), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a.volume, fewer.volume, atol=1e-4)  # the views do matter


@pytest.mark.parametrize("options", list(OPTIONS))
def test_gradients_reach_every_parameter(options):
    model = small_model(OPTIONS[options], shift=options == "uplift_no_rays")
    out = run(model, cone(3), torch.rand(2, 3, 32, 32))
    g = out.gaussians
    gen = torch.Generator().manual_seed(0)
    loss = out.volume.square().mean() + sum((torch.randn(t.shape, generator=gen) * t).sum()
                                            for t in (g.scales, g.quats, g.means))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, f"parameters without gradient: {missing}"
    assert isinstance(model.decoder, IterativeGaussianDecoder)


# ------------------------------------------------------------------------------------------ voxel frame


def test_volume_is_the_opacities_and_means_are_the_voxel_centres():
    model = small_model().eval()
    geos = [cone(3, seed=1), cone(3, seed=2, vol_offset=(-4.0, 5.0, 0.5))]
    with torch.no_grad():
        out = model.reconstruct(torch.rand(2, 3, 32, 32), geos)
    assert torch.equal(out.volume.reshape(2, -1), out.gaussians.intensities)
    assert out.volume.data_ptr() == out.gaussians.intensities.data_ptr()  # indexing, not a copy
    for b, geo in enumerate(geos):
        expected = brute_force_centres(geo.volume_affine.numpy(), (0, 0, 0), VOL_SHAPE)
        np.testing.assert_allclose(out.gaussians.means[b].double().numpy(), expected, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(out.affine[b].numpy(), geo.volume_affine.numpy())
    voxel_mm = abs(np.linalg.det(geos[0].volume_affine.numpy()[:3, :3])) ** (1 / 3)
    s = out.gaussians.scales / voxel_mm
    assert (s >= 0.25).all() and (s <= 1.0).all()


# -------------------------------------------------------------------------------- chunks and sub-volumes


def test_chunked_decoding_equals_one_chunk_and_sub_boxes_equal_the_full_decode():
    model = small_model(OPTIONS["groups_query_uplift"], shift=True).eval()
    perturb(model)
    geo = cone(4, seed=2)
    projections = torch.rand(2, 4, 32, 32)
    with torch.no_grad():
        full = run(model, geo, projections, chunk_size=10 ** 6)
        chunked = run(model, geo, projections, chunk_size=1)  # one window per chunk
        two = run(model, geo, projections, chunk_size=2 * 4 ** 3)  # two windows per chunk
        boxes = [(torch.tensor([[1, 2, 0], [3, 0, 1]]), (3, 4, 4), 11), (torch.tensor([5, 6, 4]), (1, 1, 1), 1),
                 (torch.tensor([[0, 0, 0], [2, 3, 1]]), (4, 4, 4), 10 ** 6)]
        decoded = [(s, z, run(model, geo, projections, box_start=s, box_size=z, chunk_size=c)) for s, z, c in boxes]
    for field in FIELDS:
        assert torch.allclose(getattr(full.gaussians, field), getattr(chunked.gaussians, field), atol=1e-6)
        assert torch.allclose(getattr(full.gaussians, field), getattr(two.gaussians, field), atol=1e-6)
    for starts, size, box in decoded:
        starts = starts.expand(2, 3)
        assert box.volume.shape == (2, 1, *size)
        for b, (d, h, w) in enumerate(starts.tolist()):
            crop = (slice(d, d + size[0]), slice(h, h + size[1]), slice(w, w + size[2]))
            assert torch.allclose(box.volume[b, 0], full.volume[b, 0][crop], atol=1e-6)
            for field in ("means", "scales", "quats"):
                full_field = getattr(full.gaussians, field)[b].reshape(*VOL_SHAPE, -1)[crop]
                assert torch.allclose(getattr(box.gaussians, field)[b].reshape(*size, -1), full_field, atol=1e-5)
            np.testing.assert_allclose(box.affine[b].numpy(), crop_affine(geo.volume_affine.numpy(), (d, h, w)))


def test_chunks_bound_the_queries_held_at_once_whatever_the_grid_size():
    model = small_model().eval()
    seen: list[int] = []
    model.decoder.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    window_queries = ITERATIVE["window_size"] ** 3
    window_voxels = (ITERATIVE["window_size"] * ITERATIVE["block_size"]) ** 3
    for shape in (VOL_SHAPE, (16, 14, 12)):
        geo = cone(2, vol_shape=shape)
        for windows in (1, 3):
            seen.clear()
            with torch.no_grad():
                run(model, geo, torch.rand(1, 2, 32, 32), chunk_size=windows * window_voxels)
            lattice = [math.ceil(n / ITERATIVE["block_size"]) for n in shape]
            total_windows = math.prod(math.ceil(n / ITERATIVE["window_size"]) for n in lattice)
            assert max(seen) == windows * window_queries and len(seen) == math.ceil(total_windows / windows)
    seen.clear()
    with torch.no_grad():  # a small box runs only the windows around it
        run(model, cone(2, vol_shape=(16, 14, 12)), torch.rand(1, 2, 32, 32), box_start=(5, 5, 5),
            box_size=(2, 2, 2), chunk_size=10 ** 6)
    assert seen == [window_queries]


def test_gradient_checkpointing_gives_the_same_gradients():
    projections = torch.rand(1, 3, 32, 32)
    grads = []
    for flag in (False, True):
        model = small_model(OPTIONS["groups_query_uplift"], grad_checkpointing=flag)
        out = run(model, cone(3), projections, chunk_size=50)
        (out.volume.square().sum() + out.gaussians.scales.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6, rtol=1e-5), name


def test_bf16_autocast_keeps_gaussians_float32():
    model = small_model(OPTIONS["groups_query_uplift"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, cone(3), torch.rand(1, 3, 32, 32))
    g = out.gaussians
    assert g.means.dtype == g.scales.dtype == g.quats.dtype == g.intensities.dtype == torch.float32
    assert all(torch.isfinite(t).all() for t in (g.means, g.scales, g.quats, g.intensities))
    out.volume.mean().backward()


# ------------------------------------------------------------------------------------ swap by config


def test_voxgs_and_iterative_decoders_are_swappable_by_config():
    models = {kind: small_model(decoder=kind).eval() for kind in ("voxgs", "iterative")}
    assert isinstance(models["voxgs"].decoder, VoxGSDecoder)
    assert isinstance(models["iterative"].decoder, IterativeGaussianDecoder)
    geo = cone(3)
    projections = torch.rand(2, 3, 32, 32)
    for kwargs in ({}, dict(box_start=torch.tensor([[1, 2, 0], [3, 0, 1]]), box_size=(3, 4, 4), chunk_size=9)):
        with torch.no_grad():
            outs = {kind: run(model, geo, projections, **kwargs) for kind, model in models.items()}
        a, b = outs["voxgs"], outs["iterative"]
        assert type(a) is type(b) is XGRMOutput and type(a.gaussians) is type(b.gaussians)
        for field in FIELDS:
            ta, tb = getattr(a.gaussians, field), getattr(b.gaussians, field)
            assert ta.shape == tb.shape and ta.dtype == tb.dtype, field
        assert torch.allclose(a.gaussians.means, b.gaussians.means, atol=1e-5)  # both: the voxel centres
        assert a.volume.shape == b.volume.shape and a.box_size == b.box_size
        assert torch.equal(a.box_start, b.box_start) and torch.equal(a.affine, b.affine)
        assert torch.equal(b.volume.reshape(2, -1), b.gaussians.intensities)
    # the encoders are the same modules: only the decoder differs
    voxgs_keys = {k for k in models["voxgs"].state_dict() if not k.startswith("decoder.")}
    assert voxgs_keys == {k for k in models["iterative"].state_dict() if not k.startswith("decoder.")}


def test_default_model_is_unchanged_by_the_decoder_switch():
    torch.manual_seed(0)
    default = XGRM(**SMALL)
    explicit = small_model(decoder="voxgs")
    assert default.decoder_kind == "voxgs" and isinstance(default.decoder, VoxGSDecoder)
    for (ka, va), (kb, vb) in zip(default.state_dict().items(), explicit.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert default.init_config["decoder"] == "voxgs" and default.init_config["decoder_options"] is None


# ---------------------------------------------------------------------------------------------- errors


def test_bad_arguments_raise_value_errors_naming_them():
    constructor_cases = [
        (dict(hidden_size=10, num_heads=4), "hidden_size"),
        (dict(hidden_size=4, num_heads=1), "hidden_size"),
        (dict(block_size=0), "block_size"),
        (dict(window_size=1.5), "window_size"),
        (dict(cross_attention_groups=0), "cross_attention_groups"),
        (dict(cross_attention_schedule="random"), "cross_attention_schedule"),
        (dict(uplift=0), "uplift"),
        (dict(cell_dim=True), "cell_dim"),
        (dict(min_scale=2.0, max_scale=1.0), "min_scale"),
        (dict(shift=True, max_shift=0.0), "max_shift"),
    ]
    for kwargs, name in constructor_cases:
        with pytest.raises(ValueError, match=name):
            IterativeGaussianDecoder(8, **{**ITERATIVE, **kwargs})
    with pytest.raises(ValueError, match="decoder"):
        XGRM(**SMALL, decoder="mlp")
    with pytest.raises(ValueError, match="decoder_options"):
        XGRM(**SMALL, decoder_options={"uplift": 2})  # options of the iterative decoder with VoxGS
    with pytest.raises(ValueError, match="decoder_options"):
        XGRM(**SMALL, decoder="iterative", decoder_options={"layers": 2})
    with pytest.raises(ValueError, match="decoder_options"):
        XGRM(**SMALL, decoder="iterative", decoder_options={"feature_dim": 4})  # XGRM's own argument
    with pytest.raises(ValueError, match="decoder"):
        create_model("xgrm_tiny_iterative", decoder="voxgs")

    decoder = IterativeGaussianDecoder(8, **ITERATIVE)
    geo = cone(3)
    maps = torch.rand(1, 3, 8, 4, 4)
    shape, affine = check_grid(VOL_SHAPE, geo.volume_affine, 1)
    start, size = check_box(None, None, shape, 1)
    good = dict(feature_maps=maps, projection_matrices=geo.projection_matrices().float()[None], image_size=(32, 32),
                grid_affine=affine, box_start=start, box_size=size, chunk_size=100, grid_shape=shape)
    assert decoder(**good).intensities.shape == (1, math.prod(VOL_SHAPE))
    forward_cases = [
        (dict(feature_maps=torch.rand(1, 3, 5, 4, 4)), "feature_maps"),
        (dict(feature_maps=torch.rand(3, 8, 4, 4)), "feature_maps"),
        (dict(feature_maps=maps.int()), "feature_maps"),
        (dict(projection_matrices=good["projection_matrices"][:, :2]), "projection_matrices"),
        (dict(image_size=(32,)), "image_size"),
        (dict(grid_shape=(6, 7)), "grid_shape"),
        (dict(grid_affine=torch.zeros(4, 4)), "grid_affine"),
        (dict(box_start=torch.tensor([[5, 0, 0]]), box_size=(3, 3, 3)), "box_start"),
        (dict(box_size=(0, 3, 3)), "box_size"),
        (dict(chunk_size=0), "chunk_size"),
    ]
    for changes, name in forward_cases:
        with pytest.raises(ValueError, match=name):
            decoder(**{**good, **changes})
    with pytest.raises(ValueError, match="cross_attention_groups"):  # 5 x 5 strided subsets of a 4 x 4 map
        IterativeGaussianDecoder(8, **{**ITERATIVE, "cross_attention_groups": 25})(**good)
    model = small_model()
    with pytest.raises(ValueError, match="projections"):
        run(model, geo, torch.rand(1, 3, 32, 48))


# --------------------------------------------------------------------------------- checkpoints, registry


def test_save_pretrained_round_trip_gives_identical_outputs(tmp_path):
    model = create_model("xgrm_tiny_iterative", **SMALL, shift=True,
                         decoder_options={**ITERATIVE, **OPTIONS["groups_query_uplift"]}).eval()
    perturb(model)
    target = model.save_pretrained(tmp_path / "ckpt")
    projections = torch.rand(2, 3, 32, 32)
    for loaded in (XGRM.from_pretrained(target), load_pretrained(target)):
        assert type(loaded) is XGRM and loaded.registry_name == "xgrm_tiny_iterative"
        assert isinstance(loaded.decoder, IterativeGaussianDecoder) and loaded.decoder.shift
        assert loaded.decoder.cross_attention_groups == 4 and loaded.decoder.layers[0].num_children == 8
        loaded.eval()
        with torch.no_grad():
            a, b = run(model, cone(3), projections), run(loaded, cone(3), projections)
        for field in FIELDS:
            assert torch.equal(getattr(a.gaussians, field), getattr(b.gaussians, field))


def test_registered_cpu_size_runs_on_its_grid():
    assert "xgrm_tiny_iterative" in list_models("xgrm_*")
    model = create_model("xgrm_tiny_iterative").eval()
    decoder = model.decoder
    assert isinstance(decoder, IterativeGaussianDecoder) and model.decoder_kind == "iterative"
    options = XGRM_ITERATIVE_OPTIONS["tiny"]
    assert (decoder.hidden_size, len(decoder.layers), decoder.block_size) == \
        (options["hidden_size"], options["num_layers"], options["block_size"])
    merged = create_model("xgrm_tiny_iterative", decoder_options={"uplift": 2}).decoder
    assert merged.layers[0].num_children == 8 and merged.hidden_size == options["hidden_size"]
    grid = XGRM_GRID_SIZES["tiny"]
    geo = cone(6, det_shape=(64, 64), vol_shape=(grid,) * 3, vol_spacing=(1.0,) * 3, vol_offset=(0.0,) * 3)
    with torch.no_grad():
        out = model.reconstruct(torch.rand(2, 6, 64, 64), geo)
    assert out.volume.shape == (2, 1, grid, grid, grid) and torch.isfinite(out.volume).all()
