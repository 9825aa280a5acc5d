"""The fused CUDA layer path's plumbing, exercised on the CPU with an emulated operator.

The real operator (cuDNN) is tested in tests/test_cuda.py on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_vdsr.core import cuda_fused, tiling
from napari_vdsr.core.model import VDSR


def emulated(x, w, b, stride, padding, dilation, groups):
    return torch.relu(F.conv2d(x, w, b, stride, padding, dilation, groups))


def _net(channels=1, residual=True):
    torch.manual_seed(channels)
    net = VDSR(depth=5, width=8, channels=channels, residual=residual).eval()
    torch.nn.init.normal_(net.body[-1].weight, 0.0, 0.2)
    return net


@pytest.mark.parametrize("pad", [0, 8], ids=["thin", "padded-to-8"])
@pytest.mark.parametrize("channels,residual", [(1, True), (3, True), (1, False)])
def test_fused_forward_equals_the_plain_forward(channels, residual, pad):
    net = _net(channels, residual)
    x = torch.rand(2, channels, 19, 23)
    with torch.inference_mode():
        ref = net(x)
        got = cuda_fused.fused_forward(net, x, torch.float32, op=emulated, pad=pad)
        half = cuda_fused.fused_forward(net, x, torch.bfloat16, op=emulated, pad=pad)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert (ref - x).abs().max() > 1e-2  # the residual branch does something
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert half.dtype == torch.float32 and (half - ref).abs().max() < 0.05  # bf16 rounding, not a different net


def test_not_fused_off_cuda_with_grad_or_other_nets(monkeypatch):
    from types import SimpleNamespace

    from napari_vdsr.core import stream

    net = _net()
    x = torch.rand(1, 1, 8, 8)
    with torch.inference_mode():
        assert cuda_fused.fusable(net, x) is None  # a CPU tensor
    # a stand-in CUDA input and CUDA weights, so that each condition below is what decides
    fake_cuda = SimpleNamespace(device=torch.device("cuda"), ndim=4, shape=(1, 1, 8, 8))
    real_convs = stream._convs
    monkeypatch.setattr(stream, "_convs", lambda n: None if real_convs(n) is None else [
        SimpleNamespace(in_channels=c.in_channels, weight=SimpleNamespace(device=torch.device("cuda")))
        for c in real_convs(n)])
    monkeypatch.setattr(cuda_fused, "fused_op_ok", lambda device, dtype: True)
    monkeypatch.setattr(cuda_fused, "_autocast_dtype", lambda device: torch.bfloat16)
    monkeypatch.delenv("NAPARI_VDSR_NO_FUSED", raising=False)
    with torch.inference_mode():
        assert cuda_fused.fusable(net, fake_cuda) is torch.bfloat16  # everything in place: fused
        assert cuda_fused.fusable(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3)), fake_cuda) is None
        monkeypatch.setenv("NAPARI_VDSR_NO_FUSED", "1")
        assert cuda_fused.fusable(net, fake_cuda) is None
    monkeypatch.delenv("NAPARI_VDSR_NO_FUSED")
    with torch.enable_grad():
        assert cuda_fused.fusable(net, fake_cuda) is None  # training keeps autograd's graph
    handle = net.body[0].register_forward_hook(lambda *a: None)
    with torch.inference_mode():
        assert cuda_fused.fusable(net, fake_cuda) is None  # hooks expect real forward calls
    handle.remove()
    monkeypatch.setattr(cuda_fused, "fused_op_ok", lambda device, dtype: False)
    with torch.inference_mode():
        assert cuda_fused.fusable(net, fake_cuda) is None  # the operator failed its check
    monkeypatch.setattr(cuda_fused, "fused_op_ok", lambda device, dtype: True)
    monkeypatch.setattr(cuda_fused, "_autocast_dtype", lambda device: None)
    with torch.inference_mode():
        assert cuda_fused.fusable(net, fake_cuda) is None  # float32 runs plain


def test_operator_check_fails_gracefully_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(cuda_fused, "_checked", {})
    # cuDNN's operator on CPU tensors raises: the check says no instead of failing the run
    assert cuda_fused.fused_op_ok(torch.device("cpu"), torch.bfloat16) is False
    monkeypatch.setattr(cuda_fused, "_checked", {})
    monkeypatch.delattr(torch, "cudnn_convolution_relu", raising=False)
    assert cuda_fused.fused_op_ok(torch.device("cpu"), torch.float16) is False


def test_run_net_dispatches_to_the_fused_path(monkeypatch):
    net = _net()
    x = torch.rand(1, 1, 12, 12)
    seen = []
    monkeypatch.setattr(cuda_fused, "fusable", lambda n, t: torch.float32)
    monkeypatch.setattr(cuda_fused, "fused_forward", lambda n, t, dtype: seen.append(dtype) or n(t))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # not streamable on the CPU
        tiling.run_net(net, x)
    assert seen == [torch.float32]


def test_pad_setting_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv("NAPARI_VDSR_PAD_THIN", raising=False)
    assert cuda_fused.pad_thin_channels() == 0
    monkeypatch.setenv("NAPARI_VDSR_PAD_THIN", "8")
    assert cuda_fused.pad_thin_channels() == 8
    monkeypatch.setenv("NAPARI_VDSR_PAD_THIN", "eight")
    assert cuda_fused.pad_thin_channels() == 0
