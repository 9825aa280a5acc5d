"""Fine-tuning engine and CLI (the widget has its own GUI tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_vdsr.cli import main as cli_main
from napari_vdsr.core.degrade import downscale
from napari_vdsr.core.errors import InputError, TrainingError
from napari_vdsr.core.finetune import make_finetune_trainer
from napari_vdsr.core.model import VDSR
from napari_vdsr.core.synthetic import synthetic_cells
from napari_vdsr.core.weights import load_model, save_model

torch.set_num_threads(1)


@pytest.fixture
def tiny_base(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_model(VDSR(depth=4, width=12), tmp_path / "base.safetensors", {"tasks": ["sr", "denoise"], "name": "tiny"})


@pytest.fixture
def stack() -> np.ndarray:
    return synthetic_cells((5, 96, 96), seed=2)


def test_finetune_beats_base_model_on_held_out_planes(tiny_base: Path, stack: np.ndarray, tmp_path: Path) -> None:
    tr = make_finetune_trainer("sr", images=[stack], base_model=str(tiny_base), scales=[2.0], out=str(tmp_path / "ft"),
                               iterations=150, batch_size=8, patch_size=24, lr=1e-3, val_every=50, val_crop=96,
                               device="cpu", val_fraction=0.2)
    events = list(tr.run())
    start = events[0]
    vals = [e for e in events if e.kind == "val"]
    assert start.val_base_model_psnr is not None
    assert tr.n_val_planes == 1 and tr.n_train_planes == 4
    best = max(v.val_psnr for v in vals)
    assert best > start.val_base_model_psnr + 0.1, (best, start.val_base_model_psnr)
    model, card = load_model(tmp_path / "ft", task="sr")
    assert card["finetuned_from"]["path"] == str(tiny_base)
    assert card["metrics"]["validation"]["base_model_psnr"] == pytest.approx(start.val_base_model_psnr)
    assert card["default_for"] == []
    assert (model.depth, model.width) == (4, 12)


def test_paired_sr_finetune_with_low_resolution_input(tiny_base: Path, tmp_path: Path) -> None:
    clean = synthetic_cells((4, 64, 64), seed=3)
    low = np.clip(np.round(downscale(clean.astype(np.float32), 2)), 0, 65535).astype(np.uint16)
    tr = make_finetune_trainer("sr", pairs=[(low, clean)], base_model=str(tiny_base), iterations=5, batch_size=4,
                               patch_size=24, val_every=5, val_crop=64, device="cpu")
    events = list(tr.run())
    assert events[-1].kind == "done"
    assert any(e.kind == "val" for e in events)


def test_mismatched_pair(tiny_base: Path) -> None:
    with pytest.raises(TrainingError, match="do not match|differ in size"):
        make_finetune_trainer("denoise", pairs=[(np.zeros((50, 60), np.uint8), np.zeros((50, 50), np.uint8))],
                              base_model=str(tiny_base))
    with pytest.raises(TrainingError, match="do not match"):
        make_finetune_trainer("sr", pairs=[(np.zeros((2, 50, 50), np.uint8), np.zeros((3, 100, 100), np.uint8))],
                              base_model=str(tiny_base))
    # an SR pair given high-resolution first: say which order is expected
    with pytest.raises(TrainingError, match="low-resolution image first"):
        make_finetune_trainer("sr", pairs=[(np.zeros((100, 100), np.uint8), np.zeros((50, 50), np.uint8))],
                              base_model=str(tiny_base))


def test_base_model_for_another_task(tiny_base: Path, stack: np.ndarray) -> None:
    with pytest.raises(TrainingError, match="not JPEG artifact removal"):
        make_finetune_trainer("deblock", images=[stack], base_model=str(tiny_base))


def test_layer_smaller_than_patch(tiny_base: Path) -> None:
    tr = make_finetune_trainer("sr", images=[np.zeros((3, 20, 20), np.uint16)], base_model=str(tiny_base),
                               patch_size=41, iterations=2, device="cpu")
    with pytest.raises(TrainingError, match="smaller than one patch"):
        list(tr.run())


def test_cli_finetune_then_predict_model_dir(tiny_base: Path, stack: np.ndarray, tmp_path: Path) -> None:
    tif = tmp_path / "cells.tif"
    tifffile.imwrite(tif, stack)
    out = tmp_path / "ft"
    rc = cli_main(["finetune", "--images", str(tif), "--task", "sr", "--scale", "2", "--iterations", "6",
                   "--batch-size", "4", "--patch-size", "24", "--from", str(tiny_base), "--clip-theta", "0.01",
                   "--val-every", "3", "--device", "cpu", "--out", str(out), "--quiet", "--prescale", "1", "1.5",
                   "--val-prescale", "1", "--ema", "0.9"])
    assert rc == 0
    card = json.loads((out / "best.json").read_text())
    assert card["training"]["recipe"]["clip_theta"] == 0.01
    assert card["training"]["recipe"]["ema"] == 0.9 and "raw_psnr" in card["metrics"]["validation"]
    assert card["training"]["recipe"]["prescale"] == [1.0, 1.5]  # finetune honours --prescale
    assert card["training"]["recipe"]["val_prescale"] == 1.0
    assert card["training"]["recipe"]["init_from"] == str(tiny_base)
    load_model(out, task="sr")


def test_cli_finetune_wrong_task_base(tiny_base: Path, stack: np.ndarray, tmp_path: Path, capsys) -> None:
    tif = tmp_path / "cells.tif"
    tifffile.imwrite(tif, stack)
    rc = cli_main(["finetune", "--images", str(tif), "--task", "deblock", "--from", str(tiny_base),
                   "--out", str(tmp_path / "x"), "--quiet"])
    assert rc == 2
    assert "not JPEG artifact removal" in capsys.readouterr().err


def test_pairs_are_mapped_as_restore_maps_the_degraded_image() -> None:
    from napari_vdsr.core.data import planes_from_pair
    from napari_vdsr.core.degrade import upscale
    from napari_vdsr.core.normalize import intensity_range

    rng = np.random.default_rng(0)
    clean = (1000 + rng.random((2, 48, 48)) * 2000).astype(np.uint16)
    noisy = np.clip(clean + rng.normal(0, 300, clean.shape), 0, 65535).astype(np.uint16)
    inten = intensity_range(noisy)  # what restore(noisy) maps the network's input with
    (d, c), _ = planes_from_pair(noisy, clean, task="denoise")
    np.testing.assert_allclose(d.data, inten.to_net(noisy[0]), atol=1e-6)
    np.testing.assert_allclose(c.data, inten.to_net(clean[0]), atol=1e-6)
    # SR: the low-resolution image is enlarged by the scale exactly as restore() does; a clean image
    # one pixel larger is cropped; a pair of another factor than the one fine-tuned is refused
    lr = clean[:, ::2, ::2][:, :24, :24]
    taller = np.pad(clean, ((0, 0), (0, 1), (0, 0)), "edge")  # 49 rows
    (d, c), _ = planes_from_pair(lr, taller, task="sr", scales=[2.0])
    assert d.data.shape == c.data.shape == (48, 48)
    np.testing.assert_allclose(d.data, upscale(intensity_range(lr).to_net(lr[0]), 2.0), atol=1e-6)
    with pytest.raises(TrainingError, match="not x2"):
        planes_from_pair(clean[:, :16, :16], clean, task="sr", scales=[2.0])  # x3
    with pytest.raises(TrainingError, match="not x2"):
        planes_from_pair(clean[:, :24, :48], clean, task="sr", scales=[2.0])  # x2 / x1
    assert len(planes_from_pair(clean[:, :16, :16], clean, task="sr", scales=[2.0, 3.0])) == 2
    bad = noisy.astype(np.float32)
    bad[0, 3, 3] = np.nan
    with pytest.raises(TrainingError, match="NaN"):
        planes_from_pair(bad, clean, task="denoise")
    # RGB pairs give their luminance, as the network restores it
    rgb = rng.integers(0, 256, (40, 40, 3)).astype(np.uint8)
    (d, c), = planes_from_pair(rgb, rgb, task="denoise")
    assert d.data.shape == (40, 40) and np.array_equal(d.data, c.data)


def test_rgba_alpha_does_not_squeeze_the_colours() -> None:
    from napari_vdsr.core.restore import restore

    rng = np.random.default_rng(1)
    rgb = (rng.random((24, 24, 3)) * 4000).astype(np.uint16)
    rgba = np.concatenate([rgb, np.full((24, 24, 1), 65535, np.uint16)], -1)
    torch.manual_seed(0)
    net = VDSR(depth=3, width=4)
    a = restore(rgba, task="denoise", model=net, device="cpu", tile=16)
    b = restore(rgb, task="denoise", model=net, device="cpu", tile=16)
    np.testing.assert_array_equal(a[..., :3], b)  # the colours are restored as without the alpha
    assert (a[..., 3] == 65535).all()


@pytest.fixture
def tif(stack: np.ndarray, tmp_path: Path) -> Path:
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, stack)
    return path


def _ft_cli(tif: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--images", str(tif), "--scale", "2", "--iterations", "4", "--batch-size", "4",
            "--patch-size", "24", "--val-every", "2", "--val-crop", "64", "--device", "cpu", "--out", str(out),
            "--quiet", *extra]


def test_a_second_finetune_into_the_same_folder_is_refused_and_keeps_the_first(
        tiny_base: Path, stack: np.ndarray, tif: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ft"
    assert cli_main(_ft_cli(tif, out, "--task", "sr", "--from", str(tiny_base))) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".pt", ".safetensors")}
    capsys.readouterr()
    rc = cli_main(_ft_cli(tif, out, "--task", "sr", "--from", str(tiny_base), "--iterations", "8"))
    err = capsys.readouterr().err
    assert rc == 2 and "already holds a training run" in err and "--resume" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".pt", ".safetensors")} == before
    # the API refuses too; resume=True continues the run instead
    with pytest.raises(TrainingError, match="already holds"):
        make_finetune_trainer("sr", images=[stack], base_model=str(tiny_base), out=str(out), device="cpu")


def test_finetune_resume_keeps_its_base_and_task_and_needs_no_base_file(
        tiny_base: Path, tif: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ft"
    assert cli_main(_ft_cli(tif, out, "--task", "denoise", "--from", str(tiny_base))) == 0
    other = save_model(VDSR(depth=4, width=12), tmp_path / "other.safetensors", {"tasks": ["sr", "denoise"], "name": "o"})
    capsys.readouterr()
    # another task, or another base, cannot relabel the run on --resume
    assert cli_main(_ft_cli(tif, out, "--task", "sr", "--resume", "--iterations", "6")) == 2
    assert "--task denoise" in capsys.readouterr().err
    assert cli_main(_ft_cli(tif, out, "--task", "denoise", "--resume", "--from", str(other), "--iterations", "6")) == 2
    assert "started from" in capsys.readouterr().err
    # the base file gone: the run still resumes from its checkpoint and its card names the base it started from
    tiny_base.rename(tmp_path / "moved.safetensors")
    assert cli_main(_ft_cli(tif, out, "--task", "denoise", "--resume", "--iterations", "6")) == 0
    card = json.loads((out / "last.json").read_text())
    assert card["training"]["steps"] == 6 and card["tasks"] == ["denoise"]
    assert card["finetuned_from"]["path"] == str(tiny_base) and card["finetuned_from"]["name"] == "tiny"


@pytest.mark.parametrize("task, option, values, words", [
    ("sr", "--scale-range", ["0", "0.5"], "within 1..16"),
    ("sr", "--scale-range", ["-2", "2"], "within 1..16"),
    ("sr", "--scale-range", ["2", "40"], "within 1..16"),
    ("denoise", "--sigma-range", ["-10", "5"], "0..255"),
    ("denoise", "--photon-range", ["0", "5"], "above 0"),
    ("denoise", "--photon-range", ["-1", "5"], "above 0"),
])
def test_out_of_range_degradation_options_are_refused_with_a_message(
        tiny_base: Path, tif: Path, tmp_path: Path, capsys, task, option, values, words) -> None:
    rc = cli_main(_ft_cli(tif, tmp_path / "ft", "--task", task, "--from", str(tiny_base), option, *values))
    err = capsys.readouterr().err
    assert rc == 2 and words in err and option in err, err
    assert not (tmp_path / "ft" / "checkpoint.pt").exists()


def test_out_that_is_a_file_is_refused_with_a_message(tiny_base: Path, tif: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_text("keep me")
    for out in (tmp_path / "afile", tmp_path / "afile" / "run"):
        rc = cli_main(_ft_cli(tif, out, "--task", "sr", "--from", str(tiny_base)))
        err = capsys.readouterr().err
        assert rc == 2 and "is a file" in err, err
    assert (tmp_path / "afile").read_text() == "keep me"


def test_api_takes_one_image_one_pair_one_scale_and_paths(tiny_base: Path, stack: np.ndarray, tif: Path,
                                                          tmp_path: Path) -> None:
    kw = dict(base_model=str(tiny_base), iterations=1, batch_size=2, patch_size=24, val_every=1, val_crop=64,
              device="cpu")
    # one array, one path: every plane of the stack trains (not its rows, not the path's characters)
    for images in (stack, tif, str(tif)):
        tr = make_finetune_trainer("sr", images=images, scales=2, **kw)
        tr._setup()  # reads and splits the planes, as run() does first
        assert tr.n_train_planes + tr.n_val_planes == stack.shape[0], images
        assert tr.config.scales == [2.0]
    # one (degraded, clean) pair given as a tuple, as arrays or as paths
    clean = synthetic_cells((2, 64, 64), seed=3)
    noisy = np.clip(clean.astype(np.int64) + 500, 0, 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "noisy.tif", noisy)
    tifffile.imwrite(tmp_path / "clean.tif", clean)
    for pair in ((noisy, clean), (tmp_path / "noisy.tif", tmp_path / "clean.tif")):
        tr = make_finetune_trainer("denoise", pairs=pair, **kw)
        tr._setup()
        assert tr.n_train_planes + tr.n_val_planes == 2
    with pytest.raises(TrainingError, match="not a \\(degraded, clean\\) pair"):
        make_finetune_trainer("denoise", pairs=[noisy, clean, clean], **kw)


def test_pairs_that_cannot_train_right_are_refused(tiny_base: Path, tif: Path, tmp_path: Path, capsys) -> None:
    clean = synthetic_cells((2, 64, 64), seed=3)
    kw = dict(base_model=str(tiny_base), iterations=1, batch_size=2, patch_size=24, device="cpu")
    bad = clean.astype(np.float32)
    bad[0, 3, 3] = np.nan
    with pytest.raises(TrainingError, match="clean image contains NaN"):
        make_finetune_trainer("denoise", pairs=[(clean.astype(np.float32), bad)], **kw)
    # an 8-bit degraded image with a 16-bit clean one: the clean one would be scaled by 1/255
    with pytest.raises(TrainingError, match="uint8 and the clean image uint16"):
        make_finetune_trainer("denoise", pairs=[((clean // 257).astype(np.uint8), clean)], **kw)
    with pytest.raises(TrainingError, match="used as they are"):
        list(make_finetune_trainer("denoise", pairs=[(clean, clean)], prescale=[2.0], **kw).run())
    tifffile.imwrite(tmp_path / "clean.tif", clean)
    with pytest.raises(SystemExit, match="not both"):
        cli_main(_ft_cli(tif, tmp_path / "ft", "--task", "denoise", "--from", str(tiny_base), "--pairs",
                         str(tmp_path / "clean.tif"), str(tmp_path / "clean.tif")))
    assert not (tmp_path / "ft").exists()


def test_paired_finetune_resume_reads_its_pairs_from_the_run(tiny_base: Path, tmp_path: Path, capsys) -> None:
    """finetune --pairs records the pair's files: --resume without --pairs goes on with the same pair."""
    from napari_vdsr.core.train import load_checkpoint

    clean = synthetic_cells((3, 96, 96), seed=5)
    rng = np.random.default_rng(5)
    noisy = np.clip(clean + rng.normal(0, 2000, clean.shape), 0, 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "noisy.tif", noisy, photometric="minisblack")
    tifffile.imwrite(tmp_path / "clean.tif", clean, photometric="minisblack")
    out = tmp_path / "ft"
    common = ["--task", "denoise", "--iterations", "4", "--batch-size", "4", "--patch-size", "24", "--val-every", "2",
              "--val-crop", "64", "--device", "cpu", "--out", str(out), "--quiet"]
    assert cli_main(["finetune", "--pairs", str(tmp_path / "noisy.tif"), str(tmp_path / "clean.tif"),
                     "--from", str(tiny_base), *common]) == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"] == [] and cfg["pair_data"] == [[str((tmp_path / "noisy.tif").resolve()),
                                                     str((tmp_path / "clean.tif").resolve())]]
    first = capsys.readouterr().err
    assert "(input " in first and "bicubic" not in first  # a pair is scored against its degraded input
    resumed = [a if a != "4" else "6" for a in common] + ["--resume"]
    assert cli_main(["finetune", *resumed]) == 0, capsys.readouterr().err
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 6
    # the pair gone: the resume says which file is missing and to give the pair again
    (tmp_path / "clean.tif").unlink()
    with pytest.raises(TrainingError, match="clean.tif, which no longer exist.*--pairs DEGRADED CLEAN"):
        make_finetune_trainer("denoise", out=str(out), resume=True, device="cpu")
    # pairs given as arrays (napari layers) are not files: nothing is recorded, and a resume asks for them
    arr_out = tmp_path / "ft-arrays"
    tr = make_finetune_trainer("denoise", pairs=[(noisy, clean)], base_model=str(tiny_base), out=str(arr_out),
                               device="cpu", iterations=2, batch_size=4, patch_size=24, val_every=2, val_crop=64)
    assert tr.paired and tr.config.pair_data == []
    list(tr.run())
    with pytest.raises(TrainingError, match="give the images again"):
        make_finetune_trainer("denoise", out=str(arr_out), resume=True, device="cpu")


