//! The VQ-KD visual tokenizer of BEiT v2 (spec E): a ViT encoder with
//! absolute position embeddings, a Linear-Tanh-Linear projection to the code
//! dimension, L2 normalisation, and the nearest of a unit-norm codebook; an
//! optional decoder reconstructs the teacher's features from the codes.

use super::backbone::Beit;
use super::config::{BeitConfig, GlobalPool, RelPosBias};
use super::layers::Linear;
use candle_core::{D, IndexOp, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// Shapes of a tokenizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqkdConfig {
    pub img_size: usize,
    pub patch_size: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    pub code_dim: usize,
    pub n_codes: usize,
    /// Decoder blocks; 0 for an encoder-only tokenizer (all that tokenizing needs).
    pub decoder_depth: usize,
    /// Teacher feature size the decoder reconstructs (512 CLIP, 768 DINO).
    pub decoder_out_dim: usize,
}

fn default_mlp_ratio() -> f64 {
    4.0
}

/// The released tokenizers (unilm TOKENIZER.md).
pub const VQKD_PRESETS: &[&str] = &[
    "vqkd_encoder_base_decoder_1x768x12_clip",
    "vqkd_encoder_base_decoder_3x768x12_clip",
    "vqkd_encoder_base_decoder_1x768x12_dino",
];

impl VqkdConfig {
    pub fn preset(name: &str) -> anyhow::Result<Self> {
        let (decoder_depth, decoder_out_dim) = match name {
            "vqkd_encoder_base_decoder_1x768x12_clip" => (1, 512),
            "vqkd_encoder_base_decoder_3x768x12_clip" => (3, 512),
            "vqkd_encoder_base_decoder_1x768x12_dino" => (1, 768),
            other => anyhow::bail!(
                "unknown tokenizer '{other}'; known: {}",
                VQKD_PRESETS.join(", ")
            ),
        };
        Ok(Self {
            img_size: 224,
            patch_size: 16,
            embed_dim: 768,
            depth: 12,
            num_heads: 12,
            mlp_ratio: 4.0,
            code_dim: 32,
            n_codes: 8192,
            decoder_depth,
            decoder_out_dim,
        })
    }

    /// Checks the invariants the model relies on.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.patch_size == 0 || self.code_dim == 0 || self.n_codes == 0 {
            anyhow::bail!("tokenizer patch_size, code_dim and n_codes must be positive");
        }
        if self.code_dim > 1 << 16 || self.n_codes > 1 << 24 || self.decoder_out_dim > 1 << 16 {
            anyhow::bail!(
                "tokenizer code_dim {}, n_codes {} or decoder_out_dim {} is over the supported \
                 maximum (65,536, 16,777,216, 65,536)",
                self.code_dim,
                self.n_codes,
                self.decoder_out_dim
            );
        }
        self.encoder().validate()?;
        if self.decoder_depth > 0 {
            self.decoder().validate()?;
            if self.decoder_out_dim == 0 {
                anyhow::bail!("decoder_out_dim must be positive with a decoder");
            }
        }
        Ok(())
    }

    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size
    }

    /// The encoder: BEiT with absolute position embedding, no relative
    /// position bias, no layer scale, per-token `fc_norm`, no head.
    pub fn encoder(&self) -> BeitConfig {
        BeitConfig {
            img_size: [self.img_size, self.img_size],
            patch_size: self.patch_size,
            in_chans: 3,
            num_classes: 0,
            embed_dim: self.embed_dim,
            depth: self.depth,
            num_heads: self.num_heads,
            mlp_ratio: self.mlp_ratio,
            qkv_bias: true,
            use_abs_pos_emb: true,
            rel_pos_bias: RelPosBias::None,
            layer_scale: false,
            global_pool: GlobalPool::Avg,
            norm_eps: 1e-6,
            mean: [0.5; 3],
            std: [0.5; 3],
            crop_pct: 0.875,
            drop_path_rate: 0.0,
        }
    }

    /// The decoder: the same transformer over the code grid (patch 1, code_dim channels).
    pub fn decoder(&self) -> BeitConfig {
        BeitConfig {
            img_size: [self.grid(), self.grid()],
            patch_size: 1,
            in_chans: self.code_dim,
            depth: self.decoder_depth,
            ..self.encoder()
        }
    }
}

