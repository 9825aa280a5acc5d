"""Degradations: antialiased bicubic resizing, Gaussian / Poisson noise, JPEG.

Resizing uses ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``
(cubic kernel a = -0.5, widened when shrinking), which matches MATLAB's
``imresize(..., 'bicubic')`` within one grey level on >99 % of pixels.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "as_scale_pair",
    "scaled_shape",
    "resize",
    "resize_tensor",
    "downscale",
    "upscale",
    "add_gaussian_noise",
    "add_poisson_gaussian_noise",
    "jpeg_compress",
]

MAX_SCALE = 16.0


def as_scale_pair(scale: float | Sequence[float]) -> tuple[float, float]:
    """Validate a scale factor (a number or a (y, x) pair) and return (sy, sx).

    Raises
    ------
    ValueError
        If a factor is not a finite number in [1, 16].
    """
    if hasattr(scale, "shape") and tuple(scale.shape) == ():  # a 0-d numpy array or torch tensor: its value
        scale = np.asarray(scale).item()
    if isinstance(scale, (bool, np.bool_, str, bytes)):
        raise ValueError(f"scale must be a number or a (y, x) pair of numbers, got {scale!r}.")
    if isinstance(scale, (int, float, np.integer, np.floating)):
        pair = (float(scale), float(scale))
    else:
        try:
            vals = [float(s) for s in scale]
        except (TypeError, ValueError):
            raise ValueError(f"scale must be a number or a (y, x) pair of numbers, got {scale!r}.") from None
        if len(vals) != 2:
            raise ValueError(f"scale must be a number or a (y, x) pair, got {len(vals)} values: {scale!r}.")
        pair = (vals[0], vals[1])
    for s in pair:
        if not math.isfinite(s) or s < 1.0:
            raise ValueError(
                f"scale factor must be >= 1 (1 = same size; use 2, 3, 4 or e.g. 1.5), got {scale!r}."
            )
        if s > MAX_SCALE:
            raise ValueError(
                f"scale factor {s:g} is larger than the supported maximum {MAX_SCALE:g}; "
                "upsample in several steps or choose a smaller factor."
            )
    return pair


def scaled_shape(shape: Sequence[int], scale: float | Sequence[float], *, down: bool = False) -> tuple[int, int]:
    """Size of a 2-D plane of ``shape`` (H, W) after resizing by ``scale``.

    Sizes are rounded to the nearest integer (at least 1).
    """
    sy, sx = as_scale_pair(scale)
    h, w = int(shape[-2]), int(shape[-1])
    if down:
        return max(1, int(round(h / sy))), max(1, int(round(w / sx)))
    return max(1, int(round(h * sy))), max(1, int(round(w * sx)))


def resize_tensor(t: torch.Tensor, size: Sequence[int], antialias: bool = True) -> torch.Tensor:
    """Bicubic resize of a float tensor of shape (N, C, H, W) to ``size`` (H', W')."""
    size = (int(size[0]), int(size[1]))
    if tuple(t.shape[-2:]) == size:
        return t.clone()
    # bicubic needs at least 2 samples along an axis; replicate a single row/col
    if t.shape[-2] == 1 or t.shape[-1] == 1:
        t = F.pad(t, (0, 1 if t.shape[-1] == 1 else 0, 0, 1 if t.shape[-2] == 1 else 0), mode="replicate")
        if tuple(t.shape[-2:]) == size:
            return t
    return F.interpolate(t, size=size, mode="bicubic", align_corners=False, antialias=antialias)


def resize(image: np.ndarray, size: Sequence[int], antialias: bool = True) -> np.ndarray:
    """Bicubic resize of the last two axes of ``image`` to ``size`` = (H', W').

    The result is float32 and is not clipped (bicubic may overshoot).
    """
    arr = np.asarray(image, dtype=np.float32)
    lead = arr.shape[:-2]
    t = torch.from_numpy(np.ascontiguousarray(arr.reshape((-1, 1) + arr.shape[-2:])))
    out = resize_tensor(t, size, antialias=antialias)
    return out.numpy().reshape(lead + tuple(out.shape[-2:]))


def downscale(image: np.ndarray, scale: float | Sequence[float]) -> np.ndarray:
    """Shrink the last two axes by ``scale`` (MATLAB ``imresize(x, 1/s, 'bicubic')`` style)."""
    return resize(image, scaled_shape(np.shape(image), scale, down=True))


def upscale(image: np.ndarray, scale: float | Sequence[float] | None = None, size: Sequence[int] | None = None) -> np.ndarray:
    """Enlarge the last two axes by ``scale`` or to ``size`` with bicubic interpolation."""
    if size is None:
        if scale is None:
            raise ValueError("upscale needs either scale or size.")
        size = scaled_shape(np.shape(image), scale)
    return resize(image, size)


def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def add_gaussian_noise(
    image: np.ndarray, sigma: float, seed: int | np.random.Generator | None = 0, peak: float = 255.0
) -> np.ndarray:
    """Add white Gaussian noise of standard deviation ``sigma`` (on a 0..``peak`` scale).

    Returns float32 on the same scale as ``image`` (not clipped, as in the DnCNN protocol).
    """
    if sigma < 0:
        raise ValueError(f"noise sigma must be >= 0, got {sigma}.")
    arr = np.asarray(image, dtype=np.float32)
    return (arr + _rng(seed).standard_normal(arr.shape, dtype=np.float32) * np.float32(sigma)).astype(np.float32)


def add_poisson_gaussian_noise(
    image: np.ndarray, photons: float, sigma: float = 0.0, seed: int | np.random.Generator | None = 0
) -> np.ndarray:
    """Microscopy-like noise on an image in [0, 1]: Poisson shot noise + Gaussian read noise.

    ``photons`` is the expected photon count at intensity 1; ``sigma`` the read
    noise on the [0, 1] scale.  Returns float32 in the [0, 1] scale (not clipped).
    """
    if photons <= 0:
        raise ValueError(f"photons must be > 0, got {photons}.")
    rng = _rng(seed)
    arr = np.clip(np.asarray(image, dtype=np.float64), 0, None)
    out = rng.poisson(arr * photons) / photons
    if sigma > 0:
        out = out + rng.standard_normal(arr.shape) * sigma
    return out.astype(np.float32)


def jpeg_compress(image: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip a 2-D uint8 (grey) or (H, W, 3) uint8 image through libjpeg at ``quality``."""
    from PIL import Image

    q = int(quality)
    if not 1 <= q <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}.")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=q)
    buf.seek(0)
    return np.asarray(Image.open(buf)).copy()


