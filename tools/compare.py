#!/usr/bin/env python3
"""Every CPU speed comparison of beitv2 against its peers, interleaved, on this machine.

    python3 tools/compare.py [--arch beitv2_base_patch16_224] [--rounds 2] [--isa avx2]
                             [--small recipes/fashion-mnist-beit-tiny.json] [--out docs/perf-run.md]

Needs `pip install -r tools/requirements.txt onnxruntime onnx` and a release build
(`cargo build --release`; the script builds it when missing).

Systems, each at batch 1 and 8 with random weights and all cores:
- beitv2 at fp32, int8 and bf16 (`beitv2 bench --dtype …`, with `--isa` when given);
- timm eager fp32 (`tools/bench_timm.py`);
- onnxruntime fp32 on timm's ONNX export (opset 17, dynamic batch), and onnxruntime dynamic
  int8 on the same export (`quantize_dynamic`, QInt8 weights), both made by this script;
- the training step (forward + loss + backward + AdamW) of the base model at batch 8 and of the
  small model (`--small`, batch 128), beitv2 (`bench --train-step`) against timm
  (`tools/bench_torch_extra.py train-step`).

Rounds are interleaved (every system once, then again), so that a machine that slows down
mid-run slows everyone alike; each figure is the best round. The script prints the CPU model,
the ISA level beitv2 ran at, and a Markdown table, which `--out` also writes.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, 'target', 'release', 'beitv2')


def cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def json_lines(cmd, env=None):
    """Runs `cmd` and returns the JSON objects it printed, one per stdout line."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **(env or {})})
    rows = []
    for line in out.stdout.splitlines():
        line = line.strip()
        if line.startswith('{'):
            rows.append(json.loads(line))
    if not rows:
        raise RuntimeError(f'{cmd[0]} printed no JSON: {out.stderr[-2000:]}')
    return rows


def ours_infer(arch, dtype, batches, isa, iters):
    cmd = [BIN, 'bench', '--arch', arch, '--dtype', dtype, '--json', '--warmup', '2',
           '--iters', str(iters), '--agreement-images', '0', '--batch-size', *map(str, batches)]
    if isa:
        cmd += ['--isa', isa]
    return {r['batch_size']: (r['images_per_s'], r['system']) for r in json_lines(cmd)}


def timm_infer(arch, batches, threads, iters):
    cmd = [sys.executable, 'tools/bench_timm.py', '--arch', arch, '--json', '--warmup', '2',
           '--iters', str(iters), '--threads', str(threads), '--batch-size', *map(str, batches)]
    return {r['batch_size']: r['images_per_s'] for r in json_lines(cmd)}


def export_onnx(arch, workdir):
    """timm's model exported to ONNX (fp32) and its dynamic-int8 quantisation."""
    import timm
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False).eval()
    size = model.pretrained_cfg.get('input_size', (3, 224, 224))
    x = torch.randn(1, *size)
    fp32 = os.path.join(workdir, f'{arch}.onnx')
    torch.onnx.export(model, (x,), fp32, opset_version=17, input_names=['x'],
                      output_names=['logits'], dynamic_axes={'x': {0: 'b'}, 'logits': {0: 'b'}},
                      dynamo=False)
    int8 = os.path.join(workdir, f'{arch}.int8.onnx')
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
    return fp32, int8, size


