//! Tokenizers for the models: an HF `tokenizer.json`, or one built from a GGUF file's metadata
//! the way transformers 5 builds it (`integrations/gguf/gguf_tokenizer_mapping.py`):
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE from the file's tokens and merges;
//! - `"llama"` in a `gemma3` file: Gemma's SentencePiece-style BPE (spaces as `▁`, byte
//!   fallback), with the merges rebuilt from the vocabulary's order (the file has none);
//!
//! control tokens as special tokens, user-defined ones as added tokens, and a BOS in front of a
//! sequence when the file says `tokenizer.ggml.add_bos_token` (see [`encode_sequence`]).

use std::collections::HashMap;
use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::gguf::GgufMetadata;
use crate::train::data::Ends;
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

/// The token a tokenizer puts in front of a sequence (its BOS, e.g. Gemma's `<bos>`), if any:
/// what `encode(text, add_special_tokens = true)` adds before the text.
pub fn bos_token(tokenizer: &Tokenizer) -> Option<u32> {
    let ids = |special| tokenizer.encode("a", special).ok().map(|e| e.get_ids().to_vec());
    let (with, without) = (ids(true)?, ids(false)?);
    (with.len() > without.len() && with.ends_with(&without)).then(|| with[0])
}

/// Text to token ids as the start of a sequence: [`encode`], after the tokenizer's BOS
/// ([`bos_token`]) unless the text already starts with it (a chat template that writes
/// `<bos>` itself). What evaluation and generation feed the model.
pub fn encode_sequence(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let ids = encode(tokenizer, text)?;
    Ok(match bos_token(tokenizer) {
        Some(bos) if ids.first() != Some(&bos) => [vec![bos], ids].concat(),
        _ => ids,
    })
}

/// The ids of those of `names` that the tokenizer has as special tokens, in that order (a plain
/// token spelled the same, such as the HTML `</s>` of Gemma's vocabulary, does not count).
fn special_ids(tokenizer: &Tokenizer, names: &[&str]) -> Vec<u32> {
    let special = tokenizer.get_added_tokens_decoder();
    names
        .iter()
        .filter_map(|t| tokenizer.token_to_id(t))
        .filter(|id| special.get(id).is_some_and(|t| t.special))
        .collect()
}

/// The tokenizer's BOS ([`bos_token`]) and end token ([`end_token`]): what a training example
/// from a record is framed with.
pub fn ends(tokenizer: &Tokenizer) -> Ends {
    Ends { bos: bos_token(tokenizer), eos: end_token(tokenizer) }
}

/// The token that ends a turn or a sequence: the first of `<|im_end|>`, `<|endoftext|>`,
/// `<eos>`, `</s>` and `<|eot_id|>` that the tokenizer has as a special token.
pub fn end_token(tokenizer: &Tokenizer) -> Option<u32> {
    special_ids(tokenizer, &["<|im_end|>", "<|endoftext|>", "<eos>", "</s>", "<|eot_id|>"]).first().copied()
}

/// The tokens that end generation: every end-of-turn and end-of-text token of the known chat
/// formats that the vocabulary has as a special token (ChatML's `<|im_end|>` and
/// `<|endoftext|>`, Llama 3's `<|eot_id|>` and `<|end_of_text|>`, Gemma's `<end_of_turn>` and
/// `<eos>`, Phi-3's `<|end|>`, SentencePiece's `</s>`); a plain token spelled the same (Gemma's
/// vocabulary has an HTML `</s>`) does not count.
pub fn stop_tokens(tokenizer: &Tokenizer) -> Vec<u32> {
    special_ids(
        tokenizer,
        &["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<eos>", "<|end|>", "</s>"],
    )
}

/// The HF files of a tokenizer that [`save_with_model`] copies from a model directory as they
/// are (transformers 5 keeps the chat template in `chat_template.jinja`, 4.x in
/// `tokenizer_config.json`).
const TOKENIZER_FILES: [&str; 4] =
    ["tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json"];

