"""GUI tests of the restore widgets (Super-resolve, Denoise, Remove compression artifacts).

They need napari, a Qt binding and a display: pytest-xvfb starts Xvfb when the
binary exists.  Without any of these the module is skipped with the reason.
A tiny random VDSR (depth 3, width 8; its residual branch starts near zero, so
the output is close to bicubic) keeps every run well under a second.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from helpers import NO_DISPLAY_REASON, no_display

pytest.importorskip("napari", reason="napari is not installed (pip install -e .[testing])")
pytest.importorskip("qtpy", reason="no Qt binding (pip install -e .[testing])")
if no_display():
    pytest.skip(NO_DISPLAY_REASON, allow_module_level=True)

import torch  # noqa: E402

from napari_vdsr._widgets import (  # noqa: E402
    DeblockWidget,
    DenoiseWidget,
    SuperResolveWidget,
    refresh_model_choices,
)
from napari_vdsr._widgets import _restore  # noqa: E402
from napari_vdsr.core import weights  # noqa: E402
from napari_vdsr.core.errors import ModelError  # noqa: E402
from napari_vdsr.core.model import VDSR  # noqa: E402

pytestmark = pytest.mark.gui

WAIT_MS = 60_000
WIDGETS = [SuperResolveWidget, DenoiseWidget, DeblockWidget]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    card = {
        "tasks": ["sr", "denoise", "deblock"],
        "scales": [2.0, 3.0, 4.0],
        "training": {"recipe": {"sigma_range": [0.0, 55.0], "quality_range": [10, 40]}},
    }
    return str(weights.save_model(VDSR(depth=3, width=8), path, card))


def make_widget(viewer, cls, model_path: str):
    w = cls(viewer)
    viewer.window.add_dock_widget(w, name=cls.__name__)
    w._model.value = _restore.FROM_FILE
    w._model_file.value = model_path
    return w


def grey_float32_widget(make_napari_viewer, cls, model_path: str, shape: tuple[int, int], seed: int):
    """A viewer with a random uint8 layer "grey" and a ``cls`` widget set to the CPU in float32."""
    viewer = make_napari_viewer()
    img = (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)
    viewer.add_image(img, name="grey")
    w = make_widget(viewer, cls, model_path)
    w._device.value = "cpu"
    w._precision.value = "float32"
    return viewer, img, w


def shown(widget) -> bool:
    """Not explicitly hidden (``visible`` is False for every widget of an unshown test viewer)."""
    return not widget.native.isHidden()


def run_and_wait(widget, qtbot):
    worker = widget.run()
    assert worker is not None, "the widget refused to start"
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    return worker


def world_centroid(layer, plane: tuple = ()) -> np.ndarray:
    """Intensity centroid (above the median background) of one plane of a grey layer, in world coordinates."""
    plane = tuple(plane) or (0,) * (layer.ndim - 2)
    d = np.asarray(layer.data[plane], dtype=float)
    d = np.clip(d - np.median(d), 0, None)
    c = [(d * i).sum() / d.sum() for i in np.indices(d.shape)]
    return np.asarray(layer.data_to_world((*plane, *c)))


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("scale", [2.0, 3.0, 1.5])
def test_super_resolve_grey_overlays_input(make_napari_viewer, qtbot, tiny_model, notes, scale):
    viewer = make_napari_viewer()
    img = np.full((20, 24), 10, np.uint8)
    img[6, 9] = 250
    original = img.copy()
    layer = viewer.add_image(
        img, name="dot", scale=(0.5, 0.8), translate=(10.0, -3.0), colormap="magma",
        contrast_limits=(5, 200), blending="additive", metadata={"kept": 1},
    )
    w = make_widget(viewer, SuperResolveWidget, tiny_model)
    w._scale_w.value = scale
    run_and_wait(w, qtbot)

    assert len(viewer.layers) == 2, notes
    out = viewer.layers[-1]
    assert out.name == f"dot ×{scale:g} VDSR"
    assert out.data.shape == (round(20 * scale), round(24 * scale))
    assert out.data.dtype == np.uint8
    # input untouched: same array object, same values
    assert layer.data is img and np.array_equal(img, original)
    # the outer corner of the field of view coincides ...
    np.testing.assert_allclose(out.data_to_world((-0.5, -0.5)), layer.data_to_world((-0.5, -0.5)), atol=1e-9)
    # ... and the bright dot lands on the same world coordinate (a half-pixel error would be >= 0.08 px)
    dot_world = np.asarray(layer.data_to_world((6, 9)))
    err_px = np.abs(world_centroid(out) - dot_world) / np.asarray(layer.scale)
    assert np.all(err_px < 0.02), f"dot misplaced by {err_px} input pixels"
    # display settings and metadata carried over
    assert tuple(out.contrast_limits) == (5, 200)
    assert out.colormap.name == "magma"
    assert str(getattr(out.blending, "value", out.blending)) == "additive"
    assert out.metadata["kept"] == 1
    assert out.metadata["napari_vdsr"]["scale"] == scale
    assert not any("error" in n.lower() for n in notes)


@pytest.mark.parametrize("choice, amp", [("auto", None), ("float32", False), ("bf16 (fast)", True)])
def test_precision_choice_reaches_the_core(make_napari_viewer, qtbot, tiny_model, monkeypatch, choice, amp):
    """The precision selector is passed to restore() as amp=...; bf16 stays close to float32."""
    seen = []
    real = _restore.restore_iter

    def spy(*a, **k):
        seen.append(k.get("amp", "missing"))
        return real(*a, **k)

    monkeypatch.setattr(_restore, "restore_iter", spy)
    viewer, _, w = grey_float32_widget(make_napari_viewer, SuperResolveWidget, tiny_model, (40, 44), seed=0)
    run_and_wait(w, qtbot)
    w._precision.value = choice
    run_and_wait(w, qtbot)
    assert seen == [False, amp]
    ref, out = viewer.layers[-2], viewer.layers[-1]
    assert out.metadata["napari_vdsr"]["precision"] == choice
    assert out.data.dtype == np.uint8 and out.data.shape == ref.data.shape
    assert np.abs(out.data.astype(int) - ref.data.astype(int)).max() <= 3


def test_ensemble_checkbox_reaches_the_core(make_napari_viewer, qtbot, tiny_model):
    """Ticking 'x8 ensemble' gives restore(..., ensemble=True)'s result and records it in the metadata."""
    from napari_vdsr.core.restore import restore

    viewer, img, w = grey_float32_widget(make_napari_viewer, DenoiseWidget, tiny_model, (36, 40), seed=1)
    assert w._ensemble.value is False
    w._ensemble.value = True
    run_and_wait(w, qtbot)
    out = viewer.layers[-1]
    assert out.metadata["napari_vdsr"]["ensemble"] is True
    np.testing.assert_array_equal(out.data, restore(img, task="denoise", model=tiny_model, device="cpu",
                                                    ensemble=True))
    np.testing.assert_array_equal(img, viewer.layers["grey"].data)


