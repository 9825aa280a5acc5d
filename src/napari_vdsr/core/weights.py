"""Model files and the registry of bundled models.

A model file is a pair ``NAME.safetensors`` (tensors only, never pickled) +
``NAME.json`` (the *model card*: architecture, tasks, scales, training recipe,
measured metrics).  The card is also stored in the safetensors metadata so a
lone ``.safetensors`` file is self-describing.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import ModelError
from .model import VDSR

__all__ = [
    "TASKS",
    "ModelEntry",
    "save_model",
    "load_model",
    "read_card",
    "resolve_model_path",
    "list_models",
    "default_model_name",
    "register_model",
    "BUNDLED_DIR",
]

TASKS = ("sr", "denoise", "deblock")
TASK_LABELS = {"sr": "super-resolution", "denoise": "denoising", "deblock": "JPEG artifact removal"}
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "weights"
_META_KEY = "napari_vdsr_card"
_user_models: dict[str, Path] = {}


@dataclass
class ModelEntry:
    """One model known to the registry."""

    name: str
    path: Path
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.card.get("tasks", []))

    @property
    def bundled(self) -> bool:
        return self.path.parent == BUNDLED_DIR


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; model files are meant to be shared
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON has no Infinity: a PSNR of
    identical images, e.g. a constant validation plane, would otherwise make the file unreadable
    to strict parsers)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def save_model(model: VDSR, path: str | os.PathLike, card: dict[str, Any]) -> Path:
    """Write ``model`` as ``path`` plus its JSON card; return the safetensors path.

    ``.safetensors`` is appended to a ``path`` that does not end in it (``sr-x1.5`` → ``sr-x1.5.safetensors``;
    ``NAME.json`` → ``NAME.safetensors``), and ``load_model`` finds it again under the same ``path``.

    ``card`` must name the ``tasks`` the model serves; the architecture is added
    from the model itself.  Both files are written atomically.
    """
    from safetensors.torch import save

    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    elif path.suffix != ".safetensors":  # appended: "sr-x1.5" is not "sr-x1" with a suffix
        path = path.with_name(path.name + ".safetensors")
    card = dict(card)
    tasks = card.get("tasks")
    if not tasks or any(t not in TASKS for t in tasks):
        raise ModelError(f"the model card must list its tasks among {TASKS}, got {tasks!r}.")
    card["architecture"] = {"name": "VDSR", **model.config}
    card.setdefault("format", "napari-vdsr/1")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    card = json_safe(card)
    text = json.dumps(card, indent=2, sort_keys=False, default=str, allow_nan=False)
    _atomic_write_bytes(path, save(state, metadata={_META_KEY: json.dumps(card, default=str, allow_nan=False)}))
    _atomic_write_bytes(path.with_suffix(".json"), (text + "\n").encode())
    return path


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """Turn a model name, a ``.safetensors``/``.json`` path or a run directory into a safetensors path."""
    if isinstance(spec, str) and spec in _all_entries():
        return _all_entries()[spec].path
    p = Path(spec).expanduser()
    if p.is_dir():
        for cand in ("best.safetensors", "model.safetensors", "final.safetensors"):
            if (p / cand).is_file():
                return p / cand
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        if not found:
            raise ModelError(f"no model (*.safetensors) in directory {p}; train or fine-tune into it first.")
        raise ModelError(f"several models in {p}: {[f.name for f in found]}; name one file.")
    if p.suffix == ".json" and p.with_suffix(".safetensors").is_file():
        return p.with_suffix(".safetensors")
    if p.is_file():
        return p
    named = p.with_name(p.name + ".safetensors")  # the name save_model was given
    if p.suffix != ".safetensors" and named.is_file():
        return named
    known = ", ".join(sorted(_all_entries())) or "none"
    raise ModelError(f"model {str(spec)!r} not found: give a bundled name ({known}), a .safetensors file or a run directory.")


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """Read the model card of a safetensors model file (sidecar JSON, else embedded metadata).

    The sidecar wins (it may hold numbers added later), unless it describes another training
    step than the card embedded in the weights: an export interrupted between its two files
    leaves new weights beside the old sidecar, and then the embedded card is the true one.
    """
    path = Path(path)
    side = path.with_suffix(".json")
    if side.is_file():
        try:
            card = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"the model card {side} is not valid JSON ({exc}); restore or delete it.") from None
        embedded = _read_metadata(path).get(_META_KEY) if path.is_file() else None
        if embedded:
            inner = json.loads(embedded)
            steps = [c.get("training", {}).get("steps") if isinstance(c.get("training"), dict) else None
                     for c in (card, inner)]
            if None not in steps and steps[0] != steps[1]:
                return inner
        return card
    meta = _read_metadata(path)
    if _META_KEY not in meta:
        raise ModelError(f"{path} has no napari-vdsr model card (no {side.name} and no embedded card).")
    return json.loads(meta[_META_KEY])


def _level_label(task: str, level: Any) -> str:
    """How a level reads in a listing: x3 for SR, sigma 25 for denoising, q 20 for JPEG (ASCII for any console)."""
    try:
        value = f"{float(level):g}"
    except (TypeError, ValueError):
        value = str(level)
    return {"sr": "x", "denoise": "sigma ", "deblock": "q "}.get(task, "") + value


def card_summary(card: dict[str, Any]) -> list[str]:
    """A model card's metrics as short readable lines: validation and benchmark PSNR per level.

    What ``napari-vdsr models`` prints and the restore widgets show as the model list's tooltip.
    """
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def mapping(v: Any) -> dict[str, Any]:  # a card edited by hand may hold anything anywhere
        return v if isinstance(v, dict) else {}

    metrics = mapping(card.get("metrics"))
    tasks = card.get("tasks")
    task = str(tasks[0]) if isinstance(tasks, list) and tasks else "?"
    lines: list[str] = []
    val = mapping(metrics.get("validation"))
    per_level = mapping(val.get("per_level"))
    if per_level or number(val.get("psnr")):
        parts = [f"{_level_label(task, k)} {v:.2f}" for k, v in per_level.items() if number(v)]
        for key, label in (("psnr", "mean"), ("baseline_psnr", "input")):
            if number(val.get(key)):
                parts.append(f"{label} {val[key]:.2f}")
        source = mapping(mapping(card.get("training")).get("recipe")).get("val_data")
        where = (f"on {', '.join(str(v) for v in source)}" if isinstance(source, list) and source
                 else "on held-out training images")
        step = f" at step {int(val['step']):,}" if number(val.get("step")) else ""
        lines.append(f"validation PSNR ({where}){step}: {', '.join(parts)}")
    bench = mapping(metrics.get("benchmarks"))
    if isinstance(bench.get("cells"), list):
        by_set: dict[str, list[str]] = {}
        for cell in bench["cells"]:
            if not isinstance(cell, dict) or not number(cell.get("psnr")):
                continue
            by_set.setdefault(str(cell.get("set", "?")), []).append(
                f"{_level_label(cell.get('task', task), cell.get('level'))} {cell['psnr']:.2f}")
        if by_set:
            when = f", measured {bench['measured']}" if bench.get("measured") else ""
            lines.append(f"benchmark PSNR (dB{when}): " + "; ".join(f"{k} {', '.join(v)}" for k, v in by_set.items()))
    if not lines:
        lines.append("no metrics recorded")
    return lines


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises several types for garbage input
        raise ModelError(
            f"{path} is not a readable safetensors model file ({type(exc).__name__}: {exc}). "
            "napari-vdsr only loads .safetensors models it (or a compatible tool) wrote; "
            "pickled .pt/.pth files are refused for safety."
        ) from None


def load_model(
    spec: str | os.PathLike | None = None,
    task: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[VDSR, dict[str, Any]]:
    """Load a model by bundled name, file or run directory; ``None`` = the default for ``task``.

    Returns ``(model in eval mode on device, card)``.

    Raises
    ------
    ModelError
        If the file is missing, is not a safetensors model, does not match its
        architecture, or was made for another task.
    """
    from safetensors.torch import load_file

    if task is not None and task not in TASKS:
        raise ModelError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    if spec is None:
        if task is None:
            raise ModelError("give a model or a task to choose the default model for.")
        spec = default_model_name(task)
    path = resolve_model_path(spec)
    _read_metadata(path)  # validates the header before anything else
    card = read_card(path)
    tasks = card.get("tasks", [])
    if task is not None and task not in tasks:
        raise ModelError(
            f"model {path.name} was trained for {', '.join(TASK_LABELS.get(t, t) for t in tasks) or 'no task'}, "
            f"not {TASK_LABELS[task]}; pick a {task} model (see `napari-vdsr models`)."
        )
    arch = dict(card.get("architecture", {}))
    arch.pop("name", None)
    try:
        model = VDSR(**arch)
    except TypeError as exc:
        raise ModelError(f"{path.name}: unsupported architecture in its card: {arch} ({exc}).") from None
    try:
        state = load_file(str(path))
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise ModelError(f"{path.name}: weights do not fit the VDSR architecture {arch} ({exc}).") from None
    card["path"] = str(path)
    from .device import resolve_device  # "auto", and a clear error for a device this machine lacks

    return model.to(resolve_device(device)).eval(), card


def _bundled_entries() -> dict[str, ModelEntry]:
    out: dict[str, ModelEntry] = {}
    if BUNDLED_DIR.is_dir():
        for f in sorted(BUNDLED_DIR.glob("*.safetensors")):
            try:
                card = read_card(f)
            except ModelError:
                continue
            out[f.stem] = ModelEntry(f.stem, f, card)
    return out


def _all_entries() -> dict[str, ModelEntry]:
    entries = _bundled_entries()
    for name, path in _user_models.items():
        try:
            entries[name] = ModelEntry(name, path, read_card(path))
        except ModelError:
            continue
    return entries


def register_model(path: str | os.PathLike, name: str | None = None) -> str:
    """Make a model file known by name for this process (e.g. right after fine-tuning).

    Returns the name under which it is listed by :func:`list_models`: ``name`` (default: the
    file's stem), or, when a bundled model or another registered file already has it,
    ``name (folder)`` or ``name-2``, ``name-3``... A name never moves to another file.
    """
    p = resolve_model_path(path)
    read_card(p)
    name = name or p.stem
    if name in _bundled_entries():
        name = f"{name} ({p.parent.name})"
    base, k = name, 1
    while name in _bundled_entries() or (name in _user_models and Path(_user_models[name]).resolve() != p.resolve()):
        k += 1
        name = f"{base}-{k}"
    _user_models[name] = p
    return name


def list_models(task: str | None = None) -> list[ModelEntry]:
    """Bundled and registered models, defaults first, optionally only those serving ``task``."""
    entries: Iterable[ModelEntry] = _all_entries().values()
    if task is not None:
        entries = [e for e in entries if task in e.tasks]
    return sorted(entries, key=lambda e: (task not in e.card.get("default_for", []) if task else False, not e.bundled, e.name))


def default_model_name(task: str) -> str:
    """Name of the bundled model used for ``task`` when none is given."""
    if task not in TASKS:
        raise ModelError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    entries = _bundled_entries()
    for e in entries.values():
        if task in e.card.get("default_for", []):
            return e.name
    for e in entries.values():
        if task in e.tasks:
            return e.name
    raise ModelError(
        f"no bundled model for {TASK_LABELS[task]}; pass a model file with --model "
        "(train one with `napari-vdsr train`)."
    )
