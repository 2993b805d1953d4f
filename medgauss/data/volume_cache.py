"""The on-disk cache of preprocessed volumes: one folder per volume, written atomically, read lazily.

Layout, key and race behaviour are described in :mod:`medgauss.data.dataset` (section "The on-disk
cache"). These functions are the only code that reads or writes an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch

import medgauss
from medgauss._fs import fsync_path
from medgauss.data.transforms import DataError

__all__ = ["CACHE_FORMAT", "entry_exists", "entry_name", "read_entry", "source_stat", "write_entry"]

# Bump when the stored layout or the meaning of pretrain_preprocess's output changes (old entries are
# then ignored, as with a changed setting).
CACHE_FORMAT = 1
_META = "meta.json"
_MMAP_MIN_BYTES = 1 << 16  # smaller arrays are read whole (a mapping per tiny array costs more than it saves)
_ARRAY_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def source_stat(path: str) -> tuple[str, int, int]:
    """``(resolved path, size in bytes, mtime in ns)`` of a source file (part of the cache key)."""
    try:
        resolved = Path(path).resolve()
        st = resolved.stat()
    except OSError as err:
        raise DataError(f"cannot read file {path}: {type(err).__name__}: {err}") from err
    return str(resolved), int(st.st_size), int(st.st_mtime_ns)


def entry_name(entry: Mapping[str, str], files: Mapping[str, tuple[str, int, int]], settings_json: str) -> str:
    """Folder name of ``entry``'s cache entry: readable image stem + hash of everything it depends on."""
    blob = json.dumps(
        {
            "format": CACHE_FORMAT,
            "medgauss": medgauss.__version__,
            "monai": monai.__version__,
            "settings": json.loads(settings_json),
            "files": {key: list(files[key]) for key in sorted(files)},
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(blob.encode()).hexdigest()[:32]
    stem = Path(entry["image"]).name
    for suffix in (".nii.gz", ".nii", ".gz"):
        stem = stem.removesuffix(suffix)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", stem)[:48].lstrip(".") or "volume"
    return f"{stem}-{digest}"



def entry_exists(folder: Path) -> bool:
    """Whether ``folder`` holds a complete cache entry (entries only appear complete, by rename)."""
    return (folder / _META).is_file()


def write_entry(final: Path, volume: Mapping[str, Any], meta: dict[str, Any]) -> bool:
    """Write ``volume`` as ``final/<key>.npy`` + ``final/meta.json`` through a temporary folder and a rename.

    Returns ``True`` when this call's copy was installed, ``False`` when another process installed the
    entry first (this copy is then discarded; both copies are equal).
    """
    arrays, values = {}, {}
    for key, value in volume.items():
        if isinstance(value, (torch.Tensor, np.ndarray)):
            if not _ARRAY_NAME.fullmatch(str(key)):
                raise ValueError(f"cannot cache array under key {key!r}: use letters, digits, '_', '.', '-'")
            arrays[str(key)] = np.ascontiguousarray(
                value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
            )
        else:
            values[str(key)] = value
    meta = {**meta, "arrays": sorted(arrays), "values": values}
    try:
        meta_text = json.dumps(meta, indent=1, sort_keys=True)
    except TypeError as err:
        raise ValueError(f"cannot cache the non-array values {sorted(values)}: {err}") from err
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        os.chmod(tmp, 0o755)
        for name, array in arrays.items():
            with open(tmp / f"{name}.npy", "wb") as f:
                np.save(f, array, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        with open(tmp / _META, "w") as f:
            f.write(meta_text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, final)  # atomic; fails if another process already installed `final`
        except OSError:
            if (final / _META).is_file():
                return False
            raise
        fsync_path(final.parent)
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_entry(folder: Path, source: str) -> dict[str, Any]:
    """Arrays of a cache entry as tensors (large ones memory-mapped, copy-on-write) + its plain values.

    Raises:
        DataError: the entry is unreadable (names the folder and the source image).
    """
    try:
        meta = json.loads((folder / _META).read_text())
        out: dict[str, Any] = dict(meta["values"])
        for name in meta["arrays"]:
            path = folder / f"{name}.npy"
            mmap = "c" if path.stat().st_size >= _MMAP_MIN_BYTES else None
            out[name] = torch.from_numpy(np.load(path, mmap_mode=mmap, allow_pickle=False))
    except Exception as err:  # OSError, JSON, numpy header errors, missing keys: all mean "corrupt"
        raise DataError(
            f"cache entry {folder} (of image file {source}) is unreadable: {type(err).__name__}: {err}; "
            "delete the folder to rebuild it"
        ) from err
    return out
