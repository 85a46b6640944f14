//! Parity with timm: tiny random-weight models written by `tools/make_fixtures.py`
//! in timm, mmpretrain and unilm layouts; logits, pooled features, final tokens
//! and per-block tokens must match the PyTorch outputs.

use beitv2::checkpoint::{
    LoadOptions, adapt_to_config, build_model, load_model, load_weights, read_state_dict,
    save_safetensors,
};
use beitv2::model::rel_pos::{relative_position_index, resize_table};
use beitv2::model::{BeitConfig, RelPosBias, RelPosInterp, param_count};
mod common;

use candle_core::{Device, Tensor};
use common::{load_st, max_abs_diff};
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")
}

fn config(case: &str) -> BeitConfig {
    BeitConfig::from_file(&fixtures().join(case).join("config.json")).unwrap()
}

fn opts(cfg: BeitConfig) -> LoadOptions {
    LoadOptions {
        config: Some(cfg),
        ..Default::default()
    }
}

/// Checks logits, pooled features, final tokens and every block's tokens.
fn check_outputs(case: &str, file: &str, cfg: BeitConfig) -> f32 {
    let dir = fixtures().join(case);
    let io = load_st(&dir.join("io.safetensors"));
    let model =
        load_model(&dir.join(file), &opts(cfg)).unwrap_or_else(|e| panic!("{case}/{file}: {e:#}"));
    let x = &io["input"];
    let feats = model.forward_features(x).unwrap();
    let mut worst = 0f32;
    let mut check = |what: &str, got: &Tensor, want: &Tensor| {
        let d = max_abs_diff(got, want);
        assert!(d <= TOL, "{case}/{file}: {what} differs by {d}");
        worst = worst.max(d);
    };
    check("features", &feats, &io["features"]);
    check(
        "pre_logits",
        &model.forward_head(&feats, true).unwrap(),
        &io["pre_logits"],
    );
    check("logits", &model.forward(x).unwrap(), &io["logits"]);
    let depth = model.cfg.depth as i64;
    let inter = model
        .forward_intermediates(x, &(0..depth).collect::<Vec<_>>())
        .unwrap();
    for it in &inter {
        check(
            &format!("block.{}", it.block),
            &it.tokens,
            &io[&format!("block.{}", it.block)],
        );
    }
    worst
}

#[test]
fn every_format_matches_timm() {
    for case in ["v2_avg", "v1_token"] {
        for file in [
            "timm.safetensors",
            "timm.pth",
            "timm.bin",
            "mmpretrain.pth",
            "unilm.pth",
        ] {
            let d = check_outputs(case, file, config(case));
            eprintln!("{case}/{file}: max abs diff {d:.2e}");
        }
    }
}

#[test]
fn shared_table_loads_as_shared_and_as_per_block() {
    let shared = config("shared");
    assert_eq!(shared.rel_pos_bias, RelPosBias::Shared);
    let per_block = BeitConfig {
        rel_pos_bias: RelPosBias::PerBlock,
        ..shared.clone()
    };
    for file in ["timm.safetensors", "unilm.pth"] {
        check_outputs("shared", file, shared.clone());
        check_outputs("shared", file, per_block.clone());
    }
}

#[test]
fn architecture_is_inferred_from_shapes() {
    // A non-square window cannot be told from the table length alone.
    let sd = read_state_dict(&fixtures().join("v1_token/timm.safetensors")).unwrap();
    let err = beitv2::checkpoint::infer_config(&sd)
        .unwrap_err()
        .to_string();
    assert!(err.contains("80 rows") && err.contains("--config"), "{err}");
    for case in ["v2_avg", "shared"] {
        let sd = read_state_dict(&fixtures().join(case).join("timm.safetensors")).unwrap();
        let inferred = beitv2::checkpoint::infer_config(&sd).unwrap();
        let want = config(case);
        assert_eq!(
            BeitConfig {
                mean: want.mean,
                std: want.std,
                crop_pct: want.crop_pct,
                ..inferred
            },
            want
        );
    }
}

#[test]
fn resized_tables_and_logits_match_both_references() {
    let dir = fixtures().join("resize");
    let io = load_st(&dir.join("io.safetensors"));
    let tables = load_st(&dir.join("tables.safetensors"));
    let weights = fixtures().join("v2_avg/timm.safetensors");
    let cfg = config("resize");
    assert_eq!(cfg.img_size, [48, 48]);
    for (interp, name) in [
        (RelPosInterp::Linear, "linear"),
        (RelPosInterp::Cubic, "cubic"),
    ] {
        let o = LoadOptions {
            config: Some(config("v2_avg")),
            img_size: Some([48, 48]),
            interp,
            ..Default::default()
        };
        let (got_cfg, w) = load_weights(&weights, &o).unwrap();
        assert_eq!(got_cfg, cfg);
        for i in 0..2 {
            let got = &w[&format!("blocks.{i}.attn.relative_position_bias_table")];
            let d = max_abs_diff(got, &tables[&format!("blocks.{i}.{name}")]);
            assert!(d <= 1e-5, "{name} table {i} differs by {d}");
        }
        let model = build_model(&got_cfg, w).unwrap();
        let d = max_abs_diff(
            &model.forward(&io["input"]).unwrap(),
            &io[&format!("logits_{name}")],
        );
        eprintln!("resize {name}: logits max abs diff {d:.2e}");
        assert!(d <= TOL, "{name} logits differ by {d}");
    }
}

