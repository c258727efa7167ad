//! Fused training ops: a forward computed with ordinary candle ops outside the autograd graph,
//! plus a hand-written backward.
//!
//! candle's autograd keeps every intermediate tensor of the forward pass alive until the end of
//! the backward pass. A composite such as attention (`scores`, scaled, masked, max, exp, sum,
//! probabilities) or RMSNorm keeps five to eight activation-sized tensors per call that its
//! backward does not need. `with_backward` records one graph node instead: autograd keeps the
//! op's inputs and output, and the backward recomputes what it needs. This is how PyTorch's
//! fused kernels (SDPA, `F.cross_entropy`, RMSNorm) behave, and it is where most of a training
//! step's memory goes (see `benches/train_throughput.rs`).
//!
//! On the CPU, attention and SwiGLU (and the loss of [`crate::train::loss`]) run this crate's
//! kernels (`src/kernels.rs`: one pass over memory each way, a vectorized `exp`, gemm on
//! blocks of query rows); elsewhere, and for the other ops, the forward runs on the inputs'
//! device with candle's own ops, so every op here works on CPU, CUDA and Metal. Tests check
//! that the two paths give the same numbers.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, MetalStorage, Shape};
use candle_core::{Storage, Tensor, WithDType, D};

use crate::kernels::{self, AttentionShape};
use crate::Result;

/// The gradients of an op's inputs from `(inputs, output, grad_output)`; `None` where an input
/// needs none.
type Backward = Box<dyn Fn(&[&Tensor], &Tensor, &Tensor) -> candle_core::Result<Vec<Option<Tensor>>> + Send + Sync>;

/// A graph node whose forward hands over a precomputed output (one copy of the output buffer:
/// candle offers no way to move a tensor's storage into a new graph node).
struct Fused {
    name: &'static str,
    out: Mutex<Option<Output>>,
    backward: Backward,
}

/// A fused op's precomputed output: a tensor (copied once into the graph node), or the values a
/// CPU kernel computed (moved in without a copy).
enum Output {
    Tensor(Tensor),
    Cpu(CpuStorage, Shape),
}

impl Fused {
    fn take(&self) -> candle_core::Result<(Storage, Shape)> {
        let out = self.out.lock().map_err(|_| candle_core::Error::Msg("poisoned".into()))?.take();
        let out = match out.ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice", self.name)))? {
            Output::Tensor(out) => out,
            Output::Cpu(storage, shape) => return Ok((Storage::Cpu(storage), shape)),
        };
        // A fresh, contiguous buffer starting at offset 0 is handed over as it is.
        let out = if out.is_contiguous() && out.layout().start_offset() == 0 { out } else { out.copy()? };
        let (storage, layout) = out.storage_and_layout();
        let cloned = match &*storage {
            Storage::Cpu(s) => Storage::Cpu(s.try_clone(layout)?),
            Storage::Cuda(s) => Storage::Cuda(s.try_clone(layout)?),
            Storage::Metal(s) => Storage::Metal(s.try_clone(layout)?),
        };
        Ok((cloned, out.shape().clone()))
    }

    fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        match self.take()? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("{}: output on another device", self.name),
        }
    }

    fn cuda(&self) -> candle_core::Result<(CudaStorage, Shape)> {
        match self.take()? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("{}: output on another device", self.name),
        }
    }

    fn metal(&self) -> candle_core::Result<(MetalStorage, Shape)> {
        match self.take()? {
            (Storage::Metal(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("{}: output on another device", self.name),
        }
    }

    fn grads<const N: usize>(
        &self,
        inputs: [&Tensor; N],
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; N]> {
        let grads = (self.backward)(&inputs, out, grad)?;
        grads.try_into().map_err(|_| candle_core::Error::Msg(format!("{}: wrong number of gradients", self.name)))
    }
}

impl CustomOp1 for Fused {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        self.cuda()
    }
    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> candle_core::Result<(MetalStorage, Shape)> {
        self.metal()
    }
    fn bwd(&self, a: &Tensor, out: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let [ga] = self.grads([a], out, grad)?;
        Ok(ga)
    }
}

impl CustomOp2 for Fused {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.cuda()
    }
    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        self.metal()
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let [ga, gb] = self.grads([a, b], out, grad)?;
        Ok((ga, gb))
    }
}

impl CustomOp3 for Fused {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.cuda()
    }
    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        self.metal()
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [ga, gb, gc] = self.grads([a, b, c], out, grad)?;
        Ok((ga, gb, gc))
    }
}

/// `out`, computed from `inputs` without a graph (on detached inputs), as a differentiable
/// function of `inputs` (one to three) whose gradients `backward(inputs, out, grad_out)` gives.
/// When no input needs a gradient, `out` is returned as it is and nothing is recorded.
pub(crate) fn with_backward(
    name: &'static str,
    inputs: &[&Tensor],
    out: Tensor,
    backward: impl Fn(&[&Tensor], &Tensor, &Tensor) -> candle_core::Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !inputs.iter().any(|t| t.track_op()) {
        return Ok(out);
    }
    record(name, inputs, Output::Tensor(out), Box::new(backward))
}