@pytest.mark.parametrize("cls, suffix", [(DenoiseWidget, "denoised"), (DeblockWidget, "deblocked")])
def test_denoise_and_deblock_keep_shape_dtype_and_place(make_napari_viewer, qtbot, tiny_model, cls, suffix):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    dtype = np.uint16 if cls is DenoiseWidget else np.uint8
    img = rng.integers(0, 200, size=(18, 22)).astype(dtype)
    original = img.copy()
    layer = viewer.add_image(img, name="cells", scale=(2.0, 3.0), translate=(1.0, 4.0))
    w = make_widget(viewer, cls, tiny_model)
    run_and_wait(w, qtbot)

    out = viewer.layers[-1]
    assert out.name == f"cells {suffix} VDSR"
    assert out.data.shape == img.shape
    assert out.data.dtype == dtype
    np.testing.assert_allclose(out.scale, layer.scale)
    np.testing.assert_allclose(out.translate, layer.translate)
    assert np.array_equal(layer.data, original)
    np.testing.assert_allclose(tuple(out.contrast_limits), tuple(layer.contrast_limits))


def test_hint_outside_training_range_warns(make_napari_viewer, qtbot, tiny_model, notes):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((16, 16), np.uint8), name="x")
    w = make_widget(viewer, DenoiseWidget, tiny_model)
    w._sigma.value = 80.0
    run_and_wait(w, qtbot)
    assert any("55" in n and "80" in n for n in notes), notes
    assert viewer.layers[-1].metadata["napari_vdsr"]["noise_sigma"] == 80.0


