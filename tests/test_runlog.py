"""``core.runlog``: the machine, batch and learning rate of each leg of a run, from its log.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import tiny_run_in_legs

from napari_vdsr.core.device import cpu_label
from napari_vdsr.core.runlog import continue_legs, describe_legs, lr_segments, training_legs


def _steps(a: int, b: int, lr, leg_start: int | None = None, every: int = 10) -> list[dict]:
    """Step events after step a up to b; ``elapsed``: 1 s per step since the process started at ``leg_start``."""
    t0 = a if leg_start is None else leg_start
    return [{"kind": "step", "step": k, "lr": lr(k) if callable(lr) else lr, "elapsed": float(k - t0)}
            for k in range(a + every, b + 1, every)]


def _log(tmp_path: Path) -> Path:
    ev = [{"kind": "start", "step": 0, "message": "8 training planes, 1 validation planes, device cpu"}]  # an old line
    ev += _steps(0, 100, 1e-4) + _steps(100, 140, 3e-5, leg_start=0)  # the schedule drops after step 100
    ev += [{"kind": "start", "step": 140, "message": "resumed at step 140", "device": "cpu"}] + _steps(140, 230, 1e-4)
    # a GPU lease resumed the step-200 checkpoint: the CPU's steps 201-230 were redone there
    ev += [{"kind": "start", "step": 200, "device": "Some GPU", "batch": 64}]
    ev += _steps(200, 300, lambda k: 1e-4 * (1 - (k - 200) / 200))  # a decay
    ev += [{"kind": "val", "step": 300, "val_psnr": 30.0}]
    p = tmp_path / "log.jsonl"
    p.write_text("\n".join(json.dumps(e) for e in ev) + "\nnot json\n")
    return p


def test_legs_drop_redone_steps_and_merge_machines(tmp_path: Path) -> None:
    legs = describe_legs(_log(tmp_path), 300)
    assert legs["device"] == "cpu (steps 0-200), Some GPU (steps 200-300)"
    assert legs["lr_by_leg"] == {"0-100": 1e-4, "100-140": 3e-5, "140-200": 1e-4, "200-300": "9.5e-05 -> 5e-05"}  # as logged
    assert "batch_by_leg" not in legs  # the CPU legs predate the batch in the log
    assert legs["wall_hours_by_device"] == pytest.approx({"cpu": 200 / 3600, "Some GPU": 100 / 3600}, abs=6e-4)  # not 230 s
    # an earlier step of the same run: only what led there
    early = describe_legs(_log(tmp_path), 120)
    assert early["device"] == "cpu" and early["lr_by_leg"] == {"0-100": 1e-4, "100-120": 3e-5}


def test_the_device_line_joins_a_machine_s_touching_legs(tmp_path: Path) -> None:
    log = _log(tmp_path)
    more = [{"kind": "start", "step": 300, "device": "Some GPU", "batch": 32}] + _steps(300, 350, 5e-5)
    log.write_text(log.read_text() + "".join(json.dumps(e) + "\n" for e in more))
    legs = describe_legs(log, 350)
    assert legs["device"] == "cpu (steps 0-200), Some GPU (steps 200-350)"  # one range, though its batch changed
    assert legs["wall_hours_by_device"]["Some GPU"] == pytest.approx(150 / 3600, abs=6e-4)  # both GPU legs


def test_lr_segments_of_a_warmup_then_constant() -> None:
    pts = [(10, 1e-5), (20, 2e-5), (30, 3e-5), (40, 3e-5), (50, 3e-5)]
    assert lr_segments(pts, 50) == [{"from": 0, "to": 20, "lr": "1e-05 -> 2e-05"}, {"from": 20, "to": 50, "lr": 3e-5}]
    legs, _ = training_legs([{"kind": "start", "step": 0, "device": "cpu", "batch": 8}], 0)
    assert legs == []  # nothing ran


def test_a_resumed_run_with_another_batch_records_both_legs_in_its_card(tmp_path: Path) -> None:
    out = tiny_run_in_legs(tmp_path, [["--iterations", "4", "--batch-size", "2"], ["--iterations", "8", "--batch-size", "4"]])
    card = json.loads((out / "last.json").read_text())["training"]
    assert card["steps"] == 8 and card["device"] == cpu_label()
    assert card["batch_by_leg"] == {"0-4": 2, "4-8": 4}
    assert list(card["lr_by_leg"]) == ["0-8"]


def test_lr_of_a_run_continued_from_weights_starts_at_its_first_step() -> None:
    # a run started with --from ... --start-step 82000 logs its first start at 82,000: its lr
    # stretch begins there, not at step 0 (the card would claim an lr for steps it never ran)
    log = [{"kind": "start", "step": 82000, "device": "Some GPU", "batch": 64, "elapsed": 0.0},
           *({"kind": "step", "step": 82000 + k, "lr": 3e-5, "elapsed": k / 30} for k in range(10, 110, 10))]
    legs = describe_legs(log, 82100)
    assert legs["lr_by_leg"] == {"82000-82100": 3e-5}
    assert legs["batch_by_leg"] == {"82000-82100": 64}
    assert lr_segments([(110, 1e-4), (120, 1e-4)], 120, starts=[100]) == [{"from": 100, "to": 120, "lr": 1e-4}]


def test_continue_legs_puts_the_starting_weights_legs_first() -> None:
    earlier = {"device": "cpu (steps 0-100 and 300-500), Some GPU (steps 100-300)",
               "wall_hours_by_device": {"cpu": 2.0, "Some GPU": 0.5},
               "lr_by_leg": {"0-300": 1e-4, "300-500": "0.0001 -> 1e-06"},
               "batch_by_leg": {"0-100": 32, "100-300": 64, "300-500": 32}}
    new = {"device": "cpu", "wall_hours_by_device": {"cpu": 1.0}, "lr_by_leg": {"450-600": 3e-5},
           "batch_by_leg": {"450-600": 32}}
    # continued from the step-450 weights (the card says 500: what ran after 450 is not in these weights)
    out = continue_legs(earlier, new, 450, 600)
    assert out["device"] == "cpu (steps 0-100 and 300-600), Some GPU (steps 100-300)"
    assert out["lr_by_leg"] == {"0-300": 1e-4, "300-450": "0.0001 -> 1e-06", "450-600": 3e-5}
    assert out["batch_by_leg"] == {"0-100": 32, "100-300": 64, "300-600": 32}  # the same batch on: one leg
    assert out["wall_hours_by_device"] == {"cpu": 3.0, "Some GPU": 0.5}
    # a card of one machine from step 0, and a run on another machine
    out = continue_legs({"device": "cpu", "batch_by_leg": {"0-10": 8}}, {"device": "Some GPU", "batch_by_leg": {"10-20": 64}},
                        10, 20)
    assert out["device"] == "cpu (steps 0-10), Some GPU (steps 10-20)" and out["batch_by_leg"] == {"0-10": 8, "10-20": 64}
    # a card that names only its last machine (its legs do not begin at 0, or it has none): not taken for all its steps
    for card in ({"device": "Some GPU", "batch_by_leg": {"5-10": 64}}, {"device": "Some GPU"}):
        assert continue_legs(card, {"device": "cpu"}, 10, 20)["device"] == "cpu"
    assert continue_legs({}, new, 450, 600) == new and continue_legs(earlier, new, 0, 600) == new
    # a hand-edited card: what cannot be read is left out, nothing fails
    odd = {"device": "cpu (steps 0-1-2 and x-y), Some GPU (steps 2-5)", "wall_hours_by_device": {"cpu": "n/a", "x": None},
           "lr_by_leg": {"a-b": 1, "0-5": 1e-4}, "batch_by_leg": ["not", "a", "dict"]}
    out = continue_legs(odd, new, 5, 600)
    assert out["device"] == "Some GPU (steps 2-5), cpu (steps 5-600)" and out["wall_hours_by_device"] == {"cpu": 1.0}
    assert out["lr_by_leg"] == {"0-5": 1e-4, "450-600": 3e-5} and out["batch_by_leg"] == new["batch_by_leg"]


def test_a_run_continued_from_weights_describes_their_legs_too(tmp_path) -> None:
    """--from --start-step: the exported cards (and, after a resume, still) list how the starting
    weights were trained before the run's own legs; scripts/bundle_model.py keeps them."""
    import torch
    from helpers import load_benchmark_script, tiny_run_in_legs

    from napari_vdsr.cli import main as cli_main
    from napari_vdsr.core.weights import load_model

    first = tiny_run_in_legs(tmp_path, [["--iterations", "4", "--batch-size", "2", "--lr", "1e-3"],
                                        ["--iterations", "6", "--batch-size", "4", "--lr", "1e-4"]])
    second = tmp_path / "second"
    common = ["train", "--data", str(tmp_path / "imgs"), "--out", str(second), "--device", "cpu", "--quiet",
              "--scales", "2", "--patch-size", "16", "--depth", "3", "--width", "8", "--val-every", "2",
              "--lr-schedule", "constant", "--batch-size", "4", "--lr", "3e-5"]
    assert cli_main(common + ["--from", str(first / "last.safetensors"), "--start-step", "6", "--iterations", "8"]) == 0
    assert cli_main(common + ["--iterations", "10", "--resume"]) == 0  # the lineage survives a resume
    tr = json.loads((second / "last.json").read_text())["training"]
    assert tr["steps"] == 10
    assert tr["batch_by_leg"] == {"0-4": 2, "4-10": 4}
    assert tr["lr_by_leg"] == {"0-4": 1e-3, "4-6": 1e-4, "6-10": 3e-5}
    assert tr["device"] == cpu_label() and set(tr["wall_hours_by_device"]) == {cpu_label()}
    # bundle_model.py: from the checkpoint's record, or (an older checkpoint) from --continues
    bundle = load_benchmark_script("bundle_model", "scripts")
    import sys
    from unittest import mock

    for extra in ([], ["--continues", str(first / "last.safetensors")]):
        if extra:
            ck = torch.load(second / "checkpoint.pt", weights_only=False)
            ck.pop("earlier_legs")
            torch.save(ck, second / "checkpoint.pt")
        with mock.patch.object(bundle, "BUNDLED_DIR", tmp_path / "weights"), \
                mock.patch.object(sys, "argv", ["bundle_model.py", str(second / "last.safetensors"), "--name", "t",
                                                *extra]):
            bundle.main()
        out = load_model(str(tmp_path / "weights" / "t.safetensors"))[1]["training"]
        assert out["batch_by_leg"] == {"0-4": 2, "4-10": 4}, extra
        assert out["lr_by_leg"] == {"0-4": 1e-3, "4-6": 1e-4, "6-10": 3e-5}, extra


