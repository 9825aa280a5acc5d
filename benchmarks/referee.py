"""A held-out referee for training choices: clean scikit-image photos (no benchmark set).

Training decisions (data preparation, recipes, which run to bundle) must not look at the
benchmark sets.  The runs' own validation crops come from the training images, so they
share those images' flaws: SunHays80's photos were saved as JPEG (8x8 block edges in 79
of 80 images), and a model that learned to reproduce such targets scores well there.
This script builds a small independent set from the images scikit-image ships whose
8x8 block-edge ratio is below 1.03 (no JPEG grid; measured here) and scores models on
it with the benchmarks' protocol -- the same code as ``napari-vdsr evaluate``: SR
(LR made with the engine's bicubic, MATLAB's imresize convention; Y channel, 8-bit,
``scale`` px shaved), denoising (Gaussian σ 15 / 25 / 50 on grey) or JPEG (quality
10 / 20 / 30 / 40, Y).

    python benchmarks/referee.py MODEL [MODEL ...] [--task sr|denoise|deblock] [--levels ...] [--json FILE]
    python benchmarks/referee.py MODEL [MODEL ...] --crop 256

``--crop N`` scores the centre N-px crops of the same photos with the training validation's code
(``train --val-data <referee photos> --val-prescale 1 --val-crop N``; the LR is made from the crop,
the input is its bicubic upscale): the "referee crops" numbers of docs/training.md, for any
checkpoint, without a training run.

MODEL: a bundled name, a ``.safetensors`` file or a run directory; ``bicubic`` (SR) or
``identity`` (the noisy / JPEG input) for the baseline; ``bm3d`` (denoising only) for the
classical reference the published tables carry, when the optional ``bm3d`` package is
installed (``pip install bm3d``; not a dependency of napari-vdsr; about 15 s per image and σ).
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


RATIOS: dict[str, float] = {}  # block-edge ratio of each image, filled by build()
DEFAULT_LEVELS = {"sr": [2, 3, 4], "denoise": [15, 25, 50], "deblock": [10, 20, 30, 40]}
PREFIX = {"sr": "x", "denoise": "s", "deblock": "q"}  # of the level names in the results


#: the natural photographs among them, the kind of picture the SR benchmarks hold; the others are
#: textures (brick, grass, gravel) and microscopy / astronomy (cell, immunohistochemistry, hubble_deep_field)
PHOTOS = ["astronaut", "coffee", "chelsea"]


def build(folder: Path, scale: int = 1, images: list[str] | None = None) -> Path:
    """``folder/x{scale}/HR/*.png``: the images (default: all of ``IMAGES``) mod-cropped to a multiple of ``scale``."""
    import skimage.data
    from PIL import Image

    hr = folder / f"x{scale}" / "HR"
    hr.mkdir(parents=True, exist_ok=True)
    for name in images or IMAGES:
        img = getattr(skimage.data, name)()
        if img.ndim == 3:
            img = img[..., :3]
        RATIOS[name] = round(block_edge_ratio(img.mean(axis=-1) if img.ndim == 3 else img), 3)
        h, w = img.shape[:2]
        img = img[: h - h % scale, : w - w % scale]
        Image.fromarray(np.ascontiguousarray(img)).save(hr / f"{name}.png")
    return hr.parent


def bm3d_dataset(folder: Path, sigma: float) -> dict:
    """BM3D (the ``bm3d`` package, known σ) on the denoising samples ``evaluate`` builds for ``folder``."""
    try:
        import bm3d
    except ImportError as exc:
        raise SystemExit("the 'bm3d' reference needs the optional bm3d package: pip install bm3d") from exc
    from dataclasses import replace

    from napari_vdsr.core.evaluate import _list_images, find_dataset, prepare_sample, score_sample

    hr_dir, _ = find_dataset(folder, None)
    scores = []
    for i, f in enumerate(_list_images(hr_dir)):
        s = prepare_sample(f, i, task="denoise", sigma=sigma)  # the same noisy input as evaluate's
        out = np.asarray(bm3d.bm3d(s.inp / s.peak, sigma / 255.0), np.float64) * s.peak
        scores.append(score_sample(replace(s, inp=out))[0]["psnr"])  # scored as evaluate scores a model
    return {"psnr": float(np.mean(scores))}


def crop_scores(a: argparse.Namespace) -> int:
    """``--crop N``: every model on the referee photos' centre crops, scored by ``score_validation``."""
    import torch

    from napari_vdsr.core.data import load_planes, make_validation
    from napari_vdsr.core.train import score_validation
    from napari_vdsr.core.weights import load_model

    levels = a.levels or DEFAULT_LEVELS[a.task]
    prefix = PREFIX[a.task]
    res: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        planes = load_planes([build(Path(tmp), images=a.images) / "HR"])
    items = make_validation(planes, a.task, levels, a.crop)
    for m in a.models:
        if m in ("bicubic", "identity"):
            model: torch.nn.Module = torch.nn.Identity()
        else:
            model = load_model(m, task=a.task, device=a.device)[0]
        mean, _, per = score_validation(model, items, a.device)
        row = {f"{prefix}{k}": round(v, 4) for k, v in per.items()}
        row["mean"] = round(mean, 4)
        res[m] = row
        print(f"{m}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"task": a.task, "crop": a.crop, "images": a.images or IMAGES, "results": res}, indent=1) + "\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--task", choices=["sr", "denoise", "deblock"], default="sr")
    ap.add_argument("--levels", "--scales", type=int, nargs="+", default=None,
                    help="SR scales (default 2 3 4), noise σ (15 25 50) or JPEG qualities (10 20 30 40)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--crop", type=int, default=None,
                    help="score the centre crops of this size as training validation does (docs/training.md)")
    ap.add_argument("--images", nargs="+", default=None, metavar="NAME",
                    help=f"score these referee images only (default: all nine; 'photos' = {' '.join(PHOTOS)})")
    a = ap.parse_args(argv)
    if a.images == ["photos"]:
        a.images = list(PHOTOS)
    unknown = sorted(set(a.images or []) - set(IMAGES))
    if unknown:
        ap.error(f"unknown referee image(s) {', '.join(unknown)}; choose from {', '.join(IMAGES)} or 'photos'")
    if a.crop is not None:
        return crop_scores(a)
    from napari_vdsr.core.evaluate import evaluate_dataset

    levels = a.levels or DEFAULT_LEVELS[a.task]
    prefix = PREFIX[a.task]
    res: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        scale_of = {lv: lv if a.task == "sr" else 1 for lv in levels}
        built = {sc: build(Path(tmp), sc, a.images) for sc in set(scale_of.values())}
        sets = {lv: built[sc] for lv, sc in scale_of.items()}
        for m in a.models:
            row = {}
            for lv in levels:
                kw = {"sr": {"scale": lv, "generate_lr": True}, "denoise": {"sigma": lv}, "deblock": {"quality": lv}}[a.task]
                if m == "bm3d":
                    if a.task != "denoise":
                        raise SystemExit("the 'bm3d' reference is for --task denoise only.")
                    r = bm3d_dataset(sets[lv], lv)
                else:
                    r = evaluate_dataset(sets[lv], task=a.task, model=m, device=a.device, **kw)
                row[f"{prefix}{lv}"] = round(float(r["psnr"]), 4)
            row["mean"] = round(float(np.mean(list(row.values()))), 4)
            res[m] = row
            print(f"{m}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"task": a.task, "images": a.images or IMAGES, "block_edge_ratio": RATIOS, "results": res}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
