//! Training recipes: a TOML file mirroring the mmpretrain fine-tuning config,
//! with `--set section.key=value` overrides. Unknown keys are refused with the
//! nearest valid key.

use super::optim::OptimConfig;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Preset name, used when no checkpoint config applies.
    pub arch: Option<String>,
    /// Custom model config file (JSON/TOML), instead of `arch`.
    pub config: Option<PathBuf>,
    /// Initial weights (any format the loader reads); none = random init.
    pub weights: Option<PathBuf>,
    /// Classes of the new head; default: the dataset's.
    pub num_classes: Option<usize>,
    pub drop_path_rate: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Image folder with class subfolders, or `fashion-mnist:train` / `fashion-mnist:test`.
    pub train: String,
    /// Validation data in the same forms; empty = no validation.
    pub val: String,
    pub batch_size: usize,
    pub workers: usize,
    /// timm RandAugment string; empty disables it.
    pub rand_augment: String,
    /// RandomErasing probability.
    pub reprob: f64,
    pub mixup: f64,
    pub cutmix: f64,
    pub smoothing: f64,
    /// Lower bound of RandomResizedCrop's area fraction (timm: 0.08).
    pub min_crop_scale: f64,
    /// Use only the first N training samples (0 = all), for quick runs.
    pub limit: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    pub epochs: usize,
    pub warmup_epochs: usize,
    /// Micro-batches per optimiser step (gradient accumulation).
    pub accum_steps: usize,
    /// Stop after this many optimiser steps (0 = run every epoch): a
    /// budget shorter than an epoch. The lr schedule spans the shorter run,
    /// and the run ends with the end-of-epoch evaluation and exports.
    #[serde(default)]
    pub max_steps: usize,
    /// End-of-epoch evaluation every N epochs, and always after the last
    /// (1 = every epoch). Evaluation on a large test set can cost more than
    /// an epoch of a small labelled subset.
    #[serde(default = "every_epoch")]
    pub eval_every: usize,
}

fn every_epoch() -> usize {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    pub seed: u64,
    pub output: PathBuf,
    /// Checkpoint every N optimiser steps (0 = only at epoch ends).
    pub ckpt_every: usize,
    /// Step checkpoints kept (oldest removed).
    pub keep_last: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelSection,
    pub data: DataSection,
    pub optim: OptimConfig,
    pub schedule: ScheduleSection,
    pub run: RunSection,
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Optional keys the shipped recipe leaves out.
const OPTIONAL_KEYS: &[&str] = &[
    "model.config",
    "model.weights",
    "model.num_classes",
    "schedule.max_steps",
    "schedule.eval_every",
];

/// Every valid `section.key` of a recipe.
fn valid_keys(reference: &toml::Table, optional: &[&str]) -> Vec<String> {
    let mut keys: Vec<String> = optional.iter().map(|k| k.to_string()).collect();
    for (section, v) in reference {
        keys.push(section.clone());
        if let Some(t) = v.as_table() {
            keys.extend(t.keys().map(|k| format!("{section}.{k}")));
        }
    }
    keys
}

/// Checks every key of `table` against the default recipe, naming the nearest
/// valid key for a mistake.
fn check_keys(
    table: &toml::Table,
    reference: &toml::Table,
    optional: &[&str],
    origin: &str,
) -> Result<()> {
    let valid = valid_keys(reference, optional);
    let check = |key: String| -> Result<()> {
        if valid.contains(&key) {
            return Ok(());
        }
        let nearest = valid
            .iter()
            .min_by_key(|v| levenshtein(v, &key))
            .cloned()
            .unwrap_or_default();
        bail!("{origin}: unknown recipe key '{key}' (did you mean '{nearest}'?)")
    };
    for (section, v) in table {
        check(section.clone())?;
        if let Some(t) = v.as_table() {
            for k in t.keys() {
                check(format!("{section}.{k}"))?;
            }
        }
    }
    Ok(())
}

/// Parses `value` as TOML (number, bool, array, quoted string), falling back
/// to a bare string.
fn parse_value(v: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {v}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(v.to_string()))
}

/// Applies `section.key=value` overrides to a recipe table (values parsed
/// as TOML, bare strings accepted).
pub fn apply_overrides(table: &mut toml::Table, overrides: &[String]) -> Result<()> {
    for o in overrides {
        let (key, value) = o
            .split_once('=')
            .with_context(|| format!("override '{o}' is not of the form section.key=value"))?;
        let (section, field) = key
            .split_once('.')
            .with_context(|| format!("override key '{key}' is not of the form section.key"))?;
        table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .with_context(|| format!("recipe section '{section}' is not a table"))?
            .insert(field.to_string(), parse_value(value));
    }
    Ok(())
}

