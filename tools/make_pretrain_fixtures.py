#!/usr/bin/env python3
"""Reference fixtures for BEiT v2 masked image modeling (spec F).

The reference model is a port of unilm ``beit2/modeling_pretrain.py``
``VisionTransformerForMaskedImageModelingCLS`` (shared_lm_head=True, shared relative position
bias, no absolute position embedding) built on timm's BEiT ``Block`` / ``RelativePositionBias`` /
``PatchEmbed``, so its state_dict uses unilm's key names. A tiny random-weight model is run on
fixed images, a fixed mask and fixed targets (CPU, float32, one thread, non-fused attention):

    logits_1, logits_2 = model(x, bool_masked_pos)        # main branch, patch-aggregation branch
    loss = CE(logits_1, labels) + CE(logits_2, labels)     # engine_for_pretraining.train_one_epoch
    loss.backward(); clip_grad_norm_(3.0); AdamW.step()    # 3 steps, unilm parameter groups

Parameter groups are unilm ``optim_factory.get_parameter_groups`` with ``skip_list =
model.no_weight_decay() = {pos_embed, cls_token}``: no decay for ndim <= 1, names ending in
``.bias`` and the skip list; the mask token and the shared table *are* decayed.

Also writes block-wise masking statistics of unilm's ``MaskingGenerator`` (beit2 version, with
its exact-count fix-up), ported here line by line on Python's ``random`` and numpy.

Writes ``tests/fixtures/pretrain/``:

* ``config.json``          our ``MimConfig`` (backbone config + early/head layers + vocab)
* ``recipe.json``          optimisation settings, the lr of each step
* ``groups.json``          weight decay per parameter name (unilm rule)
* ``init.safetensors``     state_dict before training (unilm names, no index buffers)
* ``io.safetensors``       ``input``, ``mask`` (B, P) f32, ``labels`` (M,) int64, ``logits_main``,
                           ``logits_agg``, ``loss_main``, ``loss_agg``, ``acc_main``, ``acc_agg``,
                           ``grad.<name>`` (step-0 gradients of every parameter, before clipping), ``step{k}.loss``,
                           ``step{k}.grad_norm``, ``final.<name>`` (every parameter after 3 steps)
* ``unilm_pt.pth``         the initial weights as a unilm pretraining checkpoint
                           (``{'model': state_dict}`` with ``relative_position_index`` buffers)
* ``mmpretrain_pt.pth``    the same weights in mmpretrain's ``BEiT`` selfsup layout
                           (``backbone.*``, ``neck.patch_aggregation.*``, ``neck.norm.*``, ``head.cls_head.*``)
* ``masking.json``         statistics of 20000 reference masks for two generator settings

Usage:  python tools/make_pretrain_fixtures.py [--out tests/fixtures/pretrain]
"""
import os

os.environ['TIMM_FUSED_ATTN'] = '0'

import argparse
import json
import math
import random
import sys
from collections import OrderedDict
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.beit import Block, RelativePositionBias

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import REPO_ROOT, save_safetensors, versions, write_json  # noqa: E402

DEFAULT_OUT = REPO_ROOT / 'tests' / 'fixtures' / 'pretrain'

BACKBONE = dict(
    img_size=[32, 32], patch_size=8, in_chans=3, num_classes=0, embed_dim=16, depth=3,
    num_heads=2, mlp_ratio=4.0, qkv_bias=True, use_abs_pos_emb=False, rel_pos_bias='shared',
    layer_scale=True, global_pool='token', norm_eps=1e-6,
)
MIM = dict(early_layers=2, head_layers=2, vocab_size=24, layer_scale_init=0.1)
BATCH = 2
NUM_MASK = 6
MODEL_SEED = 4001
DATA_SEED = 4002
RECIPE = OrderedDict(
    lr_per_step=[5e-3, 3e-3, 1e-3],
    weight_decay=0.05, betas=[0.9, 0.98], eps=1e-8, clip_grad=3.0,
)


