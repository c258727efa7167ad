//! A linear layer whose weight is frozen: `y = x W^T + b`, differentiable in `x` only.
//!
//! candle's matmul backward always computes the gradient of both operands, so `x.matmul(W^T)`
//! with a frozen `W` still builds a `W`-sized gradient in every backward pass: an extra
//! `(out x in)` matmul and an `(out x in)` buffer per layer, roughly doubling a frozen layer's
//! backward cost. [`frozen_linear`] runs the same forward matmul as a custom op whose backward
//! returns only `dL/dx = dL/dy W`.
//!
//! [`FrozenWeight`] is a layer's frozen weight, dense or kept quantized
//! ([`crate::quantized`]); every frozen product of the crate goes through it.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Device, Layout, MetalStorage, Shape, Tensor};

use crate::fused::{needed, with_backward, with_cpu_slices};
use crate::kernels;
use crate::quantized::QuantizedWeight;
use crate::Result;

/// A layer's frozen weight `W: (out, in)`: a dense tensor, or blocks of a GGUF quantized type
/// that are dequantized only for the product that needs them (QLoRA; see [`crate::quantized`]).
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    /// A dense tensor in the model's dtype.
    Dense(Tensor),
    /// A quantized weight, shared (cloning it does not copy the blocks).
    Quantized(Arc<QuantizedWeight>),
}

impl From<Tensor> for FrozenWeight {
    fn from(t: Tensor) -> Self {
        Self::Dense(t.detach())
    }
}

impl From<QuantizedWeight> for FrozenWeight {
    fn from(q: QuantizedWeight) -> Self {
        Self::Quantized(Arc::new(q))
    }
}

impl FrozenWeight {
    /// `(out, in)`.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Self::Dense(t) => t.dims2()?,
            Self::Quantized(q) => q.dims(),
        })
    }

    /// The dtype products with the weight are computed in (a quantized weight's compute dtype).
    pub fn dtype(&self) -> DType {
        match self {
            Self::Dense(t) => t.dtype(),
            Self::Quantized(q) => q.dtype(),
        }
    }

    /// The device the weight lives on.
    pub fn device(&self) -> &Device {
        match self {
            Self::Dense(t) => t.device(),
            Self::Quantized(q) => q.device(),
        }
    }

    /// `out * in`.
    pub fn elem_count(&self) -> usize {
        self.dims2().map_or(0, |(o, i)| o * i)
    }

    /// Bytes the weight holds in memory.
    pub fn storage_bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Quantized(q) => q.storage_bytes(),
        }
    }

    /// The dense tensor, if the weight is not quantized.
    pub fn as_dense(&self) -> Option<&Tensor> {
        match self {
            Self::Dense(t) => Some(t),
            Self::Quantized(_) => None,
        }
    }

    /// The weight as a dense tensor in [`Self::dtype`] (a quantized weight is dequantized into a
    /// new tensor): for initialisations and merges, not for the training step.
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            Self::Dense(t) => Ok(t.clone()),
            Self::Quantized(q) => q.dequantize(),
        }
    }

    /// `x W^T + b` for `x: (..., in)` in [`Self::dtype`], differentiable in `x` only (see
    /// [`frozen_linear`]).
    pub fn linear(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        match self {
            Self::Dense(w) => frozen_linear(x, w, bias),
            Self::Quantized(q) => {
                let (out, inp) = q.dims();
                let n = x.elem_count() / inp;
                let y = q.linear(&reshape(x, &[n, inp])?)?;
                let mut dims = x.dims().to_vec();
                if let Some(last) = dims.last_mut() {
                    *last = out;
                }
                let y = reshape(&y, &dims)?;
                Ok(match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                })
            }
        }
    }

    /// `dy W` for `dy: (n, out)`, with no autograd (the input gradient of [`Self::linear`]).
    pub(crate) fn input_grad(&self, dy: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) => Ok(times_weight(dy, w)?),
            Self::Quantized(q) => q.matmul(dy),
        }
    }

    /// The rows `ids` (any shape): `(..ids, in)`, an embedding lookup that dequantizes only the
    /// rows it reads.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) => {
                let mut dims = ids.dims().to_vec();
                dims.push(w.dim(1)?);
                Ok(w.index_select(&ids.flatten_all()?, 0)?.reshape(dims)?)
            }
            Self::Quantized(q) => q.embedding(ids),
        }
    }
}

