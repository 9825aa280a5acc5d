"""Training-step speed against the hardware limit.

Prints the measured time of one optimisation step (forward + backward + update) of
VDSR on a batch of patches, and the ratio ideal / measured where
ideal = 3 x forward FLOPs / sgemm rate measured in the same run
(backward costs about twice the forward).  Variants, each timed in the same run:

* ``fp32 plain``: NCHW layout, the whole batch in one forward/backward (the usual loop);
* ``fp32 engine``: what ``napari_vdsr.core.train`` does in float32 -- channels_last and,
  on the CPU, gradient accumulation over chunks of ~27k pixels (``--micro-batch``);
* ``bf16 engine`` (CPUs with AMX/AVX512-BF16) or ``autocast`` (CUDA): the engine's default
  mixed precision, naming the card on CUDA.

    python benchmarks/train_step.py [--batch 64] [--patch 41] [--steps 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mib, sgemm_gflops  # noqa: E402

from napari_vdsr.core.model import VDSR  # noqa: E402
from napari_vdsr.core.train import auto_micro_batch, clip_gradients  # noqa: E402


def time_steps(model, x, y, steps, amp_dtype=None, channels_last=False, micro=None) -> float:
    dev = x.device
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x, y = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
    n = x.shape[0]
    micro = micro or n

    def one():
        opt.zero_grad(set_to_none=True)
        for i in range(0, n, micro):
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(x[i : i + micro])
            loss = 0.5 * (out.float() - y[i : i + micro]).pow(2).sum() / n
            loss.backward()
        clip_gradients(model.parameters(), 0.01, 0.01)
        opt.step()

    one()  # warm-up
    times = []
    for _ in range(steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        one()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--patch", type=int, default=41)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="chunk size of the engine variant (default: the engine's automatic choice)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    x = torch.rand(a.batch, 1, a.patch, a.patch, device=dev)
    y = torch.rand_like(x)
    fwd_flops = VDSR().flops_per_pixel() * a.batch * a.patch * a.patch
    micro = a.micro_batch or auto_micro_batch(a.batch, a.patch, dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}")
    print(f"batch {a.batch} x {a.patch}x{a.patch}: forward {fwd_flops / 1e9:.1f} GFLOP, step ~{3 * fwd_flops / 1e9:.1f} GFLOP")
    gf = sgemm_gflops(device=a.device)
    ideal = 3 * fwd_flops / (gf * 1e9)
    print(f"sgemm (fp32, same run): {gf:.1f} GFLOP/s  -> ideal step {ideal:.3f} s")
    t0 = time_steps(VDSR().to(dev), x, y, a.steps)
    print(f"fp32 plain (NCHW, whole batch): {t0:.3f} s  ideal/measured = {ideal / t0:.3f}")
    t = time_steps(VDSR().to(dev), x, y, a.steps, channels_last=True, micro=micro)
    print(f"fp32 engine (channels_last, chunks of {micro}): {t:.3f} s  ({3 * fwd_flops / t / 1e9:.1f} GFLOP/s)  "
          f"ideal/measured = {ideal / t:.3f}  (x{t0 / t:.2f} vs plain)")
    gf_after = sgemm_gflops(device=a.device)
    print(f"sgemm again: {gf_after:.1f} GFLOP/s (ideal/measured with it: {3 * fwd_flops / gf_after / 1e9 / t:.3f})")
    from napari_vdsr.core.device import cpu_has_fast_bf16

    if dev.type == "cpu" and cpu_has_fast_bf16():  # the engine's default on such CPUs
        t2 = time_steps(VDSR().to(dev), x, y, a.steps, amp_dtype=torch.bfloat16, channels_last=True, micro=micro)
        gf16 = sgemm_gflops(device=a.device, dtype=torch.bfloat16)
        print(f"CPU with native bf16: bf16 gemm {gf16:.1f} GFLOP/s")
        print(f"bf16 engine (autocast, channels_last, chunks of {micro}; the default here): {t2:.3f} s  "
              f"x{t / t2:.2f} vs fp32 engine; fp32-ideal/measured = {ideal / t2:.3f}; "
              f"ratio to bf16 peak = {3 * fwd_flops / t2 / 1e9 / gf16:.3f}")
    if dev.type == "cuda":
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        t2 = time_steps(VDSR().to(dev), x, y, a.steps, amp_dtype=amp, channels_last=True)
        gf16 = sgemm_gflops(device=a.device, dtype=amp)
        print(f"{amp} sgemm: {gf16:.1f} GFLOP/s")
        print(f"autocast {amp} + channels_last step: {t2:.3f} s  speed-up x{t / t2:.2f}  "
              f"ratio to {amp} peak = {3 * fwd_flops / t2 / 1e9 / gf16:.3f}")
    print(f"peak RSS: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
