"""Screenshots and before/after numbers of docs/finetuning.md, made with the real Fine-tune widget.

Run from the repository root (needs a display; on a headless machine use Xvfb)::

    xvfb-run -a python docs/make_finetune_screenshots.py [--steps 60] [--out RUN_ROOT]

It fine-tunes the bundled x2/x3/x4 model on scikit-image's immunohistochemistry
image (real brightfield microscopy, RGB; no download) for x2 through the widget,
exactly as a user would, takes three screenshots (running, finished, result),
then measures on the held-out bottom rows (never trained on) the PSNR on Y of
bicubic, the base model and the fine-tuned model, following the evaluation
protocol (bicubic x2 shrink, uint8, shave 2 px).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_screenshots import OUT, shot, wait_for  # noqa: E402

SIZE = (1500, 1150)  # taller than the restore screenshots: the Fine-tune dock holds a plot
VAL_FRACTION = 0.25


def new_viewer():
    import napari

    viewer = napari.Viewer(title="napari-vdsr")
    viewer.window.resize(*SIZE)
    return viewer


def pump(app, seconds: float) -> None:
    t0 = time.time()
    while time.time() - t0 < seconds:
        app.processEvents()
        time.sleep(0.02)


def close_toasts(viewer, app) -> None:
    """Close napari's notification pop-ups so they do not cover the picture."""
    try:
        from napari._qt.dialogs.qt_notification import NapariQtNotification
    except ImportError:
        return
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):  # noqa: SLF001 - screenshots only
        toast.close()
    pump(app, 0.5)


