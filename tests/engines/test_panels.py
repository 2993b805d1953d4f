"""Slice panels: the axial slice of the medgauss frame in radiological display, PNG output, and no change
to matplotlib's global backend."""

import subprocess
import sys

import numpy as np
import torch

from medgauss.engines.panels import axial_display, save_slice_panel


def test_axial_display_puts_anterior_up_and_patient_right_left():
    vol = np.zeros((5, 6, 7))
    vol[2, 5, 6] = 1.0  # mid axial slice, most anterior row (h = H-1), patient's right-most column (w = W-1)
    vol[2, 0, 0] = 2.0  # posterior, left
    shown = axial_display(vol, 2)
    assert shown.shape == (6, 7)
    assert shown[0, 0] == 1.0 and shown[-1, -1] == 2.0


def test_panel_is_written_with_centres(tmp_path):
    img = torch.rand(8, 10, 12)
    hidden = torch.rand(8, 10, 12) > 0.5
    centres = torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.5, 0.5]])
    path = save_slice_panel(tmp_path / "p" / "panel.png", img, hidden, img, centres=centres, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_importing_and_drawing_panels_leaves_the_matplotlib_backend_alone(tmp_path):
    code = (
        "import matplotlib; matplotlib.use('svg'); import torch\n"
        "from medgauss.engines.panels import save_slice_panel\n"
        f"save_slice_panel(r'{tmp_path / 'x.png'}', torch.rand(4, 4, 4), torch.zeros(4, 4, 4, dtype=torch.bool),"
        " torch.rand(4, 4, 4))\n"
        "import medgauss.engines\n"
        "print(matplotlib.get_backend())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "svg"
