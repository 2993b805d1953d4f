"""Memory of a benchmark process, measured the same way by every benchmark script."""

from __future__ import annotations

import resource
from pathlib import Path

__all__ = ["memory_mib"]


def memory_mib() -> dict[str, float]:
    """This process's resident memory (MiB): ``current`` and ``peak`` (Linux ``VmRSS`` / ``VmHWM``).

    ``VmHWM`` belongs to the process's own address space, which ``exec`` replaces; ``getrusage``'s ``ru_maxrss``
    is not: Linux carries it over ``exec`` from the forked parent, so a subprocess of a large parent reports the
    parent's size. Without ``/proc`` (not Linux), both fall back to ``ru_maxrss``.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        if "VmHWM" in fields and "VmRSS" in fields:
            kib = lambda name: float(fields[name].split()[0])  # noqa: E731
            return {"current": kib("VmRSS") / 1024, "peak": kib("VmHWM") / 1024}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"current": peak, "peak": peak}
