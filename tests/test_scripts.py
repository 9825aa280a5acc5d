"""The helper scripts of the bundled-weights training (scripts/): what they read and write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from helpers import load_benchmark_script, tiny_run_in_legs
from PIL import Image


def _write_log(path: Path, lines: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))


def _val(step: int, psnr: float) -> dict:
    return {"kind": "val", "step": step, "total": 100, "val_psnr": psnr, "val_baseline_psnr": 30.0,
            "val_per_level": {"2": psnr}}


def test_plot_training_tells_gpu_steps_from_the_start_lines(tmp_path: Path) -> None:
    plot = load_benchmark_script("plot_training", "scripts")
    _write_log(tmp_path / plot.RUNS["sr-grid"][0] / "log.jsonl", [
        {"kind": "start", "step": 0, "total": 100, "message": "device cpu"},  # an old log: no "device"
        _val(10, 31.0),
        {"kind": "start", "step": 15, "total": 100, "device": "NVIDIA H100 80GB HBM3"},
        _val(20, 31.5), _val(30, 31.6),
        {"kind": "start", "step": 35, "total": 100, "device": "cpu"},
        _val(40, 31.7),
    ])
    curves = plot.read_curves(tmp_path)
    assert [(p["step"], p["device"]) for p in curves["sr-grid"]] == [
        (10, "CPU"), (20, "NVIDIA H100"), (30, "NVIDIA H100"), (40, "CPU")]
    assert "sr-photos" not in curves  # the same log's points from step 86,001 on only (validated on other images)


def test_prepare_gpu_bundle_packs_the_sr_run_and_the_referee(tmp_path: Path) -> None:
    prep = load_benchmark_script("prepare_gpu_bundle", "scripts")
    data = tmp_path / "data"
    data.mkdir()
    rgb = (np.arange(24 * 32 * 3) % 251).reshape(24, 32, 3).astype(np.uint8)
    Image.fromarray(rgb).save(data / "a.png")
    runs = tmp_path / "runs"
    run = runs / prep.RESUME["sr"]
    run.mkdir(parents=True)
    for name in ["checkpoint.pt", "config.json", "log.jsonl", "best.safetensors", "best.json", "last.safetensors"]:
        (run / name).write_text(name)
    (runs / "referee-photos" / "x1" / "HR").mkdir(parents=True)
    (runs / "referee-photos" / "x1" / "HR" / "photo.png").write_text("png")
    out = tmp_path / "gpu"
    (out / "init").mkdir(parents=True)
    (out / "init" / "sr.safetensors").write_text("stale")  # from an earlier bundle
    assert prep.main(["--out", str(out), "--data", str(data), "--runs", str(runs), "--no-wheels"]) == 0
    y = np.asarray(Image.open(out / "train" / "a.png"))
    assert y.shape == (24, 32) and y.dtype == np.uint8  # 8-bit luminance
    assert sorted(p.name for p in (out / "resume" / "sr").iterdir()) == sorted(prep.RUN_FILES)  # no last.*
    assert (out / "referee" / "photo.png").read_text() == "png"
    assert not list((out / "init").glob("sr.*"))  # the resumed task takes no init weights
    # a run that validates on its own folder takes that folder as the referee
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "astronaut.png").write_text("own")
    (run / "config.json").write_text(json.dumps({"val_data": [str(photos)]}))
    assert prep.main(["--out", str(out), "--data", str(data), "--runs", str(runs), "--no-wheels"]) == 0
    assert sorted(p.name for p in (out / "referee").iterdir()) == ["astronaut.png"]
    assert (out / "init" / "denoise.safetensors").exists() and (out / "init" / "deblock.json").exists()
    # without the run, SR starts from the cycle's resume point in the package, when it is there
    (run / "checkpoint.pt").unlink()
    assert prep.main(["--out", str(out), "--data", str(data), "--runs", str(runs), "--no-wheels"]) == 0
    weights = Path(prep.ROOT) / "src" / "napari_vdsr" / "weights"
    point = weights / f"{prep.RESUME_POINT['sr']}.json"
    want = json.loads((point if point.exists() else weights / f"{prep.BUNDLED['sr']}.json").read_text())
    assert json.loads((out / "init" / "sr.json").read_text()) == want


def test_prepare_gpu_bundle_falls_back_to_the_previous_cycle(tmp_path: Path) -> None:
    """Before the cycle's run exists, the previous cycle's run goes to the GPU (gpu_session.sh finishes or continues it)."""
    prep = load_benchmark_script("prepare_gpu_bundle", "scripts")
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / "a.png")
    runs = tmp_path / "runs"
    prev = runs / prep.RESUME_FALLBACK["sr"]
    prev.mkdir(parents=True)
    for name in prep.RUN_FILES:
        (prev / name).write_text(f"previous {name}")
    (runs / "referee-photos" / "x1" / "HR").mkdir(parents=True)
    out = tmp_path / "gpu"
    assert prep.main(["--out", str(out), "--data", str(data), "--runs", str(runs), "--no-wheels"]) == 0
    assert (out / "resume" / "sr" / "checkpoint.pt").read_text() == "previous checkpoint.pt"
    run = runs / prep.RESUME["sr"]  # once the cycle's own run has a checkpoint, that one goes
    run.mkdir()
    (run / "checkpoint.pt").write_text("current")
    assert prep.main(["--out", str(out), "--data", str(data), "--runs", str(runs), "--no-wheels"]) == 0
    assert (out / "resume" / "sr" / "checkpoint.pt").read_text() == "current"


def test_bundle_model_takes_the_legs_from_the_run_log(tmp_path: Path, monkeypatch) -> None:
    from napari_vdsr.core.weights import load_model

    bundle = load_benchmark_script("bundle_model", "scripts")
    run = tiny_run_in_legs(tmp_path, [["--iterations", "4", "--batch-size", "2", "--lr", "1e-3"],
                                      ["--iterations", "6", "--batch-size", "4", "--lr", "1e-4"]])
    # an export written by an older engine has no legs: the script adds them from log.jsonl
    card = json.loads((run / "last.json").read_text())
    for k in ("batch_by_leg", "lr_by_leg", "wall_hours_by_device"):
        card["training"].pop(k)
    (run / "last.json").write_text(json.dumps(card))
    monkeypatch.setattr(bundle, "BUNDLED_DIR", tmp_path / "weights")
    monkeypatch.setattr("sys.argv", ["bundle_model.py", str(run / "last.safetensors"), "--name", "tiny", "--default-for", "sr"])
    bundle.main()
    _, out = load_model(str(tmp_path / "weights" / "tiny.safetensors"))
    assert out["training"]["batch_by_leg"] == {"0-4": 2, "4-6": 4}
    assert out["training"]["lr_by_leg"] == {"0-4": 1e-3, "4-6": 1e-4}
    assert out["default_for"] == ["sr"] and out["training"]["steps"] == 6
    # legs whose batch the log does not know are given on the command line
    monkeypatch.setattr("sys.argv", ["bundle_model.py", str(run / "last.safetensors"), "--name", "tiny",
                                     "--batch-by-leg", '{"0-4": 64, "4-6": 4}'])
    bundle.main()
    _, out = load_model(str(tmp_path / "weights" / "tiny.safetensors"))
    assert out["training"]["batch_by_leg"] == {"0-4": 64, "4-6": 4} and out["default_for"] == []


def _fake_repo_for_train_bundled(tmp_path: Path) -> tuple[Path, dict, Path]:
    """A copy of train_bundled.sh and sr_cycle.json beside a fake ``napari-vdsr`` that records its arguments."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("train_bundled.sh", "sr_cycle.json"):
        shutil.copy2(root / "scripts" / name, repo / "scripts" / name)
    (repo / "runs" / "referee-photos" / "x1" / "HR").mkdir(parents=True)
    (repo / "src" / "napari_vdsr" / "weights").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.txt"
    fake = bin_dir / "napari-vdsr"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{record}"\n')
    fake.chmod(0o755)
    return repo, json.loads((repo / "scripts" / "sr_cycle.json").read_text()), record


