#!/usr/bin/env python3
"""Generate the PyTorch/timm reference fixtures used by the Rust test-suite.

Writes ``tests/fixtures/models/`` (relative to the repository root):

* ``<case>/config.json``        model configuration in beitv2's own config format
* ``<case>/timm.safetensors``   timm ``Beit`` state_dict (contiguous tensors)
* ``<case>/timm.pth|timm.bin``  the same state_dict written with ``torch.save``
* ``<case>/mmpretrain.pth``     ``{'state_dict': ..., 'meta': ...}`` with MMPretrain names
* ``<case>/unilm.pth``          ``{'model': ..., 'args': Namespace, 'epoch': 99}`` (microsoft/unilm)
* ``<case>/io.safetensors``     input batch and reference outputs (logits, pre_logits, features, block.i)
* ``photos/``                   end-to-end case: 224x224 model, logits for ``assets/photos/*.png`` after
                                torchvision eval preprocessing at crop_pct 0.875 and 0.9 (no inputs stored)
* ``resize/``                   relative-position-bias resize references (timm linear, unilm/mmpretrain cubic)
* ``rel_index.safetensors``     timm ``gen_relative_position_index`` for 14x14 and 4x6 windows
* ``README.md``                 versions used and how to regenerate

Everything is deterministic: fixed seeds, CPU, float32, one thread, timm's non-fused
attention path (``TIMM_FUSED_ATTN=0``) and timm's default (linear, non-SciPy) table resize.

Usage:  python tools/make_fixtures.py [--out tests/fixtures/models] [--no-verify]
"""
import os

# Must be set before timm is imported: timm reads both variables at import time.
os.environ['TIMM_FUSED_ATTN'] = '0'
os.environ.pop('TIMM_USE_SCIPY_INTERP', None)

import argparse
import io
import json
import math
import platform
from collections import OrderedDict
from pathlib import Path

import numpy as np
import scipy
import safetensors
import safetensors.torch
import PIL
import torch
import timm
import torchvision
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from scipy.interpolate import RectBivariateSpline
from timm.layers import resize_rel_pos_bias_table
from timm.models.beit import Beit, checkpoint_filter_fn, gen_relative_position_index
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / 'tests' / 'fixtures' / 'models'
PHOTOS_DIR = REPO_ROOT / 'assets' / 'photos'
BATCH = 2

# ---------------------------------------------------------------------------------------------
# Case definitions (our config format; see README.md written next to the fixtures)
# ---------------------------------------------------------------------------------------------

BASE = dict(
    img_size=[32, 32], patch_size=8, in_chans=3, num_classes=10, embed_dim=16, depth=2,
    num_heads=2, mlp_ratio=4.0, qkv_bias=True, use_abs_pos_emb=False, rel_pos_bias='per_block',
    layer_scale=True, global_pool='avg', norm_eps=1e-6,
)

CASES = OrderedDict([
    # BEiT-v2 classifier: no abs pos, per-block RPB, layer scale, mean pooling + fc_norm.
    ('v2_avg', dict(seed=1001, config=dict(BASE),
                    layouts=('timm.safetensors', 'timm.pth', 'timm.bin', 'mmpretrain.pth', 'unilm.pth'))),
    # BEiT-v1 style: CLS pooling + final norm, abs pos embed, no layer scale, non-square grid.
    ('v1_token', dict(seed=1002, config=dict(BASE, img_size=[32, 48], num_heads=4, num_classes=7,
                                             use_abs_pos_emb=True, layer_scale=False, global_pool='token'),
                      layouts=('timm.safetensors', 'timm.pth', 'timm.bin', 'mmpretrain.pth', 'unilm.pth'))),
    # One table shared by all blocks (MIM pretraining layout), written as a unilm pretraining checkpoint.
    ('shared', dict(seed=1003, config=dict(BASE, rel_pos_bias='shared'),
                    layouts=('timm.safetensors', 'unilm_pretrain.pth'))),
])

RESIZE_IMG = [48, 48]       # v2_avg weights evaluated on a 6x6 grid
RESIZE_SEED = 2001
TABLE_27_47_SEED = 2002
INPUT_SEED_OFFSET = 500000  # input batch generator seed = case seed + offset

# End-to-end case: a v2-style model at ImageNet resolution run on the bundled photos (sorted by file name)
# after torchvision's eval preprocessing. Only the logits are stored (the inputs would be 2.4 MB).
PHOTOS = dict(
    seed=1004,
    config=dict(BASE, img_size=[224, 224], patch_size=16,
                mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], crop_pct=0.875),
    # output key -> Resize() size (shorter side); crop 224. 256 = 224 / 0.875, 248 = floor(224 / 0.9) (timm)
    resize={'logits_0875': 256, 'logits_09': 248},
)


def build_timm(cfg):
    """A timm ``Beit`` for one of our configs, non-fused attention, eval mode."""
    rpb = cfg['rel_pos_bias']
    model = Beit(
        img_size=tuple(cfg['img_size']),
        patch_size=cfg['patch_size'],
        in_chans=cfg['in_chans'],
        num_classes=cfg['num_classes'],
        global_pool=cfg['global_pool'],
        embed_dim=cfg['embed_dim'],
        depth=cfg['depth'],
        num_heads=cfg['num_heads'],
        qkv_bias=cfg['qkv_bias'],
        mlp_ratio=cfg['mlp_ratio'],
        init_values=0.1 if cfg['layer_scale'] else None,
        use_abs_pos_emb=cfg['use_abs_pos_emb'],
        use_rel_pos_bias=rpb == 'per_block',
        use_shared_rel_pos_bias=rpb == 'shared',
    )
    for m in model.modules():
        if hasattr(m, 'fused_attn'):
            m.fused_attn = False
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            assert m.eps == cfg['norm_eps'], m.eps
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Non-degenerate random weights
# ---------------------------------------------------------------------------------------------

