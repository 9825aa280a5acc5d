"""Validation PSNR against training steps for the three bundled-model runs.

Reads ``runs/<run>/log.jsonl`` (the engine's log: ``"kind": "val"`` lines; a point's machine is
its own ``"device"`` or that of the last ``"start"`` line before it: the card's name on a GPU), writes the curves to a small JSON file that is
committed (``docs/training_curves.json``, so the figure can be redrawn without the runs)
and draws ``docs/images/training_curves.png``.

    python scripts/plot_training.py                 # from the JSON and runs/ (runs that are gone keep their points), then draw
    python scripts/plot_training.py --from-json     # redraw from docs/training_curves.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the runs behind each bundled model, in the order they continued one another
RUNS = {"sr": ["sr-multiscale"], "sr-prescale": ["sr-prescale2"], "sr-grid": ["sr-cycle2"], "sr-photos": ["sr-cycle2", "sr-cycle3", "sr-cycle4", "sr-cycle5", "sr-cycle6"],
        "denoise": ["denoise", "denoise-s7", "denoise-gpu8", "denoise-gpu9", "denoise-gpu17"],
        "deblock": ["deblock", "deblock-s7", "deblock-gpu9", "deblock-gpu17"]}
#: one colour per card in every panel (a card not listed takes the next of GPU_COLOURS)
CARD_COLOURS = {"NVIDIA H200": "tab:green", "NVIDIA H100": "tab:blue"}
GPU_COLOURS = ["tab:orange", "tab:purple", "tab:brown"]
TITLES = {"sr": "SR, the first run (the default until session 12)\nmean of x2 / x3 / x4", "sr-prescale": "SR from step 48,250 on images shrunk by 2\n"
          "(validated on shrunk crops: another scale)", "denoise": "denoising, mean of σ 15 / 25 / 50",
          "deblock": "JPEG, mean of q 10 / 20 / 30 / 40",
          "sr-grid": "SR from scratch on the exact grid, x2 / x3 / x4\n(sessions 11-14; default at 53k, 63.5k and 86k steps)",
          "sr-photos": "the same run's later cycles (sessions 14-26)\nlr 1e-4, cosines from 90k, "
                       "120k, 160k, 190k and 210k"}
#: the steps of a run that a panel shows (its log holds the whole lineage, copied from run to run;
#: sr-cycle2 validated on other images from step 86,000: another panel)
STEPS = {"sr-grid": (0, 86000), "sr-photos": (86001, None)}
#: what a panel's PSNR is measured on (default: the held-out SunHays crops)
VAL_ON = {"sr-grid": "the referee photos' 256 px crops", "sr-photos": "the referee's three natural photos, whole"}
#: the first SR run's bundled checkpoints (pairs off the grid at x2 / x4), scored afterwards on the
#: referee crops (``benchmarks/referee.py MODEL --crop 256`` on the weights in git history)
REFERENCE_POINTS = {"sr-grid": {"label": "first SR run's bundled checkpoints (old grid)",
                                "points": {2800: 32.105, 7200: 32.619, 13000: 32.682, 27000: 32.862, 30500: 32.918,
                                           54500: 32.992}}}


def short_device(name: str) -> str:
    """``CPU``, a CPU's maker and family (``CPU Intel Xeon Platinum 8480+`` → ``CPU Intel Xeon``), or a
    card's name without its memory size (``NVIDIA H100 80GB HBM3`` → ``NVIDIA H100``)."""
    if name.lower() == "cpu":
        return "CPU"
    return " ".join(name.split()[:3 if name.startswith("CPU ") else 2])


def read_curves(runs: Path, known: dict | None = None) -> dict:
    """The curves of ``runs/``, after the points of ``known`` (the committed JSON) for the
    runs that are gone: a run's points replace the known ones from its first step on."""
    curves = {}
    for task, run_names in RUNS.items():
        points = list((known or {}).get(task, []))
        for run in run_names:
            log = runs / run / "log.jsonl"
            if not log.exists():
                continue
            lr_at = {}
            device = "CPU"
            for line in log.read_text().splitlines():
                d = json.loads(line)
                if d["kind"] == "start":
                    device = short_device(d.get("device", "cpu"))
                if d["kind"] == "step" and "lr" in d:
                    lr_at[d["step"]] = d["lr"]
                lo, hi = STEPS.get(task, (0, None))
                if d["kind"] == "val" and lo <= d["step"] and (hi is None or d["step"] <= hi):
                    pt = {"step": d["step"], "psnr": round(d["val_psnr"], 4),
                          "per_level": {k: round(v, 4) for k, v in d["val_per_level"].items()},
                          "input": round(d["val_baseline_psnr"], 4),
                          "device": short_device(d.get("device", device)), "lr": lr_at.get(d["step"])}
                    if "val_raw_psnr" in d:  # --ema: psnr is the moving average, raw the optimiser's weights
                        pt["raw"] = round(d["val_raw_psnr"], 4)
                    points.append(pt)
        if not points:
            continue
        # a later run that resumed from an earlier step replaces the points it re-did
        clean: list[dict] = []
        for p in points:
            while clean and clean[-1]["step"] >= p["step"]:
                clean.pop()
            clean.append(p)
        curves[task] = clean
    return curves