/// [`with_backward`] for an output that a CPU kernel computed in f32: `values` of `shape`, in
/// `dtype` (converted from f32 when it is another).
pub(crate) fn with_backward_cpu(
    name: &'static str,
    inputs: &[&Tensor],
    values: Vec<f32>,
    shape: impl Into<Shape>,
    dtype: DType,
    backward: impl Fn(&[&Tensor], &Tensor, &Tensor) -> candle_core::Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Result<Tensor> {
    let shape = shape.into();
    if dtype != DType::F32 || !inputs.iter().any(|t| t.track_op()) {
        let out = Tensor::from_vec(values, shape, &candle_core::Device::Cpu)?.to_dtype(dtype)?;
        return with_backward(name, inputs, out, backward);
    }
    record(name, inputs, Output::Cpu(CpuStorage::F32(values), shape), Box::new(backward))
}

/// The graph node of a fused op.
fn record(name: &'static str, inputs: &[&Tensor], out: Output, backward: Backward) -> Result<Tensor> {
    let op = Fused { name, out: Mutex::new(Some(out)), backward };
    Ok(match inputs {
        [a] => a.apply_op1(op)?,
        [a, b] => a.apply_op2(b, op)?,
        [a, b, c] => a.apply_op3(b, c, op)?,
        _ => return Err(crate::Error::Unsupported(format!("{name}: fused ops take one to three inputs"))),
    })
}

/// `grad` if `input` needs a gradient, else `None` without computing it.
pub(crate) fn needed(
    input: &Tensor,
    grad: impl FnOnce() -> candle_core::Result<Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    if input.track_op() {
        grad().map(Some)
    } else {
        Ok(None)
    }
}

/// `f` on the values of CPU tensors as contiguous f32 slices (each converted to a contiguous f32
/// copy first if it is not one already).
pub(crate) fn with_f32_slices<R>(tensors: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> candle_core::Result<R> {
    let f32s = tensors
        .iter()
        .map(|t| if t.dtype() == DType::F32 { Ok((*t).clone()) } else { t.to_dtype(DType::F32) })
        .collect::<candle_core::Result<Vec<_>>>()?;
    with_cpu_slices(&f32s.iter().collect::<Vec<_>>(), f)
}

/// `f` on the values of CPU tensors of element type `T` as contiguous slices (each copied to a
/// contiguous tensor first if it is not one already).
pub(crate) fn with_cpu_slices<T: WithDType, R>(
    tensors: &[&Tensor],
    f: impl FnOnce(&[&[T]]) -> R,
) -> candle_core::Result<R> {
    let owned = tensors.iter().map(|t| t.contiguous()).collect::<candle_core::Result<Vec<_>>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            candle_core::bail!("a CPU kernel was given a tensor on another device")
        };
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("not contiguous after contiguous()".into()))?;
        slices.push(&cpu.as_slice::<T>()?[start..end]);
    }
    Ok(f(&slices))
}

/// `values` (f32, from a CPU kernel) as a tensor shaped and typed like `like`, if `like` needs a
/// gradient.
fn gradient_like(like: &Tensor, values: Vec<f32>) -> candle_core::Result<Option<Tensor>> {
    needed(like, || Tensor::from_vec(values, like.shape(), like.device())?.to_dtype(like.dtype()))
}

/// RMSNorm `y = x / sqrt(mean(x^2) + eps) * w` over the last dimension, computed in f32 (as
/// transformers' `LlamaRMSNorm`), differentiable in `x` (the norm weight `w` is frozen).
///
/// Backward with `r = 1 / sqrt(mean(x^2) + eps)`, `x^ = x r`, `g = dy w`:
/// `dx = r (g - x^ mean(g x^))`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let normalize = move |x: &Tensor| -> candle_core::Result<(Tensor, Tensor)> {
        let x = x.to_dtype(DType::F32)?;
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        Ok((x.broadcast_mul(&r)?, r))
    };
    let (xh, _) = normalize(&x.detach())?;
    let out = xh.to_dtype(dtype)?.broadcast_mul(&w.detach())?;
    let w = w.detach();
    with_backward("rms-norm", &[x], out, move |inputs, _, grad| {
        let (xh, r) = normalize(&inputs[0].detach())?;
        let g = grad.to_dtype(DType::F32)?.broadcast_mul(&w.to_dtype(DType::F32)?)?;
        let mean = (&g * &xh)?.mean_keepdim(D::Minus1)?;
        let dx = g.sub(&xh.broadcast_mul(&mean)?)?.broadcast_mul(&r)?;
        Ok(vec![Some(dx.to_dtype(dtype)?)])
    })
}

/// HF's rotary embedding (`x cos + rotate_half(x) sin`) of `x: (b, h, t, d)` with `cos, sin:
/// (t, d / 2)`. The backward is the inverse rotation: the same op with `-sin`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let out = candle_nn::rotary_emb::rope(&x.detach().contiguous()?, cos, sin)?;
    let (cos, neg_sin) = (cos.clone(), sin.neg()?);
    with_backward("rope", &[x], out, move |_, _, grad| {
        Ok(vec![Some(candle_nn::rotary_emb::rope(&grad.contiguous()?, &cos, &neg_sin)?)])
    })
}

/// SwiGLU's gate `silu(g) * u`. Backward with `s = sigmoid(g)`:
/// `dg = dy u s (1 + g (1 - s))`, `du = dy g s`. On the CPU, one pass of a kernel each way
/// (computed in f32).
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if g.dims() != u.dims() {
        return Err(crate::Error::ShapeMismatch {
            what: "SwiGLU's up projection".into(),
            expected: g.dims().to_vec(),
            actual: u.dims().to_vec(),
        });
    }
    if !g.device().is_cpu() {
        return swiglu_with_candle_ops(g, u);
    }
    let out = with_f32_slices(&[g, u], |x| kernels::swiglu(x[0], x[1]))?;
    with_backward_cpu("swiglu", &[g, u], out, g.shape().clone(), g.dtype(), |inputs, _, grad| {
        let (dg, du) = with_f32_slices(&[inputs[0], inputs[1], grad], |x| kernels::swiglu_backward(x[0], x[1], x[2]))?;
        Ok(vec![gradient_like(inputs[0], dg)?, gradient_like(inputs[1], du)?])
    })
}

