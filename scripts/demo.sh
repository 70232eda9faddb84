#!/usr/bin/env bash
# The main job on the bundled data, in minutes on 2 CPU cores:
#   1. ASGA search of a mixed-precision policy for ResNet-20 on a small CIFAR-10 proxy subset,
#      starting from the bundled full-precision weights,
#      under the BitOps budget of uniform w4a4,
#   2. transfer of the policy to the target task (the full CIFAR-10 set, ResNet-20 at 32x32),
#   3. quantization-aware fine-tune of the bundled full-precision ResNet-20 with that policy,
#   4. evaluation on the 10,000 test images (accuracy, BitOps, size),
#   5. a report (per-layer bits and search curves as PNG).
# Output goes to runs/demo (replaced on every run); set OUT=... to change it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${MPQKIT_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export MPQKIT_DATA_DIR="$(cd ../shared/data && pwd)"
fi
MPQ=.venv/bin/mpqkit
OUT=${OUT:-runs/demo}

echo "== 1. ASGA search on 1,000 CIFAR-10 images (budget: BitOps of uniform w4a4)"
$MPQ search --method asga --model resnet20 --weights bundled --data cifar10 --subset 1000 --epochs 3 \
  --batch-size 128 --budget w4a4 --out "$OUT/search" --overwrite

echo "== 2. transfer to the target (ResNet-20, 32x32)"
$MPQ transfer --policy "$OUT/search/policy.json" --model resnet20 --num-classes 10 \
  --input-size 32 --out "$OUT/policy.json" --budget-check

echo "== 3. QAT fine-tune of the bundled FP ResNet-20 (1 epoch on 10,000 images)"
$MPQ finetune --model resnet20 --weights bundled --data cifar10 --policy "$OUT/policy.json" \
  --subset 10000 --epochs 1 --lr 0.01 --weight-decay 4e-5 --out "$OUT/finetune" --overwrite

echo "== 4. evaluation on the 10,000 CIFAR-10 test images"
$MPQ eval --checkpoint "$OUT/finetune/best.safetensors" --data cifar10

echo "== 5. report"
$MPQ report "$OUT/search" "$OUT/finetune" --out "$OUT/report"
$MPQ info --model resnet20 --policy "$OUT/policy.json"
