//! Reading and writing checkpoints: format detection (safetensors or PyTorch
//! zip), layout mapping to timm's names, adaptation to a model configuration
//! (shared → per-block tables, table resizing, pretraining-only keys) and a
//! strict check that names every missing, unexpected or mis-shaped key.

pub mod keymap;
pub mod pickle;
pub mod torch;

use crate::model::rel_pos::{resize_table, square_window_for_len, table_len};
use crate::model::{Beit, BeitConfig, GlobalPool, RelPosBias, RelPosInterp, expected_weights};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use keymap::{Layout, detect_layout, is_pretraining_only, mmpretrain_to_timm};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Metadata key under which converted safetensors carry the model config (JSON).
pub const CONFIG_METADATA_KEY: &str = "beitv2_config";

/// Weights under timm's names, as read from one file.
#[derive(Debug, Clone)]
pub struct StateDict {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, Tensor>,
    /// The model config stored by `beitv2 convert`, when present.
    pub config: Option<BeitConfig>,
    /// The safetensors metadata (empty for PyTorch files).
    pub metadata: HashMap<String, String>,
}

/// Metadata key under which tokenizer safetensors carry their shapes (JSON).
pub const VQKD_CONFIG_METADATA_KEY: &str = "beitv2_vqkd_config";

enum FileKind {
    Safetensors,
    TorchZip,
    LegacyPickle,
}

fn sniff(path: &Path) -> Result<FileKind> {
    let mut head = [0u8; 9];
    let mut f = std::fs::File::open(path)
        .with_context(|| format!("cannot open checkpoint {}", path.display()))?;
    let n = f
        .read(&mut head)
        .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    if n >= 4 && &head[..4] == b"PK\x03\x04" {
        return Ok(FileKind::TorchZip);
    }
    if n >= 2 && head[0] == 0x80 && head[1] <= 5 {
        return Ok(FileKind::LegacyPickle);
    }
    if n == 9 && head[8] == b'{' {
        return Ok(FileKind::Safetensors);
    }
    if n == 0 {
        bail!("checkpoint {} is empty", path.display());
    }
    bail!(
        "{} is neither a safetensors file nor a PyTorch checkpoint",
        path.display()
    )
}

/// Named tensors in file order.
type NamedTensors = Vec<(String, Tensor)>;

fn read_safetensors(path: &Path) -> Result<(NamedTensors, HashMap<String, String>)> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open checkpoint {}", path.display()))?;
    // SAFETY: the file is only read; a concurrent writer could change the bytes
    // under us, which at worst yields wrong values, as with any read.
    let mmap = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("cannot map checkpoint {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&mmap)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&mmap)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
            .with_context(|| format!("cannot read tensor '{name}' from {}", path.display()))?;
        out.push((name, t));
    }
    Ok((out, metadata))
}

fn read_torch(path: &Path) -> Result<NamedTensors> {
    let value = torch::read_torch_file(path)?;
    // Training checkpoints wrap the weights: mmengine under `state_dict`,
    // UNILM under `model` (or `module` when saved by DeepSpeed).
    let (_, weights) = torch::find_state_dict(&value);
    let tensors = torch::tensors_with_prefix(weights);
    if tensors.is_empty() {
        bail!("{} holds no tensors", path.display());
    }
    Ok(tensors)
}

