#!/usr/bin/env python3
"""Generate the VQ-KD *training* reference fixtures used by the Rust test-suite (spec E.3-E.7, D.3).

Writes ``tests/fixtures/vqkd_train/`` (relative to the repository root):

* ``config.json``               tiny tokenizer config (same shapes as ``tests/fixtures/vqkd/config.json``)
* ``teacher_config.json``       tiny CLIP ViT teacher config (img 32, patch 8, width 16, 2 layers, 2 heads, out 12)
* ``clip_openai.pth``           plain CLIP state_dict (``torch.save(model.state_dict())``) in the OpenAI layout:
                                ``visual.*`` vision tower plus text-tower keys (and the three scalar entries of
                                OpenAI's JIT archive) that a teacher loader must ignore
* ``clip_openclip.safetensors`` the same weights in the open_clip layout (open_clip's native ViT tower uses the
                                OpenAI names unchanged; no ``input_resolution``/``context_length``/``vocab_size``)
* ``vqkd_init.pth``             ``{'model': sd}``: the tokenizer before the step, unilm ``VQKD`` layout
* ``io.safetensors``            inputs and references: teacher input/target, one training forward's losses,
                                the NormEMA codebook update, and a k-means initialisation case
* ``README.md``                 versions used and how to regenerate

Models (faithful PyTorch re-implementations, CPU, float32, one thread, non-fused timm attention):

* teacher: OpenAI CLIP ``VisionTransformer`` (openai/CLIP ``clip/model.py``; unilm ``beit2/vqkd_teacher/clip/
  model.py`` with ``return_all_tokens=True``): conv1 (no bias) -> CLS concat -> + positional_embedding -> ln_pre
  -> resblocks (ln_1, nn.MultiheadAttention, ln_2, c_fc, QuickGELU, c_proj) -> ln_post on ALL tokens -> drop CLS
  -> @ proj (unilm ``VQKD.get_regress_target``). LayerNorm eps 1e-5. Input: unilm ``ScalingLayerForClip``.
  Also checked against an independent functional forward.
* tokenizer: ``make_vqkd_fixtures.VQKD`` (timm ``Beit`` encoder/decoder with unilm names), forward as unilm
  ``VQKD.forward`` in train mode: rec (decoder fed the straight-through ``z + (z_q - z).detach()``), cosine rec
  loss, commitment loss, total; then unilm ``NormEMAVectorQuantizer``'s training-mode codebook update
  (decay 0.99, no Laplace smoothing), written twice (unilm's tensor code and an explicit per-code loop).
* k-means: unilm ``norm_ema_quantizer.kmeans(samples, 64, 10, use_cosine_sim=True)`` with the random initial
  indices made explicit (``kmeans_init_idx``); also re-run in float64 to check every assignment is robust.

Seeds are searched deterministically (first seed in a fixed range) so that all discrete decisions (token ids,
k-means assignments) have a margin far above float32 rounding.

Usage:  nice python tools/make_vqkd_train_fixtures.py [--out tests/fixtures/vqkd_train] [--no-verify]
"""
import os

os.environ['TIMM_FUSED_ATTN'] = '0'
os.environ.pop('TIMM_USE_SCIPY_INTERP', None)

import argparse
import math
import sys
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
import safetensors.torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import _normal, contiguous_sd, save_safetensors, versions, write_json  # noqa: E402
from make_vqkd_fixtures import (  # noqa: E402  (tokenizer model, weights and unilm layout)
    CONFIG, VQKD, check_against_reference, distance_gaps, randomize_vqkd_, unilm_filter)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / 'tests' / 'fixtures' / 'vqkd_train'
BATCH = 2

TEACHER_CONFIG = OrderedDict([
    ('img_size', 32), ('patch_size', 8), ('width', 16), ('layers', 2), ('heads', 2), ('output_dim', 12),
])
# Text-tower extras of the saved CLIP files (never used; a vision-teacher loader must ignore them).
TEXT_WIDTH, TEXT_CTX, TEXT_VOCAB = 8, 5, 10

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EMA_DECAY = 0.99
KMEANS_ITERS = 10
KMEANS_N = 200
KMEANS_CENTRES = 24
KMEANS_NOISE = 0.1

TEACHER_SEED = 4201
INPUT_SEED = 4301
TOKENIZER_SEED_BASE = 4401
KMEANS_SEED_BASE = 4601
SEED_TRIES = 200
TOKEN_MIN_GAP = 1e-3        # smallest (second best - best) squared distance over the 32 tokens
MIN_DISTINCT_IDS = 6
KMEANS_MIN_GAP = 5e-5       # smallest (best - second best) similarity over all 10 x 200 k-means assignments


# ---------------------------------------------------------------------------------------------
# CLIP ViT teacher (openai/CLIP clip/model.py, unilm beit2/vqkd_teacher/clip/model.py)
# ---------------------------------------------------------------------------------------------

