"""Device selection."""

from __future__ import annotations

import torch

from .errors import InputError

__all__ = ["resolve_device", "cpu_has_fast_bf16", "autocast_dtype", "memory_format"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → CUDA, then MPS, then CPU; explicit names are checked for availability."""
    if isinstance(device, torch.device):
        return device
    if device is not None and not isinstance(device, str):
        raise InputError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' (a string), got {device!r}.")
    name = (device or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu or auto.")
        return torch.device(name)
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError("device 'mps' asked for, but Apple MPS is not available here; use cpu or auto.")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise InputError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps.")


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AMX or AVX512-BF16), where bf16 autocast
    makes convolutions several times faster (measured ≈5x for VDSR training steps)."""
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, name, None)
        if fn is not None:
            try:
                if fn():
                    return True
            except Exception:  # private API: be defensive
                pass
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
        return "amx_bf16" in flags or "avx512_bf16" in flags
    except OSError:
        return False


def autocast_dtype(device: torch.device, enabled: bool = True) -> "torch.dtype | None":
    """Mixed-precision dtype for ``device``: bf16 on CUDA (fp16 where bf16 is missing) and on
    CPUs with native bf16; ``None`` (float32) otherwise or when ``enabled`` is false."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def memory_format(device: torch.device) -> torch.memory_format:
    """Layout for images and weights on ``device``: channels_last (NHWC) on CPU and CUDA, where
    oneDNN and cuDNN run 3x3 convolutions fastest in it; the default layout elsewhere (MPS)."""
    return torch.channels_last if torch.device(device).type in ("cpu", "cuda") else torch.contiguous_format