/// Reads a checkpoint of any supported format and renames its keys to timm's.
pub fn read_state_dict(path: &Path) -> Result<StateDict> {
    let (raw, metadata) = match sniff(path)? {
        FileKind::Safetensors => read_safetensors(path)?,
        FileKind::TorchZip | FileKind::LegacyPickle => (read_torch(path)?, HashMap::new()),
    };
    let config = match metadata.get(CONFIG_METADATA_KEY) {
        Some(json) => Some(serde_json::from_str(json).with_context(|| {
            format!("the model config stored in {} is not valid", path.display())
        })?),
        None => None,
    };
    // DataParallel / DDP wrappers prefix every key with `module.`.
    let strip_module = raw.iter().all(|(k, _)| k.starts_with("module."));
    let layout = detect_layout(raw.iter().map(|(k, _)| k.as_str()));
    let mut tensors = BTreeMap::new();
    for (k, t) in raw {
        let k = if strip_module {
            k["module.".len()..].to_string()
        } else {
            k
        };
        let k = match layout {
            Layout::Timm => k,
            Layout::MmPretrain => mmpretrain_to_timm(&k),
        };
        tensors.insert(k, t);
    }
    warn_non_finite(path, &tensors)?;
    Ok(StateDict {
        path: path.to_path_buf(),
        tensors,
        config,
        metadata,
    })
}

/// Warns, naming the tensors (the first few) and their counts, when floating
/// weights hold NaN or ±Inf: such a file loads, but its outputs are not numbers.
fn warn_non_finite(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let mut bad = Vec::new();
    for (k, t) in tensors {
        if !t.dtype().is_float() {
            continue;
        }
        let t = t.to_dtype(DType::F32)?;
        let n = crate::kernels::with_f32(&t, |v| Ok(v.iter().filter(|x| !x.is_finite()).count()))?;
        if n > 0 {
            bad.push(format!("{k} ({n} of {})", t.elem_count()));
        }
    }
    if !bad.is_empty() {
        let shown = bad.len().min(5);
        tracing::warn!(
            "{}: {} tensor(s) hold NaN or Inf values: {}{}",
            path.display(),
            bad.len(),
            bad[..shown].join(", "),
            if bad.len() > shown { ", …" } else { "" }
        );
    }
    Ok(())
}

/// The shape of `t[k]`, which must have `rank` axes.
fn shape_with_rank(
    t: &BTreeMap<String, Tensor>,
    file: &Path,
    k: &str,
    rank: usize,
    missing_hint: &str,
) -> Result<Vec<usize>> {
    let v = t
        .get(k)
        .with_context(|| format!("{}: key '{k}' is missing ({missing_hint})", file.display()))?;
    if v.rank() != rank {
        bail!(
            "{}: '{k}' has shape {}, expected {rank} axes",
            file.display(),
            dims_str(v.dims())
        );
    }
    Ok(v.dims().to_vec())
}