def _normal(shape, std, gen, mean=0.0):
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean


def randomize_(model, seed):
    """Re-initialise every parameter with O(0.02..1) seeded random values.

    Linear/conv weights ~ N(0, 1/fan_in) keep activations O(1); biases, LN affine params,
    q/v biases, layer-scale gammas, tables, cls token and pos embed are all non-trivial so that
    each of them changes the outputs measurably (checked by ``check_sensitivity``).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit('.', 1)[-1]
            shape = p.shape
            if name.endswith('relative_position_bias_table'):
                v = _normal(shape, 0.5, gen)
            elif leaf in ('gamma_1', 'gamma_2'):
                v = _normal(shape, 0.2, gen, mean=0.3)
            elif leaf in ('q_bias', 'v_bias'):
                v = _normal(shape, 0.2, gen)
            elif leaf == 'cls_token':
                v = _normal(shape, 1.0, gen)
            elif leaf == 'pos_embed':
                v = _normal(shape, 0.5, gen)
            elif p.ndim == 1 and _is_norm_param(model, name):
                v = _normal(shape, 0.1, gen, mean=1.0 if leaf == 'weight' else 0.0)
            elif leaf == 'weight':   # Linear (out, in) or Conv2d (out, in, kh, kw)
                fan_in = int(np.prod(shape[1:]))
                v = _normal(shape, 1.0 / math.sqrt(fan_in), gen)
            elif leaf == 'bias':
                v = _normal(shape, 0.1, gen)
            else:
                raise RuntimeError(f'unhandled parameter {name}')
            p.copy_(v)


def _is_norm_param(model, name):
    return isinstance(model.get_submodule(name.rsplit('.', 1)[0]), torch.nn.LayerNorm)


# ---------------------------------------------------------------------------------------------
# Running the model
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def run_reference(model, x):
    """logits, pre_logits, features and raw per-block outputs (hooks, no norm)."""
    captured = {}
    hooks = [blk.register_forward_hook(
        lambda _m, _inp, out, i=i: captured.__setitem__(i, out.detach().clone()))
        for i, blk in enumerate(model.blocks)]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    features = model.forward_features(x)
    pre_logits = model.forward_head(features, pre_logits=True)
    logits2 = model.forward_head(features)
    assert torch.equal(logits, logits2), 'forward() and forward_head(forward_features()) disagree'
    out = OrderedDict(input=x, logits=logits, pre_logits=pre_logits, features=features)
    for i in range(len(model.blocks)):
        out[f'block.{i}'] = captured[i]
    return out


def make_input(cfg, seed):
    gen = torch.Generator().manual_seed(seed)
    h, w = cfg['img_size']
    return torch.randn((BATCH, cfg['in_chans'], h, w), generator=gen, dtype=torch.float32)


@torch.no_grad()
def check_sensitivity(model, x, min_change=1e-4):
    """Every parameter tensor (and the 3 CLS rows of every table) must move logits/features."""
    base = model(x), model.forward_features(x)
    gen = torch.Generator().manual_seed(7)
    weak = []

    def probe(label, p, mask=None):
        saved = p.detach().clone()
        delta = torch.randn(p.shape, generator=gen) * 0.05
        if mask is not None:
            delta = delta * mask
        p.add_(delta)
        new = model(x), model.forward_features(x)
        p.copy_(saved)
        change = max((a - b).abs().max().item() for a, b in zip(base, new))
        if change < min_change:
            weak.append((label, change))

    for name, p in model.named_parameters():
        probe(name, p)
        if name.endswith('relative_position_bias_table'):
            mask = torch.zeros_like(p)
            for r in (-3, -2, -1):
                m = mask.clone()
                m[r] = 1.0
                probe(f'{name}[{r}]', p, m)
    assert not weak, f'parameters with no measurable influence: {weak}'
    # un-perturbed model must be unchanged
    assert torch.equal(model(x), base[0])


# ---------------------------------------------------------------------------------------------
# Layout conversions
# ---------------------------------------------------------------------------------------------

def contiguous_sd(sd):
    return OrderedDict((k, v.detach().clone().contiguous()) for k, v in sd.items())


def timm_to_mmpretrain(sd, cfg):
    """timm/unilm classifier names -> MMPretrain ``ImageClassifier(BEiTViT, LinearClsHead)`` names.

    Adds the (persistent in MMPretrain) ``relative_position_index`` buffers.
    """
    grid = grid_size(cfg)
    out = OrderedDict()
    for k, v in sd.items():
        if k == 'head.weight' or k == 'head.bias':
            nk = 'head.fc.' + k.split('.')[-1]
        elif k.startswith('fc_norm.'):
            nk = 'backbone.ln2.' + k[len('fc_norm.'):]
        elif k.startswith('norm.'):
            nk = 'backbone.ln1.' + k[len('norm.'):]
        elif k.startswith('patch_embed.proj.'):
            nk = 'backbone.patch_embed.projection.' + k[len('patch_embed.proj.'):]
        elif k.startswith('blocks.'):
            _, i, rest = k.split('.', 2)
            rest = (rest.replace('norm1.', 'ln1.').replace('norm2.', 'ln2.')
                    .replace('mlp.fc1.', 'ffn.layers.0.0.').replace('mlp.fc2.', 'ffn.layers.1.'))
            nk = f'backbone.layers.{i}.{rest}'
        else:  # cls_token, pos_embed, rel_pos_bias.*
            nk = 'backbone.' + k
        out[nk] = v
        if nk.endswith('attn.relative_position_bias_table'):
            out[nk.replace('bias_table', 'index')] = gen_relative_position_index(grid)
    return out


def mmpretrain_to_timm(sd):
    """Inverse of ``timm_to_mmpretrain`` (drops ``relative_position_index``); used for verification."""
    out = OrderedDict()
    for k, v in sd.items():
        if 'relative_position_index' in k:
            continue
        if k.startswith('head.fc.'):
            nk = 'head.' + k[len('head.fc.'):]
        elif k.startswith('backbone.ln2.'):
            nk = 'fc_norm.' + k[len('backbone.ln2.'):]
        elif k.startswith('backbone.ln1.'):
            nk = 'norm.' + k[len('backbone.ln1.'):]
        elif k.startswith('backbone.patch_embed.projection.'):
            nk = 'patch_embed.proj.' + k[len('backbone.patch_embed.projection.'):]
        elif k.startswith('backbone.layers.'):
            _, _, i, rest = k.split('.', 3)
            rest = (rest.replace('ln1.', 'norm1.').replace('ln2.', 'norm2.')
                    .replace('ffn.layers.0.0.', 'mlp.fc1.').replace('ffn.layers.1.', 'mlp.fc2.'))
            nk = f'blocks.{i}.{rest}'
        elif k.startswith('backbone.'):
            nk = k[len('backbone.'):]
        else:
            raise KeyError(k)
        out[nk] = v
    return out


def timm_to_unilm(sd, cfg):
    """unilm fine-tuned classifier names are timm's, plus ``blocks.i.attn.relative_position_index``."""
    grid = grid_size(cfg)
    out = OrderedDict()
    for k, v in sd.items():
        out[k] = v
        if k.endswith('relative_position_bias_table'):
            out[k.replace('bias_table', 'index')] = gen_relative_position_index(grid)
    return out


