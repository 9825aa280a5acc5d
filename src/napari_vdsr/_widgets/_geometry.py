"""Where a restored layer goes in world coordinates, and what it inherits from its input layer.

Pure functions over plain values (no Qt); napari is imported lazily only for
its transform composition, so the maths is exactly the one napari uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["LayerSnapshot", "overlay_transform", "output_layer_kwargs"]


@dataclass
class LayerSnapshot:
    """What a restored layer needs from its input layer, captured when the job starts.

    Taking a snapshot means the job is unaffected if the user edits or deletes the
    input layer while the worker runs.
    """

    name: str
    ndim: int  # napari layer ndim (without the RGB samples axis)
    rgb: bool
    shape: tuple[int, ...]  # data shape (level 0 for multiscale), RGB samples axis included
    scale: np.ndarray
    translate: np.ndarray
    rotate: np.ndarray
    shear: np.ndarray
    affine: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    colormap: Any = None
    contrast_limits: Optional[list[float]] = None
    gamma: float = 1.0
    opacity: float = 1.0
    blending: str = "translucent"
    units: Optional[tuple] = None
    axis_labels: Optional[tuple] = None

    @classmethod
    def of(cls, layer: Any) -> "LayerSnapshot":
        """Snapshot a napari ``Image`` layer."""
        data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
        return cls(
            name=str(layer.name),
            ndim=int(layer.ndim),
            rgb=bool(layer.rgb),
            shape=tuple(int(s) for s in data.shape),
            scale=np.array(layer.scale, dtype=float),
            translate=np.array(layer.translate, dtype=float),
            rotate=np.array(layer.rotate, dtype=float),
            shear=np.array(layer.shear, dtype=float),
            affine=np.array(layer.affine.affine_matrix, dtype=float),
            metadata=dict(layer.metadata),
            colormap=None if layer.rgb else layer.colormap,
            contrast_limits=[float(v) for v in layer.contrast_limits],  # RGB too: napari applies them to colours
            gamma=float(layer.gamma),
            opacity=float(layer.opacity),
            blending=str(getattr(layer.blending, "value", layer.blending)),
            units=tuple(layer.units) if hasattr(layer, "units") else None,
            axis_labels=tuple(layer.axis_labels) if hasattr(layer, "axis_labels") else None,
        )

    @property
    def plane_shape(self) -> tuple[int, int]:
        """(H, W) of one image plane."""
        yx = self.shape[self.ndim - 2 : self.ndim]
        return int(yx[0]), int(yx[1])

    @property
    def lead_shape(self) -> tuple[int, ...]:
        """Sizes of the axes in front of the plane (Z, T, ...)."""
        return self.shape[: self.ndim - 2]


def overlay_transform(
    scale: Sequence[float],
    translate: Sequence[float],
    factors: Sequence[float],
    rotate: Any = None,
    shear: Any = None,
    lead_offset: Optional[Sequence[float]] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``scale`` and ``translate`` of an output layer that overlays its input exactly.

    Input pixel ``i`` covers data coordinates ``[i - 0.5, i + 0.5]``.  An output
    made ``f`` times larger along Y or X (``factors = (fy, fx)``, the ratio of the
    output to the input plane size) has its pixel ``j`` centred at input data
    coordinate ``(j + 0.5) / f - 0.5``.  With napari's data-to-world map
    ``w = R Sh S x + t`` the output therefore gets ``S' = S diag(1/f)`` and
    ``t' = t + R Sh S o``, ``o = (lead_offset, 0.5/fy - 0.5, 0.5/fx - 0.5)``;
    ``rotate``, ``shear`` and ``affine`` are copied unchanged.

    Parameters
    ----------
    scale, translate : sequence of float
        The input layer's ``scale`` and ``translate`` (length ``ndim``; Y, X last).
    factors : (float, float)
        Output/input size ratio along Y and X (1 for denoising and deblocking).
    rotate, shear : optional
        The input layer's ``rotate`` matrix and ``shear`` (default: none).
    lead_offset : sequence of float, optional
        Index of the output's first element along the leading axes in the input,
        e.g. the plane index when only the current plane was restored.

    Returns
    -------
    (scale, translate) : tuple of ndarray
    """
    from napari.utils.transforms import CompositeAffine

    scale = np.asarray(scale, dtype=float)
    translate = np.asarray(translate, dtype=float)
    n = scale.size
    fy, fx = (float(f) for f in factors)
    o = np.zeros(n)
    if lead_offset is not None:
        o[: n - 2] = np.asarray(lead_offset, dtype=float)
    o[n - 2] = 0.5 / fy - 0.5
    o[n - 1] = 0.5 / fx - 0.5
    kw: dict[str, Any] = {"ndim": n}
    if rotate is not None:
        kw["rotate"] = rotate
    if shear is not None:
        kw["shear"] = shear
    linear = CompositeAffine(scale=scale, **kw).linear_matrix
    new_scale = scale.copy()
    new_scale[n - 2] /= fy
    new_scale[n - 1] /= fx
    return new_scale, translate + linear @ o


def output_layer_kwargs(
    src: LayerSnapshot,
    out_shape: Sequence[int],
    name: str,
    lead_offset: Optional[Sequence[int]] = None,
    extra_metadata: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Keyword arguments for ``viewer.add_image`` of a result derived from ``src``.

    ``out_shape`` is the result's data shape (same axes as the input; for a
    single restored plane the leading axes have length 1 and ``lead_offset``
    gives the plane's index, so the layer sits at that plane in world space).
    The input's contrast limits are kept (RGB layers' too); colormap, blending, gamma,
    opacity, rotation, shear, affine, units, axis labels and metadata are carried.
    """
    oh, ow = int(out_shape[src.ndim - 2]), int(out_shape[src.ndim - 1])
    h, w = src.plane_shape
    scale, translate = overlay_transform(
        src.scale, src.translate, (oh / h, ow / w), rotate=src.rotate, shear=src.shear, lead_offset=lead_offset
    )
    meta = dict(src.metadata)
    if extra_metadata:
        meta["napari_vdsr"] = dict(extra_metadata)
    kw: dict[str, Any] = {
        "name": name,
        "scale": scale,
        "translate": translate,
        "rotate": src.rotate,
        "shear": src.shear,
        "affine": src.affine,
        "metadata": meta,
        "rgb": src.rgb,
        "opacity": src.opacity,
        "blending": src.blending,
    }
    if not src.rgb:
        kw["colormap"] = src.colormap
        kw["gamma"] = src.gamma
    if src.contrast_limits is not None and src.contrast_limits[1] > src.contrast_limits[0]:
        kw["contrast_limits"] = list(src.contrast_limits)
    if src.units is not None:
        kw["units"] = src.units
    if src.axis_labels is not None:
        kw["axis_labels"] = src.axis_labels
    return kw
