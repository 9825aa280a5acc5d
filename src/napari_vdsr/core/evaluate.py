"""Image-quality metrics and the evaluation protocol of the VDSR paper (GUIDE §2).

Protocol, per image of a dataset:

* **sr** — the HR image is mod-cropped to the scale; the LR image is the
  dataset's ``LR/`` file when present (MATLAB-made for the benchmarks), else
  ``degrade.downscale`` of the HR image rounded to uint8.  The LR image is
  enlarged to the HR size with the same antialiased bicubic (each RGB channel
  alone), converted to luminance Y (BT.601, MATLAB ``rgb2ycbcr``; a grey image
  is its own Y), the network restores Y/255, the result is rounded and clipped
  to uint8, ``ceil(scale)`` pixels are shaved from each border and PSNR/SSIM
  are computed on Y with peak 255 against the (unrounded) Y of the HR image.
* **denoise** — the clean image is the grey image (the uint8-rounded Y of an
  RGB image); Gaussian noise of σ (0..255 scale) is added with seed = image
  index; PSNR of the rounded, clipped output against the clean image.
* **deblock** — the uint8 Y (or grey) image is encoded by libjpeg (Pillow) at
  quality q; PSNR of the rounded, clipped output against the uint8 Y.

``model="bicubic"`` (alias ``"identity"``) evaluates the degraded network
input itself: the bicubic row of the paper's tables for SR, the noisy / JPEG
input for the other tasks.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from .errors import InputError

__all__ = [
    "psnr",
    "ssim",
    "BASELINE_METHODS",
    "EvalSample",
    "find_dataset",
    "prepare_sample",
    "score_sample",
    "iter_evaluate",
    "evaluate_dataset",
]

#: Model names that mean "no network": the degraded input itself is scored.
BASELINE_METHODS = ("bicubic", "identity", "input")

_IMAGE_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")


def _shave(a: np.ndarray, shave: int) -> np.ndarray:
    if shave <= 0:
        return a
    if a.shape[0] <= 2 * shave or a.shape[1] <= 2 * shave:
        raise ValueError(f"cannot shave {shave} px from each border of an image of shape {a.shape}.")
    return a[shave:-shave, shave:-shave]


def psnr(pred: np.ndarray, target: np.ndarray, shave: int = 0, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of 2-D images, ``shave`` border pixels excluded.

    Parameters
    ----------
    pred, target : ndarray
        Images of one shape (any real dtype; compared as float64).
    shave : int
        Pixels removed from each border before comparing.
    peak : float
        Peak signal value (255 for 8-bit images).

    Returns
    -------
    float
        PSNR in dB (``inf`` for identical images).
    """
    a = _shave(np.asarray(pred, dtype=np.float64), shave)
    b = _shave(np.asarray(target, dtype=np.float64), shave)
    if a.shape != b.shape:
        raise ValueError(f"PSNR needs images of one shape, got {a.shape} and {b.shape}.")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)


#: side of SSIM's Gaussian window (σ 1.5, truncated at 3.5 σ): the smallest image SSIM can score
SSIM_WINDOW = 11


def ssim(pred: np.ndarray, target: np.ndarray, shave: int = 0, peak: float = 255.0) -> float:
    """SSIM (Wang et al. 2004: Gaussian window σ = 1.5, population covariance).

    Parameters
    ----------
    pred, target : ndarray
        2-D images of one shape.
    shave : int
        Pixels removed from each border before comparing.
    peak : float
        Data range (255 for 8-bit images).
    """
    from skimage.metrics import structural_similarity

    a = _shave(np.asarray(pred, dtype=np.float64), shave)
    b = _shave(np.asarray(target, dtype=np.float64), shave)
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs images of one shape, got {a.shape} and {b.shape}.")
    return float(structural_similarity(a, b, data_range=peak, gaussian_weights=True, sigma=1.5, use_sample_covariance=False))


# --------------------------------------------------------------------------- datasets


def _list_images(folder: Path) -> list[Path]:
    # hidden files (macOS's ._NAME companions on shared disks) are not images
    return sorted(f for f in folder.iterdir()
                  if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in _IMAGE_SUFFIXES)


