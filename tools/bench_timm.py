#!/usr/bin/env python3
"""timm counterpart of `beitv2 bench`: CPU fp32 inference throughput of a random-weight timm model.

    python tools/bench_timm.py --arch beitv2_base_patch16_224 --batch-size 1 8 32 \
        --warmup 3 --iters 10 --threads 8 [--json] [--compile]

For every batch size: `--warmup` untimed forward passes, then `--iters` timed ones
(time.perf_counter around each forward under torch.inference_mode()). Reported: median and
mean seconds per batch, images/s = batch / median, and peak RSS (resource.getrusage
ru_maxrss: the peak of the whole process so far, so it never decreases across batch sizes and
includes torch/timm import overhead).

--json prints one JSON object per batch size with keys
  system, arch, batch_size, images_per_s, median_s, mean_s, peak_rss_mb, threads, compile, iters, warmup, torch, timm.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time


def peak_rss_mb():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS reports bytes
    return r / (1024 * 1024) if sys.platform == 'darwin' else r / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--arch', default='beitv2_base_patch16_224')
    ap.add_argument('--batch-size', type=int, nargs='+', default=[1, 8, 32])
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--iters', type=int, default=10)
    ap.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch default)')
    ap.add_argument('--img-size', type=int, default=None, help='input size (default: the model default cfg)')
    ap.add_argument('--compile', action='store_true', help='torch.compile the model first')
    ap.add_argument('--fused-attn', choices=('default', 'on', 'off'), default='default',
                    help="timm fused attention (F.scaled_dot_product_attention); 'default' leaves timm's choice")
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--json', action='store_true', help='print JSON lines instead of a table')
    args = ap.parse_args()

    if args.fused_attn != 'default':
        os.environ['TIMM_FUSED_ATTN'] = '1' if args.fused_attn == 'on' else '0'
    import torch
    import timm

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = timm.create_model(args.arch, pretrained=False).eval()
    if args.compile:
        model = torch.compile(model)
    cfg = model.pretrained_cfg if hasattr(model, 'pretrained_cfg') else {}
    _, h, w = cfg.get('input_size', (3, 224, 224))
    if args.img_size:
        h = w = args.img_size

    system = (f'timm {timm.__version__} / torch {torch.__version__} / {platform.machine()} '
              f'{torch.get_num_threads()} threads' + (' / compile' if args.compile else ''))
    rows = []
    for bs in args.batch_size:
        x = torch.randn(bs, 3, h, w, dtype=torch.float32)
        times = []
        with torch.inference_mode():
            for _ in range(args.warmup):
                model(x)
            for _ in range(args.iters):
                t0 = time.perf_counter()
                out = model(x)
                times.append(time.perf_counter() - t0)
        assert out.shape[0] == bs
        med = statistics.median(times)
        row = dict(system=system, arch=args.arch, batch_size=bs, images_per_s=bs / med, median_s=med,
                   mean_s=statistics.fmean(times), peak_rss_mb=peak_rss_mb(), threads=torch.get_num_threads(),
                   compile=args.compile, iters=args.iters, warmup=args.warmup,
                   torch=torch.__version__, timm=timm.__version__)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)

    if not args.json:
        print(f'# {system}; input {h}x{w}; warmup {args.warmup}, iters {args.iters}')
        print('# peak RSS is process-wide (ru_maxrss), monotone across rows')
        print(f'{"arch":<28} {"batch":>5} {"median s":>10} {"mean s":>10} {"img/s":>10} {"peak RSS MB":>12}')
        for r in rows:
            print(f'{r["arch"]:<28} {r["batch_size"]:>5} {r["median_s"]:>10.4f} {r["mean_s"]:>10.4f} '
                  f'{r["images_per_s"]:>10.2f} {r["peak_rss_mb"]:>12.1f}')


if __name__ == '__main__':
    main()
