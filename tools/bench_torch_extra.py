#!/usr/bin/env python3
"""PyTorch / timm / Pillow counterparts of the extra `beitv2` CPU benchmarks.

Every subcommand prints one JSON object per line on stdout (anything else goes to
stderr), so tools/bench_extra.sh can put the figures next to ours. Every subcommand calls
torch.set_num_threads(--threads) (default os.cpu_count(); 1 for `preprocess`).

  make-weights --arch A --out W.safetensors
      Random-weight timm model (torch.manual_seed(0), pretrained=False), its state dict
      written with safetensors.torch.save_file (contiguous tensors, metadata
      {"format": "pt"}). This is the file both systems load in `startup`.
      Keys: system, what="make_weights", arch, out, tensors, bytes, seconds.

  startup --weights W.safetensors --image IMG [--arch beitv2_base_patch16_224]
          [--threads N] [--t0-ns NS]
      What a timm user pays from process start to the first prediction:
        interp_s        process start -> first line of this script (Python interpreter start)
        import_s        import torch, timm, PIL (and safetensors.torch, which timm already pulls in)
        build_s         timm.create_model(arch, pretrained=False) + safetensors.torch.load_file
                        + load_state_dict(strict=True) + eval()
        preprocess_s    timm.data.resolve_data_config + create_transform (eval: resize shorter
                        side bicubic to floor(224/crop_pct), center crop 224, to tensor,
                        normalize with the model's pretrained_cfg mean/std), Image.open +
                        convert('RGB'), applying the transform
        first_forward_s first forward pass under torch.inference_mode() + softmax + top-1
        total_s         process start -> top-1 printed (on stderr)
        peak_rss_mb     resource.getrusage(RUSAGE_SELF).ru_maxrss / 1024
      "Process start" is, in this order of preference: --t0-ns (a time.time_ns() /
      `date +%s%N` wall-clock stamp taken by the caller), the process start time from
      /proc/self/stat (starttime vs CLOCK_BOOTTIME; 10 ms resolution on Linux), or
      time.time_ns() taken on the first line of this script (then interp_s is 0).
      t0_source in the JSON says which one was used.
      Keys: system, what="startup", arch, threads, t0_source, interp_s, import_s, build_s,
      preprocess_s, first_forward_s, total_s, peak_rss_mb, top1_index, top1_prob.

  preprocess --images IMG [IMG...] --repeat R [--threads 1] [--size 224] [--crop-pct 0.9]
      Pillow throughput, single process, single thread ("per core"). For every repeat and
      every image (read from its path each time; one untimed pass first warms the page
      cache), timed separately:
        decode    Image.open(path).convert('RGB') (convert forces the decode, as in timm's loader)
        resize    shorter side to floor(size/crop_pct), longer side int(that * long/short)
                  (torchvision's rule), Image.BICUBIC
        crop_norm center crop size x size (offsets round((d - size)/2), as torchvision),
                  np.asarray -> float32, x/255 normalised with ImageNet mean/std
                  (--mean/--std), transposed to a contiguous CHW float32 array
      images_per_s = images * repeat / (decode_s + resize_s + crop_norm_s).
      Keys: system, what="preprocess", images, repeat, images_per_s, decode_s, resize_s,
      crop_norm_s, size, resize_short, threads.

  train-step --arch beitv2_base_patch16_224|CONFIG.json --batch-size 8 --warmup 2 --iters 5 [--threads N]
      timm model (pretrained=False, drop_path_rate=0.1) in train() mode; one step =
      zero_grad(set_to_none) + forward + F.cross_entropy + backward + torch.optim.AdamW step
      (lr 1e-3, weight_decay 0.05). Input: one fixed random batch (torch.randn) and random
      labels (torch.randint), seed 0. --warmup untimed steps, then --iters steps timed with
      time.perf_counter. images_per_s = batch_size / median_s.
      Keys: system, what="train_step", arch, batch_size, median_s, mean_s, images_per_s,
      peak_rss_mb, threads, warmup, iters, final_loss.

  pretrain-step --batch-size 8 --warmup 2 --iters 5 [--threads N]
      One BEiT v2 MIM pretraining step, the counterpart of `beitv2 bench --pretrain-step`:
      the unilm VisionTransformerForMaskedImageModelingCLS port of
      tools/make_pretrain_fixtures.py (base: 12 blocks, early layer 9, 2 neck blocks, 8192
      codes, layer scale 0.1; timm's fused attention on), a random-weight VQ-KD encoder of
      vqkd_encoder_base_decoder_3x768x12_clip's shapes (timm Beit with absolute position
      embedding, no layer scale, fc_norm per token, Linear-Tanh-Linear to 32-d, nearest of a
      unit-norm 8192x32 codebook) under torch.no_grad for the targets, block-wise masks (75 of
      196), CE on both branches, backward, clip_grad_norm_(3.0), AdamW (lr 1.5e-3, betas
      (0.9, 0.98), weight decay 0.05 with unilm's groups). Keys: system, what="pretrain_step",
      batch_size, median_s, images_per_s, tokenizer_s, forward_s, backward_s, optimizer_s,
      peak_rss_mb, threads.

Examples:
  python tools/bench_torch_extra.py make-weights --arch beitv2_base_patch16_224 \\
      --out runs/bench/beitv2_base_patch16_224.safetensors
  /usr/bin/time -f '%e s %M KB' python tools/bench_torch_extra.py startup \\
      --weights runs/bench/beitv2_base_patch16_224.safetensors --image assets/photos/chelsea.png
  python tools/bench_torch_extra.py preprocess --images assets/photos/*.png --repeat 20
  python tools/bench_torch_extra.py train-step --batch-size 8 --warmup 2 --iters 5
"""
import time