/// Writes the tokenizer of the model at `source` into the HF model directory `dir`, so that the
/// directory is a whole model (`candle-peft generate --chat`, transformers'
/// `AutoTokenizer.from_pretrained(dir).apply_chat_template`): `tokenizer.json`, and
/// - from a model directory, its `tokenizer_config.json`, `special_tokens_map.json`,
///   `chat_template.jinja` and `generation_config.json` that exist, as they are;
/// - from a GGUF file, what transformers' GGUF loader reads from the metadata: the chat template
///   (`chat_template.jinja`, and `chat_template` in `tokenizer_config.json` for transformers
///   4), the BOS / EOS / UNK / PAD tokens and `add_bos_token` / `add_eos_token`.
///
/// Every file is written atomically.
pub fn save_with_model(tokenizer: &Tokenizer, source: &Path, dir: &Path) -> Result<()> {
    let json = tokenizer
        .to_string(false)
        .map_err(|e| Error::Tokenizer(format!("cannot serialize the tokenizer for {}: {e}", dir.display())))?;
    crate::format::write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
    if source.is_dir() {
        for name in TOKENIZER_FILES {
            let from = source.join(name);
            if from.exists() {
                let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
                crate::format::write_atomic(&dir.join(name), &bytes)?;
            }
        }
        return Ok(());
    }
    let meta = GgufMetadata::read(source)?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let mut config = serde_json::Map::new();
    config.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    for (name, key) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ] {
        if let Some(t) = meta.u32(&format!("tokenizer.ggml.{key}")).ok().and_then(|id| tokens.get(id as usize)) {
            config.insert(name.into(), t.clone().into());
        }
    }
    let sentencepiece = meta.string("tokenizer.ggml.model").is_ok_and(|m| m == "llama");
    for (name, default) in [("add_bos_token", sentencepiece), ("add_eos_token", false)] {
        let value = meta.bool(&format!("tokenizer.ggml.{name}")).ok();
        if let Some(v) = value.or(default.then_some(true)) {
            config.insert(name.into(), v.into());
        }
    }
    if let Ok(template) = meta.string("tokenizer.chat_template") {
        crate::format::write_atomic(&dir.join("chat_template.jinja"), template.as_bytes())?;
        config.insert("chat_template".into(), template.into());
    }
    let json = serde_json::to_string_pretty(&serde_json::Value::Object(config))?;
    crate::format::write_atomic(&dir.join("tokenizer_config.json"), json.as_bytes())
}

/// Reads an HF `tokenizer.json`.
pub fn from_file(path: &Path) -> Result<Tokenizer> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |reason: String| Error::Config { path: path.to_path_buf(), reason: format!("tokenizer: {reason}") };
    // The tokenizers crate panics on some malformed JSON (an `expect` where it reads a
    // `decoder`) and on BPE merges longer than every token: both are checked first.
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    check_bpe_merges(&json["model"]).map_err(bad)?;
    text.parse::<Tokenizer>().map_err(|e| bad(e.to_string()))
}

