#!/usr/bin/env bash
# Regenerates every number in reports/README.md, MODEL_CARD.md and the README's results.
# Usage: bash reports/reproduce.sh [UTKFACE_DIR]   (default ../shared/data/UTKFace)
# Stages can be skipped: SKIP_TRAIN=1 reuses runs/default-cpu, SKIP_SWEEPS=1 skips the sweeps.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/UTKFace}
AG=.venv/bin/agegender
CACHE=cache/utk128

# 1. Prepare once: 128 px gray, content-hash split 70/10/20 (split seed 1: the bundled model's).
$AG prepare "$DATA" --out $CACHE --seed 1 --quiet

# 2. The default recipe on train+val (the bundled model), 40 epochs; test stays held out.
#    On this project's 2-core CPU (bf16 autocast, 2 threads) it took about 85 minutes.
if [ -z "${SKIP_TRAIN:-}" ]; then
  $AG train configs/default.toml data.cache=$CACHE data.train_splits=train,val \
    run.out=runs/default-cpu train.threads=2
fi
.venv/bin/python tools/bundle_model.py runs/default-cpu --cache $CACHE

# 3. Evaluation of the bundled model on the test split (fp32 on CPU, as `predict` runs it).
$AG evaluate default --data $CACHE --split test --amp off --out reports/default --quiet  # add --no-timing on a busy machine
$AG show default --data $CACHE --split test --out reports/default/grid.png
cp runs/default-cpu/curves.png runs/default-cpu/history.csv reports/default/

# 4. The study's tables, REDUCED for a CPU: 1,000 training images, 2 epochs, 96 px
#    (seed-cnn-5conv needs >= 94 px); every run is tested on the full test split.
if [ -z "${SKIP_SWEEPS:-}" ]; then
  for s in optimizer learning_rate batch_size architecture regularization loss_weights; do
    $AG sweep sweeps/$s.toml --data $CACHE --limit 1000 --epochs 2 --set data.size=96 \
      --parallel 2 --out runs/sweep-cpu/$s --quiet
  done
  $AG sweep sweeps/ours.toml --data $CACHE --root "$DATA" --limit 1000 --epochs 2 \
    --parallel 2 --out runs/sweep-cpu/ours --quiet
  mkdir -p reports/sweeps-cpu
  for s in runs/sweep-cpu/*/; do cp "$s/results.md" "reports/sweeps-cpu/$(basename "$s").md"; done
fi
.venv/bin/python tools/make_report.py
