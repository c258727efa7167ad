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
//! is computed once. Cost `O(out * in * r)` flops, `O(out * r)` memory, in f32.

use candle_core::backend::BackendStorage;
use candle_core::op::{Add, Mul};
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, MetalStorage, Shape, Tensor, Var};

use super::common::{branch_dropout, var};
use super::update::{matmul_t, LowRankUpdate};
use crate::adapter::{Adapter, BaseLayer};
use crate::frozen::frozen_linear;
use crate::{Error, Result};

/// PEFT's key suffix of the magnitude vector (no `.weight`).
pub const MAGNITUDE_KEY: &str = "lora_magnitude_vector";

/// The squared row norms `||W_i||^2` of `w: (out, in)`, in f32.
pub(crate) fn squared_row_norms(w: &Tensor) -> Result<Tensor> {
    Ok(w.to_dtype(DType::F32)?.sqr()?.sum(1)?)
}

/// `rownorm(W0 + s B A)` without forming the matrix (see the module docs), detached, in f32.
/// `w0_sq` holds `||W0_i||^2`.
pub fn low_rank_row_norms(w0: &Tensor, w0_sq: &Tensor, b: &Tensor, a: &Tensor, s: f64) -> Result<Tensor> {
    let b = b.detach().to_dtype(DType::F32)?;
    let a = a.detach().to_dtype(DType::F32)?;
    // W0 A^T in the base dtype (no f32 copy of W0), accumulated and used in f32.
    let w0_at = matmul_t(w0, &a.to_dtype(w0.dtype())?)?.to_dtype(DType::F32)?;
    let cross = (&b * w0_at)?.sum(1)?;
    let quad = (b.matmul(&a.matmul(&a.t()?)?)? * &b)?.sum(1)?;
    let n2 = ((w0_sq + (cross * (2.0 * s))?)? + (quad * (s * s))?)?;
    Ok(n2.relu()?.sqrt()?)
}

/// `y = g * (base + branch) + c` for `base, branch: (n, out)` and `gc = [g; c]: (2, out)`, as one
/// op: autograd keeps only `y` (not `base + branch` or `g * (base + branch)`), so a DoRA layer
/// holds no more activations than a LoRA layer.
struct DoraCombine;

impl DoraCombine {
    fn fwd<S: BackendStorage>(
        base: &S,
        base_l: &Layout,
        branch: &S,
        branch_l: &Layout,
        gc: &S,
        gc_l: &Layout,
    ) -> candle_core::Result<(S, Shape)> {
        let (n, out) = base_l.shape().dims2()?;
        let sum = base.binary_impl::<Add>(branch, base_l, branch_l)?;
        let sum_l = Layout::contiguous((n, out));
        let g_l = gc_l.narrow(0, 0, 1)?.broadcast_as((n, out))?;
        let c_l = gc_l.narrow(0, 1, 1)?.broadcast_as((n, out))?;
        let scaled = sum.binary_impl::<Mul>(gc, &sum_l, &g_l)?;
        drop(sum);
        Ok((scaled.binary_impl::<Add>(gc, &sum_l, &c_l)?, Shape::from((n, out))))
    }
}

impl CustomOp3 for DoraCombine {
    fn name(&self) -> &'static str {
        "dora-combine"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
        c: &CpuStorage,
        cl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Self::fwd(a, al, b, bl, c, cl)
    }

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
        c: &CudaStorage,
        cl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        Self::fwd(a, al, b, bl, c, cl)
    }

    fn metal_fwd(
        &self,
        a: &MetalStorage,
        al: &Layout,
        b: &MetalStorage,
        bl: &Layout,
        c: &MetalStorage,
        cl: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        Self::fwd(a, al, b, bl, c, cl)
    }

    fn bwd(
        &self,
        base: &Tensor,
        branch: &Tensor,
        gc: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // One (n, out) temporary at a time: each product is reduced before the next is made.
        let grad_g_base = (grad * base)?.sum(0)?;
        let grad_g = (grad_g_base + (grad * branch)?.sum(0)?)?;
        let grad_c = grad.sum(0)?;
        let grad_in = grad.broadcast_mul(&gc.get(0)?)?;
        Ok((Some(grad_in.clone()), Some(grad_in), Some(Tensor::stack(&[grad_g, grad_c], 0)?)))
    }
}