class MimCls(nn.Module):
    """unilm ``VisionTransformerForMaskedImageModelingCLS`` (shared_lm_head=True) on timm blocks."""

    def __init__(self, b, m, fused_attn=False):
        super().__init__()
        c, depth, heads = b['embed_dim'], b['depth'], b['num_heads']
        norm = partial(nn.LayerNorm, eps=b['norm_eps'])
        self.patch_embed = PatchEmbed(img_size=tuple(b['img_size']), patch_size=b['patch_size'],
                                      in_chans=b['in_chans'], embed_dim=c)
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c))
        self.rel_pos_bias = RelativePositionBias(window_size=grid, num_heads=heads)
        blk = lambda dp: Block(dim=c, num_heads=heads, qkv_bias=True, mlp_ratio=b['mlp_ratio'],  # noqa: E731
                               drop_path=dp, init_values=m['layer_scale_init'], norm_layer=norm,
                               window_size=None)
        self.blocks = nn.ModuleList([blk(0.0) for _ in range(depth)])
        self.norm = norm(c)
        self.lm_head = nn.Linear(c, m['vocab_size'])
        self.early_layers = m['early_layers']
        self.cls_pt_layers = nn.ModuleList([blk(0.0) for _ in range(m['head_layers'])])
        for mod in self.modules():
            if hasattr(mod, 'fused_attn'):
                mod.fused_attn = fused_attn

    def forward(self, x, bool_masked_pos):
        x = self.patch_embed(x)
        b, n, _ = x.shape
        w = bool_masked_pos.unsqueeze(-1).type_as(x)
        x = x * (1 - w) + self.mask_token.expand(b, n, -1) * w
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        rpb = self.rel_pos_bias()
        early = None
        for i, blk in enumerate(self.blocks):
            x = blk(x, shared_rel_pos_bias=rpb)
            if i + 1 == self.early_layers:
                early = x[:, 1:]
        x_cls_pt = torch.cat([x[:, [0]], early], dim=1)
        for blk in self.cls_pt_layers:
            x_cls_pt = blk(x_cls_pt, shared_rel_pos_bias=rpb)
        x, x_cls_pt = self.norm(x)[:, 1:], self.norm(x_cls_pt)[:, 1:]
        return self.lm_head(x[bool_masked_pos]), self.lm_head(x_cls_pt[bool_masked_pos])


def randomize_(model, seed):
    """Seeded O(0.1..1) values for every parameter, so that each one matters."""
    gen = torch.Generator().manual_seed(seed)
    normal = lambda shape, std, mean=0.0: torch.randn(shape, generator=gen) * std + mean  # noqa: E731
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit('.', 1)[-1]
            owner = model.get_submodule(name.rsplit('.', 1)[0]) if '.' in name else model
            if name.endswith('relative_position_bias_table'):
                v = normal(p.shape, 0.5)
            elif leaf in ('gamma_1', 'gamma_2'):
                v = normal(p.shape, 0.2, 0.3)
            elif leaf in ('q_bias', 'v_bias', 'bias') and not isinstance(owner, nn.LayerNorm):
                v = normal(p.shape, 0.2)
            elif leaf in ('cls_token', 'mask_token'):
                v = normal(p.shape, 1.0)
            elif isinstance(owner, nn.LayerNorm):
                v = normal(p.shape, 0.1, 1.0 if leaf == 'weight' else 0.0)
            elif leaf == 'weight':
                v = normal(p.shape, 1.0 / math.sqrt(int(np.prod(p.shape[1:]))))
            else:
                raise RuntimeError(f'unhandled parameter {name}')
            p.copy_(v)


