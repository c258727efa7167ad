//! Tokenizers for the models: an HF `tokenizer.json`, or one built from a GGUF file's metadata
//! the way transformers builds it (`tokenizer.ggml.model = "gpt2"`: byte-level BPE from the
//! file's tokens and merges, control tokens as special tokens).

use std::collections::HashMap;
use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::gguf::GgufMetadata;
use crate::{Error, Result};

/// GPT-2's byte-to-character table: printable bytes map to themselves, the others to code points
/// from 256 up, so that every byte sequence is spelled in printable characters.
fn bytes_to_unicode() -> HashMap<u8, char> {
    let mut printable: Vec<u8> = (b'!'..=b'~').chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars: Vec<u32> = printable.iter().map(|&b| b as u32).collect();
    let mut n = 0;
    for b in 0..=255u8 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    printable.into_iter().zip(chars).map(|(b, c)| (b, char::from_u32(c).expect("valid code point"))).collect()
}

/// Text to token ids as the model sees it in training (no special tokens added around it;
/// special tokens written in the text, such as a chat template's, are recognised).
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let encoding =
        tokenizer.encode(text, false).map_err(|e| Error::Tokenizer(format!("cannot encode the text: {e}")))?;
    Ok(encoding.get_ids().to_vec())
}

/// The token that ends a turn or a sequence: the first of `<|im_end|>`, `<|endoftext|>`, `</s>`
/// and `<|eot_id|>` that the vocabulary has.
pub fn end_token(tokenizer: &Tokenizer) -> Option<u32> {
    ["<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>"].iter().find_map(|t| tokenizer.token_to_id(t))
}

/// The tokens that end generation: every end-of-turn and end-of-text token of the known chat
/// formats that the vocabulary has (ChatML's `<|im_end|>` and `<|endoftext|>`, Llama 3's
/// `<|eot_id|>` and `<|end_of_text|>`, Gemma's `<end_of_turn>` and `<eos>`, Phi-3's `<|end|>`,
/// SentencePiece's `</s>`).
pub fn stop_tokens(tokenizer: &Tokenizer) -> Vec<u32> {
    ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<eos>", "<|end|>", "</s>"]
        .iter()
        .filter_map(|t| tokenizer.token_to_id(t))
        .collect()
}

/// Reads an HF `tokenizer.json`.
pub fn from_file(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path)
        .map_err(|e| Error::Config { path: path.to_path_buf(), reason: format!("tokenizer: {e}") })
}

/// The tokenizer a GGUF file describes. Supports `tokenizer.ggml.model = "gpt2"` (byte-level
/// BPE, as SmolLM2 and LLaMA 3 use); SentencePiece (`"llama"`) vocabularies are refused.
pub fn from_gguf(meta: &GgufMetadata) -> Result<Tokenizer> {
    let kind = meta.string("tokenizer.ggml.model")?;
    if kind != "gpt2" {
        return Err(Error::Unsupported(format!(
            "{}: GGUF tokenizer model \"{kind}\" (only byte-level BPE, \"gpt2\", is supported; pass a tokenizer.json instead)",
            meta.path().display()
        )));
    }
    if let Ok(pre) = meta.string("tokenizer.ggml.pre") {
        if !["smollm", "gpt-2", "default"].contains(&pre.as_str()) {
            return Err(Error::Unsupported(format!(
                "{}: GGUF pre-tokenizer \"{pre}\" (supported: smollm, gpt-2; pass a tokenizer.json instead)",
                meta.path().display()
            )));
        }
    }
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let merges = meta.strings("tokenizer.ggml.merges")?;
    let types = meta.i32s("tokenizer.ggml.token_type").unwrap_or_default();
    let spelling = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = spelling.values().copied().collect();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let spelled = if t.chars().all(|c| alphabet.contains(&c)) {
                t.clone()
            } else {
                t.bytes().map(|b| spelling[&b]).collect()
            };
            (spelled, i as u32)
        })
        .collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| {
            m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: merge `{m}` of tokenizer.ggml.merges is not two tokens separated by a space",
                    meta.path().display()
                ))
            })
        })
        .collect::<Result<_>>()?;
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| {
        Error::Tokenizer(format!("{}: cannot build the BPE tokenizer of the GGUF file: {e}", meta.path().display()))
    })?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tok.with_decoder(Some(ByteLevel::default()));
    // Control tokens (type 3) spelled in the byte alphabet stay whole, as transformers adds them.
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(types.iter().chain(std::iter::repeat(&0)))
        .filter(|(t, ty)| **ty == 3 && t.chars().all(|c| alphabet.contains(&c)))
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect();
    tok.add_special_tokens(special).map_err(|e| {
        Error::Tokenizer(format!("{}: cannot add the GGUF file's control tokens: {e}", meta.path().display()))
    })?;
    Ok(tok)
}
