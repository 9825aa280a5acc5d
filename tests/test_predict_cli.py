"""`napari-vdsr predict` and `napari-vdsr models` driven through cli.main()."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from napari_vdsr.cli import main
from napari_vdsr.core import weights
from napari_vdsr.core.model import VDSR
from napari_vdsr.core.restore import restore

torch.set_num_threads(1)


@pytest.fixture
def tiny_model(tmp_path):
    torch.manual_seed(0)
    net = VDSR(depth=3, width=8)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, 0.0, (2.0 / (m.in_channels * 9)) ** 0.5)
    card = {"tasks": ["sr"], "scales": [2, 3, 4], "metrics": {"validation": {"psnr": 30.5}}}
    return weights.save_model(net, tmp_path / "models" / "tiny-sr.safetensors", card)


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "in"
    d.mkdir()
    stack = rng.integers(0, 4000, (3, 20, 24)).astype(np.uint16)
    tifffile.imwrite(d / "stack.tif", stack, metadata={"axes": "ZYX"}, resolution=(2.0, 2.0), photometric="minisblack")
    rgb = rng.integers(0, 256, (20, 24, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(d / "photo.png")
    np.save(d / "plane.npy", rng.random((20, 24)).astype(np.float32))
    return d, stack, rgb


def predict(*args):
    return main(["predict", *map(str, args), "--device", "cpu", "--quiet"])


def test_predict_several_formats(tmp_path, tiny_model, inputs):
    d, stack, rgb = inputs
    out = tmp_path / "out"
    rc = predict(d / "stack.tif", d / "photo.png", d / "plane.npy", "-o", out, "--model", tiny_model, "--tile", 16)
    assert rc == 0
    s = tifffile.imread(out / "stack_x2.tif")
    assert s.shape == (3, 40, 48) and s.dtype == np.uint16
    net, card = weights.load_model(tiny_model)
    np.testing.assert_array_equal(s, restore(stack, model=(net, card), device="cpu", tile=16))
    with tifffile.TiffFile(out / "stack_x2.tif") as tf:
        xres = tf.pages[0].get_resolution()[0]
    assert xres == pytest.approx(4.0)  # pixel size halves: the physical size is kept
    p = np.asarray(Image.open(out / "photo_x2.png"))
    assert p.shape == (40, 48, 3) and p.dtype == np.uint8
    n = np.load(out / "plane_x2.npy")
    assert n.shape == (40, 48) and n.dtype == np.float32
    np.testing.assert_array_equal(tifffile.imread(d / "stack.tif"), stack)  # inputs untouched


def test_predict_scale_pair_axes_and_single_output_file(tmp_path, tiny_model, inputs):
    d, stack, _ = inputs
    target = tmp_path / "res.tif"
    assert predict(d / "stack.tif", "-o", target, "--model", tiny_model, "--scale", 2, 3, "--axes", "CYX") == 0
    assert tifffile.imread(target).shape == (3, 40, 72)
    assert predict(d / "stack.tif", "-o", tmp_path / "o2", "--model", tiny_model, "--scale", 1.5) == 0
    assert tifffile.imread(tmp_path / "o2" / "stack_x1.5.tif").shape == (3, 30, 36)


def test_refuses_to_overwrite(tmp_path, tiny_model, inputs, capsys):
    d, *_ = inputs
    out = tmp_path / "out"
    assert predict(d / "plane.npy", "-o", out, "--model", tiny_model) == 0
    first = np.load(out / "plane_x2.npy")
    (out / "plane_x2.npy").write_bytes(b"keep me")
    assert predict(d / "plane.npy", "-o", out, "--model", tiny_model) != 0
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "plane_x2.npy").read_bytes() == b"keep me"
    assert predict(d / "plane.npy", "-o", out, "--model", tiny_model, "--overwrite") == 0
    np.testing.assert_array_equal(np.load(out / "plane_x2.npy"), first)


def test_never_overwrites_an_input(tmp_path, tiny_model, capsys):
    d = tmp_path / "in"
    d.mkdir()
    img = np.random.default_rng(1).random((12, 12)).astype(np.float32)
    np.save(d / "a.npy", img)
    np.save(d / "a_x2.npy", img)
    rc = predict(d / "a.npy", d / "a_x2.npy", "-o", d, "--model", tiny_model, "--overwrite")
    assert rc != 0
    assert "replace an input" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(d / "a_x2.npy"), img)
    assert np.load(d / "a_x2_x2.npy").shape == (24, 24)  # the other file was still processed


def test_output_folder_read_by_a_folder_or_glob_input_is_refused(tmp_path, tiny_model, capsys):
    """Results written where a folder or pattern reads would be taken for inputs by the next run."""
    d = tmp_path / "in"
    d.mkdir()
    np.save(d / "a.npy", np.random.default_rng(2).random((12, 12)).astype(np.float32))
    (d / "out").mkdir()
    for args in ((d, "-o", d), (str(d / "*"), "-o", d / "out"), (str(d / "*.npy"), "-o", d)):
        assert predict(*args, "--model", tiny_model) == 2
        assert "is a folder that the input" in capsys.readouterr().err
    assert sorted(p.name for p in d.iterdir()) == ["a.npy", "out"] and not any((d / "out").iterdir())
    # a folder beside the inputs, or inside a folder input (which does not read its subfolders), is fine
    assert predict(d, "-o", d / "out", "--model", tiny_model) == 0
    assert predict(d, "-o", d / "out", "--model", tiny_model, "--skip-existing") == 0  # a rerun: nothing to do
    assert sorted(p.name for p in (d / "out").iterdir()) == ["a_x2.npy"]


def test_png_and_bmp_outputs_of_data_they_cannot_hold_are_refused_before_restoring(tmp_path, tiny_model, capsys):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(4)
    tifffile.imwrite(d / "float.tif", rng.random((12, 12)).astype(np.float32))
    tifffile.imwrite(d / "rgb16.tif", rng.integers(0, 65535, (12, 12, 3)).astype(np.uint16), photometric="rgb")
    tifffile.imwrite(d / "grey16.tif", rng.integers(0, 65535, (12, 12)).astype(np.uint16))
    out = tmp_path / "out"
    assert predict(d, "-o", out, "--model", tiny_model, "--format", "png") == 1
    err = capsys.readouterr().err
    assert "float_x2.png: PNG holds 8-bit images and no float32 data" in err
    assert "rgb16_x2.png: PNG holds 8-bit images and 16-bit grey images, not 16-bit colour" in err
    assert sorted(p.name for p in out.iterdir()) == ["grey16_x2.png"]  # 16-bit grey PNG is fine
    assert np.asarray(Image.open(out / "grey16_x2.png")).dtype == np.uint16
    assert predict(d / "grey16.tif", "-o", out / "grey16.bmp", "--model", tiny_model) == 1
    assert "BMP holds only 8-bit images" in capsys.readouterr().err
    # an OME-Zarr name is an OME-Zarr image
    assert predict(d / "grey16.tif", "-o", tmp_path / "res.ome.zarr", "--model", tiny_model) == 0
    assert (tmp_path / "res.ome.zarr" / ".zattrs").exists() and (tmp_path / "res.ome.zarr" / "0").is_dir()


def test_bad_file_reported_and_others_continue(tmp_path, tiny_model, inputs, capsys):
    d, *_ = inputs
    (d / "broken.png").write_text("not an image")
    out = tmp_path / "out"
    rc = predict(d / "broken.png", d / "plane.npy", "-o", out, "--model", tiny_model)
    err = capsys.readouterr().err
    assert rc == 1
    assert "broken.png" in err and "1 of 2" in err
    assert (out / "plane_x2.npy").is_file()


def test_folder_input_and_denoise_name(tmp_path, inputs):
    d, *_ = inputs
    net = VDSR(depth=3, width=4)
    model = weights.save_model(net, tmp_path / "dn.safetensors", {"tasks": ["denoise"]})
    out = tmp_path / "out"
    assert predict(d, "-o", out, "--model", model, "--task", "denoise") == 0
    assert sorted(p.name for p in out.iterdir()) == ["photo_denoised.png", "plane_denoised.npy", "stack_denoised.tif"]
    assert tifffile.imread(out / "stack_denoised.tif").shape == (3, 20, 24)


def test_jpeg_deblock_written_as_png(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 16), dtype=np.uint8)).save(d / "x.jpg", quality=20)
    model = weights.save_model(VDSR(depth=3, width=4), tmp_path / "db.safetensors", {"tasks": ["deblock"]})
    assert predict(d / "x.jpg", "-o", tmp_path / "out", "--model", model, "--task", "deblock") == 0
    assert (tmp_path / "out" / "x_deblocked.png").is_file()


def test_deblock_to_a_named_jpeg_warns_that_jpeg_brings_blocks_back(tmp_path, capsys):
    src = tmp_path / "x.jpg"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 16), dtype=np.uint8)).save(src, quality=20)
    model = weights.save_model(VDSR(depth=3, width=4), tmp_path / "db.safetensors", {"tasks": ["deblock"]})
    assert predict(src, "-o", tmp_path / "clean.jpg", "--model", model, "--task", "deblock") == 0
    err = capsys.readouterr().err
    assert (tmp_path / "clean.jpg").is_file() and "brings back" in err and ".png" in err  # as asked, with a warning
    assert predict(src, "-o", tmp_path / "clean.png", "--model", model, "--task", "deblock") == 0
    assert "brings back" not in capsys.readouterr().err


def test_model_errors_exit_2(tmp_path, tiny_model, inputs, capsys):
    d, *_ = inputs
    assert predict(d / "plane.npy", "-o", tmp_path / "o", "--model", tiny_model, "--task", "denoise") == 2
    assert "not denoising" in capsys.readouterr().err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04junk")
    assert predict(d / "plane.npy", "-o", tmp_path / "o", "--model", junk) == 2
    assert "not a readable safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("extra,words", [(["--scale", "0.5"], ">= 1"), (["--scale", "2", "2", "2"], "one factor or two"),
                                         (["--tile", "4"], "at least 16"), (["--axes", "QYX"], "unknown letter")])
def test_bad_options(tmp_path, tiny_model, inputs, capsys, extra, words):
    d, *_ = inputs
    rc = predict(d / "stack.tif", "-o", tmp_path / "o", "--model", tiny_model, *extra)
    assert rc != 0
    assert words in capsys.readouterr().err


def test_help_texts(capsys):
    for cmd in ("predict", "models"):
        with pytest.raises(SystemExit) as info:
            main([cmd, "--help"])
        assert info.value.code == 0
    assert "--overwrite" in capsys.readouterr().out


def test_models_lists_cards(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.setattr(weights, "BUNDLED_DIR", tiny_model.parent)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tiny-sr" in out and "sr" in out and "2, 3, 4" in out and "30.5" in out
    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["name"] == "tiny-sr" and data[0]["card"]["scales"] == [2, 3, 4]
    assert main(["models", "--task", "denoise"]) == 0
    assert "no models" in capsys.readouterr().out


def test_models_listing_shows_validation_and_benchmarks(tmp_path, monkeypatch, capsys):
    """The plain listing reads like a table: PSNR per level and per benchmark set, not a flattened dict."""
    net = VDSR(depth=3, width=8)
    cells = [{"task": "denoise", "set": "BSD68", "level": lv, "psnr": p, "reference": [1.0]}
             for lv, p in ((15, 30.874), (50, 25.736))]
    card = {"tasks": ["denoise"], "metrics": {
        "validation": {"psnr": 30.5, "baseline_psnr": 19.8, "per_level": {"15": 33.144, "50": 27.7}, "step": 82000},
        "benchmarks": {"measured": "2026-11-27", "cells": cells + [{"set": "odd", "psnr": "n/a"}]}},
        "training": {"recipe": {"val_data": ["photos/HR"]}}}
    weights.save_model(net, tmp_path / "m" / "dn.safetensors", card)
    weights.save_model(net, tmp_path / "m" / "bare.safetensors", {"tasks": ["sr"], "metrics": {"validation": "?"}})
    monkeypatch.setattr(weights, "BUNDLED_DIR", tmp_path / "m")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert ("validation PSNR (on photos/HR) at step 82,000: sigma 15 33.14, sigma 50 27.70, mean 30.50, input 19.80"
            in out)
    assert "benchmark PSNR (dB, measured 2026-11-27): BSD68 sigma 15 30.87, sigma 50 25.74" in out
    assert "odd" not in out  # a cell without a number is left out, not printed as garbage
    bare = out[out.index("bare"):out.index("dn")] if out.index("bare") < out.index("dn") else out[out.index("bare"):]
    assert "no metrics recorded" in bare


@pytest.mark.parametrize("card", [
    {"metrics": ["not", "a", "dict"]},
    {"tasks": "sr", "training": "text", "metrics": {"validation": {"psnr": 30.0, "step": float("nan")}}},
    {"metrics": {"validation": {"per_level": {"2": True, "3": float("inf")}}, "benchmarks": {"cells": "none"}}},
    {"metrics": {"benchmarks": {"cells": [None, {"psnr": float("nan")}]}}},
])
def test_card_summary_never_fails_on_a_hand_edited_card(card):
    """`models` and the widgets' tooltip read cards users may have edited: odd values are left out, not raised."""
    lines = weights.card_summary(card)
    assert lines and all(isinstance(line, str) for line in lines)
    assert not any(w in " ".join(lines) for w in ("nan", "inf", "True", "1.00"))


