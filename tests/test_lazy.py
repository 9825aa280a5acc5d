"""Block-wise and lazy restoration: tiled bicubic, restore_blocks, dask in / dask out, zarr, OOM back-off."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from helpers import busy_net as make_busy_net
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_vdsr.core import restore as restore_mod
from napari_vdsr.core.degrade import resize
from napari_vdsr.core.errors import InputError, ModelError
from napari_vdsr.core.io import RawArray, create_npy
from napari_vdsr.core.model import VDSR
from napari_vdsr.core.restore import block_grid, block_shape, restore, restore_blocks, restore_iter
from napari_vdsr.core.tiling import count_tiles, split_axis
from napari_vdsr.core.upsample import AxisResampler, source_box, upsample_region, upsample_region_torch

torch.set_num_threads(1)
da = pytest.importorskip("dask.array")



def busy_net(seed: int = 0):
    return make_busy_net(depth=5, width=6, seed=seed)


NET = busy_net()
RNG = np.random.default_rng(0)


def u16(shape):
    return RNG.integers(0, 4000, shape).astype(np.uint16)


def run(img, **kw):
    kw.setdefault("model", NET)
    kw.setdefault("device", "cpu")
    kw.setdefault("tile", 24)
    return restore(img, **kw)


# ----------------------------------------------------------------------------- tiled bicubic


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    h=st.integers(2, 50), w=st.integers(2, 50), sy=st.floats(1.0, 4.0), sx=st.floats(1.0, 4.0),
    seed=st.integers(0, 2**16), data=st.data(),
)
def test_tiled_upsample_equals_whole_image_upsample(h, w, sy, sx, seed, data):
    x = np.random.default_rng(seed).random((h, w), dtype=np.float32)
    oh, ow = max(1, round(h * sy)), max(1, round(w * sx))
    ref = resize(x, (oh, ow)) if (oh, ow) != (h, w) else x
    whole = upsample_region(x, (0, 0), (h, w), (oh, ow), (0, oh, 0, ow))
    np.testing.assert_allclose(whole, ref, atol=1e-5, rtol=0)
    y0 = data.draw(st.integers(0, oh - 1))
    y1 = data.draw(st.integers(y0 + 1, oh))
    x0 = data.draw(st.integers(0, ow - 1))
    x1 = data.draw(st.integers(x0 + 1, ow))
    i0, i1, j0, j1 = source_box((h, w), (oh, ow), (y0, y1, x0, x1))
    part = upsample_region(x[i0:i1, j0:j1], (i0, j0), (h, w), (oh, ow), (y0, y1, x0, x1))
    np.testing.assert_array_equal(part, whole[y0:y1, x0:x1])  # bit-identical, whatever the box
    # the torch version (used on GPUs) is the same computation: bit-identical on the CPU
    part_t = upsample_region_torch(torch.from_numpy(x[i0:i1, j0:j1]), (i0, j0), (h, w), (oh, ow), (y0, y1, x0, x1))
    assert part_t.dtype == torch.float32
    np.testing.assert_array_equal(part_t.numpy(), part)


@pytest.mark.parametrize("n_in,n_out", [(2, 4), (7, 14), (10, 15), (33, 99), (5, 80), (64, 64), (40, 41)])
def test_axis_resampler_matches_torch_at_the_borders(n_in, n_out):
    """The first and last output samples (where the kernel is cut by the border) are torch's."""
    x = np.random.default_rng(n_in).random((n_in, 3), dtype=np.float32)
    ref = resize(x.T, (3, n_out)).T if n_in != n_out else x
    r = AxisResampler(n_in, n_out)
    for o0, o1 in [(0, 1), (0, min(3, n_out)), (n_out - 1, n_out), (n_out // 2, n_out)]:
        i0, i1 = r.source(o0, o1)
        got = r.apply(x[i0:i1], i0, o0, o1, axis=0)
        np.testing.assert_allclose(got, ref[o0:o1], atol=1e-6, rtol=0)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_in=st.integers(1, 60), n_out=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_narrowed_tap_window_changes_no_value(n_in, n_out, seed, monkeypatch):
    """Leaving out the all-zero taps (about half the work when enlarging) is bit-identical."""
    from napari_vdsr.core import upsample

    x = np.random.default_rng(seed).random((3, n_in)) * 255
    narrow = AxisResampler(n_in, n_out)
    with monkeypatch.context() as m:
        m.setattr(upsample, "_narrow_window", lambda start, w, n: (start, w))
        wide = AxisResampler(n_in, n_out)
    assert narrow.taps <= wide.taps
    if n_out >= 2 * n_in and n_in >= 8:
        assert narrow.taps == 4  # the cubic kernel's support when enlarging
    a = narrow.apply(x, 0, 0, n_out, axis=1)
    b = wide.apply(x, 0, 0, n_out, axis=1)
    assert np.array_equal(a, b)


def test_upsample_region_refuses_too_small_a_region():
    x = np.zeros((20, 20), np.float32)
    with pytest.raises(ValueError, match="need inputs"):
        upsample_region(x[5:10, 5:10], (5, 5), (20, 20), (40, 40), (10, 20, 10, 20))
    with pytest.raises(ValueError, match="need inputs"):
        upsample_region_torch(torch.from_numpy(x[5:10, 5:10]), (5, 5), (20, 20), (40, 40), (10, 20, 10, 20))


def test_restore_with_upsampling_on_the_device_is_the_same(monkeypatch):
    """The GPU route (torch upsampling, tensor handed to the net) gives the CPU route's result."""
    import napari_vdsr.core.restore as restore_mod

    img = (RNG.random((45, 38)) * 65535).astype(np.uint16)
    ref = run(img, task="sr", scale=2.5, tile=32)
    calls = []
    import napari_vdsr.core.upsample as up

    original = up.upsample_region_torch

    def spy(*a, **k):
        calls.append(tuple(a[0].shape))
        return original(*a, **k)

    monkeypatch.setattr(up, "upsample_region_torch", spy)
    monkeypatch.setattr(restore_mod, "_upsample_on_device", lambda device: True)
    got = run(img, task="sr", scale=2.5, tile=32)
    assert len(calls) >= 4  # the device route ran, once per tile
    assert got.dtype == np.uint16 and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


def test_restore_sr_equals_bicubic_then_net():
    """The engine's SR = the whole-image torch bicubic followed by one untiled forward (within float rounding)."""
    img = RNG.random((30, 37)).astype(np.float32)
    got = restore(img, scale=(2, 1.5), model=NET, tile=16, device="cpu")
    ilr = resize(img, (60, 56))
    with torch.inference_mode():
        ref = NET(torch.from_numpy(ilr)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)


# ----------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("block", [16, 23, 40, 512])
def test_blocks_reassemble_to_the_restore_result(block):
    img = u16((2, 33, 41))
    ref = run(img, scale=2)
    out = np.zeros_like(ref)
    seen = []
    for b in restore_blocks(img, scale=2, model=NET, device="cpu", tile=24, block=block):
        assert b.data.shape == out[b.index].shape
        assert b.yxs.shape == b.data.shape  # ZYX: the plane layout is already (Y, X)
        out[b.index] = b.data
        seen.append(b.done)
    np.testing.assert_array_equal(out, ref)  # blocks hold whole tiles of restore()'s grid: bit-identical
    gy, gx = block_grid((66, 82), 24, block)
    assert seen == list(range(1, 2 * len(gy) * len(gx) + 1))
    if block <= 24:
        assert len(gy) * len(gx) == count_tiles((66, 82), 24)


def test_blocks_of_channel_last_and_rgb_images():
    img = u16((20, 26, 2))
    # the same tile size as the blocks: another tiling may differ in the last bit (and so, rarely,
    # by one grey level after rounding); what is bit-identical is the blocks of one tile grid
    ref = run(img, axes="YXC", scale=1.5, tile=16)
    out = np.zeros_like(ref)
    for b in restore_blocks(img, axes="YXC", scale=1.5, model=NET, device="cpu", tile=16, block=16):
        out[b.index] = b.data
        assert b.yxs.ndim == 2
    np.testing.assert_array_equal(out, ref)
    rgb = RNG.integers(0, 256, (25, 30, 4)).astype(np.uint8)
    ref = run(rgb, scale=2, tile=16)
    out = np.zeros_like(ref)
    for b in restore_blocks(rgb, scale=2, model=NET, device="cpu", tile=16, block=20):
        out[b.index] = b.data
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("block", [None, 40, 64, 100])
def test_blocks_are_chunk_aligned_and_made_of_whole_tiles(block):
    by, bx = block_shape((100, 70), block or 32, tile=32)
    gy, gx = block_grid((100, 70), 32, block)
    assert [t for g in gy for t in g] == split_axis(100, 32) and [t for g in gx for t in g] == split_axis(70, 32)
    n = 0
    for b in restore_blocks(u16((50, 35)), scale=2, model=NET, device="cpu", tile=32, block=block):
        y0, y1, x0, x1 = b.box
        assert y0 % by == 0 and x0 % bx == 0 and y1 - y0 <= by and x1 - x0 <= bx
        n += 1
    assert n == len(gy) * len(gx) == b.total


class Counting:
    """Array-like (shape, dtype, indexing) that records the size of every read, like a zarr array."""

    def __init__(self, a):
        self.a, self.shape, self.dtype, self.reads = a, a.shape, a.dtype, []

    def __getitem__(self, idx):
        out = self.a[idx].copy()
        self.reads.append(out.size)
        return out


def test_lazy_inputs_are_read_by_regions_not_planes():
    img = u16((2, 120, 130))
    lazy = Counting(img)
    restore_mod_slab = restore_mod.SLAB_BYTES
    try:
        restore_mod.SLAB_BYTES = 40 * 130 * 2  # the min/max pass reads slabs of 40 rows
        got = run(lazy, scale=2, tile=32)
    finally:
        restore_mod.SLAB_BYTES = restore_mod_slab
    np.testing.assert_array_equal(got, run(img, scale=2, tile=32))
    assert max(lazy.reads) < 120 * 130 / 2  # never a whole plane
    assert sum(lazy.reads) < 2 * 2 * img.size  # the margins do not read the image many times over


def test_nan_in_a_lazy_input_is_reported():
    img = np.zeros((2, 30, 30), np.float32)
    img[1, 20, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        run(Counting(img))


# ----------------------------------------------------------------------------- dask


class Calls:
    n = 0


def _count(block):
    Calls.n += block.size > 0  # dask may call it on an empty array to infer the output type
    return block


@pytest.mark.parametrize(
    "shape,axes,chunks,scale",
    [
        ((3, 50, 61), "ZYX", (2, 13, 20), 2),  # chunks smaller than the margin: merged
        ((50, 61), "YX", (25, 31), 1.5),
        ((2, 70, 64), "ZYX", (1, 70, 64), 2),  # one chunk per plane: blocks of several tiles
        ((2, 40, 44), "CYX", (1, 40, 44), (2, 3)),
        ((30, 44, 3), "YXS", (16, 16, 1), 2),  # RGB: samples are put in one chunk
    ],
)
def test_dask_in_dask_out_equals_numpy(shape, axes, chunks, scale):
    img = RNG.integers(0, 256, shape).astype(np.uint8) if axes.endswith("S") else u16(shape)
    ref = run(img, axes=axes, scale=scale)
    x = da.from_array(img, chunks=chunks)
    out = run(x, axes=axes, scale=scale)
    assert isinstance(out, da.Array) and out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_array_equal(out.compute(), ref)
    dn = run(x, axes=axes, task="denoise", tile=16)
    np.testing.assert_array_equal(dn.compute(), run(img, axes=axes, task="denoise", tile=16))


def test_dask_result_is_lazy_and_uses_the_whole_array_range():
    Calls.n = 0
    img8 = RNG.integers(0, 256, (2, 40, 40)).astype(np.uint8)
    x8 = da.from_array(img8, chunks=(1, 20, 20)).map_blocks(_count, dtype=np.uint8)
    out = run(x8, scale=2)
    assert Calls.n == 0  # nothing computed: 8-bit data need no range pass
    np.testing.assert_array_equal(out.compute(), run(img8, scale=2))
    assert Calls.n > 0
    # a dim plane next to a bright one: one intensity map for the whole array, as for numpy
    bright = u16((40, 40))
    stack = np.stack([bright, bright // 8])
    x = da.from_array(stack, chunks=(1, 20, 20))
    np.testing.assert_array_equal(run(x, task="denoise").compute(), run(stack, task="denoise"))


def test_lazy_flag():
    img = u16((30, 30))
    lz = run(img, lazy=True)
    assert isinstance(lz, da.Array)
    np.testing.assert_array_equal(lz.compute(), run(img))
    eager = run(da.from_array(img, chunks=10), lazy=False)
    assert isinstance(eager, np.ndarray)
    np.testing.assert_array_equal(eager, run(img))
    with pytest.raises(InputError, match="planes"):
        run(img, lazy=True, planes=[0])
    with pytest.raises(InputError, match="unknown device"):
        run(da.from_array(img), device="tpu")


def test_dask_result_on_a_distributed_cluster():
    distributed = pytest.importorskip("distributed")
    img = u16((2, 40, 50))
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None):
        out = run(da.from_array(img, chunks=(1, 20, 25)), scale=2).compute()
    np.testing.assert_array_equal(out, run(img, scale=2))


# ----------------------------------------------------------------------------- zarr


def test_zarr_to_zarr_equals_in_memory(tmp_path):
    zarr = pytest.importorskip("zarr")
    img = u16((2, 45, 38))
    src = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=img.shape, chunks=(1, 16, 16), dtype=img.dtype)
    src[:] = img
    ref = run(img, scale=2)
    # block by block (the CLI's way)
    chunks = (1,) + block_shape(ref.shape[1:], 48, tile=24)
    dst = zarr.open_array(str(tmp_path / "out.zarr"), mode="w", shape=ref.shape, chunks=chunks, dtype=ref.dtype)
    for b in restore_blocks(src, scale=2, model=NET, device="cpu", tile=24, block=48):
        dst[b.index] = b.data
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "out.zarr"), mode="r")[:], ref)
    # through dask
    out = run(da.from_zarr(src), scale=2)
    out.to_zarr(str(tmp_path / "out2.zarr"))
    np.testing.assert_array_equal(np.asarray(zarr.open_array(str(tmp_path / "out2.zarr"), mode="r")[:]), ref)
    np.testing.assert_array_equal(src[:], img)  # the input is untouched