fn dims_str(d: &[usize]) -> String {
    format!(
        "({})",
        d.iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// How many blocks `prefix0.`, `prefix1.`, … a state dict holds. The indices
/// must run from 0 without a gap: a stray `blocks.999999999.` key would
/// otherwise claim a model of a billion blocks (and building it to check the
/// weights would never end).
fn block_count(t: &BTreeMap<String, Tensor>, prefix: &str, file: &Path) -> Result<usize> {
    let found: std::collections::BTreeSet<usize> = t
        .keys()
        .filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse().ok())
        .collect();
    match found.last() {
        Some(&last) if last.checked_add(1) != Some(found.len()) => {
            let missing = (0..).find(|i| !found.contains(i)).unwrap_or(0);
            bail!(
                "{}: `{prefix}N.` keys run to index {last} but block {missing} is missing",
                file.display()
            )
        }
        _ => Ok(found.len()),
    }
}

/// Infers the architecture from tensor shapes (for checkpoints that carry no
/// config). Normalisation and crop cannot be seen in weights: BEiT v2
/// (ImageNet mean/std, crop 0.875) is assumed.
pub fn infer_config(sd: &StateDict) -> Result<BeitConfig> {
    let t = &sd.tensors;
    let hint = "cannot infer the architecture; pass --arch or --config";
    let get = |k: &str, rank: usize| shape_with_rank(t, &sd.path, k, rank, hint);
    let cls = get("cls_token", 3)?;
    let pe = get("patch_embed.proj.weight", 4)?;
    let embed_dim = *cls.last().unwrap_or(&0);
    let depth = match block_count(t, "blocks.", &sd.path)? {
        0 => bail!("{} has no `blocks.N.` keys", sd.path.display()),
        n => n,
    };
    let (patch_size, in_chans) = (pe[2], pe[1]);
    let per_block = t.get("blocks.0.attn.relative_position_bias_table");
    let shared = t.get("rel_pos_bias.relative_position_bias_table");
    let rel_pos_bias = match (per_block, shared) {
        (Some(_), _) => RelPosBias::PerBlock,
        (None, Some(_)) => RelPosBias::Shared,
        (None, None) => RelPosBias::None,
    };
    let table = per_block.or(shared);
    let (num_heads, window) = match table {
        Some(tb) => {
            let (rows, heads) = tb.dims2()?;
            let w = square_window_for_len(rows).with_context(|| {
                format!(
                    "{}: a relative position table of {rows} rows is not a square window (pass --config)",
                    sd.path.display()
                )
            })?;
            (heads, w)
        }
        None => bail!(
            "cannot infer the number of heads of {}: it has no relative position table (pass --config)",
            sd.path.display()
        ),
    };
    let fc1 = get("blocks.0.mlp.fc1.weight", 2)?;
    let global_pool = if t.contains_key("fc_norm.weight") {
        GlobalPool::Avg
    } else if t.contains_key("norm.weight") {
        GlobalPool::Token
    } else {
        GlobalPool::Avg
    };
    let mut cfg = BeitConfig::preset("beitv2_base_patch16_224")?;
    cfg.img_size = match (
        window.0.checked_mul(patch_size),
        window.1.checked_mul(patch_size),
    ) {
        (Some(h), Some(w)) => [h, w],
        _ => bail!(
            "{}: a window of {window:?} patches of {patch_size} px is too large",
            sd.path.display()
        ),
    };
    cfg.patch_size = patch_size;
    cfg.in_chans = in_chans;
    cfg.num_classes = match t.contains_key("head.weight") {
        true => get("head.weight", 2)?[0],
        false => 0,
    };
    cfg.embed_dim = embed_dim;
    cfg.depth = depth;
    cfg.num_heads = num_heads;
    cfg.mlp_ratio = fc1[0] as f64 / embed_dim as f64;
    cfg.qkv_bias = t.contains_key("blocks.0.attn.q_bias");
    cfg.use_abs_pos_emb = t.contains_key("pos_embed");
    cfg.rel_pos_bias = rel_pos_bias;
    cfg.layer_scale = t.contains_key("blocks.0.gamma_1");
    cfg.global_pool = global_pool;
    cfg.validate()
        .with_context(|| format!("inferred an invalid config from {}", sd.path.display()))?;
    Ok(cfg)
}

/// Makes a state dict fit `cfg`: drops index buffers and pretraining-only
/// keys, clones a shared table into every block of a per-block model, resizes
/// relative-position tables to the model's window, converts to f32, and then
/// checks every key and shape strictly.
pub fn adapt_to_config(
    sd: &StateDict,
    cfg: &BeitConfig,
    interp: RelPosInterp,
) -> Result<HashMap<String, Tensor>> {
    let file = sd.path.display();
    let mut t: BTreeMap<String, Tensor> = sd
        .tensors
        .iter()
        .filter(|(k, _)| !k.ends_with("relative_position_index") && k.as_str() != "attn.k_bias")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let pretraining = t.keys().any(|k| is_pretraining_only(k));
    if pretraining {
        let before = t.len();
        t.retain(|k, _| !is_pretraining_only(k));
        // The MIM model's final `norm` is unused by an average-pooling classifier.
        if cfg.global_pool == GlobalPool::Avg {
            t.retain(|k, _| !k.starts_with("norm."));
        }
        tracing::info!(
            "{file}: ignored {} pretraining-only tensors",
            before - t.len()
        );
    }
    const SHARED: &str = "rel_pos_bias.relative_position_bias_table";
    if cfg.rel_pos_bias == RelPosBias::PerBlock
        && let Some(shared) = t.remove(SHARED)
    {
        for i in 0..cfg.depth {
            t.entry(format!("blocks.{i}.attn.relative_position_bias_table"))
                .or_insert_with(|| shared.clone());
        }
        tracing::info!("{file}: cloned the shared relative position table into every block");
    }
    let dst_window = cfg.grid();
    let dst_rows = table_len(dst_window);
    for (k, v) in t.iter_mut() {
        if !k.ends_with("relative_position_bias_table") {
            continue;
        }
        let (rows, heads) = v
            .dims2()
            .with_context(|| format!("{file}: '{k}' should be a 2-D table"))?;
        if rows == dst_rows {
            continue;
        }
        let src_window = square_window_for_len(rows).with_context(|| {
            format!(
                "{file}: '{k}' has {rows} rows, which is no square window; cannot resize it to {dst_rows}"
            )
        })?;
        let data = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let resized = resize_table(&data, heads, src_window, dst_window, interp)
            .with_context(|| format!("{file}: resizing '{k}'"))?;
        *v = Tensor::from_vec(resized, (dst_rows, heads), &Device::Cpu)?;
        tracing::debug!("{file}: resized '{k}' from {rows} to {dst_rows} rows ({interp:?})");
    }
    strict_check(&file.to_string(), &t, &expected_weights(cfg)?)?;
    to_f32(t)
}

/// Converts every tensor to f32 (checkpoints may hold f16 / bf16 / f64).
pub fn to_f32(t: BTreeMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    t.into_iter()
        .map(|(k, v)| {
            let v = if v.dtype() == DType::F32 {
                v
            } else {
                v.to_dtype(DType::F32)?
            };
            Ok((k, v))
        })
        .collect()
}

/// Compares a state dict with the weights a model expects and fails with
/// every wrong-shape, missing and unexpected key named (with shapes).
pub fn strict_check(
    file: &str,
    t: &BTreeMap<String, Tensor>,
    expected: &[(String, Vec<usize>)],
) -> Result<()> {
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    for (name, shape) in expected {
        match t.get(name) {
            None => missing.push(format!("{name} {}", dims_str(shape))),
            Some(v) if v.dims() != shape.as_slice() => wrong.push(format!(
                "{name}: checkpoint {} vs model {}",
                dims_str(v.dims()),
                dims_str(shape)
            )),
            Some(_) => {}
        }
    }
    let unexpected: Vec<String> = t
        .iter()
        .filter(|(k, _)| !expected.iter().any(|(n, _)| n == *k))
        .map(|(k, v)| format!("{k} {}", dims_str(v.dims())))
        .collect();
    if missing.is_empty() && wrong.is_empty() && unexpected.is_empty() {
        return Ok(());
    }
    let mut msg = format!("{file} does not fit the model");
    for (what, list) in [
        ("wrong shape", &wrong),
        ("missing", &missing),
        ("unexpected", &unexpected),
    ] {
        if !list.is_empty() {
            let shown: Vec<&str> = list.iter().take(12).map(String::as_str).collect();
            let more = if list.len() > 12 {
                format!(" … and {} more", list.len() - 12)
            } else {
                String::new()
            };
            msg.push_str(&format!(
                "\n  {what} ({}): {}{more}",
                list.len(),
                shown.join("; ")
            ));
        }
    }
    bail!(msg)
}

/// How to pick the model configuration for a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// A preset name (`beitv2_base_patch16_224`, ...).
    pub arch: Option<String>,
    /// A full custom configuration (wins over `arch`).
    pub config: Option<BeitConfig>,
    /// Run at another input size (tables are resized).
    pub img_size: Option<[usize; 2]>,
    pub interp: RelPosInterp,
}

