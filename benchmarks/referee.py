"""A held-out referee for training choices: SR on clean scikit-image photos (no benchmark set).

Training decisions (data preparation, recipes, which run to bundle) must not look at the
benchmark sets.  The runs' own validation crops come from the training images, so they
share those images' flaws: SunHays80's photos were saved as JPEG (8x8 block edges in 79
of 80 images), and a model that learned to reproduce such targets scores well there.
This script builds a small independent set from the images scikit-image ships whose
8x8 block-edge ratio is below 1.03 (no JPEG grid; measured here), makes the LR images
with the engine's bicubic (MATLAB's imresize convention) and scores models with the
paper's protocol (Y channel, 8-bit, ``scale`` px shaved) -- the same code as
``napari-vdsr evaluate``.

    python benchmarks/referee.py MODEL [MODEL ...] [--scales 2 3 4] [--json FILE]

MODEL: a bundled name, a ``.safetensors`` file or a run directory; ``bicubic`` for the baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

#: scikit-image images without a JPEG block grid (block-edge ratio < 1.03; astronaut 1.02,
#: coffee 0.99, chelsea 0.99, immunohistochemistry 0.99, brick 0.98, grass 1.00, gravel 0.99,
#: cell 1.00, hubble_deep_field 1.01), all shipped with the package (no download)
IMAGES = ["astronaut", "coffee", "chelsea", "immunohistochemistry", "brick", "grass", "gravel", "cell",
          "hubble_deep_field"]


def block_edge_ratio(y: np.ndarray) -> float:
    """Mean horizontal step across 8-px block borders / elsewhere (1: no JPEG grid)."""
    dx = np.abs(np.diff(np.asarray(y, np.float64), axis=1))
    col = np.arange(dx.shape[1]) % 8
    return float(dx[:, col == 7].mean() / max(1e-9, dx[:, col != 7].mean()))


def build(folder: Path, scale: int) -> Path:
    """``folder/x{scale}/HR/*.png``: the images mod-cropped to a multiple of ``scale``."""
    import skimage.data
    from PIL import Image

    hr = folder / f"x{scale}" / "HR"
    hr.mkdir(parents=True, exist_ok=True)
    for name in IMAGES:
        img = getattr(skimage.data, name)()
        if img.ndim == 3:
            img = img[..., :3]
        h, w = img.shape[:2]
        img = img[: h - h % scale, : w - w % scale]
        Image.fromarray(np.ascontiguousarray(img)).save(hr / f"{name}.png")
    return hr.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--scales", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from napari_vdsr.core.evaluate import evaluate_dataset

    res: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sets = {s: build(Path(tmp), s) for s in a.scales}
        for m in a.models:
            row = {}
            for s in a.scales:
                r = evaluate_dataset(sets[s], task="sr", scale=s, model=m, device=a.device, generate_lr=True)
                row[f"x{s}"] = round(float(r["psnr"]), 4)
            row["mean"] = round(float(np.mean([row[f"x{s}"] for s in a.scales])), 4)
            res[m] = row
            print(f"{m}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"images": IMAGES, "results": res}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
