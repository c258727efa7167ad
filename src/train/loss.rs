//! The token loss: cross-entropy over the positions whose label is not [`IGNORE_INDEX`], as
//! `torch.nn.functional.cross_entropy(..., ignore_index=-100)` and transformers'
//! `labels=input_ids` loss compute it.

use candle_core::{DType, Tensor, D};

use crate::{Error, Result};

/// The label of a position that does not count (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Mean cross-entropy of `logits: (n, vocab)` against `labels: (n,)` (i64), skipping
/// [`IGNORE_INDEX`]. Differentiable in `logits`. Errors when every label is ignored.
pub fn masked_cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (n, vocab) = logits.dims2()?;
    let labels = labels.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    if labels.len() != n {
        return Err(Error::ShapeMismatch { what: "labels".into(), expected: vec![n], actual: vec![labels.len()] });
    }
    if let Some(bad) = labels.iter().find(|&&l| l != IGNORE_INDEX && (l < 0 || l as usize >= vocab)) {
        return Err(Error::config("labels", format!("label {bad} is outside the vocabulary of {vocab}")));
    }
    let kept: Vec<u32> = (0..n as u32).filter(|&i| labels[i as usize] != IGNORE_INDEX).collect();
    if kept.is_empty() {
        return Err(Error::config("labels", "every position is ignored: nothing to learn from"));
    }
    let targets: Vec<u32> = kept.iter().map(|&i| labels[i as usize] as u32).collect();
    let device = logits.device();
    let rows = Tensor::new(kept.as_slice(), device)?;
    let targets = Tensor::new(targets.as_slice(), device)?.unsqueeze(1)?;
    let logp = candle_nn::ops::log_softmax(&logits.index_select(&rows, 0)?.to_dtype(DType::F32)?, D::Minus1)?;
    Ok(logp.gather(&targets, 1)?.neg()?.mean_all()?)
}