/// Linear → Tanh → Linear (`encode_task_layer` / `decode_task_layer`).
#[derive(Debug, Clone)]
pub struct TaskLayer {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl TaskLayer {
    fn new(dim: usize, out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(dim, dim, true, vb.pp("0"))?,
            fc2: Linear::new(dim, out, true, vb.pp("2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.tanh()?)
    }
}

/// The result of quantising a batch of codes.
#[derive(Debug, Clone)]
pub struct Quantized {
    /// L2-normalised codes (B, N, code_dim).
    pub z: Tensor,
    /// Index of the nearest codebook row per token (B, N), row-major over the grid.
    pub ids: Tensor,
    /// The chosen codebook rows (B, N, code_dim).
    pub z_q: Tensor,
    /// Commitment loss `mean((z_q − z)²)` (beta 1).
    pub commit_loss: Tensor,
}

#[derive(Debug, Clone)]
pub struct Vqkd {
    pub cfg: VqkdConfig,
    pub encoder: Beit,
    pub encode_task_layer: TaskLayer,
    /// Unit-norm codebook (n_codes, code_dim).
    pub codebook: Tensor,
    pub decoder: Option<(Beit, TaskLayer)>,
}

/// Maps a VQ-KD input in [−1, 1] back to [0, 1] and normalises it with a
/// teacher's mean/std (unilm's `ScalingLayerForClip` / `ScalingLayerForIM`:
/// `((x + 1)·127.5).clamp(0, 255)/255`, then `(· − mean)/std`).
pub fn scale_for_teacher(x: &Tensor, mean: [f32; 3], std: [f32; 3]) -> Result<Tensor> {
    let dev = x.device();
    let x01 = (((x + 1.0)? * 127.5)?.clamp(0f32, 255f32)? / 255.0)?;
    let mean = Tensor::new(&mean, dev)?.reshape((1, 3, 1, 1))?;
    let std = Tensor::new(&std, dev)?.reshape((1, 3, 1, 1))?;
    x01.broadcast_sub(&mean)?.broadcast_div(&std)
}

/// `F.normalize(v, dim=-1)`: `v / max(‖v‖₂, 1e-12)`.
pub fn l2_normalize(v: &Tensor) -> Result<Tensor> {
    let norm = v
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    v.broadcast_div(&norm)
}

impl Vqkd {
    /// Weights under unilm's names: `encoder.*`, `encode_task_layer.{0,2}.*`,
    /// `quantize.embedding.weight`, and, with a decoder, `decoder.*` and
    /// `decode_task_layer.{0,2}.*`.
    pub fn new(cfg: &VqkdConfig, vb: VarBuilder) -> Result<Self> {
        let encoder = Beit::new(&cfg.encoder(), vb.pp("encoder"))?;
        let encode_task_layer =
            TaskLayer::new(cfg.embed_dim, cfg.code_dim, vb.pp("encode_task_layer"))?;
        let codebook = vb
            .pp("quantize")
            .pp("embedding")
            .get((cfg.n_codes, cfg.code_dim), "weight")?;
        let decoder = if cfg.decoder_depth > 0 {
            Some((
                Beit::new(&cfg.decoder(), vb.pp("decoder"))?,
                TaskLayer::new(
                    cfg.embed_dim,
                    cfg.decoder_out_dim,
                    vb.pp("decode_task_layer"),
                )?,
            ))
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            encoder,
            encode_task_layer,
            codebook,
            decoder,
        })
    }

    /// unilm's `pre_process` for inputs in [0, 1]: `x·255 / 127.5 − 1`, with a
    /// true division so values match PyTorch bit for bit.
    pub fn preprocess(x01: &Tensor) -> Result<Tensor> {
        let half = Tensor::new(127.5f32, x01.device())?;
        (x01 * 255.0)?.broadcast_div(&half)? - 1.0
    }

    /// Patch tokens after the per-token `fc_norm` of a ViT (B, N, C).
    fn patch_tokens(vit: &Beit, x: &Tensor) -> Result<Tensor> {
        let t = vit.forward_features(x)?;
        let n = t.dim(1)?;
        let p = t.i((.., 1..n))?;
        match &vit.fc_norm {
            Some(ln) => ln.forward(&p),
            None => Ok(p),
        }
    }

    /// Encoder features after `fc_norm` (B, N, C) for an input in [−1, 1].
    pub fn encoder_tokens(&self, x: &Tensor) -> Result<Tensor> {
        Self::patch_tokens(&self.encoder, x)
    }

    /// Task-layer codes before normalisation (B, N, code_dim).
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        self.encode_task_layer.forward(&self.encoder_tokens(x)?)
    }

    /// Nearest codebook rows by the full squared distance
    /// `‖z‖² + ‖e‖² − 2 z·e` (first index on ties, as `torch.argmin`).
    pub fn quantize(&self, code: &Tensor) -> Result<Quantized> {
        let (b, n, d) = code.dims3()?;
        let z = l2_normalize(code)?;
        let flat = z.reshape((b * n, d))?;
        let z2 = flat.sqr()?.sum_keepdim(1)?;
        let e2 = self.codebook.sqr()?.sum(1)?.unsqueeze(0)?;
        let dots = flat.matmul(&self.codebook.t()?)?;
        let dist = z2.broadcast_add(&e2)?.broadcast_sub(&(dots * 2.0)?)?;
        let ids = dist.argmin(1)?;
        let z_q = self.codebook.index_select(&ids, 0)?.reshape((b, n, d))?;
        let commit_loss = (z_q.detach() - &z)?.sqr()?.mean_all()?;
        // Straight-through: forward value of z_q, gradient of z.
        let z_q = (&z + (z_q - &z)?.detach())?;
        Ok(Quantized {
            z,
            ids: ids.reshape((b, n))?,
            z_q,
            commit_loss,
        })
    }

