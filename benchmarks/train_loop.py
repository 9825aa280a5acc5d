"""Where the time of a real training loop goes: batches, host work, waiting for the device.

Runs :class:`napari_vdsr.core.train.Trainer` (the engine ``napari-vdsr train`` uses) for
``--seconds`` on real images and splits each step's wall time into

* **batch**: waiting for the step's patches (``Trainer._batch``: the batch-drawing worker
  processes, or drawing in-process with ``--workers 0``, plus the copy to the device);
* **host**: the rest of ``Trainer._train_step`` -- Python and kernel launches of forward,
  backward, clipping and the optimiser (on a GPU the kernels run asynchronously, so this
  is host time, not device time);
* **wait**: reading the losses back (``Trainer._read_losses``: on a GPU this is where the host
  waits for the device to finish the queued steps);
* **other**: events, logging, validation and checkpoints.

If *batch* dominates, add workers; if *host* dominates, the step is launch-bound (CUDA
graphs / ``torch.compile`` would help); if *wait* dominates, the device is the limit.
``--profile`` then runs 20 more steps under torch.profiler and prints its operator table.

    python benchmarks/train_loop.py --data ../shared/data/train/SunHays80 --device cuda \\
        --workers 8 --batch 64 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import torch

from napari_vdsr.core.train import Trainer, TrainConfig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="training images (folder / files)")
    ap.add_argument("--task", default="sr", choices=["sr", "denoise", "deblock"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--patch", type=int, default=41)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--warmup", type=int, default=20, help="steps not counted (default 20)")
    ap.add_argument("--amp", choices=["on", "off"], default="on", help="mixed precision (the engine's default: on)")
    ap.add_argument("--ema", type=float, default=None, help="weight averaging as the bundled runs train (0.999)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    amp = a.amp == "on"
    cfg = TrainConfig(data=[a.data], task=a.task, batch_size=a.batch, patch_size=a.patch, iterations=10**9,
                      val_fraction=0.0, lr_schedule="constant", device=a.device, amp=amp, workers=a.workers,
                      out=None, checkpoint_minutes=10**6, ema=a.ema)
    tr = Trainer(cfg)
    spent: dict[str, float] = defaultdict(float)
    counting = {"on": False}

    def timed(name, fn):
        def wrapper(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                if counting["on"]:
                    spent[name] += time.perf_counter() - t
        return wrapper

    tr._batch = timed("batch", tr._batch)
    real_step = tr._train_step
    tr._train_step = timed("step", real_step)
    tr._read_losses = timed("wait", tr._read_losses)

    steps = 0
    t_start = None
    wall = None
    prof = None
    prof_until = None
    for ev in tr.run():
        if ev.kind != "step":
            continue
        steps += 1
        if steps == a.warmup:
            if tr.device.type == "cuda":
                torch.cuda.synchronize()
            counting["on"] = True
            t_start = time.perf_counter()
        elif t_start is not None and wall is None and time.perf_counter() - t_start >= a.seconds:
            if tr.device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t_start
            counting["on"] = False
            measured = steps - a.warmup
            if not a.profile:
                tr.stop()
                continue
            # after the timed window, so the profiler's own cost is not in the figures
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if tr.device.type == "cuda" else [])
            prof = profile(activities=acts)
            prof.__enter__()
            prof_until = steps + 20
        elif prof is not None and steps >= prof_until:
            prof.__exit__(None, None, None)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
            prof = None
            tr.stop()
    if wall is None:  # the loop ended early
        wall = time.perf_counter() - (t_start or time.perf_counter())
        measured = max(0, steps - a.warmup)
    n = max(1, measured)
    host = spent["step"] - spent["batch"]
    parts = {"batch": spent["batch"], "host": host, "wait": spent["wait"],
             "other": wall - spent["step"] - spent["wait"]}
    dev = torch.cuda.get_device_name(tr.device) if tr.device.type == "cuda" else str(tr.device)
    print(f"{dev}; torch {torch.__version__}; task {a.task}, batch {a.batch} x {a.patch}², workers {a.workers}, "
          f"precision {tr.amp_dtype or 'float32'}, ema {a.ema}")
    print(f"{n} steps in {wall:.1f} s: {n / wall:.1f} steps/s, {n * a.batch / wall:.0f} patches/s")
    for k, v in parts.items():
        print(f"  {k:<6} {v / n * 1e3:8.2f} ms/step  ({v / wall:5.1%})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": dev, "steps": n, "seconds": wall, "steps_per_s": n / wall,
                       "ms_per_step": {k: v / n * 1e3 for k, v in parts.items()}, "workers": a.workers,
                       "batch": a.batch, "patch": a.patch, "task": a.task}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
