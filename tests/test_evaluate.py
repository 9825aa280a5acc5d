"""Metrics, the evaluation protocol (GUIDE §2) and the ``evaluate`` / ``demo`` commands."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from napari_vdsr.cli import main
from napari_vdsr.core import degrade, weights
from napari_vdsr.core.errors import InputError, ModelError
from napari_vdsr.core.evaluate import evaluate_dataset, find_dataset, psnr, ssim
from napari_vdsr.core.model import VDSR

torch.set_num_threads(1)

# published bicubic rows (Kim et al. 2016, Table 3): PSNR dB and SSIM
PAPER_BICUBIC = {
    ("Set5", 2): (33.66, 0.9299), ("Set5", 3): (30.39, 0.8682), ("Set5", 4): (28.42, 0.8104),
    ("Set14", 2): (30.24, 0.8688), ("Set14", 3): (27.55, 0.7742), ("Set14", 4): (26.00, 0.7027),
}


# --------------------------------------------------------------------------- metrics


def test_psnr_matches_scikit_image():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 50)).astype(np.uint8)
    b = np.clip(a + rng.normal(0, 9, a.shape), 0, 255).astype(np.uint8)
    assert psnr(b, a) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-9)
    assert psnr(b, a, shave=3) == pytest.approx(peak_signal_noise_ratio(a[3:-3, 3:-3], b[3:-3, 3:-3], data_range=255), abs=1e-9)
    f = a / 255.0
    assert psnr(f * 0.9, f, peak=1.0) == pytest.approx(peak_signal_noise_ratio(f, f * 0.9, data_range=1.0), abs=1e-9)
    assert math.isinf(psnr(a, a))
    with pytest.raises(ValueError, match="shape"):
        psnr(a, a[1:])


def test_ssim_matches_scikit_image_gaussian_settings():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (48, 48)).astype(np.float64)
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255)
    ref = structural_similarity(a, b, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ssim(b, a) == pytest.approx(ref, abs=1e-9)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(b, a, shave=4) != pytest.approx(ref, abs=1e-6)


# --------------------------------------------------------------------------- published bicubic rows


@pytest.mark.data
@pytest.mark.parametrize("lr_mode", ["given", "generated"])
@pytest.mark.parametrize("name,scale", sorted(PAPER_BICUBIC))
def test_bicubic_reproduces_paper(shared_data, name, scale, lr_mode):
    res = evaluate_dataset(shared_data / "benchmarks" / name, task="sr", scale=scale, model="bicubic",
                           device="cpu", generate_lr=lr_mode == "generated")
    assert res["lr"] == lr_mode
    assert res["num_images"] == len(res["per_image"]) == (5 if name == "Set5" else 14)
    paper_psnr, paper_ssim = PAPER_BICUBIC[(name, scale)]
    assert res["psnr"] == pytest.approx(paper_psnr, abs=0.03), f"{name} x{scale} ({lr_mode} LR): {res['psnr']:.3f} dB"
    assert res["ssim"] == pytest.approx(paper_ssim, abs=0.002), f"{name} x{scale} ({lr_mode} LR): SSIM {res['ssim']:.4f}"


@pytest.mark.data
def test_evaluate_cli_writes_json(shared_data, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["evaluate", "--task", "sr", "--scale", "4", "--dataset", str(shared_data / "benchmarks" / "Set5"),
               "--method", "bicubic", "--json", str(out), "--quiet", "--device", "cpu"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert {"psnr", "ssim", "per_image"} <= set(data)
    assert [r["name"] for r in data["per_image"]] == [f"00{i}.png" for i in range(1, 6)]
    assert data["psnr"] == pytest.approx(np.mean([r["psnr"] for r in data["per_image"]]))
    assert data["psnr"] == pytest.approx(28.42, abs=0.03)
    assert f"{data['psnr']:.3f}" in capsys.readouterr().out


# --------------------------------------------------------------------------- protocol on made-up data


def _texture(h: int, w: int, seed: int, rgb: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 70 * np.sin(xx / (3.0 + seed)) * np.cos(yy / 4.0) + rng.normal(0, 10, (h, w))
    if not rgb:
        return np.clip(base, 0, 255).astype(np.uint8)
    return np.clip(np.stack([base, base[::-1] * 0.8 + 20, base[:, ::-1]], -1), 0, 255).astype(np.uint8)


@pytest.fixture
def sr_dataset(tmp_path):
    """A benchmark-like root with x2/HR (two RGB images, one grey; one HR not mod-cropped) and x2/LR."""
    root = tmp_path / "Mini"
    hr_dir, lr_dir = root / "x2" / "HR", root / "x2" / "LR"
    hr_dir.mkdir(parents=True)
    lr_dir.mkdir(parents=True)
    imgs = {"a.png": _texture(48, 64, 0), "b.png": _texture(40, 52, 1, rgb=False), "c.png": _texture(37, 45, 2)}
    for name, img in imgs.items():
        Image.fromarray(img).save(hr_dir / name)
        h, w = img.shape[:2]
        crop = img[: h - h % 2, : w - w % 2]
        chw = np.moveaxis(crop, -1, 0) if crop.ndim == 3 else crop
        lr = np.clip(np.round(degrade.downscale(chw.astype(np.float32), 2)), 0, 255).astype(np.uint8)
        Image.fromarray(np.moveaxis(lr, 0, -1) if crop.ndim == 3 else lr).save(lr_dir / name)
    return root


def test_dataset_layouts(sr_dataset, tmp_path):
    assert find_dataset(sr_dataset, 2) == (sr_dataset / "x2" / "HR", sr_dataset / "x2" / "LR")
    assert find_dataset(sr_dataset / "x2") == (sr_dataset / "x2" / "HR", sr_dataset / "x2" / "LR")
    assert find_dataset(sr_dataset / "x2" / "HR") == (sr_dataset / "x2" / "HR", None)
    with pytest.raises(InputError, match="x3.*x2"):
        find_dataset(sr_dataset, 3)
    with pytest.raises(InputError, match="no such folder"):
        find_dataset(tmp_path / "nope")
    with pytest.raises(InputError, match="is a file.*give its folder"):
        find_dataset(sr_dataset / "x2" / "HR" / "a.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        find_dataset(tmp_path / "empty")
    # a limit counts images from the first: 0 or a negative number (which dropped the last ones) is refused
    assert len(evaluate_dataset(sr_dataset, scale=2, model="bicubic", device="cpu", limit=1)["per_image"]) == 1
    for bad in (0, -1):
        with pytest.raises(InputError, match="at least 1"):
            evaluate_dataset(sr_dataset, scale=2, model="bicubic", device="cpu", limit=bad)


def test_given_lr_equals_generated_lr_when_made_the_same_way(sr_dataset):
    given = evaluate_dataset(sr_dataset, scale=2, model="bicubic", device="cpu")
    gen = evaluate_dataset(sr_dataset, scale=2, model="bicubic", device="cpu", generate_lr=True)
    plain = evaluate_dataset(sr_dataset / "x2" / "HR", scale=2, model="bicubic", device="cpu")
    assert given["lr"] == "given" and gen["lr"] == "generated" and plain["lr"] == "generated"
    assert [r["name"] for r in given["per_image"]] == ["a.png", "b.png", "c.png"]
    for a, b, c in zip(given["per_image"], gen["per_image"], plain["per_image"]):
        assert a["psnr"] == pytest.approx(b["psnr"], abs=1e-9) == pytest.approx(c["psnr"], abs=1e-9)
        assert 15 < a["psnr"] < 60 and 0 < a["ssim"] < 1
    assert given["psnr"] == pytest.approx(np.mean([r["psnr"] for r in given["per_image"]]))


def test_a_model_with_zero_residual_scores_like_bicubic(sr_dataset):
    net = VDSR(depth=3, width=8).eval()
    with torch.no_grad():
        net.body[-1].weight.zero_()
        net.body[-1].bias.zero_()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bic = evaluate_dataset(sr_dataset, scale=2, model="bicubic", device="cpu")
    res = evaluate_dataset(sr_dataset, scale=2, model=net, device="cpu")
    assert res["method"] == "model"
    assert res["psnr"] == pytest.approx(bic["psnr"], abs=1e-6)
    with torch.no_grad():
        net.body[-1].bias.fill_(8 / 255)  # a constant brightness error of 8 grey levels
    worse = evaluate_dataset(sr_dataset, scale=2, model=net, device="cpu")
    assert worse["psnr"] < bic["psnr"] - 1.0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items() if k != "body.4.bias")


def test_lr_size_mismatch_and_missing_lr_are_clear_errors(sr_dataset):
    lr_dir = sr_dataset / "x2" / "LR"
    (lr_dir / "c.png").unlink()
    with pytest.raises(InputError, match="generate-lr"):
        evaluate_dataset(sr_dataset, scale=2, model="bicubic", device="cpu")
    Image.fromarray(_texture(10, 10, 3)).save(lr_dir / "c.png")
    with pytest.raises(InputError, match="LR size"):
        evaluate_dataset(sr_dataset, scale=2, model="bicubic", device="cpu")


def _grey_folder(tmp_path, n=3):
    d = tmp_path / "grey"
    d.mkdir()
    for i in range(n):
        Image.fromarray(np.full((40, 44), 128, np.uint8) if i == 0 else _texture(40, 44, i, rgb=False)).save(d / f"{i}.png")
    return d


def test_denoise_protocol(tmp_path):
    d = _grey_folder(tmp_path)
    a = evaluate_dataset(d, task="denoise", sigma=10, model="identity", device="cpu")
    b = evaluate_dataset(d, task="denoise", sigma=10, model="identity", device="cpu")
    assert a["per_image"] == b["per_image"]  # fixed seeds
    assert a["sigma"] == 10 and a["scale"] is None
    # a flat mid-grey image: PSNR of the (rounded) noisy image ≈ 20 log10(255 / σ)
    assert a["per_image"][0]["psnr"] == pytest.approx(20 * np.log10(255 / 10), abs=0.15)
    worse = evaluate_dataset(d, task="denoise", sigma=30, model="identity", device="cpu")
    assert worse["psnr"] < a["psnr"] - 8
    with pytest.raises(InputError, match="sigma"):
        evaluate_dataset(d, task="denoise", model="identity", device="cpu")


def test_deblock_protocol_on_y_of_rgb(tmp_path):
    from napari_vdsr.core.color import rgb_to_y

    d = tmp_path / "rgb"
    d.mkdir()
    img = _texture(48, 56, 4)
    Image.fromarray(img).save(d / "x.png")
    res = evaluate_dataset(d, task="deblock", quality=10, model="identity", device="cpu")
    y8 = np.round(rgb_to_y(img)).astype(np.uint8)
    expected = psnr(degrade.jpeg_compress(y8, 10), y8)
    assert res["per_image"][0]["psnr"] == pytest.approx(expected, abs=1e-9)
    better = evaluate_dataset(d, task="deblock", quality=60, model="identity", device="cpu")
    assert better["psnr"] > res["psnr"]
    with pytest.raises(InputError, match="quality"):
        evaluate_dataset(d, task="deblock", model="identity", device="cpu")


def test_bad_arguments_are_clear_errors(sr_dataset, tmp_path):
    with pytest.raises(InputError, match="task"):
        evaluate_dataset(sr_dataset, task="colourise", model="bicubic")
    with pytest.raises(InputError, match="scale"):
        evaluate_dataset(sr_dataset, scale=0.5, model="bicubic")
    path = weights.save_model(VDSR(depth=3, width=8), tmp_path / "dn.safetensors", {"tasks": ["denoise"]})
    with pytest.raises(ModelError, match="super-resolution"):
        evaluate_dataset(sr_dataset, scale=2, model=str(path), device="cpu")


def test_evaluate_cli_errors_without_traceback(tmp_path, capsys):
    rc = main(["evaluate", "--dataset", str(tmp_path / "missing"), "--method", "bicubic", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "Traceback" not in err


# --------------------------------------------------------------------------- demo


def test_demo_with_a_tiny_model(tmp_path, capsys):
    net = VDSR(depth=3, width=8)
    model = weights.save_model(net, tmp_path / "tiny.safetensors", {"tasks": ["sr"], "scales": [2]})
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--image", "camera", "--model", str(model), "--device", "cpu"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "bicubic" in text and "VDSR" in text and "dB" in text
    sr = np.asarray(Image.open(out / "camera_x2_vdsr.png"))
    assert sr.shape == (512, 512) and sr.dtype == np.uint8
    assert np.asarray(Image.open(out / "camera_x2_lr.png")).shape == (256, 256)
    side = np.asarray(Image.open(out / "camera_x2_comparison.png"))
    assert side.shape[1] >= 3 * 512 and side.shape[0] >= 512


def test_demo_without_bundled_model_fails_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(weights, "BUNDLED_DIR", tmp_path / "no-weights")
    monkeypatch.setattr(weights, "_user_models", {})
    rc = main(["demo", "--out", str(tmp_path / "demo")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no bundled model" in err and "Traceback" not in err
    assert not (tmp_path / "demo").exists()


def test_hidden_files_are_skipped_and_grey_with_alpha_scores_as_grey(sr_dataset, tmp_path):
    hr = sr_dataset / "x2" / "HR"
    before = evaluate_dataset(hr, scale=2, model="bicubic", device="cpu")
    (hr / "._a.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # what macOS leaves on shared disks
    after = evaluate_dataset(hr, scale=2, model="bicubic", device="cpu")
    assert after["psnr"] == before["psnr"] and len(after["per_image"]) == 3
    grey = np.asarray(Image.open(hr / "b.png"))
    solo = tmp_path / "solo"
    solo.mkdir()
    Image.fromarray(grey).save(solo / "b.png")
    la = tmp_path / "la"
    la.mkdir()
    Image.fromarray(np.stack([grey, np.full_like(grey, 255)], -1), mode="LA").save(la / "b.png")
    as_l = evaluate_dataset(solo, scale=2, model="bicubic", device="cpu")["psnr"]
    assert evaluate_dataset(la, scale=2, model="bicubic", device="cpu")["psnr"] == pytest.approx(as_l, abs=1e-9)


def test_cli_goes_on_past_an_image_it_cannot_score_and_says_so(sr_dataset, tmp_path, capsys):
    """A stack in the folder is reported (and listed in the JSON) instead of losing the images scored."""
    import tifffile

    hr = sr_dataset / "x2" / "HR"
    ref = evaluate_dataset(hr, scale=2, model="bicubic")  # the three images alone
    tifffile.imwrite(hr / "zstack.tif", np.zeros((5, 32, 32), np.uint16), photometric="minisblack")  # not 2-D
    out = tmp_path / "ev.json"
    rc = main(["evaluate", "--dataset", str(hr), "--task", "sr", "--scale", "2", "--model", "bicubic",
               "--json", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 1  # a script sees that not every image was scored
    assert "zstack.tif" in captured.err and "split stacks" in captured.err
    res = json.loads(out.read_text())
    assert [r["name"] for r in res["per_image"]] == ["a.png", "b.png", "c.png"]
    assert [s["name"] for s in res["skipped"]] == ["zstack.tif"] and "over 3 of 4 images" in captured.out
    assert res["psnr"] == pytest.approx(ref["psnr"])
    with pytest.raises(InputError, match="zstack"):  # the API raises unless asked to skip
        evaluate_dataset(hr, scale=2, model="bicubic")
    assert [s["name"] for s in evaluate_dataset(hr, scale=2, model="bicubic", skip_bad=True)["skipped"]] == ["zstack.tif"]


def test_images_too_small_for_ssim_are_skipped_with_a_reason(sr_dataset, tmp_path, capsys):
    hr = sr_dataset / "x2" / "HR"
    Image.fromarray(_texture(14, 14, 5)).save(hr / "d.png")  # 14 - 2 * 2 = 10 px left: SSIM's window is 11
    res = evaluate_dataset(hr, scale=2, model="bicubic", skip_bad=True)
    assert [s["name"] for s in res["skipped"]] == ["d.png"] and "too small" in res["skipped"][0]["error"]
    assert len(res["per_image"]) == 3
    d = tmp_path / "tiny"
    d.mkdir()
    Image.fromarray(np.full((10, 10), 100, np.uint8)).save(d / "t.png")
    with pytest.raises(InputError, match="too small"):
        evaluate_dataset(d, task="denoise", sigma=25, model="identity")
    rc = main(["evaluate", "--dataset", str(hr), "--scale", "2", "--method", "bicubic", "--quiet"])
    assert rc == 1 and "d.png" in capsys.readouterr().err


def test_a_fractional_jpeg_quality_is_refused_not_truncated(tmp_path):
    d = _grey_folder(tmp_path, n=1)
    with pytest.raises(InputError, match="whole JPEG quality"):
        evaluate_dataset(d, task="deblock", quality=10.7, model="identity")
    assert evaluate_dataset(d, task="deblock", quality=10.0, model="identity")["quality"] == 10


def test_evaluate_takes_what_load_model_returns(sr_dataset, tmp_path):
    path = weights.save_model(VDSR(depth=3, width=8), tmp_path / "sr.safetensors", {"tasks": ["sr"], "name": "mine"})
    loaded = weights.load_model(path, device="auto")  # "auto", as restore() and evaluate take it
    by_path = evaluate_dataset(sr_dataset, scale=2, model=str(path), device="cpu")
    by_tuple = evaluate_dataset(sr_dataset, scale=2, model=loaded, device="cpu")
    assert by_tuple["psnr"] == pytest.approx(by_path["psnr"], abs=1e-9) and by_tuple["model"] == "mine"
    dn = weights.load_model(weights.save_model(VDSR(depth=3, width=8), tmp_path / "dn", {"tasks": ["denoise"]}))
    with pytest.raises(ModelError, match="super-resolution"):
        evaluate_dataset(sr_dataset, scale=2, model=dn, device="cpu")


def test_evaluate_json_is_strict_when_a_psnr_is_infinite(tmp_path):
    d = _grey_folder(tmp_path, n=2)
    out = tmp_path / "ev.json"
    assert main(["evaluate", "--dataset", str(d), "--task", "denoise", "--sigma", "0", "--method", "bicubic",
                 "--json", str(out), "--quiet"]) == 0
    res = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert res["per_image"][0]["psnr"] is None  # identical images: infinite PSNR, written as null


def test_evaluate_checks_the_json_path_before_the_work(sr_dataset, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    for bad, what in ((tmp_path, "is a folder"), (tmp_path / "afile" / "x.json", "is a file")):
        rc = main(["evaluate", "--dataset", str(sr_dataset / "x2" / "HR"), "--scale", "2", "--method", "bicubic",
                   "--json", str(bad), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and what in err and "Traceback" not in err and "PSNR" not in err
