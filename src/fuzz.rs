//! Entry points for the fuzz targets (`fuzz/`, cargo-fuzz) and for the test
//! that replays their corpora and every input that once crashed
//! (`tests/fuzz_replay.rs`). Each takes arbitrary bytes, runs one parser the
//! way the command line does, and must return — an error is a fine outcome,
//! a panic, a hang or an unbounded allocation is a bug.

use std::io::Write;
use std::path::PathBuf;

/// A scratch file of this process and thread for parsers that read from a path.
fn scratch(ext: &str, data: &[u8]) -> PathBuf {
    let thread = format!("{:?}", std::thread::current().id());
    let thread: String = thread.chars().filter(char::is_ascii_digit).collect();
    let dir = std::env::temp_dir();
    let p = dir.join(format!("beitv2-fuzz-{}-{thread}.{ext}", std::process::id()));
    let mut f = std::fs::File::create(&p).expect("create the fuzz scratch file");
    f.write_all(data).expect("write the fuzz scratch file");
    p
}

/// A checkpoint of any format (sniffed: safetensors, torch zip, legacy
/// pickle), its key layout mapped to timm's, then the architecture inferred
/// from its shapes, for a model and for a tokenizer.
pub fn checkpoint(data: &[u8]) {
    let p = scratch("bin", data);
    if let Ok(sd) = crate::checkpoint::read_state_dict(&p) {
        let _ = crate::checkpoint::infer_config(&sd);
        let _ = crate::checkpoint::resolve_config(&sd, &Default::default());
    }
    if let Ok(sd) = crate::checkpoint::read_vqkd_state(&p)
        && let Ok(c) = crate::checkpoint::infer_vqkd_config(&sd)
    {
        let _ = c.validate();
    }
    let _ = std::fs::remove_file(p);
}

/// The pickle machine alone, on the bytes of a `data.pkl`.
pub fn pickle(data: &[u8]) {
    let _ = crate::checkpoint::pickle::unpickle(data);
}

/// Image decoding and conversion to RGB, then the eval transform (Pillow
/// bicubic resize, centre crop, normalisation) and a resize to a size taken
/// from the input's first two bytes.
pub fn image(data: &[u8]) {
    use crate::data::{EvalTransform, decode::decode_rgb, resize::resize_bicubic};
    let (w, h) = match data {
        [a, b, ..] => (1 + (*a as usize % 64), 1 + (*b as usize % 64)),
        _ => (7, 5),
    };
    if let Ok(img) = decode_rgb(data, "fuzz input") {
        let t = EvalTransform::from_crop_pct((32, 32), 0.875, [0.5; 3], [0.25; 3]);
        let _ = t.preprocess(&img);
        let _ = resize_bicubic(&img, w, h);
    }
}

/// Recipe and config parsers: the input as a fine-tuning, pretraining and
/// tokenizer recipe (TOML), its first line also as a `--set` override, and the
/// whole as a model and a tokenizer config (JSON).
pub fn recipe(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let p = scratch("toml", data);
    let set: Vec<String> = text
        .lines()
        .next()
        .map(str::to_string)
        .into_iter()
        .collect();
    let _ = crate::train::recipe::Recipe::load(Some(&p), &[]);
    let _ = crate::train::recipe::Recipe::load(None, &set);
    let _ = crate::train::pretrain::PretrainRecipe::load(Some(&p), &[]);
    let _ = crate::train::tokenizer::TokenizerRecipe::load(Some(&p), &[]);
    let _ = std::fs::remove_file(p);
    if let Ok(c) = serde_json::from_str::<crate::model::BeitConfig>(text) {
        let _ = c.validate();
    }
    let _ = serde_json::from_str::<crate::model::vqkd::VqkdConfig>(text);
}

/// Names a `shapes` input picks from: every key the config inference, the
/// layout map and the fitting of weights look at (`{}` is a block index).
const KEYS: &[&str] = &[
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "blocks.{}.attn.relative_position_bias_table",
    "blocks.{}.attn.relative_position_index",
    "rel_pos_bias.relative_position_bias_table",
    "blocks.{}.attn.qkv.weight",
    "blocks.{}.attn.q_bias",
    "blocks.{}.attn.v_bias",
    "blocks.{}.attn.proj.weight",
    "blocks.{}.attn.proj.bias",
    "blocks.{}.mlp.fc1.weight",
    "blocks.{}.mlp.fc1.bias",
    "blocks.{}.mlp.fc2.weight",
    "blocks.{}.mlp.fc2.bias",
    "blocks.{}.norm1.weight",
    "blocks.{}.norm1.bias",
    "blocks.{}.norm2.weight",
    "blocks.{}.norm2.bias",
    "blocks.{}.gamma_1",
    "blocks.{}.gamma_2",
    "fc_norm.weight",
    "fc_norm.bias",
    "norm.weight",
    "head.weight",
    "head.bias",
    "mask_token",
    "lm_head.weight",
    "backbone.layers.{}.attn.qkv.weight",
    "backbone.cls_token",
    "encoder.cls_token",
    "encoder.pos_embed",
    "encoder.patch_embed.proj.weight",
    "encoder.blocks.{}.mlp.fc1.weight",
    "decoder.blocks.{}.mlp.fc1.weight",
    "quantize.embedding.weight",
    "decode_task_layer.2.weight",
];

/// A state dict whose keys and shapes come from the input (tensors are
/// broadcast zeros, so a shape costs no memory), run through config
/// inference for a model and a tokenizer; when the inferred model is small,
/// also through fitting the weights to it and building it.
pub fn shapes(data: &[u8]) {
    use candle_core::{DType, Device, Tensor};
    let mut tensors = std::collections::BTreeMap::new();
    let mut bytes = data.iter().copied();
    let mut next = || bytes.next();
    while let (Some(k), Some(b0), Some(b1), Some(rank)) = (next(), next(), next(), next()) {
        let key = KEYS[k as usize % KEYS.len()];
        // Block indices: small mostly, any u16 at times (a depth of 65,536).
        let block = u16::from_le_bytes([b0, b1]);
        let key = key.replace("{}", &block.to_string());
        let mut dims = Vec::new();
        for _ in 0..rank % 5 {
            let (Some(lo), Some(hi)) = (next(), next()) else {
                break;
            };
            dims.push(u16::from_le_bytes([lo, hi]) as usize % 4097);
        }
        let Ok(t) = Tensor::zeros((), DType::F32, &Device::Cpu).and_then(|z| z.broadcast_as(dims))
        else {
            continue;
        };
        tensors.insert(key, t);
    }
    let sd = crate::checkpoint::StateDict {
        path: "fuzz input".into(),
        tensors,
        config: None,
        metadata: Default::default(),
    };
    if let Ok(c) = crate::checkpoint::infer_vqkd_config(&sd) {
        let _ = c.validate();
    }
    let Ok(cfg) = crate::checkpoint::infer_config(&sd) else {
        return;
    };
    let elements: usize = sd.tensors.values().map(|t| t.elem_count()).sum();
    if cfg.macs() < 50_000_000 && elements < 1 << 22 {
        let interp = crate::model::RelPosInterp::default();
        if let Ok(w) = crate::checkpoint::adapt_to_config(&sd, &cfg, interp) {
            let _ = crate::checkpoint::build_model(&cfg, w);
        }
    }
}
