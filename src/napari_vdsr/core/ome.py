"""TIFF / OME-TIFF metadata: axes and physical pixel sizes in, scaled pixel sizes out.

* :func:`tiff_metadata` reads the axes of a TIFF's first series and its physical
  metadata: OME-XML ``Pixels`` attributes (``PhysicalSizeX/Y/Z`` with units,
  ``TimeIncrement``, channel names), ImageJ metadata (``spacing``, ``unit``...) or
  the resolution tags.
* :func:`scaled_pixel_size` divides the X/Y pixel sizes by the super-resolution
  scale (the physical size of the image is kept); other axes keep their sizes.
* :func:`tiff_write_options` turns that into ``tifffile.imwrite`` keywords for an
  OME-TIFF, ImageJ or plain TIFF output, and :func:`write_tiff_bands` writes a TIFF
  from an iterator of row bands, so that the whole image is never in memory.

No Qt or napari imports.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

__all__ = ["tiff_metadata", "scaled_pixel_size", "tiff_write_options", "write_tiff_bands", "MICRON"]

MICRON = "µm"
_UNIT_ALIASES = {"micron": MICRON, "microns": MICRON, "um": MICRON, "\\u00B5m": MICRON, "µm": MICRON, "μm": MICRON}


def _unit(u: Any) -> Optional[str]:
    if u is None:
        return None
    s = str(u).strip()
    return _UNIT_ALIASES.get(s.lower(), _UNIT_ALIASES.get(s, s)) or None


def _fix_axes(axes: str, shape: Sequence[int]) -> str:
    """Map tifffile's series axes to ``TZCYXS`` letters ('' when it cannot be done)."""
    axes = axes.upper()
    free = [c for c in "ZTC" if c not in axes]
    fixed = []
    for c in axes:
        if c in "TZCYXS":
            fixed.append(c)
        elif free:
            fixed.append(free.pop(0))
        else:
            return ""
    ax = "".join(fixed)
    if not ax or len(set(ax)) != len(ax) or "Y" not in ax or "X" not in ax:
        return ""
    if "S" in ax and shape[ax.index("S")] not in (3, 4):
        ax = ax.replace("S", "C") if "C" not in ax else ""
    return ax


def _ome_pixels(tf: Any) -> dict:
    import tifffile

    try:
        d = tifffile.xml2dict(tf.ome_metadata)
        image = d["OME"]["Image"]
        image = image[0] if isinstance(image, list) else image
        return dict(image.get("Pixels", {}))
    except Exception:  # noqa: BLE001 - malformed OME-XML: keep the pixels, lose the sizes
        return {}


