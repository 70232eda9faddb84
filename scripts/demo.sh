#!/usr/bin/env bash
# The main job on the bundled data, a few minutes on 2 CPU cores: quantization-aware fine-tuning
# of the bundled full-precision ResNet-20 with a mixed-precision policy on CIFAR-10, then its
# accuracy, BitOps and size. Output goes to runs/demo (replaced on every run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${MPQKIT_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export MPQKIT_DATA_DIR="$(cd ../shared/data && pwd)"
fi
MPQ=.venv/bin/mpqkit
OUT=${OUT:-runs/demo}

echo "== the policy: per-layer bits and cost at 32x32"
$MPQ info --model resnet20 --policy configs/resnet20_mixed_demo.json

echo "== QAT fine-tune from the bundled FP weights (1 epoch on 10,000 CIFAR-10 images)"
$MPQ finetune --model resnet20 --weights bundled --data cifar10 \
  --policy configs/resnet20_mixed_demo.json --subset 10000 --epochs 1 --lr 0.01 \
  --weight-decay 4e-5 --out "$OUT/finetune" --overwrite

echo "== evaluation on the 10,000 CIFAR-10 test images"
$MPQ eval --checkpoint "$OUT/finetune/best.safetensors" --data cifar10
