"""Reading and writing image files (TIFF via tifffile, PNG/JPG via Pillow, .npy)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = ["IMAGE_SUFFIXES", "read_image", "write_image", "expand_inputs"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy"}


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file into a numpy array (TIFF stacks keep all their planes)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if not p.is_file():
        raise InputError(f"{p}: no such file.")
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            return np.asarray(tifffile.imread(p))
        if suffix == ".npy":
            return np.load(p, allow_pickle=False)
        from PIL import Image

        with Image.open(p) as im:
            if im.mode in ("P", "CMYK", "LA", "PA"):
                im = im.convert("RGBA" if "A" in im.mode else "RGB")
            if im.mode == "I;16":
                return np.asarray(im).astype(np.uint16)
            return np.asarray(im).copy()
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{p}: cannot be read as an image ({type(exc).__name__}: {exc}).") from None


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


def expand_inputs(paths) -> list[Path]:
    """Expand files, folders and glob patterns into a sorted list of image files."""
    import glob

    out: list[Path] = []
    for item in paths:
        s = str(item)
        matches = [Path(m) for m in sorted(glob.glob(s))] if any(c in s for c in "*?[") else [Path(s)]
        if not matches:
            raise InputError(f"{s}: no file matches this pattern.")
        for m in matches:
            if m.is_dir():
                files = sorted(f for f in m.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
                if not files:
                    raise InputError(f"{m}: the folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}).")
                out.extend(files)
            elif m.exists():
                out.append(m)
            else:
                raise InputError(f"{m}: no such file or folder.")
    return out
