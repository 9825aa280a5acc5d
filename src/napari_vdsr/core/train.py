"""Training engine: the VDSR recipe with adjustable gradient clipping.

:func:`train` is a generator of :class:`TrainEvent`; the CLI wraps it in a
progress bar, the napari widget in a worker thread.  Cancelling = calling
:meth:`Trainer.stop` (or simply no longer iterating).

Exact resume: the batch of step ``k`` is drawn from a generator seeded with
``(seed, rank, k)`` and the learning rate is a pure function of ``k``, so the
checkpoint (model, optimiser, step, best metric, config) fully determines the rest
of a run.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import math
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .data import PatchSampler, Plane, ValidationItem, load_planes, make_validation, split_validation
from .device import cpu_label, memory_format, resolve_device
from .errors import Diverged, TrainingError
from .model import VDSR

__all__ = ["TrainConfig", "TrainEvent", "Trainer", "train", "clip_gradients", "lr_at", "load_checkpoint", "CHECKPOINT_NAME",
           "SGD_CLIP_THETA"]

#: θ of adjustable gradient clipping for SGD at lr 0.1 with this engine's loss (docs/training.md,
#: "Choosing θ": 0.001 never got above bicubic, 0.0001 learned); the default wherever SGD is chosen
SGD_CLIP_THETA = 1e-4

CHECKPOINT_NAME = "checkpoint.pt"
DEFAULT_LEVELS = {"sr": [2.0, 3.0, 4.0], "denoise": [15.0, 25.0, 50.0], "deblock": [10.0, 20.0, 30.0, 40.0]}


#: Pixels per gradient-accumulation chunk on the CPU when ``micro_batch`` is None (16 patches
#: of 41²): a batch-64 float32 step ran at 0.71 of the sgemm ideal in one piece, 0.85 in
#: chunks of 16 (benchmarks/train_step.py), because the chunk's feature maps stay in cache.
MICRO_BATCH_PIXELS = 16 * 41 * 41
#: TrainConfig fields that decide the validation pairs (checked on resuming a checkpoint that has
#: no fingerprint of its pairs; paths are left out, as a GPU machine reads the same images elsewhere)
VALIDATION_SETTINGS = ("task", "val_fraction", "val_crop", "val_prescale", "val_levels", "scales", "sigma_range",
                       "quality_range", "noise_model", "quantize")


def validation_fingerprint(items: Sequence[Any]) -> str:
    """SHA-1 of the validation pairs (names, levels, inputs, targets): equal exactly when they are."""
    h = hashlib.sha1()
    for it in items:
        h.update(f"{it.name}|{it.level}|{it.shave}|{it.inp.shape}|".encode())
        h.update(np.ascontiguousarray(it.inp, np.float32).tobytes())
        h.update(np.ascontiguousarray(it.target, np.float32).tobytes())
    return h.hexdigest()


def auto_micro_batch(batch: int, patch_size: int, device: torch.device | str) -> int:
    """Patches per gradient-accumulation chunk when ``micro_batch`` is None: chunks of about
    :data:`MICRO_BATCH_PIXELS` pixels on the CPU, the whole batch on other devices."""
    if torch.device(device).type != "cpu":
        return batch
    return max(1, min(batch, MICRO_BATCH_PIXELS // (patch_size * patch_size)))


def draw_batch(sampler, seed: int, rank: int, step: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch of ``step``: a pure function of (seed, rank, step), the same in any process."""
    return sampler.batch(np.random.default_rng([seed, rank, step]), n)


