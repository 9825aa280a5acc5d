"""Cooperative cancellation inside long forward passes (a tile can take a minute on a CPU).

A caller that can be cancelled (the napari widgets' worker thread) wraps its work in
:func:`stop_check`; the row-streamed forward pass and the self-ensemble then call
:func:`raise_if_stopped` between bands and passes, which raises
:class:`~napari_vdsr.core.errors.Cancelled` once the check returns True.  The check is per thread,
so other threads' restorations go on.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from .errors import Cancelled

__all__ = ["stop_check", "raise_if_stopped"]

_local = threading.local()


@contextmanager
def stop_check(check: Optional[Callable[[], bool]]) -> Iterator[None]:
    """Within the block, forward passes in this thread stop (raise ``Cancelled``) once ``check()`` is true."""
    previous = getattr(_local, "check", None)
    _local.check = check
    try:
        yield
    finally:
        _local.check = previous


def raise_if_stopped(when: str = "during a tile") -> None:
    """Raise :class:`Cancelled` if this thread's :func:`stop_check` says stop; otherwise return at once."""
    check = getattr(_local, "check", None)
    if check is not None and check():
        raise Cancelled(f"restoration cancelled {when}.")
