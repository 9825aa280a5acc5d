"""restore(): dtypes, axes, RGB, stacks, input safety, errors, cancellation, models."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from helpers import busy_net as make_busy_net
import torch

from napari_vdsr.core import weights
from napari_vdsr.core.color import rgb_to_ycbcr
from napari_vdsr.core.degrade import resize
from napari_vdsr.core.errors import Cancelled, InputError, ModelError
from napari_vdsr.core.model import VDSR
from napari_vdsr.core.restore import (
    RestoreProgress,
    infer_axes,
    output_shape,
    plane_count,
    restore,
    restore_iter,
)

torch.set_num_threads(1)



def busy_net(seed: int = 0):
    return make_busy_net(depth=4, width=4, seed=seed)


def identity_net() -> VDSR:
    """Residual VDSR whose residual is exactly zero: restore() must then equal bicubic."""
    net = VDSR(depth=3, width=4)
    torch.nn.init.zeros_(net.body[-1].weight)
    torch.nn.init.zeros_(net.body[-1].bias)
    return net.eval()


def offset_net(value: float) -> VDSR:
    net = identity_net()
    torch.nn.init.constant_(net.body[-1].bias, value)
    return net


NET = busy_net()
ID = identity_net()
RNG = np.random.default_rng(0)


def rand(shape, dtype):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return RNG.random(shape).astype(dtype)
    info = np.iinfo(dtype)
    lo, hi = max(info.min, -3000), min(info.max, 60000)
    return RNG.integers(lo, hi, size=shape, endpoint=True).astype(dtype)


def run(img, **kw):
    kw.setdefault("model", NET)
    kw.setdefault("device", "cpu")
    kw.setdefault("tile", 32)
    return restore(img, **kw)


# ----------------------------------------------------------------------------- shapes and dtypes


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32", "float64"])
@pytest.mark.parametrize("task", ["sr", "denoise", "deblock"])
def test_grey_dtype_and_shape_round_trip(dtype, task):
    img = rand((23, 30), dtype)
    keep = img.copy()
    out = run(img, task=task, scale=2)
    assert out.dtype == img.dtype
    assert out.shape == ((46, 60) if task == "sr" else (23, 30))
    np.testing.assert_array_equal(img, keep)


@pytest.mark.parametrize("dtype", ["int32", "uint32", "int64", "uint64"])
def test_wide_integers_are_clipped_at_the_top_of_their_range_not_wrapped(dtype):
    """The brightest pixels of 32/64-bit images stay the brightest (no overflow on the cast back)."""
    info = np.iinfo(dtype)
    img = np.full((16, 16), info.max // 2, dtype)
    img[:, 8:] = info.max
    for kw in (dict(task="sr", scale=2, model=ID), dict(task="denoise", model=offset_net(0.05))):
        out = run(img, **kw)
        assert out.dtype == img.dtype
        bright = out[:, out.shape[1] // 2 + 4:]
        assert bright.min() > info.max // 2 + info.max // 4  # wrapped values would be 0 or negative
        assert out.min() >= info.max // 2 - info.max // 8


@pytest.mark.parametrize(
    "shape,axes,expected",
    [
        ((4, 20, 24), "ZYX", (4, 40, 48)),
        ((2, 3, 20, 24), "TCYX", (2, 3, 40, 48)),
        ((20, 24, 2), "YXC", (40, 48, 2)),
        ((2, 20, 24), "CYX", (2, 40, 48)),
        ((20, 2, 24), "YCX", (40, 2, 48)),
        ((20, 24, 3), "YXS", (40, 48, 3)),
        ((2, 20, 24, 4), "ZYXS", (2, 40, 48, 4)),
        ((20, 24), None, (40, 48)),
        ((3, 20, 24), None, (3, 40, 48)),
    ],
)
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_nd_shapes(shape, axes, expected, dtype):
    img = rand(shape, dtype)
    keep = img.copy()
    out = run(img, axes=axes, scale=2)
    assert out.shape == expected == output_shape(shape, axes, 2)
    assert out.dtype == img.dtype
    np.testing.assert_array_equal(img, keep)


def test_axes_lowercase_and_channel_axis_anywhere_equal_per_plane():
    img = rand((20, 24, 3), "uint8")
    out_last = run(img, axes="yxc", scale=2)
    out_first = run(np.moveaxis(img, -1, 0).copy(), axes="CYX", scale=2)
    np.testing.assert_array_equal(np.moveaxis(out_last, -1, 0), out_first)
    # each channel is its own grey image
    for c in range(3):
        np.testing.assert_array_equal(out_first[c], run(img[..., c].copy(), scale=2))


def test_stack_planes_equal_single_planes_for_uint8():
    stack = rand((3, 21, 17), "uint8")
    out = run(stack, scale=1.5)
    for z in range(3):
        np.testing.assert_array_equal(out[z], run(stack[z], scale=1.5))


def test_stack_uses_one_intensity_map():
    """Planes of a uint16 stack share the map of the whole stack: a dim plane stays dim."""
    bright = rand((20, 20), "uint16")
    stack = np.stack([bright, bright // 4])
    out = restore(stack, task="denoise", model=ID, device="cpu")
    np.testing.assert_array_equal(out, stack)  # identity model: exact round trip
    out = run(stack, task="denoise")
    assert out[1].mean() < out[0].mean() / 2


def test_identity_model_equals_bicubic_grey():
    img = rand((24, 31), "uint8")
    out = restore(img, task="sr", scale=(2, 3), model=ID, device="cpu", tile=16)
    ref = np.clip(np.rint(resize(img.astype(np.float32), (48, 93))), 0, 255)
    diff = np.abs(out.astype(float) - ref)
    assert out.shape == ref.shape and diff.max() <= 1  # /255 and *255 may move a .5 across rounding
    assert (diff == 0).mean() > 0.99


def test_identity_model_float_round_trip_not_clipped():
    img = (RNG.random((16, 16)) * 10 - 3).astype(np.float32)
    out = restore(img, task="denoise", model=ID, device="cpu")
    np.testing.assert_allclose(out, img, atol=1e-5)
    off = restore(img, task="denoise", model=offset_net(0.5), device="cpu")
    # residual of +0.5 on the net's [0, 1] scale = +half the image range; floats are not clipped
    assert off.max() > img.max() + 1.0


def test_a_large_offset_costs_no_precision():
    """Values far above their range (a uint32 counter, float64 stage data) round-trip as exactly as small ones."""
    counts = (np.uint32(3_000_000_000) + rand((16, 16), "uint16") % 1000).astype(np.uint32)
    np.testing.assert_array_equal(restore(counts, task="denoise", model=ID, device="cpu"), counts)
    small = RNG.random((16, 16)) * 10.0
    out = restore(small + 1e8, task="denoise", model=ID, device="cpu")
    np.testing.assert_allclose(out - 1e8, small, atol=1e-5)
    # with a real net the result does not depend on the offset
    a = restore(small, task="denoise", model=NET, device="cpu")
    b = restore(small + 1e7, task="denoise", model=NET, device="cpu") - 1e7
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_integers_clipped_not_wrapped():
    img = np.full((16, 16), 250, np.uint8)
    out = restore(img, task="denoise", model=offset_net(0.5), device="cpu")
    assert out.dtype == np.uint8 and (out == 255).all()
    out = restore(img, task="denoise", model=offset_net(-2.0), device="cpu")
    assert (out == 0).all()


def test_rgb_identity_equals_bicubic_and_net_sees_luminance():
    img = rand((20, 26, 3), "uint8")
    out = restore(img, task="sr", scale=2, model=ID, device="cpu")
    ref = np.moveaxis(resize(np.moveaxis(img.astype(np.float32), -1, 0), (40, 52)), 0, -1)
    assert out.dtype == np.uint8 and out.shape == (40, 52, 3)
    assert np.abs(out.astype(float) - np.clip(np.rint(ref), 0, 255)).max() <= 1
    # with a real net only luminance changes: chroma of the output equals bicubic chroma
    out = restore(img, task="sr", scale=2, model=NET, device="cpu")
    ycc_out = rgb_to_ycbcr(out.astype(np.float32))
    ycc_ref = rgb_to_ycbcr(ref)  # bicubic RGB before clipping, as restore() converts it
    inside = (out > 2).all(-1) & (out < 253).all(-1)  # away from clipping
    assert inside.mean() > 0.3
    assert np.abs(ycc_out[..., 1:] - ycc_ref[..., 1:])[inside].max() < 1.5  # rounding to uint8 only
    assert np.abs(ycc_out[..., 0] - ycc_ref[..., 0]).max() > 5


def test_rgba_alpha_is_bicubic_only():
    img = rand((20, 22, 4), "uint8")
    out = run(img, scale=2)
    alpha = np.clip(np.rint(resize(img[..., 3].astype(np.float32), (40, 44))), 0, 255)
    np.testing.assert_array_equal(out[..., 3], alpha)


def test_rgb_flag_overrides_inference():
    img = rand((20, 22, 3), "uint8")
    assert infer_axes(img.shape) == "YXS"
    assert infer_axes(img.shape, rgb=False) == "ZYX"
    out = run(img, rgb=False, scale=2)
    assert out.shape == (20, 44, 6)  # 20 planes (Z) of 22x3 pixels


@pytest.mark.parametrize(
    "shape,rgb,axes",
    [((5, 6), None, "YX"), ((3, 5, 6), None, "ZYX"), ((2, 3, 5, 6), None, "TZYX"), ((2, 2, 3, 5, 6), None, "TCZYX"),
     ((10, 12, 3), None, "YXS"), ((10, 12, 4), None, "YXS"), ((2, 10, 12, 3), None, "ZYXS"), ((10, 12, 3), False, "ZYX"),
     ((10, 12, 5), None, "ZYX")],
)
def test_infer_axes(shape, rgb, axes):
    assert infer_axes(shape, rgb) == axes


def test_channels_last_with_few_channels_is_not_guessed_as_planes():
    """(Y, X, 2) read as ZYX would restore 2-pixel-wide images: the axes are asked for instead."""
    with pytest.raises(InputError, match=r"looks like channels last.*--axes YXC.*axes='YXC'"):
        infer_axes((40, 40, 2))
    with pytest.raises(InputError, match="--axes ZYXC"):
        run(rand((3, 20, 24, 2), "uint16"), scale=2)
    assert infer_axes((40, 40, 2), rgb=False) == "ZYX"  # said explicitly (a napari layer shown that way)
    out = run(rand((20, 24, 2), "uint16"), axes="YXC", scale=2)
    assert out.shape == (40, 48, 2)


def test_planes_subset():
    img = rand((2, 3, 20, 24), "uint16")
    full = run(img, axes="TCYX", scale=2)
    assert plane_count(img.shape, "TCYX") == 6
    part = run(img, axes="TCYX", scale=2, planes=[4, 1])
    assert part.shape == (2, 40, 48)
    np.testing.assert_array_equal(part[0], full[1, 1])
    np.testing.assert_array_equal(part[1], full[0, 1])
    rgb = rand((2, 20, 24, 3), "uint8")
    part = run(rgb, scale=2, planes=[1])
    assert part.shape == (1, 40, 48, 3)
    np.testing.assert_array_equal(part[0], run(rgb, scale=2)[1])


def test_dask_and_arraylike_input():
    da = pytest.importorskip("dask.array")
    img = rand((3, 20, 24), "uint16")
    ref = run(img, scale=2)
    np.testing.assert_array_equal(run(da.from_array(img, chunks=(1, 10, 24)), scale=2), ref)

    class Lazy:
        """Minimal array-like: shape, dtype and indexing only (like a zarr array)."""

        def __init__(self, a):
            self.a, self.shape, self.dtype, self.reads = a, a.shape, a.dtype, 0

        def __getitem__(self, idx):
            self.reads += 1
            return self.a[idx].copy()

    lazy = Lazy(img)
    np.testing.assert_array_equal(run(lazy, scale=2), ref)
    assert lazy.reads >= 3


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "img,kw,words",
    [
        (np.zeros((0, 5), np.uint8), {}, ["empty"]),
        (np.zeros((1, 1), np.uint8), {}, ["2x2"]),
        (np.zeros((1, 40), np.uint8), {}, ["2x2"]),
        (np.zeros(5, np.uint8), {}, ["2 axes"]),
        (np.zeros((8, 8), bool), {}, ["boolean", "uint8"]),
        (np.zeros((8, 8), complex), {}, ["complex", "np.abs"]),
        (np.zeros((8, 8), object), {}, ["object", "float"]),
        (np.array([[np.nan] * 8] * 8, np.float32), {}, ["NaN", "nan_to_num"]),
        (np.where(np.eye(8) > 0, np.inf, 0).astype(np.float32), {}, ["infinite", "nan_to_num"]),
        (np.zeros((8, 8), np.uint8), {"scale": 0.5}, [">= 1"]),
        (np.zeros((8, 8), np.uint8), {"scale": 17}, ["maximum", "smaller"]),
        (np.zeros((8, 8), np.uint8), {"scale": float("nan")}, [">= 1"]),
        (np.zeros((8, 8), np.uint8), {"scale": (2, 3, 4)}, ["(y, x) pair"]),
        (np.zeros((3, 8, 8), np.uint8), {"axes": "ZQX"}, ["unknown letter", "'Q'", "ZYX"]),
        (np.zeros((3, 8, 8), np.uint8), {"axes": "YYX"}, ["repeats", "once"]),
        (np.zeros((3, 8, 8), np.uint8), {"axes": "ZCY"}, ["Y and X"]),
        (np.zeros((3, 8, 8), np.uint8), {"axes": "YX"}, ["3 axes", "one letter per axis"]),
        (np.zeros((8, 8, 5), np.uint8), {"axes": "YXS"}, ["not 3 or 4", "call it C"]),
        (np.zeros((8, 8), np.uint8), {"axes": 3}, ["string"]),
        (np.zeros((8, 8), np.uint8), {"tile": 8}, ["at least 16", "1024"]),
        (np.zeros((8, 8), np.uint8), {"task": "deblur"}, ["unknown task", "sr, denoise, deblock"]),
        (np.zeros((2, 8, 8), np.uint8), {"planes": [2]}, ["out of range", "0..1"]),
        (np.zeros((8, 8), np.uint8), {"device": "tpu"}, ["unknown device", "cpu"]),
    ],
)
def test_bad_input_errors_name_the_fix(img, kw, words):
    with pytest.raises(InputError) as info:
        run(img, **kw)
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)


def test_nan_anywhere_in_stack_is_refused():
    img = np.zeros((3, 8, 8), np.float32)
    img[2, 1, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        run(img, planes=[0, 1])  # the whole image's range is checked, even for a subset


def test_errors_raised_before_iteration():
    with pytest.raises(InputError):
        restore_iter(np.zeros((8, 8), bool), model=NET)


# ----------------------------------------------------------------------------- cancellation


class CountingNet:
    """A busy VDSR whose forward passes are counted (a hook survives restore()'s private copy)."""

    def __init__(self):
        self.net = busy_net()
        self.seen: list[int] = []
        self.net.register_forward_hook(lambda mod, inp, out: self.seen.append(1))

    @property
    def calls(self) -> int:
        return len(self.seen)


def test_cancel_with_stop_event_stops_within_one_tile():
    img = rand((3, 64, 64), "uint8")
    counter = CountingNet()
    net = counter.net
    stop = threading.Event()
    seen = []

    def progress(done, total):
        seen.append((done, total))
        stop.set()

    with pytest.raises(Cancelled):
        restore(img, task="denoise", model=net, tile=512, device="cpu", progress=progress, stop=stop)
    assert seen == [(1, 3)]
    assert counter.calls == 1


def test_stop_already_set_does_nothing():
    stop = threading.Event()
    stop.set()
    counter = CountingNet()
    net = counter.net
    with pytest.raises(Cancelled):
        restore(rand((16, 16), "uint8"), model=net, device="cpu", stop=stop)
    assert counter.calls == 0


def test_cancel_by_closing_generator():
    img = rand((4, 48, 48), "uint16")
    counter = CountingNet()
    net = counter.net
    gen = restore_iter(img, task="sr", scale=2, model=net, tile=512, device="cpu")
    assert counter.calls == 0  # nothing runs before iteration
    first = next(gen)
    assert isinstance(first, RestoreProgress) and first.total == 4 and first.result is None
    gen.close()
    assert counter.calls == 1
    with pytest.raises(StopIteration):
        next(gen)


def test_progress_callback_reaches_total():
    seen = []
    out = run(rand((2, 40, 40), "uint8"), scale=2, tile=16, progress=lambda d, t: seen.append((d, t)))
    assert out.shape == (2, 80, 80)
    assert seen[-1][0] == seen[-1][1] and len(seen) >= 2


# ----------------------------------------------------------------------------- models


def test_model_from_file_and_task_mismatch(tmp_path):
    path = weights.save_model(NET, tmp_path / "tiny.safetensors", {"tasks": ["denoise"]})
    img = rand((16, 16), "uint8")
    a = restore(img, task="denoise", model=str(path), device="cpu")
    np.testing.assert_array_equal(a, run(img, task="denoise"))
    with pytest.raises(ModelError, match="not super-resolution"):
        restore(img, task="sr", model=path, device="cpu")
    net, card = weights.load_model(path)
    with pytest.raises(ModelError, match="denoising"):
        restore(img, task="sr", model=(net, card), device="cpu")
    assert restore(img, task="denoise", model=(net, card), device="cpu").shape == (16, 16)


def test_default_model_missing_and_present(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(weights, "BUNDLED_DIR", empty)
    with pytest.raises(ModelError, match="no bundled model"):
        restore(rand((16, 16), "uint8"), task="sr", device="cpu")
    weights.save_model(NET, empty / "tiny-sr.safetensors", {"tasks": ["sr"], "default_for": ["sr"], "scales": [2]})
    out = restore(rand((16, 16), "uint8"), task="sr", scale=2, device="cpu")
    assert out.shape == (32, 32)


def test_bad_model_argument():
    with pytest.raises(ModelError, match="VDSR"):
        restore(rand((16, 16), "uint8"), model=42, device="cpu")


def test_model_not_mutated():
    net = busy_net(seed=3)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    run(rand((20, 20), "uint8"), model=net)
    assert net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_bf16_on_cpu_only_where_native_and_close_to_float32():
    import torch

    from napari_vdsr.core.device import cpu_has_fast_bf16
    from napari_vdsr.core.model import VDSR
    from napari_vdsr.core.restore import restore
    from napari_vdsr.core.tiling import _amp_dtype

    expected = torch.bfloat16 if cpu_has_fast_bf16() else None
    assert _amp_dtype(torch.device("cpu"), True) is expected
    torch.manual_seed(0)
    net = VDSR(depth=4, width=8)
    img = (np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)
    ref = restore(img, task="sr", scale=2, model=net, amp=False, device="cpu")
    fast = restore(img, task="sr", scale=2, model=net, amp=True, device="cpu")
    assert fast.dtype == np.uint8 and fast.shape == ref.shape
    assert np.abs(fast.astype(int) - ref.astype(int)).max() <= 3


def test_odd_arguments_get_clear_errors_or_sensible_results():
    img = rand((12, 12), "uint8")
    # a torch tensor is read as its values
    np.testing.assert_array_equal(run(torch.from_numpy(img), task="sr", scale=2), run(img, task="sr", scale=2))
    for kw, match in [
        (dict(scale="22"), "scale must be a number"),
        (dict(scale=True), "scale must be a number"),
        (dict(amp="yes"), "amp must be"),
        (dict(device=1), "device must be"),
    ]:
        with pytest.raises(InputError, match=match):
            run(img, task="sr", **{"scale": 2, **kw})
    with pytest.raises(InputError, match="whole plane indices"):
        run(rand((3, 12, 12), "uint8"), task="denoise", axes="ZYX", planes=[0.7])
    with pytest.raises(ModelError, match="3 input channels"):
        run(img, task="sr", scale=2, model=VDSR(depth=3, width=4, channels=3))


def test_float16_overshoot_stays_finite():
    img = np.zeros((8, 8), np.float16)
    img[:, 4:] = 65000  # bicubic overshoot at the edge goes past float16's maximum, 65504
    out = run(img, task="sr", scale=2, model=ID)
    assert out.dtype == np.float16 and np.isfinite(out).all() and out.max() == np.finfo(np.float16).max


def test_dask_array_of_unknown_shape_gets_a_clear_error():
    da = pytest.importorskip("dask.array")
    x = da.from_array(rand((12, 12), "uint8"), chunks=6)
    unknown = x[x[:, 0] >= 0]  # boolean indexing: the number of rows is unknown
    with pytest.raises(InputError, match="compute_chunk_sizes"):
        run(unknown, task="denoise")
    out = run(unknown.compute_chunk_sizes(), task="denoise")
    assert out.shape == (12, 12)


# ----------------------------------------------------------------------------- intensity range


def _camera_with_hot_pixels(dtype="uint16"):
    """A smooth 16-bit signal in 2000..4800 with five isolated hot pixels (65535) and one dead (0)."""
    yy, xx = np.mgrid[0:48, 0:64]
    sig = (2000 + 2800 * (0.5 + 0.5 * np.sin(xx / 5.0) * np.cos(yy / 7.0))).astype(dtype)
    hot = sig.copy()
    hot[[5, 12, 30, 40, 44], [7, 50, 33, 3, 60]] = 65535
    hot[20, 20] = 0
    return sig, hot


def test_isolated_hot_and_dead_pixels_do_not_set_the_intensity_range():
    from napari_vdsr.core.normalize import intensity_range

    sig, hot = _camera_with_hot_pixels()
    r, clean = intensity_range(hot), intensity_range(sig)
    assert (clean.lo, clean.hi) == (float(sig.min()), float(sig.max()))  # without bad pixels: min and max
    span = clean.hi - clean.lo
    assert clean.lo <= r.lo < clean.lo + 0.02 * span and clean.hi - 0.02 * span < r.hi <= clean.hi  # as if none
    blob = hot.copy()
    blob[10:12, 10:12] = 7000  # a real structure (2 x 2 pixels) brighter than the rest sets the top
    assert intensity_range(blob).hi == 7000.0
    line = hot.copy()
    line[30, 10:30] = 6000  # so does a one-pixel-wide line
    assert intensity_range(line).hi == 6000.0
    stack = np.stack([hot, hot // 2])  # a stack: pairs within each plane, the range over all of them
    assert intensity_range(stack).lo < r.lo / 2 + 0.02 * span and intensity_range(stack).hi == r.hi
    rgb = np.stack([hot, hot, hot], axis=-1)  # colour: neighbours along Y and X, not across the channels
    assert intensity_range(rgb, yx=(-3, -2)).hi == r.hi and intensity_range(rgb).hi == 65535.0  # (-2, -1): Y, X
    assert intensity_range(np.array([[7, 9000]], np.uint16)).hi == 9000.0  # one row: no pair along Y
    assert intensity_range(hot, robust=False).hi == 65535.0  # the plain extremes, e.g. for a PSNR's peak
    da = pytest.importorskip("dask.array")
    lazy = intensity_range(da.from_array(stack, chunks=(1, 16, 16)))
    assert (lazy.lo, lazy.hi) == (intensity_range(stack).lo, intensity_range(stack).hi)


def test_restore_maps_a_16_bit_image_by_its_signal_not_its_hot_pixels():
    """A residual of +0.1 on the network's scale adds a tenth of the signal's range, not of 0..65535."""
    sig, hot = _camera_with_hot_pixels()
    out = restore(hot, task="denoise", model=offset_net(0.1), device="cpu", tile=32)
    from napari_vdsr.core.normalize import intensity_range

    r = intensity_range(hot)
    assert r.span < 1.02 * (float(sig.max()) - float(sig.min()))
    ok = hot == sig
    np.testing.assert_allclose((out.astype(float) - hot)[ok], 0.1 * r.span, atol=1.0)
    assert out[5, 7] == 65535  # the hot pixel itself: clipped to the dtype, not wrapped
    np.testing.assert_array_equal(restore(hot, task="denoise", model=ID, device="cpu"), hot)  # exact round trip

    class Lazy:
        """Array-like read in slabs (like zarr): the streamed range is the same."""

        def __init__(self, a):
            self.a, self.shape, self.dtype = a, a.shape, a.dtype

        def __getitem__(self, idx):
            return self.a[idx].copy()

    stack = np.stack([hot, hot])
    ref = restore(stack, task="denoise", model=offset_net(0.1), device="cpu", tile=32)
    np.testing.assert_array_equal(restore(Lazy(stack), task="denoise", model=offset_net(0.1), device="cpu", tile=32),
                                  ref)


def test_training_planes_are_mapped_by_their_signal_not_their_hot_pixels():
    from napari_vdsr.core.data import planes_from_array

    sig, hot = _camera_with_hot_pixels()
    (p,) = planes_from_array(hot)
    ok = hot == sig
    assert -0.02 < p.data[ok].min() <= 0.0 and 1.0 <= p.data[ok].max() < 1.02  # the signal fills [0, 1]


def test_the_three_ways_of_reading_give_one_intensity_map():
    """numpy, dask and a streamed array-like (zarr, memmap) agree, floats with an outlier included."""
    from napari_vdsr.core.normalize import pair_extremes
    from napari_vdsr.core.restore import _intensity, _prepare

    da = pytest.importorskip("dask.array")

    class Lazy:
        def __init__(self, a):
            self.a, self.shape, self.dtype = a, a.shape, a.dtype

        def __getitem__(self, idx):
            return self.a[idx].copy()

    f = np.random.default_rng(1).normal(0.5, 0.1, (2, 40, 40))
    f[1, 5, 5] = 9.0
    sig, hot = _camera_with_hot_pixels()
    for img in (f, np.stack([hot, hot])):
        maps = {how: _intensity(_prepare(x, "denoise", 1, ID, None, None, 32, "cpu", None))
                for how, x in (("numpy", img), ("dask", da.from_array(img, chunks=(1, 20, 20))), ("lazy", Lazy(img)))}
        assert maps["numpy"] == maps["dask"] == maps["lazy"], maps
    # axes in any order, one of them a single pixel long
    a = np.arange(5, dtype=np.uint16).reshape(1, 5)
    assert [int(v) for v in pair_extremes(a, (1, 0))] == [int(v) for v in pair_extremes(a.T, (0, 1))] == [1, 3]
    with pytest.raises(ValueError, match="two different axes"):
        pair_extremes(a, (-1, 1))


def test_noise_keeps_its_extremes_and_training_planes_bound_an_outlier():
    """Noise peaks are not outliers (the range of a noisy image stays its min..max); a hot pixel in a
    training image is held at the outlier bound instead of outweighing its whole patch."""
    from napari_vdsr.core.data import planes_from_array, planes_from_pair
    from napari_vdsr.core.normalize import intensity_range

    rng = np.random.default_rng(2)
    for noisy in (rng.normal(1000, 100, (256, 256)).astype(np.uint16), rng.poisson(50, (256, 256)).astype(np.uint16)):
        r = intensity_range(noisy)
        assert (r.lo, r.hi) == (float(noisy.min()), float(noisy.max()))
    sig, hot = _camera_with_hot_pixels()
    (p,) = planes_from_array(hot)
    assert -0.51 < p.data.min() and p.data.max() < 1.51 and p.data[5, 7] == pytest.approx(1.5)
    ((d, c),) = planes_from_pair(hot, hot, task="denoise")
    assert c.data.max() == pytest.approx(1.5) and d.data.max() == pytest.approx(1.5)


def test_in_memory_result_larger_than_free_memory_is_refused(monkeypatch):
    from napari_vdsr.core import memory

    img = np.zeros((3, 16, 16), np.float32)  # x2: 3 * 32 * 32 * 4 bytes = 12 KiB
    monkeypatch.setattr(memory, "available_bytes", lambda: 8 * 1024)
    with pytest.raises(InputError, match=r"would take 12 KiB of memory, but only 8 KiB is free.*planes="):
        restore(img, model=(VDSR(depth=3, width=4), {"tasks": ["sr"]}), device="cpu")
    # one plane fits; the environment variable turns the check off
    assert restore(img, model=(VDSR(depth=3, width=4), {"tasks": ["sr"]}), device="cpu", planes=[1]).shape == (1, 32, 32)
    monkeypatch.setenv(memory.NO_CHECK_ENV, "1")
    assert restore(img, model=(VDSR(depth=3, width=4), {"tasks": ["sr"]}), device="cpu").shape == (3, 32, 32)
    monkeypatch.delenv(memory.NO_CHECK_ENV)
    monkeypatch.setattr(memory, "available_bytes", lambda: None)  # unknown: not checked
    assert restore(img, model=(VDSR(depth=3, width=4), {"tasks": ["sr"]}), device="cpu").shape == (3, 32, 32)


def test_available_bytes_is_a_plausible_figure():
    from napari_vdsr.core import memory

    free = memory.available_bytes()
    assert free is not None and 1 << 20 < free
    assert memory.format_bytes(3 * 1024 ** 3) == "3 GiB" and memory.format_bytes(512) == "512 B"


def test_stop_acts_while_a_lazy_stack_s_range_is_read():
    """'current plane' of a lazy stack reads the whole stack for its range first: Cancel must stop those reads."""
    da = pytest.importorskip("dask.array")
    stack = np.random.default_rng(2).integers(0, 4000, (6, 24, 24)).astype(np.uint16)
    for kind in ("dask", "streamed"):
        stop = threading.Event()
        reads: list[int] = []

        def read(block, block_info=None):
            if block.size:  # not dask's probe of an empty block
                reads.append(1)
                stop.set()  # the user presses Cancel while the first plane is read
            return block

        if kind == "dask":
            img = da.from_array(stack, chunks=(1, 24, 24)).map_blocks(read, dtype=stack.dtype)
        else:
            class Lazy:
                shape, dtype = stack.shape, stack.dtype

                def __getitem__(self, idx):
                    return read(stack[idx].copy())

            img = Lazy()
        with pytest.raises(Cancelled, match="intensity range"):
            restore(img, task="denoise", model=ID, device="cpu", planes=[5], lazy=False, stop=stop)
        assert 1 <= len(reads) < 6, kind  # not every plane was read
    # without a stop the same plane restores
    out = restore(da.from_array(stack, chunks=(1, 24, 24)), task="denoise", model=ID, device="cpu", planes=[5],
                  lazy=False)
    np.testing.assert_array_equal(out[0], stack[5])


def test_a_control_group_s_memory_limit_counts(tmp_path, monkeypatch):
    """In a container or a SLURM job the machine's free memory is not what this process may use."""
    from napari_vdsr.core import memory

    gib = 1 << 30
    # cgroup v2: the job's group has 4 GiB, 3 GiB used of which 1 GiB is reclaimable page cache
    v2 = tmp_path / "v2"
    job = v2 / "slurm" / "job_7"
    job.mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("cpu memory\n")
    (v2 / "slurm" / "memory.max").write_text("max\n")
    (v2 / "slurm" / "memory.current").write_text(f"{50 * gib}\n")
    (job / "memory.max").write_text(f"{4 * gib}\n")
    (job / "memory.current").write_text(f"{3 * gib}\n")
    (job / "memory.stat").write_text(f"anon {2 * gib}\ninactive_file {gib}\n")
    (tmp_path / "proc2").write_text("0::/slurm/job_7\n")
    assert memory.cgroup_available(v2, tmp_path / "proc2") == 2 * gib
    # cgroup v1: a parent's limit is tighter than the group's own
    v1 = tmp_path / "v1"
    grp = v1 / "memory" / "docker" / "abc"
    grp.mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # no limit at the root
    (v1 / "memory" / "memory.usage_in_bytes").write_text(f"{60 * gib}\n")
    (v1 / "memory" / "docker" / "memory.limit_in_bytes").write_text(f"{8 * gib}\n")
    (v1 / "memory" / "docker" / "memory.usage_in_bytes").write_text(f"{7 * gib}\n")
    (grp / "memory.limit_in_bytes").write_text(f"{16 * gib}\n")
    (grp / "memory.usage_in_bytes").write_text(f"{gib}\n")
    (tmp_path / "proc1").write_text("9:name=systemd:/\n4:memory:/docker/abc\n1:cpu:/\n0::/\n")
    assert memory.cgroup_available(v1, tmp_path / "proc1") == gib
    # no limit anywhere (and no cgroup files at all): None, the machine's figure is used
    (tmp_path / "proc0").write_text("4:memory:/\n")
    assert memory.cgroup_available(v1, tmp_path / "proc0") is None
    assert memory.cgroup_available(tmp_path / "none", tmp_path / "missing") is None
    # the smaller of the two is what a result is checked against
    monkeypatch.setattr(memory, "_host_available", lambda: 20 * gib)
    monkeypatch.setattr(memory, "cgroup_available", lambda: 2 * gib)
    assert memory.available_bytes() == 2 * gib
    with pytest.raises(InputError, match="only 2 GiB is free"):
        memory.check_fits(3 * gib, "the result", "restore less.")


def test_a_double_or_half_precision_model_restores_like_its_float32_self():
    import copy

    img = rand((20, 22), "uint8")
    ref = restore(img, task="denoise", model=NET, device="cpu")
    double = copy.deepcopy(NET).double()  # holds the float32 weights exactly: the same result
    np.testing.assert_array_equal(restore(img, task="denoise", model=double, device="cpu"), ref)
    half = copy.deepcopy(NET).bfloat16()  # rounded weights: nearly the same result
    assert np.abs(restore(img, task="denoise", model=half, device="cpu").astype(int) - ref).max() <= 3
    assert next(double.parameters()).dtype == torch.float64  # the caller's modules are untouched
    assert next(half.parameters()).dtype == torch.bfloat16


def test_sixteen_bit_three_value_pixels_warn_that_they_are_read_as_colour():
    img = rand((20, 22, 3), "uint16")
    with pytest.warns(RuntimeWarning, match="axes='YXC'"):
        out = restore(img, task="denoise", model=NET, device="cpu")
    assert out.shape == img.shape
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said explicitly: no warning
        restore(img, task="denoise", model=NET, device="cpu", axes="YXS")
        restore(img, task="denoise", model=NET, device="cpu", rgb=True)
        restore(rand((20, 22, 3), "uint8"), task="denoise", model=NET, device="cpu")


def test_zero_d_scales_and_amp_dtypes():
    img = rand((12, 14), "uint8")
    ref = restore(img, task="sr", scale=2, model=NET, device="cpu")
    np.testing.assert_array_equal(restore(img, task="sr", scale=np.array(2.0), model=NET, device="cpu"), ref)
    np.testing.assert_array_equal(restore(img, task="sr", scale=torch.tensor(2), model=NET, device="cpu"), ref)
    np.testing.assert_array_equal(restore(img, task="sr", scale=2, model=NET, device="cpu", amp=torch.float32), ref)
    with pytest.raises(InputError, match="amp must be"):
        restore(img, task="sr", scale=2, model=NET, device="cpu", amp=torch.int8)