def find_dataset(dataset_dir: str | os.PathLike, scale: float | None = None) -> tuple[Path, Optional[Path]]:
    """Locate the HR folder (and the LR folder, if any) of a dataset.

    Accepted layouts: ``DIR/HR`` (+ optional ``DIR/LR``); a benchmark root with
    ``DIR/x2``, ``DIR/x3``… (the folder ``x{scale}`` is used); a plain folder of
    images (HR only).

    Returns
    -------
    (hr_dir, lr_dir or None)

    Raises
    ------
    InputError
        If the folder does not exist or holds none of these layouts.
    """
    root = Path(dataset_dir).expanduser()
    if root.is_file():
        raise InputError(f"dataset {root} is a file; evaluate scores a folder of images: give its folder "
                         f"({root.parent}), or put the image in a folder of its own.")
    if not root.is_dir():
        raise InputError(f"dataset {root}: no such folder; give a folder with HR/ (and optionally LR/) or plain images.")
    scale_dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name[:1] == "x" and d.name[1:].replace(".", "", 1).isdigit())
    if not (root / "HR").is_dir() and scale_dirs:
        if scale is None:
            raise InputError(f"dataset {root} has one folder per scale ({', '.join(scale_dirs)}); pass the scale to pick one.")
        name = f"x{scale:g}"
        if not (root / name).is_dir():
            raise InputError(f"dataset {root} has no folder {name} (it has {', '.join(scale_dirs)}); pick one of those scales "
                             "or pass the scale's folder with HR/ images directly.")
        root = root / name
    if (root / "HR").is_dir():
        hr = root / "HR"
        lr = root / "LR" if (root / "LR").is_dir() else None
    else:
        hr, lr = root, None
    if not _list_images(hr):
        raise InputError(f"dataset folder {hr} holds no images ({', '.join(_IMAGE_SUFFIXES)}).")
    return hr, lr


# --------------------------------------------------------------------------- one image


@dataclass
class EvalSample:
    """One prepared evaluation image: the network input and the reference, on one scale.

    ``inp`` and ``target`` are float64 2-D planes on the 0..``peak`` scale
    (luminance for RGB data); the restored output is rounded and clipped to
    ``[0, peak]`` when ``quantize`` is true, then scored with ``shave``.
    """

    name: str
    inp: np.ndarray
    target: np.ndarray
    peak: float
    shave: int
    quantize: bool = True


def _to_y(img: np.ndarray) -> np.ndarray:
    from .color import rgb_to_y

    if img.ndim == 2:
        return np.asarray(img, dtype=np.float64)
    return rgb_to_y(img).astype(np.float64)


def _read_2d(path: Path) -> np.ndarray:
    from .io import read_image

    img = read_image(path, keep_alpha=False)  # grey + alpha is grey (its own Y), not RGB
    if img.ndim == 3 and img.shape[-1] == 4:
        img = img[..., :3]
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[-1] == 3)):
        raise InputError(f"{path}: evaluation takes 2-D grey or RGB images, got an array of shape {img.shape}; "
                         "split stacks into single planes first.")
    if img.dtype != np.uint8:
        if img.ndim == 3:
            raise InputError(f"{path}: RGB images must be 8-bit for the evaluation protocol, got {img.dtype}.")
    return img


