"""Row-streamed CPU inference gives the plain forward pass's result and is used only where it applies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import busy_net
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_vdsr.core import stream
from napari_vdsr.core.model import VDSR
from napari_vdsr.core.restore import restore
from napari_vdsr.core.stream import band_rows, stream_forward, streamable

torch.set_num_threads(1)
NET = busy_net(depth=6, width=6)


def plain(net, x):
    with torch.inference_mode():
        return net(x)


@pytest.fixture(params=[True, False], ids=["fused", "conv2d"])
def conv_path(request, monkeypatch):
    """Run a test with oneDNN's fused operator and with the conv2d + copy fallback."""
    if request.param and not stream._fused_available():
        pytest.skip("this PyTorch has no mkldnn::_convolution_pointwise_ operator")
    monkeypatch.setattr(stream, "_fused_ok", request.param)
    return request.param


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 3), h=st.integers(1, 70), w=st.integers(1, 40), band=st.one_of(st.none(), st.integers(1, 30)))
def test_streamed_equals_plain_forward(conv_path, n, h, w, band):
    x = torch.from_numpy(np.random.default_rng(h * 100 + w).random((n, 1, h, w), dtype=np.float32))
    ref = plain(NET, x)
    with torch.inference_mode():
        out = stream_forward(NET, x, band)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_streamed_default_vdsr_large_plane(conv_path):
    torch.manual_seed(1)
    net = VDSR().eval()
    torch.nn.init.normal_(net.body[-1].weight, 0.0, 0.02)  # a visible residual
    x = torch.rand(1, 1, 150, 97)
    with torch.inference_mode():
        out = stream_forward(net, x, band=16)  # bands shorter than the net is deep
    ref = plain(net, x)
    assert (ref - x).abs().max() > 1e-2
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_input_is_not_modified():
    x = torch.rand(1, 1, 40, 30)
    before = x.clone()
    with torch.inference_mode():
        stream_forward(NET, x, 8)
    assert torch.equal(x, before)


def test_band_rows_targets_a_fixed_pixel_count():
    assert band_rows(1024) == stream.STREAM_PIXELS // 1024
    assert band_rows(10) == 128 and band_rows(100_000) == 8


class OwnForward(VDSR):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize(
    "case",
    ["grad", "float64", "hook", "own_forward", "other_module", "env", "bf16_autocast"],
)
def test_streamable_only_where_it_gives_the_same_result(case, monkeypatch):
    net, x = busy_net(depth=4, width=4), torch.rand(1, 1, 8, 8)
    ok = {"v": None}

    def check():
        ok["v"] = streamable(net, x)

    with torch.inference_mode():
        assert streamable(net, x)
    if case == "grad":
        check()  # grad mode on (the default)
    else:
        with torch.inference_mode():
            if case == "float64":
                x = x.double()
            elif case == "hook":
                net.body[2].register_forward_hook(lambda *a: None)
            elif case == "own_forward":
                net = OwnForward(depth=4, width=4).eval()
            elif case == "other_module":
                net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=1))
            elif case == "env":
                monkeypatch.setenv("NAPARI_VDSR_NO_STREAM", "1")
            if case == "bf16_autocast":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    check()
            else:
                check()
    assert ok["v"] is False


def test_restore_streams_on_cpu_and_matches_unstreamed(monkeypatch):
    calls = []
    real = stream.stream_forward

    def spy(net, x, band=None):
        calls.append(tuple(x.shape))
        return real(net, x, band)

    monkeypatch.setattr(stream, "stream_forward", spy)
    img = np.random.default_rng(0).random((90, 70)).astype(np.float32)
    out = restore(img, task="denoise", model=NET, tile=48, device="cpu")
    assert len(calls) >= 4  # one per tile
    monkeypatch.setenv("NAPARI_VDSR_NO_STREAM", "1")
    n = len(calls)
    ref = restore(img, task="denoise", model=NET, tile=48, device="cpu")
    assert len(calls) == n  # streaming off: plain forward passes
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


def test_not_a_vdsr_is_refused():
    with pytest.raises(ValueError, match="VDSR"):
        stream_forward(torch.nn.Conv2d(1, 1, 3, padding=1), torch.rand(1, 1, 4, 4))


@pytest.mark.parametrize("channels", [1, 3, 5])
@pytest.mark.parametrize("thin", [0, 4], ids=["all-conv", "thin-matmul"])
def test_thin_first_and_last_layers_match_plain_forward(conv_path, channels, thin, monkeypatch):
    """The first/last layers as matrix products (few channels) and as convolutions agree with net(x)."""
    monkeypatch.setattr(stream, "THIN_CHANNELS", thin)
    calls = {"first": 0, "last": 0}
    first, last = stream._first_layer, stream._last_layer

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(stream, "_first_layer", count("first", first))
    monkeypatch.setattr(stream, "_last_layer", count("last", last))
    torch.manual_seed(channels)
    net = VDSR(depth=5, width=8, channels=channels).eval()
    torch.nn.init.normal_(net.body[-1].weight, 0.0, 0.2)
    x = torch.rand(2, channels, 23, 17)
    with torch.inference_mode():
        out = stream_forward(net, x, band=6)
    ref = plain(net, x)
    assert (ref - x).abs().max() > 1e-2
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    used = channels <= thin
    assert (calls["first"] > 0) == used and (calls["last"] > 0) == used


def test_a_stop_check_cancels_within_a_tile_and_only_in_its_thread():
    """Cancel acts between bands of one forward pass (and between ensemble passes), in the checking thread."""
    import threading

    from napari_vdsr.core.cancel import stop_check
    from napari_vdsr.core.errors import Cancelled
    from napari_vdsr.core.tiling import ensemble_net

    x = torch.rand(1, 1, 120, 40)
    calls = []

    def check() -> bool:
        calls.append(1)
        return len(calls) >= 3  # stop at the third band

    with stop_check(check), torch.inference_mode(), pytest.raises(Cancelled):
        stream_forward(NET, x, 8)
    assert len(calls) == 3
    with stop_check(lambda: True), torch.inference_mode(), pytest.raises(Cancelled):
        ensemble_net(NET, x)
    # outside the block, or in another thread while a block is open here, nothing is stopped
    with torch.inference_mode():
        ref = stream_forward(NET, x, 8)
    other = {}
    with stop_check(lambda: True):
        t = threading.Thread(target=lambda: other.setdefault("y", stream_forward(NET, x, 8)))
        t.start()
        t.join()
    torch.testing.assert_close(other["y"], ref)
