//! Trainable models whose linear layers carry adapters.

pub mod llama;

pub use crate::gguf::GgufMetadata;
pub use llama::{KvCache, Llama, LlamaConfig};

use std::path::Path;

use candle_core::{DType, Device};

use crate::Result;

/// Loads a model and its tokenizer from a GGUF file (tokenizer from its metadata) or an HF
/// directory (`config.json`, `*.safetensors`, `tokenizer.json`).
pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<(Llama, tokenizers::Tokenizer)> {
    if path.is_dir() {
        let model = Llama::from_hf_dir(path, device, dtype)?;
        Ok((model, crate::tokenizer::from_file(&path.join("tokenizer.json"))?))
    } else {
        let (model, meta) = Llama::from_gguf(path, device, dtype)?;
        Ok((model, crate::tokenizer::from_gguf(&meta)?))
    }
}
