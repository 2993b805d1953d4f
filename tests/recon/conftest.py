"""A prepared phantom case shared by the reconstruction tests (``case_dir``)."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medgauss.ct.prepare import main as prepare_main
from medgauss.recon.cli import main as reconstruct_main

VIEWS = 24  # views in the case


def _phantom_nifti(path: Path) -> None:
    """A water ellipsoid with a bone insert in air, on a shifted 2 mm grid (HU)."""
    n = 30
    r = (np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1) - (n - 1) / 2) * 2.0
    hu = np.full((n, n, n), -1000.0, np.float32)
    hu[(r[..., 0] / 24) ** 2 + (r[..., 1] / 20) ** 2 + (r[..., 2] / 22) ** 2 <= 1] = 0.0
    hu[((r[..., 0] - 5) / 7) ** 2 + ((r[..., 1] + 4) / 5) ** 2 + ((r[..., 2] - 3) / 6) ** 2 <= 1] = 1200.0
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (10.0, -20.0, 30.0)
    nib.save(nib.Nifti1Image(hu, affine), str(path))


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory) -> Path:
    """One 24^3 case with 24 views on a 32^2 detector, prepared by the real medgauss-prepare-ct path."""
    root = tmp_path_factory.mktemp("recon")
    (root / "in").mkdir()
    _phantom_nifti(root / "in" / "phantom.nii.gz")
    args = ["--folder", str(root / "in"), "--out", str(root / "ds"), "--fov-mm", "60", "--grid", "24"]
    args += ["--views", str(VIEWS), "--det-size", "32", "--dso", "200", "--dsd", "300", "--photons", "0"]
    assert prepare_main([*args, "--no-progress"]) == ["phantom"]
    return root / "ds" / "phantom"




def run_cli(capsys, argv) -> dict[str, str]:
    """Run ``medgauss-reconstruct`` and parse its one summary line into ``key -> value``."""
    reconstruct_main([str(a) for a in argv])
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    return dict(item.split("=", 1) for item in line.split())


def cli_fails(capsys, argv) -> str:
    """Run ``medgauss-reconstruct`` expecting a user error: exit status 2, a message and no traceback."""
    with pytest.raises(SystemExit) as info:
        reconstruct_main([str(a) for a in argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err
