"""What a run's ``log.jsonl`` says about how its weights were trained: machine, batch and lr by leg.

A run that is resumed on other machines (a CPU, then a GPU lease, then the CPU again) logs a
``start`` event each time, with the step it resumed at, the machine (``device``) and, since
session 14, the batch.  Work logged after a checkpoint and then redone from that checkpoint
(a resume at an earlier step than the log had reached) is dropped, so the legs describe the
steps that the final weights actually went through.  :func:`describe_legs` turns them into the
model card's ``device``, ``batch_by_leg``, ``lr_by_leg`` and ``wall_hours_by_device`` entries
(the wall time of each machine's legs, validation included).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Optional

_DEVICE_IN_MESSAGE = re.compile(r"device ([^,;]+)")


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The events of a ``log.jsonl`` (lines that are not JSON objects are skipped)."""
    events = []
    for line in Path(path).read_text().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and "kind" in ev and "step" in ev:
            events.append(ev)
    return events


def _device_of(ev: dict[str, Any]) -> str:
    if ev.get("device"):
        return str(ev["device"])
    m = _DEVICE_IN_MESSAGE.search(ev.get("message", ""))
    return m.group(1).strip() if m else "unknown"


def training_legs(events: Iterable[dict[str, Any]], end_step: int) -> tuple[list[dict[str, Any]], list[tuple[int, float]]]:
    """The legs that led to step ``end_step``, and the (step, lr) points of the steps they ran.

    Each leg is ``{"from", "to", "device", "batch", "seconds"}`` (``batch`` None where the log
    predates it; ``seconds`` the wall time of the leg's steps).  Consecutive legs on the same
    machine with the same batch are merged.
    """
    legs: list[dict[str, Any]] = []
    points: list[tuple[int, float]] = []
    for ev in events:
        step = int(ev["step"])
        if ev["kind"] == "start":
            # the weights are back at `step`: what was logged beyond it was redone
            legs = [lg for lg in legs if lg["from"] < step]
            points = [p for p in points if p[0] <= step]
            if legs:
                legs[-1]["to"] = step
                legs[-1]["times"] = [t for t in legs[-1]["times"] if t[0] <= step]
            legs.append({"from": step, "to": step, "device": _device_of(ev), "batch": ev.get("batch"), "times": []})
        elif ev["kind"] == "step" and legs and step <= end_step:
            legs[-1]["to"] = step
            legs[-1]["times"].append((step, float(ev.get("elapsed", 0.0))))
            if ev.get("lr") is not None:
                points.append((step, float(ev["lr"])))
    legs = [lg for lg in legs if lg["from"] < end_step]
    if legs:
        legs[-1]["to"] = end_step
    for lg in legs:
        lg["seconds"] = lg.pop("times")[-1][1] if lg["times"] else 0.0
    merged: list[dict[str, Any]] = []
    for lg in legs:
        if merged and merged[-1]["device"] == lg["device"] and merged[-1]["batch"] == lg["batch"]:
            merged[-1]["to"] = lg["to"]
            merged[-1]["seconds"] += lg["seconds"]
        elif lg["to"] > lg["from"]:
            merged.append(dict(lg))
    return merged, points


def lr_segments(points: list[tuple[int, float]], end_step: int, starts: Iterable[int] = ()) -> list[dict[str, Any]]:
    """Stretches of constant lr (``lr`` a number) and of a changing lr (``lr`` "a -> b").

    A logged step ``k`` is the lr of the k-th step (k steps done).  The log has it every few
    steps; a change between two logged steps is placed at a resume (``starts``) between them
    when there is one, else at the earlier logged step (a schedule that changes "after step
    12,000" shows first at the next logged step).
    """
    if not points:
        return []
    starts = sorted(set(starts))
    # the points of each stretch between resumes: an lr may jump at a resume (a command-line change)
    chunks: list[list[tuple[int, float]]] = [[points[0]]]
    for a, b in zip(points, points[1:]):
        if any(a[0] <= s_ < b[0] for s_ in starts):  # points up to a start's step came before it
            chunks.append([])
        chunks[-1].append(b)
    groups: list[dict[str, Any]] = []  # {"pts": [...], "flat": bool}
    for chunk in chunks:
        flat = [len(chunk) == 1 or any(
            0 <= n < len(chunk) and math.isclose(chunk[i][1], chunk[n][1], rel_tol=1e-6) for n in (i - 1, i + 1))
            for i in range(len(chunk))]
        for i, pt in enumerate(chunk):
            g = groups[-1] if groups else None
            if g is not None and g["flat"] == flat[i] and (
                    not flat[i] or math.isclose(g["pts"][-1][1], pt[1], rel_tol=1e-6)):
                g["pts"].append(pt)
            else:
                groups.append({"pts": [pt], "flat": flat[i]})
    segs: list[dict[str, Any]] = []
    prev_step = None
    for g in groups:
        first, last = g["pts"][0], g["pts"][-1]
        # a run continued from weights (--start-step) begins at its first start, not at step 0
        lo = starts[0] if starts and starts[0] <= first[0] else 0
        if segs:
            resumed = [s_ for s_ in starts if prev_step <= s_ < first[0]]
            lo = resumed[0] if resumed else prev_step
            segs[-1]["to"] = lo
        lr: Any = first[1] if g["flat"] else f"{first[1]:.2g} -> {last[1]:.2g}"
        segs.append({"from": lo, "to": end_step, "lr": lr})
        prev_step = last[0]
    return segs