def unilm_args(cfg, pretrain=False):
    """An argparse.Namespace like the one unilm's ``utils.save_model`` stores under 'args'."""
    return argparse.Namespace(
        model='beit_tiny_fixture', input_size=cfg['img_size'][0], nb_classes=cfg['num_classes'],
        rel_pos_bias=cfg['rel_pos_bias'] != 'none', abs_pos_emb=cfg['use_abs_pos_emb'],
        layer_scale_init_value=0.1 if cfg['layer_scale'] else 0.0,
        use_mean_pooling=cfg['global_pool'] == 'avg', use_cls=cfg['global_pool'] == 'token',
        lr=5e-4, layer_decay=0.6, drop_path=0.1, epochs=100, batch_size=128, seed=0,
        output_dir='./output', model_key='model|module', model_prefix='', pretrain=pretrain,
    )


def unilm_pretrain_sd(sd, cfg, seed):
    """unilm MIM-pretraining layout for the 'shared' case (plus the classifier keys).

    Order follows ``VisionTransformerForMaskedImageModelingCLS``; pretraining-only extras
    (mask_token, lm_head, final norm) must be ignored by a classifier loader.
    """
    gen = torch.Generator().manual_seed(seed)
    C = cfg['embed_dim']
    extras = OrderedDict([
        ('mask_token', _normal((1, 1, C), 1.0, gen)),
        ('norm.weight', _normal((C,), 0.1, gen, mean=1.0)),
        ('norm.bias', _normal((C,), 0.1, gen)),
        ('lm_head.weight', _normal((64, C), 1.0 / math.sqrt(C), gen)),
        ('lm_head.bias', _normal((64,), 0.1, gen)),
    ])
    out = OrderedDict()
    out['cls_token'] = sd['cls_token']
    out['mask_token'] = extras['mask_token']
    for k, v in sd.items():
        if k.startswith('patch_embed.'):
            out[k] = v
    out['rel_pos_bias.relative_position_bias_table'] = sd['rel_pos_bias.relative_position_bias_table']
    out['rel_pos_bias.relative_position_index'] = gen_relative_position_index(grid_size(cfg))
    for k, v in sd.items():
        if k.startswith('blocks.'):
            out[k] = v
    for k in ('norm.weight', 'norm.bias', 'lm_head.weight', 'lm_head.bias'):
        out[k] = extras[k]
    for k, v in sd.items():
        if k.startswith('fc_norm.') or k.startswith('head.'):
            out[k] = v
    missing = set(sd) - set(out)
    assert not missing, missing
    return out


