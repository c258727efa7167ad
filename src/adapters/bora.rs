//! BoRA (Wang et al. 2024, "BoRA: Bi-dimensional Weight-Decomposed Low-Rank Adaptation"):
//! DoRA's decomposition on both sides of the weight.
//!
//! ```text
//! V  = W0 + s B A
//! H  = diag(m_r / stopgrad(rownorm(V))) V          m_r: (out,) trainable
//! W' = H diag(m_c / stopgrad(colnorm(H)))          m_c: (in,)  trainable
//! y  = x W'^T + b = g * ((x * c) W0^T + s ((drop(x) * c) A^T) B^T) + b,
//!      g = m_r / rownorm(V), c = m_c / colnorm(H)
//! init: LoRA's, m_r = rownorm(V), m_c = colnorm(V)  (so W' = W0 when B = 0)
//! ```
//! No official code exists. Our decisions, as docs/METHODS.md fixes them: rows first, then columns;
//! both norms detached (like DoRA's, section 4.3 of the DoRA paper). The input scaled by `c`
//! replaces `x` in the base matmul, so BoRA runs the frozen matmul on `x * c` instead of `x`.
//!
//! The norms are computed without forming `V` or `H`: the row norms as in DoRA, the column
//! norms from `colnorm(H)_j^2 = sum_i g_i^2 V_ij^2 = (g^2)^T (W0*W0) + 2 s sum_k A_kj P_kj
//! + s^2 sum_k A_kj (M A)_kj` with `P = (B * g^2)^T W0` and `M = (B * g^2)^T B`, in f32.
//! File format: `peft_type: "BORA"` with LoRA's fields and keys plus `bora_magnitude_row`,
//! `bora_magnitude_col`.

use candle_core::{DType, Tensor, Var};

use super::common::{branch_dropout, var};
use super::dora::{low_rank_row_norms, squared_row_norms};
use super::lora::{Lora, LoraConfig};
use super::update::LowRankUpdate;
use crate::adapter::{Adapter, AdapterCore, BaseLayer, BuiltAdapter};
use crate::frozen::FrozenWeight;
use crate::method::{BuildContext, Method, MethodConfig, MethodParams, Variant};
use crate::{Error, Result};

/// The row-magnitude key suffix.
pub const ROW_KEY: &str = "bora_magnitude_row";
/// The column-magnitude key suffix.
pub const COL_KEY: &str = "bora_magnitude_col";

/// One layer's BoRA: a LoRA update with row and column magnitudes.
#[derive(Debug)]
pub struct Bora {
    lora: Lora,
    m_row: Var,
    m_col: Var,
    w0_sq: Tensor,
    merged_scales: Option<(Tensor, Tensor)>,
}

impl Bora {
    /// Decomposes `lora` over `w0`: `m_r = rownorm(V)`, `m_c = colnorm(V)` with `V = w0 + dW`.
    pub fn new(lora: Lora, w0: &FrozenWeight) -> Result<Self> {
        let w0 = &w0.dense()?;
        let v = (w0.to_dtype(DType::F32)? + lora.delta()?.to_dtype(DType::F32)?)?;
        let dtype = lora.dtype();
        let m_row = v.sqr()?.sum(1)?.sqrt()?.to_dtype(dtype)?;
        let m_col = v.sqr()?.sum(0)?.sqrt()?.to_dtype(dtype)?;
        Ok(Self { lora, m_row: var(m_row)?, m_col: var(m_col)?, w0_sq: squared_row_norms(w0)?, merged_scales: None })
    }

    /// The row magnitude `m_r: (out,)`.
    pub fn magnitude_row(&self) -> &Var {
        &self.m_row
    }

    /// The column magnitude `m_c: (in,)`.
    pub fn magnitude_col(&self) -> &Var {
        &self.m_col
    }

    /// `(g, c)`: the row scale `m_r / rownorm(V)` and the column scale `m_c / colnorm(H)`, in the
    /// adapter dtype, differentiable in `m_r` and `m_c` only.
    ///
    /// The column norms need `W0` squared elementwise: a quantized `W0` is dequantized for them
    /// in every forward pass (one layer at a time).
    fn scales(&self, w0: &FrozenWeight) -> Result<(Tensor, Tensor)> {
        let (b, a, s) = self.lora.factors()?;
        let n_row = low_rank_row_norms(w0, &self.w0_sq, &b, &a, s)?;
        let (b, a) = (b.detach().to_dtype(DType::F32)?, a.detach().to_dtype(DType::F32)?);
        let g = self.m_row.as_tensor().detach().to_dtype(DType::F32)?.div(&n_row)?;
        let g2 = g.sqr()?;
        let w0f = w0.dense()?.to_dtype(DType::F32)?;
        let t1 = g2.unsqueeze(0)?.matmul(&w0f.sqr()?)?.squeeze(0)?;
        let bg = b.broadcast_mul(&g2.unsqueeze(1)?)?;
        let t2 = (&a * bg.t()?.matmul(&w0f)?)?.sum(0)?;
        let t3 = (&a * bg.t()?.matmul(&b)?.matmul(&a)?)?.sum(0)?;
        let n_col = ((t1 + (t2 * (2.0 * s))?)? + (t3 * (s * s))?)?.relu()?.sqrt()?;
        let dtype = self.dtype();
        let g = self.m_row.as_tensor().div(&n_row.to_dtype(dtype)?)?;
        let c = self.m_col.as_tensor().div(&n_col.to_dtype(dtype)?)?;
        Ok((g, c))
    }

