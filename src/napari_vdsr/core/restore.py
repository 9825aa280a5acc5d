"""Restore n-D images with a VDSR model: super-resolution, denoising, JPEG deblocking.

:func:`restore` is the one engine behind the CLI, the napari widgets and scripts;
:func:`restore_iter` is the same work as a generator of :class:`RestoreProgress`
events (one per tile) for progress bars and cancellation.

Axes
----
An image is described by an axes string over ``T Z C Y X S`` (``S`` = RGB(A)
samples), e.g. ``"YX"``, ``"ZYX"``, ``"TCYX"``, ``"YXC"``, ``"YXS"``.  Every
index of the non-``Y``/``X``/``S`` axes is one *plane*, restored on its own
(grey planes: channels, slices and time points alike).  Planes are numbered in
C order over those axes, in the order they appear in the axes string.

Intensities
-----------
uint8 data map to the network's [0, 1] by /255 (the training convention); float
data already within [0, 1] are used as is; anything else is mapped by the min and
max of the *whole* image, so every plane of a stack uses the same map.  Results
are mapped back, rounded and clipped to the range of integer dtypes, and cast to
the input dtype (float results are not clipped).  RGB: the network sees the
luminance Y (BT.601, MATLAB convention) of the bicubic-upsampled image; chroma
(and alpha) are bicubic only.

No Qt or napari imports.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from .errors import Cancelled, InputError, ModelError
from .tiling import MIN_TILE, count_tiles, cpu_allocation_tuning, predict_plane_iter, prepare_net

__all__ = [
    "RestoreProgress",
    "TASKS",
    "AXES_LETTERS",
    "infer_axes",
    "normalize_axes",
    "output_shape",
    "plane_count",
    "restore_iter",
    "restore",
]

TASKS = ("sr", "denoise", "deblock")
AXES_LETTERS = "TZCYXS"
_PLANE_ORDER = "TCZ"  # names given to leading axes when inferring (OME order)


@dataclass
class RestoreProgress:
    """One progress event of :func:`restore_iter`.

    Attributes
    ----------
    done, total : int
        Work units (tiles, summed over all planes) finished / in all.
    plane : int
        Position (0 .. ``n_planes`` - 1) of the plane being processed, in processing order.
    n_planes : int
        Number of planes being processed.
    result : ndarray or None
        The restored image; set only on the last event.
    """

    done: int
    total: int
    plane: int
    n_planes: int
    result: Optional[np.ndarray] = None


# --------------------------------------------------------------------------- axes


def infer_axes(shape: Sequence[int], rgb: Optional[bool] = None) -> str:
    """Guess the axes string of an array of ``shape``.

    2-D → ``"YX"``; a last axis of 3 or 4 samples (after at least two larger axes)
    → ``"...YXS"`` (RGB / RGBA) unless ``rgb`` is False; otherwise leading axes are
    planes: ``"ZYX"``, ``"TZYX"``, ``"TCZYX"``.  ``rgb=True`` forces the last axis to be
    the samples axis.

    Raises
    ------
    InputError
        If the shape has fewer than 2 or too many axes, or ``rgb=True`` does not fit.
    """
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    if nd < 2:
        raise InputError(
            f"an image needs at least 2 axes (Y, X), got shape {shape}; reshape a 1-D signal to (1, N) "
            "only if it really is an image."
        )
    if rgb is None:
        rgb = nd >= 3 and shape[-1] in (3, 4) and shape[-2] > 4 and shape[-3] > 4
    elif rgb:
        if nd < 3 or shape[-1] not in (3, 4):
            raise InputError(
                f"rgb=True needs a last axis of 3 (RGB) or 4 (RGBA) samples, got shape {shape}; "
                "pass rgb=False or give axes explicitly (e.g. axes='CYX')."
            )
    lead = nd - 2 - (1 if rgb else 0)
    if lead > len(_PLANE_ORDER):
        raise InputError(
            f"cannot guess the axes of a {nd}-D array of shape {shape}; give them explicitly "
            "(e.g. axes='TCZYX'; letters T, Z, C, Y, X, S) or squeeze singleton axes."
        )
    names = {0: "", 1: "Z", 2: "TZ", 3: "TCZ"}[lead]
    return names + "YX" + ("S" if rgb else "")


def normalize_axes(axes: Optional[str], shape: Sequence[int], rgb: Optional[bool] = None) -> str:
    """Validate an axes string for ``shape`` (or infer it when ``axes`` is None); return it upper-case.

    Raises
    ------
    InputError
        Unknown letters, repeats, missing Y/X, wrong length, or an S axis that is not 3 or 4 long.
    """
    shape = tuple(int(s) for s in shape)
    if axes is None:
        return infer_axes(shape, rgb)
    if not isinstance(axes, str):
        raise InputError(f"axes must be a string such as 'ZYX' or 'YXS', got {axes!r}.")
    ax = axes.strip().upper()
    bad = sorted(set(ax) - set(AXES_LETTERS))
    if bad:
        raise InputError(
            f"axes {axes!r} contains unknown letter(s) {', '.join(map(repr, bad))}; use only T, Z, C, Y, X and "
            "S (RGB samples), e.g. 'ZYX', 'TCYX' or 'YXS'."
        )
    dup = sorted({c for c in ax if ax.count(c) > 1})
    if dup:
        raise InputError(f"axes {axes!r} repeats {', '.join(dup)}; every letter may appear once (e.g. 'TCZYX').")
    if "Y" not in ax or "X" not in ax:
        raise InputError(f"axes {axes!r} must contain both Y and X (the image plane), e.g. 'ZYX'.")
    if len(ax) != len(shape):
        raise InputError(
            f"axes {axes!r} has {len(ax)} letters but the image has {len(shape)} axes (shape {shape}); "
            f"give one letter per axis, e.g. {infer_axes(shape, rgb) if len(shape) >= 2 else 'YX'!r}."
        )
    if "S" in ax and shape[ax.index("S")] not in (3, 4):
        raise InputError(
            f"axis S (RGB samples) has length {shape[ax.index('S')]}, not 3 or 4; call it C to restore each "
            "channel as its own grey image."
        )
    if rgb is True and "S" not in ax:
        raise InputError(f"rgb=True but axes {axes!r} has no S (samples) axis; add S or drop rgb=True.")
    if rgb is False and "S" in ax:
        raise InputError(f"rgb=False but axes {axes!r} has an S (samples) axis; rename it C or drop rgb=False.")
    return ax


def _scaled_yx(shape: tuple[int, ...], ax: str, scale) -> tuple[int, int]:
    from .degrade import scaled_shape

    return scaled_shape((shape[ax.index("Y")], shape[ax.index("X")]), scale)


def output_shape(
    shape: Sequence[int], axes: Optional[str] = None, scale: float | Sequence[float] = 2.0, rgb: Optional[bool] = None
) -> tuple[int, ...]:
    """Shape of the result of :func:`restore` on an image of ``shape`` (without ``planes``).

    Y and X are multiplied by ``scale`` (rounded); all other axes keep their size.
    Use ``scale=1`` for denoising and deblocking.
    """
    shape = tuple(int(s) for s in shape)
    ax = normalize_axes(axes, shape, rgb)
    scale = _check_scale(scale)
    oy, ox = _scaled_yx(shape, ax, scale)
    out = list(shape)
    out[ax.index("Y")] = oy
    out[ax.index("X")] = ox
    return tuple(out)


def plane_count(shape: Sequence[int], axes: Optional[str] = None, rgb: Optional[bool] = None) -> int:
    """Number of 2-D planes (indices over the axes other than Y, X and S)."""
    shape = tuple(int(s) for s in shape)
    ax = normalize_axes(axes, shape, rgb)
    return int(np.prod([n for c, n in zip(ax, shape) if c not in "YXS"], dtype=np.int64))


# --------------------------------------------------------------------------- checks


def _check_scale(scale) -> tuple[float, float]:
    from .degrade import as_scale_pair

    try:
        return as_scale_pair(scale)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)} (sr = super-resolution).")
    return task


def _as_arraylike(image: Any):
    if hasattr(image, "shape") and hasattr(image, "dtype") and hasattr(image, "__getitem__"):
        return image
    try:
        return np.asarray(image)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read the image as an array ({exc}); pass a numpy, dask or zarr array.") from None


def _resolve_model(model: Any, task: str) -> tuple[torch.nn.Module, dict]:
    from .weights import TASK_LABELS

    card: dict = {}
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], torch.nn.Module):
        net, card = model[0], dict(model[1] or {})
        tasks = card.get("tasks")
        if tasks and task not in tasks:
            raise ModelError(
                f"the model given was trained for {', '.join(TASK_LABELS.get(t, t) for t in tasks)}, not "
                f"{TASK_LABELS[task]}; pick a {task} model (see `napari-vdsr models`)."
            )
        return net, card
    if isinstance(model, torch.nn.Module):
        return model, card
    if model is None or isinstance(model, (str, os.PathLike)):
        return _load_cached(model, task)
    raise ModelError(
        f"model must be None (bundled default), a name, a .safetensors path, a VDSR module or a (VDSR, card) "
        f"tuple; got {type(model).__name__}."
    )


_MODEL_CACHE: dict[tuple, tuple[torch.nn.Module, dict]] = {}


def _load_cached(spec, task: str) -> tuple[torch.nn.Module, dict]:
    """Load a model once per (file, modification time, task); later calls reuse it."""
    from .weights import default_model_name, load_model, resolve_model_path

    path = resolve_model_path(default_model_name(task) if spec is None else spec)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = None
    key = (str(path.resolve()), mtime, task)
    if key not in _MODEL_CACHE:
        if len(_MODEL_CACHE) >= 4:
            _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
        _MODEL_CACHE[key] = load_model(path, task=task)
    net, card = _MODEL_CACHE[key]
    return net, dict(card)


def _resolve_device(device) -> torch.device:
    from .device import resolve_device

    return resolve_device(device)


# --------------------------------------------------------------------------- work


def _intensity(image, dtype: np.dtype, ax: str, plane_idx: list[tuple]):
    """Intensity map over the whole image (numpy/dask: one reduction; other array-likes: plane by plane)."""
    from .normalize import Intensity, intensity_range

    if dtype == np.uint8:
        return Intensity(0.0, 255.0)
    if isinstance(image, np.ndarray) or hasattr(image, "compute"):
        return intensity_range(image, dtype)
    lo, hi = math.inf, -math.inf
    for idx in plane_idx:
        p = np.asarray(image[idx])
        _check_finite(p, "the image")
        lo, hi = min(lo, float(p.min())), max(hi, float(p.max()))
    return intensity_range(np.array([lo, hi], dtype=np.float64), dtype)


def _check_finite(p: np.ndarray, where: str) -> None:
    if p.dtype.kind == "f" and not np.isfinite(p).all():
        raise InputError(
            f"{where} contains NaN or infinite values; replace them first (e.g. np.nan_to_num(image)) and try again."
        )


def _to_dtype(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(dtype)
    return x.astype(dtype, copy=False)


def restore_iter(
    image: Any,
    task: str = "sr",
    scale: float | Sequence[float] = 2.0,
    model: Any = None,
    axes: Optional[str] = None,
    rgb: Optional[bool] = None,
    tile: int = 512,
    device: str | torch.device = "auto",
    planes: Optional[Sequence[int]] = None,
) -> Iterator[RestoreProgress]:
    """Restore ``image`` and report progress after every tile.

    Arguments are checked (and the model loaded) when this function is called; the
    work happens while the returned iterator is consumed.  Stopping the iteration
    (``break``, ``gen.close()``) cancels the work within one tile.  See :func:`restore`
    for the parameters.

    Yields
    ------
    RestoreProgress
        One event per tile (or per batch of small tiles); the last one has ``done ==
        total`` and carries the result in ``result``.
    """
    task = _check_task(task)
    img = _as_arraylike(image)
    shape = tuple(int(s) for s in img.shape)
    from .normalize import check_dtype

    dtype = np.dtype(img.dtype)
    check_dtype(dtype)
    if any(s == 0 for s in shape):
        raise InputError(f"the image is empty (shape {shape}); pick a layer or file with pixels in it.")
    ax = normalize_axes(axes, shape, rgb)
    h, w = shape[ax.index("Y")], shape[ax.index("X")]
    if h < 2 or w < 2:
        raise InputError(
            f"the image plane is only {h}x{w} pixels; restoring needs at least 2x2 pixels (check the axes: "
            f"{ax!r} was used for shape {shape})."
        )
    sy, sx = (1.0, 1.0) if task != "sr" else _check_scale(scale)
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < MIN_TILE:
        raise InputError(f"tile size must be an integer of at least {MIN_TILE} px, got {tile!r}; 512 is a good default.")
    tile = int(tile)

    plane_axes = [i for i, c in enumerate(ax) if c not in "YXS"]
    plane_sizes = [shape[i] for i in plane_axes]
    n_all = int(np.prod(plane_sizes, dtype=np.int64))
    if planes is None:
        todo = list(range(n_all))
    else:
        try:
            todo = [int(p) for p in planes]
        except (TypeError, ValueError):
            raise InputError(f"planes must be a list of plane indices, got {planes!r}.") from None
        bad = [p for p in todo if not 0 <= p < n_all]
        if bad or not todo:
            raise InputError(
                f"plane indices {bad or planes!r} are out of range: the image has {n_all} plane(s) over axes "
                f"{''.join(ax[i] for i in plane_axes) or '(none)'}; use indices 0..{n_all - 1}."
            )

    net, card = _resolve_model(model, task)
    dev = _resolve_device(device)
    net = prepare_net(net, dev)

    oh, ow = _scaled_yx(shape, ax, (sy, sx))
    is_rgb = "S" in ax
    n_samples = shape[ax.index("S")] if is_rgb else 0
    # layout of one plane as read: the Y, X (and S) axes in their original order
    rest = [c for c in ax if c in "YXS"]
    canon = "YXS" if is_rgb else "YX"
    to_canon = [rest.index(c) for c in canon]
    from_canon = [canon.index(c) for c in rest]

    def index_of(k: int) -> tuple:
        pos = np.unravel_index(k, plane_sizes) if plane_sizes else ()
        idx: list[Any] = [slice(None)] * len(shape)
        for a, p in zip(plane_axes, pos):
            idx[a] = int(p)
        return tuple(idx)

    all_idx = [index_of(k) for k in range(n_all)]
    per_plane = count_tiles((oh, ow), tile)
    total = per_plane * len(todo)

    out_shape = list(shape)
    out_shape[ax.index("Y")] = oh
    out_shape[ax.index("X")] = ow
    if planes is None:
        result_shape = tuple(out_shape)
    else:
        result_shape = (len(todo), oh, ow) + ((n_samples,) if is_rgb else ())

    return _restore_gen(
        img, dtype, ax, task, (oh, ow), net, dev, tile, todo, all_idx, to_canon, from_canon,
        result_shape, planes is not None, per_plane, total, is_rgb,
    )


def _restore_gen(*args) -> Iterator[RestoreProgress]:
    dev = args[6]
    with cpu_allocation_tuning(dev.type == "cpu"):  # undone when the generator finishes or is closed
        yield from _restore_work(*args)


def _restore_work(
    img, dtype, ax, task, out_hw, net, dev, tile, todo, all_idx, to_canon, from_canon,
    result_shape, compact, per_plane, total, is_rgb,
) -> Iterator[RestoreProgress]:
    from .color import rgb_to_ycbcr, ycbcr_to_rgb
    from .degrade import resize

    inten = _intensity(img, dtype, ax, all_idx)
    result = np.empty(result_shape, dtype=dtype)
    oh, ow = out_hw
    n = len(todo)
    done = 0
    net_out = np.empty((oh, ow), dtype=np.float32)

    for pos, k in enumerate(todo):
        raw = np.asarray(img[all_idx[k]])
        where = f"plane {k}" if len(all_idx) > 1 else "the image"
        _check_finite(raw, where)
        raw = np.transpose(raw, to_canon)
        if is_rgb:
            rgb = inten.to_net(raw[..., :3]) * np.float32(255.0)  # (H, W, 3) on 0..255
            chw = np.moveaxis(rgb, -1, 0)
            if (oh, ow) != raw.shape[:2]:
                chw = resize(chw, (oh, ow))
            ycc = rgb_to_ycbcr(np.moveaxis(chw, 0, -1))
            x = np.ascontiguousarray(ycc[..., 0] / np.float32(255.0))
        else:
            x = inten.to_net(raw)
            if (oh, ow) != raw.shape:
                x = resize(x, (oh, ow))
        for tiles_done in predict_plane_iter(net, x, net_out, tile=tile, device=dev):
            done = pos * per_plane + tiles_done
            if done < total:
                yield RestoreProgress(done, total, pos, n)
        if is_rgb:
            ycc[..., 0] = net_out * np.float32(255.0)
            rgb_out = ycbcr_to_rgb(ycc) / np.float32(255.0)
            plane_out = np.empty((oh, ow, raw.shape[-1]), dtype=dtype)
            plane_out[..., :3] = _to_dtype(inten.from_net(rgb_out), dtype)
            if raw.shape[-1] == 4:  # alpha: bicubic only, in its own units
                alpha = raw[..., 3].astype(np.float32)
                if (oh, ow) != raw.shape[:2]:
                    alpha = resize(alpha, (oh, ow))
                plane_out[..., 3] = _to_dtype(alpha, dtype)
        else:
            plane_out = _to_dtype(inten.from_net(net_out), dtype)
        if compact:
            result[pos] = plane_out
        else:
            result[all_idx[k]] = np.transpose(plane_out, from_canon)
    yield RestoreProgress(total, total, n - 1, n, result)


def restore(
    image: Any,
    task: str = "sr",
    scale: float | Sequence[float] = 2.0,
    model: Any = None,
    axes: Optional[str] = None,
    rgb: Optional[bool] = None,
    tile: int = 512,
    device: str | torch.device = "auto",
    planes: Optional[Sequence[int]] = None,
    progress: Optional[Callable[[int, int], Any]] = None,
    stop: Any = None,
) -> np.ndarray:
    """Restore an n-D image with a VDSR model.

    Parameters
    ----------
    image : array-like
        numpy, dask or zarr array (read one plane at a time; never modified).
        Integer (uint8, uint16, int16, ...) or float dtype.
    task : {"sr", "denoise", "deblock"}
        Super-resolution, Gaussian denoising or JPEG artifact removal.
    scale : float or (float, float)
        SR only: factor (or (y, x) factors) in [1, 16]; the output plane is
        ``round(H * sy) x round(W * sx)``.  Ignored for the other tasks.
    model : None, str, path, VDSR or (VDSR, card)
        ``None``: the bundled default for ``task``; a name or file: loaded with
        :func:`~napari_vdsr.core.weights.load_model` (a model made for another task
        raises :class:`ModelError`); or a network (with its card).
    axes : str, optional
        Axes string over ``TZCYXS`` (case-insensitive), e.g. ``"ZYX"``, ``"TCYX"``,
        ``"YXC"``, ``"YXS"``; default: :func:`infer_axes`.
    rgb : bool, optional
        Force (True) or forbid (False) treating the last axis as RGB(A) samples.
    tile : int
        Interior tile size in pixels (>= 16); tiles carry a halo of ``depth`` px
        so the result equals the untiled one.
    device : str or torch.device
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
    planes : sequence of int, optional
        Restore only these planes (flat C-order indices over the non-Y/X/S axes).
        The result then has shape ``(len(planes), H', W')`` (RGB: ``(len(planes), H', W', S)``),
        planes in the order given.
    progress : callable(done, total), optional
        Called after every tile.
    stop : object with ``is_set()``, optional
        E.g. a :class:`threading.Event`; when set, work stops within one tile and
        :class:`~napari_vdsr.core.errors.Cancelled` is raised.

    Returns
    -------
    ndarray
        Same dtype and axes as the input; Y and X scaled for SR.

    Raises
    ------
    InputError
        Bad image, axes, scale, tile or planes (the message says how to fix it).
    ModelError
        The model cannot be loaded or serves another task.
    Cancelled
        ``stop`` was set.
    """
    if stop is not None and stop.is_set():
        raise Cancelled("restoration cancelled before it started.")
    gen = restore_iter(image, task=task, scale=scale, model=model, axes=axes, rgb=rgb, tile=tile,
                       device=device, planes=planes)
    try:
        for ev in gen:
            if progress is not None:
                progress(ev.done, ev.total)
            if ev.result is not None:
                return ev.result
            if stop is not None and stop.is_set():
                raise Cancelled(f"restoration cancelled after {ev.done} of {ev.total} tiles.")
    finally:
        gen.close()
    raise RuntimeError("restore_iter ended without a result")  # pragma: no cover
