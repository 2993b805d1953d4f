"""Datalists: which files make a dataset.

A datalist is a ``list[dict[str, str]]``; every entry has an ``"image"`` path and optionally a
``"label"`` path (same grid). Two sources are supported: Medical-Segmentation-Decathlon-style JSON
files and plain folders of NIfTI files. Every path is checked to exist when the list is built, so a
missing file fails here, naming the file, instead of being skipped later.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

__all__ = [
    "NIFTI_SUFFIXES",
    "load_decathlon_datalist",
    "nifti_folder_datalist",
    "example_ct_path",
    "example_ct_datalist",
    "shard_datalist",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
T = TypeVar("T")


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def _check_entries(entries: list[dict[str, str]], source: str) -> list[dict[str, str]]:
    """Raise if ``entries`` is empty or names a file that does not exist."""
    if not entries:
        raise ValueError(f"datalist from {source} is empty: no image to train on")
    for i, entry in enumerate(entries):
        if "image" not in entry:
            raise ValueError(f"datalist from {source}: entry {i} has no 'image' key (keys: {sorted(entry)})")
        for key in ("image", "label"):
            if key in entry and not Path(entry[key]).is_file():
                raise FileNotFoundError(
                    f"datalist from {source}: entry {i} {key} file not found: {entry[key]}"
                )
    return entries


def load_decathlon_datalist(
    path: str | Path,
    *,
    key: str = "training",
    base_dir: str | Path | None = None,
    use_labels: bool = True,
) -> list[dict[str, str]]:
    """Read a Decathlon-style ``dataset.json``.

    Args:
        path: the JSON file. ``data[key]`` is a list of ``{"image": ..., "label": ...}`` dicts or of plain
            image paths (the Decathlon ``"test"`` list).
        key: which list to read (``"training"``, ``"validation"``, ``"test"`` ...).
        base_dir: relative paths are resolved against it; default: the JSON file's folder.
        use_labels: keep ``"label"`` entries (``False`` drops them, e.g. for image-only pretraining).

    Returns:
        ``[{"image": abs_path, "label": abs_path?}, ...]`` in file order.

    Raises:
        FileNotFoundError: the JSON or a listed file is missing (the message names it).
        ValueError: corrupt JSON, missing ``key``, or an empty list.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist JSON not found: {path}")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"datalist JSON {path} is not valid JSON: {err}") from err
    if not isinstance(content, dict) or key not in content:
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"datalist JSON {path} has no list {key!r} (found: {found})")
    if not isinstance(content[key], list):
        raise ValueError(f"datalist JSON {path}: {key!r} must be a list, got {type(content[key]).__name__}")
    root = Path(base_dir) if base_dir is not None else path.parent
    entries = []
    for item in content[key]:
        item = {"image": item} if isinstance(item, str) else dict(item)
        entry = {}
        for name in ("image", "label") if use_labels else ("image",):
            if name in item:
                if not isinstance(item[name], str):
                    raise ValueError(f"datalist JSON {path}: {name!r} must be one path, got {item[name]!r}")
                entry[name] = str((root / item[name]).resolve())
        entries.append(entry)
    return _check_entries(entries, str(path))


def nifti_folder_datalist(
    image_dir: str | Path,
    *,
    label_dir: str | Path | None = None,
    recursive: bool = False,
) -> list[dict[str, str]]:
    """All NIfTI files (``.nii`` / ``.nii.gz``) of a folder, sorted by name.

    Args:
        image_dir: folder of images.
        label_dir: optional folder holding a label file with the same file name for every image.
        recursive: also search sub-folders.

    Raises:
        FileNotFoundError: a folder is missing, or an image has no label of the same name.
        ValueError: the folder holds no NIfTI file.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    pattern = "**/*" if recursive else "*"
    images = sorted(p for p in image_dir.glob(pattern) if p.is_file() and _is_nifti(p))
    if not images:
        raise ValueError(f"image folder {image_dir} holds no NIfTI file ({', '.join(NIFTI_SUFFIXES)})")
    entries = [{"image": str(p.resolve())} for p in images]
    if label_dir is not None:
        label_dir = Path(label_dir)
        if not label_dir.is_dir():
            raise FileNotFoundError(f"label folder not found: {label_dir}")
        for entry, image in zip(entries, images):
            label = label_dir / image.relative_to(image_dir)
            if not label.is_file():
                raise FileNotFoundError(f"no label for image {image}: expected {label}")
            entry["label"] = str(label.resolve())
    return _check_entries(entries, str(image_dir))


def example_ct_path(kind: str = "image") -> Path:
    """Path of the bundled example chest CT (``"image"``, int16 HU) or its label map (``"label"``).

    3.0 mm RAS, 120 x 97 x 110 voxels; provenance and licence in ``medgauss/data/bundled/README.md``.
    """
    names = {"image": "ct.nii.gz", "label": "labels.nii.gz", "structures": "structures.csv"}
    if kind not in names:
        raise ValueError(f"kind must be one of {sorted(names)}, got {kind!r}")
    path = _BUNDLED_DIR / names[kind]
    if not path.is_file():
        raise FileNotFoundError(f"bundled example file missing from the installed package: {path}")
    return path


def example_ct_datalist(*, use_labels: bool = True) -> list[dict[str, str]]:
    """One-entry datalist of the bundled example CT (with its label map unless ``use_labels=False``)."""
    entry = {"image": str(example_ct_path("image"))}
    if use_labels:
        entry["label"] = str(example_ct_path("label"))
    return [entry]


def shard_datalist(datalist: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Entries ``rank, rank + world_size, ...``: disjoint per-rank subsets covering the list.

    The one rule for splitting volumes over ranks: pretraining gives rank ``r`` the volumes
    ``shard_datalist(range(q * world_size), r, world_size)`` (``q = len // world_size``) plus the last
    ``len mod world_size`` volumes, shared (see :class:`medgauss.data.SampleSchedule`); evaluation or
    cache-filling jobs can split a datalist with it directly.

    Args:
        datalist: any sequence (datalist entries, volume indices).
        rank, world_size: this process and the number of processes.

    Returns:
        ``list(datalist[rank::world_size])``.

    Raises:
        ValueError: ``world_size < 1``, ``rank`` outside ``[0, world_size)``, or fewer entries than ranks.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if len(datalist) < world_size:
        raise ValueError(f"cannot shard {len(datalist)} datalist entries over {world_size} ranks")
    return list(datalist[rank::world_size])
