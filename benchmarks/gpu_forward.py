"""How close the VDSR forward comes to a GPU's bf16 matrix-product peak.

Measures, in one run on one CUDA device:

* the bf16 matrix-product rate (``torch.mm`` of two ``--gemm`` x ``--gemm`` matrices,
  mean of 10 after warm-up) -- the "peak" the ratios use;
* the network alone (no I/O, no bicubic, no host copies): a 20-layer, 64-channel VDSR
  under bf16 autocast on ``batch x 1 x size x size`` inputs, as ``restore()`` runs it
  (``tiling.run_net``: convolution + bias + ReLU fused in cuDNN, :mod:`napari_vdsr.core.cuda_fused`;
  also with the thin first/last layers padded to 8 channels) and as a plain ``net(x)``
  (channels_last and contiguous), timed with CUDA events -- TFLOP/s counted as 1.329 MFLOP
  per pixel;
* the first, a middle and the last layer alone, thin and padded (milliseconds);
* the same with float32 (TF32 allowed and not) for reference.

Example::

    python benchmarks/gpu_forward.py --sizes 1024 2048 --batch 1 4
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _timed(fn, repeat: int) -> float:
    """Mean seconds per call over ``repeat`` calls, after two warm-ups (CUDA events)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeat


def bf16_peak(n: int) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    s = _timed(lambda: torch.mm(a, b), 10)
    return 2 * n**3 / s / 1e12


def layer_times(net, size: int, repeat: int) -> dict:
    """Milliseconds of the first, one middle and the last layer alone (bf16, channels_last, fused ReLU
    where the network has one), thin layers as they are and padded to 8 channels."""
    import torch.nn.functional as F

    from napari_vdsr.core.cuda_fused import _pad_dim

    convs = [m for m in net.body if isinstance(m, torch.nn.Conv2d)]
    cl = torch.channels_last
    bf = torch.bfloat16
    out = {}

    def conv(h, cv, relu, pad_in=0, pad_out=0):
        w = cv.weight.to(bf)
        b = cv.bias.to(bf)
        w = _pad_dim(_pad_dim(w, 1, pad_in), 0, pad_out).contiguous(memory_format=cl)
        b = _pad_dim(b, 0, pad_out)
        if relu:
            return lambda: torch.cudnn_convolution_relu(h, w, b, [1, 1], [1, 1], [1, 1], 1)
        return lambda: F.conv2d(h, w, b, padding=1)

    x1 = torch.rand(1, 1, size, size, device="cuda", dtype=bf).contiguous(memory_format=cl)
    x8 = _pad_dim(x1, 1, 8).contiguous(memory_format=cl)
    h = torch.rand(1, 64, size, size, device="cuda", dtype=bf).contiguous(memory_format=cl)
    cases = {"first 1->64": conv(x1, convs[0], True), "first padded 8->64": conv(x8, convs[0], True, pad_in=8),
             "middle 64->64": conv(h, convs[1], True), "last 64->1": conv(h, convs[-1], False),
             "last padded 64->8": conv(h, convs[-1], False, pad_out=8)}
    with torch.no_grad():
        for k, fn in cases.items():
            try:
                out[k] = _timed(fn, repeat) * 1e3
                print(f"layer {k:<20} {size}²: {out[k]:7.3f} ms", flush=True)
            except RuntimeError as e:
                print(f"layer {k}: failed ({e})", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--gemm", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 2
    from napari_vdsr.core.model import VDSR
    from napari_vdsr.core.cuda_fused import fused_forward, fused_op_ok

    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(0)
    peak = bf16_peak(a.gemm)
    print(f"{name}; torch {torch.__version__}; cuDNN {torch.backends.cudnn.version()}", flush=True)
    print(f"bf16 mm {a.gemm}³: {peak:.1f} TFLOP/s (the peak below)", flush=True)
    net = VDSR().cuda().eval()
    flop_px = net.flops_per_pixel() if hasattr(net, "flops_per_pixel") else 1.329e6
    rows = []
    for size in a.sizes:
        for batch in a.batch:
            for label, dtype, layout, tf32 in (
                ("bf16 fused (restore)", torch.bfloat16, torch.channels_last, True),
                ("bf16 fused, thin pad 8", torch.bfloat16, torch.channels_last, True),
                ("bf16 channels_last", torch.bfloat16, torch.channels_last, True),
                ("bf16 contiguous", torch.bfloat16, torch.contiguous_format, True),
                ("fp32 TF32 channels_last", None, torch.channels_last, True),
                ("fp32 strict channels_last", None, torch.channels_last, False),
            ):
                torch.backends.cudnn.allow_tf32 = tf32
                m = net.to(memory_format=layout)
                x = torch.rand(batch, 1, size, size, device="cuda").contiguous(memory_format=layout)

                def fwd():
                    with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                        if label.startswith("bf16 fused"):
                            fused_forward(m, x, torch.bfloat16, pad=8 if "pad" in label else 0)
                        else:
                            m(x)

                try:
                    s = _timed(fwd, a.repeat)
                except torch.cuda.OutOfMemoryError:
                    print(f"{label:<26} {batch}x{size}²: out of memory", flush=True)
                    torch.cuda.empty_cache()
                    continue
                px = batch * size * size
                tflops = px * flop_px / s / 1e12
                rows.append({"mode": label, "size": size, "batch": batch, "seconds": s, "mpx_s": px / s / 1e6,
                             "tflops": tflops, "of_bf16_peak": tflops / peak})
                print(f"{label:<26} {batch}x{size}²: {s * 1e3:8.2f} ms  {px / s / 1e6:9.1f} Mpx/s  "
                      f"{tflops:7.1f} TFLOP/s = {tflops / peak:.3f} of the bf16 peak", flush=True)
                x = None  # frees the input before the next one (fwd, which reads it, has run)
                torch.cuda.empty_cache()
    torch.backends.cudnn.allow_tf32 = True
    layers = layer_times(net, max(a.sizes), a.repeat)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "bf16_peak_tflops": peak, "rows": rows,
                       "fused_op_ok": fused_op_ok(torch.device("cuda"), torch.bfloat16), "layers": layers}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