T_SCRIPT_NS = time.time_ns()  # before any other import

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def peak_rss_mb():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return r / (1024 * 1024) if sys.platform == 'darwin' else r / 1024


def emit(row):
    print(json.dumps(row), flush=True)


def process_start_ns(t0_ns):
    """Wall-clock ns of process start and where it came from."""
    if t0_ns is not None:
        return t0_ns, 'caller'
    try:
        with open('/proc/self/stat', 'rb') as f:
            stat = f.read()
        # fields after "(comm)" start at field 3 (state); starttime is field 22
        start_ticks = int(stat[stat.rindex(b')') + 2:].split()[19])
        age_s = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf('SC_CLK_TCK')
        now_ns = time.time_ns()
        t0 = now_ns - int(age_s * 1e9)
        if 0 <= age_s < 600 and t0 <= T_SCRIPT_NS:
            return t0, 'proc'
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    return T_SCRIPT_NS, 'script'


def torch_system(torch, timm):
    return (f'timm {timm.__version__} / torch {torch.__version__} / {platform.machine()} '
            f'{torch.get_num_threads()} threads')


# ---------------------------------------------------------------------------------------
def cmd_make_weights(args):
    import torch
    import timm
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads or os.cpu_count())
    t = time.perf_counter()
    torch.manual_seed(0)
    model = timm.create_model(args.arch, pretrained=False)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(sd, args.out, metadata={'format': 'pt'})
    emit(dict(system=torch_system(torch, timm), what='make_weights', arch=args.arch, out=args.out,
              tensors=len(sd), bytes=os.path.getsize(args.out), seconds=time.perf_counter() - t))


# ---------------------------------------------------------------------------------------
def cmd_startup(args):
    t0_ns, t0_source = process_start_ns(args.t0_ns)

    t = time.perf_counter()
    import torch
    import timm
    import timm.data
    from PIL import Image
    import safetensors.torch
    import_s = time.perf_counter() - t

    torch.set_num_threads(args.threads or os.cpu_count())

    t = time.perf_counter()
    model = timm.create_model(args.arch, pretrained=False)
    sd = safetensors.torch.load_file(args.weights)
    model.load_state_dict(sd, strict=True)
    model.eval()
    del sd
    build_s = time.perf_counter() - t

    t = time.perf_counter()
    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg)
    img = Image.open(args.image).convert('RGB')
    x = transform(img).unsqueeze(0)
    preprocess_s = time.perf_counter() - t

    t = time.perf_counter()
    with torch.inference_mode():
        prob = model(x).softmax(-1)
        p, idx = prob[0].max(-1)
    p, idx = float(p), int(idx)
    first_forward_s = time.perf_counter() - t

    print(f'top-1: class {idx} p={p:.4f}  ({args.image})', file=sys.stderr, flush=True)
    total_s = (time.time_ns() - t0_ns) / 1e9

    emit(dict(system=torch_system(torch, timm), what='startup', arch=args.arch,
              threads=torch.get_num_threads(), t0_source=t0_source,
              interp_s=(T_SCRIPT_NS - t0_ns) / 1e9, import_s=import_s, build_s=build_s,
              preprocess_s=preprocess_s, first_forward_s=first_forward_s, total_s=total_s,
              peak_rss_mb=peak_rss_mb(), top1_index=idx, top1_prob=p,
              input_size=list(x.shape), crop_pct=cfg.get('crop_pct'),
              interpolation=cfg.get('interpolation'), mean=list(cfg['mean']), std=list(cfg['std'])))


