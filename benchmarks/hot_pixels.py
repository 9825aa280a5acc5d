"""What a few hot pixels do to a 16-bit image restored with the bundled SR model, with the
intensity range of ``core.normalize.intensity_range`` (isolated outliers left out) and with the
plain min..max it replaced (session 20).

    python benchmarks/hot_pixels.py [--scale 2] [--hot 5]

Each scikit-image photo (grey, 256 px) is mapped to 16 bits as a camera's signal (200..3000),
shrunk with the engine's bicubic (MATLAB's imresize convention) and saved as uint16; then ``--hot``
random pixels of the low-resolution image are set to 65535. PSNR (peak: the signal's range
2800) is taken on the restored image against the 16-bit original, leaving out a 12 px square
around each hot pixel (their own neighbourhood cannot be right either way) and a border of 8 px.
The "bicubic" column is the engine's bicubic enlargement of the clean low-resolution image.
Runs on the CPU in about a minute.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from skimage import data

import napari_vdsr.core.restore as core_restore
from napari_vdsr.core.degrade import downscale, upscale
from napari_vdsr.core.normalize import Intensity

SIGNAL = (200.0, 3000.0)
IMAGES = {"camera": lambda: data.camera()[128:384, 128:384], "coins": lambda: data.coins()[:256, :256],
          "moon": lambda: data.moon()[:256, :256], "camera-top": lambda: data.camera()[:256, :256]}


def psnr(out: np.ndarray, gt: np.ndarray, keep: np.ndarray) -> float:
    d = (out.astype(np.float64) - gt)[8:-8, 8:-8][keep[8:-8, 8:-8]]
    return float(10 * np.log10((SIGNAL[1] - SIGNAL[0]) ** 2 / np.mean(d ** 2)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--hot", type=int, default=5, help="hot pixels per low-resolution image")
    a = ap.parse_args()
    torch.set_num_threads(1)
    robust = core_restore._intensity

    def plain(job):  # the map before session 20: the whole image's min and max
        img = np.asarray(job.img)
        return Intensity(float(img.min()), float(img.max()))

    def sr(img: np.ndarray, how) -> np.ndarray:
        core_restore._intensity = how
        try:
            return core_restore.restore(img, task="sr", scale=a.scale, device="cpu")
        finally:
            core_restore._intensity = robust

    rng = np.random.default_rng(0)
    s = a.scale
    print(f"x{s}, {a.hot} hot pixels at 65535; PSNR (dB) on the signal's range, hot neighbourhoods left out")
    print(f"{'image':11s} {'bicubic':>8s} | {'clean: min..max':>15s} {'robust':>7s} | {'hot: min..max':>13s} {'robust':>7s}")
    for name, load in IMAGES.items():
        u8 = load()
        gt = SIGNAL[0] + u8.astype(np.float64) / 255.0 * (SIGNAL[1] - SIGNAL[0])
        gt = gt[: gt.shape[0] - gt.shape[0] % s, : gt.shape[1] - gt.shape[1] % s]
        lr = np.round(downscale((gt / 65535.0).astype(np.float32), s) * 65535.0).astype(np.uint16)
        hot = lr.copy()
        ys = rng.integers(10, lr.shape[0] - 10, a.hot)
        xs = rng.integers(10, lr.shape[1] - 10, a.hot)
        hot[ys, xs] = 65535
        keep = np.ones(gt.shape, bool)
        for y, x in zip(ys, xs):
            keep[max(0, s * y - 12):s * y + 12, max(0, s * x - 12):s * x + 12] = False
        bic = upscale(lr.astype(np.float32), s)
        row = [psnr(bic, gt, keep), psnr(sr(lr, plain), gt, keep), psnr(sr(lr, robust), gt, keep),
               psnr(sr(hot, plain), gt, keep), psnr(sr(hot, robust), gt, keep)]
        print(f"{name:11s} {row[0]:8.2f} | {row[1]:15.2f} {row[2]:7.2f} | {row[3]:13.2f} {row[4]:7.2f}", flush=True)


if __name__ == "__main__":
    main()
