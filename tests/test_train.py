"""Training engine: adjustable gradient clipping, convergence, exact resume, robustness."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_vdsr.cli import main as cli_main
from napari_vdsr.core.data import Plane, load_planes
from napari_vdsr.core.device import cpu_label
from napari_vdsr.core.errors import TrainingError
from napari_vdsr.core.model import VDSR
from napari_vdsr.core.train import CHECKPOINT_NAME, SGD_CLIP_THETA, TrainConfig, Trainer, clip_gradients, load_checkpoint, lr_at, train
from napari_vdsr.core.weights import load_model

torch.set_num_threads(1)


def _texture(seed: int, size: int = 72) -> np.ndarray:
    """Smooth random texture with edges, uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.5 + 0.25 * np.sin(2 * np.pi * (rng.uniform(2, 6) * xx + rng.uniform(2, 6) * yy))
    img += 0.25 * ((xx - 0.5) ** 2 + (yy - 0.3) ** 2 < rng.uniform(0.02, 0.08))
    return np.clip(img * 255, 0, 255).astype(np.uint8)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    from PIL import Image

    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(4):
        Image.fromarray(_texture(i)).save(d / f"im{i}.png")
    return d


def _cfg(out: Path | None, data: list[str], **kw) -> TrainConfig:
    base = dict(
        data=data, task="sr", scales=[2.0, 3.0], iterations=40, batch_size=4, patch_size=16, depth=3, width=8,
        optimizer="adam", lr=1e-3, lr_schedule="step", lr_step=15, clip_theta=None, weight_decay=0.0,
        val_fraction=0.25, val_every=10, val_crop=48, device="cpu", out=str(out) if out else None, seed=3,
    )
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- clipping
def test_clip_bound_follows_learning_rate() -> None:
    p = torch.nn.Parameter(torch.zeros(1000))
    p.grad = torch.linspace(-0.5, 0.5, 1000)
    expected = (p.grad.abs() > 0.1).float().mean().item()
    frac = clip_gradients([p], theta=0.01, lr=0.1)
    assert p.grad.abs().max().item() == pytest.approx(0.1)
    assert frac == pytest.approx(expected) and 0.7 < frac < 0.9
    p.grad = torch.linspace(-50, 50, 1000)
    clip_gradients([p], theta=0.01, lr=0.001)
    assert p.grad.abs().max().item() == pytest.approx(10.0)
    # elements inside the bound are untouched
    p.grad = torch.full((1000,), 0.05)
    assert clip_gradients([p], theta=0.01, lr=0.1) == 0.0
    assert torch.all(p.grad == 0.05)


@pytest.mark.parametrize("lr", [0.1, 0.01])
def test_sgd_update_respects_theta(lr: float, image_dir: Path) -> None:
    theta = 1e-3
    cfg = _cfg(None, [str(image_dir)], optimizer="sgd", lr=lr, momentum=0.0, weight_decay=0.0, clip_theta=theta,
               iterations=1, lr_schedule="constant", val_fraction=0.0)
    tr = Trainer(cfg)
    tr._setup()
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr._train_step(0)
    deltas = torch.cat([(tr.model.state_dict()[k] - before[k]).flatten() for k in before])
    # one plain SGD step moves no weight by more than theta ...
    assert deltas.abs().max().item() <= theta * (1 + 1e-5)
    # ... and the clipped elements move by exactly theta (the paper's sum loss has large gradients)
    assert deltas.abs().max().item() == pytest.approx(theta, rel=1e-4)


@pytest.mark.parametrize("lr", [0.1, 0.01])
def test_sgd_update_with_norm_clipping_has_norm_theta(lr: float, image_dir: Path) -> None:
    """--clip-mode norm: one plain SGD step has L2 norm <= theta (= theta: the sum loss's gradient is large),
    and it points along the gradient, unlike element clipping (which saturates elements)."""
    theta = 1e-3
    steps = {}
    for mode in ("norm", "element"):
        cfg = _cfg(None, [str(image_dir)], optimizer="sgd", lr=lr, momentum=0.0, weight_decay=0.0, clip_theta=theta,
                   clip_mode=mode, iterations=1, lr_schedule="constant", val_fraction=0.0, amp=False)
        tr = Trainer(cfg)
        tr._setup()
        before = {k: v.clone() for k, v in tr.model.state_dict().items()}
        tr._train_step(0)
        steps[mode] = torch.cat([(tr.model.state_dict()[k] - before[k]).flatten() for k in before])
    norm, elem = steps["norm"], steps["element"]
    assert norm.norm().item() == pytest.approx(theta, rel=1e-4)
    assert elem.abs().max().item() == pytest.approx(theta, rel=1e-4) and elem.norm().item() > 2 * theta
    # same batch, same gradient: the element-clipped step agrees in sign wherever the norm-clipped one moves
    moved = norm.abs() > 1e-12
    assert torch.all(torch.sign(norm[moved]) == torch.sign(elem[moved]))
    assert 0 < (norm[moved].abs() / norm.abs().max()).median().item() < 0.5  # not saturated: the gradient's shape


def test_clip_mode_is_part_of_the_saved_recipe(image_dir: Path, tmp_path: Path) -> None:
    args = ["train", "--data", str(image_dir), "--scales", "2", "--batch-size", "2", "--patch-size", "16",
            "--depth", "3", "--width", "8", "--optimizer", "sgd", "--clip-theta", "0.4", "--clip-mode", "norm",
            "--iterations", "2", "--val-fraction", "0", "--device", "cpu", "--quiet", "--out", str(tmp_path / "r")]
    assert cli_main(args) == 0
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["clip_mode"] == "norm" and saved["clip_theta"] == 0.4
    with pytest.raises(Exception):
        TrainConfig(data=[str(image_dir)], clip_mode="global")


def test_micro_batches_accumulate_the_whole_batch_gradient(image_dir: Path) -> None:
    results = {}
    for micro in (None, 1, 3):
        cfg = _cfg(None, [str(image_dir)], optimizer="sgd", lr=1e-3, momentum=0.0, iterations=1,
                   lr_schedule="constant", val_fraction=0.0, micro_batch=micro, amp=False)
        tr = Trainer(cfg)
        tr._setup()
        before = {k: v.clone() for k, v in tr.model.state_dict().items()}
        mse = float(tr._train_step(0))  # the step returns a 0-d tensor (read back lazily)
        delta = torch.cat([(tr.model.state_dict()[k] - before[k]).flatten() for k in before])
        results[micro] = (tr.micro_batch_size(), mse, delta)
    assert [results[m][0] for m in (None, 1, 3)] == [4, 1, 3]  # batch 4 of 16² patches: no split by default
    whole = results[None][2]
    assert whole.abs().max() > 1e-5  # the step moved the weights
    for micro in (1, 3):
        assert results[micro][1] == pytest.approx(results[None][1], rel=1e-5)
        torch.testing.assert_close(results[micro][2], whole, rtol=1e-4, atol=1e-5 * float(whole.abs().max()))


def test_automatic_micro_batch_keeps_chunks_cache_sized(image_dir: Path) -> None:
    from napari_vdsr.core.train import MICRO_BATCH_PIXELS

    tr = Trainer(_cfg(None, [str(image_dir)], batch_size=64, patch_size=41, val_fraction=0.0))
    tr._setup()
    assert tr.micro_batch_size() == MICRO_BATCH_PIXELS // (41 * 41) == 16
    tr = Trainer(_cfg(None, [str(image_dir)], batch_size=8, patch_size=41, val_fraction=0.0, micro_batch=100))
    tr._setup()
    assert tr.micro_batch_size() == 8  # never more than the batch


