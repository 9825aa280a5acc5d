"""Half-precision VDSR inference on CUDA with each convolution and its ReLU fused in cuDNN.

Under ``torch.autocast`` a VDSR forward runs every 3x3 convolution in cuDNN and then
the bias and ReLU as separate memory-bound kernels.  With 64 channels the
convolutions are short, so those extra passes over the activations cost more than
half of the time: on an NVIDIA H200 (bf16, channels_last, 2048² input) the network ran
at 180 TFLOP/s, 0.22 of the bf16 ``torch.mm`` peak measured in the same process (814
TFLOP/s).  ``torch.cudnn_convolution_relu`` does convolution + bias + ReLU in one cuDNN
call: 399 TFLOP/s = 0.49 of that peak on the same card, 0.47-0.50 for 1024² to 4096²
(``benchmarks/gpu_forward.py``, session 4 of ``docs/performance.md``).

Used by :func:`.tiling.run_net` for :class:`~.model.VDSR`-shaped networks (see
:func:`.stream._convs`) without hooks, under CUDA autocast to bfloat16 or float16,
without gradients.  The operator is checked once per device and precision against
``conv2d`` + ReLU; if it is missing or disagrees, the plain forward pass runs.
``NAPARI_VDSR_NO_FUSED=1`` turns the path off.  No Qt or napari imports.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["fusable", "fused_forward", "fused_op_ok", "pad_thin_channels"]

_lock = threading.Lock()
_checked: dict[tuple[str, torch.dtype], bool] = {}


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    try:
        if not torch.is_autocast_enabled(device.type):
            return None
        return torch.get_autocast_dtype(device.type)
    except (TypeError, AttributeError, RuntimeError):  # torch < 2.4
        if device.type != "cuda" or not torch.is_autocast_enabled():
            return None
        return torch.get_autocast_gpu_dtype()


def _op():
    return getattr(torch, "cudnn_convolution_relu", None)


def fused_op_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether cuDNN's fused convolution + bias + ReLU exists on ``device`` and agrees with conv2d + ReLU (checked once)."""
    key = (str(device), dtype)
    with _lock:
        if key not in _checked:
            ok = False
            op = _op()
            if op is not None:
                try:
                    g = torch.Generator(device="cpu").manual_seed(0)
                    x = torch.rand(1, 8, 9, 11, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
                    w = (torch.randn(8, 8, 3, 3, generator=g) * 0.2).to(device, dtype).contiguous(
                        memory_format=torch.channels_last)
                    b = torch.randn(8, generator=g).to(device, dtype)
                    with torch.autocast(device.type, enabled=False):
                        got = op(x, w, b, [1, 1], [1, 1], [1, 1], 1).float()
                        ref = torch.relu(F.conv2d(x.float(), w.float(), b.float(), padding=1))
                    ok = bool(got.shape == ref.shape and torch.allclose(got, ref, rtol=2e-2, atol=2e-2))
                except (RuntimeError, TypeError, NotImplementedError):
                    ok = False
            _checked[key] = ok
        return _checked[key]


def fusable(net: nn.Module, x: torch.Tensor) -> Optional[torch.dtype]:
    """The half precision to run ``net(x)`` in with fused layers, or None where the plain forward must run.

    Needs: a CUDA input, autocast on to bfloat16/float16, no gradients, a VDSR-shaped
    network without hooks, and the operator's one-time check passing.
    """
    from .stream import _convs, has_hooks

    if os.environ.get("NAPARI_VDSR_NO_FUSED", "") not in ("", "0"):
        return None
    if x.device.type != "cuda" or x.ndim != 4 or torch.is_grad_enabled():
        return None
    dtype = _autocast_dtype(x.device)
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    if has_hooks(net):
        return None
    convs = _convs(net)
    if convs is None or convs[0].in_channels != x.shape[1] or convs[0].weight.device != x.device:
        return None
    return dtype if fused_op_ok(x.device, dtype) else None


def pad_thin_channels() -> int:
    """``NAPARI_VDSR_PAD_THIN`` (default 0 = off): pad the thin first/last layers to this many channels.

    An experiment for the next GPU measurement (``benchmarks/gpu_forward.py`` runs both):
    on the H200 the 1 -> 64 and 64 -> 1 layers seem to take about a fifth of the network's
    time for 0.2 % of its arithmetic (an estimate from the per-layer timings of
    ``torch.compile``'s autotuner, docs/performance.md, session 4).  Zero
    channels change no value (they add exact zeros) but may let cuDNN pick its aligned
    tensor-core kernels.  Off until measured.
    """
    try:
        return max(0, int(os.environ.get("NAPARI_VDSR_PAD_THIN", "0")))
    except ValueError:
        return 0


def _pad_dim(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``t`` with zeros appended along ``dim`` up to ``size`` (``t`` itself if it is not shorter)."""
    if t.shape[dim] >= size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def fused_forward(net: nn.Module, x: torch.Tensor, dtype: torch.dtype, op=None, pad: Optional[int] = None) -> torch.Tensor:
    """``net(x)`` with every convolution but the last fused with its bias and ReLU, in ``dtype``.

    The activations and weights are in ``dtype`` (channels_last); the residual is added
    to the float32 input, as autocast would (``half + float -> float``).  ``op`` replaces
    ``torch.cudnn_convolution_relu`` (tests run this on the CPU with an emulation).
    ``pad``: channels to pad the first layer's input and the last layer's output to with
    zeros (default :func:`pad_thin_channels`; same values).

    Returns a float32 tensor shaped like ``x``.
    """
    from .stream import _convs

    convs = _convs(net)
    if convs is None:
        raise ValueError("fused_forward needs a VDSR-shaped network.")
    op = op or _op()
    pad = pad_thin_channels() if pad is None else int(pad)
    cl = torch.channels_last
    with torch.autocast(x.device.type, enabled=False):
        h = _pad_dim(x.to(dtype), 1, pad).contiguous(memory_format=cl)
        for i, cv in enumerate(convs[:-1]):
            w = cv.weight.to(dtype)
            if i == 0:
                w = _pad_dim(w, 1, pad)
            b = None if cv.bias is None else cv.bias.to(dtype)
            h = op(h, w.contiguous(memory_format=cl), b, [1, 1], [1, 1], [1, 1], 1)
        last = convs[-1]
        co = last.out_channels
        w = _pad_dim(last.weight.to(dtype), 0, pad).contiguous(memory_format=cl)
        b = None if last.bias is None else _pad_dim(last.bias.to(dtype), 0, pad)
        y = F.conv2d(h, w, b, padding=1)[:, :co].float()
        if net.residual:
            y = y + x.float()
    return y
