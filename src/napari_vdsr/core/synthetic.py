"""Synthetic microscopy-like images (blobs and filaments) for tests, demos and benchmarks."""

from __future__ import annotations

import numpy as np

__all__ = ["synthetic_cells"]


def synthetic_cells(
    shape: tuple[int, ...] = (8, 128, 128),
    seed: int = 0,
    n_blobs: int = 30,
    n_filaments: int = 12,
    photons: float | None = 200.0,
    background: float = 0.05,
    dtype: type = np.uint16,
) -> np.ndarray:
    """A fluorescence-like stack: Gaussian blobs (nuclei, vesicles) and thin curved filaments.

    Parameters
    ----------
    shape : tuple
        ``(Y, X)`` or ``(Z, Y, X)``; each Z plane is an independent field of view.
    photons : float or None
        Expected photon count at intensity 1 (Poisson shot noise); ``None`` = noise-free.
    dtype : numpy dtype
        ``uint16`` (counts) or ``float32`` (intensities in about [0, 1]).
    """
    rng = np.random.default_rng(seed)
    planes_shape = (1,) + tuple(shape) if len(shape) == 2 else tuple(shape)
    nz, h, w = planes_shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty(planes_shape, dtype=np.float32)
    for z in range(nz):
        img = np.full((h, w), background, dtype=np.float32)
        for _ in range(n_blobs):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            sy, sx = rng.uniform(1.0, 4.0), rng.uniform(1.0, 4.0)
            img += rng.uniform(0.2, 0.8) * np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
        for _ in range(n_filaments):
            # a smooth random curve drawn as a chain of small Gaussian spots
            y, x = rng.uniform(0, h), rng.uniform(0, w)
            ang = rng.uniform(0, 2 * np.pi)
            amp = rng.uniform(0.2, 0.6)
            for _ in range(int(rng.integers(40, 120))):
                ang += rng.normal(0, 0.15)
                y, x = y + np.sin(ang), x + np.cos(ang)
                if not (0 <= y < h and 0 <= x < w):
                    break
                y0, y1 = max(0, int(y) - 3), min(h, int(y) + 4)
                x0, x1 = max(0, int(x) - 3), min(w, int(x) + 4)
                sub_y, sub_x = yy[y0:y1, x0:x1], xx[y0:y1, x0:x1]
                img[y0:y1, x0:x1] = np.maximum(
                    img[y0:y1, x0:x1], background + amp * np.exp(-0.5 * ((sub_y - y) ** 2 + (sub_x - x) ** 2) / 0.7**2)
                )
        out[z] = img
    out = np.clip(out, 0, None)
    if photons is not None:
        out = rng.poisson(out * photons).astype(np.float32) / photons
    if len(shape) == 2:
        out = out[0]
    if np.dtype(dtype) == np.uint16:
        return np.clip(np.round(out * 1000.0), 0, 65535).astype(np.uint16)
    return out.astype(dtype)
