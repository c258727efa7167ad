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
use super::lora::LoraConfig;
use super::update::{matmul_t, LowRankUpdate};
use crate::adapter::BaseLayer;
use crate::config::BuiltAdapter;
use crate::linalg::truncated_svd;
use crate::scaling::ScalingStrategy;
use crate::{Error, Result};

/// One layer's LoRA-XS: a trainable `r x r` matrix between frozen SVD factors.
#[derive(Debug)]
pub struct LoraXs {
    lora_a: Tensor,
    lora_b: Tensor,
    lora_r: Var,
    scaling: f64,
    dropout: f32,
}

impl LoraXs {
    /// A LoRA-XS of rank `r` for `base`: `A`, `B` from the rank-`r` SVD of `W0`, `R` drawn from
    /// `N(0, 1e-5^2)`. Errors when `r` exceeds `min(out, in)` or `W0` has no SVD.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        base: BaseLayer<'_>,
        r: usize,
        alpha: f64,
        strategy: &dyn ScalingStrategy,
        dropout: f64,
        dtype: DType,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        check_rank(r)?;
        let (out, inp) = base.weight.dims2()?;
        if r > out.min(inp) {
            return Err(Error::config("r", format!("LoRA-XS rank {r} exceeds min(out, in) = min({out}, {inp})")));
        }
        let svd = truncated_svd(base.weight, r)?;
        let a = svd.vt.broadcast_mul(&svd.s.unsqueeze(1)?)?.to_dtype(dtype)?;
        let b = svd.u.to_dtype(dtype)?;
        let lora_r = normal(rng, (r, r), 1e-5, dtype, base.weight.device())?;
        Self::from_weights(a, b, lora_r, check_scaling(alpha, strategy.scale(alpha, r))?, dropout)
    }

    /// A LoRA-XS from given `A: (r, in)`, `B: (out, r)` and `R: (r, r)`.
    pub fn from_weights(lora_a: Tensor, lora_b: Tensor, lora_r: Tensor, scaling: f64, dropout: f64) -> Result<Self> {
        let r = lora_a.dim(0)?;
        check_rank(r)?;
        for (what, t, want) in [("lora_B.weight", &lora_b, [lora_b.dim(0)?, r]), ("lora_R.weight", &lora_r, [r, r])] {
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
            scaling: check_scaling(0.0, scaling)?,
            dropout: check_dropout(dropout)?,
        })
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

/// The LoRA-XS of the module at `path` from LoRA's fields (`config`).
pub fn from_config(
    config: &LoraConfig,
    path: &str,
    base: BaseLayer<'_>,
    dtype: DType,
    rng: &mut impl Rng,
) -> Result<LoraXs> {
    let (r, alpha) = config.rank_and_alpha(path)?;
    LoraXs::new(base, r, alpha, config.strategy().as_ref(), config.lora_dropout, dtype, rng)
}

/// Builds the LoRA-XS of the module at `path` from LoRA's fields (`config`).
pub fn build(
    config: &LoraConfig,
    path: &str,
    base: BaseLayer<'_>,
    dtype: DType,
    rng: &mut impl Rng,
) -> Result<BuiltAdapter> {
    Ok(BuiltAdapter { adapter: Box::new(from_config(config, path, base, dtype, rng)?), base_weight: None })
}

impl LowRankUpdate for LoraXs {
    fn peft_type(&self) -> &'static str {
        "LORA_XS"
    }

    fn features(&self) -> (usize, usize) {
        (self.lora_a.dim(1).unwrap_or(0), self.lora_b.dim(0).unwrap_or(0))
    }

    fn dtype(&self) -> DType {
        self.lora_r.dtype()
    }

    fn dropout(&self) -> f32 {
        self.dropout
    }

    fn head(&self, x: &Tensor) -> Result<Tensor> {
        matmul_t(&(matmul_t(x, &self.lora_a)? * self.scaling)?, &self.lora_r)
    }

    fn tail(&self) -> Result<Tensor> {
        Ok(self.lora_b.clone())
    }

    fn factors(&self) -> Result<(Tensor, Tensor, f64)> {
        Ok((self.lora_b.matmul(self.lora_r.as_tensor())?, self.lora_a.clone(), self.scaling))
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
