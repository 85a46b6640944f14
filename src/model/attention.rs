//! Multi-head self-attention with q/v biases and relative position bias (spec A.4)
//! and the pre-norm transformer block with layer scale (spec A.5).

use super::config::{BeitConfig, RelPosBias};
use super::layers::{LayerNorm, Linear, Mlp, drop_path, linear, softmax_last};
use super::rel_pos::{gather_bias, table_len};
use candle_core::{D, Result, Tensor};
use candle_nn::VarBuilder;
use rand_chacha::ChaCha8Rng;

/// `[q_bias, 0, v_bias]`: k has no learned bias; a zero slice keeps the GEMM
/// epilogue uniform.
fn qkv_bias(q: &Tensor, v: &Tensor) -> Result<Tensor> {
    Tensor::cat(&[q, &q.zeros_like()?, v], 0)
}

#[derive(Debug, Clone)]
pub struct Attention {
    /// `(3C, C)`; the Linear has no bias parameter of its own.
    pub qkv_weight: Tensor,
    /// q and v biases (k has none), when the model has them.
    pub qv_bias: Option<(Tensor, Tensor)>,
    /// `[q_bias, 0, v_bias]` concatenated once when the biases are constants
    /// (inference); trainable biases are concatenated every forward.
    frozen_qkv_bias: Option<Tensor>,
    /// This block's `(L, heads)` relative-position table, if it has one.
    pub rel_pos_table: Option<Tensor>,
    /// The table gathered into its `(heads, N, N)` bias once, when the table
    /// is a constant (inference); a trainable table is gathered every forward.
    frozen_bias: Option<Tensor>,
    pub proj: Linear,
    num_heads: usize,
    scale: f64,
}

impl Attention {
    pub fn new(cfg: &BeitConfig, index: &Tensor, vb: VarBuilder) -> Result<Self> {
        let c = cfg.embed_dim;
        let qkv_weight = vb.pp("qkv").get((3 * c, c), "weight")?;
        let qv_bias = if cfg.qkv_bias {
            Some((vb.get(c, "q_bias")?, vb.get(c, "v_bias")?))
        } else {
            None
        };
        let frozen_qkv_bias = match &qv_bias {
            Some((q, v)) if !q.is_variable() && !v.is_variable() => Some(qkv_bias(q, v)?),
            _ => None,
        };
        let rel_pos_table = match cfg.rel_pos_bias {
            RelPosBias::PerBlock => Some(vb.get(
                (table_len(cfg.grid()), cfg.num_heads),
                "relative_position_bias_table",
            )?),
            RelPosBias::Shared | RelPosBias::None => None,
        };
        let frozen_bias = match &rel_pos_table {
            Some(t) if !t.is_variable() => Some(gather_bias(t, index, cfg.num_tokens())?),
            _ => None,
        };
        Ok(Self {
            qkv_weight,
            qv_bias,
            frozen_qkv_bias,
            rel_pos_table,
            frozen_bias,
            proj: Linear::new(c, c, true, vb.pp("proj"))?,
            num_heads: cfg.num_heads,
            scale: (cfg.head_dim() as f64).powf(-0.5),
        })
    }

    /// `x`: (B, N, C). `index`: the flat relative-position index for N tokens.
    /// `shared_bias`: the (heads, N, N) bias of a shared table, added as well.
    pub fn forward(
        &self,
        x: &Tensor,
        index: &Tensor,
        shared_bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let h = self.num_heads;
        let d = c / h;
        let bias = match (&self.frozen_qkv_bias, &self.qv_bias) {
            (Some(b), _) => Some(b.clone()),
            (None, Some((q, v))) => Some(qkv_bias(q, v)?),
            (None, None) => None,
        };
        let qkv = linear(x, &self.qkv_weight, bias.as_ref())?
            .reshape((b, n, 3, h, d))?
            .permute((2, 0, 3, 1, 4))?; // (3, B, h, N, d)
        let q = (qkv.get(0)? * self.scale)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let mut logits = q.matmul(&k.transpose(D::Minus2, D::Minus1)?)?; // (B, h, N, N)
        match (&self.frozen_bias, &self.rel_pos_table) {
            (Some(bias), _) => logits = logits.broadcast_add(bias)?,
            (None, Some(table)) => logits = logits.broadcast_add(&gather_bias(table, index, n)?)?,
            (None, None) => {}
        }
        if let Some(bias) = shared_bias {
            logits = logits.broadcast_add(bias)?;
        }
        let attn = softmax_last(&logits)?;
        let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.proj.forward(&out)
    }
}

/// `x + γ1·Attn(LN1(x))`, then `x + γ2·MLP(LN2(x))`.
#[derive(Debug, Clone)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    pub gamma_1: Option<Tensor>,
    pub gamma_2: Option<Tensor>,
    /// Stochastic-depth rate of both residual branches (training only).
    pub drop_path: f64,
}

impl Block {
    pub fn new(cfg: &BeitConfig, index: &Tensor, drop_path: f64, vb: VarBuilder) -> Result<Self> {
        let c = cfg.embed_dim;
        let (gamma_1, gamma_2) = if cfg.layer_scale {
            (Some(vb.get(c, "gamma_1")?), Some(vb.get(c, "gamma_2")?))
        } else {
            (None, None)
        };
        Ok(Self {
            norm1: LayerNorm::new(c, cfg.norm_eps, vb.pp("norm1"))?,
            attn: Attention::new(cfg, index, vb.pp("attn"))?,
            norm2: LayerNorm::new(c, cfg.norm_eps, vb.pp("norm2"))?,
            mlp: Mlp::new(c, cfg.mlp_hidden(), vb.pp("mlp"))?,
            gamma_1,
            gamma_2,
            drop_path,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        index: &Tensor,
        shared_bias: Option<&Tensor>,
        mut train_rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        // γ is applied before DropPath, as in the references.
        let mut branch = |y: Tensor, g: &Option<Tensor>| -> Result<Tensor> {
            let y = match g {
                Some(g) => y.broadcast_mul(g)?,
                None => y,
            };
            match train_rng.as_deref_mut() {
                Some(rng) => drop_path(&y, self.drop_path, rng),
                None => Ok(y),
            }
        };
        let a = self
            .attn
            .forward(&self.norm1.forward(x)?, index, shared_bias)?;
        let x = (x + branch(a, &self.gamma_1)?)?;
        let m = self.mlp.forward(&self.norm2.forward(&x)?)?;
        &x + branch(m, &self.gamma_2)?
    }
}
