//! Killing `beitv2 finetune` between checkpoints and running it again gives
//! exactly the weights and metrics of an uninterrupted run (augmentation,
//! mixup/cutmix and drop path all on).

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{kill_resume_trials, metrics_without_time, sorted_weights, write_class_folders};

fn recipe(dir: &Path, data: &Path, out: &Path) -> PathBuf {
    let cfg = dir.join("tiny.json");
    std::fs::write(
        &cfg,
        r#"{"img_size": [16, 16], "patch_size": 4, "num_classes": 2, "embed_dim": 16,
            "depth": 2, "num_heads": 2, "rel_pos_bias": "per_block", "layer_scale": true,
            "global_pool": "avg", "crop_pct": 1.0}"#,
    )
    .unwrap();
    let text = format!(
        r#"
[model]
config = "tiny.json"
drop_path_rate = 0.1
[data]
train = "{data}"
val = "{data}"
batch_size = 4
workers = 2
rand_augment = "rand-m9-mstd0.5-inc1"
reprob = 0.25
mixup = 0.8
cutmix = 1.0
smoothing = 0.1
min_crop_scale = 0.08
limit = 0
[optim]
lr = 1e-3
min_lr = 1e-5
weight_decay = 0.05
betas = [0.9, 0.999]
eps = 1e-8
layer_decay = 0.75
clip_grad = 1.0
[schedule]
epochs = 3
warmup_epochs = 1
accum_steps = 1
[run]
seed = 7
output = "{out}"
ckpt_every = 4
keep_last = 2
"#,
        data = data.display(),
        out = out.display()
    );
    let p = dir.join("recipe.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn finetune(recipe: &Path, abort_after: Option<u64>) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_beitv2"));
    c.args(["finetune", "--recipe", recipe.to_str().unwrap()]);
    if let Some(s) = abort_after {
        c.env("BEITV2_ABORT_AFTER_STEP", s.to_string());
    }
    c.output().unwrap()
}

/// Two run folders `a` and `b` under one temporary folder, and a recipe in
/// each over the same two class folders of 8 `size` (w, h) images each:
/// (temporary folder, [a, b], [recipe a, recipe b]).
fn two_runs(name: &str, size: (u32, u32)) -> (PathBuf, [PathBuf; 2], [PathBuf; 2]) {
    let tmp = std::env::temp_dir().join(format!("beitv2-{name}-{}", std::process::id()));
    let data = tmp.join("data");
    write_class_folders(&data, 8, size);
    let dirs = [tmp.join("a"), tmp.join("b")];
    let recipes = dirs.clone().map(|d| {
        std::fs::create_dir_all(&d).unwrap();
        recipe(&d, &data, &d.join("out"))
    });
    (tmp, dirs, recipes)
}

