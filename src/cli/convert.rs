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
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let (cfg, tensors) = args.model.load_weights()?;
    save_safetensors(&args.output, &tensors, &cfg)?;
    eprintln!(
        "wrote {} ({} tensors, config embedded)",
        args.output.display(),
        tensors.len()
    );
    Ok(())
}