def test_overlay_holds_under_rotation_shear_and_affine():
    import napari

    from napari_vdsr._widgets._geometry import LayerSnapshot, output_layer_kwargs

    c, s_ = np.cos(np.radians(20)), np.sin(np.radians(20))
    rot = np.array([[1, 0, 0], [0, c, -s_], [0, s_, c]])  # in the Y/X plane, so slicing stays orthogonal
    src = napari.layers.Image(
        np.zeros((3, 10, 14), np.uint8), scale=(2.0, 0.5, 0.7), translate=(1.0, 5.0, -2.0),
        rotate=rot, shear=(0.0, 0.0, 0.2), affine=np.diag([1.0, 1.3, 0.9, 1.0]),
    )
    for plane, f in [(None, (3.0, 2.5)), ((1,), (2.0, 2.0))]:
        lead = 1 if plane else 3
        out_shape = (lead, round(10 * f[0]), round(14 * f[1]))
        kw = output_layer_kwargs(LayerSnapshot.of(src), out_shape, "out", lead_offset=plane)
        out = napari.layers.Image(np.zeros(out_shape, np.uint8), **kw)
        z = plane[0] if plane else 0
        for corner in [(-0.5, -0.5), (9.5, 13.5), (-0.5, 13.5)]:
            oc = (0, (corner[0] + 0.5) * f[0] - 0.5, (corner[1] + 0.5) * f[1] - 0.5)
            np.testing.assert_allclose(out.data_to_world(oc), src.data_to_world((z, *corner)), atol=1e-9)


# --------------------------------------------------------------------------- stacks and RGB


def _stack_with_dot(dtype=np.uint8):
    stack = np.full((4, 16, 20), 5, dtype)
    stack[2, 7, 11] = 240
    stack[0] = 60  # other planes differ, so picking the wrong plane would show
    return stack


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_stack_current_plane_is_placed_at_that_plane(make_napari_viewer, qtbot, tiny_model, dtype):
    viewer = make_napari_viewer()
    stack = _stack_with_dot(dtype)
    original = stack.copy()
    layer = viewer.add_image(stack, name="stack", scale=(3.0, 0.5, 0.5), translate=(7.0, 0.0, 1.0))
    viewer.dims.set_point(0, layer.data_to_world((2, 0, 0))[0])
    w = make_widget(viewer, SuperResolveWidget, tiny_model)
    assert shown(w._extent)
    w._extent.value = _restore.CURRENT_PLANE
    run_and_wait(w, qtbot)

    out = viewer.layers[-1]
    assert out.data.shape == (1, 32, 40)
    assert out.data.dtype == dtype
    assert out.metadata["napari_vdsr"]["plane"] == [2]
    np.testing.assert_allclose(world_centroid(out), layer.data_to_world((2, 7, 11)), atol=0.02)
    assert np.array_equal(stack, original)

    # the same plane restored as part of the whole stack gives the same pixels
    w._extent.value = _restore.WHOLE_STACK
    run_and_wait(w, qtbot)
    full = viewer.layers[-1]
    assert full.data.shape == (4, 32, 40)
    assert np.array_equal(full.data[2], out.data[0])


def test_current_plane_is_the_one_napari_shows_or_a_clear_refusal(make_napari_viewer, qtbot, tiny_model, notes):
    viewer = make_napari_viewer()
    stack = _stack_with_dot(np.uint8)
    # the layer in micrometres beside one in nanometres: napari converts, plane 2 sits at 2000 nm
    layer = viewer.add_image(stack, name="stack", units=("um", "um", "um"))
    # a 4-D layer whose Z reaches further: the slider can stand past the 3-D layer's last plane
    other = viewer.add_image(np.zeros((2, 12, 16, 16), np.uint8), name="4d", scale=(1.0, 1000.0, 1000.0, 1000.0),
                             units=("nm", "nm", "nm", "nm"))
    viewer.layers.selection.active = layer
    w = make_widget(viewer, SuperResolveWidget, tiny_model)
    w._image.value = layer
    w._extent.value = _restore.CURRENT_PLANE
    viewer.dims.set_point(1, 2000.0)
    assert layer._data_slice.point[0] == pytest.approx(2.0)  # what napari shows of it
    run_and_wait(w, qtbot)
    assert viewer.layers[-1].metadata["napari_vdsr"]["plane"] == [2]
    n_layers = len(viewer.layers)

    viewer.dims.order = (0, 2, 1, 3)  # a stack axis of "stack" on screen
    assert w.run() is None and len(viewer.layers) == n_layers
    assert any("displays a stack axis" in n for n in notes), notes
    viewer.dims.order = (0, 1, 2, 3)
    viewer.dims.set_point(1, 9000.0)  # past the last plane (3 um) of "stack"
    assert w.run() is None and len(viewer.layers) == n_layers
    assert any("outside the planes of 'stack'" in n for n in notes), notes
    assert other.data.shape == (2, 12, 16, 16)