def test_lr_schedule_is_pure_function_of_step() -> None:
    cfg = TrainConfig(iterations=100, lr=0.1, lr_schedule="step", lr_step=20, lr_gamma=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 19) == pytest.approx(0.1)
    assert lr_at(cfg, 20) == pytest.approx(0.01)
    assert lr_at(cfg, 45) == pytest.approx(0.001)
    cos = TrainConfig(iterations=100, lr=1.0, lr_schedule="cosine", lr_gamma=0.0)
    assert lr_at(cos, 0) == pytest.approx(1.0)
    assert lr_at(cos, 100) == pytest.approx(0.0, abs=1e-12)


def test_warmup_ramps_the_first_steps_of_this_run() -> None:
    cfg = TrainConfig(iterations=100, lr=0.1, lr_schedule="step", lr_step=20, lr_gamma=0.1, warmup=4)
    assert [lr_at(cfg, k) for k in range(5)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])
    # continuing from exported weights (start_step): the ramp is applied again, to the schedule's lr there
    cont = TrainConfig(iterations=100, lr=0.1, lr_schedule="step", lr_step=20, lr_gamma=0.1, warmup=4, start_step=30)
    assert lr_at(cont, 29) == pytest.approx(0.01)  # before the run: not ramped
    assert [lr_at(cont, 30 + k) for k in range(5)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01])
    assert lr_at(cont, 40) == pytest.approx(0.001)


def test_decay_start_delays_the_step_and_cosine_decays() -> None:
    cos = TrainConfig(iterations=100, lr=1.0, lr_schedule="cosine", lr_gamma=0.0, decay_start=60)
    assert lr_at(cos, 0) == lr_at(cos, 60) == pytest.approx(1.0)  # constant until the decay starts
    assert lr_at(cos, 80) == pytest.approx(0.5)  # half-way through the remaining 40 steps
    assert lr_at(cos, 100) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(cos, 70) > lr_at(cos, 71) > lr_at(cos, 90)
    step = TrainConfig(iterations=100, lr=0.1, lr_schedule="step", lr_gamma=0.1, decay_start=60)
    assert lr_at(step, 69) == pytest.approx(0.1)  # every (100 - 60) // 4 = 10 steps from step 60
    assert [lr_at(step, k) for k in (70, 80, 95)] == pytest.approx([0.01, 0.001, 1e-4])


