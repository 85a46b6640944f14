#!/usr/bin/env python3
"""Reference fixtures for a few optimisation steps of BEiT fine-tuning (unilm recipe).

Reproduces, on a tiny random-weight timm ``Beit`` (CPU, float32, one thread, non-fused
attention), what unilm ``run_class_finetuning.py`` + ``optim_factory.py`` +
``engine_for_finetuning.train_one_epoch`` do per iteration, without AMP:

    for each param group: lr = lr_schedule[it] * lr_scale        (set before the step)
    loss = LabelSmoothingCrossEntropy(0.1)(model(x), y)
    loss.backward()
    grad_norm = clip_grad_norm_(model.parameters(), max_norm)    (norm before clipping)
    AdamW.step(); zero_grad()

Parameter groups follow unilm ``get_parameter_groups`` + ``LayerDecayValueAssigner`` with the
no-weight-decay list {cls_token, mask_token, pos_embed, every relative_position_bias_table}
(i.e. unilm run with ``--disable_weight_decay_on_rel_pos_bias``; by default unilm decays the
per-block tables). The lr schedule is unilm ``utils.cosine_scheduler`` with a 3-step linear
warmup from 0 (see ``cosine_scheduler`` below for the warmup_epochs quirk).

Writes ``tests/fixtures/train/`` (relative to the repository root):

* ``config.json``        model configuration (beitv2 config format, as tests/fixtures/models/*/config.json)
* ``recipe.json``        every optimisation setting plus the full lr schedule
* ``groups.json``        per-parameter layer id / lr_scale / weight_decay, and the unilm group list
* ``init.safetensors``   timm state_dict before training (contiguous float32)
* ``steps.safetensors``  ``input``, ``labels`` (int64), ``step{k}.loss`` / ``.grad_norm`` (float32
                         scalars), ``step{k}.lr`` (float64 scalar), ``step0.grad.<name>`` (raw
                         gradients before clipping, 8 tensors), ``final.<name>`` (all params after the last step)
* ``README.md``

Usage:  python tools/make_train_fixtures.py [--out tests/fixtures/train] [--no-verify]
"""
import os

os.environ['TIMM_FUSED_ATTN'] = '0'

import argparse
import copy
import math
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import safetensors.torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import (BASE, REPO_ROOT, build_timm, contiguous_sd, randomize_,  # noqa: E402
                           save_safetensors, versions, write_json)

DEFAULT_OUT = REPO_ROOT / 'tests' / 'fixtures' / 'train'

CONFIG = dict(BASE, num_classes=5)   # img 32, patch 8, C 16, depth 2, heads 2, mlp 4, per-block RPB, LS, avg
MODEL_SEED = 3001
INPUT_SEED = 3002
BATCH = 4

RECIPE = OrderedDict(
    batch_size=BATCH,
    labels=[0, 3, 1, 4],
    steps=4,                       # iterations 0..3 of the schedule are run
    base_lr=1e-2,
    final_lr=1e-4,
    warmup_steps=3,
    start_warmup_value=0.0,
    total_steps=8,                 # epochs 1 x niter_per_ep 8
    layer_decay=0.65,
    weight_decay=0.05,
    betas=[0.9, 0.999],
    eps=1e-8,
    clip_grad=4.0,                 # clips steps 0-2 (norms 6.60, 6.60, 4.63), not step 3 (3.07)
    smoothing=0.1,
    no_weight_decay=['ndim <= 1', '*.bias', 'cls_token', 'mask_token', 'pos_embed',
                     '*relative_position_bias_table'],
    model_seed=MODEL_SEED,
    input_seed=INPUT_SEED,
)

GRAD_KEYS = ['patch_embed.proj.weight', 'blocks.0.attn.qkv.weight', 'blocks.0.attn.relative_position_bias_table',
             'blocks.1.gamma_2', 'blocks.1.attn.q_bias', 'fc_norm.weight', 'head.weight', 'cls_token']


# ---------------------------------------------------------------------------------------------
# unilm recipe pieces
# ---------------------------------------------------------------------------------------------

