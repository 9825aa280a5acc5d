"""Re-create the screenshots of docs/napari.md with the real widgets on the bundled sample data.

Run from the repository root (needs a display; on a headless machine use Xvfb)::

    xvfb-run -a python docs/make_screenshots.py

Widgets run with the bundled default model of each task.  A task without a
bundled model is shown with its input only (and the script says so); retake the
screenshots once the models are bundled.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "images"
SIZE = (1500, 860)


def wait_for(widget, app, timeout: float = 600.0) -> None:
    t0 = time.time()
    while widget.running and time.time() - t0 < timeout:
        app.processEvents()
        time.sleep(0.02)
    for _ in range(20):  # let the new layer draw
        app.processEvents()
        time.sleep(0.02)


def has_default(task: str) -> bool:
    from napari_vdsr.core.errors import VDSRError
    from napari_vdsr.core.weights import default_model_name

    try:
        default_model_name(task)
        return True
    except VDSRError:
        return False


def new_viewer():
    import napari

    viewer = napari.Viewer(title="napari-vdsr")
    viewer.window.resize(*SIZE)
    return viewer


def shot(viewer, name: str, app) -> Path:
    for _ in range(30):
        app.processEvents()
        time.sleep(0.02)
    path = OUT / name
    viewer.screenshot(str(path), canvas_only=False)
    print("wrote", path)
    return path


def super_resolve(app) -> None:
    """x2 on a 80 x 80 crop of the low-res cell sample, side by side with the input and the original."""
    from napari_vdsr import _sample_data as samples

    (lo, _, _), = samples.cell_lowres()
    (hi, _, _), = samples.cell()
    f = samples.LOWRES_FACTOR
    y0, x0, n = 148, 173, 80  # low-res pixels; the crop holds the cell's edge and background
    viewer = new_viewer()
    viewer.add_image(hi[f * y0 : f * (y0 + n), f * x0 : f * (x0 + n)], name="cell original (crop)",
                     translate=(f * y0, f * x0))
    viewer.add_image(lo[y0 : y0 + n, x0 : x0 + n], name="cell low-res x2 (crop)", scale=(f, f),
                     translate=(f * y0 + (f - 1) / 2, f * x0 + (f - 1) / 2))
    _, w = viewer.window.add_plugin_dock_widget("napari-vdsr", "Super-resolve")
    w._image.value = viewer.layers["cell low-res x2 (crop)"]
    w._scale_w.value = 2.0
    if has_default("sr"):
        w.run()
        wait_for(w, app)
    else:
        print("no bundled SR model: the SR screenshot shows the input only")
    # grid panels run from the bottom of the layer list: low-res input (nearest display), VDSR x2, original
    names = ["cell low-res x2 (crop)"] + [l.name for l in viewer.layers if "VDSR" in l.name] + ["cell original (crop)"]
    for i, nm in enumerate(names):
        viewer.layers.move(viewer.layers.index(nm), i)
    viewer.grid.enabled = True
    viewer.grid.shape = (1, len(names))
    viewer.text_overlay.visible = True
    viewer.text_overlay.text = "low-res input  |  VDSR x2  |  original"
    viewer.text_overlay.font_size = 14
    viewer.reset_view()
    viewer.layers.selection.active = viewer.layers[1]
    shot(viewer, "super_resolve.png", app)
    viewer.close()


def denoise(app) -> None:
    viewer = new_viewer()
    viewer.open_sample("napari-vdsr", "cell_noisy")
    _, w = viewer.window.add_plugin_dock_widget("napari-vdsr", "Denoise")
    w._sigma.value = 25.0
    if has_default("denoise"):
        w.run()
        wait_for(w, app)
        viewer.grid.enabled = True  # noisy input | denoised, whole images side by side
        viewer.reset_view()
    else:
        print("no bundled denoising model: the denoise screenshot shows the input only")
        viewer.reset_view()
        viewer.camera.zoom = viewer.camera.zoom * 2.5
        viewer.camera.center = (0, 375, 400)  # the cell
    shot(viewer, "denoise.png", app)
    viewer.close()


def deblock(app) -> None:
    viewer = new_viewer()
    viewer.open_sample("napari-vdsr", "camera_jpeg")
    _, w = viewer.window.add_plugin_dock_widget("napari-vdsr", "Remove compression artifacts")
    w._quality.value = 10
    if has_default("deblock"):
        w.run()
        wait_for(w, app)
        viewer.grid.enabled = True  # JPEG input | deblocked, whole images side by side
        viewer.reset_view()
    else:
        print("no bundled JPEG model: the deblock screenshot shows the input only")
        viewer.reset_view()
        viewer.camera.zoom = viewer.camera.zoom * 2.0
        viewer.camera.center = (0, 180, 260)
    shot(viewer, "remove_artifacts.png", app)
    viewer.close()


def stack(app) -> None:
    """A small z-stack made by shifting the cell image, to show 'current plane' vs 'whole stack'."""
    from skimage import data

    from napari_vdsr.core.degrade import downscale

    cell = data.cell().astype(np.float32)
    planes = [cell[:, 12 * k : 12 * k + 480] for k in range(5)]  # a drifting field of view
    small = np.clip(np.round(downscale(np.stack(planes), 2)), 0, 255).astype(np.uint8)
    viewer = new_viewer()
    viewer.add_image(small, name="stack (low-res)", scale=(4.0, 2.0, 2.0), axis_labels=("z", "y", "x"))
    viewer.dims.set_point(0, 8.0)
    _, w = viewer.window.add_plugin_dock_widget("napari-vdsr", "Super-resolve")
    w._extent.value = "current plane"
    if has_default("sr"):
        w.run()
        wait_for(w, app)
    viewer.reset_view()
    shot(viewer, "super_resolve_stack.png", app)
    viewer.close()


def main() -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*PyQt5 backend is deprecated.*")
    import napari  # noqa: F401

    try:  # keep napari's one-off "PyQt5 is deprecated" toast out of the pictures
        import napari._qt.qt_main_window as qmw

        qmw.SHOW_QT_WARNING = False
    except (ImportError, AttributeError):
        pass
    from qtpy.QtWidgets import QApplication

    OUT.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(2)
    from napari._qt.qt_event_loop import get_qapp

    app = get_qapp()
    assert QApplication.instance() is app
    for step in (super_resolve, denoise, deblock, stack):
        step(app)
    return 0


if __name__ == "__main__":
    sys.exit(main())