def test_stack_whole(make_napari_viewer, qtbot, tiny_model):
    viewer = make_napari_viewer()
    stack = _stack_with_dot()
    layer = viewer.add_image(stack, name="stack", scale=(3.0, 0.5, 0.5), translate=(7.0, 0.0, 1.0))
    w = make_widget(viewer, SuperResolveWidget, tiny_model)
    w._extent.value = _restore.WHOLE_STACK
    w._scale_w.value = 2.0
    run_and_wait(w, qtbot)

    out = viewer.layers[-1]
    assert out.data.shape == (4, 32, 40)
    assert out.scale[0] == layer.scale[0] and out.translate[0] == layer.translate[0]
    # plane 0 was uniformly 60, plane 2 holds the dot: each output plane follows its own input plane
    assert abs(float(out.data[0].mean()) - 60) < 3
    assert np.unravel_index(np.argmax(out.data[2]), out.data[2].shape) in {(14, 22), (14, 23), (15, 22), (15, 23)}
    np.testing.assert_allclose(world_centroid(out, (2,)), layer.data_to_world((2, 7, 11)), atol=0.02)


def test_rgb_stays_rgb_and_keeps_colour(make_napari_viewer, qtbot, tiny_model):
    viewer = make_napari_viewer()
    img = np.zeros((16, 20, 3), np.uint8)
    img[:, :10] = (200, 30, 30)  # red half
    img[:, 10:] = (30, 30, 200)  # blue half
    original = img.copy()
    layer = viewer.add_image(img, name="rgb", rgb=True)
    w = make_widget(viewer, SuperResolveWidget, tiny_model)
    assert not shown(w._extent)  # an RGB plane is not a stack
    run_and_wait(w, qtbot)

    out = viewer.layers[-1]
    assert out.rgb
    assert out.data.shape == (32, 40, 3) and out.data.dtype == np.uint8
    r, g, b = (out.data[16, 5].astype(int))
    assert r > 150 and g < 80 and b < 80, out.data[16, 5]
    r, g, b = (out.data[16, 35].astype(int))
    assert b > 150 and r < 80 and g < 80, out.data[16, 35]
    assert np.array_equal(layer.data, original)


def test_a_16_bit_rgb_layer_is_restored_channel_by_channel(make_napari_viewer, qtbot, tiny_model):
    """napari calls any (Y, X, 3) array RGB; three 16-bit channels are restored each on its own, not as Y."""
    from napari_vdsr.core.restore import restore

    viewer = make_napari_viewer()
    rng = np.random.default_rng(3)
    img = rng.integers(0, 65535, (40, 44, 3)).astype(np.uint16)
    img[:, :, 1] //= 8  # channels of their own ranges: a luminance would mix them
    original = img.copy()
    layer = viewer.add_image(img, name="three channels", rgb=True)
    w = make_widget(viewer, SuperResolveWidget, tiny_model)
    w._update_state()
    assert "each channel on its own" in w._info.value
    run_and_wait(w, qtbot)

    out = viewer.layers[-1]
    assert out.rgb and out.data.shape == (80, 88, 3) and out.data.dtype == np.uint16
    expected = restore(original, task="sr", scale=2, model=tiny_model, axes="YXC", device="cpu")
    np.testing.assert_array_equal(out.data, expected)
    assert not np.array_equal(out.data, restore(original, task="sr", scale=2, model=tiny_model, axes="YXS",
                                                device="cpu"))
    assert np.array_equal(layer.data, original)



def test_current_plane_of_a_16_bit_rgb_stack_restores_that_plane_s_channels(make_napari_viewer, qtbot, tiny_model):
    """The core numbers (plane, channel) pairs of a per-channel RGB stack: 'current plane' must take all three."""
    viewer = make_napari_viewer()
    stack = np.random.default_rng(5).integers(0, 65535, (4, 20, 24, 3)).astype(np.uint16)
    layer = viewer.add_image(stack, name="rgb16 stack", rgb=True)
    w = make_widget(viewer, SuperResolveWidget, tiny_model)
    w._device.value, w._precision.value = "cpu", "float32"
    w._extent.value = _restore.WHOLE_STACK
    run_and_wait(w, qtbot)
    full = viewer.layers[-1]
    assert full.rgb and full.data.shape == (4, 40, 48, 3)
    viewer.dims.set_point(0, layer.data_to_world((2, 0, 0))[0])
    w._extent.value = _restore.CURRENT_PLANE
    run_and_wait(w, qtbot)
    one = viewer.layers[-1]
    assert one.rgb and one.data.shape == (1, 40, 48, 3) and one.metadata["napari_vdsr"]["plane"] == [2]
    np.testing.assert_array_equal(one.data[0], full.data[2])  # plane 2's three channels, not channels of plane 0



