#!/usr/bin/env bash
# LeNet on full MNIST, clean and with the regularizer (sigma 1, alpha 1), 3 epochs of Adam 1e-3,
# batch 128: the two runs behind the README's attack table and docs/tightness.md. A finished run
# is not trained again (--resume). The moment run keeps the noise level from its first step
# (--sigma-warmup 0): the committed tables predate the warm-up, and so the same seeded run
# rebuilds the same model, with the compiled ReLU-mean kernels (a C++ compiler on PATH; the
# eager ones, MOMENTREG_COMPILE=0, differ in the last bits, and after 3 epochs in the model).
# Usage: experiments/lenet-mnist-runs.sh MNIST_DIR RUNS_DIR
set -euo pipefail
data=${1:?usage: $0 MNIST_DIR RUNS_DIR}
runs=${2:?usage: $0 MNIST_DIR RUNS_DIR}
common=(--model lenet --dataset mnist --data-dir "$data" --epochs 3 --lr 1e-3 --batch-size 128 --quiet)
momentreg train "${common[@]}" --method clean --out "$runs/clean" --resume
momentreg train "${common[@]}" --method moment --sigma 1.0 --alpha 1.0 --sigma-warmup 0 --out "$runs/moment" --resume
