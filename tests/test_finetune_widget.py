"""GUI tests of the Fine-tune widget (training engine driven from napari).

Like tests/test_widgets.py they need napari, a Qt binding and a display
(pytest-xvfb starts Xvfb when the binary exists); otherwise the module is
skipped with the reason.  A tiny random base model (depth 3, width 8) and small
synthetic stacks keep each run to a second or two of CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import NO_DISPLAY_REASON, no_display

pytest.importorskip("napari", reason="napari is not installed (pip install -e .[testing])")
pytest.importorskip("qtpy", reason="no Qt binding (pip install -e .[testing])")
if no_display():
    pytest.skip(NO_DISPLAY_REASON, allow_module_level=True)

import torch  # noqa: E402

from napari_vdsr._widgets import FinetuneWidget, SuperResolveWidget  # noqa: E402
from napari_vdsr._widgets import _finetune, _restore  # noqa: E402
from napari_vdsr.core import weights  # noqa: E402
from napari_vdsr.core.model import VDSR  # noqa: E402
from napari_vdsr.core.synthetic import synthetic_cells  # noqa: E402

pytestmark = pytest.mark.gui

WAIT_MS = 60_000


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _private_registry(monkeypatch):
    """Models registered by a test do not leak into other tests."""
    monkeypatch.setattr(weights, "_user_models", {})


def _tiny(path: Path, tasks: list[str]) -> str:
    torch.manual_seed(0)
    return str(weights.save_model(VDSR(depth=3, width=8), path, {"tasks": tasks, "scales": [2.0], "name": path.stem}))


@pytest.fixture(scope="module")
def sr_model(tmp_path_factory) -> str:
    return _tiny(tmp_path_factory.mktemp("models") / "tiny-sr.safetensors", ["sr"])


@pytest.fixture(scope="module")
def denoise_model(tmp_path_factory) -> str:
    return _tiny(tmp_path_factory.mktemp("models") / "tiny-dn.safetensors", ["denoise"])


def make_widget(viewer, base_model: str, out: Path, task: str = "sr", **values) -> FinetuneWidget:
    w = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(w, name="Fine-tune")
    w._task.value = task
    w._base.value = _restore.FROM_FILE
    w._base_file.value = base_model
    w._out_dir.value = str(out)
    w._device.value = "cpu"
    settings = dict(steps=6, batch=4, patch=16, val_every=3, lr="1e-3")
    settings.update(values)
    for key, val in settings.items():
        getattr(w, f"_{key}").value = val
    return w


def shown(widget) -> bool:
    """Not explicitly hidden (``visible`` is False for every widget of an unshown test viewer)."""
    return not widget.native.isHidden()


def run_and_wait(w: FinetuneWidget, qtbot):
    worker = w.run()
    assert worker is not None, "the widget refused to start"
    qtbot.waitUntil(lambda: not w.running, timeout=WAIT_MS)
    return worker


# --------------------------------------------------------------------------- end to end


def test_tiny_run_plots_saves_registers(make_napari_viewer, qtbot, sr_model, tmp_path, notes):
    viewer = make_napari_viewer()
    stack = synthetic_cells((4, 48, 48), seed=1)
    original = stack.copy()
    layer = viewer.add_image(stack, name="cells")
    restore = SuperResolveWidget(viewer)
    viewer.window.add_dock_widget(restore, name="Super-resolve")
    w = make_widget(viewer, sr_model, tmp_path, steps=12, val_every=4, theta=0.01, name="my-cells")
    assert w._images.value == [layer]  # the active layer is preselected
    assert "4 plane(s)" in w._info.value
    run_and_wait(w, qtbot)

    # the live plot received every point
    c = w.curves
    assert c.step == list(range(1, 13))
    assert len(c.loss) == 12 and all(np.isfinite(c.loss))
    assert c.val_step == [4, 8, 12]
    assert c.base_model_psnr is not None and c.baseline_psnr is not None
    if w.plot_lines:  # matplotlib installed: the lines hold the same series
        np.testing.assert_array_equal(w.plot_lines["loss"].get_xdata(), c.step)
        np.testing.assert_allclose(w.plot_lines["loss"].get_ydata(), c.loss)
        np.testing.assert_array_equal(w.plot_lines["finetuned"].get_xdata(), [0, 4, 8, 12])
        np.testing.assert_allclose(w.plot_lines["finetuned"].get_ydata(), [c.base_model_psnr, *c.val_psnr])
        assert w.plot_lines["base_model"].get_ydata()[0] == pytest.approx(c.base_model_psnr)
    assert w._progress.value == 12 and w._progress.max == 12

    # saved, loadable, with its recipe; registered and listed in the restore widget
    assert w.registered_name == "my-cells"
    assert w.model_path == tmp_path / "my-cells" / "best.safetensors"
    model, card = weights.load_model(w.model_path, task="sr")
    assert (model.depth, model.width) == (3, 8)
    assert card["finetuned_from"]["path"] == sr_model
    assert card["training"]["recipe"]["clip_theta"] == 0.01
    assert card["training"]["recipe"]["iterations"] == 12
    assert card["metrics"]["validation"]["base_model_psnr"] == pytest.approx(c.base_model_psnr)
    assert "my-cells" in restore._model.choices
    assert "my-cells" in w._base.choices  # also usable as the next base model
    assert any("vs base model" in n and "my-cells" in n for n in notes), notes
    assert not any("error" in n.lower() for n in notes), notes
    # controls back, input untouched
    assert w._run_btn.enabled and not w._stop_btn.enabled and w._steps.enabled
    assert layer.data is stack and np.array_equal(stack, original)


def test_stop_keeps_best_model(make_napari_viewer, qtbot, sr_model, tmp_path, notes):
    viewer = make_napari_viewer()
    viewer.add_image(synthetic_cells((3, 40, 40), seed=2), name="cells")
    w = make_widget(viewer, sr_model, tmp_path, steps=100_000, val_every=3, name="stopped")
    w.run()
    qtbot.waitUntil(lambda: len(w.curves.val_step) >= 2, timeout=WAIT_MS)
    w.stop()
    assert not w._stop_btn.enabled
    qtbot.waitUntil(lambda: not w.running, timeout=WAIT_MS)

    assert w.curves.step[-1] < 100_000
    best = tmp_path / "stopped" / "best.safetensors"
    assert best.is_file() and w.model_path == best
    _, card = weights.load_model(best, task="sr")
    assert card["metrics"]["validation"]["psnr"] == pytest.approx(max(w.curves.val_psnr))
    assert w.registered_name == "stopped"
    assert any("stopped at step" in n for n in notes), notes
    assert w._run_btn.enabled


def test_paired_denoise(make_napari_viewer, qtbot, denoise_model, tmp_path, notes):
    viewer = make_napari_viewer()
    clean = synthetic_cells((3, 40, 40), seed=3, photons=None, dtype=np.float32)
    noisy = (clean + np.random.default_rng(0).normal(0, 0.1, clean.shape)).astype(np.float32)
    viewer.add_image(noisy, name="noisy")
    viewer.add_image(clean, name="clean")
    w = make_widget(viewer, denoise_model, tmp_path, task="denoise", steps=6, val_every=3, val_fraction=0.34)
    w._mode.value = _finetune.PAIRED
    w._degraded.value = viewer.layers["noisy"]
    w._clean.value = viewer.layers["clean"]
    assert shown(w._degraded) and not shown(w._images) and not shown(w._sigma)
    run_and_wait(w, qtbot)

    assert w.registered_name == "clean-denoise-finetuned", notes
    assert w.curves.val_step == [3, 6]
    assert "vs input" in w._readout.value  # paired: the baseline is the degraded layer, not bicubic
    _, card = weights.load_model(w.model_path, task="denoise")
    assert card["training"]["val_planes"] == 1 and card["training"]["train_planes"] == 2
    assert w.model_path.parent.parent == tmp_path
    assert not any("pixels apart" in n for n in notes), notes


def test_a_pair_lined_up_only_in_the_viewer_is_reported(make_napari_viewer, denoise_model, tmp_path, notes):
    viewer = make_napari_viewer()
    clean = synthetic_cells((2, 40, 40), seed=3, photons=None, dtype=np.float32)
    viewer.add_image(clean[:, 3:, :], name="noisy", translate=(0, 3, 0))  # cropped, then shifted back on screen
    viewer.add_image(clean[:, :37, :], name="clean")
    w = make_widget(viewer, denoise_model, tmp_path, task="denoise")
    w._mode.value = _finetune.PAIRED
    w._degraded.value = viewer.layers["noisy"]
    w._clean.value = viewer.layers["clean"]
    job = w._make_job()
    assert job is not None  # a warning, not a refusal
    assert any("up to 3 pixels apart" in n and "register the data" in n for n in notes), notes


def test_planes_left_out_are_said_in_a_notification(make_napari_viewer, qtbot, sr_model, tmp_path, notes):
    viewer = make_napari_viewer()
    big = viewer.add_image(synthetic_cells((3, 48, 48), seed=5), name="big")
    small = viewer.add_image(synthetic_cells((1, 17, 17), seed=6), name="small")  # one patch, but not its margins
    w = make_widget(viewer, sr_model, tmp_path, steps=3, val_every=3)
    w._images.value = [big, small]
    run_and_wait(w, qtbot)
    assert any("smaller than one patch left out" in n for n in notes), notes
    assert w.registered_name is not None


def test_second_run_gets_its_own_folder(make_napari_viewer, qtbot, sr_model, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(synthetic_cells((2, 40, 40), seed=4), name="cells")
    w = make_widget(viewer, sr_model, tmp_path, steps=2, val_every=2, name="run")
    run_and_wait(w, qtbot)
    first = w.model_path
    run_and_wait(w, qtbot)
    assert first != w.model_path and first.is_file() and w.model_path.is_file()
    assert w.registered_name == "run-2"


# --------------------------------------------------------------------------- bad input


def test_layer_smaller_than_patch(make_napari_viewer, sr_model, tmp_path, notes):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((3, 20, 20), np.uint16), name="tiny layer")
    w = make_widget(viewer, sr_model, tmp_path, patch=24)
    assert w.run() is None
    assert any("'tiny layer'" in n and "smaller than one training patch" in n for n in notes), notes
    assert not tmp_path.joinpath("tiny-layer-sr-finetuned").exists()


def test_mismatched_pair(make_napari_viewer, qtbot, denoise_model, tmp_path, notes):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((2, 40, 50), np.uint8), name="degraded")
    viewer.add_image(np.zeros((2, 48, 48), np.uint8), name="clean")
    w = make_widget(viewer, denoise_model, tmp_path, task="denoise")
    w._mode.value = _finetune.PAIRED
    w._degraded.value = viewer.layers["degraded"]
    w._clean.value = viewer.layers["clean"]
    run_and_wait(w, qtbot)
    assert any("differ in size" in n for n in notes), notes
    assert w.registered_name is None and w.model_path is None
    assert weights.list_models("denoise") == [e for e in weights.list_models("denoise") if e.bundled]
    assert w._run_btn.enabled and w._mode.enabled and not w._stop_btn.enabled


def test_base_model_for_another_task(make_napari_viewer, sr_model, tmp_path, notes):
    viewer = make_napari_viewer()
    viewer.add_image(synthetic_cells((2, 40, 40)), name="cells")
    w = make_widget(viewer, sr_model, tmp_path, task="deblock")
    assert shown(w._quality) and not shown(w._scales)
    w._base.value = _restore.FROM_FILE  # the task change reset the base model list
    w._base_file.value = sr_model
    assert w.run() is None
    assert any("not JPEG artifact removal" in n for n in notes), notes


@pytest.mark.parametrize(
    "field, value, message",
    [("lr", "fast", "learning rate"), ("scales", "2, x", "SR scale"), ("scales", "20", "between 1 and 16"),
     ("scales", "1", "enlarges nothing")],
)
def test_bad_settings(make_napari_viewer, sr_model, tmp_path, notes, field, value, message):
    viewer = make_napari_viewer()
    viewer.add_image(synthetic_cells((2, 40, 40)), name="cells")
    w = make_widget(viewer, sr_model, tmp_path)
    getattr(w, f"_{field}").value = value
    assert w.run() is None
    assert any(message in n for n in notes), notes


def test_no_layer(make_napari_viewer, sr_model, tmp_path, notes):
    viewer = make_napari_viewer()
    w = make_widget(viewer, sr_model, tmp_path)
    assert w.run() is None
    assert any("no clean image layer" in n for n in notes), notes


# --------------------------------------------------------------------------- controls


def test_optimizer_switch_suggests_lr_and_theta(make_napari_viewer):
    w = FinetuneWidget(make_napari_viewer())
    assert w._optimizer.value == "adam" and w._theta.value == 0
    assert "θ/γ" in w._theta.tooltip and "learning rate" in w._theta.tooltip
    w._optimizer.value = "sgd"
    assert float(w._lr.value) == 0.1 and w._theta.value == pytest.approx(0.0001)
    w._lr.value = "0.02"  # a user's choice is kept
    w._optimizer.value = "adam"
    assert float(w._lr.value) == 0.02 and w._theta.value == 0


def test_without_matplotlib_text_readout(make_napari_viewer, qtbot, sr_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_qtagg", None)  # import fails
    viewer = make_napari_viewer()
    viewer.add_image(synthetic_cells((2, 40, 40), seed=5), name="cells")
    w = make_widget(viewer, sr_model, tmp_path, steps=3, val_every=3)
    assert w.plot_lines == {} and w._plot_box.native.isHidden()
    run_and_wait(w, qtbot)
    assert w.curves.val_step == [3]
    assert "held-out PSNR" in w._readout.value and "vs base model" in w._readout.value


def test_opens_from_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-vdsr", "Fine-tune")
    assert isinstance(widget, FinetuneWidget)
    assert widget._base.value == _restore.DEFAULT


def test_widget_deleted_while_training_stops_and_registers(make_napari_viewer, qtbot, sr_model, tmp_path, notes):
    viewer = make_napari_viewer()
    viewer.add_image(synthetic_cells((3, 40, 40), seed=6), name="cells")
    w = make_widget(viewer, sr_model, tmp_path, steps=100_000, val_every=3, name="orphan")
    w.run()
    qtbot.waitUntil(lambda: len(w.curves.val_step) >= 1, timeout=WAIT_MS)
    w.native.destroyed.emit()  # what Qt sends when the viewer closes with the dock
    qtbot.waitUntil(lambda: not w.running, timeout=WAIT_MS)
    assert w.registered_name == "orphan"
    assert (tmp_path / "orphan" / "best.safetensors").is_file()
    assert any("stopped at step" in n for n in notes), notes


def test_unexpected_error_during_training_is_reported_and_frees_the_widget(
        make_napari_viewer, qtbot, sr_model, tmp_path, monkeypatch, notes):
    """superqt drops a RuntimeError raised by a generator worker without 'finished': the widget must not stick."""
    viewer = make_napari_viewer()
    viewer.add_image(synthetic_cells((3, 40, 40), seed=7), name="cells")
    w = make_widget(viewer, sr_model, tmp_path, steps=50, name="broken")
    real = _finetune.make_finetune_trainer

    def breaking(*args, **kwargs):
        trainer = real(*args, **kwargs)
        inner = trainer.run

        def run():
            for ev in inner():
                yield ev
                if ev.kind == "step" and ev.step >= 2:
                    raise RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")

        trainer.run = run
        return trainer

    monkeypatch.setattr(_finetune, "make_finetune_trainer", breaking)
    run_and_wait(w, qtbot)
    assert w.registered_name is None
    assert any("RuntimeError" in n and "CUDNN_STATUS" in n and str(tmp_path) in n for n in notes), notes
    assert w._run_btn.enabled and not w._stop_btn.enabled and w._steps.enabled


def test_a_diverging_run_says_where_what_is_kept_and_what_to_change(make_napari_viewer, qtbot, sr_model, tmp_path,
                                                                    notes, monkeypatch):
    from napari_vdsr.core.train import Trainer

    real_step = Trainer._train_step

    def step(self, k):  # the loss turns NaN from step 6 on, after the validations at steps 2 and 4
        out = real_step(self, k)
        return out * float("nan") if k >= 5 else out

    monkeypatch.setattr(Trainer, "_train_step", step)
    viewer = make_napari_viewer()
    viewer.add_image(synthetic_cells((3, 40, 40), seed=8), name="cells")
    w = make_widget(viewer, sr_model, tmp_path, steps=12, val_every=2, name="wild")
    run_and_wait(w, qtbot)
    assert w.registered_name is None
    note = next(n for n in notes if "diverged" in n)
    assert "NaN or infinite at step" in note and "Lower the learning rate" in note and "--" not in note
    best = tmp_path / "wild" / "best.safetensors"
    assert best.exists() and str(best) in note  # the model validated before is kept, and named
    assert w._run_btn.enabled and not w._stop_btn.enabled


def test_no_noise_is_refused_and_a_refused_start_does_not_take_the_name(make_napari_viewer, sr_model, denoise_model,
                                                                        tmp_path, notes):
    from napari_vdsr.core.train import LOCK_NAME

    viewer = make_napari_viewer()
    viewer.add_image(synthetic_cells((2, 40, 40)), name="cells")
    w = make_widget(viewer, denoise_model, tmp_path, task="denoise", name="quiet")
    w._sigma_lo.value, w._sigma_hi.value = 0.0, 0.0
    assert w.run() is None
    assert any("adds no noise" in n for n in notes), notes
    # a folder left with only the lock file of a start that was refused is free again (no 'quiet-2')
    (tmp_path / "quiet").mkdir()
    (tmp_path / "quiet" / LOCK_NAME).write_text("12345\n")
    w._sigma_hi.value = 30.0
    job = w._make_job()
    assert job is not None and job.name == "quiet" and job.out == tmp_path / "quiet"
    assert "sigma_range" in job.overrides
    (tmp_path / "quiet" / "best.safetensors").write_bytes(b"x")  # a folder with a model in it is not
    assert w._make_job().name == "quiet-2"


def test_settings_are_taken_as_given_or_refused_clearly(make_napari_viewer, sr_model, tmp_path, notes):
    viewer = make_napari_viewer()
    viewer.add_image(synthetic_cells((2, 40, 40), seed=8), name="Zellen-ü")
    w = make_widget(viewer, sr_model, tmp_path, name="")
    w._theta.value = 4e-5  # the paper's θ range reaches far below 1e-3
    assert w._theta.value == pytest.approx(4e-5)
    job = w._make_job()
    assert job.overrides["clip_theta"] == pytest.approx(4e-5)
    assert job.name == "Zellen-ü-sr-finetuned" and job.out == tmp_path / "Zellen-ü-sr-finetuned"  # letters of any script kept
    w._out_dir.line_edit.value = ""  # an empty 'save to' is the default folder, not the working directory
    assert w._make_job().out.parent == _finetune.DEFAULT_MODEL_DIR.expanduser()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    w._out_dir.value = str(blocker / "sub")  # a folder that cannot be made
    assert w._make_job() is None and any("cannot be written to" in n for n in notes), notes


def test_a_pair_takes_one_sr_scale(make_napari_viewer, sr_model, tmp_path, notes):
    viewer = make_napari_viewer()
    clean = synthetic_cells((1, 48, 48), seed=9)[0]
    viewer.add_image(clean[::2, ::2], name="low")
    viewer.add_image(clean, name="high")
    w = make_widget(viewer, sr_model, tmp_path)
    w._mode.value = _finetune.PAIRED
    w._degraded.value, w._clean.value = viewer.layers["low"], viewer.layers["high"]
    w._scales.value = "2, 3"
    assert w._make_job() is None and any("one SR scale" in n for n in notes), notes
    w._scales.value = "2"
    assert w._make_job().scales == [2.0]


def test_renaming_a_selected_layer_keeps_it_selected(make_napari_viewer, sr_model, tmp_path):
    viewer = make_napari_viewer()
    a = viewer.add_image(synthetic_cells((1, 40, 40), seed=1), name="a")
    b = viewer.add_image(synthetic_cells((1, 40, 40), seed=2), name="b")
    w = make_widget(viewer, sr_model, tmp_path)
    w._images.value = [a, b]
    a.name = "renamed"
    w.reset_choices()  # what napari does when a layer changes
    assert {layer.name for layer in w._images.value} == {"renamed", "b"}


def test_plot_of_a_run_without_validation_has_no_stale_legend(make_napari_viewer):
    pytest.importorskip("matplotlib")
    plot = _finetune._Plot()
    plot.update(_finetune.Curves(total=10, step=[1, 2], loss=[0.1, 0.05], val_step=[2], val_psnr=[30.0],
                                 baseline_psnr=29.0), "bicubic")
    assert plot.ax_psnr.get_legend() is not None
    plot.update(_finetune.Curves(total=10, step=[1], loss=[0.1]), "bicubic")  # the next run: no validation
    assert plot.ax_psnr.get_legend() is None


def test_base_model_tooltip_shows_the_chosen_models_numbers(make_napari_viewer, sr_model, tmp_path):
    """The base model list tells what the chosen model measured; a model for another task shows the help alone."""
    viewer = make_napari_viewer()
    w = make_widget(viewer, sr_model, tmp_path)
    assert w._base.tooltip.startswith(w._base_help) and "tiny-sr.safetensors:" in w._base.tooltip
    assert "no metrics recorded" in w._base.tooltip  # the tiny model's card has none
    w._base.value = _restore.DEFAULT  # the bundled default SR model and its benchmark numbers
    assert f"{weights.default_model_name('sr')}:" in w._base.tooltip and "benchmark PSNR" in w._base.tooltip
    w._task.value = "denoise"
    assert f"{weights.default_model_name('denoise')}:" in w._base.tooltip and "sigma 25" in w._base.tooltip
    w._base.value = _restore.FROM_FILE
    w._base_file.value = sr_model  # an SR model as the base of a denoising fine-tune: refused, no numbers
    assert w._base.tooltip == w._base_help


def test_plot_takes_an_infinite_psnr_of_a_constant_validation_plane(make_napari_viewer):
    """A flat validation plane restored exactly scores inf dB: the plot keeps finite limits instead of failing."""
    pytest.importorskip("matplotlib")
    plot = _finetune._Plot()
    plot.update(_finetune.Curves(total=10, step=[1, 2], loss=[0.1, 0.05], val_step=[2, 4],
                                 val_psnr=[31.0, float("inf")], baseline_psnr=float("inf"), base_model_psnr=30.0),
                "bicubic")
    lo, hi = plot.ax_psnr.get_ylim()
    assert np.isfinite([lo, hi]).all() and lo < 30.0 and hi > 31.0