/// `x W^T` with `x: (n, in)` and `W: (out, in)`; the backward skips `W`.
struct FrozenMatmul;

impl FrozenMatmul {
    fn fwd<S: BackendStorage>(x: &S, x_l: &Layout, w: &S, w_l: &Layout) -> candle_core::Result<(S, Shape)> {
        let (n, k) = x_l.shape().dims2()?;
        let (out, k2) = w_l.shape().dims2()?;
        if k != k2 || x.dtype() != w.dtype() {
            candle_core::bail!(
                "frozen linear: input {:?} {:?} does not fit weight {:?} {:?}",
                x_l.shape(),
                x.dtype(),
                w_l.shape(),
                w.dtype()
            );
        }
        let wt_l = w_l.transpose(0, 1)?;
        let y = x.matmul(w, (1, n, out, k), x_l, &wt_l)?;
        Ok((y, Shape::from((n, out))))
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        // bf16: the CPU kernel (candle's bf16 matmul widens both operands whole on one thread).
        if let (CpuStorage::BF16(xs), CpuStorage::BF16(ws)) = (x, w) {
            let (n, k) = x_l.shape().dims2()?;
            let (out, k2) = w_l.shape().dims2()?;
            if let (Some((x0, x1)), Some((w0, w1)), true) =
                (x_l.contiguous_offsets(), w_l.contiguous_offsets(), k == k2)
            {
                let y = kernels::matmul_bf16_nt(&xs[x0..x1], &ws[w0..w1], n, k, out);
                return Ok((CpuStorage::BF16(y), Shape::from((n, out))));
            }
        }
        Self::fwd(x, x_l, w, w_l)
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_l: &Layout,
        w: &CudaStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        Self::fwd(x, x_l, w, w_l)
    }

    fn metal_fwd(
        &self,
        x: &MetalStorage,
        x_l: &Layout,
        w: &MetalStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        Self::fwd(x, x_l, w, w_l)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(times_weight(grad_y, w)?), None))
    }
}

/// `dy W` for 2-D `dy: (n, out)` and `W: (out, in)`, the input gradient of `x W^T`: with the CPU
/// kernel for bf16 (see [`FrozenMatmul`]), else candle's matmul.
fn times_weight(dy: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if !(dy.device().is_cpu() && dy.dtype() == DType::BF16 && w.dtype() == DType::BF16) {
        return dy.matmul(w);
    }
    let ((n, out), (out2, inp)) = (dy.dims2()?, w.dims2()?);
    if out != out2 {
        candle_core::bail!("frozen linear backward: gradient {:?} does not fit weight {:?}", dy.shape(), w.shape());
    }
    let dx = with_cpu_slices(&[dy, w], |s| kernels::matmul_bf16_nn(s[0], s[1], n, out, inp))?;
    Tensor::from_vec(dx, (n, inp), dy.device())
}

/// `base + branch` in `base`'s dtype, for an adapter branch of the same shape computed in the
/// adapter's dtype. On the CPU a bf16 base and an f32 branch are added in f32 and rounded once,
/// in one pass (`kernels::add_to_bf16`): PEFT's `result + delta.to(result.dtype)` rounds the
/// branch to bf16 first and then the sum (at most one bf16 ulp from this), and candle's bf16 ops
/// are slow on the CPU, where candle has no bf16 arithmetic. Other dtypes and devices: PEFT's
/// form.
pub(crate) fn add_branch(base: &Tensor, branch: &Tensor) -> Result<Tensor> {
    let cpu_bf16 = base.device().is_cpu() && base.dtype() == DType::BF16 && branch.dtype() == DType::F32;
    if cpu_bf16 && base.shape() == branch.shape() {
        let y = with_cpu_slices(&[base], |a: &[&[half::bf16]]| {
            with_cpu_slices(&[branch], |b: &[&[f32]]| kernels::add_to_bf16(a[0], b[0]))
        })??;
        // A graph node when an input is tracked (the composite paths): the gradient passes to
        // both inputs, converted to the branch's dtype for the branch.
        let y = Tensor::from_vec(y, base.shape(), base.device())?;
        return with_backward("add-branch", &[base, branch], y, |inputs, _, grad| {
            Ok(vec![needed(inputs[0], || Ok(grad.clone()))?, needed(inputs[1], || grad.to_dtype(inputs[1].dtype()))?])
        });
    }
    Ok(base.add(&branch.to_dtype(base.dtype())?)?)
}