def draw(curves: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(3, len(curves))
    nrows = -(-len(curves) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.0 * nrows), constrained_layout=True, squeeze=False)
    for ax in axes.flat[len(curves):]:
        ax.set_visible(False)
    for ax, (task, pts) in zip(axes.flat, curves.items()):
        steps = [p["step"] for p in pts]
        lo = min(p["psnr"] for p in pts[len(pts) // 5:])
        ax.set_ylim(lo - 0.3, max(p["psnr"] for p in pts) + 0.15)
        ax.plot(steps, [p["psnr"] for p in pts], "k.-", lw=1.5, ms=3, label="mean over levels")
        ref = REFERENCE_POINTS.get(task)
        if ref:
            xs = [x for x in ref["points"] if x <= steps[-1] * 1.15] or list(ref["points"])[:1]
            ax.plot(xs, [ref["points"][x] for x in xs], "s--", color="tab:purple", ms=4, lw=1, label=ref["label"])
        raw = [p for p in pts if "raw" in p]
        if raw:
            ax.plot([p["step"] for p in raw], [p["raw"] for p in raw], ".", color="0.6", ms=3,
                    label="raw weights (black: their --ema average)")
        prev = None  # the lr last marked: a line where it changes by a factor of 2.5 or more (a step of a
        for p in pts:  # step schedule, a jump at a resume; a cosine gets one line per such factor)
            if p["lr"] is not None and prev is not None and max(p["lr"], prev) >= 2.5 * min(p["lr"], prev):
                ax.axvline(p["step"], color="tab:red", ls=":", lw=1)
                ax.text(p["step"], ax.get_ylim()[1], f"lr {p['lr']:.0e} ", color="tab:red", fontsize=7, va="top",
                        ha="right", rotation=90)
                prev = p["lr"]
            elif prev is None:
                prev = p["lr"]
        colours = {}  # one colour, and one legend entry, per GPU model
        i = 0
        while i < len(pts):  # shade each stretch that ran on a GPU, from the step it started at
            dev = pts[i]["device"]
            if dev == "CPU":
                i += 1
                continue
            j = i
            while j + 1 < len(pts) and pts[j + 1]["device"] == dev:
                j += 1
            start = pts[i - 1]["step"] if i else pts[i]["step"]
            new = dev not in colours
            colours.setdefault(dev, CARD_COLOURS.get(dev) or GPU_COLOURS[len(colours) % len(GPU_COLOURS)])
            ax.axvspan(start, pts[j]["step"], color=colours[dev], alpha=0.15, label=f"on {dev}" if new else None)
            i = j + 1
        ax.set_title(f"{task}: {TITLES[task]}")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"validation PSNR (dB, {VAL_ON.get(task, 'held-out SunHays crops')})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default=str(ROOT / "runs"))
    ap.add_argument("--json", default=str(ROOT / "docs" / "training_curves.json"))
    ap.add_argument("--png", default=str(ROOT / "docs" / "images" / "training_curves.png"))
    ap.add_argument("--from-json", action="store_true", help="redraw from --json instead of reading the runs")
    a = ap.parse_args(argv)
    if a.from_json:
        curves = json.loads(Path(a.json).read_text())
    else:
        known = json.loads(Path(a.json).read_text()) if Path(a.json).exists() else {}
        curves = read_curves(Path(a.runs), known)
        Path(a.json).write_text(json.dumps(curves, indent=0) + "\n")
    draw(curves, Path(a.png))
    for task, pts in curves.items():
        best = max(pts, key=lambda p: p["psnr"])
        print(f"{task}: {len(pts)} points, steps {pts[0]['step']}..{pts[-1]['step']}, best {best['psnr']:.3f} dB at {best['step']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