/// [`swiglu`] with candle's ops, on any device.
fn swiglu_with_candle_ops(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let out = (candle_nn::ops::silu(&g.detach())? * u.detach())?;
    with_backward("swiglu", &[g, u], out, |inputs, _, grad| {
        let (g, u) = (inputs[0].detach(), inputs[1].detach());
        let s = candle_nn::ops::sigmoid(&g)?;
        let silu = (&g * &s)?;
        let dg = needed(inputs[0], || (grad * &u)?.mul(&(&s * (&g * (1.0 - &s)?)?.affine(1.0, 1.0)?)?))?;
        let du = needed(inputs[1], || grad * &silu)?;
        Ok(vec![dg, du])
    })
}

/// GeGLU's gate with the tanh approximation of GELU (transformers' `gelu_pytorch_tanh`, Gemma's
/// MLP): `gelu(g) * u`, `gelu(g) = g (1 + tanh(a)) / 2`, `a = sqrt(2 / pi) (g + 0.044715 g^3)`.
/// Backward with `t = tanh(a)`: `dg = dy u ((1 + t) / 2 + g (1 - t^2) sqrt(2 / pi)
/// (1 + 3 0.044715 g^2) / 2)`, `du = dy gelu(g)`. Computed in f32.
pub fn geglu_tanh(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    const C: f64 = 0.797_884_560_802_865_4; // sqrt(2 / pi)
    let dtype = g.dtype();
    let gelu_parts = |g: &Tensor| -> candle_core::Result<(Tensor, Tensor)> {
        let g = g.to_dtype(DType::F32)?;
        let t = ((&g + (g.powf(3.0)? * 0.044715)?)? * C)?.tanh()?;
        Ok((((&t + 1.0)? * 0.5)?, t))
    };
    let (half, _) = gelu_parts(&g.detach())?;
    let out = ((g.detach().to_dtype(DType::F32)? * half)? * u.detach().to_dtype(DType::F32)?)?.to_dtype(dtype)?;
    with_backward("geglu-tanh", &[g, u], out, move |inputs, _, grad| {
        let (g, u) = (inputs[0].detach().to_dtype(DType::F32)?, inputs[1].detach().to_dtype(DType::F32)?);
        let (half, t) = gelu_parts(&g)?;
        let grad = grad.to_dtype(DType::F32)?;
        let dg = needed(inputs[0], || {
            let slope = ((g.sqr()? * (3.0 * 0.044715))? + 1.0)?;
            let dgelu = (&half + ((&g * (1.0 - t.sqr()?)?)? * slope)?.affine(0.5 * C, 0.0)?)?;
            (&grad * &u)?.mul(&dgelu)?.to_dtype(dtype)
        })?;
        let du = needed(inputs[1], || (&grad * (&g * &half)?)?.to_dtype(dtype))?;
        Ok(vec![dg, du])
    })
}

/// The most attention scores [`causal_attention`] computes at once (64 MiB in f32): the queries
/// are taken in blocks of rows of that many scores.
pub const ATTENTION_BLOCK: usize = 1 << 24;

/// Causal scaled-dot-product attention `softmax(q k^T / sqrt(d) + causal mask) v` for
/// `q: (b, heads, tq, d)` and `k, v: (b, kv_heads, tk, d)` with `tk >= tq`: the queries are the
/// last `tq` positions (`tk > tq` when earlier keys come from a KV cache), query `i` sees keys
/// `0 ..= i + tk - tq`. Grouped-query attention: query head `i` reads key/value head
/// `i / (heads / kv_heads)`, as transformers' `repeat_kv`. Returns `(b, heads, tq, d)`.
///
/// The queries are processed in blocks of rows, each with only the keys its rows can see,
/// so that at most [`ATTENTION_BLOCK`] scores exist at a time (not `heads * tq * tk`) and the
/// masked half of the scores is mostly never computed. Autograd keeps `q, k, v` and the output;
/// the backward recomputes each block's probabilities `P` and takes `dV = P^T dO`,
/// `dS = P (dO v^T - rowsum(dO o))`, `dQ = dS k / sqrt(d)`, `dK = dS^T q / sqrt(d)` (summed over
/// blocks and over each group's query heads).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    causal_attention_with(q, k, v, Attention::default())
}

/// How [`causal_attention_with`] scores and masks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Attention {
    /// The factor of `q k^T`; `None` is `1 / sqrt(d)`.
    pub scale: Option<f64>,
    /// Sliding-window attention (Mistral, Qwen2's sliding layers, Gemma's local layers): the
    /// query at position `p` sees the `window` keys `p - window < j <= p` (transformers'
    /// `sliding_window_causal_mask_function`, itself included); `None` is every earlier key.
    pub window: Option<usize>,
}

/// [`causal_attention`] with a scale and an optional sliding window (see [`Attention`]); the
/// blocks of query rows then read only the keys inside their rows' windows.
pub fn causal_attention_with(q: &Tensor, k: &Tensor, v: &Tensor, how: Attention) -> Result<Tensor> {
    let shape = attention_shape(q, k, v, how)?;
    if q.device().is_cpu() {
        return causal_attention_cpu(q, k, v, shape);
    }
    let AttentionShape { b, heads, tq, tk, .. } = shape;
    // A block of `n` rows reads at most `n + window - 1` keys: with `n <= window`, at most twice
    // the window's.
    let (keys_per_row, most_rows) = match how.window {
        Some(w) => (2 * w.min(tk), w),
        None => (tk, tq),
    };
    let rows = (ATTENTION_BLOCK / (b * heads * keys_per_row).max(1)).clamp(1, most_rows.clamp(1, tq.max(1)));
    causal_attention_in_blocks(q, k, v, how, rows)
}

