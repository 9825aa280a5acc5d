"""``benchmarks/tables.py --update``: re-measuring one task keeps the other tasks' tables."""

from __future__ import annotations

import pytest
from helpers import load_benchmark_script


@pytest.fixture(scope="module")
def tables():
    return load_benchmark_script("tables")


def _cell(task, ds, lev, psnr, **extra):
    return {"task": task, "set": ds, "level": lev, "baseline_psnr": psnr - 3, "baseline_ssim": 0.8,
            "psnr": psnr, "ssim": 0.9, "reference": [psnr + 1, psnr + 0.5, psnr + 0.7], "images": 2, "seconds": 1.0, **extra}


def test_update_replaces_only_the_measured_task(tables, tmp_path):
    old = {"machine": "m", "date": "2026-11-26",
           "models": {"sr": {"name": "a", "steps": 1, "compute_hours": 1.0},
                      "denoise": {"name": "b", "steps": 2, "compute_hours": 2.0},
                      "deblock": {"name": "c", "steps": 3, "compute_hours": 3.0}},
           "cells": [_cell("sr", "Set5", 2, 36.0, ensemble_psnr=36.2, ensemble_ssim=0.91),
                     _cell("denoise", "BSD68", 15, 30.0, ensemble_psnr=30.1, ensemble_ssim=0.91),
                     _cell("denoise", "BSD68", 25, 28.0),
                     _cell("deblock", "LIVE1", 10, 29.0)]}
    new = {"machine": "m", "date": "2026-11-27", "models": {"denoise": {"name": "b2", "steps": 9, "compute_hours": 4.5}},
           "cells": [_cell("denoise", "BSD68", 15, 30.5), _cell("denoise", "BSD68", 25, 28.4)]}
    merged = tables.merge(old, new)
    assert list(merged["models"]) == ["sr", "denoise", "deblock"]
    assert merged["models"]["denoise"] == {"name": "b2", "steps": 9, "compute_hours": 4.5, "measured": "2026-11-27"}
    assert merged["models"]["sr"] == {**old["models"]["sr"], "measured": "2026-11-26"}
    assert [(c["task"], c["psnr"]) for c in merged["cells"]] == [
        ("sr", 36.0), ("denoise", 30.5), ("denoise", 28.4), ("deblock", 29.0)]
    # the old model's ensemble column does not survive into the new model's cells
    assert "ensemble_psnr" not in merged["cells"][1] and merged["cells"][0]["ensemble_psnr"] == 36.2
    assert old["cells"][1]["psnr"] == 30.0 and "measured" not in new["models"]["denoise"]  # inputs unchanged

    md = tmp_path / "b.md"
    tables.write_markdown(merged, md, None)
    text = md.read_text()
    assert "`b2` — 9 training steps, 4.5 compute hours; tables measured 2026-11-27" in text and "tables measured 2026-11-27" in text
    assert "Measured last 2026-11-27" in text and "1.0 compute hours; tables measured 2026-11-26" in text
    assert "**30.50**" in text and "**29.00**" in text and "not run" in text