def test_a_16_bit_rgba_layer_keeps_its_alpha_and_its_colour_range(make_napari_viewer, qtbot, tiny_model):
    """An opaque alpha at 65535 restored as a fourth channel set the colours' range and was itself changed."""
    from napari_vdsr.core.restore import restore

    viewer = make_napari_viewer()
    rng = np.random.default_rng(6)
    img = np.empty((24, 28, 4), np.uint16)
    img[..., :3] = rng.integers(500, 3500, (24, 28, 3))
    img[..., 3] = 65535
    layer = viewer.add_image(img, name="rgba16", rgb=True, contrast_limits=(400, 3600))
    w = make_widget(viewer, DenoiseWidget, tiny_model)
    w._device.value, w._precision.value = "cpu", "float32"
    w._update_state()
    assert w._info.value.startswith("RGB ") and "each channel" not in w._info.value
    run_and_wait(w, qtbot)
    out = viewer.layers[-1]
    assert out.rgb and out.data.shape == img.shape and np.all(out.data[..., 3] == 65535)
    np.testing.assert_array_equal(out.data, restore(img, task="denoise", model=tiny_model, axes="YXS",
                                                    device="cpu", amp=False))
    assert tuple(out.contrast_limits) == (400, 3600)  # an RGB layer's limits are carried over too
    assert np.array_equal(layer.data, img)


def test_a_16_bit_rgb_layer_with_three_stack_axes_is_restored(make_napari_viewer, qtbot, tiny_model):
    """(T, C, Z, Y, X, 3) uint16: per channel the colours take the core's C, so the stack axes are numbered."""
    viewer = make_napari_viewer()
    stack = np.random.default_rng(7).integers(0, 4000, (2, 1, 2, 16, 16, 3)).astype(np.uint16)
    viewer.add_image(stack, name="tczyx rgb", rgb=True)
    w = make_widget(viewer, SuperResolveWidget, tiny_model)
    w._device.value, w._precision.value = "cpu", "float32"
    w._extent.value = _restore.WHOLE_STACK
    assert "16×16 → 32×32, 4 planes" in w._info.value, w._info.value
    run_and_wait(w, qtbot)
    assert viewer.layers[-1].data.shape == (2, 1, 2, 32, 32, 3)


def test_progress_of_a_per_channel_rgb_stack_counts_planes_and_colours():
    from types import SimpleNamespace

    job = SimpleNamespace(per_channel=True, data=np.zeros((10, 8, 8, 3)), plane=None)
    assert _restore._progress_where(job, 16, 30) == "plane 6/10, channel 2/3"
    job.plane = (4,)
    assert _restore._progress_where(job, 2, 3) == "plane 4, channel 3/3"
    job = SimpleNamespace(per_channel=False, data=np.zeros((10, 8, 8)), plane=None)
    assert _restore._progress_where(job, 6, 10) == "plane 7/10"


# --------------------------------------------------------------------------- cancel and errors


def test_cancel_mid_run_leaves_no_layer_and_no_worker(make_napari_viewer, qtbot, tiny_model, monkeypatch, notes):
    viewer = make_napari_viewer()
    stack = np.random.default_rng(1).integers(0, 255, size=(6, 24, 24)).astype(np.uint8)
    viewer.add_image(stack, name="stack")
    w = make_widget(viewer, SuperResolveWidget, tiny_model)
    w._extent.value = _restore.WHOLE_STACK

    real = _restore.restore_iter
    consumed = []
    release = threading.Event()

    def gated(*args, **kwargs):
        gen = real(*args, **kwargs)

        def events():
            for ev in gen:
                consumed.append(ev)
                yield ev
                if len(consumed) == 1:  # hold the worker until the test has pressed Cancel
                    release.wait(10)

        return events()

    monkeypatch.setattr(_restore, "restore_iter", gated)

    worker = w.run()
    qtbot.waitUntil(lambda: len(consumed) == 1, timeout=WAIT_MS)  # the worker now waits after tile 1
    # napari's progress bar follows the tiles (planes x tiles in all)
    qtbot.waitUntil(lambda: w._progress is not None and w._progress.n == 1, timeout=WAIT_MS)
    assert w._progress.total == consumed[0].total
    w._cancel_btn.native.click()  # the Cancel button
    # the abort request reaches the worker before it may go on (the worker is still held)
    qtbot.waitUntil(lambda: worker.abort_requested, timeout=WAIT_MS)
    release.set()
    qtbot.waitUntil(lambda: not w.running, timeout=WAIT_MS)

    assert release.is_set()
    assert [layer.name for layer in viewer.layers] == ["stack"]
    assert w.worker is None and not worker.is_running
    total = consumed[0].total
    assert total >= 6
    assert len(consumed) <= 2, f"{len(consumed)} of {total} tiles ran after cancel"
    assert any("cancelled" in n for n in notes), notes
    assert w._run_btn.enabled and not w._cancel_btn.enabled


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: no kernel image is available"),
                                   NotImplementedError("op not implemented for 'mps'"), TypeError("bad")])
