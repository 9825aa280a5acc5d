"""Peak memory of ``napari-vdsr predict`` streaming a large image, measured with ``/usr/bin/time -v``.

Writes a ``--size`` x ``--size`` uint16 TIFF (smooth random structures, uncompressed)
into a temporary folder, then runs, each as its own process:

* ``napari-vdsr predict in.tif -o out.zarr`` (read lazily, written block by block);
* optionally (``--formats``) the same to ``.ome.tif`` or ``.npy`` (also streamed);
* ``--in-memory``: a plain script that reads the whole TIFF, calls ``restore()`` on
  the numpy array and writes the result (the path without streaming), for comparison;

and reports the maximum resident set size and the wall time of each, plus the
baseline of a process that only imports torch and loads the model.  ``/usr/bin/time``
(Debian package ``time``) is used when present; otherwise the figure comes from
``os.wait4`` on the child (same kernel counter).

The model is the bundled default (20 layers) unless ``--depth`` asks for a randomly
initialised VDSR of that depth with 64 channels: the peak memory of a forward pass
depends on the tile and the width, not on the depth (on the CPU, where the network runs
row-streamed, on the band rather than the tile), so ``--depth 3`` measures about the same
memory in a fraction of the time (say so when you report such a figure).

Example::

    python benchmarks/batch_memory.py --size 2048 --scale 2           # the issue's target: < 1 GB
    python benchmarks/batch_memory.py --size 4096 --depth 3 --tile 512 --in-memory
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_vdsr.core.constants import DEFAULT_TILE


def smooth_image(size: int, seed: int = 0) -> np.ndarray:
    """uint16 image with blobs and edges (not white noise), built in strips to stay small in memory."""
    rng = np.random.default_rng(seed)
    out = np.empty((size, size), np.uint16)
    centres = rng.uniform(0, size, (64, 2))
    radii = rng.uniform(size / 60, size / 12, 64)
    xx = np.arange(size, dtype=np.float32)
    for y0 in range(0, size, 256):
        yy = np.arange(y0, min(size, y0 + 256), dtype=np.float32)[:, None]
        acc = np.full((len(yy), size), 300.0, np.float32)
        for (cy, cx), r in zip(centres, radii):
            acc += 3000.0 * np.exp(-((yy - cy) ** 2 + (xx[None] - cx) ** 2) / (2 * r * r))
        acc += rng.normal(0, 40, acc.shape).astype(np.float32)
        out[y0 : y0 + len(yy)] = np.clip(acc, 0, 65535).astype(np.uint16)
    return out


def measure(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """Run ``cmd``; return (peak RSS MiB, wall seconds, stderr tail)."""
    gnu_time = shutil.which("time") if os.path.exists("/usr/bin/time") else None
    t0 = time.perf_counter()
    if gnu_time:
        p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
        if p.returncode != 0 or not m:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
        return int(m.group(1)) / 1024, wall, p.stderr
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else ""
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return usage.ru_maxrss / 1024, wall, err


IN_MEMORY = """
import sys, numpy as np, tifffile
from napari_vdsr.core.restore import restore
img = tifffile.imread(sys.argv[1])
out = restore(img, task="sr", scale=float(sys.argv[3]), model=sys.argv[4], tile=int(sys.argv[5]), device="cpu")
tifffile.imwrite(sys.argv[2], out)
"""

BASELINE = """
import sys, torch
from napari_vdsr.core.weights import load_model
load_model(sys.argv[1], task="sr")
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=2048, help="input side in pixels (default 2048)")
    ap.add_argument("--scale", type=float, default=2.0, help="SR factor (default 2)")
    ap.add_argument("--tile", type=int, default=DEFAULT_TILE, help=f"tile size (default {DEFAULT_TILE}, the CLI's)")
    ap.add_argument("--depth", type=int, default=None,
                    help="random VDSR of this depth, width 64, instead of the bundled model (same memory, faster)")
    ap.add_argument("--formats", nargs="+", default=["zarr"], choices=["zarr", "ome.tif", "npy"],
                    help="streamed output formats to measure (default zarr)")
    ap.add_argument("--in-memory", action="store_true", help="also measure restore() on the whole numpy image")
    ap.add_argument("--threads", type=int, default=None, help="OMP/torch threads of the children")
    ap.add_argument("--keep", default=None, help="keep the files in this folder instead of a temporary one")
    a = ap.parse_args(argv)

    from napari_vdsr.core.model import VDSR
    from napari_vdsr.core.weights import default_model_name, resolve_model_path, save_model

    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="vdsr-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    try:
        import tifffile

        src = work / "input.tif"
        tifffile.imwrite(src, smooth_image(a.size), photometric="minisblack")
        if a.depth:
            import torch

            torch.manual_seed(0)
            model = save_model(VDSR(depth=a.depth), work / f"random-d{a.depth}.safetensors",
                               {"tasks": ["sr"], "scales": [2, 3, 4]})
            model_desc = f"random VDSR depth {a.depth}, width 64"
        else:
            model = resolve_model_path(default_model_name("sr"))
            model_desc = f"bundled {model.stem} (depth 20, width 64)"
        out_px = round(a.size * a.scale) ** 2
        gnu = os.path.exists("/usr/bin/time")
        print(f"input {a.size}x{a.size} uint16 TIFF ({src.stat().st_size / 2**20:.0f} MiB) → x{a.scale:g} → "
              f"{round(a.size * a.scale)}² ({out_px * 2 / 2**20:.0f} MiB uint16); tile {a.tile}; model {model_desc}; "
              f"peak RSS by {'/usr/bin/time -v' if gnu else 'os.wait4'}; load average "
              f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
        rss, wall, _ = measure([sys.executable, "-c", BASELINE, str(model)], env)
        print(f"{'baseline (import + model)':<28} peak RSS {rss:7.0f} MiB  {wall:7.1f} s", flush=True)
        for fmt in a.formats:
            dest = work / f"out.{fmt}"
            cmd = [sys.executable, "-m", "napari_vdsr.cli", "predict", str(src), "-o", str(dest), "--model",
                   str(model), "--scale", str(a.scale), "--tile", str(a.tile), "--device", "cpu", "--quiet",
                   "--overwrite"]
            rss, wall, _ = measure(cmd, env)
            print(f"{'predict → ' + fmt + ' (streamed)':<28} peak RSS {rss:7.0f} MiB  {wall:7.1f} s  "
                  f"({out_px / wall / 1e6:.4f} Mpx/s)", flush=True)
        if a.in_memory:
            cmd = [sys.executable, "-c", IN_MEMORY, str(src), str(work / "out-mem.tif"), str(a.scale), str(model),
                   str(a.tile)]
            rss, wall, _ = measure(cmd, env)
            print(f"{'restore() in memory':<28} peak RSS {rss:7.0f} MiB  {wall:7.1f} s", flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
