"""Image-quality metrics and the evaluation protocol of the VDSR paper."""

from __future__ import annotations

import numpy as np

__all__ = ["psnr", "ssim"]


def _shave(a: np.ndarray, shave: int) -> np.ndarray:
    return a[shave:-shave, shave:-shave] if shave > 0 else a


def psnr(pred: np.ndarray, target: np.ndarray, shave: int = 0, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of 2-D images, ``shave`` border pixels excluded."""
    a = _shave(np.asarray(pred, dtype=np.float64), shave)
    b = _shave(np.asarray(target, dtype=np.float64), shave)
    if a.shape != b.shape:
        raise ValueError(f"PSNR needs images of one shape, got {a.shape} and {b.shape}.")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)


def ssim(pred: np.ndarray, target: np.ndarray, shave: int = 0, peak: float = 255.0) -> float:
    """SSIM (Wang et al. 2004: Gaussian window σ = 1.5, population covariance)."""
    from skimage.metrics import structural_similarity

    a = _shave(np.asarray(pred, dtype=np.float64), shave)
    b = _shave(np.asarray(target, dtype=np.float64), shave)
    return float(structural_similarity(a, b, data_range=peak, gaussian_weights=True, sigma=1.5, use_sample_covariance=False))
