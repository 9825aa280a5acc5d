"""How close can a float32 VDSR layer get to sgemm on this CPU? The kernel ceiling of the roofline ratio.

The roofline ratio of ``benchmarks/throughput.py`` divides the network's arithmetic
(1.329 MFLOP per output pixel, 98 % of it in the 18 64 -> 64 3x3 convolutions) by the
sgemm rate.  ``restore()`` can at best run those convolutions as fast as the convolution
kernel itself runs, so the kernel's own ratio to sgemm bounds the end-to-end ratio from above.
This script measures that bound, in rounds that interleave sgemm readings with the work,
because this VM's sgemm wanders by +-5 % from minute to minute:

* ``fused``: one 64 -> 64 3x3 convolution + bias + ReLU through oneDNN's in-place operator,
  channels_last, on bands of the shapes the row-streamed path uses (what ``restore()`` runs);
* ``fused, no zeroing``: the same without zeroing the destination first (the operator
  accumulates into it, so this is the kernel alone, not a usable result);
* ``conv2d + relu_``: PyTorch's stock ``F.conv2d`` then ``relu_`` on the same bands;
* ``net (streamed)``: the whole 20-layer network streamed over a ``--size`` square,
  without bicubic, tiling or dtype conversion (``stream.stream_forward``);
* ``restore()``: super-resolution x2 of a uint8 image to a ``--size`` square output,
  end to end (bicubic, the streamed net, rounding back to uint8), one default tile.

Each ratio is the work's FLOP rate over the mean of the sgemm readings taken just before
and just after it.  Prints a table (median, min, max over rounds) and writes ``--json``.

Example::

    python benchmarks/conv_ceiling.py --rounds 5 --json docs/conv_ceiling.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import sgemm_gflops  # noqa: E402
from throughput import cpu_name  # noqa: E402

#: (rows, width) of the destination band: the default streamed bands for 1064- and
#: 2048-wide tiles (``stream.band_rows``), and a narrower / a taller one for contrast.
BANDS = [(38, 1064), (20, 2048), (80, 512), (76, 1064)]


def _conv_variants(rows: int, width: int):
    from napari_vdsr.core.stream import _fused_available

    cl = torch.channels_last
    g = torch.Generator().manual_seed(0)
    inp = (torch.rand(1, 64, rows + 2, width, generator=g) * 0.1).contiguous(memory_format=cl)
    w = torch.randn(64, 64, 3, 3, generator=g) * 0.01
    b = torch.randn(64, generator=g) * 0.01
    dst = torch.zeros(1, 64, rows, width).contiguous(memory_format=cl)
    out = {}
    if _fused_available():
        op = torch.ops.mkldnn._convolution_pointwise_.binary
        args = (inp, w, b, [0, 1], [1, 1], [1, 1], 1, "add", 1.0, "relu", [], "")

        def fused():
            dst.zero_()
            op(dst, *args)

        def fused_nozero():
            op(dst, *args)

        out["fused"] = fused
        out["fused, no zeroing"] = fused_nozero

    def stock():
        F.conv2d(inp, w, b, padding=(0, 1)).relu_()

    out["conv2d + relu_"] = stock
    return out, 2.0 * 64 * 64 * 9 * rows * width


def _timed(fn, flop: float, seconds: float, gemm: int) -> dict:
    fn()  # warm-up (primitive creation)
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    reps = max(2, int(seconds / max(one, 1e-6)))
    s0 = sgemm_gflops(gemm, 3)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    el = time.perf_counter() - t0
    s1 = sgemm_gflops(gemm, 3)
    gf = reps * flop / el / 1e9
    return {"gflops": gf, "sgemm": [s0, s1], "ratio": gf / ((s0 + s1) / 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=1.0, help="time per measurement (s)")
    p.add_argument("--size", type=int, default=1024, help="side of the streamed-net input and of the restore() output")
    p.add_argument("--gemm-size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from napari_vdsr.core.model import VDSR
    from napari_vdsr.core.restore import restore
    from napari_vdsr.core.stream import stream_forward
    from napari_vdsr.core.tiling import prepare_net

    torch.manual_seed(0)
    net = prepare_net(VDSR(), "cpu")
    x = torch.rand(1, 1, a.size, a.size)
    net_flop = a.size * a.size * 1.329e6

    def streamed():  # called inside the inference_mode block below
        stream_forward(net, x)

    img = np.random.default_rng(0).integers(0, 256, (a.size // 2, a.size // 2), dtype=np.uint8)
    raw = VDSR().eval()

    def restored():
        restore(img, task="sr", scale=2, model=raw, device="cpu")

    results: dict[str, list[dict]] = {}
    with torch.inference_mode():
        for r in range(a.rounds):
            for rows, width in BANDS:
                fns, flop = _conv_variants(rows, width)
                for name, fn in fns.items():
                    results.setdefault(f"{name} @ {rows}x{width}", []).append(_timed(fn, flop, a.seconds, a.gemm_size))
            results.setdefault(f"net (streamed) @ {a.size}x{a.size}", []).append(
                _timed(streamed, net_flop, a.seconds, a.gemm_size))
            results.setdefault(f"restore() x2 -> {a.size}x{a.size}", []).append(
                _timed(restored, net_flop, a.seconds, a.gemm_size))
            print(f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)

    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'work':42s} {'GFLOP/s':>8s} {'ratio to sgemm: median':>23s} {'min':>6s} {'max':>6s}")
    summary = {}
    for name, rs in results.items():
        ratios = [m["ratio"] for m in rs]
        med = statistics.median(ratios)
        gf = statistics.median(m["gflops"] for m in rs)
        summary[name] = {"median_ratio": med, "min_ratio": min(ratios), "max_ratio": max(ratios),
                         "median_gflops": gf, "rounds": rs}
        print(f"{name:42s} {gf:8.1f} {med:23.3f} {min(ratios):6.3f} {max(ratios):6.3f}")
    readings = [s for rs in results.values() for m in rs for s in m["sgemm"]]
    print(f"sgemm {a.gemm_size}^2 readings: {min(readings):.1f}-{max(readings):.1f} GFLOP/s, "
          f"median {statistics.median(readings):.1f}")
    if a.json:
        a.json.write_text(json.dumps({"cpu": cpu_name(), "threads": torch.get_num_threads(),
                                      "torch": torch.__version__, "results": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
