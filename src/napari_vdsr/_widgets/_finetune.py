"""The Fine-tune widget: adapt a (bundled) model to the user's own layers, with live feedback.

A thin front-end over :func:`napari_vdsr.core.finetune.make_finetune_trainer`:
the widget only gathers settings and layer data; the training loop is
:meth:`napari_vdsr.core.train.Trainer.run`, iterated in a napari
``thread_worker`` whose yielded :class:`~napari_vdsr.core.train.TrainEvent`
objects drive the progress bar (with ETA), the live plot and the readout in the
GUI thread.  **Stop** calls :meth:`Trainer.stop`: the loop ends after the
current step and still exports the best model so far.  At the end the best
model is registered (:func:`~napari_vdsr.core.weights.register_model`) and the
restore widgets' model lists are refreshed, so it can be used at once.

The plot uses matplotlib's Qt canvas when matplotlib is installed (``pip install
napari-vdsr[all]``); without it the widget shows a text readout only.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    RadioButtons,
    Select,
    SpinBox,
)

from ..core.errors import Diverged, TrainingError, VDSRError
from ..core.finetune import FINETUNE_DEFAULTS, make_finetune_trainer
from ..core.train import SGD_CLIP_THETA, run_dir_is_free
from ..core.weights import TASK_LABELS, TASKS, default_model_name, list_models, read_card, register_model, resolve_model_path
from ._restore import DEFAULT, DEVICES, FROM_FILE, model_tooltip, refresh_model_choices, reset_choices_in_order

if TYPE_CHECKING:
    import napari

__all__ = ["FinetuneWidget", "DEFAULT_MODEL_DIR"]

#: Where fine-tuned models go unless another folder is chosen (one sub-folder per run).
DEFAULT_MODEL_DIR = Path.home() / ".napari-vdsr" / "models"

CLEAN = "clean images"
PAIRED = "degraded + clean pair"
TASK_CHOICES = [(f"{TASK_LABELS[t]} ({t})", t) for t in TASKS]
#: Learning rate / clipping θ suggested per optimiser (as in ``napari-vdsr finetune``).
OPTIMISER_DEFAULTS = {"adam": (float(FINETUNE_DEFAULTS["lr"]), 0.0), "sgd": (0.1, SGD_CLIP_THETA)}

THETA_TOOLTIP = (
    "Adjustable gradient clipping θ (Kim et al. 2016); 0 = off.\n"
    "Every gradient element is clipped to [−θ/γ, +θ/γ], where γ is the current learning rate,\n"
    "so one plain SGD step (γ × gradient) changes no weight by more than θ, whatever the learning rate:\n"
    "the paper's trick to train with high learning rates (SGD, lr 0.1) without exploding gradients.\n"
    "With SGD lr 0.1 use θ ≈ 0.0001 (momentum 0.9 can add up to ~10 θ per step; in our runs θ = 0.01\n"
    "diverged and 0.001 never got above bicubic, see docs/training.md). With Adam the steps are already\n"
    "normalised: leave it off."
)


@dataclass
class _Job:
    """Everything the worker needs, frozen when Fine-tune is pressed."""

    task: str
    images: Optional[list[Any]]
    pairs: Optional[list[tuple[Any, Any]]]
    base_model: Optional[str]
    base_label: str
    scales: list[float]
    out: Path
    name: str
    overrides: dict[str, Any]
    device: str
    stop: threading.Event = field(default_factory=threading.Event)
    trainer: Any = None


@dataclass
class _Failed:
    """Returned by the worker when the core refused the job (shown as a notification)."""

    message: str


@dataclass
class Curves:
    """The series shown in the live plot (also what the tests inspect)."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_psnr: list[float] = field(default_factory=list)
    baseline_psnr: Optional[float] = None
    base_model_psnr: Optional[float] = None
    total: int = 0


def _work(job: _Job):
    """Generator run in the worker thread: build the trainer, yield its events; return None or a _Failed."""
    try:
        trainer = make_finetune_trainer(
            job.task, images=job.images, pairs=job.pairs, base_model=job.base_model, scales=job.scales,
            out=str(job.out), name=job.name, device=job.device, **job.overrides,
        )
        job.trainer = trainer
        if job.stop.is_set():
            trainer.stop()
        gen = trainer.run()
        try:
            for ev in gen:
                if job.stop.is_set():
                    trainer.stop()
                yield ev
        finally:
            gen.close()
    except Diverged as exc:
        return _Failed(_diverged_message(exc, job))
    except VDSRError as exc:
        return _Failed(str(exc))
    except MemoryError:
        return _Failed(_OUT_OF_MEMORY)
    except ValueError as exc:  # pydantic ValidationError of TrainConfig, numpy shape errors
        errors = getattr(exc, "errors", None)
        if callable(errors):
            msg = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in errors())
            return _Failed(f"invalid settings: {msg}.")
        return _Failed(f"the training data could not be used ({exc}).")
    except RuntimeError as exc:
        text = str(exc).lower()
        if "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text:
            return _Failed(_OUT_OF_MEMORY)
        return _unexpected(exc, job)
    except Exception as exc:  # noqa: BLE001
        return _unexpected(exc, job)
    return None