def tiff_metadata(tf: Any, ndim: int) -> dict[str, Any]:
    """Axes and physical metadata of the first series of an open ``tifffile.TiffFile``.

    Returns
    -------
    dict
        ``axes`` (when it maps to ``TZCYXS`` and has ``ndim`` letters), ``ome`` (bool),
        ``pixel_size`` ``{"X": (size, unit), "Y": ..., "Z": ...}``, ``time_increment``
        ``(value, unit)``, ``channel_names``, ``resolution`` ((xres, yres) pixels per unit),
        ``resolutionunit`` and ``imagej`` (the ImageJ metadata dict) when present.
    """
    info: dict[str, Any] = {"ome": bool(getattr(tf, "is_ome", False))}
    try:
        series = tf.series[0]
        ax = _fix_axes(series.axes, series.shape) if len(series.axes) == ndim else ""
        if ax:
            info["axes"] = ax
        page = tf.pages.first if hasattr(tf.pages, "first") else tf.pages[0]
        try:
            info["resolution"] = tuple(float(r) for r in page.get_resolution())
            info["resolutionunit"] = page.resolutionunit
        except Exception:  # noqa: BLE001 - resolution is optional
            pass
        pixel_size: dict[str, tuple[float, Optional[str]]] = {}
        if info["ome"]:
            px = _ome_pixels(tf)
            for c in "XYZ":
                v = px.get(f"PhysicalSize{c}")
                if v is not None and float(v) > 0:
                    pixel_size[c] = (float(v), _unit(px.get(f"PhysicalSize{c}Unit", MICRON)))
            if px.get("TimeIncrement") is not None:
                info["time_increment"] = (float(px["TimeIncrement"]), px.get("TimeIncrementUnit", "s"))
            ch = px.get("Channel")
            chans = ch if isinstance(ch, list) else ([ch] if isinstance(ch, dict) else [])
            names = [c.get("Name") for c in chans if isinstance(c, dict)]
            if names and all(isinstance(n, str) for n in names):
                info["channel_names"] = names
        if tf.is_imagej and tf.imagej_metadata:
            ij = dict(tf.imagej_metadata)
            info["imagej"] = ij
            if not pixel_size:
                unit = _unit(ij.get("unit"))
                res = info.get("resolution")
                if res and unit and all(r > 0 for r in res) and tuple(res) != (1.0, 1.0):
                    pixel_size = {"X": (1.0 / res[0], unit), "Y": (1.0 / res[1], unit)}
                if ij.get("spacing") and unit:
                    pixel_size["Z"] = (float(ij["spacing"]), unit)
            if ij.get("finterval"):
                info.setdefault("time_increment", (float(ij["finterval"]), "s"))
        if not pixel_size and info.get("resolution"):
            res, ru = info["resolution"], int(info.get("resolutionunit") or 1)
            per_um = {2: 25400.0, 3: 10000.0}.get(ru)  # INCH, CENTIMETER in micrometres
            if per_um and all(r > 0 for r in res) and tuple(res) != (1.0, 1.0):
                pixel_size = {"X": (per_um / res[0], MICRON), "Y": (per_um / res[1], MICRON)}
        if pixel_size:
            info["pixel_size"] = pixel_size
    except Exception:  # noqa: BLE001 - metadata is a bonus; the pixels can still be read
        return {"ome": info.get("ome", False)}
    return info


def scaled_pixel_size(pixel_size: Optional[dict], scale: Sequence[float]) -> dict:
    """Pixel sizes after super-resolution by ``scale`` = (sy, sx): X and Y divided, Z kept."""
    sy, sx = float(scale[0]), float(scale[1])
    out = {}
    for c, (v, u) in (pixel_size or {}).items():
        out[c] = (v / sx, u) if c == "X" else (v / sy, u) if c == "Y" else (v, u)
    return out


