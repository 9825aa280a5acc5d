"""Throughput of napari_vdsr.core.restore() against the sgemm roofline, tiled vs untiled vs a plain forward.

Prints, all measured in the same run (each variant in its own child process, so that
its peak RSS is its own):

* output Mpx/s of ``restore()`` (super-resolution of a grey ``--size`` x ``--size`` uint8
  image by ``--scale``) for every tile size in ``--tiles`` and untiled;
* the same image through a *plain whole-image forward* of the same network -- the
  usual reimplementation style: ``F.interpolate`` bicubic to the target size, then one
  ``model(x)`` on the full float32 tensor under ``torch.no_grad()`` -- for a side-by-side
  ratio (> 1 = restore() is faster);
* sgemm GFLOP/s (``torch.mm`` of two ``--gemm-size`` float32 matrices), before and after
  the runs (a large change means the machine was busy) and, on the CPU, between the
  variants too, with every ratio also given against the median and the highest reading;
* the ratio to the roofline: throughput x FLOP/px / sgemm FLOP/s (1.0 = the network
  runs as fast as a plain matrix product would allow);
* tiled / untiled time ratio and the halo work ratio sum(tile crops) / output pixels;
* with ``--unstreamed``, each tile size again with row streaming off (see
  ``napari_vdsr.core.stream``) for the speed-up it brings;
* peak RSS of each variant's process (it includes the Python + torch baseline,
  measured alone as ``baseline``).

Example::

    python benchmarks/throughput.py --size 1024 --scale 2 --tiles 512 768 1024
    python benchmarks/throughput.py --size 128 --repeat 1 --tiles 64     # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def sgemm_gflops(n: int, repeat: int, device: torch.device, clock=time.perf_counter,
                 dtype: torch.dtype = torch.float32) -> float:
    a = torch.rand(n, n, device=device, dtype=dtype)
    b = torch.rand(n, n, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, clock() - t0)
    return 2.0 * n**3 / best / 1e9


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def halo_work_ratio(out_hw: tuple[int, int], tile: int, halo: int) -> float:
    """Pixels the net processes with halo tiling / output pixels (1.0 = no overhead)."""
    from napari_vdsr.core.tiling import tile_boxes

    h, w = out_hw
    work = 0
    for y0, y1, x0, x1 in tile_boxes((h, w), tile):
        work += (min(h, y1 + halo) - max(0, y0 - halo)) * (min(w, x1 + halo) - max(0, x0 - halo))
    return work / (h * w)


# --------------------------------------------------------------------------- child process


def _model(spec: str | None):
    from napari_vdsr.core.model import VDSR
    from napari_vdsr.core.weights import load_model

    if spec:
        net, _ = load_model(spec, task="sr")
        return net.eval()
    torch.manual_seed(0)
    return VDSR().eval()


def child(cfg: dict) -> dict:
    """Run one variant; returns its best time and peak RSS."""
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    from napari_vdsr.core.device import resolve_device
    from napari_vdsr.core.restore import restore

    dev = resolve_device(cfg["device"])
    img = np.random.default_rng(0).integers(0, 256, (cfg["size"], cfg["size"]), dtype=np.uint8)
    oh = ow = int(round(cfg["size"] * cfg["scale"]))
    if cfg["mode"] == "baseline":
        _model(cfg["model"])
        return {"seconds": 0.0, "rss_mib": peak_rss_mib()}
    net = _model(cfg["model"])

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if cfg["mode"] == "plain":
        net = net.to(dev)

        def once():
            x = torch.from_numpy(img.astype(np.float32) / 255.0)[None, None].to(dev)
            with torch.no_grad():
                x = torch.nn.functional.interpolate(x, size=(oh, ow), mode="bicubic", align_corners=False,
                                                    antialias=True)
                y = net(x)
            out = (y[0, 0].clamp(0, 1) * 255).round().byte().cpu().numpy()
            sync()
            return out
    else:
        tile = cfg["tile"] if cfg["mode"] == "tiled" else max(oh, ow) + 1

        def once():
            out = restore(img, task="sr", scale=cfg["scale"], model=net, tile=tile, device=dev, amp=cfg.get("amp"))
            sync()
            return out

    # warm-up on a small crop (first-call allocations, oneDNN kernel selection)
    small = img[: min(cfg["size"], 64), : min(cfg["size"], 64)]
    restore(small, task="sr", scale=cfg["scale"], model=net, tile=512, device=dev)
    best_wall = best_cpu = float("inf")
    for _ in range(cfg["repeat"]):
        t0, c0 = time.perf_counter(), time.process_time()
        once()
        best_wall = min(best_wall, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    seconds = best_cpu if cfg.get("clock") == "cpu" else best_wall
    return {"seconds": seconds, "wall_s": best_wall, "cpu_s": best_cpu, "rss_mib": peak_rss_mib()}


def run_child(cfg: dict) -> dict:
    env = dict(os.environ)
    if cfg.get("nostream"):
        env["NAPARI_VDSR_NO_STREAM"] = "1"
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        raise RuntimeError(f"child {cfg['mode']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    from napari_vdsr.core.device import resolve_device
    from napari_vdsr.core.model import FLOPS_PER_PIXEL

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="input side in pixels (default 1024)")
    ap.add_argument("--scale", type=float, default=2.0, help="SR factor (default 2: 1024² → 2048²)")
    ap.add_argument("--tiles", type=int, nargs="+", default=[512], help="tile sizes of the tiled runs (default 512)")
    ap.add_argument("--tile", type=int, default=None, help=argparse.SUPPRESS)  # old single-tile spelling
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--model", default=None, help="model name/file (default: a randomly initialised 20-layer VDSR)")
    ap.add_argument("--repeat", type=int, default=2, help="timed repetitions; the best is reported (default 2)")
    ap.add_argument("--gemm-size", type=int, default=2048, help="side of the sgemm matrices (default 2048)")
    ap.add_argument("--no-untiled", action="store_true", help="skip the untiled restore() run")
    ap.add_argument("--amp", action="store_true",
                    help="restore(amp=True): bf16 autocast on CUDA and on CPUs with AMX/AVX512-BF16; the ratios "
                         "then use the bf16 matmul rate as the roofline (the fp32 ratio is printed too)")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain whole-image forward")
    ap.add_argument("--unstreamed", action="store_true",
                    help="also run every tile size with row streaming off (NAPARI_VDSR_NO_STREAM=1) for a "
                         "side-by-side ratio (CPU float32 only)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="time to report: wall (default) or process CPU time -- with --threads 1 the CPU time "
                         "is the fairer figure on a machine that other jobs keep busy")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    tiles = [a.tile] if a.tile else a.tiles
    dev = resolve_device(a.device)
    net = _model(a.model)
    flops_px = net.flops_per_pixel() if hasattr(net, "flops_per_pixel") else FLOPS_PER_PIXEL
    oh = ow = int(round(a.size * a.scale))
    out_px = oh * ow
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    print(f"machine: {cpu_name()} ({os.cpu_count()} CPUs); torch {torch.__version__}; device {dev}; "
          f"threads {torch.get_num_threads()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    print(f"image: {a.size}x{a.size} uint8 → x{a.scale:g} → {oh}x{ow}; net depth {net.depth} width {net.width} "
          f"({flops_px / 1e6:.3f} MFLOP/px)", flush=True)

    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    gflops = sgemm_gflops(a.gemm_size, 5, dev, clock)
    limit = gflops * 1e9 / flops_px / 1e6
    print(f"sgemm {a.gemm_size}x{a.gemm_size}: {gflops:.1f} GFLOP/s → roofline {limit:.4f} Mpx/s "
          f"({a.clock} clock)", flush=True)

    fp32_limit = limit
    from napari_vdsr.core.device import autocast_dtype

    if a.amp and dev.type == "cpu" and autocast_dtype(dev, True) is not None:
        bf16 = sgemm_gflops(a.gemm_size, 3, dev, clock, torch.bfloat16)
        print(f"bf16 gemm {a.gemm_size}²: {bf16:.1f} GFLOP/s (CPU with native bf16) "
              f"→ bf16 roofline {bf16 * 1e9 / flops_px / 1e6:.4f} Mpx/s (the ratios below use it)", flush=True)
        gflops, limit = bf16, bf16 * 1e9 / flops_px / 1e6
    if dev.type == "cuda":  # restore() autocasts to bfloat16 on CUDA: the bf16 matmul rate is the roofline
        bf16 = sgemm_gflops(a.gemm_size * 2, 3, dev, clock, torch.bfloat16)
        print(f"bf16 gemm {a.gemm_size * 2}²: {bf16:.1f} GFLOP/s on {torch.cuda.get_device_name(dev)} "
              f"→ bf16 roofline {bf16 * 1e9 / flops_px / 1e6:.4f} Mpx/s (the ratios below use it)", flush=True)
        gflops, limit = bf16, bf16 * 1e9 / flops_px / 1e6
    base = {"size": a.size, "scale": a.scale, "device": a.device, "threads": a.threads, "model": a.model,
            "repeat": a.repeat, "clock": a.clock, "amp": True if a.amp else None}
    results: dict[str, dict] = {"baseline": run_child({**base, "mode": "baseline"})}
    print(f"baseline (python + torch + model, no work): peak RSS {results['baseline']['rss_mib']:.0f} MiB",
          flush=True)

    def report(name: str, r: dict, extra: str = "") -> None:
        mpx = out_px / r["seconds"] / 1e6
        r["mpx_s"], r["roofline"] = mpx, mpx / limit
        r["fp32_roofline"] = mpx / fp32_limit
        fp32 = f" (fp32 roofline {mpx / fp32_limit:.3f})" if limit != fp32_limit else ""
        print(f"{name:<24} {r['seconds']:8.2f} s ({a.clock}; wall {r['wall_s']:.2f} s)  {mpx:.4f} Mpx/s  "
              f"roofline {mpx / limit:.3f}{fp32}  peak RSS {r['rss_mib']:6.0f} MiB{extra}", flush=True)

    between = [gflops] if dev.type == "cpu" and limit == fp32_limit else []

    def reading() -> None:
        if between:
            between.append(sgemm_gflops(a.gemm_size, 3, dev, clock))

    for t in tiles:
        reading()
        r = run_child({**base, "mode": "tiled", "tile": t})
        r["halo_work"] = halo_work_ratio((oh, ow), t, net.depth)
        results[f"tile {t}"] = r
        report(f"tile {t}", r, f"  halo work ratio {r['halo_work']:.3f}")
        if a.unstreamed:
            u = run_child({**base, "mode": "tiled", "tile": t, "nostream": True})
            results[f"tile {t} unstreamed"] = u
            report(f"tile {t} (no streaming)", u, f"  streamed is {u['seconds'] / r['seconds']:.3f}x faster")
    if not a.no_untiled:
        reading()
        results["untiled"] = run_child({**base, "mode": "untiled"})
        report("untiled", results["untiled"])
    if not a.no_plain:
        reading()
        results["plain"] = run_child({**base, "mode": "plain"})
        report("plain forward", results["plain"])
    for t in tiles:
        r = results[f"tile {t}"]
        line = f"tile {t}:"
        if "untiled" in results:
            r["tiled_untiled"] = r["seconds"] / results["untiled"]["seconds"]
            line += f" tiled/untiled time {r['tiled_untiled']:.3f};"
        if "plain" in results:
            r["speedup_vs_plain"] = results["plain"]["seconds"] / r["seconds"]
            line += f" plain/restore time {r['speedup_vs_plain']:.3f} (> 1: restore is faster)"
        if line.endswith(":"):
            continue
        print(line, flush=True)
    gflops_after = sgemm_gflops(a.gemm_size, 5, dev, clock)
    print(f"sgemm again after the runs: {gflops_after:.1f} GFLOP/s (a large change means the machine was busy)",
          flush=True)
    if between:
        # the fp32 sgemm rate of a shared VM drifts between minutes: the readings taken between
        # the variants give a median (and a range) to judge each ratio by
        between.append(gflops_after)
        med = float(np.median(between))
        print(f"sgemm readings ({len(between)}, before, between and after the variants): min {min(between):.1f}, "
              f"median {med:.1f}, max {max(between):.1f} GFLOP/s", flush=True)
        for name, r in results.items():
            if "mpx_s" in r:
                r["roofline_median_sgemm"] = r["mpx_s"] / (med * 1e9 / flops_px / 1e6)
                r["roofline_max_sgemm"] = r["mpx_s"] / (max(between) * 1e9 / flops_px / 1e6)
                print(f"  {name:<24} ratio to the fp32 roofline at the median sgemm {r['roofline_median_sgemm']:.3f}"
                      f" (at the highest reading {r['roofline_max_sgemm']:.3f})", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu": cpu_name(), "load": load, "clock": a.clock, "threads": torch.get_num_threads(),
                       "sgemm_gflops": [gflops, gflops_after], "sgemm_readings": between, "size": a.size, "scale": a.scale,
                       "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
