"""Row-streamed CPU inference for VDSR: the whole network runs band by band down the image.

A plain forward pass computes layer 1 on the whole image, then layer 2, ...: every
layer reads and writes ``H x W x 64`` floats, far more than the CPU caches hold, so
the convolutions wait on memory.  Here the image is cut into bands of a few dozen
rows and each band goes through *all* layers before the next band starts.  A 3x3
convolution needs one row of context above and below, so every layer keeps the last
two rows of its input from the previous band (its "carry") and outputs rows as soon
as their context is complete; the image top and bottom get the zero rows the network's
padding would add.  The arithmetic per output pixel is the same as in the plain
forward pass (tests compare the two), only the order of work changes, and the
activations of one band (two buffers of ``band x W x 64`` floats) stay in cache.

Measured on a 2-core AVX-512 Xeon (``benchmarks/throughput.py --unstreamed``): faster than
the plain forward pass of the same tile (1.06-1.13x at tile 1024), and the activation memory of a tile shrinks
from ``2 x H x W x 64`` floats to a few bands.

Only for float32 on the CPU, for :class:`~.model.VDSR` networks without hooks (subclasses
with their own ``forward`` run as written).  Convolutions write
straight into the next layer's buffer with ReLU fused when PyTorch's oneDNN operator
``mkldnn::_convolution_pointwise_`` is there (checked once against ``conv2d``); otherwise
``conv2d`` + copy.  The thin first and last layers (1 -> 64 and 64 -> 1 channels for a grey
net) are matrix products instead (:func:`_first_layer`, :func:`_last_layer`): a convolution
library runs them at a small fraction of its speed on the 64-channel layers, so as
convolutions they took about 3 % of the time for 0.2 % of the arithmetic; as products they
take under half of that.  No Qt or napari imports.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .cancel import raise_if_stopped

__all__ = ["streamable", "stream_forward", "band_rows", "STREAM_PIXELS"]

#: Target pixels per band (rows x width); about 40k px kept the activations cache-resident.
STREAM_PIXELS = 40_960

_fused_lock = threading.Lock()
_fused_ok: Optional[bool] = None


def band_rows(width: int) -> int:
    """Rows per band for an image ``width`` px wide (8 to 128)."""
    return max(8, min(128, STREAM_PIXELS // max(1, int(width))))


def _convs(net: nn.Module) -> Optional[list[nn.Conv2d]]:
    """The convolutions of a VDSR ``net`` (conv, ReLU, ..., conv, residual), or None.

    Only for :class:`~.model.VDSR` itself or subclasses that keep its ``forward``: a
    subclass with its own ``forward`` is run as written.
    """
    from .model import VDSR

    if not isinstance(net, VDSR) or type(net).forward is not VDSR.forward:
        return None
    body = getattr(net, "body", None)
    if not isinstance(body, nn.Sequential) or not hasattr(net, "residual"):
        return None
    mods = list(body)
    if len(mods) < 3 or len(mods) % 2 != 1:
        return None
    convs = []
    for i, m in enumerate(mods):
        if i % 2 == 0:
            if type(m) is not nn.Conv2d or m.kernel_size != (3, 3) or m.stride != (1, 1) \
                    or m.padding != (1, 1) or m.dilation != (1, 1) or m.groups != 1 \
                    or m.padding_mode != "zeros":
                return None
            convs.append(m)
        elif type(m) is not nn.ReLU:
            return None
    return convs


def has_hooks(net: nn.Module) -> bool:
    """True if any module of ``net`` has forward or backward hooks (fast paths skip real forward calls)."""
    return any(getattr(m, a, None) for m in net.modules()
               for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"))


def streamable(net: nn.Module, x: torch.Tensor) -> bool:
    """True if :func:`stream_forward` applies: a VDSR-shaped net without hooks, float32 input on the CPU, no grad.

    ``NAPARI_VDSR_NO_STREAM=1`` in the environment turns streaming off (plain forward passes).
    """
    if os.environ.get("NAPARI_VDSR_NO_STREAM", "") not in ("", "0"):
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.ndim != 4:
        return False
    if torch.is_grad_enabled() or _cpu_autocast_on():
        return False
    if has_hooks(net):
        return False  # hooks expect real forward calls: keep them
    convs = _convs(net)
    if convs is None or convs[0].in_channels != x.shape[1]:
        return False
    return all(c.weight.device.type == "cpu" and c.weight.dtype == torch.float32 for c in convs)


def _cpu_autocast_on() -> bool:
    try:
        return bool(torch.is_autocast_enabled("cpu"))
    except TypeError:  # torch < 2.4
        return bool(torch.is_autocast_cpu_enabled())


def _fused_available() -> bool:
    """Whether oneDNN's in-place conv + add + ReLU operator exists and agrees with conv2d (checked once)."""
    global _fused_ok
    with _fused_lock:
        if _fused_ok is None:
            _fused_ok = False
            try:
                op = torch.ops.mkldnn._convolution_pointwise_.binary
                g = torch.Generator().manual_seed(0)
                x = torch.rand(1, 4, 6, 7, generator=g).contiguous(memory_format=torch.channels_last)
                w = torch.randn(5, 4, 3, 3, generator=g)
                b = torch.randn(5, generator=g)
                dst = torch.zeros(1, 5, 4, 7).contiguous(memory_format=torch.channels_last)
                op(dst, x, w, b, [0, 1], [1, 1], [1, 1], 1, "add", 1.0, "relu", [], "")
                ref = torch.relu(F.conv2d(x, w, b, padding=(0, 1)))
                _fused_ok = bool(torch.allclose(dst, ref, rtol=1e-5, atol=1e-5))
            except (AttributeError, RuntimeError, TypeError):
                _fused_ok = False
    return _fused_ok


