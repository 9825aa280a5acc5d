"""Copy a trained run's best model into the package as a bundled model.

    python scripts/bundle_model.py runs/sr-multiscale --name vdsr-sr-x234 --default-for sr \
        [--benchmarks docs/benchmarks.json] [--note "..."]

The weights are re-saved (safetensors, float32) with a card that records the
training recipe, the compute spent, the validation metrics and, when given,
the benchmark table measured with ``napari-vdsr evaluate``.  The machine, batch and
learning rate of each leg of a run resumed across machines come from the run's
``log.jsonl`` (``napari_vdsr.core.runlog``); ``--compute-note`` adds prose.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from napari_vdsr.core.runlog import LEG_KEYS, continue_legs, describe_legs
from napari_vdsr.core.weights import BUNDLED_DIR, load_model, save_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run directory (or model file)")
    ap.add_argument("--name", required=True)
    ap.add_argument("--default-for", nargs="*", default=[])
    ap.add_argument("--tasks", nargs="*", default=None, help="override the tasks listed in the card")
    ap.add_argument("--benchmarks", default=None, help="JSON with benchmark metrics to store in the card")
    ap.add_argument("--note", default="")
    ap.add_argument("--dir", default=None, help="folder to write the model into (default: the package's weights)")
    ap.add_argument("--compute-note", default="", help="e.g. 'CPU, 2 cores (this project's dev machine)'")
    ap.add_argument("--batch-by-leg", default=None, metavar="JSON",
                    help='batch of each leg, e.g. \'{"0-29441": 32, "29441-55324": 64, "55324-140000": 32}\', for runs '
                         "whose early log lines lack the batch (before session 14)")
    ap.add_argument("--continues", default=None, metavar="MODEL",
                    help="the model (bundled name or file) a run continued with --from --start-step started from, "
                         "for a run whose checkpoint predates session 17 (newer checkpoints remember it): its card's "
                         "machine, batch and lr by leg come first")
    a = ap.parse_args()
    model, card = load_model(a.run)
    card.pop("path", None)
    card["name"] = a.name
    if a.tasks:
        card["tasks"] = a.tasks
    card["default_for"] = a.default_for
    tr = card.setdefault("training", {})
    run_dir = Path(a.run) if Path(a.run).is_dir() else Path(a.run).parent
    legs = describe_legs(run_dir / "log.jsonl", int(tr.get("steps", 0))) if tr.get("steps") else None
    start = int(tr.get("recipe", {}).get("start_step") or 0)
    earlier = None
    if a.continues:
        earlier = {k: v for k, v in load_model(a.continues)[1].get("training", {}).items() if k in LEG_KEYS}
    elif (run_dir / "checkpoint.pt").is_file():
        import torch

        earlier = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False).get("earlier_legs")
    if legs and earlier and start:  # a run continued from weights: how those were trained comes first
        legs = continue_legs(earlier, legs, start, int(tr["steps"]))
    if legs:  # machine, batch and lr by leg, from the run's log (a card exported by an older engine lacks them)
        tr.update(legs)
        print("legs from the log: " + json.dumps(legs))
    if a.batch_by_leg:
        tr["batch_by_leg"] = json.loads(a.batch_by_leg)
    elif "batch_by_leg" not in tr:
        print("warning: the log does not give the batch of every leg; pass --batch-by-leg to record it")
    val_data = tr.get("recipe", {}).get("val_data")
    if val_data:  # --val-data: every training image trains, validation on separate images
        card["training_data"] = (f"SunHays80 (80 natural RGB images, luminance), all {tr.get('train_planes', 80)} train; "
                                 f"validation on {tr.get('val_planes')} separate images ({', '.join(val_data)}); "
                                 "no benchmark image")
    else:
        card["training_data"] = (f"SunHays80 (80 natural RGB images, luminance), {tr.get('val_planes', 4)} held out for "
                                 "validation; no benchmark image")
    if a.benchmarks:
        card.setdefault("metrics", {})["benchmarks"] = json.loads(Path(a.benchmarks).read_text())
    if a.note:
        card["note"] = a.note
    if a.compute_note:
        card.setdefault("training", {})["compute_note"] = a.compute_note
    out = save_model(model, Path(a.dir or BUNDLED_DIR) / f"{a.name}.safetensors", card)
    print(f"bundled {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