#[test]
fn table_resize_224_to_384_matches_scipy_and_timm() {
    let t = load_st(&fixtures().join("resize/tables_27_47.safetensors"));
    let src = t["source"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (interp, name) in [
        (RelPosInterp::Linear, "linear"),
        (RelPosInterp::Cubic, "cubic"),
    ] {
        let got = resize_table(&src, 2, (14, 14), (24, 24), interp).unwrap();
        let got = Tensor::from_vec(got, (2212, 2), &Device::Cpu).unwrap();
        let d = max_abs_diff(&got, &t[name]);
        eprintln!("27→47 {name}: max abs diff {d:.2e}");
        assert!(d <= 1e-5, "{name} differs by {d}");
    }
}

#[test]
fn relative_position_index_matches_timm() {
    let t = load_st(&fixtures().join("rel_index.safetensors"));
    for (key, window) in [("index_14x14", (14, 14)), ("index_4x6", (4, 6))] {
        let want = t[key].flatten_all().unwrap().to_vec1::<i64>().unwrap();
        let got: Vec<i64> = relative_position_index(window)
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(got, want, "{key}");
    }
}

#[test]
fn parameter_counts_match_published_numbers() {
    let base = BeitConfig::preset("beitv2_base_patch16_224").unwrap();
    assert_eq!(param_count(&base).unwrap(), 86_530_984);
    let large = BeitConfig::preset("beitv2_large_patch16_224").unwrap();
    assert_eq!(param_count(&large).unwrap(), 304_430_568);
    let base21k = BeitConfig::preset("beitv2_base_patch16_224.in1k_ft_in22k").unwrap();
    assert_eq!(param_count(&base21k).unwrap(), 102_557_713);
}

#[test]
fn mismatched_checkpoint_names_keys_and_shapes() {
    let weights = fixtures().join("v2_avg/timm.safetensors");
    let sd = read_state_dict(&weights).unwrap();
    let mut wrong = config("v2_avg");
    wrong.num_classes = 11;
    wrong.layer_scale = false;
    let err = format!(
        "{:#}",
        adapt_to_config(&sd, &wrong, RelPosInterp::Cubic).unwrap_err()
    );
    assert!(err.contains("timm.safetensors"), "{err}");
    assert!(
        err.contains("head.weight: checkpoint (10, 16) vs model (11, 16)"),
        "{err}"
    );
    assert!(
        err.contains("unexpected") && err.contains("blocks.0.gamma_1"),
        "{err}"
    );
    let mut deeper = config("v2_avg");
    deeper.depth = 3;
    let err = format!(
        "{:#}",
        adapt_to_config(&sd, &deeper, RelPosInterp::Cubic).unwrap_err()
    );
    assert!(
        err.contains("missing") && err.contains("blocks.2.attn.qkv.weight (48, 16)"),
        "{err}"
    );
}

#[test]
fn truncated_and_garbage_checkpoints_are_refused_with_the_file_name() {
    let dir = std::env::temp_dir().join(format!("beitv2-parity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for src in ["timm.safetensors", "timm.pth"] {
        let bytes = std::fs::read(fixtures().join("v2_avg").join(src)).unwrap();
        let cut = dir.join(format!("cut-{src}"));
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let err = format!(
            "{:#}",
            load_model(&cut, &opts(config("v2_avg"))).unwrap_err()
        );
        assert!(err.contains(&format!("cut-{src}")), "{err}");
    }
    let junk = dir.join("junk.pth");
    std::fs::write(&junk, b"definitely not a checkpoint").unwrap();
    let err = format!(
        "{:#}",
        load_model(&junk, &LoadOptions::default()).unwrap_err()
    );
    assert!(err.contains("junk.pth"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn converted_safetensors_carry_their_config() {
    let dir = std::env::temp_dir().join(format!("beitv2-convert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config("v1_token");
    let (c, w) = load_weights(
        &fixtures().join("v1_token/mmpretrain.pth"),
        &opts(cfg.clone()),
    )
    .unwrap();
    let out = dir.join("converted.safetensors");
    save_safetensors(&out, &w, &c).unwrap();
    // No config given: the one stored in the metadata is used.
    let model = load_model(&out, &LoadOptions::default()).unwrap();
    assert_eq!(model.cfg, cfg);
    let io = load_st(&fixtures().join("v1_token/io.safetensors"));
    let d = max_abs_diff(&model.forward(&io["input"]).unwrap(), &io["logits"]);
    assert!(d <= TOL, "{d}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn real_photos_end_to_end_match_torchvision_and_timm() {
    // Our decode + Pillow-exact resize + crop + normalise feeding our model,
    // against torchvision's eval transform feeding timm (tiny 224-px model).
    let dir = fixtures().join("photos");
    let io = load_st(&dir.join("io.safetensors"));
    let cfg = config("photos");
    let model = load_model(&dir.join("timm.safetensors"), &opts(cfg.clone())).unwrap();
    let photos: Vec<PathBuf> = ["astronaut", "chelsea", "coffee", "rocket"]
        .iter()
        .map(|n| Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("assets/photos/{n}.png")))
        .collect();
    for (crop_pct, key) in [(0.875, "logits_0875"), (0.9, "logits_09")] {
        let t = beitv2::data::EvalTransform::from_crop_pct((224, 224), crop_pct, cfg.mean, cfg.std);
        let data: Vec<f32> = beitv2::data::load_batch(&photos, &t)
            .into_iter()
            .flat_map(|r| r.unwrap())
            .collect();
        let x = Tensor::from_vec(data, (4, 3, 224, 224), &Device::Cpu).unwrap();
        let d = max_abs_diff(&model.forward(&x).unwrap(), &io[key]);
        eprintln!("photos crop_pct {crop_pct}: logits max abs diff {d:.2e}");
        assert!(d <= TOL, "{key}: {d}");
    }
}
