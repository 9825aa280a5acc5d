"""Fine-tuning a (bundled) model on the user's own images: one entry point for the CLI and the widget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .data import Plane, load_pairs, load_planes, planes_from_array
from .errors import TrainingError
from .memory import check_fits
from .train import CHECKPOINT_NAME, TrainConfig, Trainer
from .weights import TASK_LABELS, default_model_name, load_model, resolve_model_path

__all__ = ["FINETUNE_DEFAULTS", "make_finetune_trainer"]

#: Defaults that suit a few minutes of CPU fine-tuning of a bundled model.
FINETUNE_DEFAULTS: dict[str, Any] = dict(
    iterations=300, batch_size=16, patch_size=41, optimizer="adam", lr=5e-5, lr_schedule="cosine",
    lr_gamma=0.1, clip_theta=None, weight_decay=0.0, val_fraction=0.2, val_every=50, val_crop=128,
)


def _is_path(x: Any) -> bool:
    return isinstance(x, str) or hasattr(x, "__fspath__")


def _as_lists(images: Any, pairs: Any, scales: Any) -> tuple[list, list, list[float]]:
    """The API's arguments as lists: one image (an array or a path) instead of a sequence of them,
    one (degraded, clean) pair instead of a list of pairs, one scale instead of a list."""
    if images is None:
        images = []
    elif isinstance(images, np.ndarray) or _is_path(images) or hasattr(images, "__array__"):
        images = [images]
    if pairs is None:
        pairs = []
    elif isinstance(pairs, tuple) and len(pairs) == 2 and all(
            _is_path(x) or isinstance(x, np.ndarray) or hasattr(x, "__array__") for x in pairs):
        pairs = [pairs]
    pairs = list(pairs)
    for i, pair in enumerate(pairs):
        if _is_path(pair) or isinstance(pair, np.ndarray) or len(pair) != 2:
            raise TrainingError(f"pairs[{i}] is not a (degraded, clean) pair; give pairs=[(degraded, clean), ...] "
                                "with two arrays or two image paths each.")
    scales = [scales] if isinstance(scales, (int, float, np.number)) else list(scales)
    return list(images), pairs, [float(x) for x in scales]


def _saved_data(out: Optional[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The image files a fine-tune in ``out`` recorded (config.json ``data`` / ``pair_data``), for a resume
    without them: ``(images, pairs)``, one of them empty.

    Raises :class:`TrainingError` when the run recorded none (it trained on arrays, e.g. napari
    layers) or is not there, or when a recorded file is gone.
    """
    cfg = _saved_config(out)
    data = [str(d) for d in cfg.get("data") or []]
    pairs = [(str(p[0]), str(p[1])) for p in cfg.get("pair_data") or [] if isinstance(p, (list, tuple)) and len(p) == 2]
    if not data and not pairs:
        raise TrainingError(f"the run in {out} did not record image files (it trained on arrays, or it is not "
                            "there): give the images again (--images, or --pairs DEGRADED CLEAN) to resume it.")
    files = data + [f for p in pairs for f in p]
    missing = [d for d in files if not any(ch in d for ch in "*?[") and not Path(d).exists()]
    if missing:
        again = "--pairs DEGRADED CLEAN" if pairs else "--images"
        raise TrainingError(f"the run in {out} trained on {', '.join(missing)}, which no longer exist(s); give the "
                            f"images again ({again}) to resume it.")
    return (data, []) if data else ([], pairs)


def _saved_config(out: Optional[str]) -> dict[str, Any]:
    """The recipe (config.json) of the run in ``out``; empty when there is none or it cannot be read."""
    try:
        cfg = json.loads((Path(out) / "config.json").read_text()) if out else {}
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _saved_scales(out: Optional[str]) -> Optional[list[float]]:
    """The SR factors a run in ``out`` was fine-tuned for (its config.json); None when it has none."""
    try:
        return [float(v) for v in _saved_config(out)["scales"]]
    except (TypeError, ValueError, KeyError):
        return None


def _saved_run(out: Optional[str], task: str, base_model: Optional[str]) -> Optional[tuple[str, dict, dict]]:
    """What a fine-tune resumed in ``out`` started from: (init_from, architecture, finetuned_from).

    None when ``out`` holds no checkpoint (nothing to resume: a fresh start).  The run's own
    record decides, so ``--resume`` cannot relabel it: another task, or another ``--from`` than
    the one it started from, is refused.
    """
    if not out or not (Path(out) / CHECKPOINT_NAME).is_file():
        return None
    run = Path(out)
    try:
        cfg = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return None  # an older run without its recipe: the command line describes it, as before
    saved_task = cfg.get("task")
    if saved_task in TASK_LABELS and saved_task != task:
        raise TrainingError(
            f"the run in {run} fine-tunes for {TASK_LABELS[saved_task]}, not {TASK_LABELS[task]}; resume it with "
            f"--task {saved_task}, or fine-tune for {task} into a new --out folder.")
    init_from = cfg.get("init_from") or ""
    if base_model and init_from:
        try:
            given = resolve_model_path(base_model).resolve()
        except Exception:  # a base that no longer resolves cannot contradict the run's record
            given = None
        if given is not None and given != Path(init_from).resolve():
            raise TrainingError(
                f"the run in {run} started from {init_from}, not {given}; leave out --from to resume it (the run "
                "goes on from its checkpoint), or fine-tune from the other model into a new --out folder.")
    finetuned_from: dict[str, Any] = {"model": init_from, "path": init_from, "name": None}
    for card_name in ("last.json", "best.json"):
        try:
            earlier = json.loads((run / card_name).read_text()).get("finetuned_from")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(earlier, dict):
            finetuned_from = earlier
            break
    arch = {"depth": cfg.get("depth", 20), "width": cfg.get("width", 64)}
    return init_from, arch, finetuned_from


