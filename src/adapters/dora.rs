//! DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), identical to HF PEFT's
//! `use_dora: true`.
//!
//! ```text
//! V  = W0 + s B A                      (the low-rank update of any LowRankUpdate: LoRA for DoRA,
//!                                       LoRA-XS's B R A for EDoRA)
//! n  = stopgrad(rownorm(V))            (one value per output row; detached, paper section 4.3)
//! W' = diag(m / n) V,  m: (out,) trainable, init rownorm(V) so that W' = V at init
//! y  = b + g * (x W0^T) + g * s * (drop(x) A^T) B^T,   g = m / n   (PEFT's form; equal to
//!                                                                   x W'^T + b without dropout)
//! ```
//! With dropout in training, PEFT computes the `g * x W0^T` term on the dropped-out input while
//! the base output uses the clean input: `y = base(x) + (g - 1) * drop(x) W0^T + g * branch`;
//! so does this file.
//!
//! **Memory.** PEFT builds the `(out, in)` matrix `W0 + s B A` in every forward pass to take its
//! row norms. The norm is detached, so it is computed here without that matrix:
//! `||W0_i + s (BA)_i||^2 = ||W0_i||^2 + 2 s <W0_i, (BA)_i> + s^2 ||(BA)_i||^2` with
//! `<W0_i, (BA)_i> = sum_k B_ik (W0 A^T)_ik` and `||(BA)_i||^2 = B_i (A A^T) B_i^T`; `||W0_i||^2`
//! is computed once. Cost `O(out * in * r)` flops, `O(out * r)` memory, in f32. The frozen
//! matmul, the branch and the rescaling run as one graph node ([`crate::frozen::dora_linear`])
//! that keeps no intermediate for the backward pass.

use candle_core::{DType, Tensor, Var};

use super::common::{branch_dropout, var};
use super::update::LowRankUpdate;
use crate::adapter::{Adapter, AdapterCore, BaseLayer};
use crate::frozen::{dora_linear, FrozenWeight};
use crate::{Error, Result};

/// PEFT's key suffix of the magnitude vector (no `.weight`).
pub const MAGNITUDE_KEY: &str = "lora_magnitude_vector";

/// The squared row norms `||W_i||^2` of `w: (out, in)`, in f32.
pub(crate) fn squared_row_norms(w: &Tensor) -> Result<Tensor> {
    Ok(w.to_dtype(DType::F32)?.sqr()?.sum(1)?)
}

/// `rownorm(W0 + s B A)` without forming the matrix (see the module docs), detached, in f32.
/// `w0_sq` holds `||W0_i||^2`. A quantized `w0` is read one block of rows at a time.
pub fn low_rank_row_norms(w0: &FrozenWeight, w0_sq: &Tensor, b: &Tensor, a: &Tensor, s: f64) -> Result<Tensor> {
    let b = b.detach().to_dtype(DType::F32)?;
    let a = a.detach().to_dtype(DType::F32)?;
    // W0 A^T = (A W0^T)^T in the base dtype (no f32 copy of W0), accumulated and used in f32.
    let w0_at = w0.linear(&a.to_dtype(w0.dtype())?, None)?.t()?.to_dtype(DType::F32)?;
    let cross = (&b * w0_at)?.sum(1)?;
    let quad = (b.matmul(&a.matmul(&a.t()?)?)? * &b)?.sum(1)?;
    let n2 = ((w0_sq + (cross * (2.0 * s))?)? + (quad * (s * s))?)?;
    Ok(n2.relu()?.sqrt()?)
}

/// A weight-decomposed adapter over the low-rank update `U`: DoRA is `Dora<Lora>`, EDoRA is
/// `Dora<LoraXs>` ([`super::edora::EDora`]).
#[derive(Debug)]
pub struct Dora<U: LowRankUpdate> {
    update: U,
    magnitude: Var,
    w0_sq: Tensor,
    merged_norm: Option<Tensor>,
    peft_type: &'static str,
}

