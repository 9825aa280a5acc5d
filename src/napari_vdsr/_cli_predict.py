"""``napari-vdsr predict`` and ``napari-vdsr models``: restore image files from the command line.

Both are thin layers over :func:`napari_vdsr.core.restore.restore_iter` and the
model registry; :func:`register` adds them to the main parser of :mod:`napari_vdsr.cli`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "cmd_predict", "cmd_models", "output_name"]

_TASK_SUFFIX = {"denoise": "denoised", "deblock": "deblocked"}
_FORMATS = {"tif": ".tif", "png": ".png", "npy": ".npy"}

PREDICT_HELP = """\
Restore image files with a VDSR model.

Inputs: TIFF (stacks and hyperstacks stay stacks), PNG, JPEG, BMP and .npy files,
folders of them or glob patterns.  Each output keeps its input's format, dtype
and axes (Y and X enlarged for --task sr) and is named after it:
  NAME_x2.tif (sr; NAME_x2-3 for --scale 2 3), NAME_denoised.png, NAME_deblocked.png.

OUT is a directory (created if needed), except when there is exactly one input
and OUT ends in an image suffix (.tif, .png, ...): then it is the output file.

JPEG inputs are written as JPEG at --jpeg-quality 95, except for --task deblock,
whose results are written as PNG (re-encoding them as JPEG would bring the
blocks back).  Use --format to choose another output format.