def degrade_plane(
    hr: np.ndarray,
    task: str,
    level: float,
    seed: int | np.random.Generator | None = 0,
    quantize: bool = True,
    read_noise: float = 0.0,
    lr_size: int | Sequence[int] | None = None,
) -> np.ndarray:
    """Synthesise the network input for a clean 2-D plane ``hr`` on the [0, 1] scale.

    Parameters
    ----------
    hr : ndarray (H, W)
        Clean image, values nominally in [0, 1].
    task : {"sr", "denoise", "deblock", "denoise-pg"}
        ``sr``: bicubic shrink by ``level`` then bicubic enlarge back to (H, W);
        ``denoise``: add Gaussian noise of σ = ``level`` (0..255 scale);
        ``denoise-pg``: Poisson noise with ``level`` photons at intensity 1 plus
        Gaussian read noise of σ = ``read_noise`` (on the [0, 1] scale);
        ``deblock``: JPEG at quality ``level``.
    quantize : bool
        Round the low-resolution image to 8 bits (as a saved LR image would be).
    lr_size : int or (int, int), optional
        ``sr`` only: the low-resolution size to shrink to (default: the size / ``level``,
        rounded). Give it when the size is not a whole multiple of ``level``, so that the
        shrink factor is exactly the one wanted.

    Returns
    -------
    ndarray (H, W) float32, the same size as ``hr``.
    """
    hr = np.asarray(hr, dtype=np.float32)
    if task == "sr":
        if lr_size is None:
            lr = downscale(hr, level)
        else:
            lr = resize(hr, (lr_size, lr_size) if np.isscalar(lr_size) else tuple(lr_size))
        if quantize:
            lr = np.round(np.clip(lr, 0.0, 1.0) * 255.0) / 255.0
        return resize(lr, hr.shape[-2:])
    if task == "denoise":
        return add_gaussian_noise(hr, level / 255.0, seed=seed, peak=1.0)
    if task == "denoise-pg":
        return add_poisson_gaussian_noise(hr, photons=level, sigma=read_noise, seed=seed)
    if task == "deblock":
        u8 = np.clip(np.round(hr * 255.0), 0, 255).astype(np.uint8)
        return jpeg_compress(u8, int(round(level))).astype(np.float32) / 255.0
    raise ValueError(f"unknown degradation task {task!r}.")