/// `t` reshaped to `dims`, or `t` itself when it has them already: candle records a reshape node
/// even for an unchanged shape, and every node costs a gradient allocation in the backward pass.
pub(crate) fn reshape(t: &Tensor, dims: &[usize]) -> candle_core::Result<Tensor> {
    if t.dims() == dims {
        Ok(t.clone())
    } else {
        t.reshape(dims)
    }
}

/// `x W^T + b` for `x: (..., in)`, `W: (out, in)`, `b: (out,)`, with no gradient for the frozen
/// `W` and the usual gradient for `x`.
pub fn frozen_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let in_features = *dims.last().unwrap_or(&0);
    let n = x.elem_count() / in_features.max(1);
    let x2 = reshape(x, &[n, in_features])?;
    let y2 = if x.track_op() {
        x2.apply_op2(weight, FrozenMatmul)?
    } else {
        // Nothing upstream needs a gradient: no graph node.
        x2.apply_op2_no_bwd(weight, &FrozenMatmul)?
    };
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = weight.dim(0)?;
    }
    let y = reshape(&y2, &out_dims)?;
    Ok(match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// `x W^T + b + h T^T` for `x: (..., in)`, a frozen `W: (out, in)` (dense or quantized), `h: (..., k)` and
/// `T: (out, k)`: a frozen layer plus a low-rank branch (`h = s x A^T`, `T = B` for LoRA), as one
/// graph node. Autograd keeps `x`, `h`, `T` and the output, not the base output and the branch
/// output that an addition would keep (two more `(..., out)` tensors per layer). Backward:
/// `dx = dy W`, `dh = dy T`, `dT = dy^T h`, each only where its input needs it.
///
/// `h` and `T` may have another dtype than `x` and `W` (an f32 adapter on a bf16 base): the
/// branch is computed in theirs and added in the base's, and `dh`, `dT` are computed in theirs.
pub fn low_rank_linear(
    x: &Tensor,
    weight: &FrozenWeight,
    bias: Option<&Tensor>,
    h: &Tensor,
    tail: &Tensor,
) -> Result<Tensor> {
    let (out_features, k) = (weight.dims2()?.0, tail.dim(1)?);
    // A view (a slice of a shared basis) is copied: MKL's products take no other row stride.
    let tail = &tail.contiguous()?;
    let rows = h.elem_count() / k.max(1);
    let flat = move |t: &Tensor, cols: usize| reshape(t, &[rows, cols]);
    let base = weight.linear(&x.detach(), bias)?;
    let branch = flat(&h.detach(), k)?.matmul(&tail.detach().t()?)?;
    let y = add_branch(&base, &reshape(&branch, base.dims())?)?;
    drop(branch);
    let w = weight.clone();
    with_backward("low-rank-linear", &[x, h, tail], y, move |inputs, _, grad| {
        let [x, h, tail] = [inputs[0], inputs[1], inputs[2]];
        let dy = flat(grad, out_features)?;
        let dx = needed(x, || w.input_grad(&dy).map_err(candle_core::Error::wrap)?.reshape(x.dims()))?;
        let dy = dy.to_dtype(tail.dtype())?;
        let dh = needed(h, || dy.matmul(&tail.detach())?.reshape(h.dims()))?;
        let dt = needed(tail, || dy.t()?.matmul(&flat(&h.detach(), k)?))?;
        Ok(vec![dx, dh, dt])
    })
}

/// [`low_rank_linear`] with LoRA's head `h = s x A^T` computed inside the node: `x W^T + b +
/// s (x A^T) B^T` for `A: (r, in)`, `B: (out, r)`, differentiable in `x`, `A` and `B`. The input
/// `x` then reaches the graph through this one node, not also through the head's product (and
/// the reshapes around it), each of which costs an `x`-sized gradient buffer, zeroed and added
/// to, in candle's backward pass. Backward with `g = s dy B`: `dx = dy W + g A`, `dA = g^T x`,
/// `dB = dy^T h` (`h` recomputed: `(n, r)`).
pub fn lora_linear(
    x: &Tensor,
    weight: &FrozenWeight,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    s: f64,
) -> Result<Tensor> {
    low_rank_node("lora-linear", x, weight, bias, a, b, s, false)
}

/// DoRA's layer (PEFT's form, without dropout) as one graph node: `y = g (x W^T + s (x A^T) B^T)
/// + b` with DoRA's column scale `g = m / rownorm(W + s B A)`, `(out,)` in the adapter's dtype,
/// differentiable in `x`, `A`, `B` and `g` (the bias is frozen). Backward: `dz = dy g` and
/// `dg = sum_rows(dy (x W^T + s (x A^T) B^T))`, then [`lora_linear`]'s backward on `dz`.
///
/// `dg` is recovered from the output, `(sum_rows(dy y) - b sum_rows(dy)) / g`, when `g` has no
/// zero and the output is in the adapter's dtype; otherwise the two products are computed again.
/// On the CPU in f32 the scale and shift, and their backward pass, are one pass over memory
/// each; autograd keeps `x`, `A`, `B`, `g` and `y`.
#[allow(clippy::too_many_arguments)]
pub fn dora_linear(
    x: &Tensor,
    weight: &FrozenWeight,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    g: &Tensor,
    s: f64,
) -> Result<Tensor> {
    // `g` travels as a last column of `B`: a node takes at most three inputs.
    let p = Tensor::cat(&[b, &g.unsqueeze(1)?], 1)?;
    low_rank_node("dora-linear", x, weight, bias, a, &p, s, true)
}

/// [`lora_linear`] (`scaled` false, `p = B`) or [`dora_linear`] (`scaled` true, `p = [B | g]`).
#[allow(clippy::too_many_arguments)]
fn low_rank_node(
    name: &'static str,
    x: &Tensor,
    weight: &FrozenWeight,
    bias: Option<&Tensor>,
    a: &Tensor,
    p: &Tensor,
    s: f64,
    scaled: bool,
) -> Result<Tensor> {
    let ((out_features, cols), inp) = (p.dims2()?, weight.dims2()?.1);
    let r = cols.saturating_sub(usize::from(scaled));
    if a.dims() != [r, inp] {
        return Err(crate::Error::ShapeMismatch {
            what: "LoRA's A".into(),
            expected: vec![r, inp],
            actual: a.dims().to_vec(),
        });
    }
    let rows = x.elem_count() / inp.max(1);
    let dtype = a.dtype();
    // The input as the adapter's dtype, (rows, in), and the head `s x A^T`.
    let head_input = move |x: &Tensor| reshape(&x.detach(), &[rows, inp])?.to_dtype(dtype);
    let head = move |xa: &Tensor, a: &Tensor| xa.matmul(&a.detach().t()?)? * s;
    // `B` and, for DoRA, `g`.
    let split = move |p: &Tensor| -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let p = p.detach();
        if scaled {
            Ok((p.narrow(1, 0, r)?.contiguous()?, Some(p.narrow(1, r, 1)?.squeeze(1)?.contiguous()?)))
        } else {
            Ok((p, None))
        }
    };
    // DoRA's shift: the frozen bias in the adapter's dtype, or zeros.
    let c = match (scaled, bias) {
        (false, _) => None,
        (true, Some(bias)) => Some(bias.detach().to_dtype(dtype)?),
        (true, None) => Some(Tensor::zeros(out_features, dtype, p.device())?),
    };
    let (b, g) = split(p)?;
    let branch = head(&head_input(x)?, a)?.matmul(&b.t()?)?;
    let y = match (&g, &c) {
        (Some(g), Some(c)) => {
            let base = weight.linear(&x.detach(), None)?;
            let u = reshape(&base, &[rows, out_features])?.to_dtype(dtype)?;
            reshape(&scale_shift(&u, &branch, g, c)?.to_dtype(base.dtype())?, base.dims())?
        }
        _ => {
            let base = weight.linear(&x.detach(), bias)?;
            add_branch(&base, &reshape(&branch, base.dims())?)?
        }
    };
    drop(branch);
    let w = weight.clone();
    with_backward(name, &[x, a, p], y, move |inputs, y, grad| {
        let [x, a, p] = [inputs[0], inputs[1], inputs[2]];
        let dy = reshape(grad, &[rows, out_features])?;
        let (b, g) = split(p)?;
        // The input is reshaped and converted once for the factors' gradients.
        let xa = if a.track_op() || p.track_op() || g.is_some() { Some(head_input(x)?) } else { None };
        let xa = || xa.as_ref().ok_or_else(|| candle_core::Error::Msg(format!("{name}: the input was not kept")));
        // The gradient of the two products (DoRA's `dz = dy g`), in the base's and the
        // adapter's dtypes, and DoRA's `dg`.
        let (dy_base, dy_adapter, dg) = match (&g, &c) {
            (Some(g), Some(c)) => {
                let products = || {
                    let base = w.linear(&x.detach(), None).map_err(candle_core::Error::wrap)?;
                    reshape(&base, &[rows, out_features])?.to_dtype(dtype)? + head(xa()?, a)?.matmul(&b.t()?)?
                };
                let y = reshape(y, &[rows, out_features])?;
                let (dz, dg) = scale_shift_backward(&dy.to_dtype(dtype)?, &y, g, c, products)?;
                (dz.to_dtype(dy.dtype())?, dz, Some(dg))
            }
            _ => (dy.clone(), dy.to_dtype(dtype)?, None),
        };
        let gr = (dy_adapter.matmul(&b)? * s)?;
        let da = needed(a, || gr.t()?.matmul(xa()?))?;
        let dp = needed(p, || {
            let db = dy_adapter.t()?.matmul(&head(xa()?, a)?)?;
            match &dg {
                Some(dg) => Tensor::cat(&[&db, &dg.unsqueeze(1)?], 1),
                None => Ok(db),
            }
        })?;
        let dx = needed(x, || {
            let branch = gr.matmul(&a.detach())?;
            let base = w.input_grad(&dy_base).map_err(candle_core::Error::wrap)?;
            // DoRA's `dz` is freed before the sum (its peak is then LoRA's).
            drop((dy_base, dy_adapter));
            add_branch(&base, &branch).map_err(candle_core::Error::wrap)?.reshape(x.dims())
        })?;
        Ok(vec![dx, da, dp])
    })
}