def test_a_constant_validation_plane_leaves_strict_json(tiny_base: Path, tmp_path: Path) -> None:
    planes = synthetic_cells((4, 96, 96), seed=4)
    planes[:] = 1000  # bicubic restores a constant plane exactly: its PSNR is infinite
    planes[:, 0, 0] = 0  # (a range to map, outside the validation's central crop)
    out = tmp_path / "ft"
    list(make_finetune_trainer("sr", images=[planes], base_model=str(tiny_base), out=str(out), iterations=2,
                               batch_size=2, patch_size=24, val_every=1, val_crop=32, val_fraction=0.25,
                               device="cpu").run())

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a JSON file"))

    for card in ("best.json", "last.json"):
        assert strict((out / card).read_text())["tasks"] == ["sr"]
    assert [strict(line)["kind"] for line in (out / "log.jsonl").read_text().splitlines()][-1] == "done"
    assert card_of(out)["metrics"]["validation"]["baseline_psnr"] is None


def card_of(run: Path) -> dict:
    return load_model(run, task="sr")[1]


def test_cli_says_when_the_finetune_validates_below_its_base(tiny_base: Path, tif: Path, tmp_path: Path,
                                                           capsys) -> None:
    # lr 0.05 with Adam wrecks the weights in a few steps: the CLI must say the result is worse than the base
    rc = cli_main(_ft_cli(tif, tmp_path / "ft", "--task", "sr", "--from", str(tiny_base), "--lr", "0.05",
                          "--iterations", "6", "--warmup", "0"))
    err = capsys.readouterr().err
    card = json.loads((tmp_path / "ft" / "best.json").read_text())["metrics"]["validation"]
    assert rc == 0 and card["psnr"] < card["base_model_psnr"], card
    assert "below the model this run started from" in err
    # the end line gives the input's (bicubic's) PSNR beside the best, and says when the best is below it
    assert f"input {card['baseline_psnr']:.3f} dB" in err
    assert ("below the input" in err) == (card["psnr"] < card["baseline_psnr"])
    # a good fine-tune does not get the note
    rc = cli_main(_ft_cli(tif, tmp_path / "ft2", "--task", "sr", "--from", str(tiny_base), "--lr", "1e-3",
                          "--iterations", "30", "--val-every", "10"))
    err = capsys.readouterr().err
    card = json.loads((tmp_path / "ft2" / "best.json").read_text())["metrics"]["validation"]
    assert rc == 0 and card["psnr"] > card["base_model_psnr"] and "below the model" not in err, card
    assert ("below the input" in err) == (card["psnr"] < card["baseline_psnr"])