impl<U: LowRankUpdate> Dora<U> {
    /// Decomposes `update` over the frozen weight `w0`, with the magnitude initialised to
    /// `rownorm(w0 + dW)` (so the adapted weight starts equal to `w0 + dW`, as in PEFT).
    /// `peft_type` is what the file records (`"LORA"` with `use_dora` for DoRA, `"EDORA"`).
    pub fn new(update: U, w0: &FrozenWeight, peft_type: &'static str) -> Result<Self> {
        let w0_sq = squared_row_norms(&w0.dense()?)?;
        let (b, a, s) = update.factors()?;
        let m = low_rank_row_norms(w0, &w0_sq, &b, &a, s)?.to_dtype(update.dtype())?;
        Ok(Self { update, magnitude: var(m)?, w0_sq, merged_norm: None, peft_type })
    }

    /// The low-rank update `V - W0`.
    pub fn update(&self) -> &U {
        &self.update
    }

    /// The magnitude `m: (out,)`.
    pub fn magnitude(&self) -> &Var {
        &self.magnitude
    }

    /// `n = rownorm(W0 + dW)`, detached, f32.
    pub fn weight_norm(&self, w0: &FrozenWeight) -> Result<Tensor> {
        let (b, a, s) = self.update.factors()?;
        low_rank_row_norms(w0, &self.w0_sq, &b, &a, s)
    }

    /// `g = m / n` as a `(out,)` column scale in the update's dtype (differentiable in `m`).
    fn column_scale(&self, w0: &FrozenWeight) -> Result<Tensor> {
        let n = self.weight_norm(w0)?.to_dtype(self.update.dtype())?;
        Ok(self.magnitude.as_tensor().div(&n)?)
    }

    /// `V = W0 + dW` and `n = rownorm(V)`, in f32, formed explicitly (merge is a one-off).
    fn full(&self, w0: &Tensor) -> Result<(Tensor, Tensor)> {
        let v = (w0.to_dtype(DType::F32)? + self.update.delta()?.to_dtype(DType::F32)?)?;
        let n = v.sqr()?.sum(1)?.sqrt()?;
        Ok((v, n))
    }

    fn factor(&self, n: &Tensor) -> Result<Tensor> {
        Ok(self.magnitude.as_tensor().to_dtype(DType::F32)?.div(n)?.unsqueeze(1)?)
    }
}

impl<U: LowRankUpdate> AdapterCore for Dora<U> {
    fn peft_type(&self) -> &'static str {
        self.peft_type
    }

    fn features(&self) -> (usize, usize) {
        self.update.features()
    }

    fn dtype(&self) -> DType {
        self.update.dtype()
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut v = self.update.trainable_vars();
        v.push((MAGNITUDE_KEY.into(), self.magnitude.clone()));
        v
    }

    fn saved_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = self.update.saved_tensors();
        v.push((MAGNITUDE_KEY.into(), self.magnitude.as_tensor().clone()));
        v
    }

    fn load_tensor(&mut self, suffix: &str, value: &Tensor) -> Result<()> {
        if suffix == MAGNITUDE_KEY {
            let out = self.update.features().1;
            if value.dims() != [out] {
                return Err(Error::ShapeMismatch {
                    what: MAGNITUDE_KEY.into(),
                    expected: vec![out],
                    actual: value.dims().to_vec(),
                });
            }
            Ok(self.magnitude.set(value)?)
        } else {
            self.update.load_tensor(suffix, value)
        }
    }
}

