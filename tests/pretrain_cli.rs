//! `beitv2 pretrain` end to end on a tiny model and a tiny tokenizer fixture:
//! a run killed with SIGKILL and run again ends exactly like an uninterrupted
//! one; its checkpoint converts to a fine-tuning backbone and fine-tunes;
//! mismatched tokenizers and impossible mask counts are refused up front.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{kill_resume_trials, metrics_without_time, sorted_weights, write_class_folders};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

/// A 32 px student (patch 8: the 4×4 grid of the tokenizer fixture, 64 codes).
fn recipe(dir: &Path, data: &Path, out: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("tiny.json"),
        r#"{"img_size": [32, 32], "patch_size": 8, "num_classes": 0, "embed_dim": 16,
            "depth": 3, "num_heads": 2, "rel_pos_bias": "shared", "layer_scale": true,
            "global_pool": "token", "crop_pct": 1.0}"#,
    )
    .unwrap();
    let text = format!(
        r#"
[model]
config = "tiny.json"
early_layers = 2
head_layers = 2
layer_scale_init = 0.1
drop_path_rate = 0.1
[tokenizer]
weights = "{tok}"
[data]
train = "{data}"
batch_size = 4
workers = 2
min_crop_scale = 0.2
color_jitter = 0.4
limit = 0
[mask]
num_patches = 6
min_patches = 2
min_aspect = 0.3
[optim]
lr = 1.5e-3
min_lr = 1e-5
weight_decay = 0.05
betas = [0.9, 0.98]
eps = 1e-8
layer_decay = 1.0
clip_grad = 3.0
[schedule]
epochs = 3
warmup_epochs = 1
accum_steps = 2
[run]
seed = 3
output = "{out}"
ckpt_every = 2
keep_last = 2
"#,
        tok = fixture("vqkd/unilm.pth").display(),
        data = data.display(),
        out = out.display()
    );
    let p = dir.join("recipe.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn beitv2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_beitv2"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn sigkilled_pretraining_resumes_exactly_and_fine_tunes() {
    let tmp = std::env::temp_dir().join(format!("beitv2-pretrain-{}", std::process::id()));
    let data = tmp.join("data");
    write_class_folders(&data, 24, (40, 36));
    let (a, b) = (tmp.join("a"), tmp.join("b"));
    let ra = recipe(&a, &data, &a.join("out"));
    let rb = recipe(&b, &data, &b.join("out"));

    let run_a = beitv2(&["pretrain", "--recipe", ra.to_str().unwrap()]);
    assert!(
        run_a.status.success(),
        "{}",
        String::from_utf8_lossy(&run_a.stderr)
    );

    // SIGKILL once the first step checkpoint is on disk, then run again.
    let mut child = Command::new(env!("CARGO_BIN_EXE_beitv2"))
        .args(["pretrain", "--recipe", rb.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = b.join("out/checkpoints/step-00000002.safetensors");
    let t0 = std::time::Instant::now();
    while !first.exists() && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let still_running = child.try_wait().unwrap().is_none();
    // A second run on the same output folder is refused while the first holds it.
    let second = beitv2(&["pretrain", "--recipe", rb.to_str().unwrap()]);
    let still_running = still_running && child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(still_running, "the run finished before it could be killed");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second run shared the folder");
    assert!(
        err.contains(&format!("another beitv2 run (pid {})", child.id())),
        "{err}"
    );
    let logged = metrics_without_time(&b.join("out")).len();
    let total = metrics_without_time(&a.join("out")).len();
    assert!(logged < total, "killed after {logged} of {total} records");
    let run_b = beitv2(&["pretrain", "--recipe", rb.to_str().unwrap()]);
    assert!(
        run_b.status.success(),
        "{}",
        String::from_utf8_lossy(&run_b.stderr)
    );

    let (wa, wb) = (
        sorted_weights(&a.join("out/pretrain-last.safetensors")),
        sorted_weights(&b.join("out/pretrain-last.safetensors")),
    );
    assert_eq!(wa.len(), wb.len());
    for ((ka, va), (kb, vb)) in wa.iter().zip(&wb) {
        assert_eq!(ka, kb);
        assert!(
            va == vb,
            "{ka}: the resumed run differs from the uninterrupted one"
        );
    }
    let (ma, mb) = (
        metrics_without_time(&a.join("out")),
        metrics_without_time(&b.join("out")),
    );
    assert_eq!(ma, mb);
    // 24·2 images, batch 4, 2 micro-batches a step: 6 steps an epoch, 3 epochs.
    let train: Vec<_> = ma.iter().filter(|r| r["kind"] == "train").collect();
    assert_eq!(train.len(), 18);
    for r in &train {
        for k in ["loss_main", "loss_agg", "mim_acc_main", "mim_acc_agg"] {
            assert!(r[k].as_f64().is_some_and(f64::is_finite), "{k} in {r}");
        }
        let sum = r["loss_main"].as_f64().unwrap() + r["loss_agg"].as_f64().unwrap();
        assert!((sum - r["loss"].as_f64().unwrap()).abs() < 1e-4, "{r}");
    }
    assert!(
        ma.iter()
            .any(|r| r["kind"] == "epoch" && r["target_used_codes"].as_u64() > Some(0))
    );
    assert!(a.join("out/curves.png").exists());

    // The checkpoint becomes a classifier backbone and fine-tunes.
    let pt = a.join("out/pretrain-last.safetensors");
    let ft = a.join("backbone.safetensors");
    let conv = beitv2(&[
        "convert",
        "--weights",
        pt.to_str().unwrap(),
        "--to",
        "finetune",
        "-o",
        ft.to_str().unwrap(),
    ]);
    assert!(
        conv.status.success(),
        "{}",
        String::from_utf8_lossy(&conv.stderr)
    );
    let keys: Vec<String> = sorted_weights(&ft).into_iter().map(|(k, _)| k).collect();
    assert!(keys.contains(&"blocks.2.attn.relative_position_bias_table".to_string()));
    assert!(
        !keys.iter().any(|k| k.starts_with("lm_head")
            || k.starts_with("cls_pt_layers")
            || k == "mask_token")
    );
    std::fs::write(
        a.join("ft.json"),
        r#"{"img_size": [32, 32], "patch_size": 8, "num_classes": 2, "embed_dim": 16,
            "depth": 3, "num_heads": 2, "rel_pos_bias": "per_block", "layer_scale": true,
            "global_pool": "avg", "crop_pct": 1.0}"#,
    )
    .unwrap();
    // Ours (raw and converted) and the unilm / mmpretrain pretraining fixtures
    // (the same shapes) all fine-tune directly.
    let unilm = fixture("pretrain/unilm_pt.pth");
    let mmp = fixture("pretrain/mmpretrain_pt.pth");
    for (i, w) in [&pt, &ft, &unilm, &mmp].iter().enumerate() {
        let out = a.join(format!("ft{i}"));
        let r = beitv2(&[
            "finetune",
            "--set",
            &format!("model.config=\"{}\"", a.join("ft.json").display()),
            "--set",
            &format!("model.weights=\"{}\"", w.display()),
            "--set",
            &format!("data.train=\"{}\"", data.display()),
            "--set",
            &format!("data.val=\"{}\"", data.display()),
            "--set",
            "data.batch_size=8",
            "--set",
            "data.workers=1",
            "--set",
            "schedule.epochs=1",
            "--set",
            "schedule.warmup_epochs=0",
            "--set",
            "schedule.accum_steps=1",
            "--set",
            &format!("run.output=\"{}\"", out.display()),
        ]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(out.join("model-best.safetensors").exists());
    }
    std::fs::remove_dir_all(tmp).unwrap();
}

#[test]
fn mismatched_tokenizers_and_mask_counts_are_refused_before_any_step() {
    let tmp = std::env::temp_dir().join(format!("beitv2-pretrain-bad-{}", std::process::id()));
    let data = tmp.join("data");
    write_class_folders(&data, 2, (40, 36));
    let r = recipe(&tmp, &data, &tmp.join("out"));
    let run = |extra: &[&str]| {
        let mut args = vec!["pretrain", "--recipe", r.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = beitv2(&args);
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    // Patch 4 gives the student an 8×8 grid; the tokenizer labels 4×4.
    std::fs::write(
        tmp.join("grid8.json"),
        r#"{"img_size": [32, 32], "patch_size": 4, "num_classes": 0, "embed_dim": 16,
            "depth": 3, "num_heads": 2, "rel_pos_bias": "shared", "layer_scale": true,
            "global_pool": "token"}"#,
    )
    .unwrap();
    let e = run(&[
        "--set",
        &format!("model.config=\"{}\"", tmp.join("grid8.json").display()),
    ]);
    assert!(e.contains("4x4") && e.contains("8x8"), "{e}");
    let e = run(&["--set", "mask.num_patches=17"]);
    assert!(e.contains("mask.num_patches"), "{e}");
    let e = run(&["--set", "mask.num_pathces=3"]);
    assert!(e.contains("mask.num_patches"), "{e}");
    assert!(
        !tmp.join("out/checkpoints/step-00000001.safetensors")
            .exists()
    );
    std::fs::remove_dir_all(tmp).unwrap();
}

/// SIGKILL at random moments, then resume: the end state is the
/// uninterrupted run's. `BEITV2_KILL_TRIALS=25` for the long check.
#[test]
fn sigkill_at_random_moments_then_resume_equals_the_uninterrupted_run() {
    let tmp = std::env::temp_dir().join(format!("beitv2-pretrain-kill-{}", std::process::id()));
    let data = tmp.join("data");
    write_class_folders(&data, 24, (40, 36));
    let (a, b) = (tmp.join("a"), tmp.join("b"));
    let ra = recipe(&a, &data, &a.join("out"));
    let rb = recipe(&b, &data, &b.join("out"));
    let t0 = std::time::Instant::now();
    let run_a = beitv2(&["pretrain", "--recipe", ra.to_str().unwrap()]);
    let span = t0.elapsed();
    assert!(
        run_a.status.success(),
        "{}",
        String::from_utf8_lossy(&run_a.stderr)
    );
    kill_resume_trials(
        &["pretrain", "--recipe", rb.to_str().unwrap()],
        &b.join("out"),
        &a.join("out"),
        "pretrain-last.safetensors",
        span,
        2,
    );
    std::fs::remove_dir_all(tmp).unwrap();
}
