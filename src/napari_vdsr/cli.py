"""Command-line interface: ``napari-vdsr {predict,evaluate,train,finetune,demo,models}``.

Every command is a thin layer over :mod:`napari_vdsr.core`; long work shows a
tqdm progress bar.  Errors meant for users are printed without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


def _add_train_args(p: argparse.ArgumentParser, finetune: bool = False) -> None:
    from .core.train import TrainConfig

    d = TrainConfig()
    if finetune:
        from .core.finetune import FINETUNE_DEFAULTS

        d = TrainConfig(**{k: v for k, v in FINETUNE_DEFAULTS.items()})
        p.add_argument("--images", nargs="+", default=[], metavar="PATH", help="clean images, folders or globs (stacks: one plane each)")
        p.add_argument("--pairs", nargs=2, metavar=("DEGRADED", "CLEAN"), help="registered degraded / clean pair for paired training")
        p.add_argument("--scale", type=float, nargs="+", default=None, help="SR scale(s) to fine-tune for (default 2)")
    else:
        p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="training images: files, folders, globs, TIFF stacks")
        p.add_argument("--scales", type=float, nargs="+", default=d.scales, help="SR scales mixed in every batch (default 2 3 4)")
    p.add_argument("--task", choices=["sr", "denoise", "deblock"], default="sr")
    p.add_argument("--scale-range", type=float, nargs=2, metavar=("A", "B"), help="draw SR scales uniformly from [A, B] instead")
    p.add_argument("--sigma-range", type=float, nargs=2, metavar=("A", "B"), default=d.sigma_range, help="Gaussian σ range on 0..255 (denoise)")
    p.add_argument("--noise-model", choices=["gaussian", "poisson"], default="gaussian", help="denoise: Gaussian or Poisson (shot) noise")
    p.add_argument("--photon-range", type=float, nargs=2, metavar=("A", "B"), default=d.photon_range, help="Poisson: photons at full intensity")
    p.add_argument("--read-noise", type=float, default=d.read_noise,
                   help="Poisson model: Gaussian read noise up to this σ (0..1 scale) is added (Poisson-Gaussian)")
    p.add_argument("--quality-range", type=int, nargs=2, metavar=("A", "B"), default=d.quality_range, help="JPEG quality range (deblock)")
    p.add_argument("--iterations", type=int, default=d.iterations)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--micro-batch", type=int, default=None, metavar="M",
                   help="accumulate gradients over chunks of M patches per step (default: automatic -- chunks of "
                        "about 27k pixels on the CPU, where their feature maps stay in cache; none on GPUs)")
    p.add_argument("--patch-size", type=int, default=d.patch_size)
    if not finetune:
        p.add_argument("--depth", type=int, default=d.depth)
        p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="adam" if finetune else d.optimizer)
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default 0.1 for sgd; adam: {d.lr if finetune else 1e-4:g})")
    p.add_argument("--lr-schedule", choices=["step", "cosine", "constant"], default=d.lr_schedule)
    p.add_argument("--lr-step", type=int, default=None, help="step schedule: divide the lr every N steps (default (iterations - decay start)/4)")
    p.add_argument("--lr-gamma", type=float, default=d.lr_gamma, help="lr factor per decay (step) or final fraction (cosine)")
    p.add_argument("--decay-start", type=int, default=0, metavar="STEP",
                   help="the step or cosine decay begins at this step, the lr is constant before it (e.g. to "
                        "anneal a constant-lr run: --resume --lr-schedule cosine --decay-start <its step>)")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip-theta", type=float, default=None,
                   help="adjustable gradient clipping θ: every gradient element is clipped to [-θ/lr, θ/lr] "
                        "(default 0.0001 for sgd, off for adam; docs/training.md, 'Choosing θ'); 0 disables")
    p.add_argument("--clip-mode", choices=["element", "norm"], default=d.clip_mode,
                   help="element: clip every gradient element (the paper); norm: clip the gradient's global L2 "
                        "norm to θ/lr instead, as PyTorch re-implementations of VDSR do (with this loss, sgd lr 0.1: "
                        "θ 0.004 stayed stable, 0.04 and 0.4 diverged; docs/training.md)")
    p.add_argument("--warmup", type=int, default=0, metavar="N",
                   help="raise the lr linearly over the first N steps of this run" + ("" if finetune else
                        " (counted from --start-step)") + "; it only scales the schedule (the decay starts at "
                        "--decay-start). With --from and adam, e.g. 1000, so the fresh optimiser does not knock "
                        "trained weights off their optimum")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="validate, keep and export an exponential moving average of the weights (decay per step, "
                        "e.g. 0.999 averages about the last 1,000 steps): smooths the optimiser's step-to-step noise")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--no-amp", action="store_true",
                   help="train in float32 (default: autocast bf16/fp16 on CUDA and bf16 on CPUs with AMX/AVX512-BF16)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="processes drawing batches ahead of the training step (use on GPUs; same result as 0)")
    p.add_argument("--prescale", type=float, nargs="+", default=[1.0], metavar="F",
                   help="shrink the training images by F first (antialiased bicubic): F=2 averages away the JPEG "
                        "block edges and noise of photos saved as JPEG (default 1: as they are). Several factors "
                        "(e.g. 2 2.5 3) train on all the shrunk copies together (scale augmentation)")
    p.add_argument("--val-prescale", type=float, default=None, metavar="F",
                   help="shrink the validation images by F (default: the smallest --prescale); 1 validates on "
                        "clean --val-data images as they are")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="planes held out for validation")
    p.add_argument("--val-data", nargs="+", default=[], metavar="PATH",
                   help="validate on these images (files, folders, globs) instead of holding out --val-fraction of "
                        "the training planes; the best checkpoint is chosen on them")
    p.add_argument("--val-every", type=int, default=d.val_every)
    p.add_argument("--val-crop", type=int, default=d.val_crop)
    p.add_argument("--checkpoint-minutes", type=float, default=d.checkpoint_minutes)
    p.add_argument("--checkpoint-every", type=int, default=None, help="also checkpoint every N steps")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory: checkpoint.pt, log.jsonl, best.safetensors")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    p.add_argument("--from", dest="init_from", metavar="MODEL", default=None,
                   help="start from this model (name, file or run dir)" + ("; default: the bundled model for the task" if finetune else ""))
    if not finetune:
        p.add_argument("--transfer", action="store_true",
                       help="with --from: start from a model made for another task (e.g. SR weights for denoising)")
    if not finetune:  # a fine-tune counts its own steps from 0
        p.add_argument("--start-step", type=int, default=0,
                       help="with --from: continue that run's step count and lr schedule (see docs/training.md)")
    p.add_argument("--name", default=None, help="model name written in its card")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


#: TrainConfig fields that no command-line option sets (the Python API's): every other field has
#: an option, whose destination is the field's name or the one in :data:`_DEST_FIELD`
_NOT_ON_COMMAND_LINE = {"quantize", "val_levels", "pair_data"}  # pair_data: finetune --pairs records its files


def _config_from_args(a: argparse.Namespace, finetune: bool = False):
    """The :class:`TrainConfig` of a ``train`` or ``finetune`` command line.

    Every field is taken from the option of the same destination; only the defaults that follow
    the optimiser (lr, θ, weight decay) and the fields with another name are filled in here.
    """
    from .core.train import SGD_CLIP_THETA, TrainConfig

    field_dest = {f: d for d, f in _DEST_FIELD.items()}
    kw = {}
    for field in TrainConfig.model_fields:
        dest = field if hasattr(a, field) else field_dest.get(field)
        if dest is not None and hasattr(a, dest):
            kw[field] = getattr(a, dest)
    kw["amp"] = not a.no_amp
    if a.lr is None:
        if a.optimizer == "sgd":
            kw["lr"] = 0.1
        else:
            from .core.finetune import FINETUNE_DEFAULTS

            kw["lr"] = FINETUNE_DEFAULTS["lr"] if finetune else 1e-4
    if a.clip_theta is None:
        kw["clip_theta"] = SGD_CLIP_THETA if a.optimizer == "sgd" else None
    kw["clip_theta"] = kw["clip_theta"] or None  # 0 disables
    if a.optimizer != "sgd" and "weight_decay" not in _given(a):
        kw["weight_decay"] = 0.0  # given explicitly, it is checked against the run's optimiser (_check_weight_decay)
    kw["data"] = [str(x) for x in kw["data"]]
    kw["val_data"] = [str(x) for x in kw["val_data"]]
    if finetune:
        kw["scales"] = kw["scales"] or [2.0]
    kw["name"] = a.name or Path(a.out).resolve().name or "vdsr"  # "--out ." names the folder
    return TrainConfig(**kw)


#: TrainConfig fields that belong to the machine, not to the recipe: ``--resume`` takes every
#: other field from RUN_DIR/config.json unless the command line gives it again (so a field added
#: to TrainConfig is part of the recipe by default)
_MACHINE_FIELDS = ("device", "workers", "micro_batch", "checkpoint_minutes", "checkpoint_every", "out")
#: TrainConfig fields that ``finetune`` does not pass on as overrides: the model's shape and data
#: come from the base model and the command's own arguments
_FINETUNE_OWN = {"data", "pair_data", "task", "scales", "depth", "width", "transfer", "out", "name", "init_from", "start_step",
                 "quantize", "val_levels"}
#: command-line destinations whose TrainConfig field has another name
_DEST_FIELD = {"no_amp": "amp", "images": "data", "scale": "scales"}


def _check_weight_decay(cfg, a: argparse.Namespace) -> None:
    """Refuse a ``--weight-decay`` given for a run whose optimiser (after a resume's merge) is not SGD."""
    if cfg.optimizer != "sgd" and cfg.weight_decay and "weight_decay" in _given(a):
        from .core.errors import InputError

        raise InputError(f"--weight-decay applies to the optimizer sgd (the paper's recipe); this run's "
                         f"{cfg.optimizer} uses none. Leave it out, or pass --optimizer sgd.")


def _given(a: argparse.Namespace) -> set[str]:
    """TrainConfig fields the command line of ``a`` set explicitly; none known for a namespace that
    :func:`main` did not parse (no ``_parser`` / ``_argv``)."""
    parser, argv = getattr(a, "_parser", None), getattr(a, "_argv", None)
    return _given_fields(parser, argv) if parser is not None and argv is not None else set()


def _given_fields(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """TrainConfig fields set explicitly in ``argv`` (long options, unique prefixes and ``--opt=value``)."""
    actions = parser._option_string_actions  # noqa: SLF001 - argparse has no public map of option strings
    given: set[str] = set()
    for tok in argv:
        if not tok.startswith("--"):
            continue
        opt = tok.split("=", 1)[0]
        hits = {id(a): a for s, a in actions.items() if s == opt} or {
            id(a): a for s, a in actions.items() if s.startswith(opt)}
        if len(hits) == 1:
            dest = next(iter(hits.values())).dest
            given.add(_DEST_FIELD.get(dest, dest))
    return given


def _resume_config(cfg, a: argparse.Namespace):
    """With ``--resume``: the run's saved recipe, overridden only by options given again.

    Returns ``cfg`` unchanged without ``--resume`` or without RUN_DIR/config.json.  Prints
    what the command line changes, so that a resumed run never changes recipe silently.
    """
    import json

    from .core.train import TrainConfig

    saved_path = Path(cfg.out) / "config.json" if cfg.out else None
    argv, parser = getattr(a, "_argv", None), getattr(a, "_parser", None)
    if not getattr(a, "resume", False) or saved_path is None or not saved_path.is_file() or argv is None or parser is None:
        return cfg
    from .core.errors import TrainingError

    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{saved_path} cannot be read ({exc}); restore it from a copy, or delete it to resume "
                            "with the recipe on this command line (give every option of the run again).") from None
    given = _given_fields(parser, argv)
    new = cfg.model_dump(mode="json")
    if "optimizer" in given and saved.get("optimizer") != new["optimizer"]:  # these defaults follow the optimiser
        given |= {"lr", "clip_theta", "weight_decay"}
    merged, changed = dict(new), []
    for k in (f for f in TrainConfig.model_fields if f not in _MACHINE_FIELDS):
        if k not in saved:  # a run saved before this option existed: the command line decides
            if k in given:
                changed.append(f"{k} (not in config.json) -> {new[k]}")
            continue
        if k in given:
            if saved[k] != new[k]:
                changed.append(f"{k} {saved[k]} -> {new[k]}")
        else:
            merged[k] = saved[k]
    print(f"napari-vdsr: resuming {cfg.out} with the settings saved in config.json"
          + (f"; changed on the command line: {', '.join(changed)}" if changed else ""), file=sys.stderr)
    return TrainConfig(**merged)


def _run_training(trainer, quiet: bool) -> int:
    import signal
    import threading

    from tqdm import tqdm

    handlers = {}

    def _graceful(signum, frame):  # first Ctrl-C / SIGTERM: stop after this step, checkpoint, export
        if trainer.stopped:
            raise KeyboardInterrupt
        print(f"\nnapari-vdsr: {signal.Signals(signum).name}: stopping after this step and saving "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr)
        trainer.stop()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, _graceful)
    try:
        return _consume_training(trainer, quiet, tqdm)
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)


