"""How much memory is free, and a check that an in-memory result fits in it.

A result that does not fit is refused before any work: on Linux a too large
``np.empty`` succeeds (pages are only promised) and the process is killed by the
kernel's OOM killer while the result fills, which takes napari, and any unsaved
layer, with it.  No Qt or napari imports.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .errors import InputError

__all__ = ["available_bytes", "cgroup_available", "format_bytes", "check_fits"]

#: share of the free memory one result may take (the rest: the input's tiles, the network, napari's copies)
FREE_SHARE = 0.9
#: environment variable that turns the check off (a machine with swap the user wants to use)
NO_CHECK_ENV = "NAPARI_VDSR_NO_MEMORY_CHECK"


def available_bytes() -> Optional[int]:
    """Memory that can be allocated without swapping; None if unknown.

    The machine's available memory (psutil, else /proc/meminfo), or less when this process
    runs in a control group with a memory limit (a container, a SLURM job): what is left
    under that limit, reclaimable page cache counted as free.
    """
    host = _host_available()
    group = cgroup_available()
    if host is None or group is None:
        return host if group is None else group
    return min(host, group)


def _host_available() -> Optional[int]:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return int(psutil.virtual_memory().available)
        except (OSError, RuntimeError, AttributeError):
            pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


#: cgroup v1 writes "no limit" as a number near 2**63
_NO_LIMIT = 1 << 60


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _stat(path: Path, *keys: str) -> int:
    text = _read(path) or ""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in keys and value.strip().isdigit():
            return int(value)
    return 0


def cgroup_available(root: str | os.PathLike = "/sys/fs/cgroup", proc: str | os.PathLike = "/proc/self/cgroup"
                     ) -> Optional[int]:
    """What is left under the memory limits of this process's control group and its parents; None: no limit.

    cgroup v2 (``memory.max``, ``memory.current``, ``inactive_file``) and v1 (``memory/
    memory.limit_in_bytes``, ``memory.usage_in_bytes``, ``total_inactive_file``).
    """
    root = Path(root)
    entries = (_read(Path(proc)) or "").splitlines()
    dirs: list[tuple[Path, str]] = []
    for line in entries:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "" and (root / "cgroup.controllers").exists():  # v2, the unified hierarchy
            dirs.append((root / rel.lstrip("/"), "v2"))
        elif "memory" in controllers.split(","):
            dirs.append((root / "memory" / rel.lstrip("/"), "v1"))
    best: Optional[int] = None
    for start, kind in dirs:
        d = start
        while True:  # the group and every parent up to the mount point: the tightest limit counts
            if kind == "v2":
                limit, usage = _read(d / "memory.max"), _read(d / "memory.current")
                inactive = _stat(d / "memory.stat", "inactive_file")
            else:
                limit, usage = _read(d / "memory.limit_in_bytes"), _read(d / "memory.usage_in_bytes")
                inactive = _stat(d / "memory.stat", "total_inactive_file")
            if limit and limit.isdigit() and usage and usage.isdigit() and int(limit) < _NO_LIMIT:
                left = max(0, int(limit) - max(0, int(usage) - inactive))
                best = left if best is None else min(best, left)
            top = root if kind == "v2" else root / "memory"
            if d == top or d.parent == d:
                break
            d = d.parent
    return best


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units (e.g. '3.2 GiB')."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} TiB"  # pragma: no cover


def check_fits(nbytes: int, what: str, advice: str, available: Optional[int] = None) -> None:
    """Raise :class:`InputError` when ``nbytes`` is more than :data:`FREE_SHARE` of the free memory.

    ``what`` names the thing ("the result (4, 2048, 2048) uint16"), ``advice`` says what to
    do instead.  Nothing is checked when the free memory is unknown or when the
    environment variable ``NAPARI_VDSR_NO_MEMORY_CHECK`` is set to 1.
    """
    if os.environ.get(NO_CHECK_ENV, "") not in ("", "0"):
        return
    free = available_bytes() if available is None else available
    if free is None or nbytes <= FREE_SHARE * free:
        return
    raise InputError(f"{what} would take {format_bytes(nbytes)} of memory, but only {format_bytes(free)} is free; "
                     f"{advice} (To try anyway, for instance with swap, set {NO_CHECK_ENV}=1.)")