def test_unexpected_error_in_the_worker_is_reported_and_frees_the_widget(
        make_napari_viewer, qtbot, tiny_model, monkeypatch, notes, error):
    """superqt drops a RuntimeError raised by a generator worker without 'finished': the widget must not stick."""
    viewer, img, w = grey_float32_widget(make_napari_viewer, SuperResolveWidget, tiny_model, (20, 20), 3)

    def failing(*args, **kwargs):
        yield from ()
        raise error

    monkeypatch.setattr(_restore, "restore_iter", failing)
    run_and_wait(w, qtbot)
    assert [layer.name for layer in viewer.layers] == ["grey"]
    assert any(type(error).__name__ in n and "unchanged" in n for n in notes), notes
    assert w.worker is None and w._run_btn.enabled and not w._cancel_btn.enabled
    monkeypatch.undo()
    run_and_wait(w, qtbot)  # and it runs again
    assert len(viewer.layers) == 2


def test_widget_deleted_mid_run_stops_the_job_and_adds_nothing(make_napari_viewer, qtbot, tiny_model, monkeypatch, notes):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(1).integers(0, 255, size=(6, 24, 24)).astype(np.uint8), name="stack")
    w = make_widget(viewer, SuperResolveWidget, tiny_model)
    w._extent.value = _restore.WHOLE_STACK
    real, consumed, release = _restore.restore_iter, [], threading.Event()

    def gated(*args, **kwargs):
        for ev in real(*args, **kwargs):
            consumed.append(ev)
            yield ev
            if len(consumed) == 1:
                release.wait(10)

    monkeypatch.setattr(_restore, "restore_iter", gated)
    worker = w.run()
    qtbot.waitUntil(lambda: len(consumed) == 1, timeout=WAIT_MS)
    w.native.destroyed.emit()  # what Qt sends when the viewer closes with the dock
    qtbot.waitUntil(lambda: worker.abort_requested, timeout=WAIT_MS)
    release.set()
    qtbot.waitUntil(lambda: not w.running, timeout=WAIT_MS)
    assert [layer.name for layer in viewer.layers] == ["stack"]
    assert len(consumed) <= 2 < consumed[0].total
    assert not any("cancelled" in n for n in notes), notes  # nothing is said to a closed viewer


def test_labels_layer_is_not_offered_and_gives_notification(make_napari_viewer, tiny_model, notes):
    viewer = make_napari_viewer()
    viewer.add_labels(np.zeros((16, 16), np.int32), name="seg")
    w = make_widget(viewer, SuperResolveWidget, tiny_model)
    assert w._image.value is None and len(w._image.choices) == 0
    assert w.run() is None
    assert len(viewer.layers) == 1
    assert any("not" in n and "image" in n for n in notes), notes
    # a Labels layer forced in programmatically is refused too
    w._image.choices = [viewer.layers["seg"]]
    w._image.value = viewer.layers["seg"]
    n_before = len(notes)
    assert w.run() is None
    assert len(notes) > n_before and "seg" in notes[-1]


@pytest.mark.parametrize(
    "data, expect",
    [(np.full((1, 1), 7, np.uint8), "1x1"), (np.zeros((8, 8), bool), "boolean")],
    ids=["one-pixel", "mask"],
)
def test_unusable_image_gives_notification(make_napari_viewer, qtbot, tiny_model, notes, data, expect):
    viewer = make_napari_viewer()
    viewer.add_image(data, name="bad")
    w = make_widget(viewer, SuperResolveWidget, tiny_model)
    w.run()  # the engine refuses in the worker; the message comes back as a notification
    qtbot.waitUntil(lambda: not w.running, timeout=WAIT_MS)
    assert len(viewer.layers) == 1
    assert any(expect in n for n in notes), notes