def _run_train_bundled(repo: Path, record: Path) -> list[str]:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PATH": f"{record.parent / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(repo / "scripts" / "train_bundled.sh"), "sr"], env=env, check=True, capture_output=True,
                   text=True, timeout=120)
    return record.read_text().split("\n")


def _checkpoint(folder: Path, step: int) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step}, folder / "checkpoint.pt")


def test_train_bundled_moves_from_one_sr_cycle_to_the_next(tmp_path: Path) -> None:
    """The cycle of scripts/sr_cycle.json: the previous run finishes first, is copied at its end, then resumes."""
    repo, cycle, record = _fake_repo_for_train_bundled(tmp_path)
    runs = repo / "runs"
    prev, new = runs / cycle["previous_run"], runs / cycle["run"]
    schedule = ["--iterations", str(cycle["iterations"]), "--decay-start", str(cycle["decay_start"])]
    # the previous cycle not finished: resumed with its own recipe (no schedule from the new cycle)
    _checkpoint(prev, cycle["start_step"] - 10)
    argv = _run_train_bundled(repo, record)
    assert argv[:4] == ["train", "--out", f"runs/{cycle['previous_run']}", "--data"] and "--resume" in argv
    assert "--decay-start" not in argv and not new.exists()
    # finished: copied into the new cycle's folder (without its last.* exports) and resumed with the new schedule
    _checkpoint(prev, cycle["start_step"])
    (prev / "last.safetensors").write_text("the previous cycle's end")
    (prev / "log.jsonl").write_text("{}\n")
    argv = _run_train_bundled(repo, record)
    assert argv[:3] == ["train", "--out", f"runs/{cycle['run']}"] and "--resume" in argv
    assert argv[argv.index("--iterations"):argv.index("--iterations") + 4] == schedule
    assert (new / "log.jsonl").read_text() == "{}\n" and not (new / "last.safetensors").exists()
    assert (prev / "last.safetensors").exists()  # the previous run is left as it was
    # later: the new cycle's folder resumes, whatever the previous one holds
    _checkpoint(new, cycle["start_step"] + 500)
    (new / "marker").write_text("kept")
    argv = _run_train_bundled(repo, record)
    assert argv[:3] == ["train", "--out", f"runs/{cycle['run']}"] and (new / "marker").exists()
    # no runs at all: from the default in the package, the cycle's schedule, with a warm-up
    import shutil

    shutil.rmtree(prev)
    shutil.rmtree(new)
    weights = repo / "src" / "napari_vdsr" / "weights"
    (weights / "vdsr-sr-x234.safetensors").write_text("w")
    (weights / "vdsr-sr-x234.json").write_text(json.dumps({"training": {"steps": cycle["start_step"]}}))
    argv = _run_train_bundled(repo, record)
    assert argv[argv.index("--from") + 1] == "src/napari_vdsr/weights/vdsr-sr-x234.safetensors"
    assert argv[argv.index("--start-step") + 1] == str(cycle["start_step"]) and "--warmup" in argv
    assert argv[argv.index("--iterations"):argv.index("--iterations") + 4] == schedule


