"""Keep torch from loading Triton into a napari process whose OpenGL driver has loaded LLVM.

Mesa's OpenGL drivers (llvmpipe, radeonsi) load ``libLLVM``; Triton's extension carries its own
LLVM, and loading it into such a process crashes it (a segmentation fault, seen with Mesa's
``libLLVM-15`` and Triton 3.8). torch imports Triton the first time an optimiser is built
(``torch._dynamo`` asks whether Triton is installed), so pressing *Fine-tune* in napari on a
Linux desktop with Mesa and a CUDA build of torch (which brings Triton) would close napari.
The widgets train without ``torch.compile``, so they do not need Triton: when LLVM is already
in the process and Triton is not, Triton is made unimportable for this process and torch goes
on without it. ``NAPARI_VDSR_ALLOW_TRITON=1`` turns this off. Never imported by the core.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

log = logging.getLogger(__name__)


def llvm_in_process(maps: str = "/proc/self/maps") -> bool:
    """True when a shared ``libLLVM`` is mapped into this process (Linux; False elsewhere)."""
    try:
        with open(maps) as fh:
            return any("libLLVM" in line for line in fh)
    except OSError:
        return False


def keep_triton_out(maps: str = "/proc/self/maps") -> bool:
    """Make Triton unimportable in this process when loading it would crash it; True when it did."""
    if os.environ.get("NAPARI_VDSR_ALLOW_TRITON") == "1":
        return False
    if "triton" in sys.modules or "torch._dynamo" in sys.modules:  # already decided, one way or the other
        return False
    try:
        if importlib.util.find_spec("triton") is None:
            return False
    except (ImportError, ValueError):
        return False
    if not llvm_in_process(maps):
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]  # `import triton` now raises ImportError
    log.info("napari-vdsr: Triton is not loaded into this napari process: its LLVM crashes beside the OpenGL "
             "driver's (set NAPARI_VDSR_ALLOW_TRITON=1 to load it anyway); training here does not need it.")
    return True
