"""Fill the folder that ``scripts/gpu_session.sh`` takes to a GPU machine (default ``.gpu/``).

    python scripts/prepare_gpu_bundle.py [--out .gpu] [--data ../shared/data/train/SunHays80] [--no-wheels]

* ``train/``: the training images as 8-bit luminance PNGs (the engine trains on Y anyway;
  78 MB of RGB PNGs become 28 MB, inside the device tool's 64 MiB transfer limit).
  Y is rounded to integers (at most 0.5 grey level); validation PSNRs on these images
  differ from the float-Y ones by about 0.006 dB.
* ``init/<task>.safetensors`` + ``.json``: the weights each run continues from, the best
  model of ``runs/<run>/`` if present (``RUNS`` below), else the bundled one.
* ``resume/<task>/``: the run folder to resume exactly (``RESUME`` below: the SR run since
  session 12), without its ``last.*`` exports; that task then gets no ``init/`` weights.
* ``referee/``: the images the resumed SR run validates on (the folder its ``config.json``
  names in ``val_data``, e.g. ``runs/referee-photos/x1/HR`` since session 14), else the
  referee photos ``runs/referee-photos/x1/HR`` (built when missing); a run validated on
  ``--val-data`` validates on them there (the same pairs: its best score goes on).  Without
  a run to resume, SR starts from the cycle's resume point in the package
  (``scripts/sr_cycle.json``) when there is one, and gpu_session.sh goes on with its recipe.
* ``whl/``: wheels of the packages the GPU image lacks (pydantic and its three helpers,
  for CPython 3.12 on x86-64), downloaded with pip from the package registry.

The folder must be ignored by git (``.gitignore`` lists ``/.gpu/`` and the GPU runs' ``/gpu-runs/``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: the run whose best weights a task continues from when it is in runs/ (else the bundled weights);
RUNS = {"sr": None, "denoise": "denoise-gpu17", "deblock": "deblock-gpu17"}
#: the SR cycle in progress (its run, the previous cycle's run, the resume point in the package)
CYCLE = json.loads((ROOT / "scripts" / "sr_cycle.json").read_text())
#: the run a task resumes exactly on the GPU when its checkpoint is in runs/ (SR since session 12: the cycle's run,
#: else the previous cycle's, which gpu_session.sh finishes or, once finished, continues with the cycle's schedule)
RESUME = {"sr": CYCLE["run"]}
RESUME_FALLBACK = {"sr": CYCLE["previous_run"]}
RUN_FILES = ["checkpoint.pt", "config.json", "log.jsonl", "best.safetensors", "best.json"]
BUNDLED = {"sr": "vdsr-sr-x234", "denoise": "vdsr-denoise", "deblock": "vdsr-deblock"}
#: a cycle's resume point in the package goes before the default (SR without either run: its
#: EMA weights at the last checkpoint a session committed; gpu_session.sh continues the cycle's recipe)
RESUME_POINT = {"sr": CYCLE["resume_point"]}
WHEELS = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"]


def luminance_pngs(src: Path, dst: Path) -> int:
    from PIL import Image

    from napari_vdsr.core.color import rgb_to_y
    from napari_vdsr.core.io import read_image

    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for f in sorted(src.iterdir()):
        if f.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
            continue
        img = read_image(f)
        if img.ndim == 3 and img.shape[-1] in (3, 4):
            img = rgb_to_y(img[..., :3].astype(np.float32))
        y = np.clip(np.round(img), 0, 255).astype(np.uint8)
        Image.fromarray(y).save(dst / (f.stem + ".png"), optimize=True)
        n += 1
    return n


def validation_folder(run: Path, runs: Path) -> Path:
    """The folder a run validates on (its ``val_data``), else the referee photos in ``runs``."""
    try:
        val_data = json.loads((run / "config.json").read_text()).get("val_data") or []
    except (OSError, ValueError, AttributeError):
        val_data = []
    for v in val_data:
        p = Path(v) if Path(v).is_absolute() else ROOT / v
        if p.is_dir():
            return p
    return runs / "referee-photos" / "x1" / "HR"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / ".gpu"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "train" / "SunHays80"))
    ap.add_argument("--runs", default=str(ROOT / "runs"))
    ap.add_argument("--no-wheels", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out)
    print(f"train/: {luminance_pngs(Path(a.data), out / 'train')} images")
    (out / "init").mkdir(parents=True, exist_ok=True)
    resumed = set()
    referee = Path(a.runs) / "referee-photos" / "x1" / "HR"  # what the SR cycles validate on
    if not referee.is_dir():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import referee as referee_mod

        referee_mod.build(Path(a.runs) / "referee-photos", images=referee_mod.PHOTOS)
    for task, run in RESUME.items():
        folder = Path(a.runs) / run
        if not (folder / "checkpoint.pt").exists() and task in RESUME_FALLBACK:
            folder = Path(a.runs) / RESUME_FALLBACK[task]
        if not (folder / "checkpoint.pt").exists():
            continue
        dst = out / "resume" / task
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        for name in RUN_FILES:
            if (folder / name).exists():
                shutil.copy2(folder / name, dst / name)
        resumed.add(task)
        print(f"resume/{task}: {folder}")
        if task == "sr":
            referee = validation_folder(folder, Path(a.runs))
    if referee.is_dir():
        print(f"referee/: {referee}")
        shutil.rmtree(out / "referee", ignore_errors=True)
        shutil.copytree(referee, out / "referee")
    for task, run in RUNS.items():
        if task in resumed:
            for f in (out / "init").glob(f"{task}.*"):
                f.unlink()
            continue
        best = Path(a.runs) / run / "best.safetensors" if run else None
        weights = ROOT / "src" / "napari_vdsr" / "weights"
        point = weights / f"{RESUME_POINT.get(task, BUNDLED[task])}.safetensors"
        src = best if best is not None and best.exists() else point if point.exists() else weights / f"{BUNDLED[task]}.safetensors"
        shutil.copy2(src, out / "init" / f"{task}.safetensors")
        shutil.copy2(src.with_suffix(".json"), out / "init" / f"{task}.json")
        print(f"init/{task}: {src}")
    if not a.no_wheels:
        versions = {}
        from importlib.metadata import version

        for name in WHEELS:
            versions[name] = version(name)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
               "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(out / "whl"),
               *[f"{n}=={v}" for n, v in versions.items()]]
        subprocess.run(cmd, check=True)
        print("whl/:", ", ".join(f"{n} {v}" for n, v in versions.items()))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB (the working tree plus this must stay under 64 MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