/// The shapes of an attention call, checked, with its scale and window.
fn attention_shape(q: &Tensor, k: &Tensor, v: &Tensor, how: Attention) -> Result<AttentionShape> {
    let (b, heads, tq, d) = q.dims4()?;
    let (kv, tk) = (k.dim(1)?, k.dim(2)?);
    if kv == 0 || heads % kv != 0 || tk < tq || k.dims() != v.dims() || k.dims() != [b, kv, tk, d] {
        return Err(crate::Error::ShapeMismatch {
            what: "attention keys/values".into(),
            expected: vec![b, kv, tk.max(tq), d],
            actual: v.dims().to_vec(),
        });
    }
    if how.window == Some(0) {
        return Err(crate::Error::Unsupported("a sliding window of 0 keys: every query sees at least itself".into()));
    }
    let scale = how.scale.unwrap_or(1.0 / (d as f64).sqrt()) as f32;
    Ok(AttentionShape { b, heads, kv, tq, tk, d, scale, window: how.window.unwrap_or(usize::MAX) })
}

/// [`causal_attention_with`] by the CPU kernels: per head, in blocks of query rows; the
/// backward pass recomputes the probabilities from each row's `logsumexp`, kept from the forward
/// pass (`b * heads * tq` values).
fn causal_attention_cpu(q: &Tensor, k: &Tensor, v: &Tensor, shape: AttentionShape) -> Result<Tensor> {
    let (out, lse) = with_f32_slices(&[q, k, v], |x| kernels::attention(x[0], x[1], x[2], shape))?;
    with_backward_cpu("causal-attention", &[q, k, v], out, q.shape().clone(), q.dtype(), move |inputs, out, grad| {
        let (dq, dk, dv) = with_f32_slices(&[inputs[0], inputs[1], inputs[2], out, grad], |x| {
            kernels::attention_backward(x[0], x[1], x[2], x[3], &lse, x[4], shape)
        })?;
        Ok(vec![gradient_like(inputs[0], dq)?, gradient_like(inputs[1], dk)?, gradient_like(inputs[2], dv)?])
    })
}

/// [`rope`] and [`causal_attention_with`] on the projections' layout, as one graph node, by the
/// CPU kernels: `q: (b, t, heads * d)`, `k, v: (b, t, kv * d)`, `cos, sin: (t, d / 2)`, `[heads,
/// kv]`; returns `(b, t, heads * d)`, what `rope` and `causal_attention_with` give on `(b, heads,
/// t, d)` views of the projections, with the transposes around them. The kernels rotate and
/// transpose into the heads-first layout in one pass (and back for the gradients, with the
/// inverse rotation), and the backward pass recomputes those copies: autograd keeps `q`, `k`,
/// `v` and the output, and no reshape, transpose or rotation node, each of which costs a
/// gradient buffer, zeroed and added to, in candle's backward pass.
pub fn rope_attention_cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    [heads, kv]: [usize; 2],
    how: Attention,
) -> Result<Tensor> {
    let (b, t, width) = q.dims3()?;
    let d = width / heads.max(1);
    if heads == 0 || kv == 0 || width != heads * d || d % 2 == 1 {
        return Err(crate::Error::Unsupported(format!(
            "attention over {heads} heads of {width} query values: expected a positive, even head size"
        )));
    }
    let view =
        |x: &Tensor, n: usize| -> candle_core::Result<Tensor> { x.detach().reshape((b, t, n, d))?.transpose(1, 2) };
    let shape = attention_shape(&view(q, heads)?, &view(k, kv)?, &view(v, kv)?, how)?;
    if cos.dims() != [t, d / 2] || sin.dims() != [t, d / 2] {
        return Err(crate::Error::ShapeMismatch {
            what: "RoPE's cos / sin tables".into(),
            expected: vec![t, d / 2],
            actual: cos.dims().to_vec(),
        });
    }
    let (cos, sin) = with_f32_slices(&[cos, sin], |x| (x[0].to_vec(), x[1].to_vec()))?;
    // The rotated, heads-first q and k and the heads-first v.
    let inputs = move |x: &[&[f32]], rotation: kernels::Rotation| {
        (
            kernels::heads_first(x[0], [b, t, heads, d], Some(rotation)),
            kernels::heads_first(x[1], [b, t, kv, d], Some(rotation)),
            kernels::heads_first(x[2], [b, t, kv, d], None),
        )
    };
    let (out, lse) = with_f32_slices(&[q, k, v], |x| {
        let (q, k, v) = inputs(x, kernels::Rotation { cos: &cos, sin: &sin, sign: 1.0 });
        let (out, lse) = kernels::attention(&q, &k, &v, shape);
        (kernels::tokens_first(&out, [b, heads, t, d], None), lse)
    })?;
    with_backward_cpu("rope-attention", &[q, k, v], out, q.shape().clone(), q.dtype(), move |x, out, grad| {
        let (dq, dk, dv) = with_f32_slices(&[x[0], x[1], x[2], out, grad], |x| {
            let rotation = kernels::Rotation { cos: &cos, sin: &sin, sign: 1.0 };
            let (q, k, v) = inputs(x, rotation);
            let out = kernels::heads_first(x[3], [b, t, heads, d], None);
            let dout = kernels::heads_first(x[4], [b, t, heads, d], None);
            let (dq, dk, dv) = kernels::attention_backward(&q, &k, &v, &out, &lse, &dout, shape);
            let inverse = Some(kernels::Rotation { sign: -1.0, ..rotation });
            (
                kernels::tokens_first(&dq, [b, heads, t, d], inverse),
                kernels::tokens_first(&dk, [b, kv, t, d], inverse),
                kernels::tokens_first(&dv, [b, kv, t, d], None),
            )
        })?;
        Ok(vec![gradient_like(x[0], dq)?, gradient_like(x[1], dk)?, gradient_like(x[2], dv)?])
    })
}