    /// Token ids (B, N) for an input in [−1, 1].
    pub fn tokens(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.quantize(&self.encode(x)?)?.ids)
    }

    /// Reconstructed teacher features (B, N, out) from quantised codes (B, N, code_dim).
    pub fn decode(&self, z_q: &Tensor) -> Result<Tensor> {
        let Some((dec, task)) = &self.decoder else {
            candle_core::bail!("this tokenizer has no decoder (encoder-only checkpoint)");
        };
        let (b, n, d) = z_q.dims3()?;
        let g = self.cfg.grid();
        if n != g * g {
            candle_core::bail!("{n} codes do not form the {g}×{g} grid");
        }
        let grid = z_q
            .reshape((b, g, g, d))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        task.forward(&Self::patch_tokens(dec, &grid)?)
    }
}

/// Counts of each code among `ids` (length `n_codes`).
pub fn code_counts(ids: &[u32], n_codes: usize) -> Vec<u64> {
    let mut c = vec![0u64; n_codes];
    for &i in ids {
        c[i as usize] += 1;
    }
    c
}

/// Mean of the samples assigned to each code, L2-normalised; codes with no
/// sample keep `fallback`'s row. `z`: (M, d), `ids`: M assignments.
fn normalized_means(z: &Tensor, ids: &[u32], bins: &[u64], fallback: &Tensor) -> Result<Tensor> {
    let k = bins.len();
    let m = ids.len();
    let mut onehot = vec![0f32; m * k];
    for (row, &i) in ids.iter().enumerate() {
        onehot[row * k + i as usize] = 1.0;
    }
    let onehot = Tensor::from_vec(onehot, (m, k), z.device())?;
    let embed_sum = z.t()?.matmul(&onehot)?; // (d, K)
    let denom: Vec<f32> = bins.iter().map(|&b| b.max(1) as f32).collect();
    let denom = Tensor::from_vec(denom, (1, k), z.device())?;
    let means = l2_normalize(&embed_sum.broadcast_div(&denom)?.t()?)?;
    let used: Vec<u8> = bins.iter().map(|&b| u8::from(b > 0)).collect();
    let used = Tensor::from_vec(used, (k, 1), z.device())?.broadcast_as(means.shape())?;
    used.where_cond(&means, fallback)
}

/// The NormEMA codebook update of one batch (spec E.4): used codes move to
/// `normalize(decay·e + (1−decay)·normalize(mean of their samples))`, unused
/// codes only get re-normalised. Returns the new codebook and the counts.
pub fn ema_update(
    codebook: &Tensor,
    z: &Tensor,
    ids: &[u32],
    decay: f64,
) -> Result<(Tensor, Vec<u64>)> {
    let bins = code_counts(ids, codebook.dim(0)?);
    let target = normalized_means(z, ids, &bins, codebook)?;
    let mixed = ((codebook * decay)? + (target * (1.0 - decay))?)?;
    Ok((l2_normalize(&mixed)?, bins))
}

/// Spherical k-means (cosine similarity) from the given initial samples,
/// as unilm's `kmeans(..., use_cosine_sim=True)`: assign each sample to the
/// most similar mean, replace each used mean by the normalised mean of its
/// samples, keep unused means. Returns the means and the last counts.
pub fn kmeans(samples: &Tensor, init: &[usize], iters: usize) -> Result<(Tensor, Vec<u64>)> {
    let idx = Tensor::from_vec(
        init.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        init.len(),
        samples.device(),
    )?;
    let mut means = samples.index_select(&idx, 0)?;
    let mut bins = vec![0; init.len()];
    for _ in 0..iters {
        let sim = samples.matmul(&means.t()?)?;
        let ids = sim.argmax(1)?.to_vec1::<u32>()?;
        bins = code_counts(&ids, init.len());
        means = normalized_means(samples, &ids, &bins, &means)?;
    }
    Ok((means, bins))
}

/// Codebook usage over a set of token ids.
pub struct CodeUsage {
    pub counts: Vec<u64>,
}

impl CodeUsage {
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
    pub fn unused(&self) -> usize {
        self.counts.iter().filter(|&&c| c == 0).count()
    }
    /// `exp(entropy)` of the empirical code distribution: the number of
    /// equally used codes that would give the same entropy.
    pub fn perplexity(&self) -> f64 {
        let n = self.total() as f64;
        if n == 0.0 {
            return 0.0;
        }
        let h: f64 = self
            .counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / n;
                -p * p.ln()
            })
            .sum();
        h.exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perplexity_by_hand() {
        let u = CodeUsage {
            counts: vec![5, 5, 0, 0],
        };
        assert!((u.perplexity() - 2.0).abs() < 1e-12);
        assert_eq!(u.unused(), 2);
        let one = CodeUsage {
            counts: vec![0, 7, 0],
        };
        assert!((one.perplexity() - 1.0).abs() < 1e-12);
    }
}
