//! Multi-head self-attention with q/v biases and relative position bias (spec A.4)
//! and the pre-norm transformer block with layer scale (spec A.5).

use super::config::{BeitConfig, RelPosBias};
use super::layers::{LayerNorm, Linear, Mlp, drop_path_factors, linear, softmax_last};
use super::rel_pos::{gather_bias, table_len};
use crate::kernels::attention::{AttentionDims, attention};
use crate::kernels::{
    self, Epilogue, Precision, autograd, cpu_f32, is_plain_cpu_f32, profile, scratch,
};
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
    /// `(3C, C)` weight; its bias is `[q_bias, 0, v_bias]` concatenated once
    /// when the biases are constants (inference). Trainable biases are
    /// concatenated every forward instead.
    pub qkv: Linear,
    /// q and v biases (k has none), when the model has them.
    pub qv_bias: Option<(Tensor, Tensor)>,
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
        let qkv = Linear::from_parts(qkv_weight, frozen_qkv_bias);
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
            qkv,
            qv_bias,
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
        let bias = match (&self.qkv.bias, &self.qv_bias) {
            (Some(b), _) => Some(b.clone()),
            (None, Some((q, v))) => Some(qkv_bias(q, v)?),
            (None, None) => None,
        };
        let qkv = {
            let _t = profile::scope("linear.qkv", 0.0);
            linear(x, &self.qkv.weight, bias.as_ref())?
        };
        let _t = profile::scope("attention", 0.0);
        if qkv.track_op() {
            let bias = self.bias_for_training(index, n, shared_bias)?;
            if let Some(out) = autograd::attention_op(&qkv, &bias, h, self.scale)? {
                drop(_t);
                let _t = profile::scope("linear.proj", 0.0);
                return self.proj.forward(&out);
            }
        }
        let qkv = qkv.reshape((b, n, 3, h, d))?.permute((2, 0, 3, 1, 4))?; // (3, B, h, N, d)
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
        drop(_t);
        let _t = profile::scope("linear.proj", 0.0);
        self.proj.forward(&out)
    }

    /// The (heads, N, N) bias added to the scores: this block's table and the
    /// shared one, gathered (differentiably when trainable), or zeros.
    fn bias_for_training(
        &self,
        index: &Tensor,
        n: usize,
        shared_bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let own = match (&self.frozen_bias, &self.rel_pos_table) {
            (Some(bias), _) => Some(bias.clone()),
            (None, Some(table)) => Some(gather_bias(table, index, n)?),
            (None, None) => None,
        };
        match (own, shared_bias) {
            (Some(a), Some(s)) => a + s,
            (Some(a), None) => Ok(a),
            (None, Some(s)) => Ok(s.clone()),
            (None, None) => Tensor::zeros(
                (self.num_heads, n, n),
                candle_core::DType::F32,
                self.proj.weight.device(),
            ),
        }
    }

    /// Whether the inference kernels can run this layer: every parameter a
    /// constant, contiguous f32 CPU tensor and the biases precomputed.
    fn fusable(&self) -> bool {
        let consts = [&self.qkv.weight, &self.proj.weight]
            .into_iter()
            .chain(self.qkv.bias.as_ref())
            .chain(self.proj.bias.as_ref())
            .chain(self.frozen_bias.as_ref())
            .all(|t| is_plain_cpu_f32(t) && t.is_contiguous() && !t.is_variable());
        consts
            && (self.qv_bias.is_none() || self.qkv.bias.is_some())
            && (self.rel_pos_table.is_none() || self.frozen_bias.is_some())
    }

    /// Inference kernel: `x` (B·N, C) normalised rows → attention output rows
    /// (before `proj`) written to `out`.
    fn attend_into(
        &self,
        x: &[f32],
        (b, n): (usize, usize),
        shared_bias: Option<&Tensor>,
        out: &mut [f32],
    ) -> Result<()> {
        let c = self.proj.out_dim();
        let mut qkv = scratch::take::<f32>(b * n * 3 * c);
        self.qkv
            .forward_into("linear.qkv", x, b * n, Epilogue::Store, &mut qkv)?;
        let bias = match (&self.frozen_bias, shared_bias) {
            (Some(a), Some(s)) => Some((a + s)?.contiguous()?),
            (Some(a), None) => Some(a.clone()),
            (None, Some(s)) => Some(s.contiguous()?),
            (None, None) => None,
        };
        let guard = bias.as_ref().map(|t| t.storage_and_layout());
        let bias = match &guard {
            Some((s, l)) => Some(cpu_f32(s, l)?),
            None => None,
        };
        let dims = AttentionDims {
            batch: b,
            tokens: n,
            heads: self.num_heads,
            head_dim: c / self.num_heads,
        };
        let d = dims.head_dim;
        let _t = profile::scope("attention", (4 * b * self.num_heads * n * n * d) as f64);
        let bf16 = self.qkv.is_packed();
        attention(&qkv, dims, self.scale as f32, bias, bf16, out);
        Ok(())
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
    /// Every parameter is a constant f32 CPU tensor: inference kernels apply.
    fusable: bool,
}

