//! The additive low-rank update `dW = s * B A` that the LoRA family shares.
//!
//! A method that is "an update added to the base output" implements [`LowRankUpdate`] and gets
//! its [`Adapter`] for free:
//!
//! ```text
//! y = x W0^T + b + branch(drop(x)),   branch(x) = s * (x A^T) B^T
//! merge: W = W0 + s B A
//! ```
//! Weight-decomposed methods (DoRA, EDoRA) wrap an update instead of copying it
//! (see [`super::dora`]).

use candle_core::Tensor;

use super::common::branch_dropout;
use crate::adapter::{Adapter, AdapterCore, BaseLayer};
use crate::frozen::{add_branch, frozen_linear, lora_linear, low_rank_linear, reshape};
use crate::Result;

/// An additive update `dW = s * B A` of a linear layer (`B` may itself be a product, as in
/// LoRA-XS's `B R`). Its identity and tensors come from [`AdapterCore`].
pub trait LowRankUpdate: AdapterCore {
    /// The dropout probability on the branch input.
    fn dropout(&self) -> f32;

    /// The rank-sized activation `h` of the branch (`s * x A^T` for LoRA), for an input that is
    /// already in [`AdapterCore::dtype`] and dropped out.
    fn head(&self, x: &Tensor) -> Result<Tensor>;

    /// The factor `B: (out, k)` that maps the head to the output: `branch(x) = head(x) B^T`.
    fn tail(&self) -> Result<Tensor>;

    /// `(A, s)` when the head is `s x A^T` with `A: (k, in)` (LoRA's; a product with a
    /// trainable factor is fine, as LoRA-XS's `R A`): with no dropout, the training forward pass
    /// then runs the frozen layer and the whole branch as one node ([`lora_linear`], DoRA's
    /// [`crate::frozen::dora_linear`]). `None` (the default): the head is computed by
    /// [`Self::head`].
    fn linear_head(&self) -> Result<Option<(Tensor, f64)>> {
        Ok(None)
    }

    /// The layer's whole output `x W0^T + b + branch(x)` as one graph node of the method's own
    /// (VeRA's [`crate::frozen::vera_linear`]), for an input in the base's dtype and no dropout.
    /// `None` (the default): [`lora_linear`] with [`Self::linear_head`], else [`low_rank_linear`].
    fn fused_linear(&self, _x: &Tensor, _base: &BaseLayer<'_>) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// The head and the tail together (methods whose two factors come from one computation
    /// override this). A tail that needs no gradient (a frozen basis) gets none.
    fn head_tail(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.head(x)?, self.tail()?))
    }

    /// `s * (x A^T) B^T`: [`LowRankUpdate::head_tail`], then the head times the tail.
    fn branch(&self, x: &Tensor) -> Result<Tensor> {
        let (h, tail) = self.head_tail(x)?;
        if tail.track_op() {
            matmul_t(&h, &tail)
        } else {
            frozen_linear(&h, &tail, None)
        }
    }

    /// Whether the training forward pass runs the frozen layer and the branch as one node
    /// ([`low_rank_linear`], which takes the tail's gradient as a `(out, k)` matrix). A method
    /// whose tail is a trainable function of a few parameters returns false and computes that
    /// gradient inside [`LowRankUpdate::branch`] instead.
    fn fuse_with_base(&self) -> bool {
        true
    }

    /// `(B, A, s)` with `dW = s * B A`, `B: (out, k)`, `A: (k, in)`.
    fn factors(&self) -> Result<(Tensor, Tensor, f64)>;

    /// `dW = s * B A`, `(out, in)`, in the update's dtype. A factor that is a view (VeRA's slice
    /// of a shared projection) is multiplied as a copy: MKL's products (the `mkl` build) take
    /// no strided view.
    fn delta(&self) -> Result<Tensor> {
        let (b, a, s) = self.factors()?;
        Ok((b.contiguous()?.matmul(&a.contiguous()?)? * s)?)
    }
}

impl<U: LowRankUpdate> Adapter for U {
    fn forward(&self, x: &Tensor, base: BaseLayer<'_>, train: bool) -> Result<Tensor> {
        let fused = x.dtype() == base.weight.dtype() && self.fuse_with_base();
        if fused && !(train && self.dropout() > 0.0) {
            if let Some((a, s)) = self.linear_head()? {
                return lora_linear(x, base.weight, base.bias, &a, &self.tail()?, s);
            }
            if let Some(y) = self.fused_linear(x, &base)? {
                return Ok(y);
            }
        }
        let dtype = self.dtype();
        let xd = branch_dropout(&x.to_dtype(dtype)?, self.dropout(), train)?;
        if fused {
            // One node for the frozen layer and the branch (see `low_rank_linear`), also when
            // the adapter's dtype is not the base's.
            let (h, tail) = self.head_tail(&xd)?;
            return low_rank_linear(x, base.weight, base.bias, &h, &tail);
        }
        add_branch(&base.forward(x)?, &self.branch(&xd)?)
    }

    fn add_to(&self, acc: &Tensor, x: &Tensor, _: BaseLayer<'_>, _: &Tensor, train: bool) -> Result<Tensor> {
        let xd = branch_dropout(&x.to_dtype(self.dtype())?, self.dropout(), train)?;
        add_branch(acc, &self.branch(&xd)?)
    }

    fn delta_weight(&self, _w0: &Tensor) -> Result<Tensor> {
        self.delta()
    }
}

/// `x M^T` for `x: (..., k)` and `m: (n, k)`.
pub(crate) fn matmul_t(x: &Tensor, m: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let k = *dims.last().unwrap_or(&0);
    let rows = x.elem_count() / k.max(1);
    let y = reshape(x, &[rows, k])?.matmul(&m.t()?)?;
    let mut out = dims.to_vec();
    if let Some(last) = out.last_mut() {
        *last = m.dim(0)?;
    }
    Ok(reshape(&y, &out)?)
}