def measure(hr_rgb: np.ndarray, model_path: Path, base: str) -> dict:
    """PSNR on Y of the held-out bottom rows: bicubic, base model, fine-tuned (x2, shave 2)."""
    from napari_vdsr.core.color import rgb_to_y
    from napari_vdsr.core.degrade import downscale, upscale
    from napari_vdsr.core.evaluate import psnr
    from napari_vdsr.core.restore import restore

    u8 = lambda a: np.clip(np.round(a), 0, 255).astype(np.uint8)  # noqa: E731
    cut = int(round(hr_rgb.shape[0] * (1 - VAL_FRACTION)))  # the rows the trainer held out
    y = u8(rgb_to_y(hr_rgb.astype(np.float32)))[cut:]
    y = y[: y.shape[0] // 2 * 2, : y.shape[1] // 2 * 2]
    lr = u8(downscale(y.astype(np.float32), 2))
    res = {"rows": [cut, hr_rgb.shape[0]], "shape": list(y.shape)}
    res["bicubic"] = psnr(u8(upscale(lr.astype(np.float32), size=y.shape)), y, shave=2)
    res["base"] = psnr(restore(lr, task="sr", scale=2, model=base, device="cpu"), y, shave=2)
    res["finetuned"] = psnr(restore(lr, task="sr", scale=2, model=str(model_path), device="cpu"), y, shave=2)
    return res


def finetune(app, steps: int, out_root: Path) -> tuple[Path, dict]:
    from skimage import data

    ihc = data.immunohistochemistry()
    viewer = new_viewer()
    viewer.add_image(ihc, name="immunohistochemistry", rgb=True)
    dock, w = viewer.window.add_plugin_dock_widget("napari-vdsr", "Fine-tune")
    w._task.value = "sr"
    w._scales.value = "2"
    w._steps.value = steps
    w._batch.value = 16
    w._patch.value = 41
    w._lr.value = "1e-4"
    w._val_fraction.value = VAL_FRACTION
    w._val_every.value = 10
    w._device.value = "cpu"
    w._out_dir.value = str(out_root)
    w._name.value = "ihc-sr-x2"
    viewer.reset_view()
    t0 = time.time()
    w.run()
    while w.running and (not w.curves.step or w.curves.step[-1] < steps // 2):
        pump(app, 0.2)
    shot(viewer, "finetune_running.png", app)
    wait_for(w, app, timeout=3600)
    wall = time.time() - t0
    pump(app, 1.0)
    shot(viewer, "finetune.png", app)
    if w.model_path is None:
        raise SystemExit(f"fine-tuning failed: {w._status.value}")
    c = w.curves
    info = {
        "steps": c.step[-1] if c.step else 0,
        "wall_seconds": round(wall, 1),
        "widget_val_steps": c.val_step,
        "widget_val_psnr": [round(v, 3) for v in c.val_psnr],
        "widget_bicubic_psnr": c.baseline_psnr,
        "widget_base_model_psnr": c.base_model_psnr,
        "model": str(w.model_path),
        "registered": w.registered_name,
    }
    viewer.window.remove_dock_widget(dock)
    result_screenshot(app, viewer, w, ihc)
    viewer.close()
    return w.model_path, info


def result_screenshot(app, viewer, ft, ihc: np.ndarray) -> None:
    """Super-resolve a held-out crop with the base and the fine-tuned model, side by side with the original."""
    from napari_vdsr._widgets._restore import DEFAULT
    from napari_vdsr.core.degrade import downscale

    y0, x0, n = 196, 90, 60  # low-res pixels inside the held-out bottom quarter (rows >= 192 at half size)
    small = np.clip(np.round(np.moveaxis(downscale(np.moveaxis(ihc.astype(np.float32), -1, 0), 2), 0, -1)), 0, 255)
    small = small.astype(np.uint8)[y0 : y0 + n, x0 : x0 + n]
    hi = ihc[2 * y0 : 2 * (y0 + n), 2 * x0 : 2 * (x0 + n)]
    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    viewer.add_image(hi, name="original (held-out crop)", rgb=True)
    viewer.add_image(small, name="low-res x2", rgb=True, scale=(2, 2), translate=(0.5, 0.5))
    _, sr = viewer.window.add_plugin_dock_widget("napari-vdsr", "Super-resolve")
    sr._image.value = viewer.layers["low-res x2"]
    sr._scale_w.value = 2.0
    for model in (DEFAULT, ft.registered_name):
        sr._model.value = model
        sr.run()
        wait_for(sr, app)
        viewer.layers[-1].name = "base model x2" if model == DEFAULT else "fine-tuned x2"
    order = ["low-res x2", "base model x2", "fine-tuned x2", "original (held-out crop)"]
    for i, nm in enumerate(order):
        viewer.layers.move(viewer.layers.index(nm), i)
    viewer.grid.enabled = True
    viewer.grid.shape = (1, 4)
    viewer.text_overlay.visible = True
    viewer.text_overlay.text = "low-res input  |  base model x2  |  fine-tuned x2  |  original"
    viewer.text_overlay.font_size = 13
    viewer.text_overlay.position = "top_center"
    viewer.window.resize(1500, 640)
    viewer.reset_view()
    close_toasts(viewer, app)
    shot(viewer, "finetune_result.png", app)


def main() -> int:
    import warnings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=None, help="folder for the run (default: a temporary folder)")
    args = ap.parse_args()

    warnings.filterwarnings("ignore", message=".*PyQt5 backend is deprecated.*")
    import napari  # noqa: F401

    try:
        import napari._qt.qt_main_window as qmw

        qmw.SHOW_QT_WARNING = False
    except (ImportError, AttributeError):
        pass
    import torch
    from napari._qt.qt_event_loop import get_qapp

    from napari_vdsr.core.weights import default_model_name

    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    app = get_qapp()
    out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="napari-vdsr-finetune-"))
    model_path, info = finetune(app, args.steps, out_root)
    from skimage import data

    base = default_model_name("sr")
    info["held_out_full_strip"] = measure(data.immunohistochemistry(), model_path, base)
    info["base_model"] = base
    info["date"] = time.strftime("%Y-%m-%d")
    info["machine"] = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