_OUT_OF_MEMORY = ("the device ran out of memory; lower the batch size or the patch size, use fewer or smaller "
                  "layers (a crop), or on a GPU use the CPU.")


def _diverged_message(exc: Diverged, job: "_Job") -> str:
    """The widget's words for a loss that became NaN/inf: where, what is kept, what to change."""
    best = Path(str(job.out)) / "best.safetensors"
    kept = (f" The best model validated before that is kept as {best}: pick it with 'file…' (base model, to go "
            "on from it, or a restore widget's model)." if best.exists() else " No model was validated before it.")
    return (f"the training diverged: the loss became NaN or infinite at step {exc.step} (learning rate "
            f"{exc.lr:g}).{kept} Lower the learning rate, or choose the SGD optimiser with a clipping θ "
            "(e.g. 0.01), and start again.")


def _unexpected(exc: Exception, job: "_Job") -> _Failed:
    """Any other error, as a message. It must not escape the generator: superqt drops a RuntimeError
    (CUDA, cuDNN, MPS's NotImplementedError) without emitting ``finished``, so the widget stayed stuck."""
    logging.getLogger(__name__).exception("napari-vdsr: fine-tuning failed")
    return _Failed(f"training failed ({type(exc).__name__}: {exc}). The checkpoints written so far are kept in "
                   f"{job.out}; try device 'cpu' or a smaller batch; if it persists, please report it.")


def _slug(text: str) -> str:
    s = re.sub(r"[^\w.-]+", "-", text).strip("-._")  # \w: letters of any script, digits, _
    return s[:48] or "model"


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "…"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _spatial_shape(layer: Any) -> tuple[int, int]:
    data = layer.data[0] if layer.multiscale else layer.data
    shape = tuple(int(s) for s in data.shape)
    return shape[-3:-1] if layer.rgb else shape[-2:]


def _pair_offset(degraded: Any, clean: Any) -> Optional[float]:
    """How far apart (in clean pixels) napari shows the corners of a same-size pair; None when not comparable.

    A pair trains pixel for pixel as stored: a translate, scale, rotation or affine that lines the
    two layers up on screen is not applied to the data.
    """
    if degraded.ndim != clean.ndim or degraded.rgb != clean.rgb or _spatial_shape(degraded) != _spatial_shape(clean):
        return None
    h, w = _spatial_shape(clean)
    lead = [0.0] * (clean.ndim - 2)
    corners = [lead + [y, x] for y, x in ((0.0, 0.0), (h - 1.0, 0.0), (0.0, w - 1.0), (h - 1.0, w - 1.0))]
    try:
        a = np.array([degraded.data_to_world(c) for c in corners], dtype=float)[:, -2:]
        b = np.array([clean.data_to_world(c) for c in corners], dtype=float)[:, -2:]
        pixel = float(np.min(np.abs(np.asarray(clean.scale, dtype=float)[-2:]))) or 1.0
    except Exception:  # noqa: BLE001 - a check for a warning only
        return None
    return float(np.max(np.linalg.norm(a - b, axis=1))) / pixel


def _layer_array(layer: Any) -> Any:
    return layer.data[0] if layer.multiscale else layer.data


