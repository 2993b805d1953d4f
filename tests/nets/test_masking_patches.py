"""Masking invariants and patch bookkeeping, against direct loops."""

import pytest
import torch

from medgauss.nets.masking import num_masked_patches, random_masking
from medgauss.nets.patches import mask_to_volume, masked_voxel_indices, patchify, unpatchify


@pytest.mark.parametrize("length,ratio", [(64, 0.75), (27, 0.5), (10, 0.0), (216, 0.75)])
def test_random_masking_invariants(length, ratio):
    torch.manual_seed(0)
    b, c = 3, 5
    tokens = torch.randn(b, length, c)
    kept, mask, ids_restore, ids_keep = random_masking(tokens, ratio)
    hidden = int(round(length * ratio))
    assert mask.dtype == torch.bool and mask.shape == (b, length)
    assert mask.sum(1).tolist() == [hidden] * b  # exact ratio in every sample
    assert kept.shape == (b, length - hidden, c)
    for i in range(b):
        # kept tokens are exactly the visible ones, identified by ids_keep
        assert torch.equal(kept[i], tokens[i, ids_keep[i]])
        assert not mask[i, ids_keep[i]].any()
        assert set(ids_keep[i].tolist()) == set(torch.nonzero(~mask[i]).flatten().tolist())
    # ids_restore inverts the shuffle: [kept, hidden] gathered by ids_restore is the original order
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    shuffled = torch.gather(tokens, 1, ids_shuffle[..., None].expand(-1, -1, c))
    assert torch.equal(shuffled[:, : length - hidden], kept)
    restored = torch.gather(shuffled, 1, ids_restore[..., None].expand(-1, -1, c))
    assert torch.equal(restored, tokens)


def test_random_masking_uses_noise_and_differs_per_sample():
    tokens = torch.zeros(2, 6, 1)
    noise = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7, 0.3], [0.1, 0.9, 0.2, 0.8, 0.3, 0.7]])
    _, mask, _, ids_keep = random_masking(tokens, 0.5, noise)
    assert ids_keep.tolist() == [[1, 3, 5], [0, 2, 4]]
    assert mask.tolist() == [[True, False, True, False, True, False], [False, True, False, True, False, True]]


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_mask_ratio_out_of_range_raises(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        num_masked_patches(10, ratio)


def test_mask_ratio_hiding_everything_raises():
    with pytest.raises(ValueError, match="mask_ratio"):
        num_masked_patches(2, 0.9)


def test_noise_shape_checked():
    with pytest.raises(ValueError, match="noise"):
        random_masking(torch.zeros(2, 6, 1), 0.5, torch.rand(2, 5))


def test_patchify_matches_loops_and_roundtrips():
    torch.manual_seed(1)
    patch, grid, c = (2, 3, 4), (2, 2, 3), 2
    images = torch.randn(2, c, 4, 6, 12)
    patches = patchify(images, patch)
    assert patches.shape == (2, 12, 2 * 3 * 4 * c)
    for gi in range(grid[0]):
        for gj in range(grid[1]):
            for gk in range(grid[2]):
                index = (gi * grid[1] + gj) * grid[2] + gk
                block = images[:, :, gi * 2:(gi + 1) * 2, gj * 3:(gj + 1) * 3, gk * 4:(gk + 1) * 4]
                expected = block.permute(0, 2, 3, 4, 1).reshape(2, -1)  # (pd, ph, pw, c) order
                assert torch.equal(patches[:, index], expected)
    assert torch.equal(unpatchify(patches, patch, grid, c), images)


def test_patchify_rejects_indivisible_size():
    with pytest.raises(ValueError, match="patch_size"):
        patchify(torch.zeros(1, 1, 5, 4, 4), (2, 2, 2))


def test_mask_to_volume_and_voxel_indices():
    grid, patch = (2, 3, 2), (2, 2, 3)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, [0, 7]] = True
    mask[1, [5, 11]] = True
    vol = mask_to_volume(mask, grid, patch)
    assert vol.shape == (2, 1, 4, 6, 6) and vol.dtype == torch.bool
    for b in range(2):
        for d in range(4):
            for h in range(6):
                for w in range(6):
                    index = ((d // 2) * 3 + h // 2) * 2 + w // 3
                    assert bool(vol[b, 0, d, h, w]) == bool(mask[b, index])
    idx = masked_voxel_indices(mask, grid, patch)
    assert idx.shape == (2, 2 * 12, 3) and idx.dtype == torch.int32
    for b in range(2):
        # the same voxels as the volume mask ...
        as_set = {tuple(v) for v in idx[b].tolist()}
        assert len(as_set) == idx.shape[1] and as_set == {tuple(v) for v in torch.nonzero(vol[b, 0]).tolist()}
        # ... ordered patch by patch, C order inside each patch (the order of patchify values)
        expected = []
        for index in torch.nonzero(mask[b]).flatten().tolist():
            gi, gj, gk = index // 6, (index // 2) % 3, index % 2
            expected += [(gi * 2 + i, gj * 2 + j, gk * 3 + k)
                         for i in range(2) for j in range(2) for k in range(3)]
        assert idx[b].tolist() == [list(v) for v in expected]


def test_voxel_indices_need_equal_counts():
    mask = torch.tensor([[True, False], [True, True]])
    with pytest.raises(ValueError, match="same number"):
        masked_voxel_indices(mask, (1, 1, 2), (1, 1, 1))


def test_patch_embedding_equals_conv3d():
    from medgauss.nets.blocks import PatchEmbed3D

    torch.manual_seed(2)
    embed = PatchEmbed3D(2, 7, (2, 3, 4)).double()
    x = torch.randn(2, 2, 4, 6, 8, dtype=torch.float64)
    expected = torch.nn.functional.conv3d(x, embed.proj.weight, embed.proj.bias, stride=(2, 3, 4))
    torch.testing.assert_close(embed(x), expected.flatten(2).transpose(1, 2))


def test_masked_voxel_indices_of_an_empty_batch_is_empty():
    from medgauss.nets.patches import masked_voxel_indices

    out = masked_voxel_indices(torch.zeros(0, 8, dtype=torch.bool), (2, 2, 2), (4, 4, 4))
    assert out.shape == (0, 0, 3)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, :3] = True
    assert masked_voxel_indices(mask, (2, 2, 2), (4, 4, 4)).shape == (2, 3 * 64, 3)