def describe_legs(log: str | Path | list[dict[str, Any]], end_step: int) -> Optional[dict[str, Any]]:
    """Card entries for a run up to ``end_step``, from its ``log.jsonl`` path or its events; None without."""
    if isinstance(log, list):
        events = log
    elif Path(log).is_file():
        events = read_log(log)
    else:
        return None
    legs, points = training_legs(events, end_step)
    if not legs:
        return None
    starts = [int(ev["step"]) for ev in events if ev["kind"] == "start"]

    by_device: dict[str, list[list[int]]] = {}  # step ranges per machine, touching ranges joined
    hours: dict[str, float] = {}
    for lg in legs:
        spans = by_device.setdefault(lg["device"], [])
        if spans and spans[-1][1] == lg["from"]:  # the same machine on, with another batch
            spans[-1][1] = lg["to"]
        else:
            spans.append([lg["from"], lg["to"]])
        hours[lg["device"]] = hours.get(lg["device"], 0.0) + lg["seconds"] / 3600.0
    out: dict[str, Any] = {
        "device": ", ".join(f"{d} (steps {' and '.join(f'{a:,}-{b:,}' for a, b in s)})" for d, s in by_device.items())
        if len(by_device) > 1 else next(iter(by_device)),
        "wall_hours_by_device": {d: round(h, 3) for d, h in hours.items()},
        "lr_by_leg": {f"{s['from']}-{s['to']}": s["lr"] for s in lr_segments(points, end_step, starts)},
    }
    if all(lg["batch"] is not None for lg in legs):
        out["batch_by_leg"] = {f"{lg['from']}-{lg['to']}": lg["batch"] for lg in legs}
    return out


#: the card entries (under ``training``) that say how a model's weights were trained, leg by leg
LEG_KEYS = ("device", "wall_hours_by_device", "lr_by_leg", "batch_by_leg")
_DEVICE_SPANS = re.compile(r"([^()]+?) \(steps ([^()]*)\)(?:, |$)")


def _ranges(entries: dict[str, Any]) -> list[tuple[int, int, Any]]:
    out = []
    for key, value in entries.items():
        try:
            a, b = (int(x.replace(",", "")) for x in str(key).split("-"))
        except ValueError:
            continue
        out.append((a, b, value))
    return sorted(out, key=lambda r: r[0])


def _clip(ranges: list[tuple[int, int, Any]], start: int) -> list[tuple[int, int, Any]]:
    return [(a, min(b, start), v) for a, b, v in ranges if a < start]


def _device_spans(device: Any, steps: int, first: int = 0) -> list[tuple[int, int, str]]:
    """``"cpu (steps 0-29,441 and 55,324-165,000), GPU (steps 29,441-55,324)"`` as (from, to, device);
    a name without steps: that machine from step ``first`` to ``steps``."""
    text = str(device or "")
    spans = []
    for m in _DEVICE_SPANS.finditer(text):
        for part in m.group(2).split(" and "):
            try:
                a, b = (int(x.replace(",", "")) for x in part.split("-"))
            except ValueError:  # a hand-edited card: that span is left out
                continue
            spans.append((a, b, m.group(1)))
    if not spans and text:  # one machine for all of it
        spans = [(first, steps, text)]
    return sorted(spans)


def _joined(ranges: list[tuple[int, int, Any]]) -> list[tuple[int, int, Any]]:
    out: list[tuple[int, int, Any]] = []
    for a, b, v in ranges:
        if out and out[-1][1] == a and out[-1][2] == v:
            out[-1] = (out[-1][0], b, v)
        else:
            out.append((a, b, v))
    return out


def continue_legs(earlier: dict[str, Any], legs: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    """The leg entries of a run continued from weights at step ``start`` (``--from --start-step``)
    up to step ``end``: those of the weights' card (``earlier``, its ``training``, up to ``start``)
    and then the run's own (``legs``, from :func:`describe_legs` on its log, which begins at
    ``start``).  Without this a card would describe only the last run, as if the weights had
    started there."""
    out = dict(legs)
    if not isinstance(earlier, dict) or not earlier or not start:
        return out
    # a card's machine without steps is that of all its steps only when its legs begin at step 0 (a card
    # from before session 14, or of a run continued from weights before session 17, names only its last machine)
    firsts = [r[0] for key in ("batch_by_leg", "lr_by_leg") if isinstance(earlier.get(key), dict)
              for r in _ranges(earlier[key])[:1]]
    whole = "(steps" in str(earlier.get("device")) or (bool(firsts) and min(firsts) == 0)
    if whole and legs.get("device"):
        spans = _clip(_device_spans(earlier["device"], start), start) + _device_spans(legs["device"], end, start)
        by_device: dict[str, list[tuple[int, int]]] = {}
        for a, b, d in _joined(sorted(spans)):
            by_device.setdefault(d, []).append((a, b))
        out["device"] = (", ".join(f"{d} (steps {' and '.join(f'{a:,}-{b:,}' for a, b in s)})"
                                   for d, s in by_device.items()) if len(by_device) > 1 else next(iter(by_device)))
    for key in ("lr_by_leg", "batch_by_leg"):
        if isinstance(earlier.get(key), dict) and isinstance(legs.get(key), dict):
            merged = _clip(_ranges(earlier[key]), start) + _ranges(legs[key])
            if key == "batch_by_leg":
                merged = _joined(merged)
            out[key] = {f"{a}-{b}": v for a, b, v in merged}
    if isinstance(earlier.get("wall_hours_by_device"), dict) and isinstance(legs.get("wall_hours_by_device"), dict):
        hours: dict[str, float] = {}
        for part in (earlier["wall_hours_by_device"], legs["wall_hours_by_device"]):
            for d, h in part.items():
                if isinstance(h, (int, float)) and not isinstance(h, bool) and math.isfinite(h):
                    hours[d] = round(hours.get(d, 0.0) + float(h), 3)
        out["wall_hours_by_device"] = hours
    return out
