"""napari widgets (magicgui): thin front-ends over :mod:`napari_vdsr.core`.

``refresh_model_choices()`` re-reads the model lists of all open restore
widgets; call it after registering a new model (e.g. after fine-tuning).
"""

from __future__ import annotations

from ._finetune import FinetuneWidget
from ._restore import (
    DeblockWidget,
    DenoiseWidget,
    RestoreWidget,
    SuperResolveWidget,
    refresh_model_choices,
)

__all__ = [
    "RestoreWidget",
    "SuperResolveWidget",
    "DenoiseWidget",
    "DeblockWidget",
    "FinetuneWidget",
    "refresh_model_choices",
]
