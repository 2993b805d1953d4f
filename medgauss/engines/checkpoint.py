"""Crash-safe training checkpoints: Accelerate state written to a temp dir, renamed, then pointed to.

Layout under ``<run_dir>/checkpoints/``::

    step_00000100/            complete checkpoint (Accelerate save_state + trainer_state.json)
    step_00000200/
    latest                    text file: name of the newest complete checkpoint
    .tmp-step_00000300/       a save in progress (or one that crashed: ignored, removed on next save)

A checkpoint becomes visible only by ``os.replace`` of its finished temp dir, and ``latest`` is rewritten
(atomically, by rename) only afterwards, so a crash at any point leaves ``latest`` naming a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from medgauss._fs import fsync_path

__all__ = ["TRAINER_STATE_FILE", "CheckpointManager", "write_atomic"]

TRAINER_STATE_FILE = "trainer_state.json"
_TMP_PREFIX = ".tmp-"



def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a synced temp file and a rename: readers see the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


class CheckpointManager:
    """Save / find / load checkpoints of one run.

    Args:
        run_dir: the run directory shared by all ranks.
        keep_last: complete checkpoints kept (older ones are deleted after a successful save; ``latest`` is
            never deleted). ``0`` keeps all.
    """

    def __init__(self, run_dir: str | Path, *, keep_last: int = 2) -> None:
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {keep_last}")
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    @property
    def latest_pointer(self) -> Path:
        return self.root / "latest"

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint dirs, oldest first."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.glob("step_*") if (p / TRAINER_STATE_FILE).is_file()]
        return sorted(dirs, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, or ``None`` when there is none yet.

        Raises:
            FileNotFoundError: ``latest`` names a checkpoint that is missing or incomplete.
        """
        if not self.latest_pointer.is_file():
            return None
        path = self.root / self.latest_pointer.read_text().strip()
        if not (path / TRAINER_STATE_FILE).is_file():
            raise FileNotFoundError(f"{self.latest_pointer} names {path}, which is not a complete checkpoint")
        return path

    def resolve(self, resume: str | Path | None) -> Path | None:
        """Checkpoint to resume from.

        Args:
            resume: ``None`` / ``""``: start fresh; ``"latest"``: the newest complete checkpoint (must exist);
                ``"auto"``: the newest if any, else start fresh; anything else: a checkpoint directory path.

        Raises:
            FileNotFoundError: ``"latest"`` with no checkpoint, or a path that is not a complete checkpoint.
        """
        if resume is None or str(resume) == "":
            return None
        if str(resume) in ("latest", "auto"):
            path = self.latest()
            if path is None and str(resume) == "latest":
                raise FileNotFoundError(f"resume='latest' but {self.root} holds no complete checkpoint")
            return path
        path = Path(resume)
        if not (path / TRAINER_STATE_FILE).is_file():
            raise FileNotFoundError(
                f"resume path {path} is not a complete checkpoint (no {TRAINER_STATE_FILE})"
            )
        return path

    def save(self, accelerator: Accelerator, step: int, trainer_state: dict[str, Any]) -> Path:
        """Save model / optimizer / registered objects / RNG of every rank plus ``trainer_state``.

        Collective: every rank must call it. Returns the final checkpoint path.
        """
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"{_TMP_PREFIX}{final.name}"
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f"{_TMP_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)  # left by a crashed save: never a valid checkpoint
            tmp.mkdir()
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_atomic(tmp / TRAINER_STATE_FILE, json.dumps(trainer_state, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(self.root)
            write_atomic(self.latest_pointer, final.name)
            self._prune(keep=final)
        accelerator.wait_for_everyone()
        return final

    def _prune(self, keep: Path) -> None:
        if self.keep_last == 0:
            return
        for old in self.complete_checkpoints()[: -self.keep_last]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def load(accelerator: Accelerator, path: str | Path) -> dict[str, Any]:
        """Restore the Accelerate state of ``path`` (collective) and return its ``trainer_state``."""
        path = Path(path)
        state_file = path / TRAINER_STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"not a complete checkpoint (no {TRAINER_STATE_FILE}): {path}")
        try:
            trainer_state = json.loads(state_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"corrupt checkpoint state file {state_file}: {err}") from err
        accelerator.load_state(str(path))
        return trainer_state
