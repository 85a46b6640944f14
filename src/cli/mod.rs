//! The `beitv2` command line.

mod batch;
mod bench;
mod classify;
mod convert;
mod demo;
mod features;
mod info;
mod inputs;
mod tokenize;
mod train;

use crate::checkpoint::{self, LoadOptions};
use crate::data::EvalTransform;
use crate::model::{Beit, BeitConfig, RelPosInterp};
use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(
    name = "beitv2",
    version,
    about = "BEiT v1/v2 image models: classify, embed, convert, benchmark"
)]
pub struct Cli {
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Classify images and print the top-k classes.
    Classify(classify::ClassifyArgs),
    /// Extract embeddings (CLS, pooled, patch tokens or intermediate layers).
    Features(features::FeaturesArgs),
    /// Print parameters, MACs, input size and normalisation of an architecture.
    Info(info::InfoArgs),
    /// Convert any supported checkpoint to canonical safetensors.
    Convert(convert::ConvertArgs),
    /// Measure inference throughput and peak memory with random weights.
    Bench(bench::BenchArgs),
    /// Encode images into VQ-KD visual tokens (and codebook usage statistics).
    Tokenize(tokenize::TokenizeArgs),
    /// Train a VQ-KD tokenizer by distilling a teacher (CLIP or a BEiT).
    TrainTokenizer(train::RecipeArgs),
    /// Fine-tune a BEiT on a labelled dataset (recipe TOML + overrides).
    Finetune(train::RecipeArgs),
    /// Train a linear head on frozen BEiT features.
    Linprobe(train::LinprobeArgs),
    /// BEiT v2 masked image modeling on a frozen tokenizer's codes.
    Pretrain(train::RecipeArgs),
    /// The whole BEiT v2 pipeline on Fashion-MNIST, offline: teacher, tokenizer,
    /// MIM pretraining, fine-tuning and probing beside training from scratch.
    Demo(demo::DemoArgs),
    /// Top-1 / top-5 / loss of a classifier on a labelled dataset (JSON summary).
    Eval(train::EvalArgs),
}

/// Where the weights come from and which architecture they are.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Checkpoint file: timm .safetensors/.pth/.bin, mmpretrain .pth, unilm .pth.
    #[arg(long, value_name = "FILE", conflicts_with = "model")]
    pub weights: Option<PathBuf>,
    /// Hugging Face hub id, e.g. timm/beitv2_base_patch16_224.in1k_ft_in22k_in1k.
    #[arg(long, value_name = "HUB_ID")]
    pub model: Option<String>,
    /// Architecture preset (see `beitv2 info --list`); inferred when omitted.
    #[arg(long)]
    pub arch: Option<String>,
    /// Custom model configuration (JSON or TOML), instead of --arch.
    #[arg(long, value_name = "FILE", conflicts_with = "arch")]
    pub config: Option<PathBuf>,
    /// Run at another input size, e.g. 384 or 384x512 (relative-position tables are resized).
    #[arg(long, value_parser = parse_size)]
    pub img_size: Option<[usize; 2]>,
    /// How relative-position tables are resized for another input size.
    #[arg(long, value_enum, default_value_t = RelPosInterp::Cubic)]
    pub rel_pos_interp: RelPosInterp,
}

fn parse_size(s: &str) -> Result<[usize; 2], String> {
    let parse = |v: &str| v.trim().parse::<usize>().map_err(|e| format!("'{v}': {e}"));
    match s.split_once(['x', 'X']) {
        Some((h, w)) => Ok([parse(h)?, parse(w)?]),
        None => {
            let v = parse(s)?;
            Ok([v, v])
        }
    }
}

/// Runs of at least this many images pack fp32 weights for the panel kernel.
/// Base model on AMD Zen 4 (2 threads): packing took 0.07–0.40 s, and each
/// image ran about 0.15 s faster at batch 1 (16 images: 6.0–6.8 s → 3.7–3.9 s)
/// and 5% faster at the default batch of 8 (64 images: 13.3–14.0 s →
/// 12.7–13.2 s), for 0.2 GB more peak memory.
pub const PACK_F32_MIN_IMAGES: usize = 8;