/// VeRA's layer as one graph node: `x W^T + b + ((x A^T) diag(d)) (diag(l) B)^T`, i.e. PEFT's
/// `lambda_b * ((lambda_d * (x A^T)) B^T)`, for the frozen shared views `A: (r, in)` and
/// `B: (out, r)` and the trainable `d = lambda_d: (r,)`, `l = lambda_b: (out,)`; differentiable in
/// `x`, `lambda_d` and `lambda_b`.
///
/// The two vectors are folded into an `(out, r)` copy of `B`, `B' = diag(l) B diag(d)`, so no
/// `(n, r)` or `(n, out)` activation is ever scaled. Autograd keeps `u = x A^T` `(n, r)`. Backward
/// with `M = dy^T u` `(out, r)`: `dl = (B * M) d`, `dd = l^T (B * M)`, `dx = dy W + (dy B') A`: five
/// rank-`r` products in all (PEFT's keeps the `(n, out)` branch output instead of forming `M`).
#[allow(clippy::too_many_arguments)]
pub fn vera_linear(
    x: &Tensor,
    weight: &FrozenWeight,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    lambda_d: &Tensor,
    lambda_b: &Tensor,
) -> Result<Tensor> {
    let ((out_features, r), inp) = (b.dims2()?, weight.dims2()?.1);
    for (what, t, want) in
        [("vera_A", a, vec![r, inp]), ("lambda_d", lambda_d, vec![r]), ("lambda_b", lambda_b, vec![out_features])]
    {
        if t.dims() != want.as_slice() {
            return Err(crate::Error::ShapeMismatch { what: what.into(), expected: want, actual: t.dims().to_vec() });
        }
    }
    let rows = x.elem_count() / inp.max(1);
    let dtype = a.dtype();
    let (a, b) = (a.detach().contiguous()?, b.detach().contiguous()?);
    // B' = diag(l) B diag(d).
    let folded = move |b: &Tensor, d: &Tensor, l: &Tensor| {
        b.broadcast_mul(&d.detach().unsqueeze(0)?)?.broadcast_mul(&l.detach().unsqueeze(1)?)
    };
    let u = reshape(&x.detach(), &[rows, inp])?.to_dtype(dtype)?.matmul(&a.t()?)?;
    let base = weight.linear(&x.detach(), bias)?;
    let branch = u.matmul(&folded(&b, lambda_d, lambda_b)?.t()?)?;
    let y = add_branch(&base, &reshape(&branch, base.dims())?)?;
    drop(branch);
    let w = weight.clone();
    with_backward("vera-linear", &[x, lambda_d, lambda_b], y, move |inputs, _, grad| {
        let [x, d, l] = [inputs[0], inputs[1], inputs[2]];
        let dy = reshape(grad, &[rows, out_features])?;
        let dy_adapter = dy.to_dtype(dtype)?;
        let bm = if d.track_op() || l.track_op() { Some((&b * dy_adapter.t()?.matmul(&u)?)?) } else { None };
        let bm = || bm.as_ref().ok_or_else(|| candle_core::Error::Msg("vera-linear: B * M was not formed".into()));
        let dd = needed(d, || l.detach().unsqueeze(0)?.matmul(bm()?)?.squeeze(0))?;
        let dl = needed(l, || bm()?.matmul(&d.detach().unsqueeze(1)?)?.squeeze(1))?;
        let dx = needed(x, || {
            let branch = dy_adapter.matmul(&folded(&b, d, l)?)?.matmul(&a)?;
            let base = w.input_grad(&dy).map_err(candle_core::Error::wrap)?;
            add_branch(&base, &branch).map_err(candle_core::Error::wrap)?.reshape(x.dims())
        })?;
        Ok(vec![dx, dd, dl])
    })
}

