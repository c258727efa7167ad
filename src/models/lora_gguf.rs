//! llama.cpp's LoRA adapter format (`convert_lora_to_gguf.py`, `src/llama-adapter.cpp`), so that
//! an adapter runs in llama.cpp and what is built on it (`llama-cli --lora`, llama-server,
//! ollama, LM Studio) without merging the model.
//!
//! ```text
//! metadata: general.type = "adapter", general.architecture = the base's,
//!           adapter.type = "lora", adapter.lora.alpha = alpha (f32)
//! tensors:  <base tensor>.lora_a = A (r, in), <base tensor>.lora_b = B' (out, r)
//!           (e.g. blk.0.attn_q.weight.lora_a; ggml's ne reversed: [in, r], [r, out])
//! llama.cpp: y = W x + (alpha / r) B' (A x),  r read per tensor from lora_b
//! ```
//! The file has one alpha, so every other scaling (rsLoRA's `alpha / sqrt(r)`, a strategy of
//! one's own, `alpha_pattern`, a `rank_pattern` rank) is folded into `B' = (s r / alpha) B`: for
//! plain LoRA the factor is 1 and `B' = B`. For `llama` files the q and k rows of `B'` get the
//! permutation that llama.cpp's converter applies to the base's q and k weights.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::DType;

use super::llama::{permute_rows, rename, Llama};
use crate::convert::LoraFactors;
use crate::quantized::{fallback_type, type_name};
use crate::{Error, Result};

/// What [`Llama::save_lora_gguf`] wrote.
#[derive(Debug, Default, Clone)]
pub struct SavedLoraGguf {
    /// The number of adapted tensors (each a `lora_a` and a `lora_b`).
    pub tensors: usize,
    /// Tensors written in another type than asked (`q8_0` needs rows of a multiple of 32
    /// values; a rank of 16 is not), as `name (asked -> written)`.
    pub fallbacks: Vec<String>,
}

impl Llama {
    /// Writes the LoRA `factors` (of an adapter of this model) as a llama.cpp adapter file at
    /// `path`, with `adapter.lora.alpha = alpha` and tensors of type `outtype` (`f32`, `f16`,
    /// `bf16` or `q8_0`); see the module's doc. Errors for a module llama.cpp has no name for.
    pub fn save_lora_gguf(
        &self,
        factors: &[LoraFactors],
        alpha: f64,
        outtype: GgmlDType,
        path: &Path,
    ) -> Result<SavedLoraGguf> {
        if !matches!(outtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 | GgmlDType::Q8_0) {
            return Err(Error::config(
                "outtype",
                format!("{}; llama.cpp's adapters are f32, f16, bf16 or q8_0", type_name(outtype)),
            ));
        }
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(Error::config("alpha", format!("{alpha}; expected a positive number")));
        }
        let c = self.config();
        let family = c.family();
        let arch = family.gguf_architecture();
        let metadata = vec![
            ("general.type".to_string(), Value::String("adapter".into())),
            ("general.architecture".to_string(), Value::String(arch.into())),
            ("adapter.type".to_string(), Value::String("lora".into())),
            ("adapter.lora.alpha".to_string(), Value::F32(alpha as f32)),
        ];
        let mut saved = SavedLoraGguf::default();
        let mut tensors = Vec::new();
        for f in factors {
            let hf = format!("{}.weight", f.module);
            let name = rename(&hf, false, family).ok_or_else(|| {
                Error::Unsupported(format!(
                    "{}: llama.cpp has no tensor name for this module of a {arch} model",
                    f.module
                ))
            })?;
            let r = f.a.dim(0)?;
            let fold = f.scale * r as f64 / alpha;
            let b = (f.b.to_dtype(DType::F32)? * fold)?;
            let b = match name.rsplit('.').nth(1) {
                Some("attn_q") if arch == "llama" => permute_rows(&b, c.num_attention_heads)?,
                Some("attn_k") if arch == "llama" => permute_rows(&b, c.kv_heads())?,
                _ => b,
            };
            for (suffix, t) in [("lora_a", f.a.to_dtype(DType::F32)?), ("lora_b", b)] {
                let cols = t.dim(1)?;
                let written = fallback_type(outtype, cols);
                let full = format!("{name}.{suffix}");
                if written != outtype {
                    saved.fallbacks.push(format!("{full} ({} -> {})", type_name(outtype), type_name(written)));
                }
                tensors.push((full, QTensor::quantize(&t.contiguous()?, written)?));
            }
            saved.tensors += 1;
        }
        if tensors.is_empty() {
            return Err(Error::config("adapter", "it adapts no layer; there is nothing to export"));
        }
        crate::gguf::write_gguf(path, &metadata, &tensors)?;
        Ok(saved)
    }
}