class _Plot:
    """Loss and held-out PSNR curves on a matplotlib Qt canvas (None canvas when matplotlib is missing)."""

    def __init__(self, theme: Optional[dict[str, str]] = None) -> None:
        self.canvas: Any = None
        self.lines: dict[str, Any] = {}
        try:
            from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
            from matplotlib.figure import Figure
        except ImportError:
            return
        th = theme or {}
        bg, fg = th.get("background", "#262930"), th.get("text", "#f0f1f2")
        fig = Figure(figsize=(3.6, 3.4), dpi=90, facecolor=bg, layout="constrained")
        self.ax_loss, self.ax_psnr = fig.subplots(2, 1, sharex=True)
        for ax in (self.ax_loss, self.ax_psnr):
            ax.set_facecolor(bg)
            ax.tick_params(colors=fg, labelsize=7)
            for sp in ax.spines.values():
                sp.set_color(fg)
            ax.grid(True, alpha=0.2)
        self.ax_loss.set_ylabel("loss (MSE)", color=fg, fontsize=8)
        self.ax_loss.set_yscale("log")
        self.ax_psnr.set_ylabel("held-out PSNR (dB)", color=fg, fontsize=8)
        self.ax_psnr.set_xlabel("step", color=fg, fontsize=8)
        (self.lines["loss"],) = self.ax_loss.plot([], [], color="#6aa6ff", lw=0.7, alpha=0.45, label="loss")
        (self.lines["loss_smooth"],) = self.ax_loss.plot([], [], color="#6aa6ff", lw=1.6, label="smoothed")
        (self.lines["finetuned"],) = self.ax_psnr.plot([], [], "o-", color="#ffb347", lw=1.5, ms=3, label="fine-tuned")
        (self.lines["base_model"],) = self.ax_psnr.plot([], [], "--", color="#b0e57c", lw=1.2, label="base model")
        (self.lines["baseline"],) = self.ax_psnr.plot([], [], ":", color="#d0d0d0", lw=1.2, label="input")
        self.fg, self.bg = fg, bg
        self.canvas = FigureCanvasQTAgg(fig)
        self.canvas.setMinimumHeight(260)
        self.figure = fig

    def update(self, c: Curves, baseline_label: str) -> None:
        if self.canvas is None:
            return
        steps = np.asarray(c.step, dtype=float)
        loss = np.asarray(c.loss, dtype=float)
        self.lines["loss"].set_data(steps, loss)
        if len(loss):
            alpha, acc, smooth = 0.1, float(loss[0]), np.empty_like(loss)
            for i, v in enumerate(loss):
                acc = alpha * v + (1 - alpha) * acc
                smooth[i] = acc
            self.lines["loss_smooth"].set_data(steps, smooth)
        else:
            self.lines["loss_smooth"].set_data([], [])
        xmax = max(1, c.total)
        vs = [0] if c.base_model_psnr is not None else []
        vp = [c.base_model_psnr] if c.base_model_psnr is not None else []
        self.lines["finetuned"].set_data(np.asarray(vs + c.val_step, float), np.asarray(vp + c.val_psnr, float))
        for key, val in (("base_model", c.base_model_psnr), ("baseline", c.baseline_psnr)):
            self.lines[key].set_data(([0.0, float(xmax)], [val, val]) if val is not None else ([], []))
        self.lines["baseline"].set_label(baseline_label)
        for ax in (self.ax_loss, self.ax_psnr):
            ax.set_xlim(0, xmax)
        if len(loss) and np.all(loss > 0):
            lo, hi = float(loss.min()), float(loss.max())
            self.ax_loss.set_ylim(lo / 1.3, hi * 1.3)
        # an exactly restored (flat) validation plane scores inf dB: not drawn, and no axis limit
        ys = [v for v in (vp + c.val_psnr + [c.baseline_psnr]) if v is not None and math.isfinite(v)]
        if ys:
            lo, hi = min(ys), max(ys)
            pad = max(0.2, 0.1 * (hi - lo))
            self.ax_psnr.set_ylim(lo - pad, hi + pad)
        if vp or c.val_psnr or c.baseline_psnr is not None:
            leg = self.ax_psnr.legend(fontsize=7, loc="center right", framealpha=0.85, facecolor=self.bg,
                                      edgecolor=self.bg)
            for t in leg.get_texts():
                t.set_color(self.fg)
        elif self.ax_psnr.get_legend() is not None:  # a new run without validation: nothing to label
            self.ax_psnr.get_legend().remove()
        self.canvas.draw_idle()