# ----------------------------------------------------------------------------- raw files


@pytest.mark.parametrize("dtype", ["<u2", ">u2", "<f4", "u1"])
def test_raw_array_regions(tmp_path, dtype):
    a = (np.arange(3 * 7 * 9 * 2) % 251).astype(dtype).reshape(3, 7, 9, 2)
    path = tmp_path / "raw.bin"
    path.write_bytes(b"HEADER" + a.tobytes())
    r = RawArray(path, 6, a.shape, a.dtype)
    for key in [(1, slice(2, 5), slice(3, 8)), (slice(None), 4), (2, slice(None), slice(None), 1),
                (Ellipsis, 0), (0, 0, 0, 0), (-1, slice(5, 99))]:
        got = r[key]
        np.testing.assert_array_equal(got, a[key])
        assert got.dtype.isnative
    np.testing.assert_array_equal(np.asarray(r), a)
    with pytest.raises(IndexError):
        r[0, ::2]
    r.close()


def test_create_npy_written_by_blocks(tmp_path):
    out = create_npy(tmp_path / "o.npy", (2, 10, 12), np.uint16)
    ref = np.arange(240, dtype=np.uint16).reshape(2, 10, 12)
    out[0] = ref[0]
    out[1, 0:5, :] = ref[1, 0:5]
    out[1, 5:10, 0:6] = ref[1, 5:10, 0:6]
    out[1, 5:10, 6:12] = ref[1, 5:10, 6:12]
    out.close()
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), ref)