impl<U: LowRankUpdate> Adapter for Dora<U> {
    fn forward(&self, x: &Tensor, base: BaseLayer<'_>, train: bool) -> Result<Tensor> {
        let dtype = self.update.dtype();
        let g = self.column_scale(base.weight)?;
        let p = self.update.dropout();
        if train && p > 0.0 {
            // PEFT's form with dropout: base(x) + (g - 1) * drop(x) W0^T + g * branch(drop(x)).
            let xd = branch_dropout(&x.to_dtype(dtype)?, p, true)?;
            let base_d = base.weight.linear(&xd.to_dtype(base.weight.dtype())?, None)?.to_dtype(dtype)?;
            let extra = (base_d.broadcast_mul(&g.affine(1.0, -1.0)?)? + self.update.branch(&xd)?.broadcast_mul(&g)?)?;
            return crate::frozen::add_branch(&base.forward(x)?, &extra);
        }
        // y = g * (x W0^T + s (x A^T) B^T) + b as one node (see `dora_linear`).
        if x.dtype() == base.weight.dtype() {
            if let Some((a, s)) = self.update.linear_head()? {
                return dora_linear(x, base.weight, base.bias, &a, &self.update.tail()?, &g, s);
            }
        }
        // An update whose head is not `s x A^T`, or an input in another dtype than the base:
        // y = g * (x W0^T + b + branch) + (1 - g) * b.
        let branch = self.update.branch(&x.to_dtype(dtype)?)?;
        let base_out = base.forward(x)?;
        let c = match base.bias {
            Some(b) => (g.affine(-1.0, 1.0)? * b.to_dtype(dtype)?)?,
            None => g.zeros_like()?,
        };
        let y = ((base_out.to_dtype(dtype)? + branch)?.broadcast_mul(&g)?.broadcast_add(&c))?;
        Ok(y.to_dtype(base.weight.dtype())?)
    }

    fn delta_weight(&self, w0: &Tensor) -> Result<Tensor> {
        let (v, n) = self.full(w0)?;
        Ok((v.broadcast_mul(&self.factor(&n)?)? - w0.to_dtype(DType::F32)?)?.to_dtype(self.dtype())?)
    }

    fn merge(&mut self, w0: &Tensor) -> Result<Tensor> {
        let (v, n) = self.full(w0)?;
        let merged = v.broadcast_mul(&self.factor(&n)?)?.to_dtype(w0.dtype())?;
        self.merged_norm = Some(n);
        Ok(merged)
    }

