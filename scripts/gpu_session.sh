#!/usr/bin/env bash
# One GPU lease in one command: CUDA tests, GPU benchmarks, then the rest of TOTAL_SECONDS training
# the three bundled models side by side on the GPU; everything comes back packed in $OUT.
#
#   G=.gpu OUT=/tmp/out TOTAL_SECONDS=540 bash scripts/gpu_session.sh
#
# TOTAL_SECONDS bounds the whole script: the training runs get what the benchmarks leave,
# less STOP_MARGIN seconds for their final checkpoint and the packing.
#
# $G (not committed) holds what the GPU machine lacks:
#   $G/whl/*.whl                       wheels of packages missing there (pydantic, ...), optional
#   $G/train/*.png                     training images (here: SunHays80 as 8-bit luminance, to travel light)
#   $G/init/{sr,denoise,deblock}.safetensors + .json   weights to continue from (e.g. runs/*/best.*)
#   $G/resume/<task>/                  a run folder (checkpoint.pt, config.json, ...) to resume exactly
#                                      instead (--resume; batch 64 and the GPU's workers override); on a
#                                      second call on a warm machine, $RUNS/<task> goes on when it is ahead
#   $G/referee/                        clean validation photos (runs/referee-val/x1/HR) for the task srpaper and
#                                      for a resumed run validated on --val-data (runs/sr-scratch-grid, session 11)
# Tasks: sr, denoise, deblock (continue a model), srpaper (the paper's SR recipe from scratch:
# SGD 0.1 /10 every 2,490 steps, θ 0.0001 (PAPER_THETA), 9,960 steps of batch 64, on the training images shrunk
# by 2, validated on $G/referee). Since session 10 every SR run draws its pairs on the exact grid of
# the scale (docs/training.md); srpaper is the first from-scratch SR run to profit.
# Each run continues its model with --from ... --start-step <its step>; the lr schedule goes on,
# Adam moments restart; SR_EXTRA / DENOISE_EXTRA / DEBLOCK_EXTRA append options to that run.
# SIGINT at the deadline: every run checkpoints and exports best/last.
# Afterwards: $OUT/<task>.tar holds the run folder (checkpoint.pt, best/last, log.jsonl, train.log).
set -uo pipefail
cd "$(dirname "$0")/.."
G=${G:-.gpu}
OUT=${OUT:-/tmp/gpu-out}
DEVICE=${DEVICE:-cuda}
TOTAL_SECONDS=${TOTAL_SECONDS:-540}
STOP_MARGIN=${STOP_MARGIN:-40}
RUNS=${RUNS:-gpu-runs}
TASKS=${TASKS:-sr denoise deblock}   # which models to train (e.g. TASKS="sr deblock")
BENCH=${BENCH:-1}                     # 0: skip the GPU benchmarks (more time for training)
TESTS=${TESTS:-1}                     # 0: skip tests/test_cuda.py
BATCH=${BATCH:-64}                    # batch of the continued runs (srpaper keeps the paper's 64)
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$RUNS"
if compgen -G "$G/whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$G"/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
py=${PY:-python3}  # (tests put a stand-in here)

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; nproc; date -u;
  $py -c "import torch, pydantic, napari_vdsr.core.train as t; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"; } 2>&1 | tee "$OUT/gpu.txt"

# 1. benchmarks first, with the GPU to themselves
if [ "$DEVICE" = cuda ] && [ "$BENCH" != 0 ]; then
  { timeout 60 $py benchmarks/gpu_forward.py --sizes 1024 2048 --batch 1 4 --json "$OUT/gpu_forward.json"
    timeout 90 $py benchmarks/throughput.py --device cuda --size 1024 --scale 2 --tiles 1024 --repeat 2 --gemm-size 4096 --json "$OUT/throughput_cuda.json"
    timeout 40 $py benchmarks/train_step.py --device cuda --batch 64 --patch 41 --steps 20
    # where a real training loop's time goes (batches / host / device), without and with workers
    timeout 60 $py benchmarks/train_loop.py --data "$G/train" --device cuda --workers 0 --seconds 15 --json "$OUT/train_loop_w0.json"
    timeout 90 $py benchmarks/train_loop.py --data "$G/train" --device cuda --workers 8 --seconds 20 --profile --json "$OUT/train_loop_w8.json"
  } 2>&1 | tee "$OUT/bench.log"
