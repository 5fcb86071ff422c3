#!/usr/bin/env bash
# One prepared device call of the paper's CIFAR grid: one model on one data set, to the protocol's
# end or to a deadline, and what finished comes back in at most 4 files under $OUT.
#
#   experiments/gpu/cifar.sh TASK [--benchmarks] [--workers K] [--deadline SECONDS]
#   experiments/gpu/cifar.sh TASK --smoke        # the same steps on the CPU: experiments/gpu/
#                                                # smoke.toml's tiny grid, a few images
#
# TASK: cifar10-lenet | cifar10-alexnet | cifar100-lenet | cifar100-alexnet (the specs
# experiments/<TASK>.toml). The data travel as pieces made here by
#   python scripts/gpu_data.py pack .data/cifar10 .gpu-data/cifar10
# and carried (.gpu-data/<set>/...: every piece, in this call or an earlier one on the same warm
# machine). GPU_DATA, GPU_PIECES and GPU_RUNS move .data, .gpu-data and runs/gpu (the tests do).
# Steps:
#   1. unpack the data set into .data/<set> (unless an earlier call did);
#   2. with --benchmarks: python -m benchmarks --device cuda --quick (at most 90 s), into
#      $OUT/results-cuda.json;
#   3. momentreg sweep of the task's spec on the GPU, K runs at once (the executor is chosen
#      from benchmarks/gpu.py's numbers), killed at the deadline: a finished run keeps
#      its metrics, an unfinished one is lost with the machine and trains again in a later call
#      (runs given back earlier are put in place first, from .gpu-runs/<TASK>.tar.gz, so the
#      sweep skips them);
#   4. on CIFAR-10, if two minutes are left, the attacks and certification of the fair-comparison
#      winners (experiments/cifar.py --stages evaluate);
#   5. $OUT/<TASK>.tar.gz (every run's config, metrics, history, attacks, certificates; no
#      checkpoints) and $OUT/<TASK>.log.
set -euo pipefail
cd "$(dirname "$0")/../.."

task="${1:?usage: experiments/gpu/cifar.sh TASK [--smoke] [--benchmarks] [--workers K] [--deadline S]}"
shift
smoke=0 benchmarks=0 workers=18 deadline=420
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) smoke=1 ;;
        --benchmarks) benchmarks=1 ;;
        --workers) workers="$2"; shift ;;
        --deadline) deadline="$2"; shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
case "$task" in
    cifar10-lenet|cifar10-alexnet|cifar100-lenet|cifar100-alexnet) ;;
    *) echo "unknown task $task" >&2; exit 2 ;;
esac
set_name="${task%%-*}"
out="${OUT:-runs/gpu-out}"
data="${GPU_DATA:-.data}" pieces="${GPU_PIECES:-.gpu-data}" runs_root="${GPU_RUNS:-runs/gpu}"
mkdir -p "$out"
log="$out/$task.log"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src:$PWD/experiments${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MOMENTREG_CACHE_DIR="${MOMENTREG_CACHE_DIR:-$PWD/.data/cache}"
start=$(date +%s)
device=cuda
spec="experiments/$task.toml" settings=()
if [ "$smoke" = 1 ]; then  # the same steps on the CPU: a tiny grid, one epoch of a few images
    device=cpu workers=2 deadline=600 spec=experiments/gpu/smoke.toml
    export MOMENTREG_COMPILE=0
    settings=(--set "model=${task#*-}" --set epochs=1 --set train_limit=40 --set gnr_limit=8
              --set batch_size=20)
fi

{
    echo "task $task on $device, $workers runs at once, deadline ${deadline}s"
    if [ ! -d "$data/$set_name/train" ]; then
        "$python" scripts/gpu_data.py unpack "$pieces/$set_name" "$data/$set_name"
    fi
    if [ "$benchmarks" = 1 ] && [ "$smoke" = 0 ]; then
        timeout 90 "$python" -m benchmarks --device cuda --quick --json "$out/results-cuda.json" \
            || echo "benchmarks: stopped at 90 s or failed ($?)"
    fi
    runs="$runs_root/$task"
    mkdir -p "$runs"
    if [ -f ".gpu-runs/$task.tar.gz" ]; then  # runs an earlier call gave back: the sweep skips them
        mkdir -p "$runs/runs" && tar -xzf ".gpu-runs/$task.tar.gz" -C "$runs/runs"
    fi
    left=$(( deadline - ($(date +%s) - start) ))
    timeout --signal=INT "$left" "$python" -m momentreg sweep "$spec" \
        --out "$runs" --workers "$workers" --set "data_dir=$data/$set_name" \
        --set "device=$device" "${settings[@]}" --quiet \
        || echo "sweep: ended by the deadline or with failed runs ($?)"
    "$python" -m momentreg sweep status "$runs" || true
    left=$(( deadline - ($(date +%s) - start) ))
    if [ "$set_name" = cifar10 ] && { [ "$left" -gt 120 ] || [ "$smoke" = 1 ]; }; then
        limit=(--attack-images 400 --certify-images 500)
        [ "$smoke" = 1 ] && limit=(--attack-images 4 --lbfgs-images 2 --certify-images 2 \
            --certify-n 100)
        timeout "$left" "$python" experiments/cifar.py --stages evaluate --runs "$runs_root" \
            --device "$device" "${limit[@]}" || echo "evaluate: stopped or failed ($?)"
    fi
} 2>&1 | tee "$log"

# what finished, small files only (checkpoints never travel back)
tar -czf "$out/$task.tar.gz" -C "$runs_root/$task/runs" --exclude='*.pt' --exclude='.lock' .
echo "wrote $out/$task.tar.gz ($(du -h "$out/$task.tar.gz" | cut -f1)) and $log"
