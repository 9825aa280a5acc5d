"""napari-vdsr: VDSR super-resolution, denoising and JPEG artifact removal.

The headless API lives in :mod:`napari_vdsr.core` (no Qt, no napari imports);
the napari widgets in :mod:`napari_vdsr._widgets`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .core.errors import InputError, ModelError, TrainingError, VDSRError
from .core.model import VDSR
from .core.restore import restore, restore_iter
from .core.train import TrainConfig, TrainEvent, Trainer, train
from .core.weights import list_models, load_model, register_model, save_model

__all__ = [
    "VDSR",
    "restore",
    "restore_iter",
    "TrainConfig",
    "TrainEvent",
    "Trainer",
    "train",
    "load_model",
    "save_model",
    "list_models",
    "register_model",
    "VDSRError",
    "InputError",
    "ModelError",
    "TrainingError",
]