def _check_arrays_fit(arrays: Sequence[Any]) -> None:
    """Refuse layers (numpy, dask, zarr) that would not fit in memory once read whole and kept as float32."""
    need = sum(int(np.prod(np.shape(a), dtype=np.int64)) * (np.dtype(getattr(a, "dtype", np.float64)).itemsize + 8)
               for a in arrays)
    check_fits(need, f"reading the {len(arrays)} image(s) to fine-tune on",
               "fine-tune on a crop or a few planes of them: training draws small patches (41 px), so a few "
               "megapixels of representative images are plenty.")


def make_finetune_trainer(
    task: str,
    images: Optional[Sequence[Any]] = None,
    pairs: Optional[Sequence[tuple[Any, Any]]] = None,
    base_model: Optional[str] = None,
    scales: Optional[Sequence[float]] = None,
    out: Optional[str] = None,
    name: str = "finetuned",
    resume: bool = False,
    **overrides: Any,
) -> Trainer:
    """Build a :class:`Trainer` that fine-tunes ``base_model`` (default: bundled model for ``task``).

    Parameters
    ----------
    images : array or path, or a sequence of them
        Clean images or stacks; degradations are synthesised for ``task``.
    pairs : (degraded, clean), or a sequence of such pairs
        Registered pairs (arrays or image paths) for paired training (used instead of ``images``).
    scales : float or sequence of floats
        SR factors to train (SR only); default 2, or on ``resume`` the run's own.
    resume : bool
        Continue the run in ``out`` from its checkpoint; without it a folder that holds a run is refused.
    overrides
        Any :class:`TrainConfig` field (iterations, batch_size, lr, clip_theta, device, ...).
    """
    if task not in TASK_LABELS:
        raise TrainingError(f"unknown task {task!r}; choose sr, denoise or deblock.")
    if scales is None:
        scales = (_saved_scales(out) if resume else None) or (2.0,)
    images, pairs, scales = _as_lists(images, pairs, scales)
    if resume and not images and not pairs:  # the image files the run recorded (config.json data / pair_data)
        images, pairs = _saved_data(out)
    if not images and not pairs:
        raise TrainingError("give clean images (or a degraded/clean pair) to fine-tune on.")
    saved = _saved_run(out, task, base_model) if resume else None
    if saved is not None:  # the run goes on from its checkpoint: the base model file is not needed again
        init_from, arch, finetuned_from = saved
    else:
        base = base_model or default_model_name(task)
        _, card = load_model(base, task=None)
        if task not in card.get("tasks", []):
            raise TrainingError(
                f"the base model {base!r} was trained for {', '.join(card.get('tasks', []))}, not "
                f"{TASK_LABELS[task]}; choose a {task} model as the starting point."
            )
        init_from, arch = str(card["path"]), card.get("architecture", {})
        finetuned_from = {"model": str(base), "path": card["path"], "name": card.get("name")}
    params = dict(FINETUNE_DEFAULTS)
    params.update({k: v for k, v in overrides.items() if v is not None})
    # the image files are recorded (config.json), so that --resume can read them again; arrays cannot be
    files = [str(Path(x).resolve()) for x in images if _is_path(x)] if not pairs else []
    params.setdefault("data", files)
    if pairs and all(_is_path(x) for pair in pairs for x in pair):  # pairs given as arrays cannot be recorded
        params.setdefault("pair_data", [(str(Path(d).resolve()), str(Path(c).resolve())) for d, c in pairs])
    cfg = TrainConfig(task=task, scales=[float(s) for s in scales], init_from=init_from, out=out, name=name,
                      depth=arch.get("depth", 20), width=arch.get("width", 64), quantize=False, **params)
    extra = {"finetuned_from": finetuned_from, "default_for": []}
    if pairs:
        _check_arrays_fit([x for pair in pairs for x in pair if not _is_path(x)])
        return Trainer(cfg, pairs=load_pairs(pairs, task=task, scales=scales), card_extra=extra, resume=resume)
    planes: list[Plane] = []
    is_path = [_is_path(x) for x in images]
    paths = [x for x, p in zip(images, is_path) if p]
    arrays = [x for x, p in zip(images, is_path) if not p]
    _check_arrays_fit(arrays)
    if paths:
        planes.extend(load_planes(paths))
    for i, a in enumerate(arrays):
        planes.extend(planes_from_array(np.asarray(a), name=f"layer{i}"))
    return Trainer(cfg, planes=planes, card_extra=extra, resume=resume)