/// Checks that each merge `a b` of a BPE `model` of a `tokenizer.json` joins two tokens of its
/// vocabulary into a third ([`check_merges`]); merges are strings `"a b"` or pairs `["a", "b"]`.
fn check_bpe_merges(model: &serde_json::Value) -> std::result::Result<(), String> {
    let (Some(vocab), Some(merges)) = (model["vocab"].as_object(), model["merges"].as_array()) else {
        return Ok(());
    };
    let pairs = merges
        .iter()
        .enumerate()
        .map(|(i, merge)| match (merge.as_str(), merge.as_array().map(Vec::as_slice)) {
            (Some(m), _) => m.split_once(' ').ok_or_else(|| format!("merge {i} `{m}` is not two tokens")),
            (_, Some([a, b])) => Ok((a.as_str().unwrap_or_default(), b.as_str().unwrap_or_default())),
            _ => Err(format!("merge {i} is {merge}; expected \"a b\" or [\"a\", \"b\"]")),
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let prefix = model["continuing_subword_prefix"].as_str().unwrap_or("");
    check_merges(&pairs, prefix, |t| vocab.contains_key(t))
}

/// Checks that each merge `(a, b)` joins two tokens of the vocabulary (`has`) into a third (`b`
/// without `prefix`), as a BPE model needs: the tokenizers crate indexes past a buffer sized by
/// the longest token on a merge longer than every token, instead of returning its error.
fn check_merges(merges: &[(&str, &str)], prefix: &str, has: impl Fn(&str) -> bool) -> std::result::Result<(), String> {
    for (i, (a, b)) in merges.iter().enumerate() {
        let joined = format!("{a}{}", b.strip_prefix(prefix).unwrap_or(b));
        for token in [*a, *b, joined.as_str()] {
            if !has(token) {
                return Err(format!("merge {i} (`{a}` + `{b}`) needs the token `{token}`, which the vocabulary lacks"));
            }
        }
    }
    Ok(())
}

/// The tokenizer a GGUF file describes: byte-level BPE (`tokenizer.ggml.model = "gpt2"`, as
/// SmolLM2, LLaMA 3 and Qwen use) or Gemma's SentencePiece-style BPE (`"llama"` in a `gemma3`
/// file). Other SentencePiece vocabularies and pre-tokenizers are refused by name.
pub fn from_gguf(meta: &GgufMetadata) -> Result<Tokenizer> {
    let kind = meta.string("tokenizer.ggml.model")?;
    let arch = meta.string("general.architecture").unwrap_or_default();
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let types = meta.i32s("tokenizer.ggml.token_type").unwrap_or_default();
    let mut tok = match kind.as_str() {
        "gpt2" => byte_level_bpe(meta, &tokens)?,
        "llama" if arch == "gemma3" => gemma_bpe(meta, &tokens)?,
        _ => {
            return Err(Error::Unsupported(format!(
                "{}: GGUF tokenizer model \"{kind}\" of architecture \"{arch}\" (supported: byte-level BPE, \
                 \"gpt2\", and Gemma 3's SentencePiece, \"llama\" in a gemma3 file); pass a tokenizer.json instead",
                meta.path().display()
            )))
        }
    };
    add_control_and_user_tokens(meta, &mut tok, &tokens, &types, kind == "gpt2")?;
    // transformers' default for a SentencePiece vocabulary that does not say (llama.cpp's too).
    let add_bos = meta.bool("tokenizer.ggml.add_bos_token").unwrap_or(kind == "llama");
    if add_bos {
        let bos = meta.u32("tokenizer.ggml.bos_token_id")?;
        let name = tokens.get(bos as usize).ok_or_else(|| {
            Error::Tokenizer(format!(
                "{}: tokenizer.ggml.bos_token_id {bos} is past the {} tokens of tokenizer.ggml.tokens",
                meta.path().display(),
                tokens.len()
            ))
        })?;
        let template = TemplateProcessing::builder()
            .try_single(format!("{name}:0 $A:0"))
            .and_then(|b| b.try_pair(format!("{name}:0 $A:0 {name}:1 $B:1")))
            .map_err(|e| Error::Tokenizer(format!("{}: BOS template: {e}", meta.path().display())))?
            .special_tokens(vec![(name.clone(), bos)])
            .build()
            .map_err(|e| Error::Tokenizer(format!("{}: BOS template: {e}", meta.path().display())))?;
        tok.with_post_processor(Some(template));
    }
    Ok(tok)
}

/// Llama 3's split of text into pieces before byte-level BPE (its `tokenizer.json`; transformers'
/// GGUF loader uses it for the `llama-bpe` pre-tokenizer and its aliases).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split (digits one by one), for the `qwen2` pre-tokenizer (Qwen2, Qwen2.5, Qwen3).
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex of a llama.cpp pre-tokenizer name (`tokenizer.ggml.pre`): `None` for GPT-2's
/// own (`gpt-2`, `smollm`, `default`), an error naming the supported ones otherwise.
fn pre_split(meta: &GgufMetadata, pre: &str) -> Result<Option<&'static str>> {
    match pre {
        "gpt-2" | "smollm" | "default" => Ok(None),
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" | "falcon3" => Ok(Some(LLAMA3_SPLIT)),
        "qwen2" | "deepseek-r1-qwen" => Ok(Some(QWEN2_SPLIT)),
        _ => Err(Error::Unsupported(format!(
            "{}: GGUF pre-tokenizer \"{pre}\" (supported: gpt-2, smollm, llama-bpe (Llama 3), qwen2; pass a \
             tokenizer.json instead)",
            meta.path().display()
        ))),
    }
}

/// Byte-level BPE (GPT-2's scheme) from the file's tokens and merges, the text split first as
/// its pre-tokenizer (`tokenizer.ggml.pre`) says.
fn byte_level_bpe(meta: &GgufMetadata, tokens: &[String]) -> Result<Tokenizer> {
    let split = match meta.string("tokenizer.ggml.pre") {
        Ok(pre) => pre_split(meta, &pre)?,
        Err(_) => None,
    };
    let merges = meta.strings("tokenizer.ggml.merges")?;
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
    let pairs: Vec<(&str, &str)> = merges.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    check_merges(&pairs, "", |t| vocab.contains_key(t))
        .map_err(|e| Error::Tokenizer(format!("{}: tokenizer.ggml.merges: {e}", meta.path().display())))?;
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| {
        Error::Tokenizer(format!("{}: cannot build the BPE tokenizer of the GGUF file: {e}", meta.path().display()))
    })?;
    let mut tok = Tokenizer::new(bpe);
    match split {
        None => tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false))),
        Some(regex) => {
            let bad = |e| Error::Tokenizer(format!("{}: the pre-tokenizer's split: {e}", meta.path().display()));
            let split =
                Split::new(SplitPattern::Regex(regex.into()), SplitDelimiterBehavior::Isolated, false).map_err(bad)?;
            let bytes = ByteLevel::default().add_prefix_space(false).use_regex(false);
            tok.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![split.into(), bytes.into()])))
        }
    };
    tok.with_decoder(Some(ByteLevel::default()));
    Ok(tok)
}

