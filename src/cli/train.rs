//! `beitv2 finetune`, `beitv2 linprobe` and `beitv2 eval`.

use super::ModelArgs;
use crate::checkpoint::LoadOptions;
use crate::data::EvalTransform;
use crate::data::augment::{RandAugment, RandomErasing, TrainTransform};
use crate::model::BeitConfig;
use crate::train::engine::{EvalResult, Task, evaluate, open_dataset, train};
use crate::train::recipe::Recipe;
use crate::train::tasks::{Finetune, LinearProbe, finetune_weights};
use anyhow::{Context, Result, bail};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct RecipeArgs {
    /// Recipe file (TOML); default: the command's shipped recipe (BEiT base
    /// fine-tuning, or unilm's ViT-B/16 + CLIP tokenizer).
    #[arg(long, value_name = "FILE")]
    pub recipe: Option<PathBuf>,
    /// Override a recipe key, e.g. --set optim.lr=1e-3 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Start afresh even if the output folder holds checkpoints.
    #[arg(long)]
    pub no_resume: bool,
}

fn model_config(recipe: &Recipe) -> Result<BeitConfig> {
    let m = &recipe.model;
    let mut cfg = match (&m.config, &m.arch) {
        (Some(p), _) => BeitConfig::from_file(p)?,
        (None, Some(a)) => BeitConfig::preset(a)?,
        (None, None) => bail!("the recipe needs model.arch or model.config"),
    };
    cfg.drop_path_rate = m.drop_path_rate;
    cfg.validate()?;
    Ok(cfg)
}

fn eval_transform(cfg: &BeitConfig) -> EvalTransform {
    let [h, w] = cfg.img_size;
    EvalTransform::from_crop_pct((h, w), cfg.crop_pct, cfg.mean, cfg.std)
}

fn train_transform(recipe: &Recipe, cfg: &BeitConfig, augment: bool) -> Result<TrainTransform> {
    let size = cfg.img_size[0];
    let mut t = TrainTransform::simple(size, cfg.mean, cfg.std);
    t.rrc.size = (cfg.img_size[0], cfg.img_size[1]);
    t.rrc.scale = (recipe.data.min_crop_scale, 1.0);
    if augment {
        if !recipe.data.rand_augment.is_empty() {
            let fill = cfg.mean.map(|m| (255.0 * m).round() as u8);
            t.rand_augment = Some(RandAugment::from_timm_str(
                &recipe.data.rand_augment,
                fill,
                (size as f64 * 0.45) as usize,
            )?);
        }
        if recipe.data.reprob > 0.0 {
            t.erasing = Some(RandomErasing {
                probability: recipe.data.reprob,
                ..RandomErasing::default()
            });
        }
    }
    Ok(t)
}

fn print_summary(r: &EvalResult, extra: serde_json::Value) -> Result<()> {
    let mut v = serde_json::to_value(r)?;
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    println!("{v}");
    Ok(())
}

pub fn finetune(args: RecipeArgs) -> Result<()> {
    let recipe = Recipe::load(args.recipe.as_deref(), &args.overrides)?;
    let t0 = std::time::Instant::now();
    let r = run_finetune(&recipe, !args.no_resume)?;
    eprintln!(
        "finished in {:.1} min; model: {}",
        t0.elapsed().as_secs_f64() / 60.0,
        recipe.run.output.join("model-last.safetensors").display()
    );
    if let Some(r) = r {
        print_summary(
            &r,
            serde_json::json!({"model": "model-last", "output": recipe.run.output}),
        )?;
    }
    Ok(())
}

/// Fine-tunes as `recipe` says (resuming when asked); the last validation result.
pub fn run_finetune(recipe: &Recipe, resume: bool) -> Result<Option<EvalResult>> {
    let (train_set, val) = open_data(recipe)?;
    let mut cfg = model_config(recipe)?;
    cfg.num_classes = recipe.model.num_classes.unwrap_or(train_set.classes.len());
    let weights = finetune_weights(recipe.model.weights.as_deref(), &cfg, recipe.run.seed)?;
    let task = Finetune::new(&cfg, weights)?;
    train(
        &task,
        recipe,
        train_set,
        val,
        train_transform(recipe, &cfg, true)?,
        eval_transform(&cfg),
        resume,
    )
}

#[derive(Args, Debug)]
pub struct LinprobeArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Frozen backbone checkpoint.
    #[arg(long, value_name = "FILE")]
    pub weights: PathBuf,
    /// Architecture preset of the backbone (else stored/inferred).
    #[arg(long)]
    pub arch: Option<String>,
    /// Block whose tokens feed the head (negative counts from the end).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    pub layer: i64,
}

pub fn linprobe(args: LinprobeArgs) -> Result<()> {
    let recipe = Recipe::load(args.recipe.recipe.as_deref(), &args.recipe.overrides)?;
    let opts = LoadOptions {
        arch: args.arch.clone(),
        ..Default::default()
    };
    let r = run_linprobe(
        &recipe,
        &args.weights,
        &opts,
        args.layer,
        !args.recipe.no_resume,
    )?;
    if let Some(r) = r {
        print_summary(
            &r,
            serde_json::json!({"layer": args.layer, "output": recipe.run.output}),
        )?;
    }
    Ok(())
}

