//! The token loss: cross-entropy over the positions whose label is not [`IGNORE_INDEX`], as
//! `torch.nn.functional.cross_entropy(..., ignore_index=-100)` and transformers'
//! `labels=input_ids` loss compute it.
//!
//! [`linear_cross_entropy_part`] computes the same loss from the last hidden states and a frozen
//! output projection, a block of positions at a time, so that the `(positions, vocab)` logits
//! and their gradient never exist whole (the chunked "linear cross-entropy" of Liger-Kernel,
//! Hsu et al. 2024, and of Apple's Cut Cross-Entropy, Wijmans et al. 2024).

use std::ops::Range;

use candle_core::{DType, Device, Tensor, D};

use crate::frozen::FrozenWeight;
use crate::fused::{with_backward, with_f32_slices};
use crate::kernels;
use crate::{Error, Result};

/// The label of a position that does not count (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Mean cross-entropy of `logits: (n, vocab)` against `labels: (n,)` (i64), skipping
/// [`IGNORE_INDEX`]. Differentiable in `logits`. Errors when every label is ignored.
pub fn masked_cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    masked_cross_entropy_part(logits, labels, counted_labels(labels)?)
}

/// The number of labels that count (not [`IGNORE_INDEX`]) in `labels`; errors when there are
/// none.
pub fn counted_labels(labels: &Tensor) -> Result<usize> {
    let count =
        labels.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?.iter().filter(|&&l| l != IGNORE_INDEX).count();
    if count == 0 {
        return Err(Error::config("labels", "every position is ignored: nothing to learn from"));
    }
    Ok(count)
}

/// The part of a masked cross-entropy that the positions `logits: (n, vocab)`, `labels: (n,)`
/// contribute to a mean over `count` counted labels in all: their summed token losses divided
/// by `count`. Summing the parts of a batch split by positions gives
/// [`masked_cross_entropy`] of the whole batch (a loss computed chunk by chunk).
pub fn masked_cross_entropy_part(logits: &Tensor, labels: &Tensor, count: usize) -> Result<Tensor> {
    let (n, vocab) = logits.dims2()?;
    let rows = Targets::new(labels, n, vocab, count)?;
    // One fused node, so autograd keeps only the logits (not the log-probabilities and their
    // intermediates, each as large as the logits); the backward reuses each row's logsumexp.
    let dtype = logits.dtype();
    let (loss, lse) = rows.loss(&logits.detach())?;
    with_backward("cross-entropy", &[logits], loss, move |inputs, _, grad| {
        Ok(vec![Some(rows.gradient(inputs[0], &lse, grad)?.to_dtype(dtype)?)])
    })
}

/// [`masked_cross_entropy_part`] of the logits `h W^T` of hidden states `h: (n, hidden)` and a
/// frozen output projection `W: (vocab, hidden)`, differentiable in `h`, computed on blocks of
/// positions (at most [`LOGITS_BLOCK`] logits at a time): each block's logits, their loss and
/// their gradient `dz`, and `dh = dz W`, all in the forward pass (when `h` needs a gradient),
/// so that the backward pass only scales `dh`. Two matrix products per block as when the
/// logits are kept, and `(n, hidden)` values kept instead of `(n, vocab)` (1 / 85 of them for
/// SmolLM2).
pub fn linear_cross_entropy_part(h: &Tensor, weight: &FrozenWeight, labels: &Tensor, count: usize) -> Result<Tensor> {
    let block = (LOGITS_BLOCK / weight.dims2()?.0.max(1)).max(1);
    linear_cross_entropy_in_blocks(h, weight, labels, count, block)
}

