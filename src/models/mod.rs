//! Trainable models whose linear layers carry adapters.

pub mod llama;

pub use crate::gguf::GgufMetadata;
pub use llama::{KvCache, Llama, LlamaConfig, SavedGguf};

use std::path::Path;

use candle_core::{DType, Device};

use crate::quantized::BaseQuant;
use crate::Result;

/// Loads a model and its tokenizer from a GGUF file (tokenizer from its metadata) or an HF
/// directory (`config.json`, `*.safetensors`, `tokenizer.json`).
pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<(Llama, tokenizers::Tokenizer)> {
    load_quantized(path, device, dtype, BaseQuant::None)
}

/// [`load`] with the frozen base kept quantized as `quant` says (QLoRA; see
/// [`Llama::from_gguf_quantized`] and [`Llama::from_hf_dir_quantized`]).
pub fn load_quantized(
    path: &Path,
    device: &Device,
    dtype: DType,
    quant: BaseQuant,
) -> Result<(Llama, tokenizers::Tokenizer)> {
    if path.is_dir() {
        let model = Llama::from_hf_dir_quantized(path, device, dtype, quant)?;
        Ok((model, crate::tokenizer::from_file(&path.join("tokenizer.json"))?))
    } else {
        let (model, meta) = Llama::from_gguf_quantized(path, device, dtype, quant)?;
        Ok((model, crate::tokenizer::from_gguf(&meta)?))
    }
}
