"""Exceptions raised by napari-vdsr with messages meant for users."""

from __future__ import annotations

__all__ = ["VDSRError", "InputError", "ModelError", "TrainingError", "Diverged", "Cancelled"]


class VDSRError(ValueError):
    """Base class of every error napari-vdsr raises on purpose."""


class InputError(VDSRError):
    """The image, axes or parameters given cannot be processed; the message says how to fix it."""


class ModelError(VDSRError):
    """A model file or name cannot be used (missing, corrupt, not a model, wrong task)."""


class TrainingError(VDSRError):
    """Training cannot start or cannot continue (bad data, non-finite loss, ...)."""


class Diverged(TrainingError):
    """The training loss became NaN or infinite; ``step`` and ``lr`` say where."""

    def __init__(self, message: str, step: int, lr: float) -> None:
        super().__init__(message)
        self.step, self.lr = step, lr


class Cancelled(VDSRError):
    """The user stopped a running job (e.g. a stop event was set); no result was produced."""