/// `g (u + v) + c` for `u, v: (n, out)` and `g, c: (out,)`: DoRA's output from the frozen product
/// `u` and the branch `v` (one pass on the CPU in f32).
fn scale_shift(u: &Tensor, v: &Tensor, g: &Tensor, c: &Tensor) -> candle_core::Result<Tensor> {
    if u.device().is_cpu() && u.dtype() == DType::F32 {
        let y = with_cpu_slices(&[u, v, g, c], |s| kernels::scale_shift(s[0], s[1], s[2], s[3]))?;
        return Tensor::from_vec(y, u.shape(), u.device());
    }
    (u + v)?.broadcast_mul(g)?.broadcast_add(c)
}

/// The backward pass of [`scale_shift`] given its output `y` and the output's gradient `dy`:
/// `(dy g, sum_rows(dy (u + v)))`, with `u + v` recovered from `y` when `g` has no zero and `y`
/// has `g`'s dtype, else from `products()`.
fn scale_shift_backward(
    dy: &Tensor,
    y: &Tensor,
    g: &Tensor,
    c: &Tensor,
    products: impl FnOnce() -> candle_core::Result<Tensor>,
) -> candle_core::Result<(Tensor, Tensor)> {
    let no_zero = g.abs()?.min_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()? != 0.0;
    if no_zero && y.dtype() == g.dtype() {
        if dy.device().is_cpu() && g.dtype() == DType::F32 {
            let (dz, dg) = with_cpu_slices(&[dy, y, g, c], |s| kernels::scale_shift_backward(s[0], s[1], s[2], s[3]))?;
            return Ok((Tensor::from_vec(dz, dy.shape(), dy.device())?, Tensor::from_vec(dg, g.shape(), g.device())?));
        }
        let dg = ((dy * y)?.sum(0)? - (c * dy.sum(0)?)?)?.div(g)?;
        return Ok((dy.broadcast_mul(g)?, dg));
    }
    let dg = (dy * products()?)?.sum(0)?;
    Ok((dy.broadcast_mul(g)?, dg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_matmul_and_skips_the_weight_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (5, 3), &dev)?;
        let b = Tensor::randn(0f32, 1., 5, &dev)?;
        let x = Var::randn(0f32, 1., (2, 4, 3), &dev)?;
        let y = frozen_linear(x.as_tensor(), &w, Some(&b))?;
        let reference = x.as_tensor().broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
        let diff = (&y - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");

        let grads = y.sqr()?.sum_all()?.backward()?;
        let gx = grads.get(x.as_tensor()).expect("gradient of x");
        let gx_ref = reference.sqr()?.sum_all()?.backward()?;
        let gx_ref = gx_ref.get(x.as_tensor()).unwrap();
        let diff = (gx - gx_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        assert!(grads.get(&w).is_none(), "a gradient of the frozen weight was computed");
        Ok(())
    }

    /// The bf16 CPU kernels (several tiles of the weight's rows and of its columns, an odd
    /// width; MKL's bf16 GEMM in the `mkl` build) against the exact products of the same bf16
    /// values: each output within the rounding to bf16 (2^-8 relative), and bit for bit candle's
    /// bf16 matmul on most outputs.
    #[test]
    fn bf16_kernels_match_the_f32_products() -> Result<()> {
        let dev = Device::Cpu;
        let (m, k, n) = (37, 300, 500);
        let w = Tensor::randn(0f32, 1., (n, k), &dev)?.to_dtype(DType::BF16)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (m, k), &dev)?.to_dtype(DType::BF16)?)?;
        let dy = Tensor::randn(0f32, 1., (m, n), &dev)?.to_dtype(DType::BF16)?;
        let w32 = w.to_dtype(DType::F32)?;
        let y = frozen_linear(x.as_tensor(), &w, None)?;
        let dx = (y.to_dtype(DType::F32)? * dy.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
        let dx = dx.get(x.as_tensor()).expect("gradient of x");
        let no_grad = frozen_linear(&x.as_tensor().detach(), &w, None)?;
        let cases = [
            ("x W^T", y, x.as_tensor().to_dtype(DType::F32)?.matmul(&w32.t()?)?, x.as_tensor().matmul(&w.t()?)?),
            (
                "x W^T, no graph",
                no_grad,
                x.as_tensor().to_dtype(DType::F32)?.matmul(&w32.t()?)?,
                x.as_tensor().matmul(&w.t()?)?,
            ),
            ("dy W", dx.clone(), dy.to_dtype(DType::F32)?.matmul(&w32)?, dy.matmul(&w)?),
        ];
        for (what, ours, exact, candle) in cases {
            assert_eq!(ours.dtype(), DType::BF16, "{what}");
            let ours = ours.to_dtype(DType::F32)?;
            // Beyond the rounding: the f32 sums' own rounding, which depends on their order (MKL's
            // AMX kernels add in another order than gemm's), up to a few 1e-6 on outputs near 0.
            let err = ((&ours - &exact)?.abs()? - (exact.abs()? * (1.0 / 256.0))?)?.max_all()?.to_scalar::<f32>()?;
            assert!(err <= 1e-4, "{what}: off by {err} more than bf16 rounding");
            let same = ours.eq(&candle.to_dtype(DType::F32)?)?.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()?;
            assert!(same > 0.95, "{what}: {same} of the outputs equal candle's");
        }
        Ok(())
    }

    /// A bf16 base output plus an f32 branch on the CPU: the f32 sum rounded to bf16 once, bit
    /// for bit (candle's `to_dtype` rounds to nearest even, as the kernel does), over several
    /// parallel chunks; other dtypes take PEFT's form.
    #[test]
    fn bf16_branch_is_added_in_f32_and_rounded_once() -> Result<()> {
        let dev = Device::Cpu;
        let base = Tensor::randn(0f32, 1., (3, 7000), &dev)?.to_dtype(DType::BF16)?;
        let branch = (Tensor::randn(0f32, 1., (3, 7000), &dev)? * 1e-2)?;
        let y = add_branch(&base, &branch)?;
        let want = (base.to_dtype(DType::F32)? + &branch)?.to_dtype(DType::BF16)?;
        assert_eq!(y.dtype(), DType::BF16);
        let same = y.eq(&want)?.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()?;
        assert_eq!(same, 1.0, "{same} of the sums are the f32 sum rounded once");
        // Tracked inputs get their gradients: the output's, in each input's dtype.
        let (vb, vr) = (candle_core::Var::from_tensor(&base)?, candle_core::Var::from_tensor(&branch)?);
        let grads = add_branch(vb.as_tensor(), vr.as_tensor())?.to_dtype(DType::F32)?.sum_all()?.backward()?;
        for (v, dtype) in [(&vb, DType::BF16), (&vr, DType::F32)] {
            let g = grads.get(v.as_tensor()).expect("a gradient for each input");
            assert_eq!(g.dtype(), dtype);
            assert_eq!(g.to_dtype(DType::F32)?.min_all()?.to_scalar::<f32>()?, 1.0);
            assert_eq!(g.to_dtype(DType::F32)?.max_all()?.to_scalar::<f32>()?, 1.0);
        }
        let base32 = base.to_dtype(DType::F32)?;
        let diff = (add_branch(&base32, &branch)? - (&base32 + &branch)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }
}