Existing outputs are kept unless --overwrite is given; an input file is never
overwritten.  A file that fails is reported and the others are still processed;
the exit status is then non-zero.
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``predict`` and ``models`` subcommands to ``sub``."""
    p = sub.add_parser(
        "predict",
        help="restore image files: super-resolution, denoising or JPEG deblocking",
        description=PREDICT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory (or file, for one input)")
    p.add_argument("--task", choices=["sr", "denoise", "deblock"], default="sr",
                   help="sr = super-resolution (default), denoise, deblock = JPEG artifact removal")
    p.add_argument("--scale", type=float, nargs="+", default=None, metavar="S",
                   help="sr: factor in [1, 16], or two factors S_Y S_X (default 2)")
    p.add_argument("--model", default=None, metavar="NAME|PATH",
                   help="bundled model name, .safetensors file or training run directory (default: the bundled "
                        "model for the task; see `napari-vdsr models`)")
    p.add_argument("--tile", type=int, default=512, metavar="N",
                   help="tile size in pixels (default 512; smaller uses less memory, results are identical)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--axes", default=None, metavar="AXES",
                   help="axes of every input, letters T Z C Y X S (S = RGB samples), e.g. ZYX, TCYX, YXS; "
                        "default: from the TIFF metadata or guessed from the shape")
    p.add_argument("--format", choices=["same", "tif", "png", "npy"], default="same",
                   help="output format (default: the input's, see above)")
    p.add_argument("--jpeg-quality", type=int, default=95, metavar="Q", help="quality of JPEG outputs (default 95)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    m = sub.add_parser("models", help="list bundled and registered models",
                       description="List the bundled and registered models with their tasks, scales and "
                                   "validation metrics.")
    m.add_argument("--task", choices=["sr", "denoise", "deblock"], default=None, help="only models for this task")
    m.add_argument("--json", action="store_true", help="print the model cards as JSON")
    m.set_defaults(func=cmd_models)


# --------------------------------------------------------------------------- helpers


def _fmt_scale(pair: tuple[float, float]) -> str:
    sy, sx = pair
    return f"x{sy:g}" if sy == sx else f"x{sy:g}-{sx:g}"


def output_name(inp: Path, task: str, scale: tuple[float, float], fmt: str = "same") -> str:
    """File name of the result of ``inp``: ``NAME_x2.tif``, ``NAME_denoised.png``, ..."""
    tag = _fmt_scale(scale) if task == "sr" else _TASK_SUFFIX[task]
    suffix = inp.suffix.lower()
    if fmt != "same":
        suffix = _FORMATS[fmt]
    elif suffix in (".jpg", ".jpeg") and task == "deblock":
        suffix = ".png"
    else:
        suffix = inp.suffix  # keep the spelling (.TIF, .tiff, ...)
    return f"{inp.stem}_{tag}{suffix}"


def _tiff_info(path: Path, ndim: int) -> dict[str, Any]:
    """Axes and resolution of the first series of a TIFF (empty dict when unknown)."""
    import tifffile

    info: dict[str, Any] = {}
    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            page = tf.pages.first if hasattr(tf.pages, "first") else tf.pages[0]
            axes = series.axes.upper()
            if len(axes) == ndim:
                free = [c for c in "ZTC" if c not in axes]
                fixed = []
                for c in axes:
                    if c in "TZCYXS":
                        fixed.append(c)
                    elif free:
                        fixed.append(free.pop(0))
                    else:
                        fixed = []
                        break
                ax = "".join(fixed)
                if ax and len(set(ax)) == len(ax) and "Y" in ax and "X" in ax:
                    if "S" in ax and series.shape[ax.index("S")] not in (3, 4):
                        ax = ax.replace("S", "C") if "C" not in ax else ""
                    if ax:
                        info["axes"] = ax
            try:
                info["resolution"] = page.get_resolution()
                info["resolutionunit"] = page.resolutionunit
            except Exception:  # noqa: BLE001 - resolution is optional
                pass
            if tf.is_imagej and tf.imagej_metadata:
                info["imagej"] = dict(tf.imagej_metadata)
    except Exception:  # noqa: BLE001 - metadata is a bonus; the pixels were read already
        return {}
    return info


def _write_tiff(path: Path, arr, axes: str, info: dict[str, Any], scale: tuple[float, float]) -> None:
    import numpy as np
    import tifffile

    kw: dict[str, Any] = {}
    res = info.get("resolution")
    if res and all(r and r > 0 for r in res[:2]):
        # pixels per unit grow with the scale: the physical size of the image is kept
        kw["resolution"] = (float(res[0]) * scale[1], float(res[1]) * scale[0])
        if info.get("resolutionunit") is not None:
            kw["resolutionunit"] = info["resolutionunit"]
    ij = info.get("imagej")
    ij_order = "TZCYXS"
    in_order = [ij_order.index(c) for c in axes]
    if ij is not None and in_order == sorted(in_order) and arr.dtype in (np.uint8, np.uint16, np.float32):
        meta = {"axes": axes}
        for key in ("spacing", "unit", "finterval", "Ranges", "LUTs"):
            if key in ij:
                meta[key] = ij[key]
        tifffile.imwrite(path, arr, imagej=True, metadata=meta, **kw)
        return
    photometric = "rgb" if axes.endswith("S") else "minisblack"
    tifffile.imwrite(path, arr, metadata={"axes": axes}, photometric=photometric, **kw)


def _write(path: Path, arr, axes: str, info: dict[str, Any], scale: tuple[float, float], jpeg_quality: int) -> None:
    from .core.errors import InputError
    from .core.io import write_image

    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".tif", ".tiff"):
        _write_tiff(path, arr, axes, info, scale)
        return
    if suffix in (".png", ".jpg", ".jpeg", ".bmp") and arr.ndim > 2 and not (arr.ndim == 3 and axes.endswith("S")):
        raise InputError(f"{path.name}: a {arr.ndim}-D result ({axes}) does not fit in {suffix}; use --format tif or npy.")
    if suffix in (".jpg", ".jpeg"):
        from PIL import Image

        if arr.dtype.name != "uint8":
            raise InputError(f"{path.name}: JPEG holds only 8-bit images; use --format tif for {arr.dtype} data.")
        Image.fromarray(arr).save(path, quality=int(jpeg_quality))
        return
    write_image(path, arr)


# --------------------------------------------------------------------------- commands


def cmd_predict(a: argparse.Namespace) -> int:
    """Run ``napari-vdsr predict``."""
    from tqdm import tqdm

    from .core.device import resolve_device
    from .core.errors import InputError, VDSRError
    from .core.io import expand_inputs, read_image
    from .core.restore import _check_scale, normalize_axes, restore_iter
    from .core.weights import load_model

    if a.scale is not None and len(a.scale) > 2:
        raise InputError(f"--scale takes one factor or two (Y X), got {len(a.scale)}: {a.scale}.")
    if a.task == "sr":
        scale = _check_scale(a.scale[0] if len(a.scale) == 1 else a.scale) if a.scale else (2.0, 2.0)
    else:
        if a.scale:
            print(f"napari-vdsr: note: --scale is ignored for --task {a.task}", file=sys.stderr)
        scale = (1.0, 1.0)
    if a.tile < 16:
        raise InputError(f"--tile must be at least 16 px, got {a.tile}; 512 is a good default.")
    if not 1 <= a.jpeg_quality <= 100:
        raise InputError(f"--jpeg-quality must be in 1..100, got {a.jpeg_quality}.")
    device = resolve_device(a.device)
    inputs = expand_inputs(a.inputs)
    net, card = load_model(a.model, task=a.task, device="cpu")
    model_name = Path(card.get("path", "model")).stem
    scales = card.get("scales") or []
    if a.task == "sr" and scales and not (min(scales) <= min(scale) and max(scale) <= max(scales)):
        print(f"napari-vdsr: warning: model {model_name} was trained for scales {scales}; "
              f"x{_fmt_scale(scale)[1:]} is outside that range and may look worse than expected.", file=sys.stderr)

    out = Path(a.output)
    single_file = len(inputs) == 1 and out.suffix.lower() in (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".npy")
    in_paths = {p.resolve() for p in inputs}
    failed: list[str] = []
    written = 0
    for inp in inputs:
        try:
            dest = out if single_file else out / output_name(inp, a.task, scale, a.format)
            if dest.resolve() in in_paths:
                raise InputError(f"the output {dest} would replace an input file; choose another -o directory.")
            if dest.exists() and not a.overwrite:
                raise InputError(f"{dest} exists; pass --overwrite to replace it or choose another -o.")
            img = read_image(inp)
            info = _tiff_info(inp, img.ndim) if inp.suffix.lower() in (".tif", ".tiff") else {}
            axes = normalize_axes(a.axes or info.get("axes"), img.shape)
            gen = restore_iter(img, task=a.task, scale=scale, model=(net, card), axes=axes, tile=a.tile, device=device)
            result = None
            with tqdm(total=None, desc=inp.name, unit="tile", disable=a.quiet, dynamic_ncols=True, leave=False) as bar:
                for ev in gen:
                    if bar.total is None:
                        bar.total = ev.total
                    bar.n = ev.done
                    bar.set_postfix_str(f"plane {ev.plane + 1}/{ev.n_planes}", refresh=True)
                    result = ev.result
            _write(dest, result, axes, info, scale, a.jpeg_quality)
            written += 1
            if not a.quiet:
                print(f"{inp} -> {dest}  {tuple(img.shape)} {img.dtype} -> {tuple(result.shape)} {result.dtype}",
                      file=sys.stderr)
        except VDSRError as exc:
            failed.append(str(inp))
            print(f"napari-vdsr: error: {inp}: {exc}", file=sys.stderr)
        except (OSError, ValueError, MemoryError) as exc:
            failed.append(str(inp))
            print(f"napari-vdsr: error: {inp}: {type(exc).__name__}: {exc}", file=sys.stderr)
    if failed:
        print(f"napari-vdsr: {len(failed)} of {len(inputs)} file(s) failed, {written} written.", file=sys.stderr)
        return 1
    return 0


def _metrics_text(card: dict[str, Any]) -> str:
    def flat(d: Any, prefix: str = "") -> list[str]:
        if isinstance(d, dict):
            out: list[str] = []
            for k, v in d.items():
                out += flat(v, f"{prefix}{k} " if prefix or k != "validation" else "val ")
            return out
        if isinstance(d, (int, float)) and not isinstance(d, bool):
            return [f"{prefix.strip()} {d:.4g}"]
        return []

    items = flat(card.get("metrics", {}))
    return ", ".join(items[:8]) + (" ..." if len(items) > 8 else "") if items else "no metrics recorded"


def cmd_models(a: argparse.Namespace) -> int:
    """Run ``napari-vdsr models``."""
    from .core.weights import list_models

    entries = list_models(a.task)
    if a.json:
        print(json.dumps([{"name": e.name, "path": str(e.path), "bundled": e.bundled, "card": e.card} for e in entries],
                         indent=2, default=str))
        return 0
    if not entries:
        print("no models found" + (f" for task {a.task}" if a.task else "") +
              ": none is bundled yet; train one with `napari-vdsr train` and pass it with --model FILE.")
        return 0
    for e in entries:
        c = e.card
        arch = c.get("architecture", {})
        scales = c.get("scales")
        default = c.get("default_for") or []
        print(f"{e.name}{'  [default for ' + ', '.join(default) + ']' if default else ''}")
        print(f"  tasks: {', '.join(e.tasks) or '?'}" + (f"; scales: {', '.join(f'{s:g}' for s in scales)}" if scales else ""))
        print(f"  architecture: depth {arch.get('depth', '?')}, width {arch.get('width', '?')}; "
              f"{'bundled' if e.bundled else 'registered'}: {e.path}")
        print(f"  metrics: {_metrics_text(c)}")
        if c.get("note"):
            print(f"  note: {c['note']}")
    return 0