def _consume_training(trainer, quiet: bool, tqdm) -> int:
    bar = None
    last_val = ""
    base_psnr = None  # the starting weights' validation PSNR (fine-tunes and runs from --from)
    input_psnr = None  # the validation's input (bicubic for SR, the degraded image otherwise): the bar to beat
    for ev in trainer.run():
        if not getattr(trainer, "is_main", True):
            continue  # torchrun: the other processes train in step with the first, which alone reports and saves
        if ev.kind == "start":
            print(f"napari-vdsr: {ev.message}", file=sys.stderr)
            if ev.val_base_model_psnr is not None:
                base_psnr = ev.val_base_model_psnr
                print(f"  base model validation PSNR {ev.val_base_model_psnr:.3f} dB", file=sys.stderr)
            bar = tqdm(total=ev.total, initial=ev.step, desc="train", unit="step", disable=quiet, dynamic_ncols=True)
        elif ev.kind == "step" and bar is not None:
            bar.update(1)
            if ev.loss is not None:  # on a GPU the loss is read back every few steps
                bar.set_postfix_str(f"loss {ev.loss:.2e} lr {ev.lr:.1e}{last_val}", refresh=False)
        elif ev.kind == "val":
            input_psnr = ev.val_baseline_psnr
            last_val = f" val {ev.val_psnr:.2f} dB (input {ev.val_baseline_psnr:.2f})"
            if bar is not None:
                bar.set_postfix_str(f"loss - {last_val}")
        elif ev.kind in ("done", "stopped"):
            if bar is not None:
                bar.close()
            what = "bicubic" if trainer.config.task == "sr" and not trainer.paired else "input"
            print(f"napari-vdsr: {ev.message}; best validation PSNR "
                  f"{'%.3f dB' % ev.best_psnr if ev.best_psnr is not None else 'n/a'}"
                  + (f" (input {input_psnr:.3f} dB, {what})" if input_psnr is not None else "")
                  + f"; model: {ev.path}", file=sys.stderr)
            if input_psnr is not None and ev.best_psnr is not None and ev.best_psnr < input_psnr:
                print(f"napari-vdsr: note: the best weights validate {input_psnr - ev.best_psnr:.3f} dB below the input "
                      f"itself ({what}, {input_psnr:.3f} dB) on the held-out images: the model does not help there yet; "
                      "train longer (--iterations), with more images, or check that the images match the task.",
                      file=sys.stderr)
            if base_psnr is not None and ev.best_psnr is not None and ev.best_psnr < base_psnr:
                print(f"napari-vdsr: note: the best weights validate {base_psnr - ev.best_psnr:.3f} dB below the model "
                      f"this run started from ({base_psnr:.3f} dB): keep using that model, or try a lower --lr, more "
                      "images or more --iterations.", file=sys.stderr)
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from .core.train import Trainer

    cfg = _resume_config(_config_from_args(a), a)
    _check_weight_decay(cfg, a)
    return _run_training(Trainer(cfg, resume=a.resume), a.quiet)


