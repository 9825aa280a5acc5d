"""The Super-resolve, Denoise and Remove-compression-artifacts widgets.

One base class, :class:`RestoreWidget`, holds everything; the three widgets
only add their task parameter.  The widgets are thin: all computation is
:func:`napari_vdsr.core.restore.restore_iter`, run in a napari
``thread_worker`` (one progress event per tile), so the viewer stays
responsive and Cancel stops the work within one tile.

"Current plane" on an n-D layer restores the Y/X plane at the viewer's current
slider position.  The result keeps the layer's leading axes with length 1 and
is translated to that plane, so it overlays the input at that slice only
(scroll away and it disappears, as the single restored plane should).
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    PushButton,
    RadioButtons,
    SpinBox,
    Widget,
    create_widget,
)

from ..core.cancel import stop_check
from ..core.constants import DEFAULT_TILE, MIN_TILE
from ..core.errors import VDSRError
from ..core.memory import check_fits
from ..core.restore import infer_axes, output_shape, plane_count, restore_iter
from ..core.weights import (
    TASK_LABELS,
    card_summary,
    default_model_name,
    list_models,
    read_card,
    resolve_model_path,
)
from ._geometry import LayerSnapshot, output_layer_kwargs

if TYPE_CHECKING:
    import napari

__all__ = [
    "RestoreWidget",
    "SuperResolveWidget",
    "DenoiseWidget",
    "DeblockWidget",
    "refresh_model_choices",
]

DEFAULT = "__default__"
FROM_FILE = "__file__"
DEVICES = ("auto", "cpu", "cuda", "mps")
#: precision choice → ``restore(amp=...)``: None = the device's default (bf16 on CUDA only)
PRECISIONS = {"auto": None, "float32": False, "bf16 (fast)": True}
CURRENT_PLANE = "current plane"
WHOLE_STACK = "whole stack"

_LIVE: "weakref.WeakSet[RestoreWidget]" = weakref.WeakSet()


def refresh_model_choices() -> None:
    """Re-read the model lists of every open restore widget.

    Call this after :func:`napari_vdsr.core.weights.register_model` (e.g. when
    a fine-tuned model was saved) so the new model shows up at once.  The lists
    are also refreshed whenever a widget is shown and whenever layers change.
    """
    for w in list(_LIVE):
        try:
            w.refresh_models()
        except RuntimeError:  # the Qt side was already deleted
            _LIVE.discard(w)


@dataclass
class _Job:
    """One run: everything the worker and the result handler need, frozen at start."""

    src: LayerSnapshot
    data: Any
    task: str
    scale: float
    model: Optional[str]
    model_label: str
    axes: str
    tile: int
    device: str
    plane: Optional[tuple[int, ...]] = None  # index over the leading axes, for "current plane"
    precision: str = "auto"  # a key of PRECISIONS
    hint: dict[str, Any] = field(default_factory=dict)
    ensemble: bool = False
    stop: threading.Event = field(default_factory=threading.Event)  # Cancel: acts within a tile (core.cancel)

    @property
    def flat_plane(self) -> Optional[int]:
        if self.plane is None:
            return None
        return int(np.ravel_multi_index(self.plane, self.src.lead_shape))

    @property
    def per_channel(self) -> bool:
        """An RGB layer restored channel by channel (not 8-bit: see :func:`_layer_axes`)."""
        return bool(self.src.rgb) and self.axes.endswith("C")

    @property
    def core_planes(self) -> Optional[list[int]]:
        """The planes the core restores for 'current plane' (None: all): the plane, or its colour channels."""
        k = self.flat_plane
        if k is None:
            return None
        if self.per_channel:  # the core numbers (plane, channel) pairs: channel last
            n = int(self.data.shape[-1])
            return [k * n + c for c in range(n)]
        return [k]


def _layer_axes(shape: tuple[int, ...], rgb: bool, dtype: Any) -> str:
    """The axes a layer is restored with: napari's RGB flag, except for RGB layers that are not 8-bit.

    napari shows any (..., Y, X, 3|4) array as RGB whatever its type; a photograph is 8-bit, and
    its luminance is restored (colour interpolated).  Three 16-bit or float channels are more
    likely fluorescence channels, each of which needs restoring (its own noise, its own detail):
    they are restored one by one, as the channels of any other stack.  RGBA keeps the colour path
    (luminance restored, colours and alpha interpolated) whatever its type: an alpha restored as a
    channel would be changed by the network and, being mostly opaque at the top of the range,
    would set the intensity range of the colours.
    """
    axes = infer_axes(shape, rgb=rgb)
    if rgb and axes.endswith("S") and np.dtype(dtype) != np.uint8 and int(shape[-1]) == 3:
        axes = axes[:-1] + "C"
    return axes


#: leading (plane) axes the core names (T, C, Z); a layer with more has its planes numbered along one axis
_MAX_LEAD = 3


def _flat_shape(shape: tuple[int, ...], ndim: int, max_lead: int = _MAX_LEAD) -> tuple[int, ...]:
    """``shape`` with the leading axes of a layer of ``ndim`` dims merged into one when there are more than
    ``max_lead``.

    Every Y/X plane is restored on its own, so a 6-D layer (position, time, channel, Z, Y, X)
    is restored as one run of its planes and given back its shape.
    """
    n_lead = ndim - 2
    if n_lead <= max_lead:
        return shape
    return (int(np.prod(shape[:n_lead], dtype=np.int64)),) + tuple(shape[n_lead:])


def _layout(shape: tuple[int, ...], ndim: int, rgb: bool, dtype: Any) -> tuple[tuple[int, ...], int, str]:
    """``(shape to restore, max_lead, axes)`` of a layer: its leading axes merged when the core could
    not name them all (three; two for an RGB layer restored per channel, whose colours take the C)."""
    per_channel = bool(rgb) and np.dtype(dtype) != np.uint8 and int(shape[-1]) == 3
    max_lead = _MAX_LEAD - (1 if per_channel else 0)
    flat = _flat_shape(shape, ndim, max_lead)
    return flat, max_lead, _layer_axes(flat, rgb, dtype)


class _FlatPlanes:
    """An array-like with the leading axes of ``data`` merged into one, read plane by plane.

    No copy and no reshape of the source: an index on the merged axis becomes the index of
    those axes, so a region of a plane reads only that region of a zarr or dask layer.
    """

    def __init__(self, data: Any, n_lead: int) -> None:
        self.data = data
        self.lead = tuple(int(s) for s in data.shape[:n_lead])
        self.shape = (int(np.prod(self.lead, dtype=np.int64)),) + tuple(int(s) for s in data.shape[n_lead:])
        self.dtype = np.dtype(data.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if not key or key[0] is Ellipsis:
            key = (slice(None),) + key
        first, rest = key[0], key[1:]
        if isinstance(first, (int, np.integer)):
            k = int(first) + (self.shape[0] if first < 0 else 0)
            if not 0 <= k < self.shape[0]:
                raise IndexError(f"plane {first} is out of range for {self.shape[0]} planes")
            lead = tuple(int(i) for i in np.unravel_index(k, self.lead))
            return np.asarray(self.data[lead + rest])
        planes = range(self.shape[0])[first]
        return np.stack([self[(k,) + rest] for k in planes])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def _flat_planes(data: Any, ndim: int, max_lead: int = _MAX_LEAD) -> Any:
    """``data`` with its leading axes merged as in :func:`_flat_shape`.

    A C-contiguous numpy layer gives a view; anything else (zarr, dask, strided numpy) a
    :class:`_FlatPlanes` that reads only what the restoration asks for.
    """
    shape = tuple(int(s) for s in data.shape)
    flat = _flat_shape(shape, ndim, max_lead)
    if flat == shape:
        return data
    if isinstance(data, np.ndarray) and data.flags.c_contiguous:
        return data.reshape(flat)  # a view
    return _FlatPlanes(data, ndim - 2)


def _progress_where(job: _Job, pos: int, n: int) -> str:
    """'plane 3/10' of the planes under way; an RGB layer restored per channel counts planes and colours."""
    if not job.per_channel:
        return f"plane {pos + 1}/{n}"
    c = int(job.data.shape[-1])
    if job.plane is not None:
        where = f"plane {', '.join(map(str, job.plane))}, "
    else:
        where = f"plane {pos // c + 1}/{n // c}, " if n > c else ""
    return f"{where}channel {pos % c + 1}/{c}"


@dataclass
class _Failed:
    """Returned by the worker instead of a result when the core refused the job."""

    message: str


def _work(job: _Job):
    """Generator run in the worker thread: yields progress events, returns the result (or a _Failed)."""
    planes = job.core_planes
    try:
        gen = restore_iter(
            job.data,
            task=job.task,
            scale=job.scale,
            model=job.model,
            axes=job.axes,
            rgb=job.src.rgb and job.axes.endswith("S"),
            tile=job.tile,
            device=job.device,
            planes=planes,
            amp=PRECISIONS[job.precision],
            ensemble=job.ensemble,
        )
        try:
            with stop_check(job.stop.is_set):
                for ev in gen:
                    if ev.result is not None:
                        return ev.result
                    yield ev
        finally:
            gen.close()
    except VDSRError as exc:
        return _Failed(str(exc))
    except Exception as exc:  # noqa: BLE001
        # Anything else becomes a message too: a RuntimeError (CUDA, cuDNN, MPS's NotImplementedError)
        # escaping the generator is dropped by superqt without ``finished``, which left the widget stuck.
        logging.getLogger(__name__).exception("napari-vdsr: restoration failed")
        return _Failed(f"the restoration failed ({type(exc).__name__}: {exc}); the input layer is unchanged. "
                       "Try device 'cpu' or a smaller tile size; if it persists, please report it.")
    return _Failed("the restoration ended without a result (internal error); please report it.")


def reset_choices_in_order(combo: Any) -> None:
    """``combo.reset_choices()`` with the items in the order its choices function gives.

    Qt's list keeps the old items and appends new ones, so a model registered later landed after
    "file…"; the list is rebuilt instead, and the selection kept when it is still there.
    """
    value = combo.value
    with combo.changed.blocked():
        combo.native.clear()
        combo.reset_choices()
    if value in list(combo.choices) and combo.value != value:
        combo.value = value
    elif combo.value != value:
        combo.changed.emit(combo.value)


class _ShowWatcher:
    """Calls ``callback`` whenever a Qt widget is shown (so choices are fresh when the dock opens)."""

    def __init__(self, native: Any, callback: Any) -> None:
        from qtpy.QtCore import QEvent, QObject

        class _Filter(QObject):
            def eventFilter(self, obj, event):  # noqa: N802 (Qt API)
                if event.type() == QEvent.Type.Show:
                    callback()
                return False

        self.filter = _Filter(native)
        native.installEventFilter(self.filter)


def model_tooltip(help_text: str, spec: Callable[[], tuple[Optional[str], str]]) -> str:
    """A model list's tooltip: ``help_text``, then what the chosen model measured (its card's summary).

    ``spec()`` gives (model argument, label) as the widget resolves them; when it raises (no model
    chosen yet, an unreadable file, a model for another task) the tooltip is the help alone.
    """
    try:
        model, label = spec()
        card = read_card(resolve_model_path(model if model is not None else label))
    except (VDSRError, OSError, ValueError):
        return help_text
    return f"{help_text}\n\n{label}:\n" + "\n".join(card_summary(card))


class RestoreWidget(Container):
    """Base widget: image picker, model, task parameter, tile, device, plane/stack, Run/Cancel.

    Subclasses set :attr:`task`, :attr:`verb`, :attr:`suffix` and may add task
    widgets in :meth:`_task_widgets`.
    """

    task: ClassVar[str] = "sr"
    verb: ClassVar[str] = "Restore"
    suffix: ClassVar[str] = "restored"

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = viewer
        self._worker: Any = None
        self._progress: Any = None
        self._job: Optional[_Job] = None
        self._cancelled = False
        self._closed = False  # the Qt side was deleted (viewer closed): stop, add nothing

        self._image = create_widget(label="image", annotation="napari.layers.Image", name="image")
        self._image.tooltip = "Image layer to restore (labels, points and shapes layers are not listed)."
        self._model = ComboBox(label="model", name="model", choices=self._model_choices)
        self._model_help = (
            f"Bundled default {TASK_LABELS[self.task]} model, models registered in this session "
            "(e.g. fine-tuned ones), or a .safetensors file."
        )
        self._model.tooltip = self._model_help
        self._model_file = FileEdit(label="model file", name="model_file", mode="r", filter="*.safetensors", visible=False)
        self._tile = SpinBox(label="tile size", name="tile", min=MIN_TILE, max=8192, step=64, value=DEFAULT_TILE)
        self._tile.tooltip = "Tiles of this many pixels (plus a halo) are processed at a time; smaller = less memory."
        self._device = ComboBox(label="device", name="device", choices=list(DEVICES), value="auto")
        self._device.tooltip = "auto = CUDA if available, else Apple MPS, else CPU."
        self._precision = ComboBox(label="precision", name="precision", choices=list(PRECISIONS), value="auto")
        self._precision.tooltip = (
            "auto: bfloat16 on CUDA GPUs, float32 elsewhere. float32: exact everywhere. "
            "bf16 (fast): also on CPUs that compute bfloat16 natively (Intel AMX / AVX512-BF16), about 2x "
            "faster there; results within 1-2 grey levels (<= 0.01 dB PSNR on Set5). Where the CPU has no "
            "native bfloat16 it runs in float32."
        )
        self._ensemble = CheckBox(label="x8 ensemble", name="ensemble", value=False)
        self._ensemble.tooltip = (
            "Average the results of the 4 rotations x 2 mirror images of the image (geometric self-ensemble): "
            "8x the time for a little more accuracy (about +0.1 dB) and fewer orientation-dependent artifacts."
        )
        self._extent = RadioButtons(
            label="process", name="extent", choices=[CURRENT_PLANE, WHOLE_STACK], value=CURRENT_PLANE,
            orientation="horizontal", visible=False,
        )
        self._extent.tooltip = "For stacks: only the plane shown now (quick preview) or every plane."
        self._info = Label(name="info", value="")
        self._run_btn = PushButton(name="run", text=self.verb)
        self._cancel_btn = PushButton(name="cancel", text="Cancel", enabled=False)
        self._buttons = Container(widgets=[self._run_btn, self._cancel_btn], layout="horizontal", labels=False)
        self._buttons.margins = (0, 0, 0, 0)

        self.extend(
            [self._image, self._model, self._model_file, *self._task_widgets(), self._tile, self._device, self._precision,
             self._ensemble, self._extent, self._info, self._buttons]
        )

        self._image.changed.connect(self._update_state)
        self._model.changed.connect(self._update_state)
        self._model.changed.connect(self._update_model_tooltip)
        self._model_file.changed.connect(self._update_model_tooltip)
        self._extent.changed.connect(self._update_state)
        self._run_btn.changed.connect(self._on_run)
        self._cancel_btn.changed.connect(self.cancel)
        self._show_watcher = _ShowWatcher(self.native, self.refresh_models)
        self.native.destroyed.connect(self._on_destroyed)
        _LIVE.add(self)
        self._update_state()
        self._update_model_tooltip()

    # ------------------------------------------------------------------ hooks for subclasses

    def _task_widgets(self) -> list[Widget]:
        return []

    def _scale(self) -> float:
        return 1.0

    def _hint(self) -> dict[str, Any]:
        return {}

    def _hint_warning(self, card: dict[str, Any]) -> Optional[str]:
        """A message when the task parameter lies outside what the model was trained on."""
        return None

    def _output_name(self, name: str, job: _Job) -> str:
        return f"{name} {self.suffix} VDSR"

    # ------------------------------------------------------------------ models

    def _model_choices(self, _widget: Any = None) -> list[tuple[str, str]]:
        try:
            default = default_model_name(self.task)
            choices = [(f"default ({default})", DEFAULT)]
        except VDSRError:
            default = None
            choices = [("default (not installed yet)", DEFAULT)]
        choices += [(e.name, e.name) for e in list_models(self.task) if e.name != default]
        choices.append(("file…", FROM_FILE))
        return choices

    def refresh_models(self) -> None:
        """Re-read bundled and registered models for the model list (keeps the selection if still there)."""
        reset_choices_in_order(self._model)

    def _model_spec(self) -> tuple[Optional[str], str]:
        """(model argument for the core, label for names and metadata); raises VDSRError when unusable."""
        from ..core.errors import ModelError

        choice = self._model.value
        if choice == FROM_FILE:
            path = Path(self._model_file.value or "")
            if not path.is_file():
                raise ModelError(
                    "choose a model file (.safetensors) in 'model file', or pick a listed model."
                )
            return str(path), str(path)
        if choice == DEFAULT or choice is None:
            try:
                return None, default_model_name(self.task)
            except VDSRError:
                raise ModelError(
                    f"no bundled {TASK_LABELS[self.task]} model is installed yet: choose 'file…' in the model "
                    "list and pick a .safetensors model (train one with `napari-vdsr train`, or use the "
                    "Fine-tune widget)."
                ) from None
        return str(choice), str(choice)

    # ------------------------------------------------------------------ state

    @property
    def running(self) -> bool:
        """True while a worker is running."""
        return self._worker is not None

    @property
    def worker(self) -> Any:
        """The running napari worker, or None."""
        return self._worker

    def _update_model_tooltip(self, *_: Any) -> None:
        """The model list's tooltip: what it offers, then the chosen model's validation and benchmark PSNR."""
        self._model.tooltip = model_tooltip(self._model_help, self._model_spec)

    def _update_state(self, *_: Any) -> None:
        self._model_file.visible = self._model.value == FROM_FILE
        from napari.layers import Image

        layer = self._image.value
        if not isinstance(layer, Image):
            self._extent.visible = False
            self._info.value = "no image layer: open or select one"
            return
        snap_ndim = int(layer.ndim)
        self._extent.visible = snap_ndim > 2
        try:
            data = layer.data[0] if layer.multiscale else layer.data
            shape = tuple(int(s) for s in data.shape)
            flat, _, axes = _layout(shape, snap_ndim, bool(layer.rgb), data.dtype)
            out = output_shape(flat, axes, self._scale())
            h, w = shape[snap_ndim - 2 : snap_ndim]
            iy = axes.index("Y")
            oh, ow = out[iy : iy + 2]
            lead = shape[: snap_ndim - 2]
            n = int(np.prod(lead)) if lead else 1
            planes = 1 if (not lead or self._extent.value == CURRENT_PLANE) else n
            kind = ("RGB " if axes.endswith("S") else "RGB, each channel on its own: ") if layer.rgb else ""
            self._info.value = f"{kind}{h}×{w} → {oh}×{ow}, {planes} plane{'s' if planes != 1 else ''}, {data.dtype}"
        except (VDSRError, ValueError) as exc:
            self._info.value = str(exc)[:80]

    def _current_plane(self, layer: Any, src: LayerSnapshot) -> Optional[tuple[int, ...]]:
        """Index over the layer's leading axes of the plane the viewer shows now.

        None, with a notification, when the view shows no single Y/X plane of the layer: a stack
        axis is displayed (transposed dims order, 3-D view), or the sliders stand outside the
        layer's planes (napari then shows nothing of it).
        """
        dims = self._viewer.dims
        lead = src.lead_shape
        offset = dims.ndim - layer.ndim  # layer axis i is world axis i + offset
        if any(i + offset in dims.displayed for i in range(len(lead))):
            self._notify(
                "warning",
                f"{self.verb}: 'current plane' restores one Y/X plane, but the viewer now displays a stack axis of "
                f"{layer.name!r} (a transposed dims order or the 3-D view). Reset the dims order or switch to 2-D, "
                "or choose 'whole stack'.",
            )
            return None
        point = None
        data_slice = getattr(layer, "_data_slice", None)  # the plane napari itself shows (units and transforms applied)
        if layer.visible and data_slice is not None and getattr(data_slice, "point", None) is not None:
            point = np.asarray(data_slice.point, dtype=float)[: len(lead)]
        if point is None or not np.all(np.isfinite(point)):
            point = np.asarray(layer.world_to_data(dims.point), dtype=float)[: len(lead)]
        idx = tuple(int(np.round(p)) for p in point)
        if any(not 0 <= i < n for i, n in zip(idx, lead)):
            self._notify(
                "warning",
                f"{self.verb}: the viewer's sliders stand outside the planes of {layer.name!r} (plane {idx} of "
                f"{tuple(lead)}), so no plane of it is shown. Move the sliders onto the layer, or choose 'whole stack'.",
            )
            return None
        return idx

    # ------------------------------------------------------------------ running

    def _notify(self, kind: str, message: str) -> None:
        from napari.utils import notifications

        getattr(notifications, f"show_{kind}")(message)

    def _make_job(self) -> Optional[_Job]:
        from napari.layers import Image

        layer = self._image.value
        if layer is None or not isinstance(layer, Image):
            what = "no image layer is selected" if layer is None else f"layer {layer.name!r} is not an image layer"
            self._notify(
                "warning",
                f"{self.verb}: {what}. Open an image (File > Open or File > Open Sample > VDSR restoration) and pick "
                "it in 'image'; labels, points and shapes layers cannot be restored.",
            )
            return None
        try:
            model, model_label = self._model_spec()
            src = LayerSnapshot.of(layer)
            data = layer.data[0] if layer.multiscale else layer.data
            _, max_lead, axes = _layout(tuple(int(n) for n in data.shape), src.ndim, src.rgb, data.dtype)
            data = _flat_planes(data, src.ndim, max_lead)
        except VDSRError as exc:
            self._notify("error", f"{self.verb}: {exc}")
            return None
        plane = None
        if src.ndim > 2 and self._extent.value == CURRENT_PLANE:
            plane = self._current_plane(layer, src)
            if plane is None:
                return None
        job = _Job(
            src=src, data=data, task=self.task, scale=self._scale(), model=model, model_label=model_label,
            axes=axes, tile=int(self._tile.value), device=str(self._device.value), plane=plane, hint=self._hint(),
            precision=str(self._precision.value), ensemble=bool(self._ensemble.value),
        )
        if not self._result_fits(job):
            return None
        self._warn_outside_training(job)
        return job

    def _result_fits(self, job: _Job) -> bool:
        """False, with a notification, when the new layer would not fit in the free memory (napari's OOM kill)."""
        try:
            shape = output_shape(job.data.shape, job.axes, job.scale)
            n = int(np.prod(shape, dtype=np.int64))
            if job.core_planes is not None:
                n = n // plane_count(job.data.shape, job.axes) * len(job.core_planes)
            advice = (
                "restore one plane ('current plane' in 'process') or a crop of the layer, or restore the stack to a "
                "file block by block with `napari-vdsr predict` and open the result."
                if job.plane is None and job.src.ndim > 2 else
                "restore a crop of the layer, or restore it to a file block by block with `napari-vdsr predict`."
            )
            check_fits(n * np.dtype(job.data.dtype).itemsize, f"the result of {job.src.name!r}", advice)
        except VDSRError as exc:
            self._notify("error", f"{self.verb}: {exc}")
            return False
        return True

    def _warn_outside_training(self, job: _Job) -> None:
        try:
            card = read_card(resolve_model_path(job.model if job.model is not None else job.model_label))
        except (VDSRError, OSError):
            return  # the worker reports unusable models
        msg = self._hint_warning(card)
        if msg:
            self._notify("warning", f"{self.verb}: {msg}")

    def _on_run(self, *_: Any) -> None:
        self.run()

    def run(self) -> Any:
        """Start restoring the selected layer in a worker thread; return the worker (None if refused).

        The result is added as a new layer when the worker finishes; errors
        appear as napari notifications.  Use :meth:`cancel` to stop.
        """
        from napari.qt.threading import create_worker
        from napari.utils import progress

        if self.running:
            self._notify("info", f"{self.verb} is already running; cancel it or wait for it to finish.")
            return None
        job = self._make_job()
        if job is None:
            return None
        self._job = job
        self._cancelled = False
        self._told = False  # the end was reported (returned or aborted); Cancel within a tile gives neither
        where = f" (plane {', '.join(map(str, job.plane))})" if job.plane is not None else ""
        self._progress = progress(total=0, desc=f"{self.verb} {job.src.name}{where}")
        worker = create_worker(_work, job, _start_thread=False)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_returned)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._run_btn.enabled = False
        self._cancel_btn.enabled = True
        worker.start()
        return worker

    def cancel(self, *_: Any) -> None:
        """Stop the running job (on the CPU within a band of rows of the tile under way); no layer is added."""
        if self._worker is None:
            return
        self._cancelled = True
        if self._job is not None:
            self._job.stop.set()  # the forward pass under way stops at its next band
        if not self._closed:
            self._cancel_btn.enabled = False
        if self._progress is not None:
            self._progress.set_description(f"{self.verb}: cancelling")
        self._worker.quit()

    def _on_progress(self, ev: Any) -> None:
        pbr = self._progress
        if pbr is None:
            return
        if pbr.total != ev.total:
            pbr.total = ev.total
        job = self._job
        if ev.n_planes > 1 and job is not None:
            pbr.set_description(f"{self.verb} {job.src.name}: {_progress_where(job, ev.plane, ev.n_planes)}")
        pbr.update(ev.done - pbr.n)

    def _on_destroyed(self, *_: Any) -> None:
        # the viewer (or the dock) was deleted while a job ran: stop it and add nothing
        self._closed = True
        self.cancel()

    def _on_returned(self, result: Any) -> None:
        self._told = True
        job = self._job
        if self._closed:
            return
        if isinstance(result, _Failed):
            if self._cancelled:  # Cancel stopped the tile under way: no error, no layer
                self._on_aborted()
                return
            self._notify("error", f"{self.verb}: {result.message}")
            return
        if job is None:
            return
        if self._cancelled:  # Cancel came after the last tile: still honour it
            self._on_aborted()
            return
        self._add_result(job, result)

    def _add_result(self, job: _Job, result: np.ndarray) -> Any:
        src = job.src
        lead_offset = None
        name = self._output_name(src.name, job)
        if job.plane is not None:
            if job.per_channel:  # (C, H', W'): the plane's colour channels, restored one by one
                result = np.moveaxis(result, 0, -1)[None]
            # (1, H', W'[, S]) from the core → the layer's own axes with length-1 leading axes
            result = result.reshape((1,) * len(job.plane) + result.shape[1:])
            lead_offset = job.plane
            name += f" [plane {', '.join(map(str, job.plane))}]"
        elif result.ndim != len(src.shape):  # planes of a layer with more than 3 leading axes: its shape back
            result = result.reshape(tuple(src.lead_shape) + result.shape[1:])
        meta = {
            "task": job.task,
            "model": job.model_label,
            "source_layer": src.name,
            "tile": job.tile,
            "device": job.device,
            "precision": job.precision,
            "ensemble": job.ensemble,
        }
        if job.task == "sr":
            meta["scale"] = job.scale
        if job.plane is not None:
            meta["plane"] = list(job.plane)
        meta.update(job.hint)
        kwargs = output_layer_kwargs(src, result.shape, name, lead_offset=lead_offset, extra_metadata=meta)
        return self._viewer.add_image(result, **kwargs)

    def _on_aborted(self) -> None:
        self._told = True
        if self._closed:
            return
        name = self._job.src.name if self._job is not None else "the layer"
        self._notify("info", f"{self.verb} of {name} cancelled; no layer was added.")

    def _on_finished(self) -> None:
        if self._cancelled and not getattr(self, "_told", True):
            # Cancel stopped a tile under way: the worker returned, but superqt emits neither
            # ``returned`` (an abort was requested) nor ``aborted`` (the generator had ended)
            self._on_aborted()
        if self._progress is not None:
            self._progress.close()
        self._progress = None
        self._worker = None
        self._job = None
        if not self._closed:
            self._run_btn.enabled = True
            self._cancel_btn.enabled = False