def test_tiffs_read_other_than_a_user_may_think_are_named_in_a_warning(tmp_path: Path) -> None:
    from napari_vdsr.core.data import load_planes

    planes = synthetic_cells((3, 64, 64), seed=5)
    with pytest.warns(DeprecationWarning):  # tifffile stores a (3, H, W) array as planar RGB
        tifffile.imwrite(tmp_path / "three.tif", planes)
    with pytest.warns(UserWarning, match="read as one colour image.*photometric='minisblack'"):
        assert len(load_planes([str(tmp_path / "three.tif")])) == 1  # one colour image (its luminance)
    tifffile.imwrite(tmp_path / "three-mono.tif", planes, photometric="minisblack")
    with tifffile.TiffWriter(tmp_path / "two-series.tif") as tw:
        tw.write(planes, photometric="minisblack")
        tw.write(planes[:, :32, :32], photometric="minisblack")
    with pytest.warns(UserWarning, match="holds 2 image series; only the first"):
        assert len(load_planes([str(tmp_path / "three-mono.tif"), str(tmp_path / "two-series.tif")])) == 6


def test_resume_past_the_iterations_says_nothing_was_trained(tiny_base: Path, tif: Path, tmp_path: Path,
                                                             capsys, monkeypatch) -> None:
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert cli_main(_ft_cli(tif, Path("."), "--task", "sr", "--from", str(tiny_base))) == 0
    assert json.loads(Path("last.json").read_text())["name"] == "here"  # "--out ." names the folder, not ""
    capsys.readouterr()
    assert cli_main(_ft_cli(tif, Path("."), "--task", "sr", "--resume", "--iterations", "2")) == 0
    err = capsys.readouterr().err
    assert "already at step 4 of 2: nothing to train" in err and "nothing trained" in err and "4/2" not in err
    assert json.loads(Path("last.json").read_text())["training"]["steps"] == 4