impl Block {
    pub fn new(cfg: &BeitConfig, index: &Tensor, drop_path: f64, vb: VarBuilder) -> Result<Self> {
        let c = cfg.embed_dim;
        let (gamma_1, gamma_2) = if cfg.layer_scale {
            (Some(vb.get(c, "gamma_1")?), Some(vb.get(c, "gamma_2")?))
        } else {
            (None, None)
        };
        let norm1 = LayerNorm::new(c, cfg.norm_eps, vb.pp("norm1"))?;
        let attn = Attention::new(cfg, index, vb.pp("attn"))?;
        let norm2 = LayerNorm::new(c, cfg.norm_eps, vb.pp("norm2"))?;
        let mlp = Mlp::new(c, cfg.mlp_hidden(), vb.pp("mlp"))?;
        let others = [
            &norm1.weight,
            &norm1.bias,
            &norm2.weight,
            &norm2.bias,
            &mlp.fc1.weight,
            &mlp.fc2.weight,
        ];
        let fusable = attn.fusable()
            && others
                .into_iter()
                .chain(mlp.fc1.bias.as_ref())
                .chain(mlp.fc2.bias.as_ref())
                .chain(gamma_1.as_ref())
                .chain(gamma_2.as_ref())
                .all(|t| is_plain_cpu_f32(t) && t.is_contiguous() && !t.is_variable());
        Ok(Self {
            norm1,
            attn,
            norm2,
            mlp,
            gamma_1,
            gamma_2,
            drop_path,
            fusable,
        })
    }

    /// Packs the four linear layers for the inference kernels at
    /// `precision`. A block being trained keeps candle's ops: fp32 is a
    /// no-op there and reduced precision is refused.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        if !self.fusable {
            if precision == Precision::F32 {
                return Ok(());
            }
            candle_core::bail!(
                "reduced precision needs constant f32 CPU weights (not a model being trained)"
            );
        }
        self.attn.qkv.set_precision(precision)?;
        self.attn.proj.set_precision(precision)?;
        self.mlp.fc1.set_precision(precision)?;
        self.mlp.fc2.set_precision(precision)
    }

    /// Inference kernels for the whole block: LayerNorm, qkv GEMM with its
    /// bias, fused attention, proj GEMM, γ-scaled residual, LayerNorm, fc1
    /// GEMM with bias, GELU, fc2 GEMM, γ-scaled residual.
    fn forward_fused(&self, x: &Tensor, shared_bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let rows = b * n;
        let mut stream = kernels::with_f32(x, |s| Ok(s.to_vec()))?;
        let mut normed = scratch::take::<f32>(rows * c);
        let mut branch = scratch::take::<f32>(rows * c);
        let (g1, g2) = (
            self.gamma_1.as_ref().map(|t| t.storage_and_layout()),
            self.gamma_2.as_ref().map(|t| t.storage_and_layout()),
        );
        let g1 = g1.as_ref().map(|(s, l)| cpu_f32(s, l)).transpose()?;
        let g2 = g2.as_ref().map(|(s, l)| cpu_f32(s, l)).transpose()?;

        self.norm1.forward_into(&stream, &mut normed)?;
        self.attn
            .attend_into(&normed, (b, n), shared_bias, &mut branch)?;
        self.attn.proj.forward_into(
            "linear.proj+residual",
            &branch,
            rows,
            Epilogue::Residual { gamma: g1 },
            &mut stream,
        )?;
        self.norm2.forward_into(&stream, &mut normed)?;
        let mut hidden = scratch::take::<f32>(rows * self.mlp.fc1.out_dim());
        self.mlp.fc1.forward_into(
            "linear.fc1+gelu",
            &normed,
            rows,
            Epilogue::Gelu,
            &mut hidden,
        )?;
        self.mlp.fc2.forward_into(
            "linear.fc2+residual",
            &hidden,
            rows,
            Epilogue::Residual { gamma: g2 },
            &mut stream,
        )?;
        Tensor::from_vec(stream, (b, n, c), x.device())
    }

    pub fn forward(
        &self,
        x: &Tensor,
        index: &Tensor,
        shared_bias: Option<&Tensor>,
        mut train_rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let packed = self.attn.qkv.is_packed();
        if self.fusable
            && train_rng.is_none()
            && (packed || kernels::fused_enabled())
            && is_plain_cpu_f32(x)
            && shared_bias.is_none_or(is_plain_cpu_f32)
        {
            return self.forward_fused(x, shared_bias);
        }
        // x + DropPath(γ ∘ y): γ is applied before DropPath, as in the references.
        let mut residual = |x: &Tensor, y: Tensor, g: &Option<Tensor>| -> Result<Tensor> {
            let _t = profile::scope("residual", 0.0);
            let factors = match train_rng.as_deref_mut() {
                Some(rng) => drop_path_factors(x.dim(0)?, self.drop_path, rng),
                None => None,
            };
            if let Some(g) = g
                && y.track_op()
                && let Some(out) = autograd::residual_op(x, &y, g, factors.clone())?
            {
                return Ok(out);
            }
            let mut y = match g {
                Some(g) => y.broadcast_mul(g)?,
                None => y,
            };
            if let Some(f) = factors {
                let mut shape = vec![1usize; y.rank()];
                shape[0] = f.len();
                y = y.broadcast_mul(&Tensor::from_vec(f, shape, y.device())?)?;
            }
            x + y
        };
        let a = self
            .attn
            .forward(&self.norm1.forward(x)?, index, shared_bias)?;
        let x = residual(x, a, &self.gamma_1)?;
        let m = self.mlp.forward(&self.norm2.forward(&x)?)?;
        residual(&x, m, &self.gamma_2)
    }
}