class LayerNorm(nn.LayerNorm):
    """CLIP's LayerNorm: computed in float32 (eps 1e-5, torch default), cast back."""

    def forward(self, x):
        orig_type = x.dtype
        return super().forward(x.type(torch.float32)).type(orig_type)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model, n_head, act=QuickGELU):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ('c_fc', nn.Linear(d_model, d_model * 4)), ('gelu', act()), ('c_proj', nn.Linear(d_model * 4, d_model))]))
        self.ln_2 = LayerNorm(d_model)

    def forward(self, x):
        x = x + self.attn(*(self.ln_1(x),) * 3, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, act=QuickGELU):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, act) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class ClipVisionTransformer(nn.Module):
    def __init__(self, img_size, patch_size, width, layers, heads, output_dim, act=QuickGELU):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((img_size // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, act)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x, return_all_tokens=False):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)     # NLD -> LND -> NLD (batch_first=False)
        if return_all_tokens:
            return self.ln_post(x)[:, 1:, :]
        return self.ln_post(x[:, 0, :]) @ self.proj


def build_teacher(cfg, act=QuickGELU):
    m = ClipVisionTransformer(cfg['img_size'], cfg['patch_size'], cfg['width'], cfg['layers'], cfg['heads'],
                              cfg['output_dim'], act)
    for mod in m.modules():
        if isinstance(mod, nn.LayerNorm):
            assert mod.eps == 1e-5
    return m.eval()


def scaling_layer_for_clip(x):
    """unilm ``ScalingLayerForClip``: [-1, 1] -> [0, 1] (clamped) -> CLIP mean/std."""
    shift = torch.Tensor(CLIP_MEAN)[None, :, None, None]
    scale = torch.Tensor(CLIP_STD)[None, :, None, None]
    x = ((x + 1.) * 127.5).clamp(0, 255.) / 255.
    return (x - shift) / scale


@torch.no_grad()
def teacher_target(teacher, x):
    """unilm ``VQKD.get_regress_target``: encode_image(scaled, return_all_tokens=True) @ visual.proj."""
    return teacher(scaling_layer_for_clip(x), return_all_tokens=True) @ teacher.proj


def randomize_teacher_(m, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            leaf = name.rsplit('.', 1)[-1]
            owner = m.get_submodule(name.rsplit('.', 1)[0]) if '.' in name else m
            if name == 'class_embedding':
                v = _normal(p.shape, 1.0, gen)
            elif name == 'positional_embedding':
                v = _normal(p.shape, 0.5, gen)
            elif name == 'proj':
                v = _normal(p.shape, 1.0 / math.sqrt(p.shape[0]), gen)
            elif isinstance(owner, nn.LayerNorm):
                v = _normal(p.shape, 0.1, gen, mean=1.0 if leaf == 'weight' else 0.0)
            elif leaf == 'in_proj_bias':
                v = _normal(p.shape, 0.2, gen)
            elif leaf in ('weight', 'in_proj_weight'):
                fan_in = p[0].numel()
                v = _normal(p.shape, 1.0 / math.sqrt(fan_in), gen)
            elif leaf == 'bias':
                v = _normal(p.shape, 0.1, gen)
            else:
                raise RuntimeError(f'unhandled parameter {name}')
            p.copy_(v)


def clip_reference(sd, x, heads, patch_size):
    """Independent functional CLIP vision forward from the raw ``visual.*`` state_dict (ln_post on all tokens)."""
    p = lambda n: sd['visual.' + n]  # noqa: E731
    ln = lambda t, n: F.layer_norm(t, (t.shape[-1],), p(n + '.weight'), p(n + '.bias'), eps=1e-5)  # noqa: E731
    t = F.conv2d(x, p('conv1.weight'), None, stride=patch_size).flatten(2).transpose(1, 2)
    B, _, C = t.shape
    t = torch.cat([p('class_embedding').expand(B, 1, C), t], dim=1) + p('positional_embedding')
    t = ln(t, 'ln_pre')
    layers = len({k.split('.')[3] for k in sd if k.startswith('visual.transformer.resblocks.')})
    hd = C // heads
    for i in range(layers):
        b = f'transformer.resblocks.{i}.'
        h = ln(t, b + 'ln_1')
        qkv = F.linear(h, p(b + 'attn.in_proj_weight'), p(b + 'attn.in_proj_bias'))
        q, k, v = (u.reshape(B, -1, heads, hd).transpose(1, 2) for u in qkv.chunk(3, dim=-1))
        a = ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        o = (a @ v).transpose(1, 2).reshape(B, -1, C)
        t = t + F.linear(o, p(b + 'attn.out_proj.weight'), p(b + 'attn.out_proj.bias'))
        h = F.linear(ln(t, b + 'ln_2'), p(b + 'mlp.c_fc.weight'), p(b + 'mlp.c_fc.bias'))
        t = t + F.linear(h * torch.sigmoid(1.702 * h), p(b + 'mlp.c_proj.weight'), p(b + 'mlp.c_proj.bias'))
    return ln(t, 'ln_post')[:, 1:] @ p('proj')


def text_extras(cfg, seed):
    """A few text-tower entries of a full CLIP state_dict (tiny shapes; widths differ from the vision tower)."""
    gen = torch.Generator().manual_seed(seed)
    w = TEXT_WIDTH
    return OrderedDict([
        ('positional_embedding', _normal((TEXT_CTX, w), 0.01, gen)),
        ('text_projection', _normal((w, cfg['output_dim']), w ** -0.5, gen)),
        ('logit_scale', torch.tensor(math.log(1 / 0.07), dtype=torch.float32)),
        ('transformer.resblocks.0.attn.in_proj_weight', _normal((3 * w, w), w ** -0.5, gen)),
        ('token_embedding.weight', _normal((TEXT_VOCAB, w), 0.02, gen)),
        ('ln_final.weight', _normal((w,), 0.1, gen, mean=1.0)),
        ('ln_final.bias', _normal((w,), 0.1, gen)),
    ])


def openai_state_dict(teacher, cfg, seed):
    """OpenAI CLIP state_dict order: JIT-archive scalars, CLIP's own params, visual.*, text modules."""
    text = text_extras(cfg, seed)
    out = OrderedDict([
        ('input_resolution', torch.tensor(cfg['img_size'], dtype=torch.int64)),
        ('context_length', torch.tensor(TEXT_CTX, dtype=torch.int64)),
        ('vocab_size', torch.tensor(TEXT_VOCAB, dtype=torch.int64)),
    ])
    for k in ('positional_embedding', 'text_projection', 'logit_scale'):
        out[k] = text[k]
    out.update(('visual.' + k, v) for k, v in contiguous_sd(teacher.state_dict()).items())
    for k in ('transformer.resblocks.0.attn.in_proj_weight', 'token_embedding.weight', 'ln_final.weight',
              'ln_final.bias'):
        out[k] = text[k]
    return out


def openclip_state_dict(sd_openai):
    """open_clip ``CLIP`` (native ViT tower): same names; the JIT scalars are not part of an open_clip model."""
    return OrderedDict((k, v) for k, v in sd_openai.items()
                       if k not in ('input_resolution', 'context_length', 'vocab_size'))


def visual_filter(sd):
    return OrderedDict((k[len('visual.'):], v) for k, v in sd.items() if k.startswith('visual.'))


# ---------------------------------------------------------------------------------------------
# One VQ-KD training forward + NormEMA update (unilm modeling_vqkd.py / norm_ema_quantizer.py)
# ---------------------------------------------------------------------------------------------

def rec_loss_cosine(rec, target):
    """unilm ``calculate_rec_loss`` ('cosine'): x / x.norm(dim=-1, keepdim=True) (no eps), 1 - dot, mean."""
    target = target / target.norm(dim=-1, keepdim=True)
    rec = rec / rec.norm(dim=-1, keepdim=True)
    return (1 - (target * rec).sum(-1)).mean()


@torch.no_grad()
def norm_ema_update_unilm(weight, zf, ids, cluster_size, decay=EMA_DECAY):
    """unilm ``NormEMAVectorQuantizer.forward`` training branch, verbatim tensor code (single process)."""
    weight, cluster_size = weight.clone(), cluster_size.clone()
    encodings = F.one_hot(ids, weight.shape[0]).type(zf.dtype)
    bins = encodings.sum(0)
    cluster_size.mul_(decay).add_(bins, alpha=1 - decay)              # ema_inplace(self.cluster_size, bins)
    zero_mask = bins == 0
    bins = bins.masked_fill(zero_mask, 1.)
    embed_sum = zf.t() @ encodings
    embed_normalized = F.normalize((embed_sum / bins.unsqueeze(0)).t(), p=2, dim=-1)
    embed_normalized = torch.where(zero_mask[..., None], weight, embed_normalized)
    weight.mul_(decay).add_(embed_normalized, alpha=1 - decay)       # norm_ema_inplace
    weight.copy_(F.normalize(weight, p=2, dim=-1))
    return weight, cluster_size


@torch.no_grad()
def norm_ema_update_loop(weight, zf, ids, decay=EMA_DECAY):
    """The brief's per-code formulation (independent check)."""
    out = weight.clone()
    bins = torch.zeros(weight.shape[0], dtype=torch.int64)
    for k in range(weight.shape[0]):
        sel = ids == k
        bins[k] = int(sel.sum())
        m = F.normalize(zf[sel].sum(0) / bins[k], dim=-1) if bins[k] > 0 else weight[k]
        out[k] = F.normalize(decay * weight[k] + (1 - decay) * m, dim=-1)
    return out, bins


@torch.no_grad()
def training_step(model, teacher, x01):
    """unilm VQKD.forward in train mode (fp32, no autocast) + the quantizer's codebook EMA update."""
    model.train()
    ref = model.run(x01)                       # pre_process -> encoder -> task layer -> quantizer -> decoder
    model.eval()
    x = ref['pre']
    target = teacher_target(teacher, x)
    rec = ref['rec_st']                        # unilm feeds the decoder the straight-through value
    rec_loss = rec_loss_cosine(rec, target)
    commit = ref['commit_loss']
    total = commit + rec_loss                  # loss = emb_loss + rec_loss
    q = model.quantize
    ids = ref['ids'].reshape(-1)
    w_after, cs_after = norm_ema_update_unilm(q.embedding.weight.detach(), ref['zf'], ids, q.cluster_size)
    bins = torch.bincount(ids, minlength=w_after.shape[0])
    return dict(ref=ref, target=target, rec=rec, rec_loss=rec_loss, commit_loss=commit, total_loss=total,
                codebook_after_ema=w_after, cluster_size_after=cs_after, bins=bins)


# ---------------------------------------------------------------------------------------------
# k-means init (unilm norm_ema_quantizer.kmeans, use_cosine_sim=True)
# ---------------------------------------------------------------------------------------------

def kmeans_unilm(samples, init_idx, num_clusters, num_iters=KMEANS_ITERS, trace=None):
    """unilm ``kmeans`` verbatim, with ``sample_vectors`` replaced by the explicit ``init_idx``."""
    dim, dtype = samples.shape[-1], samples.dtype
    means = samples[init_idx]
    for _ in range(num_iters):
        dists = samples @ means.t()
        buckets = dists.max(dim=-1).indices
        bins = torch.bincount(buckets, minlength=num_clusters)
        zero_mask = bins == 0
        bins_min_clamped = bins.masked_fill(zero_mask, 1)
        new_means = buckets.new_zeros(num_clusters, dim, dtype=dtype)
        new_means.scatter_add_(0, buckets[:, None].expand(-1, dim), samples)   # repeat(buckets, 'n -> n d')
        new_means = new_means / bins_min_clamped[..., None]
        new_means = F.normalize(new_means, p=2, dim=-1)
        means = torch.where(zero_mask[..., None], means, new_means)
        if trace is not None:
            top2 = torch.topk(dists, 2, dim=-1).values
            trace.append(dict(buckets=buckets, gap=(top2[:, 0] - top2[:, 1]).min().item(),
                              n_empty=int(zero_mask.sum())))
    return means, bins


def make_kmeans_case(seed, n_codes, code_dim):
    """Clustered unit vectors: KMEANS_CENTRES random unit centres + N(0, KMEANS_NOISE) noise, L2-normalised.

    (Uniform random unit vectors never leave a cluster empty; with 64 initial means spread over fewer natural
    clusters some means lose all their members, which exercises the keep-previous-mean path.)
    """
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn((KMEANS_CENTRES, code_dim), generator=gen), p=2, dim=-1)
    labels = torch.randint(0, KMEANS_CENTRES, (KMEANS_N,), generator=gen)
    noise = KMEANS_NOISE * torch.randn((KMEANS_N, code_dim), generator=gen)
    samples = F.normalize(centres[labels] + noise, p=2, dim=-1)
    init_idx = torch.randperm(KMEANS_N, generator=gen)[:n_codes]
    return samples, init_idx


def search_kmeans_seed(n_codes, code_dim):
    """First seed whose 10 x 200 assignments all have margin >= KMEANS_MIN_GAP, equal float64 assignments, empty
    clusters in the final iteration (so the keep-previous-mean path and zero bins are exercised), and whose
    1-iteration run has bins that differ from a recount against its updated means."""
    tried = []
    for seed in range(KMEANS_SEED_BASE, KMEANS_SEED_BASE + SEED_TRIES):
        samples, init_idx = make_kmeans_case(seed, n_codes, code_dim)
        tr, tr64 = [], []
        means, bins = kmeans_unilm(samples, init_idx, n_codes, trace=tr)
        kmeans_unilm(samples.double(), init_idx, n_codes, trace=tr64)
        means1, bins1 = kmeans_unilm(samples, init_idx, n_codes, num_iters=1)
        recount1 = torch.bincount((samples @ means1.t()).argmax(-1), minlength=n_codes)
        gap = min(t['gap'] for t in tr)
        same64 = all(torch.equal(a['buckets'], b['buckets']) for a, b in zip(tr, tr64))
        tried.append((seed, gap, tr[-1]['n_empty']))
        if gap >= KMEANS_MIN_GAP and same64 and tr[-1]['n_empty'] > 0 and not torch.equal(recount1, bins1):
            return seed, samples, init_idx, means, bins, means1, bins1, tr
    raise RuntimeError(f'no k-means seed found: {tried}')


def last_change_iteration(trace):
    """1-based iteration whose assignment differs from the previous one for the last time (1 = never changed)."""
    last = 1
    for i in range(1, len(trace)):
        if not torch.equal(trace[i]['buckets'], trace[i - 1]['buckets']):
            last = i + 1
    return last


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

def make_input01(cfg):
    gen = torch.Generator().manual_seed(INPUT_SEED)
    s = cfg['img_size']
    x = torch.rand((BATCH, 3, s, s), generator=gen, dtype=torch.float32)
    x[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 0.0, 1.0])    # exact ends of the range: -1 and +1 after pre_process
    x[1, 2, -1, -2:] = torch.tensor([1.0, 0.0])
    return x


def search_tokenizer_seed(cfg, teacher, x01):
    """First seed with robust ids (min gap), >= MIN_DISTINCT_IDS distinct ids and a code used more than once."""
    tried = []
    for seed in range(TOKENIZER_SEED_BASE, TOKENIZER_SEED_BASE + SEED_TRIES):
        model = VQKD(cfg)
        randomize_vqkd_(model, seed)
        step = training_step(model, teacher, x01)
        gap = distance_gaps(step['ref']['d']).min().item()
        n_ids = int((step['bins'] > 0).sum())
        tried.append((seed, gap, n_ids))
        if gap >= TOKEN_MIN_GAP and n_ids >= MIN_DISTINCT_IDS and int(step['bins'].max()) >= 2:
            return seed, model, step
    raise RuntimeError(f'no tokenizer seed found: {tried}')


def write_all(out_dir, verify):
    cfg, tcfg = dict(CONFIG), dict(TEACHER_CONFIG)
    assert cfg['decoder_out_dim'] == tcfg['output_dim'] and cfg['img_size'] == tcfg['img_size']

    teacher = build_teacher(tcfg)
    randomize_teacher_(teacher, TEACHER_SEED)
    x01 = make_input01(cfg)
    seed, model, step = search_tokenizer_seed(cfg, teacher, x01)
    kseed, samples, init_idx, kmeans_means, kmeans_bins, means1, bins1, ktrace = search_kmeans_seed(
        cfg['n_codes'], cfg['code_dim'])
    ref = step['ref']
    print(f'tokenizer seed {seed}: min gap {distance_gaps(ref["d"]).min().item():.4g}, '
          f'{int((step["bins"] > 0).sum())} codes used, max bin {int(step["bins"].max())}')
    print(f'k-means seed {kseed}: min margin {min(t["gap"] for t in ktrace):.3g}, '
          f'empty clusters per iteration {[t["n_empty"] for t in ktrace]}, '
          f'assignments last change at iteration {last_change_iteration(ktrace)}')

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(CONFIG, out_dir / 'config.json')
    write_json(TEACHER_CONFIG, out_dir / 'teacher_config.json')
    sd_openai = openai_state_dict(teacher, tcfg, TEACHER_SEED + 1)
    torch.save(sd_openai, out_dir / 'clip_openai.pth')
    sd_openclip = openclip_state_dict(sd_openai)
    save_safetensors(sd_openclip, out_dir / 'clip_openclip.safetensors')
    vq_sd = contiguous_sd(model.state_dict())
    torch.save({'model': vq_sd}, out_dir / 'vqkd_init.pth')

    io_t = OrderedDict()
    io_t['teacher_input'] = ref['pre']
    io_t['teacher_target'] = step['target']
    io_t['ids'] = ref['ids']
    io_t['z'] = ref['z']
    io_t['z_q'] = ref['z_q']
    io_t['rec'] = step['rec']
    io_t['rec_loss'] = step['rec_loss'].reshape(())
    io_t['commit_loss'] = step['commit_loss'].reshape(())
    io_t['total_loss'] = step['total_loss'].reshape(())
    io_t['codebook_after_ema'] = step['codebook_after_ema']
    io_t['bins'] = step['bins']
    io_t['cluster_size_after'] = step['cluster_size_after']
    io_t['kmeans_samples'] = samples
    io_t['kmeans_init_idx'] = init_idx
    io_t['kmeans_means'] = kmeans_means
    io_t['kmeans_bins'] = kmeans_bins
    io_t['kmeans_means_iter1'] = means1
    io_t['kmeans_bins_iter1'] = bins1
    save_safetensors(io_t, out_dir / 'io.safetensors')

    if verify:
        verify_all(out_dir, cfg, tcfg, teacher, model, step, io_t, sd_openai, ktrace, x01)
    write_readme(out_dir, seed, kseed, io_t, step, ktrace, sd_openai)
    return io_t


@torch.no_grad()
def verify_all(out_dir, cfg, tcfg, teacher, model, step, io_t, sd_openai, ktrace, x01):
    B, N, c, K = BATCH, (cfg['img_size'] // cfg['patch_size']) ** 2, cfg['code_dim'], cfg['n_codes']
    D = tcfg['output_dim']
    shapes = dict(teacher_input=(B, 3, 32, 32), teacher_target=(B, N, D), ids=(B, N),
                  z=(B, N, c), z_q=(B, N, c), rec=(B, N, D), rec_loss=(), commit_loss=(), total_loss=(),
                  codebook_after_ema=(K, c), bins=(K,), cluster_size_after=(K,), kmeans_samples=(KMEANS_N, c),
                  kmeans_init_idx=(K,), kmeans_means=(K, c), kmeans_bins=(K,), kmeans_means_iter1=(K, c),
                  kmeans_bins_iter1=(K,))
    assert set(shapes) == set(io_t)
    for k, s in shapes.items():
        assert tuple(io_t[k].shape) == s, (k, io_t[k].shape)
        want = torch.int64 if k in ('ids', 'bins', 'kmeans_init_idx', 'kmeans_bins', 'kmeans_bins_iter1') \
            else torch.float32
        assert io_t[k].dtype == want, (k, io_t[k].dtype)
    ti = io_t['teacher_input']
    assert ti.min().item() == -1.0 and ti.max().item() == 1.0
    assert torch.equal(ti, x01 * 255. / 127.5 - 1.0)

    # --- teacher: functional reference, file reloads, QuickGELU matters, every parameter matters
    tgt = io_t['teacher_target']
    scaled = scaling_layer_for_clip(ti)
    fref = clip_reference(sd_openai, scaled, tcfg['heads'], tcfg['patch_size'])
    assert torch.allclose(fref, tgt, atol=1e-5, rtol=0), (fref - tgt).abs().max()
    print(f'teacher vs functional reference: max |diff| = {(fref - tgt).abs().max().item():.3g}')
    ck = torch.load(out_dir / 'clip_openai.pth', weights_only=True)
    assert list(ck) == list(sd_openai) and all(torch.equal(ck[k], v) for k, v in sd_openai.items())
    # OpenAI build_model's rule: vision layers = keys starting with 'visual.' ending in '.attn.in_proj_weight'
    assert len([k for k in ck if k.startswith('visual.') and k.endswith('.attn.in_proj_weight')]) == tcfg['layers']
    assert len([k for k in ck if k.endswith('.attn.in_proj_weight')]) == tcfg['layers'] + 1
    t2 = build_teacher(tcfg)
    t2.load_state_dict(visual_filter(ck), strict=True)
    assert torch.equal(teacher_target(t2, ti), tgt)
    oc = safetensors.torch.load_file(str(out_dir / 'clip_openclip.safetensors'))
    assert set(oc) == set(ck) - {'input_resolution', 'context_length', 'vocab_size'}
    t3 = build_teacher(tcfg)
    t3.load_state_dict(visual_filter(oc), strict=True)
    assert torch.equal(teacher_target(t3, ti), tgt)
    exp = {'visual.conv1.weight': (16, 3, 8, 8), 'visual.class_embedding': (16,),
           'visual.positional_embedding': (N + 1, 16), 'visual.ln_pre.weight': (16,),
           'visual.transformer.resblocks.1.attn.in_proj_weight': (48, 16),
           'visual.transformer.resblocks.1.attn.in_proj_bias': (48,),
           'visual.transformer.resblocks.1.attn.out_proj.weight': (16, 16),
           'visual.transformer.resblocks.1.mlp.c_fc.weight': (64, 16),
           'visual.transformer.resblocks.1.mlp.c_proj.weight': (16, 64), 'visual.ln_post.bias': (16,),
           'visual.proj': (16, D), 'positional_embedding': (TEXT_CTX, TEXT_WIDTH), 'logit_scale': (),
           'input_resolution': ()}
    for k, s in exp.items():
        assert tuple(ck[k].shape) == s, (k, ck[k].shape)
    assert not any('conv1.bias' in k for k in ck)
    tg = build_teacher(tcfg, act=nn.GELU)
    tg.load_state_dict(teacher.state_dict())
    gelu_diff = (teacher_target(tg, ti) - tgt).abs().max().item()
    assert gelu_diff > 1e-3, gelu_diff
    step['gelu_diff'] = gelu_diff
    check_teacher_sensitivity(teacher, ti)

    # --- training step: reload, train == eval, straight-through ~ z_q, losses, EMA (two formulations)
    w = torch.load(out_dir / 'vqkd_init.pth', weights_only=True)
    assert list(w) == ['model']
    m2 = VQKD(cfg)
    m2.load_state_dict(unilm_filter(w['model']), strict=True)
    assert bool(m2.quantize.embedding.initted)
    s2 = training_step(m2, teacher, x01)
    for k in ('rec_loss', 'commit_loss', 'total_loss', 'codebook_after_ema', 'bins', 'cluster_size_after'):
        assert torch.equal(s2[k].reshape(io_t[k].shape), io_t[k]), f'vqkd_init.pth reload: {k}'
    ev = m2.run(x01)                                    # eval mode: same numbers (no dropout)
    assert torch.equal(ev['rec_st'], io_t['rec']) and torch.equal(ev['ids'], io_t['ids'])
    ref = step['ref']
    check_against_reference(unilm_filter(w['model']), cfg, ref)
    st = (ref['rec'] - ref['rec_st']).abs().max().item()
    assert st < 1e-5, st
    step['st_diff'] = st
    # losses recomputed with the brief's formulas
    rl = (1 - (F.normalize(io_t['rec'], dim=-1) * F.normalize(tgt, dim=-1)).sum(-1)).mean()
    assert abs(rl.item() - io_t['rec_loss'].item()) < 1e-6
    cl = ((io_t['z_q'] - io_t['z']) ** 2).mean()
    assert abs(cl.item() - io_t['commit_loss'].item()) < 1e-7
    assert io_t['total_loss'].item() == (io_t['commit_loss'] + io_t['rec_loss']).item()
    rl_zq = rec_loss_cosine(ref['rec'], tgt)
    step['rec_loss_zq_diff'] = abs(rl_zq.item() - io_t['rec_loss'].item())
    assert step['rec_loss_zq_diff'] < 1e-6
    # EMA
    e0 = model.quantize.embedding.weight.detach()
    loop_w, loop_bins = norm_ema_update_loop(e0, ref['zf'], ref['ids'].reshape(-1))
    assert torch.equal(loop_bins, io_t['bins'])
    assert torch.allclose(loop_w, io_t['codebook_after_ema'], atol=1e-6, rtol=0)
    unused = io_t['bins'] == 0
    assert torch.allclose(io_t['codebook_after_ema'][unused], e0[unused], atol=1e-6, rtol=0)   # renormalised only
    assert not torch.allclose(io_t['codebook_after_ema'][~unused], e0[~unused], atol=1e-4)
    assert torch.allclose(io_t['codebook_after_ema'].norm(dim=-1), torch.ones(cfg['n_codes']), atol=1e-6)
    assert torch.allclose(io_t['cluster_size_after'],
                          0.99 * model.quantize.cluster_size + 0.01 * io_t['bins'].float(), atol=1e-6)
    assert int(io_t['bins'].sum()) == B * N

    # --- k-means: a float64 run gives the same assignments every iteration; final bins = last assignment's
    samples, init_idx = io_t['kmeans_samples'], io_t['kmeans_init_idx']
    assert torch.allclose(samples.norm(dim=-1), torch.ones(KMEANS_N), atol=1e-6)
    assert init_idx.unique().numel() == cfg['n_codes'] and int(init_idx.max()) < KMEANS_N
    m64, b64 = kmeans_unilm(samples.double(), init_idx, cfg['n_codes'])
    assert torch.equal(b64, io_t['kmeans_bins'])
    assert torch.allclose(m64.float(), io_t['kmeans_means'], atol=1e-6, rtol=0)
    assert torch.equal(io_t['kmeans_bins'], torch.bincount(ktrace[-1]['buckets'], minlength=cfg['n_codes']))
    assert int(io_t['kmeans_bins'].sum()) == KMEANS_N
    # bins are those of the last assignment (made with the means *before* the last update): recompute
    last = (samples @ io_t['kmeans_means'].t()).argmax(-1)
    step['bins_vs_final_means_differ'] = not torch.equal(torch.bincount(last, minlength=cfg['n_codes']),
                                                         io_t['kmeans_bins'])
    # 1-iteration run: bins = counts of the assignment to samples[init_idx] (each initial mean is a sample, so
    # every bin >= 1); means = one update; the counts against the updated means differ
    m1, b1 = kmeans_unilm(samples.double(), init_idx, cfg['n_codes'], num_iters=1)
    assert torch.equal(b1, io_t['kmeans_bins_iter1']) and int(b1.min()) >= 1
    assert torch.allclose(m1.float(), io_t['kmeans_means_iter1'], atol=1e-6, rtol=0)
    assert torch.equal(io_t['kmeans_bins_iter1'], torch.bincount(ktrace[0]['buckets'], minlength=cfg['n_codes']))
    first = (samples @ io_t['kmeans_means_iter1'].t()).argmax(-1)
    assert not torch.equal(torch.bincount(first, minlength=cfg['n_codes']), io_t['kmeans_bins_iter1'])
    io_back = safetensors.torch.load_file(str(out_dir / 'io.safetensors'))
    assert set(io_back) == set(io_t) and all(torch.equal(io_back[k], v) for k, v in io_t.items())


@torch.no_grad()
def check_teacher_sensitivity(teacher, x, min_change=1e-4):
    base = teacher_target(teacher, x)
    gen = torch.Generator().manual_seed(7)
    weak = []
    for name, p in teacher.named_parameters():
        saved = p.detach().clone()
        p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        change = (teacher_target(teacher, x) - base).abs().max().item()
        p.copy_(saved)
        if change < min_change:
            weak.append((name, change))
    assert not weak, f'teacher parameters with no measurable influence: {weak}'
    assert torch.equal(teacher_target(teacher, x), base)


README_TEMPLATE = """# VQ-KD training reference fixtures (generated — do not edit by hand)

Generated by `tools/make_vqkd_train_fixtures.py` (spec D.3, E.3–E.7): a CLIP ViT teacher, one VQ-KD
training forward (losses) with the NormEMA codebook update, and a k-means codebook initialisation. CPU,
float32 (no autocast), one thread, non-fused timm attention. Regenerate from the repository root:

    nice python tools/make_vqkd_train_fixtures.py

Versions used:

{versions}

## Files

* `config.json` — tiny tokenizer (same shapes as `tests/fixtures/vqkd/config.json`): img 32, patch 8 (4x4
  grid, N = 16), C 16, depth 2, heads 2, code dim 8, 64 codes, decoder depth 1, decoder out dim 12.
* `teacher_config.json` — tiny CLIP ViT teacher: img 32, patch 8, width 16, 2 layers, 2 heads (head dim 8),
  output dim 12. NB: OpenAI `build_model` derives `heads = width // 64` (12 for ViT-B/16); that rule gives 0
  here, so take `heads` from the config.
* `clip_openai.pth` — plain CLIP state_dict (`torch.save(OrderedDict)`, weights-only loadable), OpenAI layout,
  in OpenAI's order: `input_resolution`, `context_length`, `vocab_size` (int64 scalars, as in the state_dict
  of OpenAI's JIT archives; `build_model` deletes them), `positional_embedding` ({tctx}x{tw}: the TEXT one),
  `text_projection`, `logit_scale`, then the vision tower
  `visual.{{conv1.weight (16,3,8,8; no bias), class_embedding (16), positional_embedding (17,16),
  ln_pre.{{weight,bias}}, transformer.resblocks.i.{{ln_1, attn.in_proj_weight (48,16), attn.in_proj_bias (48),
  attn.out_proj.{{weight,bias}}, ln_2, mlp.c_fc (64,16), mlp.c_proj (16,64)}}, ln_post, proj (16,12)}}`, then
  text keys `transformer.resblocks.0.attn.in_proj_weight` ({tw3}x{tw}; also ends in `.attn.in_proj_weight`:
  count vision layers on `visual.` keys only, as `build_model` does), `token_embedding.weight`,
  `ln_final.{{weight,bias}}`. A teacher loader must take `visual.*` only.
* `clip_openclip.safetensors` — the same tensors in the open_clip layout. open_clip's native
  `VisionTransformer` (`src/open_clip/transformer.py`) uses exactly OpenAI's names (`conv1`, `class_embedding`,
  `positional_embedding`, `ln_pre`, `transformer.resblocks.i.{{ln_1, attn (nn.MultiheadAttention: in_proj_weight,
  in_proj_bias, out_proj), ln_2, mlp.c_fc, mlp.c_proj}}`, `ln_post`, `proj`); `ls_1`/`ls_2` are Identity
  without layer scale and `attn_mask` is a non-persistent buffer, so nothing extra appears. `visual.trunk.*` only
  exists for timm-backed towers (`TimmModel`, e.g. SigLIP/ConvNeXt configs), not for the CLIP ViT-B/16 tower.
  Differences from `clip_openai.pth`: no `input_resolution`/`context_length`/`vocab_size`. Caveat: a checkpoint
  does not record the activation; OpenAI weights (open_clip `ViT-B-16-quickgelu` / `pretrained='openai'`) use
  QuickGELU, while open_clip's LAION-trained `ViT-B-16` uses exact `nn.GELU` — these fixtures use QuickGELU
  (with nn.GELU the target moves by {gelu:.3g}).
* `vqkd_init.pth` — `{{'model': state_dict}}`, tokenizer before the step, unilm `VQKD` layout (as
  `tests/fixtures/vqkd/unilm.pth` but without teacher/scaling extras and without `args`/`epoch`);
  `quantize.embedding.initted = [1.]` so no k-means runs in the step; `quantize.cluster_size` holds arbitrary
  non-zero statistics (random in [0,3)); `quantize.embedding.cluster_size`/`embed_avg` are unused. Seed {seed}.
* `io.safetensors` — see below.

## Teacher (`teacher_input` -> `teacher_target`)

`teacher_input` (2,3,32,32) = `input01 * 255 / 127.5 - 1` (unilm `pre_process`, batch max <= 1) with
`input01` = `torch.rand` (seed {iseed}) with a few pixels set to exactly 0 and 1 (not stored: size); values in
[-1, 1], min -1 and max +1 exactly. It is the input of both the teacher and the tokenizer encoder (i.e. the
tokenizer's `pre_process` is already applied). Teacher image = unilm `ScalingLayerForClip`: `((x + 1) * 127.5).clamp(0, 255)
/ 255`, then `(. - mean) / std` with CLIP mean (0.48145466, 0.4578275, 0.40821073), std (0.26862954,
0.26130258, 0.27577711). CLIP forward: conv1 (stride 8) -> flatten -> CLS `class_embedding` first -> +
`positional_embedding` -> `ln_pre` -> blocks `x + attn(ln_1(x))`, `x + c_proj(QuickGELU(c_fc(ln_2(x))))`
(QuickGELU `x * sigmoid(1.702 x)`; attention: `in_proj_weight` rows [0:16] q, [16:32] k, [32:48] v, same for
the bias; heads split the 16 channels as 2 x 8; scale 8^-0.5; `out_proj`) -> `ln_post` on ALL 17 tokens ->
drop CLS -> `@ proj` (16 x 12, right-multiplied, no transpose) = `teacher_target` (2,16,12). LayerNorm
eps 1e-5 everywhere. Weights seed {tseed}: weights N(0, 1/fan_in), LN affine 1 +/- 0.1, biases, class and
positional embeddings non-trivial; every teacher parameter tensor moves the target measurably (checked). Note:
the k third of `in_proj_bias` cannot change the output (softmax is invariant to it). Independent functional
forward agrees to {fref:.2g}.

## Training step (`teacher_input` -> losses, codebook EMA)

unilm `VQKD.forward` in train mode (no dropout/drop path, so train == eval for the networks): encoder on
`teacher_input` -> `fc_norm` -> `encode_task_layer` -> L2 normalise -> `z` (2,16,8) -> `ids` (argmin of the
float32 distances, min best/second-best gap {gap:.3g}) -> `z_q = e[ids]` -> decoder fed the straight-through
value `z + (z_q - z)` as (B, 8, 4, 4) -> `fc_norm` -> `decode_task_layer` -> `rec` (2,16,12) (feeding `z_q`
directly changes `rec` by {st:.2g} at most and `rec_loss` by {rlzq:.2g}).

* `rec_loss` = mean over the B*N = 32 tokens of `1 - <rec/|rec|, target/|target|>` (unilm divides by the
  norm without eps; `F.normalize` gives the same numbers) = {rec_loss:.8g}
* `commit_loss` = `mean((z_q - z)^2)` over all 2*16*8 elements (beta 1) = {commit_loss:.8g}
* `total_loss` = `commit_loss + rec_loss` = {total_loss:.8g}

NormEMA update (unilm `NormEMAVectorQuantizer.forward`, `self.training` branch, single process, decay 0.99,
no Laplace smoothing), computed from the codebook `e` in `vqkd_init.pth` and the flattened `z` in (b, row,
col) order: `bins` (64) int64 = counts of `ids` ({n_used} codes used, max count {max_bin}); `embed_sum = z^T
onehot`; for used codes `m_k = normalize(embed_sum_k / bins_k)`, for unused codes `m_k = e_k`; `e <- normalize(
0.99 e + 0.01 m)` = `codebook_after_ema` (64,8) (unused rows equal `e_k` up to rounding of the re-normalisation).
`cluster_size_after` (64) = `0.99 * quantize.cluster_size + 0.01 * bins` (statistics buffer, also updated in
the same branch). The losses/`z_q`/`rec` use the codebook *before* the update. Checked against an explicit
per-code loop (1e-6). `ids`, `z`, `z_q`, `rec` are stored for debugging.

## k-means init (`kmeans_samples`, `kmeans_init_idx` -> `kmeans_means`, `kmeans_bins`)

unilm `norm_ema_quantizer.kmeans(samples, 64, num_iters=10, use_cosine_sim=True)` with `sample_vectors`'
`randperm(200)[:64]` made explicit. `kmeans_samples` (200,8): seed {kseed}; {kcent} random unit centres,
each sample = a random centre + N(0, {knoise}^2) noise, L2-normalised (clustered data, so that some of the 64
means lose all their members; uniform random unit vectors never leave a cluster empty).
`kmeans_init_idx` (64) int64 = `randperm(200)[:64]` from the same generator (distinct indices).
`means = samples[init_idx]`; 10 times: `sim = samples @ means^T`; `buckets = argmax(sim, -1)` (first max;
computed from the means of the previous iteration); `bins = bincount(buckets, minlength=64)`;
`zero_mask = bins == 0`; `new = scatter_add` sum of samples per bucket `/ bins.masked_fill(zero_mask, 1)`;
`new = l2norm(new)`; `means = where(zero_mask, means, new)` (empty clusters keep their previous mean).
Returned: `kmeans_means` (64,8) = means after the 10th update and `kmeans_bins` (64) int64 = the bins of the
10th assignment (made with the means *before* that update). Empty clusters per iteration: {empties};
the assignments last change at iteration {klast}, so the 10-iteration result is converged and recounting
against the final means {bins_note}. To make the order observable, `kmeans_means_iter1`/`kmeans_bins_iter1`
hold the same call with `num_iters=1`: bins = counts of the assignment to `samples[init_idx]` (all >= 1), means
= one update; recounting against those updated means gives different counts (checked). Smallest
best-vs-second similarity margin over all 10 x 200 assignments {kgap:.3g}; a float64 run makes identical
assignments and means within 1e-6. In unilm the result is copied into `quantize.embedding.weight`, the bins
into `quantize.embedding.cluster_size`, and `initted` is set to 1.

## io.safetensors

| key | shape | dtype |
|---|---|---|
{table}
"""


def write_readme(out_dir, seed, kseed, io_t, step, ktrace, sd_openai):
    vs = '\n'.join(f'* {k} {v}' for k, v in versions().items())
    table = '\n'.join(f'| `{k}` | {tuple(v.shape)} | {str(v.dtype).replace("torch.", "")} |' for k, v in io_t.items())
    differ = step.get('bins_vs_final_means_differ')
    bins_note = '(not checked)' if differ is None else ('gives different counts here' if differ else
                                                        'gives the same counts here')
    fref = (clip_reference(sd_openai, scaling_layer_for_clip(io_t['teacher_input']), TEACHER_CONFIG['heads'],
                           TEACHER_CONFIG['patch_size']) - io_t['teacher_target']).abs().max().item()
    (out_dir / 'README.md').write_text(README_TEMPLATE.format(
        versions=vs, tctx=TEXT_CTX, tw=TEXT_WIDTH, tw3=3 * TEXT_WIDTH, gelu=step.get('gelu_diff', float('nan')),
        seed=seed, iseed=INPUT_SEED, tseed=TEACHER_SEED,
        fref=fref,
        gap=distance_gaps(step['ref']['d']).min().item(), st=step.get('st_diff', float('nan')),
        rlzq=step.get('rec_loss_zq_diff', float('nan')), rec_loss=io_t['rec_loss'].item(),
        commit_loss=io_t['commit_loss'].item(), total_loss=io_t['total_loss'].item(),
        n_used=int((io_t['bins'] > 0).sum()), max_bin=int(io_t['bins'].max()), kseed=kseed,
        bins_note=bins_note, empties=[t['n_empty'] for t in ktrace], kgap=min(t['gap'] for t in ktrace),
        kcent=KMEANS_CENTRES, knoise=KMEANS_NOISE, klast=last_change_iteration(ktrace),
        table=table))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', type=Path, default=DEFAULT_OUT)
    ap.add_argument('--no-verify', action='store_true', help='skip the self-checks')
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    io_t = write_all(args.out, not args.no_verify)
    print(f'rec_loss = {io_t["rec_loss"].item():.8g}, commit_loss = {io_t["commit_loss"].item():.8g}, '
          f'total_loss = {io_t["total_loss"].item():.8g}')
    print(f'bins used: {int((io_t["bins"] > 0).sum())}, kmeans_bins zeros: {int((io_t["kmeans_bins"] == 0).sum())}')
    total = sum(p.stat().st_size for p in args.out.rglob('*') if p.is_file())
    for p in sorted(args.out.iterdir()):
        print(f'  {p.name:28s} {p.stat().st_size:8d}')
    print(f'wrote {args.out} ({total / 1024:.1f} KiB){"" if args.no_verify else " (verified)"}')


if __name__ == '__main__':
    main()
