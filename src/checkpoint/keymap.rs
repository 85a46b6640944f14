//! Renaming foreign checkpoint layouts to timm's names (spec C.5), the canonical
//! layout of this crate. UNILM checkpoints already use timm's names.

/// The key layout a state dict was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// timm, UNILM and our own safetensors.
    Timm,
    /// mmpretrain `ImageClassifier(BEiTViT, LinearClsHead)`.
    MmPretrain,
}

/// mmpretrain keys are recognisable by their `backbone.` prefix or by the
/// `layers.N.` / `patch_embed.projection` names of `BEiTViT`.
pub fn detect_layout<'a>(keys: impl IntoIterator<Item = &'a str>) -> Layout {
    for k in keys {
        if k.starts_with("backbone.")
            || k.starts_with("layers.")
            || k.contains("patch_embed.projection.")
            || k.contains(".ffn.layers.")
        {
            return Layout::MmPretrain;
        }
    }
    Layout::Timm
}

/// Per-block renames inside `layers.N.` (mmpretrain → timm).
const MMP_BLOCK_RENAMES: &[(&str, &str)] = &[
    ("ln1.", "norm1."),
    ("ln2.", "norm2."),
    ("ffn.layers.0.0.", "mlp.fc1."),
    ("ffn.layers.1.", "mlp.fc2."),
];

/// Top-level renames (after `backbone.` is stripped).
const MMP_TOP_RENAMES: &[(&str, &str)] = &[
    ("patch_embed.projection.", "patch_embed.proj."),
    // The LayerNorm of the pooled features (`out_type='avg_featmap'`).
    ("ln2.", "fc_norm."),
    // The LayerNorm over all tokens after the last layer (`final_norm=True`).
    ("ln1.", "norm."),
];

/// Maps one mmpretrain key to timm's name.
pub fn mmpretrain_to_timm(key: &str) -> String {
    if let Some(rest) = key.strip_prefix("head.fc.") {
        return format!("head.{rest}");
    }
    let k = key.strip_prefix("backbone.").unwrap_or(key);
    if let Some(rest) = k.strip_prefix("layers.") {
        let (idx, tail) = rest.split_once('.').unwrap_or((rest, ""));
        let tail = MMP_BLOCK_RENAMES
            .iter()
            .find_map(|(from, to)| tail.strip_prefix(from).map(|t| format!("{to}{t}")))
            .unwrap_or_else(|| tail.to_string());
        return format!("blocks.{idx}.{tail}");
    }
    MMP_TOP_RENAMES
        .iter()
        .find_map(|(from, to)| k.strip_prefix(from).map(|t| format!("{to}{t}")))
        .unwrap_or_else(|| k.to_string())
}

/// Inverse of [`mmpretrain_to_timm`] for the classifier keys; used by tests.
pub fn timm_to_mmpretrain(key: &str) -> String {
    if let Some(rest) = key.strip_prefix("head.") {
        return format!("head.fc.{rest}");
    }
    if let Some(rest) = key.strip_prefix("blocks.") {
        let (idx, tail) = rest.split_once('.').unwrap_or((rest, ""));
        let tail = MMP_BLOCK_RENAMES
            .iter()
            .find_map(|(to, from)| tail.strip_prefix(from).map(|t| format!("{to}{t}")))
            .unwrap_or_else(|| tail.to_string());
        return format!("backbone.layers.{idx}.{tail}");
    }
    let k = MMP_TOP_RENAMES
        .iter()
        .find_map(|(to, from)| key.strip_prefix(from).map(|t| format!("{to}{t}")))
        .unwrap_or_else(|| key.to_string());
    format!("backbone.{k}")
}

/// Keys that only a MIM-pretraining model uses (mask token, MIM head, the
/// patch-aggregation branch, in unilm and mmpretrain naming); a classifier
/// ignores them.
pub fn is_pretraining_only(key: &str) -> bool {
    key == "mask_token"
        || key.starts_with("lm_head.")
        || key.starts_with("cls_pt_layers.")
        || key.starts_with("neck.")
        || key.starts_with("head.cls_head.")
        || key.starts_with("target_generator.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmpretrain_names_map_both_ways() {
        let pairs = [
            ("backbone.cls_token", "cls_token"),
            (
                "backbone.patch_embed.projection.weight",
                "patch_embed.proj.weight",
            ),
            ("backbone.layers.3.ln1.weight", "blocks.3.norm1.weight"),
            ("backbone.layers.3.ln2.bias", "blocks.3.norm2.bias"),
            (
                "backbone.layers.11.attn.qkv.weight",
                "blocks.11.attn.qkv.weight",
            ),
            ("backbone.layers.0.attn.q_bias", "blocks.0.attn.q_bias"),
            (
                "backbone.layers.0.ffn.layers.0.0.weight",
                "blocks.0.mlp.fc1.weight",
            ),
            (
                "backbone.layers.0.ffn.layers.1.bias",
                "blocks.0.mlp.fc2.bias",
            ),
            ("backbone.layers.2.gamma_1", "blocks.2.gamma_1"),
            ("backbone.ln2.weight", "fc_norm.weight"),
            ("backbone.ln1.bias", "norm.bias"),
            ("head.fc.weight", "head.weight"),
        ];
        for (mmp, timm) in pairs {
            assert_eq!(mmpretrain_to_timm(mmp), timm);
            assert_eq!(timm_to_mmpretrain(timm), mmp);
        }
        assert_eq!(
            detect_layout(["backbone.cls_token", "head.fc.weight"]),
            Layout::MmPretrain
        );
        assert_eq!(
            detect_layout(["cls_token", "blocks.0.norm1.weight"]),
            Layout::Timm
        );
    }
}