def test_an_ome_tiff_saved_as_a_plain_tiff_keeps_its_physical_pixel_size(tmp_path, tiny_model):
    """OME's PhysicalSizeX/Y (divided by the scale) become ImageJ's calibration; the Z step is kept."""
    d = tmp_path / "in"
    d.mkdir()
    stack = np.random.default_rng(0).integers(0, 4000, (3, 20, 24)).astype(np.uint16)
    tifffile.imwrite(d / "s.ome.tif", stack, ome=True, photometric="minisblack",
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.1, "PhysicalSizeY": 0.1, "PhysicalSizeZ": 0.5})
    assert predict(d / "s.ome.tif", "-o", tmp_path / "o.tif", "--model", tiny_model, "--scale", 2, 3) == 0
    with tifffile.TiffFile(tmp_path / "o.tif") as tf:
        ij = tf.imagej_metadata
        xres, yres = tf.pages[0].get_resolution()
        assert tf.series[0].shape == (3, 40, 72)
    assert ij["unit"] in ("um", "micron") and ij["spacing"] == pytest.approx(0.5)
    assert 1 / xres == pytest.approx(0.1 / 3) and 1 / yres == pytest.approx(0.1 / 2)


def test_a_non_8_bit_colour_tiff_is_named_as_read_as_rgb(tmp_path, tiny_model, capsys):
    """tifffile saves any (H, W, 3) array as RGB: a 3-channel float stack is then restored as one colour
    image; predict says so and how to restore the channels instead."""
    rng = np.random.default_rng(0)
    # (tifffile's default for such arrays until now; stated, as later versions change the default)
    tifffile.imwrite(tmp_path / "yxc.tif", rng.random((20, 24, 3)).astype(np.float32), photometric="rgb")
    tifffile.imwrite(tmp_path / "rgb8.tif", rng.integers(0, 256, (20, 24, 3)).astype(np.uint8), photometric="rgb")
    assert predict(tmp_path / "yxc.tif", tmp_path / "rgb8.tif", "-o", tmp_path / "o", "--model", tiny_model) == 0
    err = capsys.readouterr().err
    assert "yxc.tif" in err and "--axes YXC" in err and "luminance" in err
    assert "rgb8.tif: its" not in err  # an 8-bit colour image is what it looks like
    assert predict(tmp_path / "yxc.tif", "-o", tmp_path / "o2", "--model", tiny_model, "--axes", "YXC") == 0
    assert "--axes YXC" not in capsys.readouterr().err


