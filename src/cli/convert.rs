//! `beitv2 convert`: any supported checkpoint → canonical safetensors (timm
//! names, tables fitted to the model, config in the metadata).

use super::ModelArgs;
use crate::checkpoint::save_safetensors;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output .safetensors file (written atomically).
    #[arg(long, short)]
    pub output: PathBuf,
    /// `finetune`: turn a pretraining checkpoint into the backbone that
    /// fine-tuning starts from (per-block tables, no neck/MIM head/mask token).
    #[arg(long, value_enum, default_value_t = ConvertTo::Canonical)]
    pub to: ConvertTo,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvertTo {
    /// The checkpoint's own model, in canonical form.
    Canonical,
    /// A classifier backbone from a MIM pretraining checkpoint.
    Finetune,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let (cfg, tensors) = match args.to {
        ConvertTo::Canonical => args.model.load_weights()?,
        ConvertTo::Finetune => {
            let (path, opts) = args.model.resolve()?;
            crate::checkpoint::finetune_backbone(&path, &opts)?
        }
    };
    save_safetensors(&args.output, &tensors, &cfg)?;
    eprintln!(
        "wrote {} ({} tensors, config embedded)",
        args.output.display(),
        tensors.len()
    );
    Ok(())
}