/// [`linear_cross_entropy_part`] on blocks of `block` positions.
fn linear_cross_entropy_in_blocks(
    h: &Tensor,
    weight: &FrozenWeight,
    labels: &Tensor,
    count: usize,
    block: usize,
) -> Result<Tensor> {
    let (n, hidden) = h.dims2()?;
    let (vocab, w_hidden) = weight.dims2()?;
    if w_hidden != hidden {
        return Err(Error::ShapeMismatch {
            what: "output projection (vocab, hidden) for these hidden states".into(),
            expected: vec![vocab, hidden],
            actual: vec![vocab, w_hidden],
        });
    }
    let targets = Targets::new(labels, n, vocab, count)?;
    let x = h.detach();
    let one = Tensor::new(1f32, h.device())?;
    let (mut loss, mut dh) = (None::<Tensor>, Vec::new());
    for r0 in (0..n).step_by(block) {
        let rows = r0..(r0 + block).min(n);
        let z = weight.linear(&x.narrow(0, r0, rows.len())?, None)?;
        let part = targets.rows(rows);
        let (l, lse) = part.loss(&z)?;
        if h.track_op() {
            dh.push(weight.input_grad(&part.gradient(&z, &lse, &one)?.to_dtype(z.dtype())?)?);
        }
        loss = Some(match loss {
            Some(sum) => (sum + l)?,
            None => l,
        });
    }
    let loss = loss.ok_or_else(|| Error::config("hidden states", "a loss over 0 positions"))?;
    let dh = if dh.is_empty() { None } else { Some(Tensor::cat(&dh, 0)?) };
    with_backward("linear-cross-entropy", &[h], loss, move |_, _, grad| {
        let dh = dh.as_ref().ok_or_else(|| candle_core::Error::Msg("linear-cross-entropy: no gradient kept".into()))?;
        Ok(vec![Some(dh.broadcast_mul(&grad.to_dtype(dh.dtype())?)?)])
    })
}

/// The most logits [`linear_cross_entropy_part`] computes at once (16 MiB in f32).
pub const LOGITS_BLOCK: usize = 1 << 22;

/// Labels as the loss kernels take them: per-row weights `1 / count` (0 on ignored rows) and
/// targets (0 on ignored rows).
struct Targets {
    vocab: usize,
    weights: Vec<f32>,
    targets: Vec<u32>,
}

impl Targets {
    /// The targets of `n` rows of logits over `vocab` from `labels: (n,)`, of a loss averaged
    /// over `count` labels; errors on a label outside the vocabulary.
    fn new(labels: &Tensor, n: usize, vocab: usize, count: usize) -> Result<Self> {
        let labels = labels.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        if labels.len() != n {
            return Err(Error::ShapeMismatch { what: "labels".into(), expected: vec![n], actual: vec![labels.len()] });
        }
        if let Some(bad) = labels.iter().find(|&&l| l != IGNORE_INDEX && (l < 0 || l as usize >= vocab)) {
            return Err(Error::config("labels", format!("label {bad} is outside the vocabulary of {vocab}")));
        }
        if count == 0 {
            return Err(Error::config("labels", "a loss over 0 counted labels; expected at least 1"));
        }
        let weights = labels.iter().map(|&l| if l == IGNORE_INDEX { 0.0 } else { 1.0 / count as f32 }).collect();
        let targets = labels.iter().map(|&l| if l == IGNORE_INDEX { 0 } else { l as u32 }).collect();
        Ok(Self { vocab, weights, targets })
    }

    /// The targets of the rows `rows`.
    fn rows(&self, rows: Range<usize>) -> Self {
        Self { vocab: self.vocab, weights: self.weights[rows.clone()].to_vec(), targets: self.targets[rows].to_vec() }
    }

    /// The weights and targets as `(n, 1)` tensors on `device`.
    fn tensors(&self, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let n = self.weights.len();
        Ok((Tensor::from_slice(&self.weights, (n, 1), device)?, Tensor::from_slice(&self.targets, (n, 1), device)?))
    }

    /// `sum_i w_i (logsumexp(z_i) - z_i[y_i])` of logits `z: (n, vocab)` (an f32 scalar) and each
    /// row's logsumexp (f32, `(n,)`), which [`Self::gradient`] reuses.
    fn loss(&self, z: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let n = self.weights.len();
        if z.device().is_cpu() {
            // One pass over each row (CPU kernel).
            let (loss, lse) =
                with_f32_slices(&[z], |z| kernels::cross_entropy(z[0], self.vocab, &self.weights, &self.targets))?;
            return Ok((Tensor::new(loss, &Device::Cpu)?, Tensor::from_vec(lse, n, &Device::Cpu)?));
        }
        self.loss_with_candle_ops(z)
    }

