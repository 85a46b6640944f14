//! The VQ-KD tokenizer against a PyTorch reimplementation of unilm's
//! `modeling_vqkd.py` (`tools/make_vqkd_fixtures.py`): encoder features, codes,
//! ids, quantised vectors, commitment loss and decoder output; unilm and
//! mmpretrain checkpoint layouts; and token ids of real photos through
//! `test_get_code.py`'s preprocessing.

use beitv2::checkpoint::load_vqkd;
use beitv2::model::vqkd::{Vqkd, VqkdConfig};
mod common;

use candle_core::{DType, Device, Tensor};
use common::{int_values, load_st, max_abs_diff};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vqkd")
}

fn config(name: &str) -> VqkdConfig {
    serde_json::from_str(&std::fs::read_to_string(dir().join(name)).unwrap()).unwrap()
}

fn io() -> HashMap<String, Tensor> {
    load_st(&dir().join("io.safetensors"))
}

#[test]
fn unilm_layout_matches_reference_outputs() {
    let io = io();
    let cfg = config("config.json");
    let m = load_vqkd(&dir().join("unilm.pth"), Some(cfg)).unwrap();
    let x = Vqkd::preprocess(&io["input01"]).unwrap();
    let feats = m.encoder_tokens(&x).unwrap();
    let d = max_abs_diff(&feats, &io["encoder_tokens"]);
    assert!(d <= 1e-4, "encoder features differ by {d}");
    let code = m.encode(&x).unwrap();
    assert!(max_abs_diff(&code, &io["code"]) <= 1e-4);
    let q = m.quantize(&code).unwrap();
    assert!(max_abs_diff(&q.z, &io["z"]) <= 1e-4);
    assert_eq!(
        int_values(&q.ids),
        int_values(&io["ids"]),
        "token ids differ"
    );
    assert!(max_abs_diff(&q.z_q, &io["z_q"]) <= 1e-5);
    let l = q.commit_loss.to_scalar::<f32>().unwrap();
    let want = io["commit_loss"]
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    assert!(
        (l - want).abs() <= 1e-5 * want.abs().max(1.0),
        "commitment loss {l} vs {want}"
    );
    let rec = m.decode(&q.z_q).unwrap();
    let d = max_abs_diff(&rec, &io["rec"]);
    assert!(d <= 1e-4, "decoder output differs by {d}");
    eprintln!(
        "encoder max abs diff {:.2e}, decoder {d:.2e}",
        max_abs_diff(&feats, &io["encoder_tokens"])
    );
}

#[test]
fn mmpretrain_layout_and_encoder_only_use_give_the_same_ids() {
    let io = io();
    let want = int_values(&io["ids"]);
    let cfg = VqkdConfig {
        decoder_depth: 0,
        ..config("config.json")
    };
    let x = Vqkd::preprocess(&io["input01"]).unwrap();
    let m = load_vqkd(&dir().join("mmpretrain.pth"), Some(cfg.clone())).unwrap();
    assert_eq!(int_values(&m.tokens(&x).unwrap()), want);
    // Encoder-only use of a full unilm file drops its decoder.
    let m = load_vqkd(&dir().join("unilm.pth"), Some(cfg)).unwrap();
    assert_eq!(int_values(&m.tokens(&x).unwrap()), want);
}

#[test]
fn a_different_codebook_is_refused_with_both_shapes() {
    let cfg = VqkdConfig {
        n_codes: 128,
        ..config("config.json")
    };
    let err = format!(
        "{:#}",
        load_vqkd(&dir().join("unilm.pth"), Some(cfg.clone())).unwrap_err()
    );
    assert!(err.contains("quantize.embedding.weight"), "{err}");
    assert!(
        err.contains(&format!("({}, {})", 64, cfg.code_dim)),
        "{err}"
    );
    assert!(
        err.contains(&format!("({}, {})", 128, cfg.code_dim)),
        "{err}"
    );
}

#[test]
fn photos_tokenize_like_test_get_code() {
    let cfg = config("photo_config.json");
    let m = load_vqkd(&dir().join("photo_unilm.pth"), Some(cfg.clone())).unwrap();
    let t = beitv2::data::EvalTransform {
        resize_short: 256,
        crop: (224, 224),
        mean: [0.0; 3],
        std: [1.0; 3],
    };
    let photos: Vec<PathBuf> = ["astronaut", "chelsea", "coffee", "rocket"]
        .iter()
        .map(|n| Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("assets/photos/{n}.png")))
        .collect();
    let data: Vec<f32> = beitv2::data::load_batch(&photos, &t)
        .into_iter()
        .flat_map(|r| r.unwrap())
        .collect();
    let x = Tensor::from_vec(data, (4, 3, 224, 224), &Device::Cpu).unwrap();
    let got = int_values(&m.tokens(&Vqkd::preprocess(&x).unwrap()).unwrap());
    let want = int_values(&io()["photo_ids"]);
    assert_eq!(got.len(), 4 * 196);
    assert_eq!(got, want);
}

#[test]
fn shapes_are_inferred_from_the_checkpoint() {
    let sd = beitv2::checkpoint::read_vqkd_state(&dir().join("unilm.pth")).unwrap();
    let got = beitv2::checkpoint::infer_vqkd_config(&sd).unwrap();
    // Heads are invisible in the weights (64-wide heads are assumed).
    let want = VqkdConfig {
        num_heads: got.num_heads,
        ..config("config.json")
    };
    assert_eq!(got, want);
}