def test_skip_existing_reruns_a_batch_for_the_missing_outputs_only(tmp_path, tiny_model, inputs, capsys):
    d, *_ = inputs
    out = tmp_path / "out"
    assert predict(d / "plane.npy", "-o", out, "--model", tiny_model) == 0
    (out / "plane_x2.npy").write_bytes(b"done before")
    capsys.readouterr()
    rc = predict(d / "plane.npy", d / "stack.tif", "-o", out, "--model", tiny_model, "--skip-existing")
    err = capsys.readouterr().err
    assert rc == 0 and (out / "plane_x2.npy").read_bytes() == b"done before" and (out / "stack_x2.tif").exists()
    assert "1 skipped (their outputs exist)" in err
    assert main(["predict", str(d / "plane.npy"), "-o", str(out), "--skip-existing", "--overwrite"]) == 2


def test_a_file_name_for_several_inputs_is_refused(tmp_path, tiny_model, inputs, capsys):
    d, *_ = inputs
    target = tmp_path / "result.png"
    assert predict(d / "*.npy", d / "photo.png", "-o", target, "--model", tiny_model) != 0
    err = capsys.readouterr().err
    assert "names one output file" in err and "2 inputs" in err and "folder" in err
    assert not target.exists()  # no folder with an image's name was made
    target.mkdir()  # an existing folder of that name is a folder: results go into it
    assert predict(d / "plane.npy", d / "photo.png", "-o", target, "--model", tiny_model) == 0
    assert sorted(p.name for p in target.iterdir()) == ["photo_x2.png", "plane_x2.npy"]


def test_a_one_bit_file_is_refused_with_advice_for_files(tmp_path, tiny_model, capsys):
    mask = np.zeros((20, 24), bool)
    mask[5:12, 6:18] = True
    Image.fromarray(mask).convert("1").save(tmp_path / "mask.png")
    assert predict(tmp_path / "mask.png", "-o", tmp_path / "out", "--model", tiny_model) != 0
    err = capsys.readouterr().err
    assert "1-bit" in err and "8-bit grey" in err
    assert not (tmp_path / "out" / "mask_x2.png").exists()
