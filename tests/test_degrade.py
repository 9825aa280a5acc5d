"""Degradations (bicubic resize, noise, JPEG) and colour conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_vdsr.core import color, degrade
from napari_vdsr.core.io import read_image

torch.set_num_threads(1)


def _shrink_u8(hr: np.ndarray, scale: float) -> np.ndarray:
    """Our bicubic shrink of an 8-bit grey or RGB image, quantised as a saved LR image."""
    chw = np.moveaxis(hr, -1, 0) if hr.ndim == 3 else hr
    lr = np.clip(np.round(degrade.downscale(chw.astype(np.float32), scale)), 0, 255).astype(np.uint8)
    return np.moveaxis(lr, 0, -1) if hr.ndim == 3 else lr


# --------------------------------------------------------------------------- against MATLAB


@pytest.mark.data
@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("name", ["Set5", "Set14"])
def test_bicubic_shrink_matches_matlab_lr(shared_data, name, scale):
    folder = shared_data / "benchmarks" / name / f"x{scale}"
    hr_files = sorted((folder / "HR").glob("*.png"))
    assert hr_files, f"no HR images in {folder}"
    close = total = 0
    for f in hr_files:
        hr = read_image(f)
        matlab = read_image(folder / "LR" / f.name)
        ours = _shrink_u8(hr, scale)
        assert ours.shape == matlab.shape, f.name
        diff = np.abs(ours.astype(np.int16) - matlab.astype(np.int16))
        close += int((diff <= 1).sum())
        total += diff.size
    fraction = close / total
    assert fraction >= 0.99, f"{name} x{scale}: only {100 * fraction:.2f} % of pixels within ±1 of MATLAB"


# --------------------------------------------------------------------------- resize


def test_per_axis_and_non_integer_scales():
    img = np.random.default_rng(0).random((3, 30, 40)).astype(np.float32)
    assert degrade.downscale(img, (2, 4)).shape == (3, 15, 10)
    assert degrade.downscale(img, 2.5).shape == (3, 12, 16)
    assert degrade.upscale(img, 1.5).shape == (3, 45, 60)
    assert degrade.upscale(img, (1, 3)).shape == (3, 30, 120)
    assert degrade.upscale(img, size=(31, 17)).shape == (3, 31, 17)
    assert degrade.scaled_shape((10, 15), (2, 3), down=True) == (5, 5)


@pytest.mark.parametrize("scale", [1.5, 2, (2, 3), 3.7])
def test_resize_keeps_constant_images_constant(scale):
    img = np.full((37, 41), 0.3, dtype=np.float32)
    small = degrade.downscale(img, scale)
    big = degrade.upscale(small, size=img.shape)
    np.testing.assert_allclose(small, 0.3, atol=1e-5)
    np.testing.assert_allclose(big, 0.3, atol=1e-5)


def test_shrink_is_antialiased():
    # a checkerboard at the Nyquist limit must average out, not alias into a pattern
    img = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)
    small = degrade.downscale(img, 4)
    assert small.std() < 0.05 * img.std()
    assert abs(small.mean() - 0.5) < 0.02


def test_resize_does_not_modify_input():
    img = np.random.default_rng(1).random((20, 24)).astype(np.float32)
    before = img.copy()
    degrade.downscale(img, 2)
    degrade.upscale(img, 3)
    degrade.degrade_plane(img, "sr", 2)
    np.testing.assert_array_equal(img, before)


@pytest.mark.parametrize("bad", [0.5, 0, -2, 17, float("nan"), float("inf"), (2, 0.9), (1, 2, 3), "x"])
def test_bad_scales_are_rejected(bad):
    with pytest.raises(ValueError, match="scale"):
        degrade.as_scale_pair(bad)


# --------------------------------------------------------------------------- noise and JPEG


def test_gaussian_noise_is_deterministic_by_seed():
    img = np.full((128, 128), 100.0, dtype=np.float32)
    a = degrade.add_gaussian_noise(img, 25, seed=3)
    b = degrade.add_gaussian_noise(img, 25, seed=3)
    c = degrade.add_gaussian_noise(img, 25, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert abs(float((a - img).std()) - 25.0) < 1.0
    assert abs(float((a - img).mean())) < 1.0
    np.testing.assert_array_equal(img, 100.0)  # input untouched
    with pytest.raises(ValueError):
        degrade.add_gaussian_noise(img, -1)


def test_jpeg_is_deterministic_and_quality_orders_error():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96]
    img = np.clip(128 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0) + rng.normal(0, 8, (96, 96)), 0, 255).astype(np.uint8)
    before = img.copy()
    a = degrade.jpeg_compress(img, 10)
    b = degrade.jpeg_compress(img, 10)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8 and a.shape == img.shape
    errs = [np.abs(degrade.jpeg_compress(img, q).astype(float) - img).mean() for q in (10, 40, 90)]
    assert errs[0] > errs[1] > errs[2]
    rgb = np.stack([img, img[::-1], img[:, ::-1]], -1)
    assert degrade.jpeg_compress(rgb, 30).shape == rgb.shape
    np.testing.assert_array_equal(img, before)
    with pytest.raises(ValueError, match="quality"):
        degrade.jpeg_compress(img, 0)


# --------------------------------------------------------------------------- colour


def test_colour_round_trip_and_matlab_convention():
    rgb = np.random.default_rng(2).integers(0, 256, (17, 19, 3)).astype(np.uint8)
    ycc = color.rgb_to_ycbcr(rgb)
    back = color.ycbcr_to_rgb(ycc)
    np.testing.assert_allclose(back, rgb, atol=1e-2)
    np.testing.assert_allclose(color.rgb_to_y(rgb), ycc[..., 0], atol=1e-3)
    # MATLAB rgb2ycbcr: black → Y 16, white → Y 235, chroma 128 for grey
    ends = color.rgb_to_ycbcr(np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8))
    np.testing.assert_allclose(ends[0, :, 0], [16, 235], atol=1e-3)
    np.testing.assert_allclose(ends[0, :, 1:], 128, atol=1e-3)
    # BT.601 luma weights
    np.testing.assert_allclose(color.rgb_to_y(np.array([[255, 0, 0]], dtype=np.uint8)), 16 + 65.481, atol=1e-3)


# --------------------------------------------------------------------------- training pairs on the scale's grid


def test_sr_crop_is_a_whole_number_of_low_resolution_pixels() -> None:
    from napari_vdsr.core.data import SR_GRID_TRIES, sr_crop

    for need in (20, 41, 57, 58, 73):
        for s in (2, 3, 4, 5):
            size, n = sr_crop(need, s)
            assert size == n * s and need <= size < need + s, (need, s)
        for s in (1.5, 2.5, 3.3, 1.25):
            size, n = sr_crop(need, s)
            assert size >= need and n <= int(np.ceil(need / s)) + SR_GRID_TRIES
            # the best of the sizes tried: no closer multiple among them
            err = abs(n * s - round(n * s))
            assert all(err <= abs(k * s - round(k * s)) + 1e-12 for k in range(int(np.ceil(need / s)), n))
    assert sr_crop(57, 2.5) == (60, 24)  # 24 x 2.5 = 60 exactly; 23 x 2.5 = 57.5 would not be


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_sr_training_pairs_are_shrunk_by_exactly_the_scale(scale: int) -> None:
    """A training input is the target's neighbourhood shrunk by exactly ``scale`` (8-bit) and enlarged
    back, as the benchmarks' images are; not by the ratio of rounded sizes (57 px to 28 px is x2.04)."""
    from napari_vdsr.core.data import PatchSampler, Plane, _dihedral, sr_crop

    patch, margin = 41, 2 * scale  # the sampler's margin on every side (2 x the largest scale)
    size, n = sr_crop(patch + 2 * margin, scale)
    assert size % scale == 0
    rng = np.random.default_rng(scale)
    plane = rng.random((size, size), dtype=np.float32)  # exactly one crop: the patch position is fixed
    sampler = PatchSampler([Plane("noise", plane)], "sr", patch_size=patch, levels=[scale])
    assert sampler.margin == margin
    for _ in range(4):
        inp, tgt = sampler.one(rng)
        found = False
        for k in range(8):
            crop = _dihedral(plane, k)
            if not np.array_equal(crop[margin : margin + patch, margin : margin + patch], tgt):
                continue
            lr = np.round(np.clip(degrade.downscale(crop, scale), 0, 1) * 255) / 255
            assert lr.shape == (size // scale, size // scale)
            up = degrade.resize(lr, crop.shape)[margin : margin + patch, margin : margin + patch]
            np.testing.assert_allclose(inp, up, rtol=0, atol=1e-6)
            found = True
        assert found