def test_sr_cycle_file_is_consistent() -> None:
    root = Path(__file__).resolve().parents[1]
    cycle = json.loads((root / "scripts" / "sr_cycle.json").read_text())
    assert cycle["start_step"] < cycle["decay_start"] < cycle["iterations"]
    assert cycle["run"] != cycle["previous_run"] and cycle["resume_point"].startswith("vdsr-sr-x234-")
    assert cycle["rule"] in (root / "docs" / "training.md").read_text()  # the rule is written down


def test_refresh_resume_point_follows_the_running_checkpoint(tmp_path: Path) -> None:
    """--checkpoint bundles the EMA weights of the run's last checkpoint, at its step (session 25: the best
    model stays at the cycle's start through the constant-lr half, so it cannot follow the run)."""
    import shutil
    import subprocess

    import torch

    from napari_vdsr.core.weights import load_model

    refresh = load_benchmark_script("refresh_resume_point", "scripts")
    root = Path(__file__).resolve().parents[1]
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    cycle = {**json.loads((root / "scripts" / "sr_cycle.json").read_text()), "start_step": 2}
    (repo / "scripts" / "sr_cycle.json").write_text(json.dumps(cycle))
    weights = repo / "src" / "napari_vdsr" / "weights"
    weights.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "config", "user.name", "t"], cwd=repo, check=True)
    subprocess.run(["git", "config", "user.email", "t@t"], cwd=repo, check=True)
    run = tiny_run_in_legs(tmp_path, [["--iterations", "5", "--batch-size", "2", "--ema", "0.5"]])
    shutil.copytree(run, repo / "runs" / cycle["run"])
    ck = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert refresh.refresh(commit=True, root=repo, checkpoint=True) is True
    net, card = load_model(str(weights / f"{cycle['resume_point']}.safetensors"))
    assert card["training"]["steps"] == ck["step"] == 5 and card["default_for"] == []
    assert card["training"]["compute_hours"] == round(ck["compute_seconds"] / 3600, 4)
    assert "last checkpoint's" in card["note"] and card["metrics"]["validation"]["step"] <= 5
    state = net.state_dict()
    assert all(torch.equal(state[k], v.float()) for k, v in ck["ema"].items())  # the average, not the raw weights
    assert any(not torch.equal(ck["ema"][k], ck["model"][k]) for k in ck["ema"])
    log = subprocess.run(["git", "log", "--format=%s"], cwd=repo, capture_output=True, text=True).stdout
    assert "refreshed to step 5" in log
    assert refresh.refresh(commit=True, root=repo, checkpoint=True) is False  # the same checkpoint: nothing new
    (repo / "runs" / cycle["run"] / "checkpoint.pt").write_bytes(b"half-written")  # being replaced right now
    assert refresh.refresh(commit=True, root=repo, checkpoint=True) is False