def param_groups(model):
    """unilm ``get_parameter_groups(model, weight_decay, skip_list={'pos_embed', 'cls_token'})``."""
    skip = {'pos_embed', 'cls_token'}
    out = OrderedDict()
    for name, p in model.named_parameters():
        no_decay = len(p.shape) == 1 or name.endswith('.bias') or name in skip
        out[name] = 0.0 if no_decay else RECIPE['weight_decay']
    return out


class MaskingGenerator:
    """unilm ``beit2/masking_generator.py`` ``MaskingGenerator``, ported line by line, plus a record
    of how many patches each successful block attempt added."""

    def __init__(self, input_size, num_masking_patches, min_num_patches=4, max_num_patches=None,
                 min_aspect=0.3, max_aspect=None):
        self.height, self.width = input_size
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.blocks = []

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for _attempt in range(10):
            target_area = random.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = random.randint(0, self.height - h)
                left = random.randint(0, self.width - w)
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self):
        mask = np.zeros(shape=(self.height, self.width), dtype=np.int32)
        mask_count = 0
        while mask_count < self.num_masking_patches:
            max_mask_patches = min(self.num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            self.blocks.append(int(delta))
            mask_count += delta
        if mask_count > self.num_masking_patches:
            delta = mask_count - self.num_masking_patches
            mask_x, mask_y = mask.nonzero()
            to_vis = np.random.choice(mask_x.shape[0], delta, replace=False)
            mask[mask_x[to_vis], mask_y[to_vis]] = 0
        elif mask_count < self.num_masking_patches:
            delta = self.num_masking_patches - mask_count
            mask_x, mask_y = (mask == 0).nonzero()
            to_mask = np.random.choice(mask_x.shape[0], delta, replace=False)
            mask[mask_x[to_mask], mask_y[to_mask]] = 1
        assert mask.sum() == self.num_masking_patches
        return mask


MASK_CASES = [
    # BEiT v2 at 224 px: 75 of 14x14, blocks of at least 16.
    dict(grid=[14, 14], num=75, min=16, samples=20000),
    # A non-square small grid (the demo's kind of size), BEiT v1's minimum block of 4.
    dict(grid=[7, 9], num=20, min=4, samples=20000),
]


def masking_stats():
    random.seed(0)
    np.random.seed(0)
    out = []
    for case in MASK_CASES:
        g = MaskingGenerator(tuple(case['grid']), case['num'], min_num_patches=case['min'])
        freq = np.zeros(case['grid'], dtype=np.float64)
        for _ in range(case['samples']):
            freq += g()
        sizes = np.bincount(np.array(g.blocks), minlength=case['num'] + 1)
        out.append(OrderedDict(
            case, block_size_hist=sizes.tolist(), blocks_per_mask=len(g.blocks) / case['samples'],
            position_freq=(freq / case['samples']).flatten().tolist()))
    return out


def to_mmpretrain(sd):
    """unilm pretraining names -> mmpretrain ``BEiT`` (BEiTPretrainViT + BEiTV2Neck + BEiTV2Head)."""
    def block(tail):
        for a, b in (('norm1.', 'ln1.'), ('norm2.', 'ln2.'), ('mlp.fc1.', 'ffn.layers.0.0.'),
                     ('mlp.fc2.', 'ffn.layers.1.')):
            if tail.startswith(a):
                return b + tail[len(a):]
        return tail
    out = OrderedDict()
    for k, v in sd.items():
        if k.startswith('blocks.'):
            i, tail = k[len('blocks.'):].split('.', 1)
            nk = f'backbone.layers.{i}.{block(tail)}'
        elif k.startswith('cls_pt_layers.'):
            i, tail = k[len('cls_pt_layers.'):].split('.', 1)
            nk = f'neck.patch_aggregation.{i}.{block(tail)}'
        elif k.startswith('norm.'):
            nk = 'neck.' + k
        elif k.startswith('lm_head.'):
            nk = 'head.cls_head.' + k[len('lm_head.'):]
        elif k.startswith('patch_embed.proj.'):
            nk = 'backbone.patch_embed.projection.' + k[len('patch_embed.proj.'):]
        else:
            nk = 'backbone.' + k
        out[nk] = v
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    model = MimCls(BACKBONE, MIM)
    randomize_(model, MODEL_SEED)
    model.train()
    params = OrderedDict((k, v) for k, v in model.named_parameters())
    init = OrderedDict((k, v.detach().clone()) for k, v in params.items())

    gen = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn((BATCH, 3, *BACKBONE['img_size']), generator=gen)
    n_patches = (BACKBONE['img_size'][0] // BACKBONE['patch_size']) * (BACKBONE['img_size'][1] // BACKBONE['patch_size'])
    mask = torch.zeros((BATCH, n_patches), dtype=torch.bool)
    for b in range(BATCH):
        mask[b, torch.randperm(n_patches, generator=gen)[:NUM_MASK]] = True
    labels = torch.randint(0, MIM['vocab_size'], (BATCH * NUM_MASK,), generator=gen)

    groups = param_groups(model)
    decay = [p for k, p in params.items() if groups[k] > 0]
    no_decay = [p for k, p in params.items() if groups[k] == 0]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=RECIPE['weight_decay']),
                             dict(params=no_decay, weight_decay=0.0)],
                            lr=RECIPE['lr_per_step'][0], betas=tuple(RECIPE['betas']), eps=RECIPE['eps'])
    ce = nn.CrossEntropyLoss()
    io = OrderedDict(input=x, mask=mask.float(), labels=labels)
    for step, lr in enumerate(RECIPE['lr_per_step']):
        for g in opt.param_groups:
            g['lr'] = lr
        l1, l2 = model(x, mask)
        loss_1, loss_2 = ce(l1, labels), ce(l2, labels)
        loss = loss_1 + loss_2
        opt.zero_grad()
        loss.backward()
        if step == 0:
            io['logits_main'] = l1.detach().clone()
            io['logits_agg'] = l2.detach().clone()
            io['loss_main'] = loss_1.detach().clone()
            io['loss_agg'] = loss_2.detach().clone()
            io['acc_main'] = torch.tensor((l1.argmax(-1) == labels).float().mean().item() * 100)
            io['acc_agg'] = torch.tensor((l2.argmax(-1) == labels).float().mean().item() * 100)
            for k in params:
                io[f'grad.{k}'] = params[k].grad.detach().clone()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE['clip_grad'])
        io[f'step{step}.loss'] = loss.detach().clone()
        io[f'step{step}.grad_norm'] = norm.detach().clone()
        opt.step()
    for k, v in params.items():
        io[f'final.{k}'] = v.detach().clone()

    cfg = OrderedDict(backbone=BACKBONE, **MIM)
    write_json(cfg, out / 'config.json')
    write_json(RECIPE, out / 'recipe.json')
    write_json(groups, out / 'groups.json')
    save_safetensors(init, out / 'init.safetensors')
    save_safetensors(io, out / 'io.safetensors')
    # Checkpoints in the two foreign layouts (with the index buffers the originals carry).
    sd = OrderedDict(init)
    sd['rel_pos_bias.relative_position_index'] = model.rel_pos_bias.relative_position_index.clone()
    torch.save({'model': sd}, out / 'unilm_pt.pth')
    torch.save({'state_dict': to_mmpretrain(sd), 'meta': {}}, out / 'mmpretrain_pt.pth')
    write_json(masking_stats(), out / 'masking.json')
    (out / 'README.md').write_text(
        '# MIM pretraining fixtures (generated by tools/make_pretrain_fixtures.py; do not edit)\n\n'
        + '\n'.join(f'- {k} {v}' for k, v in versions().items()) + '\n')
    print(f'wrote {out}; step losses', [float(io[f"step{k}.loss"]) for k in range(3)],
          'grad norms', [float(io[f"step{k}.grad_norm"]) for k in range(3)])


if __name__ == '__main__':
    main()
