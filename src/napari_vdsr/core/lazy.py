"""Lazy restoration of dask arrays: one dask block at a time, with halo overlap.

``restore(dask_array)`` (or :func:`restore_dask`) returns a *lazy* dask array of the
result.  Nothing is computed until you ask (``.compute()``, ``.to_zarr()``,
``da.store``...), and because the graph only holds plain functions, the model
and numbers, the same call runs on the threaded scheduler or on a
``dask.distributed`` cluster (the model is sent to the workers with the tasks;
``device="auto"`` is resolved on each worker, so GPU workers use their GPU).

How
---
* The input's Y/X chunks are extended by a margin (``dask.array.overlap`` with
  ``boundary="none"``): the network's halo (``depth`` px of output) plus the support
  of the bicubic upsampling, in input pixels.  Chunks smaller than that margin are
  merged first; S (RGB samples) is put in one chunk.
* Output blocks are made of whole tiles of the tile grid that ``restore()`` uses on
  numpy arrays (about the input chunk size times the scale, at most 4096 px), and
  the input is rechunked so that its chunk edges are the block edges mapped back
  through the scale.  Each block is computed tile by tile with the engine of
  :mod:`.restore` (memory per task is bounded by the block and the tile; an
  out-of-memory error halves the tile), with exactly the tiles -- hence exactly the
  values -- of ``restore(numpy_array)``.
* Intensity normalisation uses the min/max of the *whole* array (as for numpy; isolated
  hot or dead pixels left out, :func:`~napari_vdsr.core.normalize.intensity_range`);
  for non-8-bit data that reduction runs when :func:`restore_dask` is called (one
  streamed pass over the input), so that the lazy result does not make dask keep
  every input block in memory until the reduction is done.

No Qt or napari imports.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import threading
import weakref
from functools import partial
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .errors import InputError
from .restore import _BoxEngine, _intensity, _is_dask, _Job, _prepare
from .tiling import DEFAULT_TILE, device_tuning, halo_for, prepare_net

__all__ = ["restore_dask", "DEFAULT_CHUNK"]

#: Y/X chunk size (input pixels) used when a numpy array is made lazy, and the largest
#: output block (pixels per side) a dask chunk may produce before it is split.
DEFAULT_CHUNK = 1024
_MAX_OUT_BLOCK = 4096

_DEVICE_NAMES = ("auto", "cpu", "mps", "cuda")


def _check_device_name(device: Any) -> None:
    if isinstance(device, torch.device):
        return
    name = str(device or "auto").lower()
    ok = name in _DEVICE_NAMES or (name.startswith("cuda:") and name[5:].isdigit())
    if not ok:
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps.")


def _margin(b: Sequence[int], o: Sequence[int], n_in: int, n_out: int, halo: int) -> int:
    """Input pixels each block needs beyond its own chunk to compute its output block exactly."""
    from .upsample import resampler

    r = resampler(n_in, n_out)
    need = 0
    for b0, b1, o0, o1 in zip(b[:-1], b[1:], o[:-1], o[1:]):
        i0, i1 = r.source(max(0, o0 - halo), min(n_out, o1 + halo))
        need = max(need, b0 - i0, i1 - b1)
    return need


def _plan_axis(
    chunks: Sequence[int], n_in: int, n_out: int, tile: int, halo: int
) -> tuple[list[int], list[int], list[list[tuple[int, int]]], int]:
    """Blocks along Y or X: input chunk edges, output block edges, the tiles of each block, the margin.

    Output blocks are made of whole tiles of the plane's tile grid (the one
    :func:`~napari_vdsr.core.restore.restore` uses), about as large as the input chunks
    times the scale (at most :data:`_MAX_OUT_BLOCK` px); input chunk edges are the
    output edges mapped back through the scale.  Blocks grow until every input chunk
    is at least as long as the margin, so one neighbour always supplies it.
    """
    from .tiling import split_axis

    tiles = split_axis(n_out, tile)
    step = tiles[0][1] - tiles[0][0]
    want = min(max(max(chunks) * n_out / n_in, step), max(_MAX_OUT_BLOCK, step))
    m = max(1, int(round(want / step)))
    while True:
        groups = [tiles[i : i + m] for i in range(0, len(tiles), m)]
        o = [g[0][0] for g in groups] + [n_out]
        b = [int(math.floor(v * n_in / n_out + 0.5)) for v in o]
        if len(groups) == 1:
            return b, o, groups, 0
        sizes = np.diff(b)
        if sizes.min() > 0:
            d = _margin(b, o, n_in, n_out, halo)
            if sizes.min() >= d:
                return b, o, groups, d
        m += 1


@dataclasses.dataclass
class _BlockSpec:
    """What every block task needs (no reference to the input array)."""

    job: _Job
    lo: float
    hi: float
    net: torch.nn.Module
    device: Any
    iy: int
    ix: int
    by: list[int]
    bx: list[int]
    gy: list[list[tuple[int, int]]]
    gx: list[list[tuple[int, int]]]
    dy: int
    dx: int


_PREPARED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_PREPARED_LOCK = threading.Lock()


def _prepared(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """One inference copy of ``net`` per device and process (tasks share it; inference is thread-safe)."""
    with _PREPARED_LOCK:
        per = _PREPARED.setdefault(net, {})
        key = str(device)
        if key not in per:
            per[key] = prepare_net(net, device)
        return per[key]


class _OffsetReader:
    """Regions of a plane held in memory that starts at ``(row0, col0)`` of the full plane."""

    def __init__(self, plane: np.ndarray, row0: int, col0: int) -> None:
        self.plane, self.row0, self.col0 = plane, row0, col0

    def region(self, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
        r0, c0 = i0 - self.row0, j0 - self.col0
        if r0 < 0 or c0 < 0 or i1 - self.row0 > self.plane.shape[0] or j1 - self.col0 > self.plane.shape[1]:
            raise RuntimeError(  # pragma: no cover - guarded by _margin
                f"block margin too small: rows {i0}:{i1}, cols {j0}:{j1} requested from a block at "
                f"({self.row0}, {self.col0}) of shape {self.plane.shape[:2]}; please report."
            )
        return self.plane[r0 : i1 - self.row0, c0 : j1 - self.col0]


def _restore_block(block: np.ndarray, block_info: Optional[dict] = None, *, spec: _BlockSpec) -> np.ndarray:
    from .device import resolve_device
    from .normalize import Intensity

    info = block_info[None]
    loc, out_shape = info["chunk-location"], info["chunk-shape"]
    job, iy, ix = spec.job, spec.iy, spec.ix
    ky, kx = loc[iy], loc[ix]
    (h, w) = job.in_hw
    row0, col0 = max(0, spec.by[ky] - spec.dy), max(0, spec.bx[kx] - spec.dx)
    assert block.shape[iy] == min(h, spec.by[ky + 1] + spec.dy) - row0
    assert block.shape[ix] == min(w, spec.bx[kx + 1] + spec.dx) - col0
    dev = resolve_device(spec.device)
    engine = _BoxEngine(job, Intensity(spec.lo, spec.hi), dev, _prepared(spec.net, dev))
    out = np.empty(out_shape, dtype=job.dtype)
    plane_axes = job.plane_axes
    with device_tuning(dev):
        for pidx in np.ndindex(*[block.shape[a] for a in plane_axes]):
            idx: list[Any] = [slice(None)] * block.ndim
            for a, p in zip(plane_axes, pidx):
                idx[a] = p
            plane = np.transpose(block[tuple(idx)], job.to_canon)
            data = engine.block(_OffsetReader(plane, row0, col0), spec.gy[ky], spec.gx[kx], "the image")
            out[tuple(idx)] = np.transpose(data, job.from_canon)
    return out


def _net_digest(net: torch.nn.Module) -> str:
    """Names the computation: the class (module and name), its settings outside the weights
    (``VDSR.config``: residual or not) and the weights; equal digests must compute the same."""
    cls = type(net)
    h = hashlib.sha1(f"{cls.__module__}.{cls.__qualname__}".encode())
    config = getattr(net, "config", None)  # VDSR: a property
    if callable(config):
        config = config()
    if isinstance(config, dict):
        h.update(repr(sorted(config.items())).encode())
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def restore_dask(
    image: Any,
    task: str = "sr",
    scale: float | Sequence[float] = 2.0,
    model: Any = None,
    axes: Optional[str] = None,
    rgb: Optional[bool] = None,
    tile: int = DEFAULT_TILE,
    device: str | torch.device = "auto",
    amp: Optional[bool] = None,
    ensemble: bool = False,
):
    """Restore a dask (or any) array lazily; returns a dask array of the result.

    Parameters are those of :func:`napari_vdsr.core.restore.restore`; a non-dask
    array is wrapped with chunks of :data:`DEFAULT_CHUNK` px per plane.  ``device``
    is resolved where each block runs (a GPU worker uses its GPU with ``"auto"``).

    Returns
    -------
    dask.array.Array
        Shape :func:`~napari_vdsr.core.restore.output_shape`, the input dtype; equal to
        the numpy result of ``restore`` once computed.

    Raises
    ------
    InputError, ModelError
        As :func:`~napari_vdsr.core.restore.restore`, at call time (not at compute time).
    """
    import dask.array as da
    from dask.base import tokenize

    _check_device_name(device)
    if not _is_dask(image):
        from .restore import normalize_axes

        arr = image if hasattr(image, "shape") and hasattr(image, "dtype") else np.asarray(image)
        ax0 = normalize_axes(axes, arr.shape, rgb)
        chunks = tuple(DEFAULT_CHUNK if c in "YX" else (-1 if c == "S" else 1) for c in ax0)
        image = da.from_array(arr, chunks=chunks)
    job = _prepare(image, task, scale, model, axes, rgb, tile, device, None, amp=amp, resolve=False, ensemble=ensemble)
    x = job.img
    net = copy.deepcopy(job.net).cpu().eval()  # later changes to the caller's module do not leak in
    halo = halo_for(net)
    inten = _intensity(job)  # whole-array min/max (eager, streamed; see the module notes)

    ax = job.ax
    iy, ix = ax.index("Y"), ax.index("X")
    (h, w), (oh, ow) = job.in_hw, job.out_hw
    by, oy, gy, dy = _plan_axis(x.chunks[iy], h, oh, job.tile, halo)
    bx, ox, gx, dx = _plan_axis(x.chunks[ix], w, ow, job.tile, halo)
    want = list(x.chunks)
    want[iy], want[ix] = tuple(np.diff(by).tolist()), tuple(np.diff(bx).tolist())
    if job.is_rgb:
        want[ax.index("S")] = (job.n_samples,)
    if tuple(want) != x.chunks:
        x = x.rechunk(tuple(want))
    depth = {i: 0 for i in range(x.ndim)}
    depth[iy], depth[ix] = dy, dx
    xo = da.overlap.overlap(x, depth=depth, boundary="none") if (dy or dx) else x

    out_chunks = list(x.chunks)
    out_chunks[iy] = tuple(np.diff(oy).tolist())
    out_chunks[ix] = tuple(np.diff(ox).tolist())
    spec = _BlockSpec(
        job=dataclasses.replace(job, img=None, net=None), lo=float(inten.lo), hi=float(inten.hi), net=net,
        device=device, iy=iy, ix=ix, by=by, bx=bx, gy=gy, gx=gx, dy=dy, dx=dx,
    )
    name = "vdsr-" + task + "-" + tokenize(
        x.name, ax, job.out_hw, job.tile, str(device), amp, job.ensemble, inten.lo, inten.hi, _net_digest(net)
    )
    return da.map_blocks(
        partial(_restore_block, spec=spec), xo, chunks=tuple(out_chunks), dtype=job.dtype,
        meta=np.empty((0,) * x.ndim, dtype=job.dtype), name=name,
    )
