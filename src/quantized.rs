//! A frozen weight kept quantized in memory (QLoRA, Dettmers et al. 2023, "QLoRA: Efficient
//! Finetuning of Quantized LLMs", over llama.cpp's GGUF block types instead of NF4).
//!
//! ```text
//! forward   y  = x deq(W)^T            one block of rows of W dequantized at a time
//! backward  dx = dy deq(W)             the same blocks again; no gradient for W
//! ```
//! The weight is stored as consecutive blocks of rows, each a candle [`QTensor`] of the file's
//! own type. A block is dequantized (to f32, then to the compute dtype) just before its matmul
//! and dropped after it, so no more than [`BLOCK_ELEMS`] dequantized values exist at a time and
//! the whole dequantized matrix never does. The products are those of the dequantized f32
//! weight, exactly: candle's quantized matmul would be faster but quantizes the activations to
//! 8 bits as well, which changes the loss by up to about 1e-3 (see the README's QLoRA section).
//! GGUF quantizes within a row, so splitting by rows is exact.
//!
//! A bf16 weight computed in f32 on the CPU (`--base-quant bf16`: the frozen base in half the
//! memory of f32, at f32's speed) is one block that the CPU kernels multiply directly, widening
//! a cache-sized tile of it at a time (`kernels::matmul_nt_bf16`).

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use half::bf16;

use crate::fused::{with_backward, with_f32_slices};
use crate::kernels;
use crate::{Error, Result};

/// The most values of one dequantized block of rows (4 MiB in f32).
pub const BLOCK_ELEMS: usize = 1 << 20;

/// How the frozen base of a model is held in memory (the loaders' `base_quant`, the CLI's
/// `--base-quant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaseQuant {
    /// Every weight dequantized to the load dtype (today's path).
    #[default]
    None,
    /// A GGUF file's linears and embeddings kept in the file's own types.
    Keep,
    /// The linears and embeddings quantized to this type on load (from an HF safetensors base, or
    /// from a GGUF's dequantized values); see [`fallback_type`] for rows the type cannot hold.
    To(GgmlDType),
}

impl BaseQuant {
    /// The type to quantize to on load, for [`BaseQuant::To`].
    pub fn target(self) -> Option<GgmlDType> {
        match self {
            Self::To(t) => Some(t),
            Self::None | Self::Keep => None,
        }
    }
}

/// The type names `--base-quant` accepts besides `none` and `keep`, as llama.cpp spells them.
pub const QUANT_TYPES: [(&str, GgmlDType); 13] = [
    ("f32", GgmlDType::F32),
    ("f16", GgmlDType::F16),
    ("bf16", GgmlDType::BF16),
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q8_0", GgmlDType::Q8_0),
    ("q2_k", GgmlDType::Q2K),
    ("q3_k", GgmlDType::Q3K),
    ("q4_k", GgmlDType::Q4K),
    ("q5_k", GgmlDType::Q5K),
    ("q6_k", GgmlDType::Q6K),
];

/// llama.cpp's name of a GGUF type (`q4_k`, ...).
pub fn type_name(t: GgmlDType) -> &'static str {
    QUANT_TYPES.iter().find(|(_, q)| *q == t).map_or(
        match t {
            GgmlDType::Q8_1 => "q8_1",
            _ => "q8_k",
        },
        |(n, _)| n,
    )
}

impl FromStr for BaseQuant {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        match lower.as_str() {
            "none" => return Ok(Self::None),
            "keep" => return Ok(Self::Keep),
            _ => {}
        }
        QUANT_TYPES.iter().find(|(n, _)| *n == lower).map(|(_, t)| Self::To(*t)).ok_or_else(|| {
            let names: Vec<&str> = QUANT_TYPES.iter().map(|(n, _)| *n).collect();
            Error::config(
                "base_quant",
                format!("unknown base quantization \"{s}\"; expected none, keep or one of {}", names.join(", ")),
            )
        })
    }
}

