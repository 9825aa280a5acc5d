"""``napari-vdsr predict`` and ``napari-vdsr models``: restore image files from the command line.

Both are thin layers over :func:`napari_vdsr.core.restore.restore_blocks` and the
model registry; :func:`register` adds them to the main parser of :mod:`napari_vdsr.cli`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

from .core.constants import DEFAULT_TILE

__all__ = ["register", "cmd_predict", "cmd_models", "output_name"]

_TASK_SUFFIX = {"denoise": "denoised", "deblock": "deblocked"}
_FORMATS = {"tif": ".tif", "ome.tif": ".ome.tif", "png": ".png", "npy": ".npy", "zarr": ".zarr",
            "ome.zarr": ".ome.zarr"}
_OUT_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".png", ".jpg", ".jpeg", ".bmp", ".npy", ".zarr",
                 ".ome.zarr")
_IN_MEMORY_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

PREDICT_HELP = """\
Restore image files with a VDSR model.

Inputs: TIFF and OME-TIFF (stacks and hyperstacks stay stacks; axes and pixel sizes
are read from the metadata), zarr stores (NAME.zarr folders), PNG, JPEG, BMP and .npy
files, folders of them or glob patterns.  Each output keeps its input's format,
dtype and axes (Y and X enlarged for --task sr; a TIFF stores Z, C and T before Y X,
as its pages are YX planes, so a YXC input is written CYX) and is named after it:
  NAME_x2.tif (sr; NAME_x2-3 for --scale 2 3), NAME_x2.ome.tif, NAME_x2.zarr,
  NAME_x2.ome.zarr, NAME_denoised.png, NAME_deblocked.png.
OME-TIFF outputs carry the input's OME pixel sizes with PhysicalSizeX/Y divided by
the scale; TIFF resolution tags are scaled the same way, and an OME input written as a
plain TIFF gets those pixel sizes as ImageJ's calibration (µm).  OME-Zarr outputs
(--format ome.zarr, and the default for OME-Zarr inputs) are one-level NGFF 0.4 images
(axes in T C Z Y X order, RGB as channels) with the scaled pixel sizes.

Large images: TIFF (uncompressed, tiled or compressed), .npy and zarr inputs are read
region by region, and TIFF, OME-TIFF, .npy and zarr outputs are written block by
block, so memory is bounded by --tile, not by the image (use --format zarr, ome.zarr
or ome.tif for images larger than memory).  PNG/JPEG/BMP are read and written whole.

OUT is a directory (created if needed), except when there is exactly one input
and OUT ends in an image suffix (.tif, .ome.tif, .zarr, .ome.zarr, .png, ...): then it is the
output file.

JPEG inputs are written as JPEG at --jpeg-quality 95, except for --task deblock,
whose results are written as PNG (re-encoding them as JPEG would bring the
blocks back).  Use --format to choose another output format.

