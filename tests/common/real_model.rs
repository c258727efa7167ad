//! Checks of a real model's GGUF against transformers loading the same file: the fixtures that
//! `tests/fixtures/generate.py --smollm2 / --gemma3` writes (`<stem>_reference.json`,
//! `<stem>_logits.safetensors`).

use std::path::PathBuf;

use candle_core::{Tensor, D};
use candle_peft::models::Llama;
use serde::Deserialize;
use tokenizers::Tokenizer;

use super::{fixture, load};

/// What transformers computed (see `gguf_reference` in the fixture script).
#[derive(Deserialize)]
pub struct Reference {
    pub prompt: String,
    /// The prompt's ids, with the tokenizer's BOS if it adds one.
    pub ids: Vec<u32>,
    pub argmax: Vec<u32>,
    pub greedy: Vec<u32>,
    pub greedy_text: String,
    pub tokenizer: Vec<TokenizerCase>,
    pub eval: EvalCase,
}

#[derive(Deserialize)]
pub struct TokenizerCase {
    pub text: String,
    pub ids: Vec<u32>,
    pub decoded: String,
}

#[derive(Deserialize)]
pub struct EvalCase {
    pub texts: Vec<String>,
    pub loss: f64,
    pub tokens: usize,
}

/// `models/<file>`, which `scripts/<script>` fetches; a missing file fails with that instruction.
pub fn model_path(file: &str, script: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models").join(file);
    assert!(p.exists(), "{} is missing: run scripts/{script} first", p.display());
    p
}

/// `tests/fixtures/<stem>_reference.json`.
pub fn reference(stem: &str) -> Reference {
    let path = fixture(&format!("{stem}_reference.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// The prompt's logits within `tol` of transformers' (the first 2048 vocabulary entries and
/// every 64th after them), the same argmax at every position over the whole vocabulary, and
/// the same greedy continuation.
pub fn check_logits_and_greedy(model: &Llama, stem: &str, tol: f32) -> candle_peft::Result<()> {
    let r = reference(stem);
    let ids = Tensor::new(r.ids.as_slice(), &candle_core::Device::Cpu)?.unsqueeze(0)?;
    let logits = model.forward(&ids)?.squeeze(0)?;
    let want = load(&format!("{stem}_logits.safetensors"));
    let first = (logits.narrow(1, 0, 2048)? - &want["logits"])?.abs()?.max_all()?.to_scalar::<f32>()?;
    let sampled = (logits.index_select(&want["columns"], 1)? - &want["sampled"])?.abs()?.max_all()?;
    let sampled = sampled.to_scalar::<f32>()?;
    assert!(first < tol && sampled < tol, "{stem}: logits differ by {first} (first 2048) and {sampled} (sampled)");
    eprintln!("{stem}: logits within {:.2e} of transformers'", first.max(sampled));
    assert_eq!(logits.argmax(D::Minus1)?.to_vec1::<u32>()?, r.argmax);
    // transformers stopped at the fixture's length, with no end token on the way.
    let new = model.generate_greedy(&r.ids, r.greedy.len(), &[])?;
    assert_eq!(new, r.greedy, "{stem}: greedy continuation");
    Ok(())
}

/// The tokenizer gives transformers' ids for the prompt (BOS included), for every text, and
/// decodes them to the same texts.
pub fn check_tokenizer(tok: &Tokenizer, stem: &str) -> candle_peft::Result<()> {
    let r = reference(stem);
    assert_eq!(candle_peft::tokenizer::encode_sequence(tok, &r.prompt)?, r.ids);
    for case in &r.tokenizer {
        assert_eq!(candle_peft::tokenizer::encode(tok, &case.text)?, case.ids, "{:?}", case.text);
        assert_eq!(tok.decode(&case.ids, false).unwrap(), case.decoded, "{:?}", case.text);
    }
    assert_eq!(tok.decode(&r.greedy, false).unwrap(), r.greedy_text);
    Ok(())
}
