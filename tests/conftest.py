"""Shared pytest fixtures of the napari-vdsr test suite."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_triton_guard():
    """The widgets' Triton guard, loaded from its file alone (importing the widgets package would pull in magicgui)."""
    path = REPO_ROOT / "src" / "napari_vdsr" / "_widgets" / "_triton_guard.py"
    spec = importlib.util.spec_from_file_location("napari_vdsr_tests_triton_guard", path)
    if spec is None or spec.loader is None:
        return None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_TRITON_GUARD = _load_triton_guard()


@pytest.fixture(autouse=True)
def _no_triton_beside_mesa_llvm():
    """What the Fine-tune widget does, before every test: once a GUI test has loaded Mesa's OpenGL (and its
    LLVM) into this process, a later test that builds an optimiser would crash it when torch loads Triton
    (a segmentation fault with libLLVM-15), so the suite passes in any order (e.g. test_widgets.py first)."""
    if _TRITON_GUARD is not None:
        _TRITON_GUARD.keep_triton_out()
    yield


def find_shared_data() -> Path | None:
    """``$NAPARI_VDSR_DATA`` if set, else ``../shared/data`` beside the repository; None if absent."""
    env = os.environ.get("NAPARI_VDSR_DATA")
    c = Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"
    return c if (c / "benchmarks").is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the benchmark / training images (read-only); skips the test when absent."""
    path = find_shared_data()
    if path is None:
        env = os.environ.get("NAPARI_VDSR_DATA")
        if env:
            pytest.skip(f"benchmark data not found: NAPARI_VDSR_DATA={env} has no benchmarks/ folder")
        pytest.skip(
            "benchmark data not found: set NAPARI_VDSR_DATA to the data folder, or place it at "
            f"{REPO_ROOT.parent / 'shared' / 'data'} (it holds benchmarks/Set5, Set14, ...)"
        )
    return path


@pytest.fixture
def notes():
    """Messages of the napari notifications shown during the test."""
    from napari.utils.notifications import notification_manager

    got: list[str] = []

    def on_note(notification):
        got.append(str(notification.message))

    notification_manager.notification_ready.connect(on_note)
    yield got
    notification_manager.notification_ready.disconnect(on_note)