Existing outputs are kept unless --overwrite is given (--skip-existing: inputs whose
output exists are skipped, so a batch can be run again for what is missing); an input file is never
overwritten, and an output is only put in place once it is complete; -o may not be a folder
that a folder or pattern input reads (the next run would take the results for inputs).  A file that
fails is reported and the others are still processed; the exit status is then
non-zero.  On a GPU out-of-memory error the tile size is halved and the run goes on.
"""


def _refuse_output_among_inputs(items, out: Path) -> None:
    """Refuse an output folder that a folder or glob input reads: the next run would take the results for inputs.

    Files named one by one may share a folder with the results (they are never replaced); a folder
    or pattern would pick the results up again, restore them once more and fail on their names.
    """
    import glob

    from .core.errors import InputError

    target = out.resolve()
    for item in items:
        s = str(item)
        if any(c in s for c in "*?["):
            scanned = set()
            for m in map(Path, glob.glob(s)):
                scanned.add(m.resolve() if m.is_dir() and m.suffix.lower() != ".zarr" else m.resolve().parent)
        elif Path(s).is_dir() and Path(s).suffix.lower() != ".zarr":
            scanned = {Path(s).resolve()}
        else:
            continue
        if target in scanned:
            raise InputError(f"-o {out} is a folder that the input {s} reads: the results would be taken for inputs "
                             f"by the next run (and restored again); write them to another folder, e.g. -o "
                             f"{out.parent / (out.name + '-restored')}.")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``predict`` and ``models`` subcommands to ``sub``."""
    p = sub.add_parser(
        "predict",
        help="restore image files: super-resolution, denoising or JPEG deblocking",
        description=PREDICT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, zarr stores, folders or glob patterns")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory (or file, for one input)")
    p.add_argument("--task", choices=["sr", "denoise", "deblock"], default="sr",
                   help="sr = super-resolution (default), denoise, deblock = JPEG artifact removal")
    p.add_argument("--scale", type=float, nargs="+", default=None, metavar="S",
                   help="sr: factor in [1, 16], or two factors S_Y S_X (default 2)")
    p.add_argument("--model", default=None, metavar="NAME|PATH",
                   help="bundled model name, .safetensors file or training run directory (default: the bundled "
                        "model for the task; see `napari-vdsr models`)")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE, metavar="N",
                   help=f"tile size in pixels (default {DEFAULT_TILE}; smaller uses less memory; results agree to "
                        "float rounding); also the block size of streamed outputs (zarr chunks, TIFF strips)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--no-amp", action="store_true", help="CUDA: compute in float32 instead of bfloat16 autocast")
    p.add_argument("--bf16", action="store_true",
                   help="CPU: bfloat16 autocast where the CPU has it natively (AMX / AVX512-BF16): about 2x faster, "
                        "outputs within ~1-2 grey levels (PSNR change <= 0.01 dB measured on Set5)")
    p.add_argument("--ensemble", action="store_true",
                   help="x8 geometric self-ensemble: average the results of the 4 rotations x 2 mirror images "
                        "(8x the time; about +0.1 dB, fewer orientation-dependent artifacts)")
    p.add_argument("--axes", default=None, metavar="AXES",
                   help="axes of every input, letters T Z C Y X S (S = RGB samples), e.g. ZYX, TCYX, YXS; "
                        "default: from the TIFF/zarr metadata or guessed from the shape")
    p.add_argument("--format", choices=["same", *_FORMATS], default="same",
                   help="output format (default: the input's, see above)")
    p.add_argument("--jpeg-quality", type=int, default=95, metavar="Q", help="quality of JPEG outputs (default 95)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip inputs whose output exists (not an error): rerun a batch for the missing outputs only")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no per-file lines (errors are printed)")
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
    """File name of the result of ``inp``: ``NAME_x2.tif``, ``NAME_x2.ome.tif``, ``NAME_denoised.png``, ..."""
    from .core.io import split_suffix

    tag = _fmt_scale(scale) if task == "sr" else _TASK_SUFFIX[task]
    stem, suffix = split_suffix(inp)
    if fmt != "same":
        suffix = _FORMATS[fmt]
    elif suffix.lower() in (".jpg", ".jpeg") and task == "deblock":
        suffix = ".png"
    return f"{stem}_{tag}{suffix}"


def _out_suffix(path: Path) -> str:
    from .core.io import split_suffix

    return split_suffix(path)[1].lower()