fi

# 2. training, the models of $TASKS at once (each with its own batch-drawing processes)
# the step of a checkpoint file (0 when there is none)
ck_step() { [ -f "$1" ] && $py -c "import sys, torch; print(torch.load(sys.argv[1], map_location='cpu', weights_only=False)['step'])" "$1" || echo 0; }
step_of() { $py -c "import json,sys; c=json.load(open(sys.argv[1])); print(c['metrics']['validation'].get('step') or c['training']['steps'])" "$1"; }
common=(--data "$G/train" --batch-size "$BATCH" --optimizer adam --lr 1e-4 --lr-schedule step --lr-gamma 0.3
        --iterations 100000 --val-fraction 0.05 --val-every 500 --checkpoint-minutes 2 --seed 0 --device "$DEVICE")
# the SR cycle in progress (scripts/sr_cycle.json): its schedule, and the step it starts at
read -r sr_start sr_iterations sr_decay < <($py -c "import json
c = json.load(open('scripts/sr_cycle.json'))
print(c['start_step'], c['iterations'], c['decay_start'])")
sr_schedule=(--iterations "$sr_iterations" --decay-start "$sr_decay")
declare -A extra=(
  # SR without a run to resume: the recipe of the cycle in scripts/sr_cycle.json from its resume point in .gpu/init
  [sr]="--task sr --scales 2 3 4 --patch-size 41 --prescale ${SR_PRESCALE:-1} --lr-schedule cosine --lr-gamma 0.01 ${sr_schedule[*]} --ema 0.999 --warmup 1000 --val-data $G/referee --val-prescale 1 --val-crop 1024 --val-every 1000 --workers ${SR_WORKERS:-5} --name vdsr-sr-x234"
  [denoise]="--task denoise --sigma-range 0 55 --patch-size 48 --lr-step ${DN_LR_STEP:-16000} --workers ${DN_WORKERS:-3} --name vdsr-denoise"
  [srpaper]="--task sr --scales 2 3 4 --patch-size 41 --prescale 2 --optimizer sgd --lr 0.1 --momentum 0.9 --weight-decay 1e-4 --clip-theta ${PAPER_THETA:-0.0001} --lr-schedule step --lr-step 2490 --lr-gamma 0.1 --iterations 9960 --val-data $G/referee --val-prescale 1 --workers ${SR_WORKERS:-7} --name vdsr-sr-x234"
  [deblock]="--task deblock --quality-range 5 50 --patch-size 48 --lr-step ${DB_LR_STEP:-16000} --workers ${DB_WORKERS:-4} --name vdsr-deblock"
)
train_seconds=$(( TOTAL_SECONDS - SECONDS - STOP_MARGIN ))
echo "training for $train_seconds s" | tee -a "$OUT/gpu.txt"
if [ "$train_seconds" -lt 30 ]; then  # timeout 0 would mean no limit at all
  echo "only $train_seconds s left for training: raise TOTAL_SECONDS or skip the tests/benchmarks" | tee -a "$OUT/gpu.txt"
  exit 3
fi
pids=()
# launch TASK OPTIONS...: one training run in the background, stopped (SIGINT: it checkpoints) at the deadline
launch() {
  local t=$1; shift
  mkdir -p "$RUNS/$t"
  timeout -s INT -k 25 "$train_seconds" $py -m napari_vdsr.cli train "$@" --out "$RUNS/$t" --quiet > "$RUNS/$t/train.log" 2>&1 &
  pids+=($!)
}
for t in $TASKS; do
  if [ -f "$G/resume/$t/checkpoint.pt" ] || [ -f "$RUNS/$t/checkpoint.pt" ]; then  # exact resume
    # of a carried run folder; or a second call on the still-warm machine: $RUNS (ignored by git, so
    # kept there between calls) holds this run further on than the carried folder, or holds the run a
    # first call started from $G/init (session 17 found a second call restarting it from its init
    # weights); go on from there instead
    here=$(ck_step "$RUNS/$t/checkpoint.pt")
    if [ "$here" -gt "$(ck_step "$G/resume/$t/checkpoint.pt")" ]; then
      echo "$t: resuming $RUNS/$t (step $here), ahead of $G/resume/$t" | tee -a "$OUT/gpu.txt"
    else
      cp -r "$G/resume/$t/." "$RUNS/$t/"
    fi
    w=${extra[$t]##*--workers }; w=${w%% *}
    vd=()  # a run validated on --val-data (runs/sr-scratch-grid: the referee photos) validates on $G/referee there
    $py -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get('val_data') else 1)" "$RUNS/$t/config.json" && vd=(--val-data "$G/referee")
    sched=()  # an SR run inside the cycle of scripts/sr_cycle.json goes on with its schedule (the previous cycle's
    # run, carried before it reached the cycle's start, finishes its own recipe)
    [ "$t" = sr ] && [ "$(ck_step "$RUNS/$t/checkpoint.pt")" -ge "$sr_start" ] && sched=("${sr_schedule[@]}")
    launch "$t" --resume --data "$G/train" --device "$DEVICE" --batch-size "$BATCH" --workers "$w" --checkpoint-minutes 2 --val-every 500 "${vd[@]}" "${sched[@]}"
  elif [ "$t" = srpaper ]; then
    # shellcheck disable=SC2086
    launch "$t" --data "$G/train" --batch-size 64 --val-every 500 --checkpoint-minutes 2 --seed 0 --device "$DEVICE" ${extra[$t]}
  else
    init=$G/init/$t.safetensors
    [ -f "$init" ] || { echo "missing $init" | tee -a "$OUT/gpu.txt"; continue; }
    s=$(step_of "${init%.safetensors}.json")
    # shellcheck disable=SC2086
    more=${t^^}_EXTRA  # e.g. DEBLOCK_EXTRA="--ema 0.999 --lr 3e-5 --lr-schedule constant" (later options win)
    # shellcheck disable=SC2086
    launch "$t" "${common[@]}" ${extra[$t]} --transfer --from "$init" --start-step "$s" ${!more:-}
  fi
done

# while they train, a copy of each run (its last checkpoint) in $OUT every 2 minutes: a command cut short
# by the device tool's limit still returns what is under $OUT
snapshot() {
  for t in $TASKS; do
    [ -f "$RUNS/$t/checkpoint.pt" ] || continue
    tar -cf "$OUT/.$t.tar.part" --exclude="last.*" -C "$RUNS/$t" . 2>/dev/null && mv "$OUT/.$t.tar.part" "$OUT/$t.tar"
  done
}
( while sleep 120; do snapshot; done ) &
snapper=$!

# 3. the CUDA tests while the runs train (correctness only, nothing timed)
[ "$TESTS" = 0 ] || timeout 180 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/tests.log"
wait "${pids[@]}"
kill "$snapper" 2>/dev/null; wait "$snapper" 2>/dev/null; rm -f "$OUT"/.*.tar.part

for t in $TASKS; do
  [ -d "$RUNS/$t" ] || continue
  grep '"kind": "val"' "$RUNS/$t/log.jsonl" 2>/dev/null | tail -2 | cut -c1-300
  tail -3 "$RUNS/$t/train.log"
  tar -cf "$OUT/$t.tar" --exclude="last.*" -C "$RUNS/$t" .
  # the run's last weights beside the tar (inside it they would pass the size limit of what comes back):
  # copy them over runs/<run>/last.* too, or the run folder keeps the CPU's older last weights
  for f in "$RUNS/$t"/last.safetensors "$RUNS/$t"/last.json; do [ -f "$f" ] && cp "$f" "$OUT/$t-$(basename "$f")"; done
done
ls -la "$OUT"