/// Chooses the config: explicit config, else preset (head size taken from the
/// checkpoint), else the config stored in the file, else inferred from shapes.
pub fn resolve_config(sd: &StateDict, opts: &LoadOptions) -> Result<BeitConfig> {
    let mut cfg = if let Some(c) = &opts.config {
        c.clone()
    } else if let Some(arch) = &opts.arch {
        let mut c = BeitConfig::preset(arch)?;
        if let Some(&rows) = sd.tensors.get("head.weight").and_then(|h| h.dims().first())
            && rows != c.num_classes
        {
            tracing::info!("{}: using its {rows}-class head", sd.path.display());
            c.num_classes = rows;
        }
        c
    } else if let Some(c) = &sd.config {
        c.clone()
    } else {
        let c = infer_config(sd)?;
        tracing::warn!(
            "{}: no --arch given and no stored config; inferred the architecture from shapes and assumed BEiT v2 preprocessing (ImageNet mean/std)",
            sd.path.display()
        );
        c
    };
    if let Some([h, w]) = opts.img_size {
        cfg = cfg.with_img_size(h, w)?;
    }
    Ok(cfg)
}

/// Reads a checkpoint and fits its weights to the chosen config.
pub fn load_weights(
    path: &Path,
    opts: &LoadOptions,
) -> Result<(BeitConfig, HashMap<String, Tensor>)> {
    let sd = read_state_dict(path)?;
    let cfg = resolve_config(&sd, opts)?;
    let weights = adapt_to_config(&sd, &cfg, opts.interp)?;
    Ok((cfg, weights))
}