# ---------------------------------------------------------------------------------------
def cmd_preprocess(args):
    import numpy as np
    import PIL
    from PIL import Image
    import torch  # only so that the thread count is pinned like in the other subcommands

    torch.set_num_threads(args.threads or 1)

    size = args.size
    resize_short = int(size / args.crop_pct)  # floor, as timm's eval transform
    mean = np.asarray(args.mean, dtype=np.float32)
    std = np.asarray(args.std, dtype=np.float32)
    scale = (1.0 / (255.0 * std)).astype(np.float32)  # (x/255 - mean)/std == x*scale + bias
    bias = (-mean / std).astype(np.float32)

    def decode(path):
        return Image.open(path).convert('RGB')

    def resize(img):
        w, h = img.size
        if w <= h:
            nw, nh = resize_short, int(resize_short * h / w)
        else:
            nw, nh = int(resize_short * w / h), resize_short
        return img.resize((nw, nh), Image.BICUBIC)

    def crop_norm(img):
        w, h = img.size
        left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
        a = np.asarray(img, dtype=np.float32)  # HWC
        a = a * scale + bias
        return np.ascontiguousarray(a.transpose(2, 0, 1))  # CHW float32

    for path in args.images:  # untimed pass: page cache, lazy imports of Pillow plugins
        out = crop_norm(resize(decode(path)))
        assert out.shape == (3, size, size) and out.dtype == np.float32

    dec = rsz = cn = 0.0
    pc = time.perf_counter
    for _ in range(args.repeat):
        for path in args.images:
            t0 = pc()
            img = decode(path)
            t1 = pc()
            img = resize(img)
            t2 = pc()
            out = crop_norm(img)
            t3 = pc()
            dec += t1 - t0
            rsz += t2 - t1
            cn += t3 - t2
    n = len(args.images) * args.repeat
    emit(dict(system=f'Pillow {PIL.__version__} / numpy {np.__version__} / {platform.machine()} '
                     f'1 process 1 thread',
              what='preprocess', images=len(args.images), repeat=args.repeat,
              images_per_s=n / (dec + rsz + cn), decode_s=dec, resize_s=rsz, crop_norm_s=cn,
              size=size, resize_short=resize_short, threads=torch.get_num_threads()))


def beit_from_config(path, timm):
    """timm's Beit for one of our model config JSONs (e.g. recipes/fashion-mnist-beit-tiny.json),
    as `beitv2 bench --arch FILE --train-step` builds it: drop path 0.1, layer scale 0.1."""
    with open(path) as f:
        c = json.load(f)
    h, w = c['img_size']
    model = timm.models.beit.Beit(
        img_size=(h, w), patch_size=c['patch_size'], in_chans=c['in_chans'],
        num_classes=c['num_classes'], embed_dim=c['embed_dim'], depth=c['depth'],
        num_heads=c['num_heads'], mlp_ratio=c['mlp_ratio'], qkv_bias=c['qkv_bias'],
        use_abs_pos_emb=c['use_abs_pos_emb'],
        use_rel_pos_bias=c['rel_pos_bias'] == 'per_block',
        use_shared_rel_pos_bias=c['rel_pos_bias'] == 'shared',
        init_values=0.1 if c['layer_scale'] else None,
        global_pool=c['global_pool'], drop_path_rate=0.1)
    return model, (h, w)


# ---------------------------------------------------------------------------------------
def cmd_train_step(args):
    import torch
    import torch.nn.functional as F
    import timm

    torch.set_num_threads(args.threads or os.cpu_count())
    torch.manual_seed(0)
    if args.arch.endswith('.json'):
        model, (h, w) = beit_from_config(args.arch, timm)
    else:
        model = timm.create_model(args.arch, pretrained=False, drop_path_rate=0.1)
        _, h, w = model.pretrained_cfg.get('input_size', (3, 224, 224))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    x = torch.randn(args.batch_size, 3, h, w)
    y = torch.randint(0, model.num_classes, (args.batch_size,))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    for _ in range(args.warmup):
        step()
    times = []
    loss = None
    for _ in range(args.iters):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    emit(dict(system=torch_system(torch, timm), what='train_step', arch=args.arch,
              batch_size=args.batch_size, median_s=med, mean_s=statistics.fmean(times),
              images_per_s=args.batch_size / med, peak_rss_mb=peak_rss_mb(),
              threads=torch.get_num_threads(), warmup=args.warmup, iters=args.iters,
              final_loss=loss.item()))


