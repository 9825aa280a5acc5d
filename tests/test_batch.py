"""`napari-vdsr predict` over folders of mixed formats: OME-TIFF, zarr, streaming outputs, failures."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from napari_vdsr.cli import main
from napari_vdsr.core import weights
from napari_vdsr.core.io import expand_inputs, open_image, split_suffix
from napari_vdsr.core.model import VDSR
from napari_vdsr.core.restore import restore

torch.set_num_threads(1)
zarr = pytest.importorskip("zarr")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    net = VDSR(depth=3, width=8)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, 0.0, (2.0 / (m.in_channels * 9)) ** 0.5)
            torch.nn.init.normal_(m.bias, 0.02, 0.02)
    return weights.save_model(net, tmp_path_factory.mktemp("m") / "tiny-sr.safetensors",
                              {"tasks": ["sr", "denoise"], "scales": [2, 3, 4]})


@pytest.fixture(scope="module")
def model(model_file):
    return weights.load_model(model_file)


def ref(img, model, **kw):
    kw.setdefault("tile", 16)
    return restore(img, model=model, device="cpu", **kw)


def predict(*args):
    return main(["predict", *map(str, args), "--device", "cpu", "--quiet"])


RNG = np.random.default_rng(0)
STACK = RNG.integers(0, 4000, (2, 3, 20, 26)).astype(np.uint16)  # C, Z, Y, X
VOL = RNG.integers(0, 4000, (2, 24, 20)).astype(np.uint16)  # T, Y, X
OME_META = {"axes": "CZYX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.3, "PhysicalSizeZ": 1.5,
            "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm", "PhysicalSizeZUnit": "µm",
            "Channel": {"Name": ["DAPI", "GFP"]}}


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    tifffile.imwrite(d / "cells.ome.tif", STACK, ome=True, metadata=OME_META, photometric="minisblack")
    tifffile.imwrite(d / "tiled.tif", STACK[0], tile=(16, 16), compression="zlib", metadata={"axes": "ZYX"},
                     photometric="minisblack")
    Image.fromarray(RNG.integers(0, 256, (18, 22, 3)).astype(np.uint8)).save(d / "photo.png")
    Image.fromarray(RNG.integers(0, 256, (18, 22)).astype(np.uint8)).save(d / "grey.jpg", quality=90)
    np.save(d / "plane.npy", RNG.random((21, 19)).astype(np.float32))
    z = zarr.open_array(str(d / "vol.zarr"), mode="w", shape=(2, 24, 20), chunks=(1, 10, 10), dtype="uint16")
    z[:] = VOL
    z.attrs.update({"axes": "TYX"})
    (d / "notes.txt").write_text("not an image")
    (d / "sub").mkdir()  # subfolders are not searched
    return d


def test_a_pattern_takes_the_images_it_matches_as_a_folder_does(folder):
    from napari_vdsr.core.errors import InputError
    from napari_vdsr.core.io import expand_inputs

    by_folder = expand_inputs([folder])
    # the pattern also matches notes.txt and the empty subfolder: left out, as the folder leaves them out
    assert expand_inputs([str(folder / "*")]) == by_folder and folder / "notes.txt" not in by_folder
    with pytest.raises(InputError, match="no image file matches this pattern.*matches 1 other"):
        expand_inputs([str(folder / "*.txt")])


def test_tiffs_whose_values_are_not_grey_or_rgb_are_refused(tmp_path, model_file, capsys):
    """Palette, CMYK and white-is-zero TIFFs would be restored as grey / RGB values: a wrong image."""
    from napari_vdsr.core.errors import InputError
    from napari_vdsr.core.io import read_image

    d = tmp_path / "odd"
    d.mkdir()
    grey = RNG.integers(0, 256, (24, 24)).astype(np.uint8)
    tifffile.imwrite(d / "white_is_zero.tif", grey, photometric="miniswhite")
    Image.fromarray(grey).convert("P").save(d / "palette.tif")
    Image.fromarray(np.stack([grey] * 3, -1)).convert("CMYK").save(d / "cmyk.tif")
    tifffile.imwrite(d / "plain.tif", grey, photometric="minisblack")
    out = tmp_path / "out"
    rc = predict(d, "-o", out, "--model", model_file)
    err = capsys.readouterr().err
    assert rc == 1 and sorted(p.name for p in out.iterdir()) == ["plain_x2.tif"]
    assert "3 of 4 file(s) failed" in err and "palette.tif is a palette (indexed-colour) TIFF" in err
    for name, kind in (("white_is_zero", "white-is-zero"), ("palette", "palette"), ("cmyk", "CMYK")):
        with pytest.raises(InputError, match=f"is a {kind}.*Convert it to greyscale or RGB first"):
            read_image(d / f"{name}.tif")


def test_folder_with_mixed_formats(tmp_path, folder, model_file, model):
    out = tmp_path / "out"
    assert predict(folder, "-o", out, "--model", model_file, "--tile", 16) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "cells_x2.ome.tif", "grey_x2.jpg", "photo_x2.png", "plane_x2.npy", "tiled_x2.tif", "vol_x2.zarr"]
    with tifffile.TiffFile(out / "cells_x2.ome.tif") as tf:
        assert tf.is_ome and tf.series[0].axes == "CZYX"
        np.testing.assert_array_equal(tf.series[0].asarray(), ref(STACK, model, axes="CZYX"))
    np.testing.assert_array_equal(tifffile.imread(out / "tiled_x2.tif"), ref(STACK[0], model))
    assert np.asarray(Image.open(out / "photo_x2.png")).shape == (36, 44, 3)
    assert np.asarray(Image.open(out / "grey_x2.jpg")).shape == (36, 44)
    npy = np.load(out / "plane_x2.npy")
    np.testing.assert_array_equal(npy, ref(np.load(folder / "plane.npy"), model))
    z = zarr.open_array(str(out / "vol_x2.zarr"), mode="r")
    assert z.shape == (2, 48, 40) and z.attrs["axes"] == "TYX" and z.attrs["napari_vdsr"]["scale"] == [2, 2]
    np.testing.assert_array_equal(z[:], ref(VOL, model))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no partial files left


def test_ome_pixel_sizes_scaled(tmp_path, folder, model_file):
    out = tmp_path / "res.ome.tif"
    assert predict(folder / "cells.ome.tif", "-o", out, "--model", model_file, "--scale", 2, 4) == 0
    with tifffile.TiffFile(out) as tf:
        px = tifffile.xml2dict(tf.ome_metadata)["OME"]["Image"]["Pixels"]
        assert tf.series[0].shape == (2, 3, 40, 104)
    assert px["PhysicalSizeY"] == pytest.approx(0.3 / 2)
    assert px["PhysicalSizeX"] == pytest.approx(0.2 / 4)
    assert px["PhysicalSizeZ"] == pytest.approx(1.5)  # other axes keep their size
    assert px["PhysicalSizeXUnit"] == "µm"
    assert [c["Name"] for c in px["Channel"]] == ["DAPI", "GFP"]
    # the same sizes reach a zarr output, and read back through open_image
    zout = tmp_path / "res.zarr"
    assert predict(folder / "cells.ome.tif", "-o", zout, "--model", model_file) == 0
    with open_image(zout) as src:
        assert src.axes == "CZYX"
        assert src.meta["pixel_size"]["X"][0] == pytest.approx(0.1)
        assert src.meta["pixel_size"]["Z"][0] == pytest.approx(1.5)


def test_imagej_input_to_ome_output_converts_the_calibration(tmp_path, model_file):
    d = tmp_path / "in"
    d.mkdir()
    tifffile.imwrite(d / "ij.tif", STACK[0], imagej=True, resolution=(1 / 0.25, 1 / 0.25),
                     metadata={"axes": "ZYX", "spacing": 2.0, "unit": "micron"})
    assert predict(d / "ij.tif", "-o", tmp_path / "o", "--model", model_file, "--format", "ome.tif") == 0
    assert predict(d / "ij.tif", "-o", tmp_path / "o", "--model", model_file) == 0
    with tifffile.TiffFile(tmp_path / "o" / "ij_x2.ome.tif") as tf:
        px = tifffile.xml2dict(tf.ome_metadata)["OME"]["Image"]["Pixels"]
    assert px["PhysicalSizeX"] == pytest.approx(0.125) and px["PhysicalSizeZ"] == pytest.approx(2.0)
    with tifffile.TiffFile(tmp_path / "o" / "ij_x2.tif") as tf:  # ImageJ in, ImageJ out
        assert tf.is_imagej and tf.imagej_metadata["spacing"] == 2.0
        assert tf.pages[0].get_resolution()[0] == pytest.approx(8.0)


def test_overwrite_protection_for_streamed_outputs(tmp_path, folder, model_file, capsys):
    out = tmp_path / "out"
    args = [folder / "vol.zarr", folder / "cells.ome.tif", "-o", out, "--model", model_file]
    assert predict(*args) == 0
    before = zarr.open_array(str(out / "vol_x2.zarr"), mode="r")[:]
    (out / "cells_x2.ome.tif").write_bytes(b"keep me")
    marker = out / "vol_x2.zarr" / "mine.txt"
    marker.write_text("keep me")
    assert predict(*args) == 1
    err = capsys.readouterr().err
    assert err.count("--overwrite") == 2 and "2 of 2" in err
    assert (out / "cells_x2.ome.tif").read_bytes() == b"keep me" and marker.read_text() == "keep me"
    assert predict(*args, "--overwrite") == 0
    assert not marker.exists()
    np.testing.assert_array_equal(zarr.open_array(str(out / "vol_x2.zarr"), mode="r")[:], before)
    assert tifffile.imread(out / "cells_x2.ome.tif").shape == (2, 3, 40, 52)
    # a folder that is not a zarr store is never deleted, even with --overwrite
    (out / "vol_x2.zarr").rename(tmp_path / "moved.zarr")
    (out / "vol_x2.zarr").mkdir()
    (out / "vol_x2.zarr" / "precious.txt").write_text("data")
    assert predict(folder / "vol.zarr", "-o", out, "--model", model_file, "--overwrite") == 1
    assert "not a zarr store" in capsys.readouterr().err
    assert (out / "vol_x2.zarr" / "precious.txt").read_text() == "data"


def test_corrupt_files_among_good_ones(tmp_path, folder, model_file, capsys):
    (folder / "broken.tif").write_bytes(b"II*\x00" + bytes(range(200)))
    np.save(folder / "short.npy", np.zeros((30, 30), np.float32))
    data = (folder / "short.npy").read_bytes()
    (folder / "short.npy").write_bytes(data[: len(data) // 2])  # truncated
    (folder / "empty.zarr").mkdir()
    out = tmp_path / "out"
    rc = predict(folder, "-o", out, "--model", model_file, "--tile", 32)
    err = capsys.readouterr().err
    assert rc == 1
    assert "3 of 9 file(s) failed, 6 written" in err
    for name in ("broken.tif", "short.npy", "empty.zarr"):
        assert name in err
    assert "truncated" in err and "not a zarr store" in err
    assert len([p for p in out.iterdir() if not p.name.startswith(".")]) == 6
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_failure_while_writing_leaves_no_output(tmp_path, folder, model_file, monkeypatch, capsys):
    from napari_vdsr.core import restore as restore_mod

    calls = []
    real = restore_mod.forward_crop

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost (simulated)")
        return real(*args, **kw)

    monkeypatch.setattr(restore_mod, "forward_crop", failing)
    out = tmp_path / "out"
    rc = predict(folder / "cells.ome.tif", folder / "vol.zarr", "-o", out, "--model", model_file, "--tile", 16)
    assert rc == 1
    assert "device lost" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["vol_x2.zarr"]  # the failed file left nothing behind


def test_zarr_to_zarr_equals_in_memory(tmp_path, model_file, model):
    img = RNG.integers(0, 60000, (3, 37, 45)).astype(np.uint16)
    z = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=img.shape, chunks=(1, 16, 16), dtype=img.dtype)
    z[:] = img
    out = tmp_path / "b.zarr"
    assert predict(tmp_path / "a.zarr", "-o", out, "--model", model_file, "--tile", 24, "--scale", 1.5) == 0
    res = zarr.open_array(str(out), mode="r")
    assert res.shape == (3, 56, 68) and res.chunks == (1, 19, 23)  # 56 = 3 x 19 - 1: one block per chunk
    np.testing.assert_array_equal(res[:], ref(img, model, scale=1.5, tile=24))
    np.testing.assert_array_equal(z[:], img)


def test_format_conversions_and_rgb_tiff_bands(tmp_path, folder, model_file, model):
    rgb = RNG.integers(0, 256, (40, 37, 3)).astype(np.uint8)
    tifffile.imwrite(folder / "rgb.tif", rgb, photometric="rgb")
    out = tmp_path / "out"
    assert predict(folder / "rgb.tif", folder / "plane.npy", "-o", out, "--model", model_file,
                   "--format", "zarr", "--tile", 16) == 0
    np.testing.assert_array_equal(zarr.open_array(str(out / "rgb_x2.zarr"), mode="r")[:], ref(rgb, model))
    assert predict(folder / "rgb.tif", "-o", out, "--model", model_file, "--tile", 16) == 0
    np.testing.assert_array_equal(tifffile.imread(out / "rgb_x2.tif"), ref(rgb, model))  # written in row bands
    # channel-last numpy: the TIFF gets its planes first (axes recorded), the zarr keeps the layout
    np.save(folder / "yxc.npy", STACK[:, 0].transpose(1, 2, 0).copy())
    assert predict(folder / "yxc.npy", "-o", out, "--model", model_file, "--axes", "YXC", "--format", "tif") == 0
    with tifffile.TiffFile(out / "yxc_x2.tif") as tf:
        assert tf.series[0].axes == "CYX"
        np.testing.assert_array_equal(tf.series[0].asarray(),
                                      ref(STACK[:, 0].transpose(1, 2, 0).copy(), model, axes="YXC").transpose(2, 0, 1))


def test_denoise_keeps_pixel_sizes(tmp_path, folder, model_file):
    assert predict(folder / "cells.ome.tif", "-o", tmp_path / "o", "--model", model_file, "--task", "denoise") == 0
    with tifffile.TiffFile(tmp_path / "o" / "cells_denoised.ome.tif") as tf:
        px = tifffile.xml2dict(tf.ome_metadata)["OME"]["Image"]["Pixels"]
    assert px["PhysicalSizeX"] == pytest.approx(0.2) and px["PhysicalSizeY"] == pytest.approx(0.3)


def test_summary_and_progress_output(tmp_path, folder, model_file, capsys):
    rc = main(["predict", str(folder / "plane.npy"), str(folder / "photo.png"), "-o", str(tmp_path / "o"),
               "--model", str(model_file), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "2 file(s) written" in err and "Mpx/s" in err
    assert "plane.npy ->" in err and "photo.png ->" in err


def test_names_and_expansion(tmp_path, folder):
    assert split_suffix("a.b.OME.TIF") == ("a.b", ".OME.TIF")
    assert split_suffix("x.ome.zarr") == ("x", ".ome.zarr")
    assert split_suffix("plain.tiff") == ("plain", ".tiff")
    files = expand_inputs([folder])
    assert [f.name for f in files] == ["cells.ome.tif", "grey.jpg", "photo.png", "plane.npy", "tiled.tif", "vol.zarr"]
    assert [f.name for f in expand_inputs([folder / "vol.zarr"])] == ["vol.zarr"]
    assert [f.name for f in expand_inputs([str(folder / "*.t*f")])] == ["cells.ome.tif", "tiled.tif"]


def test_lazy_sources(folder, tmp_path):
    with open_image(folder / "cells.ome.tif") as src:
        assert src.lazy and src.axes == "CZYX" and src.meta["ome"]
        assert src.meta["pixel_size"]["Y"] == (0.3, "µm")
        np.testing.assert_array_equal(src.array[1, 2, 5:9, 3:7], STACK[1, 2, 5:9, 3:7])
    with open_image(folder / "tiled.tif") as src:  # compressed, tiled: tifffile's zarr store
        assert src.lazy and src.axes == "ZYX"
        np.testing.assert_array_equal(np.asarray(src.array[2, 4:17, 1:5]), STACK[0, 2, 4:17, 1:5])
    with open_image(folder / "plane.npy") as src:
        assert src.lazy
        np.testing.assert_array_equal(src.array[3:5], np.load(folder / "plane.npy")[3:5])
    with open_image(folder / "photo.png") as src:
        assert not src.lazy and src.array.shape == (18, 22, 3)


def test_outputs_of_one_run_never_collide(tmp_path, model_file, model, capsys):
    a, b = tmp_path / "d1", tmp_path / "d2"
    a.mkdir(), b.mkdir()
    imgs = [RNG.integers(0, 256, (16, 18)).astype(np.uint8) for _ in range(2)]
    tifffile.imwrite(a / "b.tif", imgs[0])
    tifffile.imwrite(b / "b.tif", imgs[1])
    out = tmp_path / "out"
    # the same name from two folders: the first is written, the second fails up front, even with --overwrite
    rc = predict(a / "b.tif", b / "b.tif", "-o", out, "--model", model_file, "--overwrite")
    err = capsys.readouterr().err
    assert rc == 1 and "would be the same file as that of" in err and "1 of 2 file(s) failed, 1 written" in err
    np.testing.assert_array_equal(tifffile.imread(out / "b_x2.tif"), ref(imgs[0], model, scale=2))
    # a file named twice (directly and by a pattern) runs once; a pattern that matches nothing does not stop the rest
    rc = predict(a / "b.tif", str(a / "*.tif"), str(tmp_path / "nowhere" / "*.tif"), "-o", tmp_path / "o2",
                 "--model", model_file)
    err = capsys.readouterr().err
    assert rc == 1 and "no image file matches this pattern" in err and "1 of 2 file(s) failed, 1 written" in err
    assert [p.name for p in (tmp_path / "o2").iterdir()] == ["b_x2.tif"]
    assert predict(str(tmp_path / "nowhere" / "*.tif"), "-o", tmp_path / "o3", "--model", model_file) == 2


def test_other_series_of_a_tiff_are_named_in_a_warning(tmp_path, model_file, capsys):
    p = tmp_path / "two.ome.tif"
    with tifffile.TiffWriter(p, ome=True) as tw:
        tw.write(STACK[0, :2], metadata={"axes": "ZYX", "Name": "pos1"}, photometric="minisblack")
        tw.write(STACK[1, :2, :10, :12], metadata={"axes": "ZYX", "Name": "pos2"}, photometric="minisblack")
    rc = predict(p, "-o", tmp_path / "o", "--model", model_file)
    err = capsys.readouterr().err
    assert rc == 0
    assert "holds 2 image series; only the first, (2, 20, 26), is restored" in err and "(2, 10, 12)" in err


def test_png_and_jpeg_quirks(tmp_path, model_file):
    import struct
    import zlib

    from napari_vdsr.core.errors import InputError
    from napari_vdsr.core.io import read_image

    # a 16-bit colour PNG (Pillow reads it as 8 bits): refused, not cut silently
    arr = (np.arange(4 * 5 * 3).reshape(4, 5, 3) * 1000).astype(np.uint16)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)
    (tmp_path / "rgb16.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 4, 16, 2, 0, 0, 0))
                                         + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    with pytest.raises(InputError, match="16-bit colour"):
        read_image(tmp_path / "rgb16.png")
    # a photo stored turned with an EXIF orientation is read as viewers show it
    img = Image.fromarray(RNG.integers(0, 256, (24, 40)).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    assert read_image(tmp_path / "phone.jpg").shape == (40, 24)
    # grey + alpha: RGBA for restoring (the alpha is kept), grey for scoring
    Image.fromarray(RNG.integers(0, 256, (12, 14, 2)).astype(np.uint8), mode="LA").save(tmp_path / "la.png")
    assert read_image(tmp_path / "la.png").shape == (12, 14, 4)
    assert read_image(tmp_path / "la.png", keep_alpha=False).shape == (12, 14)


def test_imagej_hyperstack_keeps_composite_mode_labels_and_info(tmp_path, model_file):
    d = tmp_path / "in"
    d.mkdir()
    hyper = STACK.transpose(1, 0, 2, 3)  # Z, C, Y, X
    labels = [f"z{z}c{c}" for z in range(3) for c in range(2)]
    tifffile.imwrite(d / "h.tif", hyper, imagej=True,
                     metadata={"axes": "ZCYX", "mode": "composite", "Labels": labels, "Info": "stage 3, 40x",
                               "spacing": 1.5, "unit": "micron"})
    assert predict(d / "h.tif", "-o", tmp_path / "o", "--model", model_file) == 0
    with tifffile.TiffFile(tmp_path / "o" / "h_x2.tif") as tf:
        md = tf.imagej_metadata
        assert tf.series[0].shape == (3, 2, 40, 52)
    assert md["mode"] == "composite" and md["Labels"] == labels and md["Info"] == "stage 3, 40x"
    assert md["spacing"] == 1.5 and md["unit"] == "micron"


def test_png_output_keeps_the_colour_profile_and_the_printed_size(tmp_path, model_file):
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(RNG.integers(0, 256, (14, 16, 3)).astype(np.uint8)).save(d / "p.png", icc_profile=icc, dpi=(300, 300))
    assert predict(d / "p.png", "-o", tmp_path / "o", "--model", model_file, "--scale", "2") == 0
    with Image.open(tmp_path / "o" / "p_x2.png") as im:
        assert im.size == (32, 28) and im.info.get("icc_profile") == icc
        assert [round(v) for v in im.info["dpi"]] == [600, 600]


def test_palette_transparency_is_kept_and_a_cmyk_profile_is_not(tmp_path, model_file):
    from PIL import ImageCms

    d = tmp_path / "in"
    d.mkdir()
    pal = Image.new("P", (16, 14))
    pal.putpalette([0, 0, 0, 200, 30, 30, 30, 200, 30] + [0] * 759)
    idx = np.zeros((14, 16), np.uint8)
    idx[3:9, 4:12], idx[10:, :] = 1, 2
    pal.putdata(idx.ravel().tolist())
    pal.save(d / "pal.png", transparency=0)  # index 0 is transparent
    assert predict(d / "pal.png", "-o", tmp_path / "o", "--model", model_file, "--scale", "2") == 0
    out = np.asarray(Image.open(tmp_path / "o" / "pal_x2.png"))
    assert out.shape == (28, 32, 4)  # RGBA: the transparent background stays transparent
    assert out[0, 0, 3] == 0 and out[12, 16, 3] == 255 and out[26, 2, 3] == 255

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()  # stands in for a CMYK profile
    Image.fromarray(RNG.integers(0, 256, (14, 16, 3)).astype(np.uint8)).convert("CMYK").save(
        d / "c.jpg", icc_profile=icc, quality=95)
    assert predict(d / "c.jpg", "-o", tmp_path / "o", "--model", model_file, "--scale", "2") == 0
    with Image.open(tmp_path / "o" / "c_x2.jpg") as im:
        assert im.mode == "RGB" and not im.info.get("icc_profile")  # RGB data with a CMYK profile would be misread


def _ngff(path):
    """The NGFF attributes and array "0" of an OME-Zarr image, checked with ome-zarr-models when it is installed."""
    g = zarr.open_group(str(path), mode="r")
    try:
        from ome_zarr_models.v04.image import Image as NgffImage
    except ImportError:
        pass
    else:
        NgffImage.from_zarr(g)  # raises on anything NGFF 0.4 does not allow
    return dict(g.attrs)["multiscales"][0], np.asarray(g["0"])


def test_ome_zarr_output_is_ngff_in_tczyx_order_with_scaled_pixel_sizes(tmp_path, model_file):
    d = tmp_path / "in"
    d.mkdir()
    hyper = RNG.integers(0, 4000, (3, 2, 16, 20)).astype(np.uint16)  # ImageJ order Z, C, Y, X
    tifffile.imwrite(d / "h.tif", hyper, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "ZCYX", "spacing": 1.5, "unit": "micron"})
    rgb = RNG.integers(0, 256, (14, 16, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(d / "p.png")
    out = tmp_path / "o"
    assert predict(d / "h.tif", d / "p.png", "-o", out, "--model", model_file, "--format", "ome.zarr") == 0
    assert predict(d / "h.tif", d / "p.png", "-o", tmp_path / "ref", "--model", model_file, "--format", "npy",
                   "--axes", "ZCYX") == 1  # the PNG is not ZCYX: only h is written
    ref = np.load(tmp_path / "ref" / "h_x2.npy")

    ms, data = _ngff(out / "h_x2.ome.zarr")
    assert [(a["name"], a["type"]) for a in ms["axes"]] == [("c", "channel"), ("z", "space"), ("y", "space"),
                                                            ("x", "space")]
    assert [a.get("unit") for a in ms["axes"]] == [None, "micrometer", "micrometer", "micrometer"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 1.5, 0.25, 0.25]
    # pixel centres: output pixel 0 lies a quarter of an input pixel (0.5 um) before input pixel 0's centre
    assert ms["datasets"][0]["coordinateTransformations"][1] == {"type": "translation",
                                                                 "translation": [0.0, 0.0, -0.125, -0.125]}
    np.testing.assert_array_equal(data, np.transpose(ref, (1, 0, 2, 3)))  # channels before Z, the same pixels
    with open_image(out / "h_x2.ome.zarr") as src:  # and it reads back as it was written
        assert src.axes == "CZYX" and src.meta["pixel_size"]["X"] == (0.25, "micrometer")

    ms, data = _ngff(out / "p_x2.ome.zarr")  # RGB: the colours are the channel axis
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"] and data.shape == (3, 28, 32)
    # a PNG has no pixel size: scale 1 as its input's, and no shift (nothing to overlay it with)
    assert ms["datasets"][0]["coordinateTransformations"] == [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]
    assert predict(d / "p.png", "-o", tmp_path / "png", "--model", model_file) == 0
    np.testing.assert_array_equal(np.moveaxis(data, 0, -1), np.asarray(Image.open(tmp_path / "png" / "p_x2.png")))

    # an OME-Zarr input gives an OME-Zarr result by default
    assert predict(out / "h_x2.ome.zarr", "-o", tmp_path / "again", "--model", model_file, "--task", "denoise") == 0
    ms, data = _ngff(tmp_path / "again" / "h_x2_denoised.ome.zarr")
    assert data.shape == (2, 3, 32, 40) and ms["datasets"][0]["coordinateTransformations"][0]["scale"][2:] == [0.25,
                                                                                                               0.25]
    assert ms["datasets"][0]["coordinateTransformations"][1]["translation"] == [0.0, 0.0, -0.125, -0.125]  # kept


def test_ome_zarr_input_translation_is_carried_to_the_result(tmp_path, model_file):
    from napari_vdsr.core.ome import create_ngff, ngff_attributes

    img = RNG.integers(0, 4000, (2, 14, 16)).astype(np.uint16)
    attrs = ngff_attributes("ZYX", {"Z": (2.0, "µm"), "Y": (0.5, "µm"), "X": (0.4, "µm")}, "stage",
                            origin={"Z": 10.0, "Y": 100.0, "X": -20.0})
    # a multiscale-level scale (NGFF allows one after the datasets' own) doubles sizes and origin
    attrs["multiscales"][0]["coordinateTransformations"] = [{"type": "scale", "scale": [1.0, 2.0, 2.0]}]
    z = create_ngff(tmp_path / "stage.ome.zarr", "ZYX", img.shape, img.shape, img.dtype, attrs)
    z[...] = img
    with open_image(tmp_path / "stage.ome.zarr") as src:
        assert src.meta["origin"] == {"Z": 10.0, "Y": 200.0, "X": -40.0}
        assert src.meta["pixel_size"]["X"] == (0.8, "micrometer")
    assert predict(tmp_path / "stage.ome.zarr", "-o", tmp_path / "o", "--model", model_file, "--scale", "4") == 0
    ms, data = _ngff(tmp_path / "o" / "stage_x4.ome.zarr")
    scale, translation = ms["datasets"][0]["coordinateTransformations"]
    assert scale["scale"] == [2.0, 0.25, 0.2] and data.shape == (2, 56, 64)
    # first output centre at input pixel (0.5 / 4 - 0.5) = -0.375: 200 - 0.375 * 1.0 and -40 - 0.375 * 0.8
    np.testing.assert_allclose(translation["translation"], [10.0, 199.625, -40.3])
    with open_image(tmp_path / "o" / "stage_x4.ome.zarr") as src:  # read back: the same grid
        np.testing.assert_allclose([src.meta["origin"][c] for c in "ZYX"], [10.0, 199.625, -40.3])
    assert predict(tmp_path / "stage.ome.zarr", "-o", tmp_path / "d", "--model", model_file, "--task",
                   "denoise") == 0
    ms, _ = _ngff(tmp_path / "d" / "stage_denoised.ome.zarr")  # same size: the origin unchanged
    assert ms["datasets"][0]["coordinateTransformations"][1]["translation"] == [10.0, 200.0, -40.0]


def test_ome_zarr_keeps_the_time_step(tmp_path, model_file):
    tl = RNG.integers(0, 4000, (3, 14, 16)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "t.ome.tif", tl, ome=True,
                     metadata={"axes": "TYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "TimeIncrement": 30.0,
                               "TimeIncrementUnit": "s"})
    assert predict(tmp_path / "t.ome.tif", "-o", tmp_path / "o", "--model", model_file, "--format", "ome.zarr") == 0
    ms, data = _ngff(tmp_path / "o" / "t_x2.ome.zarr")
    assert [(a["name"], a.get("unit")) for a in ms["axes"]] == [("t", "second"), ("y", "micrometer"),
                                                                 ("x", "micrometer")]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [30.0, 0.25, 0.25]
    with open_image(tmp_path / "o" / "t_x2.ome.zarr") as src:  # read back: the step, in OME-XML's symbol
        assert src.meta["time_increment"] == (30.0, "s")


def test_ome_zarr_refuses_channels_and_rgb_together_before_restoring(tmp_path, model_file, capsys):
    np.save(tmp_path / "cs.npy", RNG.integers(0, 256, (2, 14, 16, 3)).astype(np.uint8))
    assert predict(tmp_path / "cs.npy", "-o", tmp_path / "o", "--model", model_file, "--axes", "CYXS",
                   "--format", "ome.zarr") == 1
    assert "one channel axis" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_a_tiff_of_unknown_axes_with_a_few_pixels_wide_x_asks_for_the_axes(tmp_path, model_file, capsys):
    tifffile.imwrite(tmp_path / "yxc.tif", RNG.integers(0, 4000, (20, 24, 2)).astype(np.uint16),
                     photometric="minisblack")  # tifffile: axes QYX, 20 pages 2 px wide
    assert predict(tmp_path / "yxc.tif", "-o", tmp_path / "o", "--model", model_file) == 1
    assert "--axes YXC" in capsys.readouterr().err
    assert predict(tmp_path / "yxc.tif", "-o", tmp_path / "o", "--model", model_file, "--axes", "YXC") == 0
    assert tifffile.imread(tmp_path / "o" / "yxc_x2.tif").shape == (2, 40, 48)