#: Input channels up to which the first layer runs as an explicit matrix product.
THIN_CHANNELS = 4


def _first_layer(inp: torch.Tensor, cv: nn.Conv2d, w_mat: torch.Tensor, dst: torch.Tensor, n_out: int) -> None:
    """ReLU(first conv) of ``inp`` (n, c, n_out + 2, w) written into ``dst`` (n, 64, n_out, w), channels_last.

    The 3x3 neighbourhoods of the few input channels are gathered (``9 c`` values per pixel)
    and multiplied by the weights as one matrix product written straight into ``dst``.
    """
    n, c, _, w = inp.shape
    xp = F.pad(inp, (1, 1))
    for i in range(n):
        cols = torch.stack([xp[i, :, dy : dy + n_out, dx : dx + w] for dy in range(3) for dx in range(3)], dim=-1)
        a = cols.permute(1, 2, 0, 3).reshape(n_out * w, c * 9)  # (pixels, c*9), weight order (c, dy, dx)
        d2 = dst[i].permute(1, 2, 0).view(n_out * w, cv.out_channels)  # a view: fails rather than copying
        torch.addmm(cv.bias, a, w_mat, out=d2)
        d2.relu_()


def _last_layer(inp: torch.Tensor, cv: nn.Conv2d, w_mat: torch.Tensor, n_out: int) -> torch.Tensor:
    """The last conv (few output channels) of ``inp`` (n, 64, n_out + 2, w): (n, c_out, n_out, w).

    One product gives, per input pixel, its contribution to each of the 9 neighbours and
    output channels; the shifted contributions are then summed.
    """
    n, ci, rows_in, w = inp.shape
    co = cv.out_channels
    outs = []
    for i in range(n):
        p = (inp[i].permute(1, 2, 0).reshape(rows_in * w, ci) @ w_mat).view(rows_in, w, co, 3, 3)
        p = F.pad(p.permute(2, 3, 4, 0, 1), (1, 1))  # (co, dy, dx, rows_in, w + 2)
        y = p[:, 0, 0, 0:n_out, 0:w] + cv.bias.view(co, 1, 1)
        for dy in range(3):
            for dx in range(3):
                if dy or dx:
                    y += p[:, dy, dx, dy : dy + n_out, dx : dx + w]
        outs.append(y)
    return torch.stack(outs)