def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                     start_warmup_value=0, warmup_steps=-1):
    """unilm ``beit2/utils.py`` ``cosine_scheduler``, same arithmetic (numpy float64).

    Quirk of the original: the warmup ramp is only built ``if warmup_epochs > 0``, so the
    literal call ``(..., warmup_epochs=0, warmup_steps=3)`` trips its length assert. unilm's
    ``--warmup_steps`` is only meaningful together with a non-zero ``--warmup_epochs`` (which it
    then overrides); we call it with ``warmup_epochs=1, warmup_steps=3`` -> ramp of 3 steps.
    """
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_steps > 0:
        warmup_iters = warmup_steps
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = np.array(
        [final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * i / (len(iters)))) for i in iters])
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def lr_schedule():
    r = RECIPE
    s = cosine_scheduler(r['base_lr'], r['final_lr'], epochs=1, niter_per_ep=r['total_steps'],
                         warmup_epochs=1, start_warmup_value=r['start_warmup_value'],
                         warmup_steps=r['warmup_steps'])
    # independent restatement of the formula (spec F.5)
    W, T = r['warmup_steps'], r['total_steps']
    for t in range(T):
        if t < W:
            want = r['start_warmup_value'] + (r['base_lr'] - r['start_warmup_value']) * t / (W - 1)
        else:
            want = r['final_lr'] + 0.5 * (r['base_lr'] - r['final_lr']) * (1 + math.cos(math.pi * (t - W) / (T - W)))
        assert abs(s[t] - want) <= 1e-18 + 1e-15 * abs(want), (t, s[t], want)
    return s


def layer_id(name, depth):
    """unilm ``get_num_layer_for_vit`` with ``num_max_layer = depth + 2``."""
    if name in ('cls_token', 'mask_token', 'pos_embed') or name.startswith('patch_embed'):
        return 0
    if name.startswith('rel_pos_bias'):
        return depth + 1
    if name.startswith('blocks'):
        return int(name.split('.')[1]) + 1
    return depth + 1


def skip_list(model):
    skip = {'cls_token', 'mask_token', 'pos_embed'}
    skip |= {n for n, _ in model.named_parameters() if n.endswith('relative_position_bias_table')}
    return skip


def parameter_groups(model, depth):
    """unilm ``get_parameter_groups`` (+ ``LayerDecayValueAssigner``): ordered dict name -> group."""
    r = RECIPE
    scales = [r['layer_decay'] ** (depth + 1 - i) for i in range(depth + 2)]
    skip = skip_list(model)
    groups = OrderedDict()
    per_param = OrderedDict()
    for name, p in model.named_parameters():
        if p.ndim <= 1 or name.endswith('.bias') or name in skip:
            kind, wd = 'no_decay', 0.0
        else:
            kind, wd = 'decay', r['weight_decay']
        lid = layer_id(name, depth)
        gname = 'layer_%d_%s' % (lid, kind)
        if gname not in groups:
            groups[gname] = dict(weight_decay=wd, params=[], names=[], lr_scale=scales[lid], layer_id=lid)
        groups[gname]['params'].append(p)
        groups[gname]['names'].append(name)
        per_param[name] = OrderedDict(layer_id=lid, lr_scale=scales[lid], weight_decay=wd, group=gname)
    return groups, per_param


def label_smoothing_ce(logits, target, smoothing):
    """timm ``LabelSmoothingCrossEntropy`` (copied arithmetic)."""
    logprobs = torch.nn.functional.log_softmax(logits, dim=-1)
    nll = -logprobs.gather(dim=-1, index=target.unsqueeze(1)).squeeze(1)
    smooth = -logprobs.mean(dim=-1)
    return ((1.0 - smoothing) * nll + smoothing * smooth).mean()


# ---------------------------------------------------------------------------------------------
# Training run
# ---------------------------------------------------------------------------------------------

def make_model(dtype):
    model = build_timm(CONFIG)
    randomize_(model, MODEL_SEED)
    model = model.to(dtype)
    model.train()
    return model


def make_data():
    gen = torch.Generator().manual_seed(INPUT_SEED)
    h, w = CONFIG['img_size']
    x = torch.randn((BATCH, CONFIG['in_chans'], h, w), generator=gen, dtype=torch.float32)
    y = torch.tensor(RECIPE['labels'], dtype=torch.int64)
    return x, y