def cmd_pretrain_step(args):
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import timm
    from timm.models.beit import Beit
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_pretrain_fixtures import MaskingGenerator, MimCls, param_groups

    torch.set_num_threads(args.threads or os.cpu_count())
    torch.manual_seed(0)
    backbone = dict(img_size=[224, 224], patch_size=16, in_chans=3, embed_dim=768, depth=12,
                    num_heads=12, mlp_ratio=4.0, norm_eps=1e-6)
    model = MimCls(backbone, dict(early_layers=9, head_layers=2, vocab_size=8192,
                                  layer_scale_init=0.1), fused_attn=True).train()
    encoder = Beit(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                   use_abs_pos_emb=True, use_rel_pos_bias=False, init_values=None,
                   global_pool='avg', num_classes=0).eval()
    task = nn.Sequential(nn.Linear(768, 768), nn.Tanh(), nn.Linear(768, 32)).eval()
    codebook = F.normalize(torch.randn(8192, 32), dim=-1)
    groups = param_groups(model)
    named = dict(model.named_parameters())
    opt = torch.optim.AdamW(
        [dict(params=[p for k, p in named.items() if groups[k] > 0], weight_decay=0.05),
         dict(params=[p for k, p in named.items() if groups[k] == 0], weight_decay=0.0)],
        lr=1.5e-3, betas=(0.9, 0.98), eps=1e-8)
    b = args.batch_size
    x = torch.randn(b, 3, 224, 224)
    x2 = torch.rand(b, 3, 224, 224)
    gen = MaskingGenerator((14, 14), 75, min_num_patches=16)
    mask = torch.from_numpy(np.stack([gen().flatten() for _ in range(b)])).bool()

    def tokens():
        with torch.no_grad():
            t = encoder.forward_features(x2 * 255 / 127.5 - 1)[:, 1:]
            z = F.normalize(task(encoder.fc_norm(t)), dim=-1)
            d = z.pow(2).sum(-1, keepdim=True) + codebook.pow(2).sum(1) - 2 * z @ codebook.t()
            return d.argmin(-1)

    def step():
        t0 = time.perf_counter()
        labels = tokens()[mask]
        t1 = time.perf_counter()
        l1, l2 = model(x, mask)
        loss = F.cross_entropy(l1, labels) + F.cross_entropy(l2, labels)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        t4 = time.perf_counter()
        return [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0]

    for _ in range(args.warmup):
        step()
    phases = [step() for _ in range(args.iters)]
    med = [statistics.median(p[i] for p in phases) for i in range(5)]
    emit(dict(system=torch_system(torch, timm), what='pretrain_step', batch_size=b,
              median_s=med[4], images_per_s=b / med[4], tokenizer_s=med[0], forward_s=med[1],
              backward_s=med[2], optimizer_s=med[3], peak_rss_mb=peak_rss_mb(),
              threads=torch.get_num_threads()))


# ---------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='cmd', required=True)

    p = sub.add_parser('make-weights', help='write a random-weight timm state dict as safetensors')
    p.add_argument('--arch', default='beitv2_base_patch16_224')
    p.add_argument('--out', required=True)
    p.add_argument('--threads', type=int, default=None)
    p.set_defaults(fn=cmd_make_weights)

    p = sub.add_parser('startup', help='process start -> first top-1 prediction')
    p.add_argument('--weights', required=True)
    p.add_argument('--image', required=True)
    p.add_argument('--arch', default='beitv2_base_patch16_224')
    p.add_argument('--threads', type=int, default=None, help='default os.cpu_count()')
    p.add_argument('--t0-ns', type=int, default=None,
                   help='process start as a wall-clock time.time_ns()/`date +%%s%%N` stamp '
                        '(default: /proc/self/stat, else the top of this script)')
    p.set_defaults(fn=cmd_startup)

    p = sub.add_parser('preprocess', help='Pillow decode/resize/crop+normalise throughput')
    p.add_argument('--images', nargs='+', required=True)
    p.add_argument('--repeat', type=int, default=10)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--crop-pct', type=float, default=0.9)
    p.add_argument('--mean', type=float, nargs=3, default=list(IMAGENET_DEFAULT_MEAN))
    p.add_argument('--std', type=float, nargs=3, default=list(IMAGENET_DEFAULT_STD))
    p.set_defaults(fn=cmd_preprocess)

    p = sub.add_parser('train-step', help='forward + CE + backward + AdamW step')
    p.add_argument('--arch', default='beitv2_base_patch16_224')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--iters', type=int, default=5)
    p.add_argument('--threads', type=int, default=None, help='default os.cpu_count()')
    p.set_defaults(fn=cmd_train_step)

    p = sub.add_parser('pretrain-step', help='BEiT v2 MIM step: tokenizer + student + AdamW')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--iters', type=int, default=5)
    p.add_argument('--threads', type=int, default=None, help='default os.cpu_count()')
    p.set_defaults(fn=cmd_pretrain_step)

    args = ap.parse_args()
    args.fn(args)


if __name__ == '__main__':
    main()
