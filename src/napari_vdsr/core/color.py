"""Luminance / chroma split and merge (ITU-R BT.601, MATLAB ``rgb2ycbcr`` convention).

Y is in [16, 235] and Cb/Cr in [16, 240] for an RGB image in [0, 255].
A grey image is its own Y and is never converted.
"""

from __future__ import annotations

import numpy as np
from skimage.color import rgb2ycbcr as _rgb2ycbcr
from skimage.color import ycbcr2rgb as _ycbcr2rgb

__all__ = ["rgb_to_ycbcr", "ycbcr_to_rgb", "rgb_to_y"]


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """Convert (..., 3) RGB on the 0..255 scale to float32 YCbCr (MATLAB convention)."""
    arr = np.asarray(rgb, dtype=np.float64) / 255.0
    return _rgb2ycbcr(arr, channel_axis=-1).astype(np.float32)


def ycbcr_to_rgb(ycbcr: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_ycbcr`: returns float32 RGB on the 0..255 scale (not clipped)."""
    arr = np.asarray(ycbcr, dtype=np.float64)
    return (_ycbcr2rgb(arr, channel_axis=-1) * 255.0).astype(np.float32)


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """Luminance Y in [16, 235] (float32) of an RGB image on the 0..255 scale."""
    arr = np.asarray(rgb, dtype=np.float32)
    return (16.0 + (65.481 * arr[..., 0] + 128.553 * arr[..., 1] + 24.966 * arr[..., 2]) / 255.0).astype(np.float32)
