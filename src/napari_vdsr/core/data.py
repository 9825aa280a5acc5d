"""Training data: planes from files / arrays, patch sampling with on-the-fly degradations."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .degrade import degrade_plane
from .errors import InputError, TrainingError
from .io import expand_inputs, read_image

__all__ = ["Plane", "planes_from_array", "load_planes", "split_validation", "PatchSampler", "ValidationItem", "make_validation"]


@dataclass
class Plane:
    """A clean 2-D training image on the network's [0, 1] scale."""

    name: str
    data: np.ndarray  # float32 (H, W)


def planes_from_array(arr: np.ndarray, name: str = "array", rgb: bool | None = None) -> list[Plane]:
    """Split an image or stack into 2-D [0, 1] planes.

    RGB(A) images (last axis 3 or 4, uint8) give their luminance Y/255; a last axis of 1 or 2
    (channels last) and every other leading axis (Z, T, C) give one plane per index.  uint8 data are
    divided by 255, other data scaled by their min and max (isolated hot or dead pixels left out, as
    :func:`~napari_vdsr.core.normalize.intensity_range` does for restoring, and held at the outlier
    bound, :func:`~napari_vdsr.core.normalize.clip_outliers`).
    """
    from .color import rgb_to_y
    from .normalize import check_dtype, clip_outliers, intensity_range

    arr = np.asarray(arr)
    check_dtype(arr.dtype)
    if arr.ndim < 2:
        raise TrainingError(f"{name}: training images must be at least 2-D, got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)) if arr.dtype.kind == "f" else False:
        raise TrainingError(f"{name}: contains NaN or infinite values; clean it first.")
    if rgb is None:
        rgb = arr.ndim >= 3 and arr.shape[-1] in (3, 4) and arr.shape[-2] > 4
    if not rgb and arr.ndim >= 3 and arr.shape[-1] in (1, 2) and arr.shape[-2] > 4:
        arr = np.moveaxis(arr, -1, 0)  # channels last (YXC with 1 or 2 channels): one plane per channel
    if rgb:
        rgb_arr = arr[..., :3].astype(np.float32)
        if arr.dtype != np.uint8:
            inten = intensity_range(rgb_arr, yx=(-3, -2))
            rgb_arr = clip_outliers(inten.to_net(rgb_arr)) * 255.0
        y = rgb_to_y(rgb_arr) / 255.0
        stack = y.reshape((-1,) + y.shape[-2:])
    else:
        inten = intensity_range(arr)
        stack = clip_outliers(inten.to_net(arr)).reshape((-1,) + arr.shape[-2:])
    return [Plane(f"{name}[{i}]" if len(stack) > 1 else name, np.ascontiguousarray(p, dtype=np.float32)) for i, p in enumerate(stack)]


def load_planes(sources: Sequence[str | os.PathLike | np.ndarray]) -> list[Plane]:
    """Load training planes from files, folders, glob patterns or arrays."""
    planes: list[Plane] = []
    paths: list = []
    for i, src in enumerate(sources):
        if isinstance(src, np.ndarray) or hasattr(src, "__array__") and not isinstance(src, (str, Path)):
            planes.extend(planes_from_array(np.asarray(src), name=f"array{i}"))
        else:
            paths.append(src)
    if paths:
        try:
            files = expand_inputs(paths)
        except InputError as exc:
            raise TrainingError(str(exc)) from None
        for f in files:
            try:
                arr = read_image(f)
            except InputError as exc:
                raise TrainingError(f"{exc} Remove it from the training data or convert it.") from None
            planes.extend(planes_from_array(arr, name=f.name))
    if not planes:
        raise TrainingError("no training images were given; pass image files, folders or arrays.")
    return planes


def split_validation(planes: list[Plane], fraction: float) -> tuple[list[Plane], list[Plane]]:
    """Hold out ``fraction`` of the planes (evenly spaced, at least one) for validation.

    A single plane is split by rows instead: its bottom part validates.
    Returns ``(train, val)``; ``fraction == 0`` returns no validation planes.
    """
    if fraction <= 0:
        return list(planes), []
    if not 0 < fraction < 1:
        raise TrainingError(f"validation fraction must be in [0, 1), got {fraction}.")
    if len(planes) == 1:
        p = planes[0]
        h = p.data.shape[0]
        cut = int(round(h * (1 - fraction)))
        return [Plane(p.name + "[train rows]", p.data[:cut])], [Plane(p.name + "[val rows]", p.data[cut:])]
    n_val = max(1, int(round(len(planes) * fraction)))
    idx = set(np.linspace(0, len(planes) - 1, n_val + 2)[1:-1].round().astype(int).tolist()) if n_val < len(planes) - 1 else set(range(1, len(planes)))
    val = [p for i, p in enumerate(planes) if i in idx]
    train = [p for i, p in enumerate(planes) if i not in idx]
    return train, val


def _dihedral(a: np.ndarray, k: int) -> np.ndarray:
    a = np.rot90(a, k % 4)
    return a[:, ::-1] if k >= 4 else a


#: a non-integer scale s tries this many more low-resolution sizes for the one whose size x s is
#: closest to a whole number of pixels (see :func:`sr_crop`)
SR_GRID_TRIES = 3


def sr_crop(need: int, scale: float) -> tuple[int, int]:
    """The crop (``size`` pixels a side, at least ``need``) and the low-resolution size it shrinks to.

    The shrink factor of a training pair must be the scale itself, as in the benchmarks' images
    (high-resolution sides are whole multiples of the scale): a crop of ``size`` shrunk to
    ``lr_size`` pixels is shrunk by ``size / lr_size``, so for an integer scale ``size`` is the
    smallest multiple of it that is at least ``need`` (x2 of a 57 px crop would be 57 / 28 = 2.04,
    with the low-resolution pixel grid drifting across the patch).  A non-integer scale takes,
    of ``SR_GRID_TRIES + 1`` consecutive low-resolution sizes, the one closest to a whole multiple.
    """
    s = float(scale)
    n0 = max(1, int(math.ceil(need / s - 1e-9)))
    if abs(s - round(s)) < 1e-9:
        n = n0
    else:
        n = min(range(n0, n0 + SR_GRID_TRIES + 1), key=lambda k: (abs(k * s - round(k * s)), k))
    size = max(need, int(round(n * s)))
    return size, n


class PatchSampler:
    """Draw batches of (degraded input, clean target) patches.

    Every draw takes its randomness from the generator passed in, so a batch is
    a pure function of the generator's seed (exact resume).
    """

    def __init__(
        self,
        planes: list[Plane],
        task: str,
        patch_size: int = 41,
        levels: Sequence[float] | None = None,
        level_range: tuple[float, float] | None = None,
        quantize: bool = True,
        noise_model: str = "gaussian",
        read_noise: float = 0.0,
    ) -> None:
        self.task = task
        self.read_noise = float(read_noise)
        self.patch = int(patch_size)
        self.levels = list(levels) if levels else None
        self.level_range = level_range
        self.quantize = quantize
        self.noise_model = noise_model
        if self.levels is None and self.level_range is None:
            raise TrainingError("give degradation levels (scales, sigmas or qualities) or a range.")
        self.margin = self._margin(self.max_level())
        need = self.patch + 2 * self.margin
        if task == "sr":  # the crop grows to a whole number of low-resolution pixels (sr_crop)
            if self.levels is not None:
                need = max(sr_crop(need, lev)[0] for lev in self.levels)
            else:  # any scale of the range: at most SR_GRID_TRIES + 1 low-resolution pixels more
                need += int(math.ceil((SR_GRID_TRIES + 1) * self.max_level()))
        self.planes = [p for p in planes if min(p.data.shape) >= need]
        if not self.planes:
            sizes = sorted({p.data.shape for p in planes})[:5]
            raise TrainingError(
                f"every training image is smaller than one patch ({self.patch} px plus margins for the degradation "
                f"= {need} px per side); sizes seen: {sizes} (after the held-out part for validation, when a "
                "single image is split). Use a smaller patch size, a smaller validation fraction, or larger images."
            )
        areas = np.array([p.data.size for p in self.planes], dtype=np.float64)
        self.weights = areas / areas.sum()

    def max_level(self) -> float:
        vals = list(self.levels or []) + list(self.level_range or [])
        return max(vals)

    def _margin(self, level: float) -> int:
        if self.task == "sr":
            return int(math.ceil(2 * level))
        if self.task == "deblock":
            return 8
        return 0

    def draw_level(self, rng: np.random.Generator) -> float:
        if self.levels is not None:
            return float(self.levels[rng.integers(len(self.levels))])
        lo, hi = self.level_range
        if self.task == "deblock":
            return float(rng.integers(int(lo), int(hi) + 1))
        return float(rng.uniform(lo, hi))

    def one(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        plane = self.planes[rng.choice(len(self.planes), p=self.weights)].data
        level = self.draw_level(rng)
        m = self.margin
        size = self.patch + 2 * m
        lr_size = None
        if self.task == "sr":
            size, lr_size = sr_crop(size, level)
        y = int(rng.integers(0, plane.shape[0] - size + 1))
        x = int(rng.integers(0, plane.shape[1] - size + 1))
        crop = np.ascontiguousarray(_dihedral(plane[y : y + size, x : x + size], int(rng.integers(8))))
        task = "denoise-pg" if (self.task == "denoise" and self.noise_model == "poisson") else self.task
        rn = float(rng.uniform(0.0, self.read_noise)) if task == "denoise-pg" and self.read_noise > 0 else 0.0
        degraded = degrade_plane(crop, task, level, seed=rng, quantize=self.quantize, read_noise=rn, lr_size=lr_size)
        if self.task == "deblock":  # keep the JPEG block grid where the image has it
            sl = (slice(0, self.patch), slice(0, self.patch))
        else:
            sl = (slice(m, m + self.patch), slice(m, m + self.patch))
        return degraded[sl], crop[sl]

    def batch(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(inputs, targets)``, float32 arrays of shape (n, 1, P, P)."""
        pairs = [self.one(rng) for _ in range(n)]
        inp = np.stack([p[0] for p in pairs])[:, None]
        tgt = np.stack([p[1] for p in pairs])[:, None]
        return inp.astype(np.float32), tgt.astype(np.float32)


@dataclass
class ValidationItem:
    """A fixed validation pair: degraded input, clean target, level and border to shave."""

    name: str
    level: float
    inp: np.ndarray
    target: np.ndarray
    shave: int


def _sr_fit(size: int, scale: float) -> tuple[int, int]:
    """The largest crop of at most ``size`` pixels (and its low-resolution size) that ``scale`` shrinks to
    a whole number of pixels, of ``SR_GRID_TRIES + 1`` candidates the one closest to it (cf. :func:`sr_crop`)."""
    n0 = max(1, int(size // scale))
    n = min(range(n0, max(0, n0 - SR_GRID_TRIES - 1), -1), key=lambda k: (abs(k * scale - round(k * scale)), -k))
    return min(size, int(round(n * scale))), n


def make_validation(
    planes: list[Plane], task: str, levels: Sequence[float], crop: int = 192, quantize: bool = True,
    noise_model: str = "gaussian", read_noise: float = 0.0,
) -> list[ValidationItem]:
    """Deterministic validation pairs: a centre crop of each plane degraded at each level.

    Poisson noise (``noise_model="poisson"``) gets Gaussian read noise of half ``read_noise``, the
    middle of what training draws (uniform up to ``read_noise``).
    """
    items: list[ValidationItem] = []
    for i, p in enumerate(planes):
        h, w = p.data.shape
        ch, cw = min(crop, h), min(crop, w)
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        hr = p.data[y0 : y0 + ch, x0 : x0 + cw]
        for j, lev in enumerate(levels):
            lr_size = None
            if task == "sr":
                s = int(math.ceil(lev))
                if lev == int(lev):
                    hr_l = hr[: hr.shape[0] - hr.shape[0] % s, : hr.shape[1] - hr.shape[1] % s]
                else:  # as training crops (sr_crop): a whole number of low-resolution pixels, shrunk by lev itself
                    (sy, ny), (sx, nx) = (_sr_fit(n, lev) for n in hr.shape)
                    hr_l, lr_size = hr[:sy, :sx], (ny, nx)
                shave = s
            else:
                hr_l, shave = hr, 0
            if min(hr_l.shape) < 2 * shave + 8:
                continue
            t = "denoise-pg" if (task == "denoise" and noise_model == "poisson") else task
            rn = read_noise / 2 if t == "denoise-pg" else 0.0
            inp = degrade_plane(hr_l, t, lev, seed=np.random.default_rng([17, i, j]), quantize=quantize, read_noise=rn,
                                lr_size=lr_size)
            items.append(ValidationItem(p.name, float(lev), inp, np.ascontiguousarray(hr_l), shave))
    return items


def _enlarge_as_restore_does(d: np.ndarray, c: np.ndarray, scales: Optional[Sequence[float]], name: str):
    """Low-resolution planes ``d`` enlarged by the SR scale the pair's sizes show, as restore() enlarges.

    restore() makes ``round(h * s)`` rows of ``h`` (:func:`scaled_shape`); the clean planes may differ
    from that by a pixel (they are then cropped to the common size). A pair whose sizes give another
    factor than ``scales``, or two different factors, is refused: training on a geometry that
    restoring never uses would teach the network a wrong shift and stretch.
    """
    from .degrade import scaled_shape, upscale

    h, w = d.shape[-2:]
    ratio = (c.shape[-2] / h, c.shape[-1] / w)
    options = sorted({float(s) for s in scales} if scales else {round(ratio[0] * 4) / 4})
    fits = [s for s in options if all(abs(n - m) <= 1 for n, m in zip(scaled_shape((h, w), s), c.shape[-2:]))]
    if not fits:
        raise TrainingError(
            f"{name}: the low-resolution image ({h}x{w}) and the clean image ({c.shape[-2]}x{c.shape[-1]}) "
            f"are x{ratio[0]:.3g} / x{ratio[1]:.3g} apart, not x{' / x'.join(f'{s:g}' for s in options)} "
            f"as fine-tuned; give the SR scale of the pair, or a low-resolution image of exactly 1/scale the size."
        )
    s = fits[0]
    big = upscale(d, s)
    hh, ww = min(big.shape[-2], c.shape[-2]), min(big.shape[-1], c.shape[-1])
    return np.ascontiguousarray(big[..., :hh, :ww]), np.ascontiguousarray(c[..., :hh, :ww])


def planes_from_pair(degraded: np.ndarray, clean: np.ndarray, task: str = "sr", name: str = "pair",
                     scales: Optional[Sequence[float]] = None, rgb: Optional[bool] = None) -> list[tuple[Plane, Plane]]:
    """Turn a registered (degraded, clean) pair of images or stacks into aligned [0, 1] plane pairs.

    Both use the intensity map of the degraded image, the one :func:`~napari_vdsr.core.restore.restore`
    will use on it; RGB(A) pairs (``rgb``, by default a last axis of 3 or 4 in both) give their
    luminance Y, which is what the network restores.  For super-resolution the degraded image may
    be the low-resolution one: it is then enlarged by the scale of ``scales`` its size shows
    (bicubic, as restoring does; the clean image cropped to the common size by at most a pixel).
    Any other shape mismatch raises :class:`TrainingError`.
    """
    from .color import rgb_to_y
    from .normalize import check_dtype, clip_outliers, intensity_range

    deg, cln = np.asarray(degraded), np.asarray(clean)
    check_dtype(deg.dtype)
    check_dtype(cln.dtype)
    for what, arr in (("degraded", deg), ("clean", cln)):
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise TrainingError(f"{name}: the {what} image contains NaN or infinite values; clean it first.")
    if deg.dtype != cln.dtype and not (deg.dtype.kind == cln.dtype.kind == "f"):
        raise TrainingError(
            f"{name}: the degraded image is {deg.dtype} and the clean image {cln.dtype}; both are mapped to the "
            "network's range with the degraded image's intensities, so save them with the same data type (the "
            "type the images to restore will have).")
    if rgb is None:
        rgb = (deg.ndim >= 3 and cln.ndim == deg.ndim and deg.shape[-1] in (3, 4) and cln.shape[-1] == deg.shape[-1]
               and deg.shape[-2] > 4)
    # the map restore() will use: that of the image being restored, the degraded one (RGB: its colours)
    inten = intensity_range(deg[..., :3], yx=(-3, -2)) if rgb else intensity_range(deg)
    c_net = inten.to_net(cln[..., :3] if rgb else cln)
    _warn_if_beyond_range(c_net, name)
    if rgb:
        d = rgb_to_y(clip_outliers(inten.to_net(deg[..., :3])) * 255.0) / 255.0
        c = rgb_to_y(clip_outliers(c_net) * 255.0) / 255.0
    else:  # outliers (a hot pixel) held at their bound: one pixel must not outweigh its patch
        d, c = clip_outliers(inten.to_net(deg)), clip_outliers(c_net)
    if d.ndim != c.ndim or d.shape[:-2] != c.shape[:-2]:
        raise TrainingError(
            f"{name}: the degraded image {deg.shape} and the clean image {cln.shape} do not match; "
            "give a registered pair with the same planes (and the same size, or for super-resolution "
            "a low-resolution image that is an exact fraction of the clean one)."
        )
    if d.shape[-2:] != c.shape[-2:]:
        if task == "sr" and c.shape[-2] <= d.shape[-2] and c.shape[-1] <= d.shape[-1]:
            raise TrainingError(
                f"{name}: the clean image {cln.shape} is smaller than the degraded one {deg.shape}; for "
                "super-resolution give the low-resolution image first and the high-resolution one second "
                "(command line: --pairs LOW HIGH; Fine-tune widget: the low-resolution layer as the degraded layer)."
            )
        if task != "sr" or c.shape[-2] < d.shape[-2] or c.shape[-1] < d.shape[-1]:
            raise TrainingError(
                f"{name}: the degraded image {deg.shape} and the clean image {cln.shape} differ in size; "
                "for denoising and JPEG artifact removal both must have the same shape."
            )
        d, c = _enlarge_as_restore_does(d, c, scales, name)
    d = d.astype(np.float32).reshape((-1,) + d.shape[-2:])
    c = c.astype(np.float32).reshape((-1,) + c.shape[-2:])
    return [
        (Plane(f"{name}[{i}]", np.ascontiguousarray(d[i])), Plane(f"{name}[{i}]", np.ascontiguousarray(c[i])))
        for i in range(len(c))
    ]


#: share of a clean image's pixels beyond the degraded image's range above which a pair is reported
BEYOND_RANGE_WARN = 0.01


def _warn_if_beyond_range(c_net: np.ndarray, name: str) -> None:
    """Warn when many clean pixels fall outside the degraded image's intensity range (they are held at its
    bound): the two images differ in brightness (a gain or an offset), and the targets would be clipped."""
    from .normalize import OUTLIER_FRACTION

    beyond = float(np.mean((c_net < -OUTLIER_FRACTION) | (c_net > 1.0 + OUTLIER_FRACTION)))
    if beyond > BEYOND_RANGE_WARN:
        warnings.warn(
            f"{name}: {beyond:.0%} of the clean image's pixels lie far outside the degraded image's intensity "
            "range (both are mapped with the degraded image's range, as restoring will) and are held at its "
            "bound, so the model learns clipped targets. The two images differ in brightness (gain or offset): "
            "match their intensities first (e.g. scale the clean image to the degraded one's range).",
            RuntimeWarning, stacklevel=3,
        )


class PairSampler:
    """Aligned random patches from registered (degraded, clean) plane pairs."""

    def __init__(self, pairs: list[tuple[Plane, Plane]], patch_size: int = 41) -> None:
        self.patch = int(patch_size)
        self.pairs = [p for p in pairs if min(p[1].data.shape) >= self.patch]
        if not self.pairs:
            raise TrainingError(
                f"every training pair is smaller than one patch ({self.patch} px per side); "
                "use a smaller patch size or larger images."
            )
        self.planes = [p[1] for p in self.pairs]
        areas = np.array([p[1].data.size for p in self.pairs], dtype=np.float64)
        self.weights = areas / areas.sum()

    def batch(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        inp, tgt = [], []
        P = self.patch
        for _ in range(n):
            d, c = self.pairs[rng.choice(len(self.pairs), p=self.weights)]
            y = int(rng.integers(0, c.data.shape[0] - P + 1))
            x = int(rng.integers(0, c.data.shape[1] - P + 1))
            k = int(rng.integers(8))
            inp.append(_dihedral(d.data[y : y + P, x : x + P], k))
            tgt.append(_dihedral(c.data[y : y + P, x : x + P], k))
        return np.stack(inp)[:, None].astype(np.float32), np.stack(tgt)[:, None].astype(np.float32)


def load_pairs(pairs: Sequence[tuple[object, object]], task: str = "sr",
               scales: Optional[Sequence[float]] = None) -> list[tuple[Plane, Plane]]:
    """The training planes of registered (degraded, clean) pairs, each given as arrays or image paths."""
    out: list[tuple[Plane, Plane]] = []
    for i, (d, c) in enumerate(pairs):
        d, c = (read_image(x) if isinstance(x, (str, os.PathLike)) else np.asarray(x) for x in (d, c))
        out.extend(planes_from_pair(d, c, task=task, name=f"pair{i}", scales=scales))
    return out


def split_pairs(pairs: list[tuple[Plane, Plane]], fraction: float) -> tuple[list, list]:
    """Hold out ``fraction`` of the pairs (or the bottom rows of a single pair) for validation."""
    if fraction <= 0:
        return list(pairs), []
    if len(pairs) == 1:
        d, c = pairs[0]
        cut = int(round(c.data.shape[0] * (1 - fraction)))
        return [(Plane(d.name, d.data[:cut]), Plane(c.name, c.data[:cut]))], [(Plane(d.name, d.data[cut:]), Plane(c.name, c.data[cut:]))]
    idx_train, idx_val = split_validation([Plane(str(i), p[1].data) for i, p in enumerate(pairs)], fraction)
    val_ids = {int(p.name) for p in idx_val}
    return [p for i, p in enumerate(pairs) if i not in val_ids], [p for i, p in enumerate(pairs) if i in val_ids]


def make_pair_validation(pairs: list[tuple[Plane, Plane]], crop: int = 192, shave: int = 0) -> list[ValidationItem]:
    """Validation items from held-out pairs: a centre crop of each."""
    items = []
    for d, c in pairs:
        h, w = c.data.shape
        ch, cw = min(crop, h), min(crop, w)
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        if min(ch, cw) < 2 * shave + 8:
            continue
        items.append(ValidationItem(c.name, 0.0, np.ascontiguousarray(d.data[y0 : y0 + ch, x0 : x0 + cw]),
                                    np.ascontiguousarray(c.data[y0 : y0 + ch, x0 : x0 + cw]), shave))
    return items
