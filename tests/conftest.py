"""Shared pytest fixtures of the napari-vdsr test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


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