def test_missing_model_gives_notification(make_napari_viewer, monkeypatch, notes):
    def no_default(task):
        raise ModelError("no bundled model")

    monkeypatch.setattr(_restore, "default_model_name", no_default)
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((16, 16), np.uint8), name="x")
    w = SuperResolveWidget(viewer)
    viewer.window.add_dock_widget(w)
    assert w._model.value == _restore.DEFAULT
    assert "not installed" in w._model.native.currentText()
    assert w.run() is None
    assert any("file…" in n for n in notes), notes
    w._model.value = _restore.FROM_FILE  # no file chosen yet
    assert w.run() is None
    assert any("model file" in n for n in notes), notes
    assert len(viewer.layers) == 1


def test_registered_model_appears_and_runs(make_napari_viewer, qtbot, tiny_model, monkeypatch):
    monkeypatch.setattr(weights, "_user_models", {})
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((16, 16), np.uint8), name="x")
    w = SuperResolveWidget(viewer)
    viewer.window.add_dock_widget(w)
    assert "tiny-finetuned" not in w._model.choices
    w._model.value = _restore.DEFAULT
    name = weights.register_model(tiny_model, name="tiny-finetuned")
    refresh_model_choices()
    assert name in w._model.choices
    assert list(w._model.choices)[-1] == _restore.FROM_FILE  # listed before "file…", as the choices say
    assert w._model.value == _restore.DEFAULT  # the selection stays
    w._model.value = name
    run_and_wait(w, qtbot)
    assert viewer.layers[-1].metadata["napari_vdsr"]["model"] == name


def test_model_tooltip_shows_the_chosen_models_numbers(make_napari_viewer, tmp_path, monkeypatch):
    """Hovering the model list tells what the chosen model measured (the card's validation and benchmarks)."""
    monkeypatch.setattr(weights, "_user_models", {})
    card = {"tasks": ["sr"], "scales": [2.0], "metrics": {
        "validation": {"psnr": 33.5, "per_level": {"2": 33.5}},
        "benchmarks": {"measured": "2026-11-28", "cells": [{"set": "Set5", "level": 2, "psnr": 37.342}]}}}
    path = weights.save_model(VDSR(depth=3, width=8), tmp_path / "scored.safetensors", card)
    viewer = make_napari_viewer()
    w = SuperResolveWidget(viewer)
    viewer.window.add_dock_widget(w)
    w._model.value = _restore.FROM_FILE  # no file chosen yet: the help alone
    assert w._model.tooltip == w._model_help
    w._model_file.value = str(path)
    assert "Set5 x2 37.34" in w._model.tooltip and "x2 33.50" in w._model.tooltip
    assert w._model.tooltip.startswith(w._model_help)
    name = weights.register_model(path, name="scored")
    refresh_model_choices()
    w._model.value = _restore.DEFAULT  # the bundled default's own card
    assert f"{weights.default_model_name('sr')}:" in w._model.tooltip and "PSNR" in w._model.tooltip
    w._model.value = name
    assert "scored:" in w._model.tooltip and "Set5 x2 37.34" in w._model.tooltip
    (tmp_path / "broken.safetensors").write_bytes(b"not a model")
    w._model.value = _restore.FROM_FILE
    w._model_file.value = str(tmp_path / "broken.safetensors")
    assert w._model.tooltip == w._model_help  # unreadable: no error, the help alone


# --------------------------------------------------------------------------- manifest


def test_all_widgets_open_together_from_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((8, 8), np.uint8))
    found = []
    for title in ("Super-resolve", "Denoise", "Remove compression artifacts"):
        dock, widget = viewer.window.add_plugin_dock_widget("napari-vdsr", title)
        found.append(type(widget))
    assert found == WIDGETS
    assert len({id(v) for v in found}) == 3


def test_result_larger_than_free_memory_is_refused_before_work(make_napari_viewer, qtbot, tiny_model, notes,
                                                                monkeypatch):
    from napari_vdsr.core import memory

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4, 16, 20), np.uint16), name="stack")
    w = make_widget(viewer, SuperResolveWidget, tiny_model)
    # x2 of the whole stack: 4 * 32 * 40 * 2 bytes = 10 KiB; one plane 2.5 KiB
    monkeypatch.setattr(memory, "available_bytes", lambda: 6 * 1024)
    w._extent.value = _restore.WHOLE_STACK
    assert w.run() is None
    assert len(viewer.layers) == 1
    assert any("would take 10 KiB" in n and "current plane" in n for n in notes), notes
    w._extent.value = _restore.CURRENT_PLANE  # what the message advises fits
    run_and_wait(w, qtbot)
    assert viewer.layers[-1].data.shape == (1, 32, 40)


