"""How much memory is free, and a check that an in-memory result fits in it.

A result that does not fit is refused before any work: on Linux a too large
``np.empty`` succeeds (pages are only promised) and the process is killed by the
kernel's OOM killer while the result fills, which takes napari, and any unsaved
layer, with it.  No Qt or napari imports.
"""

from __future__ import annotations

import os
from typing import Optional

from .errors import InputError

__all__ = ["available_bytes", "format_bytes", "check_fits"]

#: share of the free memory one result may take (the rest: the input's tiles, the network, napari's copies)
FREE_SHARE = 0.9
#: environment variable that turns the check off (a machine with swap the user wants to use)
NO_CHECK_ENV = "NAPARI_VDSR_NO_MEMORY_CHECK"


def available_bytes() -> Optional[int]:
    """Memory that can be allocated without swapping (psutil, else /proc/meminfo); None if unknown."""
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