# ----------------------------------------------------------------------------- out of memory


class FlakyNet(VDSR):
    """Raises CUDA's out-of-memory error for inputs above ``limit`` pixels, the first ``fails`` times."""

    limit = 40 * 40
    fails = 2
    raised = 0
    sizes: list = []

    def forward(self, x):
        FlakyNet.sizes.append(x.shape[-2] * x.shape[-1])
        if x.shape[-2] * x.shape[-1] > FlakyNet.limit and FlakyNet.raised < FlakyNet.fails:
            FlakyNet.raised += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return super().forward(x)


def flaky(fails: int, limit: int = 40 * 40) -> FlakyNet:
    net = FlakyNet(depth=5, width=6)
    net.load_state_dict(NET.state_dict())
    FlakyNet.fails, FlakyNet.limit, FlakyNet.raised, FlakyNet.sizes = fails, limit, 0, []
    return net.eval()


def test_oom_halves_the_tile_and_continues():
    img = RNG.random((2, 64, 60)).astype(np.float32)  # output planes 128 x 120: tiles of 64 x 60 px
    ref = run(img, scale=2, tile=64)
    with pytest.warns(RuntimeWarning, match="halved to 32"):
        events = list(restore_iter(img, scale=2, model=flaky(1), tile=64, device="cpu"))
    assert FlakyNet.raised == 1
    np.testing.assert_allclose(events[-1].result, ref, atol=1e-5, rtol=0)  # tiles are exact: same result
    assert FlakyNet.sizes[0] == (64 + 5) * (60 + 5)  # the first tile (with its halo, cut at the border) failed
    assert events[0].tile == events[-1].tile == 32
    assert events[-1].done == events[-1].total == 2 * count_tiles((128, 120), 64)
    # after the back-off no forward pass is larger than a 32 px tile plus its halo
    assert max(FlakyNet.sizes[1:]) <= (32 + 2 * 5) ** 2


