"""Fine-tuning a (bundled) model on the user's own images: one entry point for the CLI and the widget."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from .data import Plane, load_planes, planes_from_array, planes_from_pair
from .errors import TrainingError
from .train import TrainConfig, Trainer
from .weights import TASK_LABELS, default_model_name, load_model

__all__ = ["FINETUNE_DEFAULTS", "make_finetune_trainer"]

#: Defaults that suit a few minutes of CPU fine-tuning of a bundled model.
FINETUNE_DEFAULTS: dict[str, Any] = dict(
    iterations=300, batch_size=16, patch_size=41, optimizer="adam", lr=5e-5, lr_schedule="cosine",
    lr_gamma=0.1, clip_theta=None, weight_decay=0.0, val_fraction=0.2, val_every=50, val_crop=128,
)


def make_finetune_trainer(
    task: str,
    images: Optional[Sequence[Any]] = None,
    pairs: Optional[Sequence[tuple[Any, Any]]] = None,
    base_model: Optional[str] = None,
    scales: Sequence[float] = (2.0,),
    out: Optional[str] = None,
    name: str = "finetuned",
    **overrides: Any,
) -> Trainer:
    """Build a :class:`Trainer` that fine-tunes ``base_model`` (default: bundled model for ``task``).

    Parameters
    ----------
    images : sequence of arrays or paths
        Clean images or stacks; degradations are synthesised for ``task``.
    pairs : sequence of (degraded, clean)
        Registered pairs for paired training (used instead of ``images``).
    overrides
        Any :class:`TrainConfig` field (iterations, batch_size, lr, clip_theta, device, ...).
    """
    if task not in TASK_LABELS:
        raise TrainingError(f"unknown task {task!r}; choose sr, denoise or deblock.")
    if not images and not pairs:
        raise TrainingError("give clean images (or a degraded/clean pair) to fine-tune on.")
    base = base_model or default_model_name(task)
    _, card = load_model(base, task=None)
    if task not in card.get("tasks", []):
        raise TrainingError(
            f"the base model {base!r} was trained for {', '.join(card.get('tasks', []))}, not {TASK_LABELS[task]}; "
            f"choose a {task} model as the starting point."
        )
    arch = card.get("architecture", {})
    params = dict(FINETUNE_DEFAULTS)
    params.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(task=task, scales=[float(s) for s in scales], init_from=str(card["path"]), out=out, name=name,
                      depth=arch.get("depth", 20), width=arch.get("width", 64), quantize=False, **params)
    extra = {"finetuned_from": {"model": str(base), "path": card["path"], "name": card.get("name")},
             "default_for": []}
    if pairs:
        pl: list[tuple[Plane, Plane]] = []
        for i, (d, c) in enumerate(pairs):
            pl.extend(planes_from_pair(np.asarray(d), np.asarray(c), task=task, name=f"pair{i}", scales=scales))
        return Trainer(cfg, pairs=pl, card_extra=extra)
    planes: list[Plane] = []
    is_path = [isinstance(x, str) or hasattr(x, "__fspath__") for x in images]
    paths = [x for x, p in zip(images, is_path) if p]
    arrays = [x for x, p in zip(images, is_path) if not p]
    if paths:
        planes.extend(load_planes(paths))
    for i, a in enumerate(arrays):
        planes.extend(planes_from_array(np.asarray(a), name=f"layer{i}"))
    return Trainer(cfg, planes=planes, card_extra=extra)