@pytest.mark.parametrize("lazy", [False, True], ids=["numpy", "dask"])
def test_layer_with_more_than_three_stack_axes_is_restored_plane_by_plane(make_napari_viewer, qtbot, tiny_model,
                                                                          lazy):
    """A 6-D layer (position, time, channel, Z, Y, X): the core names three plane axes, the widget numbers them."""
    from napari_vdsr.core.restore import restore

    viewer = make_napari_viewer()
    stack = np.random.default_rng(4).integers(0, 4000, (2, 1, 2, 3, 16, 20)).astype(np.uint16)
    original = stack.copy()
    data = stack
    if lazy:
        da = pytest.importorskip("dask.array")
        data = da.from_array(stack, chunks=(1, 1, 1, 1, 16, 20))
    layer = viewer.add_image(data, name="6d", scale=(1, 1, 1, 2.0, 0.5, 0.5))
    w = make_widget(viewer, SuperResolveWidget, tiny_model)
    w._device.value, w._precision.value = "cpu", "float32"
    assert "32×40, 12 planes" not in w._info.value  # the default extent is the current plane
    w._extent.value = _restore.WHOLE_STACK
    assert "16×20 → 32×40, 12 planes, uint16" in w._info.value, w._info.value
    run_and_wait(w, qtbot)
    out = viewer.layers[-1]
    assert out.data.shape == (2, 1, 2, 3, 32, 40) and out.data.dtype == np.uint16
    assert tuple(out.scale[:4]) == (1, 1, 1, 2.0) and tuple(out.scale[4:]) == (0.25, 0.25)
    expected = restore(stack.reshape(12, 16, 20), model=tiny_model, device="cpu", tile=int(w._tile.value), amp=False)
    np.testing.assert_array_equal(out.data, expected.reshape(out.data.shape))

    viewer.dims.set_point(range(4), layer.data_to_world((1, 0, 1, 2, 0, 0))[:4])
    w._extent.value = _restore.CURRENT_PLANE
    run_and_wait(w, qtbot)
    one = viewer.layers[-1]
    assert one.data.shape == (1, 1, 1, 1, 32, 40) and one.metadata["napari_vdsr"]["plane"] == [1, 0, 1, 2]
    np.testing.assert_array_equal(one.data[0, 0, 0, 0], out.data[1, 0, 1, 2])
    assert np.array_equal(stack, original)


def test_flat_planes_of_numpy_dask_and_zarr_agree():
    da = pytest.importorskip("dask.array")
    zarr = pytest.importorskip("zarr")
    a = np.arange(2 * 3 * 2 * 2 * 4 * 5, dtype=np.uint16).reshape(2, 3, 2, 2, 4, 5)
    z = zarr.zeros(a.shape, dtype=a.dtype, chunks=(1, 1, 1, 1, 4, 5))
    z[...] = a
    for data in (a, da.from_array(a, chunks=(1, 2, 1, 2, 4, 5)), z, a[:, ::-1]):
        flat = _restore._flat_planes(data, 6)
        assert flat.shape == (24, 4, 5)
        ref = np.asarray(data).reshape(24, 4, 5)
        np.testing.assert_array_equal(np.asarray(flat), ref)
        np.testing.assert_array_equal(flat[17, 1:3, 2:4], ref[17, 1:3, 2:4])
        np.testing.assert_array_equal(flat[-1], ref[-1])
    assert isinstance(_restore._flat_planes(a[:, ::-1], 6), _restore._FlatPlanes)  # no copy of a strided layer

    class Recorder:  # a zarr-like source: only the region asked for is read
        shape, dtype = a.shape, a.dtype
        keys: list = []

        def __getitem__(self, key):
            self.keys.append(key)
            return a[key]

    src = Recorder()
    _restore._flat_planes(src, 6)[17, 1:3, 2:4]
    assert src.keys == [(1, 1, 0, 1, slice(1, 3), slice(2, 4))]  # 17 = 1*12 + 1*4 + 0*2 + 1
    five_d = a[0]
    assert _restore._flat_planes(five_d, 5) is five_d  # three stack axes: left as they are
    assert _restore._flat_shape((3, 2, 2, 4, 5), 5) == (3, 2, 2, 4, 5)  # three stack axes: named by the core