/// Gemma's SentencePiece-style BPE as transformers' `GemmaTokenizer` spells it: spaces normalized
/// to `▁`, byte fallback (`<0x..>` tokens), unknowns fused. A Gemma GGUF has no merges: they are
/// rebuilt from the vocabulary, every split of a token into two tokens, ranked by the merged
/// token's position in the file (Gemma's scores do not follow its merge order), longer left
/// pieces first. Tokens made only of whitespace with a space in them (`"  "`) are stored with
/// real spaces and respelled `▁▁` first.
fn gemma_bpe(meta: &GgufMetadata, tokens: &[String]) -> Result<Tokenizer> {
    let spelled: Vec<String> = tokens
        .iter()
        .map(|t| if t.contains(' ') && t.trim().is_empty() { "\u{2581}".repeat(t.chars().count()) } else { t.clone() })
        .collect();
    let vocab: tokenizers::models::bpe::Vocab =
        spelled.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut merges: Vec<(u32, usize, String, String)> = Vec::new();
    for (i, t) in spelled.iter().enumerate() {
        // A token listed twice ranks by its last position, once.
        if vocab[t] != i as u32 {
            continue;
        }
        let bounds: Vec<usize> = t.char_indices().map(|(b, _)| b).skip(1).collect();
        for b in bounds {
            let (l, r) = t.split_at(b);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                merges.push((i as u32, l.chars().count(), l.to_string(), r.to_string()));
            }
        }
    }
    merges.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let merges = merges.into_iter().map(|(_, _, l, r)| (l, r)).collect();
    let unk = meta
        .u32("tokenizer.ggml.unknown_token_id")
        .ok()
        .and_then(|u| spelled.get(u as usize).cloned())
        .unwrap_or_else(|| "<unk>".into());
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| {
            Error::Tokenizer(format!(
                "{}: cannot build Gemma's tokenizer from the GGUF file: {e}",
                meta.path().display()
            ))
        })?;
    let bad = |e: tokenizers::Error| Error::Tokenizer(format!("{}: Gemma's tokenizer: {e}", meta.path().display()));
    let mut tok = Tokenizer::new(bpe);
    tok.with_normalizer(Some(Replace::new(" ", "\u{2581}").map_err(bad)?)).map_err(bad)?;
    tok.with_pre_tokenizer(Some(
        Split::new(SplitPattern::String(" ".into()), SplitDelimiterBehavior::MergedWithPrevious, false).map_err(bad)?,
    ));
    tok.with_decoder(Some(DecoderSequence::new(vec![
        Replace::new("\u{2581}", " ").map_err(bad)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ])));
    Ok(tok)
}