def train(model, x, y, schedule, manual=False):
    """Run RECIPE['steps'] iterations. ``manual`` = closed-form clip + AdamW (spec M) instead of torch's."""
    r = RECIPE
    depth = CONFIG['depth']
    groups, per_param = parameter_groups(model, depth)
    opt = torch.optim.AdamW([dict(params=g['params'], weight_decay=g['weight_decay'], lr_scale=g['lr_scale'])
                             for g in groups.values()],
                            lr=r['base_lr'], betas=tuple(r['betas']), eps=r['eps'], foreach=False)
    params = OrderedDict(model.named_parameters())
    state = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
    log = []
    for it in range(r['steps']):
        for g in opt.param_groups:
            g['lr'] = schedule[it] * g['lr_scale']
        opt.zero_grad(set_to_none=True)
        loss = label_smoothing_ce(model(x), y, r['smoothing'])
        loss.backward()
        raw = OrderedDict((n, p.grad.detach().clone()) for n, p in params.items())
        if not manual:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=r['clip_grad'])
            opt.step()
        else:
            with torch.no_grad():
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw.values()]))
                coef = min(r['clip_grad'] / (norm.item() + 1e-6), 1.0)
                b1, b2 = r['betas']
                t = it + 1
                for n, p in params.items():
                    info = per_param[n]
                    lr = schedule[it] * info['lr_scale']
                    g = raw[n] * coef
                    m, v = state[n]
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    p.mul_(1 - lr * info['weight_decay'])
                    denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(r['eps'])
                    p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
        log.append(dict(loss=loss.detach().clone(), grad_norm=norm.detach().clone(), lr=float(schedule[it]),
                        grads=raw, clipped=norm.item() > r['clip_grad']))
    final = OrderedDict((n, p.detach().clone()) for n, p in params.items())
    return log, final, groups, per_param


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