def stream_forward(net: nn.Module, x: torch.Tensor, band: Optional[int] = None) -> torch.Tensor:
    """``net(x)`` for a VDSR-shaped ``net``, computed band by band (see the module docstring).

    Parameters
    ----------
    net : torch.nn.Module
        A :class:`~.model.VDSR` (eval mode, float32, on the CPU).
    x : torch.Tensor
        (N, C, H, W) float32 CPU input; any memory format.
    band : int, optional
        Rows per band; default :func:`band_rows` of the width.

    Returns
    -------
    torch.Tensor
        (N, C, H, W) float32, equal to ``net(x)`` up to float rounding.

    Raises
    ------
    ValueError
        If ``net`` / ``x`` are not streamable (see :func:`streamable`).
    """
    convs = _convs(net)
    if convs is None or x.ndim != 4 or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError("stream_forward needs a VDSR-shaped network and a float32 (N, C, H, W) CPU tensor.")
    n_layers = len(convs)
    n, c0, h, w = x.shape
    band = band_rows(w) if band is None else max(1, int(band))
    cl = torch.channels_last
    x = x.contiguous(memory_format=cl)
    cap = band + n_layers + 4  # rows a buffer can hold: carry (2) + new rows (<= band + layers) + zero row
    width = convs[0].out_channels
    with torch.no_grad():
        ping = [x.new_zeros(n, width, cap, w).contiguous(memory_format=cl) for _ in range(2)]
        first_in = x.new_zeros(n, c0, cap, w).contiguous(memory_format=cl)
        carry = [x.new_zeros(n, cv.in_channels, 2, w).contiguous(memory_format=cl) for cv in convs]
        out = torch.empty_like(x)
        started = [False] * n_layers
        pos = 0  # next output row of the last layer
        fused = _fused_available()
        pad, one = [0, 1], [1, 1]
        thin_in = c0 <= THIN_CHANNELS and convs[0].bias is not None
        thin_out = convs[-1].out_channels <= THIN_CHANNELS and convs[-1].bias is not None
        w_first = convs[0].weight.reshape(convs[0].out_channels, -1).t().contiguous() if thin_in else None
        w_last = (convs[-1].weight.permute(1, 0, 2, 3).reshape(convs[-1].in_channels, -1).contiguous()
                  if thin_out else None)
        # the first band is longer: every layer lags one row behind the previous one
        edges = [0, *range(min(h, band + n_layers), h, band), h]
        for r0, r1 in zip(edges[:-1], edges[1:]):
            raise_if_stopped()  # a caller's Cancel acts within a band, not only after the whole tile
            final = r1 == h
            rows_new = r1 - r0
            first_in[:, :, 2 : 2 + rows_new].copy_(x[:, :, r0:r1])
            buf, which = first_in, 0
            for li, cv in enumerate(convs):
                if started[li]:
                    start = 0
                    buf[:, :, 0:2].copy_(carry[li])
                else:  # image top: one zero row of context
                    start = 1
                    buf[:, :, 1:2].zero_()
                    started[li] = True
                end = 2 + rows_new
                if final:  # image bottom: one zero row of context
                    buf[:, :, end : end + 1].zero_()
                    end += 1
                else:
                    carry[li].copy_(buf[:, :, end - 2 : end])
                n_out = end - start - 2
                inp = buf[:, :, start:end]
                if li < n_layers - 1:
                    nxt = ping[which]
                    which ^= 1
                    dst = nxt[:, :, 2 : 2 + n_out]
                    if li == 0 and thin_in:
                        _first_layer(inp, cv, w_first, dst, n_out)
                    elif fused:
                        dst.zero_()
                        torch.ops.mkldnn._convolution_pointwise_.binary(
                            dst, inp, cv.weight, cv.bias, pad, one, one, 1, "add", 1.0, "relu", [], "")
                    else:
                        dst.copy_(F.conv2d(inp, cv.weight, cv.bias, padding=(0, 1))).clamp_(min=0)
                    buf, rows_new = nxt, n_out
                else:
                    if thin_out:
                        y = _last_layer(inp, cv, w_last, n_out)
                    else:
                        y = F.conv2d(inp, cv.weight, cv.bias, padding=(0, 1))
                    if net.residual:
                        y = y + x[:, :, pos : pos + n_out]
                    out[:, :, pos : pos + n_out].copy_(y)
                    pos += n_out
    return out