def test_gpu_session_second_call_resumes_a_run_it_started_from_weights(tmp_path: Path) -> None:
    """A second call on the warm GPU machine goes on with the run a first call started from $G/init,
    instead of starting it again from those weights (what session 17 found)."""
    import os
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("gpu_session.sh", "sr_cycle.json"):
        shutil.copy2(root / "scripts" / name, repo / "scripts" / name)
    g = tmp_path / "g"
    (g / "init").mkdir(parents=True)
    (g / "init" / "denoise.safetensors").write_text("w")
    (g / "init" / "denoise.json").write_text(json.dumps({"metrics": {"validation": {"step": 82000}}}))
    record = tmp_path / "argv.txt"
    fake = tmp_path / "py"  # the python of the script: `-m napari_vdsr.cli ...` recorded, the rest run for real
    fake.write_text(f'#!/usr/bin/env bash\nif [ "$1" = -m ]; then printf "%s\\n" "$@" > "{record}"; exit 0; fi\n'
                    f'exec "{sys.executable}" "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PY": str(fake), "G": str(g), "OUT": str(tmp_path / "out"), "DEVICE": "cpu", "BENCH": "0",
           "TESTS": "0", "TASKS": "denoise", "TOTAL_SECONDS": "100", "STOP_MARGIN": "10"}

    def call() -> list[str]:
        record.unlink(missing_ok=True)
        with open(tmp_path / "session.log", "w") as log:  # a file, not a pipe: the snapshot loop's sleep outlives it
            subprocess.run(["bash", str(repo / "scripts" / "gpu_session.sh")], env=env, check=True, stdout=log,
                           stderr=subprocess.STDOUT, timeout=120)
        return record.read_text().split("\n")

    first = call()  # nothing there yet: from the init weights
    assert first[first.index("--from") + 1] == f"{g}/init/denoise.safetensors" and "--resume" not in first
    assert first[first.index("--start-step") + 1] == "82000"
    _checkpoint(repo / "gpu-runs" / "denoise", 95000)  # what the first call's run left on the machine
    second = call()
    assert "--resume" in second and "--from" not in second
    assert second[second.index("--out") + 1] == "gpu-runs/denoise"
    assert (tmp_path / "out" / "denoise.tar").is_file()  # packed for the trip back


