#!/usr/bin/env bash
# Train (or continue training) one of the bundled models in the background-friendly way.
#
#   THREADS=1 bash scripts/train_bundled.sh sr|denoise|deblock [extra napari-vdsr train options]
#
# SR: the cycle in progress, named in scripts/sr_cycle.json (since session 25: runs/sr-cycle6, steps 200,000 ->
# 220,000): its run folder resumed exactly; else the previous cycle's run, resumed to its end when it is not
# finished, copied into the new folder when it is; else continued from the cycle's resume point in the package
# (with --warmup 1000), else from the default vdsr-sr-x234, else from scratch.
# denoise / deblock: the run folder with the newest checkpoint.pt (exact resume) → the committed
# bundled weights (--from ... --start-step <steps in its card>; Adam moments restart) → the
# bundled SR weights (--transfer).
# Ctrl-C or SIGTERM stops after the current step and saves. See docs/training.md.
set -euo pipefail
cd "$(dirname "$0")/.."
task=${1:?usage: train_bundled.sh sr|denoise|deblock [options]}; shift
export OMP_NUM_THREADS=${THREADS:-2}
data=${DATA:-../shared/data/train/SunHays80}
seed=0
case $task in
  # SR since session 11: a run FROM SCRATCH on the exact grid (docs/training.md, "The full network from scratch on
  # the exact grid"): Adam 1e-4 with --ema 0.999 to step 66,000, a cosine anneal to 1e-6 at 86,000 (its last
  # weights were the default for part of session 14), then runs/sr-cycle2: back to 1e-4 until 90,000 and a
  # cosine to 1e-6 at 100,000 (its last weights: the default since session 14), validated on the referee's natural
  # photos, whole (runs/referee-photos, built below; session 13 found the textures and microscopy images of the
  # full referee rank the lr the other way); then runs/sr-cycle3: 1e-4 until 120,000, a cosine to 1e-6 at 140,000;
  # then runs/sr-cycle4: 1e-4 until 160,000, a cosine to 1e-6 at 180,000 (its last weights: the default in session 24);
  # then runs/sr-cycle5: 1e-4 until 190,000, a cosine to 1e-6 at 200,000 (on an H200; the default since session 25);
  # then the cycle of scripts/sr_cycle.json (runs/sr-cycle6: 1e-4 until 210,000, a cosine to 1e-6 at 220,000).
  sr)      name=vdsr-sr-x234;  seed=0
           # the cycle's fields, read once
           read -r cycle_name prev_name start_step iterations decay_start resume_name < <(python -c "import json
c = json.load(open('scripts/sr_cycle.json'))
print(*(c[k] for k in ('run', 'previous_run', 'start_step', 'iterations', 'decay_start', 'resume_point')))")
           cycle_run=runs/$cycle_name; prev_run=runs/$prev_name
           schedule=(--iterations "$iterations" --decay-start "$decay_start")
           [ -d runs/referee-photos/x1/HR ] || python -c "import sys; sys.path.insert(0, 'benchmarks'); import referee; from pathlib import Path; referee.build(Path('runs/referee-photos'), images=referee.PHOTOS)"
           args=(--scales 2 3 4 "${schedule[@]}" --patch-size 41 --lr 1e-4 --lr-schedule cosine --lr-gamma 0.01
                 --ema 0.999 --val-data runs/referee-photos/x1/HR --val-prescale 1 --val-crop 1024
                 --val-every 1000) ;;
  # denoise / deblock since session 7: the bundled weights went on at a constant lr with the moving
  # average of the weights (--ema 0.999), which is what they export (runs/denoise-s7, runs/deblock-s7)
  denoise) name=vdsr-denoise;  seed=7
           args=(--sigma-range 0 55 --iterations 200000 --patch-size 48 --lr 3e-5 --lr-schedule constant --ema 0.999) ;;
  deblock) name=vdsr-deblock;  seed=7
           args=(--quality-range 5 50 --iterations 200000 --patch-size 48 --lr 3e-5 --lr-schedule constant --ema 0.999) ;;
  *) echo "unknown task $task" >&2; exit 2 ;;
