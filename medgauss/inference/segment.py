"""``medgauss-segment``: segment a CT with a fine-tuned segmentation run, writing a label map on the image's own grid.

Usage::

    medgauss-segment --checkpoint runs/finetune_segmentation/<run> --image ct.nii.gz --out labels.nii.gz
    medgauss-segment --checkpoint RUN --image ct.nii.gz --out labels.nii.gz --probabilities probs.nii.gz --overlap 0.5

The run folder (``recipes/finetune_segmentation.py``'s ``trainer.run_dir``) holds the model export (``model/``) and
``config.yaml``, whose ``data.preprocessing`` (spacing and HU window, as used in training) is applied to the image.
The preprocessed volume is segmented by sliding-window inference (the model's input size, Gaussian-weighted
overlaps; padded where the image is smaller), and the class probabilities are sampled back at every voxel centre of
the input file (trilinear, through both affines; :func:`medgauss.frame.resample_to_grid`), so the label map has the
input's own array order, shape and affine. Label values are the run's classes (0 = background); their names are
printed. One summary line goes to stdout; user errors end with exit status 2 and a message naming the argument or
file.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
import yaml

from medgauss.data.labelled import image_preprocess
from medgauss.data.transforms import DataError, apply_pipeline
from medgauss.engines.segmentation import sliding_window_probabilities
from medgauss.frame import resample_to_grid, save_nifti
from medgauss.nets.pretrained import load_pretrained
from medgauss.nets.pretrained_runs import find_run_config, model_dir
from medgauss.nets.unetr import PretrainedUNETR, ScratchSwinUNETR

__all__ = ["SegmentationResult", "cli", "load_segmentation_run", "main", "segment_file"]

_KEYS = ("pixdim", "a_min", "a_max", "b_min", "b_max")


@dataclass
class SegmentationResult:
    """What :func:`segment_file` wrote: the label map, its classes, voxel counts per class, seconds."""

    out: Path
    class_names: list[str]
    voxels: dict[str, int]
    seconds: float

    def summary(self) -> str:
        counts = " ".join(f"{name}={n}" for name, n in self.voxels.items())
        return f"out={self.out} seconds={self.seconds:.1f} classes={len(self.class_names)} voxels: {counts}"


def load_segmentation_run(checkpoint: str | Path) -> tuple[torch.nn.Module, dict, list[str]]:
    """The fine-tuned network of a segmentation run, its preprocessing and its class names.

    Raises:
        FileNotFoundError: no model export or ``config.yaml`` (naming the places looked in).
        ValueError: the export is not a segmentation network, or the config lacks the preprocessing.
    """
    folder = model_dir(Path(checkpoint))
    model = load_pretrained(folder)
    if not isinstance(model, PretrainedUNETR | ScratchSwinUNETR):
        raise ValueError(f"--checkpoint: {folder} holds a {type(model).__name__}, not a segmentation network "
                         "(a run of recipes/finetune_segmentation.py)")
    path = find_run_config(Path(checkpoint))
    try:
        config = yaml.safe_load(path.read_text())
        pre = config["data"]["preprocessing"]
        preprocessing = {key: pre[key] for key in _KEYS} | {"clip": pre.get("clip", True)}
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} lacks data.preprocessing.{{{', '.join(_KEYS)}}} (a segmentation run's config): "
                         f"{exc}") from exc
    if any(preprocessing[key] is None for key in _KEYS):
        raise ValueError(f"{path} has unresolved (null) preprocessing values: {preprocessing}")
    names = model.class_names or ["background", *(f"class_{k}" for k in range(1, model.out_channels))]
    return model.eval(), preprocessing, list(names)


def segment_file(model: torch.nn.Module, preprocessing: dict, class_names: Sequence[str], image: str | Path,
                 out: str | Path, *, probabilities: str | Path | None = None, overlap: float = 0.25,
                 sw_batch_size: int = 4) -> SegmentationResult:
    """Segment the NIfTI ``image`` and write the label map ``out`` (and optionally the probabilities, 4-D).

    Returns:
        :class:`SegmentationResult`.

    Raises:
        FileNotFoundError / DataError: the image is missing, unreadable, not 3-D or holds NaN/inf (naming it).
    """
    t0 = time.perf_counter()
    image = Path(image)
    if not image.is_file():
        raise FileNotFoundError(f"--image: file not found: {image}")
    prepared = apply_pipeline(image_preprocess(**preprocessing), {"image": str(image)})
    volume = torch.as_tensor(prepared["image"].as_tensor()).float()
    affine = prepared["affine"].numpy()
    roi = tuple(int(s) for s in model.img_size)
    pad = [max(0, r - s) for r, s in zip(roi, volume.shape[1:])]  # at the far end: the affine stays valid
    if any(pad):
        volume = F.pad(volume, (0, pad[2], 0, pad[1], 0, pad[0]), value=float(preprocessing["b_min"]))
    device = next(model.parameters()).device
    probs = sliding_window_probabilities(model, volume[None].to(device), roi, overlap=overlap,
                                         sw_batch_size=sw_batch_size)[0].cpu()
    header = nib.load(str(image))
    target_affine, target_shape = np.asarray(header.affine, dtype=np.float64), header.shape[:3]
    on_image = resample_to_grid(probs, affine, target_affine, target_shape)
    labels = on_image.argmax(0).numpy().astype(np.uint8 if len(class_names) < 256 else np.int16)
    out = save_nifti(out, labels, target_affine)
    if probabilities is not None:
        save_nifti(probabilities, on_image.permute(1, 2, 3, 0).numpy().astype(np.float32), target_affine)
    voxels = {name: int((labels == k).sum()) for k, name in enumerate(class_names)}
    return SegmentationResult(out, list(class_names), voxels, time.perf_counter() - t0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medgauss-segment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="segmentation run folder (or its model/)")
    parser.add_argument("--image", required=True, type=Path, help="CT NIfTI to segment (HU)")
    parser.add_argument("--out", required=True, type=Path, help="output label map (.nii.gz), the image's grid")
    parser.add_argument("--probabilities", type=Path, default=None, help="optional 4-D class probabilities NIfTI")
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap in [0, 1)")
    parser.add_argument("--sw-batch-size", type=int, default=4, help="windows per forward pass")
    return parser


def main(argv: Sequence[str] | None = None) -> SegmentationResult:
    """Command-line entry point (module doc); prints the summary line and returns the result."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.overlap < 1.0:
        parser.error(f"--overlap must be in [0, 1), got {args.overlap}")
    if args.sw_batch_size < 1:
        parser.error(f"--sw-batch-size must be >= 1, got {args.sw_batch_size}")
    try:
        model, preprocessing, names = load_segmentation_run(args.checkpoint)
        print("classes: " + ", ".join(f"{k}={n}" for k, n in enumerate(names)), flush=True)
        result = segment_file(model, preprocessing, names, args.image, args.out, probabilities=args.probabilities,
                              overlap=args.overlap, sw_batch_size=args.sw_batch_size)
    except (ValueError, OSError, DataError) as exc:
        parser.error(str(exc))
    print(result.summary(), flush=True)
    return result


def cli() -> None:
    """Console-script entry point (``medgauss-segment``): exit status 0 on success, 2 on a user error."""
    main()


if __name__ == "__main__":
    cli()
