#!/usr/bin/env bash
# The offline end-to-end demo (README's main job): train a small BEiT from
# scratch on Fashion-MNIST, evaluate it, linear-probe its frozen features,
# and classify a few bundled test images. Installs the Debian dataset
# package when missing. Extra arguments are passed to `finetune` as recipe
# overrides, e.g. `scripts/fashion_mnist_demo.sh --set schedule.epochs=2`.
set -euo pipefail
cd "$(dirname "$0")/.."
data=/usr/share/datasets/fashion-mnist
if [ ! -f "$data/train-images-idx3-ubyte.gz" ]; then
    echo "installing Debian's dataset-fashion-mnist (needs apt and root)"
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    $sudo_cmd apt-get install -y -qq dataset-fashion-mnist
fi
cargo build --release --quiet
bin=./target/release/beitv2
out=runs/fashion-mnist
$bin finetune --recipe recipes/fashion-mnist.toml --set run.output="\"$out\"" "$@"
$bin eval --weights $out/model-best.safetensors --data fashion-mnist:test
$bin linprobe --recipe recipes/fashion-mnist.toml --weights $out/model-best.safetensors \
    --set run.output="\"$out-linprobe\"" --set schedule.epochs=2 --set schedule.warmup_epochs=0 \
    --set optim.lr=1e-2 --set optim.weight_decay=1e-4 --set model.drop_path_rate=0.0
$bin classify --weights $out/model-best.safetensors --labels assets/fashion-mnist/classes.txt \
    --top-k 3 assets/fashion-mnist
$bin train-tokenizer --recipe recipes/fashion-mnist-tokenizer.toml \
    --set teacher.weights="\"$out/model-best.safetensors\"" --set run.output="\"$out-tokenizer\""
$bin tokenize --tokenizer $out-tokenizer/tokenizer-last.safetensors --stats \
    --stats-plot $out-tokenizer/usage.png assets/fashion-mnist | tail -n 1 | cut -c1-200
echo "curves: $out/curves.png, $out-linprobe/curves.png, $out-tokenizer/curves.png; metrics: $out/metrics.jsonl"