def tiff_write_options(
    meta: dict, axes: str, scale: Sequence[float], dtype: Any, ome: bool
) -> dict[str, Any]:
    """Keywords for ``tifffile.imwrite`` of a result with ``axes`` restored from an image with ``meta``.

    ``ome=True``: an OME-TIFF whose ``PhysicalSizeX/Y`` are the input's divided by the
    scale (other sizes, the time increment and channel names kept).  Otherwise an
    ImageJ hyperstack when the input was one (and ImageJ can hold the result), else a
    plain TIFF with the axes in its description; both with resolution tags scaled.
    """
    sy, sx = float(scale[0]), float(scale[1])
    dtype = np.dtype(dtype)
    photometric = "rgb" if axes.endswith("S") else "minisblack"
    if ome:
        md: dict[str, Any] = {"axes": axes}
        for c, (v, u) in scaled_pixel_size(meta.get("pixel_size"), (sy, sx)).items():
            md[f"PhysicalSize{c}"] = v
            if u:
                md[f"PhysicalSize{c}Unit"] = u
        if meta.get("time_increment"):
            md["TimeIncrement"], md["TimeIncrementUnit"] = meta["time_increment"]
        names = meta.get("channel_names")
        if names and "C" in axes and "S" not in axes:
            md["Channel"] = {"Name": list(names)}
        return {"ome": True, "metadata": md, "photometric": photometric}
    kw: dict[str, Any] = {}
    res = meta.get("resolution")
    if res and all(r and r > 0 for r in res[:2]):
        # pixels per unit grow with the scale: the physical size of the image is kept
        kw["resolution"] = (float(res[0]) * sx, float(res[1]) * sy)
        if meta.get("resolutionunit") is not None:
            kw["resolutionunit"] = meta["resolutionunit"]
    ij = meta.get("imagej")
    order = [("TZCYXS").index(c) for c in axes]
    if ij is not None and order == sorted(order) and dtype in (np.uint8, np.uint16, np.float32):
        md = {"axes": axes}
        # calibration, display (composite mode, ranges, LUTs), slice labels and notes; the planes keep their
        # number and order, so per-plane labels still fit
        for key in ("spacing", "unit", "finterval", "mode", "loop", "Ranges", "LUTs", "Labels", "Info", "Properties"):
            if key in ij:
                md[key] = ij[key]
        return {"imagej": True, "metadata": md, **kw}
    um = _pixel_size_um(scaled_pixel_size(meta.get("pixel_size"), (sy, sx)))
    unit = str(getattr(meta.get("resolutionunit"), "name", meta.get("resolutionunit"))).upper()
    physical_tags = "resolution" in kw and unit not in ("NONE", "1")  # inch or centimetre: scaled above
    if um is not None and not physical_tags:  # e.g. an OME-TIFF (tags 1/1, no unit) or OME-Zarr as a plain TIFF
        if order == sorted(order) and dtype in (np.uint8, np.uint16, np.float32):  # ImageJ's calibration
            md = {"axes": axes, "unit": "um"}
            if "Z" in um:
                md["spacing"] = um["Z"]
            return {"imagej": True, "metadata": md, "resolution": (1.0 / um["X"], 1.0 / um["Y"])}
        kw["resolution"], kw["resolutionunit"] = (1e4 / um["X"], 1e4 / um["Y"]), "CENTIMETER"
    return {"metadata": {"axes": axes}, "photometric": photometric, **kw}


#: micrometres per unit of the units OME and OME-Zarr name (OME's default, no unit, is µm)
_UM_PER_UNIT = {None: 1.0, "µm": 1.0, "um": 1.0, "micron": 1.0, "micrometer": 1.0, "nm": 1e-3, "nanometer": 1e-3,
                "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4, "m": 1e6, "meter": 1e6}


def _pixel_size_um(pixel_size: dict) -> Optional[dict]:
    """The X, Y (and Z) pixel sizes in µm, or None when X or Y is missing or in a unit not known here."""
    out = {}
    for c, (v, u) in pixel_size.items():
        if u in _UM_PER_UNIT and v and v > 0:
            out[c] = float(v) * _UM_PER_UNIT[u]
    return out if "X" in out and "Y" in out else None


def write_tiff_bands(
    path: str | os.PathLike,
    bands: Iterable[np.ndarray],
    shape: Sequence[int],
    dtype: Any,
    options: dict,
    rowsperstrip: Optional[int] = None,
) -> Path:
    """Write a TIFF of ``shape`` from ``bands``: row bands of each page, pages in C order.

    Every band is a ``(rows, width[, samples])`` array; the bands of one page follow
    each other from top to bottom.  Only one band is in memory at a time.  BigTIFF is
    used when the data need it; ``rowsperstrip`` (e.g. the band height) sets the strips.
    """
    import tifffile

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    opts = dict(options)
    if nbytes > 2**32 - 2**25 and not opts.get("imagej"):
        opts.setdefault("bigtiff", True)
    if rowsperstrip:
        opts.setdefault("rowsperstrip", int(rowsperstrip))
    tifffile.imwrite(p, iter(bands), shape=tuple(int(s) for s in shape), dtype=np.dtype(dtype), **opts)
    return p
