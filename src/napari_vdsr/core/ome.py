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
* :func:`ngff_axes`, :func:`ngff_attributes`, :func:`create_ngff` and :func:`to_ngff_block`
  write a result as a one-level OME-Zarr (NGFF 0.4) image, block by block.

No Qt or napari imports.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

__all__ = ["tiff_metadata", "scaled_pixel_size", "tiff_write_options", "write_tiff_bands", "MICRON", "ngff_axes",
           "ngff_attributes", "create_ngff", "to_ngff_block"]

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
    guessed = False
    for c in axes:
        if c in "TZCYXS":
            fixed.append(c)
        elif free:
            fixed.append(free.pop(0))
            guessed = True
        else:
            return ""
    ax = "".join(fixed)
    if not ax or len(set(ax)) != len(ax) or "Y" not in ax or "X" not in ax:
        return ""
    if guessed and shape[ax.index("X")] <= 4:
        # tifffile's unknown axis (Q) before 'Y X' of an image 1-4 px wide: most likely an array saved
        # channels last, (Y, X, C); leave it to the shape guess, which asks for the axes
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


def scaled_origin(origin: Optional[dict], pixel_size: Optional[dict], scale: Sequence[float]) -> dict:
    """Physical position of a result's first pixel centre (``{"Y": value, ...}``) after super-resolution.

    ``origin`` and ``pixel_size`` are the input's (``meta["origin"]``, ``meta["pixel_size"]``; a missing
    origin counts as 0).  A result ``s`` times larger along an axis has its pixel ``j`` centred at input
    pixel ``(j + 0.5) / s - 0.5``, so its first centre moves by ``size * (1 / s - 1) / 2`` and the result
    overlays its input.  An axis without a pixel size is not moved: its result has no scale to overlay
    with (scale 1, as the input's).  Other axes keep their origin; axes whose origin is 0 are left out.
    """
    sy, sx = float(scale[0]), float(scale[1])
    out = {c: float(v) for c, v in (origin or {}).items()}
    for c, s in (("Y", sy), ("X", sx)):
        size = (pixel_size or {}).get(c, (None, None))[0]
        if s != 1.0 and size:
            out[c] = out.get(c, 0.0) + float(size) * (1.0 / s - 1.0) / 2.0
    return {c: v for c, v in out.items() if v != 0.0}


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


# --------------------------------------------------------------------------- OME-Zarr (NGFF 0.4) output

#: axis order NGFF 0.4 requires: time, channel, then space
_NGFF_ORDER = "TCZYX"
_NGFF_TYPES = {"T": "time", "C": "channel", "Z": "space", "Y": "space", "X": "space"}
#: units in the spellings that NGFF (UDUNITS-2 names) takes
_NGFF_SPACE_UNITS = {"µm": "micrometer", "um": "micrometer", "micron": "micrometer", "micrometer": "micrometer",
                     "nm": "nanometer", "nanometer": "nanometer", "mm": "millimeter", "millimeter": "millimeter",
                     "cm": "centimeter", "centimeter": "centimeter", "m": "meter", "meter": "meter",
                     "pm": "picometer", "picometer": "picometer", "å": "angstrom", "angstrom": "angstrom",
                     "inch": "inch", "in": "inch"}
#: NGFF's time units and the OME-XML symbols of the same units
TIME_SYMBOLS = {"second": "s", "millisecond": "ms", "microsecond": "µs", "minute": "min", "hour": "h"}
_NGFF_TIME_UNITS = {**{sym: name for name, sym in TIME_SYMBOLS.items()}, **{name: name for name in TIME_SYMBOLS},
                    "sec": "second", "us": "microsecond"}


def ngff_axes(axes: str) -> str:
    """The axes of an OME-Zarr (NGFF 0.4) copy of an array with ``axes``: in T, C, Z, Y, X order.

    RGB samples (``S``) become the channel axis.  Raises ``InputError`` for an array with both
    channels and RGB samples, which NGFF cannot hold.
    """
    from .errors import InputError

    if "S" in axes and "C" in axes:
        raise InputError(f"an OME-Zarr image has one channel axis, and this result ({axes}) has channels and RGB "
                         "samples; use --format zarr or tif.")
    letters = axes.replace("S", "C")
    return "".join(c for c in _NGFF_ORDER if c in letters)


def _ngff_unit(c: str, u: Any) -> Optional[str]:
    if u is None:
        return None
    s = _unit(u)
    table = _NGFF_TIME_UNITS if c == "T" else _NGFF_SPACE_UNITS if c in "ZYX" else {}
    return table.get(str(s).lower()) or table.get(str(s))


def ngff_attributes(axes: str, pixel_size: Optional[dict], name: str, path: str = "0",
                    origin: Optional[dict] = None) -> dict[str, Any]:
    """Group attributes of a one-level OME-Zarr (NGFF 0.4) image whose array ``path`` has ``axes`` (NGFF order).

    ``pixel_size`` maps axis letters to ``(size, unit)``; axes without a size get scale 1
    and no unit, and units NGFF does not name are left out.  ``origin`` maps axis letters to the
    first pixel's physical position (see :func:`scaled_origin`); when any is not 0 the dataset gets a
    ``translation`` after its ``scale``.
    """
    described, scale = [], []
    for c in axes:
        v, u = (pixel_size or {}).get(c, (None, None))
        d: dict[str, Any] = {"name": c.lower(), "type": _NGFF_TYPES[c]}
        unit = _ngff_unit(c, u) if v else None
        if unit:
            d["unit"] = unit
        described.append(d)
        scale.append(float(v) if v and float(v) > 0 else 1.0)
    transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
    translation = [float((origin or {}).get(c, 0.0)) for c in axes]
    if any(translation):
        transforms.append({"type": "translation", "translation": translation})
    return {"multiscales": [{
        "version": "0.4",
        "name": name,
        "axes": described,
        "datasets": [{"path": path, "coordinateTransformations": transforms}],
    }]}


def create_ngff(path: str | os.PathLike, axes: str, shape: Sequence[int], chunks: Sequence[int], dtype: Any,
                attributes: dict[str, Any]) -> Any:
    """Create an OME-Zarr (NGFF 0.4: zarr format 2, '/' chunk keys) group at ``path``; return its array "0"."""
    import zarr

    kw: dict[str, Any] = {"shape": tuple(int(s) for s in shape), "chunks": tuple(int(c) for c in chunks),
                          "dtype": np.dtype(dtype)}
    if int(zarr.__version__.split(".")[0]) >= 3:
        group = zarr.open_group(str(path), mode="w-", zarr_format=2)
        array = group.create_array("0", chunk_key_encoding={"name": "v2", "separator": "/"}, **kw)
    else:  # zarr 2 writes format 2 only
        group = zarr.open_group(str(path), mode="w-")
        array = group.create_dataset("0", dimension_separator="/", **kw)
    group.attrs.update(attributes)
    return array


def to_ngff_block(index: tuple, data: np.ndarray, axes: str, out_axes: str) -> tuple[tuple, np.ndarray]:
    """A result block at ``index`` of an array with ``axes`` → the same block of its NGFF copy (``out_axes``)."""
    full, shape = [], []
    it = iter(data.shape)
    for ix in index:
        if isinstance(ix, (int, np.integer)):
            full.append(slice(int(ix), int(ix) + 1))
            shape.append(1)
        else:
            full.append(ix)
            shape.append(next(it))
    letters = axes.replace("S", "C")
    perm = [letters.index(c) for c in out_axes]
    return tuple(full[i] for i in perm), np.transpose(data.reshape(shape), perm)