class SuperResolveWidget(RestoreWidget):
    """Super-resolve an image layer by any factor ≥ 1 (2, 3, 4, 1.5, ...)."""

    task = "sr"
    verb = "Super-resolve"

    def _task_widgets(self) -> list[Widget]:
        self._scale_w = FloatSpinBox(label="scale", name="scale", min=1.0, max=16.0, step=0.5, value=2.0)
        self._scale_w.tooltip = "Magnification along Y and X: 2, 3, 4 or any factor between 1 and 16 (e.g. 1.5)."
        self._scale_w.changed.connect(self._update_state)
        return [self._scale_w]

    def _scale(self) -> float:
        return float(self._scale_w.value)

    def _output_name(self, name: str, job: _Job) -> str:
        return f"{name} ×{job.scale:g} VDSR"

    def _hint_warning(self, card: dict[str, Any]) -> Optional[str]:
        recipe = (card.get("training") or {}).get("recipe") or {}
        rng = recipe.get("scale_range")
        scales = card.get("scales") or recipe.get("scales")
        lo_hi = tuple(rng) if rng else ((min(scales), max(scales)) if scales else None)
        s = self._scale()
        if lo_hi and not (lo_hi[0] - 1e-6 <= s <= lo_hi[1] + 1e-6):
            return (
                f"the model was trained for scales ×{lo_hi[0]:g}–×{lo_hi[1]:g}; ×{s:g} is outside that range, "
                "so the result may be weaker (it still runs)."
            )
        return None


