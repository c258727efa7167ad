//! Training data: JSONL records (`{"prompt", "completion"}`, loss on the completion only, or
//! `{"text"}`, loss on every token), tokenized into examples, shuffled by seed and batched with
//! right padding (labels [`IGNORE_INDEX`] on pads) or packed into fixed-length blocks.

use std::path::Path;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Deserialize;

use super::loss::IGNORE_INDEX;
use crate::chat::ChatTemplate;
use crate::{Error, Result};

/// One JSONL record.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Record {
    /// A prompt and its completion; only the completion is learned.
    PromptCompletion {
        /// The prompt.
        prompt: String,
        /// The completion.
        completion: String,
    },
    /// Plain text; every token is learned.
    Text {
        /// The text.
        text: String,
    },
}

impl Record {
    /// The record as the model's chat template formats it: a prompt/completion pair becomes a
    /// one-turn conversation (see [`ChatTemplate::prompt_completion`]); text stays as it is.
    pub fn with_chat_template(&self, template: &ChatTemplate) -> Result<Self> {
        Ok(match self {
            Record::PromptCompletion { prompt, completion } => {
                let (prompt, completion) = template.prompt_completion(prompt, completion)?;
                Record::PromptCompletion { prompt, completion }
            }
            Record::Text { .. } => self.clone(),
        })
    }
}

/// Reads a JSONL file; a line that is not a valid record is an error naming its line number.
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(line).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: format!("line {}: not a {{\"prompt\", \"completion\"}} or {{\"text\"}} record: {e}", i + 1),
        })?;
        records.push(record);
    }
    if records.is_empty() {
        return Err(Error::Config { path: path.to_path_buf(), reason: "the data set is empty".into() });
    }
    Ok(records)
}

/// A tokenized example: ids and the label of each position (the id, or [`IGNORE_INDEX`]).
/// Labels are not shifted: the loss compares the logits at position `i` with label `i + 1`.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Labels, one per id.
    pub labels: Vec<i64>,
}

/// The special tokens around a record's tokens: a BOS in front (unless the text already starts
/// with it, as a chat template that writes `<bos>` makes it) and an EOS after. From a tokenizer:
/// [`crate::tokenizer::ends`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ends {
    /// The token a sequence starts with (Gemma's `<bos>`); `None` for none.
    pub bos: Option<u32>,
    /// The token appended after the text; `None` for none (a chat template ends its turns).
    pub eos: Option<u32>,
}

impl Example {
    /// Builds an example from a record with `encode` (text to ids), between the tokens of `ends`,
    /// cut to `max_len` tokens. Errors when the cut leaves no token to learn.
    pub fn from_record(
        record: &Record,
        encode: &dyn Fn(&str) -> Result<Vec<u32>>,
        ends: Ends,
        max_len: usize,
    ) -> Result<Self> {
        let (mut ids, mut labels) = match record {
            Record::PromptCompletion { prompt, completion } => {
                let p = encode(prompt)?;
                let c = encode(completion)?;
                let labels: Vec<i64> =
                    std::iter::repeat_n(IGNORE_INDEX, p.len()).chain(c.iter().map(|&t| t as i64)).collect();
                ([p, c].concat(), labels)
            }
            Record::Text { text } => {
                let ids = encode(text)?;
                let labels = ids.iter().map(|&t| t as i64).collect();
                (ids, labels)
            }
        };
        if let Some(bos) = ends.bos.filter(|b| ids.first() != Some(b)) {
            ids.insert(0, bos);
            labels.insert(0, IGNORE_INDEX);
        }
        if let Some(eos) = ends.eos {
            ids.push(eos);
            labels.push(eos as i64);
        }
        ids.truncate(max_len);
        labels.truncate(max_len);
        if labels.iter().all(|&l| l == IGNORE_INDEX) {
            return Err(Error::config(
                "max_len",
                format!("a record's prompt fills all {max_len} tokens: nothing of its completion is left to learn"),
            ));
        }
        Ok(Self { ids, labels })
    }
}

/// A batch: `ids: (b, t)` u32 and the shifted labels `(b * t)` i64: the label of position `i` is
/// the token at `i + 1` ([`IGNORE_INDEX`] at each row's last position), so that the logits
/// `(b, t, vocab)` flattened to `(b * t, vocab)` line up with them without a copy.
#[derive(Debug)]
pub struct Batch {
    /// Token ids.
    pub ids: Tensor,
    /// Labels of the next token for every position, flattened.
    pub labels: Tensor,
    /// Tokens whose loss counts.
    pub target_tokens: usize,
}

/// Right-pads `examples` with `pad` into one batch (pads are ignored by the loss; causal
/// attention keeps them from affecting the real tokens). Errors on an empty batch, on an example
/// whose `ids` and `labels` differ in length, and when no example has two tokens.
pub fn collate(examples: &[&Example], pad: u32, device: &Device) -> Result<Batch> {
    if examples.is_empty() {
        return Err(Error::config("data", "a batch needs at least one example"));
    }
    if let Some(e) = examples.iter().find(|e| e.ids.len() != e.labels.len()) {
        return Err(Error::ShapeMismatch {
            what: "an example's labels (one per token id)".into(),
            expected: vec![e.ids.len()],
            actual: vec![e.labels.len()],
        });
    }
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    if t < 2 {
        return Err(Error::config("data", "examples need at least two tokens"));
    }
    let mut ids = Vec::with_capacity(examples.len() * t);
    let mut labels = Vec::with_capacity(examples.len() * t);
    for e in examples {
        ids.extend(e.ids.iter().copied().chain(std::iter::repeat_n(pad, t - e.ids.len())));
        let padded: Vec<i64> =
            e.labels.iter().copied().chain(std::iter::repeat_n(IGNORE_INDEX, t - e.labels.len())).collect();
        labels.extend_from_slice(&padded[1..]);
        labels.push(IGNORE_INDEX);
    }
    let target_tokens = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (examples.len(), t), device)?,
        labels: Tensor::from_vec(labels, examples.len() * t, device)?,
        target_tokens,
    })
}