class TrainConfig(BaseModel):
    """Everything that defines a training run (saved in every checkpoint and model card)."""

    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    data: list[str] = Field(default_factory=list, description="image files / folders / globs")
    pair_data: list[tuple[str, str]] = Field(
        default_factory=list,
        description="(degraded, clean) image files of a paired run, recorded so that a resume can read them again")
    task: Literal["sr", "denoise", "deblock"] = "sr"
    scales: list[float] = Field(default_factory=lambda: [2.0, 3.0, 4.0])
    scale_range: Optional[tuple[float, float]] = None
    sigma_range: tuple[float, float] = (0.0, 55.0)
    quality_range: tuple[int, int] = (10, 40)
    noise_model: Literal["gaussian", "poisson"] = "gaussian"
    photon_range: tuple[float, float] = (5.0, 200.0)
    read_noise: float = Field(0.01, ge=0, description="Poisson model: max Gaussian read noise σ on the [0, 1] scale")
    quantize: bool = True
    iterations: int = Field(9960, ge=1)
    batch_size: int = Field(64, ge=1)
    patch_size: int = Field(41, ge=8)
    depth: int = Field(20, ge=2)
    width: int = Field(64, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0)
    lr_schedule: Literal["step", "cosine", "constant"] = "step"
    lr_step: Optional[int] = Field(None, ge=1, description="decay every N steps (default: (iterations - decay_start) // 4)")
    lr_gamma: float = Field(0.1, ge=0, le=1)
    decay_start: int = Field(0, ge=0, description="step at which the step or cosine decay begins (lr constant before): anneals a run that went on at a constant lr, e.g. on --resume")
    warmup: int = Field(0, ge=0, description="raise the lr linearly over the first N steps of this run, counted from start_step: lets Adam's moment estimates settle when a run restarts from exported weights")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    clip_theta: Optional[float] = Field(SGD_CLIP_THETA, gt=0, description="adjustable clipping: |g| <= theta / lr (docs/training.md, \"Choosing θ\")")
    clip_mode: Literal["element", "norm"] = Field(
        "element",
        description="what clip_theta bounds: 'element' every gradient element (the paper: a plain SGD step moves "
                    "no weight by more than theta), 'norm' the gradient's global L2 norm (a plain SGD step has "
                    "norm <= theta; the form PyTorch re-implementations of VDSR use)")
    ema: Optional[float] = Field(
        None, gt=0, lt=1,
        description="keep an exponential moving average of the weights with this decay per step (e.g. 0.999: "
                    "about the last 1,000 steps) and validate, keep and export the average instead of the raw "
                    "weights; it smooths the step-to-step noise of the optimiser. None: off")
    seed: int = Field(0, ge=0)
    device: str = "auto"
    amp: bool = Field(True, description="mixed precision on CUDA and on CPUs with native bf16 (AMX/AVX512-BF16)")
    micro_batch: Optional[int] = Field(
        None, ge=1,
        description="split every step's batch into chunks of this many patches and sum their gradients (same "
                    "step, less memory); None = automatic: chunks of about MICRO_BATCH_PIXELS pixels on the CPU, "
                    "whose activations stay in cache (1.2x faster per step measured), no split on GPUs")
    workers: int = Field(
        0, ge=0, le=64,
        description="processes that draw training batches ahead of the step that uses them (0: in the training "
                    "process). Every batch is a pure function of (seed, rank, step), so the result and exact resume "
                    "do not depend on this; use it on GPUs, where drawing patches can take longer than the step")
    prescale: list[float] = Field(
        default_factory=lambda: [1.0],
        description="shrink every training image by this factor (antialiased bicubic) before anything else. Photos "
                    "saved as JPEG carry 8x8 block edges and noise that clean targets lack (SunHays80: 79 of 80 "
                    "images); shrinking by 2 averages them away. Several factors train on the union of the shrunk "
                    "copies (scale augmentation: more varied data than one factor gives); a plain number is one factor")
    val_prescale: Optional[float] = Field(
        None, ge=1.0, le=8.0,
        description="shrink the validation images by this factor; default: the smallest prescale factor for the "
                    "held-out training images (they carry the same flaws) and for val_data alike. Give 1 to "
                    "validate on clean val_data as it is")
    val_fraction: float = Field(0.05, ge=0, lt=1)
    val_data: list[str] = Field(
        default_factory=list,
        description="validation image files / folders / globs, kept apart from the training data (then every "
                    "training plane trains and val_fraction is not used); default: hold out val_fraction of the "
                    "training planes. The best checkpoint is the one that scores best here")
    val_every: int = Field(250, ge=1)
    val_crop: int = Field(192, ge=16)
    val_levels: Optional[list[float]] = None
    checkpoint_minutes: float = Field(10.0, gt=0)
    checkpoint_every: Optional[int] = Field(None, ge=1)
    out: Optional[str] = None
    init_from: Optional[str] = None
    transfer: bool = Field(False, description="allow init_from to be a model made for another task")
    start_step: int = Field(0, ge=0, description="continue the step count (and lr schedule) of init_from's run")
    name: str = "vdsr"

    @field_validator("scales")
    @classmethod
    def _check_scales(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("give at least one scale")
        for s in v:
            if not 1 <= s <= 16:
                raise ValueError(f"scales must be in [1, 16], got {s}")
        return [float(s) for s in v]

    @field_validator("prescale", mode="before")
    @classmethod
    def _check_prescale(cls, v) -> list[float]:
        vals = [v] if isinstance(v, (int, float)) else list(v)
        if not vals:
            raise ValueError("give at least one prescale factor (1: the images as they are)")
        for f in vals:
            if not 1.0 <= float(f) <= 8.0:
                raise ValueError(f"prescale factors must be in [1, 8], got {f}")
        return sorted({float(f) for f in vals})

    def validation_prescale(self) -> float:
        """The factor validation images are shrunk by (``val_prescale`` or the smallest ``prescale``)."""
        return float(self.val_prescale) if self.val_prescale is not None else min(self.prescale)

    @model_validator(mode="after")
    def _check_ranges(self) -> "TrainConfig":
        for nm in ("scale_range", "sigma_range", "quality_range", "photon_range"):
            r = getattr(self, nm)
            if r is not None and r[0] > r[1]:
                raise ValueError(f"{nm} must be (low, high), got {r}")
        if self.quality_range[0] < 1 or self.quality_range[1] > 100:
            raise ValueError("JPEG qualities must be within 1..100")
        if self.scale_range is not None and not (1 <= self.scale_range[0] and self.scale_range[1] <= 16):
            raise ValueError(f"scale_range (--scale-range) must lie within 1..16 (1 = same size), got {self.scale_range}")
        if self.sigma_range[0] < 0 or self.sigma_range[1] > 255:
            raise ValueError(f"sigma_range (--sigma-range) is on the 0..255 scale of 8-bit images and must lie within "
                             f"0..255, got {self.sigma_range}")
        if self.photon_range[0] <= 0:
            raise ValueError(f"photon_range (--photon-range) counts photons at full scale and must be above 0, got "
                             f"{self.photon_range}")
        return self

    def levels(self) -> tuple[Optional[list[float]], Optional[tuple[float, float]]]:
        """Degradation levels for the sampler: discrete list or continuous range."""
        if self.task == "sr":
            return (None, self.scale_range) if self.scale_range else (self.scales, None)
        if self.task == "denoise":
            return None, (self.photon_range if self.noise_model == "poisson" else self.sigma_range)
        return None, (float(self.quality_range[0]), float(self.quality_range[1]))

    def validation_levels(self) -> list[float]:
        if self.val_levels:
            return list(self.val_levels)
        if self.task == "sr":
            if self.scale_range:
                lo, hi = self.scale_range
                return sorted({lo, (lo + hi) / 2, hi})
            return list(self.scales)
        if self.task == "denoise" and self.noise_model == "poisson":
            lo, hi = self.photon_range
            return sorted({lo, math.sqrt(lo * hi), hi})
        lo, hi = self.sigma_range if self.task == "denoise" else self.quality_range
        picks = [v for v in DEFAULT_LEVELS[self.task] if lo <= v <= hi]
        return picks or [float(lo), float(hi)]


@dataclass
class TrainEvent:
    """Progress report yielded by the training loop.

    ``kind`` is ``start``, ``step``, ``val``, ``checkpoint``, ``done`` or ``stopped``.
    PSNRs are on the [0, 1] → 255 scale over the validation set; ``val_baseline_psnr``
    is the degraded input (bicubic for SR), ``val_base_model_psnr`` the model training
    started from (fine-tuning), ``val_per_level`` per scale / σ / quality.  With
    ``TrainConfig.ema`` the validated weights are the moving average, and
    ``val_raw_psnr`` is the optimiser's own weights at that step.
    """

    kind: str
    step: int
    total: int
    loss: Optional[float] = None
    lr: Optional[float] = None
    val_psnr: Optional[float] = None
    val_baseline_psnr: Optional[float] = None
    val_base_model_psnr: Optional[float] = None
    val_per_level: Optional[dict[str, float]] = None
    best_psnr: Optional[float] = None
    val_raw_psnr: Optional[float] = None
    elapsed: float = 0.0
    message: str = ""
    path: Optional[str] = None
    #: on ``start``: the machine that runs the steps from here ("cpu", or the card's name on CUDA),
    #: so that a log continued on several machines says which steps ran where
    device: Optional[str] = None
    #: on ``start``: the batch (all processes together) of the steps from here
    batch: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v != ""}


