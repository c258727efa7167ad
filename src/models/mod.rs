//! Trainable models whose linear layers carry adapters.

pub mod llama;
pub mod lora_gguf;
pub mod rope;

pub use crate::gguf::GgufMetadata;
pub use llama::{Calibrated, Family, KvCache, Llama, LlamaConfig, SavedGguf};
pub use lora_gguf::SavedLoraGguf;

use std::path::Path;

use candle_core::{DType, Device};

use crate::quantized::BaseQuant;
use crate::Result;

/// The local path of a `--model` argument: the path itself when it exists, else the snapshot
/// directory of a Hub id (`org/name[@revision]`, see [`crate::hub`]). Errors say which of the
/// two it was taken for.
pub fn resolve(model: &Path) -> Result<std::path::PathBuf> {
    if model.exists() {
        return Ok(model.to_path_buf());
    }
    match model.to_str().map(|s| s.parse::<crate::hub::HubId>()) {
        Some(Ok(id)) => crate::hub::resolve_model(&id),
        _ => Err(crate::Error::io(
            model,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such GGUF file or model directory, and not a Hub id (org/name[@revision])",
            ),
        )),
    }
}

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
        let model = load_model(path, device, dtype, quant)?;
        Ok((model, crate::tokenizer::from_file(&path.join("tokenizer.json"))?))
    } else {
        let (model, meta) = Llama::from_gguf_quantized(path, device, dtype, quant)?;
        Ok((model, crate::tokenizer::from_gguf(&meta)?))
    }
}

/// The model of [`load_quantized`] without its tokenizer (for what needs only the weights:
/// converting or merging an adapter).
pub fn load_model(path: &Path, device: &Device, dtype: DType, quant: BaseQuant) -> Result<Llama> {
    if path.is_dir() {
        Llama::from_hf_dir_quantized(path, device, dtype, quant)
    } else {
        Ok(Llama::from_gguf_quantized(path, device, dtype, quant)?.0)
    }
}