/// Packs an fp32 model's weights into the panel kernel's layout when the run
/// has at least [`PACK_F32_MIN_IMAGES`] images and the kernel can run here;
/// the packed copy costs the blocks' weights once more in memory. `images`
/// counts the whole run, finished items included, so that a resumed run
/// takes the same kernels (and gives the same bits) as the first.
pub fn pack_f32_for_run(
    model: &mut Beit,
    dtype: crate::kernels::Precision,
    images: usize,
) -> Result<()> {
    if dtype == crate::kernels::Precision::F32
        && images >= PACK_F32_MIN_IMAGES
        && crate::kernels::fused_enabled()
        && crate::kernels::gemm::f32_panels_available()
    {
        let t = std::time::Instant::now();
        model.set_precision(dtype)?;
        tracing::info!(
            "packed the fp32 weights for the panel kernel in {:.2}s ({images} images to run)",
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

impl ModelArgs {
    /// Resolves the weights file and loads the model for inference at `dtype`.
    pub fn load(&self, dtype: crate::kernels::Precision) -> Result<Beit> {
        let (cfg, weights) = self.load_weights()?;
        let mut model = checkpoint::build_model(&cfg, weights)?;
        if let Some(why) = dtype
            .quant()
            .and_then(crate::kernels::gemm::not_accelerated_because)
        {
            tracing::warn!(
                "--dtype {dtype:?} is not faster than f32 on this CPU (kernels at ISA level {}): {why}, so it runs as an fp32 GEMM on the rounded values (the same results, at f32 speed or slower)",
                crate::kernels::isa::active()
            );
        }
        // fp32 keeps the weights as loaded here: packing them for the panel
        // kernel costs more start-up time than a few images win back
        // ([`pack_f32_for_run`] packs them once a run is known to be long).
        if dtype != crate::kernels::Precision::F32 {
            let t = std::time::Instant::now();
            model.set_precision(dtype)?;
            tracing::info!(
                "packed the weights for {dtype:?} in {:.2}s",
                t.elapsed().as_secs_f64()
            );
        }
        Ok(model)
    }

    /// The weights file (downloaded from the hub when named by id) and the
    /// load options these arguments give.
    pub fn resolve(&self) -> Result<(PathBuf, LoadOptions)> {
        let (path, hub_arch) = match (&self.weights, &self.model) {
            (Some(p), _) => (p.clone(), None),
            (None, Some(id)) => (
                crate::hub::resolve(id)?,
                crate::hub::arch_from_model_id(id).map(str::to_string),
            ),
            (None, None) => bail!(
                "no weights given: pass --weights FILE (a timm, mmpretrain or unilm checkpoint) \
                 or --model HUB_ID (e.g. --model timm/beitv2_base_patch16_224.in1k_ft_in22k_in1k)"
            ),
        };
        let config = self
            .config
            .as_deref()
            .map(BeitConfig::from_file)
            .transpose()?;
        let arch = self.arch.clone().or(hub_arch);
        let opts = LoadOptions {
            arch,
            config,
            img_size: self.img_size,
            interp: self.rel_pos_interp,
        };
        Ok((path, opts))
    }

    /// Resolves the weights file, picks the config and fits the weights to it.
    pub fn load_weights(
        &self,
    ) -> Result<(
        BeitConfig,
        std::collections::HashMap<String, candle_core::Tensor>,
    )> {
        let (path, opts) = self.resolve()?;
        let t = std::time::Instant::now();
        let (cfg, weights) = checkpoint::load_weights(&path, &opts)?;
        tracing::info!(
            "loaded {} in {:.2}s ({} blocks, {} classes, input {}x{})",
            path.display(),
            t.elapsed().as_secs_f64(),
            cfg.depth,
            cfg.num_classes,
            cfg.img_size[0],
            cfg.img_size[1]
        );
        Ok((cfg, weights))
    }
}

/// Preprocessing options shared by the commands that read images.
#[derive(Args, Debug, Clone)]
pub struct PreprocessArgs {
    /// Crop ratio: short side resized to floor(size / crop_pct) before the
    /// centre crop. Default: the model's (0.875 = mmpretrain/unilm; timm uses 0.9).
    #[arg(long)]
    pub crop_pct: Option<f64>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

impl PreprocessArgs {
    pub fn transform(&self, cfg: &BeitConfig) -> Result<EvalTransform> {
        let crop_pct = self.crop_pct.unwrap_or(cfg.crop_pct);
        if !(crop_pct > 0.0 && crop_pct <= 1.0) {
            bail!("--crop-pct {crop_pct} must be in (0, 1]");
        }
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        let [h, w] = cfg.img_size;
        Ok(EvalTransform::from_crop_pct(
            (h, w),
            crop_pct,
            cfg.mean,
            cfg.std,
        ))
    }
}

/// Runs the command line; the process exit code is non-zero on error.
pub fn run(cli: Cli) -> Result<()> {
    crate::kernels::isa::cap_from_env().map_err(anyhow::Error::msg)?;
    match cli.command {
        Command::Classify(a) => classify::run(a),
        Command::Features(a) => features::run(a),
        Command::Info(a) => info::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Tokenize(a) => tokenize::run(a),
        Command::TrainTokenizer(a) => train::train_tokenizer(a),
        Command::Finetune(a) => train::finetune(a),
        Command::Linprobe(a) => train::linprobe(a),
        Command::Eval(a) => train::eval(a),
        Command::Pretrain(a) => train::pretrain(a),
        Command::Demo(a) => demo::run(a),
    }
}

pub use crate::report::{init_logging, progress};

/// Reports per-item failures of a batch job (on stderr, and as JSON lines in
/// `list` when given) and turns them into an error.
pub fn finish_batch(
    failures: &[(PathBuf, anyhow::Error)],
    total: usize,
    list: Option<&Path>,
) -> Result<()> {
    if let Some(list) = list {
        let text: String = failures
            .iter()
            .map(|(p, e)| {
                let v = serde_json::json!({"path": crate::util::path_text(p), "error": format!("{e:#}")});
                format!("{v}\n")
            })
            .collect();
        crate::util::write_atomic(list, text.as_bytes())
            .with_context(|| format!("writing the list of failed images {}", list.display()))?;
    }
    if failures.is_empty() {
        return Ok(());
    }
    eprintln!("{} of {total} images failed:", failures.len());
    for (p, e) in failures {
        let name = crate::util::escape_controls(&crate::util::path_text(p));
        eprintln!(
            "  {name}: {}",
            crate::util::escape_controls(&format!("{e:#}"))
        );
    }
    bail!(
        "{} of {total} images could not be processed",
        failures.len()
    )
}

/// Stacks per-image CHW data into a (B, 3, H, W) tensor.
pub fn stack_batch(items: Vec<Vec<f32>>, cfg: &BeitConfig) -> Result<candle_core::Tensor> {
    let [h, w] = cfg.img_size;
    let b = items.len();
    let data: Vec<f32> = items.into_iter().flatten().collect();
    candle_core::Tensor::from_vec(data, (b, cfg.in_chans, h, w), &candle_core::Device::Cpu)
        .context("assembling the batch")
}
