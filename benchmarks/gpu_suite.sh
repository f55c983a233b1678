#!/usr/bin/env bash
# The GPU benchmark suite, for one lent GPU machine with no package access (Python 3.12, torch 2.11 / torchvision
# 0.26 preinstalled; no DALI, no FFCV: their rows are reported as skipped, not failed). On that machine:
#
#   ulimit -n 65536; nvidia-smi -L; timeout 120 python3 -m pytest -q -k cuda tests/test_gpu_ready.py tests/test_bank_rows.py; \
#   timeout 470 bash benchmarks/gpu_suite.sh "$OUT"
#
#   SMOKE=1 bash benchmarks/gpu_suite.sh /tmp/x   # the same plumbing with tiny settings on a CPU: how the script is
#                                                 # tested where there is no GPU (tools/gpu_stack_check.sh)
#
# Builds an ImageNet-like folder of 8,192 real photos (32 batches of 256 per epoch: more than the loaders prefetch,
# so epochs reach a steady state), then runs, each under its own time budget (seconds, 7 minutes in all):
#   data (20)  step (60)  loader @224 (90), @160 (70)  classifier (50)  e2e @224 (70), @160 (60)
# Every benchmark writes its JSON record into OUT_DIR, rewritten after every row, so a benchmark stopped by its
# budget keeps the rows it finished; the console goes to OUT_DIR/suite.log. 7 files in all.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/suite.log") 2>&1
echo "== pic GPU suite: $(date -u) -> $OUT"
$PY - <<'PY'
import torch, sys
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
PY
echo "open files limit: $(ulimit -n)"
DATA=benchmarks/scratch/photos
W=$(( $(nproc) > 16 ? 16 : $(nproc) ))
# run BUDGET_SECONDS CMD...: a benchmark that fails or runs out of time is reported and the suite goes on
run() { local budget=$1; shift; echo "== [${budget}s] $*"; local t0=$SECONDS
        timeout --kill-after=10 "$budget" "$@"; local rc=$?
        [ $rc = 0 ] || echo "!! rc=$rc ($([ $rc = 124 ] && echo "budget of ${budget}s spent" || echo failed)): $*"
        echo "== took $(( SECONDS - t0 ))s"; }
if [ "${SMOKE:-0}" = 1 ]; then  # tiny settings, CPU: the plumbing, not the speed (the tiny backbone keeps every
  # benchmark well inside its budget on a loaded 2-core machine; resnet18 ran out of it in bench_e2e)
  ARCH=tiny; SIZES="64"; B=16; N=20000; K=1024; EK=128; IMG=256; DEV=cpu; IT=1; WU=1; LOG=2
  CLS="--ns 1e4,1e5 --ks 1024 --repeats 2 --full-repeats 1 --no-rn50"; SCALE=4
else
  ARCH=resnet50; SIZES="224 160"; B=256; N=1281167; K=65536; EK=4096; IMG=8192; DEV=cuda; IT=10; WU=3; LOG=10
  CLS="--ns 1e5,1e6,1e7 --ks 4096,65536 --repeats 5 --full-repeats 3"; SCALE=1
fi
run $(( 20 * SCALE )) $PY -m pipeline.sample_data benchmarks/scratch --what photos --photos $IMG

# 1. model speed on synthetic tensors: PIC step vs supervised step, bf16, channels_last
run $(( 60 * SCALE )) $PY -m benchmarks.bench_step --archs $ARCH --sizes "${SIZES// /,}" --batches $B \
    --num-instances $N --negatives recent --k $K --warmup $WU --repeats 5 --iters $IT --json "$OUT/step.json"
# 2. loaders (CPU decode + crop vs GPU decode), batches delivered on the device; steady state per repeat
for size in $SIZES; do
  run $(( (size > 160 ? 90 : 70) * SCALE )) $PY -m benchmarks.bench_loader --data "$DATA" \
      --backends torch,torch-gpu,dali,ffcv --modes crop,full --plain-modes crop --size $size --batch $B --workers $W --batches 8 --settle 4 --repeats 3 --device $DEV \
      --json "$OUT/loader-$size.json"
done
# 3. the classifier part: gather + correct + logits + backward + row update, N up to 1e7
run $(( 50 * SCALE )) $PY -m benchmarks.bench_classifier --device $DEV $CLS --json "$OUT/classifier.json"
# 4. end to end: the real loop per backend, at the loop's own logging cadence
# K below the 8,192 images, so the recent-negative path (the one ImageNet runs) is what is timed
for size in $SIZES; do
  run $(( (size > 160 ? 70 : 60) * SCALE )) $PY -m benchmarks.bench_e2e --data "$DATA" \
      --backends torch,torch-gpu,dali,ffcv --arch $ARCH --size $size --batch $B --workers $W --k $EK \
      --steps $(( IT * 3 )) --warmup $(( LOG * 2 )) \
      --log-every $LOG --json "$OUT/e2e-$size.json"
done
echo "== done: $(date -u)"
ls -la "$OUT"
