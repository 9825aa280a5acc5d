"""Intensity normalisation between user dtypes and the network's [0, 1] scale."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Intensity", "intensity_range", "check_dtype", "pair_extremes", "range_without_outliers", "clip_outliers",
           "intensity_from_extremes"]


def check_dtype(dtype: np.dtype) -> None:
    """Raise :class:`InputError` for dtypes that are not real-valued images."""
    from .errors import InputError

    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        raise InputError(
            "boolean images (masks, 1-bit files) cannot be restored: the network needs intensities. Convert "
            "to an intensity image first (a file: save it as 8-bit grey; in Python: image.astype(np.uint8) * 255); "
            "in napari, pick an image layer instead of a mask."
        )
    if dtype.kind == "c":
        raise InputError("complex images cannot be restored; pass the magnitude (np.abs) or the real part.")
    if dtype.kind not in "uif":
        raise InputError(f"images of dtype {dtype} cannot be restored; use an integer or float array.")


@dataclass(frozen=True)
class Intensity:
    """Affine map between an image's values and the network's [0, 1] range.

    ``net = (value - lo) / (hi - lo)``.  For 8-bit data ``lo=0, hi=255`` (the
    convention the bundled models were trained with); other data use the
    image's own range so that faint microscopy signals fill the network's range.
    """

    lo: float
    hi: float

    @property
    def span(self) -> float:
        return float(self.hi - self.lo) if self.hi > self.lo else 1.0

    def to_net(self, x: np.ndarray) -> np.ndarray:
        """Values → the network's scale (float32).  Data that float32 cannot hold exactly (float64, 32- and
        64-bit integers: e.g. a range of 1000 above 3e9) have ``lo`` taken off in float64 first."""
        x = np.asarray(x)
        if x.dtype.itemsize <= 2 or x.dtype == np.float32:
            return ((x.astype(np.float32) - np.float32(self.lo)) / np.float32(self.span)).astype(np.float32)
        return ((x.astype(np.float64) - self.lo) / self.span).astype(np.float32)

    def from_net(self, x: np.ndarray) -> np.ndarray:
        """The network's scale → values: float32, or float64 when ``lo`` is larger than the range (a range of
        1000 above 3e9: float32 would round the result to its steps of 256)."""
        if abs(self.lo) <= self.span:
            return (np.asarray(x, dtype=np.float32) * np.float32(self.span) + np.float32(self.lo)).astype(np.float32)
        return np.asarray(x, dtype=np.float64) * self.span + self.lo


#: how far (a fraction of the range) an extreme must stand out beyond every pair of neighbours to be
#: left out of the range: a hot or dead pixel is far outside; a bright feature shares its value, and the
#: peaks of noise stand out by about a quarter of the range at most (Gaussian noise, 256 x 256 pixels)
OUTLIER_FRACTION = 0.5


def clip_outliers(net: np.ndarray) -> np.ndarray:
    """Training planes on the network's scale with outliers held at the bound that defines them
    (``-OUTLIER_FRACTION .. 1 + OUTLIER_FRACTION``): one hot pixel would otherwise outweigh its patch."""
    return np.clip(net, -OUTLIER_FRACTION, 1.0 + OUTLIER_FRACTION)


def pair_extremes(data, yx: tuple[int, int] = (-2, -1)):
    """The extremes of ``data`` that a pixel shares with a 4-neighbour along the ``yx`` axes.

    Returns ``(lo, hi)``: ``hi`` is the largest value of the darker pixel of any two neighbours
    (along Y or X), ``lo`` the smallest of the brighter one. An isolated pixel (a camera's hot or
    dead pixel) cannot set them; a feature two or more pixels wide (or a one-pixel line) does.
    Falls back to the plain extremes when neither axis has two pixels. Works on numpy and dask
    arrays (dask: lazy scalars); numpy arrays are read in slabs of planes, so the temporary
    arrays stay small.
    """
    nd = data.ndim
    if not all(-nd <= a < nd for a in yx) or yx[0] % nd == yx[1] % nd:
        raise ValueError(f"yx must name two different axes of a {nd}-D array, got {yx}.")
    axes = [a % nd for a in yx if data.shape[a] >= 2]
    if not axes:
        return data.min(), data.max()
    if not isinstance(data, np.ndarray):  # dask (and numpy-like arrays with slicing and ufuncs)
        los, his = [], []
        for a in axes:
            a0 = data[(slice(None),) * a + (slice(None, -1),)]
            a1 = data[(slice(None),) * a + (slice(1, None),)]
            his.append(np.minimum(a0, a1).max())
            los.append(np.maximum(a0, a1).min())
        return (los[0] if len(los) == 1 else np.minimum(*los)), (his[0] if len(his) == 1 else np.maximum(*his))
    lead = [d for d in range(nd) if d not in (yx[0] % nd, yx[1] % nd)]
    rest = [d for d in range(nd) if d not in lead]  # the two image axes, in the array's order
    view = np.moveaxis(data, lead, list(range(len(lead)))) if lead else data
    n_lead = int(np.prod(view.shape[: len(lead)])) if lead else 1
    if lead == list(range(len(lead))) and data.flags.c_contiguous:  # a view: slabs of ~16 MB of planes
        planes = view.reshape((n_lead,) + view.shape[len(lead):])
        per = max(1, (1 << 24) // max(1, planes[0].nbytes))
        blocks: Any = (planes[i:i + per] for i in range(0, n_lead, per))
    else:  # strided (e.g. RGB samples last): plane by plane, never a copy of the whole array
        blocks = (view[idx][None] for idx in np.ndindex(*view.shape[: len(lead)]))
    lo, hi = None, None
    for block in blocks:
        for a in (1 + rest.index(d) for d in axes):
            a0 = block[(slice(None),) * a + (slice(None, -1),)]
            a1 = block[(slice(None),) * a + (slice(1, None),)]
            h, l_ = np.minimum(a0, a1).max(), np.maximum(a0, a1).min()
            hi = h if hi is None else max(hi, h)
            lo = l_ if lo is None else min(lo, l_)
    return lo, hi


def range_without_outliers(lo: float, hi: float, plo: float, phi: float) -> tuple[float, float]:
    """The range to map: the plain extremes ``lo, hi``, except where one stands out beyond the pair
    extremes ``plo, phi`` by more than :data:`OUTLIER_FRACTION` of their range (then those)."""
    span = max(phi - plo, 0.0)
    if span <= 0:
        return lo, hi
    tol = OUTLIER_FRACTION * span
    return (plo if plo - lo > tol else lo), (phi if hi - phi > tol else hi)


def intensity_range(data, dtype: np.dtype | None = None, yx: tuple[int, int] = (-2, -1),
                    robust: bool = True, callbacks: Any = None) -> Intensity:
    """Choose the :class:`Intensity` map for ``data`` (numpy or dask array).

    uint8 → [0, 255]; float data already inside [0, 1] → [0, 1]; anything else → the data's
    min and max, except that an isolated pixel far outside the rest (a camera's hot or dead
    pixel: beyond every pair of neighbours along the ``yx`` axes by more than half their range)
    does not set them (``robust``; a 16-bit image with a few hot pixels at 65535 would otherwise
    squeeze its signal into a sliver of the network's range and restore worse than bicubic).
    Values outside the range pass through the network's affine map unclipped. Computed lazily
    for dask arrays; ``callbacks`` are handed to that computation (``dask.compute(...,
    callbacks=...)``: this computation's own, unlike a ``with Callback()`` block, which registers
    for every thread).
    """
    dtype = np.dtype(dtype if dtype is not None else data.dtype)
    check_dtype(dtype)
    if dtype == np.uint8:
        return Intensity(0.0, 255.0)
    use_pairs = robust and data.ndim >= 2
    lo, hi = data.min(), data.max()
    if hasattr(lo, "compute"):  # dask: one pass for the extremes and the pairs
        import dask

        plo, phi = pair_extremes(data, yx) if use_pairs else (lo, hi)
        lo, hi, plo, phi = dask.compute(lo, hi, plo, phi, **({"callbacks": callbacks} if callbacks else {}))
        return intensity_from_extremes(float(lo), float(hi), float(plo), float(phi), dtype)
    lo, hi = float(lo), float(hi)
    if not use_pairs or not (np.isfinite(lo) and np.isfinite(hi)) or _unit_float(dtype, lo, hi):
        return intensity_from_extremes(lo, hi, lo, hi, dtype)  # no pass over the pairs needed
    plo, phi = pair_extremes(data, yx)
    return intensity_from_extremes(lo, hi, float(plo), float(phi), dtype)


def _unit_float(dtype: np.dtype, lo: float, hi: float) -> bool:
    return dtype.kind == "f" and lo >= 0.0 and hi <= 1.0


def intensity_from_extremes(lo: float, hi: float, plo: float, phi: float, dtype: np.dtype) -> Intensity:
    """The :class:`Intensity` of non-8-bit data from its extremes ``lo, hi`` and its pair extremes
    ``plo, phi`` (:func:`pair_extremes`; give ``lo, hi`` again for the plain range): float data
    inside [0, 1] → [0, 1], else the range without outliers (:func:`range_without_outliers`).
    Shared by :func:`intensity_range` and the streamed reads of :mod:`.restore`.
    """
    from .errors import InputError

    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(
            "the image contains NaN or infinite values; replace them first "
            "(e.g. np.nan_to_num(image)) and try again."
        )
    if _unit_float(np.dtype(dtype), lo, hi):
        return Intensity(0.0, 1.0)
    lo, hi = range_without_outliers(lo, hi, plo, phi)
    return Intensity(lo, hi if hi > lo else lo + 1.0)
