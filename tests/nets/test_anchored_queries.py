"""Anchored queries (issue 8, query design) next to the paper's free queries.

References are independent of the code under test: anchor grids worked out by hand, a float64 brute-force
Gaussian field with scipy's rotations, finite differences (gradcheck), and free-mode values recorded from
the code before anchored queries existed.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.spatial.transform import Rotation

from medgauss.losses import MaskedGaussianLoss
from medgauss.nets import GaussianMAE, create_model, list_models, load_pretrained
from medgauss.nets.blocks import sincos_pos_embed_3d
from medgauss.nets.decoders import GaussianHeads, anchor_grid_shape, anchor_points, anchor_pos_embed

CONF = Path(__file__).resolve().parents[2] / "recipes" / "conf" / "model"


def _model(name="gmae_tiny", img=32, patch=8, **kwargs):
    return create_model(name, img_size=img, patch_size=patch, **kwargs)


def _hand_anchors(g0, g1, g2):
    """Cell centres of a g0 x g1 x g2 grid, C order, written out with loops."""
    return torch.tensor([[(i + 0.5) / g0, (j + 0.5) / g1, (k + 0.5) / g2]
                         for i in range(g0) for j in range(g1) for k in range(g2)])


# ---------------------------------------------------------------------------------------------- anchor grid

@pytest.mark.parametrize("num_queries,img_size,grid", [
    (512, (96, 96, 96), (8, 8, 8)),
    (128, (96, 96, 96), (4, 4, 8)),     # the tiny models' 128 queries
    (64, (64, 64, 64), (4, 4, 4)),
    (100, (96, 96, 96), (4, 5, 5)),
    (8, (16, 16, 16), (2, 2, 2)),
    (1, (16, 16, 16), (1, 1, 1)),
    (2, (16, 16, 16), (1, 1, 2)),
    (128, (32, 96, 96), (2, 8, 8)),     # flat crop: cells 16 x 12 x 12 voxels, not 8 x 24 x 12
])
def test_anchor_grid_is_the_most_cubic(num_queries, img_size, grid):
    assert anchor_grid_shape(num_queries, img_size) == grid


def test_anchor_grid_tie_and_flat_crop_worked_by_hand():
    # (96, 48, 48) with 32 queries: (4, 2, 4) gives cells 24 x 24 x 12 (2:1), (8, 2, 2) gives 12 x 24 x 24
    # (2:1), (2, 4, 4) gives 48 x 12 x 12 (4:1), (4, 4, 2) 24 x 12 x 24 (2:1): the first 2:1 grid in C order
    # of (g0, g1) is (4, 2, 4); (8, 2, 2) comes later.
    assert anchor_grid_shape(32, (96, 48, 48)) == (4, 2, 4)


@pytest.mark.parametrize("num_queries", [5, 7, 10, 131])
def test_bad_grid_sizes_raise_naming_num_queries(num_queries):
    with pytest.raises(ValueError, match=rf"num_queries={num_queries} has no sensible anchor grid"):
        anchor_grid_shape(num_queries, (96, 96, 96))
    with pytest.raises(ValueError, match=rf"num_queries={num_queries}\b"):
        _model(num_queries=num_queries, query_mode="anchored")
    _model(num_queries=num_queries)  # free queries take any count


def test_bad_grid_error_suggests_nearby_counts():
    with pytest.raises(ValueError, match=r"nearest counts with a grid: \[128, 132\]"):
        anchor_grid_shape(131, (96, 96, 96))


@pytest.mark.parametrize("kwargs,match", [
    (dict(query_mode="dab"), "query_mode must be one of"),
    (dict(anchor_offset=0.1), "anchor_offset=0.1 applies to query_mode='anchored' only"),
    (dict(query_mode="anchored", anchor_offset=-0.1), "anchor_offset"),
    (dict(query_mode="anchored", anchor_offset=float("nan")), "anchor_offset"),
    (dict(query_mode="anchored", anchor_offset="0.1"), "anchor_offset"),
    (dict(query_mode="anchored", num_queries=0), "num_queries"),
    (dict(anchor_pool_sigma=1.0), "anchor_pool_sigma=1.0 applies to query_mode='anchored' only"),
    (dict(query_mode="anchored", anchor_pool_sigma=0.0), "anchor_pool_sigma"),
    (dict(query_mode="anchored", anchor_pool_sigma=float("inf")), "anchor_pool_sigma"),
    (dict(query_mode="anchored", anchor_pool_sigma="1"), "anchor_pool_sigma"),
])
def test_bad_query_arguments_raise_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _model(**{"num_queries": 8, **kwargs})


def test_anchor_points_are_cell_centres_in_c_order():
    assert torch.equal(anchor_points((4, 4, 8)), _hand_anchors(4, 4, 8))
    assert torch.equal(anchor_points((1, 2, 3)), _hand_anchors(1, 2, 3))


def test_anchor_embedding_is_the_patch_embedding_at_patch_centres():
    # Queries and visible tokens share one positional code: an anchor at a patch centre gets that patch's
    # sin-cos embedding; an anchor halfway between two patches gets the embedding of index 0.5.
    grid, dim = (3, 4, 5), 30
    assert torch.allclose(anchor_pos_embed(_hand_anchors(*grid), grid, dim), sincos_pos_embed_3d(grid, dim),
                          atol=1e-6)
    half = anchor_pos_embed(torch.tensor([[1 / 3, 0.25, 0.2]]), grid, dim)  # index (0.5, 0.5, 0.5)
    per_axis = 2 * (dim // 6)
    freqs = 1.0 / 10000.0 ** (np.arange(per_axis // 2) / (per_axis // 2))
    one_axis = np.concatenate([np.sin(0.5 * freqs), np.cos(0.5 * freqs)])
    assert np.allclose(half[0].numpy(), np.tile(one_axis, 3), atol=1e-6)


# ---------------------------------------------------------------------------------------- initialisation

def test_initial_centres_are_the_anchor_grid():
    torch.manual_seed(0)
    model = _model(num_queries=128, query_mode="anchored").eval()
    assert model.anchor_grid == (4, 4, 8)
    with torch.no_grad():
        g = model(torch.rand(3, 1, 32, 32, 32)).gaussians
    expected = _hand_anchors(4, 4, 8).expand(3, -1, -1)
    assert torch.allclose(g.means, expected, atol=1e-7, rtol=0)  # zero-initialised offset head: exact
    # default reach: 1.5 anchor cell widths per axis
    assert torch.allclose(model.heads.max_offset, torch.tensor([1.5 / 4, 1.5 / 4, 1.5 / 8]))


def test_decoder_queries_carry_their_anchor_embedding():
    torch.manual_seed(0)
    model = _model(num_queries=8, query_mode="anchored").eval()
    expected = anchor_pos_embed(_hand_anchors(2, 2, 2), (4, 4, 4), model.decoder.embed.out_features)
    assert torch.equal(model.decoder.query_pos[0], expected)
    images, noise = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 64)
    with torch.no_grad():
        model.heads.center.weight.normal_()  # let features move the centres
        before = model(images, noise).gaussians.means
        model.decoder.query_pos.zero_()
        after = model(images, noise).gaussians.means
    assert not torch.allclose(before, after, atol=1e-3)  # the embedding is used


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_anchor_pool_is_the_distance_weighted_mean_of_visible_tokens(sigma):
    """Brute force: for each anchor, weights exp(-d^2 / 2 sigma^2) over the visible patches, with the
    patch centre and the anchor written out in patch units by hand, normalised to sum 1."""
    torch.manual_seed(0)
    model = create_model("gmae_tiny_anchored", img_size=(16, 32, 24), patch_size=8, num_queries=12,
                         anchor_pool_sigma=sigma)
    decoder, grid = model.decoder, (2, 4, 3)
    anchors = _hand_anchors(*model.anchor_grid).double()
    ids_keep = torch.tensor([[0, 5, 7, 11, 13, 23], [2, 3, 4, 17, 20, 22]])
    tokens = torch.randn(2, 6, decoder.embed.out_features, dtype=torch.float64)
    got = decoder.anchor_pool(tokens, ids_keep)
    expected = torch.zeros_like(got)
    for b in range(2):
        for q in range(anchors.shape[0]):
            a = [anchors[q, i].item() * grid[i] for i in range(3)]
            weights = []
            for k in ids_keep[b].tolist():
                centre = (k // 12 + 0.5, (k // 3) % 4 + 0.5, k % 3 + 0.5)
                weights.append(math.exp(-sum((a[i] - centre[i]) ** 2 for i in range(3)) / (2 * sigma ** 2)))
            total = sum(weights)
            expected[b, q] = sum(w / total * tokens[b, j] for j, w in enumerate(weights))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_anchor_pool_feeds_the_queries_and_is_off_by_default():
    torch.manual_seed(0)
    pooled = _model("gmae_tiny_anchored", num_queries=8, anchor_pool_sigma=1.0).eval()
    plain = _model("gmae_tiny_anchored", num_queries=8).eval()
    assert plain.decoder.anchor_pool_sigma is None and pooled.init_config["anchor_pool_sigma"] == 1.0
    plain.load_state_dict(pooled.state_dict())  # no new parameters: the same weights, with and without
    images, noise = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 64)
    with torch.no_grad():
        pooled.heads.intensity.weight.normal_()
        plain.heads.intensity.weight.copy_(pooled.heads.intensity.weight)
        a = pooled(images, noise).gaussians.intensities
        b = plain(images, noise).gaussians.intensities
    assert not torch.allclose(a, b, atol=1e-4)


def _field_and_distance(g, points):
    """float64 brute force with scipy rotations: sum_q I_q exp(-m_q^2 / 2) and min_q m_q at ``points``."""
    means, scales = g.means[0].double().numpy(), g.scales[0].double().numpy()
    quats, intens = g.quats[0].double().numpy(), g.intensities[0].double().numpy()
    rot = Rotation.from_quat(quats[:, [1, 2, 3, 0]]).as_matrix()  # scipy wants (x, y, z, w)
    prec = rot @ (np.eye(3)[None] / scales[:, None, :] ** 2) @ rot.transpose(0, 2, 1)
    d = points[:, None, :] - means[None]
    m2 = np.einsum("mni,nij,mnj->mn", d, prec, d)
    return (intens[None] * np.exp(-0.5 * m2)).sum(1), np.sqrt(m2.min(1))


@pytest.mark.parametrize("num_queries,max_scale", [(64, 0.3), (128, 0.3), (512, 0.1)])
def test_initial_gaussians_tile_the_crop(num_queries, max_scale):
    torch.manual_seed(0)
    model = _model(num_queries=num_queries, query_mode="anchored", max_scale=max_scale).eval()
    with torch.no_grad():
        g = model(torch.rand(1, 1, 32, 32, 32)).gaussians
    cell = 1.0 / torch.tensor(model.anchor_grid, dtype=torch.float32)
    # scales: half a cell per axis (one standard deviation spans the cell), rotations ~ identity
    assert torch.allclose(g.scales[0], (0.5 * cell).expand(num_queries, 3), rtol=0.03)
    assert (g.quats[0, :, 0].abs() > 0.999).all()
    axis = (np.arange(24) + 0.5) / 24
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    field, distance = _field_and_distance(g, points)
    # every voxel lies within sqrt(3) standard deviations (a cell corner) of some Gaussian
    assert distance.max() <= math.sqrt(3.0) * 1.02
    # away from the crop faces the overlapping Gaussians sum to a flat field of about 0.4
    inner = ((points > 0.25) & (points < 0.75)).all(1)
    assert abs(field[inner].mean() - 0.4) < 0.03
    assert field[inner].min() > 0.9 * field[inner].mean() and field[inner].max() < 1.1 * field[inner].mean()


def test_free_queries_do_not_tile():
    # The same checks on free queries fail, so the tiling above is the anchored design's doing.
    torch.manual_seed(0)
    model = _model(num_queries=64, max_scale=0.3).eval()
    with torch.no_grad():
        g = model(torch.rand(1, 1, 32, 32, 32)).gaussians
    axis = (np.arange(24) + 0.5) / 24
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    field, distance = _field_and_distance(g, points)
    assert distance.max() > 2 * math.sqrt(3.0) or field.min() < 0.5 * field.mean()


# ------------------------------------------------------------------------------------------------ offsets

def _reference_centres(anchors, t, reach):
    """float64 formula: anchor + t * (distance to the upper/lower bound), bounds min(a + r, 1), max(a - r, 0)."""
    a, t, r = anchors.double(), t.double(), reach.double()
    up, down = (a + r).clamp(max=1.0) - a, a - (a - r).clamp(min=0.0)
    return a + torch.where(t >= 0, t * up, t * down)


@pytest.mark.parametrize("max_offset", [None, 0.05, 0.6])
def test_offsets_are_bounded_by_max_offset_and_stay_in_the_crop(max_offset):
    torch.manual_seed(0)
    grid = (2, 4, 4)
    anchors = anchor_points(grid)
    heads = GaussianHeads(16, 0.3, 2e-3, anchors=anchors, grid=grid, max_offset=max_offset)
    reach = (torch.tensor([1.5 / 2, 1.5 / 4, 1.5 / 4]) if max_offset is None
             else torch.full((3,), max_offset))
    with torch.no_grad():
        torch.nn.init.normal_(heads.center.weight, std=3.0)  # drive tanh into saturation
        torch.nn.init.normal_(heads.center.bias, std=1.0)
        features = torch.randn(64, len(anchors), 16)
        means = heads(features).means
        t = torch.tanh(heads.center(features))
    offsets = means.double() - anchors.double()
    assert (offsets.abs() <= reach.double() + 1e-6).all()
    assert (means >= 0).all() and (means <= 1).all()
    # the bound is reached (per axis, both directions where the crop leaves room): it is the bound
    bound_up = ((anchors + reach).clamp(max=1.0) - anchors).double()
    bound_down = (anchors - (anchors - reach).clamp(min=0.0)).double()
    assert torch.allclose(offsets.max(0).values, bound_up, atol=2e-3 * reach.max().item())
    assert torch.allclose(-offsets.min(0).values, bound_down, atol=2e-3 * reach.max().item())
    assert torch.allclose(means.double(), _reference_centres(anchors, t, reach), atol=1e-6)


def test_anchored_heads_match_finite_differences():
    torch.manual_seed(0)
    grid = (2, 2, 2)
    heads = GaussianHeads(6, 0.3, 2e-3, anchors=anchor_points(grid), grid=grid).double()
    for layer in (heads.center, heads.scale, heads.rotation, heads.intensity):
        torch.nn.init.normal_(layer.weight, std=0.5)
    features = torch.randn(2, 8, 6, dtype=torch.float64, requires_grad=True)

    def fn(f):
        g = heads(f)
        return g.means, g.scales, g.quats, g.intensities

    assert torch.autograd.gradcheck(fn, (features,))


def test_anchor_offset_reaches_the_heads_and_the_config():
    model = _model(num_queries=8, query_mode="anchored", anchor_offset=0.1)
    assert torch.equal(model.heads.max_offset, torch.full((3,), 0.1))
    assert model.init_config["query_mode"] == "anchored" and model.init_config["anchor_offset"] == 0.1


# ---------------------------------------------------------------------------------------- free mode kept

def test_free_mode_outputs_are_those_of_the_code_before_anchored_queries():
    # Recorded from the decoder before query_mode existed (same seeds, same calls): the default stays the
    # paper's free queries, parameter for parameter and output for output. If a deliberate change of the
    # encoder/decoder initialisation breaks this, re-record the values.
    def run():
        torch.manual_seed(0)
        model = create_model("gmae_tiny", img_size=32, patch_size=8, num_queries=8).eval()
        gen = torch.Generator().manual_seed(1)
        images, noise = torch.rand(1, 1, 32, 32, 32, generator=gen), torch.rand(1, 64, generator=gen)
        with torch.no_grad():
            return model, model(images, noise).gaussians

    model, g = run()
    assert model.query_mode == "free" and model.anchor_grid is None
    assert len(list(model.parameters())) == 109
    assert math.isclose(sum(p.double().sum().item() for p in model.parameters()), 9568.81345371797,
                        rel_tol=1e-9)
    recorded = {
        "query_tokens": (model.decoder.query_tokens[0, :2, :4],
                         [[0.8711583018302917, 0.4650782346725464, 1.869918942451477, 0.19428116083145142],
                          [-0.4175996780395508, -0.45307984948158264, 0.39543741941452026, 1.5166279077529907]]),
        "means": (g.means[0, :3],
                  [[0.09539589285850525, 0.3384628891944885, 0.5758628249168396],
                   [0.6947665810585022, 0.4723280072212219, 0.09291251003742218],
                   [0.14780883491039276, 0.37523511052131653, 0.22374661266803741]]),
        "scales": (g.scales[0, :3],
                   [[0.07897447794675827, 0.00958353839814663, 0.03752410039305687],
                    [0.009595346637070179, 0.014997626654803753, 0.008201278746128082],
                    [0.008099909871816635, 0.026145249605178833, 0.030107531696558]]),
        "intensities": (g.intensities[0, :4],
                        [0.36105895042419434, 0.18697026371955872, 0.36822372674942017, 0.59148108959198]),
        "quats": (g.quats[0, :2],
                  [[0.5507296323776245, -0.5883338451385498, 0.5727067589759827, -0.15022389590740204],
                   [0.3504634201526642, 0.12428684532642365, 0.6434707045555115, -0.6690841317176819]]),
    }
    for name, (actual, expected) in recorded.items():
        torch.testing.assert_close(actual, torch.tensor(expected), rtol=1e-5, atol=1e-6, msg=name)
    _, again = run()
    assert torch.equal(g.means, again.means) and torch.equal(g.scales, again.scales)


# ------------------------------------------------------------------------------------- training plumbing

@pytest.mark.parametrize("name", ["gmae_tiny_anchored", "gmae_star_tiny_anchored"])
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name, img_size=16, patch_size=4, num_queries=8)
    assert model.query_mode == "anchored" and model.registry_name == name
    images = torch.rand(2, 1, 16, 16, 16)
    out = model(images)
    loss = MaskedGaussianLoss(backend="torch", cutoff=None)(out, images)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_empty_batch_and_bf16_autocast():
    model = create_model("gmae_star_tiny_anchored", img_size=16, patch_size=4, num_queries=8)
    out = model(torch.rand(0, 1, 16, 16, 16))
    assert out.gaussians.means.shape == (0, 56, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = model(torch.rand(1, 1, 16, 16, 16)).gaussians
    assert g.means.dtype == g.scales.dtype == torch.float32
    assert ((g.means >= 0) & (g.means <= 1)).all()


@pytest.mark.parametrize("anchor_offset", [None, 0.2])
def test_round_trip_of_an_anchored_model_gives_identical_outputs(tmp_path, anchor_offset):
    torch.manual_seed(0)
    model = create_model("gmae_star_tiny", img_size=16, patch_size=4, num_layers=1, decoder_depth=1,
                         num_queries=8, query_mode="anchored", anchor_offset=anchor_offset).eval()
    with torch.no_grad():
        for p in model.parameters():  # move off the init so a re-initialised model would differ
            p.add_(0.05 * torch.randn_like(p))
    images, noise = torch.rand(2, 1, 16, 16, 16), torch.rand(2, 64)
    target = model.save_pretrained(tmp_path / "ckpt")
    kwargs = json.loads((target / "config.json").read_text())["kwargs"]
    assert kwargs["query_mode"] == "anchored" and kwargs["anchor_offset"] == anchor_offset
    for loaded in (GaussianMAE.from_pretrained(target), load_pretrained(target)):
        loaded.eval()
        assert loaded.query_mode == "anchored" and loaded.anchor_grid == (2, 2, 2)
        with torch.no_grad():
            a, b = model(images, noise=noise).gaussians, loaded(images, noise=noise).gaussians
        for field in ("means", "scales", "quats", "intensities"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_checkpoints_saved_before_query_mode_load_as_free(tmp_path):
    torch.manual_seed(0)
    model = create_model("gmae_tiny", img_size=16, patch_size=4, num_layers=1, decoder_depth=1,
                         num_queries=8).eval()
    target = model.save_pretrained(tmp_path / "old")
    config = json.loads((target / "config.json").read_text())
    del config["kwargs"]["query_mode"], config["kwargs"]["anchor_offset"]  # as written before the option
    (target / "config.json").write_text(json.dumps(config))
    loaded = load_pretrained(target).eval()
    assert loaded.query_mode == "free"
    images, noise = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 64)
    with torch.no_grad():
        assert torch.equal(model(images, noise).gaussians.means, loaded(images, noise).gaussians.means)


# ------------------------------------------------------------------------------------------ zoo and YAML

def test_zoo_names_and_overrides():
    assert {"gmae_tiny_anchored", "gmae_star_large_anchored"} <= set(list_models("*_anchored"))
    a = create_model("gmae_tiny_anchored", img_size=16, patch_size=4, num_queries=8)
    b = create_model("gmae_tiny", img_size=16, patch_size=4, num_queries=8, query_mode="anchored")
    assert a.init_config == b.init_config and a.registry_name == "gmae_tiny_anchored"
    assert create_model("gmae_star_base_anchored", num_layers=1, decoder_depth=1).anchor_grid == (8, 8, 8)
    with pytest.raises(ValueError, match="query_mode='free' contradicts"):
        create_model("gmae_tiny_anchored", query_mode="free")


@pytest.mark.parametrize("kind", ["gmae_tiny", "gmae_star_tiny"])
def test_anchored_yaml_is_the_free_yaml_plus_the_anchored_options(kind):
    free = yaml.safe_load((CONF / f"{kind}.yaml").read_text())
    anchored = yaml.safe_load((CONF / f"{kind}_anchored.yaml").read_text())
    assert anchored.pop("name") == f"{kind}_anchored" and free.pop("name") == kind
    assert anchored.pop("query_mode") == "anchored" and anchored.pop("anchor_offset") is None
    assert anchored.pop("anchor_pool_sigma") == 1.0
    assert anchored == free
    model = create_model(f"{kind}_anchored", **{**anchored, "img_size": 32, "patch_size": 8},
                         query_mode="anchored", anchor_offset=None, anchor_pool_sigma=1.0)
    assert model.anchor_grid == (4, 4, 8) and model.heads.max_scale == free["max_scale"]
    assert model.decoder.anchor_pool_sigma == 1.0