    /// `W'` and its scales `(g, c)` in f32, formed explicitly (merge is a one-off).
    fn full(&self, w0: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let v = (w0.to_dtype(DType::F32)? + self.lora.delta()?.to_dtype(DType::F32)?)?;
        let g = self.m_row.as_tensor().to_dtype(DType::F32)?.div(&v.sqr()?.sum(1)?.sqrt()?)?;
        let h = v.broadcast_mul(&g.unsqueeze(1)?)?;
        let c = self.m_col.as_tensor().to_dtype(DType::F32)?.div(&h.sqr()?.sum(0)?.sqrt()?)?;
        Ok((h.broadcast_mul(&c.unsqueeze(0)?)?, g, c))
    }
}

impl Adapter for Bora {
    fn forward(&self, x: &Tensor, base: BaseLayer<'_>, train: bool) -> Result<Tensor> {
        let (g, c) = self.scales(base.weight)?;
        let x = x.to_dtype(self.dtype())?;
        let xc = x.broadcast_mul(&c)?;
        let xd = branch_dropout(&x, self.lora.dropout(), train)?.broadcast_mul(&c)?;
        let base_c = base.weight.linear(&xc.to_dtype(base.weight.dtype())?, None)?.to_dtype(self.dtype())?;
        let y = (base_c + self.lora.branch(&xd)?)?.broadcast_mul(&g)?.to_dtype(base.weight.dtype())?;
        Ok(match base.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    fn delta_weight(&self, w0: &Tensor) -> Result<Tensor> {
        let (w, _, _) = self.full(w0)?;
        Ok((w - w0.to_dtype(DType::F32)?)?.to_dtype(self.dtype())?)
    }

    fn merge(&mut self, w0: &Tensor) -> Result<Tensor> {
        let (w, g, c) = self.full(w0)?;
        self.merged_scales = Some((g, c));
        Ok(w.to_dtype(w0.dtype())?)
    }

    fn unmerge(&mut self, merged: &Tensor) -> Result<Tensor> {
        let (g, c) = self
            .merged_scales
            .take()
            .ok_or_else(|| Error::MergeState("BoRA unmerge needs the scales stored by merge".into()))?;
        let v = merged.to_dtype(DType::F32)?.broadcast_div(&g.unsqueeze(1)?)?.broadcast_div(&c.unsqueeze(0)?)?;
        Ok((v - self.lora.delta()?.to_dtype(DType::F32)?)?.to_dtype(merged.dtype())?)
    }
}

impl AdapterCore for Bora {
    fn peft_type(&self) -> &'static str {
        Self::PEFT_TYPE
    }

    fn features(&self) -> (usize, usize) {
        self.lora.features()
    }

    fn dtype(&self) -> DType {
        self.lora.dtype()
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut v = self.lora.trainable_vars();
        v.push((ROW_KEY.into(), self.m_row.clone()));
        v.push((COL_KEY.into(), self.m_col.clone()));
        v
    }

    fn load_tensor(&mut self, suffix: &str, value: &Tensor) -> Result<()> {
        let (inp, out) = self.lora.features();
        let (target, len) = match suffix {
            ROW_KEY => (&self.m_row, out),
            COL_KEY => (&self.m_col, inp),
            _ => return self.lora.load_tensor(suffix, value),
        };
        if value.dims() != [len] {
            return Err(Error::ShapeMismatch {
                what: suffix.into(),
                expected: vec![len],
                actual: value.dims().to_vec(),
            });
        }
        Ok(target.set(value)?)
    }
}

impl Method for Bora {
    const PEFT_TYPE: &'static str = "BORA";
    const VARIANTS: &'static [Variant] = &[Variant {
        name: "bora",
        peft: "BORA",
        summary: "BoRA (Wang et al. 2024): DoRA's decomposition on rows and columns",
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
        let (lora, residual) = config.new_lora(&mut ctx)?;
        let rewritten = residual.clone().map(FrozenWeight::from);
        let bora = Bora::new(lora, rewritten.as_ref().unwrap_or(ctx.base.weight))?;
        Ok(BuiltAdapter { adapter: Box::new(bora), base_weight: residual })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::lora::LoraParams;
    use candle_core::Device;
    use rand::SeedableRng;

    #[test]
    fn a_fresh_bora_with_zero_b_is_the_base() -> Result<()> {
        let w0 = Tensor::randn(0f32, 1., (6, 9), &Device::Cpu)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let base = BaseLayer { weight: &FrozenWeight::from(w0.clone()), bias: None };
        let (lora, _) = Lora::new(base, &LoraParams { r: 3, alpha: 6.0, ..Default::default() }, DType::F32, &mut rng)?;
        let bora = Bora::new(lora, &FrozenWeight::from(w0.clone()))?;
        let x = Tensor::randn(0f32, 1., (4, 9), &Device::Cpu)?;
        let base_out = x.matmul(&w0.t()?)?;
        let y = bora.forward(&x, base, false)?;
        let err = (y - &base_out)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "W' != W0 at init: {err}");
        Ok(())
    }
}