def grid_size(cfg):
    return (cfg['img_size'][0] // cfg['patch_size'], cfg['img_size'][1] // cfg['patch_size'])


# ---------------------------------------------------------------------------------------------
# Relative position bias table resize
# ---------------------------------------------------------------------------------------------

def geometric_source_positions(src, dst):
    """unilm/mmpretrain/timm source grid (spec B.2): q is the last bisection midpoint."""
    left, right = 1.01, 1.5
    q = None
    while right - left > 1e-6:
        q = (left + right) / 2.0
        gp = (1.0 - q ** (src // 2)) / (1.0 - q)
        if gp > dst // 2:
            right = q
        else:
            left = q
    dis = []
    cur = 1
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(dis)] + [0] + dis, q


def resize_table_cubic(table, src_window, dst_window):
    """unilm/mmpretrain resize: geometric source grid, interp2d(kind='cubic') per head.

    ``interp2d(x, y, Z, kind='cubic')(tx, ty)`` is reproduced with
    ``RectBivariateSpline(x, y, Z.T, kx=3, ky=3, s=0)(tx, ty).T`` (spec B.3); interp2d was removed
    in SciPy 1.14. Z is float32 (as unilm's ``.float().numpy()``), targets are float64 numpy, the
    float64 result is rounded to float32. The last 3 rows (CLS entries) are copied unchanged.
    """
    src = (2 * src_window[0] - 1, 2 * src_window[1] - 1)
    dst = (2 * dst_window[0] - 1, 2 * dst_window[1] - 1)
    L_src, heads = table.shape
    assert L_src == src[0] * src[1] + 3
    extra = table[-3:, :]
    body = table[:-3, :]
    y, _ = geometric_source_positions(src[0], dst[0])
    x, _ = geometric_source_positions(src[1], dst[1])
    ty_half = dst[0] // 2
    tx_half = dst[1] // 2
    dy = np.arange(-ty_half, ty_half + 0.1, 1.0)
    dx = np.arange(-tx_half, tx_half + 0.1, 1.0)
    cols = []
    for h in range(heads):
        z = body[:, h].reshape(src[0], src[1]).float().numpy()   # z[row=y(dh), col=x(dw)]
        f = RectBivariateSpline(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64),
                                z.T, kx=3, ky=3, s=0)
        r = f(dx, dy).T                                            # [ty, tx]
        cols.append(torch.tensor(np.ascontiguousarray(r), dtype=torch.float32).reshape(-1, 1))
    return torch.cat([torch.cat(cols, dim=1), extra], dim=0).contiguous()


def check_against_interp2d(table, cubic, src_window, dst_window):
    """With SciPy < 1.14 (interp2d still present) compare with unilm's original call bit-exactly."""
    import warnings
    from scipy import interpolate
    src = 2 * src_window[0] - 1
    dst = 2 * dst_window[0] - 1
    pos, _ = geometric_source_positions(src, dst)
    t = dst // 2.0
    dx = np.arange(-t, t + 0.1, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try:
            interpolate.interp2d([0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0], np.zeros((4, 4)), kind='cubic')
        except (AttributeError, NotImplementedError):   # removed in SciPy 1.14 (a stub that raises)
            return False
        for h in range(table.shape[1]):
            z = table[:-3, h].reshape(src, src).float().numpy()
            f = interpolate.interp2d(pos, pos, z, kind='cubic')
            r = torch.Tensor(f(dx, dx)).contiguous().view(-1)
            assert torch.equal(r, cubic[:-3, h]), 'cubic resize differs from interp2d'
    return True


def resize_table_linear(table, dst_window):
    """timm default (RegularGridInterpolator, linear) as used by its checkpoint_filter_fn."""
    L_dst = (2 * dst_window[0] - 1) * (2 * dst_window[1] - 1) + 3
    return resize_rel_pos_bias_table(table, new_window_size=tuple(dst_window),
                                     new_bias_shape=(L_dst, table.shape[1]))


def linear_reference_numpy(table, src_window, dst_window):
    """Independent float64 re-implementation of timm's linear resize (verification only).

    Square windows only. timm's RegularGridInterpolator is separable bilinear on the uneven grid;
    targets outside the source range take the edge value (clamped). Agrees with timm's float32
    result to ~1e-7.
    """
    src = 2 * src_window[0] - 1
    dst = 2 * dst_window[0] - 1
    pos, _ = geometric_source_positions(src, dst)
    p = np.asarray(pos, dtype=np.float32).astype(np.float64)  # timm: torch.tensor(list) -> float32
    t = np.arange(-(dst // 2), dst // 2 + 0.1, 1.0)

    def weights(tv):
        tc = np.clip(tv, p[0], p[-1])
        j = np.searchsorted(p, tc, side='left')
        j = np.clip(j, 1, len(p) - 1)
        w = (tc - p[j - 1]) / (p[j] - p[j - 1])
        return j - 1, j, w

    i0, i1, wy = weights(t)
    body = table[:-3].double().numpy()
    out = np.zeros((dst * dst, table.shape[1]))
    for h in range(table.shape[1]):
        Z = body[:, h].reshape(src, src)
        rows = Z[i0] * (1 - wy)[:, None] + Z[i1] * wy[:, None]           # interpolate dh
        R = rows[:, i0] * (1 - wy)[None, :] + rows[:, i1] * wy[None, :]   # interpolate dw
        out[:, h] = R.reshape(-1)
    return np.concatenate([out, table[-3:].double().numpy()], axis=0)


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------

def save_safetensors(tensors, path, metadata=None):
    safetensors.torch.save_file(contiguous_sd(tensors), str(path), metadata=metadata)


def write_json(obj, path):
    path.write_text(json.dumps(obj, indent=2) + '\n')


def write_case(out_dir, name, spec, verify):
    cfg = spec['config']
    case_dir = out_dir / name
    case_dir.mkdir(parents=True, exist_ok=True)
    model = build_timm(cfg)
    randomize_(model, spec['seed'])
    x = make_input(cfg, spec['seed'] + INPUT_SEED_OFFSET)
    ref = run_reference(model, x)
    if verify:
        check_sensitivity(model, x)

    sd = contiguous_sd(model.state_dict())
    write_json(cfg, case_dir / 'config.json')
    for layout in spec['layouts']:
        path = case_dir / layout
        if layout == 'timm.safetensors':
            save_safetensors(sd, path, metadata={'format': 'pt'})
        elif layout == 'timm.pth':
            torch.save(model.state_dict(), path)
        elif layout == 'timm.bin':
            # HF-style pytorch_model.bin is the same torch.save zip; written through a file object so the
            # archive's root folder is 'archive/' (torch.save(path) names it after the file stem).
            buf = io.BytesIO()
            torch.save(model.state_dict(), buf)
            path.write_bytes(buf.getvalue())
        elif layout == 'mmpretrain.pth':
            torch.save({
                'meta': {
                    'epoch': 100, 'iter': 125100, 'mmengine_version': '0.10.4',
                    'dataset_meta': {'classes': [f'class_{i}' for i in range(cfg['num_classes'])]},
                    'seed': 0, 'experiment_name': 'beit_tiny_fixture',
                },
                'state_dict': timm_to_mmpretrain(sd, cfg),
            }, path)
        elif layout == 'unilm.pth':
            torch.save({'model': timm_to_unilm(sd, cfg), 'args': unilm_args(cfg), 'epoch': 99}, path)
        elif layout == 'unilm_pretrain.pth':
            torch.save({'model': unilm_pretrain_sd(sd, cfg, spec['seed'] + 1)}, case_dir / 'unilm.pth')
        else:
            raise ValueError(layout)
    save_safetensors(ref, case_dir / 'io.safetensors')

    if verify:
        verify_case(case_dir, cfg, ref)
    return model, sd, ref


@torch.no_grad()
def verify_case(case_dir, cfg, ref):
    """Reload every written layout into a fresh timm model and compare the logits bit-exactly."""
    x = ref['input']

    def logits_from(state_dict, strict=True):
        m = build_timm(cfg)
        missing, unexpected = m.load_state_dict(state_dict, strict=strict)
        return m(x), missing, unexpected

    st = safetensors.torch.load_file(str(case_dir / 'timm.safetensors'))
    got, _, _ = logits_from(st)
    assert torch.equal(got, ref['logits']), 'timm.safetensors round trip'
    io_back = safetensors.torch.load_file(str(case_dir / 'io.safetensors'))
    assert all(torch.equal(io_back[k], v) for k, v in ref.items())

    for f in ('timm.pth', 'timm.bin'):
        if (case_dir / f).exists():
            sd = torch.load(case_dir / f, weights_only=True)
            assert torch.equal(logits_from(sd)[0], ref['logits']), f
    if (case_dir / 'mmpretrain.pth').exists():
        ck = torch.load(case_dir / 'mmpretrain.pth', weights_only=True)
        back = mmpretrain_to_timm(ck['state_dict'])
        assert set(back) == set(st), 'mmpretrain inverse keys'
        assert all(torch.equal(back[k], st[k]) for k in st), 'mmpretrain inverse values'
        for k, v in ck['state_dict'].items():
            if 'relative_position_index' in k:
                assert v.dtype == torch.int64 and torch.equal(v, gen_relative_position_index(grid_size(cfg)))
        assert torch.equal(logits_from(back)[0], ref['logits']), 'mmpretrain.pth'
    if (case_dir / 'unilm.pth').exists():
        ck = torch.load(case_dir / 'unilm.pth', weights_only=False)
        filtered = checkpoint_filter_fn(ck, build_timm(cfg))   # drops relative_position_index
        if cfg['rel_pos_bias'] == 'shared':
            for k in ('mask_token', 'norm.weight', 'norm.bias', 'lm_head.weight', 'lm_head.bias'):
                filtered.pop(k)
        assert torch.equal(logits_from(filtered)[0], ref['logits']), 'unilm.pth'
    if cfg['rel_pos_bias'] == 'shared':
        # The same weights loaded into a per-block model (table cloned into every block) give identical logits.
        pb_cfg = dict(cfg, rel_pos_bias='per_block')
        table = st['rel_pos_bias.relative_position_bias_table']
        pb = OrderedDict((k, v) for k, v in st.items() if not k.startswith('rel_pos_bias.'))
        for i in range(cfg['depth']):
            pb[f'blocks.{i}.attn.relative_position_bias_table'] = table.clone()
        m = build_timm(pb_cfg)
        m.load_state_dict(pb)
        assert torch.equal(m(x), ref['logits']), 'shared -> per-block logits differ'


def photo_paths():
    paths = sorted(PHOTOS_DIR.glob('*.png'), key=lambda p: p.name)
    assert [p.stem for p in paths] == ['astronaut', 'chelsea', 'coffee', 'rocket'], paths
    return paths


def photo_batch(paths, resize, crop):
    """torchvision eval preprocessing (PIL path): Resize(shorter side, bicubic) -> CenterCrop -> ToTensor -> Normalize."""
    tf = transforms.Compose([
        transforms.Resize(resize, interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])
    xs = []
    for p in paths:
        with Image.open(p) as im:
            xs.append(tf(im.convert('RGB')))
    return torch.stack(xs)


def write_photos(out_dir, verify):
    """``photos/``: config.json, timm.safetensors and io.safetensors with ``logits_0875``/``logits_09`` (4, K)."""
    cfg = PHOTOS['config']
    assert tuple(cfg['mean']) == IMAGENET_DEFAULT_MEAN and tuple(cfg['std']) == IMAGENET_DEFAULT_STD
    assert cfg['img_size'][0] == cfg['img_size'][1]
    crop = cfg['img_size'][0]
    assert PHOTOS['resize']['logits_0875'] == int(crop / cfg['crop_pct'])
    assert PHOTOS['resize']['logits_09'] == math.floor(crop / 0.9)
    case_dir = out_dir / 'photos'
    case_dir.mkdir(parents=True, exist_ok=True)
    model = build_timm(cfg)
    randomize_(model, PHOTOS['seed'])
    paths = photo_paths()
    inputs = OrderedDict((k, photo_batch(paths, size, crop)) for k, size in PHOTOS['resize'].items())
    with torch.no_grad():
        ref = OrderedDict((k, model(x)) for k, x in inputs.items())
    if verify:
        check_sensitivity(model, inputs['logits_0875'])

    sd = contiguous_sd(model.state_dict())
    write_json(cfg, case_dir / 'config.json')
    save_safetensors(sd, case_dir / 'timm.safetensors', metadata={'format': 'pt'})
    save_safetensors(ref, case_dir / 'io.safetensors')

    if verify:
        from timm.data import create_transform, resolve_data_config
        # timm's own eval transform for crop_pct 0.875 / 0.9 builds the same pipeline (same tensors)
        for k, pct in (('logits_0875', 0.875), ('logits_09', 0.9)):
            tf = create_transform(input_size=(3, crop, crop), crop_pct=pct, interpolation='bicubic',
                                  mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, is_training=False)
            xs = []
            for p in paths:
                with Image.open(p) as im:
                    xs.append(tf(im.convert('RGB')))
            assert torch.equal(torch.stack(xs), inputs[k]), f'timm transform differs for {k}'
        m = build_timm(cfg)
        m.load_state_dict(safetensors.torch.load_file(str(case_dir / 'timm.safetensors')))
        io_back = safetensors.torch.load_file(str(case_dir / 'io.safetensors'))
        assert list(io_back) == sorted(ref) and set(io_back) == set(ref)
        with torch.no_grad():
            for k, x in inputs.items():
                assert io_back[k].shape == (len(paths), cfg['num_classes'])
                assert torch.equal(m(x), ref[k]) and torch.equal(io_back[k], ref[k]), k
        for k, v in ref.items():
            # the four photos give clearly different predictions, and the two crops differ measurably
            spread = (v - v.mean(0, keepdim=True)).abs().max().item()
            assert spread > 0.1, f'{k}: logits barely depend on the photo ({spread})'
        d = (ref['logits_0875'] - ref['logits_09']).abs().max().item()
        assert d > 1e-3, f'crop_pct 0.875 and 0.9 logits too close ({d})'
    return model, ref


def write_resize(out_dir, v2_model, v2_sd, v2_cfg, verify):
    """Reference for evaluating the v2_avg weights at 48x48 (4x4 -> 6x6 grid, 52 -> 124 table rows)."""
    rdir = out_dir / 'resize'
    rdir.mkdir(parents=True, exist_ok=True)
    cfg = dict(v2_cfg, img_size=list(RESIZE_IMG))
    write_json(cfg, rdir / 'config.json')
    (rdir / 'source.txt').write_text('v2_avg\n')
    src_win, dst_win = grid_size(v2_cfg), grid_size(cfg)

    # (a) timm itself: checkpoint_filter_fn (what build_model_with_cfg/load_checkpoint use at another img_size)
    m_lin = build_timm(cfg)
    filtered = checkpoint_filter_fn(OrderedDict(v2_sd), m_lin)
    m_lin.load_state_dict(filtered)
    # (b) unilm/mmpretrain cubic
    cubic_sd = OrderedDict(v2_sd)
    tables = OrderedDict()
    for i in range(v2_cfg['depth']):
        k = f'blocks.{i}.attn.relative_position_bias_table'
        tables[f'blocks.{i}.linear'] = filtered[k].contiguous()
        tables[f'blocks.{i}.cubic'] = resize_table_cubic(v2_sd[k], src_win, dst_win)
        cubic_sd[k] = tables[f'blocks.{i}.cubic']
    m_cub = build_timm(cfg)
    m_cub.load_state_dict(cubic_sd)

    x = make_input(cfg, RESIZE_SEED)
    with torch.no_grad():
        lin, cub = m_lin(x), m_cub(x)
    save_safetensors(tables, rdir / 'tables.safetensors')
    save_safetensors(OrderedDict(input=x, logits_linear=lin, logits_cubic=cub), rdir / 'io.safetensors')

    # 27 -> 47 (224 px -> 384 px at patch 16), real geometric progression
    gen = torch.Generator().manual_seed(TABLE_27_47_SEED)
    src = _normal((732, 2), 0.5, gen)
    big = OrderedDict(source=src,
                      linear=resize_table_linear(src, (24, 24)),
                      cubic=resize_table_cubic(src, (14, 14), (24, 24)))
    save_safetensors(big, rdir / 'tables_27_47.safetensors')

    if verify:
        # timm's two code paths (checkpoint filter vs set_input_size) agree
        m_set = build_timm(v2_cfg)
        m_set.load_state_dict(v2_sd)
        m_set.set_input_size(img_size=tuple(RESIZE_IMG))
        for i in range(v2_cfg['depth']):
            assert torch.equal(m_set.blocks[i].attn.relative_position_bias_table, tables[f'blocks.{i}.linear'])
            assert tables[f'blocks.{i}.linear'].shape == (124, v2_cfg['num_heads'])
            assert torch.equal(tables[f'blocks.{i}.cubic'][-3:], v2_sd[f'blocks.{i}.attn.relative_position_bias_table'][-3:])
            ref_np = linear_reference_numpy(v2_sd[f'blocks.{i}.attn.relative_position_bias_table'], src_win, dst_win)
            assert np.abs(ref_np - tables[f'blocks.{i}.linear'].double().numpy()).max() < 1e-5
        ref_np = linear_reference_numpy(src, (14, 14), (24, 24))
        assert np.abs(ref_np - big['linear'].double().numpy()).max() < 1e-5
        _, q = geometric_source_positions(27, 47)
        assert abs(q - 1.090307446) < 1e-9, q
        check_against_interp2d(src, big['cubic'], (14, 14), (24, 24))
        diff = (lin - cub).abs().max().item()
        assert diff > 1e-3, f'linear and cubic logits too close ({diff})'
        assert (big['linear'] - big['cubic']).abs().max().item() > 1e-3
    return lin, cub, big


def write_rel_index(out_dir):
    t = OrderedDict(index_14x14=gen_relative_position_index((14, 14)),
                    index_4x6=gen_relative_position_index((4, 6)))
    for v in t.values():
        assert v.dtype == torch.int64
    i14 = t['index_14x14']
    # spec A.3 worked values
    assert (i14[1, 1], i14[1, 2], i14[2, 1], i14[1, 15], i14[1, 196], i14[196, 1]) == (364, 363, 365, 337, 0, 728)
    assert (i14[0, 5], i14[5, 0], i14[0, 0]) == (729, 730, 731)
    save_safetensors(t, out_dir / 'rel_index.safetensors')
    return t


def versions():
    return OrderedDict(python=platform.python_version(), torch=torch.__version__, timm=timm.__version__,
                       torchvision=torchvision.__version__, pillow=PIL.__version__, scipy=scipy.__version__, numpy=np.__version__, safetensors=safetensors.__version__)


README_TEMPLATE = """# Reference fixtures (generated — do not edit by hand)

Generated by `tools/make_fixtures.py` from tiny random-weight timm `Beit` models
(`timm.models.beit.Beit`, non-fused attention, CPU, float32, fixed seeds).

Regenerate from the repository root:

    pip install -r tools/requirements.txt
    python tools/make_fixtures.py

Versions used for the files in this folder:

{versions}

## Layout

The models are deliberately tiny (embed dim 16, depth 2, mlp ratio 4) to keep this folder near
1.2 MB. All parameters (incl. layer-scale gammas, LayerNorm affine, q/v biases, tables, cls
token, pos embed) are re-initialised with seeded O(0.1..1) values; the generator checks that a
small perturbation of every parameter tensor, and of each of the 3 CLS rows of every table,
changes the logits or features measurably.

Each model folder holds `config.json` (beitv2's config format), the same weights in several
checkpoint layouts, and `io.safetensors` with the reference input/outputs.

| case | model | files |
|---|---|---|
{cases}

Weight layouts (all hold the same float32 weights):

* `timm.safetensors` — timm `state_dict()` (no `relative_position_index`, no `k_bias`: both are
  non-persistent buffers in timm).
* `timm.pth` — `torch.save(model.state_dict())` (zip format; archive root folder `timm/`).
* `timm.bin` — same as `timm.pth`, written through a file object (archive root folder `archive/`),
  like an HF `pytorch_model.bin`.
* `mmpretrain.pth` — `{{'meta': {{...}}, 'state_dict': ...}}` with MMPretrain names
  (`backbone.` prefix, `layers.i`, `ln1`/`ln2`, `ffn.layers.0.0`/`ffn.layers.1`,
  `patch_embed.projection`, top-level `backbone.ln2` = `fc_norm` (avg pooling) or
  `backbone.ln1` = final `norm` (token pooling), `head.fc.*`) and int64
  `backbone.layers.i.attn.relative_position_index` buffers.
* `unilm.pth` — `{{'model': state_dict, 'args': argparse.Namespace, 'epoch': 99}}` with timm/unilm
  names plus int64 `blocks.i.attn.relative_position_index`. In `shared/` it is the unilm MIM
  pretraining layout `{{'model': ...}}` with `rel_pos_bias.relative_position_bias_table`/`_index`,
  the pretraining-only extras `mask_token`, `lm_head.*`, `norm.*` (a classifier must ignore them)
  and the classifier keys `fc_norm.*`, `head.*`.

`io.safetensors` (batch 2): `input` (B,3,H,W), `logits` (B,K), `pre_logits` (B,C) (pooled,
after `fc_norm`), `features` (B,N,C) = `forward_features` (after the final `norm` for token
pooling, identity for avg pooling), `block.i` (B,N,C) = raw output tokens of block i.

## photos/

End-to-end reference: a v2-style model at 224x224 (patch 16, 14x14 grid), randomised like the
other cases (seed {photos_seed}), run on the four bundled photos `assets/photos/*.png` in sorted file
name order (astronaut, chelsea, coffee, rocket). `config.json` adds `mean`, `std` (ImageNet
defaults) and `crop_pct` 0.875 to the usual keys. Each photo is preprocessed exactly as
torchvision does at eval time: `Image.open(p).convert('RGB')` ->
`transforms.Resize(S, interpolation=BICUBIC)` (PIL path, shorter side to S) -> `CenterCrop(224)` ->
`ToTensor()` -> `Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)`; this is also what timm's
`create_transform(..., crop_pct, interpolation='bicubic')` builds (checked). The input tensors
are not stored (size).

* `io.safetensors`: `logits_0875` (4,K) with S = 256 (crop_pct 0.875), `logits_09` (4,K) with
  S = 248 (crop_pct 0.9, timm's `floor(224 / 0.9)`).

## resize/

The `v2_avg` weights (`source.txt`) evaluated at 48x48 (grid 4x4 -> 6x6, tables 52 -> 124 rows):

* `tables.safetensors`: `blocks.i.linear` = timm `checkpoint_filter_fn` / `resize_rel_pos_bias_table`
  (geometric source grid, RegularGridInterpolator linear, default without `TIMM_USE_SCIPY_INTERP`);
  `blocks.i.cubic` = unilm/mmpretrain algorithm (geometric source grid, per-head
  `interp2d(kind='cubic')`, reproduced as `RectBivariateSpline(x, y, Z.T, kx=3, ky=3, s=0)(tx, ty).T`
  in float64 and rounded to float32; last 3 rows copied).
* `io.safetensors`: `input` (2,3,48,48), `logits_linear`, `logits_cubic`.
* `tables_27_47.safetensors`: a random (732, 2) table `source` resized 14x14 -> 24x24 windows
  (27 -> 47, q = 1.090307446) by both methods: `linear`, `cubic` (2212, 2).

Note for 4x4 -> 6x6 (7 -> 11): the bisection for q saturates at its upper bound (q -> 1.5), the
outermost source sample is at +-4.75 and the targets +-5 lie outside the source range; both
methods clamp (edge value).

The cubic tables were checked bit-identical to the original `scipy.interpolate.interp2d(kind='cubic')`
code path of unilm (run with SciPy 1.13.1, the last release that has interp2d); the linear tables
agree with an independent float64 re-implementation to ~1e-7.

`rel_index.safetensors`: timm `gen_relative_position_index((14, 14))` as `index_14x14` (197,197)
and `((4, 6))` as `index_4x6` (25,25), int64.
"""


def write_readme(out_dir):
    vs = '\n'.join(f'* {k} {v}' for k, v in versions().items())
    rows = []
    for name, spec in CASES.items():
        c = spec['config']
        desc = (f"img {c['img_size'][0]}x{c['img_size'][1]}, patch {c['patch_size']}, C {c['embed_dim']}, "
                f"depth {c['depth']}, heads {c['num_heads']}, K {c['num_classes']}, "
                f"abs pos {'on' if c['use_abs_pos_emb'] else 'off'}, RPB {c['rel_pos_bias']}, "
                f"layer scale {'on' if c['layer_scale'] else 'off'}, pool {c['global_pool']}")
        files = ['config.json'] + [('unilm.pth' if l == 'unilm_pretrain.pth' else l) for l in spec['layouts']]
        files.append('io.safetensors')
        rows.append(f"| `{name}` | {desc} | {', '.join('`%s`' % f for f in files)} |")
    c = PHOTOS['config']
    rows.append(f"| `photos` | img {c['img_size'][0]}x{c['img_size'][1]}, patch {c['patch_size']}, C {c['embed_dim']}, "
                f"depth {c['depth']}, heads {c['num_heads']}, K {c['num_classes']}, abs pos off, RPB per_block, "
                f"layer scale on, pool avg; photo logits at crop_pct 0.875 / 0.9 (see below) | "
                f"`config.json`, `timm.safetensors`, `io.safetensors` |")
    (out_dir / 'README.md').write_text(README_TEMPLATE.format(versions=vs, cases='\n'.join(rows),
                                                              photos_seed=PHOTOS['seed']))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', type=Path, default=DEFAULT_OUT)
    ap.add_argument('--no-verify', action='store_true', help='skip the self-checks')
    args = ap.parse_args()
    verify = not args.no_verify

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    for k, v in versions().items():
        print(f'{k:12s} {v}')

    built = {}
    for name, spec in CASES.items():
        model, sd, ref = write_case(out_dir, name, spec, verify)
        built[name] = (model, sd, spec['config'])
        print(f'{name:10s} logits[0]={ref["logits"][0, :4].tolist()}')
    lin, cub, _ = write_resize(out_dir, *built['v2_avg'], verify=verify)
    print(f'resize     max|linear-cubic| logits = {(lin - cub).abs().max().item():.4g}')
    write_rel_index(out_dir)
    _, photo_ref = write_photos(out_dir, verify)
    print(f'photos     logits_0875[0]={photo_ref["logits_0875"][0, :4].tolist()}')
    write_readme(out_dir)
    total = sum(p.stat().st_size for p in out_dir.rglob('*') if p.is_file())
    print(f'wrote {out_dir} ({total / 1024:.1f} KiB){" (verified)" if verify else ""}')


if __name__ == '__main__':
    main()
