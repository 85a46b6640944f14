//! Tokenizer training pieces against PyTorch (`tools/make_vqkd_train_fixtures.py`):
//! the CLIP teacher in OpenAI and open_clip layouts, the reconstruction and
//! commitment losses, one NormEMA codebook update, and spherical k-means.

use beitv2::checkpoint::load_vqkd;
use beitv2::model::vqkd::{VqkdConfig, ema_update, kmeans};
use beitv2::train::tokenizer::{Teacher, TeacherSection, cosine_rec_loss};
mod common;

use candle_core::{DType, Tensor};
use common::{int_values, load_st, max_abs_diff};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vqkd_train")
}

fn io() -> HashMap<String, Tensor> {
    load_st(&dir().join("io.safetensors"))
}

fn scalar(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0]
}

fn teacher(file: &str) -> Teacher {
    Teacher::load(&TeacherSection {
        kind: "clip".into(),
        weights: dir().join(file),
        config: Some(dir().join("teacher_config.json")),
        arch: None,
    })
    .unwrap()
}

#[test]
fn clip_teacher_matches_in_both_layouts() {
    let io = io();
    for file in ["clip_openai.pth", "clip_openclip.safetensors"] {
        let t = teacher(file);
        let d = max_abs_diff(
            &t.targets(&io["teacher_input"]).unwrap(),
            &io["teacher_target"],
        );
        eprintln!("{file}: teacher max abs diff {d:.2e}");
        assert!(d <= 1e-4, "{file}: {d}");
    }
}

#[test]
fn losses_and_ema_update_match() {
    let io = io();
    let cfg: VqkdConfig =
        serde_json::from_str(&std::fs::read_to_string(dir().join("config.json")).unwrap()).unwrap();
    let m = load_vqkd(&dir().join("vqkd_init.pth"), Some(cfg)).unwrap();
    let q = m
        .quantize(&m.encode(&io["teacher_input"]).unwrap())
        .unwrap();
    assert_eq!(int_values(&q.ids), int_values(&io["ids"]));
    assert!(max_abs_diff(&q.z, &io["z"]) <= 1e-5);
    let rec = m.decode(&q.z_q).unwrap();
    assert!(max_abs_diff(&rec, &io["rec"]) <= 1e-4);
    let rec_loss = scalar(&cosine_rec_loss(&rec, &io["teacher_target"]).unwrap());
    let commit = scalar(&q.commit_loss);
    for (got, key) in [
        (rec_loss, "rec_loss"),
        (commit, "commit_loss"),
        (rec_loss + commit, "total_loss"),
    ] {
        let want = scalar(&io[key]);
        assert!(
            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{key}: {got} vs {want}"
        );
    }
    let ids: Vec<u32> = int_values(&q.ids).into_iter().map(|v| v as u32).collect();
    let z = q.z.flatten_to(1).unwrap();
    let (book, bins) = ema_update(&m.codebook, &z, &ids, 0.99).unwrap();
    let d = max_abs_diff(&book, &io["codebook_after_ema"]);
    assert!(d <= 1e-5, "codebook after EMA differs by {d}");
    let want: Vec<u64> = int_values(&io["bins"])
        .into_iter()
        .map(|v| v as u64)
        .collect();
    assert_eq!(bins, want);
    let norms = book
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        norms.iter().all(|n| (n - 1.0).abs() < 1e-5),
        "rows stay unit-norm"
    );
}

#[test]
fn kmeans_matches_given_the_same_start() {
    let io = io();
    let init: Vec<usize> = int_values(&io["kmeans_init_idx"])
        .into_iter()
        .map(|v| v as usize)
        .collect();
    for (iters, means_key, bins_key) in [
        (10, "kmeans_means", "kmeans_bins"),
        (1, "kmeans_means_iter1", "kmeans_bins_iter1"),
    ] {
        let (means, bins) = kmeans(&io["kmeans_samples"], &init, iters).unwrap();
        let d = max_abs_diff(&means, &io[means_key]);
        assert!(d <= 1e-5, "{iters} iterations: means differ by {d}");
        let want: Vec<u64> = int_values(&io[bins_key])
            .into_iter()
            .map(|v| v as u64)
            .collect();
        assert_eq!(bins, want, "{iters} iterations");
    }
}

#[test]
fn a_teacher_of_the_wrong_width_is_refused_before_training() {
    use beitv2::train::tokenizer::{TokenizerRecipe, train_tokenizer};
    let mut r = TokenizerRecipe::load(None, &[]).unwrap();
    let mut shapes: VqkdConfig =
        serde_json::from_str(&std::fs::read_to_string(dir().join("config.json")).unwrap()).unwrap();
    shapes.decoder_out_dim = 10;
    r.shapes = Some(shapes);
    r.teacher = TeacherSection {
        kind: "clip".into(),
        weights: dir().join("clip_openai.pth"),
        config: Some(dir().join("teacher_config.json")),
        arch: None,
    };
    r.data.train = "/nonexistent".into();
    r.run.output = std::env::temp_dir().join("beitv2-never-created");
    let err = train_tokenizer(&r, false).unwrap_err().to_string();
    assert!(err.contains("12-d") && err.contains("10-d"), "{err}");
    assert!(
        !r.run.output.exists(),
        "nothing may be written before the check"
    );
}