esac
# The run to resume: of the task's run folders (sessions 4-9), the one with the newest checkpoint.
# SR since session 16: the run of scripts/sr_cycle.json (14-15: runs/sr-cycle3, then runs/sr-cycle2; 11-13: runs/sr-scratch-grid, runs/sr-anneal13; 10: runs/sr-grid-w-np; 4-9: runs/sr-prescale2). Denoise / deblock: runs/<task>-s7 (session 7), runs/denoise-gpu8
# (session 8, from runs/denoise-s7 on an H100), runs/<task>-gpu9 (session 9: from the bundled weights on
# an H100, the same recipe at batch 64), runs/<task>-gpu17 (session 17: the same, from the bundled weights again),
# runs/<task>-from-bundled (this script, when none was there).
case $task in
  sr) candidates=("$cycle_run") ;;  # only the active cycle: a finished run (sr-cycle2) resumed would train nothing
  denoise) candidates=(runs/denoise-s7 runs/denoise-gpu8 runs/denoise-gpu9 runs/denoise-gpu17 runs/denoise-from-bundled) ;;
  deblock) candidates=(runs/deblock-s7 runs/deblock-gpu9 runs/deblock-gpu17 runs/deblock-from-bundled) ;;
esac
run=${candidates[-1]}  # nothing to resume: the last folder (SR: its run; else a new run from the committed weights)
newest=0
for c in "${candidates[@]}"; do
  if [ -f "$c/checkpoint.pt" ] && [ "$(stat -c %Y "$c/checkpoint.pt")" -gt "$newest" ]; then
    run=$c; newest=$(stat -c %Y "$c/checkpoint.pt")
  fi
done
echo "train_bundled.sh: $task in $run" >&2
common=(train --data "$data" --task "$task" --batch-size 32 --optimizer adam
        --lr-schedule step --lr-gamma 0.3 --val-fraction 0.05 --val-every 250 --checkpoint-minutes 5
        --seed "$seed" --device cpu --out "$run" --name "$name" "${args[@]}")
bundled=src/napari_vdsr/weights/$name.safetensors
card_steps() { python -c "import json,sys; print(json.load(open(sys.argv[1]))['training']['steps'])" "${1%.safetensors}.json"; }
if [ "$task" = sr ]; then  # its exact resume (the recipe in its config.json), else its committed weights
  # A run resumed from a GPU checkpoint gets the CPU's batch and this machine's paths back.
  resume=(--data "$data" --device cpu --resume --batch-size 32 --workers 0 --val-every 1000
          --val-data runs/referee-photos/x1/HR)
  ck_step() { python -c "import sys, torch; print(torch.load(sys.argv[1], map_location='cpu', weights_only=False)['step'])" "$1"; }
  if [ ! -f "$run/checkpoint.pt" ] && [ -f "$prev_run/checkpoint.pt" ]; then
    if [ "$(ck_step "$prev_run/checkpoint.pt")" -lt "$start_step" ]; then  # the previous cycle first, to its end
      echo "train_bundled.sh: $prev_run has not reached step $start_step: resuming it with its own recipe" >&2
      exec napari-vdsr train --out "$prev_run" "${resume[@]}" "$@"
    fi
    echo "train_bundled.sh: starting $run as a copy of $prev_run at step $start_step" >&2
    rm -rf "$run.part" && cp -r "$prev_run" "$run.part" && rm -f "$run.part"/last.* && mv "$run.part" "$run"
  fi
  # the cycle's schedule is given again on every resume (the same numbers: a no-op after the first)
  [ -f "$run/checkpoint.pt" ] && exec napari-vdsr train --out "$run" "${resume[@]}" "${schedule[@]}" "$@"
  # no run folder: the cycle's resume point in the package (its EMA weights at the last checkpoint a session
  # committed), else the default (since session 16: the previous cycle's last weights, the cycle's start)
  resume_point=src/napari_vdsr/weights/$resume_name.safetensors
  [ -f "$resume_point" ] || resume_point=$bundled
  if [ -f "$resume_point" ]; then
    exec napari-vdsr "${common[@]}" --from "$resume_point" --start-step "$(card_steps "$resume_point")" --warmup 1000 "$@"
  fi
  exec napari-vdsr "${common[@]}" "$@"
elif [ -f "$run/checkpoint.pt" ]; then
  exec napari-vdsr "${common[@]}" --resume "$@"
elif [ -f "$bundled" ]; then
  exec napari-vdsr "${common[@]}" --from "$bundled" --start-step "$(card_steps "$bundled")" "$@"
else
  exec napari-vdsr "${common[@]}" --from src/napari_vdsr/weights/vdsr-sr-x234.safetensors --transfer "$@"
fi