/// The type a tensor with rows of `cols` values gets when `wanted` is asked for: `wanted`
/// itself when `cols` is a multiple of its block size, else llama.cpp's fallback for
/// K-quants (`llama-quant.cpp`: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; Q2_K and Q3_K go to
/// IQ4_NL there, which candle lacks, so Q4_0 here), and F16 for rows that no block type fits.
pub fn fallback_type(wanted: GgmlDType, cols: usize) -> GgmlDType {
    if cols % wanted.block_size() == 0 {
        return wanted;
    }
    let next = match wanted {
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K | GgmlDType::Q8K => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    };
    fallback_type(next, cols)
}

/// A frozen `(out, in)` weight held as quantized blocks of rows (see the module docs).
pub struct QuantizedWeight {
    blocks: Vec<QTensor>,
    rows_per_block: usize,
    out: usize,
    inp: usize,
    ggml: GgmlDType,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for QuantizedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantizedWeight[({}, {}); {}; {} blocks]",
            self.out,
            self.inp,
            type_name(self.ggml),
            self.blocks.len()
        )
    }
}

impl QuantizedWeight {
    /// The weight of a 2-D `q` (e.g. a GGUF tensor), its rows reordered by `row_order` (row `i`
    /// of the result is row `row_order[i]` of `q`) when given, computed in `dtype`.
    pub fn new(q: &QTensor, row_order: Option<&[usize]>, dtype: DType) -> Result<Self> {
        let (out, inp) = q.shape().dims2()?;
        let ggml = q.dtype();
        if out == 0 || inp == 0 {
            return Err(Error::Unsupported(format!("a quantized weight of shape ({out}, {inp}): no size may be 0")));
        }
        if let Some(order) = row_order {
            if order.len() != out || order.iter().any(|&r| r >= out) {
                return Err(Error::Unsupported(format!(
                    "a row order of {} rows for a weight of {out} rows",
                    order.len()
                )));
            }
        }
        let row_bytes = inp / ggml.block_size() * ggml.type_size();
        let data = q.data()?;
        if data.len() != out * row_bytes {
            return Err(Error::Unsupported(format!(
                "a quantized ({out}, {inp}) {} tensor of {} bytes; expected {}",
                type_name(ggml),
                data.len(),
                out * row_bytes
            )));
        }
        let device = q.device();
        // bf16 on the CPU with f32 products: one block, which the CPU kernels widen a tile at a
        // time themselves (see `with_bf16_values`).
        let rows_per_block =
            if Self::cpu_kernels(ggml, dtype, &device) { out } else { (BLOCK_ELEMS / inp).clamp(1, out) };
        let blocks = (0..out)
            .step_by(rows_per_block)
            .map(|r0| {
                let rows = rows_per_block.min(out - r0);
                gather_rows(rows, inp, ggml, &device, |i| {
                    let src = row_order.map_or(r0 + i, |o| o[r0 + i]);
                    &data[src * row_bytes..(src + 1) * row_bytes]
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { blocks, rows_per_block, out, inp, ggml, dtype, device })
    }

    /// The whole weight as one `(out, in)` [`QTensor`] of its own type, the stored bytes
    /// unchanged (no dequantization), its rows reordered by `row_order` (row `i` of the result
    /// is row `row_order[i]` of the weight) when given: for writing it to a file as it is.
    pub fn to_qtensor(&self, row_order: Option<&[usize]>) -> Result<QTensor> {
        if let Some(order) = row_order {
            if order.len() != self.out || order.iter().any(|&r| r >= self.out) {
                return Err(Error::Unsupported(format!(
                    "a row order of {} rows for a weight of {} rows",
                    order.len(),
                    self.out
                )));
            }
        }
        let row_bytes = self.inp / self.ggml.block_size() * self.ggml.type_size();
        let data: Vec<Cow<'_, [u8]>> = self.blocks.iter().map(QTensor::data).collect::<candle_core::Result<_>>()?;
        gather_rows(self.out, self.inp, self.ggml, &self.device, |i| {
            let src = row_order.map_or(i, |o| o[i]);
            let (b, r) = (src / self.rows_per_block, src % self.rows_per_block);
            &data[b][r * row_bytes..(r + 1) * row_bytes]
        })
    }

    /// `w` quantized to `wanted` (or to [`fallback_type`] when its rows do not fit `wanted`'s
    /// blocks), computed in `dtype`.
    pub fn quantize(w: &Tensor, wanted: GgmlDType, dtype: DType) -> Result<Self> {
        let (_, inp) = w.dims2()?;
        if matches!(wanted, GgmlDType::Q8_1 | GgmlDType::Q8K) {
            return Err(Error::Unsupported(format!(
                "{} is an activation type; pick a weight type such as q8_0",
                type_name(wanted)
            )));
        }
        let q = QTensor::quantize(&w.to_dtype(DType::F32)?, fallback_type(wanted, inp))?;
        Self::new(&q, None, dtype)
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// The GGUF type the weight is stored in.
    pub fn ggml_dtype(&self) -> GgmlDType {
        self.ggml
    }

    /// The dtype products are computed in (the dequantized blocks', the input's and output's).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weight lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes held (the quantized blocks).
    pub fn storage_bytes(&self) -> usize {
        self.blocks.iter().map(QTensor::storage_size_in_bytes).sum()
    }

    /// Block `i` of rows, dequantized: `(rows, in)` in [`Self::dtype`].
    fn block(&self, i: usize) -> Result<Tensor> {
        Ok(self.blocks[i].dequantize(&self.device)?.to_dtype(self.dtype)?)
    }

    /// The whole weight dequantized, `(out, in)` in [`Self::dtype`]: for initialisations (SVD,
    /// norms) and merges, not for the training step.
    pub fn dequantize(&self) -> Result<Tensor> {
        let blocks: Vec<Tensor> = (0..self.blocks.len()).map(|i| self.block(i)).collect::<Result<_>>()?;
        Ok(Tensor::cat(&blocks, 0)?)
    }

    /// Whether the CPU kernels compute this weight's products: bf16 values, f32 products, on
    /// the CPU ([`crate::kernels::matmul_nt_bf16`]: tiles of rows widened in the cache, not
    /// blocks dequantized to memory).
    fn cpu_kernels(ggml: GgmlDType, dtype: DType, device: &Device) -> bool {
        ggml == GgmlDType::BF16 && dtype == DType::F32 && device.is_cpu()
    }

    /// `f(W, x)` on the weight's bf16 values and `x`'s f32 values, for a weight that the CPU
    /// kernels multiply ([`Self::cpu_kernels`]); `None` for the others.
    fn with_bf16_values<R>(&self, x: &Tensor, f: impl FnOnce(&[bf16], &[f32]) -> R) -> Result<Option<R>> {
        if !(Self::cpu_kernels(self.ggml, self.dtype, &self.device) && self.blocks.len() == 1) {
            return Ok(None);
        }
        let data = self.blocks[0].data()?;
        let Ok(w) = bytemuck::try_cast_slice::<u8, bf16>(&data) else {
            return Ok(None);
        };
        Ok(Some(with_f32_slices(&[x], |x| f(w, x[0]))?))
    }

    /// `x W^T` for `x: (n, in)`, with no autograd.
    fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.dim(0)?;
        if let Some(y) = self.with_bf16_values(x, |w, x| kernels::matmul_nt_bf16(x, w, n, self.inp, self.out))? {
            return Ok(Tensor::from_vec(y, (n, self.out), &self.device)?);
        }
        let parts: Vec<Tensor> =
            (0..self.blocks.len()).map(|i| Ok(x.matmul(&self.block(i)?.t()?)?)).collect::<Result<_>>()?;
        Ok(if parts.len() == 1 { parts.into_iter().next().expect("one block") } else { Tensor::cat(&parts, 1)? })
    }

    /// `dy W` for `dy: (n, out)`, with no autograd: the input gradient of [`Self::linear`].
    ///
    /// A weight of several blocks is read by slices of columns (`dy W[:, c0..c1]`, every row of
    /// the slice dequantized, at most about [`BLOCK_ELEMS`] values): each output is then one
    /// whole reduction over `out`, as in the dense product, so on the CPU the result is the
    /// dense `dy W` bit for bit. (Summing per-row-block products would change the rounding,
    /// and AdamW amplifies such differences over a run.) On a GPU, where reading the blocks back
    /// per slice would cost a copy, the row blocks' products are summed. A bf16 weight on the
    /// CPU goes through [`kernels::matmul_nn_bf16`], which sums the products of tiles of rows
    /// (f32 rounding, not bit for bit the dense product).
    pub(crate) fn matmul(&self, dy: &Tensor) -> Result<Tensor> {
        let n = dy.dim(0)?;
        if let Some(dx) = self.with_bf16_values(dy, |w, dy| kernels::matmul_nn_bf16(dy, w, n, self.out, self.inp))? {
            return Ok(Tensor::from_vec(dx, (n, self.inp), &self.device)?);
        }
        if self.blocks.len() == 1 {
            return Ok(dy.matmul(&self.block(0)?)?);
        }
        if self.device.is_cpu() {
            let bs = self.ggml.block_size();
            let width = ((BLOCK_ELEMS / self.out) / bs).max(1) * bs;
            let parts: Vec<Tensor> = (0..self.inp)
                .step_by(width)
                .map(|c0| Ok(dy.matmul(&self.columns(c0, width.min(self.inp - c0))?)?))
                .collect::<Result<_>>()?;
            return Ok(Tensor::cat(&parts, 1)?);
        }
        let mut acc: Option<Tensor> = None;
        for i in 0..self.blocks.len() {
            let r0 = i * self.rows_per_block;
            let rows = self.rows_per_block.min(self.out - r0);
            let part = dy.narrow(1, r0, rows)?.matmul(&self.block(i)?)?;
            acc = Some(match acc {
                Some(a) => (a + part)?,
                None => part,
            });
        }
        Ok(acc.expect("at least one block"))
    }

    /// Columns `c0..c0 + width` of every row (`c0` and `width` multiples of the type's block
    /// size, or reaching the end of the row), dequantized: `(out, width)` in [`Self::dtype`].
    fn columns(&self, c0: usize, width: usize) -> Result<Tensor> {
        let (bs, ts) = (self.ggml.block_size(), self.ggml.type_size());
        let row_bytes = self.inp / bs * ts;
        let (from, len) = (c0 / bs * ts, width.div_ceil(bs) * ts);
        let mut words = vec![0u64; (self.out * len).div_ceil(8)];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
        let mut dst = bytes.chunks_exact_mut(len);
        for block in &self.blocks {
            let data = block.data()?;
            for row in data.chunks_exact(row_bytes) {
                dst.next().expect("one slice per row").copy_from_slice(&row[from..from + len]);
            }
        }
        let storage = QStorage::from_data(Cow::Borrowed(&bytes[..self.out * len]), &self.device, self.ggml)?;
        let q = QTensor::new(storage, (self.out, width))?;
        Ok(q.dequantize(&self.device)?.to_dtype(self.dtype)?)
    }

    /// `x W^T` for `x: (n, in)` in [`Self::dtype`], differentiable in `x` only.
    pub fn linear(self: &Arc<Self>, x: &Tensor) -> Result<Tensor> {
        let y = self.matmul_t(&x.detach())?;
        let w = Arc::clone(self);
        with_backward("quantized-linear", &[x], y, move |_, _, grad| {
            Ok(vec![Some(w.matmul(grad).map_err(candle_core::Error::wrap)?)])
        })
    }

    /// The rows `ids` (any shape), dequantized: `(..ids, in)` in [`Self::dtype`]. Only the blocks
    /// that hold a requested row are read, and of those only the requested rows are dequantized.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        let flat: Vec<u32> = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
        if let Some(&bad) = flat.iter().find(|&&i| i as usize >= self.out) {
            return Err(Error::Unsupported(format!("token id {bad} is out of range for {} embeddings", self.out)));
        }
        // Rows gathered block by block, then put back in the order asked for.
        let mut parts = Vec::new();
        let mut position = vec![0u32; flat.len()];
        let mut next = 0u32;
        for (b, block) in self.blocks.iter().enumerate() {
            let r0 = b * self.rows_per_block;
            let here: Vec<(usize, u32)> = flat
                .iter()
                .enumerate()
                .filter(|(_, &id)| (id as usize) >= r0 && (id as usize) < r0 + self.rows_per_block)
                .map(|(k, &id)| (k, id - r0 as u32))
                .collect();
            if here.is_empty() {
                continue;
            }
            let local: Vec<u32> = here.iter().map(|&(_, id)| id).collect();
            for &(k, _) in &here {
                position[k] = next;
                next += 1;
            }
            parts.push(block.embedding(&Tensor::new(local, &self.device)?)?);
        }
        let gathered = Tensor::cat(&parts, 0)?;
        let rows = gathered.index_select(&Tensor::new(position, &self.device)?, 0)?.to_dtype(self.dtype)?;
        let mut dims = ids.dims().to_vec();
        dims.push(self.inp);
        Ok(rows.reshape(dims)?)
    }
}

/// A `(rows, inp)` [`QTensor`] of type `ggml` whose row `i` is the bytes `row(i)`.
pub(crate) fn gather_rows<'a>(
    rows: usize,
    inp: usize,
    ggml: GgmlDType,
    device: &Device,
    row: impl Fn(usize) -> &'a [u8],
) -> Result<QTensor> {
    let row_bytes = inp / ggml.block_size() * ggml.type_size();
    // u64 words: a buffer aligned for every block type (candle checks the alignment).
    let mut words = vec![0u64; (rows * row_bytes).div_ceil(8)];
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
    for (i, dst) in bytes.chunks_exact_mut(row_bytes).take(rows).enumerate() {
        dst.copy_from_slice(row(i));
    }
    let storage = QStorage::from_data(Cow::Borrowed(&bytes[..rows * row_bytes]), device, ggml)?;
    Ok(QTensor::new(storage, (rows, inp))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// `linear`, its input gradient and `embedding` against the same math on the dequantized
    /// f32 weight, for every type candle can quantize to, with blocks small enough to be many.
    #[test]
    fn products_and_gradients_equal_the_dequantized_weights() -> Result<()> {
        let dev = Device::Cpu;
        // 2600 rows of 512: several blocks of 2048 rows, the last one short.
        let w = Tensor::randn(0f32, 0.05, (2600, 512), &dev)?;
        let x = Var::randn(0f32, 1., (3, 512), &dev)?;
        for (name, t) in QUANT_TYPES {
            let q = Arc::new(QuantizedWeight::quantize(&w, t, DType::F32)?);
            assert_eq!(q.ggml_dtype(), t, "{name}");
            let dense = q.dequantize()?;
            let y = q.linear(x.as_tensor())?;
            let reference = x.as_tensor().matmul(&dense.t()?)?;
            let diff = (&y - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{name}: forward differs by {diff}");
            let dy = Tensor::randn(0f32, 1., (3, 2600), &dev)?;
            let grads = (&y * &dy)?.sum_all()?.backward()?;
            let gx = grads.get(x.as_tensor()).expect("a gradient of x");
            let diff = (gx - dy.matmul(&dense)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{name}: dx differs by {diff}");
            let ids = Tensor::new(&[[2599u32, 0, 2048], [7, 2599, 1]], &dev)?;
            let rows = q.embedding(&ids)?;
            let reference = dense.index_select(&ids.flatten_all()?, 0)?.reshape((2, 3, 512))?;
            let diff = (rows - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff == 0.0, "{name}: embedding differs by {diff}");
            let order: Vec<usize> = (0..2600).rev().collect();
            let whole = q.to_qtensor(Some(&order))?.dequantize(&dev)?;
            let reference =
                dense.index_select(&Tensor::new(order.iter().map(|&r| r as u32).collect::<Vec<_>>(), &dev)?, 0)?;
            let diff = (whole - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff == 0.0, "{name}: the reordered whole weight differs by {diff}");
        }
        Ok(())
    }

    #[test]
    fn k_quants_fall_back_as_llama_cpp_does_on_short_rows() {
        assert_eq!(fallback_type(GgmlDType::Q4K, 576), GgmlDType::Q5_0);
        assert_eq!(fallback_type(GgmlDType::Q6K, 640), GgmlDType::Q8_0);
        assert_eq!(fallback_type(GgmlDType::Q4K, 512), GgmlDType::Q4K);
        assert_eq!(fallback_type(GgmlDType::Q8_0, 20), GgmlDType::F16);
        assert!("q9_0".parse::<BaseQuant>().is_err());
        assert_eq!("Q4_K".parse::<BaseQuant>().unwrap(), BaseQuant::To(GgmlDType::Q4K));
    }
}
