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
