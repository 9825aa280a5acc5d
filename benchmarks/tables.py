"""Benchmark tables of the bundled models (issue: bundled models that beat the paper).

Runs ``napari-vdsr evaluate`` (in-process, the same code as the command) for every cell
of the reference tables, with the baseline (bicubic / noisy / JPEG input) and the bundled
default model of each task, and writes

- ``docs/benchmarks.json``: every measured number;
- ``docs/benchmarks.md``: the tables (baseline, published reference, ours; PSNR and SSIM);
- ``docs/images/crops_<task>.png``: baseline (bicubic / degraded input) | ours | ground truth crops.

    python benchmarks/tables.py [--data ../shared/data/benchmarks] [--tasks sr denoise deblock]
                                [--sets Set5 Set14 BSD100] [--limit N] [--device auto] [--ensemble] [--update]

``--update`` re-measures only ``--tasks`` and keeps the other tasks' tables of the existing
``benchmarks.json`` (after a new model of one task).

``--ensemble`` also scores the x8 geometric self-ensemble of each model (``evaluate
--ensemble``: 8x the time) in a column of its own; the published numbers are single
forward passes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("sr", "denoise", "deblock")  # the order of the tables

REFERENCE = {
    # set: {scale: (bicubic, VDSR paper, SRCNN)}
    "sr": {
        "Set5": {2: (33.66, 37.53, 36.66), 3: (30.39, 33.66, 32.75), 4: (28.42, 31.35, 30.48)},
        "Set14": {2: (30.24, 33.03, 32.42), 3: (27.55, 29.77, 29.28), 4: (26.00, 28.01, 27.49)},
        "BSD100": {2: (29.56, 31.90, 31.36), 3: (27.21, 28.82, 28.41), 4: (25.96, 27.29, 26.90)},
    },
    # BSD68 sigma: (DnCNN-B, BM3D)
    "denoise": {"BSD68": {15: (31.61, 31.07), 25: (29.16, 28.57), 50: (26.23, 25.62)}},
    # LIVE1 quality: (input, AR-CNN, DnCNN-3)
    "deblock": {"LIVE1": {10: (27.77, 28.96, 29.19), 20: (30.07, 31.29, 31.59), 30: (31.41, 32.67, 32.98), 40: (32.35, 33.63, 33.96)}},
}


def run_eval(args: list[str]) -> dict:
    from napari_vdsr.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        rc = main(["evaluate", *args, "--json", str(out), "--quiet"])
        if rc != 0:
            raise SystemExit(f"evaluate {' '.join(args)} failed with exit code {rc}")
        return json.loads(out.read_text())


def cells(tasks, sets):
    for task in tasks:
        for ds, levels in REFERENCE[task].items():
            if task == "sr" and ds not in sets:
                continue
            for lev in levels:
                yield task, ds, lev


def level_args(task: str, lev) -> list[str]:
    return {"sr": ["--scale", str(lev)], "denoise": ["--sigma", str(lev)], "deblock": ["--quality", str(lev)]}[task]


def crops_figure(task: str, data: Path, out: Path, device: str) -> None:
    """baseline (bicubic or degraded input) | ours | ground truth, one crop, saved as PNG."""
    from PIL import Image, ImageDraw

    from napari_vdsr.core.evaluate import prepare_sample, score_sample

    if task == "sr":
        hr = data / "Set14" / "x3" / "HR"
        name = sorted(hr.glob("*.png"))[2]
        sample = prepare_sample(name, 2, task="sr", scale=3, lr_path=data / "Set14" / "x3" / "LR" / name.name)
        label = "Set14 x3"
    elif task == "denoise":
        name = sorted((data / "BSD68").glob("*.png"))[0]
        sample = prepare_sample(name, 0, task="denoise", sigma=25)
        label = "BSD68 sigma 25"
    else:
        name = sorted((data / "LIVE1").glob("*.png"))[0]
        sample = prepare_sample(name, 0, task="deblock", quality=10)
        label = "LIVE1 q 10"
    from napari_vdsr.core.weights import load_model

    from napari_vdsr.core.device import resolve_device

    dev = resolve_device(device)
    model, _ = load_model(None, task=task, device=dev)
    _, ours = score_sample(sample, model=model, device=dev)
    base = np.clip(np.round(sample.inp), 0, 255)
    gt = sample.target
    h, w = gt.shape
    c = min(160, h, w)
    y0, x0 = (h - c) // 2, (w - c) // 2
    tiles = [base, np.clip(np.round(ours), 0, 255), gt]
    titles = ["bicubic" if task == "sr" else "input", "VDSR (ours)", "ground truth"]
    zoom = 2
    canvas = Image.new("L", (len(tiles) * (c * zoom + 8), c * zoom + 24), 255)
    draw = ImageDraw.Draw(canvas)
    for i, (t, title) in enumerate(zip(tiles, titles)):
        crop = Image.fromarray(t[y0 : y0 + c, x0 : x0 + c].astype(np.uint8)).resize((c * zoom, c * zoom), Image.NEAREST)
        canvas.paste(crop, (i * (c * zoom + 8), 20))
        draw.text((i * (c * zoom + 8) + 4, 4), f"{title} ({label}, {name.stem})", fill=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "benchmarks"))
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--sets", nargs="+", default=["Set5", "Set14", "BSD100"])
    ap.add_argument("--limit", type=int, default=None, help="only the first N images of each set (quick look)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--ensemble", action="store_true", help="also score the x8 self-ensemble (8x the time)")
    ap.add_argument("--update", action="store_true",
                    help="keep the other tasks of OUT/benchmarks.json: replace only the tasks measured now")
    a = ap.parse_args()
    from napari_vdsr.core.errors import ModelError
    from napari_vdsr.core.weights import default_model_name, load_model

    data = Path(a.data)
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                     "date": time.strftime("%Y-%m-%d"), "models": {}, "cells": []}
    tasks = []
    for task in a.tasks:
        try:
            name = default_model_name(task)
            _, card = load_model(name, task=task)
            results["models"][task] = {"name": name, "steps": card.get("training", {}).get("steps"),
                                       "compute_hours": card.get("training", {}).get("compute_hours"),
                                       "compute_note": card.get("training", {}).get("compute_note")}
            tasks.append(task)
        except ModelError as exc:
            print(f"skipping {task}: {exc}", file=sys.stderr)
    for task, ds, lev in cells(tasks, a.sets):
        extra = level_args(task, lev) + (["--limit", str(a.limit)] if a.limit else [])
        common = ["--task", task, "--dataset", str(data / ds), "--device", a.device] + extra
        t = time.time()
        base = run_eval(common + ["--method", "bicubic" if task == "sr" else "identity"])
        ours = run_eval(common)
        row = {"task": task, "set": ds, "level": lev, "baseline_psnr": base["psnr"], "baseline_ssim": base["ssim"],
               "psnr": ours["psnr"], "ssim": ours["ssim"], "reference": REFERENCE[task][ds][lev],
               "images": len(ours["per_image"]), "seconds": round(time.time() - t, 1)}
        if a.ensemble:
            t = time.time()
            ens = run_eval(common + ["--ensemble"])
            row.update(ensemble_psnr=ens["psnr"], ensemble_ssim=ens["ssim"], ensemble_seconds=round(time.time() - t, 1))
        results["cells"].append(row)
        print(f"{task} {ds} {lev}: baseline {base['psnr']:.2f}  ours {ours['psnr']:.2f}  ref {REFERENCE[task][ds][lev]}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.update and (out / "benchmarks.json").is_file():
        results = merge(json.loads((out / "benchmarks.json").read_text()), results)
    (out / "benchmarks.json").write_text(json.dumps(results, indent=1) + "\n")
    for task in tasks:
        try:
            crops_figure(task, data, out / "images" / f"crops_{task}.png", a.device)
        except Exception as exc:  # a figure must not lose the tables
            print(f"figure for {task} failed: {exc}", file=sys.stderr)
    write_markdown(results, out / "benchmarks.md", a.limit)


def merge(old: dict, new: dict) -> dict:
    """``old`` tables with the tasks of ``new`` replaced (models and cells, the ensemble column too:
    a new model's cells carry only what was measured for it)."""
    models = {t: {"measured": old.get("date"), **m} for t, m in old.get("models", {}).items()}
    models.update({t: {**m, "measured": new["date"]} for t, m in new["models"].items()})
    cells = [c for c in old.get("cells", []) if c["task"] not in new["models"]] + new["cells"]
    cells.sort(key=lambda c: TASKS.index(c["task"]))  # stable: sets and levels keep their order
    return {**old, "date": new["date"], "models": {t: models[t] for t in TASKS if t in models}, "cells": cells}


def write_markdown(results: dict, path: Path, limit) -> None:
    L = ["# Benchmarks of the bundled models", "",
         f"Measured {'last ' if any('measured' in m for m in results['models'].values()) else ''}"
         f"{results['date']} on {results['machine']} with `python benchmarks/tables.py` "
         "(every number is `napari-vdsr evaluate`, protocol in [evaluation.md](evaluation.md))."
         + (f" **Quick look: first {limit} images per set only.**" if limit else ""), ""]
    for task, m in results["models"].items():
        note = f" ({m['compute_note']})" if m.get("compute_note") else ""
        when = f"; tables measured {m['measured']}" if m.get("measured") else ""
        L.append(f"- {task}: `{m['name']}` — {m['steps']} training steps, {m['compute_hours']} compute hours{note}{when}")
    L += ["", "Training recipes, the log and the validation PSNR against steps: [training.md](training.md).", ""]
    if any("ensemble_psnr" in c for c in results["cells"]):
        L += ["The last column of a table is the x8 geometric self-ensemble of the same model (`napari-vdsr "
              "evaluate --ensemble`, `restore(..., ensemble=True)`: the mean over 4 rotations x 2 mirror images, "
              "8x the time); the published numbers, the targets and the \"ours\" column are single forward passes. "
              "\"not run\": measured without it (CPU time); a table without that column: not yet measured "
              "for that model's current weights.", ""]
    heads = {
        "sr": ("Super-resolution (PSNR dB / SSIM on Y)", "scale", ["bicubic", "VDSR paper", "SRCNN"]),
        "denoise": ("Blind Gaussian denoising, BSD68 (PSNR dB / SSIM)", "σ", ["noisy input", "DnCNN-B", "BM3D"]),
        "deblock": ("JPEG artifact removal, LIVE1 (PSNR dB / SSIM on Y)", "quality", ["JPEG input", "AR-CNN", "DnCNN-3"]),
    }
    for task, (title, lvl, refs) in heads.items():
        rows = [c for c in results["cells"] if c["task"] == task]
        if not rows:
            continue
        ens = any("ensemble_psnr" in c for c in rows)
        L += [f"## {title}", "", f"| set | {lvl} | {refs[0]} (ours measured) | " + " | ".join(f"{r} (published)" for r in refs[1 if task != 'sr' else 0:]) + " | **ours** | ours − target |"
              + (" ours, x8 self-ensemble (− target) |" if ens else ""),
              "|---|---|---|" + "---|" * len(refs[1 if task != 'sr' else 0:]) + "---|---|" + ("---|" if ens else "")]
        for c in rows:
            ref = c["reference"]
            pub = ref if task == "sr" else ref[1:] if task == "deblock" else ref
            if task == "denoise":
                pub = ref
            target = ref[1] if task == "sr" else (ref[0] if task == "denoise" else ref[2])
            L.append(f"| {c['set']} | {c['level']} | {c['baseline_psnr']:.2f} / {c['baseline_ssim']:.4f} | "
                     + " | ".join(f"{v:.2f}" for v in pub)
                     + f" | **{c['psnr']:.2f}** / {c['ssim']:.4f} | {c['psnr'] - target:+.2f} |"
                     + ((f" {c['ensemble_psnr']:.2f} / {c['ensemble_ssim']:.4f} ({c['ensemble_psnr'] - target:+.2f}) |"
                         if "ensemble_psnr" in c else " not run |") if ens else ""))
        L += ["", f"![crops](images/crops_{task}.png)", ""]
    path.write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    main()
