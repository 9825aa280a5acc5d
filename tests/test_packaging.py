"""Packaging: headless core, the npe2 manifest, and what a built wheel contains."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PKG = REPO_ROOT / "src" / "napari_vdsr"
GUI_MODULES = ("napari", "PyQt5", "PyQt6", "PySide2", "PySide6", "qtpy", "superqt", "magicgui", "vispy", "app_model")


def _run(code: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def test_core_imports_without_qt_or_napari():
    code = f"""
import importlib, json, pkgutil, sys
import napari_vdsr, napari_vdsr.core, napari_vdsr.cli, napari_vdsr._cli_evaluate
mods = ["napari_vdsr.core." + m.name for m in pkgutil.iter_modules(napari_vdsr.core.__path__)]
for m in mods:
    importlib.import_module(m)
bad = sorted(m for m in sys.modules if m.split(".")[0] in {GUI_MODULES!r})
print(json.dumps({{"modules": mods, "gui": bad}}))
"""
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "napari_vdsr.core.evaluate" in info["modules"] and "napari_vdsr.core.model" in info["modules"]
    assert info["gui"] == [], f"importing the core pulled in GUI packages: {info['gui']}"


def test_manifest_exists_and_top_level_is_the_same_file():
    manifest = PKG / "napari.yaml"
    assert manifest.is_file(), "src/napari_vdsr/napari.yaml (the npe2 manifest) is missing"
    top = REPO_ROOT / "napari.yaml"
    assert top.exists(), "top-level napari.yaml (a link to the package manifest) is missing"
    assert top.read_bytes() == manifest.read_bytes()


def _npe2_validate(env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-vdsr"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=cwd)


def test_npe2_validate_installed_package():
    if importlib.util.find_spec("npe2") is None:
        pytest.skip("npe2 is not installed (pip install -e '.[testing]')")
    proc = _npe2_validate()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "valid" in (proc.stdout + proc.stderr).lower()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from this checkout with `python -m build --wheel` (isolated, else --no-isolation)."""
    if importlib.util.find_spec("build") is None:
        pytest.skip("the 'build' package is not installed (pip install -e '.[testing]')")
    out = tmp_path_factory.mktemp("dist")
    src = tmp_path_factory.mktemp("src") / "napari-vdsr"
    # build from a clean copy: never write build artefacts into the checkout
    shutil.copytree(REPO_ROOT, src, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "runs", "build", "dist", ".venv*", "__pycache__",
                                                  "*.egg-info", ".pytest_cache", ".hypothesis"))
    attempts = [[], ["--no-isolation"]]
    log = ""
    for extra in attempts:
        if extra and importlib.util.find_spec("hatchling") is None:
            continue
        proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), *extra, str(src)],
                              capture_output=True, text=True, timeout=600)
        log += proc.stdout[-2000:] + proc.stderr[-2000:]
        wheels = sorted(out.glob("napari_vdsr-*.whl"))
        if proc.returncode == 0 and wheels:
            return wheels[0]
    pytest.fail(f"could not build a wheel (isolated build needs the package index; --no-isolation needs hatchling):\n{log}")


@pytest.mark.slow
def test_wheel_contains_manifest_and_weights(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "napari_vdsr/napari.yaml" in names
    assert any(n.startswith("napari_vdsr/weights/") and n.endswith(".safetensors") for n in names), names
    for n in names:
        if n.startswith("napari_vdsr/weights/") and n.endswith(".safetensors"):
            assert n[: -len(".safetensors")] + ".json" in names, f"{n} has no JSON model card"
    assert not any(n.startswith(("runs/", "tests/")) for n in names)
    ep = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(ep).decode()
    assert "napari.manifest" in text and "napari_vdsr:napari.yaml" in text
    assert "napari-vdsr = napari_vdsr.cli:main" in text


@pytest.mark.slow
def test_npe2_validate_from_wheel(wheel, tmp_path):
    if importlib.util.find_spec("npe2") is None:
        pytest.skip("npe2 is not installed (pip install -e '.[testing]')")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = dict(os.environ, PYTHONPATH=str(site))
    # the unpacked wheel comes first on sys.path: its dist-info and package shadow the editable install
    where = _run("import napari_vdsr, importlib.metadata as m; print(napari_vdsr.__file__); "
                 "print(m.distribution('napari-vdsr').locate_file(''))", env=env, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(site)) for line in where.stdout.split()), where.stdout
    proc = _npe2_validate(env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ci_runs_the_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme.split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.strip() for line in block.strip().splitlines() if line.strip()]
    assert len(commands) == 2, f"the README's set-up block must hold exactly two commands, got {commands}"
    assert "demo" in commands[0] and "pytest" in commands[1]
    ci = REPO_ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK), ".ci/run must be executable"
    lines = [line.strip() for line in ci.read_text().splitlines()]
    assert commands[1] in lines, ".ci/run must run the README's test command verbatim"
    assert "set -euo pipefail" in lines