def test_refresh_resume_point_bundles_and_commits_only_newer_weights(tmp_path: Path) -> None:
    """The resume point in the package follows the run's best weights, committed alone, never backwards."""
    import shutil
    import subprocess

    from napari_vdsr.core.weights import load_model

    refresh = load_benchmark_script("refresh_resume_point", "scripts")
    root = Path(__file__).resolve().parents[1]
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(root / "scripts" / "sr_cycle.json", repo / "scripts" / "sr_cycle.json")
    cycle = json.loads((repo / "scripts" / "sr_cycle.json").read_text())
    weights = repo / "src" / "napari_vdsr" / "weights"
    weights.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "config", "user.name", "t"], cwd=repo, check=True)  # the commits need an identity
    subprocess.run(["git", "config", "user.email", "t@t"], cwd=repo, check=True)
    (repo / "other.txt").write_text("a file of someone else's")
    subprocess.run(["git", "add", "."], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "init"], cwd=repo, check=True)
    (repo / "other.txt").write_text("edited, not to be committed by the refresh")
    subprocess.run(["git", "add", "other.txt"], cwd=repo, check=True)
    assert refresh.refresh(commit=True, root=repo) is False  # no run yet
    run = tiny_run_in_legs(tmp_path, [["--iterations", "4", "--batch-size", "2"]])
    shutil.copytree(run, repo / "runs" / cycle["run"])
    best_step = json.loads((repo / "runs" / cycle["run"] / "best.json").read_text())["training"]["steps"]
    # a run copied at the cycle's start holds the previous cycle's last weights, the default's: no resume point
    (repo / "scripts" / "sr_cycle.json").write_text(json.dumps({**cycle, "start_step": best_step}))
    assert refresh.refresh(commit=True, root=repo) is False
    assert not list(weights.iterdir())
    (repo / "scripts" / "sr_cycle.json").write_text(json.dumps({**cycle, "start_step": best_step - 1}))  # moved on
    hook = repo / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\nexit 1\n")  # the first commit fails (a hook, a lock held by another git)
    hook.chmod(0o755)
    assert refresh.refresh(commit=True, root=repo) is True
    assert "refreshed" not in subprocess.run(["git", "log", "--format=%s"], cwd=repo, capture_output=True,
                                             text=True).stdout
    hook.unlink()
    assert refresh.refresh(commit=True, root=repo) is False  # nothing new to bundle, but the commit is retried
    _, card = load_model(str(weights / f"{cycle['resume_point']}.safetensors"))
    step = json.loads((repo / "runs" / cycle["run"] / "best.json").read_text())["training"]["steps"]
    assert card["training"]["steps"] == step and card["default_for"] == []
    assert f"--start-step {step}" in card["note"] and cycle["rule"] in card["note"]
    shown = subprocess.run(["git", "show", "--name-only", "--format=%s", "HEAD"], cwd=repo, capture_output=True,
                           text=True, check=True).stdout
    assert f"refreshed to step {step}" in shown and "other.txt" not in shown
    assert sorted(shown.split()[-2:]) == sorted(f"src/napari_vdsr/weights/{cycle['resume_point']}{e}"
                                                for e in (".json", ".safetensors"))
    status = subprocess.run(["git", "status", "--short"], cwd=repo, capture_output=True, text=True).stdout
    assert "M  other.txt" in status  # still staged, not committed
    assert refresh.refresh(commit=True, root=repo) is False  # the same step again: nothing to do
    # a stopped run's last export, further on than its best, when asked for (the end of a session)
    from napari_vdsr.core.weights import save_model

    run_copy = repo / "runs" / cycle["run"]
    net, card = load_model(str(run_copy / "last.safetensors"))
    card["training"]["steps"] = step + 3
    save_model(net, run_copy / "last.safetensors", card)
    assert refresh.refresh(commit=True, root=repo, last=True) is True
    _, card = load_model(str(weights / f"{cycle['resume_point']}.safetensors"))
    assert card["training"]["steps"] == step + 3 and "last (a stopped run's)" in card["note"]
