#!/usr/bin/env bash
# The GPU benchmark suite for a 1xH100 machine with no package access (Python 3.12, torch 2.11 / torchvision 0.26
# preinstalled; DALI and FFCV usually absent: their rows are reported as skipped, not failed).
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]        # default: benchmarks/results/gpu-<UTC time>
#   SMOKE=1 bash benchmarks/gpu_suite.sh /tmp/x   # the same plumbing with tiny settings on a CPU (seconds, not
#                                                 # minutes): how the script is tested where there is no GPU
#
# Builds a small ImageNet-like folder from real photos, then runs the step, loader, classifier and e2e benchmarks
# at 224 and 160 px. Budget: under 8 minutes. Each benchmark writes one JSON record into OUT_DIR; the log of the
# whole run goes to OUT_DIR/suite.log.
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
DATA=benchmarks/scratch/photos
W=$(( $(nproc) > 16 ? 16 : $(nproc) ))
run() { echo "== $*"; timeout "${BUDGET:-150}" "$@" || echo "!! failed or timed out (rc=$?): $*"; }
if [ "${SMOKE:-0}" = 1 ]; then  # tiny settings, CPU
  ARCH=resnet18; SIZES="64"; B=16; N=20000; K=1024; IMG=64; DEV=cpu; IT=1; WU=1; CLS="--ns 10000,100000 --ks 1024 --repeats 2 --no-rn50"
else
  ARCH=resnet50; SIZES="224 160"; B=256; N=1281167; K=65536; IMG=2048; DEV=cuda; IT=10; WU=5; CLS=""
fi
$PY -m pipeline.sample_data benchmarks/scratch --what photos --photos $IMG

# 1. model speed on synthetic tensors: PIC step vs supervised step, ResNet-50, bf16, channels_last
run $PY -m benchmarks.bench_step --archs $ARCH --sizes "${SIZES// /,}" --batches $B --num-instances $N \
    --negatives recent --k $K --warmup $WU --repeats 5 --iters $IT --json "$OUT/step.json"
# 2. loaders, crop mode (CPU decode + crop vs GPU decode), batches delivered on the GPU
for size in $SIZES; do
  run $PY -m benchmarks.bench_loader --data "$DATA" --backends torch,torch-gpu,dali,ffcv --modes crop,full \
      --size $size --batch $B --workers $W --batches 4 --repeats 3 --device $DEV --json "$OUT/loader-$size.json"
done
# 3. the classifier part: gather + correct + logits + backward + row update, N up to 1e7
run $PY -m benchmarks.bench_classifier --device $DEV $CLS --json "$OUT/classifier.json"
# 4. end to end: the real loop per backend, ResNet-50
for size in $SIZES; do
  run $PY -m benchmarks.bench_e2e --data "$DATA" --backends torch,torch-gpu,dali --arch $ARCH --size $size \
      --batch $B --workers $W --k $K --steps $(( IT * 2 )) --warmup $WU --json "$OUT/e2e-$size.json"
done
echo "== done: $(date -u)"
ls -la "$OUT"