#[test]
fn killed_and_resumed_run_equals_uninterrupted_run() {
    let (tmp, [a_dir, b_dir], [ra, rb]) = two_runs("resume", (20, 18));

    let a = finetune(&ra, None);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    // Killed after step 6: the newest checkpoint is step 4, so steps 5–6 are redone.
    let killed = finetune(&rb, Some(6));
    assert!(
        !killed.status.success(),
        "the simulated kill must stop the run"
    );
    assert!(
        b_dir
            .join("out/checkpoints/step-00000004.safetensors")
            .exists()
    );
    assert!(
        !b_dir
            .join("out/checkpoints/step-00000006.safetensors")
            .exists()
    );
    let b = finetune(&rb, None);
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));

    let load = |d: &Path| {
        candle_core::safetensors::load(
            d.join("out/model-last.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (wa, wb) = (load(&a_dir), load(&b_dir));
    assert_eq!(wa.len(), wb.len());
    for (k, ta) in &wa {
        let (va, vb) = (
            ta.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            wb[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(
            va == vb,
            "{k}: resumed weights differ from the uninterrupted run"
        );
    }
    assert_eq!(
        metrics_without_time(&a_dir.join("out")),
        metrics_without_time(&b_dir.join("out"))
    );
    assert!(a_dir.join("out/curves.png").exists());
    std::fs::remove_dir_all(tmp).unwrap();
}

#[test]
fn an_epoch_count_whose_steps_overflow_is_refused() {
    let tmp = std::env::temp_dir().join(format!("beitv2-overflow-{}", std::process::id()));
    let data = tmp.join("data");
    write_class_folders(&data, 8, (16, 16));
    let r = recipe(&tmp, &data, &tmp.join("out"));
    let out = Command::new(env!("CARGO_BIN_EXE_beitv2"))
        .args(["finetune", "--recipe", r.to_str().unwrap()])
        .args(["--set", &format!("schedule.epochs={}", u64::MAX / 2)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("schedule.epochs = ") && err.contains("more steps than can be counted"),
        "{err}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// SIGKILL at random moments (during start-up, steps, checkpoint writes,
/// evaluation or export), then resume: the end state is the uninterrupted
/// run's, bit for bit. `BEITV2_KILL_TRIALS=25` for the long check.
#[test]
fn sigkill_at_random_moments_then_resume_equals_the_uninterrupted_run() {
    let tmp = std::env::temp_dir().join(format!("beitv2-killrand-{}", std::process::id()));
    let data = tmp.join("data");
    write_class_folders(&data, 8, (20, 18));
    let (a_dir, b_dir) = (tmp.join("a"), tmp.join("b"));
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let ra = recipe(&a_dir, &data, &a_dir.join("out"));
    let rb = recipe(&b_dir, &data, &b_dir.join("out"));
    let t0 = std::time::Instant::now();
    let a = finetune(&ra, None);
    let span = t0.elapsed();
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    kill_resume_trials(
        &["finetune", "--recipe", rb.to_str().unwrap()],
        &b_dir.join("out"),
        &a_dir.join("out"),
        "model-last.safetensors",
        span,
        3,
    );
    std::fs::remove_dir_all(tmp).unwrap();
}

/// The same for `train-tokenizer` (VQ-KD with codebook EMA and restarts in
/// its resumable state), with the tiny fixture BEiT as the teacher.
#[test]
fn sigkilled_tokenizer_training_resumes_exactly() {
    let tmp = std::env::temp_dir().join(format!("beitv2-tok-kill-{}", std::process::id()));
    let data = tmp.join("data");
    write_class_folders(&data, 12, (40, 36));
    let teacher = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/v2_avg");
    let write = |name: &str| {
        let dir = tmp.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let text = format!(
            r#"
[shapes]
img_size = 32
patch_size = 8
embed_dim = 16
depth = 1
num_heads = 2
code_dim = 8
n_codes = 16
decoder_depth = 1
decoder_out_dim = 16
[teacher]
kind = "beit"
weights = "{w}"
config = "{c}"
[data]
train = "{data}"
batch_size = 4
workers = 2
min_crop_scale = 0.5
limit = 0
[optim]
lr = 1e-3
min_lr = 1e-5
weight_decay = 1e-4
betas = [0.9, 0.99]
eps = 1e-8
layer_decay = 1.0
clip_grad = 0.0
[schedule]
epochs = 2
warmup_epochs = 0
[quantizer]
decay = 0.99
kmeans_iters = 2
restart_every = 2
[run]
seed = 3
output = "{out}"
ckpt_every = 2
keep_last = 2
"#,
            w = teacher.join("timm.safetensors").display(),
            c = teacher.join("config.json").display(),
            data = data.display(),
            out = dir.join("out").display()
        );
        let p = dir.join("tokenizer.toml");
        std::fs::write(&p, text).unwrap();
        (p, dir.join("out"))
    };
    let ((ra, out_a), (rb, out_b)) = (write("a"), write("b"));
    let t0 = std::time::Instant::now();
    let a = Command::new(env!("CARGO_BIN_EXE_beitv2"))
        .args(["train-tokenizer", "--recipe", ra.to_str().unwrap()])
        .output()
        .unwrap();
    let span = t0.elapsed();
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    kill_resume_trials(
        &["train-tokenizer", "--recipe", rb.to_str().unwrap()],
        &out_b,
        &out_a,
        "tokenizer-last.safetensors",
        span,
        2,
    );
    std::fs::remove_dir_all(tmp).unwrap();
}

/// A disk that fills up mid-run: the run stops naming the failed write and
/// the intact checkpoint; after space is freed the same command resumes and
/// ends with the uninterrupted run's weights. Needs root (it mounts a 300 KB
/// tmpfs): `sudo cargo test --release --test train_resume -- --ignored full_disk`.
#[test]
#[ignore = "needs root to mount a small tmpfs"]
fn full_disk_keeps_the_last_checkpoint_and_resumes_after_space_is_freed() {
    let tmp = std::env::temp_dir().join(format!("beitv2-fulldisk-{}", std::process::id()));
    let data = tmp.join("data");
    write_class_folders(&data, 8, (20, 18));
    let (a_dir, small) = (tmp.join("a"), tmp.join("small"));
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&small).unwrap();
    let mount = |opts: &str| {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs", small.to_str().unwrap()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -o {opts} failed (run as root)");
    };
    mount("size=300k");
    let ra = recipe(&a_dir, &data, &a_dir.join("out"));
    let rb = recipe(&a_dir.join(".."), &data, &small.join("out"));
    assert!(finetune(&ra, None).status.success());
    let full = finetune(&rb, None);
    let err = String::from_utf8_lossy(&full.stderr);
    assert!(!full.status.success());
    assert!(
        err.contains("the disk is full; the newest complete checkpoint")
            && err.contains("No space left on device"),
        "{err}"
    );
    mount("remount,size=2m");
    let done = finetune(&rb, None);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(
        sorted_weights(&small.join("out/model-last.safetensors")),
        sorted_weights(&a_dir.join("out/model-last.safetensors"))
    );
    Command::new("umount").arg(&small).status().unwrap();
    std::fs::remove_dir_all(tmp).unwrap();
}

/// `schedule.eval_every = 2` over 3 epochs evaluates after epochs 2 and 3
/// only, and the training itself is unchanged: the same weights, and the
/// same evaluations where both runs made one.
#[test]
fn evaluation_every_n_epochs_keeps_the_last_and_changes_no_weights() {
    let (tmp, [a_dir, b_dir], [ra, rb]) = two_runs("evalevery", (16, 16));
    let a = finetune(&ra, None);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let b = Command::new(env!("CARGO_BIN_EXE_beitv2"))
        .args(["finetune", "--recipe", rb.to_str().unwrap()])
        .args(["--set", "schedule.eval_every=2"])
        .output()
        .unwrap();
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let val = |d: &Path| -> Vec<serde_json::Value> {
        metrics_without_time(&d.join("out"))
            .into_iter()
            .filter(|r| r["kind"] == "val")
            .collect()
    };
    let (va, vb) = (val(&a_dir), val(&b_dir));
    let epochs = |v: &[serde_json::Value]| v.iter().map(|r| r["epoch"].clone()).collect::<Vec<_>>();
    assert_eq!(epochs(&va), [1, 2, 3].map(serde_json::Value::from));
    assert_eq!(epochs(&vb), [2, 3].map(serde_json::Value::from));
    assert_eq!(vb[..], va[1..]);
    let load = |d: &Path| {
        candle_core::safetensors::load(
            d.join("out/model-last.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (wa, wb) = (load(&a_dir), load(&b_dir));
    assert_eq!(wa.len(), wb.len());
    for (k, ta) in &wa {
        let va = ta.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let vb = wb[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(va == vb, "{k}: eval_every changed the weights");
    }
    let zero = Command::new(env!("CARGO_BIN_EXE_beitv2"))
        .args(["finetune", "--recipe", rb.to_str().unwrap()])
        .args(["--set", "schedule.eval_every=0"])
        .output()
        .unwrap();
    assert!(!zero.status.success());
    assert!(String::from_utf8_lossy(&zero.stderr).contains("schedule.eval_every"));
    std::fs::remove_dir_all(tmp).unwrap();
}
