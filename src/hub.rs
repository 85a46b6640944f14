//! Hugging Face Hub resolution of `--model ORG/NAME` into a local weights file,
//! through the hub's standard cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`).

use anyhow::{Result, bail};
use hf_hub::{Cache, Repo, api::sync::ApiBuilder};
use std::path::PathBuf;

/// Weight files tried in order: timm uploads safetensors, older repos only the pickle.
pub const WEIGHT_FILES: &[&str] = &["model.safetensors", "pytorch_model.bin"];

/// The timm architecture a hub id names, e.g. `timm/beitv2_base_patch16_224.in1k_ft_in1k`
/// → `beitv2_base_patch16_224.in1k_ft_in1k` (preset names accept the tag).
pub fn arch_from_model_id(model_id: &str) -> Option<&str> {
    model_id.strip_prefix("timm/")
}

/// Looks the model up in the local cache only.
pub fn find_in_cache(cache: &Cache, model_id: &str) -> Option<PathBuf> {
    let repo = cache.repo(Repo::model(model_id.to_string()));
    WEIGHT_FILES.iter().find_map(|f| repo.get(f))
}

fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Resolves a hub id to a weights file: from the cache when present (works
/// offline), else downloaded into the cache. Without network the error says how
/// to pass a local file instead.
pub fn resolve(model_id: &str) -> Result<PathBuf> {
    let cache = Cache::from_env();
    if let Some(p) = find_in_cache(&cache, model_id) {
        tracing::info!("using cached {}", p.display());
        return Ok(p);
    }
    let how = format!(
        "download its model.safetensors from https://huggingface.co/{model_id} on a machine with \
         network access and pass it with --weights FILE (or copy it into the hub cache at {})",
        cache.path().display()
    );
    if offline_from_env() {
        bail!("{model_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: {how}");
    }
    let api = match ApiBuilder::from_cache(cache.clone())
        .with_progress(true)
        .build()
    {
        Ok(api) => api,
        Err(e) => bail!("cannot start the Hugging Face hub client ({e}): {how}"),
    };
    let repo = api.model(model_id.to_string());
    let mut errors = Vec::new();
    for f in WEIGHT_FILES {
        match repo.get(f) {
            Ok(p) => return Ok(p),
            Err(e) => errors.push(format!("{f}: {e}")),
        }
    }
    bail!(
        "could not fetch {model_id} from the Hugging Face hub ({}). To run without network, {how}",
        errors.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_file_in_a_standard_cache_layout() {
        let dir = std::env::temp_dir().join(format!("beitv2-hub-{}", std::process::id()));
        let repo = dir.join("models--timm--beitv2_base_patch16_224.in1k_ft_in1k");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "abc123").unwrap();
        let cache = Cache::new(dir.clone());
        let id = "timm/beitv2_base_patch16_224.in1k_ft_in1k";
        assert_eq!(find_in_cache(&cache, id), None);
        std::fs::write(snap.join("pytorch_model.bin"), b"x").unwrap();
        assert_eq!(
            find_in_cache(&cache, id),
            Some(snap.join("pytorch_model.bin"))
        );
        std::fs::write(snap.join("model.safetensors"), b"x").unwrap();
        assert_eq!(
            find_in_cache(&cache, id),
            Some(snap.join("model.safetensors"))
        );
        assert_eq!(
            arch_from_model_id(id),
            Some("beitv2_base_patch16_224.in1k_ft_in1k")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
