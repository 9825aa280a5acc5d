"""Intensity normalisation between user dtypes and the network's [0, 1] scale."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Intensity", "intensity_range", "check_dtype"]


def check_dtype(dtype: np.dtype) -> None:
    """Raise :class:`InputError` for dtypes that are not real-valued images."""
    from .errors import InputError

    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        raise InputError(
            "boolean images (masks) cannot be restored; convert the layer to an intensity image "
            "(e.g. uint8) or pick an image layer instead of a mask."
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
        return ((np.asarray(x, dtype=np.float32) - np.float32(self.lo)) / np.float32(self.span)).astype(np.float32)

    def from_net(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float32) * np.float32(self.span) + np.float32(self.lo)).astype(np.float32)


def intensity_range(data, dtype: np.dtype | None = None) -> Intensity:
    """Choose the :class:`Intensity` map for ``data`` (numpy or dask array).

    uint8 → [0, 255]; float data already inside [0, 1] → [0, 1]; anything else
    → the data's min and max (computed lazily for dask arrays).
    """
    from .errors import InputError

    dtype = np.dtype(dtype if dtype is not None else data.dtype)
    check_dtype(dtype)
    if dtype == np.uint8:
        return Intensity(0.0, 255.0)
    lo = data.min()
    hi = data.max()
    if hasattr(lo, "compute"):
        import dask

        lo, hi = dask.compute(lo, hi)
    lo, hi = float(lo), float(hi)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(
            "the image contains NaN or infinite values; replace them first "
            "(e.g. np.nan_to_num(image)) and try again."
        )
    if dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        return Intensity(0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return Intensity(lo, hi)
