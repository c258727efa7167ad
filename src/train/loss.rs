//! The token loss: cross-entropy over the positions whose label is not [`IGNORE_INDEX`], as
//! `torch.nn.functional.cross_entropy(..., ignore_index=-100)` and transformers'
//! `labels=input_ids` loss compute it.

use candle_core::{DType, Tensor, D};

use crate::fused::{with_backward, with_backward_cpu, with_f32_slices};
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
    // Per-row weights 1 / count (0 on ignored rows) and targets (0 on ignored rows).
    let device = logits.device();
    let weights: Vec<f32> = labels.iter().map(|&l| if l == IGNORE_INDEX { 0.0 } else { 1.0 / count as f32 }).collect();
    let targets: Vec<u32> = labels.iter().map(|&l| if l == IGNORE_INDEX { 0 } else { l as u32 }).collect();

    // loss = sum_i w_i (logsumexp(z_i) - z_i[y_i]); one fused node, so autograd keeps only the
    // logits (not the log-probabilities and their intermediates, each as large as the logits).
    // d loss / d z_i = w_i (softmax(z_i) - onehot(y_i)).
    let dtype = logits.dtype();
    if device.is_cpu() {
        // One pass over each row each way (CPU kernels); the backward reuses each row's
        // logsumexp.
        let (loss, lse) = with_f32_slices(&[logits], |z| kernels::cross_entropy(z[0], vocab, &weights, &targets))?;
        return with_backward_cpu("cross-entropy", &[logits], vec![loss], (), DType::F32, move |inputs, _, grad| {
            let grad = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            let dz = with_f32_slices(&[inputs[0]], |z| {
                kernels::cross_entropy_backward(z[0], vocab, &weights, &targets, &lse, grad)
            })?;
            Ok(vec![Some(Tensor::from_vec(dz, (n, vocab), &candle_core::Device::Cpu)?.to_dtype(dtype)?)])
        });
    }
    let weights = Tensor::from_vec(weights, (n, 1), device)?;
    let targets = Tensor::from_vec(targets, (n, 1), device)?;
    let z = logits.detach().to_dtype(DType::F32)?;
    let max = z.max_keepdim(D::Minus1)?;
    let lse = (z.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?;
    let loss = ((lse - z.gather(&targets, 1)?)? * &weights)?.sum_all()?;
    with_backward("cross-entropy", &[logits], loss, move |inputs, _, grad| {
        let p = candle_nn::ops::softmax_last_dim(&inputs[0].detach().to_dtype(DType::F32)?)?;
        let minus_one = Tensor::full(-1f32, (n, 1), p.device())?;
        let dz = p.scatter_add(&targets, &minus_one, 1)?.broadcast_mul(&weights.broadcast_mul(grad)?)?;
        Ok(vec![Some(dz.to_dtype(dtype)?)])
    })
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
}
