//! The token loss: cross-entropy over the positions whose label is not [`IGNORE_INDEX`], as
//! `torch.nn.functional.cross_entropy(..., ignore_index=-100)` and transformers'
//! `labels=input_ids` loss compute it.

use candle_core::{DType, Tensor, D};

use crate::fused::with_backward;
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
    let weights = Tensor::from_vec(weights, (n, 1), device)?;
    let targets = Tensor::from_vec(targets, (n, 1), device)?;

    // loss = sum_i w_i (logsumexp(z_i) - z_i[y_i]); one fused node, so autograd keeps only the
    // logits (not the log-probabilities and their intermediates, each as large as the logits).
    let z = logits.detach().to_dtype(DType::F32)?;
    let max = z.max_keepdim(D::Minus1)?;
    let lse = (z.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?;
    let loss = ((lse - z.gather(&targets, 1)?)? * &weights)?.sum_all()?;
    // d loss / d z_i = w_i (softmax(z_i) - onehot(y_i)).
    let dtype = logits.dtype();
    with_backward("cross-entropy", &[logits], loss, move |inputs, _, grad| {
        let p = candle_nn::ops::softmax_last_dim(&inputs[0].detach().to_dtype(DType::F32)?)?;
        let minus_one = Tensor::full(-1f32, (n, 1), p.device())?;
        let dz = p.scatter_add(&targets, &minus_one, 1)?.broadcast_mul(&weights.broadcast_mul(grad)?)?;
        Ok(vec![Some(dz.to_dtype(dtype)?)])
    })
}