/// A pretraining checkpoint (ours, unilm's `beitv2_*_pt1k*.pth`,
/// mmpretrain's `backbone.`/`neck.`/`head.` layout) as the backbone
/// fine-tuning starts from, as upstream prepares it: the shared table cloned
/// into every block, the neck, MIM head, mask token and final norm dropped,
/// and a fresh `fc_norm` (identity) for mean pooling; no classifier head.
pub fn finetune_backbone(
    path: &Path,
    opts: &LoadOptions,
) -> Result<(BeitConfig, HashMap<String, Tensor>)> {
    let mut sd = read_state_dict(path)?;
    let mut cfg = resolve_config(&sd, opts)?;
    cfg.rel_pos_bias = RelPosBias::PerBlock;
    cfg.global_pool = GlobalPool::Avg;
    cfg.num_classes = 0;
    cfg.drop_path_rate = 0.0;
    sd.tensors.retain(|k, _| !k.starts_with("head."));
    let c = cfg.embed_dim;
    sd.tensors
        .entry("fc_norm.weight".into())
        .or_insert(Tensor::ones(c, DType::F32, &Device::Cpu)?);
    sd.tensors
        .entry("fc_norm.bias".into())
        .or_insert(Tensor::zeros(c, DType::F32, &Device::Cpu)?);
    let weights = adapt_to_config(&sd, &cfg, opts.interp)?;
    Ok((cfg, weights))
}

/// Builds the model from weights under timm's names (already fitted by
/// [`adapt_to_config`]).
pub fn build_model(cfg: &BeitConfig, weights: HashMap<String, Tensor>) -> Result<Beit> {
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    Ok(Beit::new(cfg, vb)?)
}

/// Reads a checkpoint and builds the model.
pub fn load_model(path: &Path, opts: &LoadOptions) -> Result<Beit> {
    let (cfg, weights) = load_weights(path, opts)?;
    build_model(&cfg, weights)
        .with_context(|| format!("building the model from {}", path.display()))
}

/// Writes tensors as safetensors with the model config in the metadata,
/// atomically (temporary file in the same folder, then rename).
pub fn save_safetensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    cfg: &BeitConfig,
) -> Result<()> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(CONFIG_METADATA_KEY.to_string(), serde_json::to_string(cfg)?);
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let contiguous: Vec<(String, Tensor)> = names
        .into_iter()
        .map(|k| (k, &tensors[k]))
        .map(|(k, v)| Ok((k.clone(), v.contiguous()?)))
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(contiguous.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
        .map_err(|e| anyhow::anyhow!("serialising {}: {e}", path.display()))?;
    crate::util::write_atomic(path, &bytes)
}

