#!/usr/bin/env bash
# Runs the extra CPU benchmarks of `beitv2` and their PyTorch/timm/Pillow counterparts
# (tools/bench_torch_extra.py) back to back on this machine, with the same weights file,
# images and step counts, so the figures can be put side by side:
#
#   startup     process start -> first prediction; both sides wrapped in
#               /usr/bin/time -f '%e s %M KB' (wall seconds, max RSS), measured the same
#               way from outside; the Python side also prints its own breakdown as JSON
#   preprocess  decode + resize + center crop + normalise throughput (ours with 1 and 2
#               threads, Pillow single process single thread)
#   train-step  forward + cross-entropy + backward + AdamW step, batch 8
#
# Usage: tools/bench_extra.sh [startup] [preprocess] [train-step]   (default: all three)
# Environment: PYTHON (default python3; needs tools/requirements.txt), ARCH (default
# beitv2_base_patch16_224), REPEAT (preprocess repeats, default 20), STARTUP_RUNS (default 3),
# BUILD=0 to skip `cargo build --release`.
# The random weights (runs/bench/$ARCH-random.safetensors, gitignored) are written once by
# `bench_torch_extra.py make-weights` when missing; both systems load that file.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
arch=${ARCH:-beitv2_base_patch16_224}
repeat=${REPEAT:-20}
startup_runs=${STARTUP_RUNS:-3}
threads=$(nproc)
bin=./target/release/beitv2
outdir=runs/bench
weights=$outdir/$arch-random.safetensors
img=assets/photos/chelsea.png
images=(assets/photos/chelsea.png assets/photos/coffee.png assets/photos/astronaut.png assets/photos/rocket.png)

what=("$@")
[[ ${#what[@]} -gt 0 ]] || what=(startup preprocess train-step)
for w in "${what[@]}"; do
    case $w in startup | preprocess | train-step) ;; *) echo "unknown benchmark: $w" >&2; exit 2 ;; esac
done
wants() { [[ " ${what[*]} " == *" $1 "* ]]; }

if [[ ! -x /usr/bin/time ]]; then
    echo "/usr/bin/time is missing (Debian/Ubuntu: apt-get install -y time)" >&2
    exit 1
fi
if [[ ${BUILD:-1} != 0 ]]; then
    cargo build --release --quiet
fi
mkdir -p "$outdir"
if [[ ! -f $weights ]]; then
    echo "== writing random weights $weights"
    "$python" tools/bench_torch_extra.py make-weights --arch "$arch" --out "$weights"
fi

if wants startup; then
    for ((i = 1; i <= startup_runs; i++)); do
        echo "== startup $i/$startup_runs: beitv2 (candle, $threads threads)"
        /usr/bin/time -f '%e s %M KB' "$bin" classify --weights "$weights" --arch "$arch" "$img"
        echo "== startup $i/$startup_runs: timm (PyTorch eager, $threads threads)"
        /usr/bin/time -f '%e s %M KB' "$python" tools/bench_torch_extra.py startup \
            --weights "$weights" --image "$img" --arch "$arch" --threads "$threads"
    done
fi

if wants preprocess; then
    echo "== preprocess: beitv2, 1 thread"
    "$bin" bench --preprocess "${images[@]}" --repeat "$repeat" --threads 1 --json
    echo "== preprocess: beitv2, 2 threads"
    "$bin" bench --preprocess "${images[@]}" --repeat "$repeat" --threads 2 --json
    echo "== preprocess: Pillow, 1 process 1 thread"
    "$python" tools/bench_torch_extra.py preprocess --images "${images[@]}" --repeat "$repeat" \
        --threads 1 --size 224 --crop-pct 0.9
fi

if wants train-step; then
    echo "== train step: beitv2 (candle, $threads threads)"
    "$bin" bench --train-step --batch-size 8 --warmup 2 --iters 5 --json
    echo "== train step: timm (PyTorch eager, $threads threads)"
    "$python" tools/bench_torch_extra.py train-step --arch "$arch" --batch-size 8 --warmup 2 \
        --iters 5 --threads "$threads"
fi