/// `g * (base + branch) + c` over the last dimension (see [`DoraCombine`]), for any leading
/// dimensions; `base` and `branch` must share a dtype.
fn dora_combine(base: &Tensor, branch: &Tensor, g: &Tensor, c: &Tensor) -> Result<Tensor> {
    let dims = base.dims().to_vec();
    let out = *dims.last().unwrap_or(&0);
    let rows = base.elem_count() / out.max(1);
    let gc = Tensor::stack(&[g, c], 0)?;
    let y = base.reshape((rows, out))?.apply_op3(&branch.reshape((rows, out))?, &gc, DoraCombine)?;
    Ok(y.reshape(dims)?)
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
    pub fn new(update: U, w0: &Tensor, peft_type: &'static str) -> Result<Self> {
        let w0_sq = squared_row_norms(w0)?;
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
    pub fn weight_norm(&self, w0: &Tensor) -> Result<Tensor> {
        let (b, a, s) = self.update.factors()?;
        low_rank_row_norms(w0, &self.w0_sq, &b, &a, s)
    }

    /// `g = m / n` as a `(out,)` column scale in the update's dtype (differentiable in `m`).
    fn column_scale(&self, w0: &Tensor) -> Result<Tensor> {
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

impl<U: LowRankUpdate> Adapter for Dora<U> {
    fn peft_type(&self) -> &'static str {
        self.peft_type
    }

    fn features(&self) -> (usize, usize) {
        self.update.features()
    }

    fn dtype(&self) -> DType {
        self.update.dtype()
    }

    fn forward(&self, x: &Tensor, base_out: &Tensor, base: BaseLayer<'_>, train: bool) -> Result<Tensor> {
        let dtype = self.update.dtype();
        let g = self.column_scale(base.weight)?;
        let x = x.to_dtype(dtype)?;
        let p = self.update.dropout();
        if train && p > 0.0 {
            let xd = branch_dropout(&x, p, true)?;
            let base_d = frozen_linear(&xd.to_dtype(base.weight.dtype())?, base.weight, None)?.to_dtype(dtype)?;
            let extra = (base_d.broadcast_mul(&(&g - 1.0)?)? + self.update.branch(&xd)?.broadcast_mul(&g)?)?;
            return crate::adapter::add_branch(base_out, &extra);
        }
        // y = g * (x W0^T + b + branch) + (1 - g) * b = g * (x W0^T + branch) + b.
        let c = match base.bias {
            Some(b) => (g.affine(-1.0, 1.0)? * b.to_dtype(dtype)?)?,
            None => g.zeros_like()?,
        };
        let y = dora_combine(&base_out.to_dtype(dtype)?, &self.update.branch(&x)?, &g, &c)?;
        Ok(y.to_dtype(base_out.dtype())?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::{Lora, LoraInit};
    use crate::scaling::Standard;
    use candle_core::Device;
    use rand::SeedableRng;

    #[test]
    fn low_rank_norms_equal_the_direct_norms() -> Result<()> {
        let dev = Device::Cpu;
        for (out, inp, r) in [(16, 24, 4), (40, 8, 8), (7, 7, 1)] {
            let w0 = Tensor::randn(0f32, 1., (out, inp), &dev)?;
            let b = Tensor::randn(0f32, 1., (out, r), &dev)?;
            let a = Tensor::randn(0f32, 1., (r, inp), &dev)?;
            let fast = low_rank_row_norms(&w0, &squared_row_norms(&w0)?, &b, &a, 0.7)?;
            let direct = (&w0 + (b.matmul(&a)? * 0.7)?)?.sqr()?.sum(1)?.sqrt()?;
            let err = ((fast - &direct)?.abs()? / direct)?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-5, "{err}");
        }
        Ok(())
    }

    #[test]
    fn a_fresh_dora_is_the_base_plus_its_update() -> Result<()> {
        let w0 = Tensor::randn(0f32, 1., (6, 5), &Device::Cpu)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let base = BaseLayer { weight: &w0, bias: None };
        let (lora, _) = Lora::new(base, 2, 4.0, &Standard, 0.0, LoraInit::Random, DType::F32, &mut rng)?;
        let delta = lora.delta()?;
        let dora = Dora::new(lora, &w0, "LORA")?;
        let err = (dora.delta_weight(&w0)? - delta)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "{err}");
        Ok(())
    }
}
