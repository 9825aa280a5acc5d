"""Reading and writing image files: TIFF / OME-TIFF (tifffile), PNG/JPG (Pillow), ``.npy``, zarr.

Two ways in:

* :func:`read_image` reads a whole file into a numpy array (training data, small images);
* :func:`open_image` opens it *lazily* as an :class:`ImageSource`: an array-like whose
  regions are read on demand (uncompressed TIFF and ``.npy`` through :class:`RawArray`,
  compressed or tiled TIFF through tifffile's zarr interface, zarr stores directly),
  plus the axes and physical pixel sizes found in the file.  Only PNG/JPG/BMP files
  are read whole (they are small by nature).

:class:`RawArray` reads and writes regions of a C-order array stored raw in a file
with ``pread``/``pwrite`` -- no memory mapping, so the resident memory of a process
that streams a large file through it stays bounded.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .errors import InputError

__all__ = [
    "IMAGE_SUFFIXES",
    "COMPOUND_SUFFIXES",
    "read_image",
    "write_image",
    "expand_inputs",
    "split_suffix",
    "is_zarr",
    "RawArray",
    "create_npy",
    "ImageSource",
    "open_image",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy", ".zarr"}
#: Suffixes of two parts that name one format (the output keeps them whole).
COMPOUND_SUFFIXES = (".ome.tif", ".ome.tiff", ".ome.zarr")


def split_suffix(path: str | os.PathLike) -> tuple[str, str]:
    """``("name", ".ome.tif")`` for ``name.ome.tif``; ``("name", ".png")`` for ``name.png``."""
    name = Path(path).name
    low = name.lower()
    for suf in COMPOUND_SUFFIXES:
        if low.endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)], name[-len(suf) :]
    p = Path(name)
    return p.stem, p.suffix


def is_zarr(path: str | os.PathLike) -> bool:
    """True for a directory that is a zarr store (v2 or v3, array or group)."""
    p = Path(path)
    return p.is_dir() and any((p / m).is_file() for m in ("zarr.json", ".zarray", ".zgroup"))


# --------------------------------------------------------------------------- raw arrays


class RawArray:
    """A C-order array stored raw at ``offset`` in a file; regions are read and written on demand.

    Supports ``shape``, ``dtype``, ``ndim`` and indexing with integers and step-1
    slices (``a[2, 10:20, :]``), for reading and (``mode="r+"``) writing.  Each access
    reads or writes the contiguous runs it covers with ``os.pread``/``os.pwrite``.
    The file's byte order is converted to the native one on reading.

    Parameters
    ----------
    path : path
        The file.
    offset : int
        Byte offset of the first element.
    shape : tuple of int
    dtype : numpy dtype
        As stored (may be big-endian).
    mode : {"r", "r+"}
    """

    def __init__(self, path: str | os.PathLike, offset: int, shape: Sequence[int], dtype: Any, mode: str = "r") -> None:
        self.path = Path(path)
        self.offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.file_dtype = np.dtype(dtype)
        self.dtype = self.file_dtype.newbyteorder("=")
        self.mode = mode
        self._fd: Optional[int] = os.open(self.path, os.O_RDONLY if mode == "r" else os.O_RDWR)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # noqa: D105
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self) -> "RawArray":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[tuple(slice(None) for _ in self.shape)]
        return a if dtype is None else a.astype(dtype)

    def _ranges(self, key: Any) -> tuple[list[tuple[int, int]], list[bool]]:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
        if len(key) != self.ndim:
            raise IndexError(f"too many indices for a {self.ndim}-D array")
        ranges, keep = [], []
        for k, n in zip(key, self.shape):
            if isinstance(k, slice):
                a, b, step = k.indices(n)
                if step != 1:
                    raise IndexError("RawArray supports slices with step 1 only")
                ranges.append((a, max(a, b)))
                keep.append(True)
            else:
                i = int(k)
                if i < 0:
                    i += n
                if not 0 <= i < n:
                    raise IndexError(f"index {k} is out of bounds for an axis of size {n}")
                ranges.append((i, i + 1))
                keep.append(False)
        return ranges, keep

    def _runs(self, ranges: list[tuple[int, int]]):
        """Yield (position in the selection, byte offset, byte count) of contiguous runs."""
        shape = self.shape
        # trailing axes selected whole join the run of the last partially selected axis
        k = self.ndim - 1
        while k > 0 and ranges[k] == (0, shape[k]):
            k -= 1
        run_elems = (ranges[k][1] - ranges[k][0]) * int(np.prod(shape[k + 1 :], dtype=np.int64))
        strides = [int(np.prod(shape[i + 1 :], dtype=np.int64)) for i in range(self.ndim)]
        isz = self.file_dtype.itemsize
        outer = [range(a, b) for a, b in ranges[:k]]
        for n, idx in enumerate(np.ndindex(*[len(r) for r in outer]) if outer else [()]):
            flat = sum((outer[i][j]) * strides[i] for i, j in enumerate(idx)) + ranges[k][0] * strides[k]
            yield n, self.offset + flat * isz, run_elems * isz

    def __getitem__(self, key: Any) -> np.ndarray:
        if self._fd is None:
            raise ValueError(f"{self.path}: the file is closed")
        ranges, keep = self._ranges(key)
        sel_shape = [b - a for a, b in ranges]
        out = np.empty(sel_shape, dtype=self.file_dtype)
        if out.size:
            buf = out.reshape(-1).view(np.uint8)
            pos = 0
            for _, off, nbytes in self._runs(ranges):
                if _pread_into(self._fd, buf[pos : pos + nbytes], off) != nbytes:
                    raise InputError(f"{self.path}: the file is truncated (expected {nbytes} bytes at {off}).")
                pos += nbytes
        out = out.reshape([s for s, kp in zip(sel_shape, keep) if kp])
        return out.astype(self.dtype, copy=False) if self.file_dtype != self.dtype else out

    def __setitem__(self, key: Any, value: Any) -> None:
        if self.mode == "r":
            raise ValueError(f"{self.path} was opened read-only")
        ranges, keep = self._ranges(key)
        sel_shape = [b - a for a, b in ranges]
        val = np.asarray(value, dtype=self.file_dtype)
        val = np.ascontiguousarray(np.broadcast_to(val.reshape([s for s, kp in zip(sel_shape, keep) if kp])
                                                   if val.ndim else val, [s for s, kp in zip(sel_shape, keep) if kp]))
        buf = val.reshape(-1).view(np.uint8)
        pos = 0
        for _, off, nbytes in self._runs(ranges):
            os.pwrite(self._fd, buf[pos : pos + nbytes].tobytes(), off)
            pos += nbytes


def _pread_into(fd: int, buf: np.ndarray, off: int) -> int:
    """Fill the uint8 array ``buf`` from ``off``; returns the bytes read (fewer only at the end of the file)."""
    done, n = 0, len(buf)
    while done < n:
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [memoryview(buf[done:])], off + done)
        else:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, n - done, off + done)
            got = len(data)
            buf[done : done + got] = np.frombuffer(data, np.uint8)
        if got <= 0:
            break
        done += got
    return done


def create_npy(path: str | os.PathLike, shape: Sequence[int], dtype: Any) -> RawArray:
    """Create a ``.npy`` file of ``shape`` and ``dtype`` (zeros, sparse on disk) and open it for writing."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype)
    with open(p, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
        )
        offset = f.tell()
        f.truncate(offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    return RawArray(p, offset, shape, dtype, mode="r+")


def _open_npy(p: Path) -> Any:
    with open(p, "rb") as f:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (
            np.lib.format.read_array_header_1_0(f) if version == (1, 0) else np.lib.format.read_array_header_2_0(f)
        )
        offset = f.tell()
    if dtype.hasobject:
        raise InputError(f"{p}: .npy files of Python objects are not images; save a numeric array.")
    if fortran:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    size = os.path.getsize(p)
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < need:
        raise InputError(f"{p}: the .npy file is truncated ({size} bytes, {need} expected).")
    return RawArray(p, offset, shape, dtype)


# --------------------------------------------------------------------------- whole images


def _read_pillow(p: Path, keep_alpha: bool = True) -> tuple[np.ndarray, dict]:
    """A PNG / JPEG / ... file (see :func:`read_image`) and what a restored copy keeps of it: its
    ICC colour profile and print resolution (``icc_profile``, ``dpi``)."""
    from PIL import Image, ImageOps

    with Image.open(p) as im:
        info = {k: im.info[k] for k in ("icc_profile", "dpi") if im.info.get(k)}
        if im.format == "PNG" and im.mode in ("RGB", "RGBA", "LA") and any(
                ";16" in str(getattr(t, "args", "")) for t in im.tile):  # raw modes RGB;16B, RGBA;16B, LA;16B
            raise InputError(
                f"{p}: a 16-bit colour image, which Pillow can read only as 8 bits; save it as TIFF "
                "(e.g. in Fiji) and restore the TIFF so that no precision is lost."
            )
        im = ImageOps.exif_transpose(im)  # as viewers show it (phone photos store it turned)
        if im.mode == "CMYK":  # the copy is RGB: a CMYK profile would tell viewers to read it as inks
            info.pop("icc_profile", None)
        if im.mode == "P" and "transparency" in im.info:  # a palette with transparent entries (tRNS)
            im = im.convert("PA")
        if not keep_alpha and im.mode in ("LA", "PA", "RGBA"):
            im = im.convert("L" if im.mode == "LA" else "RGB")
        if im.mode in ("P", "CMYK", "LA", "PA"):
            im = im.convert("RGBA" if "A" in im.mode else "RGB")
        if im.mode == "I;16":
            return np.asarray(im).astype(np.uint16), info
        return np.asarray(im).copy(), info


#: TIFF colour models whose stored values are not the grey levels or RGB the network restores
_TIFF_PHOTOMETRIC_REFUSED = {
    0: ("white-is-zero (MINISWHITE)", "its values run from white to black, so it would come out inverted"),
    3: ("palette (indexed-colour)", "its values are indices into a colour map, not intensities"),
    5: ("CMYK (SEPARATED)", "its four samples are ink amounts, not RGB"),
    8: ("CIELab", "its samples are L*a*b*, not RGB"),
    9: ("ICCLab", "its samples are L*a*b*, not RGB"),
    10: ("ITULab", "its samples are L*a*b*, not RGB"),
    32803: ("colour-filter-array (raw Bayer)", "its pixels are a mosaic of colour filters"),
    34892: ("linear raw", "its pixels are a sensor's raw mosaic"),
}


def _check_tiff_photometric(tf: Any, p: Path) -> None:
    """Refuse a TIFF whose colour model would be restored as plain grey / RGB values (a wrong result)."""
    try:
        page = tf.pages.first if hasattr(tf.pages, "first") else tf.pages[0]
        code = int(page.photometric)
    except Exception:  # a file without pages is reported by the reader itself
        return
    if code in _TIFF_PHOTOMETRIC_REFUSED:
        kind, why = _TIFF_PHOTOMETRIC_REFUSED[code]
        raise InputError(f"{p.name} is a {kind} TIFF: {why}, and restoring those values would give a wrong "
                         "image. Convert it to greyscale or RGB first (e.g. Fiji: Image > Type > 8-bit or RGB "
                         "Color; Pillow: Image.open(path).convert('RGB')) and restore the converted file.")


def read_image(path: str | os.PathLike, keep_alpha: bool = True, samples_last: bool = True) -> np.ndarray:
    """Read an image file (or zarr store) into a numpy array (TIFF stacks keep all their planes).

    PNG / JPEG / ...: turned upright by their EXIF orientation; palette and CMYK images become RGB.
    ``keep_alpha=False`` drops an alpha channel (grey + alpha → grey, RGBA → RGB); otherwise
    grey + alpha becomes RGBA.  16-bit colour PNGs are refused (Pillow reads only 8 bits of them).
    ``samples_last``: the RGB(A) samples of a TIFF or zarr whose axes put them elsewhere (planar
    RGB, axes ``SYX``: what tifffile writes for a (3, H, W) array) are moved to the last axis,
    where every other reader of this package (and napari) expects colour; ``False`` keeps the
    file's order.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".zarr" and p.is_dir():
        src = open_image(p)
        try:
            arr = np.asarray(src.array[...])
            return _samples_last(arr, src.axes) if samples_last else arr
        finally:
            src.close()
    if not p.is_file():
        raise InputError(f"{p}: no such file.")
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(p) as tf:
                _check_tiff_photometric(tf, p)
                series = tf.series[0]
                if len(tf.series) > 1:
                    warnings.warn(f"{p.name} holds {len(tf.series)} image series; only the first ({series.axes} "
                                  f"{tuple(series.shape)}) is read. Save each series you need as its own file.",
                                  UserWarning, stacklevel=2)
                arr = np.asarray(series.asarray())
                if not samples_last:
                    return arr
                ax = (series.axes or "").upper()
                if "S" in ax and ax.index("S") != len(ax) - 1 and arr.dtype != np.uint8 and len(ax) == arr.ndim:
                    warnings.warn(
                        f"{p.name} is stored as {arr.dtype} RGB with separate planes (axes {ax}), so it is read as "
                        "one colour image. If its planes are a stack or channels, save it again with "
                        "tifffile.imwrite(..., photometric='minisblack').", UserWarning, stacklevel=2)
                return _samples_last(arr, series.axes)
        if suffix == ".npy":
            return np.load(p, allow_pickle=False)
        return _read_pillow(p, keep_alpha)[0]
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{p}: cannot be read as an image ({type(exc).__name__}: {exc}).") from None


def _samples_last(arr: np.ndarray, axes: Optional[str]) -> np.ndarray:
    """``arr`` with its RGB(A) samples axis (``S`` in ``axes``, 3 or 4 long) moved to the end."""
    ax = (axes or "").upper()
    if len(ax) != arr.ndim or "S" not in ax or arr.shape[ax.index("S")] not in (3, 4):
        return arr
    return np.moveaxis(arr, ax.index("S"), -1)


def write_image(path: str | os.PathLike, image: np.ndarray, **tiff_kwargs) -> Path:
    """Write ``image`` in the format given by the suffix of ``path``."""
    p = Path(path)
    suffix = p.suffix.lower()
    p.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(p, image, **tiff_kwargs)
    elif suffix == ".npy":
        np.save(p, image, allow_pickle=False)
    else:
        from PIL import Image

        arr = np.asarray(image)
        if suffix in (".jpg", ".jpeg") and arr.dtype != np.uint8:
            raise InputError(f"{p}: JPEG holds only 8-bit images; write .tif for {arr.dtype} data.")
        Image.fromarray(arr).save(p)
    return p


def _is_image_entry(f: Path) -> bool:
    if f.name.startswith("."):
        return False  # hidden files, and partial outputs of an interrupted run
    if f.suffix.lower() == ".zarr":
        return f.is_dir()
    return f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()


def expand_inputs(paths) -> list[Path]:
    """Expand files, folders and glob patterns into a sorted list of image files.

    A folder contributes its image files (and ``*.zarr`` stores), not its subfolders;
    a ``.zarr`` directory given directly is one image.  A pattern contributes the image files
    it matches (and those of the folders it matches); other files and empty folders it matches
    are left out, as a folder's are.
    """
    import glob

    out: list[Path] = []
    for item in paths:
        s = str(item)
        pattern = any(c in s for c in "*?[")
        matches = [Path(m) for m in sorted(glob.glob(s))] if pattern else [Path(s)]
        if pattern:
            found = []
            for m in matches:
                if m.is_dir() and m.suffix.lower() != ".zarr":
                    found.extend(sorted(f for f in m.iterdir() if _is_image_entry(f)))
                elif _is_image_entry(m):
                    found.append(m)
            if not found:
                raise InputError(f"{s}: no image file matches this pattern ({', '.join(sorted(IMAGE_SUFFIXES))})"
                                 + (f"; it matches {len(matches)} other file(s) or folder(s)." if matches else "."))
            out.extend(found)
            continue
        for m in matches:
            if m.is_dir() and m.suffix.lower() != ".zarr":
                files = sorted(f for f in m.iterdir() if _is_image_entry(f))
                if not files:
                    raise InputError(f"{m}: the folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}).")
                out.extend(files)
            elif m.exists():
                out.append(m)
            else:
                raise InputError(f"{m}: no such file or folder.")
    return out


# --------------------------------------------------------------------------- lazy images


@dataclass
class ImageSource:
    """An image opened lazily by :func:`open_image`.

    Attributes
    ----------
    array : array-like
        numpy, :class:`RawArray` or zarr array; index it to read regions.
    axes : str or None
        Axes found in the file (letters ``TZCYXS``), None when the file does not say.
    meta : dict
        Physical metadata: ``"pixel_size"`` (``{"X": (value, unit), "Y": ..., "Z": ...}``),
        ``"time_increment"`` ((value, unit)), ``"channel_names"`` (list), for OME-Zarr ``"origin"``
        (``{"Y": value, ...}``: the physical position of the first pixel's centre, in the pixel sizes' units,
        when the image has a translation), and for TIFF
        ``"resolution"``, ``"resolutionunit"``, ``"imagej"``, ``"ome"`` (True for OME-TIFF); for PNG / JPEG
        ``"icc_profile"`` and ``"dpi"`` when the file has them.
    format : str
        ``"tiff"``, ``"zarr"``, ``"npy"`` or ``"pillow"``.
    """

    path: Path
    array: Any
    axes: Optional[str]
    meta: dict = field(default_factory=dict)
    format: str = ""
    _closers: list = field(default_factory=list, repr=False)

    @property
    def lazy(self) -> bool:
        """True when the pixels are read on demand (not held in memory)."""
        return not isinstance(self.array, np.ndarray) or isinstance(self.array, np.memmap)

    def close(self) -> None:
        """Release the file handles."""
        while self._closers:
            try:
                self._closers.pop()()
            except Exception:  # noqa: BLE001
                pass

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_image(path: str | os.PathLike) -> ImageSource:
    """Open an image file or zarr store lazily (see :class:`ImageSource`).

    Raises
    ------
    InputError
        The file does not exist, or cannot be read as an image (the message names it).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if not p.exists():
        raise InputError(f"{p}: no such file.")
    try:
        if suffix == ".zarr":
            return _open_zarr(p)
        if not p.is_file():
            raise InputError(f"{p}: not a file (folders are expanded by the CLI; zarr stores end in .zarr).")
        if suffix in (".tif", ".tiff"):
            return _open_tiff(p)
        if suffix == ".npy":
            arr = _open_npy(p)
            src = ImageSource(p, arr, None, {}, "npy")
            if isinstance(arr, RawArray):
                src._closers.append(arr.close)
            return src
        arr, info = _read_pillow(p)  # one read: the pixels and what a restored copy keeps
        return ImageSource(p, arr, None, info, "pillow")
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{p}: cannot be read as an image ({type(exc).__name__}: {exc}).") from None


def _open_tiff(p: Path) -> ImageSource:
    import tifffile

    from .ome import tiff_metadata

    tf = tifffile.TiffFile(p)
    try:
        _check_tiff_photometric(tf, p)
        series = tf.series[0]
        if len(tf.series) > 1:  # pyramid levels are one series; these are other images (positions, labels)
            others = ", ".join(str(tuple(s.shape)) for s in tf.series[1:4]) + (" ..." if len(tf.series) > 4 else "")
            warnings.warn(
                f"{p.name} holds {len(tf.series)} image series; only the first, {tuple(series.shape)}, is restored "
                f"and the others ({others}) are not in the output. Split the file into one file per series "
                "(e.g. in Fiji) to restore them all.",
                RuntimeWarning, stacklevel=2,
            )
        meta = tiff_metadata(tf, len(series.shape))
        axes = meta.pop("axes", None)
        page = series.pages[0] if hasattr(series, "pages") else tf.pages[0]
        offset = series.dataoffset
        raw_ok = (
            offset is not None
            and series.dtype is not None
            and getattr(page, "bitspersample", series.dtype.itemsize * 8) == series.dtype.itemsize * 8
            and int(np.prod(series.shape, dtype=np.int64)) * series.dtype.itemsize <= os.path.getsize(p) - offset
        )
        if raw_ok:
            byteorder = tf.byteorder
            arr: Any = RawArray(p, offset, series.shape, series.dtype.newbyteorder(byteorder))
            tf.close()
            src = ImageSource(p, arr, axes, meta, "tiff")
            src._closers.append(arr.close)
            return src
        import zarr

        store = series.aszarr(level=0) if getattr(series, "is_pyramidal", False) else series.aszarr()
        z = zarr.open(store, mode="r")
        if not hasattr(z, "shape"):  # a group (multiscale): the full-resolution level
            z = z["0"]
        src = ImageSource(p, z, axes, meta, "tiff")
        src._closers += [tf.close, store.close]
        return src
    except Exception:
        tf.close()
        raise


def _ngff_transform(dataset: dict, multiscale: dict, ndim: int) -> tuple[Optional[list], Optional[list]]:
    """(scale, translation) of an NGFF dataset's pixel grid, the multiscale's own transformations
    applied after the dataset's; None for what the metadata leaves out or gives in a wrong length."""
    scale: Optional[list] = None
    origin: Optional[list] = None
    for transforms in (dataset.get("coordinateTransformations", []), multiscale.get("coordinateTransformations", [])):
        for t in transforms if isinstance(transforms, list) else []:
            kind, values = (t.get("type"), t.get(t.get("type"), [])) if isinstance(t, dict) else (None, [])
            if kind not in ("scale", "translation") or not isinstance(values, list) or len(values) != ndim:
                continue
            try:
                values = [float(v) for v in values]
            except (TypeError, ValueError):
                continue
            if kind == "scale":
                origin = [o * v for o, v in zip(origin, values)] if origin is not None else None
                scale = [s * v for s, v in zip(scale, values)] if scale is not None else values
            else:
                origin = [o + v for o, v in zip(origin, values)] if origin is not None else values
    return scale, origin


def _open_zarr(p: Path) -> ImageSource:
    import zarr

    from .ome import TIME_SYMBOLS

    if not is_zarr(p):
        raise InputError(f"{p}: not a zarr store (no zarr.json, .zarray or .zgroup inside).")
    node = zarr.open(str(p), mode="r")
    attrs = dict(node.attrs)
    meta: dict = {}
    axes = attrs.get("axes") if isinstance(attrs.get("axes"), str) else None
    if not hasattr(node, "shape"):  # a group: OME-NGFF multiscales, else its only / first array
        ngff = attrs.get("ome", attrs)
        ms = ngff.get("multiscales") if isinstance(ngff, dict) else None
        if ms:
            ds = ms[0]["datasets"][0]
            arr = node[ds["path"]]
            names = [a.get("name", "") if isinstance(a, dict) else str(a) for a in ms[0].get("axes", [])]
            letters = "".join(n[:1].upper() for n in names)
            if len(letters) == arr.ndim and set(letters) <= set("TZCYX") and len(set(letters)) == len(letters):
                axes = letters
            units = {n[:1].upper(): a.get("unit") for n, a in zip(names, ms[0].get("axes", [])) if isinstance(a, dict)}
            scale, origin = _ngff_transform(ds, ms[0], arr.ndim) if axes else (None, None)
            if scale is not None:
                meta["pixel_size"] = {c: (v, units.get(c)) for c, v in zip(axes, scale) if c in "ZYX"}
                if "T" in axes and units.get("T"):  # a time step with a unit (a bare 1 is no information)
                    unit = TIME_SYMBOLS.get(str(units["T"]), str(units["T"]))  # as OME-XML writes it
                    meta["time_increment"] = (scale[axes.index("T")], unit)
            if origin is not None and any(origin):
                meta["origin"] = {c: v for c, v in zip(axes, origin) if c in "TZYX"}
        else:
            names = sorted(k for k, _ in node.arrays())
            if not names:
                raise InputError(f"{p}: the zarr group holds no array.")
            arr = node[names[0]]
            axes = dict(arr.attrs).get("axes", axes) if isinstance(dict(arr.attrs).get("axes"), str) else axes
    else:
        arr = node
        ps = attrs.get("pixel_size")
        if isinstance(ps, dict):
            meta["pixel_size"] = {k: (float(v[0]), v[1]) if isinstance(v, (list, tuple)) else (float(v), None)
                                  for k, v in ps.items()}
    if axes is not None and (len(axes) != arr.ndim or not set(axes.upper()) <= set("TZCYXS")):
        axes = None
    return ImageSource(p, arr, axes.upper() if axes else None, meta, "zarr")