def cmd_finetune(a: argparse.Namespace) -> int:
    from .core.finetune import make_finetune_trainer

    if not a.images and not a.pairs and not a.resume:  # a resumed run reads the image files it recorded
        raise SystemExit("napari-vdsr finetune: give --images PATH... or --pairs DEGRADED CLEAN")
    if a.images and a.pairs:
        raise SystemExit("napari-vdsr finetune: give either --images (clean images, degraded on the fly) or --pairs "
                         "DEGRADED CLEAN, not both")
    cfg = _config_from_args(a, finetune=True)
    overrides = cfg.model_dump(exclude=_FINETUNE_OWN)
    pairs = [tuple(a.pairs)] if a.pairs else None  # read by make_finetune_trainer, which records the files
    trainer = make_finetune_trainer(
        a.task, images=list(a.images) or None, pairs=pairs, base_model=a.init_from,
        scales=cfg.scales if a.scale else None, out=a.out, name=cfg.name, resume=a.resume, **overrides,
    )  # scales None: 2, or a resumed run's own
    trainer.config = _resume_config(trainer.config, a)
    _check_weight_decay(trainer.config, a)
    return _run_training(trainer, a.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-vdsr", description="VDSR super-resolution, denoising and JPEG artifact removal.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="train a model (the paper's recipe with adjustable gradient clipping)",
                       description="Train a VDSR model. Checkpoints in RUN_DIR; --resume continues exactly.")
    _add_train_args(p)
    p.set_defaults(func=cmd_train, _parser=p)
    p = sub.add_parser("finetune", help="fine-tune a model (default: the bundled one) on your own images",
                       description="Fine-tune a model on clean images (degradations synthesised) or a registered pair. "
                                   "RUN_DIR then works as --model RUN_DIR.")
    _add_train_args(p, finetune=True)
    p.set_defaults(func=cmd_finetune, _parser=p)
    __import__("napari_vdsr._cli_evaluate", fromlist=["register"]).register(sub)  # evaluate, demo
    __import__("napari_vdsr._cli_predict", fromlist=["register"]).register(sub)  # predict, models
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``napari-vdsr`` console script."""
    from .core.errors import VDSRError

    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # which options were given (train --resume)
    try:
        return int(args.func(args) or 0)
    except VDSRError as exc:
        print(f"napari-vdsr: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # pydantic's ValidationError of a TrainConfig: out-of-range option values
        errors = getattr(exc, "errors", None)
        if not callable(errors):
            raise
        names = {"scales": "scale"} if args.command == "finetune" else {}  # finetune's option is --scale
        bad = "; ".join((f"--{names.get('.'.join(map(str, e['loc'])), '.'.join(map(str, e['loc']))).replace('_', '-')}: "
                         if e.get("loc") else "")
                        + str(e.get("msg", "")).removeprefix("Value error, ") for e in errors())
        print(f"napari-vdsr: error: invalid option value ({bad}).", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("napari-vdsr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