@pytest.mark.parametrize("model, label", [
    ("Intel(R) Xeon(R) Platinum 8480+", "CPU Intel Xeon Platinum 8480+"),
    ("Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz", "CPU Intel Core i7-8700"),
    ("AMD Ryzen 9 5950X 16-Core Processor", "CPU AMD Ryzen 9 5950X 16-Core"),
    ("AMD EPYC 7B13, rev (2)", "CPU AMD EPYC 7B13 rev 2"),
])
def test_cpu_label_names_the_cpu_model_without_what_a_card_line_splits_on(tmp_path: Path, model, label) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nvendor_id\t: x\nmodel name\t: {model}\nflags\t\t: fpu avx2\n\nprocessor\t: 1\n"
                    f"model name\t: {model}\n")
    assert cpu_label(str(info)) == label
    # two CPUs of one run stay two machines on its card, and a card read back gives the same spans
    legs = {"device": f"{label} (steps 0-100), CPU Other (steps 100-150)"}
    assert continue_legs({**legs, "batch_by_leg": {"0-150": 32}}, {"device": "Some GPU"}, 150, 200)["device"] == (
        f"{label} (steps 0-100), CPU Other (steps 100-150), Some GPU (steps 150-200)")


def test_cpu_label_without_a_model_name_is_plain_cpu(tmp_path: Path, monkeypatch) -> None:
    import platform

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu\n")
    monkeypatch.setattr(platform, "processor", lambda: "x86_64")
    assert cpu_label(str(info)) == "cpu"
    assert cpu_label(str(tmp_path / "missing")) == "cpu"
    monkeypatch.setattr(platform, "processor", lambda: "Apple M2 (TM)")
    assert cpu_label(str(tmp_path / "missing")) == "CPU Apple M2"
