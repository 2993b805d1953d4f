"""The README's tour must run as written (its Python blocks, executed in order in one namespace)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tour_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3, "the README tour lost its Python examples"
    monkeypatch.chdir(tmp_path)  # the tour saves a model under runs/
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["vol"].shape == (2, 1, 96, 96, 96)
    assert namespace["vals"].shape == (2, 1000)
    assert namespace["xray"].shape == (1, 50, 256, 256) and torch.isfinite(namespace["xray"]).all()
    assert torch.isfinite(namespace["loss"]) and (tmp_path / "runs" / "gmae").is_dir()
    # the frame example: the model's Gaussians (normalised coordinates in (0, 1)) land inside the crop's world
    # box, and the crop's box lies inside the bundled CT's (both boxes from their own affines)
    def world_box(affine, shape):
        affine = torch.as_tensor(affine, dtype=torch.float64)
        corners = torch.cartesian_prod(*[torch.tensor([-0.5, n - 0.5], dtype=torch.float64) for n in shape])
        pts = corners @ affine[:3, :3].T + affine[:3, 3]
        return pts.amin(0), pts.amax(0)

    crop_lo, crop_hi = world_box(namespace["crop"]["affine"], (96, 96, 96))
    ct_lo, ct_hi = world_box(namespace["affine"], namespace["volume"].shape)
    centres = namespace["g_world"].means[0].detach().double()
    assert bool(((centres > crop_lo) & (centres < crop_hi)).all())
    assert bool((crop_lo >= ct_lo - 1.5).all() and (crop_hi <= ct_hi + 1.5).all())
    assert (tmp_path / "ct_copy.nii.gz").is_file()
