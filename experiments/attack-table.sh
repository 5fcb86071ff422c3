#!/usr/bin/env bash
# The README's attack table: LeNet on full MNIST, clean vs moment, 3 epochs each (Adam 1e-3,
# batch 128), then all six attacks on the first 40 test images, then the Table 1 layout.
# Usage: experiments/attack-table.sh MNIST_DIR [RUNS_DIR]   (about 7 minutes on 2 CPU cores)
set -euo pipefail
data=${1:?usage: $0 MNIST_DIR [RUNS_DIR]}
runs=${2:-runs/attack-table}
"$(dirname "$0")/lenet-mnist-runs.sh" "$data" "$runs"
for run in clean moment; do
  momentreg evaluate "$runs/$run" --attacks all --limit 40 --quiet
done
momentreg table "$runs/clean" "$runs/moment" --out docs/results/attack-table
for run in clean moment; do
  mkdir -p "docs/results/attack-table/$run"
  cp "$runs/$run"/{config,metrics,attacks}.json "docs/results/attack-table/$run/"
done
