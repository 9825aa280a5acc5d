"""The ``evaluate`` and ``demo`` subcommands of the ``napari-vdsr`` CLI.

Both are thin layers over :mod:`napari_vdsr.core`: ``evaluate`` wraps
:func:`napari_vdsr.core.evaluate.iter_evaluate` in a tqdm bar, ``demo``
super-resolves an image shipped with scikit-image with the bundled model via
:func:`napari_vdsr.core.restore.restore`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["register", "cmd_evaluate", "cmd_demo", "DEMO_IMAGES"]

#: scikit-image sample images that ship inside the package (no download).
DEMO_IMAGES = ("astronaut", "camera", "coffee", "chelsea", "cell")
# where the zoomed crop of the comparison picture is centred (fractions of height, width)
_ZOOM_CENTRE = {"astronaut": (0.74, 0.3), "camera": (0.3, 0.5), "chelsea": (0.45, 0.35)}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` and ``demo`` subcommands to the CLI's subparsers."""
    p = sub.add_parser(
        "evaluate",
        help="PSNR/SSIM of a model (or of bicubic) on a dataset, with the paper's protocol",
        description=(
            "Evaluate a model, or the bicubic / noisy / JPEG input itself (--method bicubic), on a dataset with "
            "the VDSR paper's protocol: luminance Y, output rounded to uint8, `scale` border pixels shaved (SR), "
            "PSNR with peak 255. DATASET is a folder with HR/ (and optionally LR/), a benchmark root with "
            "x2/ x3/ x4/ folders, or a plain folder of images."
        ),
        epilog="example: napari-vdsr evaluate --task sr --scale 2 --dataset ../shared/data/benchmarks/Set5 "
               "--method bicubic --json set5_x2.json",
    )
    p.add_argument("--task", choices=["sr", "denoise", "deblock"], default="sr")
    p.add_argument("--scale", type=float, default=2.0, help="SR scale factor (picks the x{scale} folder of a benchmark root)")
    p.add_argument("--dataset", required=True, metavar="DIR", help="HR/[LR/] folder, benchmark root with x2/x3/x4, or image folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", default=None, metavar="NAME|PATH",
                   help="bundled model name, .safetensors file or run directory (default: the bundled model of the task)")
    g.add_argument("--method", choices=["bicubic", "identity"], default=None,
                   help="score a baseline instead of a model: the degraded input itself (bicubic for sr)")
    p.add_argument("--sigma", type=float, default=None, help="denoise: Gaussian noise σ on the 0..255 scale (e.g. 25)")
    p.add_argument("--quality", type=int, default=None, help="deblock: JPEG quality 1..100 (e.g. 10)")
    p.add_argument("--json", dest="json_path", default=None, metavar="FILE",
                   help="write the results (psnr, ssim, per_image, settings) to this JSON file")
    p.add_argument("--generate-lr", action="store_true", help="make LR images from HR even where an LR/ folder exists")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate only the first N images")
    p.add_argument("--ensemble", action="store_true",
                   help="score the x8 geometric self-ensemble (mean over 4 rotations x 2 mirror images; 8x the time)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--per-image", action="store_true", help="also print one line per image")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    d = sub.add_parser(
        "demo",
        help="super-resolve a bundled sample image and compare with bicubic (no download)",
        description=(
            "Shrink a sample image shipped with scikit-image by bicubic interpolation, super-resolve it with the "
            "bundled default model, write the result and a side-by-side PNG (bicubic | VDSR | ground truth) and "
            "print the PSNR of bicubic and of VDSR against the ground truth."
        ),
    )
    d.add_argument("--out", default="vdsr-demo", metavar="DIR", help="output folder (default ./vdsr-demo)")
    d.add_argument("--scale", type=float, default=2.0, help="scale factor (default 2)")
    d.add_argument("--image", choices=DEMO_IMAGES, default="astronaut", help="scikit-image sample image (default astronaut)")
    d.add_argument("--model", default=None, metavar="NAME|PATH", help="model to use (default: the bundled SR model)")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    d.set_defaults(func=cmd_demo)


# --------------------------------------------------------------------------- evaluate