/// Trains a linear probe on the frozen backbone in `weights`, block `layer`.
pub fn run_linprobe(
    recipe: &Recipe,
    weights: &std::path::Path,
    opts: &LoadOptions,
    layer: i64,
    resume: bool,
) -> Result<Option<EvalResult>> {
    let (train_set, val) = open_data(recipe)?;
    let classes = recipe.model.num_classes.unwrap_or(train_set.classes.len());
    let task = LinearProbe::new(weights, opts, layer, classes, recipe.run.seed)?;
    let cfg = task.backbone.cfg.clone();
    train(
        &task,
        recipe,
        train_set,
        val,
        train_transform(recipe, &cfg, false)?,
        eval_transform(&cfg),
        resume,
    )
}

type Data = Arc<crate::data::dataset::Dataset>;

/// The recipe's training set (first `data.limit` samples when set) and
/// validation set (none when `data.val` is empty).
fn open_data(recipe: &Recipe) -> Result<(Data, Option<Data>)> {
    let mut train_set = open_dataset(&recipe.data.train)?;
    let n = recipe.data.limit;
    if n > 0 && n < train_set.len() {
        train_set = train_set.subset(&(0..n).collect::<Vec<_>>());
    }
    let val = (!recipe.data.val.is_empty())
        .then(|| open_dataset(&recipe.data.val).map(Arc::new))
        .transpose()?;
    Ok((Arc::new(train_set), val))
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Precision of the transformer blocks' linear layers (bf16/int8 use Intel AMX where present).
    #[arg(long, value_enum, default_value_t = crate::kernels::Precision::F32)]
    pub dtype: crate::kernels::Precision,
    /// Labelled data: an image folder with class subfolders or fashion-mnist:test.
    #[arg(long)]
    pub data: String,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long)]
    pub crop_pct: Option<f64>,
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
}

/// Adapts a loaded classifier to the engine's evaluation.
struct Classifier(crate::model::Beit);

impl Task for Classifier {
    fn logits(
        &self,
        x: &candle_core::Tensor,
        _: Option<&mut rand_chacha::ChaCha8Rng>,
    ) -> Result<candle_core::Tensor> {
        Ok(self.0.forward(x)?)
    }
    fn trainable(&self) -> Vec<(String, candle_core::Var)> {
        Vec::new()
    }
    fn export(&self, _: &std::path::Path) -> Result<()> {
        bail!("an evaluation-only model is not exported")
    }
    fn input_hw(&self) -> (usize, usize) {
        (self.0.cfg.img_size[0], self.0.cfg.img_size[1])
    }
    fn num_classes(&self) -> usize {
        self.0.cfg.num_classes
    }
    fn depth(&self) -> usize {
        self.0.cfg.depth
    }
}

pub fn eval(args: EvalArgs) -> Result<()> {
    let mut model = args.model.load(args.dtype)?;
    let data = Arc::new(open_dataset(&args.data)?);
    super::pack_f32_for_run(&mut model, args.dtype, data.len())?;
    let mut t = eval_transform(&model.cfg);
    let crop_pct = args.crop_pct.unwrap_or(model.cfg.crop_pct);
    if let Some(c) = args.crop_pct {
        if !(c > 0.0 && c <= 1.0) {
            bail!("--crop-pct {c} must be in (0, 1]");
        }
        let [h, w] = model.cfg.img_size;
        t = EvalTransform::from_crop_pct((h, w), c, model.cfg.mean, model.cfg.std);
    }
    let name = args
        .model
        .weights
        .as_ref()
        .map(|p| p.display().to_string())
        .or(args.model.model.clone())
        .context("no model given")?;
    let img = model.cfg.img_size;
    let task = Classifier(model);
    let r = evaluate(&task, data, t, args.batch_size, args.workers)?;
    print_summary(
        &r,
        serde_json::json!({"model": name, "img_size": img, "crop_pct": crop_pct}),
    )?;
    if r.skipped > 0 {
        bail!("{} images could not be read", r.skipped);
    }
    Ok(())
}

pub fn train_tokenizer(args: RecipeArgs) -> Result<()> {
    use crate::train::tokenizer::{TokenizerRecipe, train_tokenizer};
    let recipe = TokenizerRecipe::load(args.recipe.as_deref(), &args.overrides)?;
    let t0 = std::time::Instant::now();
    let path = train_tokenizer(&recipe, !args.no_resume)?;
    eprintln!(
        "finished in {:.1} min; tokenizer: {}",
        t0.elapsed().as_secs_f64() / 60.0,
        path.display()
    );
    Ok(())
}

pub fn pretrain(args: RecipeArgs) -> Result<()> {
    use crate::train::pretrain::{PretrainRecipe, pretrain};
    let recipe = PretrainRecipe::load(args.recipe.as_deref(), &args.overrides)?;
    let t0 = std::time::Instant::now();
    let path = pretrain(&recipe, !args.no_resume)?;
    eprintln!(
        "finished in {:.1} min; pretrained model: {}",
        t0.elapsed().as_secs_f64() / 60.0,
        path.display()
    );
    Ok(())
}
