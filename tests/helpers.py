"""Helpers shared by several test modules (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

from napari_vdsr.core.model import VDSR

NO_DISPLAY_REASON = "no display: set DISPLAY or install Xvfb (pytest-xvfb starts it)"


def no_display() -> bool:
    """True where no GUI test can get a display (no DISPLAY/Wayland, no offscreen Qt, no Xvfb)."""
    return (
        sys.platform.startswith("linux")
        and not os.environ.get("DISPLAY")
        and not os.environ.get("WAYLAND_DISPLAY")
        and os.environ.get("QT_QPA_PLATFORM") not in ("offscreen", "minimal")
        and shutil.which("Xvfb") is None
    )


def busy_net(depth: int, width: int, seed: int = 0) -> VDSR:
    """A tiny VDSR with a large residual (He-scale weights everywhere, positive biases),
    so that every layer's padding and every tile border shows in the result."""
    torch.manual_seed(seed)
    net = VDSR(depth=depth, width=width)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, 0.0, (2.0 / (m.in_channels * 9)) ** 0.5)
            torch.nn.init.normal_(m.bias, 0.02, 0.02)
    return net.eval()


def load_benchmark_script(name: str, folder: str = "benchmarks") -> ModuleType:
    """Import ``<folder>/<name>.py`` (the benchmark and helper scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"vdsr_{folder}_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_run_in_legs(tmp_path: Path, legs: list[list[str]]) -> Path:
    """A tiny SR run on random images, trained by ``napari-vdsr train`` once per leg (each after
    the first with ``--resume``); each leg's extra options, e.g. ``["--iterations", "4"]``."""
    import numpy as np
    from PIL import Image

    from napari_vdsr.cli import main as cli_main

    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((48, 48)) * 255).astype(np.uint8)).save(data / f"{i}.png")
    run = tmp_path / "run"
    common = ["train", "--data", str(data), "--out", str(run), "--device", "cpu", "--quiet", "--scales", "2",
              "--patch-size", "16", "--depth", "3", "--width", "8", "--val-every", "2", "--lr-schedule", "constant"]
    for i, extra in enumerate(legs):
        assert cli_main(common + list(extra) + (["--resume"] if i else [])) == 0
    return run