def test_two_channels_last_train_as_two_planes_not_as_slivers() -> None:
    from napari_vdsr.core.data import planes_from_array

    two = np.stack([synthetic_cells((1, 64, 80), seed=s)[0] for s in (6, 7)], axis=-1)  # (64, 80, 2): YXC
    planes = planes_from_array(two, name="yxc")
    assert [p.data.shape for p in planes] == [(64, 80), (64, 80)]
    lo, hi = two.min(), two.max()
    np.testing.assert_allclose(planes[1].data, (two[..., 1] - lo) / (hi - lo), atol=1e-6)


def test_finetune_resume_reads_its_images_from_the_run(tiny_base: Path, stack: np.ndarray, tif: Path,
                                                        tmp_path: Path, capsys) -> None:
    """The run records the image files it trained on: --resume without --images goes on with them."""
    from napari_vdsr.core.train import load_checkpoint

    out = tmp_path / "ft"
    assert cli_main(_ft_cli(tif, out, "--task", "sr", "--from", str(tiny_base))) == 0
    assert json.loads((out / "config.json").read_text())["data"] == [str(tif.resolve())]
    capsys.readouterr()
    args = [a for a in _ft_cli(tif, out, "--task", "sr", "--resume", "--iterations", "6") if a not in ("--images", str(tif))]
    assert cli_main(args) == 0, capsys.readouterr().err
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 6
    assert "changed on the command line: iterations 4 -> 6" in capsys.readouterr().err  # not the images
    # a run fine-tuned on arrays (napari layers) has no files to go back to: it says to give them
    arr_out = tmp_path / "ft-arrays"
    list(make_finetune_trainer("sr", images=[stack], base_model=str(tiny_base), out=str(arr_out), device="cpu",
                               iterations=2, batch_size=4, patch_size=24, val_every=2, val_crop=64).run())
    with pytest.raises(TrainingError, match="give the images again"):
        make_finetune_trainer("sr", base_model=None, out=str(arr_out), resume=True, device="cpu")