/// Maps a tokenizer key to unilm's names: mmpretrain's encoder keys
/// (`encoder.layers.N.ln1`, `encoder.ln1` = the per-token final norm) are
/// renamed; unilm keys pass through.
fn vqkd_key(k: &str) -> String {
    match k.strip_prefix("encoder.") {
        Some(rest) if rest.starts_with("layers.") || rest.starts_with("patch_embed.projection") => {
            format!("encoder.{}", mmpretrain_to_timm(rest))
        }
        Some(rest) if rest.starts_with("ln1.") => format!("encoder.fc_norm.{}", &rest[4..]),
        _ => k.to_string(),
    }
}

/// Reads the tensors of a tokenizer checkpoint (unilm `vqkd_encoder_*` or
/// mmpretrain `vqkd_encoder.pth`) under unilm's names, without the teacher,
/// the scaling layer and the quantizer's statistics.
pub fn read_vqkd_state(path: &Path) -> Result<StateDict> {
    let mut sd = read_state_dict(path)?;
    if let Some(initted) = sd.tensors.get("quantize.embedding.initted") {
        let v = initted
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if v.first().is_some_and(|&x| x == 0.0) {
            bail!(
                "{}: the codebook was never initialised (quantize.embedding.initted = 0)",
                path.display()
            );
        }
    }
    sd.tensors = std::mem::take(&mut sd.tensors)
        .into_iter()
        .filter(|(k, _)| {
            !(k.starts_with("teacher")
                || k.starts_with("scaling_layer")
                || k.starts_with("loss")
                || (k.starts_with("quantize.") && k != "quantize.embedding.weight"))
        })
        .map(|(k, v)| (vqkd_key(&k), v))
        .collect();
    Ok(sd)
}

/// Infers a tokenizer's shapes from its tensors. Heads are not visible in
/// the weights: a head width of 64 (every released BEiT) is assumed.
pub fn infer_vqkd_config(sd: &StateDict) -> Result<crate::model::vqkd::VqkdConfig> {
    let t = &sd.tensors;
    let hint = "is this a VQ-KD tokenizer?";
    let shape = |k: &str, rank: usize| shape_with_rank(t, &sd.path, k, rank, hint);
    let cls = shape("encoder.cls_token", 3)?;
    let pe = shape("encoder.patch_embed.proj.weight", 4)?;
    let pos = shape("encoder.pos_embed", 3)?;
    let book = shape("quantize.embedding.weight", 2)?;
    let fc1 = shape("encoder.blocks.0.mlp.fc1.weight", 2)?;
    let embed_dim = cls[2];
    // The position table holds the CLS token and a square grid of patches.
    let grid = (pos[1].saturating_sub(1) as f64).sqrt().round() as usize;
    let img_size = grid.checked_mul(pe[2]);
    let square = grid.checked_mul(grid).and_then(|g| g.checked_add(1)) == Some(pos[1]);
    let (Some(img_size), true) = (img_size, pos[1] >= 2 && square) else {
        bail!(
            "{}: 'encoder.pos_embed' has {} positions, not 1 + a square grid ({hint})",
            sd.path.display(),
            pos[1]
        );
    };
    let decoder_depth = block_count(t, "decoder.blocks.", &sd.path)?;
    let decoder_out_dim = match decoder_depth {
        0 => 0,
        _ => shape("decode_task_layer.2.weight", 2)?[0],
    };
    Ok(crate::model::vqkd::VqkdConfig {
        img_size,
        patch_size: pe[2],
        embed_dim,
        depth: block_count(t, "encoder.blocks.", &sd.path)?,
        num_heads: (embed_dim / 64).max(1),
        mlp_ratio: fc1[0] as f64 / embed_dim as f64,
        code_dim: book[1],
        n_codes: book[0],
        decoder_depth,
        decoder_out_dim,
    })
}