def _fmt_settings(s: dict[str, Any]) -> str:
    what = s["model"] if s["method"] == "model" else s["method"]
    if s.get("ensemble"):
        what += " (x8 self-ensemble)"
    if s["task"] == "sr":
        level = f"x{s['scale']:g}" if isinstance(s["scale"], float) else f"x{s['scale']}"
        extra = f", LR {s['lr']}"
    elif s["task"] == "denoise":
        level, extra = f"σ={s['sigma']:g}", ""
    else:
        level, extra = f"q={s['quality']}", ""
    return f"{Path(s['dataset']).name} {s['task']} {level} {what}{extra}"


def cmd_evaluate(a: argparse.Namespace) -> int:
    """Run ``napari-vdsr evaluate``."""
    import warnings

    from tqdm import tqdm

    from .core.evaluate import evaluate_dataset

    model = a.method if a.method is not None else a.model
    if a.json_path:  # before the work: a path that cannot be written would lose the results at the end
        from .core.errors import InputError

        out = Path(a.json_path)
        if out.is_dir():
            raise InputError(f"--json {out} is a folder; give a file name, e.g. {out / 'results.json'}.")
        parent = next((q for q in out.parents if q.exists()), None)
        if parent is not None and not parent.is_dir():
            raise InputError(f"--json {out}: {parent} is a file, so the JSON cannot be written there.")
        if parent is not None and not os.access(parent, os.W_OK):
            raise InputError(f"--json {out}: {parent} is not writable; choose another path.")
    bar = None

    def progress(done: int, total: int, rec: dict[str, Any]) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="evaluate", unit="img", disable=a.quiet, dynamic_ncols=True, file=sys.stderr)
        bar.update(1)
        if "error" in rec:  # reported, left out of the means; the exit status says so
            tqdm.write(f"napari-vdsr: error: {rec['error']} (skipped)", file=sys.stderr)
            return
        bar.set_postfix_str(f"{rec['name']} {rec['psnr']:.2f} dB", refresh=False)
        if a.per_image:
            tqdm.write(f"  {rec['name']}: PSNR {rec['psnr']:.3f} dB  SSIM {rec['ssim']:.4f}", file=sys.stdout)

    def show_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        tqdm.write(f"napari-vdsr: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            result = evaluate_dataset(a.dataset, task=a.task, scale=a.scale, model=model, sigma=a.sigma,
                                      quality=a.quality, device=a.device, progress=progress,
                                      generate_lr=a.generate_lr, limit=a.limit, ensemble=a.ensemble, skip_bad=True)
    finally:
        if bar is not None:
            bar.close()
    skipped = result.pop("skipped")
    if skipped:
        result["skipped"] = skipped
        result["seconds"] = result.pop("seconds")  # kept last in the JSON, as before
    if a.json_path:
        out = Path(a.json_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        from .core.weights import json_safe

        # strict JSON: an infinite PSNR (output identical to the reference) is written as null
        out.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")
    n_ok = len(result["per_image"])
    n = f"{n_ok} of {n_ok + len(skipped)} images" if skipped else f"{n_ok} images"
    print(f"{_fmt_settings(result)}: PSNR {result['psnr']:.3f} dB, SSIM {result['ssim']:.4f} "
          f"over {n}" + (f" -> {a.json_path}" if a.json_path else ""))
    if skipped:
        print(f"napari-vdsr: {len(skipped)} image(s) could not be scored and are not in the means: "
              f"{', '.join(s['name'] for s in skipped)}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- demo


def _y(img: np.ndarray) -> np.ndarray:
    from .core.color import rgb_to_y

    return img.astype(np.float64) if img.ndim == 2 else rgb_to_y(img).astype(np.float64)


def _panel(images: list[np.ndarray], labels: list[str], gap: int = 6) -> np.ndarray:
    """Side-by-side RGB uint8 picture of equally sized images, with a label on each."""
    from PIL import Image, ImageDraw

    rgb = [np.repeat(im[..., None], 3, axis=-1) if im.ndim == 2 else im for im in images]
    h, w = rgb[0].shape[:2]
    canvas = np.full((h, len(rgb) * w + (len(rgb) - 1) * gap, 3), 255, dtype=np.uint8)
    for i, im in enumerate(rgb):
        canvas[:, i * (w + gap) : i * (w + gap) + w] = im
    pic = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pic)
    for i, text in enumerate(labels):
        x = i * (w + gap) + 6
        box = draw.textbbox((x, 6), text)
        draw.rectangle((box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3), fill=(0, 0, 0))
        draw.text((x, 6), text, fill=(255, 255, 255))
    return np.asarray(pic)


def _zoom(im: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    from PIL import Image

    y0, y1, x0, x1 = box
    crop = Image.fromarray(np.ascontiguousarray(im[y0:y1, x0:x1]))
    return np.asarray(crop.resize((size, size), Image.NEAREST))


def cmd_demo(a: argparse.Namespace) -> int:
    """Run ``napari-vdsr demo``."""
    import skimage.data

    from .core.degrade import as_scale_pair, downscale, resize
    from .core.errors import InputError
    from .core.evaluate import psnr
    from .core.io import write_image
    from .core.weights import load_model

    try:
        s = as_scale_pair(a.scale)[0]
    except ValueError as exc:
        raise InputError(str(exc)) from None
    # fail early, with the registry's message, when no model is bundled / the model is unusable
    _, card = load_model(a.model, task="sr", device="cpu")
    from .core.restore import restore

    gt = getattr(skimage.data, a.image)()
    if s.is_integer():
        gt = gt[: gt.shape[0] - gt.shape[0] % int(s), : gt.shape[1] - gt.shape[1] % int(s)]
    chw = np.moveaxis(gt, -1, 0) if gt.ndim == 3 else gt
    lr = np.clip(np.round(downscale(chw.astype(np.float32), s)), 0, 255).astype(np.uint8)
    bic = np.clip(np.round(resize(lr.astype(np.float32), gt.shape[:2])), 0, 255).astype(np.uint8)
    if gt.ndim == 3:
        lr, bic = np.moveaxis(lr, 0, -1), np.moveaxis(bic, 0, -1)
    print(f"napari-vdsr demo: {a.image} {gt.shape[1]}x{gt.shape[0]} -> LR {lr.shape[1]}x{lr.shape[0]} (bicubic x{s:g} shrink), "
          f"model {card.get('name', Path(card['path']).stem)}", file=sys.stderr)
    sr = restore(lr, task="sr", scale=s, model=card["path"], axes="YXC" if lr.ndim == 3 else "YX", device=a.device)
    sr = np.asarray(sr)
    if sr.shape != gt.shape:
        raise InputError(f"the restored image has shape {sr.shape}, expected {gt.shape}; use an integer --scale.")
    shave = int(np.ceil(s))
    p_bic = psnr(np.round(_y(bic)), _y(gt), shave=shave)
    p_sr = psnr(np.round(_y(sr)), _y(gt), shave=shave)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{a.image}_x{s:g}"
    write_image(out / f"{stem}_lr.png", lr)
    write_image(out / f"{stem}_bicubic.png", bic)
    write_image(out / f"{stem}_vdsr.png", sr)
    h, w = gt.shape[:2]
    c = min(h, w) // 4
    fy, fx = _ZOOM_CENTRE.get(a.image, (0.5, 0.5))
    y0 = int(np.clip(round(fy * h) - c // 2, 0, h - c))
    x0 = int(np.clip(round(fx * w) - c // 2, 0, w - c))
    box = (y0, y0 + c, x0, x0 + c)
    labels = [f"bicubic {p_bic:.2f} dB", f"VDSR {p_sr:.2f} dB", "ground truth"]
    top = _panel([bic, sr, gt], labels)
    bottom = _panel([_zoom(x, box, w) for x in (bic, sr, gt)], ["bicubic (zoom)", "VDSR (zoom)", "ground truth (zoom)"])
    sep = np.full((6, top.shape[1], 3), 255, dtype=np.uint8)
    write_image(out / f"{stem}_comparison.png", np.concatenate([top, sep, bottom], axis=0))
    print(f"PSNR (Y, {shave}-px border shaved) against ground truth: bicubic {p_bic:.2f} dB, VDSR {p_sr:.2f} dB "
          f"({p_sr - p_bic:+.2f} dB)")
    print(f"wrote {out / (stem + '_vdsr.png')} and {out / (stem + '_comparison.png')}")
    return 0
