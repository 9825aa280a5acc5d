"""Does torch.compile (Triton templates, max-autotune) beat cuDNN for the VDSR forward on a GPU?

    python benchmarks/gpu_compile.py [--size 2048] [--batch 1] [--json FILE]

Prints TFLOP/s and the ratio to the bf16 ``torch.mm`` peak measured in the same run, for
eager cuDNN (bf16 autocast, channels_last) and for ``torch.compile(mode=...)`` of the same net.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from napari_vdsr.core.model import VDSR


def timed(fn, x, reps=10):
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def mm_peak(n=8192):
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = timed(lambda _: a @ a, None, reps=20)
    return 2 * n**3 / t


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=["max-autotune-no-cudagraphs", "max-autotune"])
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    peak = mm_peak()
    print(f"bf16 mm peak {peak / 1e12:.0f} TFLOP/s ({torch.cuda.get_device_name(0)}, torch {torch.__version__})", flush=True)
    net = VDSR().cuda().eval().to(memory_format=torch.channels_last)
    x = torch.rand(a.batch, 1, a.size, a.size, device="cuda").contiguous(memory_format=torch.channels_last)
    flops = net.flops_per_pixel() * a.batch * a.size * a.size
    torch.backends.cudnn.benchmark = True
    res = {"peak_tflops": peak / 1e12, "size": a.size, "batch": a.batch}

    def eager(t):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return net(t)

    t = timed(eager, x)
    res["eager_cudnn"] = flops / t / 1e12
    print(f"eager cuDNN bf16: {flops / t / 1e12:.0f} TFLOP/s = {flops / t / peak:.3f} of peak", flush=True)
    ref = eager(x).float()
    for mode in a.modes:
        try:
            c = torch.compile(net, mode=mode)

            def comp(t, c=c):
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return c(t)

            t0 = time.perf_counter()
            y = comp(x).float()
            torch.cuda.synchronize()
            ct = time.perf_counter() - t0
            t = timed(comp, x)
            err = (y - ref).abs().max().item()
            res[mode] = flops / t / 1e12
            print(f"compile {mode}: {flops / t / 1e12:.0f} TFLOP/s = {flops / t / peak:.3f} of peak "
                  f"(compile {ct:.0f} s, max |diff| to eager {err:.2e})", flush=True)
        except Exception as e:  # report and go on
            print(f"compile {mode}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    if a.json:
        json.dump(res, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