def device_name(device: torch.device | str) -> str:
    """The machine that ran a run's steps, for its log and card: the card's name for a CUDA device,
    the CPU's model for the CPU (:func:`~napari_vdsr.core.device.cpu_label`), else the device's string."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return cpu_label() if dev.type == "cpu" else str(dev)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate used for step ``step`` (0-based): a pure function of the step.

    The schedule's lr, times ``(k + 1) / warmup`` for the first ``warmup`` steps of the run
    (``k = step - start_step``: a run continued from exported weights warms up again).  The step
    and cosine decays start at ``decay_start`` (the lr is ``lr`` before it).
    """
    base = cfg.lr
    if cfg.lr_schedule == "constant":
        lr = base
    elif cfg.lr_schedule == "cosine":
        s0 = cfg.decay_start
        t = min(1.0, max(0.0, (step - s0) / max(1, cfg.iterations - s0)))
        lr = base * (cfg.lr_gamma + (1 - cfg.lr_gamma) * 0.5 * (1 + math.cos(math.pi * t)))
    else:
        every = cfg.lr_step or max(1, (cfg.iterations - cfg.decay_start) // 4)
        lr = base * cfg.lr_gamma ** (max(0, step - cfg.decay_start) // every)
    k = step - cfg.start_step
    if cfg.warmup and 0 <= k < cfg.warmup:
        lr *= (k + 1) / cfg.warmup
    return lr


def prescale_planes(planes: list[Plane], factor: float) -> list[Plane]:
    """``planes`` shrunk by ``factor`` (antialiased bicubic, as the SR degradation), new Plane objects.

    Planes that would fall below 16 px on a side are left out; ``factor`` 1 returns ``planes``.
    """
    if factor == 1.0:
        return planes
    from .degrade import downscale, scaled_shape

    out = []
    for p in planes:
        if min(scaled_shape(p.data.shape, factor, down=True)) < 16:
            continue
        out.append(replace(p, data=np.clip(downscale(p.data, factor), 0.0, 1.0).astype(np.float32)))
    if not out and planes:
        raise TrainingError(f"every image is smaller than 16 px after shrinking by {factor:g} (--prescale / --val-prescale); use a smaller factor.")
    return out


def prescale_union(planes: list[Plane], factors: Sequence[float]) -> list[Plane]:
    """The planes shrunk by each factor, all together (one factor: :func:`prescale_planes`).

    With several factors every copy is named ``<plane>@/<factor>``; the sampler draws
    from them in proportion to their areas.
    """
    if len(factors) == 1:
        return prescale_planes(planes, float(factors[0]))
    out: list[Plane] = []
    for f in factors:
        out += [replace(p, name=f"{p.name}@/{f:g}") for p in prescale_planes(planes, float(f))]
    return out


def loss_read_every(device: torch.device) -> int:
    """Steps between reads of the loss back to the host: 1 on the CPU, 10 on accelerators.

    Reading a value back waits for the device to finish, so the host cannot queue the
    next step meanwhile; on a GPU the loss is therefore read every 10 steps (the log's
    interval) and at every validation, checkpoint and stop.  A non-finite loss is still
    caught before anything is saved.
    """
    return 1 if torch.device(device).type == "cpu" else 10


@torch.no_grad()
def clip_gradients(params, theta: float, lr: float, count: bool = True) -> float:
    """Adjustable gradient clipping (Kim et al. 2016): clamp every gradient element to [-θ/γ, θ/γ].

    ``γ`` is the current learning rate, so a plain SGD step ``γ·g`` never moves a
    weight by more than ``θ``.  Returns the fraction of elements that were clipped
    (``count=False`` skips that count, and its host synchronisation, in the training loop).
    """
    if lr <= 0:  # the step moves nothing (e.g. a step schedule with lr_gamma 0): nothing to clip
        return 0.0
    bound = theta / lr
    clipped = total = 0
    for p in params:
        if p.grad is None:
            continue
        g = p.grad
        if count:
            clipped += int((g.abs() > bound).sum())
            total += g.numel()
        g.clamp_(-bound, bound)
    return clipped / max(1, total)


def _atomic_write_text(text: str, path: Path) -> None:
    """Write ``text`` to ``path`` so that a crash or a full disk leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint (``weights_only=True``: nothing is unpickled beyond tensors and plain data)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"no checkpoint at {path}; start without --resume.") from None
    except Exception as exc:
        raise TrainingError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}).") from None


def _dist_info() -> tuple[int, int, int]:
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), ws, int(os.environ.get("LOCAL_RANK", "0"))


_WORKER_SAMPLER = None


def _worker_init(sampler, close_fds: Sequence[int] = ()) -> None:
    """Batch-drawing process: keep the sampler, one thread, and leave Ctrl-C to the trainer.

    A forked worker closes ``close_fds`` (the run folder's lock: the lock would otherwise live on
    in a worker that outlives a killed trainer) and, on Linux, asks to end with its parent.
    """
    import signal

    global _WORKER_SAMPLER
    _WORKER_SAMPLER = sampler
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a SIGTERM to the process group is the trainer's to handle
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    with contextlib.suppress(Exception):  # best effort: prctl(PR_SET_PDEATHSIG, SIGKILL), Linux only
        import ctypes
        import sys as _sys

        if _sys.platform.startswith("linux"):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
            if os.getppid() == 1:  # the parent died before the request took effect
                os._exit(0)
    torch.set_num_threads(1)


def _draw_batch(seed: int, rank: int, step: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    return draw_batch(_WORKER_SAMPLER, seed, rank, step, n)


class BatchPrefetcher:
    """Draw the batches of the next steps in ``workers`` processes while the current step runs.

    ``get(step)`` returns exactly what :func:`draw_batch` returns in-process, so training with and without workers is identical.
    """

    def __init__(self, sampler, workers: int, seed: int, rank: int, n: int, depth: Optional[int] = None,
                 close_fds: Sequence[int] = ()) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # fork shares the training images with the workers instead of pickling them to each
        fork = "fork" in mp.get_all_start_methods()
        ctx = mp.get_context("fork" if fork else "spawn")
        # a forked worker inherits the parent's descriptors (``close_fds``: the run folder's lock); a spawned one does not
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                        initargs=(sampler, tuple(close_fds) if fork else ()))
        self.seed, self.rank, self.n = seed, rank, n
        self.depth = depth or 2 * workers
        self.pending: dict[int, Any] = {}

    def get(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        for k in list(self.pending):
            if k < step:  # a step was skipped (should not happen): drop its batch
                self.pending.pop(k).cancel()
        for k in range(step, step + self.depth):
            if k not in self.pending:
                self.pending[k] = self.pool.submit(_draw_batch, self.seed, self.rank, k, self.n)
        try:
            return self.pending.pop(step).result()
        except Exception as exc:  # a worker died (killed, out of memory): say so, the checkpoint is kept
            raise TrainingError(
                f"a batch-drawing worker process failed ({type(exc).__name__}: {exc}); resume the run, "
                "with fewer --workers if memory is short."
            ) from exc

    def close(self) -> None:
        for f in self.pending.values():
            f.cancel()
        self.pending.clear()
        if getattr(self.pool, "_broken", False):
            # a worker died: the pool ends the others with SIGTERM, which they ignore (_worker_init), and
            # would wait for them for ever; they hold nothing to save
            for proc in list((getattr(self.pool, "_processes", None) or {}).values()):
                with contextlib.suppress(Exception):
                    proc.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)


#: files a run writes into its folder that a new run there would overwrite
_RUN_FILES = (CHECKPOINT_NAME, "last.safetensors", "best.safetensors")


def _check_run_dir(out: Path, resume: bool) -> None:
    """Refuse a run folder that is a file, or that holds another run when not resuming.

    A new run in the folder of an earlier one would overwrite its checkpoint and weights at its
    first save (the earlier run's last checkpoint lost); ``resume`` continues it instead.
    """
    if out.exists() and not out.is_dir():
        raise TrainingError(f"{out} is a file, not a folder; give --out (config.out) the name of a run folder "
                            "(it is created when missing).")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise TrainingError(f"{parent} is a file, so {out} cannot be made; choose another --out folder.")
            break
    if resume or not out.is_dir():
        return
    found = [n for n in _RUN_FILES if (out / n).exists()]
    if found:
        raise TrainingError(
            f"{out} already holds a training run ({', '.join(found)}); a new run there would overwrite it. Pass "
            "--resume (resume=True) to continue that run, or give a new --out folder (or delete the old one).")


#: the file a running process holds (an advisory lock) in its run folder
LOCK_NAME = ".training.lock"


def lock_run_dir(out: Path) -> Optional[Any]:
    """Hold the run folder ``out`` for this process; raise :class:`TrainingError` when another holds it.

    Two processes training into one folder would overwrite each other's checkpoint and weights.
    The lock is the operating system's (``flock``), so it ends with its process, a crash included;
    its file holds the process id for the message. Returns the open lock file (close it to
    release), or None where there is no ``fcntl`` (Windows).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / LOCK_NAME, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise TrainingError(
            f"another training process (pid {holder}) is writing {out}; a second run there would overwrite its "
            "checkpoint. Wait for it to end (or stop it: Ctrl-C or the widget's Stop saves its checkpoint), "
            "or write to another folder (--out; in the Fine-tune widget another model name)."
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def run_dir_is_free(out: Path) -> bool:
    """True when ``out`` can take a new run: missing, empty, or holding only the lock file of a run that
    ended before it wrote anything (a refused start), which no process holds now."""
    out = Path(out)
    if not out.exists():
        return True
    if not out.is_dir():
        return False
    entries = list(out.iterdir())
    if not entries:
        return True
    if [e.name for e in entries] != [LOCK_NAME]:
        return False
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock files are written
        return False
    try:
        with open(out / LOCK_NAME, "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    except OSError:
        return False  # a process holds it: a run is starting there
    return True


class Trainer:
    """One training run.  Iterate :meth:`run` (or call :func:`train`) to make progress.

    Parameters
    ----------
    config : TrainConfig
        The recipe.  ``config.out`` (a run directory) enables checkpoints,
        ``log.jsonl`` and the exported ``best.safetensors``.
    planes : list of Plane, optional
        Training images already in memory (used instead of ``config.data``),
        e.g. napari layers.
    val_planes : list of Plane, optional
        Explicit validation planes; default: a held-out part of the training planes.
    resume : bool
        Continue from ``config.out/checkpoint.pt`` if it exists.
    card_extra : dict, optional
        Extra fields for the exported model card (e.g. data description).
    """

    def __init__(
        self,
        config: TrainConfig,
        planes: Optional[list[Plane]] = None,
        val_planes: Optional[list[Plane]] = None,
        resume: bool = False,
        card_extra: Optional[dict[str, Any]] = None,
        pairs: Optional[list[tuple[Plane, Plane]]] = None,
    ) -> None:
        self.config = config
        self.resume = resume
        self.resumed = False  # set when a checkpoint was actually loaded
        self.card_extra = dict(card_extra or {})
        self._stop = threading.Event()
        self._planes = planes
        self._val_planes = val_planes
        self._pairs = pairs
        self.out = Path(config.out) if config.out else None
        if self.out is not None:
            _check_run_dir(self.out, resume)
        self.best_path: Optional[Path] = None
        self.val_restart = ""  # set when a resume validates differently from its checkpoint
        self.data_notes: list[str] = []  # images left out of training or validation, for the start message
        self.history: list[dict[str, Any]] = []
        self._earlier_log: list[dict[str, Any]] = []  # log.jsonl as it was when this process started
        self._prefetch: Optional[BatchPrefetcher] = None
        self._lock: Optional[Any] = None  # the run folder's lock while the run is in progress

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """Ask the loop to stop after the current step (it then checkpoints and exports)."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    @property
    def paired(self) -> bool:
        """Whether the run trains on registered (degraded, clean) pairs rather than degrading clean images."""
        return self._pairs is not None

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg = self.config
        self.rank, self.world, local = _dist_info()
        self.distributed = self.world > 1
        if self.distributed and not torch.distributed.is_initialized():
            dev = resolve_device(cfg.device)
            backend = "nccl" if dev.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)
            self._owns_process_group = True
        dev = resolve_device(cfg.device)
        if dev.type == "cuda" and self.distributed:
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        self.device = dev
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.is_main = self.rank == 0
        if self.out is not None and self.is_main and self._lock is None:
            self._lock = lock_run_dir(self.out)
        if self.distributed and cfg.batch_size % self.world:
            raise TrainingError(f"batch size {cfg.batch_size} must be divisible by the {self.world} processes.")
        self.local_batch = cfg.batch_size // self.world

        # data
        if self._pairs is None and self._planes is None and cfg.pair_data:  # a paired run's recorded files
            from .data import load_pairs

            self._pairs = load_pairs(cfg.pair_data, task=cfg.task, scales=cfg.scales)
        if self._pairs is not None:
            from .data import PairSampler, make_pair_validation, split_pairs

            if cfg.val_data:
                raise TrainingError("val_data (--val-data) is for training on clean images; with (degraded, clean) "
                                    "pairs the validation is a held-out part of the pairs (val_fraction).")
            if cfg.prescale != [1.0] or cfg.val_prescale not in (None, 1.0):
                raise TrainingError("prescale / val_prescale (--prescale, --val-prescale) shrink clean images before "
                                    "they are degraded; (degraded, clean) pairs are used as they are, so leave "
                                    "them out (or give clean images instead of pairs).")

            train_pairs, val_pairs = split_pairs(self._pairs, cfg.val_fraction)
            self.sampler = PairSampler(train_pairs, cfg.patch_size)
            shave = int(math.ceil(max(cfg.scales))) if cfg.task == "sr" else 0
            self.val_items = make_pair_validation(val_pairs, cfg.val_crop, shave)
            self.n_train_planes, self.n_val_planes = len(self.sampler.pairs), len(val_pairs)
        else:
            planes = self._planes if self._planes is not None else load_planes(cfg.data)
            if self._val_planes is not None:
                train_planes, val_planes = planes, self._val_planes
            elif cfg.val_data:
                train_planes, val_planes = planes, load_planes(cfg.val_data)
            else:  # hold out before shrinking, so no held-out image trains at another factor
                train_planes, val_planes = split_validation(planes, cfg.val_fraction)
            train_planes = prescale_union(train_planes, cfg.prescale)
            val_planes = prescale_planes(val_planes, cfg.validation_prescale())
            levels, level_range = cfg.levels()
            self.sampler = PatchSampler(
                train_planes, cfg.task, cfg.patch_size, levels=levels, level_range=level_range,
                quantize=cfg.quantize, noise_model=cfg.noise_model, read_noise=cfg.read_noise,
            )
            self.val_items = (
                make_validation(val_planes, cfg.task, cfg.validation_levels(), cfg.val_crop, cfg.quantize, cfg.noise_model,
                                cfg.read_noise)
                if val_planes else []
            )
            self.n_train_planes, self.n_val_planes = len(self.sampler.planes), len(val_planes)
            kept = {id(p) for p in self.sampler.planes}
            small = [p.name for p in train_planes if id(p) not in kept]
            if small:
                self.data_notes.append(
                    f"{len(small)} training plane(s) smaller than one patch left out: {', '.join(small[:5])}"
                    + (" ..." if len(small) > 5 else ""))
            if val_planes and not self.val_items:
                self.data_notes.append(
                    "no validation: the held-out planes are too small for a validation pair; raise the validation "
                    "fraction or give separate validation images (--val-data on the command line)")
        self.val_fingerprint = validation_fingerprint(self.val_items)
        if cfg.workers:
            # started before the model touches the GPU: the forked workers only run NumPy
            self._prefetch = BatchPrefetcher(self.sampler, cfg.workers, cfg.seed, self.rank, self.local_batch,
                                             close_fds=[self._lock.fileno()] if self._lock is not None else [])

        # model
        torch.manual_seed(cfg.seed)
        self.base_card: Optional[dict[str, Any]] = None
        #: how the starting weights of a run continued with --start-step were trained (the leg entries
        #: of their card), kept in the checkpoint: the exported cards describe the whole lineage
        self.earlier_legs: Optional[dict[str, Any]] = None
        # a run resumed from its checkpoint takes its weights (and the starting weights, base_state)
        # from there: the model file it once started from is not read again, so a run whose
        # starting file has moved or gone (a copy made on another machine) still resumes
        resuming = bool(self.resume and self.out and (self.out / CHECKPOINT_NAME).exists())
        if self.resume and self.out and not resuming:
            exported = [n for n in ("best.safetensors", "last.safetensors") if (self.out / n).exists()]
            if exported:  # a run that ended before its first checkpoint: starting afresh would overwrite them
                raise TrainingError(
                    f"{self.out} holds {' and '.join(exported)} but no {CHECKPOINT_NAME} to resume (the run ended "
                    f"before its first checkpoint). Continue from those weights in a new folder with --from "
                    f"{self.out / exported[0]} (init_from), or move them away to start this run afresh.")
        if not resuming and cfg.transfer and not cfg.init_from:
            raise TrainingError("transfer (--transfer) lets the weights given with --from (init_from) serve another "
                                "task; without --from there are none: leave it out, or give --from.")
        if not resuming and cfg.start_step:
            if not cfg.init_from:
                raise TrainingError(f"start_step (--start-step {cfg.start_step}) continues the step count of the "
                                    "weights given with --from (init_from); give them, or leave it out.")
            if cfg.start_step > cfg.iterations:
                raise TrainingError(f"start_step (--start-step {cfg.start_step}) is past the run's end "
                                    f"(--iterations {cfg.iterations}); give a larger --iterations.")
        if cfg.init_from and not resuming:
            from .weights import load_model

            base, self.base_card = load_model(cfg.init_from, task=None)
            if cfg.task not in self.base_card.get("tasks", []) and not cfg.transfer:
                from .weights import TASK_LABELS

                raise TrainingError(
                    f"the base model {Path(self.base_card['path']).name} serves {self.base_card.get('tasks')}, not "
                    f"{TASK_LABELS[cfg.task]}; start from a {cfg.task} model, from scratch, or pass --transfer to "
                    "train it for the new task on purpose."
                )
            if (base.depth, base.width) != (cfg.depth, cfg.width):
                self.data_notes.append(f"the network has the base model's shape: depth {base.depth}, width "
                                       f"{base.width} (not the {cfg.depth}, {cfg.width} configured)")
                cfg.depth, cfg.width = base.depth, base.width
            self.model = base.train()
        else:
            self.model = VDSR(cfg.depth, cfg.width)
        self.model.to(self.device)
        self.model = self.model.to(memory_format=memory_format(self.device))  # NHWC on CPU/CUDA (CPU step: 1.2x)
        self.base_state = (
            {k: v.detach().clone() for k, v in self.model.state_dict().items()} if cfg.init_from and not resuming else None
        )

        params = [p for p in self.model.parameters()]
        if cfg.optimizer == "sgd":
            # weight decay is added to the gradient before clipping, so every element of the
            # objective's gradient is clipped (see clip_gradients)
            self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=0.0)
        else:
            self.opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=0.0)
        from .device import autocast_dtype

        # mixed precision for the training steps (CUDA, and CPUs with native bf16);
        # validation always runs in float32 so its PSNRs compare across runs and machines
        self.amp_dtype = autocast_dtype(self.device, cfg.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.net = self.model
        if self.distributed:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

        self.step = 0
        self.best = -math.inf
        self.compute_seconds = 0.0
        self.resumed = False
        self.ema_model: Optional[VDSR] = None
        self.ema_updates = 0
        ck = None
        if resuming:
            self.resumed = True
            ck = load_checkpoint(self.out / CHECKPOINT_NAME)
            saved = ck.get("config") if isinstance(ck.get("config"), dict) else {}
            fixed = [f"{k} {saved[k]} -> {getattr(cfg, k)}" for k in ("depth", "width", "optimizer")
                     if k in saved and saved[k] != getattr(cfg, k)]
            if fixed:
                raise TrainingError(
                    f"a resumed run keeps its network and optimiser ({'; '.join(fixed)} asked for): its checkpoint "
                    "holds their state. Resume without changing them, or start a new run (in a new folder) from "
                    f"its weights with --from {self.out / 'last.safetensors'}.")
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
            if ck.get("scaler"):
                self.scaler.load_state_dict(ck["scaler"])
            self.step = int(ck["step"])
            self.best = float(ck.get("best", -math.inf))
            self._restart_best_if_validation_changed(ck)
            self._best_exported_after_checkpoint()
            self.compute_seconds = float(ck.get("compute_seconds", 0.0))
            self.earlier_legs = ck.get("earlier_legs")
            if isinstance(ck.get("card_extra"), dict):  # the run's own labels (a fine-tune's base) go on
                self.card_extra = {**self.card_extra, **ck["card_extra"]}
            if ck.get("base_state") is not None:
                self.base_state = ck["base_state"]
        elif cfg.start_step:
            # continuing a run from exported weights (e.g. a committed bundled model): the step
            # count and the learning-rate schedule go on; optimiser moments start afresh
            self.step = min(cfg.start_step, cfg.iterations)
            if self.base_card:
                self.compute_seconds = float(self.base_card.get("training", {}).get("compute_hours", 0.0)) * 3600.0
                from .runlog import LEG_KEYS

                trained = self.base_card.get("training", {})
                self.earlier_legs = {k: trained[k] for k in LEG_KEYS if k in trained} or None
        if cfg.ema:
            # the average starts from the weights training starts from (a run resumed without
            # an average, e.g. --ema given on --resume, starts one here)
            self.ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
            if ck is not None and ck.get("ema") is not None:
                self.ema_model.load_state_dict(ck["ema"])
                self.ema_updates = int(ck.get("ema_updates", 0))

    def _restart_best_if_validation_changed(self, ck: dict[str, Any]) -> None:
        """A resume that validates on other items (images, crop, levels) starts the best score afresh.

        Scores on another validation set are not comparable with the checkpoint's best, so
        the first validation becomes the new best.  The earlier best export is kept, renamed
        ``best-before-STEP.*``, so that nothing it held is overwritten.  The comparison is of
        the validation pairs themselves (their fingerprint in the checkpoint), so the same
        images under another path (a GPU machine's copy) change nothing; a checkpoint written
        before fingerprints existed is compared on the validation settings instead.
        """
        exported = bool(self.out) and (self.out / "best.json").is_file()
        if not math.isfinite(self.best) and not exported:  # no score yet, none exported: nothing to restart
            return
        if ck.get("val_fingerprint") is not None:
            changed = ["the validation pairs"] if ck["val_fingerprint"] != self.val_fingerprint else []
        else:
            saved, now = ck.get("config") or {}, json.loads(self.config.model_dump_json())
            changed = [k for k in VALIDATION_SETTINGS if k in saved and saved[k] != now.get(k)]
        if not changed:
            return
        score = f" ({self.best:.3f})" if math.isfinite(self.best) else ""
        self.val_restart = f"validation changed ({', '.join(changed)}): the best score{score} restarts"
        self.best = -math.inf
        if self.out and self.is_main:
            for ext in ("safetensors", "json"):
                old = self.out / f"best.{ext}"
                if old.exists():
                    old.replace(self.out / f"best-before-{self.step}.{ext}")
            if (self.out / f"best-before-{self.step}.safetensors").exists():
                self.val_restart += f"; the earlier best is kept as best-before-{self.step}.safetensors"

    def _last_export_step(self) -> Optional[int]:
        """Training step of the run's last.* export (None: none, or unreadable)."""
        try:
            return int(json.loads((self.out / "last.json").read_text())["training"]["steps"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _stop_agreed(self, every: int) -> bool:
        """Stop now? With several processes (torchrun) all stop at the same step, whichever was asked.

        A stop seen by one process alone (its Ctrl-C or SIGTERM) would leave the others waiting in
        a collective for a peer that has gone; so the flag is shared (max over the processes)
        every ``every`` steps, at the same steps in every process.
        """
        if not self.distributed:
            return self._stop.is_set()
        if self.step % every:
            return False
        flag = torch.tensor([1.0 if self._stop.is_set() else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0:
            self._stop.set()
            return True
        return False

    def _best_exported_after_checkpoint(self) -> None:
        """After a crash, best.* may hold a validation better than the checkpoint knows (exported later).

        Its score becomes the best to beat, so that a resumed run never replaces it with worse
        weights.  Not when the validation changed (then best.* has been set aside).
        """
        if self.val_restart or not (self.out and (self.out / "best.json").is_file()):
            return
        try:
            val = json.loads((self.out / "best.json").read_text()).get("metrics", {}).get("validation", {})
            step, psnr = int(val.get("step", -1)), float(val.get("psnr", -math.inf))
        except (OSError, ValueError, TypeError, AttributeError):
            return
        if step >= self.step and psnr > self.best:  # equal: a stop validated after its checkpoint was written
            self.best = psnr

    def _ema_decay(self) -> float:
        """Decay of the next update: ``ema``, lower for the first updates so that a random start fades fast."""
        n = self.ema_updates
        return min(float(self.config.ema), (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema_model is None:
            return
        d = self._ema_decay()
        for e, p in zip(self.ema_model.parameters(), self.model.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.ema_model.buffers(), self.model.buffers()):
            e.copy_(b)
        self.ema_updates += 1

    @property
    def result_model(self) -> torch.nn.Module:
        """The weights the run produces: the moving average with ``ema``, else the trained weights."""
        return self.ema_model if self.ema_model is not None else self.model

    # ------------------------------------------------------------------ pieces
    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._prefetch is not None:
            inp, tgt = self._prefetch.get(step)
        else:
            inp, tgt = draw_batch(self.sampler, self.config.seed, self.rank, step, self.local_batch)
        t_in, t_tg = torch.from_numpy(inp), torch.from_numpy(tgt)
        if self.device.type == "cuda":
            t_in, t_tg = t_in.pin_memory(), t_tg.pin_memory()
        mf = memory_format(self.device)
        return (t_in.to(self.device, non_blocking=True).contiguous(memory_format=mf),
                t_tg.to(self.device, non_blocking=True).contiguous(memory_format=mf))

    def micro_batch_size(self) -> int:
        """Patches per gradient-accumulation chunk (see ``TrainConfig.micro_batch``)."""
        cfg = self.config
        if cfg.micro_batch:
            return min(cfg.micro_batch, self.local_batch)
        return auto_micro_batch(self.local_batch, cfg.patch_size, self.device)

    def _train_step(self, step: int) -> float:
        cfg = self.config
        lr = lr_at(cfg, step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        x, y = self._batch(step)
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        n = x.shape[0]
        chunk = self.micro_batch_size()
        sq = torch.zeros((), device=self.device)
        for i in range(0, n, chunk):
            last = i + chunk >= n
            # DDP: gradients are averaged across processes once, on the last chunk
            sync = self.net.no_sync() if self.distributed and not last else contextlib.nullcontext()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    out = self.net(x[i : i + chunk])
                diff = out.float() - y[i : i + chunk]
                # the paper's objective: 1/2 ||y - F(x)||^2, summed over pixels, averaged over the batch
                loss = 0.5 * diff.pow(2).sum() / n
                sq += diff.detach().pow(2).sum()
                self.scaler.scale(loss).backward()
        mse = sq / y.numel()
        self.scaler.unscale_(self.opt)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if cfg.weight_decay and cfg.optimizer == "sgd":
            with torch.no_grad():
                for p in params:
                    p.grad.add_(p, alpha=cfg.weight_decay)
        if cfg.clip_theta and lr > 0:
            if cfg.clip_mode == "norm":
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_theta / lr)
            else:
                clip_gradients(params, cfg.clip_theta, lr, count=False)
        self.scaler.step(self.opt)
        self.scaler.update()
        self._update_ema()
        if self.distributed:
            torch.distributed.all_reduce(mse)
            mse /= self.world
        return mse.detach()

    def _read_losses(self, pending: list[tuple[int, torch.Tensor]]) -> Optional[float]:
        """Read the steps' losses back from the device (one synchronisation); the last one, or None.

        Raises :class:`TrainingError` at the first non-finite loss; ``pending`` is emptied.
        """
        if not pending:
            return None
        steps = [s for s, _ in pending]
        values = torch.stack([t.float().reshape(()) for _, t in pending]).cpu().tolist()
        pending.clear()
        for step, v in zip(steps, values):
            if not math.isfinite(v):
                lr = lr_at(self.config, step - 1)
                raise Diverged(
                    f"the loss became {v} at step {step} (learning rate {lr:g}); training stopped. The best "
                    "weights validated so far (best.safetensors) and the last checkpoint, if one was written, "
                    "are kept. Lower --lr (or clip the gradients: --optimizer sgd --clip-theta) and resume.",
                    step=step, lr=lr,
                )
        return float(values[-1])

    def _validate(self, model: Optional[torch.nn.Module] = None) -> tuple[float, float, dict[str, float]]:
        """Mean PSNR (8-bit rounding, shaved border) of the model and of the degraded input."""
        return score_validation(model if model is not None else self.result_model, self.val_items, self.device)

    def _base_model_psnr(self) -> Optional[float]:
        if self.base_state is None or not self.val_items:
            return None
        m = VDSR(self.config.depth, self.config.width).to(self.device)
        m.load_state_dict(self.base_state)
        return self._validate(m)[0]

    def _checkpoint(self) -> Optional[Path]:
        if not (self.out and self.is_main):
            return None
        ck = {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.step,
            "best": self.best,
            "compute_seconds": self.compute_seconds,
            "earlier_legs": self.earlier_legs,
            "config": json.loads(self.config.model_dump_json()),
            "base_state": self.base_state,
            "ema": self.ema_model.state_dict() if self.ema_model is not None else None,
            "ema_updates": self.ema_updates,
            "val_fingerprint": self.val_fingerprint,
            "card_extra": self.card_extra,
            "format": "napari-vdsr-checkpoint/1",
        }
        path = self.out / CHECKPOINT_NAME
        _atomic_torch_save(ck, path)
        return path

    def card(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Model card for the current weights."""
        cfg = self.config
        card = {
            "name": cfg.name,
            "tasks": [cfg.task],
            "scales": (list(cfg.scale_range) if cfg.scale_range else cfg.scales) if cfg.task == "sr" else None,
            "training": {
                "recipe": json.loads(cfg.model_dump_json(exclude={"out", "device"})),
                "steps": self.step,
                "device": device_name(self.device),
                "processes": self.world,
                "precision": f"autocast {self.amp_dtype}".replace("torch.", "") if self.amp_dtype else "float32",
                "compute_hours": round(self.compute_seconds * self.world / 3600.0, 4),
                "train_planes": self.n_train_planes,
                "val_planes": self.n_val_planes,
                "loss": "0.5 * sum of squared error per patch, mean over batch",
            },
            "metrics": {"validation": metrics},
            "normalization": "uint8 / 255; other dtypes by the image's min..max (isolated hot or dead pixels left out)",
        }
        if self.out is not None:  # machine, batch and lr of each leg of a run resumed across machines
            from .runlog import continue_legs, describe_legs

            legs = describe_legs(self._earlier_log + self.history, self.step)
            if legs and self.earlier_legs:  # continued from weights: their legs first
                try:
                    legs = continue_legs(self.earlier_legs, legs, cfg.start_step, self.step)
                except Exception:  # an odd card never stops an export: the run's own legs then
                    pass
            if legs:
                card["training"].update(legs)
        card.update(self.card_extra)
        return card

    def _export(self, name: str, metrics: dict[str, Any]) -> Optional[Path]:
        if not (self.out and self.is_main):
            return None
        from .weights import save_model

        return save_model(self.result_model, self.out / f"{name}.safetensors", self.card(metrics))

    def _log(self, ev: TrainEvent) -> None:
        from .weights import json_safe

        d = ev.to_dict()
        self.history.append(d)
        if self.out and self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "log.jsonl", "a") as fh:
                fh.write(json.dumps(json_safe(d), default=str) + "\n")

    # ------------------------------------------------------------------ loop
    def run(self) -> Iterator[TrainEvent]:
        """Run (or continue) training, yielding :class:`TrainEvent` objects."""
        try:
            yield from self._run()
        finally:
            if self._prefetch is not None:
                self._prefetch.close()
                self._prefetch = None
            if self._lock is not None:
                self._lock.close()
                self._lock = None
            if getattr(self, "_owns_process_group", False) and torch.distributed.is_initialized():
                # a process leaving with its group (or DDP's reducer) alive may abort at exit
                self.net = self.model
                gc.collect()
                torch.distributed.destroy_process_group()
                self._owns_process_group = False

    def _run(self) -> Iterator[TrainEvent]:
        cfg = self.config
        self._setup()
        total = cfg.iterations
        t0 = time.monotonic()
        last_ck = time.monotonic()
        base_model_psnr = self._base_model_psnr() if self.is_main else None
        if self.out and self.is_main and (self.out / "log.jsonl").is_file():  # read once: the cards add this process's events
            from .runlog import read_log

            self._earlier_log = read_log(self.out / "log.jsonl")
        start = TrainEvent("start", self.step, total, message=(
            f"{self.n_train_planes} training planes, {self.n_val_planes} validation planes, device {self.device}"
            + ((f", resumed at step {self.step}" if self.resumed else f", continuing from step {self.step}")
               if self.step else "")
            + (f"; {self.val_restart}" if self.val_restart else "")
            + (f"; the run is already at step {self.step} of {total}: nothing to train (give a larger "
               "--iterations to go on)" if self.resumed and self.step >= total else "")
            + "".join(f"; {note}" for note in self.data_notes)
        ), val_base_model_psnr=base_model_psnr, device=device_name(self.device), batch=cfg.batch_size)
        self._log(start)
        yield start
        if self.out and self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(cfg.model_dump_json(indent=2) + "\n", self.out / "config.json")
        last_metrics: dict[str, Any] = {}
        first_step = self.step
        every = loss_read_every(self.device)
        pending: list[tuple[int, torch.Tensor]] = []
        while self.step < total:
            if self._stop_agreed(every):
                break
            ts = time.monotonic()
            pending.append((self.step + 1, self._train_step(self.step)))
            self.step += 1
            val_due = bool(self.val_items) and self.is_main and (self.step % cfg.val_every == 0 or self.step == total)
            loss = None
            if len(pending) >= every or self.step % every == 0 or self.step == total or val_due or self._stop.is_set():
                loss = self._read_losses(pending)
            self.compute_seconds += time.monotonic() - ts
            ev = TrainEvent("step", self.step, total, loss=loss, lr=lr_at(cfg, self.step - 1), elapsed=time.monotonic() - t0)
            if self.step % 10 == 0 or self.step == total:
                self._log(ev)
            yield ev
            if val_due:
                vp, bp, per = self._validate()
                raw = self._validate(self.model)[0] if self.ema_model is not None else None
                last_metrics = {"psnr": vp, "baseline_psnr": bp, "per_level": per, "step": self.step}
                if raw is not None:
                    last_metrics["raw_psnr"] = raw
                if base_model_psnr is not None:
                    last_metrics["base_model_psnr"] = base_model_psnr
                improved = vp > self.best
                if improved:
                    self.best = vp
                    self.best_path = self._export("best", last_metrics)
                vev = TrainEvent("val", self.step, total, val_psnr=vp, val_baseline_psnr=bp,
                                 val_base_model_psnr=base_model_psnr, val_per_level=per,
                                 best_psnr=self.best, val_raw_psnr=raw, elapsed=time.monotonic() - t0,
                                 path=str(self.best_path) if improved and self.best_path else None)
                self._log(vev)
                yield vev
            due = (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or (
                time.monotonic() - last_ck >= cfg.checkpoint_minutes * 60
            )
            if due and self.out and self.step < total:
                self._read_losses(pending)  # never checkpoint weights that a non-finite loss has spoilt
                p = self._checkpoint()
                last_ck = time.monotonic()
                cev = TrainEvent("checkpoint", self.step, total, elapsed=time.monotonic() - t0, path=str(p) if p else None)
                self._log(cev)
                yield cev
        # end of run (finished or stopped): checkpoint and export; a resume that ran no step leaves the
        # checkpoint as it was (rewriting it would make a finished run look like the newest one)
        self._read_losses(pending)
        kept = self.out / CHECKPOINT_NAME if self.out and self.is_main else None
        p = self._checkpoint() if self.step > first_step or kept is None or not kept.exists() else kept
        if self.out and self.is_main:
            if not self.val_items:
                self.best_path = self._export("best", {"step": self.step, "note": "no validation data"})
            elif self.best_path is None and (self.out / "best.safetensors").exists():
                self.best_path = self.out / "best.safetensors"
            elif self.best_path is None:  # stopped before the first validation: the weights are validated now
                vp, bp, per = self._validate()
                self.best = vp
                self.best_path = self._export("best", {"psnr": vp, "baseline_psnr": bp, "per_level": per, "step": self.step})
            if self.step > first_step or self._last_export_step() != self.step:  # a finished run resumed keeps its card
                self._export("last", last_metrics or {"step": self.step})
        if self.distributed:  # the others wait while the main process checkpoints and exports
            torch.distributed.barrier()
        kind = "stopped" if self.step < total else "done"
        end = TrainEvent(kind, self.step, total, best_psnr=self.best if self.best > -math.inf else None,
                         elapsed=time.monotonic() - t0, path=str(self.best_path) if self.best_path else (str(p) if p else None),
                         message=f"{kind} at step {self.step}/{total}" if self.step <= total else
                         f"{kind}: nothing trained, the run was already at step {self.step}, past {total}")
        self._log(end)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        yield end


@torch.no_grad()
def score_validation(
    model: torch.nn.Module, items: Sequence[ValidationItem], device: torch.device | str = "cpu"
) -> tuple[float, float, dict[str, float]]:
    """Score a model on validation pairs as training validates: ``(mean PSNR, input's PSNR, per level)``.

    Every pair is scored on 8-bit rounded values with its border shaved (``benchmarks/referee.py
    --crop`` uses this to score any checkpoint on the referee photos' crops).
    """
    from .evaluate import psnr

    was_training = model.training
    model.eval()
    ours, base = [], []
    per: dict[str, list[float]] = {}

    def q(a: np.ndarray) -> np.ndarray:
        return np.clip(np.round(a * 255.0), 0, 255)

    for it in items:
        pred = model(torch.from_numpy(it.inp)[None, None].to(device)).float()[0, 0].cpu().numpy()
        p_ours = psnr(q(pred), q(it.target), shave=it.shave)
        ours.append(p_ours)
        base.append(psnr(q(it.inp), q(it.target), shave=it.shave))
        per.setdefault(f"{it.level:g}", []).append(p_ours)
    model.train(was_training)
    return float(np.mean(ours)), float(np.mean(base)), {k: float(np.mean(v)) for k, v in per.items()}


def train(config: TrainConfig, **kwargs: Any) -> Iterator[TrainEvent]:
    """Generator form of :class:`Trainer`: ``for ev in train(cfg): ...``."""
    return Trainer(config, **kwargs).run()