class DenoiseWidget(RestoreWidget):
    """Remove noise from an image layer (blind; an optional noise level is checked against the model)."""

    task = "denoise"
    verb = "Denoise"
    suffix = "denoised"

    def _task_widgets(self) -> list[Widget]:
        self._sigma = FloatSpinBox(label="noise level σ", name="sigma", min=0.0, max=255.0, step=5.0, value=0.0)
        self._sigma.native.setSpecialValueText("unknown")
        self._sigma.tooltip = (
            "Optional: Gaussian noise standard deviation on a 0..255 scale. The model is blind (it does not need "
            "it); a value outside the model's training range gives a warning."
        )
        return [self._sigma]

    def _hint(self) -> dict[str, Any]:
        return {"noise_sigma": float(self._sigma.value)} if self._sigma.value > 0 else {}

    def _hint_warning(self, card: dict[str, Any]) -> Optional[str]:
        sigma = float(self._sigma.value)
        rng = ((card.get("training") or {}).get("recipe") or {}).get("sigma_range")
        if sigma > 0 and rng and not (rng[0] <= sigma <= rng[1]):
            return f"the model was trained on noise σ {rng[0]:g}–{rng[1]:g}; σ {sigma:g} is outside that range."
        return None


class DeblockWidget(RestoreWidget):
    """Remove JPEG compression artifacts (blocking, ringing) from an image layer."""

    task = "deblock"
    verb = "Remove artifacts"
    suffix = "deblocked"

    def _task_widgets(self) -> list[Widget]:
        self._quality = SpinBox(label="JPEG quality", name="quality", min=0, max=100, step=5, value=0)
        self._quality.native.setSpecialValueText("unknown")
        self._quality.tooltip = (
            "Optional: the JPEG quality (1–100) the image was saved with. The model is blind; a quality outside "
            "its training range gives a warning."
        )
        return [self._quality]

    def _hint(self) -> dict[str, Any]:
        return {"jpeg_quality": int(self._quality.value)} if self._quality.value > 0 else {}

    def _hint_warning(self, card: dict[str, Any]) -> Optional[str]:
        q = int(self._quality.value)
        rng = ((card.get("training") or {}).get("recipe") or {}).get("quality_range")
        if q > 0 and rng and not (rng[0] <= q <= rng[1]):
            return f"the model was trained on JPEG quality {rng[0]:g}–{rng[1]:g}; quality {q} is outside that range."
        return None
