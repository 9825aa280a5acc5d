"""The widgets keep Triton out of a napari process whose OpenGL driver has loaded LLVM (it crashed it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "src" / "napari_vdsr" / "_widgets" / "_triton_guard.py"


@pytest.fixture
def guard(monkeypatch):
    """The module, loaded alone (no Qt), with Triton installed, not imported, torch._dynamo not imported."""
    spec = importlib.util.spec_from_file_location("vdsr_triton_guard", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    saved = {k: sys.modules[k] for k in ("triton", "torch._dynamo") if k in sys.modules}
    for k in saved:
        del sys.modules[k]
    monkeypatch.setattr(mod.importlib.util, "find_spec", lambda name: object() if name == "triton" else None)
    monkeypatch.delenv("NAPARI_VDSR_ALLOW_TRITON", raising=False)
    yield mod
    sys.modules.pop("triton", None)
    sys.modules.update(saved)


def _maps(tmp_path: Path, *libs: str) -> str:
    p = tmp_path / "maps"
    p.write_text("".join(f"7f00-7f01 r-xp 00000000 08:01 1 {lib}\n" for lib in libs))
    return str(p)


def test_triton_is_kept_out_beside_a_mesa_llvm(guard, tmp_path: Path) -> None:
    maps = _maps(tmp_path, "/usr/lib/x86_64-linux-gnu/libLLVM-15.so.1", "/usr/lib/x86_64-linux-gnu/dri/swrast_dri.so")
    assert guard.keep_triton_out(maps) is True
    assert sys.modules["triton"] is None
    with pytest.raises(ImportError):
        import triton  # noqa: F401
    from torch.utils import _triton  # torch then reads Triton as absent, without loading it

    assert _triton.has_triton_package.__wrapped__() is False


def test_triton_is_left_alone_without_llvm_or_when_allowed(guard, tmp_path: Path, monkeypatch) -> None:
    assert guard.keep_triton_out(_maps(tmp_path, "/usr/lib/libGL.so.1")) is False and "triton" not in sys.modules
    assert guard.keep_triton_out(str(tmp_path / "no-such-file")) is False  # not Linux: nothing to read
    monkeypatch.setenv("NAPARI_VDSR_ALLOW_TRITON", "1")
    assert guard.keep_triton_out(_maps(tmp_path, "/usr/lib/libLLVM-15.so.1")) is False and "triton" not in sys.modules


def test_triton_already_loaded_or_dynamo_imported_is_not_touched(guard, tmp_path: Path) -> None:
    maps = _maps(tmp_path, "/usr/lib/libLLVM-15.so.1")
    sys.modules["torch._dynamo"] = object()  # torch has decided already: nothing to change
    try:
        assert guard.keep_triton_out(maps) is False and "triton" not in sys.modules
    finally:
        del sys.modules["torch._dynamo"]
