"""Halo tiling: tiled prediction equals untiled prediction."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import busy_net as make_busy_net
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_vdsr.core.model import VDSR
from napari_vdsr.core.restore import restore, restore_iter
from napari_vdsr.core.tiling import count_tiles, halo_for, predict_plane, predict_plane_iter, split_axis, tile_boxes

torch.set_num_threads(1)
DEPTH = 6



def busy_net(seed: int = 0):
    return make_busy_net(depth=DEPTH, width=6, seed=seed)


NET = busy_net()


def untiled(net, x):
    with torch.inference_mode():
        return net(torch.from_numpy(x)[None, None])[0, 0].numpy()


def test_net_is_not_trivial():
    x = np.random.default_rng(0).random((40, 40), dtype=np.float32)
    assert np.abs(untiled(NET, x) - x).max() > 0.05


@pytest.mark.parametrize("n,tile", [(1, 16), (16, 16), (17, 16), (100, 16), (1000, 512), (1030, 512)])
def test_split_axis_covers_once(n, tile):
    parts = split_axis(n, tile)
    covered = np.zeros(n, int)
    for a, b in parts:
        assert 0 < b - a <= tile
        covered[a:b] += 1
    assert (covered == 1).all()


def test_tile_boxes_cover_plane_once():
    cover = np.zeros((70, 45), int)
    boxes = tile_boxes((70, 45), 16)
    for y0, y1, x0, x1 in boxes:
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all()
    assert len(boxes) == count_tiles((70, 45), 16)


def test_halo_is_depth():
    assert halo_for(VDSR()) == 20
    assert halo_for(NET) == DEPTH


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=st.integers(2, 90), w=st.integers(2, 90), tile=st.integers(16, 48), seed=st.integers(0, 2**16))
def test_tiled_equals_untiled(h, w, tile, seed):
    x = np.random.default_rng(seed).random((h, w), dtype=np.float32)
    ref = untiled(NET, x)
    got = predict_plane(NET, x, tile=tile, device="cpu")
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_too_small_halo_is_detected():
    """The equality test above can fail: with a halo below the depth tiles differ."""
    x = np.random.default_rng(1).random((64, 64), dtype=np.float32)
    ref = untiled(NET, x)
    bad = predict_plane(NET, x, tile=16, halo=DEPTH - 2, device="cpu")
    assert np.abs(bad - ref).max() > 1e-4
    good = predict_plane(NET, x, tile=16, halo=DEPTH, device="cpu")
    np.testing.assert_allclose(good, ref, atol=1e-5, rtol=0)


def test_iter_reports_every_tile_and_batches_bounded():
    x = np.random.default_rng(2).random((50, 70), dtype=np.float32)
    out = np.full(x.shape, np.nan, np.float32)
    steps = list(predict_plane_iter(NET, x, out, tile=16, device="cpu", batch_pixels=1))
    assert steps == list(range(1, count_tiles(x.shape, 16) + 1))
    assert np.isfinite(out).all()
    out2 = np.empty_like(out)
    steps2 = list(predict_plane_iter(NET, x, out2, tile=16, device="cpu"))
    assert steps2[-1] == count_tiles(x.shape, 16) and len(steps2) < len(steps)
    np.testing.assert_allclose(out2, out, atol=1e-5, rtol=0)


def test_input_plane_not_modified():
    x = np.random.default_rng(3).random((40, 33), dtype=np.float32)
    keep = x.copy()
    predict_plane(NET, x, tile=16, device="cpu")
    np.testing.assert_array_equal(x, keep)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    h=st.integers(2, 40),
    w=st.integers(2, 40),
    tile=st.integers(16, 40),
    sy=st.floats(1.0, 3.0),
    sx=st.floats(1.0, 3.0),
    seed=st.integers(0, 2**16),
)
def test_restore_tiled_equals_untiled(h, w, tile, sy, sx, seed):
    img = np.random.default_rng(seed).random((h, w)).astype(np.float32)
    ref = restore(img, task="sr", scale=(sy, sx), model=NET, tile=4096, device="cpu")
    got = restore(img, task="sr", scale=(sy, sx), model=NET, tile=tile, device="cpu")
    assert got.shape == (round(h * sy), round(w * sx))
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_restore_progress_counts_tiles():
    img = np.random.default_rng(4).random((2, 30, 40)).astype(np.float32)
    events = list(restore_iter(img, task="sr", scale=2, model=NET, tile=16, device="cpu"))
    per = count_tiles((60, 80), 16)
    assert events[-1].done == events[-1].total == 2 * per
    assert events[-1].result is not None and all(e.result is None for e in events[:-1])
    assert [e.done for e in events] == sorted(e.done for e in events)
    assert {e.plane for e in events} == {0, 1} and all(e.n_planes == 2 for e in events)


def test_device_tuning_restores_the_cudnn_setting(monkeypatch):
    """On CUDA a run turns cuDNN autotuning on and puts the previous value back (nested runs too)."""
    import torch

    from napari_vdsr.core.tiling import device_tuning

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with device_tuning("cuda"):
        assert torch.backends.cudnn.benchmark is True
        with device_tuning("cuda"):
            assert torch.backends.cudnn.benchmark is True
        assert torch.backends.cudnn.benchmark is True
    assert torch.backends.cudnn.benchmark is False
    with device_tuning("cpu"):
        assert torch.backends.cudnn.benchmark is False
