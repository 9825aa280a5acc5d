"""Every model shipped in the package loads and beats its baseline (bicubic, the noisy or the JPEG input)
by a clear margin on a small photo -- not the benchmark tables (benchmarks/tables.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_vdsr.core import weights
from napari_vdsr.core.color import rgb_to_y
from napari_vdsr.core.degrade import downscale, jpeg_compress, upscale
from napari_vdsr.core.evaluate import psnr
from napari_vdsr.core.restore import restore

BUNDLED = sorted(e.name for e in weights.list_models() if e.bundled)


def _photo() -> np.ndarray:
    import skimage.data

    return np.round(rgb_to_y(skimage.data.astronaut()[:192, 160:352].astype(np.float32))).astype(np.uint8)


def test_each_task_has_a_bundled_default() -> None:
    for task in ("sr", "denoise", "deblock"):
        assert weights.default_model_name(task) in BUNDLED


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_beats_its_baseline(name: str) -> None:
    torch.set_num_threads(1)
    model, card = weights.load_model(name)
    hr = _photo()
    ref = hr.astype(np.float64)
    for task in card["tasks"]:
        if task == "sr":
            for s in (2, 3, 4):
                crop = ref[: ref.shape[0] - ref.shape[0] % s, : ref.shape[1] - ref.shape[1] % s]
                lr = np.clip(np.round(downscale(crop / 255.0, s) * 255.0), 0, 255).astype(np.uint8)
                base = np.clip(np.round(upscale(lr.astype(np.float64) / 255.0, s) * 255.0), 0, 255)
                out = restore(lr, task="sr", scale=s, model=model, device="cpu").astype(np.float64)
                gain = psnr(out, crop, shave=s) - psnr(base, crop, shave=s)
                assert gain > 0.5, (name, s, gain)
        elif task == "denoise":
            noisy = np.clip(np.round(ref + np.random.default_rng(1).normal(0, 25, ref.shape)), 0, 255).astype(np.uint8)
            out = restore(noisy, task="denoise", model=model, device="cpu").astype(np.float64)
            assert psnr(out, ref) > psnr(noisy.astype(np.float64), ref) + 5.0
        else:
            jpg = jpeg_compress(hr, 10)
            out = restore(jpg, task="deblock", model=model, device="cpu").astype(np.float64)
            assert psnr(out, ref) > psnr(jpg.astype(np.float64), ref) + 0.5