def _resize_channels(img: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Bicubic resize of a (H, W) or (H, W, C) image, each channel alone; float32, unclipped."""
    from .degrade import resize

    if img.ndim == 2:
        return resize(img, size)
    return np.moveaxis(resize(np.moveaxis(img, -1, 0), size), 0, -1)


def _sr_scale(scale: float | Sequence[float]) -> tuple[float, float]:
    from .degrade import as_scale_pair

    try:
        return as_scale_pair(scale)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def prepare_sample(
    hr_path: str | os.PathLike,
    index: int,
    task: str = "sr",
    scale: float | Sequence[float] = 2,
    lr_path: str | os.PathLike | None = None,
    sigma: float | None = None,
    quality: int | None = None,
) -> EvalSample:
    """Read one image and build its degraded network input and its reference (GUIDE §2).

    Parameters
    ----------
    hr_path : path
        Ground-truth image (grey or RGB; 8-bit for RGB).
    index : int
        Position in the dataset; seeds the noise of the ``denoise`` task.
    task : {"sr", "denoise", "deblock"}
    scale : float or (sy, sx)
        SR factor (integer factors mod-crop the HR image first).
    lr_path : path, optional
        The matching LR image (SR only); generated from HR when None.
    sigma : float
        Gaussian noise σ on the 0..255 scale (denoise).
    quality : int
        JPEG quality (deblock).

    Returns
    -------
    EvalSample
    """
    from .degrade import add_gaussian_noise, downscale, jpeg_compress, scaled_shape

    hr_path = Path(hr_path)
    hr = _read_2d(hr_path)
    is_u8 = hr.dtype == np.uint8
    is_int = hr.dtype.kind in "iu"
    if is_u8:
        lo, peak = 0.0, 255.0
    else:
        from .normalize import intensity_range

        rng = intensity_range(hr, robust=False)  # the PSNR peak: the reference's whole range
        lo, peak = rng.lo, rng.span
    name = hr_path.name
    if task == "sr":
        sy, sx = _sr_scale(scale)
        if sy.is_integer() and sx.is_integer():
            h, w = hr.shape[:2]
            hr = hr[: h - h % int(sy), : w - w % int(sx)]
        shave = int(math.ceil(max(sy, sx)))
        if min(hr.shape[:2]) < 2 * shave + SSIM_WINDOW:
            raise InputError(f"{hr_path}: image of shape {hr.shape[:2]} is too small to evaluate at scale {scale}: "
                             f"SSIM needs {SSIM_WINDOW} px left on each side after shaving {shave} px from each "
                             f"border ({2 * shave + SSIM_WINDOW} px).")
        lr_shape = scaled_shape(hr.shape[:2], (sy, sx), down=True)
        if lr_path is not None:
            lr = _read_2d(Path(lr_path))
            if lr.ndim != hr.ndim:
                raise InputError(f"{lr_path}: the LR image is {'grey' if lr.ndim == 2 else 'RGB'} but its HR image is not.")
            if tuple(lr.shape[:2]) != tuple(lr_shape):
                raise InputError(f"{lr_path}: LR size {lr.shape[:2]} is not HR size {hr.shape[:2]} / {scale} = {lr_shape}; "
                                 "check --scale, or pass --generate-lr to make LR images from HR.")
            lr = lr.astype(np.float32)
        else:
            src = hr.astype(np.float32)
            lr = np.moveaxis(downscale(np.moveaxis(src, -1, 0), (sy, sx)), 0, -1) if src.ndim == 3 else downscale(src, (sy, sx))
            if is_int:  # an LR image as it would be saved: rounded to the dtype's grid
                info = np.iinfo(hr.dtype)
                lr = np.clip(np.round(lr), info.min, info.max).astype(np.float32)
        ilr = _resize_channels(lr, hr.shape[:2])
        inp = _to_y(ilr) - lo
        target = _to_y(hr) - lo
        return EvalSample(name, inp, target, peak, shave, quantize=is_int)
    # denoise / deblock: a clean grey image on an integer grid
    if min(hr.shape[:2]) < SSIM_WINDOW:
        raise InputError(f"{hr_path}: image of shape {hr.shape[:2]} is too small to evaluate: SSIM needs "
                         f"{SSIM_WINDOW} px on each side.")
    if hr.ndim == 3:
        clean = np.round(_to_y(hr))  # MATLAB rgb2ycbcr on uint8 returns uint8 Y
    else:
        clean = hr.astype(np.float64) - lo
    if task == "denoise":
        if sigma is None or not (sigma >= 0 and math.isfinite(sigma)):
            raise InputError(f"the denoise task needs a noise level --sigma >= 0 (0..255 scale), got {sigma!r}.")
        noisy = add_gaussian_noise(clean.astype(np.float32), float(sigma) * peak / 255.0, seed=int(index), peak=peak)
        return EvalSample(name, noisy.astype(np.float64), clean, peak, 0, quantize=is_int)
    if task == "deblock":
        if quality is None or not (1 <= quality <= 100) or quality != int(quality):
            raise InputError(f"the deblock task needs a whole JPEG quality --quality in 1..100, got {quality!r}.")
        if not is_u8 and hr.ndim == 2:
            clean = np.round(clean / peak * 255.0)
            peak = 255.0
        coded = jpeg_compress(np.clip(clean, 0, 255).astype(np.uint8), int(quality))
        return EvalSample(name, coded.astype(np.float64), clean, 255.0, 0, quantize=True)
    raise InputError(f"unknown task {task!r}; choose sr, denoise or deblock.")


def _run_model(model, plane01: np.ndarray, device, tile: int = 1024, ensemble: bool = False) -> np.ndarray:
    """The network on one 2-D plane in [0, 1], full float32 precision (halo tiling, exact)."""
    from .tiling import predict_plane

    return predict_plane(model, plane01.astype(np.float32), tile=tile, device=device, amp=False,
                         ensemble=ensemble).astype(np.float64)


def score_sample(sample: EvalSample, model=None, device="cpu", ensemble: bool = False) -> tuple[dict[str, Any], np.ndarray]:
    """Restore one :class:`EvalSample` (``model=None``: the input itself) and score it.

    ``ensemble``: the geometric self-ensemble of :func:`~napari_vdsr.core.tiling.ensemble_net`.

    Returns
    -------
    (record, output)
        ``record`` holds name, psnr, ssim and the input's psnr; ``output`` is the
        quantised restored plane on the sample's scale.
    """
    if model is None:
        out = sample.inp.copy()
    else:
        out = _run_model(model, sample.inp / sample.peak, device, ensemble=ensemble) * sample.peak
    if sample.quantize:
        out = np.round(out)
    out = np.clip(out, 0.0, sample.peak)
    rec = {
        "name": sample.name,
        "psnr": psnr(out, sample.target, shave=sample.shave, peak=sample.peak),
        "ssim": ssim(out, sample.target, shave=sample.shave, peak=sample.peak),
    }
    return rec, out


# --------------------------------------------------------------------------- datasets


def _resolve_model(model, task: str, device):
    """→ (torch module or None for a baseline, label, card)."""
    from torch import nn

    from .tiling import prepare_net

    if isinstance(model, (nn.Module, tuple)):  # a module, or load_model's (module, card): as restore() takes them
        from .restore import _resolve_model as module_and_card

        net, card = module_and_card(model, task)
        return prepare_net(net, device), card.get("name", type(net).__name__), card
    if isinstance(model, str) and model.lower() in BASELINE_METHODS:
        return None, "bicubic" if task == "sr" else "input", {}
    from .weights import load_model

    net, card = load_model(model, task=task, device=device)
    return prepare_net(net, device), card.get("name", Path(card.get("path", str(model))).stem), card


def iter_evaluate(
    dataset_dir: str | os.PathLike,
    task: str = "sr",
    scale: float | Sequence[float] = 2,
    model=None,
    sigma: float | None = None,
    quality: int | None = None,
    device: str = "auto",
    generate_lr: bool = False,
    limit: int | None = None,
    ensemble: bool = False,
    skip_bad: bool = False,
) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Evaluate image by image; yields ``(done, total, record)`` after each image.

    The first item is ``(0, total, settings)`` with the resolved settings (method,
    model card, folders).  Stop iterating to cancel.  Parameters as in
    :func:`evaluate_dataset`; with ``skip_bad`` an image that cannot be scored (a stack, 16-bit
    RGB, no LR image) yields ``{"name", "error"}`` instead of raising.
    """
    from .device import resolve_device
    from .weights import TASKS

    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    if task == "denoise" and sigma is None:
        raise InputError("the denoise task needs a noise level: pass --sigma (e.g. 25, on the 0..255 scale).")
    if task == "denoise" and not (sigma >= 0 and math.isfinite(sigma)):
        raise InputError(f"the denoise task needs a noise level --sigma >= 0 (0..255 scale), got {sigma!r}.")
    if task == "deblock" and quality is None:
        raise InputError("the deblock task needs a JPEG quality: pass --quality (e.g. 10).")
    if task == "deblock" and not (1 <= quality <= 100 and quality == int(quality)):
        raise InputError(f"the deblock task needs a whole JPEG quality --quality in 1..100, got {quality!r}.")
    if task == "sr":
        _sr_scale(scale)
    dev = resolve_device(device)
    pick = scale if np.ndim(scale) == 0 else (scale[0] if len(set(scale)) == 1 else None)
    hr_dir, lr_dir = find_dataset(dataset_dir, pick)  # a benchmark root: x{scale}/ (x2/ for other tasks)
    if task != "sr" or generate_lr:
        lr_dir = None
    files = _list_images(hr_dir)
    if limit is not None:
        if int(limit) < 1:
            raise InputError(f"limit (--limit) is the number of images to evaluate, at least 1; got {limit}.")
        files = files[: int(limit)]
    net, label, card = _resolve_model(model, task, dev)
    settings: dict[str, Any] = {
        "task": task,
        "scale": (list(scale) if np.ndim(scale) else float(scale)) if task == "sr" else None,
        "sigma": float(sigma) if task == "denoise" else None,
        "quality": int(quality) if task == "deblock" else None,
        "dataset": str(Path(dataset_dir)),
        "hr_dir": str(hr_dir),
        "lr_dir": str(lr_dir) if lr_dir is not None else None,
        "lr": ("given" if lr_dir is not None else "generated") if task == "sr" else None,
        "method": "model" if net is not None else label,
        "ensemble": bool(ensemble and net is not None),
        "model": label if net is not None else None,
        "model_path": card.get("path"),
        "device": str(dev),
        "num_images": len(files),
        "protocol": "GUIDE §2: Y (BT.601) of the rounded, clipped output; shave = ceil(scale) for sr; peak 255",
    }
    yield 0, len(files), settings
    for i, f in enumerate(files):
        try:
            lr_path = None
            if lr_dir is not None:
                lr_path = lr_dir / f.name
                if not lr_path.is_file():
                    raise InputError(f"{lr_dir} has no LR image {f.name} for {f}; add it, or pass --generate-lr to make "
                                     "all LR images from HR.")
            sample = prepare_sample(f, i, task=task, scale=scale, lr_path=lr_path, sigma=sigma, quality=quality)
        except InputError as exc:
            if not skip_bad:
                raise
            yield i + 1, len(files), {"name": f.name, "error": str(exc)}
            continue
        rec, _ = score_sample(sample, net, dev, ensemble=ensemble)
        yield i + 1, len(files), rec


def evaluate_dataset(
    dataset_dir: str | os.PathLike,
    task: str = "sr",
    scale: float | Sequence[float] = 2,
    model=None,
    sigma: float | None = None,
    quality: int | None = None,
    device: str = "auto",
    progress: Optional[Callable[[int, int, dict], Any]] = None,
    generate_lr: bool = False,
    limit: int | None = None,
    ensemble: bool = False,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Evaluate a model (or the bicubic / input baseline) on a dataset with the paper's protocol.

    Parameters
    ----------
    dataset_dir : path
        ``DIR/HR`` (+ optional ``DIR/LR``), a benchmark root with ``x2/x3/x4``
        folders, or a plain folder of images.
    task : {"sr", "denoise", "deblock"}
    scale : float or (sy, sx)
        SR scale factor.
    model : None, str, path or torch module
        ``None``: the bundled default model of ``task``; a bundled name, a
        ``.safetensors`` file or a run directory; a ``VDSR`` instance; or
        ``"bicubic"`` / ``"identity"`` to score the degraded input itself.
    sigma : float
        Gaussian noise σ on the 0..255 scale (denoise).
    quality : int
        JPEG quality 1..100 (deblock).
    device : str
        ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    progress : callable(done, total, record), optional
        Called after each image.
    generate_lr : bool
        Make LR images from HR even where an ``LR/`` folder exists.
    limit : int, optional
        Evaluate only the first ``limit`` images.
    skip_bad : bool
        Go on past an image that cannot be scored (a stack, 16-bit RGB, a missing LR image): it is
        listed in ``skipped`` (``{"name", "error"}``) and left out of the means. Default: raise.
    ensemble : bool
        Score the geometric self-ensemble (mean over the 8 rotations / mirror images;
        8x the time) instead of one forward pass.

    Returns
    -------
    dict
        The settings plus ``psnr`` and ``ssim`` (means over images), ``per_image``
        (list of ``{"name", "psnr", "ssim"}``) and ``seconds``.

    Raises
    ------
    InputError, ModelError
        For a missing or malformed dataset, bad parameters or an unusable model.
    """
    t0 = time.monotonic()
    per_image: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    for done, total, rec in iter_evaluate(dataset_dir, task=task, scale=scale, model=model, sigma=sigma,
                                          quality=quality, device=device, generate_lr=generate_lr, limit=limit,
                                          ensemble=ensemble, skip_bad=skip_bad):
        if done == 0:
            result.update(rec)
            continue
        (skipped if "error" in rec else per_image).append(rec)
        if progress is not None:
            progress(done, total, rec)
    if not per_image:
        raise InputError(f"dataset {dataset_dir}: no image was evaluated.")
    result["psnr"] = float(np.mean([r["psnr"] for r in per_image]))
    result["ssim"] = float(np.mean([r["ssim"] for r in per_image]))
    result["per_image"] = per_image
    if skip_bad:
        result["skipped"] = skipped
    result["seconds"] = round(time.monotonic() - t0, 3)
    return result