def test_cli_resume_anneals_a_constant_run_from_decay_start(image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "a"
    common = ["train", "--data", str(image_dir), "--device", "cpu", "--quiet", "--out", str(out), "--scales", "2",
              "--batch-size", "2", "--patch-size", "16", "--depth", "3", "--width", "8", "--optimizer", "adam",
              "--lr", "1e-3", "--val-every", "5"]
    assert cli_main(common + ["--iterations", "4", "--lr-schedule", "constant"]) == 0
    assert cli_main(common + ["--iterations", "8", "--resume", "--lr-schedule", "cosine", "--lr-gamma", "0",
                              "--decay-start", "4"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr_schedule"] == "cosine" and cfg["decay_start"] == 4
    lrs = {e["step"]: e["lr"] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if e["kind"] == "step"}
    assert lrs[4] == pytest.approx(1e-3)  # the constant leg
    assert lrs[8] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))  # 8th step: 3 of 4 into the anneal


def _resume_val_run(out: Path, image_dir: Path, val_dir: Path, iterations: int, val_crop: int, resume: bool) -> str:
    argv = ["train", "--data", str(image_dir), "--val-data", str(val_dir), "--device", "cpu", "--quiet", "--out", str(out),
            "--scales", "2", "--batch-size", "2", "--patch-size", "16", "--depth", "3", "--width", "8", "--optimizer", "adam",
            "--lr", "1e-3", "--val-every", "2", "--iterations", str(iterations), "--val-crop", str(val_crop)]
    assert cli_main(argv + (["--resume"] if resume else [])) == 0
    starts = [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if e["kind"] == "start"]
    return starts[-1]["message"]


def test_resume_on_other_validation_pairs_restarts_the_best_and_keeps_the_old_one(image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "v"
    _resume_val_run(out, image_dir, image_dir, 4, 32, resume=False)
    old_best = load_checkpoint(out / CHECKPOINT_NAME)["best"]
    old_weights = (out / "best.safetensors").read_bytes()
    msg = _resume_val_run(out, image_dir, image_dir, 6, 24, resume=True)  # other crops: other scores
    assert "validation changed" in msg and "best-before-4.safetensors" in msg
    assert (out / "best-before-4.safetensors").read_bytes() == old_weights  # the earlier best is not lost
    vals = [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if e["kind"] == "val"]
    first_after = next(e for e in vals if e["step"] == 6)
    ck = load_checkpoint(out / CHECKPOINT_NAME)
    # the first score on the new pairs is the best whatever the old best was
    assert ck["best"] == pytest.approx(first_after["val_psnr"]) and ck["best"] != pytest.approx(old_best)
    assert json.loads((out / "best.json").read_text())["metrics"]["validation"]["step"] == 6


def test_resume_of_a_checkpoint_without_fingerprint_compares_the_validation_settings(image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    _resume_val_run(out, image_dir, image_dir, 4, 32, resume=False)
    ck = load_checkpoint(out / CHECKPOINT_NAME)
    del ck["val_fingerprint"]  # as written before fingerprints existed
    torch.save(ck, out / CHECKPOINT_NAME)
    assert "validation changed (val_crop)" in _resume_val_run(out, image_dir, image_dir, 6, 24, resume=True)


def test_resume_on_the_same_validation_images_elsewhere_keeps_the_best(image_dir: Path, tmp_path: Path) -> None:
    import shutil

    out, copy = tmp_path / "s", tmp_path / "copy-of-imgs"
    shutil.copytree(image_dir, copy)
    _resume_val_run(out, image_dir, image_dir, 4, 32, resume=False)
    old_best = load_checkpoint(out / CHECKPOINT_NAME)["best"]
    msg = _resume_val_run(out, image_dir, copy, 6, 32, resume=True)  # a GPU machine's copy of the same images
    assert "validation changed" not in msg and not list(out.glob("best-before-*"))
    assert load_checkpoint(out / CHECKPOINT_NAME)["best"] >= old_best


def test_cli_resume_keeps_recipe_fields_the_command_line_has_no_option_for(image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "k"
    list(train(_cfg(out, [str(image_dir)], iterations=4, val_every=2, val_levels=[3.0], quantize=False)))
    assert cli_main(["train", "--data", str(image_dir), "--out", str(out), "--device", "cpu", "--quiet", "--resume",
                     "--iterations", "6"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["val_levels"] == [3.0] and cfg["quantize"] is False and cfg["iterations"] == 6
    vals = [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if e["kind"] == "val"]
    assert vals[-1]["step"] == 6 and set(vals[-1]["val_per_level"]) == {"3"}  # x3 only


def test_cli_warmup_reaches_the_config_and_is_kept_on_resume(image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "w"
    common = ["train", "--data", str(image_dir), "--device", "cpu", "--quiet", "--out", str(out), "--scales", "2",
              "--batch-size", "2", "--patch-size", "16", "--depth", "3", "--width", "8", "--optimizer", "adam",
              "--lr-schedule", "constant", "--lr", "1e-3", "--val-every", "5"]
    assert cli_main(common + ["--iterations", "4", "--warmup", "8"]) == 0
    assert json.loads((out / "config.json").read_text())["warmup"] == 8
    lrs = [json.loads(l)["lr"] for l in (out / "log.jsonl").read_text().splitlines() if '"kind": "step"' in l]
    assert lrs and lrs[0] < 1e-3  # still ramping
    assert cli_main(common + ["--iterations", "6", "--resume"]) == 0
    assert json.loads((out / "config.json").read_text())["warmup"] == 8


# ----------------------------------------------------------------------------- convergence
def test_loss_falls_and_beats_bicubic_on_tiny_set(image_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "run", [str(image_dir)], iterations=60, lr=2e-3, val_every=60, lr_step=1000)
    events = list(train(cfg))
    losses = [e.loss for e in events if e.kind == "step"]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    vals = [e for e in events if e.kind == "val"]
    assert vals and vals[-1].val_baseline_psnr is not None
    assert events[-1].kind == "done" and events[-1].step == 60
    # outputs of a run: checkpoint, log, best model loadable as --model RUN_DIR
    run = tmp_path / "run"
    assert (run / CHECKPOINT_NAME).exists() and (run / "best.safetensors").exists()
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert lines[0]["kind"] == "start" and lines[-1]["kind"] == "done"
    # which machine ran the steps that follow: the CPU's model (a card's name on CUDA)
    assert lines[0]["device"] == cpu_label() and lines[0]["device"].lower().startswith("cpu")
    model, card = load_model(run, task="sr")
    assert card["training"]["steps"] >= 1 and card["tasks"] == ["sr"]
    assert model.depth == 3


# ----------------------------------------------------------------------------- exact resume
def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run)["model"]


def test_resume_is_bit_exact(image_dir: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    list(train(_cfg(straight, [str(image_dir)])))

    split = tmp_path / "split"
    tr = Trainer(_cfg(split, [str(image_dir)]))
    for ev in tr.run():
        if ev.kind == "step" and ev.step == 20:
            tr.stop()
    assert load_checkpoint(split)["step"] == 20
    list(Trainer(_cfg(split, [str(image_dir)]), resume=True).run())

    a, b = _weights(straight), _weights(split)
    assert load_checkpoint(split)["step"] == 40
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # also the optimiser moments
    oa, ob = load_checkpoint(straight)["optimizer"], load_checkpoint(split)["optimizer"]
    for i in oa["state"]:
        assert torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"])


def test_ema_follows_its_recurrence_and_is_what_the_run_exports(image_dir: Path, tmp_path: Path) -> None:
    """ema: e <- d e + (1 - d) w after every step, d = min(ema, (1 + n) / (10 + n)); validated and exported."""
    run = tmp_path / "ema"
    tr = Trainer(_cfg(run, [str(image_dir)], iterations=12, val_every=12, ema=0.8))
    ema: dict[str, torch.Tensor] = {}
    n = 0
    vals = []
    for ev in tr.run():
        if ev.kind == "start":
            ema = {k: v.detach().clone().double() for k, v in tr.model.named_parameters()}
        elif ev.kind == "step":
            d = min(0.8, (1 + n) / (10 + n))
            for k, w in tr.model.named_parameters():
                ema[k] = d * ema[k] + (1 - d) * w.detach().double()
            n += 1
        elif ev.kind == "val":
            vals.append(ev)
    got = dict(tr.ema_model.named_parameters())
    for k in ema:
        torch.testing.assert_close(got[k].double(), ema[k], rtol=0, atol=1e-6)
    # the average differs from the trained weights, and it is the one validated and exported
    assert any(not torch.equal(got[k], w) for k, w in tr.model.named_parameters())
    (val,) = vals
    assert val.val_raw_psnr is not None and val.val_psnr != val.val_raw_psnr
    exported, card = load_model(run / "best.safetensors")
    for k, w in exported.named_parameters():
        assert torch.equal(w.detach(), got[k].detach()), k
    assert card["training"]["recipe"]["ema"] == 0.8
    assert card["metrics"]["validation"]["raw_psnr"] == pytest.approx(val.val_raw_psnr)


def test_resume_with_ema_is_bit_exact_and_ema_can_start_on_resume(image_dir: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    list(train(_cfg(straight, [str(image_dir)], iterations=20, ema=0.9)))
    split = tmp_path / "split"
    tr = Trainer(_cfg(split, [str(image_dir)], iterations=20, ema=0.9))
    for ev in tr.run():
        if ev.kind == "step" and ev.step == 10:
            tr.stop()
    list(Trainer(_cfg(split, [str(image_dir)], iterations=20, ema=0.9), resume=True).run())
    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert a["ema_updates"] == b["ema_updates"] == 20
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
        assert torch.equal(a["model"][k], b["model"][k]), k
    # a run without an average gets one from the step it is resumed with ema: it starts at the current weights
    plain = tmp_path / "plain"
    tr = Trainer(_cfg(plain, [str(image_dir)], iterations=20))
    for ev in tr.run():
        if ev.kind == "step" and ev.step == 10:
            tr.stop()
    assert load_checkpoint(plain)["ema"] is None
    tr = Trainer(_cfg(plain, [str(image_dir)], iterations=10, ema=0.9), resume=True)
    tr._setup()
    for k, w in tr.model.state_dict().items():
        assert torch.equal(tr.ema_model.state_dict()[k], w), k
    with pytest.raises(ValueError):
        _cfg(None, [str(image_dir)], ema=1.0)


def test_cli_resume_keeps_ema(image_dir: Path, tmp_path: Path, capsys) -> None:
    common = ["train", "--data", str(image_dir), "--device", "cpu", "--quiet", "--out", str(tmp_path / "r")]
    recipe = ["--scales", "2", "--batch-size", "4", "--patch-size", "16", "--depth", "3", "--width", "8",
              "--val-every", "5", "--val-crop", "32"]
    assert cli_main(common + recipe + ["--iterations", "5"]) == 0
    capsys.readouterr()
    assert cli_main(common + ["--iterations", "8", "--resume", "--ema", "0.95"]) == 0
    assert "ema None -> 0.95" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "r")["ema_updates"] == 3
    assert cli_main(common + ["--iterations", "10", "--resume"]) == 0  # kept without being given again
    assert json.loads((tmp_path / "r" / "config.json").read_text())["ema"] == 0.95
    assert load_checkpoint(tmp_path / "r")["ema_updates"] == 5
    # a run saved before the option existed (no "ema" in config.json) is told where the value came from
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    del saved["ema"]
    (tmp_path / "r" / "config.json").write_text(json.dumps(saved))
    assert cli_main(common + ["--iterations", "11", "--resume", "--ema", "0.9"]) == 0
    assert "ema (not in config.json) -> 0.9" in capsys.readouterr().err


def test_worker_processes_give_the_same_run(image_dir: Path, tmp_path: Path) -> None:
    """Batches drawn ahead in worker processes are the in-process batches: same weights, same resume."""
    from napari_vdsr.core.train import BatchPrefetcher

    plain = tmp_path / "plain"
    list(train(_cfg(plain, [str(image_dir)], iterations=30)))
    split = tmp_path / "split"
    tr = Trainer(_cfg(split, [str(image_dir)], iterations=30, workers=2))
    for ev in tr.run():
        if ev.kind == "step" and ev.step == 12:
            tr.stop()
    assert tr._prefetch is None  # the worker pool is shut down when the run ends
    assert load_checkpoint(split)["step"] == 12
    list(Trainer(_cfg(split, [str(image_dir)], iterations=30, workers=2), resume=True).run())
    a, b = _weights(plain), _weights(split)
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # the prefetcher hands out exactly the in-process batch of the step asked for, in any order
    tr = Trainer(_cfg(None, [str(image_dir)]))
    tr._setup()
    pf = BatchPrefetcher(tr.sampler, 2, seed=3, rank=0, n=4, depth=3)
    try:
        for step in (0, 1, 5, 6):
            got = pf.get(step)
            want = tr.sampler.batch(np.random.default_rng([3, 0, step]), 4)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        assert not set(pf.pending) & {0, 1, 5, 6}
    finally:
        pf.close()


def test_dead_worker_is_a_clear_training_error(image_dir: Path) -> None:
    from napari_vdsr.core.train import BatchPrefetcher

    tr = Trainer(_cfg(None, [str(image_dir)]))
    tr._setup()
    pf = BatchPrefetcher(tr.sampler, 1, seed=0, rank=0, n=2, depth=1)
    try:
        pf.get(0)
        for p in pf.pool._processes.values():
            p.kill()
        with pytest.raises(TrainingError, match="worker process failed.*resume"):
            for step in range(1, 5):
                pf.get(step)
    finally:
        pf.close()


def test_cli_train_then_resume_equals_straight(image_dir: Path, tmp_path: Path) -> None:
    common = ["train", "--data", str(image_dir), "--scales", "2", "--batch-size", "4", "--patch-size", "16",
              "--depth", "3", "--width", "8", "--optimizer", "sgd", "--lr", "0.01", "--clip-theta", "0.001",
              "--lr-schedule", "step", "--lr-step", "15", "--val-every", "10", "--val-crop", "32",
              "--device", "cpu", "--quiet", "--seed", "1", "--micro-batch", "2"]
    assert cli_main(common + ["--iterations", "40", "--out", str(tmp_path / "a")]) == 0
    assert cli_main(common + ["--iterations", "20", "--out", str(tmp_path / "b")]) == 0
    assert cli_main(common + ["--iterations", "40", "--out", str(tmp_path / "b"), "--resume"]) == 0
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_takes_the_saved_recipe_unless_given_again(image_dir: Path, tmp_path: Path, capsys) -> None:
    """`--resume` with only --data/--out continues the saved recipe exactly; options given again override it."""
    common = ["train", "--data", str(image_dir), "--device", "cpu", "--quiet"]
    recipe = ["--scales", "2", "--batch-size", "4", "--patch-size", "16", "--depth", "3", "--width", "8",
              "--optimizer", "sgd", "--lr", "0.01", "--lr-schedule", "step", "--lr-step", "15", "--val-every", "10",
              "--val-crop", "32", "--seed", "1", "--micro-batch", "2", "--prescale", "1.25"]
    assert cli_main(common + recipe + ["--iterations", "30", "--out", str(tmp_path / "a")]) == 0
    assert cli_main(common + recipe + ["--iterations", "12", "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    # only the step count is given again (as an unambiguous prefix): every other setting comes from config.json
    assert cli_main(common + ["--micro-batch", "2", "--iter=30", "--out", str(tmp_path / "b"), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "changed on the command line: iterations 12 -> 30" in err and "resumed at step 12" in err
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["prescale"] == [1.25] and saved["lr"] == 0.01 and saved["depth"] == 3 and saved["optimizer"] == "sgd"
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # an option given again wins and is reported
    assert cli_main(common + ["--lr", "0.005", "--iterations", "32", "--out", str(tmp_path / "b"), "--resume"]) == 0
    assert "lr 0.01 -> 0.005" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "config.json").read_text())["lr"] == 0.005


def test_crash_while_saving_keeps_previous_checkpoint(image_dir: Path, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    tr = Trainer(_cfg(run, [str(image_dir)], iterations=10, checkpoint_every=5, val_every=100))
    gen = tr.run()
    for ev in gen:
        if ev.kind == "checkpoint":
            break
    good = load_checkpoint(run)
    assert good["step"] == 5

    real_save = torch.save

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial garbage")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        for _ in gen:
            pass
    monkeypatch.setattr(torch, "save", real_save)
    again = load_checkpoint(run)
    assert again["step"] == 5
    for k in good["model"]:
        assert torch.equal(good["model"][k], again["model"][k])
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- bad input
def test_images_smaller_than_patch(tmp_path: Path) -> None:
    tiny = [Plane("tiny", np.random.default_rng(0).random((20, 20), dtype=np.float32))]
    with pytest.raises(TrainingError, match="smaller than one patch"):
        list(Trainer(_cfg(None, [], patch_size=41, val_fraction=0.0), planes=tiny).run())


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="no image files"):
        list(train(_cfg(None, [str(tmp_path / "empty")])))
    assert cli_main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r"), "--quiet"]) == 2


def test_non_image_file(tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    with pytest.raises(TrainingError, match="cannot be read"):
        load_planes([bad])


def test_nan_loss_stops_and_keeps_last_checkpoint(image_dir: Path, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    cfg = _cfg(run, [str(image_dir)], iterations=30, checkpoint_every=10, val_every=100)
    tr = Trainer(cfg)
    real_step = Trainer._train_step

    def step(self, k):
        if k >= 14:
            return torch.tensor(float("nan"))
        return real_step(self, k)

    monkeypatch.setattr(Trainer, "_train_step", step)
    with pytest.raises(TrainingError, match="loss became nan"):
        for _ in tr.run():
            pass
    assert load_checkpoint(run)["step"] == 10


def test_loss_read_back_every_few_steps_changes_nothing_else(image_dir: Path, monkeypatch) -> None:
    """As on a GPU: the loss comes back every 5 steps; the weights are those of a per-step read."""
    from napari_vdsr.core import train as train_mod

    runs = {}
    for every in (1, 5):
        monkeypatch.setattr(train_mod, "loss_read_every", lambda device, every=every: every)
        tr = Trainer(_cfg(None, [str(image_dir)], iterations=12, val_every=100, val_fraction=0.0))
        evs = [ev for ev in tr.run() if ev.kind == "step"]
        runs[every] = ({k: v.clone() for k, v in tr.model.state_dict().items()}, evs)
    (w1, ev1), (w5, ev5) = runs[1], runs[5]
    assert all(torch.equal(w1[k], w5[k]) for k in w1)
    assert all(e.loss is not None for e in ev1)
    assert [e.step for e in ev5 if e.loss is not None] == [5, 10, 12]
    for a, b in zip(ev1, ev5):
        if b.loss is not None:
            assert a.loss == b.loss


def test_nan_caught_before_a_checkpoint_when_losses_are_read_late(image_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from napari_vdsr.core import train as train_mod

    monkeypatch.setattr(train_mod, "loss_read_every", lambda device: 5)
    run = tmp_path / "run"
    tr = Trainer(_cfg(run, [str(image_dir)], iterations=30, checkpoint_every=6, val_every=100))
    real_step = Trainer._train_step

    def step(self, k):
        out = real_step(self, k)
        return out * float("nan") if k >= 10 else out  # steps 11, 12, ...

    monkeypatch.setattr(Trainer, "_train_step", step)
    with pytest.raises(TrainingError, match="loss became nan at step 11"):
        for _ in tr.run():
            pass
    # the checkpoint due at step 12 read steps 11-12 first and was not written
    assert load_checkpoint(run)["step"] == 6


def test_prescale_shrinks_training_and_validation_planes(image_dir: Path) -> None:
    from napari_vdsr.core.data import split_validation
    from napari_vdsr.core.train import prescale_planes

    planes = load_planes([str(image_dir)])
    half = prescale_planes(planes, 2.0)
    assert prescale_planes(planes, 1.0) is planes
    for a, b in zip(planes, half):
        assert b.data.shape == tuple(int(round(n / 2)) for n in a.data.shape)
        assert b.data.dtype == np.float32 and 0.0 <= b.data.min() and b.data.max() <= 1.0
        assert abs(float(b.data.mean()) - float(a.data.mean())) < 0.02  # the same picture, smaller
    with pytest.raises(TrainingError, match="smaller than 16 px"):
        prescale_planes([Plane("tiny", np.zeros((20, 20), np.float32))], 2.0)
    tr = Trainer(_cfg(None, [str(image_dir)], prescale=2.0, iterations=1, val_fraction=0.25))
    tr._setup()
    train_half, val_half = split_validation(half, 0.25)
    assert [p.data.shape for p in tr.sampler.planes] == [p.data.shape for p in train_half]
    assert len(tr.val_items) > 0 and all(
        it.target.shape[0] <= max(p.data.shape[0] for p in val_half) for it in tr.val_items)


def test_prescale_several_factors_trains_on_the_union(image_dir: Path, tmp_path: Path) -> None:
    from napari_vdsr.cli import _config_from_args, build_parser
    from napari_vdsr.core.data import split_validation
    from napari_vdsr.core.train import prescale_planes

    assert TrainConfig(prescale=2.0).prescale == [2.0]  # run configs written before lists still load
    assert TrainConfig(prescale=[3, 2, 2]).prescale == [2.0, 3.0]
    with pytest.raises(ValueError, match="prescale"):
        TrainConfig(prescale=[2.0, 0.5])
    a = build_parser().parse_args(["train", "--data", str(image_dir), "--task", "sr", "--out", str(tmp_path / "r"),
                                   "--prescale", "2", "3", "--val-fraction", "0.25", "--iterations", "1",
                                   "--patch-size", "16", "--scales", "2"])
    cfg = _config_from_args(a, finetune=False)
    assert cfg.prescale == [2.0, 3.0] and cfg.validation_prescale() == 2.0
    tr = Trainer(cfg)
    tr._setup()
    planes = load_planes([str(image_dir)])
    train, val = split_validation(planes, 0.25)
    want = sorted([p.data.shape for p in prescale_planes(train, 2.0)] + [p.data.shape for p in prescale_planes(train, 3.0)])
    assert sorted(p.data.shape for p in tr.sampler.planes) == want
    # the held-out image is not trained on at any factor
    held = {p.name for p in val}
    assert not any(p.name.split("@/")[0] in held for p in tr.sampler.planes)
    assert {p.name.split("@/")[1] for p in tr.sampler.planes} == {"2", "3"}
    # validation at the smallest factor; --val-prescale 1 keeps it as it is
    val2 = prescale_planes(val, 2.0)
    assert max(it.target.shape[0] for it in tr.val_items) <= max(p.data.shape[0] for p in val2)
    tr1 = Trainer(TrainConfig(**{**cfg.model_dump(), "val_prescale": 1.0, "out": str(tmp_path / "r1")}))
    tr1._setup()
    assert max(it.target.shape[0] for it in tr1.val_items) > max(p.data.shape[0] for p in val2)


def test_val_data_validates_on_separate_images(image_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    from napari_vdsr.cli import _config_from_args, build_parser

    vdir = tmp_path / "val"
    vdir.mkdir()
    val_imgs = [_texture(10 + i, size=60) for i in range(2)]
    for i, im in enumerate(val_imgs):
        Image.fromarray(im).save(vdir / f"v{i}.png")
    a = build_parser().parse_args(["train", "--data", str(image_dir), "--task", "sr", "--out", str(tmp_path / "run"),
                                   "--val-data", str(vdir)])
    assert _config_from_args(a).val_data == [str(vdir)]

    tr = Trainer(_cfg(None, [str(image_dir)], val_data=[str(vdir)], val_fraction=0.25, iterations=1))
    tr._setup()
    # every training image trains; the validation pairs come from the separate images only
    assert len(tr.sampler.planes) == 4 and tr.n_val_planes == 2
    centre = [im[6:54, 6:54].astype(np.float32) / 255.0 for im in val_imgs]
    assert len(tr.val_items) == 2 * 2  # 2 images x scales 2, 3
    for it in tr.val_items:
        assert any(np.allclose(it.target, c, atol=1e-6) for c in centre)
    events = list(Trainer(_cfg(None, [str(image_dir)], val_data=[str(vdir)], iterations=10, val_every=10)).run())
    assert any(e.val_psnr is not None for e in events if hasattr(e, "val_psnr"))

    with pytest.raises(TrainingError):
        Trainer(_cfg(None, [str(image_dir)], val_data=[str(tmp_path / "missing")]))._setup()
    from napari_vdsr.core.finetune import make_finetune_trainer

    clean = _texture(3, size=64)
    noisy = np.clip(clean.astype(np.int16) + 9, 0, 255).astype(np.uint8)
    with pytest.raises(TrainingError, match="pairs"):
        make_finetune_trainer("denoise", pairs=[(noisy, clean)], val_data=[str(vdir)], iterations=1)._setup()


def test_base_model_for_another_task(image_dir: Path, tmp_path: Path) -> None:
    from napari_vdsr.core.weights import save_model

    p = save_model(VDSR(3, 8), tmp_path / "den.safetensors", {"tasks": ["denoise"]})
    with pytest.raises(TrainingError, match="serves"):
        list(train(_cfg(None, [str(image_dir)], init_from=str(p))))


def test_resume_does_not_need_the_file_the_run_started_from(image_dir: Path, tmp_path: Path) -> None:
    """The checkpoint holds the weights and the starting weights: a run copied to another machine
    (its --from file left behind) resumes exactly, and still compares itself with its start."""
    from napari_vdsr.core.weights import save_model

    torch.manual_seed(11)
    base = save_model(VDSR(3, 8), tmp_path / "base.safetensors", {"tasks": ["sr"]})
    straight = tmp_path / "straight"
    list(train(_cfg(straight, [str(image_dir)], iterations=20, init_from=str(base), start_step=5)))

    split = tmp_path / "split"
    tr = Trainer(_cfg(split, [str(image_dir)], iterations=20, init_from=str(base), start_step=5))
    for ev in tr.run():
        if ev.kind == "step" and ev.step == 12:
            tr.stop()
    base.unlink()
    tr = Trainer(_cfg(split, [str(image_dir)], iterations=20, init_from=str(base), start_step=5), resume=True)
    events = list(tr.run())
    assert tr.resumed and load_checkpoint(split)["step"] == 20
    a, b = _weights(straight), _weights(split)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the starting weights came from the checkpoint, not from a fresh random model
    ref = load_checkpoint(straight)["base_state"]
    for k, v in tr.base_state.items():
        assert torch.equal(v, ref[k]), k
    base_psnrs = [ev.val_base_model_psnr for ev in events if getattr(ev, "val_base_model_psnr", None) is not None]
    assert base_psnrs and all(np.isfinite(base_psnrs))


# ----------------------------------------------------------------------------- torchrun
def _start_until_validated(cmd: list[str], log: Path, timeout: float) -> subprocess.Popen:
    """Start a training command (one thread per process) and wait until its log holds a validation."""
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + timeout
    while time.time() < deadline and not (log.exists() and '"kind": "val"' in log.read_text()):
        time.sleep(0.2)
    return proc


def _torchrun_train(image_dir: Path, out: Path, iterations: int) -> list[str]:
    """A tiny two-process CPU training command (gloo)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "napari_vdsr.cli", "train", "--data", str(image_dir), "--scales", "2", "--iterations", str(iterations),
            "--batch-size", "4", "--patch-size", "16", "--depth", "3", "--width", "8", "--optimizer", "adam",
            "--val-every", "3", "--val-crop", "32", "--device", "cpu", "--quiet", "--out", str(out)]


@pytest.mark.slow
def test_torchrun_two_processes_cpu(image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = _torchrun_train(image_dir, out, iterations=6)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    models = sorted(p.name for p in out.glob("*.safetensors"))
    assert models == ["best.safetensors", "last.safetensors"]
    card = json.loads((out / "best.json").read_text())
    assert card["training"]["processes"] == 2
    assert load_checkpoint(out)["step"] == 6
    # only the first process reports (the second's "done ... model: None" would say nothing was saved)
    assert res.stderr.count("napari-vdsr: done at step 6/6") == 1 and "model: None" not in res.stderr
    assert res.stderr.count("device cpu") == 1


@pytest.mark.slow
def test_cli_sigint_stops_gracefully_and_saves(image_dir: Path, tmp_path: Path) -> None:
    import signal

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "napari_vdsr.cli", "train", "--data", str(image_dir), "--scales", "2",
           "--iterations", "100000", "--batch-size", "2", "--patch-size", "16", "--depth", "3", "--width", "8",
           "--val-every", "5", "--val-crop", "32", "--device", "cpu", "--quiet", "--out", str(out)]
    proc = _start_until_validated(cmd, out / "log.jsonl", 120)
    log = out / "log.jsonl"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopping after this step" in err
    ck = load_checkpoint(out)
    assert 0 < ck["step"] < 100000
    assert json.loads(log.read_text().splitlines()[-1])["kind"] == "stopped"
    assert (out / "best.safetensors").exists()


def test_poisson_gaussian_training_noise(image_dir: Path, tmp_path: Path) -> None:
    from napari_vdsr.core.data import PatchSampler, load_planes

    planes = load_planes([image_dir])
    clean_only = PatchSampler(planes, "denoise", 24, level_range=(1000.0, 1000.0), noise_model="poisson")
    with_read = PatchSampler(planes, "denoise", 24, level_range=(1000.0, 1000.0), noise_model="poisson", read_noise=0.2)
    a_in, a_tg = clean_only.batch(np.random.default_rng(0), 16)
    b_in, b_tg = with_read.batch(np.random.default_rng(0), 16)
    # read noise adds variance beyond the (weak, 1000-photon) shot noise
    assert np.std(b_in - b_tg) > 2 * np.std(a_in - a_tg)
    cfg = _cfg(None, [str(image_dir)], task="denoise", noise_model="poisson", photon_range=(10.0, 100.0),
               read_noise=0.02, iterations=3, val_every=3)
    events = list(train(cfg))
    assert events[-1].kind == "done"


def test_every_recipe_field_has_a_command_line_option(tmp_path: Path) -> None:
    """A field added to TrainConfig reaches ``train`` (and ``finetune``) without a hand mapping."""
    from napari_vdsr.cli import _DEST_FIELD, _NOT_ON_COMMAND_LINE, _config_from_args, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    for command, own in (("train", set()), ("finetune", {"depth", "width", "transfer", "start_step"})):
        dests = {_DEST_FIELD.get(a.dest, a.dest) for a in sub.choices[command]._actions}  # noqa: SLF001
        missing = set(TrainConfig.model_fields) - _NOT_ON_COMMAND_LINE - own - dests
        assert not missing, f"{command}: TrainConfig fields without an option: {sorted(missing)}"

    out = str(tmp_path / "run")
    cfg = _config_from_args(parser.parse_args(
        ["train", "--data", "a.png", "--out", out, "--optimizer", "sgd", "--read-noise", "0.03", "--no-amp",
         "--sigma-range", "5", "9", "--clip-mode", "norm", "--val-crop", "96", "--workers", "2"]))
    assert (cfg.lr, cfg.clip_theta, cfg.weight_decay) == (0.1, SGD_CLIP_THETA, TrainConfig().weight_decay)
    assert (cfg.read_noise, cfg.amp, cfg.sigma_range, cfg.clip_mode, cfg.val_crop, cfg.workers, cfg.name) == (
        0.03, False, (5.0, 9.0), "norm", 96, 2, "run")
    cfg = _config_from_args(parser.parse_args(["train", "--data", "a.png", "--out", out, "--optimizer", "adam",
                                               "--clip-theta", "0", "--weight-decay", "0.5", "--name", "m"]))
    assert (cfg.lr, cfg.clip_theta, cfg.weight_decay, cfg.amp, cfg.name) == (1e-4, None, 0.0, True, "m")
    a = parser.parse_args(["finetune", "--images", "x.tif", "--out", out])
    cfg = _config_from_args(a, finetune=True)
    assert (cfg.data, cfg.scales, cfg.optimizer, cfg.iterations) == (["x.tif"], [2.0], "adam", 300)


@pytest.mark.slow
def test_torchrun_stop_seen_by_one_process_stops_all_and_saves(image_dir: Path, tmp_path: Path) -> None:
    import signal

    psutil = pytest.importorskip("psutil")
    out = tmp_path / "ddp"
    cmd = _torchrun_train(image_dir, out, iterations=100000)
    proc = _start_until_validated(cmd, out / "log.jsonl", 180)
    rank1 = [c for c in psutil.Process(proc.pid).children(recursive=True)
             if c.environ().get("RANK") == "1" and "napari_vdsr.cli" in " ".join(c.cmdline())]
    assert len(rank1) == 1, "rank 1 not found"
    rank1[0].send_signal(signal.SIGINT)  # only one process is asked to stop
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    step = load_checkpoint(out)["step"]
    assert 0 < step < 100000
    assert (out / "last.safetensors").is_file() and (out / "best.safetensors").is_file()
    assert json.loads((out / "last.json").read_text())["training"]["steps"] == step


# ----------------------------------------------------------------------------- review fixes (session 15)
def test_warmup_does_not_move_the_cosine_decay() -> None:
    plain = TrainConfig(iterations=10_000, lr=1.0, lr_schedule="cosine", lr_gamma=0.0, start_step=5000)
    warm = TrainConfig(**{**plain.model_dump(), "warmup": 1000})
    assert lr_at(warm, 8000) == pytest.approx(lr_at(plain, 8000))  # after the ramp: the same schedule
    assert lr_at(warm, 5499) == pytest.approx(lr_at(plain, 5499) * 0.5)  # in it: only multiplied
    fresh = TrainConfig(iterations=100, lr=1.0, lr_schedule="cosine", lr_gamma=0.0, warmup=10)
    assert lr_at(fresh, 50) == pytest.approx(0.5)


def test_clipping_at_lr_zero_is_a_no_op_and_training_goes_on(image_dir: Path, tmp_path: Path) -> None:
    p = torch.nn.Parameter(torch.zeros(10))
    p.grad = torch.linspace(-1, 1, 10)
    assert clip_gradients([p], theta=0.01, lr=0.0) == 0.0 and p.grad.abs().max().item() == 1.0
    for mode in ("element", "norm"):
        cfg = _cfg(tmp_path / mode, [str(image_dir)], optimizer="sgd", lr=0.1, lr_schedule="step", lr_step=2,
                   lr_gamma=0.0, clip_theta=0.01, clip_mode=mode, iterations=4, val_every=100)
        ends = [ev for ev in train(cfg) if ev.kind == "done"]
        assert ends and ends[0].step == 4


def test_card_of_a_scale_range_run_lists_the_range(image_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "r", [str(image_dir)], scale_range=(1.5, 2.5), iterations=2, val_every=100)
    list(train(cfg))
    assert json.loads((tmp_path / "r" / "last.json").read_text())["scales"] == [1.5, 2.5]


def test_resume_of_a_finished_run_keeps_its_last_card_and_a_broken_config_is_a_clear_error(
        image_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = ["train", "--data", str(image_dir), "--scales", "2", "--iterations", "4", "--batch-size", "2",
            "--patch-size", "16", "--depth", "3", "--width", "4", "--val-every", "2", "--val-crop", "32",
            "--device", "cpu", "--quiet", "--out", str(out)]
    assert cli_main(args) == 0
    before = json.loads((out / "last.json").read_text())["metrics"]["validation"]
    assert "psnr" in before
    assert cli_main(args + ["--resume"]) == 0
    assert json.loads((out / "last.json").read_text())["metrics"]["validation"] == before
    (out / "config.json").write_text("")  # e.g. a full disk, long ago
    capsys.readouterr()
    assert cli_main(args + ["--resume"]) == 2
    assert "config.json cannot be read" in capsys.readouterr().err
    assert cli_main(args[:-2] + ["--out", str(tmp_path / "x"), "--iterations", "0"]) == 2
    assert "--iterations: Input should be greater than or equal to 1" in capsys.readouterr().err


def test_resume_after_a_crash_keeps_a_best_exported_after_the_checkpoint(image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _cfg(out, [str(image_dir)], iterations=12, val_every=2, checkpoint_every=4)
    for ev in train(cfg):
        if ev.kind == "step" and ev.step == 7:
            break  # a crash after the checkpoint at step 4 and validations at 6
    assert load_checkpoint(out)["step"] == 4
    card = json.loads((out / "best.json").read_text())
    card["metrics"]["validation"]["psnr"] = 99.0  # a best no resumed step can beat
    (out / "best.json").write_text(json.dumps(card))
    tr = Trainer(cfg, resume=True)
    events = list(tr.run())
    assert tr.best == 99.0 and not any(ev.path for ev in events if ev.kind == "val")
    assert json.loads((out / "best.json").read_text())["metrics"]["validation"]["psnr"] == 99.0


def test_poisson_validation_has_read_noise_and_dropped_planes_are_named(tmp_path: Path) -> None:
    from napari_vdsr.core.data import make_validation

    plane = Plane("flat", np.full((64, 64), 0.5, np.float32))
    residual = [float(np.std(make_validation([plane], "denoise", [1000.0], 64, False, "poisson", rn)[0].inp - 0.5))
                for rn in (0.0, 0.2)]
    assert residual[1] > 3 * residual[0]  # read noise of 0.1 on top of the shot noise of 1000 photons
    planes = [Plane(f"p{i}", np.random.default_rng(i).random((60, 60), dtype=np.float32)) for i in range(3)]
    planes.append(Plane("tiny", np.zeros((20, 20), np.float32)))
    cfg = _cfg(None, [], iterations=1, val_fraction=0.0)
    start = next(iter(Trainer(cfg, planes=planes).run()))
    assert "1 training plane(s) smaller than one patch left out: tiny" in start.message
    one = Trainer(_cfg(None, [], iterations=1, val_fraction=0.05), planes=planes[:1])
    start = next(iter(one.run()))
    assert "no validation" in start.message and "--val-data" in start.message


def test_resume_with_nothing_to_do_keeps_the_checkpoint_and_refreshes_a_stale_last(image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _cfg(out, [str(image_dir)], iterations=4, val_every=2)
    list(train(cfg))
    ck = out / CHECKPOINT_NAME
    before = (ck.stat().st_mtime_ns, ck.read_bytes())
    card = json.loads((out / "last.json").read_text())
    card["training"]["steps"] = 2  # the last weights of an older leg (e.g. a GPU leg finished the run elsewhere)
    (out / "last.json").write_text(json.dumps(card))
    list(Trainer(cfg, resume=True).run())
    assert (ck.stat().st_mtime_ns, ck.read_bytes()) == before  # a finished run does not look newer
    assert json.loads((out / "last.json").read_text())["training"]["steps"] == 4
    list(train(_cfg(None, [str(image_dir)], iterations=1)))  # and without a run folder


def test_validation_at_a_non_integer_scale_shrinks_by_exactly_that_scale() -> None:
    from napari_vdsr.core.data import _sr_fit, make_validation

    plane = Plane("p", np.random.default_rng(0).random((64, 64), dtype=np.float32))
    for lev in (1.5, 2.5, 3.5):
        size, n = _sr_fit(48, lev)
        assert size <= 48 and size == n * lev  # a whole number of low-resolution pixels
        item = make_validation([plane], "sr", [lev], 48)[0]
        assert item.target.shape == item.inp.shape == (size, size)
    assert make_validation([plane], "sr", [2.0], 48)[0].target.shape == (48, 48)  # integer scales as before


def test_a_planar_rgb_tiff_trains_as_colour_like_predict_reads_it(tmp_path: Path) -> None:
    import tifffile

    from napari_vdsr.core.io import read_image

    rgb = (np.random.default_rng(3).random((48, 40, 3)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "interleaved.tif", rgb)  # axes YXS
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    assert tifffile.TiffFile(tmp_path / "planar.tif").series[0].axes == "SYX"
    planar = load_planes([tmp_path / "planar.tif"])
    inter = load_planes([tmp_path / "interleaved.tif"])
    assert len(planar) == len(inter) == 1  # one luminance plane, not three grey ones
    np.testing.assert_array_equal(planar[0].data, inter[0].data)
    # the reader moves the samples last (what restore, evaluate and finetune --pairs expect) unless told not to
    np.testing.assert_array_equal(read_image(tmp_path / "planar.tif"), rgb)
    assert read_image(tmp_path / "planar.tif", samples_last=False).shape == (3, 48, 40)
    # a grey stack of three planes stays three planes
    tifffile.imwrite(tmp_path / "stack.tif", np.moveaxis(rgb, -1, 0), photometric="minisblack")
    assert len(load_planes([tmp_path / "stack.tif"])) == 3


def test_a_second_process_on_a_running_folder_is_refused_and_the_first_keeps_its_checkpoint(
        image_dir: Path, tmp_path: Path) -> None:
    """Two runs writing one folder would overwrite each other's checkpoint: the second is refused while
    the first holds the folder, and may go on once it has ended."""
    out = tmp_path / "run"
    list(train(_cfg(out, [str(image_dir)], iterations=2)))
    before = (out / CHECKPOINT_NAME).read_bytes()
    # another process (here: this one, through a separate open file) is training in the folder
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from napari_vdsr.core.train import lock_run_dir\n"
        "lock = lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)"), str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(TrainingError, match=r"another training process .*pid %d" % child.pid):
            list(train(_cfg(out, [str(image_dir)], iterations=4), resume=True))
        assert (out / CHECKPOINT_NAME).read_bytes() == before
        assert cli_main(["train", "--data", str(image_dir), "--out", str(out), "--resume", "--iterations", "4",
                         "--quiet", "--device", "cpu"]) != 0
    finally:
        child.kill()
        child.wait()
    list(train(_cfg(out, [str(image_dir)], iterations=4), resume=True))  # the folder is free again
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 4


def test_batch_workers_do_not_hold_the_folder_after_the_trainer_is_gone(image_dir: Path, tmp_path: Path) -> None:
    """Forked batch workers close their copy of the lock: a killed trainer's orphaned workers leave
    the folder free for --resume."""
    import signal
    import time

    from napari_vdsr.core.train import lock_run_dir

    out = tmp_path / "run"
    code = ("import sys; from napari_vdsr.cli import main; "
            "sys.exit(main(['train', '--data', sys.argv[1], '--out', sys.argv[2], '--iterations', '100000', '--workers', '1', "
            "'--batch-size', '4', '--patch-size', '16', '--depth', '3', '--width', '8', '--device', 'cpu', '--quiet', "
            "'--val-every', '100000', '--checkpoint-minutes', '100']))")
    child = subprocess.Popen([sys.executable, "-c", code, str(image_dir), str(out)], start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "log.jsonl").exists() or "step" not in (out / "log.jsonl").read_text():
            assert time.monotonic() < deadline and child.poll() is None, "the training did not start"
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)  # the trainer dies; its forked worker may live on a while
        child.wait()
        lock = lock_run_dir(out)  # must not raise: no process of the dead run holds the folder
        lock.close()
    finally:
        with contextlib.suppress(ProcessLookupError):  # the trainer and any worker left behind
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def test_a_stop_before_the_first_validation_keeps_its_best_on_resume(image_dir: Path, tmp_path: Path) -> None:
    """The stop validates after writing its checkpoint: that score is still the best to beat on resume."""
    out = tmp_path / "run"
    cfg = _cfg(out, [str(image_dir)], iterations=12, val_every=10)
    tr = Trainer(cfg)
    for ev in tr.run():
        if ev.kind == "step" and ev.step == 3:
            tr.stop()
    stopped = json.loads((out / "best.json").read_text())["metrics"]["validation"]
    assert stopped["step"] == 3 and load_checkpoint(out)["best"] == -math.inf
    again = Trainer(cfg, resume=True)
    run = again.run()
    assert next(run).kind == "start" and again.best == pytest.approx(stopped["psnr"])
    run.close()
    # resumed on other validation images, that score (of the old images) is no longer the one to beat
    other = Trainer(_cfg(out, [str(image_dir)], iterations=12, val_every=10, val_crop=32), resume=True)
    run = other.run()
    start = next(run)
    assert other.best == -math.inf and "validation changed" in start.message and "(-inf)" not in start.message
    assert (out / "best-before-3.safetensors").exists() and not (out / "best.safetensors").exists()
    run.close()


def test_resume_refuses_a_folder_with_weights_but_no_checkpoint(image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _cfg(out, [str(image_dir)], iterations=4, val_every=2)
    list(train(cfg))
    best = (out / "best.safetensors").read_bytes()
    (out / CHECKPOINT_NAME).unlink()  # a crash before the first checkpoint
    with pytest.raises(TrainingError, match="no checkpoint.pt to resume.*--from"):
        list(Trainer(cfg, resume=True).run())
    assert (out / "best.safetensors").read_bytes() == best
    fresh = tmp_path / "fresh"  # an empty or missing folder: --resume starts the run
    assert [ev.kind for ev in Trainer(_cfg(fresh, [str(image_dir)], iterations=2), resume=True).run()][-1] == "done"


def test_resume_refuses_another_network_or_optimiser(image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    list(train(_cfg(out, [str(image_dir)], iterations=2)))
    for change in ({"depth": 4}, {"width": 4}, {"optimizer": "sgd", "lr": 0.1}):
        with pytest.raises(TrainingError, match="keeps its network and optimiser"):
            list(Trainer(_cfg(out, [str(image_dir)], iterations=4, **change), resume=True).run())
    assert load_checkpoint(out)["step"] == 2


def test_start_step_needs_from_and_fits_the_run(image_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="--from"):
        list(train(_cfg(tmp_path / "a", [str(image_dir)], iterations=10, start_step=5)))
    with pytest.raises(TrainingError, match="--transfer.*--from"):
        list(train(_cfg(tmp_path / "t", [str(image_dir)], iterations=10, transfer=True)))
    list(train(_cfg(tmp_path / "base", [str(image_dir)], iterations=2)))
    with pytest.raises(TrainingError, match="past the run's end"):
        list(train(_cfg(tmp_path / "b", [str(image_dir)], iterations=10, start_step=15,
                        init_from=str(tmp_path / "base" / "last.safetensors"))))
    # a base of another shape: the run takes it and says so
    tr = Trainer(_cfg(tmp_path / "c", [str(image_dir)], iterations=1, depth=5, width=16,
                      init_from=str(tmp_path / "base" / "last.safetensors")))
    start = next(iter(tr.run()))
    assert "base model's shape: depth 3, width 8" in start.message and tr.model.depth == 3


def test_cli_refuses_a_negative_seed_and_weight_decay_with_adam(image_dir: Path, tmp_path: Path, capsys) -> None:
    common = ["train", "--data", str(image_dir), "--device", "cpu", "--quiet", "--iterations", "1", "--depth", "3",
              "--width", "8", "--patch-size", "16", "--batch-size", "2"]
    assert cli_main(common + ["--seed", "-1", "--out", str(tmp_path / "s")]) == 2
    assert "--seed" in capsys.readouterr().err and not (tmp_path / "s").exists()
    assert cli_main(common + ["--optimizer", "adam", "--weight-decay", "0.01", "--out", str(tmp_path / "w")]) == 2
    assert "--optimizer sgd" in capsys.readouterr().err
    # on resume the run's optimiser decides: an SGD run takes it without --optimizer again, an Adam run refuses it
    assert cli_main(common + ["--optimizer", "sgd", "--lr", "0.01", "--out", str(tmp_path / "sgd")]) == 0
    assert cli_main(common + ["--weight-decay", "0.001", "--iterations", "2", "--out", str(tmp_path / "sgd"),
                              "--resume"]) == 0
    assert json.loads((tmp_path / "sgd" / "config.json").read_text())["weight_decay"] == 0.001
    assert cli_main(common + ["--optimizer", "adam", "--out", str(tmp_path / "adam")]) == 0
    assert cli_main(common + ["--weight-decay", "0.001", "--iterations", "2", "--out", str(tmp_path / "adam"),
                              "--resume"]) == 2


def test_cli_resume_with_the_same_optimizer_keeps_the_lr(image_dir: Path, tmp_path: Path, capsys) -> None:
    common = ["train", "--data", str(image_dir), "--device", "cpu", "--quiet", "--depth", "3", "--width", "8",
              "--patch-size", "16", "--batch-size", "2", "--out", str(tmp_path / "r")]
    assert cli_main(common + ["--iterations", "2", "--optimizer", "adam", "--lr", "3e-5"]) == 0
    capsys.readouterr()
    assert cli_main(common + ["--iterations", "3", "--optimizer", "adam", "--resume"]) == 0
    assert "lr" not in capsys.readouterr().err.split("changed on the command line")[-1].split("iterations")[0]
    assert json.loads((tmp_path / "r" / "config.json").read_text())["lr"] == 3e-5


def test_a_dead_worker_does_not_leave_close_waiting_for_the_others(image_dir: Path) -> None:
    """Workers ignore SIGTERM (the trainer handles it); after one dies the pool's SIGTERM to the others
    would not end them, so close() kills them instead of waiting for ever."""
    import threading

    from napari_vdsr.core.train import BatchPrefetcher

    tr = Trainer(_cfg(None, [str(image_dir)]))
    tr._setup()
    pf = BatchPrefetcher(tr.sampler, 2, seed=0, rank=0, n=2, depth=2)
    pf.get(0)
    procs = list(pf.pool._processes.values())
    procs[0].kill()
    with pytest.raises(TrainingError, match="worker process failed"):
        for step in range(1, 50):
            pf.get(step)
    closer = threading.Thread(target=pf.close, daemon=True)
    closer.start()
    closer.join(60)
    assert not closer.is_alive(), "close() is still waiting for the workers"
    assert all(not p.is_alive() for p in procs)
