"""Refresh the SR cycle's resume point in the package from its run, and optionally commit it.

    python scripts/refresh_resume_point.py [--commit] [--every MINUTES] [--last | --checkpoint]

Reads scripts/sr_cycle.json; when ``runs/<run>/best.safetensors`` (the run's best-validated EMA
weights; with ``--last``, ``last.safetensors``, the EMA weights a stopped run exports at its last
step; with ``--checkpoint``, the EMA weights of the running run's last ``checkpoint.pt``, written
as ``runs/<run>/checkpoint-ema.safetensors`` with the best model's card brought to that step) is at
a later step than the package's ``<resume_point>`` model and than the cycle's start (whose weights
are the default's), re-bundles it under that name with ``scripts/bundle_model.py`` (not a default)
and, with ``--commit``, commits only those two files. ``--every`` repeats it every so many
minutes, for a session that may end while it trains: without ``runs/``,
``scripts/train_bundled.sh sr`` goes on from the last committed resume point.
Sessions 17-19 trained 12,000 steps of the fourth cycle and lost them with ``runs/`` because the
resume point was refreshed only at a session's end. In a cycle's constant-lr half the best-validated
weights stay at the cycle's start for thousands of steps (session 25), so ``--every`` runs with
``--checkpoint`` since then: the resume point follows the checkpoints.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def card_step(card_path: Path) -> int:
    """The training step a model card records (-1 when there is no card)."""
    if not card_path.is_file():
        return -1
    c = json.loads(card_path.read_text())
    return int(c.get("training", {}).get("steps") or c.get("metrics", {}).get("validation", {}).get("step") or -1)


def note_for(cycle: dict, step: int, val: dict, which: str = "best-validated") -> str:
    per = val.get("per_level") or {}
    scales = ", ".join(f"x{k} {v:.3f}" for k, v in sorted(per.items()))
    psnr = val.get("psnr")
    at = f" at step {int(val['step']):,}" if val.get("step") not in (None, step) else ""
    return (f"Resume point of the SR cycle in progress (runs/{cycle['run']}, scripts/sr_cycle.json), not a default: "
            f"the run's {which} EMA weights, step {step:,} (lr schedule: 1e-4 to step {cycle['decay_start']:,}, "
            f"cosine to 1e-6 at {cycle['iterations']:,}; --ema 0.999). Photos (training's validation{at}) "
            + (f"{psnr:.3f} ({scales})" if psnr is not None else "not measured")
            + f". By the rule fixed before the cycle ran (docs/training.md, '{cycle['rule']}') only its last weights "
            f"at step {cycle['iterations']:,} may replace the default. Without runs/, scripts/train_bundled.sh sr "
            f"continues from these weights (--from this model --start-step {step} --warmup 1000; Adam restarts). "
            "Refreshed by scripts/refresh_resume_point.py while the run trained.")


def checkpoint_ema(run: Path) -> Path | None:
    """Write the EMA weights of ``run``'s ``checkpoint.pt`` as ``run/checkpoint-ema.safetensors``; its path.

    The card is the best model's, with the checkpoint's step, compute hours and the last validation
    at or before that step (``log.jsonl``); ``bundle_model.py`` then redoes the legs up to that step.
    None when the run has no checkpoint or best model yet, or when they are not readable (being written).
    """
    from napari_vdsr.core.errors import ModelError, TrainingError
    from napari_vdsr.core.runlog import read_log
    from napari_vdsr.core.train import load_checkpoint
    from napari_vdsr.core.weights import load_model, save_model

    ck_path, best = run / "checkpoint.pt", run / "best.safetensors"
    if not (ck_path.is_file() and best.is_file()):
        return None
    try:
        ck = load_checkpoint(ck_path)
        net, card = load_model(best)
    except (TrainingError, ModelError) as e:  # a file mid-write: the next time will do
        print(f"refresh_resume_point: {run} not readable now ({e}); trying again next time", flush=True)
        return None
    step = int(ck["step"])
    net.load_state_dict(ck.get("ema") or ck["model"])
    card = {k: v for k, v in card.items() if k not in ("architecture", "path")}
    card["training"] = {**card.get("training", {}), "steps": step,
                        "compute_hours": round(float(ck.get("compute_seconds", 0.0)) / 3600, 4)}
    vals = [ev for ev in (read_log(run / "log.jsonl") if (run / "log.jsonl").is_file() else [])
            if ev["kind"] == "val" and ev.get("val_psnr") is not None and int(ev["step"]) <= step]
    if vals:
        v = vals[-1]
        card["metrics"] = {**card.get("metrics", {}), "validation": {
            "psnr": v["val_psnr"], "baseline_psnr": v.get("val_baseline_psnr"),
            "per_level": v.get("val_per_level") or {}, "step": int(v["step"])}}
    return save_model(net, run / "checkpoint-ema.safetensors", card)


def refresh(commit: bool, root: Path = ROOT, last: bool = False, checkpoint: bool = False) -> bool:
    """Re-bundle the run's best (``last``: last; ``checkpoint``: its checkpoint's EMA) weights as the
    resume point when they are newer; True when it did."""
    weights = root / "src" / "napari_vdsr" / "weights"
    cycle = json.loads((root / "scripts" / "sr_cycle.json").read_text())
    run = root / "runs" / cycle["run"]
    best = run / ("last.safetensors" if last else "best.safetensors")
    which = "last (a stopped run's)" if last else "best-validated"
    if checkpoint:
        best = checkpoint_ema(run) or run / "checkpoint-ema.safetensors"
        which = "last checkpoint's"
    name = cycle["resume_point"]
    if not best.is_file():
        print(f"refresh_resume_point: no {best.relative_to(root)} yet", flush=True)
        return False
    step, have = card_step(best.with_suffix(".json")), card_step(weights / f"{name}.json")
    files = [str((weights / f"{name}{ext}").relative_to(root)) for ext in (".safetensors", ".json")]
    # weights at the cycle's start are the previous cycle's last ones, i.e. the default itself (session 25
    # bundled such a copy): without a resume point train_bundled.sh goes on from the default instead
    bundled = step > max(have, int(cycle["start_step"]))
    if bundled:
        val = json.loads(best.with_suffix(".json").read_text()).get("metrics", {}).get("validation", {})
        subprocess.run([sys.executable, str(ROOT / "scripts" / "bundle_model.py"), str(best), "--name", name,
                        "--note", note_for(cycle, step, val, which),
                        "--dir", str(weights)], check=True, cwd=root)
    elif step <= int(cycle["start_step"]):
        print(f"refresh_resume_point: the run's {which} weights are at step {step:,}, the cycle's "
              f"start (the default's weights): nothing to bundle", flush=True)
    else:
        print(f"refresh_resume_point: {name} is at step {have:,}; the run's {which} weights are at step {step:,}: "
              "nothing to bundle",
              flush=True)
    # commit what is bundled and not committed yet (this time's, or an earlier time's failed commit)
    if commit and subprocess.run(["git", "status", "--porcelain", "--", *files], cwd=root, capture_output=True,
                                 text=True, check=True).stdout.strip():
        val = json.loads((weights / f"{name}.json").read_text()).get("metrics", {}).get("validation", {})
        subprocess.run(["git", "add", *files], check=True, cwd=root)
        psnr = val.get("psnr")
        msg = (f"Resume point {name} refreshed to step {card_step(weights / f'{name}.json'):,} of runs/{cycle['run']}"
               + (f" (photos validation {psnr:.3f})" if psnr is not None else ""))
        r = subprocess.run(["git", "commit", "-q", "--only", "-m", msg, *files], cwd=root)
        print(f"refresh_resume_point: {'committed' if r.returncode == 0 else 'commit failed (retried next time)'}: "
              f"{msg}", flush=True)
    return bundled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commit", action="store_true", help="commit the refreshed files (only those)")
    ap.add_argument("--every", type=float, default=None, metavar="MINUTES", help="repeat every so many minutes")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--last", action="store_true", help="the run's last export (after it stopped), not its best")
    which.add_argument("--checkpoint", action="store_true",
                       help="the EMA weights of the run's last checkpoint (while it trains), not its best")
    a = ap.parse_args()
    while True:
        try:
            refresh(a.commit, last=a.last, checkpoint=a.checkpoint)
        except subprocess.CalledProcessError as e:  # a failed bundle (e.g. the file mid-write) is tried again later
            print(f"refresh_resume_point: failed ({e}); trying again next time", flush=True)
        if a.every is None:
            break
        time.sleep(a.every * 60)


if __name__ == "__main__":
    main()
