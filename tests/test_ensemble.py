"""The x8 geometric self-ensemble: restore(..., ensemble=True), predict/evaluate --ensemble."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import busy_net

from napari_vdsr.cli import main
from napari_vdsr.core import weights
from napari_vdsr.core.degrade import downscale, jpeg_compress
from napari_vdsr.core.evaluate import psnr
from napari_vdsr.core.restore import restore
from napari_vdsr.core.tiling import ENSEMBLE_SIZE, forward_crop, predict_plane

torch.set_num_threads(1)


def _t(a: np.ndarray, k: int) -> np.ndarray:
    a = np.rot90(a, k % 4)
    return a[:, ::-1] if k >= 4 else a


def _undo(a: np.ndarray, k: int) -> np.ndarray:
    if k >= 4:
        a = a[:, ::-1]
    return np.rot90(a, -(k % 4))


def test_ensemble_is_the_mean_over_the_eight_transforms() -> None:
    net = busy_net(depth=5, width=6, seed=1)
    x = np.random.default_rng(0).random((37, 52)).astype(np.float32)  # not square: rotations change the shape
    want = np.mean([_undo(forward_crop(net, np.ascontiguousarray(_t(x, k))), k) for k in range(ENSEMBLE_SIZE)], axis=0)
    got = forward_crop(net, x, ensemble=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    single = forward_crop(net, x)
    assert np.abs(got - single).max() > 1e-2  # the busy net is far from rotation-invariant


@pytest.mark.parametrize("tile", [16, 24, 40])
def test_tiled_ensemble_equals_the_whole_plane(tile: int) -> None:
    net = busy_net(depth=5, width=6, seed=2)
    x = np.random.default_rng(1).random((61, 83)).astype(np.float32)
    whole = predict_plane(net, x, tile=1024, ensemble=True)
    np.testing.assert_allclose(predict_plane(net, x, tile=tile, ensemble=True), whole, rtol=0, atol=1e-5)


def test_restore_ensemble_keeps_input_dtype_and_tiles() -> None:
    net = busy_net(depth=4, width=4, seed=3)
    img = np.random.default_rng(2).integers(0, 4000, (2, 30, 41)).astype(np.uint16)
    before = img.copy()
    out = restore(img, task="sr", scale=2, model=net, axes="ZYX", device="cpu", ensemble=True)
    tiled = restore(img, task="sr", scale=2, model=net, axes="ZYX", device="cpu", ensemble=True, tile=16)
    plain = restore(img, task="sr", scale=2, model=net, axes="ZYX", device="cpu")
    np.testing.assert_array_equal(img, before)
    assert out.dtype == np.uint16 and out.shape == (2, 60, 82)
    assert np.abs(out.astype(int) - tiled.astype(int)).max() <= 1
    assert np.abs(out.astype(int) - plain.astype(int)).max() > 10


def test_lazy_ensemble_equals_numpy() -> None:
    da = pytest.importorskip("dask.array")
    net = busy_net(depth=4, width=4, seed=4)
    img = np.random.default_rng(3).random((50, 44)).astype(np.float32)
    lazy = restore(da.from_array(img, chunks=(25, 22)), task="denoise", model=net, device="cpu", ensemble=True, tile=16)
    assert isinstance(lazy, da.Array)
    ref = restore(img, task="denoise", model=net, device="cpu", ensemble=True)
    np.testing.assert_allclose(lazy.compute(), ref, rtol=0, atol=1e-5)


def _camera_crop() -> np.ndarray:
    import skimage.data

    return skimage.data.camera()[96:224, 160:288]


def test_bundled_sr_model_ensemble_beats_one_pass() -> None:
    hr = _camera_crop().astype(np.float64)
    lr = np.clip(np.round(downscale(hr / 255.0, 2) * 255.0), 0, 255).astype(np.uint8)
    one = restore(lr, task="sr", scale=2, device="cpu")
    ens = restore(lr, task="sr", scale=2, device="cpu", ensemble=True)
    p1, p8 = psnr(one.astype(float), hr, shave=2), psnr(ens.astype(float), hr, shave=2)
    assert p8 > p1 + 0.03, (p1, p8)


def test_bundled_denoise_model_ensemble_beats_one_pass() -> None:
    clean = _camera_crop().astype(np.float64)
    noisy = np.clip(np.round(clean + np.random.default_rng(5).normal(0, 25, clean.shape)), 0, 255).astype(np.uint8)
    one = restore(noisy, task="denoise", device="cpu")
    ens = restore(noisy, task="denoise", device="cpu", ensemble=True)
    assert psnr(ens.astype(float), clean) > psnr(one.astype(float), clean) + 0.03


def test_predict_and_evaluate_ensemble_flags(tmp_path) -> None:
    net = busy_net(depth=3, width=8, seed=6)
    model = weights.save_model(net, tmp_path / "m" / "tiny.safetensors", {"tasks": ["deblock"]})
    img = jpeg_compress(_camera_crop()[:40, :56], 20)
    np.save(tmp_path / "a.npy", img)
    for flag, name in (([], "plain"), (["--ensemble"], "ens")):
        rc = main(["predict", str(tmp_path / "a.npy"), "-o", str(tmp_path / name), "--task", "deblock", "--model",
                   str(model), "--device", "cpu", "--quiet", *flag])
        assert rc == 0
    from napari_vdsr._cli_predict import output_name

    out = output_name(tmp_path / "a.npy", "deblock", (1.0, 1.0))
    plain, ens = np.load(tmp_path / "plain" / out), np.load(tmp_path / "ens" / out)
    np.testing.assert_array_equal(ens, restore(img, task="deblock", model=str(model), device="cpu", ensemble=True))
    assert not np.array_equal(plain, ens)

    hr = tmp_path / "set" / "HR"
    hr.mkdir(parents=True)
    from PIL import Image

    Image.fromarray(_camera_crop()[:48, :48]).save(hr / "cam.png")
    scores = {}
    for flag in ([], ["--ensemble"]):
        js = tmp_path / f"ev{len(flag)}.json"
        assert main(["evaluate", "--dataset", str(tmp_path / "set"), "--task", "deblock", "--quality", "20", "--model",
                     str(model), "--device", "cpu", "--quiet", "--json", str(js), *flag]) == 0
        rec = json.loads(js.read_text())
        assert rec["ensemble"] is bool(flag)
        scores[bool(flag)] = rec["psnr"]
    assert scores[True] != scores[False]
