"""Throughput of napari_vdsr.core.restore() against the sgemm roofline of this machine.

Prints, all measured in the same run:

* output Mpx/s of ``restore()`` (super-resolution of a grey ``--size`` x ``--size`` uint8
  image by ``--scale``, tiled with ``--tile``);
* sgemm GFLOP/s (``torch.mm`` of two large square float32 matrices);
* the ratio to the roofline: throughput x 1.329 MFLOP/px / sgemm FLOP/s (1.0 = the
  network runs as fast as a plain matrix product would allow);
* tiled / untiled time ratio (the cost of the halo);
* peak RSS after the tiled run and after the untiled run.

Example::

    python benchmarks/throughput.py --size 1024 --scale 2 --tile 512
    python benchmarks/throughput.py --size 128 --repeat 1        # quick smoke run
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time

import numpy as np
import torch


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def sgemm_gflops(n: int, repeat: int, device: torch.device) -> float:
    a = torch.rand(n, n, device=device)
    b = torch.rand(n, n, device=device)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def time_restore(img, model, scale, tile, device, repeat: int) -> float:
    from napari_vdsr.core.restore import restore

    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        restore(img, task="sr", scale=scale, model=model, tile=tile, device=device)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    from napari_vdsr.core.device import resolve_device
    from napari_vdsr.core.model import FLOPS_PER_PIXEL, VDSR
    from napari_vdsr.core.weights import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="input side in pixels (default 1024)")
    ap.add_argument("--scale", type=float, default=2.0, help="SR factor (default 2: 1024² → 2048²)")
    ap.add_argument("--tile", type=int, default=512, help="tile size of the tiled run (default 512)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--model", default=None, help="model name/file (default: a randomly initialised 20-layer VDSR)")
    ap.add_argument("--repeat", type=int, default=2, help="timed repetitions; the best is reported (default 2)")
    ap.add_argument("--gemm-size", type=int, default=2048, help="side of the sgemm matrices (default 2048)")
    ap.add_argument("--no-untiled", action="store_true", help="skip the untiled run (it needs ~1 KiB per output px)")
    a = ap.parse_args(argv)

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = resolve_device(a.device)
    if a.model:
        net, card = load_model(a.model, task="sr")
        model = (net, card)
    else:
        torch.manual_seed(0)
        net = VDSR().eval()
        model = net
    flops_px = net.flops_per_pixel() if hasattr(net, "flops_per_pixel") else FLOPS_PER_PIXEL

    img = np.random.default_rng(0).integers(0, 256, (a.size, a.size), dtype=np.uint8)
    oh = ow = int(round(a.size * a.scale))
    out_px = oh * ow
    print(f"machine: {platform.machine()} {platform.processor() or ''}; torch {torch.__version__}; "
          f"device {dev}; threads {torch.get_num_threads()}", flush=True)
    print(f"image: {a.size}x{a.size} uint8 → x{a.scale:g} → {oh}x{ow}; tile {a.tile}; "
          f"net depth {net.depth} width {net.width} ({flops_px / 1e6:.3f} MFLOP/px)", flush=True)

    # warm-up (first-call allocations, oneDNN kernel selection)
    time_restore(img[: min(a.size, 64), : min(a.size, 64)], model, a.scale, a.tile, dev, 1)

    gflops = sgemm_gflops(a.gemm_size, 3, dev)
    print(f"sgemm {a.gemm_size}x{a.gemm_size}: {gflops:.1f} GFLOP/s", flush=True)

    t_tiled = time_restore(img, model, a.scale, a.tile, dev, a.repeat)
    rss_tiled = peak_rss_mib()
    mpx = out_px / t_tiled / 1e6
    roofline = mpx * 1e6 * flops_px / (gflops * 1e9)
    print(f"tiled:   {t_tiled:.2f} s  {mpx:.4f} Mpx/s (output)  roofline ratio {roofline:.3f}  "
          f"(limit {gflops * 1e9 / flops_px / 1e6:.4f} Mpx/s)  peak RSS {rss_tiled:.0f} MiB", flush=True)

    if not a.no_untiled:
        t_un = time_restore(img, model, a.scale, max(oh, ow) + 1, dev, a.repeat)
        rss_un = peak_rss_mib()
        mpx_un = out_px / t_un / 1e6
        print(f"untiled: {t_un:.2f} s  {mpx_un:.4f} Mpx/s  roofline ratio "
              f"{mpx_un * 1e6 * flops_px / (gflops * 1e9):.3f}  peak RSS {rss_un:.0f} MiB", flush=True)
        print(f"tiled/untiled time ratio: {t_tiled / t_un:.3f}", flush=True)
    gflops_after = sgemm_gflops(a.gemm_size, 3, dev)
    print(f"sgemm again after the runs: {gflops_after:.1f} GFLOP/s "
          f"(a large change means the machine was busy)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