def _partial(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.partial")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _put_in_place(tmp: Path, dest: Path) -> None:
    """Move the finished ``tmp`` to ``dest`` (replacing what --overwrite allowed to replace)."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        _remove(old)
        dest.rename(old)
        tmp.rename(dest)
        _remove(old)
    else:
        tmp.rename(dest)


def _check_dest(dest: Path, inputs: set[Path], overwrite: bool) -> None:
    from .core.errors import InputError
    from .core.io import is_zarr

    if dest.resolve() in inputs:
        raise InputError(f"the output {dest} would replace an input file; choose another -o directory.")
    if dest.exists():
        if not overwrite:
            raise InputError(f"{dest} exists; pass --overwrite to replace it or choose another -o.")
        if dest.is_dir() and not is_zarr(dest):
            raise InputError(f"{dest} is a folder that is not a zarr store; it is not replaced even with "
                             "--overwrite: remove it yourself or choose another -o.")


class _Bands:
    """Assemble the blocks of :func:`restore_blocks` into full-width row bands (TIFF strips)."""

    def __init__(self, blocks: Iterator[Any], width: int, samples: int, dtype: Any) -> None:
        self.blocks, self.width, self.samples, self.dtype = blocks, width, samples, dtype

    def __iter__(self) -> Iterator[Any]:
        import numpy as np

        band, key = None, None
        for b in self.blocks:
            y0, y1, x0, x1 = b.box
            if (b.position, y0) != key:
                if band is not None:
                    yield band
                key = (b.position, y0)
                band = np.empty((y1 - y0, self.width) + ((self.samples,) if self.samples else ()), self.dtype)
            band[:, x0:x1] = b.yxs
        if band is not None:
            yield band


def _write_in_memory(path: Path, arr, suffix: str, jpeg_quality: int, meta: Optional[dict] = None,
                     scale: tuple[float, float] = (1.0, 1.0)) -> None:
    """PNG / JPEG / BMP (Pillow); ``suffix`` gives the format (``path`` may end in .partial).

    ``meta`` (a Pillow input's): its ICC colour profile is kept, its dpi multiplied by the scale
    (the printed size stays the same).
    """
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP"}[suffix]
    kw: dict[str, Any] = {"quality": int(jpeg_quality)} if fmt == "JPEG" else {}
    meta = meta or {}
    if meta.get("icc_profile") and fmt in ("JPEG", "PNG"):
        kw["icc_profile"] = meta["icc_profile"]
    dpi = meta.get("dpi")
    if dpi and len(dpi) == 2 and all(float(v) > 0 for v in dpi):
        kw["dpi"] = (float(dpi[0]) * scale[1], float(dpi[1]) * scale[0])  # (x, y)
    with open(path, "wb") as f:
        Image.fromarray(arr).save(f, format=fmt, **kw)


def _progress_blocks(blocks: Iterator[Any], bar: Any) -> Iterator[Any]:
    for b in blocks:
        if bar.total is None:
            bar.total = b.total
        bar.n = b.done
        bar.set_postfix_str(f"plane {b.position + 1}, tile {b.tile}", refresh=True)
        yield b


def _process(inp: Path, dest: Path, a: argparse.Namespace, net_card: tuple, scale: tuple[float, float],
             device: Any, bar_factory: Any, in_paths: set[Path]) -> tuple[tuple, tuple, str, float]:
    """Restore one file into ``dest``; returns (input shape, output shape, dtype, output Mpx).

    ``scale`` is the SR factor pair, (1, 1) for denoising and deblocking (as :func:`cmd_predict` sets it).
    """
    import numpy as np

    from .core.errors import InputError
    from .core.io import create_npy, open_image, split_suffix
    from .core.normalize import check_dtype
    from .core.ome import (
        create_ngff,
        ngff_attributes,
        ngff_axes,
        scaled_origin,
        scaled_pixel_size,
        tiff_write_options,
        to_ngff_block,
        write_tiff_bands,
    )
    from .core.restore import block_shape, normalize_axes, output_shape, restore_blocks

    _check_dest(dest, in_paths, a.overwrite)
    suffix = _out_suffix(dest)
    tmp = _partial(dest)
    _remove(tmp)  # left over by an interrupted run of ours
    with open_image(inp) as src:
        shape = tuple(int(s) for s in src.array.shape)
        axes = normalize_axes(a.axes or src.axes, shape)
        oshape = output_shape(shape, axes, scale if a.task == "sr" else 1)
        dtype = np.dtype(src.array.dtype)
        check_dtype(dtype)  # a mask or a complex array: its own advice, before what the output format holds
        rgb = "S" in axes
        if rgb and not a.axes and dtype != np.uint8 and src.format != "pillow":
            # tifffile saves any (..., H, W, 3) array as RGB: often a 3-channel microscopy image
            warnings.warn(f"{inp.name}: its {shape[axes.index('S')]} samples per pixel ({dtype}) are read as one RGB "
                          "colour image, so only its luminance is restored (the colour follows bicubic). If they "
                          f"are channels, pass --axes {axes.replace('S', 'C')} to restore each as a grey image.",
                          RuntimeWarning, stacklevel=2)
        if suffix in _IN_MEMORY_SUFFIXES and len(shape) > 2 and not (len(shape) == 3 and axes.endswith("S")):
            raise InputError(f"{dest.name}: a {len(shape)}-D result ({axes}) does not fit in {suffix}; "
                             "use --format tif, ome.tif, zarr or npy.")
        if suffix in (".jpg", ".jpeg") and dtype != np.uint8:
            raise InputError(f"{dest.name}: JPEG holds only 8-bit images; use --format tif for {dtype} data.")
        if suffix == ".bmp" and dtype != np.uint8:
            raise InputError(f"{dest.name}: BMP holds only 8-bit images; use --format tif or png for {dtype} data.")
        if suffix == ".png" and dtype != np.uint8 and not (dtype == np.uint16 and not rgb):
            what = "16-bit grey images, not 16-bit colour" if dtype == np.uint16 else f"no {dtype} data"
            raise InputError(f"{dest.name}: PNG holds 8-bit images and {what}; use --format tif.")
        n_axes = ngff_axes(axes) if suffix == ".ome.zarr" else None  # before the work: NGFF may not hold it
        blocks = restore_blocks(src.array, task=a.task, scale=scale, model=net_card, axes=axes, tile=a.tile,
                                device=device, amp=False if a.no_amp else (True if a.bf16 else None),
                                ensemble=a.ensemble)
        try:
            with bar_factory(inp.name) as bar:
                stream = _progress_blocks(blocks, bar)
                if suffix == ".ome.zarr":
                    n_shape = tuple(oshape[(axes.replace("S", "C")).index(c)] for c in n_axes)
                    chunks = _block_chunks(n_shape, n_axes, a.tile, "C" if rgb else None)
                    ps = scaled_pixel_size(src.meta.get("pixel_size"), scale)
                    if src.meta.get("time_increment"):
                        ps["T"] = tuple(src.meta["time_increment"])
                    origin = scaled_origin(src.meta.get("origin"), src.meta.get("pixel_size"), scale)
                    attrs = ngff_attributes(n_axes, ps, split_suffix(dest)[0], origin=origin)
                    attrs["napari_vdsr"] = _provenance(inp, a, scale, net_card[1])
                    z = create_ngff(tmp, n_axes, n_shape, chunks, dtype, attrs)
                    for b in stream:
                        index, data = to_ngff_block(b.index, b.data, axes, n_axes)
                        z[index] = data
                elif suffix == ".zarr":
                    import zarr

                    chunks = _block_chunks(oshape, axes, a.tile, "S" if rgb else None)
                    z = zarr.open_array(str(tmp), mode="w-", shape=oshape, chunks=chunks, dtype=dtype)
                    z.attrs.update(_zarr_attrs(inp, src.meta, axes, a, scale, net_card[1]))
                    for b in stream:
                        z[b.index] = b.data
                elif suffix == ".npy":
                    with create_npy(tmp, oshape, dtype) as out:
                        for b in stream:
                            out[b.index] = b.data
                elif suffix in (".tif", ".tiff", ".ome.tif", ".ome.tiff"):
                    plane_axes = "".join(c for c in axes if c not in "YXS")
                    t_axes = plane_axes + "YX" + ("S" if rgb else "")
                    t_shape = tuple(oshape[axes.index(c)] for c in t_axes)
                    opts = tiff_write_options(src.meta, t_axes, scale, dtype, ome=suffix.startswith(".ome"))
                    bands = _Bands(stream, oshape[axes.index("X")], oshape[axes.index("S")] if rgb else 0, dtype)
                    write_tiff_bands(tmp, bands, t_shape, dtype, opts,
                                     rowsperstrip=block_shape((oshape[axes.index("Y")], 1), a.tile)[0])
                else:
                    result = np.empty(oshape, dtype)
                    for b in stream:
                        result[b.index] = b.data
                    _write_in_memory(tmp, result, suffix, a.jpeg_quality,
                                     src.meta if src.format == "pillow" else None,
                                     scale)
        finally:
            blocks.close()
    _put_in_place(tmp, dest)
    mpx = float(np.prod([n for n, c in zip(oshape, axes) if c != "S"], dtype=np.float64)) / 1e6
    return shape, oshape, str(dtype), mpx


def _zarr_attrs(inp: Path, meta: dict, axes: str, a: argparse.Namespace, scale: tuple[float, float],
                card: dict) -> dict:
    from .core.ome import scaled_pixel_size

    attrs: dict[str, Any] = {"axes": axes}
    ps = scaled_pixel_size(meta.get("pixel_size"), scale)
    if ps:
        attrs["pixel_size"] = {c: [v, u] for c, (v, u) in ps.items()}
    attrs["napari_vdsr"] = _provenance(inp, a, scale, card)
    return attrs


def _provenance(inp: Path, a: argparse.Namespace, scale: tuple[float, float], card: dict) -> dict[str, Any]:
    """The ``napari_vdsr`` attribute of zarr and OME-Zarr outputs: source, task, scale, model, version."""
    from . import __version__

    return {"source": inp.name, "task": a.task, "scale": list(scale),
            "model": Path(str(card.get("path", "model"))).stem, "version": __version__}


def _block_chunks(shape: tuple[int, ...], axes: str, tile: int, colour: Optional[str]) -> tuple[int, ...]:
    """Chunks of a zarr output: one block of Y X per plane (the blocks restoring yields), the colours of a
    pixel together (axis ``colour``)."""
    from .core.restore import block_shape

    chunks = [1] * len(shape)
    iy, ix = axes.index("Y"), axes.index("X")
    chunks[iy], chunks[ix] = block_shape((shape[iy], shape[ix]), tile)
    if colour is not None:
        chunks[axes.index(colour)] = shape[axes.index(colour)]
    return tuple(chunks)


# --------------------------------------------------------------------------- commands


def cmd_predict(a: argparse.Namespace) -> int:
    """Run ``napari-vdsr predict``."""
    from tqdm import tqdm

    from .core.device import resolve_device
    from .core.errors import InputError, VDSRError
    from .core.io import expand_inputs
    from .core.restore import _check_scale
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
        raise InputError(f"--tile must be at least 16 px, got {a.tile}; {DEFAULT_TILE} is a good default.")
    if not 1 <= a.jpeg_quality <= 100:
        raise InputError(f"--jpeg-quality must be in 1..100, got {a.jpeg_quality}.")
    if a.skip_existing and a.overwrite:
        raise InputError("--skip-existing keeps existing outputs and --overwrite replaces them: give one of them.")
    device = resolve_device(a.device)
    # each argument on its own: a pattern that matches nothing is reported, the other inputs still run
    inputs, failed, seen, errors = [], [], set(), []
    for item in a.inputs:
        try:
            found = expand_inputs([item])
        except InputError as exc:
            errors.append(exc)
            failed.append(str(item))
            continue
        for p in found:  # the same file named twice (a file and a glob that matches it) runs once
            if p.resolve() not in seen:
                seen.add(p.resolve())
                inputs.append(p)
    if not inputs:
        raise errors[0]
    for exc in errors:
        print(f"napari-vdsr: error: {exc}", file=sys.stderr)
    net, card = load_model(a.model, task=a.task, device="cpu")
    model_name = card.get("name") or Path(card.get("path", "model")).stem
    scales = card.get("scales") or []
    if a.task == "sr" and scales and not (min(scales) <= min(scale) and max(scale) <= max(scales)):
        print(f"napari-vdsr: warning: model {model_name} was trained for scales {scales}; "
              f"x{_fmt_scale(scale)[1:]} is outside that range and may look worse than expected.", file=sys.stderr)

    out = Path(a.output)
    single_file = len(inputs) == 1 and _out_suffix(out) in _OUT_SUFFIXES
    if single_file and a.task == "deblock" and _out_suffix(out) in (".jpg", ".jpeg"):
        print(f"napari-vdsr: warning: {out.name}: saving a deblocked image as JPEG compresses it again and brings "
              f"back some of the blocks just removed (quality {a.jpeg_quality}); name the output .png or .tif to "
              "keep the result as restored.", file=sys.stderr)
    if len(inputs) > 1 and _out_suffix(out) in _OUT_SUFFIXES and not out.is_dir():
        raise InputError(f"-o {out} names one output file, but {len(inputs)} inputs were given "
                         f"({', '.join(p.name for p in inputs[:3])}{', ...' if len(inputs) > 3 else ''}); "
                         "give a folder for their results (-o results/), or one input.")
    if not single_file:
        _refuse_output_among_inputs(a.inputs, out)
    in_paths = {p.resolve() for p in inputs}
    show = not a.quiet
    files_bar = tqdm(total=len(inputs), desc="files", unit="file", disable=not show or len(inputs) < 2,
                     dynamic_ncols=True, position=0)
    tile_pos = 1 if len(inputs) > 1 else 0

    def bar_factory(name: str):
        return tqdm(total=None, desc=name, unit="tile", disable=not show, dynamic_ncols=True, leave=False,
                    position=tile_pos)

    def say(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)

    def show_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        say(f"napari-vdsr: warning: {message}")

    # two inputs must not write the same output (a.tif and a.png with --format tif; b.tif from two folders):
    # the later ones fail up front, so --overwrite never replaces a result of this run
    dests = {inp: out if single_file else out / output_name(inp, a.task, scale, a.format) for inp in inputs}
    owner: dict[Path, Path] = {}  # resolved output -> the input that writes it
    clash: dict[Path, str] = {}
    for inp, dest in dests.items():
        first = owner.setdefault(dest.resolve(), inp)
        if first is not inp:
            clash[inp] = (f"{inp}: its output {dest} would be the same file as that of {first}; write them to "
                          "different -o folders, or rename one of them")
    written, skipped, mpx_total, t_start = 0, [], 0.0, time.perf_counter()
    tiff_log = logging.getLogger("tifffile")  # corrupt files are reported once, as errors, below
    tiff_level = tiff_log.level
    tiff_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", RuntimeWarning)
            warnings.showwarning = show_warning
            for inp, dest in dests.items():
                if inp in clash:
                    failed.append(str(inp))
                    say(f"napari-vdsr: error: {clash[inp]}.")
                    files_bar.update(1)
                    continue
                if a.skip_existing and (dest.exists() or dest.is_symlink()) and dest.resolve() not in in_paths:
                    skipped.append(str(inp))
                    if show:
                        say(f"{inp}: skipped, {dest} exists")
                    files_bar.update(1)
                    continue
                t0 = time.perf_counter()
                try:
                    shape, oshape, dtype, mpx = _process(inp, dest, a, (net, card), scale, device, bar_factory,
                                                         in_paths)
                    written += 1
                    mpx_total += mpx
                    if show:
                        dt = time.perf_counter() - t0
                        say(f"{inp} -> {dest}  {shape} {dtype} -> {oshape}  {dt:.1f} s "
                            f"({mpx / max(dt, 1e-9):.3g} Mpx/s)")
                except VDSRError as exc:
                    failed.append(str(inp))
                    msg = str(exc)
                    say(f"napari-vdsr: error: {msg if msg.startswith(str(inp)) else f'{inp}: {msg}'}")
                except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
                    failed.append(str(inp))
                    say(f"napari-vdsr: error: {inp}: {type(exc).__name__}: {exc}")
                finally:  # also on KeyboardInterrupt: never leave a partial output behind
                    if _partial(dest).exists() or _partial(dest).is_symlink():
                        _remove(_partial(dest))
                    files_bar.update(1)
    finally:
        files_bar.close()
        tiff_log.setLevel(tiff_level)
    elapsed = time.perf_counter() - t_start
    skip_note = f", {len(skipped)} skipped (their outputs exist)" if skipped else ""
    if failed:
        print(f"napari-vdsr: {len(failed)} of {len(inputs) + len(errors)} file(s) failed, {written} written{skip_note} "
              f"({elapsed:.1f} s); failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    if show or skipped:
        print(f"napari-vdsr: {written} file(s) written to {out}{skip_note} in {elapsed:.1f} s "
              f"({mpx_total:.3g} output Mpx, {mpx_total / max(elapsed, 1e-9):.3g} Mpx/s) on {device}", file=sys.stderr)
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    """Run ``napari-vdsr models``."""
    from .core.weights import card_summary, json_safe, list_models

    entries = list_models(a.task)
    if a.json:
        print(json.dumps(json_safe([{"name": e.name, "path": str(e.path), "bundled": e.bundled, "card": e.card}
                                    for e in entries]), indent=2, default=str, allow_nan=False))
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
        for line in card_summary(c):
            print(f"  {line}")
        if c.get("note"):
            print(f"  note: {c['note']}")
    return 0