/// The file's control tokens (type 3) as special tokens, and its user-defined ones (type 4, e.g.
/// Gemma's runs of newlines) as added tokens, both matched whole in the text as transformers
/// and llama.cpp do. In a byte-level vocabulary (`byte_level`) a control token spelled outside
/// the byte alphabet is a llama.cpp mislabel and is skipped, as transformers skips it.
fn add_control_and_user_tokens(
    meta: &GgufMetadata,
    tok: &mut Tokenizer,
    tokens: &[String],
    types: &[i32],
    byte_level: bool,
) -> Result<()> {
    let alphabet: std::collections::HashSet<char> = bytes_to_unicode().values().copied().collect();
    let typed = || tokens.iter().zip(types.iter().chain(std::iter::repeat(&0)));
    let special: Vec<AddedToken> = typed()
        .filter(|(t, ty)| **ty == 3 && (!byte_level || t.chars().all(|c| alphabet.contains(&c))))
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect();
    tok.add_special_tokens(special).map_err(|e| {
        Error::Tokenizer(format!("{}: cannot add the GGUF file's control tokens: {e}", meta.path().display()))
    })?;
    let vocab = tok.get_vocab(true);
    let user: Vec<AddedToken> = typed()
        .filter(|(t, ty)| **ty == 4 && vocab.contains_key(*t))
        .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
        .collect();
    tok.add_tokens(user).map_err(|e| {
        Error::Tokenizer(format!("{}: cannot add the GGUF file's user-defined tokens: {e}", meta.path().display()))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_bpe_merges;
    use serde_json::json;

    #[test]
    fn bpe_merges_must_join_two_tokens_into_a_third() {
        let vocab = json!({"h": 0, "e": 1, "he": 2, "##e": 3});
        let model = |merges| json!({"type": "BPE", "vocab": vocab, "merges": merges});
        assert!(check_bpe_merges(&model(json!(["h e", ["h", "e"]]))).is_ok());
        let e = check_bpe_merges(&model(json!(["he he"]))).unwrap_err();
        assert!(e.contains("merge 0 (`he` + `he`) needs the token `hehe`"), "{e}");
        assert!(check_bpe_merges(&model(json!([["h", "x"]]))).unwrap_err().contains("`x`"));
        assert!(check_bpe_merges(&model(json!(["he"]))).unwrap_err().contains("is not two tokens"));
        assert!(check_bpe_merges(&model(json!([7]))).unwrap_err().contains("expected"));
        // WordPiece-style continuation: `h` + `##e` makes `he`.
        let prefixed = json!({"vocab": vocab, "merges": ["h ##e"], "continuing_subword_prefix": "##"});
        assert!(check_bpe_merges(&prefixed).is_ok());
        // A model without merges (WordLevel) has nothing to check.
        assert!(check_bpe_merges(&json!({"type": "WordLevel", "vocab": vocab})).is_ok());
    }
}
