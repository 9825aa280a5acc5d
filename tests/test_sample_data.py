"""Sample data of the napari plugin: what each sample holds, and that napari opens every one."""

from __future__ import annotations


import numpy as np
import pytest
from helpers import NO_DISPLAY_REASON, no_display

from napari_vdsr import _sample_data as samples

SAMPLES = list(samples.__all__)


def _layer(fn_name: str):
    out = getattr(samples, fn_name)()
    assert isinstance(out, list) and len(out) == 1
    data, kwargs, kind = out[0]
    assert kind == "image"
    return data, kwargs


@pytest.mark.parametrize("name", SAMPLES)
def test_every_sample_is_a_uint8_image_with_a_name(name):
    data, kwargs = _layer(name)
    assert data.dtype == np.uint8
    assert data.ndim == (3 if kwargs.get("rgb") else 2)
    assert kwargs["name"]
    assert data.std() > 5, "the sample should show structure, not a flat field"


@pytest.mark.parametrize("small, big", [("cell_lowres", "cell"), ("astronaut_lowres", "astronaut")])
def test_lowres_sample_is_half_size_and_overlays_the_original(small, big):
    napari = pytest.importorskip("napari", reason="napari is not installed")
    lo, lo_kw = _layer(small)
    hi, hi_kw = _layer(big)
    f = samples.LOWRES_FACTOR
    assert lo.shape[:2] == (hi.shape[0] // f, hi.shape[1] // f)
    assert lo.shape[2:] == hi.shape[2:]
    # same field of view in world coordinates (napari layers need no viewer or display)
    lo_layer = napari.layers.Image(lo, **{k: v for k, v in lo_kw.items() if k != "name"})
    hi_layer = napari.layers.Image(hi, rgb=hi_kw.get("rgb"))
    np.testing.assert_allclose(lo_layer.data_to_world((-0.5, -0.5)), hi_layer.data_to_world((-0.5, -0.5)))
    far = (lo.shape[0] - 0.5, lo.shape[1] - 0.5)
    np.testing.assert_allclose(lo_layer.data_to_world(far), hi_layer.data_to_world((hi.shape[0] - 0.5, hi.shape[1] - 0.5)))
    # it is a faithful shrink: enlarging it back is close to the original
    from napari_vdsr.core.degrade import upscale

    plane = lambda a: a if a.ndim == 2 else a[..., 1]  # noqa: E731 (green channel of RGB)
    back = upscale(plane(lo).astype(np.float32), size=plane(hi).shape)
    err = np.abs(back - plane(hi).astype(np.float32)).mean()
    assert err < 15, f"mean abs error {err:.1f} grey levels"


def test_noisy_sample_has_the_stated_noise():
    noisy, _ = _layer("cell_noisy")
    clean, _ = _layer("cell")
    diff = noisy.astype(float) - clean.astype(float)
    assert abs(diff.mean()) < 2
    # clipping at 0 and 255 trims the tails, so the std is somewhat below sigma
    assert 0.7 * samples.NOISE_SIGMA < diff.std() < 1.05 * samples.NOISE_SIGMA


def test_jpeg_sample_is_compressed_camera():
    from skimage import data

    jpg, kw = _layer("camera_jpeg")
    clean = data.camera()
    assert jpg.shape == clean.shape
    err = np.abs(jpg.astype(float) - clean.astype(float)).mean()
    assert 1 < err < 20, err
    assert str(samples.JPEG_QUALITY) in kw["name"]


def test_manifest_lists_every_sample_and_its_commands_import():
    npe2 = pytest.importorskip("npe2", reason="npe2 is not installed")
    manifest = npe2.PluginManifest.from_distribution("napari-vdsr")
    manifest.validate_imports()
    cmds = {c.id: c.python_name for c in manifest.contributions.commands}
    listed = {cmds[s.command].split(":")[1] for s in manifest.contributions.sample_data}
    assert listed == set(SAMPLES)
    assert all(c.startswith("napari-vdsr.") for c in cmds)




@pytest.mark.gui
def test_every_sample_opens_in_napari(request):
    pytest.importorskip("napari", reason="napari is not installed (pip install -e .[testing])")
    pytest.importorskip("qtpy", reason="no Qt binding (pip install -e .[testing])")
    if no_display():
        pytest.skip(NO_DISPLAY_REASON)
    npe2 = pytest.importorskip("npe2")
    make_napari_viewer = request.getfixturevalue("make_napari_viewer")
    viewer = make_napari_viewer()
    keys = [s.key for s in npe2.PluginManifest.from_distribution("napari-vdsr").contributions.sample_data]
    assert len(keys) >= 3
    for i, key in enumerate(keys):
        viewer.open_sample("napari-vdsr", key)
        assert len(viewer.layers) == i + 1, f"sample {key} added no layer"
        assert viewer.layers[-1].data.size > 0
    assert viewer.layers["astronaut"].rgb
