//! A trainable LLaMA (Touvron et al. 2023): RMSNorm, rotary position embeddings, grouped-query
//! attention and a SwiGLU MLP, with HF's module names, so that adapters injected here are keyed
//! as PEFT keys them (`model.layers.N.self_attn.q_proj`).
//!
//! The same decoder runs the families that share LLaMA's layout, by a few switches of
//! [`LlamaConfig`] (see [`Family`]): Llama 3's RoPE scaling and optional biases (`llama`),
//! Mistral's sliding-window attention (`mistral`), Qwen2's q/k/v biases and per-layer windows
//! (`qwen2`), Qwen3's RMSNorm of each query and key head before RoPE (`qwen3`), Gemma 3's
//! `(1 + w)` norms around attention and the MLP, GeGLU, scaled embeddings, local/global layers
//! and logit soft-capping (`gemma3_text`), Phi-3's fused `qkv_proj` / `gate_up_proj`, split after
//! the product (`phi3`). A config key that would change the math and is not implemented is
//! refused by name.
//!
//! ```text
//! h_0 = embed(ids)
//! h   = h + o_proj(attn(rope(q_proj(rms(h))), rope(k_proj(rms(h))), v_proj(rms(h))))   per layer
//! h   = h + down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))
//! logits = lm_head(rms(h))          (lm_head = embed^T when the embeddings are tied)
//! ```
//! Every op on the path from the adapters to the loss has a gradient on every device: the norms,
//! RoPE (HF's rotate-half form), attention and the SwiGLU gate are the fused ops of
//! [`crate::fused`], which keep only their inputs and output for the backward pass. Linears are
//! [`AdaptedLinear`]s whose frozen weights get no gradient.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, Var, D};
use serde::Deserialize;

use super::rope::{RopeParameters, RopeScaling};
use crate::format::read_safetensors;
use crate::frozen::FrozenWeight;
use crate::fused::{
    causal_attention_with, geglu_tanh, padded_attention, rms_norm, rope, rope_attention_cpu, swiglu, Attention,
};
use crate::gguf::GgufMetadata;
use crate::gptq::InputGram;
use crate::layer::AdaptedLinear;
use crate::peft_model::{LinearHost, PeftModel};
use crate::quantized::{type_name, BaseQuant, QuantizedWeight};
use crate::{Error, Result};