class FinetuneWidget(Container):
    """Fine-tune a VDSR model on image layers (clean data or a registered degraded/clean pair)."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=False)
        self._viewer = viewer
        self._worker: Any = None
        self._job: Optional[_Job] = None
        self._end: Any = None
        self._failed: Optional[str] = None
        self._t_start: Optional[float] = None
        self._step0 = 0
        self._last_draw = 0.0
        self._closed = False
        self._baseline_name = "bicubic"
        self.curves = Curves()
        #: name under which the last fine-tuned model was registered (None before / after a failure)
        self.registered_name: Optional[str] = None
        #: path of the last fine-tuned model file
        self.model_path: Optional[Path] = None

        # ---------------------------------------------------------------- data
        self._mode = RadioButtons(label="training data", name="mode", choices=[CLEAN, PAIRED], value=CLEAN)
        self._mode.tooltip = (
            "clean images: degradations (downscaling, noise or JPEG) are synthesised from your clean layers.\n"
            "degraded + clean pair: a registered pair of layers (same planes; for super-resolution the degraded "
            "layer may be the low-resolution one)."
        )
        self._images = Select(label="clean layers", name="images", choices=self._image_choices, allow_multiple=True)
        self._images.tooltip = (
            "One or more image layers (2-D or stacks; RGB uses its luminance). Every plane is a training image; "
            "a fraction of the planes is held out for validation."
        )
        self._images.native.setMaximumHeight(96)
        self._degraded = ComboBox(label="degraded layer", name="degraded", choices=self._image_choices, visible=False)
        self._clean = ComboBox(label="clean layer", name="clean", choices=self._image_choices, visible=False)

        # ---------------------------------------------------------------- task
        self._task = ComboBox(label="task", name="task", choices=TASK_CHOICES, value="sr")
        self._scales = LineEdit(label="SR scale(s)", name="scales", value="2")
        self._scales.tooltip = (
            "Magnification(s) to fine-tune for, e.g. '2' or '2, 3, 4' (each batch mixes them). "
            "In paired mode: the pair's magnification."
        )
        self._sigma_lo = FloatSpinBox(name="sigma_lo", min=0.0, max=255.0, step=5.0, value=5.0)
        self._sigma_hi = FloatSpinBox(name="sigma_hi", min=0.0, max=255.0, step=5.0, value=50.0)
        self._sigma = Container(widgets=[self._sigma_lo, self._sigma_hi], layout="horizontal", labels=False,
                                label="noise σ range", name="sigma_range", visible=False)
        self._sigma.tooltip = "Gaussian noise σ (0..255 scale) drawn uniformly from this range for every patch."
        self._q_lo = SpinBox(name="quality_lo", min=1, max=100, step=5, value=10)
        self._q_hi = SpinBox(name="quality_hi", min=1, max=100, step=5, value=40)
        self._quality = Container(widgets=[self._q_lo, self._q_hi], layout="horizontal", labels=False,
                                  label="JPEG quality range", name="quality_range", visible=False)
        self._quality.tooltip = "JPEG quality drawn uniformly from this range (1 = worst, 100 = best) for every patch."
        for c in (self._sigma, self._quality):
            c.margins = (0, 0, 0, 0)

        # ---------------------------------------------------------------- model and recipe
        self._base = ComboBox(label="base model", name="base_model", choices=self._base_choices)
        self._base_help = (
            "The model to start from: the bundled default for the task, a model registered in this session "
            "(e.g. an earlier fine-tune), or a .safetensors file."
        )
        self._base.tooltip = self._base_help
        self._base_file = FileEdit(label="base model file", name="base_file", mode="r", filter="*.safetensors",
                                   visible=False)
        self._steps = SpinBox(label="steps", name="steps", min=1, max=1_000_000, step=50,
                              value=int(FINETUNE_DEFAULTS["iterations"]))
        self._steps.tooltip = "Training iterations (one batch each). A few hundred adapt a bundled model on a CPU."
        self._batch = SpinBox(label="batch size", name="batch", min=1, max=1024, value=int(FINETUNE_DEFAULTS["batch_size"]))
        self._patch = SpinBox(label="patch size", name="patch", min=8, max=1024,
                              value=int(FINETUNE_DEFAULTS["patch_size"]))
        self._patch.tooltip = "Side of the square training patches in pixels (the paper uses 41, the receptive field)."
        self._lr = LineEdit(label="learning rate", name="lr", value=f"{OPTIMISER_DEFAULTS['adam'][0]:g}")
        self._lr.tooltip = "Initial learning rate γ (cosine decay to a tenth). Adam: 1e-5 to 1e-4; SGD: 0.01 to 0.1 with θ."
        self._optimizer = ComboBox(label="optimiser", name="optimizer", choices=["adam", "sgd"], value="adam")
        self._optimizer.tooltip = (
            "adam: robust default for fine-tuning. sgd: the paper's recipe (momentum 0.9) — use it with θ clipping. "
            "Switching sets the suggested learning rate and θ unless you changed them."
        )
        self._theta = FloatSpinBox(label="clipping θ", name="theta", min=0.0, max=10.0, step=0.0001, value=0.0)
        self._theta.native.setDecimals(6)  # θ down to 1e-6 (4 decimals turned 4e-5 into "off")
        self._theta.native.setSpecialValueText("off")
        self._theta.tooltip = THETA_TOOLTIP
        self._val_fraction = FloatSpinBox(label="validation fraction", name="val_fraction", min=0.0, max=0.9,
                                          step=0.05, value=float(FINETUNE_DEFAULTS["val_fraction"]))
        self._val_fraction.tooltip = (
            "Fraction of the planes held out (never trained on) to measure PSNR; a single 2-D image gives its "
            "bottom rows instead. 0 = no validation (no PSNR curve)."
        )
        self._val_every = SpinBox(label="validate every", name="val_every", min=1, max=100_000, value=25)
        self._val_every.tooltip = "Measure held-out PSNR every this many steps (one point on the plot each)."
        self._device = ComboBox(label="device", name="device", choices=list(DEVICES), value="auto")
        self._device.tooltip = "auto = CUDA if available, else Apple MPS, else CPU."
        self._out_dir = FileEdit(label="save to", name="out_dir", mode="d", value=str(DEFAULT_MODEL_DIR))
        self._out_dir.tooltip = (
            "Folder for fine-tuned models: each run writes a sub-folder NAME/ with best.safetensors (+ .json card), "
            "last.safetensors, checkpoint.pt and log.jsonl. The folder works as `napari-vdsr predict --model NAME/`."
        )
        self._name = LineEdit(label="model name", name="model_name", value="")
        self._name.native.setPlaceholderText("automatic: <layer>-<task>-finetuned")
        self._name.tooltip = "Name of the model (its sub-folder and its entry in the restore widgets' model lists)."

        # ---------------------------------------------------------------- run and feedback
        self._info = Label(name="info", value="")
        self._run_btn = PushButton(name="run", text="Fine-tune")
        self._stop_btn = PushButton(name="stop", text="Stop", enabled=False)
        self._stop_btn.tooltip = "Stop after the current step; the best model so far is kept, saved and registered."
        self._buttons = Container(widgets=[self._run_btn, self._stop_btn], layout="horizontal", labels=False)
        self._buttons.margins = (0, 0, 0, 0)
        self._progress = ProgressBar(name="progress", min=0, max=1, value=0)
        self._status = Label(name="status", value="")
        self._plot_box = Container(name="plot", labels=False)
        self._plot_box.margins = (0, 0, 0, 0)
        self._readout = Label(name="readout", value="")
        self._plot = _Plot(self._theme_colors())
        if self._plot.canvas is not None:
            self._plot_box.native.layout().addWidget(self._plot.canvas)
        else:
            self._plot_box.visible = False
            self._readout.tooltip = "Install matplotlib (pip install napari-vdsr[all]) for a live plot."

        self._settings = [
            self._mode, self._images, self._degraded, self._clean, self._task, self._scales, self._sigma,
            self._quality, self._base, self._base_file, self._steps, self._batch, self._patch, self._lr,
            self._optimizer, self._theta, self._val_fraction, self._val_every, self._device, self._out_dir, self._name,
        ]
        from qtpy.QtWidgets import QSizePolicy

        for lab in (self._info, self._status, self._readout):
            lab.native.setWordWrap(True)  # long messages wrap instead of widening the dock
            lab.native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self._form = Container(name="settings", labels=True)
        self._form.margins = (0, 0, 0, 0)
        self._form.extend(self._settings)  # added after construction so the label column is aligned
        self.extend([self._form, self._info, self._buttons, self._progress, self._status, self._plot_box,
                     self._readout])

        self._mode.changed.connect(self._update_state)
        self._task.changed.connect(self._on_task)
        self._base.changed.connect(self._update_state)
        for w in (self._base, self._base_file, self._task):
            w.changed.connect(self._update_base_tooltip)
        self._images.changed.connect(self._update_state)
        self._degraded.changed.connect(self._update_state)
        self._clean.changed.connect(self._update_state)
        self._patch.changed.connect(self._update_state)
        self._val_fraction.changed.connect(self._update_state)
        self._optimizer.changed.connect(self._on_optimizer)
        self._run_btn.changed.connect(self._on_run)
        self._stop_btn.changed.connect(self.stop)
        self.native.destroyed.connect(self._on_destroyed)
        self._preselect_active_layer()
        self._update_state()
        self._update_base_tooltip()

    # ------------------------------------------------------------------ choices

    def reset_choices(self, *args: Any) -> None:
        """Refresh the layer lists (napari calls this when layers change) and keep the selected layers.

        A renamed layer changes its label in the list; without this it dropped out of the selection.
        """
        keep = list(self._images.value or [])
        super().reset_choices(*args)
        still = [layer for layer in keep if any(layer is c for c in self._images.choices)]
        if still and list(self._images.value or []) != still:
            self._images.value = still

    def _image_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _base_choices(self, _widget: Any = None) -> list[tuple[str, str]]:
        task = self._task.value if hasattr(self, "_task") else "sr"
        try:
            default = default_model_name(task)
            choices = [(f"default ({default})", DEFAULT)]
        except VDSRError:
            default = None
            choices = [("default (none bundled yet)", DEFAULT)]
        choices += [(e.name, e.name) for e in list_models(task) if e.name != default]
        choices.append(("file…", FROM_FILE))
        return choices

    def _theme_colors(self) -> dict[str, str]:
        try:
            from napari.utils.theme import get_theme

            th = get_theme(self._viewer.theme)
            return {"background": th.background.as_hex(), "text": th.text.as_hex()}
        except Exception:  # noqa: BLE001 - cosmetic only; the plot falls back to a dark theme
            return {}

    def _preselect_active_layer(self) -> None:
        from napari.layers import Image

        active = self._viewer.layers.selection.active
        if isinstance(active, Image):
            self._images.value = [active]

    # ------------------------------------------------------------------ state

    @property
    def running(self) -> bool:
        """True while training runs."""
        return self._worker is not None

    @property
    def worker(self) -> Any:
        """The running napari worker, or None."""
        return self._worker

    @property
    def plot_lines(self) -> dict[str, Any]:
        """The matplotlib lines of the live plot by key (empty without matplotlib)."""
        return dict(self._plot.lines)

    def _on_task(self, *_: Any) -> None:
        self._base.reset_choices()
        if self._base.value not in [v for _, v in self._base_choices()]:
            self._base.value = DEFAULT
        self._update_state()

    def _on_optimizer(self, *_: Any) -> None:
        new = str(self._optimizer.value)
        old = "sgd" if new == "adam" else "adam"
        lr_old, th_old = OPTIMISER_DEFAULTS[old]
        lr_new, th_new = OPTIMISER_DEFAULTS[new]
        try:
            untouched_lr = math.isclose(float(self._lr.value), lr_old)
        except ValueError:
            untouched_lr = False
        if untouched_lr:
            self._lr.value = f"{lr_new:g}"
        if math.isclose(float(self._theta.value), th_old):
            self._theta.value = th_new

    def _update_base_tooltip(self, *_: Any) -> None:
        """The base model list's tooltip: what it offers, then the chosen model's validation and benchmark PSNR."""
        self._base.tooltip = model_tooltip(self._base_help, lambda: self._base_spec(str(self._task.value)))

    def _update_state(self, *_: Any) -> None:
        paired = self._mode.value == PAIRED
        task = self._task.value
        self._images.visible = not paired
        self._degraded.visible = paired
        self._clean.visible = paired
        self._scales.visible = task == "sr"
        self._sigma.visible = task == "denoise" and not paired
        self._quality.visible = task == "deblock" and not paired
        self._base_file.visible = self._base.value == FROM_FILE
        self._info.value = self._describe()

    def _describe(self) -> str:
        if self._mode.value == PAIRED:
            d, c = self._degraded.value, self._clean.value
            if d is None or c is None:
                return "pick a degraded and a clean layer"
            return f"pair: {d.name} {tuple(d.data.shape)} → {c.name} {tuple(c.data.shape)}"
        layers = list(self._images.value or [])
        if not layers:
            return "no clean layer selected: open an image and select it above"
        n = 0
        for layer in layers:
            shape = _layer_array(layer).shape
            lead = shape[:-3] if layer.rgb else shape[:-2]
            n += int(np.prod(lead)) if lead else 1
        f = float(self._val_fraction.value)
        if f <= 0:
            held = "no validation"
        elif n == 1:
            held = f"bottom {f:.0%} of the rows held out"
        else:
            held = f"≈{max(1, int(round(n * f)))} plane(s) held out"
        return f"{len(layers)} layer(s), {n} plane(s); {held}"

    def _set_controls(self, enabled: bool) -> None:
        for w in self._settings:
            w.enabled = enabled
        self._run_btn.enabled = enabled
        self._stop_btn.enabled = not enabled

    # ------------------------------------------------------------------ notifications

    def _notify(self, kind: str, message: str) -> None:
        from napari.utils import notifications

        getattr(notifications, f"show_{kind}")(message)

    # ------------------------------------------------------------------ building the job

    def _parse_scales(self) -> list[float]:
        text = str(self._scales.value).replace(";", ",")
        try:
            vals = [float(t) for t in re.split(r"[,\s]+", text.strip()) if t]
        except ValueError:
            raise TrainingError(f"SR scale(s) {text!r} is not a list of numbers; write e.g. '2' or '2, 3, 4'.") from None
        if not vals or any(not 1.0 <= v <= 16.0 for v in vals):
            raise TrainingError(f"SR scale(s) must be numbers between 1 and 16, got {text!r}.")
        return vals

    def _parse_lr(self) -> float:
        try:
            lr = float(str(self._lr.value).strip())
        except ValueError:
            lr = float("nan")
        if not (math.isfinite(lr) and lr > 0):
            raise TrainingError(f"learning rate {self._lr.value!r} must be a positive number such as 5e-5 or 0.01.")
        return lr

    def _base_spec(self, task: str) -> tuple[Optional[str], str]:
        from ..core.errors import ModelError

        choice = self._base.value
        if choice == FROM_FILE:
            path = Path(self._base_file.value or "")
            if not path.is_file():
                raise ModelError("choose a base model file (.safetensors) in 'base model file', or pick a listed model.")
            spec, label = str(path), path.name
        elif choice in (DEFAULT, None):
            try:
                label = default_model_name(task)
            except VDSRError:
                raise ModelError(
                    f"no bundled {TASK_LABELS[task]} model is installed: choose 'file…' as base model "
                    "(train one with `napari-vdsr train`)."
                ) from None
            spec = None
        else:
            spec, label = str(choice), str(choice)
        # quick check in the GUI thread: a model for another task is refused before any work starts
        card = read_card(resolve_model_path(spec if spec is not None else label))
        if task not in card.get("tasks", []):
            served = ", ".join(TASK_LABELS.get(t, t) for t in card.get("tasks", [])) or "no task"
            raise ModelError(
                f"the base model {label} was trained for {served}, not {TASK_LABELS[task]}; "
                f"choose a {task} model as the starting point (or switch the task)."
            )
        return spec, label

    def _layers(self) -> tuple[Optional[list[Any]], Optional[list[tuple[Any, Any]]], str]:
        from napari.layers import Image

        patch = int(self._patch.value)
        if self._mode.value == PAIRED:
            d, c = self._degraded.value, self._clean.value
            if not isinstance(d, Image) or not isinstance(c, Image):
                raise TrainingError("pick a degraded layer and a clean layer (image layers) for paired training.")
            if d is c:
                raise TrainingError("the degraded and the clean layer are the same layer; pick two different layers.")
            h, w = _spatial_shape(c)
            if min(h, w) < patch:
                raise TrainingError(
                    f"layer {c.name!r} is {h}×{w} px, smaller than one training patch ({patch} px per side); "
                    "lower the patch size or use a larger layer."
                )
            off = _pair_offset(d, c)
            if off is not None and off > 0.5:
                self._notify(
                    "warning",
                    f"Fine-tune: napari shows {d.name!r} and {c.name!r} up to {off:.3g} pixels apart (their "
                    "translate, scale, rotation or affine differ). A pair trains pixel for pixel as the data are "
                    "stored, so that alignment is not used: register the data themselves if the pixels do not "
                    "correspond.",
                )
            return None, [(_layer_array(d), _layer_array(c))], c.name
        layers = [lyr for lyr in (self._images.value or []) if isinstance(lyr, Image)]
        if not layers:
            raise TrainingError(
                "no clean image layer selected: open your images and select one or more in 'clean layers'."
            )
        for layer in layers:
            h, w = _spatial_shape(layer)
            if min(h, w) < patch:
                raise TrainingError(
                    f"layer {layer.name!r} is {h}×{w} px, smaller than one training patch ({patch} px per side); "
                    "lower the patch size or leave that layer out."
                )
        return [_layer_array(lyr) for lyr in layers], None, layers[0].name

    def _run_dir(self, name: str) -> tuple[Path, str]:
        # an empty field means the default folder (magicgui's value turns "" into the working directory)
        text = str(self._out_dir.line_edit.value or "").strip()
        root = Path(text or DEFAULT_MODEL_DIR).expanduser()
        try:
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=root):
                pass
        except OSError as exc:
            raise TrainingError(f"the folder {root} cannot be written to ({exc.strerror or exc}); choose another "
                                "'save to' folder.") from None
        base, k = name, 1
        while not run_dir_is_free(root / name):  # a refused start's bare lock file does not take the name
            k += 1
            name = f"{base}-{k}"
        return root / name, name

    def _make_job(self) -> Optional[_Job]:
        task = str(self._task.value)
        try:
            images, pairs, first = self._layers()
            scales = self._parse_scales() if task == "sr" else [2.0]
            if pairs is not None and task == "sr" and len(scales) > 1:
                raise TrainingError(
                    f"a degraded + clean pair has one SR scale, its own; write that factor alone in 'SR scale(s)' "
                    f"(got {', '.join(f'{s:g}' for s in scales)})."
                )
            lr = self._parse_lr()
            base_model, base_label = self._base_spec(task)
            theta = float(self._theta.value)
            overrides: dict[str, Any] = dict(
                iterations=int(self._steps.value), batch_size=int(self._batch.value), patch_size=int(self._patch.value),
                lr=lr, optimizer=str(self._optimizer.value), clip_theta=theta if theta > 0 else None,
                val_fraction=float(self._val_fraction.value), val_every=int(self._val_every.value),
            )
            if pairs is not None:
                pass  # the pair is the degradation: the σ and quality ranges (hidden) do not apply
            elif task == "sr" and min(scales) <= 1.0:
                raise TrainingError("an SR scale of 1 enlarges nothing, so there is nothing to learn from clean "
                                    "layers; write the magnification to fine-tune for, e.g. 2.")
            elif task == "denoise":
                lo, hi = float(self._sigma_lo.value), float(self._sigma_hi.value)
                if lo > hi:
                    raise TrainingError(f"noise σ range {lo:g}–{hi:g}: the first value must not exceed the second.")
                if hi <= 0:
                    raise TrainingError("noise σ range 0–0 adds no noise, so there is nothing to learn; raise the "
                                        "second value (e.g. 50).")
                overrides["sigma_range"] = (lo, hi)
            elif task == "deblock":
                qlo, qhi = int(self._q_lo.value), int(self._q_hi.value)
                if qlo > qhi:
                    raise TrainingError(f"JPEG quality range {qlo}–{qhi}: the first value must not exceed the second.")
                overrides["quality_range"] = (qlo, qhi)
            name = _slug(str(self._name.value).strip() or f"{first}-{task}-finetuned")
            out, name = self._run_dir(name)
        except VDSRError as exc:
            self._notify("error", f"Fine-tune: {exc}")
            return None
        return _Job(task=task, images=images, pairs=pairs, base_model=base_model, base_label=base_label,
                    scales=scales, out=out, name=name, overrides=overrides, device=str(self._device.value))

    # ------------------------------------------------------------------ running

    def _on_run(self, *_: Any) -> None:
        self.run()

    def run(self) -> Any:
        """Start fine-tuning in a worker thread; return the worker (None if the settings were refused).

        Progress, the plot and the readout update as training events arrive;
        at the end the best model is registered and listed in the restore widgets.
        """
        from napari.qt.threading import create_worker

        from ._triton_guard import keep_triton_out

        if self.running:
            self._notify("info", "Fine-tune is already running; press Stop or wait for it to finish.")
            return None
        job = self._make_job()
        if job is None:
            return None
        self._job = job
        self._end = None
        self._failed = None
        self.registered_name = None
        self.model_path = None
        self.curves = Curves(total=int(job.overrides["iterations"]))
        # what the "input" PSNR line measures: bicubic enlargement, or the degraded layer itself
        self._baseline_name = "bicubic" if job.task == "sr" and job.pairs is None else "input"
        self._t_start = None
        self._step0 = 0
        self._progress.max = max(1, self.curves.total)
        self._progress.value = 0
        self._progress.native.setFormat("%v / %m steps")
        self._status.value = f"preparing: {job.base_label} → {job.out}"
        self._readout.value = ""
        self._redraw(force=True)
        keep_triton_out()  # before the worker builds its optimiser (torch would load Triton then)
        worker = create_worker(_work, job, _start_thread=False)
        worker.yielded.connect(self._on_event)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._set_controls(False)
        worker.start()
        return worker

    def stop(self, *_: Any) -> None:
        """Stop after the current step; the best model so far is still exported and registered."""
        job = self._job
        if job is None or self._worker is None:
            return
        job.stop.set()
        if job.trainer is not None:
            job.trainer.stop()
        self._stop_btn.enabled = False
        self._status.value = "stopping after this step…"

    def _baseline_label(self) -> str:
        return self._baseline_name

    def _redraw(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_draw > 0.3:
            self._plot.update(self.curves, self._baseline_label())
            self._last_draw = now

    def _on_event(self, ev: Any) -> None:
        c = self.curves
        if ev.kind in ("done", "stopped"):
            self._end = ev
        if self._closed:
            return
        if ev.kind == "start":
            self._t_start = time.monotonic()
            self._step0 = int(ev.step)
            c.total = int(ev.total)
            c.base_model_psnr = ev.val_base_model_psnr
            self._progress.max = max(1, c.total)
            self._progress.value = int(ev.step)
            if not (self._job is not None and self._job.stop.is_set()):  # Stop pressed while preparing: say so still
                self._status.value = ev.message
            notes = getattr(getattr(self._job, "trainer", None), "data_notes", None)
            if notes:  # the status line is overwritten by the first step: what was left out must stay visible
                self._notify("warning", "Fine-tune: " + "; ".join(str(n) for n in notes))
            if ev.val_base_model_psnr is not None:
                self._readout.value = f"base model {self._job.base_label}: held-out PSNR {ev.val_base_model_psnr:.2f} dB"
            self._redraw(force=True)
        elif ev.kind == "step":
            if ev.loss is not None:  # on a GPU the loss is read back every few steps
                c.step.append(int(ev.step))
                c.loss.append(float(ev.loss))
            self._progress.value = min(int(ev.step), self._progress.max)
            done = ev.step - self._step0
            if self._t_start is not None and done > 0:
                per = (time.monotonic() - self._t_start) / done
                eta = per * (ev.total - ev.step)
                self._status.value = f"step {ev.step}/{ev.total} · {per:.2f} s/step · ETA {_fmt_eta(eta)}"
                self._progress.native.setFormat(f"%v / %m steps · ETA {_fmt_eta(eta)}")
            self._redraw()
        elif ev.kind == "val":
            c.val_step.append(int(ev.step))
            c.val_psnr.append(float(ev.val_psnr))
            c.baseline_psnr = ev.val_baseline_psnr
            if ev.val_base_model_psnr is not None:
                c.base_model_psnr = ev.val_base_model_psnr
            self._readout.value = self._psnr_text(ev.val_psnr, prefix=f"step {ev.step}: held-out PSNR ")
            self._redraw(force=True)
        elif ev.kind in ("done", "stopped"):
            self._progress.value = min(int(ev.step), self._progress.max)
            self._progress.native.setFormat("%v / %m steps")
            self._redraw(force=True)

    def _psnr_text(self, psnr: Optional[float], prefix: str = "") -> str:
        c = self.curves
        if psnr is None:
            return prefix + "not measured (no held-out planes: raise the validation fraction)"
        parts = [f"{prefix}{psnr:.2f} dB"]
        if c.base_model_psnr is not None:
            parts.append(f"{psnr - c.base_model_psnr:+.2f} dB vs base model ({c.base_model_psnr:.2f})")
        if c.baseline_psnr is not None:
            parts.append(f"{psnr - c.baseline_psnr:+.2f} dB vs {self._baseline_label()} ({c.baseline_psnr:.2f})")
        return "; ".join(parts)

    def _on_returned(self, result: Any) -> None:
        if isinstance(result, _Failed):
            self._failed = result.message

    def _on_errored(self, exc: BaseException) -> None:
        self._failed = f"training failed ({type(exc).__name__}: {exc})."

    def _on_finished(self) -> None:
        job, end, failed = self._job, self._end, self._failed
        self._worker = None
        self._job = None
        try:
            if failed is not None:
                self._show(status="failed: nothing was registered")
                self._notify("error", f"Fine-tune: {failed}")
            elif job is not None and end is not None:
                self._finish(job, end)
            else:
                self._show(status="ended without a model")
        finally:
            if job is not None:
                job.trainer = None
            self._release_memory(job)
            if not self._closed:
                self._set_controls(True)
                self._stop_btn.enabled = False

    def _show(self, status: Optional[str] = None, readout: Optional[str] = None) -> None:
        """Update the status / readout lines (no-op once the widget's Qt side is gone)."""
        if self._closed:
            return
        if status is not None:
            self._status.value = status
        if readout is not None:
            self._readout.value = readout

    def _on_destroyed(self, *_: Any) -> None:
        # the viewer (or the dock) was deleted while training: stop, export and register quietly
        self._closed = True
        if self._job is not None:
            self._job.stop.set()

    def _finish(self, job: _Job, end: Any) -> None:
        path = Path(end.path) if end.path else None
        if path is None or path.suffix != ".safetensors" or not path.is_file():
            self._show(status="ended without an exported model")
            self._notify("warning", f"Fine-tune {end.kind} at step {end.step} without an exported model; nothing registered.")
            return
        if end.step <= self._step0:
            self._show(status=f"stopped before the first step; the model in {job.out} equals the base model")
            self._notify("info", "Fine-tune stopped before the first step; the base model is unchanged, nothing registered.")
            return
        try:
            name = register_model(path, name=job.name)
        except VDSRError as exc:
            self._notify("error", f"Fine-tune: the model was saved to {path} but could not be registered: {exc}")
            return
        self.registered_name = name
        self.model_path = path
        refresh_model_choices()
        if not self._closed:
            reset_choices_in_order(self._base)
        gain = self._psnr_text(end.best_psnr, prefix="best held-out PSNR ")
        verb = "finished" if end.kind == "done" else f"stopped at step {end.step}/{end.total}"
        self._show(status=f"{verb}; model '{name}' registered", readout=gain)
        self._notify(
            "info",
            f"Fine-tune {verb}: {gain}. Model '{name}' saved in {path.parent} and listed in the "
            f"{TASK_LABELS[job.task]} widget's model list.",
        )

    def _release_memory(self, job: Optional[_Job]) -> None:
        if job is None or job.device in ("cpu",):
            return
        try:
            import gc

            import torch

            if torch.cuda.is_available():
                gc.collect()
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - freeing cache is best-effort
            pass
