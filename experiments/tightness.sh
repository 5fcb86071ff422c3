#!/usr/bin/env bash
# docs/tightness.md: the analytic and linearized expected logits against Monte Carlo for LeNet
# trained clean and with the regularizer on full MNIST (trained first if absent).
# Usage: experiments/tightness.sh MNIST_DIR [RUNS_DIR]
set -euo pipefail
data=${1:?usage: $0 MNIST_DIR [RUNS_DIR]}
runs=${2:-runs/attack-table}
"$(dirname "$0")/lenet-mnist-runs.sh" "$data" "$runs"
momentreg tightness "$runs/clean" "$runs/moment" --sigmas 0.1,0.25,0.5,1.0 --limit 50 \
  --mc-samples 1000 --report docs/tightness.md --quiet