/// Reads a recipe file (or `reference`, the shipped default, when `path` is
/// None), checks its keys and the overrides' against `reference` (naming the
/// nearest valid key) and applies the overrides. Returns the table and a name
/// of its origin for messages.
pub fn load_checked(
    path: Option<&Path>,
    overrides: &[String],
    reference: &str,
    optional: &[&str],
) -> Result<(toml::Table, String)> {
    let reference: toml::Table =
        toml::from_str(reference).context("the built-in recipe does not parse")?;
    let (mut table, origin) = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read recipe {}", p.display()))?;
            let t: toml::Table =
                toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
            (t, p.display().to_string())
        }
        None => (reference.clone(), "built-in recipe".to_string()),
    };
    check_keys(&table, &reference, optional, &origin)?;
    for o in overrides {
        let (key, _) = o.split_once('=').unwrap_or((o, ""));
        if let Some((section, field)) = key.split_once('.') {
            let mut inner = toml::Table::new();
            inner.insert(field.to_string(), toml::Value::Boolean(true));
            let mut probe = toml::Table::new();
            probe.insert(section.to_string(), toml::Value::Table(inner));
            check_keys(&probe, &reference, optional, "--set")?;
        }
    }
    apply_overrides(&mut table, overrides)?;
    Ok((table, origin))
}

impl Recipe {
    /// The shipped BEiT v2 base fine-tuning recipe (mmpretrain
    /// `beit-base-p16_8xb128-coslr-100e_in1k`).
    pub const BEIT_BASE_FINETUNE: &'static str =
        include_str!("../../recipes/beit-base-p16_8xb128-coslr-100e_in1k.toml");

    /// Loads a recipe file (or the shipped default when `path` is None) and
    /// applies `section.key=value` overrides.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let (table, origin) =
            load_checked(path, overrides, Self::BEIT_BASE_FINETUNE, OPTIONAL_KEYS)?;
        let mut recipe: Recipe = toml::Value::Table(table)
            .try_into()
            .with_context(|| format!("invalid recipe {origin}"))?;
        // A model config named in a recipe file is relative to that file.
        if let (Some(cfg), Some(dir)) = (&recipe.model.config, path.and_then(Path::parent))
            && cfg.is_relative()
        {
            recipe.model.config = Some(dir.join(cfg));
        }
        recipe.validate()?;
        Ok(recipe)
    }

    fn validate(&self) -> Result<()> {
        if self.data.batch_size == 0 || self.schedule.accum_steps == 0 {
            bail!("data.batch_size and schedule.accum_steps must be at least 1");
        }
        if self.schedule.epochs == 0 {
            bail!("schedule.epochs must be at least 1");
        }
        if self.schedule.eval_every == 0 {
            bail!("schedule.eval_every must be at least 1");
        }
        if self.optim.lr.is_nan() || self.optim.lr <= 0.0 || self.optim.min_lr < 0.0 {
            bail!("optim.lr must be positive and optim.min_lr non-negative");
        }
        if (self.data.mixup > 0.0 || self.data.cutmix > 0.0) && self.data.batch_size % 2 == 1 {
            bail!("mixup/cutmix need an even data.batch_size");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_recipe_parses_and_matches_mmpretrain() {
        let r = Recipe::load(None, &[]).unwrap();
        assert_eq!(r.optim.lr, 5e-4);
        assert_eq!(r.optim.layer_decay, 0.65);
        assert_eq!(r.schedule.epochs, 100);
        assert_eq!(r.schedule.warmup_epochs, 20);
        assert_eq!(r.data.rand_augment, "rand-m9-mstd0.5-inc1");
    }

    #[test]
    fn overrides_apply_and_typos_name_the_nearest_key() {
        let r = Recipe::load(None, &["optim.lr=1e-3".into(), "data.train=x".into()]).unwrap();
        assert_eq!(r.optim.lr, 1e-3);
        assert_eq!(r.data.train, "x");
        let e = Recipe::load(None, &["optim.layer_dacay=0.5".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("optim.layer_dacay") && e.contains("optim.layer_decay"),
            "{e}"
        );
        let e = Recipe::load(None, &["optim.lr".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("section.key=value"), "{e}");
    }
}
