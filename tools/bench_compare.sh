#!/usr/bin/env bash
# Runs `beitv2 bench` and its timm counterpart back to back on this machine, same
# architecture, batch sizes and iteration counts, so the figures are comparable.
# Usage: tools/bench_compare.sh [ARCH] [BATCH...]   (needs: pip install -r tools/requirements.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:-beitv2_base_patch16_224}
shift || true
batches=${*:-1 8}
python=${PYTHON:-python3}
threads=$(nproc)
cargo build --release --quiet
echo "== beitv2 (candle, fp32, $threads threads)"
./target/release/beitv2 bench --arch "$arch" --batch-size $batches --warmup 3 --iters 10
echo "== timm (PyTorch eager, fp32, $threads threads)"
"$python" tools/bench_timm.py --arch "$arch" --batch-size $batches --warmup 3 --iters 10 --threads "$threads"
