"""Restore n-D images with a VDSR model: super-resolution, denoising, JPEG deblocking.

:func:`restore` is the one engine behind the CLI, the napari widgets and scripts;
:func:`restore_iter` is the same work as a generator of :class:`RestoreProgress`
events (one per tile) for progress bars and cancellation; :func:`restore_blocks`
yields the result block by block (for outputs larger than memory), and a dask
array given to :func:`restore` gives a lazy dask array (:mod:`.lazy`).

Tiles
-----
Every output tile is computed from the matching input region plus margins: the
halo the network needs (``depth`` px) and the bicubic kernel's support
(:mod:`.upsample`); a tile therefore equals the same pixels of the whole-image
result, whatever the tile size, block size or dask chunking: integer outputs exactly,
float outputs to float32 rounding (convolutions of other sizes add in another order).

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
the input dtype (float results are not clipped, except float16 to its finite range).  RGB: the network sees the
luminance Y (BT.601, MATLAB convention) of the bicubic-upsampled image; chroma
(and alpha) are bicubic only.

No Qt or napari imports.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from .cancel import raise_if_stopped, stop_check
from .errors import Cancelled, InputError, ModelError
from .memory import check_fits
from .tiling import (
    DEFAULT_TILE,
    MIN_TILE,
    device_tuning,
    forward_crop,
    halo_for,
    is_out_of_memory,
    prepare_net,
    tile_boxes,
    trim_heap,
)

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
    "RestoredBlock",
    "restore_blocks",
    "block_grid",
    "block_shape",
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
    tile : int or None
        Tile size in use (it shrinks after an out-of-memory back-off).
    """

    done: int
    total: int
    plane: int
    n_planes: int
    result: Optional[np.ndarray] = None
    tile: Optional[int] = None


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
    guessed = rgb is None  # rgb=False: the caller says so (a napari layer shown as planes of its last two axes)
    if rgb is None:
        rgb = nd >= 3 and shape[-1] in (3, 4) and shape[-2] > 4 and shape[-3] > 4
    elif rgb:
        if nd < 3 or shape[-1] not in (3, 4):
            raise InputError(
                f"rgb=True needs a last axis of 3 (RGB) or 4 (RGBA) samples, got shape {shape}; "
                "pass rgb=False or give axes explicitly (e.g. axes='CYX')."
            )
    if guessed and not rgb and nd >= 3 and shape[-1] <= 4 and shape[-2] > 4 and shape[-3] > 4:
        example = {3: "YXC", 4: "ZYXC", 5: "TZYXC"}.get(nd, "TZYXC")
        raise InputError(
            f"an array of shape {shape} looks like channels last (Y, X, C): read as ...YX, its images would be "
            f"{shape[-1]} pixel(s) wide. Give the axes: --axes {example} on the command line, axes='{example}' "
            "in Python; in napari, open the channels as layers of their own (viewer.add_image(data, "
            "channel_axis=-1))."
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
        try:
            example = infer_axes(shape, rgb) if len(shape) >= 2 else "YX"
        except InputError:  # a shape whose axes cannot be guessed
            example = "TZYXC"[-len(shape):] if len(shape) <= 5 else "TCZYX"
        raise InputError(
            f"axes {axes!r} has {len(ax)} letters but the image has {len(shape)} axes (shape {shape}); "
            f"give one letter per axis, e.g. {example!r}."
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
    if isinstance(image, torch.Tensor):  # a tensor's dtype is not a numpy dtype: hand over its values
        return image.detach().cpu().numpy()
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


def _is_dask(a: Any) -> bool:
    return hasattr(a, "dask") and hasattr(a, "compute") and hasattr(a, "chunks")


def _in_memory(a: Any) -> bool:
    """numpy arrays already in memory (memory-mapped files are read region by region instead)."""
    return isinstance(a, np.ndarray) and not isinstance(a, np.memmap)


#: Reads of array-likes that are not in memory (zarr, files) stay below this many bytes.
SLAB_BYTES = 32 * 2**20
#: After a CPU forward pass on at least this many pixels, free heap pages go back to the system.
TRIM_PIXELS = 256 * 256


class _PlaneReader:
    """Regions of one plane of an array-like, in the canonical ``(Y, X[, S])`` layout.

    numpy planes are views; dask planes are computed once per plane; other array-likes
    (zarr, TIFF/npy files read lazily) are read region by region, with one band of rows
    (:meth:`prefetch`) kept so that neighbouring tiles do not read the same rows twice.
    """

    def __init__(self, img: Any, idx: tuple, ax: str, to_canon: list[int]) -> None:
        self.img, self.idx, self.to_canon = img, idx, to_canon
        self.iy, self.ix = ax.index("Y"), ax.index("X")
        self.width = int(img.shape[self.ix])
        self.plane: Optional[np.ndarray] = None
        self.band: Optional[tuple[int, int, np.ndarray]] = None
        if _in_memory(img):
            self.plane = np.transpose(img[idx], to_canon)
        elif _is_dask(img):
            self.plane = np.transpose(np.asarray(img[idx]), to_canon)

    @property
    def lazy(self) -> bool:
        return self.plane is None

    def _read(self, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
        idx = list(self.idx)
        idx[self.iy] = slice(i0, i1)
        idx[self.ix] = slice(j0, j1)
        return np.transpose(np.asarray(self.img[tuple(idx)]), self.to_canon)

    def prefetch(self, i0: int, i1: int) -> None:
        """Read rows ``[i0, i1)`` (full width) once for the regions that follow."""
        if self.plane is None:
            self.band = None  # free the previous band first
            self.band = (i0, i1, self._read(i0, i1, 0, self.width))

    def region(self, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
        if self.plane is not None:
            return self.plane[i0:i1, j0:j1]
        b = self.band
        if b is not None and b[0] <= i0 and i1 <= b[1]:
            return b[2][i0 - b[0] : i1 - b[0], j0:j1]
        return self._read(i0, i1, j0, j1)

    def row_slabs(self, itemsize: int, samples: int) -> Iterator[tuple[int, int]]:
        h = int(self.img.shape[self.iy])
        rows = max(1, SLAB_BYTES // max(1, self.width * itemsize * max(1, samples)))
        for i0 in range(0, h, rows):
            yield i0, min(h, i0 + rows)


def _check_finite(p: np.ndarray, where: str) -> None:
    if p.dtype.kind == "f" and not np.isfinite(p).all():
        raise InputError(
            f"{where} contains NaN or infinite values; replace them first (e.g. np.nan_to_num(image)) and try again."
        )


def _to_dtype(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``x`` as ``dtype``: integers rounded and clipped to the dtype's range.

    32- and 64-bit integers are clipped in float64 against bounds that float64 holds exactly (in
    float32, 2**31 - 1 rounds up to 2**31 and the brightest pixels would wrap around on the cast).
    """
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        lo, hi = float(info.min), float(info.max)
        if int(hi) > info.max:  # 2**63 - 1 and 2**64 - 1 are not float64 numbers
            hi = float(np.nextafter(hi, 0.0))
        x = np.rint(np.asarray(x, dtype=np.float64 if dtype.itemsize >= 4 else np.float32))
        return np.clip(x, lo, hi).astype(dtype)
    if dtype.kind == "f" and dtype.itemsize < np.dtype(np.float32).itemsize:  # float16: overshoot stays finite
        big = float(np.finfo(dtype).max)
        return np.clip(x, -big, big).astype(dtype)
    return x.astype(dtype, copy=False)


@dataclass
class _Job:
    """A checked restoration job: everything :func:`restore_iter` and friends need."""

    img: Any
    dtype: np.dtype
    shape: tuple[int, ...]
    ax: str
    task: str
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    net: torch.nn.Module
    card: dict
    device: Any  # torch.device (prepared) or the user's spec (lazy jobs resolve it where they run)
    amp: Any
    tile: int
    block: int
    todo: list[int]
    plane_axes: list[int]
    plane_sizes: list[int]
    is_rgb: bool
    n_samples: int
    to_canon: list[int]
    from_canon: list[int]
    compact: bool
    ensemble: bool = False

    @property
    def n_all(self) -> int:
        return int(np.prod(self.plane_sizes, dtype=np.int64))

    @property
    def grid(self) -> tuple[list[list[tuple[int, int]]], list[list[tuple[int, int]]]]:
        return block_grid(self.out_hw, self.tile, self.block)

    @property
    def per_plane(self) -> int:
        gy, gx = self.grid
        return len(gy) * len(gx)

    @property
    def total(self) -> int:
        return self.per_plane * len(self.todo)

    @property
    def result_shape(self) -> tuple[int, ...]:
        oh, ow = self.out_hw
        if self.compact:
            return (len(self.todo), oh, ow) + ((self.n_samples,) if self.is_rgb else ())
        out = list(self.shape)
        out[self.ax.index("Y")] = oh
        out[self.ax.index("X")] = ow
        return tuple(out)

    def index_of(self, k: int) -> tuple:
        """Index of plane ``k`` in the input (ints on plane axes, full slices elsewhere)."""
        pos = np.unravel_index(k, self.plane_sizes) if self.plane_sizes else ()
        idx: list[Any] = [slice(None)] * len(self.shape)
        for a, p in zip(self.plane_axes, pos):
            idx[a] = int(p)
        return tuple(idx)

    def out_index(self, pos: int, k: int, box: tuple[int, int, int, int]) -> tuple:
        """Index of ``box`` of plane ``k`` (``pos``-th processed) in the result array."""
        y0, y1, x0, x1 = box
        if self.compact:
            return (pos, slice(y0, y1), slice(x0, x1)) + ((slice(None),) if self.is_rgb else ())
        idx = list(self.index_of(k))
        idx[self.ax.index("Y")] = slice(y0, y1)
        idx[self.ax.index("X")] = slice(x0, x1)
        return tuple(idx)


def _check_tile(value: Any, what: str = "tile size") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < MIN_TILE:
        raise InputError(f"{what} must be an integer of at least {MIN_TILE} px, got {value!r}; "
                         f"{DEFAULT_TILE} is a good default.")
    return int(value)


def _caller_level() -> int:
    """The ``stacklevel`` of a warning raised in the caller of this function that names the first frame
    outside this package (the user's line, through restore's generators)."""
    import sys

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _prepare(
    image: Any,
    task: str,
    scale: Any,
    model: Any,
    axes: Optional[str],
    rgb: Optional[bool],
    tile: int,
    device: Any,
    planes: Optional[Sequence[int]],
    amp: Any = None,
    block: Optional[int] = None,
    resolve: bool = True,
    ensemble: bool = False,
) -> _Job:
    """Check the arguments and load the model; ``resolve=False`` leaves the device and the net as given."""
    task = _check_task(task)
    if amp is not None and not (isinstance(amp, bool) or amp in (torch.float16, torch.bfloat16, torch.float32)):
        raise InputError(f"amp must be None (auto), True, False or a torch dtype (torch.float16, torch.bfloat16; "
                         f"torch.float32 = full precision), got {amp!r}.")
    img = _as_arraylike(image)
    if any(isinstance(s, float) and not math.isfinite(s) for s in img.shape):
        raise InputError(f"the array's shape is not known yet ({img.shape}; e.g. a dask array after boolean "
                         "indexing): call .compute_chunk_sizes() on it first.")
    shape = tuple(int(s) for s in img.shape)
    from .normalize import check_dtype

    dtype = np.dtype(img.dtype)
    check_dtype(dtype)
    if any(s == 0 for s in shape):
        raise InputError(f"the image is empty (shape {shape}); pick a layer or file with pixels in it.")
    ax = normalize_axes(axes, shape, rgb)
    if axes is None and rgb is None and ax.endswith("S") and dtype != np.uint8:
        import warnings

        # 16-bit or float data with 3 or 4 values per pixel: as often channels as a colour image
        warnings.warn(f"an array of shape {shape} ({dtype}) is read as one RGB colour image ({ax}), so only its "
                      "luminance is restored and its colour follows bicubic. If its last axis holds channels, pass "
                      f"axes='{ax.replace('S', 'C')}' to restore each as a grey image; axes='{ax}' or rgb=True "
                      "says it is colour and silences this warning.", RuntimeWarning, stacklevel=_caller_level())
    h, w = shape[ax.index("Y")], shape[ax.index("X")]
    if h < 2 or w < 2:
        raise InputError(
            f"the image plane is only {h}x{w} pixels; restoring needs at least 2x2 pixels (check the axes: "
            f"{ax!r} was used for shape {shape})."
        )
    sy, sx = (1.0, 1.0) if task != "sr" else _check_scale(scale)
    tile = _check_tile(tile)
    block = tile if block is None else _check_tile(block, "block size")

    plane_axes = [i for i, c in enumerate(ax) if c not in "YXS"]
    plane_sizes = [shape[i] for i in plane_axes]
    n_all = int(np.prod(plane_sizes, dtype=np.int64))
    if planes is None:
        todo = list(range(n_all))
    else:
        try:
            todo = [operator.index(p) for p in planes]  # whole numbers only: 0.7 is not plane 0
        except TypeError:
            raise InputError(f"planes must be a list of whole plane indices, got {planes!r}.") from None
        bad = [p for p in todo if not 0 <= p < n_all]
        if bad or not todo:
            raise InputError(
                f"plane indices {bad or planes!r} are out of range: the image has {n_all} plane(s) over axes "
                f"{''.join(ax[i] for i in plane_axes) or '(none)'}; use indices 0..{n_all - 1}."
            )

    net, card = _resolve_model(model, task)
    first = next((m for m in net.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if first is not None and first.in_channels != 1:
        raise ModelError(
            f"the model takes {first.in_channels} input channels; VDSR models restore one grey plane (or Y) at "
            "a time: pass a model with 1 input channel (every bundled and trained napari-vdsr model has one)."
        )
    if resolve:
        dev = _resolve_device(device)
        net = prepare_net(net, dev)
    else:
        dev = device
    is_rgb = "S" in ax
    rest = [c for c in ax if c in "YXS"]  # layout of one plane as read
    canon = "YXS" if is_rgb else "YX"
    return _Job(
        img=img, dtype=dtype, shape=shape, ax=ax, task=task, in_hw=(h, w),
        out_hw=_scaled_yx(shape, ax, (sy, sx)), net=net, card=card, device=dev, amp=amp, tile=tile,
        block=block, todo=todo, plane_axes=plane_axes, plane_sizes=plane_sizes, is_rgb=is_rgb,
        n_samples=shape[ax.index("S")] if is_rgb else 0, to_canon=[rest.index(c) for c in canon],
        from_canon=[canon.index(c) for c in rest], compact=planes is not None, ensemble=bool(ensemble),
    )


_SCANNING = "while reading the intensity range of the image"


def _intensity(job: _Job):
    """Intensity map over the whole image (numpy/dask: one reduction; other array-likes: streamed slabs).

    The alpha of an RGBA image is left out: an opaque alpha at the dtype's top would squeeze the
    colours into a sliver of the network's range (and training maps RGB(A) images by their colours).
    """
    from .normalize import Intensity, intensity_from_extremes, intensity_range, pair_extremes

    img, dtype = job.img, job.dtype
    if dtype == np.uint8:
        return Intensity(0.0, 255.0)
    alpha = job.is_rgb and job.n_samples == 4
    if _in_memory(img) or _is_dask(img):
        if alpha:
            s = job.ax.index("S")
            img = img[(slice(None),) * s + (slice(0, 3),)]
        yx = (job.ax.index("Y"), job.ax.index("X"))
        if not _is_dask(img):
            return intensity_range(img, dtype, yx=yx)
        # a lazy stack is read whole for its range (even for one plane): a caller's Cancel stops the reads
        # (dask's local schedulers call ``pretask`` in this thread; a distributed client does not call it)
        def pretask(*_: Any) -> None:
            raise_if_stopped(_SCANNING)

        # dask's callback tuple: (start, start_state, pretask, posttask, finish)
        return intensity_range(img, dtype, yx=yx, callbacks=[(None, None, pretask, None, None)])
    lo, hi, plo, phi = math.inf, -math.inf, math.inf, -math.inf
    for k in range(job.n_all):
        reader = _PlaneReader(img, job.index_of(k), job.ax, job.to_canon)
        for i0, i1 in reader.row_slabs(dtype.itemsize, job.n_samples):
            raise_if_stopped(_SCANNING)
            p = reader.region(i0, i1, 0, reader.width)
            if alpha:
                p = p[..., :3]
            _check_finite(p, "the image")
            lo, hi = min(lo, float(p.min())), max(hi, float(p.max()))
            a, b = pair_extremes(p, (0, 1))  # pairs split by a slab edge are not seen (a rare narrowing)
            plo, phi = min(plo, float(a)), max(phi, float(b))
    return intensity_from_extremes(lo, hi, plo, phi, dtype)


def _upsample_on_device(device: torch.device) -> bool:
    """Whether grey planes are upsampled on ``device`` (CUDA: float64 there, region-independent)."""
    return device.type == "cuda"


class _BoxEngine:
    """Computes any box of a restored plane from the matching input region (plus margins).

    For every output box the engine takes the box plus a halo of ``halo`` px (cropped
    to the plane), reads the input region that the bicubic upsampling of that crop
    needs (:mod:`.upsample`), normalises it, upsamples it, runs the net once and keeps
    the box.  A box is therefore the same whether it is computed alone, inside a larger
    box or with the whole plane.  Boxes larger than :attr:`tile` are split; when a
    forward pass runs out of memory the tile size is halved (with a warning) and the
    box is done again in smaller pieces.
    """

    def __init__(self, job: _Job, inten: Any, device: torch.device, net: torch.nn.Module) -> None:
        self.job, self.inten, self.device, self.net = job, inten, device, net
        self.halo = halo_for(net)
        self.tile = job.tile
        self.backoffs = 0

    def box(self, reader: Any, box: tuple[int, int, int, int], where: str = "the image") -> np.ndarray:
        """Restored values (output dtype) of ``box`` in the canonical ``(Y, X[, S])`` layout."""
        y0, y1, x0, x1 = box
        size = max(y1 - y0, x1 - x0)
        if size > self.tile:
            job = self.job
            out = np.empty((y1 - y0, x1 - x0) + ((job.n_samples,) if job.is_rgb else ()), dtype=job.dtype)
            for a, b, c, d in tile_boxes((y1 - y0, x1 - x0), self.tile):
                out[a:b, c:d] = self.box(reader, (y0 + a, y0 + b, x0 + c, x0 + d), where)
            return out
        failed = False
        try:
            return self._single(reader, box, where)
        except Exception as exc:  # noqa: BLE001 - only allocation failures are handled, the rest re-raised
            if not is_out_of_memory(exc):
                raise
            failed = True  # handled below, outside the except block, so the failed tensors can be freed
        if failed:
            self._back_off(size)
        return self.box(reader, box, where)

    def block(self, reader: Any, ys: list[tuple[int, int]], xs: list[tuple[int, int]], where: str) -> np.ndarray:
        """A block made of the tiles ``ys`` x ``xs`` (intervals of the plane's tile grid)."""
        y0, x0 = ys[0][0], xs[0][0]
        if len(ys) == 1 and len(xs) == 1:
            return self.box(reader, (y0, ys[0][1], x0, xs[0][1]), where)
        job = self.job
        out = np.empty((ys[-1][1] - y0, xs[-1][1] - x0) + ((job.n_samples,) if job.is_rgb else ()), dtype=job.dtype)
        for a, b in ys:
            for c, d in xs:
                out[a - y0 : b - y0, c - x0 : d - x0] = self.box(reader, (a, b, c, d), where)
        return out

    def _back_off(self, size: int) -> None:
        import gc
        import warnings

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        new = min(self.tile, size) // 2
        if new < MIN_TILE:
            raise ModelError(
                f"out of memory on {self.device} even for a tile of {size} px; free memory (close other programs "
                "using the device) or run on the CPU (device='cpu', --device cpu)."
            )
        warnings.warn(
            f"out of memory on {self.device} for a {size} px tile: the tile size is halved to {new} px and the "
            "run continues (results agree to float rounding; pass a smaller tile to avoid the retries).",
            RuntimeWarning,
            stacklevel=3,
        )
        self.tile = new
        self.backoffs += 1

    def _single(self, reader: Any, box: tuple[int, int, int, int], where: str) -> np.ndarray:
        from .color import rgb_to_ycbcr, ycbcr_to_rgb
        from .upsample import source_box, upsample_region, upsample_region_torch

        job, inten, halo = self.job, self.inten, self.halo
        (h, w), (oh, ow) = job.in_hw, job.out_hw
        y0, y1, x0, x1 = box
        crop = (max(0, y0 - halo), min(oh, y1 + halo), max(0, x0 - halo), min(ow, x1 + halo))
        src = source_box((h, w), (oh, ow), crop)
        raw = reader.region(*src)
        _check_finite(raw, where)
        origin = (src[0], src[2])
        inner = (slice(y0 - crop[0], y1 - crop[0]), slice(x0 - crop[2], x1 - crop[2]))
        if job.is_rgb:
            rgb = inten.to_net(raw[..., :3]) * np.float32(255.0)  # 0..255, as the models were trained
            ycc = rgb_to_ycbcr(upsample_region(rgb, origin, (h, w), (oh, ow), crop))
            x = np.ascontiguousarray(ycc[..., 0] / np.float32(255.0))
        elif _upsample_on_device(self.device):
            # on a GPU the bicubic upsampling runs there too (a CPU pass of the 4x larger image
            # took longer than the network), and only the small input region crosses the bus
            lr = torch.from_numpy(np.ascontiguousarray(inten.to_net(raw), dtype=np.float32)).to(self.device)
            x = upsample_region_torch(lr, origin, (h, w), (oh, ow), crop)
        else:
            x = upsample_region(inten.to_net(raw), origin, (h, w), (oh, ow), crop)
        res = forward_crop(self.net, x, self.device, job.amp, ensemble=job.ensemble)[inner]
        if self.device.type == "cpu" and x.shape[0] * x.shape[1] >= TRIM_PIXELS:
            trim_heap()
        if not job.is_rgb:
            return _to_dtype(inten.from_net(res), job.dtype)
        part = ycc[inner].copy()
        part[..., 0] = res * np.float32(255.0)
        out = np.empty((y1 - y0, x1 - x0, job.n_samples), dtype=job.dtype)
        out[..., :3] = _to_dtype(inten.from_net(ycbcr_to_rgb(part) / np.float32(255.0)), job.dtype)
        if job.n_samples == 4:  # alpha: bicubic only, in its own units
            alpha = raw[..., 3].astype(np.float32)
            out[..., 3] = _to_dtype(upsample_region(alpha, origin, (h, w), (oh, ow), box), job.dtype)
        return out


@dataclass
class RestoredBlock:
    """One block of the result, as produced by :func:`restore_blocks`.

    Attributes
    ----------
    index : tuple
        Where the block goes in the full result: ``result[index] = data``.
    data : ndarray
        The restored values (output dtype), axes in the order of the result.
    plane : int
        Flat index of the plane (C order over the non-Y/X/S axes).
    position : int
        Position of the plane in processing order (0 .. ``n_planes`` - 1).
    box : (int, int, int, int)
        ``(y0, y1, x0, x1)`` of the block in the output plane.
    done, total : int
        Blocks finished / in all.
    tile : int
        Tile size in use (smaller than asked for after an out-of-memory back-off).
    yxs : ndarray
        ``data`` in the ``(Y, X[, S])`` layout.
    """

    index: tuple
    data: np.ndarray
    plane: int
    position: int
    box: tuple[int, int, int, int]
    done: int
    total: int
    tile: int
    yxs: np.ndarray = field(repr=False, default=None)  # type: ignore[assignment]


def _block_gen(job: _Job) -> Iterator[RestoredBlock]:
    with device_tuning(job.device):  # undone when the generator finishes or is closed
        yield from _block_work(job)


def _block_work(job: _Job) -> Iterator[RestoredBlock]:
    from .upsample import resampler

    inten = _intensity(job)
    engine = _BoxEngine(job, inten, job.device, job.net)
    gy, gx = job.grid
    ry = resampler(job.in_hw[0], job.out_hw[0])
    oh = job.out_hw[0]
    done = 0
    for pos, k in enumerate(job.todo):
        reader = _PlaneReader(job.img, job.index_of(k), job.ax, job.to_canon)
        where = f"plane {k}" if job.n_all > 1 else "the image"
        for ys in gy:
            y0, y1 = ys[0][0], ys[-1][1]
            if reader.lazy:
                reader.prefetch(*ry.source(max(0, y0 - engine.halo), min(oh, y1 + engine.halo)))
            for xs in gx:
                box = (y0, y1, xs[0][0], xs[-1][1])
                data = engine.block(reader, ys, xs, where)
                done += 1
                yield RestoredBlock(
                    index=job.out_index(pos, k, box), data=np.transpose(data, job.from_canon), plane=k,
                    position=pos, box=box, done=done, total=job.total, tile=engine.tile, yxs=data,
                )
        reader.band = None


def restore_blocks(
    image: Any,
    task: str = "sr",
    scale: float | Sequence[float] = 2.0,
    model: Any = None,
    axes: Optional[str] = None,
    rgb: Optional[bool] = None,
    tile: int = DEFAULT_TILE,
    device: str | torch.device = "auto",
    planes: Optional[Sequence[int]] = None,
    block: Optional[int] = None,
    amp: Optional[bool] = None,
    ensemble: bool = False,
) -> Iterator[RestoredBlock]:
    """Restore ``image`` block by block, without ever holding the whole result.

    Same parameters as :func:`restore`, plus ``block``.  The output planes are cut into
    blocks of whole tiles, at most ``max(block, tile)`` px a side (default: ``tile``, one
    tile per block; see :func:`block_grid`), plane after plane, row-major inside a plane.
    Each block is computed from the matching
    region of the input plus margins, so reading is lazy for array-likes that are not
    in memory (zarr, :class:`~napari_vdsr.core.io.RawArray`, ...) and memory is bounded
    by the block and tile sizes, not by the image.  Writing every block at
    ``out[block.index]`` gives exactly :func:`restore`'s result.

    Yields
    ------
    RestoredBlock
    """
    job = _prepare(image, task, scale, model, axes, rgb, tile, device, planes, amp=amp, block=block, ensemble=ensemble)
    return _block_gen(job)


def block_grid(
    out_hw: Sequence[int], tile: int, block: Optional[int] = None
) -> tuple[list[list[tuple[int, int]]], list[list[tuple[int, int]]]]:
    """The blocks of an output plane of ``out_hw``, along Y and along X, as lists of tile intervals.

    Each axis is split into ``ceil(n / tile)`` nearly equal tiles (:func:`~.tiling.split_axis`);
    a block groups ``max(1, block // step)`` consecutive tiles, ``step`` being the tile length,
    so every block is made of whole tiles of the same grid whatever ``block`` is: tiles --
    and therefore results -- do not depend on the block size.
    """
    from .tiling import split_axis

    out = []
    for n in out_hw[-2:]:
        tiles = split_axis(int(n), int(tile))
        step = tiles[0][1] - tiles[0][0]
        m = max(1, int(block or tile) // step)
        out.append([tiles[i : i + m] for i in range(0, len(tiles), m)])
    return out[0], out[1]


def block_shape(out_hw: Sequence[int], block: int, tile: Optional[int] = None) -> tuple[int, int]:
    """Largest block ``(height, width)`` :func:`restore_blocks` uses for output planes of ``out_hw``.

    Blocks start at multiples of this shape, so it is the chunk shape that makes every
    block fill exactly one chunk of a zarr array.  ``tile`` defaults to ``block``.
    """
    gy, gx = block_grid(out_hw, tile or block, block)
    return gy[0][-1][1] - gy[0][0][0], gx[0][-1][1] - gx[0][0][0]


def restore_iter(
    image: Any,
    task: str = "sr",
    scale: float | Sequence[float] = 2.0,
    model: Any = None,
    axes: Optional[str] = None,
    rgb: Optional[bool] = None,
    tile: int = DEFAULT_TILE,
    device: str | torch.device = "auto",
    planes: Optional[Sequence[int]] = None,
    amp: Optional[bool] = None,
    ensemble: bool = False,
) -> Iterator[RestoreProgress]:
    """Restore ``image`` and report progress after every tile.

    Arguments are checked (and the model loaded) when this function is called; the
    work happens while the returned iterator is consumed.  Stopping the iteration
    (``break``, ``gen.close()``) cancels the work within one tile.  See :func:`restore`
    for the parameters.

    Yields
    ------
    RestoreProgress
        One event per tile; the last one has ``done == total`` and carries the result
        in ``result``.
    """
    job = _prepare(image, task, scale, model, axes, rgb, tile, device, planes, amp=amp, ensemble=ensemble)
    shape = job.result_shape
    check_fits(
        int(np.prod(shape, dtype=np.int64)) * job.dtype.itemsize,
        f"the result {tuple(shape)} {job.dtype}",
        "restore fewer planes (planes=...) or a cropped region, or have it written block by block: restore(...) "
        "of a dask array gives a lazy result to store with .to_zarr(); `napari-vdsr predict` writes TIFF or zarr "
        "files block by block.",
    )
    return _result_gen(job)


def _result_gen(job: _Job) -> Iterator[RestoreProgress]:
    result = np.empty(job.result_shape, dtype=job.dtype)
    n = len(job.todo)
    gen = _block_gen(job)
    tile = job.tile
    try:
        for b in gen:
            result[b.index] = b.data
            tile = b.tile
            if b.done < b.total:
                yield RestoreProgress(b.done, b.total, b.position, n, tile=tile)
    finally:
        gen.close()
    yield RestoreProgress(job.total, job.total, n - 1, n, result, tile=tile)


def restore(
    image: Any,
    task: str = "sr",
    scale: float | Sequence[float] = 2.0,
    model: Any = None,
    axes: Optional[str] = None,
    rgb: Optional[bool] = None,
    tile: int = DEFAULT_TILE,
    device: str | torch.device = "auto",
    planes: Optional[Sequence[int]] = None,
    progress: Optional[Callable[[int, int], Any]] = None,
    stop: Any = None,
    amp: Optional[bool] = None,
    lazy: Optional[bool] = None,
    ensemble: bool = False,
) -> Any:
    """Restore an n-D image with a VDSR model.

    Parameters
    ----------
    image : array-like
        numpy, dask or zarr array (never modified; array-likes that are not in memory
        are read region by region).  Integer (uint8, uint16, int16, ...) or float dtype.
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
        so the result equals the untiled one.  On out-of-memory errors the tile size
        is halved (with a :class:`RuntimeWarning`) and the run continues.
    device : str or torch.device
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
    planes : sequence of int, optional
        Restore only these planes (flat C-order indices over the non-Y/X/S axes).
        The result then has shape ``(len(planes), H', W')`` (RGB: ``(len(planes), H', W', S)``),
        planes in the order given.
    progress : callable(done, total), optional
        Called after every tile (not used for lazy results).
    stop : object with ``is_set()``, optional
        E.g. a :class:`threading.Event`; when set, work stops soon (on the CPU between bands of
        rows of the tile under way, on CUDA after the tile; also while the intensity range of a
        lazy stack is read) and :class:`~napari_vdsr.core.errors.Cancelled` is raised (not used
        for lazy results).
    amp : bool, optional
        ``None`` (default): bfloat16 autocast on CUDA, float32 elsewhere. ``True``: bfloat16
        also on CPUs that compute it natively (AMX / AVX512-BF16; about 2x faster, results within
        1-2 grey levels), float32 on other CPUs. ``False``: float32 everywhere.
    ensemble : bool
        Geometric self-ensemble: average the network's results over the 8 rotations and
        mirror images of every tile (:func:`~napari_vdsr.core.tiling.ensemble_net`).
        8x the work for a little more accuracy (about +0.1 dB) and fewer
        orientation-dependent artifacts.  Default off.
    lazy : bool, optional
        ``None`` (default): a dask array gives a lazy dask array (see
        :func:`napari_vdsr.core.lazy.restore_dask`), anything else a numpy array.
        ``True``: always return a lazy dask array; ``False``: always compute now.

    Returns
    -------
    ndarray or dask.array.Array
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
    if lazy is None:
        lazy = _is_dask(image) and planes is None
    if lazy:
        if planes is not None:
            raise InputError("planes cannot be combined with a lazy result; select the planes from the dask "
                             "array first (e.g. image[2:4]) or pass lazy=False.")
        from .lazy import restore_dask

        return restore_dask(image, task=task, scale=scale, model=model, axes=axes, rgb=rgb, tile=tile,
                            device=device, amp=amp, ensemble=ensemble)
    if stop is not None and stop.is_set():
        raise Cancelled("restoration cancelled before it started.")
    gen = restore_iter(image, task=task, scale=scale, model=model, axes=axes, rgb=rgb, tile=tile,
                       device=device, planes=planes, amp=amp, ensemble=ensemble)
    try:
        # ``stop`` also acts within a tile (CPU bands, ensemble passes) and while a lazy stack's range is read
        with stop_check(stop.is_set) if stop is not None else contextlib.nullcontext():
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