/// Loads a tokenizer. With `cfg` given, the checkpoint must match it exactly
/// (a different codebook size or dimension is refused with both shapes);
/// a decoder in the file is ignored when `cfg.decoder_depth` is 0.
pub fn load_vqkd(
    path: &Path,
    cfg: Option<crate::model::vqkd::VqkdConfig>,
) -> Result<crate::model::vqkd::Vqkd> {
    use crate::model::vqkd::Vqkd;
    let mut sd = read_vqkd_state(path)?;
    let stored = sd.metadata.get(VQKD_CONFIG_METADATA_KEY);
    let cfg = match (cfg, stored) {
        (Some(c), _) => c,
        (None, Some(json)) => serde_json::from_str(json).with_context(|| {
            format!(
                "the tokenizer config stored in {} is not valid",
                path.display()
            )
        })?,
        (None, None) => infer_vqkd_config(&sd)?,
    };
    cfg.validate()
        .with_context(|| format!("tokenizer shapes for {}", path.display()))?;
    if cfg.decoder_depth == 0 {
        sd.tensors
            .retain(|k, _| !(k.starts_with("decoder.") || k.starts_with("decode_task_layer.")));
    }
    let expected = crate::model::record_weights(|vb| Vqkd::new(&cfg, vb).map(|_| ()))?;
    strict_check(&path.display().to_string(), &sd.tensors, &expected)?;
    let vb = VarBuilder::from_tensors(to_f32(sd.tensors)?, DType::F32, &Device::Cpu);
    Vqkd::new(&cfg, vb).with_context(|| format!("building the tokenizer from {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state dict of zero-cost tensors of the given shapes.
    fn shapes(entries: &[(&str, &[usize])]) -> StateDict {
        let z = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
        StateDict {
            path: "test.safetensors".into(),
            tensors: entries
                .iter()
                .map(|(k, d)| (k.to_string(), z.broadcast_as(d.to_vec()).unwrap()))
                .collect(),
            config: None,
            metadata: HashMap::new(),
        }
    }

    #[test]
    fn a_gap_in_the_block_indices_is_refused_not_built() {
        let sd = shapes(&[
            ("cls_token", &[1, 1, 16]),
            ("patch_embed.proj.weight", &[16, 3, 8, 8]),
            ("blocks.0.attn.relative_position_bias_table", &[52, 2]),
            ("blocks.0.mlp.fc1.weight", &[64, 16]),
            ("blocks.999999999.norm1.weight", &[16]),
        ]);
        let err = format!("{:#}", infer_config(&sd).unwrap_err());
        assert!(
            err.contains("run to index 999999999 but block 1 is missing"),
            "{err}"
        );
    }

    #[test]
    fn a_tokenizer_position_table_must_be_cls_plus_a_square() {
        let vqkd = |positions: usize| {
            shapes(&[
                ("encoder.cls_token", &[1, 1, 16]),
                ("encoder.pos_embed", &[1, positions, 16]),
                ("encoder.patch_embed.proj.weight", &[16, 3, 8, 8]),
                ("encoder.blocks.0.mlp.fc1.weight", &[64, 16]),
                ("quantize.embedding.weight", &[64, 8]),
            ])
        };
        let ok = infer_vqkd_config(&vqkd(17)).unwrap();
        assert_eq!((ok.img_size, ok.depth, ok.n_codes), (32, 1, 64));
        for bad in [0, 1, 16] {
            let err = format!("{:#}", infer_vqkd_config(&vqkd(bad)).unwrap_err());
            assert!(err.contains("not 1 + a square grid"), "{bad}: {err}");
        }
    }

    #[test]
    fn absurd_sizes_are_refused_by_validation() {
        let mut c = BeitConfig::preset("beitv2_base_patch16_224").unwrap();
        c.depth = 1 << 20;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("depth 1048576 is over the supported maximum"),
            "{err}"
        );
        c.depth = 12;
        c.img_size = [1 << 20, 16];
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("image side 1048576 is over"), "{err}");
        c.img_size = [224, 224];
        c.validate().unwrap();
    }
}
