//! `beitv2 info`: what an architecture is, without weights.

use crate::model::{BeitConfig, config::PRESET_NAMES, param_count};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Architecture preset.
    #[arg(long, required_unless_present_any = ["config", "list"])]
    pub arch: Option<String>,
    /// Custom model configuration (JSON or TOML).
    #[arg(long, value_name = "FILE", conflicts_with = "arch")]
    pub config: Option<PathBuf>,
    /// Override the number of classes (0 = no head).
    #[arg(long)]
    pub num_classes: Option<usize>,
    /// List the preset names.
    #[arg(long)]
    pub list: bool,
    #[arg(long, value_enum, default_value_t = InfoFormat::Text)]
    pub format: InfoFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum InfoFormat {
    Text,
    Json,
}

pub fn run(args: InfoArgs) -> Result<()> {
    if args.list {
        for n in PRESET_NAMES {
            println!("{n}");
        }
        return Ok(());
    }
    let (name, mut cfg) = match (&args.config, &args.arch) {
        (Some(p), _) => (p.display().to_string(), BeitConfig::from_file(p)?),
        (None, Some(a)) => (a.clone(), BeitConfig::preset(a)?),
        (None, None) => anyhow::bail!("pass --arch NAME or --config FILE"),
    };
    if let Some(k) = args.num_classes {
        cfg.num_classes = k;
    }
    let params = param_count(&cfg)?;
    let macs = cfg.macs();
    match args.format {
        InfoFormat::Json => {
            let v = serde_json::json!({
                "arch": name,
                "params": params,
                "macs": macs,
                "input_size": [cfg.in_chans, cfg.img_size[0], cfg.img_size[1]],
                "mean": cfg.mean,
                "std": cfg.std,
                "crop_pct": cfg.crop_pct,
                "config": cfg,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        InfoFormat::Text => {
            println!("arch        {name}");
            println!("params      {params}");
            println!("MACs        {macs} ({:.2} G, backbone)", macs as f64 / 1e9);
            println!(
                "input       {}x{}x{} (patch {}, {} tokens)",
                cfg.in_chans,
                cfg.img_size[0],
                cfg.img_size[1],
                cfg.patch_size,
                cfg.num_tokens()
            );
            println!(
                "width       {} x {} blocks, {} heads",
                cfg.embed_dim, cfg.depth, cfg.num_heads
            );
            println!("classes     {}", cfg.num_classes);
            println!("mean / std  {:?} / {:?}", cfg.mean, cfg.std);
            println!("crop_pct    {}", cfg.crop_pct);
        }
    }
    Ok(())
}
