//! LoRA-XS (Balazy et al. 2024, "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of
//! Parameters").
//!
//! ```text
//! W0 ~= U_r S_r V_r^T                  (truncated SVD of the frozen weight)
//! B = U_r: (out, r), A = S_r V_r^T: (r, in)   frozen (singular values go into A)
//! R: (r, r) trainable, init N(0, 1e-5^2)
//! y = x W0^T + b + s * ((drop(x) A^T) R^T) B^T
//! merge: W = W0 + s B R A
//! ```
//! Only `r^2` trainable parameters per layer. The SVD is exact (faer), not randomized.
//! File format: `peft_type: "LORA_XS"`, keys `lora_A.weight`, `lora_B.weight` (frozen, saved so
//! that loading needs no SVD) and `lora_R.weight`.

use candle_core::{DType, Tensor, Var};
use rand::Rng;

use super::common::{check_dropout, check_rank, check_scaling, normal, var};
use super::lora::{LoraConfig, LoraParams};
use super::update::{matmul_t, LowRankUpdate};
use crate::adapter::{AdapterCore, BaseLayer, BuiltAdapter};
use crate::linalg::truncated_svd;
use crate::method::{BuildContext, Method, MethodConfig, MethodParams, Variant};
use crate::{Error, Result};

/// One layer's LoRA-XS: a trainable `r x r` matrix between frozen SVD factors.
#[derive(Debug)]
pub struct LoraXs {
    lora_a: Tensor,
    lora_b: Tensor,
    lora_r: Var,
    scaling: f64,
    dropout: f32,
    in_features: usize,
    out_features: usize,
}

impl LoraXs {
    /// A LoRA-XS for `base` with `params` (`params.init` is unused: the init is an SVD): `A`,
    /// `B` from the rank-`r` SVD of `W0`, `R` drawn from `N(0, 1e-5^2)`. Errors when `r` exceeds
    /// `min(out, in)` or `W0` has no SVD.
    pub fn new(base: BaseLayer<'_>, params: &LoraParams, dtype: DType, rng: &mut (impl Rng + ?Sized)) -> Result<Self> {
        let r = params.r;
        check_rank(r)?;
        let (out, inp) = base.weight.dims2()?;
        if r > out.min(inp) {
            return Err(Error::config("r", format!("LoRA-XS rank {r} exceeds min(out, in) = min({out}, {inp})")));
        }
        let svd = truncated_svd(&base.weight.dense()?, r)?;
        let a = svd.vt.broadcast_mul(&svd.s.unsqueeze(1)?)?.to_dtype(dtype)?;
        let b = svd.u.to_dtype(dtype)?;
        let lora_r = normal(rng, (r, r), 1e-5, dtype, base.weight.device())?;
        let scaling = check_scaling("lora_alpha", params.alpha, params.strategy.scale(params.alpha, r))?;
        Self::from_weights(a, b, lora_r, scaling, params.dropout)
    }

    /// A LoRA-XS from given `A: (r, in)`, `B: (out, r)` and `R: (r, r)`.
    pub fn from_weights(lora_a: Tensor, lora_b: Tensor, lora_r: Tensor, scaling: f64, dropout: f64) -> Result<Self> {
        let (r, in_features) = lora_a.dims2()?;
        let out_features = lora_b.dim(0)?;
        check_rank(r)?;
        for (what, t, want) in [("lora_B.weight", &lora_b, [out_features, r]), ("lora_R.weight", &lora_r, [r, r])] {
            if t.dims() != want {
                return Err(Error::ShapeMismatch {
                    what: what.into(),
                    expected: want.to_vec(),
                    actual: t.dims().to_vec(),
                });
            }
        }
        Ok(Self {
            lora_a,
            lora_b,
            lora_r: var(lora_r)?,
            scaling: check_scaling("scaling", 0.0, scaling)?,
            dropout: check_dropout("lora_dropout", dropout)?,
            in_features,
            out_features,
        })
    }

    /// The LoRA-XS of the layer in `ctx` from LoRA's fields (`config`).
    pub fn from_config(config: &LoraConfig, ctx: &mut BuildContext<'_>) -> Result<Self> {
        Self::new(ctx.base, &config.layer_params(ctx.path)?, ctx.dtype, &mut *ctx.rng)
    }

    /// The frozen `A = S_r V_r^T: (r, in)`.
    pub fn lora_a(&self) -> &Tensor {
        &self.lora_a
    }

    /// The frozen `B = U_r: (out, r)`.
    pub fn lora_b(&self) -> &Tensor {
        &self.lora_b
    }

    /// The trainable `R: (r, r)`.
    pub fn lora_r(&self) -> &Var {
        &self.lora_r
    }
}

impl Method for LoraXs {
    const PEFT_TYPE: &'static str = "LORA_XS";
    const VARIANTS: &'static [Variant] = &[Variant {
        name: "lora-xs",
        peft: "LORA_XS",
        summary: "LoRA-XS (Balazy et al. 2024): a trained r x r matrix between frozen SVD factors of W0",
    }];
    type Config = LoraConfig;

    fn config(_name: &str, params: &MethodParams) -> Result<LoraConfig> {
        Ok(LoraConfig::from_params(params))
    }

    fn validate(config: &LoraConfig) -> Result<()> {
        config.validate()?;
        config.refuse_dora(Self::PEFT_TYPE)
    }

    fn build(config: &LoraConfig, mut ctx: BuildContext<'_>) -> Result<BuiltAdapter> {
        Ok(BuiltAdapter::new(Self::from_config(config, &mut ctx)?))
    }
}

impl AdapterCore for LoraXs {
    fn peft_type(&self) -> &'static str {
        Self::PEFT_TYPE
    }

    fn features(&self) -> (usize, usize) {
        (self.in_features, self.out_features)
    }

    fn dtype(&self) -> DType {
        self.lora_r.dtype()
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        vec![("lora_R.weight".into(), self.lora_r.clone())]
    }

    fn frozen_tensors(&self) -> Vec<Tensor> {
        vec![self.lora_a.clone(), self.lora_b.clone()]
    }

    fn saved_tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            ("lora_A.weight".into(), self.lora_a.clone()),
            ("lora_B.weight".into(), self.lora_b.clone()),
            ("lora_R.weight".into(), self.lora_r.as_tensor().clone()),
        ]
    }

    fn load_tensor(&mut self, suffix: &str, value: &Tensor) -> Result<()> {
        match suffix {
            "lora_A.weight" => self.lora_a = value.detach(),
            "lora_B.weight" => self.lora_b = value.detach(),
            "lora_R.weight" => self.lora_r.set(value)?,
            other => return Err(Error::Unsupported(format!("LORA_XS has no tensor `{other}`"))),
        }
        Ok(())
    }
}

impl LowRankUpdate for LoraXs {
    fn dropout(&self) -> f32 {
        self.dropout
    }

    fn head(&self, x: &Tensor) -> Result<Tensor> {
        matmul_t(&(matmul_t(x, &self.lora_a)? * self.scaling)?, &self.lora_r)
    }

    fn tail(&self) -> Result<Tensor> {
        Ok(self.lora_b.clone())
    }

    /// `s x A^T R^T = s x (R A)^T`: the `(r, in)` product costs `r^2 in` flops per call.
    fn linear_head(&self) -> Result<Option<(Tensor, f64)>> {
        Ok(Some((self.lora_r.as_tensor().matmul(&self.lora_a)?, self.scaling)))
    }

    fn factors(&self) -> Result<(Tensor, Tensor, f64)> {
        Ok((self.lora_b.matmul(self.lora_r.as_tensor())?, self.lora_a.clone(), self.scaling))
    }
}