README = """# Training-step reference fixtures (generated — do not edit by hand)

Generated by `tools/make_train_fixtures.py` (torch {torch}, timm {timm}; CPU, float32, one thread,
non-fused attention). Regenerate with `python tools/make_train_fixtures.py`.

{steps} iterations of unilm-style BEiT fine-tuning (run_class_finetuning.py / optim_factory.py,
no AMP) on a tiny timm `Beit` (`config.json`: img 32, patch 8, C 16, depth 2, heads 2, K 5,
per-block RPB, layer scale, avg pooling), randomised like `tests/fixtures/models` (seed {mseed}),
batch of {batch} `randn` images (seed {iseed}) with labels {labels}.

Per iteration `it`: every param group gets `lr = schedule[it] * lr_scale`; loss =
`LabelSmoothingCrossEntropy({smoothing})`; backward; `clip_grad_norm_(max_norm={clip})`;
`AdamW(betas={betas}, eps={eps})` step with per-group weight decay.

* `recipe.json` — all settings and `lr_schedule` (all {total} values; the run uses the first {steps}).
  Warmup: `linspace(0, base_lr, warmup_steps)`; then `final + 0.5 (base - final)(1 + cos(pi (t - W) / (T - W)))`.
* `groups.json` — `params`: per parameter `layer_id`, `lr_scale` = layer_decay^(depth+1-id),
  `weight_decay`, `group`; `groups`: the unilm groups (`layer_<id>_<decay|no_decay>`) in creation order.
  No weight decay for ndim <= 1, `*.bias`, `cls_token`/`mask_token`/`pos_embed` and every
  `relative_position_bias_table` (unilm `--disable_weight_decay_on_rel_pos_bias`).
* `init.safetensors` — the timm state_dict before step 0.
* `steps.safetensors` — `input` (B,3,32,32) f32, `labels` (B) i64; per step k:
  `step{{k}}.loss` (f32 scalar, before the update), `step{{k}}.grad_norm` (f32 scalar, total L2 norm
  returned by `clip_grad_norm_`, i.e. before clipping), `step{{k}}.lr` (f64 scalar, schedule value
  before `lr_scale`); `step0.grad.<name>` raw (unclipped) step-0 gradients of {ngrad} parameters;
  `final.<name>` every parameter after the last step.

Clipping is active (grad_norm > {clip}) on steps {clipped} and inactive on the others. Step 0 has
lr 0: the weights do not move but the Adam moments (and step count) do, so step 1 repeats step 0's
loss and gradients. The last block's table rows -3 and -1 (CLS query) get exactly zero gradient
(avg pooling never reads the last block's CLS output) and, having no weight decay, stay unchanged.
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', type=Path, default=DEFAULT_OUT)
    ap.add_argument('--no-verify', action='store_true')
    args = ap.parse_args()
    verify = not args.no_verify

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    schedule = lr_schedule()
    x, y = make_data()
    model = make_model(torch.float32)
    init_sd = contiguous_sd(model.state_dict())
    assert list(init_sd) == [n for n, _ in model.named_parameters()]  # no buffers in the timm state_dict
    log, final, groups, per_param = train(model, x, y, schedule)

    n_steps = RECIPE['steps']
    clipped = [k for k, s in enumerate(log) if s['clipped']]
    assert len(clipped) >= 2, f'clipping active only on steps {clipped}: lower clip_grad'
    assert len(clipped) < n_steps, 'clipping active on every step: raise clip_grad so both branches are tested'
    for s in log:  # no step close enough to the threshold for rounding to flip the branch
        assert abs(s['grad_norm'].item() / RECIPE['clip_grad'] - 1) > 0.05, s['grad_norm']

    steps = OrderedDict(input=x, labels=y)
    for k, s in enumerate(log):
        steps[f'step{k}.loss'] = s['loss'].reshape(())
        steps[f'step{k}.grad_norm'] = s['grad_norm'].reshape(())
        steps[f'step{k}.lr'] = torch.tensor(s['lr'], dtype=torch.float64)
        if k == 0:
            for n in GRAD_KEYS:
                steps[f'step0.grad.{n}'] = s['grads'][n]
    for n, v in final.items():
        steps[f'final.{n}'] = v

    recipe = OrderedDict(RECIPE)
    recipe['lr_schedule'] = [float(v) for v in schedule]
    recipe['clipped_steps'] = clipped
    recipe['notes'] = ('per-group lr = lr_schedule[it] * lr_scale, set before each step; grad_norm = total L2 '
                       'norm before clipping; clip coef = clip_grad / (grad_norm + 1e-6) if grad_norm > clip_grad; '
                       'AdamW: p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; '
                       'p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps), t = 1-based step count')
    group_json = OrderedDict(
        params=per_param,
        groups=[OrderedDict(name=gn, layer_id=g['layer_id'], lr_scale=g['lr_scale'],
                            weight_decay=g['weight_decay'], params=g['names']) for gn, g in groups.items()])

    write_json(CONFIG, out / 'config.json')
    write_json(recipe, out / 'recipe.json')
    write_json(group_json, out / 'groups.json')
    save_safetensors(init_sd, out / 'init.safetensors', metadata={'format': 'pt'})
    save_safetensors(steps, out / 'steps.safetensors')
    vs = versions()
    (out / 'README.md').write_text(README.format(
        torch=vs['torch'], timm=vs['timm'], steps=n_steps, mseed=MODEL_SEED, iseed=INPUT_SEED, batch=BATCH,
        labels=RECIPE['labels'], smoothing=RECIPE['smoothing'], clip=RECIPE['clip_grad'],
        betas=tuple(RECIPE['betas']), eps=RECIPE['eps'], total=RECIPE['total_steps'], ngrad=len(GRAD_KEYS),
        clipped=', '.join(map(str, clipped))))

    for k, s in enumerate(log):
        print(f"step {k}: lr {s['lr']:.6g} loss {s['loss'].item():.6f} grad_norm {s['grad_norm'].item():.6f}"
              f"{' (clipped)' if s['clipped'] else ''}")

    if verify:
        verify_run(out, init_sd, log, final, groups, per_param, schedule, x, y)
    total = sum(p.stat().st_size for p in out.rglob('*') if p.is_file())
    print(f'wrote {out} ({total / 1024:.1f} KiB){" (verified)" if verify else ""}')


def rel_diff(a, b):
    """max |a - b| / max |b| over one tensor."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def verify_run(out, init_sd, log, final, groups, per_param, schedule, x, y):
    depth = CONFIG['depth']
    # --- groups: expected ids / decay as stated in the brief
    for n, info in per_param.items():
        lid = 0 if (n == 'cls_token' or n.startswith('patch_embed.')) else \
            int(n.split('.')[1]) + 1 if n.startswith('blocks.') else depth + 1
        assert info['layer_id'] == lid, n
        assert abs(info['lr_scale'] - 0.65 ** (depth + 1 - lid)) < 1e-15, n
        nd = init_sd[n].ndim <= 1 or n.endswith('.bias') or n == 'cls_token' or n.endswith('relative_position_bias_table')
        assert info['weight_decay'] == (0.0 if nd else 0.05), n
    assert per_param['blocks.0.attn.relative_position_bias_table']['weight_decay'] == 0.0
    assert per_param['blocks.0.attn.qkv.weight']['weight_decay'] == 0.05
    assert per_param['patch_embed.proj.weight']['lr_scale'] == 0.65 ** 3
    assert per_param['head.weight']['lr_scale'] == 1.0
    assert len(groups) == 2 * (depth + 2), list(groups)  # (decay, no_decay) for each layer id
    # --- non-degenerate: every parameter gets a gradient, every parameter moves
    for n, g in log[0]['grads'].items():
        assert g.abs().max().item() > 1e-6, f'no gradient for {n}'
        # exact zeros only where expected: the last block's CLS-query table rows (cls->token = -3,
        # cls->cls = -1), because avg pooling never reads the last block's CLS output
        want = torch.zeros_like(g, dtype=torch.bool)
        if n == f'blocks.{depth - 1}.attn.relative_position_bias_table':
            want[-3] = True
            want[-1] = True
        assert torch.equal(g == 0, want), f'unexpected exact-zero gradients in {n}'
    for n, v in final.items():
        assert (v - init_sd[n]).abs().max().item() > 1e-5, f'{n} did not move'
    s = schedule
    assert s[0] == 0.0 and abs(s[1] - 5e-3) < 1e-18 and s[2] == 1e-2 and s[3] == 1e-2
    # --- losses/norms finite and the loss goes down over the run
    losses = [e['loss'].item() for e in log]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    # --- the written files read back identically
    st = safetensors.torch.load_file(str(out / 'steps.safetensors'))
    init_back = safetensors.torch.load_file(str(out / 'init.safetensors'))
    assert set(init_back) == set(init_sd) and all(torch.equal(init_back[k], v) for k, v in init_sd.items())
    assert st['labels'].dtype == torch.int64 and st['input'].dtype == torch.float32
    for k in range(RECIPE['steps']):
        assert st[f'step{k}.loss'].shape == () and st[f'step{k}.lr'].dtype == torch.float64
    # --- loss is timm's LabelSmoothingCrossEntropy
    from timm.loss import LabelSmoothingCrossEntropy
    m0 = make_model(torch.float32)
    m0.load_state_dict(init_back)
    logits = m0(x)
    assert torch.equal(LabelSmoothingCrossEntropy(RECIPE['smoothing'])(logits, y), log[0]['loss'])
    # --- reloading init and re-running gives bit-identical results (determinism)
    log2, final2, _, _ = train(m0, x, y, schedule)
    assert all(torch.equal(final2[n], final[n]) for n in final)
    assert all(torch.equal(a['grad_norm'], b['grad_norm']) for a, b in zip(log, log2))
    # --- closed-form clip + AdamW (spec M) reproduces torch's optimiser (float64, tight)
    m64 = make_model(torch.float64)
    m64.load_state_dict({k: v.double() for k, v in init_sd.items()})
    log64, final64, _, _ = train(m64, x.double(), y, schedule)
    m64b = make_model(torch.float64)
    m64b.load_state_dict({k: v.double() for k, v in init_sd.items()})
    log64m, final64m, _, _ = train(m64b, x.double(), y, schedule, manual=True)
    worst_manual = max(rel_diff(final64m[n], final64[n]) for n in final64)
    assert worst_manual < 1e-12, worst_manual
    assert [e['clipped'] for e in log64] == [e['clipped'] for e in log]
    # --- float32 vs float64 (what tolerance is meaningful for a float32 re-implementation)
    print('float32 vs float64:')
    for k, (a, b) in enumerate(zip(log, log64)):
        print(f'  step {k}: loss rel {abs(a["loss"].item() - b["loss"].item()) / abs(b["loss"].item()):.3g}, '
              f'grad_norm rel {abs(a["grad_norm"].item() - b["grad_norm"].item()) / b["grad_norm"].item():.3g}')
    g_rel = {n: rel_diff(log[0]['grads'][n], log64[0]['grads'][n]) for n in GRAD_KEYS}
    print(f'  step0 grads: max per-tensor rel {max(g_rel.values()):.3g} ({max(g_rel, key=g_rel.get)})')
    w_rel = {n: rel_diff(final[n], final64[n]) for n in final}
    w_el = {n: ((final[n].double() - final64[n]).abs() / final64[n].abs().clamp_min(1e-30)).max().item()
            for n in final}
    d_rel = {n: rel_diff(final[n] - init_sd[n], final64[n] - init_sd[n].double()) for n in final}
    worst = max(w_rel, key=w_rel.get)
    print(f'  final weights: max per-tensor rel (max|d| / max|w64|) {w_rel[worst]:.3g} ({worst})')
    worst = max(w_el, key=w_el.get)
    print(f'  final weights: max element-wise rel |d|/|w64| {w_el[worst]:.3g} ({worst})')
    worst = max(d_rel, key=d_rel.get)
    print(f'  updates (final - init): max per-tensor rel {d_rel[worst]:.3g} ({worst})')
    worst_abs = max((final[n].double() - final64[n]).abs().max().item() for n in final)
    print(f'  final weights: max abs diff {worst_abs:.3g}')
    print(f'  closed-form clip+AdamW vs torch.optim (float64): max rel {worst_manual:.3g}')
    print(f'  smallest non-zero |step0 grad| element: '
          f'{min(g[g != 0].abs().min().item() for g in log[0]["grads"].values()):.3g}; exact zeros: '
          f'{sum((g == 0).sum().item() for g in log[0]["grads"].values())}')


if __name__ == '__main__':
    main()