/// [`causal_attention_with`] for a left-padded batch, for inference (no gradient): the keys
/// before `starts[i]` of batch row `i` are its padding, which the row's other queries do not see
/// (a padding query sees the padding before it, so that no query row is empty). RoPE is
/// relative, so the row's tokens attend to each other as they would unpadded.
pub fn padded_attention(q: &Tensor, k: &Tensor, v: &Tensor, how: Attention, starts: &[usize]) -> Result<Tensor> {
    let AttentionShape { b, heads, kv, tq, tk, d, window, .. } = attention_shape(q, k, v, how)?;
    if starts.len() != b {
        return Err(crate::Error::ShapeMismatch {
            what: "padding starts (one per batch row)".into(),
            expected: vec![b],
            actual: vec![starts.len()],
        });
    }
    let group = heads / kv;
    let scale = how.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let dtype = q.dtype();
    let q = q.detach().contiguous()?.reshape((b, kv, group * tq, d))?;
    let scores = (q.matmul(&k.detach().contiguous()?.t()?)? * scale)?.to_dtype(DType::F32)?;
    let mask: Vec<f32> = starts
        .iter()
        .flat_map(|&start| {
            (0..tq).flat_map(move |i| {
                let p = i + tk - tq;
                (0..tk).map(move |j| {
                    let hidden = j > p || p - j >= window || (p >= start && j < start);
                    if hidden {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (b, 1, 1, tq, tk), q.device())?;
    let scores = scores.reshape((b, kv, group, tq, tk))?.broadcast_add(&mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?.reshape((b, kv, group * tq, tk))?;
    Ok(probs.matmul(&v.detach().contiguous()?)?.reshape((b, heads, tq, d))?)
}

/// [`causal_attention_with`] with candle's ops (any device), in blocks of `rows` query rows.
fn causal_attention_in_blocks(q: &Tensor, k: &Tensor, v: &Tensor, how: Attention, rows: usize) -> Result<Tensor> {
    let AttentionShape { b, heads, kv, tq, tk, d, window, .. } = attention_shape(q, k, v, how)?;
    let group = heads / kv;
    let scale = how.scale.unwrap_or(1.0 / (d as f64).sqrt());
    // Blocks of query rows: (first row, rows, first key the first row sees, keys up to the
    // one the last row sees). Query row `i` is at position `i + tk - tq`.
    let blocks: Vec<(usize, usize, usize, usize)> = (0..tq)
        .step_by(rows)
        .map(|r0| {
            let n = rows.min(tq - r0);
            (r0, n, (r0 + tk - tq + 1).saturating_sub(window), r0 + n + tk - tq)
        })
        .collect();
    // Rows `r0..r0 + n` of a `(b, heads, tq, d)` tensor, grouped by key/value head:
    // `(b, kv, group * n, d)`.
    let rows_of = move |x: &Tensor, r0: usize, n: usize| {
        x.reshape((b, kv, group, tq, d))?.narrow(3, r0, n)?.contiguous()?.reshape((b, kv, group * n, d))
    };
    let probs = move |qb: &Tensor, kb: &Tensor, r0: usize, n: usize, k0: usize| -> candle_core::Result<Tensor> {
        let dtype = qb.dtype();
        let m = kb.dim(2)?;
        let scores = (qb.matmul(&kb.t()?)? * scale)?.to_dtype(DType::F32)?.reshape((b, kv, group, n, m))?;
        let mask: Vec<f32> = (r0..r0 + n)
            .flat_map(|i| {
                let p = i + tk - tq;
                (k0..k0 + m).map(move |j| if j > p || p - j >= window { f32::NEG_INFINITY } else { 0.0 })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (n, m), qb.device())?;
        let p = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
        p.to_dtype(dtype)?.reshape((b, kv, group * n, m))
    };
    let keys = move |x: &Tensor, k0: usize, m: usize| x.detach().narrow(2, k0, m - k0)?.contiguous();
    let (qd, kd, vd) = (q.detach().contiguous()?, k.detach(), v.detach());
    let mut parts = Vec::with_capacity(blocks.len());
    for &(r0, n, k0, m) in &blocks {
        let o = probs(&rows_of(&qd, r0, n)?, &keys(&kd, k0, m)?, r0, n, k0)?.matmul(&keys(&vd, k0, m)?)?;
        parts.push(o.reshape((b, kv, group, n, d))?);
    }
    let out = Tensor::cat(&parts, 3)?.reshape((b, heads, tq, d))?;
    drop(parts);
    with_backward("causal-attention", &[q, k, v], out, move |inputs, out, grad| {
        let (q, k, v) = (inputs[0].detach().contiguous()?, inputs[1].detach(), inputs[2].detach());
        let (grad, out) = (grad.contiguous()?, out.detach().contiguous()?);
        // A block's key gradient `(.., m - k0, d)` placed at keys `k0..m` of `tk`.
        let pad = |x: Tensor, k0: usize, m: usize| {
            if k0 == 0 && m == tk {
                Ok(x)
            } else {
                x.pad_with_zeros(2, k0, tk - m)
            }
        };
        let (mut dq_parts, mut dk, mut dv) = (Vec::with_capacity(blocks.len()), None::<Tensor>, None::<Tensor>);
        let add = |acc: Option<Tensor>, x: Tensor| -> candle_core::Result<Option<Tensor>> {
            Ok(Some(match acc {
                Some(a) => (a + x)?,
                None => x,
            }))
        };
        for &(r0, n, k0, m) in &blocks {
            let (qb, kb, vb) = (rows_of(&q, r0, n)?, keys(&k, k0, m)?, keys(&v, k0, m)?);
            let p = probs(&qb, &kb, r0, n, k0)?;
            let dout = rows_of(&grad, r0, n)?;
            if inputs[2].track_op() {
                dv = add(dv, pad(p.t()?.matmul(&dout)?, k0, m)?)?;
            }
            let rowsum = (&dout * rows_of(&out, r0, n)?)?.sum_keepdim(D::Minus1)?;
            let ds = (p * dout.matmul(&vb.t()?)?.broadcast_sub(&rowsum)?)?;
            if inputs[0].track_op() {
                dq_parts.push((ds.matmul(&kb)? * scale)?.reshape((b, kv, group, n, d))?);
            }
            if inputs[1].track_op() {
                dk = add(dk, pad((ds.t()?.matmul(&qb)? * scale)?, k0, m)?)?;
            }
        }
        let dq = if dq_parts.is_empty() { None } else { Some(Tensor::cat(&dq_parts, 3)?.reshape((b, heads, tq, d))?) };
        Ok(vec![dq, dk, dv])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Max |a - b| over all elements.
    fn diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Checks a fused op against the same math written with differentiable candle ops: the
    /// outputs and the gradients of every input under a random linear functional of the output
    /// (gradients within 1e-4 of the reference's largest value, or 1e-4 when that is below 1:
    /// sums over thousands of rows carry f32 rounding of their size).
    fn check(inputs: &[Var], fused: impl Fn(&[Tensor]) -> Result<Tensor>, plain: impl Fn(&[Tensor]) -> Result<Tensor>) {
        let xs: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let (y, y_ref) = (fused(&xs).unwrap(), plain(&xs).unwrap());
        assert!(diff(&y, &y_ref) < 1e-5, "forward differs by {}", diff(&y, &y_ref));
        let probe = Tensor::randn(0f32, 1., y.shape(), y.device()).unwrap();
        let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (&y_ref * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in inputs.iter().enumerate() {
            let (a, b) = (g.get(v.as_tensor()).unwrap(), g_ref.get(v.as_tensor()).unwrap());
            let size = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1.0);
            assert!(diff(a, b) < 1e-4 * size, "gradient of input {i} differs by {} (largest value {size})", diff(a, b));
        }
    }

    fn var(shape: &[usize]) -> Var {
        Var::randn(0f32, 1., shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn rms_norm_rope_and_swiglu_match_autograd() {
        let w = Tensor::randn(0f32, 1., 8, &Device::Cpu).unwrap();
        let w2 = w.clone();
        check(
            &[var(&[2, 3, 8])],
            |x| rms_norm(&x[0], &w, 1e-6),
            move |x| {
                let r = (x[0].sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?.recip()?;
                Ok(x[0].broadcast_mul(&r)?.broadcast_mul(&w2)?)
            },
        );

        let angles = Tensor::randn(0f32, 1., (5, 4), &Device::Cpu).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let (c2, s2) = (Tensor::cat(&[&cos, &cos], 1).unwrap(), Tensor::cat(&[&sin, &sin], 1).unwrap());
        check(
            &[var(&[2, 3, 5, 8])],
            |x| rope(&x[0], &cos, &sin),
            move |x| {
                let (x1, x2) = (x[0].narrow(D::Minus1, 0, 4)?, x[0].narrow(D::Minus1, 4, 4)?);
                let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
                Ok((x[0].broadcast_mul(&c2)? + rotated.broadcast_mul(&s2)?)?)
            },
        );

        check(&[var(&[4, 6]), var(&[4, 6])], |x| swiglu(&x[0], &x[1]), |x| Ok((candle_nn::ops::silu(&x[0])? * &x[1])?));
        // candle's gelu is the tanh approximation, as transformers' gelu_pytorch_tanh.
        check(&[var(&[4, 6]), var(&[4, 6])], |x| geglu_tanh(&x[0], &x[1]), |x| Ok((x[0].gelu()? * &x[1])?));
    }

    /// Against transformers' eager attention (repeat_kv, scores, mask, softmax), with the
    /// causal mask and with sliding windows of 1, 2 and 3 keys (`0 <= i - j < window`, as
    /// transformers' `sliding_window_causal_mask_function`), at the default and another scale.
    #[test]
    fn grouped_causal_attention_matches_autograd() {
        let (b, heads, kv, t, d) = (2, 6, 2, 5, 4);
        for (window, scale) in [(None, None), (Some(1), None), (Some(2), Some(0.3)), (Some(3), None)] {
            check(
                &[var(&[b, heads, t, d]), var(&[b, kv, t, d]), var(&[b, kv, t, d])],
                |x| causal_attention_with(&x[0], &x[1], &x[2], Attention { scale, window }),
                move |x| {
                    let repeat = |x: &Tensor| -> Result<Tensor> {
                        Ok(x.unsqueeze(2)?.broadcast_as((b, kv, heads / kv, t, d))?.reshape((b, heads, t, d))?)
                    };
                    let (k, v) = (repeat(&x[1])?, repeat(&x[2])?);
                    let w = window.unwrap_or(t);
                    let mask: Vec<f32> = (0..t)
                        .flat_map(|i| (0..t).map(move |j| if j > i || i - j >= w { f32::NEG_INFINITY } else { 0.0 }))
                        .collect();
                    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu)?;
                    let scale = scale.unwrap_or(1.0 / (d as f64).sqrt());
                    let scores = (x[0].matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
                    Ok(candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)?)
                },
            );
        }
    }

    /// Blocks of 1, 2 and 3 query rows, with and without earlier keys from a cache (`tk > tq`)
    /// and sliding windows: the same outputs and gradients as one block.
    #[test]
    fn attention_in_blocks_of_rows_matches_one_block() {
        let (b, heads, kv, d) = (2, 6, 3, 4);
        for (tq, tk) in [(5, 5), (3, 7)] {
            for window in [None, Some(2), Some(4)] {
                let how = Attention { window, scale: None };
                for rows in [1, 2, 3] {
                    check(
                        &[var(&[b, heads, tq, d]), var(&[b, kv, tk, d]), var(&[b, kv, tk, d])],
                        |x| causal_attention_in_blocks(&x[0], &x[1], &x[2], how, rows),
                        |x| causal_attention_in_blocks(&x[0], &x[1], &x[2], how, tq),
                    );
                }
            }
        }
    }

    /// The CPU kernels against the same ops written with candle's (the path of other devices):
    /// attention across blocks of query rows (150 rows: 64 + 64 + 22), with earlier keys from a
    /// cache, sliding windows and grouped heads; SwiGLU; and both in bf16.
    #[test]
    fn cpu_kernels_match_candle_ops() {
        let (b, heads, kv, d) = (2, 6, 2, 8);
        for (tq, tk) in [(150, 150), (3, 70), (1, 9)] {
            for window in [None, Some(1), Some(5), Some(100)] {
                let how = Attention { window, scale: if window == Some(5) { Some(0.2) } else { None } };
                check(
                    &[var(&[b, heads, tq, d]), var(&[b, kv, tk, d]), var(&[b, kv, tk, d])],
                    |x| causal_attention_cpu(&x[0], &x[1], &x[2], attention_shape(&x[0], &x[1], &x[2], how)?),
                    |x| causal_attention_in_blocks(&x[0], &x[1], &x[2], how, tq),
                );
            }
        }
        check(
            &[var(&[3, 5, 1000]), var(&[3, 5, 1000])],
            |x| swiglu(&x[0], &x[1]),
            |x| swiglu_with_candle_ops(&x[0], &x[1]),
        );

        // bf16 inputs: computed in f32 by the kernels and rounded once, so within bf16's rounding
        // (2^-8 relative) of candle's ops on the same values in f32.
        let bf16 = |x: &Var| x.as_tensor().to_dtype(DType::BF16).unwrap();
        let f32 = |x: &Var| bf16(x).to_dtype(DType::F32).unwrap();
        let rounding = |y: &Tensor, exact: &Tensor| {
            let y = y.to_dtype(DType::F32).unwrap();
            ((&y - exact).unwrap().abs().unwrap() - (exact.abs().unwrap() / 256.0).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let (q, k, v) = (var(&[1, 4, 20, 8]), var(&[1, 2, 20, 8]), var(&[1, 2, 20, 8]));
        let y = causal_attention(&bf16(&q), &bf16(&k), &bf16(&v)).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let exact = causal_attention_in_blocks(&f32(&q), &f32(&k), &f32(&v), Attention::default(), 20).unwrap();
        let err = rounding(&y, &exact);
        assert!(err < 1e-6, "bf16 attention is off by {err} more than bf16's rounding");
        let (g, u) = (var(&[4, 100]), var(&[4, 100]));
        let y = swiglu(&bf16(&g), &bf16(&u)).unwrap();
        let err = rounding(&y, &swiglu_with_candle_ops(&f32(&g), &f32(&u)).unwrap());
        assert!(err < 1e-6, "bf16 SwiGLU is off by {err} more than bf16's rounding");
        // Mismatched shapes are an error, not a panic.
        assert!(swiglu(g.as_tensor(), &Tensor::zeros((4, 99), DType::F32, &Device::Cpu).unwrap()).is_err());
    }

    /// RoPE and attention on the projections' layout (grouped heads, a window, a scale) against
    /// the composite of the ops tested above.
    #[test]
    fn rope_attention_matches_the_composite() {
        let (b, t, heads, kv, d) = (2, 70, 6, 2, 8);
        let cos = Tensor::randn(0f32, 1., (t, d / 2), &Device::Cpu).unwrap();
        let sin = Tensor::randn(0f32, 1., (t, d / 2), &Device::Cpu).unwrap();
        for window in [None, Some(5)] {
            let how = Attention { window, scale: window.map(|_| 0.2) };
            let (c, s) = (cos.clone(), sin.clone());
            check(
                &[var(&[b, t, heads * d]), var(&[b, t, kv * d]), var(&[b, t, kv * d])],
                |x| rope_attention_cpu(&x[0], &x[1], &x[2], (&cos, &sin), [heads, kv], how),
                move |x| {
                    let first = |y: &Tensor, n: usize| y.reshape((b, t, n, d))?.transpose(1, 2);
                    let q = rope(&first(&x[0], heads)?, &c, &s)?;
                    let k = rope(&first(&x[1], kv)?, &c, &s)?;
                    let y = causal_attention_in_blocks(&q, &k, &first(&x[2], kv)?, how, t)?;
                    Ok(y.transpose(1, 2)?.reshape((b, t, heads * d))?)
                },
            );
        }
        // A head size that does not divide the width, and tables of the wrong length: errors.
        let x = Tensor::zeros((1, 4, 10), DType::F32, &Device::Cpu).unwrap();
        assert!(rope_attention_cpu(&x, &x, &x, (&cos, &sin), [3, 1], Attention::default()).is_err());
        let x = Tensor::zeros((1, 4, 16), DType::F32, &Device::Cpu).unwrap();
        assert!(rope_attention_cpu(&x, &x, &x, (&cos, &sin), [2, 2], Attention::default()).is_err());
    }

    #[test]
    fn low_rank_linear_matches_autograd_and_skips_frozen_gradients() {
        let w = Tensor::randn(0f32, 1., (7, 5), &Device::Cpu).unwrap();
        let bias = Tensor::randn(0f32, 1., 7, &Device::Cpu).unwrap();
        let (w2, b2) = (w.clone(), bias.clone());
        let frozen = crate::frozen::FrozenWeight::from(w.clone());
        check(
            &[var(&[2, 3, 5]), var(&[2, 3, 2]), var(&[7, 2])],
            |x| crate::frozen::low_rank_linear(&x[0], &frozen, Some(&bias), &x[1], &x[2]),
            move |x| {
                let base = x[0].broadcast_matmul(&w2.t()?)?.broadcast_add(&b2)?;
                Ok((base + x[1].broadcast_matmul(&x[2].t()?)?)?)
            },
        );
        // A frozen tail (RandLoRA's basis) and an input that needs no gradient get none.
        let (x, h, tail) =
            (Tensor::randn(0f32, 1., (3, 5), &Device::Cpu).unwrap(), var(&[3, 2]), w.narrow(1, 0, 2).unwrap());
        let y = crate::frozen::low_rank_linear(&x, &frozen, None, h.as_tensor(), &tail).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(h.as_tensor()).is_some());
        assert!(g.get(&tail).is_none() && g.get(&x).is_none() && g.get(&w).is_none());
    }

    #[test]
    fn lora_linear_matches_autograd() {
        let w = Tensor::randn(0f32, 1., (7, 5), &Device::Cpu).unwrap();
        let bias = Tensor::randn(0f32, 1., 7, &Device::Cpu).unwrap();
        let (w2, b2) = (w.clone(), bias.clone());
        let frozen = crate::frozen::FrozenWeight::from(w.clone());
        check(
            &[var(&[2, 3, 5]), var(&[2, 5]), var(&[7, 2])],
            |x| crate::frozen::lora_linear(&x[0], &frozen, Some(&bias), &x[1], &x[2], 0.7),
            move |x| {
                let base = x[0].broadcast_matmul(&w2.t()?)?.broadcast_add(&b2)?;
                let head = (x[0].broadcast_matmul(&x[1].t()?)? * 0.7)?;
                Ok((base + head.broadcast_matmul(&x[2].t()?)?)?)
            },
        );
    }

    /// DoRA's node against autograd through the composite `g (x W^T + s (x A^T) B^T) + b`: the
    /// CPU kernels (f32; 3000 rows, over several tasks), candle's ops (f64), and a `g` with a
    /// zero (the products computed again in the backward pass).
    #[test]
    fn dora_linear_matches_autograd() {
        let w = Tensor::randn(0f32, 1., (7, 5), &Device::Cpu).unwrap();
        let bias = Tensor::randn(0f32, 1., 7, &Device::Cpu).unwrap();
        let with_zero = Tensor::new(&[1.5f32, 0., -0.5, 2., 1., 0.3, 0.7], &Device::Cpu).unwrap();
        for (rows, dtype, zero) in
            [(3, DType::F32, false), (1500, DType::F32, false), (3, DType::F64, false), (3, DType::F32, true)]
        {
            let frozen = crate::frozen::FrozenWeight::from(w.to_dtype(dtype).unwrap());
            let bias_d = bias.to_dtype(dtype).unwrap();
            let g = if zero { Var::from_tensor(&with_zero).unwrap() } else { var(&[7]) };
            let (w2, b2) = (w.clone(), bias.clone());
            check(
                &[var(&[2, rows, 5]), var(&[2, 5]), var(&[7, 2]), g],
                move |x| {
                    let t = |i: usize| x[i].to_dtype(dtype);
                    let y = crate::frozen::dora_linear(&t(0)?, &frozen, Some(&bias_d), &t(1)?, &t(2)?, &t(3)?, 0.7)?;
                    Ok(y.to_dtype(DType::F32)?)
                },
                move |x| {
                    let base = x[0].broadcast_matmul(&w2.t()?)?;
                    let head = (x[0].broadcast_matmul(&x[1].t()?)? * 0.7)?;
                    Ok((base + head.broadcast_matmul(&x[2].t()?)?)?.broadcast_mul(&x[3])?.broadcast_add(&b2)?)
                },
            );
        }
    }

    /// VeRA's node against autograd through PEFT's form `x W^T + b + l ((d (x A^T)) B^T)`, with
    /// `A` and `B` strided views of larger shared matrices, as VeRA's are.
    #[test]
    fn vera_linear_matches_autograd() {
        let w = Tensor::randn(0f32, 1., (7, 5), &Device::Cpu).unwrap();
        let bias = Tensor::randn(0f32, 1., 7, &Device::Cpu).unwrap();
        let shared_a = Tensor::randn(0f32, 1., (4, 9), &Device::Cpu).unwrap();
        let shared_b = Tensor::randn(0f32, 1., (8, 6), &Device::Cpu).unwrap();
        let (a, b) = (
            shared_a.narrow(0, 0, 3).unwrap().narrow(1, 0, 5).unwrap(),
            shared_b.narrow(0, 0, 7).unwrap().narrow(1, 0, 3).unwrap(),
        );
        let frozen = crate::frozen::FrozenWeight::from(w.clone());
        // The reference multiplies copies: the `mkl` build's products take no strided view.
        let (w2, b2, a2, bb2) = (w.clone(), bias.clone(), a.contiguous().unwrap(), b.contiguous().unwrap());
        check(
            &[var(&[2, 3, 5]), var(&[3]), var(&[7])],
            |x| crate::frozen::vera_linear(&x[0], &frozen, Some(&bias), &a, &b, &x[1], &x[2]),
            move |x| {
                let base = x[0].broadcast_matmul(&w2.t()?)?.broadcast_add(&b2)?;
                let h = x[0].broadcast_matmul(&a2.t()?)?.broadcast_mul(&x[1])?;
                Ok((base + h.broadcast_matmul(&bb2.t()?)?.broadcast_mul(&x[2])?)?)
            },
        );
    }
}
