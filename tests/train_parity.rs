//! Four optimisation steps of BEiT fine-tuning against PyTorch
//! (`tools/make_train_fixtures.py`): parameter groups, loss, gradients,
//! clipping, the warmup+cosine schedule and AdamW with layer decay.

use beitv2::model::BeitConfig;
use beitv2::train::loss::{smoothed_targets, soft_target_cross_entropy};
use beitv2::train::optim::{AdamW, OptimConfig, cosine_lr, grad_clip, group_info};
use beitv2::train::tasks::Finetune;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod common;
use common::{rel_err, scalar_f64 as scalar};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train")
}

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join(name)).unwrap()).unwrap()
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join(name), &Device::Cpu).unwrap()
}

fn optim_config(r: &serde_json::Value) -> OptimConfig {
    OptimConfig {
        lr: r["base_lr"].as_f64().unwrap(),
        min_lr: r["final_lr"].as_f64().unwrap(),
        weight_decay: r["weight_decay"].as_f64().unwrap(),
        betas: [
            r["betas"][0].as_f64().unwrap(),
            r["betas"][1].as_f64().unwrap(),
        ],
        eps: r["eps"].as_f64().unwrap(),
        layer_decay: r["layer_decay"].as_f64().unwrap(),
        clip_grad: r["clip_grad"].as_f64().unwrap(),
    }
}

#[test]
fn parameter_groups_match_unilm() {
    let r = json("recipe.json");
    let groups = json("groups.json");
    let cfg = BeitConfig::from_file(&dir().join("config.json")).unwrap();
    let init = load("init.safetensors");
    let oc = optim_config(&r);
    let groups = groups["params"].as_object().unwrap();
    assert_eq!(groups.len(), init.len());
    for (name, g) in groups {
        let got = group_info(name, init[name].rank(), cfg.depth, &oc);
        assert_eq!(
            got.layer_id as u64,
            g["layer_id"].as_u64().unwrap(),
            "{name}"
        );
        assert!(
            (got.lr_scale - g["lr_scale"].as_f64().unwrap()).abs() < 1e-12,
            "{name}"
        );
        assert_eq!(
            got.weight_decay,
            g["weight_decay"].as_f64().unwrap(),
            "{name}"
        );
    }
}

#[test]
fn schedule_matches_unilm_cosine_scheduler() {
    let r = json("recipe.json");
    let warmup = r["warmup_steps"].as_u64().unwrap() as usize;
    let total = r["total_steps"].as_u64().unwrap() as usize;
    let (base, min) = (
        r["base_lr"].as_f64().unwrap(),
        r["final_lr"].as_f64().unwrap(),
    );
    for (t, want) in r["lr_schedule"].as_array().unwrap().iter().enumerate() {
        let want = want.as_f64().unwrap();
        let got = cosine_lr(base, min, warmup, total, t);
        assert!((got - want).abs() < 1e-12, "lr[{t}] = {got}, unilm {want}");
    }
}

#[test]
fn four_adamw_steps_match_pytorch() {
    let r = json("recipe.json");
    let cfg = BeitConfig::from_file(&dir().join("config.json")).unwrap();
    let steps = load("steps.safetensors");
    let task = Finetune::new(&cfg, load("init.safetensors")).unwrap();
    let mut opt = AdamW::new(
        beitv2::train::engine::Task::trainable(&task),
        cfg.depth,
        optim_config(&r),
    )
    .unwrap();
    let x = &steps["input"];
    let labels: Vec<usize> = steps["labels"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as usize)
        .collect();
    let targets =
        smoothed_targets(&labels, cfg.num_classes, r["smoothing"].as_f64().unwrap()).unwrap();
    let n_steps = r["steps"].as_u64().unwrap() as usize;
    let warmup = r["warmup_steps"].as_u64().unwrap() as usize;
    let total = r["total_steps"].as_u64().unwrap() as usize;
    let mut worst = 0f64;
    for k in 0..n_steps {
        let loss = soft_target_cross_entropy(&task.model.forward(x).unwrap(), &targets).unwrap();
        let lv = loss.to_scalar::<f32>().unwrap() as f64;
        let want = scalar(&steps[&format!("step{k}.loss")]);
        assert!(
            (lv - want).abs() / want.abs() < 1e-5,
            "step {k} loss {lv} vs {want}"
        );
        let grads = loss.backward().unwrap();
        if k == 0 {
            for p in &opt.params {
                if let Some(want) = steps.get(&format!("step0.grad.{}", p.name)) {
                    let got = grads.get(p.var.as_tensor()).unwrap();
                    let e = rel_err(got, want);
                    assert!(e < 1e-5, "grad of {} differs by {e} (relative)", p.name);
                    worst = worst.max(e);
                }
            }
        }
        let clip = grad_clip(&grads, &opt.params, opt.cfg.clip_grad).unwrap();
        let norm = clip.norm;
        let want_norm = scalar(&steps[&format!("step{k}.grad_norm")]);
        assert!(
            (norm - want_norm).abs() / want_norm < 1e-5,
            "step {k} grad norm {norm} vs {want_norm}"
        );
        let lr = cosine_lr(opt.cfg.lr, opt.cfg.min_lr, warmup, total, k);
        let want_lr = scalar(&steps[&format!("step{k}.lr")]);
        assert!(
            (lr - want_lr).abs() <= 1e-12 * want_lr.abs().max(1.0),
            "step {k} lr {lr} vs {want_lr}"
        );
        opt.step(&grads, lr, clip.scale).unwrap();
    }
    for p in &opt.params {
        let want = &steps[&format!("final.{}", p.name)];
        let e = rel_err(p.var.as_tensor(), want);
        worst = worst.max(e);
        assert!(
            e < 1e-5,
            "{} after {n_steps} steps differs by {e} (relative)",
            p.name
        );
    }
    eprintln!("worst relative difference: {worst:.2e}");
}