def ort_infer(path, size, batches, threads, iters):
    import numpy as np
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
    result = {}
    for b in batches:
        x = np.random.default_rng(0).standard_normal((b, *size), dtype=np.float32)
        for _ in range(2):
            sess.run(None, {'x': x})
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            sess.run(None, {'x': x})
            times.append(time.perf_counter() - t0)
        times.sort()
        result[b] = b / times[len(times) // 2]
    return result


def ours_train(arch, batch, iters):
    cmd = [BIN, 'bench', '--train-step', '--arch', arch, '--batch-size', str(batch), '--json',
           '--warmup', '1', '--iters', str(iters)]
    return json_lines(cmd)[0]['median_s']


def torch_train(arch, batch, threads, iters):
    cmd = [sys.executable, 'tools/bench_torch_extra.py', 'train-step', '--arch', arch,
           '--batch-size', str(batch), '--warmup', '1', '--iters', str(iters),
           '--threads', str(threads)]
    rows = [r for r in json_lines(cmd) if r.get('what') == 'train_step']
    return rows[0]['median_s']


def best(values, higher=True):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return max(values) if higher else min(values)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--arch', default='beitv2_base_patch16_224')
    ap.add_argument('--small', default='recipes/fashion-mnist-beit-tiny.json',
                    help='model config JSON of the small training-step model')
    ap.add_argument('--small-batch', type=int, default=128)
    ap.add_argument('--batch-size', type=int, nargs='+', default=[1, 8])
    ap.add_argument('--rounds', type=int, default=2)
    ap.add_argument('--iters', type=int, default=10)
    ap.add_argument('--train-iters', type=int, default=3)
    ap.add_argument('--isa', default=None, help='cap beitv2 at this ISA level (bench --isa)')
    ap.add_argument('--no-train', action='store_true', help='inference only')
    ap.add_argument('--out', default=None, help='also write the Markdown table here')
    args = ap.parse_args()
    threads = os.cpu_count()
    if not os.path.exists(BIN):
        subprocess.run(['cargo', 'build', '--release', '--quiet'], check=True, cwd=ROOT)
    batches = args.batch_size

    with tempfile.TemporaryDirectory() as work:
        print(f'exporting {args.arch} to ONNX …', file=sys.stderr)
        fp32, int8, size = export_onnx(args.arch, work)
        infer = {}   # system -> batch -> [images/s per round]
        train = {}   # (what, system) -> [s per round]
        level = None
        for r in range(args.rounds):
            print(f'round {r + 1}/{args.rounds}', file=sys.stderr)
            for dtype in ['f32', 'int8', 'bf16']:
                got = ours_infer(args.arch, dtype, batches, args.isa, args.iters)
                for b, (ips, system) in got.items():
                    level = system.split('@')[-1] if '@' in system else level
                    infer.setdefault(f'beitv2 {dtype}', {}).setdefault(b, []).append(ips)
            for b, ips in timm_infer(args.arch, batches, threads, args.iters).items():
                infer.setdefault('timm eager fp32', {}).setdefault(b, []).append(ips)
            for name, path in [('onnxruntime fp32', fp32), ('onnxruntime dynamic int8', int8)]:
                for b, ips in ort_infer(path, size, batches, threads, args.iters).items():
                    infer.setdefault(name, {}).setdefault(b, []).append(ips)
            if not args.no_train:
                for what, arch, batch in [(f'{args.arch}, batch 8', args.arch, 8),
                                          (f'{os.path.basename(args.small)}, batch {args.small_batch}',
                                           args.small, args.small_batch)]:
                    train.setdefault((what, 'beitv2'), []).append(
                        ours_train(arch, batch, args.train_iters))
                    train.setdefault((what, 'timm'), []).append(
                        torch_train(arch, batch, threads, args.train_iters))

    import torch
    head = (f'CPU: {cpu_model()}, {threads} threads; beitv2 ISA level: {level}'
            f'{" (capped by --isa)" if args.isa else ""}; torch {torch.__version__}, '
            f'onnxruntime {__import__("onnxruntime").__version__}; best of {args.rounds} '
            f'interleaved rounds, {time.strftime("%Y-%m-%d")}')
    lines = [head, '', '| system | ' + ' | '.join(f'batch {b} (images/s)' for b in batches) + ' |',
             '|---|' + '---|' * len(batches)]
    order = ['timm eager fp32', 'onnxruntime fp32', 'onnxruntime dynamic int8',
             'beitv2 f32', 'beitv2 int8', 'beitv2 bf16']
    for name in order:
        cells = [f'{best(infer[name][b]):.2f}' for b in batches]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    ratios = []
    for ours, peer in [('beitv2 f32', 'onnxruntime fp32'),
                       ('beitv2 int8', 'onnxruntime dynamic int8'),
                       ('beitv2 bf16', 'beitv2 f32')]:
        r = [best(infer[ours][b]) / best(infer[peer][b]) for b in batches]
        ratios.append(f'{ours} / {peer}: ' + ', '.join(f'{x:.2f}x' for x in r))
    lines += [''] + [f'- {r}' for r in ratios]
    if train:
        lines += ['', '| training step (s/step) | timm | beitv2 | beitv2 speed vs timm |',
                  '|---|---|---|---|']
        for what in dict.fromkeys(w for w, _ in train):
            t, o = best(train[(what, 'timm')], False), best(train[(what, 'beitv2')], False)
            lines.append(f'| {what} | {t:.3f} | {o:.3f} | {t / o:.2f}x |')
    text = '\n'.join(lines) + '\n'
    print(text)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(text)


if __name__ == '__main__':
    main()
