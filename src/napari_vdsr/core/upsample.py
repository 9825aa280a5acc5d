"""Bicubic upsampling of any region of an image, identical to upsampling the whole image.

:func:`napari_vdsr.core.degrade.resize` enlarges a whole plane with
``torch.nn.functional.interpolate(mode="bicubic", align_corners=False, antialias=True)``.
Along one axis that is a linear map ``out[i] = sum_k W[i, k] * in[k]`` whose row ``i``
is non-zero only in a short window of input samples around the source position
``(i + 0.5) * n_in / n_out - 0.5`` (4 or 5 taps when enlarging: the cubic kernel has a
support of 2 input pixels each side), with the weights renormalised where the window
is cut by the image border.

:class:`AxisResampler` extracts those rows from torch itself (so the kernel, the
coordinate mapping and the border handling are torch's, not a re-implementation),
stores them as ``K`` taps per output sample, and evaluates them with a fixed
order of float64 operations.  The value of an output pixel therefore does not
depend on the region it is computed in: a tile of the output computed from the
matching input region plus a small margin is *bit-identical* to the same pixels of
the whole-image result, and equals :func:`~napari_vdsr.core.degrade.resize` within
float32 rounding (about 1e-7 of the value range).

No Qt or napari imports.
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["AxisResampler", "resampler", "upsample_region", "upsample_region_torch", "source_box"]


def _torch_rows(n_in: int, n_out: int, period: int) -> np.ndarray:
    """Responses of the torch resize to ``period`` interleaved combs of ones (shape (period, n_out))."""
    import torch
    import torch.nn.functional as F

    combs = np.zeros((period, 1, n_in, 2), np.float32)
    for r in range(period):
        combs[r, 0, r::period, :] = 1.0
    # the same call as degrade.resize_tensor; the second axis (2 -> 2) is the identity
    out = F.interpolate(torch.from_numpy(combs), size=(n_out, 2), mode="bicubic", align_corners=False, antialias=True)
    return out[:, 0, :, 0].double().numpy()


class AxisResampler:
    """The bicubic resize of one axis from ``n_in`` to ``n_out`` samples, as taps.

    Parameters
    ----------
    n_in, n_out : int
        Input and output lengths (``n_out >= n_in`` for super-resolution; shrinking
        works too).

    Attributes
    ----------
    start : ndarray of int64, shape (n_out,)
        First input index read by each output sample.
    weights : ndarray of float64, shape (n_out, K)
        Weights of the input samples ``start[i] .. start[i] + K - 1`` (zeros where
        torch's window is shorter).
    """

    def __init__(self, n_in: int, n_out: int) -> None:
        n_in, n_out = int(n_in), int(n_out)
        if n_in < 1 or n_out < 1:
            raise ValueError(f"axis lengths must be positive, got {n_in} -> {n_out}.")
        self.n_in, self.n_out = n_in, n_out
        if n_in == n_out:
            self.taps = 1
            self.start = np.arange(n_out, dtype=np.int64)
            self.weights = np.ones((n_out, 1), np.float64)
            return
        ratio = n_in / n_out
        support = 2.0 * max(1.0, ratio)  # cubic kernel: 2 px, widened by the ratio when shrinking
        # window wider than torch's by >= 1 sample on each side; the comb period exceeds it, so
        # every tap of an output row meets exactly one tooth of one comb
        taps = min(n_in, int(math.ceil(2 * support)) + 3)
        period = taps + 2
        centre = (np.arange(n_out, dtype=np.float64) + 0.5) * ratio
        start = np.floor(centre - support).astype(np.int64) - 1
        self.start = np.clip(start, 0, n_in - taps)
        rows = _torch_rows(n_in, n_out, period)
        idx = self.start[:, None] + np.arange(taps)[None, :]
        w = rows[idx % period, np.arange(n_out)[:, None]]
        # a tooth of the same comb outside the window (idx +- period) lies outside torch's
        # window too, so it contributes nothing: check that the taps carry all the weight
        if not np.allclose(w.sum(axis=1), rows.sum(axis=0), atol=1e-5):
            raise RuntimeError(f"bicubic taps do not cover torch's window ({n_in} -> {n_out}); please report.")
        self.start, self.weights = _narrow_window(self.start, w, n_in)
        self.taps = self.weights.shape[1]

    @property
    def identity(self) -> bool:
        """True when the axis keeps its length (the map is the identity)."""
        return self.n_in == self.n_out

    def source(self, o0: int, o1: int) -> tuple[int, int]:
        """Input range ``[i0, i1)`` that the outputs ``[o0, o1)`` read."""
        if not 0 <= o0 < o1 <= self.n_out:
            raise ValueError(f"output range [{o0}, {o1}) is outside [0, {self.n_out}).")
        return int(self.start[o0:o1].min()), int(self.start[o0:o1].max()) + self.taps

    def apply(self, x: np.ndarray, offset: int, o0: int, o1: int, axis: int) -> np.ndarray:
        """Outputs ``[o0, o1)`` along ``axis`` of ``x``, which holds inputs ``offset .. offset + x.shape[axis]``.

        Returns float64 (the identity returns ``x`` itself, as float64).  The taps
        are summed in a fixed order, so a value does not depend on ``x``'s extent.
        """
        i0, i1 = self.source(o0, o1)
        if i0 < offset or i1 > offset + x.shape[axis]:
            raise ValueError(
                f"outputs [{o0}, {o1}) need inputs [{i0}, {i1}) but the region holds "
                f"[{offset}, {offset + x.shape[axis]})."
            )
        xm = np.moveaxis(np.asarray(x), axis, 0)
        if self.identity:
            return np.moveaxis(xm[o0 - offset : o1 - offset].astype(np.float64), 0, axis)
        st = self.start[o0:o1] - offset
        w = self.weights[o0:o1]
        shape = (o1 - o0,) + (1,) * (xm.ndim - 1)
        acc = w[:, 0].reshape(shape) * xm[st].astype(np.float64, copy=False)
        for t in range(1, self.taps):
            acc += w[:, t].reshape(shape) * xm[st + t]
        return np.moveaxis(acc, 0, axis)

    def apply_torch(self, x, offset: int, o0: int, o1: int, axis: int):
        """:meth:`apply` for a torch tensor, on the tensor's device (float64 in, float64 out).

        The same taps, summed in the same order with separate multiplies and adds (no
        fused multiply-add), so the result is bit-identical to :meth:`apply` on the
        CPU and does not depend on the region on any device.  Used on GPUs, where the
        upsampled image then never leaves the device.
        """
        import torch

        i0, i1 = self.source(o0, o1)
        if i0 < offset or i1 > offset + x.shape[axis]:
            raise ValueError(
                f"outputs [{o0}, {o1}) need inputs [{i0}, {i1}) but the region holds "
                f"[{offset}, {offset + x.shape[axis]})."
            )
        if self.identity:
            return x.narrow(axis, o0 - offset, o1 - o0).double()
        st = torch.from_numpy(self.start[o0:o1] - offset).to(x.device)
        w = torch.from_numpy(np.ascontiguousarray(self.weights[o0:o1].T)).to(x.device)
        shape = [1] * x.ndim
        shape[axis] = o1 - o0
        acc = torch.mul(w[0].view(shape), x.index_select(axis, st))
        for t in range(1, self.taps):
            acc = torch.add(acc, torch.mul(w[t].view(shape), x.index_select(axis, st + t)))
        return acc


def _narrow_window(start: np.ndarray, w: np.ndarray, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Shift each output's window onto its nonzero taps and drop the columns no output needs.

    The window above is wider than the kernel's support (4 taps when enlarging), so most of
    its weights are exact zeros.  Leaving out a ``+ 0 * x`` term changes no sum (the other
    terms keep their order), so the result is bit-identical with about half the work.
    """
    nonzero = w != 0.0
    first = nonzero.argmax(axis=1)
    last = w.shape[1] - 1 - nonzero[:, ::-1].argmax(axis=1)
    taps = int((last - first).max()) + 1
    if taps >= w.shape[1]:
        return start, np.ascontiguousarray(w)
    new_start = np.clip(start + first, 0, n_in - taps)
    shift = start + first - new_start  # >= 0: near the far edge the window starts earlier
    out = np.zeros((w.shape[0], taps), np.float64)
    rows = np.arange(w.shape[0])
    for j in range(taps):
        src = first + j - shift  # column of w that lands in column j (outside [first, last]: zero)
        ok = (src >= first) & (src <= last)
        out[rows[ok], j] = w[rows[ok], src[ok]]
    return new_start.astype(np.int64), out


@functools.lru_cache(maxsize=32)
def resampler(n_in: int, n_out: int) -> AxisResampler:
    """Cached :class:`AxisResampler` for ``n_in -> n_out``."""
    return AxisResampler(n_in, n_out)


def upsample_region(
    region: np.ndarray,
    origin: tuple[int, int],
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
    box: tuple[int, int, int, int],
) -> np.ndarray:
    """Bicubic resize of a plane from ``in_hw`` to ``out_hw``, evaluated on one output box only.

    Parameters
    ----------
    region : ndarray (h, w[, C])
        Part of the input plane starting at ``origin`` = (row, column); it must hold
        the inputs the box reads (see :func:`source_box`); any dtype.
    origin : (int, int)
        Position of ``region[0, 0]`` in the input plane.
    in_hw, out_hw : (int, int)
        Size of the whole input and output planes.
    box : (y0, y1, x0, x1)
        Output box (half-open) to compute.

    Returns
    -------
    ndarray, float32, shape (y1 - y0, x1 - x0[, C])
        Equal to ``resize(plane, out_hw)[y0:y1, x0:x1]`` within float32 rounding,
        and bit-identical for every box that covers the same output pixel.
    """
    ry = resampler(int(in_hw[0]), int(out_hw[0]))
    rx = resampler(int(in_hw[1]), int(out_hw[1]))
    y0, y1, x0, x1 = box
    tmp = rx.apply(region, origin[1], x0, x1, axis=1)
    return ry.apply(tmp, origin[0], y0, y1, axis=0).astype(np.float32)


def upsample_region_torch(region, origin: tuple[int, int], in_hw: tuple[int, int], out_hw: tuple[int, int],
                          box: tuple[int, int, int, int]):
    """:func:`upsample_region` of a 2-D torch tensor, computed on its device; returns float32.

    Bit-identical to :func:`upsample_region` on the CPU; on a GPU equal within float64
    rounding and, like it, independent of the region.  Needs float64 support (CUDA, CPU;
    not MPS).
    """
    ry = resampler(int(in_hw[0]), int(out_hw[0]))
    rx = resampler(int(in_hw[1]), int(out_hw[1]))
    y0, y1, x0, x1 = box
    tmp = rx.apply_torch(region.double(), origin[1], x0, x1, axis=1)
    return ry.apply_torch(tmp, origin[0], y0, y1, axis=0).float()


def source_box(in_hw: tuple[int, int], out_hw: tuple[int, int], box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Input box ``(i0, i1, j0, j1)`` that the output ``box`` reads (clipped to the plane)."""
    ry = resampler(int(in_hw[0]), int(out_hw[0]))
    rx = resampler(int(in_hw[1]), int(out_hw[1]))
    return ry.source(box[0], box[1]) + rx.source(box[2], box[3])