    fn unmerge(&mut self, merged: &Tensor) -> Result<Tensor> {
        let n = self
            .merged_norm
            .take()
            .ok_or_else(|| Error::MergeState("DoRA unmerge needs the norm stored by merge".into()))?;
        let v = merged.to_dtype(DType::F32)?.broadcast_div(&self.factor(&n)?)?;
        Ok((v - self.update.delta()?.to_dtype(DType::F32)?)?.to_dtype(merged.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::lora::{Lora, LoraInit, LoraParams};
    use candle_core::{Device, Var};
    use rand::SeedableRng;

    #[test]
    fn low_rank_norms_equal_the_direct_norms() -> Result<()> {
        let dev = Device::Cpu;
        for (out, inp, r) in [(16, 24, 4), (40, 8, 8), (7, 7, 1)] {
            let w0 = Tensor::randn(0f32, 1., (out, inp), &dev)?;
            let b = Tensor::randn(0f32, 1., (out, r), &dev)?;
            let a = Tensor::randn(0f32, 1., (r, inp), &dev)?;
            let fast = low_rank_row_norms(&FrozenWeight::from(w0.clone()), &squared_row_norms(&w0)?, &b, &a, 0.7)?;
            let direct = (&w0 + (b.matmul(&a)? * 0.7)?)?.sqr()?.sum(1)?.sqrt()?;
            let err = ((fast - &direct)?.abs()? / direct)?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-5, "{err}");
        }
        Ok(())
    }

    /// The fused op against plain candle autograd on the same formula, including a zero
    /// magnitude entry (the backward's fallback path), a bias, and an input without gradient.
    #[test]
    fn fused_op_matches_plain_autograd() -> Result<()> {
        let dev = Device::Cpu;
        let (out, inp) = (6, 5);
        let w0 = Tensor::randn(0f32, 1., (out, inp), &dev)?;
        let bias = Tensor::randn(0f32, 1., out, &dev)?;
        let base = BaseLayer { weight: &FrozenWeight::from(w0.clone()), bias: Some(&bias) };
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let (lora, _) = Lora::new(
            base,
            &LoraParams { r: 2, alpha: 4.0, init: LoraInit::Random, ..Default::default() },
            DType::F32,
            &mut rng,
        )?;
        let dora = Dora::new(lora, &FrozenWeight::from(w0.clone()), "LORA")?;
        for zero_entry in [false, true] {
            if zero_entry {
                let m = dora.magnitude().as_tensor().to_vec1::<f32>()?;
                let m: Vec<f32> = m.iter().enumerate().map(|(i, v)| if i == 2 { 0.0 } else { *v }).collect();
                dora.magnitude().set(&Tensor::new(m, &dev)?)?;
            }
            for x_tracked in [true, false] {
                let xv = Var::randn(0f32, 1., (2, 3, inp), &dev)?;
                let x = if x_tracked { xv.as_tensor().clone() } else { xv.as_tensor().detach() };
                let gy = Tensor::randn(0f32, 1., (2, 3, out), &dev)?;
                let fused = dora.forward(&x, base, false)?;
                let grads = (&fused * &gy)?.sum_all()?.backward()?;

                let g = dora.column_scale(&FrozenWeight::from(w0.clone()))?;
                let plain = (x.broadcast_matmul(&w0.t()?)? + dora.update().branch(&x)?)?
                    .broadcast_mul(&g)?
                    .broadcast_add(&bias)?;
                let plain_grads = (&plain * &gy)?.sum_all()?.backward()?;
                let close =
                    |a: &Tensor, b: &Tensor| -> Result<f32> { Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?) };
                assert!(close(&fused, &plain)? < 1e-5);
                for (k, v) in dora.trainable_vars() {
                    let d = close(grads.get(v.as_tensor()).unwrap(), plain_grads.get(v.as_tensor()).unwrap())?;
                    assert!(d < 1e-4, "{k} (zero entry {zero_entry}): {d}");
                }
                match (grads.get(xv.as_tensor()), plain_grads.get(xv.as_tensor())) {
                    (Some(a), Some(b)) => assert!(close(a, b)? < 1e-4),
                    (None, None) => assert!(!x_tracked),
                    _ => panic!("x gradient present in one computation only"),
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_base_in_another_dtype_uses_the_unfused_path() -> Result<()> {
        let dev = Device::Cpu;
        let w0 = Tensor::randn(0f32, 1., (8, 6), &dev)?;
        let bias = Tensor::randn(0f32, 1., 8, &dev)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let base = BaseLayer { weight: &FrozenWeight::from(w0.clone()), bias: Some(&bias) };
        let (lora, _) = Lora::new(
            base,
            &LoraParams { r: 2, alpha: 4.0, init: LoraInit::Random, ..Default::default() },
            DType::F32,
            &mut rng,
        )?;
        let dora = Dora::new(lora, &FrozenWeight::from(w0.clone()), "LORA")?;
        let x = Tensor::randn(0f32, 1., (3, 6), &dev)?;
        let want = dora.forward(&x, base, false)?;
        let (w16, b16) = (w0.to_dtype(DType::BF16)?, bias.to_dtype(DType::BF16)?);
        let got = dora.forward(
            &x.to_dtype(DType::BF16)?,
            BaseLayer { weight: &FrozenWeight::from(w16.clone()), bias: Some(&b16) },
            false,
        )?;
        assert_eq!(got.dtype(), DType::BF16);
        let err =
            ((got.to_dtype(DType::F32)? - &want)?.abs()?.max_all()? / want.abs()?.max_all()?)?.to_scalar::<f32>()?;
        assert!(err < 2e-2, "{err}");
        Ok(())
    }

    #[test]
    fn a_fresh_dora_is_the_base_plus_its_update() -> Result<()> {
        let w0 = Tensor::randn(0f32, 1., (6, 5), &Device::Cpu)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let base = BaseLayer { weight: &FrozenWeight::from(w0.clone()), bias: None };
        let (lora, _) = Lora::new(
            base,
            &LoraParams { r: 2, alpha: 4.0, init: LoraInit::Random, ..Default::default() },
            DType::F32,
            &mut rng,
        )?;
        let delta = lora.delta()?;
        let dora = Dora::new(lora, &FrozenWeight::from(w0.clone()), "LORA")?;
        let err = (dora.delta_weight(&w0)? - delta)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "{err}");
        Ok(())
    }
}