def test_layers_larger_than_free_memory_are_refused_before_they_are_read(tiny_base: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    from napari_vdsr.core import memory

    da = pytest.importorskip("dask.array")
    reads: list[int] = []

    def read(block):
        reads.append(block.size)
        return block

    # (4, 64, 64) uint16: 16,384 px x (2 + 8) bytes = 160 KiB to read it and keep it as float32 planes
    big = da.zeros((4, 64, 64), dtype=np.uint16, chunks=(1, 64, 64)).map_blocks(read, dtype=np.uint16)
    monkeypatch.setattr(memory, "available_bytes", lambda: 100 * 1024)
    with pytest.raises(InputError, match="would take 160 KiB.*a crop or a few planes"):
        make_finetune_trainer("sr", images=[big], base_model=str(tiny_base), out=str(tmp_path / "ft"), device="cpu")
    assert not any(reads)  # refused before any of it was read
    assert not (tmp_path / "ft" / "checkpoint.pt").exists()
    # a degraded/clean pair of layers too (the Fine-tune widget's paired mode)
    low = da.zeros((4, 32, 32), dtype=np.uint16, chunks=(1, 32, 32)).map_blocks(read, dtype=np.uint16)
    with pytest.raises(InputError, match=r"would take 200 KiB"):  # (16,384 + 4,096) px x 10 bytes
        make_finetune_trainer("sr", pairs=[(low, big)], base_model=str(tiny_base), out=str(tmp_path / "ft"),
                              device="cpu")
    assert not any(reads)


def test_stop_before_the_first_validation_reports_the_psnr_it_measured(tiny_base: Path, stack: np.ndarray,
                                                                       tmp_path: Path) -> None:
    import json

    tr = make_finetune_trainer("sr", images=[stack], base_model=str(tiny_base), out=str(tmp_path / "ft"),
                               iterations=50, val_every=40, batch_size=2, patch_size=16, device="cpu", val_crop=64)
    for ev in tr.run():
        if ev.kind == "step" and ev.step == 2:
            tr.stop()
    assert ev.kind == "stopped" and ev.step < 40
    card = json.loads((tmp_path / "ft" / "best.json").read_text())
    assert ev.best_psnr is not None and ev.best_psnr == pytest.approx(card["metrics"]["validation"]["psnr"])


def test_a_pair_whose_brightness_differs_is_reported():
    """Both images are mapped with the degraded image's range; a clean image 5x brighter is mostly clipped."""
    import warnings

    from napari_vdsr.core.data import planes_from_pair

    rng = np.random.default_rng(3)
    clean = rng.integers(0, 5000, (40, 40)).astype(np.uint16)
    dim = (clean // 5 + rng.integers(0, 20, clean.shape)).astype(np.uint16)  # the fast, dim acquisition
    with pytest.warns(RuntimeWarning, match=r"of the clean image's pixels lie far outside.*brightness"):
        planes_from_pair(dim, clean, task="denoise", name="dim")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a matched pair says nothing
        planes_from_pair(np.clip(clean.astype(int) + rng.integers(-30, 30, clean.shape), 0, 65535).astype(np.uint16),
                         clean, task="denoise")


def test_paired_sr_finetune_at_x3_resumes_without_its_scale(tiny_base: Path, tmp_path: Path, capsys) -> None:
    from skimage.transform import resize

    hr = synthetic_cells((2, 96, 96), seed=7)
    lr = np.stack([resize(p.astype(np.float32), (32, 32), order=3) for p in hr]).astype(np.uint16)
    tifffile.imwrite(tmp_path / "lr.tif", lr, photometric="minisblack")
    tifffile.imwrite(tmp_path / "hr.tif", hr, photometric="minisblack")
    out = tmp_path / "ft"
    common = ["--iterations", "2", "--batch-size", "2", "--patch-size", "24", "--val-every", "2", "--val-crop", "48",
              "--device", "cpu", "--out", str(out), "--quiet"]
    assert cli_main(["finetune", "--pairs", str(tmp_path / "lr.tif"), str(tmp_path / "hr.tif"), "--scale", "3",
                     "--from", str(tiny_base), *common]) == 0, capsys.readouterr().err
    resumed = [a if a != "2" else "3" for a in common] + ["--resume"]
    assert cli_main(["finetune", *resumed]) == 0, capsys.readouterr().err  # the run's x3, not the default x2
    assert json.loads((out / "config.json").read_text())["scales"] == [3.0]
    from napari_vdsr.core.finetune import make_finetune_trainer

    tr = make_finetune_trainer("sr", out=str(out), resume=True, iterations=4, device="cpu")  # the library too
    assert tr.config.scales == [3.0]
    # finetune's option is --scale: its errors say so
    assert cli_main(["finetune", "--images", str(tmp_path / "hr.tif"), "--scale", "0.5", "--from", str(tiny_base),
                     "--device", "cpu", "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--scale:" in err and "--scales" not in err
