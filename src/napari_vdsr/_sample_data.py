"""Sample images for the napari ``File > Open Sample > VDSR restoration`` menu.

Every sample comes from images bundled inside scikit-image (no download).
The degraded variants are made with :mod:`napari_vdsr.core.degrade`, the same
degradations the models are trained on, so they show what each widget does:

* *low resolution*: bicubic shrink x2 (MATLAB ``imresize`` style), stored as
  uint8.  The layer gets ``scale=2`` and ``translate=0.5`` so that it overlays
  the full-resolution sample in world coordinates (pixel ``j`` of the small
  image covers full-resolution pixels ``2j`` and ``2j+1``); super-resolving it
  x2 puts the result exactly on top of the original.
* *noisy*: white Gaussian noise sigma = 25 (0..255 scale), clipped to uint8.
* *JPEG*: libjpeg at quality 10.

Each function returns a list of napari ``LayerData`` tuples and has no napari
or Qt import.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .core.degrade import add_gaussian_noise, downscale, jpeg_compress

__all__ = [
    "cell",
    "cell_lowres",
    "cell_noisy",
    "astronaut",
    "astronaut_lowres",
    "camera_jpeg",
]

LayerData = tuple[np.ndarray, dict[str, Any], str]

LOWRES_FACTOR = 2
NOISE_SIGMA = 25.0
JPEG_QUALITY = 10


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _shrink(image: np.ndarray, rgb: bool) -> np.ndarray:
    """Bicubic x``LOWRES_FACTOR`` shrink of a uint8 grey (H, W) or RGB (H, W, 3) image."""
    f = LOWRES_FACTOR
    h, w = image.shape[0] // f * f, image.shape[1] // f * f  # mod-crop, as in the paper
    image = image[:h, :w]
    if rgb:
        small = downscale(np.moveaxis(image, -1, 0), f)  # (3, h/f, w/f)
        return _to_uint8(np.moveaxis(small, 0, -1))
    return _to_uint8(downscale(image, f))


def _lowres_kwargs(name: str, source: str) -> dict[str, Any]:
    f = float(LOWRES_FACTOR)
    return {
        "name": name,
        "scale": (f, f),
        # centre of small pixel j = centre of big pixels 2j and 2j+1 = 2j + 0.5
        "translate": ((f - 1) / 2, (f - 1) / 2),
        "metadata": {"source": source, "degradation": f"bicubic shrink x{LOWRES_FACTOR}"},
    }


def _cell_image() -> np.ndarray:
    from skimage import data

    return data.cell()


def _astronaut_image() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def cell() -> list[LayerData]:
    """A cell in saline, quantitative-phase (digital holographic) microscopy, 660 x 550 uint8 (``skimage.data.cell``)."""
    return [(_cell_image(), {"name": "cell", "metadata": {"source": "skimage.data.cell"}}, "image")]


def cell_lowres() -> list[LayerData]:
    """The cell image shrunk x2 with bicubic interpolation (330 x 275, uint8), for super-resolution."""
    return [(_shrink(_cell_image(), rgb=False), _lowres_kwargs("cell (low-res x2)", "skimage.data.cell"), "image")]


def cell_noisy() -> list[LayerData]:
    """The cell image with Gaussian noise sigma = 25 (uint8), for denoising."""
    noisy = _to_uint8(add_gaussian_noise(_cell_image(), NOISE_SIGMA, seed=0))
    meta = {"source": "skimage.data.cell", "degradation": f"gaussian noise sigma={NOISE_SIGMA:g}"}
    return [(noisy, {"name": f"cell (noisy, sigma {NOISE_SIGMA:g})", "metadata": meta}, "image")]


def astronaut() -> list[LayerData]:
    """Astronaut Eileen Collins, a natural RGB photograph (512 x 512 x 3, uint8)."""
    return [(_astronaut_image(), {"name": "astronaut", "rgb": True, "metadata": {"source": "skimage.data.astronaut"}}, "image")]


def astronaut_lowres() -> list[LayerData]:
    """The astronaut photograph shrunk x2 with bicubic interpolation (256 x 256 x 3), for super-resolution."""
    kwargs = _lowres_kwargs("astronaut (low-res x2)", "skimage.data.astronaut")
    kwargs["rgb"] = True
    return [(_shrink(_astronaut_image(), rgb=True), kwargs, "image")]


def camera_jpeg() -> list[LayerData]:
    """The cameraman photograph saved as JPEG at quality 10 (512 x 512, uint8), for artifact removal."""
    from skimage import data

    img = jpeg_compress(data.camera(), JPEG_QUALITY)
    meta = {"source": "skimage.data.camera", "degradation": f"JPEG quality {JPEG_QUALITY}"}
    return [(img, {"name": f"camera (JPEG q{JPEG_QUALITY})", "metadata": meta}, "image")]
