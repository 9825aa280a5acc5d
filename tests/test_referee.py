"""``benchmarks/referee.py --crop``: scores a checkpoint on the referee crops exactly as training validated it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import load_benchmark_script

from napari_vdsr.core.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def referee():
    return load_benchmark_script("referee")


def test_crop_scores_reproduce_the_training_validation(referee, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    photos = referee.build(tmp_path / "ref") / "HR"
    cfg = TrainConfig(data=[str(photos)], task="sr", scales=[2.0, 3.0], iterations=12, batch_size=4, patch_size=16,
                      depth=3, width=8, optimizer="adam", lr=1e-3, val_data=[str(photos)], val_prescale=1.0,
                      val_crop=40, val_every=6, device="cpu", out=str(tmp_path / "run"), seed=5)
    vals = [e for e in Trainer(cfg).run() if getattr(e, "val_psnr", None) is not None]
    assert len(vals) == 2
    best = max(e.val_psnr for e in vals)

    out = tmp_path / "scores.json"
    rc = referee.main([str(tmp_path / "run" / "best.safetensors"), "bicubic", "--crop", "40", "--levels", "2", "3",
                       "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())["results"]
    ours, bic = res[str(tmp_path / "run" / "best.safetensors")], res["bicubic"]
    assert set(ours) == {"x2", "x3", "mean"}
    assert ours["mean"] == pytest.approx(best, abs=1e-3)  # the number training chose the checkpoint on
    assert bic["mean"] == pytest.approx(vals[0].val_baseline_psnr, abs=1e-3)
    assert bic["x2"] > bic["x3"]  # the crops shrink by the scale: x3 loses more than x2