/// The fields of an HF `config.json` that a LLaMA needs.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct LlamaConfig {
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (GQA); defaults to `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (older configs); see also `rope_parameters`.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE parameters (transformers >= 5): `rope_type` default, linear or llama3 (see
    /// [`RopeParameters`]).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// RoPE scaling (older configs), read as `rope_parameters` is.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// `model_type`: `llama` (the default), `mistral`, `qwen2` or `qwen3` (see [`Family`]).
    #[serde(default)]
    pub model_type: Option<String>,
    /// Biases on q/k/v/o (LLaMA's and Qwen3's `attention_bias`; Qwen2 always has them on q/k/v).
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on gate/up/down (LLaMA's `mlp_bias`).
    #[serde(default)]
    pub mlp_bias: bool,
    /// The sliding-window length (Mistral: every layer; Qwen2/3: see `use_sliding_window`).
    /// A Mistral `config.json` without the key gets transformers' default, 4096.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2/3: whether `sliding_window` is used at all (released Qwen configs say false).
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Qwen2/3: the layers from this index on slide (when `layer_types` is absent); default 28.
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// Per layer, `full_attention` or `sliding_attention` (transformers >= 5 writes it).
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// The MLP's activation; only `silu` (SwiGLU) is supported.
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// The config's other keys, kept (and written back by [`Llama::save_hf_dir`]); those known
    /// to change the math are refused by [`LlamaConfig::validate`].
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// The decoder families [`Llama`] implements: LLaMA's layout with a few switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// LLaMA 1-3 (`llama`): optional `attention_bias` / `mlp_bias`, Llama 3's RoPE scaling.
    Llama,
    /// Mistral (`mistral`): no biases, sliding-window attention on every layer when set.
    Mistral,
    /// Qwen2 / Qwen2.5 (`qwen2`): biases on q/k/v, sliding window on the layers from
    /// `max_window_layers` on when `use_sliding_window`.
    Qwen2,
    /// Qwen3 (`qwen3`): RMSNorm of each query and key head before RoPE, `head_dim` 128 by
    /// default, Qwen2's windows.
    Qwen3,
    /// Gemma 3's text model (`gemma3_text`; Gemma Team 2025): `(1 + w)` RMSNorms, also after
    /// attention and around the MLP and on each query and key head; embeddings scaled by
    /// `sqrt(hidden)`; a GeGLU MLP (tanh GELU); queries scaled by `query_pre_attn_scalar^-1/2`;
    /// local sliding-window layers (RoPE base `rope_local_base_freq`) and global ones (every
    /// `sliding_window_pattern`-th, RoPE base `rope_theta` with its scaling); `head_dim` 256
    /// and tied embeddings by default.
    Gemma3,
    /// Phi-3 mini (`phi3`; Abdin et al. 2024): LLaMA's math with q, k and v fused into
    /// one `qkv_proj` and gate and up into one `gate_up_proj` (which PEFT adapters target as
    /// such), no biases, a sliding window on every layer when set. LongRoPE (the 128k-context
    /// models, Phi-3.5) is refused.
    Phi3,
}

impl Family {
    /// Every family with its `model_type`.
    pub const ALL: [(&'static str, Family); 6] = [
        ("llama", Family::Llama),
        ("mistral", Family::Mistral),
        ("qwen2", Family::Qwen2),
        ("qwen3", Family::Qwen3),
        ("gemma3_text", Family::Gemma3),
        ("phi3", Family::Phi3),
    ];

    /// The family of a `model_type`.
    pub fn from_model_type(t: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == t).map(|(_, f)| *f)
    }

    /// The `model_type`.
    pub fn model_type(self) -> &'static str {
        Self::ALL.iter().find(|(_, f)| *f == self).map(|(n, _)| *n).expect("every family is listed")
    }

    /// transformers' class (`architectures` of a config.json).
    pub fn architecture(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
            Self::Gemma3 => "Gemma3ForCausalLM",
            Self::Phi3 => "Phi3ForCausalLM",
        }
    }

    /// llama.cpp's `general.architecture` (Mistral's checkpoints convert to `llama`).
    pub fn gguf_architecture(self) -> &'static str {
        match self {
            Self::Llama | Self::Mistral => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma3 => "gemma3",
            Self::Phi3 => "phi3",
        }
    }
}

/// Config keys that change the forward pass of some model and are not implemented: refused when
/// set (to something other than their neutral value), by name.
const UNSUPPORTED_KEYS: [(&str, &str); 8] = [
    ("quantization_config", "pre-quantized weights (bitsandbytes, GPTQ, AWQ, FP8, ...)"),
    ("compression_config", "compressed weights"),
    ("partial_rotary_factor", "partial rotary embeddings"),
    ("attn_logit_softcapping", "soft-capping of the attention scores"),
    ("final_logit_softcapping", "soft-capping of the logits"),
    ("query_pre_attn_scalar", "a query scale other than 1 / sqrt(head_dim)"),
    ("num_local_experts", "mixture-of-experts layers"),
    ("num_experts", "mixture-of-experts layers"),
];

fn default_eps() -> f64 {
    1e-6
}

impl LlamaConfig {
    /// Reads and checks a `config.json` (see [`LlamaConfig::validate`]); errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bad = |e: serde_json::Error| Error::Config {
            path: path.to_path_buf(),
            reason: format!("not a config.json of a LLaMA-family model: {e}"),
        };
        let raw: serde_json::Value = serde_json::from_str(&text).map_err(bad)?;
        let mut c: Self = serde_json::from_value(raw.clone()).map_err(bad)?;
        // transformers' Mistral, Qwen2 and Qwen3 configs default the window to 4096 when the key
        // is absent (Qwen's applies only with use_sliding_window); Phi-3's to none.
        if !matches!(c.family(), Family::Llama | Family::Phi3) && raw.get("sliding_window").is_none() {
            c.sliding_window = Some(4096);
        }
        // Phi3Config's default epsilon.
        if c.family() == Family::Phi3 && raw.get("rms_norm_eps").is_none() {
            c.rms_norm_eps = 1e-5;
        }
        // Gemma3TextConfig ties the embeddings unless told otherwise.
        if c.family() == Family::Gemma3 && raw.get("tie_word_embeddings").is_none() {
            c.tie_word_embeddings = true;
        }
        c.check(Some(path), &|field| field.to_string())?;
        Ok(c)
    }

    /// Checks that the config describes a model that can be built: a `model_type` of a
    /// [`Family`], no size of zero, query heads that split `hidden_size` evenly (unless
    /// `head_dim` is given) into heads of even width (RoPE rotates pairs), key/value heads that
    /// divide the query heads, a positive `rms_norm_eps`, `hidden_act` silu, a RoPE base and
    /// scaling of [`RopeParameters`], valid `layer_types`, and none of the keys that change the
    /// math without being implemented here (soft-capping, partial rotary, mixture of experts,
    /// ...). Every constructor of [`Llama`] calls it; the error is an [`Error::ModelConfig`]
    /// naming the field.
    pub fn validate(&self) -> Result<()> {
        self.check(None, &|field| field.to_string())
    }

    /// [`LlamaConfig::validate`], with errors naming `path` and each field as `name` spells it
    /// (a GGUF key, a field of a sweep config, ...).
    pub(crate) fn check(&self, path: Option<&Path>, name: &dyn Fn(&str) -> String) -> Result<()> {
        let fail = |field: &str, reason: String| {
            Err(Error::ModelConfig { path: path.map(Path::to_path_buf), field: name(field), reason })
        };
        let sizes = [
            ("hidden_size", self.hidden_size, "the model width"),
            ("intermediate_size", self.intermediate_size, "the MLP width"),
            ("num_hidden_layers", self.num_hidden_layers, "the number of decoder layers"),
            ("num_attention_heads", self.num_attention_heads, "the number of query heads"),
            ("vocab_size", self.vocab_size, "the number of tokens"),
        ];
        for (field, value, what) in sizes {
            if value == 0 {
                return fail(field, format!("is 0; expected at least 1 ({what})"));
            }
        }
        let (hidden, heads) = (self.hidden_size, self.num_attention_heads);
        if self.num_key_value_heads == Some(0) {
            return fail(
                "num_key_value_heads",
                format!(
                    "is 0; expected at least 1 (the number of key/value heads), at most {} ({heads})",
                    name("num_attention_heads")
                ),
            );
        }
        let kv = self.kv_heads();
        if heads % kv != 0 {
            return fail(
                "num_key_value_heads",
                format!(
                    "is {kv}, which does not divide {} ({heads}); expected a divisor of it (each key/value \
                     head serves a whole group of query heads)",
                    name("num_attention_heads")
                ),
            );
        }
        let family = match self.model_type.as_deref() {
            None => Family::Llama,
            Some(t) => match Family::from_model_type(t) {
                Some(f) => f,
                None => {
                    let names: Vec<&str> = Family::ALL.iter().map(|(n, _)| *n).collect();
                    return fail(
                        "model_type",
                        format!(
                            "is \"{t}\", which this decoder does not implement; expected one of {}",
                            names.join(", ")
                        ),
                    );
                }
            },
        };
        match self.head_dim {
            Some(d) if d == 0 || d % 2 == 1 => {
                return fail(
                    "head_dim",
                    format!("is {d}; expected a positive even number (rotary embeddings rotate pairs of dimensions)"),
                )
            }
            Some(_) => {}
            None if matches!(family, Family::Qwen3 | Family::Gemma3) => {}
            None if hidden % heads != 0 => {
                return fail(
                    "num_attention_heads",
                    format!(
                        "is {heads}, which does not divide {} ({hidden}); expected a divisor of it (each head is \
                         {} / {} wide)",
                        name("hidden_size"),
                        name("hidden_size"),
                        name("num_attention_heads")
                    ),
                )
            }
            None if (hidden / heads) % 2 == 1 => {
                return fail(
                    "num_attention_heads",
                    format!(
                        "is {heads}, which makes heads {hidden} / {heads} = {} wide; expected heads of even width \
                         (rotary embeddings rotate pairs of dimensions)",
                        hidden / heads
                    ),
                )
            }
            None => {}
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return fail(
                "rms_norm_eps",
                format!("is {}; expected a small positive number such as 1e-6", self.rms_norm_eps),
            );
        }
        if family == Family::Gemma3 {
            // Gemma3TextConfig reads `hidden_activation` (and ignores `hidden_act`).
            if let Some(act) = self.other_str("hidden_activation").filter(|a| *a != "gelu_pytorch_tanh") {
                return fail(
                    "hidden_activation",
                    format!("is \"{act}\"; only gelu_pytorch_tanh (Gemma's GeGLU) is supported"),
                );
            }
        } else if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return fail("hidden_act", format!("is \"{act}\"; only silu (a SwiGLU MLP) is supported"));
        }
        if self.sliding_window == Some(0) {
            return fail("sliding_window", "is 0; expected the number of keys each query sees, or null".into());
        }
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return fail(
                    "layer_types",
                    format!(
                        "has {} entries; expected one per layer ({} = {})",
                        types.len(),
                        name("num_hidden_layers"),
                        self.num_hidden_layers
                    ),
                );
            }
            if let Some(bad) = types.iter().find(|t| !["full_attention", "sliding_attention"].contains(&t.as_str())) {
                return fail("layer_types", format!("has \"{bad}\"; expected full_attention or sliding_attention"));
            }
        }
        for (key, what) in UNSUPPORTED_KEYS {
            // Gemma's query scale and logit soft-capping are implemented; its attention
            // soft-capping is a config field that transformers' Gemma 3 never applies.
            if family == Family::Gemma3
                && ["query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"].contains(&key)
            {
                continue;
            }
            let neutral =
                |v: &serde_json::Value| v.is_null() || (key == "partial_rotary_factor" && v.as_f64() == Some(1.0));
            if let Some(v) = self.other.get(key).filter(|v| !neutral(v)) {
                return fail(key, format!("is {v}: {what}, which this decoder does not implement; expected null"));
            }
        }
        for sliding in [false, true] {
            if let Err((field, reason)) = self.rope_for(sliding) {
                return fail(&field, reason);
            }
        }
        for key in ["query_pre_attn_scalar", "final_logit_softcapping"] {
            if let Some(s) = self.other.get(key).filter(|v| !v.is_null()) {
                if !s.as_f64().is_some_and(|s| s.is_finite() && s > 0.0) {
                    return fail(key, format!("is {s}; expected a positive number"));
                }
            }
        }
        Ok(())
    }

    /// A string of the config's other keys.
    fn other_str(&self, key: &str) -> Option<&str> {
        self.other.get(key).and_then(|v| v.as_str())
    }

    /// A number of the config's other keys.
    fn other_f64(&self, key: &str) -> Option<f64> {
        self.other.get(key).and_then(|v| v.as_f64())
    }

    /// Gemma's soft-capping of the logits (`final_logit_softcapping`; null in Gemma 3's
    /// configs, set in Gemma 2's); the key is refused for the other families.
    pub fn final_logit_softcapping(&self) -> Option<f64> {
        self.other_f64("final_logit_softcapping").filter(|_| self.family() == Family::Gemma3)
    }

    /// What a norm adds to its stored weight: 1 for Gemma (`x_hat (1 + w)`), else 0.
    pub fn norm_offset(&self) -> f64 {
        if self.family() == Family::Gemma3 {
            1.0
        } else {
            0.0
        }
    }

    /// The factor of the attention scores: `query_pre_attn_scalar^-1/2` for Gemma 3 (256 by
    /// default), else `None` (`1 / sqrt(head_dim)`).
    pub fn attention_scale(&self) -> Option<f64> {
        (self.family() == Family::Gemma3).then(|| 1.0 / self.other_f64("query_pre_attn_scalar").unwrap_or(256.0).sqrt())
    }

    /// The decoder family of `model_type` (LLaMA when absent); [`LlamaConfig::validate`] refuses
    /// other types.
    pub fn family(&self) -> Family {
        self.model_type.as_deref().and_then(Family::from_model_type).unwrap_or(Family::Llama)
    }

    /// Whether q, k and v have biases.
    pub fn qkv_bias(&self) -> bool {
        match self.family() {
            Family::Qwen2 => true,
            Family::Llama | Family::Qwen3 | Family::Gemma3 => self.attention_bias,
            Family::Mistral | Family::Phi3 => false,
        }
    }

    /// Whether o has a bias.
    pub fn o_bias(&self) -> bool {
        matches!(self.family(), Family::Llama | Family::Qwen3 | Family::Gemma3) && self.attention_bias
    }

    /// Whether gate, up and down have biases.
    pub fn mlp_has_bias(&self) -> bool {
        self.family() == Family::Llama && self.mlp_bias
    }

    /// Whether q/k/v and gate/up are fused into one linear each (Phi-3).
    pub fn fused_projections(&self) -> bool {
        self.family() == Family::Phi3
    }

    /// The HF names (after `model.layers.N.`) of a layer's linears: [`LAYER_LINEARS`], or
    /// [`FUSED_LAYER_LINEARS`] for Phi-3.
    pub fn layer_linears(&self) -> &'static [&'static str] {
        if self.fused_projections() {
            &FUSED_LAYER_LINEARS
        } else {
            &LAYER_LINEARS
        }
    }

    /// Whether each linear of a layer has a bias, in the order of
    /// [`LlamaConfig::layer_linears`].
    pub fn linear_biases(&self) -> Vec<bool> {
        if self.fused_projections() {
            return vec![false; FUSED_LAYER_LINEARS.len()];
        }
        let (qkv, mlp) = (self.qkv_bias(), self.mlp_has_bias());
        vec![qkv, qkv, qkv, self.o_bias(), mlp, mlp, mlp]
    }

    /// The `(out, in)` shape of each linear of a layer, in the order of
    /// [`LlamaConfig::layer_linears`].
    pub fn linear_shapes(&self) -> Vec<(usize, usize)> {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let (q, kv) = (self.num_attention_heads * hd, self.kv_heads() * hd);
        if self.fused_projections() {
            vec![(q + 2 * kv, h), (h, q), (2 * i, h), (h, i)]
        } else {
            vec![(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
        }
    }

    /// Whether each query and key head is RMS-normalized before RoPE (Qwen3).
    pub fn qk_norm(&self) -> bool {
        matches!(self.family(), Family::Qwen3 | Family::Gemma3)
    }

    /// The sliding window of layer `i`, `None` for full causal attention: Mistral's on every
    /// layer; for Qwen2/3, `layer_types` or else the layers from `max_window_layers` on, when
    /// `use_sliding_window`; never for LLaMA (transformers' LLaMA has no window).
    pub fn layer_window(&self, i: usize) -> Option<usize> {
        let window = self.sliding_window?;
        let by_types = || self.layer_types.as_ref().and_then(|t| t.get(i)).map(|t| t == "sliding_attention");
        let slides = match self.family() {
            Family::Mistral | Family::Phi3 => true,
            Family::Qwen2 | Family::Qwen3 => {
                self.use_sliding_window && by_types().unwrap_or(i >= self.max_window_layers.unwrap_or(28))
            }
            // transformers' LlamaModel builds only the causal mask.
            Family::Llama => false,
            // Every `sliding_window_pattern`-th layer (6) is global.
            Family::Gemma3 => by_types().unwrap_or_else(|| {
                let pattern = self.other_f64("sliding_window_pattern").map_or(6, |p| p as usize).max(1);
                (i + 1) % pattern != 0
            }),
        };
        slides.then_some(window)
    }

    /// The RoPE base and scaling (see [`RopeParameters::from_config`]) of the full-attention
    /// layers; the error is the field and what is wrong with it.
    fn rope(&self) -> std::result::Result<RopeParameters, (String, String)> {
        self.rope_for(false)
    }

    /// The RoPE of the sliding-window layers (`sliding`) or the others. They differ for Gemma 3
    /// only: `rope_parameters` nested by layer type (transformers >= 5), or `rope_theta` (1e6)
    /// with `rope_scaling` for the global layers and `rope_local_base_freq` (1e4), unscaled,
    /// for the local ones.
    fn rope_for(&self, sliding: bool) -> std::result::Result<RopeParameters, (String, String)> {
        if self.family() != Family::Gemma3 {
            return RopeParameters::from_config(
                self.rope_parameters.as_ref(),
                self.rope_theta,
                self.rope_scaling.as_ref(),
                10_000.0,
            );
        }
        let kind = if sliding { "sliding_attention" } else { "full_attention" };
        if let Some(nested) = self.rope_parameters.as_ref().and_then(|p| p.get(kind)) {
            let default = if sliding { 1e4 } else { 1e6 };
            return RopeParameters::from_config(Some(nested), None, None, default).map_err(|(field, reason)| {
                (field.replacen("rope_parameters", &format!("rope_parameters.{kind}"), 1), reason)
            });
        }
        if sliding {
            RopeParameters::from_config(None, self.other_f64("rope_local_base_freq"), None, 1e4)
        } else {
            RopeParameters::from_config(self.rope_parameters.as_ref(), self.rope_theta, self.rope_scaling.as_ref(), 1e6)
        }
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width: `head_dim`, else 128 for Qwen3 and `hidden_size / num_attention_heads`
    /// for the others (0 when `num_attention_heads` is 0, which [`LlamaConfig::validate`]
    /// refuses).
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or_else(|| match self.family() {
            Family::Qwen3 => 128,
            Family::Gemma3 => 256,
            _ => self.hidden_size.checked_div(self.num_attention_heads).unwrap_or(0),
        })
    }

    /// The RoPE inverse frequencies, `head_dim / 2` of them, of the full-attention layers and of
    /// the sliding-window ones.
    pub fn rope_inv_freq(&self) -> Result<[Vec<f32>; 2]> {
        let freqs = |sliding| -> Result<Vec<f32>> {
            let rope =
                self.rope_for(sliding).map_err(|(field, reason)| Error::ModelConfig { path: None, field, reason })?;
            Ok(rope.inv_freq(self.head_dim()))
        };
        Ok([freqs(false)?, freqs(true)?])
    }
}

/// The GGUF key (or tensor) that a [`LlamaConfig`] field is read from in a file of architecture
/// `arch`, for error messages.
fn gguf_field(arch: &str, field: &str) -> String {
    let key = match field {
        "hidden_size" => "embedding_length",
        "intermediate_size" => "feed_forward_length",
        "num_hidden_layers" => "block_count",
        "num_attention_heads" => "attention.head_count",
        "num_key_value_heads" => "attention.head_count_kv",
        "head_dim" => "attention.key_length",
        "rms_norm_eps" => "attention.layer_norm_rms_epsilon",
        "rope_theta" => "rope.freq_base",
        "vocab_size" => return "the row count of token_embd.weight (the vocabulary size)".into(),
        other => return other.into(),
    };
    format!("{arch}.{key}")
}

/// The linears of a decoder layer, by their HF names (relative to `model.layers.N`), in the
/// order of each decoder layer's `linears`.
pub const LAYER_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];
/// Phi-3's linears: q, k and v fused (rows in that order), gate and up fused (gate first).
pub const FUSED_LAYER_LINEARS: [&str; 4] =
    ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"];

/// One decoder layer. Norm weights are held as the multipliers the norms apply: Gemma's
/// `1 + w` (see [`LlamaConfig::norm_offset`]).
#[derive(Debug)]
struct Block {
    /// Before attention (`input_layernorm`).
    attn_norm: Tensor,
    /// Before the MLP (`post_attention_layernorm`; Gemma's `pre_feedforward_layernorm`).
    mlp_norm: Tensor,
    /// Gemma's norms of the attention's and the MLP's outputs (`post_attention_layernorm`,
    /// `post_feedforward_layernorm`).
    output_norms: Option<(Tensor, Tensor)>,
    /// Qwen3's and Gemma's per-head RMSNorm weights of the queries and keys (`head_dim`).
    qk_norm: Option<(Tensor, Tensor)>,
    /// The sliding window of this layer's attention, if it has one.
    window: Option<usize>,
    /// The linears of [`LlamaConfig::layer_linears`]: q, k, v, o, gate, up, down, or Phi-3's
    /// qkv, o, gate_up, down.
    linears: Vec<AdaptedLinear>,
}

impl Block {
    /// The queries, keys and values of `x`, each `(.., heads * head_dim)`.
    fn qkv(&self, x: &Tensor, c: &LlamaConfig) -> Result<[Tensor; 3]> {
        let l = &self.linears;
        if !c.fused_projections() {
            return Ok([l[0].forward_checked(x)?, l[1].forward_checked(x)?, l[2].forward_checked(x)?]);
        }
        let (q, kv) = (c.num_attention_heads * c.head_dim(), c.kv_heads() * c.head_dim());
        let qkv = l[0].forward_checked(x)?;
        let last = qkv.rank() - 1;
        Ok([qkv.narrow(last, 0, q)?, qkv.narrow(last, q, kv)?, qkv.narrow(last, q + kv, kv)?])
    }

    /// The attention output projection.
    fn o(&self, c: &LlamaConfig) -> &AdaptedLinear {
        &self.linears[if c.fused_projections() { 1 } else { 3 }]
    }

    /// The MLP's gate and up projections of `x`.
    fn gate_up(&self, x: &Tensor, c: &LlamaConfig) -> Result<[Tensor; 2]> {
        let l = &self.linears;
        if !c.fused_projections() {
            return Ok([l[4].forward_checked(x)?, l[5].forward_checked(x)?]);
        }
        let both = l[2].forward_checked(x)?;
        let last = both.rank() - 1;
        let i = c.intermediate_size;
        Ok([both.narrow(last, 0, i)?, both.narrow(last, i, i)?])
    }

    /// The MLP's down projection (the layer's last linear).
    fn down(&self) -> &AdaptedLinear {
        self.linears.last().expect("a layer has linears")
    }
}

impl Block {
    /// The HF names (after `model.layers.N.`) of a layer's norms, in the order of [`Block::norms`].
    fn norm_names(config: &LlamaConfig) -> Vec<&'static str> {
        let mut names = vec!["input_layernorm"];
        if config.family() == Family::Gemma3 {
            names.extend(["pre_feedforward_layernorm", "post_attention_layernorm", "post_feedforward_layernorm"]);
        } else {
            names.push("post_attention_layernorm");
        }
        if config.qk_norm() {
            names.extend(["self_attn.q_norm", "self_attn.k_norm"]);
        }
        names
    }

    /// The layer's norm weights, in the order of [`Block::norm_names`].
    fn norms(&self) -> Vec<&Tensor> {
        let mut norms = vec![&self.attn_norm, &self.mlp_norm];
        if let Some((a, m)) = &self.output_norms {
            norms.extend([a, m]);
        }
        if let Some((q, k)) = &self.qk_norm {
            norms.extend([q, k]);
        }
        norms
    }
}

/// The keys and values of the positions a [`Llama`] has seen, per layer, for
/// [`Llama::forward_cached`].
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    /// Per batch row, the positions of its left padding (`0..starts[i]`), hidden from the row's
    /// tokens; empty when no row is padded.
    starts: Vec<usize>,
}

impl KvCache {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A LLaMA whose linears can carry adapters.
#[derive(Debug)]
pub struct Llama {
    config: LlamaConfig,
    embed_tokens: FrozenWeight,
    dtype: DType,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Option<AdaptedLinear>,
    /// RoPE's inverse frequencies (`head_dim / 2`) of the full-attention and the sliding-window
    /// layers.
    inv_freq: [Vec<f32>; 2],
}

impl Llama {
    /// Builds the model from HF tensor names (`model.embed_tokens.weight`, ...), cast to `dtype`.
    /// Errors when the config does not pass [`LlamaConfig::validate`].
    pub fn from_tensors(config: LlamaConfig, tensors: &BTreeMap<String, Tensor>, dtype: DType) -> Result<Self> {
        Self::from_weights(config, tensors, BTreeMap::new(), dtype)
    }

    /// [`Llama::from_tensors`] with some weights kept quantized: a name in `quantized` is taken
    /// from there (linears and the embeddings), any other from `tensors`.
    fn from_weights(
        config: LlamaConfig,
        tensors: &BTreeMap<String, Tensor>,
        mut quantized: BTreeMap<String, QuantizedWeight>,
        dtype: DType,
    ) -> Result<Self> {
        config.validate()?;
        let has_head = tensors.contains_key("lm_head.weight") || quantized.contains_key("lm_head.weight");
        let mut frozen = |name: &str| -> Result<FrozenWeight> {
            match quantized.remove(name) {
                Some(q) => Ok(q.into()),
                None => Ok(get_tensor(tensors, name, dtype)?.into()),
            }
        };
        let get = |name: &str| get_tensor(tensors, name, dtype);
        let family = config.family();
        // A norm's multiplier: Gemma stores `w` for `1 + w`.
        let norm = |name: &str| -> Result<Tensor> {
            let offset = config.norm_offset();
            if offset == 0.0 {
                return get(name);
            }
            Ok((get_tensor(tensors, name, DType::F32)? + offset)?.to_dtype(dtype)?)
        };
        let mut linear = |name: &str, has_bias: bool| -> Result<AdaptedLinear> {
            let bias_name = format!("{name}.bias");
            let bias = match (has_bias, tensors.contains_key(&bias_name)) {
                (true, _) => Some(get(&bias_name)?),
                (false, false) => None,
                (false, true) => {
                    return Err(Error::Unsupported(format!(
                        "the weights have `{bias_name}`, which a {} config without attention_bias / mlp_bias does \
                         not use; set the config's bias flag, or remove the tensor",
                        family.model_type()
                    )))
                }
            };
            AdaptedLinear::new(frozen(&format!("{name}.weight"))?, bias)
        };
        let biases = config.linear_biases();
        // No capacity from the config: a corrupt `num_hidden_layers` (1e9) fails at its first
        // missing layer instead of allocating that many.
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let linears: Vec<AdaptedLinear> = config
                .layer_linears()
                .iter()
                .zip(&biases)
                .map(|(n, bias)| linear(&format!("{p}.{n}"), *bias))
                .collect::<Result<_>>()?;
            let mut norms = Block::norm_names(&config)
                .into_iter()
                .map(|n| norm(&format!("{p}.{n}.weight")))
                .collect::<Result<Vec<_>>>()?
                .into_iter();
            let mut next = || norms.next().expect("a norm per name");
            let (attn_norm, mlp_norm) = (next(), next());
            let output_norms = (family == Family::Gemma3).then(|| (next(), next()));
            let qk_norm = config.qk_norm().then(|| (next(), next()));
            layers.push(Block { attn_norm, mlp_norm, output_norms, qk_norm, window: config.layer_window(i), linears });
        }
        let lm_head = match (config.tie_word_embeddings, has_head) {
            (false, _) | (true, true) => Some(linear("lm_head", false)?),
            (true, false) => None,
        };
        Ok(Self {
            embed_tokens: frozen("model.embed_tokens.weight")?,
            dtype,
            norm: norm("model.norm.weight")?,
            layers,
            lm_head,
            inv_freq: config.rope_inv_freq()?,
            config,
        })
    }

    /// A randomly initialised model (weights `N(0, 0.02^2)`, norms 1) drawn from `seed`, for
    /// examples and tests that need no checkpoint. Errors when the config does not pass
    /// [`LlamaConfig::validate`].
    pub fn random(config: LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        Self::random_quantized(config, seed, device, DType::F32, BaseQuant::None)
    }

    /// [`Llama::random`] computing in `dtype`, with the 2-D weights quantized to the type of
    /// `quant` as each is drawn (so that a large model never exists in f32 at once: a memory
    /// benchmark's base). [`BaseQuant::Keep`] keeps them dense, as `None` does.
    pub fn random_quantized(
        config: LlamaConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
        quant: BaseQuant,
    ) -> Result<Self> {
        config.validate()?;
        use rand::SeedableRng;
        use rand_distr::{Distribution, Normal};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = Normal::new(0f32, 0.02).expect("valid std");
        let mut loading = Loading::new(quant.target(), dtype);
        let mut draw = |name: String, shape: (usize, usize)| -> Result<()> {
            let data: Vec<f32> = (0..shape.0 * shape.1).map(|_| normal.sample(&mut rng)).collect();
            loading.add(name.clone(), &name, Tensor::from_vec(data, shape, device)?)
        };
        let (h, hd) = (config.hidden_size, config.head_dim());
        draw("model.embed_tokens.weight".to_string(), (config.vocab_size, h))?;
        if !config.tie_word_embeddings {
            draw("lm_head.weight".to_string(), (config.vocab_size, h))?;
        }
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            for (name, shape) in config.layer_linears().iter().zip(config.linear_shapes()) {
                draw(format!("{p}.{name}.weight"), shape)?;
            }
        }
        // Norms that multiply by 1: weights of 1, or Gemma's 0 (for `1 + w`).
        let unit = |n: usize| Tensor::full(1.0 - config.norm_offset() as f32, n, device);
        loading.tensors.insert("model.norm.weight".to_string(), unit(h)?);
        let biases = config.linear_biases();
        let bias_sizes = config.linear_shapes().into_iter().map(|(out, _)| out);
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            for name in Block::norm_names(&config) {
                let width = if name.starts_with("self_attn.") { hd } else { h };
                loading.tensors.insert(format!("{p}.{name}.weight"), unit(width)?);
            }
            for ((name, size), _) in
                config.layer_linears().iter().zip(bias_sizes.clone()).zip(&biases).filter(|(_, b)| **b)
            {
                loading.tensors.insert(format!("{p}.{name}.bias"), Tensor::zeros(size, DType::F32, device)?);
            }
        }
        loading.build(config, "random weights")
    }

    /// Loads an HF model directory: `config.json` and one or more `*.safetensors` files.
    pub fn from_hf_dir(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::from_hf_dir_quantized(dir, device, dtype, BaseQuant::None)
    }

    /// [`Llama::from_hf_dir`] with the linears and embeddings quantized on load to the type of
    /// `quant` (QLoRA from an HF checkpoint); [`BaseQuant::Keep`] is for GGUF files and is refused.
    pub fn from_hf_dir_quantized(dir: &Path, device: &Device, dtype: DType, quant: BaseQuant) -> Result<Self> {
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        // Sharded checkpoints: the shards the index names, each of which must be there.
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            crate::format::safetensors_index_files(&index)?.iter().map(|f| dir.join(f)).collect()
        } else {
            let mut files: Vec<_> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension().is_some_and(|e| e == "safetensors") && !p.ends_with("adapter_model.safetensors")
                })
                .collect();
            files.sort();
            files
        };
        if files.is_empty() {
            return Err(Error::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no *.safetensors weights in the model directory",
                ),
            });
        }
        let wanted = match quant {
            BaseQuant::None => None,
            BaseQuant::Keep => {
                return Err(Error::config(
                    "base_quant",
                    format!(
                        "`keep` keeps a GGUF file's own quantized types, and {} is an HF directory; pick a type to \
                         quantize its weights to (q8_0, q4_k, ...) or none",
                        dir.display()
                    ),
                ))
            }
            BaseQuant::To(t) => Some(t),
        };
        let mut loading = Loading::new(wanted, dtype);
        for f in files {
            for (name, t) in read_safetensors(&f, device)? {
                loading.add(name.clone(), &name, t)?;
            }
        }
        loading.build(config, &dir.display().to_string())
    }

    /// Loads a llama.cpp GGUF file (`general.architecture` `llama`, which includes Mistral,
    /// `qwen2`, `qwen3`, `gemma3` or `phi3`): every tensor dequantized to f32 then cast to
    /// `dtype`, renamed to HF's names, with llama.cpp's q/k row permutation (`llama` files)
    /// undone and Gemma's `1 + w` norms stored back as `w`, so that the weights are in HF layout
    /// (and PEFT adapters fit them). What the file does not say is llama.cpp's: a Gemma 3 file
    /// has a global layer every 6th, local RoPE base 1e4 (or `rope.freq_base_swa`) and queries
    /// scaled by `1 / sqrt(head_dim)`; Llama 3's RoPE scaling is read back from the
    /// `rope_freqs` divisors ([`RopeParameters::from_llama_cpp_divisors`]).
    pub fn from_gguf(path: &Path, device: &Device, dtype: DType) -> Result<(Self, GgufMetadata)> {
        Self::from_gguf_quantized(path, device, dtype, BaseQuant::None)
    }

    /// [`Llama::from_gguf`] with the linears and embeddings kept quantized: in the file's own
    /// types ([`BaseQuant::Keep`]; F32 tensors stay dense), or requantized from the dequantized
    /// values ([`BaseQuant::To`]). Products are computed in `dtype`. The q/k row permutation is
    /// undone on the quantized rows (GGUF quantizes within a row, so this is exact).
    pub fn from_gguf_quantized(
        path: &Path,
        device: &Device,
        dtype: DType,
        quant: BaseQuant,
    ) -> Result<(Self, GgufMetadata)> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let err = |reason: String| Error::Config { path: path.to_path_buf(), reason };
        let content = crate::gguf::read_content(path, &mut file)?;
        let meta = GgufMetadata::from_content(path, &content);
        let arch = meta.string("general.architecture")?;
        let family = match arch.as_str() {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma3" => Family::Gemma3,
            "phi3" => Family::Phi3,
            _ => {
                return Err(err(format!(
                    "general.architecture is \"{arch}\"; supported GGUF architectures are llama (LLaMA, Mistral), \
                     qwen2, qwen3, gemma3 and phi3"
                )))
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let num = |k: &str| meta.u32(&key(k)).map(|v| v as usize);
        let heads = num("attention.head_count")?;
        let kv_heads =
            if meta.contains(&key("attention.head_count_kv")) { num("attention.head_count_kv")? } else { heads };
        let head_dim =
            if meta.contains(&key("attention.key_length")) { Some(num("attention.key_length")?) } else { None };
        let vocab_size = match content.tensor_infos.get("token_embd.weight") {
            Some(t) => t.shape.dims().first().copied().unwrap_or(0),
            None => return Err(err("the GGUF file has no `token_embd.weight` tensor (the token embeddings)".into())),
        };
        // Linear scaling (Gemma 3 4B+: of the global layers only, as transformers applies it).
        let rope_scaling = match meta.string(&key("rope.scaling.type")).ok().as_deref() {
            None | Some("none") => serde_json::Value::Null,
            Some("linear") => {
                serde_json::json!({"rope_type": "linear", "factor": meta.f32(&key("rope.scaling.factor"))?})
            }
            Some(kind) => {
                return Err(err(format!(
                    "{} is \"{kind}\": only linear RoPE scaling is supported from GGUF files; load the model's HF \
                     checkpoint",
                    key("rope.scaling.type")
                )))
            }
        };
        let optional_f32 = |k: &str| -> Result<Option<f32>> {
            if meta.contains(&key(k)) {
                meta.f32(&key(k)).map(Some)
            } else {
                Ok(None)
            }
        };
        let rope_theta = optional_f32("rope.freq_base")?.unwrap_or(10_000.0);
        let mut config: LlamaConfig = serde_json::from_value(serde_json::json!({
            "hidden_size": num("embedding_length")?,
            "intermediate_size": num("feed_forward_length")?,
            "num_hidden_layers": num("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "rms_norm_eps": meta.f32(&key("attention.layer_norm_rms_epsilon"))?,
            "rope_theta": rope_theta,
            "vocab_size": vocab_size,
            "tie_word_embeddings": !content.tensor_infos.contains_key("output.weight"),
            "model_type": family.model_type(),
            "rope_scaling": rope_scaling,
        }))?;
        config.head_dim = head_dim;
        // llama.cpp writes 0 for none (Phi-3).
        if meta.contains(&key("attention.sliding_window")) {
            config.sliding_window = Some(num("attention.sliding_window")?).filter(|&w| w > 0);
        }
        if content.tensor_infos.contains_key("rope_factors_long.weight") {
            return Err(err(
                "the file has `rope_factors_long.weight`: Phi-3's LongRoPE (its 128k-context models), which is not \
                 supported; the 4k-context Phi-3 models are"
                    .into(),
            ));
        }
        if family == Family::Gemma3 {
            // What llama.cpp hard-codes for Gemma 3 (its files do not say): local layers at RoPE
            // base 1e4 (or `rope.freq_base_swa`), every 6th layer global, queries scaled by
            // 1/sqrt(head_dim), or 1/sqrt(hidden / heads) for the 62-layer 27B.
            let local_base = optional_f32("rope.freq_base_swa")?.unwrap_or(10_000.0);
            let scalar =
                if config.num_hidden_layers == 62 { config.hidden_size / heads.max(1) } else { config.head_dim() };
            config.other.insert("rope_local_base_freq".into(), local_base.into());
            config.other.insert("query_pre_attn_scalar".into(), scalar.into());
            config.other.insert("sliding_window_pattern".into(), 6.into());
        }
        // Llama 3's RoPE scaling, which llama.cpp stores as a divisor per frequency.
        if content.tensor_infos.contains_key("rope_freqs.weight") {
            let divisors = content
                .tensor(&mut file, "rope_freqs.weight", &Device::Cpu)
                .and_then(|q| q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>())
                .map_err(|e| err(format!("tensor `rope_freqs.weight`: {e}")))?;
            let head_dim = head_dim.unwrap_or(config.hidden_size / heads.max(1));
            let rope = RopeParameters::from_llama_cpp_divisors(rope_theta as f64, head_dim, &divisors)
                .map_err(|e| err(format!("tensor `rope_freqs.weight` (RoPE frequency divisors) {e}")))?;
            if let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } =
                rope.scaling
            {
                config.rope_scaling = Some(serde_json::json!({"rope_type": "llama3", "factor": factor,
                    "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings}));
            }
        }
        // Refused by name by `check` below, as in a config.json.
        if let Some(cap) = optional_f32("final_logit_softcapping")? {
            config.other.insert("final_logit_softcapping".into(), cap.into());
        }
        // llama.cpp's converter writes biases only where the checkpoint has them.
        config.attention_bias = family == Family::Llama && content.tensor_infos.contains_key("blk.0.attn_q.bias");
        config.mlp_bias = family == Family::Llama && content.tensor_infos.contains_key("blk.0.ffn_down.bias");
        // Before any tensor is read: the q/k row permutation divides by the head counts.
        config.check(Some(path), &|f| gguf_field(&arch, f))?;
        if meta.contains(&key("rope.dimension_count")) && num("rope.dimension_count")? != config.head_dim() {
            return Err(err(format!(
                "{} is {}, not the head width {}: partial rotary embeddings are not supported",
                key("rope.dimension_count"),
                num("rope.dimension_count")?,
                config.head_dim()
            )));
        }
        let kv = config.kv_heads();
        // llama.cpp permutes the q/k rows of `llama` files only (for its adjacent-pair RoPE).
        let permuted = arch == "llama";
        let mut loading = Loading::new(quant.target(), dtype);
        let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
        for name in names.into_iter().filter(|n| n != "rope_freqs.weight") {
            let hf = rename(&name, true, family)
                .ok_or_else(|| err(format!("unexpected tensor `{name}` in a {arch} GGUF")))?;
            let q = content.tensor(&mut file, &name, device).map_err(|e| err(format!("tensor `{name}`: {e}")))?;
            let heads_of_rows = match name.split('.').nth(2) {
                Some("attn_q") if permuted => Some(heads),
                Some("attn_k") if permuted => Some(kv),
                _ => None,
            };
            let keep = quant == BaseQuant::Keep && q.dtype() != GgmlDType::F32 && q.shape().rank() == 2;
            if keep {
                let order = heads_of_rows.map(|h| unpermuted_row_order(q.shape().dims()[0], h));
                let w = QuantizedWeight::new(&q, order.as_deref(), dtype)
                    .map_err(|e| err(format!("tensor `{name}`: {e}")))?;
                loading.quantized.insert(hf, w);
                continue;
            }
            let mut t = q.dequantize(device)?;
            if let Some(h) = heads_of_rows {
                t = unpermute_rows(&t, h)?;
            }
            // llama.cpp stores Gemma's norms as the multipliers `1 + w`; HF's `w` is kept, as
            // transformers' loader does.
            if family == Family::Gemma3 && name.ends_with("norm.weight") {
                t = (t - 1.0)?;
            }
            loading.add(hf, &name, t)?;
        }
        Ok((loading.build(config, &path.display().to_string())?, meta))
    }

    /// Every tensor under its HF name, with each linear's current weight (merged, after
    /// [`crate::PeftModel::merge`]): what [`Llama::save_hf_dir`] writes.
    /// Quantized weights are dequantized.
    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut t = BTreeMap::new();
        t.insert("model.embed_tokens.weight".to_string(), self.embed_tokens.dense()?);
        // Stored as the checkpoint stores them: Gemma's `w` of `1 + w`.
        let offset = self.config.norm_offset();
        let stored = |w: &Tensor| -> Result<Tensor> {
            if offset == 0.0 {
                return Ok(w.clone());
            }
            Ok((w.to_dtype(DType::F32)? - offset)?.to_dtype(w.dtype())?)
        };
        t.insert("model.norm.weight".to_string(), stored(&self.norm)?);
        let names = Block::norm_names(&self.config);
        for (i, b) in self.layers.iter().enumerate() {
            for (name, w) in names.iter().zip(b.norms()) {
                t.insert(format!("model.layers.{i}.{name}.weight"), stored(w)?);
            }
        }
        for (path, l) in self.linears() {
            t.insert(format!("{path}.weight"), l.weight().dense()?);
            if let Some(b) = l.bias() {
                t.insert(format!("{path}.bias"), b.clone());
            }
        }
        Ok(t)
    }

    /// Writes an HF model directory (`config.json`, `model.safetensors`) that transformers'
    /// `AutoModelForCausalLM.from_pretrained` loads as the model's family.
    pub fn save_hf_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let family = self.config.family();
        let mut config = serde_json::to_value(&self.config)?;
        let map = config.as_object_mut().expect("an object");
        // A null window is kept (a config without the key means 4096), and so are the source
        // config's own nulls (`"eos_token_id": null` is not transformers' default).
        map.retain(|k, v| !v.is_null() || k == "sliding_window" || self.config.other.contains_key(k));
        map.insert("model_type".into(), family.model_type().into());
        map.insert("architectures".into(), serde_json::json!([family.architecture()]));
        map.insert("num_key_value_heads".into(), self.config.kv_heads().into());
        map.insert("head_dim".into(), self.config.head_dim().into());
        if self.config.rope_theta.is_none() && self.config.rope_parameters.is_none() {
            map.insert("rope_theta".into(), 10_000.0.into());
        }
        if family == Family::Gemma3 {
            map.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
        } else {
            map.insert("hidden_act".into(), "silu".into());
        }
        let dtype = match self.dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        };
        map.insert("torch_dtype".into(), dtype.into());
        map.insert("dtype".into(), dtype.into());
        let json = serde_json::to_string_pretty(&config)?;
        crate::format::write_atomic(&dir.join("config.json"), json.as_bytes())?;
        let tensors: Vec<(String, Tensor)> = self.tensors()?.into_iter().collect();
        crate::format::write_safetensors(&dir.join("model.safetensors"), &tensors)
    }

    /// Writes the model as a llama.cpp GGUF file: llama.cpp's architecture (`llama` for LLaMA and
    /// Mistral, `qwen2`, `qwen3`, `phi3`), tensor names and shape keys, its q/k row permutation
    /// (`llama` files only), Llama 3's RoPE scaling as the `rope_freqs` divisors, a linear one
    /// as `rope.scaling.*`, Phi-3's window, and every other key of `source` (the GGUF the model
    /// came from: its
    /// tokenizer, chat template, ...). Weights held quantized ([`BaseQuant::Keep`]: those a merge
    /// left alone) are copied as stored, in their own types; the dense 2-D weights (the merged
    /// ones, or all of them on a dequantized base) are quantized to `quant` (rows its blocks do
    /// not divide fall back as in [`crate::quantized::fallback_type`]); norms and biases stay
    /// F32. Each linear's current weight is written (the merged one after
    /// [`crate::PeftModel::merge`]). Quantizing loses precision: `tests/cli.rs` measures it on
    /// SmolLM2. A sliding window of a `llama` or Qwen file, which llama.cpp's keys cannot say,
    /// is refused, and so is Gemma 3 (not written yet).
    pub fn save_gguf(&self, path: &Path, quant: GgmlDType, source: &GgufMetadata) -> Result<SavedGguf> {
        self.save_gguf_calibrated(path, quant, source, &BTreeMap::new())
    }

    /// [`Self::save_gguf`], with the dense linears that have an input Gram matrix in `grams`
    /// (by path, `model.layers.0.self_attn.q_proj`; from
    /// [`crate::PeftModel::record_input_grams`]) quantized by GPTQ against those inputs
    /// ([`crate::gptq::quantize`]) instead of rounded to nearest. GPTQ writes the types of
    /// [`crate::gptq::TYPES`] (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0): another lossy `quant` with grams
    /// is an error (F16, BF16, F32 and the F16 fallback of rows the blocks do not divide are
    /// written as usual).
    pub fn save_gguf_calibrated(
        &self,
        path: &Path,
        quant: GgmlDType,
        source: &GgufMetadata,
        grams: &BTreeMap<String, InputGram>,
    ) -> Result<SavedGguf> {
        if !grams.is_empty() && !matches!(quant, GgmlDType::F16 | GgmlDType::BF16 | GgmlDType::F32) {
            crate::gptq::check_type(quant)?;
        }
        if matches!(quant, GgmlDType::Q8_1 | GgmlDType::Q8K) {
            return Err(Error::config(
                "quant",
                format!("{} is an activation type; pick q8_0, q4_k, ...", type_name(quant)),
            ));
        }
        let c = &self.config;
        let family = c.family();
        let mut extra = Vec::new();
        if family == Family::Gemma3 {
            extra = self.gemma3_gguf_keys()?;
        }
        let rope = c.rope().map_err(|(field, reason)| Error::ModelConfig { path: None, field, reason })?;
        // Llama 3's scaling is llama.cpp's `rope_freqs` tensor, which its `llama` models read.
        let rope_freqs = rope.llama_cpp_divisors(c.head_dim());
        if rope_freqs.is_some() && family.gguf_architecture() != "llama" {
            return Err(Error::Unsupported(format!(
                "a {} GGUF file with Llama 3's RoPE scaling (llama.cpp reads it for `llama` files only); write an HF \
                 directory",
                family.gguf_architecture()
            )));
        }
        let window_key = matches!(family, Family::Phi3 | Family::Gemma3);
        if let Some(i) = (0..c.num_hidden_layers).find(|&i| c.layer_window(i).is_some()).filter(|_| !window_key) {
            return Err(Error::Unsupported(format!(
                "a GGUF file of a model with sliding-window attention (layer {i}): llama.cpp's {} files have no \
                 key for it and would attend to every key; write an HF directory",
                family.gguf_architecture()
            )));
        }
        let arch = family.gguf_architecture();
        let (heads, kv) = (c.num_attention_heads as u32, c.kv_heads() as u32);
        let key = |k: &str| format!("{arch}.{k}");
        let own = [
            ("general.architecture".to_string(), Value::String(arch.into())),
            (key("embedding_length"), Value::U32(c.hidden_size as u32)),
            (key("feed_forward_length"), Value::U32(c.intermediate_size as u32)),
            (key("block_count"), Value::U32(c.num_hidden_layers as u32)),
            (key("attention.head_count"), Value::U32(heads)),
            (key("attention.head_count_kv"), Value::U32(kv)),
            (key("attention.key_length"), Value::U32(c.head_dim() as u32)),
            (key("attention.value_length"), Value::U32(c.head_dim() as u32)),
            (key("attention.layer_norm_rms_epsilon"), Value::F32(c.rms_norm_eps as f32)),
            (key("rope.freq_base"), Value::F32(rope.theta as f32)),
            (key("rope.dimension_count"), Value::U32(c.head_dim() as u32)),
            (key("vocab_size"), Value::U32(c.vocab_size as u32)),
        ];
        // candle writes its own alignment; the file type is this file's.
        let dropped = ["general.alignment", "general.file_type"];
        let mut metadata: Vec<(String, Value)> = source
            .values()
            .filter(|(k, _)| !dropped.contains(k) && !own.iter().any(|(o, _)| o == k))
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        metadata.sort_by(|a, b| a.0.cmp(&b.0));
        metadata.retain(|(k, _)| !k.starts_with(&key("rope.scaling.")) && *k != key("attention.sliding_window"));
        metadata.extend(own);
        if window_key {
            let window = c.sliding_window.unwrap_or(0) as u32;
            metadata.push((key("attention.sliding_window"), Value::U32(window)));
        }
        metadata.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
        metadata.extend(extra);
        if let RopeScaling::Linear { factor } = rope.scaling {
            metadata.push((key("rope.scaling.type"), Value::String("linear".into())));
            metadata.push((key("rope.scaling.factor"), Value::F32(factor as f32)));
        }
        if let Some(t) = llama_file_type(quant) {
            metadata.push(("general.file_type".into(), Value::U32(t)));
        }
        let mut saved = SavedGguf::default();
        let mut tensors = Vec::new();
        let mut add = |hf: &str, w: &FrozenWeight| -> Result<()> {
            let name =
                rename(hf, false, family).ok_or_else(|| Error::Unsupported(format!("no GGUF name for `{hf}`")))?;
            if let Some(v) = w.as_dense().filter(|t| t.rank() == 1) {
                let v = v.to_dtype(DType::F32)?;
                // A q/k bias of a `llama` file is permuted with its rows.
                let v = match name.rsplit('.').nth(1) {
                    Some("attn_q") if arch == "llama" => permute_rows(&v, heads as usize)?,
                    Some("attn_k") if arch == "llama" => permute_rows(&v, kv as usize)?,
                    _ => v,
                };
                tensors.push((name, QTensor::quantize(&v, GgmlDType::F32)?));
                return Ok(());
            }
            let (out, inp) = w.dims2()?;
            let permuted_heads = match name.rsplit('.').nth(1) {
                Some("attn_q") if arch == "llama" => Some(heads as usize),
                Some("attn_k") if arch == "llama" => Some(kv as usize),
                _ => None,
            };
            let q = match w {
                FrozenWeight::Quantized(q) => {
                    let order = permuted_heads.map(|h| permuted_row_order(out, h));
                    saved.copied.push(format!("{name} ({})", type_name(q.ggml_dtype())));
                    q.to_qtensor(order.as_deref())?
                }
                FrozenWeight::Dense(w) => {
                    let w = w.to_dtype(DType::F32)?;
                    let w = match permuted_heads {
                        Some(h) => permute_rows(&w, h)?,
                        None => w,
                    };
                    let t = crate::quantized::fallback_type(quant, inp);
                    if t != quant {
                        saved.fallbacks.push(format!("{name} ({} -> {})", type_name(quant), type_name(t)));
                    }
                    match hf
                        .strip_suffix(".weight")
                        .and_then(|p| grams.get(p))
                        .filter(|_| crate::gptq::check_type(t).is_ok())
                    {
                        Some(gram) => {
                            let q = crate::gptq::quantize(&w, gram, t, crate::gptq::DEFAULT_DAMP)?;
                            let nearest = QTensor::quantize(&w, t)?;
                            saved.calibrated.push(Calibrated {
                                name: name.clone(),
                                error: crate::gptq::output_error(&w, &q, gram)?,
                                nearest_error: crate::gptq::output_error(&w, &nearest, gram)?,
                            });
                            q
                        }
                        None => QTensor::quantize(&w, t)?,
                    }
                }
            };
            tensors.push((name, q));
            Ok(())
        };
        add("model.embed_tokens.weight", &self.embed_tokens)?;
        let names = Block::norm_names(c);
        for (i, b) in self.layers.iter().enumerate() {
            for (name, w) in names.iter().zip(b.norms()) {
                add(&format!("model.layers.{i}.{name}.weight"), &w.clone().into())?;
            }
        }
        add("model.norm.weight", &self.norm.clone().into())?;
        for (path, l) in self.linears() {
            add(&format!("{path}.weight"), l.weight())?;
            if let Some(bias) = l.bias() {
                add(&format!("{path}.bias"), &bias.clone().into())?;
            }
        }
        if let Some(divisors) = rope_freqs {
            let t = Tensor::new(divisors, &Device::Cpu)?;
            tensors.push(("rope_freqs.weight".into(), QTensor::quantize(&t, GgmlDType::F32)?));
        }
        crate::gguf::write_gguf(path, &metadata, &tensors)?;
        Ok(saved)
    }

    /// The keys of a Gemma 3 GGUF file beyond the common ones, after checking that llama.cpp's
    /// fixed choices describe the model (what a `gemma3` file cannot say): a global layer every
    /// 6th, queries scaled by `1 / sqrt(head_dim)` (`1 / sqrt(hidden / heads)` for 62 layers),
    /// unscaled local RoPE. A local base other than 1e4 is written as `rope.freq_base_swa`, a
    /// logit soft-cap as `final_logit_softcapping`.
    fn gemma3_gguf_keys(&self) -> Result<Vec<(String, Value)>> {
        let c = &self.config;
        let refuse = |what: String| {
            Err(Error::Unsupported(format!(
                "a Gemma 3 GGUF file of this model: {what}, which llama.cpp's gemma3 files cannot say; write an HF \
                 directory"
            )))
        };
        if let Some(i) = (0..c.num_hidden_layers).find(|&i| c.layer_window(i).is_some() != ((i + 1) % 6 != 0)) {
            return refuse(format!("layer {i} breaks the pattern of a global layer every 6th"));
        }
        let width = if c.num_hidden_layers == 62 { c.hidden_size / c.num_attention_heads } else { c.head_dim() };
        let scale = c.attention_scale().unwrap_or(1.0 / (c.head_dim() as f64).sqrt());
        if (scale * (width as f64).sqrt() - 1.0).abs() > 1e-9 {
            return refuse(format!("queries scaled by {scale}, not 1 / sqrt({width})"));
        }
        let local = c.rope_for(true).map_err(|(field, reason)| Error::ModelConfig { path: None, field, reason })?;
        if local.scaling != RopeScaling::None {
            return refuse(format!("the local layers' RoPE scaling {:?}", local.scaling));
        }
        let mut keys = Vec::new();
        if local.theta != 10_000.0 {
            keys.push(("gemma3.rope.freq_base_swa".into(), Value::F32(local.theta as f32)));
        }
        if let Some(cap) = c.final_logit_softcapping() {
            keys.push(("gemma3.final_logit_softcapping".into(), Value::F32(cap as f32)));
        }
        Ok(keys)
    }

    /// The config.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Logits `(b, t, vocab)` for token ids `(b, t)` (causal attention, positions from 0).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_cached(ids, &mut KvCache::default())
    }

    /// Logits `(b, t, vocab)` for token ids `(b, t)` that follow the positions in `cache`, whose
    /// keys and values they read and then extend: incremental decoding. With an empty cache it is
    /// [`Llama::forward`].
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.hidden_states(ids, Some(cache))?;
        self.head(&h)
    }

    /// The output projection's weight when the logits are `h W^T` with `W` frozen and `h` the
    /// output of [`Self::final_hidden_states`]: the embeddings when tied, or an `lm_head` with
    /// no adapter and no bias, and no soft-capping. A loss can then be computed from `h` and `W`
    /// a block of positions at a time, without the whole logits
    /// ([`crate::train::loss::linear_cross_entropy_part`]).
    pub fn frozen_head(&self) -> Option<&FrozenWeight> {
        if self.config.final_logit_softcapping().is_some() {
            return None;
        }
        match &self.lm_head {
            None => Some(&self.embed_tokens),
            Some(head) if !head.has_adapters() && head.bias().is_none() => Some(head.weight()),
            Some(_) => None,
        }
    }

    /// The last decoder layer's output after the final norm, `(b * t, hidden)`, for token ids
    /// `(b, t)`: the input of the output head.
    pub fn final_hidden_states(&self, ids: &Tensor) -> Result<Tensor> {
        let h = self.hidden_states(ids, None)?;
        let (b, t, hidden) = h.dims3()?;
        Ok(rms_norm(&h, &self.norm, self.config.rms_norm_eps)?.reshape((b * t, hidden))?)
    }

    /// The last decoder layer's output `(b, t, hidden)` for token ids `(b, t)`; with `cache`,
    /// after the positions it holds, whose keys and values each layer reads and then extends.
    fn hidden_states(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let mut h = self.embed(ids)?;
        let tables = self.rope_tables(offset, t, ids.device())?;
        if let Some(cache) = cache {
            if cache.layers.is_empty() {
                cache.layers = vec![None; self.layers.len()];
            }
            for (layer, cached) in self.layers.iter().zip(cache.layers.iter_mut()) {
                h = self.block(layer, &h, &tables, Some(cached), &cache.starts)?;
            }
            cache.len = offset + t;
        } else {
            for layer in &self.layers {
                h = self.block(layer, &h, &tables, None, &[])?;
            }
        }
        Ok(h)
    }

    /// The token embeddings of `ids`, scaled by `sqrt(hidden)` for Gemma (the factor rounded to
    /// the compute dtype first, as transformers does).
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let h = self.embed_tokens.embedding(ids)?;
        if self.config.family() != Family::Gemma3 {
            return Ok(h);
        }
        let scale = Tensor::new((self.config.hidden_size as f32).sqrt(), h.device())?.to_dtype(h.dtype())?;
        Ok(h.broadcast_mul(&scale)?)
    }

    /// RoPE's `cos` and `sin` for positions `offset..offset + t`, `(t, head_dim / 2)`, of the
    /// full-attention layers and of the sliding-window ones.
    fn rope_tables(&self, offset: usize, t: usize, device: &Device) -> Result<[(Tensor, Tensor); 2]> {
        let pos = Tensor::arange(offset as u32, (offset + t) as u32, device)?.to_dtype(DType::F32)?.unsqueeze(1)?;
        let table = |inv_freq: &[f32]| -> Result<(Tensor, Tensor)> {
            let freqs = pos.broadcast_mul(&Tensor::from_slice(inv_freq, (1, inv_freq.len()), device)?)?;
            Ok((freqs.cos()?.to_dtype(self.dtype)?, freqs.sin()?.to_dtype(self.dtype)?))
        };
        let full = table(&self.inv_freq[0])?;
        let sliding = if self.inv_freq[1] == self.inv_freq[0] { full.clone() } else { table(&self.inv_freq[1])? };
        Ok([full, sliding])
    }

    /// One decoder layer on `h: (b, t, hidden)`; with `cached`, after the keys and values it
    /// holds, which it then extends.
    fn block(
        &self,
        layer: &Block,
        h: &Tensor,
        tables: &[(Tensor, Tensor); 2],
        cached: Option<&mut Option<(Tensor, Tensor)>>,
        starts: &[usize],
    ) -> Result<Tensor> {
        let (b, t, _) = h.dims3()?;
        let c = &self.config;
        let (heads, kv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let (cos, sin) = &tables[usize::from(layer.window.is_some())];
        let x = rms_norm(h, &layer.attn_norm, c.rms_norm_eps)?;
        // (b, t, n * hd) -> (b, n, t, hd), each head RMS-normalized first where the family says.
        let heads_first = |y: Tensor, n: usize, norm: Option<&Tensor>| -> Result<Tensor> {
            let y = y.reshape((b, t, n, hd))?;
            let y = match norm {
                Some(w) => rms_norm(&y, w, c.rms_norm_eps)?,
                None => y,
            };
            Ok(y.transpose(1, 2)?)
        };
        let (q_norm, k_norm) = layer.qk_norm.as_ref().map(|(q, k)| (q, k)).unzip();
        let [q, k, v] = layer.qkv(&x, c)?;
        let how = Attention { scale: c.attention_scale(), window: layer.window };
        let attn = match cached {
            // On the CPU, without a cache or per-head norms: one node on the projections' layout.
            None if layer.qk_norm.is_none() && x.device().is_cpu() => {
                rope_attention_cpu(&q, &k, &v, (cos, sin), [heads, kv], how)?
            }
            cached => {
                let q = rope(&heads_first(q, heads, q_norm)?, cos, sin)?;
                let mut k = rope(&heads_first(k, kv, k_norm)?, cos, sin)?;
                let mut v = heads_first(v, kv, None)?;
                if let Some(cached) = cached {
                    if let Some((k0, v0)) = cached.as_ref() {
                        (k, v) = (Tensor::cat(&[k0, &k], 2)?, Tensor::cat(&[v0, &v], 2)?);
                    }
                    // Kept for the next call (views of the same storage: no copy).
                    *cached = Some((k.detach(), v.detach()));
                }
                let attn = match starts {
                    [] => causal_attention_with(&q, &k, &v, how)?,
                    starts => padded_attention(&q, &k, &v, how, starts)?,
                };
                attn.transpose(1, 2)?.reshape((b, t, heads * hd))?
            }
        };
        let out = layer.o(c).forward_checked(&attn)?;
        let out = match &layer.output_norms {
            Some((after_attention, _)) => rms_norm(&out, after_attention, c.rms_norm_eps)?,
            None => out,
        };
        let h = (h + out)?;
        let x = rms_norm(&h, &layer.mlp_norm, c.rms_norm_eps)?;
        let [gate, up] = layer.gate_up(&x, c)?;
        let act = if c.family() == Family::Gemma3 { geglu_tanh(&gate, &up)? } else { swiglu(&gate, &up)? };
        let out = layer.down().forward_checked(&act)?;
        let out = match &layer.output_norms {
            Some((_, after_mlp)) => rms_norm(&out, after_mlp, c.rms_norm_eps)?,
            None => out,
        };
        Ok((h + out)?)
    }

    /// The final norm and the output projection: logits for the last hidden states, soft-capped
    /// where a Gemma config says (`cap * tanh(logits / cap)`, `final_logit_softcapping`).
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        let h = rms_norm(h, &self.norm, self.config.rms_norm_eps)?;
        let logits = match &self.lm_head {
            Some(head) => head.forward_checked(&h)?,
            // Tied: the frozen embedding as the output projection, with no gradient of its own.
            None => self.embed_tokens.linear(&h, None)?,
        };
        match self.config.final_logit_softcapping() {
            Some(cap) => Ok(((logits / cap)?.tanh()? * cap)?),
            None => Ok(logits),
        }
    }

    /// `loss(logits)` for token ids `(b, t)` and the gradients of every trainable tensor, with
    /// activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
    /// Cost"): the forward pass keeps only each decoder layer's input, and the backward pass
    /// runs layer by layer from the top, recomputing one layer's activations at a time from its
    /// input and back-propagating the gradient of its output through them. Memory holds one
    /// layer's activations instead of all of them, for about one more forward pass of compute.
    ///
    /// The output head runs on chunks of positions too (at most [`HEAD_CHUNK`] logits at a
    /// time): `loss(logits, range)` is the loss's part from the positions `range` of the
    /// flattened `b * t` (logits `(range.len(), vocab)`), and the loss is the sum of the parts
    /// (see [`crate::train::loss::masked_cross_entropy_part`]). So the whole `(b * t, vocab)`
    /// logits never exist.
    ///
    /// Errors when an adapter has dropout on: candle's dropout masks cannot be drawn again, so
    /// the recomputed layer would not be the one the loss saw.
    pub fn checkpointed_loss_and_grads(
        &self,
        ids: &Tensor,
        loss: &dyn Fn(&Tensor, Range<usize>) -> Result<Tensor>,
    ) -> Result<(Tensor, GradStore)> {
        self.checkpointed_in_chunks(ids, loss, (HEAD_CHUNK / self.config.vocab_size).max(1))
    }

    /// [`Llama::checkpointed_loss_and_grads`] with the head on chunks of `rows` positions.
    fn checkpointed_in_chunks(
        &self,
        ids: &Tensor,
        loss: &dyn Fn(&Tensor, Range<usize>) -> Result<Tensor>,
        rows: usize,
    ) -> Result<(Tensor, GradStore)> {
        let _recomputing = crate::adapters::common::Recomputation::start();
        let (_, t) = ids.dims2()?;
        let tables = self.rope_tables(0, t, ids.device())?;
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut h = self.embed(ids)?.detach();
        for layer in &self.layers {
            // The layer's graph is dropped with its output's: only the detached values stay.
            let out = self.block(layer, &h, &tables, None, &[])?.detach();
            inputs.push(std::mem::replace(&mut h, out));
        }
        let (b, t, hidden) = h.dims3()?;
        let flat = h.reshape((b * t, hidden))?;
        // Only the adapters' gradients are kept: candle also records gradients of constants
        // (both sides of a product), some of which hold the graph they came from.
        let mut grads = empty_grads()?;
        let head_vars: Vec<Var> = self.lm_head.iter().flat_map(adapter_vars).collect();
        let (mut total, mut parts) = (None::<Tensor>, Vec::new());
        for r0 in (0..b * t).step_by(rows) {
            let x = Var::from_tensor(&flat.narrow(0, r0, rows.min(b * t - r0))?)?;
            let part = loss(&self.head(x.as_tensor())?, r0..r0 + x.dim(0)?)?;
            let mut part_grads = part.backward()?;
            parts.push(part_grads.remove(x.as_tensor()).ok_or_else(|| no_gradient("the last decoder layer's output"))?);
            move_grads(&mut part_grads, &mut grads, &head_vars)?;
            total = Some(match total {
                Some(sum) => (sum + part.detach())?,
                None => part.detach(),
            });
        }
        let loss = total.ok_or_else(|| no_gradient("the output head (no positions)"))?;
        let mut grad = Tensor::cat(&parts, 0)?.reshape((b, t, hidden))?;
        drop(parts);
        for (layer, input) in self.layers.iter().zip(inputs).rev() {
            let x = Var::from_tensor(&input)?;
            let out = self.block(layer, x.as_tensor(), &tables, None, &[])?;
            let mut layer_grads = (out * &grad)?.sum_all()?.backward()?;
            grad = layer_grads.remove(x.as_tensor()).ok_or_else(|| no_gradient("a decoder layer's input"))?;
            let vars: Vec<Var> = layer.linears.iter().flat_map(adapter_vars).collect();
            move_grads(&mut layer_grads, &mut grads, &vars)?;
        }
        Ok((loss, grads))
    }

    /// Greedy decoding: appends up to `max_new` argmax tokens to `prompt`, stopping after any of
    /// `stop` (which ends the returned tokens; see [`crate::tokenizer::stop_tokens`]), with a KV
    /// cache: each new token costs one position's forward pass.
    pub fn generate_greedy(&self, prompt: &[u32], max_new: usize, stop: &[u32]) -> Result<Vec<u32>> {
        Ok(self.generate_greedy_batch(&[prompt], max_new, stop)?.remove(0))
    }

    /// Greedy decoding of a batch: each prompt gets up to `max_new` argmax tokens, stopping
    /// after any of `stop`, with one KV cache for the batch (one position's forward pass for
    /// all rows per new token). Shorter prompts are padded on the left, and their padding is
    /// hidden from their tokens (each row gives what it gives alone); a row that has stopped
    /// keeps running until every row has.
    pub fn generate_greedy_batch(&self, prompts: &[&[u32]], max_new: usize, stop: &[u32]) -> Result<Vec<Vec<u32>>> {
        let Some(len) = prompts.iter().map(|p| p.len()).max() else { return Ok(Vec::new()) };
        if prompts.iter().any(|p| p.is_empty()) {
            return Err(Error::config("prompts", "an empty prompt; generation needs at least one prompt token"));
        }
        let device = self.embed_tokens.device();
        let starts: Vec<usize> = prompts.iter().map(|p| len - p.len()).collect();
        let flat: Vec<u32> =
            prompts.iter().flat_map(|p| std::iter::repeat_n(p[0], len - p.len()).chain(p.iter().copied())).collect();
        let mut input = Tensor::from_vec(flat, (prompts.len(), len), device)?;
        let padded = starts.iter().any(|&s| s > 0);
        let mut cache = KvCache { starts: if padded { starts } else { Vec::new() }, ..KvCache::default() };
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        let mut done = vec![false; prompts.len()];
        for _ in 0..max_new {
            let logits = self.forward_cached(&input, &mut cache)?;
            let last = logits.narrow(1, input.dim(1)? - 1, 1)?.squeeze(1)?;
            let next = last.argmax(D::Minus1)?.to_vec1::<u32>()?;
            for (row, &token) in next.iter().enumerate() {
                if !done[row] {
                    out[row].push(token);
                    done[row] = stop.contains(&token);
                }
            }
            if done.iter().all(|d| *d) {
                break;
            }
            input = Tensor::from_vec(next, (prompts.len(), 1), device)?;
        }
        Ok(out)
    }

    /// Switches every adapter between training mode (dropout on) and evaluation mode.
    pub fn set_train(&mut self, train: bool) {
        for (_, l) in self.linears_mut() {
            l.set_train(train);
        }
    }
}

/// An empty gradient store (candle has no public constructor): the store of a constant's
/// backward pass, its one entry taken out.
fn empty_grads() -> Result<GradStore> {
    let one = Tensor::new(1f32, &Device::Cpu)?;
    let mut grads = one.backward()?;
    grads.remove(&one);
    Ok(grads)
}

/// The trainable tensors of a layer's active adapters.
fn adapter_vars(layer: &AdaptedLinear) -> Vec<Var> {
    let active = layer.active_adapters().iter().filter_map(|name| layer.adapter_named(name));
    active.flat_map(|a| a.trainable_vars().into_iter().map(|(_, v)| v)).collect()
}

/// Moves the gradients of `vars` from `from` into `into`, adding to any already there.
fn move_grads(from: &mut GradStore, into: &mut GradStore, vars: &[Var]) -> Result<()> {
    for v in vars {
        if let Some(g) = from.remove(v.as_tensor()) {
            let sum = match into.remove(v.as_tensor()) {
                Some(old) => (old + g)?,
                None => g,
            };
            into.insert(v.as_tensor(), sum);
        }
    }
    Ok(())
}

/// The most logits the checkpointed output head computes at once (64 MiB in f32): it runs on
/// chunks of `HEAD_CHUNK / vocab_size` positions.
pub const HEAD_CHUNK: usize = 1 << 24;

/// The error of a checkpointed backward pass that found no gradient where one must be.
fn no_gradient(of: &str) -> Error {
    Error::Unsupported(format!("activation checkpointing: no gradient reached {of}"))
}

/// The tensor `name` of `tensors`, cast to `dtype`.
fn get_tensor(tensors: &BTreeMap<String, Tensor>, name: &str, dtype: DType) -> Result<Tensor> {
    let t = tensors
        .get(name)
        .ok_or_else(|| Error::MissingModelTensor { source_name: "<tensors>".into(), tensor: name.to_string() })?;
    Ok(t.to_dtype(dtype)?)
}

/// llama.cpp's tensor names and HF's (without the `.weight` / `.bias` suffix), for the whole
/// model and (after `blk.N.` / `model.layers.N.`) per layer.
const MODEL_TENSORS: [(&str, &str); 3] =
    [("token_embd", "model.embed_tokens"), ("output_norm", "model.norm"), ("output", "lm_head")];
const LAYER_TENSORS: [(&str, &str); 10] = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
];
/// The norms around the MLP: `ffn_norm` is LLaMA's `post_attention_layernorm` (before the MLP)
/// but Gemma 3's `pre_feedforward_layernorm`, whose norm after attention llama.cpp calls
/// `post_attention_norm`.
const LLAMA_MLP_NORMS: [(&str, &str); 1] = [("ffn_norm", "post_attention_layernorm")];
/// Phi-3's fused linears (llama.cpp keeps `ffn_up` for the fused gate and up) and its MLP norm.
const PHI3_TENSORS: [(&str, &str); 3] =
    [("attn_qkv", "self_attn.qkv_proj"), ("ffn_up", "mlp.gate_up_proj"), ("ffn_norm", "post_attention_layernorm")];
const GEMMA3_MLP_NORMS: [(&str, &str); 3] = [
    ("ffn_norm", "pre_feedforward_layernorm"),
    ("post_attention_norm", "post_attention_layernorm"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
];

/// The name of a tensor (`<module>.weight` or `<module>.bias`) of a `family` model in the other
/// convention: `to_hf` maps llama.cpp's names to HF's, else HF's to llama.cpp's. `None` for a
/// name the tables do not have.
pub(super) fn rename(name: &str, to_hf: bool, family: Family) -> Option<String> {
    let (module, suffix) = name.rsplit_once('.').filter(|(_, s)| ["weight", "bias"].contains(s))?;
    let pick = |(gguf, hf): &(&'static str, &'static str)| if to_hf { (*gguf, *hf) } else { (*hf, *gguf) };
    if let Some((_, to)) = MODEL_TENSORS.iter().map(pick).find(|(from, _)| *from == module) {
        return Some(format!("{to}.{suffix}"));
    }
    let (from_prefix, to_prefix) = if to_hf { ("blk.", "model.layers.") } else { ("model.layers.", "blk.") };
    let (layer, tail) = module.strip_prefix(from_prefix)?.split_once('.')?;
    let own: &[(&str, &str)] = match family {
        Family::Gemma3 => &GEMMA3_MLP_NORMS,
        Family::Phi3 => &PHI3_TENSORS,
        _ => &LLAMA_MLP_NORMS,
    };
    let (_, to) = own.iter().chain(&LAYER_TENSORS).map(pick).find(|(from, _)| *from == tail)?;
    Some(format!("{to_prefix}{layer}.{to}.{suffix}"))
}

/// llama.cpp's `general.file_type` for a model quantized to `t` (the `_M` mix for K-quants).
fn llama_file_type(t: GgmlDType) -> Option<u32> {
    Some(match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q5_0 => 8,
        GgmlDType::Q5_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 12,
        GgmlDType::Q4K => 15,
        GgmlDType::Q5K => 17,
        GgmlDType::Q6K => 18,
        GgmlDType::BF16 => 32,
        GgmlDType::Q8_1 | GgmlDType::Q8K => return None,
    })
}

/// The row order that [`permute_rows`] gives: row `i` of the result is row `order[i]` of an HF
/// q/k weight of `out` rows and `n_head` heads (the inverse of [`unpermuted_row_order`]).
fn permuted_row_order(out: usize, n_head: usize) -> Vec<usize> {
    let mut order = vec![0; out];
    for (i, r) in unpermuted_row_order(out, n_head).into_iter().enumerate() {
        order[r] = i;
    }
    order
}

/// The row order that [`unpermute_rows`] gives: row `i` of the result is row `order[i]` of a
/// GGUF q/k weight of `out` rows and `n_head` heads.
fn unpermuted_row_order(out: usize, n_head: usize) -> Vec<usize> {
    let hd = out / n_head;
    (0..out)
        .map(|r| {
            let (h, within) = (r / hd, r % hd);
            let (j, i) = (within / (hd / 2), within % (hd / 2));
            h * hd + i * 2 + j
        })
        .collect()
}

/// What [`Llama::save_gguf`] wrote besides the asked type, as `file name (type)` lists.
#[derive(Debug, Clone, Default)]
pub struct SavedGguf {
    /// Quantized weights copied as they were stored (`name (type)`).
    pub copied: Vec<String>,
    /// Dense weights whose rows the asked type's blocks do not divide (`name (asked -> written)`).
    pub fallbacks: Vec<String>,
    /// Weights quantized by GPTQ ([`Llama::save_gguf_calibrated`]), with their output errors.
    pub calibrated: Vec<Calibrated>,
}

/// A weight [`Llama::save_gguf_calibrated`] quantized by GPTQ: its summed squared output error
/// on the calibration inputs, `tr((W - Q) X^T X (W - Q)^T)`, and round-to-nearest's.
#[derive(Debug, Clone)]
pub struct Calibrated {
    /// The tensor's GGUF name.
    pub name: String,
    /// GPTQ's output error.
    pub error: f64,
    /// Round-to-nearest's output error (what [`Llama::save_gguf`] writes).
    pub nearest_error: f64,
}

/// The weights of a model being loaded, under HF's names: dense, or quantized on load to
/// `wanted` (the 2-D ones: linears, embeddings, output head; never the norms).
struct Loading {
    wanted: Option<GgmlDType>,
    dtype: DType,
    tensors: BTreeMap<String, Tensor>,
    quantized: BTreeMap<String, QuantizedWeight>,
    /// Tensors whose rows did not fit `wanted`'s blocks, as `file name (asked -> written)`.
    fallbacks: Vec<String>,
}

impl Loading {
    fn new(wanted: Option<GgmlDType>, dtype: DType) -> Self {
        Self { wanted, dtype, tensors: BTreeMap::new(), quantized: BTreeMap::new(), fallbacks: Vec::new() }
    }

    /// Adds the tensor `t` named `hf` (`file_name` in the file, for the fallback report).
    fn add(&mut self, hf: String, file_name: &str, t: Tensor) -> Result<()> {
        match self.wanted.filter(|_| t.rank() == 2 && hf.ends_with(".weight")) {
            Some(q) => {
                let w = QuantizedWeight::quantize(&t, q, self.dtype)?;
                if w.ggml_dtype() != q {
                    self.fallbacks.push(format!("{file_name} ({} -> {})", type_name(q), type_name(w.ggml_dtype())));
                }
                self.quantized.insert(hf, w);
            }
            None => {
                self.tensors.insert(hf, t);
            }
        }
        Ok(())
    }

    /// The model, after saying which tensors of `source` fell back to another type
    /// (llama.cpp's fallbacks for K-quants).
    fn build(self, config: LlamaConfig, source: &str) -> Result<Llama> {
        if !self.fallbacks.is_empty() {
            tracing::warn!(
                "{source}: {} tensors have rows that the asked type's blocks do not divide, and were quantized \
                 to a fallback type as llama.cpp does: {}",
                self.fallbacks.len(),
                self.fallbacks.join(", ")
            );
        }
        Llama::from_weights(config, &self.tensors, self.quantized, self.dtype).map_err(|e| match e {
            Error::MissingModelTensor { tensor, .. } => {
                Error::MissingModelTensor { source_name: source.into(), tensor }
            }
            e => e,
        })
    }
}

/// llama.cpp's `permute(w, n_head)` of q/k rows (what `convert_hf_to_gguf.py` applies), the
/// inverse of [`unpermute_rows`].
pub(super) fn permute_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = (w.dim(0)?, w.elem_count() / w.dim(0)?.max(1));
    let hd = out / n_head;
    Ok(w.reshape((n_head, 2, hd / 2, inp))?.transpose(1, 2)?.contiguous()?.reshape(w.shape())?)
}

/// Undoes llama.cpp's `permute(w, n_head)` of q/k rows: GGUF stores each head's rows as
/// interleaved pairs; HF's rotate-half layout has the two halves apart.
fn unpermute_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = (w.dim(0)?, w.elem_count() / w.dim(0)?.max(1));
    let hd = out / n_head;
    Ok(w.reshape((n_head, hd / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape(w.shape())?)
}

/// Mixed-adapter batches of a LLaMA-family model (see [`PeftModel::with_row_adapters`]).
impl PeftModel<Llama> {
    /// Logits `(b, t, vocab)` for token ids `(b, t)`, row `i` through the adapter `rows[i]` alone
    /// (or the base model for [`crate::BASE_ROWS`]), as PEFT's `model(ids, adapter_names=rows)`.
    pub fn forward_with_adapters(&mut self, ids: &Tensor, rows: &[&str]) -> Result<Tensor> {
        check_rows(ids.dim(0)?, rows)?;
        self.with_row_adapters(rows, |m| m.forward(ids))
    }

    /// [`Llama::generate_greedy_batch`] with row `i` through the adapter `rows[i]`: one base
    /// model answers for many adapters in one batch (prompts of any lengths), with one KV cache.
    pub fn generate_with_adapters(
        &mut self,
        prompts: &[&[u32]],
        rows: &[&str],
        max_new: usize,
        stop: &[u32],
    ) -> Result<Vec<Vec<u32>>> {
        check_rows(prompts.len(), rows)?;
        self.with_row_adapters(rows, |m| m.generate_greedy_batch(prompts, max_new, stop))
    }
}

/// One adapter name per row of a batch of `batch` rows.
fn check_rows(batch: usize, rows: &[&str]) -> Result<()> {
    if rows.len() != batch {
        return Err(Error::config(
            "adapter names",
            format!("{} names for a batch of {batch} rows; give one adapter name per row", rows.len()),
        ));
    }
    Ok(())
}

impl LinearHost for Llama {
    fn linears(&self) -> Vec<(String, &AdaptedLinear)> {
        let blocks = self.layers.iter().enumerate().flat_map(|(i, b)| {
            self.config.layer_linears().iter().zip(&b.linears).map(move |(n, l)| (format!("model.layers.{i}.{n}"), l))
        });
        blocks.chain(self.lm_head.iter().map(|h| ("lm_head".to_string(), h))).collect()
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut AdaptedLinear)> {
        let names = self.config.layer_linears();
        let blocks = self.layers.iter_mut().enumerate().flat_map(|(i, b)| {
            names.iter().zip(&mut b.linears).map(move |(n, l)| (format!("model.layers.{i}.{n}"), l))
        });
        blocks.chain(self.lm_head.iter_mut().map(|h| ("lm_head".to_string(), h))).collect()
    }

    fn other_params(&self) -> usize {
        let norms: usize = self.layers.iter().flat_map(Block::norms).map(Tensor::elem_count).sum();
        self.embed_tokens.elem_count() + self.norm.elem_count() + norms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::loss::masked_cross_entropy_part;
    use crate::{AdapterConfig, InitOptions, LoraConfig, PeftModel};

    /// The checkpointed head on chunks of 1, 3 and 5 positions against all 10 at once: the same
    /// loss and the same gradients of LoRA on every linear and the output head.
    #[test]
    fn the_head_in_chunks_of_positions_gives_the_same_loss_and_gradients() -> Result<()> {
        let config: LlamaConfig = serde_json::from_value(serde_json::json!({
            "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
            "vocab_size": 40, "tie_word_embeddings": false
        }))?;
        let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"];
        let adapter = AdapterConfig::Lora(LoraConfig::lora(4, 8.0, &targets));
        let peft = PeftModel::new(Llama::random(config, 1, &Device::Cpu)?, adapter, InitOptions::default())?;
        for v in peft.trainable_vars()? {
            v.set(&(v.as_tensor() + v.as_tensor().randn_like(0., 0.1)?)?)?;
        }
        let ids = Tensor::new(&[[1u32, 7, 30, 2, 9], [4, 4, 39, 0, 11]], &Device::Cpu)?;
        let labels = Tensor::new(&[7i64, 30, 2, 9, -100, 4, 39, 0, 11, 5], &Device::Cpu)?;
        let part = |logits: &Tensor, rows: Range<usize>| {
            masked_cross_entropy_part(logits, &labels.narrow(0, rows.start, rows.len())?, 9)
        };
        let (whole, whole_grads) = peft.model().checkpointed_in_chunks(&ids, &part, 10)?;
        for rows in [1, 3, 5] {
            let (loss, grads) = peft.model().checkpointed_in_chunks(&ids, &part, rows)?;
            let (a, b) = (whole.to_scalar::<f32>()?, loss.to_scalar::<f32>()?);
            assert!((a - b).abs() < 1e-6, "{rows} rows per chunk: {b} vs {a}");
            for (k, v) in peft.named_trainable_vars()? {
                let (g, w) = (
                    grads.get(v.as_tensor()).expect("a gradient"),
                    whole_grads.get(v.as_tensor()).expect("a gradient"),
                );
                let d = (g - w)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d < 1e-6, "{rows} rows per chunk, {k}: gradients differ by {d}");
            }
        }
        Ok(())
    }
}