def test_oom_backs_off_repeatedly_and_gives_up_below_the_minimum_tile():
    img = RNG.random((64, 64)).astype(np.float32)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = run(img, scale=2, model=flaky(2, limit=30 * 30), tile=64)
    assert [str(w.message).split("halved to ")[1].split(" ")[0] for w in rec] == ["32", "16"]
    np.testing.assert_allclose(out, run(img, scale=2, tile=64), atol=1e-5, rtol=0)
    with pytest.raises(ModelError, match="out of memory"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(img, scale=2, model=flaky(10**6, limit=0), tile=64)


def test_other_runtime_errors_are_not_taken_for_oom():
    class Broken(VDSR):
        def forward(self, x):
            raise RuntimeError("shape mismatch (a real bug)")

    with pytest.raises(RuntimeError, match="real bug"):
        run(u16((20, 20)), model=Broken(depth=3, width=4))


# ----------------------------------------------------------------------------- devices


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    from napari_vdsr.core.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None:
        monkeypatch.setattr(mps, "is_available", lambda: True)
        assert resolve_device("auto").type == "mps"
        monkeypatch.setattr(mps, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"


def test_cuda_uses_bf16_autocast_unless_disabled():
    from napari_vdsr.core.tiling import _amp_dtype, forward_crop

    assert _amp_dtype(torch.device("cuda"), None) is torch.bfloat16
    assert _amp_dtype(torch.device("cuda"), False) is None
    assert _amp_dtype(torch.device("cpu"), None) is None
    x = RNG.random((30, 20)).astype(np.float32)
    with torch.inference_mode():
        ref = NET(torch.from_numpy(x)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(forward_crop(NET, x, "cpu"), ref, atol=1e-6, rtol=0)


def test_lazy_results_of_models_that_differ_outside_their_weights_are_not_merged():
    import dask

    a = VDSR(depth=3, width=4)
    b = VDSR(depth=3, width=4, residual=False)
    b.load_state_dict(a.state_dict())  # the same weights, another computation
    img = RNG.random((20, 20)).astype(np.float32)
    x = da.from_array(img, chunks=10)
    la, lb = (restore(x, task="sr", scale=2, model=m, device="cpu", tile=16) for m in (a, b))
    assert la.name != lb.name
    ra, rb = dask.compute(la, lb)
    np.testing.assert_array_equal(rb, restore(img, task="sr", scale=2, model=b, device="cpu", tile=16))
    assert np.abs(ra - rb).max() > 0.01