/// Concatenates examples into blocks of `block` tokens (the last partial block is dropped).
/// Errors when `block` is 0.
pub fn pack(examples: &[Example], block: usize) -> Result<Vec<Example>> {
    if block == 0 {
        return Err(Error::config("block", "blocks of 0 tokens; expected at least 1"));
    }
    let ids: Vec<u32> = examples.iter().flat_map(|e| e.ids.iter().copied()).collect();
    let labels: Vec<i64> = examples.iter().flat_map(|e| e.labels.iter().copied()).collect();
    Ok(ids
        .chunks_exact(block)
        .zip(labels.chunks_exact(block))
        .map(|(i, l)| Example { ids: i.to_vec(), labels: l.to_vec() })
        .collect())
}

/// The example indices of global batch `step` (0-based): epochs are permutations drawn from
/// `seed` and the epoch number, so any step's batch can be recomputed (for resuming). Errors when
/// `n` (the number of examples) or `batch_size` is 0.
pub fn batch_indices(n: usize, batch_size: usize, step: usize, seed: u64) -> Result<Vec<usize>> {
    if n == 0 {
        return Err(Error::config("data", "it has no examples; expected at least one to draw batches from"));
    }
    if batch_size == 0 {
        return Err(Error::config("batch_size", "0 examples per batch; expected at least 1"));
    }
    let per_epoch = (n / batch_size).max(1);
    let epoch = step / per_epoch;
    let offset = (step % per_epoch) * batch_size;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    Ok((0..batch_size).map(|i| order[(offset + i) % n]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(s: &str) -> Result<Vec<u32>> {
        Ok(s.bytes().map(u32::from).collect())
    }

    #[test]
    fn prompt_tokens_are_not_learned() -> Result<()> {
        let r = Record::PromptCompletion { prompt: "ab".into(), completion: "c".into() };
        let e = Example::from_record(&r, &encode, Ends { bos: None, eos: Some(0) }, 16)?;
        assert_eq!(e.ids, vec![97, 98, 99, 0]);
        assert_eq!(e.labels, vec![IGNORE_INDEX, IGNORE_INDEX, 99, 0]);
        let b = collate(&[&e, &Example { ids: vec![1, 2], labels: vec![1, 2] }], 7, &Device::Cpu)?;
        assert_eq!(b.ids.to_vec2::<u32>()?, vec![vec![97, 98, 99, 0], vec![1, 2, 7, 7]]);
        assert_eq!(
            b.labels.to_vec1::<i64>()?,
            vec![IGNORE_INDEX, 99, 0, IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
        );
        assert_eq!(b.target_tokens, 3);
        Ok(())
    }

    #[test]
    fn bad_lines_name_their_number_and_empty_sets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"text\": \"ok\"}\n\n{\"prompt\": 3}\n").unwrap();
        let e = read_jsonl(&p).unwrap_err().to_string();
        assert!(e.contains("line 3"), "{e}");
        std::fs::write(&p, "\n").unwrap();
        assert!(read_jsonl(&p).unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn batches_are_permutations_recomputable_from_the_step() -> Result<()> {
        let mut all = Vec::new();
        for s in 0..5 {
            all.extend(batch_indices(10, 2, s, 3)?);
        }
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>(), "one epoch visits every example once");
        assert_eq!(batch_indices(10, 2, 3, 3)?, batch_indices(10, 2, 3, 3)?);
        assert_ne!(batch_indices(10, 2, 5, 3)?, batch_indices(10, 2, 0, 3)?, "the next epoch is reshuffled");
        Ok(())
    }

    #[test]
    fn no_examples_or_empty_batches_are_errors_not_panics() {
        let e = batch_indices(0, 2, 0, 3).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { name: "data", .. }) && e.to_string().contains("no examples"), "{e}");
        let e = batch_indices(10, 0, 0, 3).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { name: "batch_size", .. }), "{e}");
        let e = pack(&[], 0).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { name: "block", .. }), "{e}");
        let e = collate(&[], 0, &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("at least one example"), "{e}");
        let odd = Example { ids: vec![1, 2, 3], labels: vec![1, 2, 3, 4, 5] };
        let e = collate(&[&odd], 0, &Device::Cpu).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }) && e.to_string().contains("labels"), "{e}");
    }

    #[test]
    fn packing_cuts_fixed_blocks() -> Result<()> {
        let e = |n: u32| Example { ids: (0..n).collect(), labels: (0..n as i64).collect() };
        let blocks = pack(&[e(3), e(4), e(2)], 4)?;
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].ids, vec![0, 1, 2, 0]);
        Ok(())
    }
}
