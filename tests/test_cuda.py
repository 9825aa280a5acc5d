"""CUDA paths: restore, mixed precision, training and checkpoints on a GPU.

Skipped where no CUDA device is present (every CI run); run on a GPU machine with
``pytest tests/test_cuda.py``.  Nothing here needs napari or a display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def _image(seed: int = 0, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.5 + 0.3 * np.sin(2 * np.pi * (3 * xx + 2 * yy)) + 0.1 * rng.standard_normal((size, size))
    return np.clip(img * 255, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    from napari_vdsr.core.model import VDSR
    from napari_vdsr.core.weights import save_model

    torch.manual_seed(0)
    net = VDSR(depth=6, width=16)
    path = tmp_path_factory.mktemp("m") / "tiny.safetensors"
    save_model(net, path, {"name": "tiny", "tasks": ["sr", "denoise", "deblock"], "scales": [2, 3, 4]})
    return path


def test_auto_device_is_cuda_and_layout_is_channels_last() -> None:
    from napari_vdsr.core.device import autocast_dtype, memory_format, resolve_device

    dev = resolve_device("auto")
    assert dev.type == "cuda"
    assert memory_format(dev) is torch.channels_last
    assert autocast_dtype(dev, True) in (torch.bfloat16, torch.float16)


def test_restore_on_cuda_float32_matches_cpu(small_model: Path) -> None:
    from napari_vdsr.core.restore import restore

    img = _image()
    before = img.copy()
    cpu = restore(img.astype(np.float32) / 255, task="sr", scale=2, model=small_model, device="cpu", amp=False)
    gpu = restore(img.astype(np.float32) / 255, task="sr", scale=2, model=small_model, device="cuda", amp=False, tile=64)
    assert gpu.shape == cpu.shape == (192, 192) and gpu.dtype == np.float32
    # TF32 may be enabled for cuDNN convolutions: allow its ~1e-3 relative error
    assert np.abs(gpu - cpu).max() < 5e-3
    assert np.array_equal(img, before)


def test_restore_on_cuda_bf16_close_to_float32_and_keeps_dtype(small_model: Path) -> None:
    from napari_vdsr.core.restore import restore

    img = (_image(1).astype(np.uint16) * 257)
    ref = restore(img, task="denoise", model=small_model, device="cuda", amp=False)
    fast = restore(img, task="denoise", model=small_model, device="cuda")  # autocast is the CUDA default
    assert fast.dtype == np.uint16 and fast.shape == img.shape
    assert np.abs(fast.astype(np.int64) - ref.astype(np.int64)).max() <= 3 * 257  # ≤ 3 grey levels of 8 bits


def test_bundled_sr_model_on_cuda_beats_bicubic() -> None:
    from napari_vdsr.core.degrade import downscale, upscale
    from napari_vdsr.core.evaluate import psnr
    from napari_vdsr.core.restore import restore

    import skimage.data

    hr = skimage.data.camera()[128:320, 128:320].astype(np.float32)
    lr = downscale(hr, 2)
    bic = np.clip(upscale(lr, 2), 0, 255)
    sr = restore(np.clip(lr, 0, 255).round().astype(np.uint8), task="sr", scale=2, device="cuda").astype(np.float32)
    assert psnr(sr, hr, shave=2) > psnr(bic, hr, shave=2) + 0.5


def test_training_on_cuda_with_workers_checkpoints_and_loads_on_cpu(tmp_path: Path) -> None:
    from PIL import Image

    from napari_vdsr.core.train import TrainConfig, Trainer, load_checkpoint
    from napari_vdsr.core.weights import load_model

    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(4):
        Image.fromarray(_image(i, 80)).save(data / f"im{i}.png")
    cfg = dict(data=[str(data)], task="sr", scales=[2.0, 3.0], iterations=30, batch_size=8, patch_size=24, depth=4,
               width=16, optimizer="adam", lr=1e-3, clip_theta=None, weight_decay=0.0, val_fraction=0.25, val_every=10,
               val_crop=48, device="cuda", seed=1, workers=2)
    run = tmp_path / "run"
    tr = Trainer(TrainConfig(out=str(run), **cfg))
    it = tr.run()
    events = [next(it)]  # the network exists from the first event on
    assert events[0].kind == "start" and events[0].device == torch.cuda.get_device_name(tr.device)
    before = {k: v.detach().cpu().clone() for k, v in tr.model.state_dict().items()}
    events = [ev for ev in [*events, *it] if ev.kind in ("step", "val", "done")]
    assert tr.device.type == "cuda" and tr.amp_dtype in (torch.bfloat16, torch.float16)
    # on a GPU the loss is read back to the host only every 10 steps (the step events in between
    # carry None); three single-batch losses of a tiny net are too noisy to demand a fall (the CPU
    # tests check learning): here every loss read back is finite and every layer moved
    losses = [ev.loss for ev in events if ev.kind == "step" and ev.loss is not None]
    assert len(losses) >= 2 and all(np.isfinite(losses))
    after = tr.model.state_dict()
    assert all(not torch.equal(before[k], after[k].detach().cpu()) for k in before if k.endswith("weight"))
    assert events[-1].kind == "done"
    ck = load_checkpoint(run)  # readable without a GPU: map_location cpu
    assert ck["step"] == 30 and all(t.device.type == "cpu" for t in ck["model"].values())
    net, card = load_model(run / "best.safetensors", device="cpu")
    assert card["training"]["device"] == torch.cuda.get_device_name(0)
    assert card["training"]["precision"].startswith("autocast")
    # resume continues the CUDA run where it stopped
    list(Trainer(TrainConfig(out=str(run), **dict(cfg, iterations=40)), resume=True).run())
    assert load_checkpoint(run)["step"] == 40


def test_prediction_cli_on_cuda(tmp_path: Path, small_model: Path) -> None:
    import tifffile

    from napari_vdsr.cli import main as cli_main

    stack = np.stack([_image(i, 64) for i in range(4)]).astype(np.uint16) * 200
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, stack, photometric="minisblack")
    out = tmp_path / "out"
    assert cli_main(["predict", str(src), "-o", str(out), "--task", "sr", "--scale", "2", "--model", str(small_model),
                     "--device", "cuda", "--quiet"]) == 0
    res = tifffile.imread(next(out.glob("*.tif")))
    assert res.shape == (4, 128, 128) and res.dtype == np.uint16


def test_tiled_equals_untiled_on_cuda_and_cudnn_setting_is_restored(small_model: Path) -> None:
    """Tiles (upsampled on the GPU, region-independent) give the untiled result on CUDA too."""
    from napari_vdsr.core.restore import restore

    img = (_image(2, 150)[:, :131].astype(np.float32) / 255)
    before = torch.backends.cudnn.benchmark
    prev_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # strict float32 convolutions: tiles differ only by algorithm choice
    try:
        whole = restore(img, task="sr", scale=3, model=small_model, device="cuda", amp=False, tile=4096)
        tiled = restore(img, task="sr", scale=3, model=small_model, device="cuda", amp=False, tile=64)
    finally:
        torch.backends.cudnn.allow_tf32 = prev_tf32
    assert tiled.shape == whole.shape == (450, 393)
    assert np.abs(tiled - whole).max() < 1e-4
    assert torch.backends.cudnn.benchmark == before


def test_fused_cudnn_path_is_taken_and_agrees(monkeypatch) -> None:
    """bf16 restore() runs the fused conv + ReLU layers, within bf16 rounding of the unfused forward."""
    from napari_vdsr.core import cuda_fused
    from napari_vdsr.core.model import VDSR
    from napari_vdsr.core.restore import restore

    assert cuda_fused.fused_op_ok(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16)
    torch.manual_seed(0)
    net = VDSR()  # the real depth and width (the op's kernels differ by shape)
    torch.nn.init.normal_(net.body[-1].weight, 0.0, 0.01)
    img = _image(3, 128)
    calls = []
    real = cuda_fused.fused_forward
    monkeypatch.setattr(cuda_fused, "fused_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = restore(img, task="sr", scale=2, model=net, device="cuda", amp=True, tile=128)
    assert calls, "the fused path was not used"
    monkeypatch.setenv("NAPARI_VDSR_NO_FUSED", "1")
    n = len(calls)
    plain = restore(img, task="sr", scale=2, model=net, device="cuda", amp=True, tile=128)
    full = restore(img, task="sr", scale=2, model=net, device="cpu", amp=False)
    assert len(calls) == n
    assert fused.dtype == np.uint8 and fused.shape == full.shape
    assert np.abs(fused.astype(int) - plain.astype(int)).max() <= 2
    assert np.abs(fused.astype(int) - full.astype(int)).max() <= 3