    /// [`Self::loss`] with candle's ops (other devices than the CPU).
    fn loss_with_candle_ops(&self, z: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (weights, targets) = self.tensors(z.device())?;
        let z = z.to_dtype(DType::F32)?;
        let max = z.max_keepdim(D::Minus1)?;
        let lse = (z.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?;
        let loss = ((&lse - z.gather(&targets, 1)?)? * &weights)?.sum_all()?;
        Ok((loss, lse.squeeze(1)?))
    }

    /// `grad * d loss / d z = grad w_i (softmax(z_i) - onehot(y_i))` (f32), from the logsumexp
    /// `lse` that [`Self::loss`] gave for the same `z`.
    fn gradient(&self, z: &Tensor, lse: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        let (n, vocab) = (self.weights.len(), self.vocab);
        if z.device().is_cpu() {
            let grad = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            let dz = with_f32_slices(&[z, lse], |s| {
                kernels::cross_entropy_backward(s[0], vocab, &self.weights, &self.targets, s[1], grad)
            })?;
            return Tensor::from_vec(dz, (n, vocab), &Device::Cpu);
        }
        self.gradient_with_candle_ops(z, lse, grad)
    }

    /// [`Self::gradient`] with candle's ops (other devices than the CPU).
    fn gradient_with_candle_ops(&self, z: &Tensor, lse: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        let n = self.weights.len();
        let (weights, targets) = self.tensors(z.device())?;
        let p = z.to_dtype(DType::F32)?.broadcast_sub(&lse.unsqueeze(1)?)?.exp()?;
        let minus_one = Tensor::full(-1f32, (n, 1), z.device())?;
        p.scatter_add(&targets, &minus_one, 1)?.broadcast_mul(&weights.broadcast_mul(&grad.to_dtype(DType::F32)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The CPU kernels (vectorized rows of 1000 and 16 values, ignored rows, NaN) against the
    /// same loss written with candle's differentiable ops.
    #[test]
    fn cpu_kernel_matches_autograd() -> Result<()> {
        for vocab in [1000, 16, 3] {
            let n = 37;
            let logits = Var::from_tensor(&(Tensor::randn(0f32, 3., (n, vocab), &Device::Cpu)? + 5.0)?)?;
            let labels: Vec<i64> =
                (0..n as i64).map(|i| if i % 5 == 2 { IGNORE_INDEX } else { (i * 31) % vocab as i64 }).collect();
            let counted = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
            let labels = Tensor::new(labels.as_slice(), &Device::Cpu)?;
            let loss = masked_cross_entropy(logits.as_tensor(), &labels)?;
            let grad = loss.backward()?.remove(logits.as_tensor()).expect("gradient");

            let keep = Tensor::new((0..n as u32).filter(|i| i % 5 != 2).collect::<Vec<_>>().as_slice(), &Device::Cpu)?;
            let log_p = candle_nn::ops::log_softmax(&logits.as_tensor().index_select(&keep, 0)?, D::Minus1)?;
            let targets = labels.index_select(&keep, 0)?.to_dtype(DType::U32)?.unsqueeze(1)?;
            let reference = (log_p.gather(&targets, 1)?.sum_all()? * (-1.0 / counted as f64))?;
            let grad_ref = reference.backward()?.remove(logits.as_tensor()).expect("gradient");
            let loss_diff = (loss.to_scalar::<f32>()? - reference.to_scalar::<f32>()?).abs();
            assert!(loss_diff < 1e-5, "vocab {vocab}: loss differs by {loss_diff}");
            let grad_diff = (grad - grad_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(grad_diff < 1e-6, "vocab {vocab}: gradient differs by {grad_diff}");
        }
        // A NaN logit gives a NaN loss (which the trainer refuses), not a number.
        let logits = Tensor::from_vec(vec![0f32, f32::NAN, 1.0, 2.0], (2, 2), &Device::Cpu)?;
        let loss = masked_cross_entropy(&logits, &Tensor::new(&[0i64, 1], &Device::Cpu)?)?;
        assert!(loss.to_scalar::<f32>()?.is_nan());
        Ok(())
    }

    /// Labels of `n` rows over `vocab`, every fifth ignored, and their count.
    fn labels(n: usize, vocab: usize) -> Result<(Tensor, usize)> {
        let labels: Vec<i64> =
            (0..n as i64).map(|i| if i % 5 == 2 { IGNORE_INDEX } else { (i * 31) % vocab as i64 }).collect();
        let count = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
        Ok((Tensor::new(labels.as_slice(), &Device::Cpu)?, count))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    /// The path of other devices (candle's ops) gives the CPU kernels' loss, logsumexp and
    /// gradient.
    #[test]
    fn candle_ops_path_matches_the_kernels() -> Result<()> {
        let (n, vocab) = (37, 1000);
        let z = (Tensor::randn(0f32, 3., (n, vocab), &Device::Cpu)? + 5.0)?;
        let (labels, count) = labels(n, vocab)?;
        let targets = Targets::new(&labels, n, vocab, count)?;
        let ((loss, lse), (loss_ops, lse_ops)) = (targets.loss(&z)?, targets.loss_with_candle_ops(&z)?);
        assert!(max_diff(&loss, &loss_ops)? < 1e-5);
        // Ignored rows: the kernel leaves their logsumexp at 0, candle's ops compute it.
        let kept = Tensor::new((0..n as u32).filter(|i| i % 5 != 2).collect::<Vec<_>>().as_slice(), &Device::Cpu)?;
        assert!(max_diff(&lse.index_select(&kept, 0)?, &lse_ops.index_select(&kept, 0)?)? < 1e-5);
        let grad = Tensor::new(0.5f32, &Device::Cpu)?;
        let dz = targets.gradient(&z, &lse, &grad)?;
        let dz_ops = targets.gradient_with_candle_ops(&z, &lse_ops, &grad)?;
        assert!(max_diff(&dz, &dz_ops)? < 1e-7, "gradient differs by {}", max_diff(&dz, &dz_ops)?);
        Ok(())
    }

    /// The loss from hidden states and a frozen projection, in blocks of 7 positions (the last
    /// one short), of all of them, and of more than there are, against the loss of the logits
    /// `h W^T` with autograd through the product; f32, bf16 and a Q8_0 projection; with no
    /// gradient needed, the same loss.
    #[test]
    fn linear_cross_entropy_matches_the_logits_loss() -> Result<()> {
        use candle_core::quantized::{GgmlDType, QTensor};
        let (n, hidden, vocab) = (23, 64, 300);
        let dev = Device::Cpu;
        let (labels, count) = labels(n, vocab)?;
        let h32 = Tensor::randn(0f32, 1., (n, hidden), &dev)?;
        let w32 = Tensor::randn(0f32, 0.3, (vocab, hidden), &dev)?;
        let q8 = QTensor::quantize(&w32, GgmlDType::Q8_0)?;
        let weights: [(FrozenWeight, Tensor, DType, f32); 3] = [
            (w32.clone().into(), w32.clone(), DType::F32, 1e-6),
            (w32.to_dtype(DType::BF16)?.into(), w32.to_dtype(DType::BF16)?, DType::BF16, 1e-3),
            (
                crate::quantized::QuantizedWeight::new(&q8, None, DType::F32)?.into(),
                q8.dequantize(&dev)?,
                DType::F32,
                1e-6,
            ),
        ];
        for (weight, dense, dtype, tol) in weights {
            let h = Var::from_tensor(&h32.to_dtype(dtype)?)?;
            let reference = (masked_cross_entropy_part(&h.as_tensor().matmul(&dense.t()?)?, &labels, count)? * 0.5)?;
            let grad_ref = reference.backward()?.remove(h.as_tensor()).expect("gradient");
            for block in [7, n, 100] {
                let loss = (linear_cross_entropy_in_blocks(h.as_tensor(), &weight, &labels, count, block)? * 0.5)?;
                let grad = loss.backward()?.remove(h.as_tensor()).expect("gradient");
                // bf16 logits round differently in the two products (the mkl build's bf16 product
                // differs from the crate's kernels): the loss within bf16's precision there.
                let loss_tol = if dtype == DType::BF16 { 1e-3 } else { 1e-5 };
                let loss_diff = max_diff(&loss, &reference)?;
                assert!(loss_diff < loss_tol, "{dtype:?}, blocks of {block}: loss differs by {loss_diff}");
                let diff = max_diff(&grad, &grad_ref)?;
                assert!(diff < tol, "{dtype:?}, blocks of {block}: gradient differs by {diff}");
                assert_eq!(grad.dtype(), dtype);
            }
            let loss = linear_cross_entropy_part(&h.as_tensor().detach(), &weight, &labels, count)?;
            assert!(max_diff(&(loss * 0.5)?, &reference)? < 1e-5);
        }
        Ok(())
    }
}
