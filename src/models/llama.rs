//! A trainable LLaMA (Touvron et al. 2023): RMSNorm, rotary position embeddings, grouped-query
//! attention and a SwiGLU MLP, with HF's module names, so that adapters injected here are keyed
//! as PEFT keys them (`model.layers.N.self_attn.q_proj`).
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
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, Var, D};
use serde::Deserialize;

use crate::format::read_safetensors;
use crate::frozen::FrozenWeight;
use crate::fused::{causal_attention, rms_norm, rope, swiglu};
use crate::gguf::GgufMetadata;
use crate::layer::AdaptedLinear;
use crate::peft_model::LinearHost;
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
    /// RoPE parameters (transformers >= 5).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// RoPE scaling (older configs); only `null` is supported.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// `model_type` (must be a LLaMA-family architecture).
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}

impl LlamaConfig {
    /// Reads and checks a `config.json` (see [`LlamaConfig::validate`]); errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let c: Self = serde_json::from_str(&text)
            .map_err(|e| Error::Config { path: path.to_path_buf(), reason: format!("not a LLaMA config.json: {e}") })?;
        c.check(Some(path), &|field| field.to_string())?;
        Ok(c)
    }

    /// Checks that the config describes a model that can be built: no size of zero, query heads
    /// that split `hidden_size` evenly (unless `head_dim` is given) into heads of even width (RoPE
    /// rotates pairs), key/value heads that divide the query heads, a positive `rms_norm_eps` and
    /// RoPE base, a LLaMA-family `model_type`, and no RoPE scaling. Every constructor of
    /// [`Llama`] calls it; the error is an [`Error::ModelConfig`] naming the field.
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
        match self.head_dim {
            Some(d) if d == 0 || d % 2 == 1 => {
                return fail(
                    "head_dim",
                    format!("is {d}; expected a positive even number (rotary embeddings rotate pairs of dimensions)"),
                )
            }
            Some(_) => {}
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
        if let Some(t) = self.model_type.as_deref() {
            if !["llama", "mistral", "qwen2"].contains(&t) {
                return fail(
                    "model_type",
                    format!("is \"{t}\", not a LLaMA-family model; expected llama, mistral or qwen2"),
                );
            }
        }
        if let Some(s) = self.rope_scaling.as_ref().filter(|s| !s.is_null()) {
            return fail("rope_scaling", format!("is {s}; only null (no RoPE scaling) is supported"));
        }
        let parameters = self.rope_parameters.as_ref();
        let kind = parameters.and_then(|p| p.get("rope_type")).and_then(|t| t.as_str()).unwrap_or("default");
        if kind != "default" {
            return fail("rope_parameters.rope_type", format!("is \"{kind}\"; only \"default\" RoPE is supported"));
        }
        let theta = self.rope_base()?;
        if !(theta.is_finite() && theta > 0.0) {
            let in_parameters = parameters.and_then(|p| p.get("rope_theta")).and_then(|t| t.as_f64()).is_some();
            let field = if in_parameters { "rope_parameters.rope_theta" } else { "rope_theta" };
            return fail(field, format!("is {theta}; expected a positive RoPE base such as 10000"));
        }
        Ok(())
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width (0 when `num_attention_heads` is 0, which [`LlamaConfig::validate`] refuses).
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or_else(|| self.hidden_size.checked_div(self.num_attention_heads).unwrap_or(0))
    }

    /// The RoPE base `theta`; errors on a RoPE scaling that is not implemented.
    pub fn rope_base(&self) -> Result<f64> {
        if let Some(s) = self.rope_scaling.as_ref().filter(|s| !s.is_null()) {
            return Err(Error::Unsupported(format!("rope_scaling {s}")));
        }
        if let Some(p) = &self.rope_parameters {
            let kind = p.get("rope_type").and_then(|t| t.as_str()).unwrap_or("default");
            if kind != "default" {
                return Err(Error::Unsupported(format!("rope_type \"{kind}\"")));
            }
            if let Some(t) = p.get("rope_theta").and_then(|t| t.as_f64()) {
                return Ok(t);
            }
        }
        Ok(self.rope_theta.unwrap_or(10_000.0))
    }
}

/// The GGUF key (or tensor) that a [`LlamaConfig`] field is read from, for error messages.
fn gguf_field(field: &str) -> String {
    match field {
        "hidden_size" => "llama.embedding_length",
        "intermediate_size" => "llama.feed_forward_length",
        "num_hidden_layers" => "llama.block_count",
        "num_attention_heads" => "llama.attention.head_count",
        "num_key_value_heads" => "llama.attention.head_count_kv",
        "rms_norm_eps" => "llama.attention.layer_norm_rms_epsilon",
        "rope_theta" => "llama.rope.freq_base",
        "vocab_size" => "the row count of token_embd.weight (the vocabulary size)",
        other => other,
    }
    .to_string()
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
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// One decoder layer.
#[derive(Debug)]
struct Block {
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    /// q, k, v, o, gate, up, down (see [`LAYER_LINEARS`]).
    linears: [AdaptedLinear; 7],
}

/// The keys and values of the positions a [`Llama`] has seen, per layer, for
/// [`Llama::forward_cached`].
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
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
    rope_theta: f64,
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
        let mut linear = |name: &str| -> Result<AdaptedLinear> {
            let bias = tensors.get(&format!("{name}.bias")).map(|b| b.to_dtype(dtype)).transpose()?;
            AdaptedLinear::new(frozen(&format!("{name}.weight"))?, bias)
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let linears: Vec<AdaptedLinear> =
                LAYER_LINEARS.iter().map(|n| linear(&format!("{p}.{n}"))).collect::<Result<_>>()?;
            layers.push(Block {
                input_layernorm: get(&format!("{p}.input_layernorm.weight"))?,
                post_attention_layernorm: get(&format!("{p}.post_attention_layernorm.weight"))?,
                linears: linears.try_into().expect("seven linears"),
            });
        }
        let lm_head = match (config.tie_word_embeddings, has_head) {
            (false, _) | (true, true) => Some(linear("lm_head")?),
            (true, false) => None,
        };
        let rope_theta = config.rope_base()?;
        Ok(Self {
            embed_tokens: frozen("model.embed_tokens.weight")?,
            dtype,
            norm: get("model.norm.weight")?,
            layers,
            lm_head,
            rope_theta,
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
        let (h, i, hd) = (config.hidden_size, config.intermediate_size, config.head_dim());
        let (q, kv) = (config.num_attention_heads * hd, config.kv_heads() * hd);
        draw("model.embed_tokens.weight".to_string(), (config.vocab_size, h))?;
        if !config.tie_word_embeddings {
            draw("lm_head.weight".to_string(), (config.vocab_size, h))?;
        }
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            for (name, shape) in LAYER_LINEARS.iter().zip([(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]) {
                draw(format!("{p}.{name}.weight"), shape)?;
            }
        }
        let ones = Tensor::ones(h, DType::F32, device)?;
        loading.tensors.insert("model.norm.weight".to_string(), ones.clone());
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            loading.tensors.insert(format!("{p}.input_layernorm.weight"), ones.clone());
            loading.tensors.insert(format!("{p}.post_attention_layernorm.weight"), ones.clone());
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
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors") && !p.ends_with("adapter_model.safetensors"))
            .collect();
        files.sort();
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

    /// Loads a llama.cpp GGUF file (`general.architecture = "llama"`): every tensor dequantized
    /// to f32 then cast to `dtype`, renamed to HF's names, with llama.cpp's q/k row permutation
    /// undone so that the weights are in HF layout (and PEFT adapters fit them).
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
        if arch != "llama" {
            return Err(err(format!("general.architecture is \"{arch}\"; only llama GGUF files are supported")));
        }
        let num = |k: &str| meta.u32(&format!("llama.{k}")).map(|v| v as usize);
        let heads = num("attention.head_count")?;
        let kv_heads =
            if meta.contains("llama.attention.head_count_kv") { num("attention.head_count_kv")? } else { heads };
        let vocab_size = match content.tensor_infos.get("token_embd.weight") {
            Some(t) => t.shape.dims().first().copied().unwrap_or(0),
            None => return Err(err("the GGUF file has no `token_embd.weight` tensor (the token embeddings)".into())),
        };
        let rope_theta =
            if meta.contains("llama.rope.freq_base") { meta.f32("llama.rope.freq_base")? } else { 10_000.0 };
        let config = LlamaConfig {
            hidden_size: num("embedding_length")?,
            intermediate_size: num("feed_forward_length")?,
            num_hidden_layers: num("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            head_dim: None,
            rms_norm_eps: meta.f32("llama.attention.layer_norm_rms_epsilon")? as f64,
            rope_theta: Some(rope_theta as f64),
            rope_parameters: None,
            rope_scaling: None,
            vocab_size,
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            model_type: Some("llama".into()),
        };
        // Before any tensor is read: the q/k row permutation divides by the head counts.
        config.check(Some(path), &gguf_field)?;
        let kv = config.kv_heads();
        let mut loading = Loading::new(quant.target(), dtype);
        let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
        for name in names {
            let hf =
                gguf_to_hf_name(&name).ok_or_else(|| err(format!("unexpected tensor `{name}` in a llama GGUF")))?;
            let q = content.tensor(&mut file, &name, device).map_err(|e| err(format!("tensor `{name}`: {e}")))?;
            let heads_of_rows = if name.ends_with("attn_q.weight") {
                Some(heads)
            } else if name.ends_with("attn_k.weight") {
                Some(kv)
            } else {
                None
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
        t.insert("model.norm.weight".to_string(), self.norm.clone());
        for (i, b) in self.layers.iter().enumerate() {
            t.insert(format!("model.layers.{i}.input_layernorm.weight"), b.input_layernorm.clone());
            t.insert(format!("model.layers.{i}.post_attention_layernorm.weight"), b.post_attention_layernorm.clone());
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
    /// `LlamaForCausalLM.from_pretrained` loads.
    pub fn save_hf_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut config = serde_json::to_value(&self.config)?;
        let map = config.as_object_mut().expect("an object");
        map.retain(|_, v| !v.is_null());
        map.insert("model_type".into(), "llama".into());
        map.insert("architectures".into(), serde_json::json!(["LlamaForCausalLM"]));
        map.insert("num_key_value_heads".into(), self.config.kv_heads().into());
        map.insert("head_dim".into(), self.config.head_dim().into());
        map.insert("rope_theta".into(), self.rope_theta.into());
        map.insert("hidden_act".into(), "silu".into());
        map.insert("torch_dtype".into(), "float32".into());
        let json = serde_json::to_string_pretty(&config)?;
        crate::format::write_atomic(&dir.join("config.json"), json.as_bytes())?;
        let tensors: Vec<(String, Tensor)> = self.tensors()?.into_iter().collect();
        crate::format::write_safetensors(&dir.join("model.safetensors"), &tensors)
    }

    /// Writes the model as a llama.cpp GGUF file: llama.cpp's tensor names, its q/k row
    /// permutation, the `llama.*` shape keys, and every other key of `source` (the GGUF the model
    /// came from: its tokenizer, chat template, ...). Weights held quantized
    /// ([`BaseQuant::Keep`]: those a merge left alone) are copied as stored, in their own types;
    /// the dense 2-D weights (the merged ones, or all of them on a dequantized base) are quantized
    /// to `quant` (rows its blocks do not divide fall back as in
    /// [`crate::quantized::fallback_type`]); the norms stay F32. Each linear's current weight is
    /// written (the merged one after [`crate::PeftModel::merge`]). Quantizing loses precision:
    /// `tests/cli.rs` measures it on SmolLM2.
    pub fn save_gguf(&self, path: &Path, quant: GgmlDType, source: &GgufMetadata) -> Result<SavedGguf> {
        if matches!(quant, GgmlDType::Q8_1 | GgmlDType::Q8K) {
            return Err(Error::config(
                "quant",
                format!("{} is an activation type; pick q8_0, q4_k, ...", type_name(quant)),
            ));
        }
        let c = &self.config;
        let (heads, kv) = (c.num_attention_heads as u32, c.kv_heads() as u32);
        let own = [
            ("general.architecture", Value::String("llama".into())),
            ("llama.embedding_length", Value::U32(c.hidden_size as u32)),
            ("llama.feed_forward_length", Value::U32(c.intermediate_size as u32)),
            ("llama.block_count", Value::U32(c.num_hidden_layers as u32)),
            ("llama.attention.head_count", Value::U32(heads)),
            ("llama.attention.head_count_kv", Value::U32(kv)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(c.rms_norm_eps as f32)),
            ("llama.rope.freq_base", Value::F32(self.rope_theta as f32)),
            ("llama.rope.dimension_count", Value::U32(c.head_dim() as u32)),
            ("llama.vocab_size", Value::U32(c.vocab_size as u32)),
        ];
        // candle writes its own alignment; the file type is this file's.
        let dropped = ["general.alignment", "general.file_type"];
        let mut metadata: Vec<(String, Value)> = source
            .values()
            .filter(|(k, _)| !dropped.contains(k) && !own.iter().any(|(o, _)| o == k))
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        metadata.sort_by(|a, b| a.0.cmp(&b.0));
        metadata.extend(own.into_iter().map(|(k, v)| (k.to_string(), v)));
        if let Some(t) = llama_file_type(quant) {
            metadata.push(("general.file_type".into(), Value::U32(t)));
        }
        let mut saved = SavedGguf::default();
        let mut tensors = Vec::new();
        let mut add = |hf: &str, w: &FrozenWeight| -> Result<()> {
            let name = rename(hf, false).ok_or_else(|| Error::Unsupported(format!("no GGUF name for `{hf}`")))?;
            if let Some(norm) = w.as_dense().filter(|t| t.rank() == 1) {
                tensors.push((name, QTensor::quantize(&norm.to_dtype(DType::F32)?, GgmlDType::F32)?));
                return Ok(());
            }
            let (out, inp) = w.dims2()?;
            let permuted_heads = match name.rsplit('.').nth(1) {
                Some("attn_q") => Some(heads as usize),
                Some("attn_k") => Some(kv as usize),
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
                    QTensor::quantize(&w, t)?
                }
            };
            tensors.push((name, q));
            Ok(())
        };
        add("model.embed_tokens.weight", &self.embed_tokens)?;
        for (i, b) in self.layers.iter().enumerate() {
            add(&format!("model.layers.{i}.input_layernorm.weight"), &b.input_layernorm.clone().into())?;
            add(
                &format!("model.layers.{i}.post_attention_layernorm.weight"),
                &b.post_attention_layernorm.clone().into(),
            )?;
        }
        add("model.norm.weight", &self.norm.clone().into())?;
        for (path, l) in self.linears() {
            if l.bias().is_some() {
                return Err(Error::Unsupported(format!(
                    "`{path}` has a bias, which the llama GGUF layout has no tensor for"
                )));
            }
            add(&format!("{path}.weight"), l.weight())?;
        }
        crate::gguf::write_gguf(path, &metadata, &tensors)?;
        Ok(saved)
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
        let (_, t) = ids.dims2()?;
        let device = ids.device();
        let offset = cache.len();
        if cache.layers.is_empty() {
            cache.layers = vec![None; self.layers.len()];
        }
        let mut h = self.embed_tokens.embedding(ids)?;
        let (cos, sin) = self.rope_tables(offset, t, device)?;
        for (layer, cached) in self.layers.iter().zip(cache.layers.iter_mut()) {
            h = self.block(layer, &h, &cos, &sin, Some(cached))?;
        }
        cache.len = offset + t;
        self.head(&h)
    }

    /// RoPE's `cos` and `sin` for positions `offset..offset + t`, `(t, head_dim / 2)`.
    fn rope_tables(&self, offset: usize, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let hd = self.config.head_dim();
        let inv_freq: Vec<f32> =
            (0..hd / 2).map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / hd as f64) as f32).collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, hd / 2), device)?;
        let pos = Tensor::arange(offset as u32, (offset + t) as u32, device)?.to_dtype(DType::F32)?.unsqueeze(1)?;
        let freqs = pos.broadcast_mul(&inv_freq)?;
        Ok((freqs.cos()?.to_dtype(self.dtype)?, freqs.sin()?.to_dtype(self.dtype)?))
    }

    /// One decoder layer on `h: (b, t, hidden)`; with `cached`, after the keys and values it
    /// holds, which it then extends.
    fn block(
        &self,
        layer: &Block,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cached: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, t, _) = h.dims3()?;
        let c = &self.config;
        let (heads, kv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let x = rms_norm(h, &layer.input_layernorm, c.rms_norm_eps)?;
        let l = &layer.linears;
        let heads_first = |y: Tensor, n: usize| y.reshape((b, t, n, hd))?.transpose(1, 2);
        let q = rope(&heads_first(l[Q].forward_checked(&x)?, heads)?, cos, sin)?;
        let mut k = rope(&heads_first(l[K].forward_checked(&x)?, kv)?, cos, sin)?;
        let mut v = heads_first(l[V].forward_checked(&x)?, kv)?;
        if let Some(cached) = cached {
            if let Some((k0, v0)) = cached.as_ref() {
                (k, v) = (Tensor::cat(&[k0, &k], 2)?, Tensor::cat(&[v0, &v], 2)?);
            }
            // Kept for the next call (views of the same storage: no copy).
            *cached = Some((k.detach(), v.detach()));
        }
        let attn = causal_attention(&q, &k, &v)?.transpose(1, 2)?.reshape((b, t, heads * hd))?;
        let h = (h + l[O].forward_checked(&attn)?)?;
        let x = rms_norm(&h, &layer.post_attention_layernorm, c.rms_norm_eps)?;
        let act = swiglu(&l[GATE].forward_checked(&x)?, &l[UP].forward_checked(&x)?)?;
        Ok((h + l[DOWN].forward_checked(&act)?)?)
    }

    /// The final norm and the output projection: logits for the last hidden states.
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        let h = rms_norm(h, &self.norm, self.config.rms_norm_eps)?;
        match &self.lm_head {
            Some(head) => head.forward_checked(&h),
            // Tied: the frozen embedding as the output projection, with no gradient of its own.
            None => self.embed_tokens.linear(&h, None),
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
        let (cos, sin) = self.rope_tables(0, t, ids.device())?;
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut h = self.embed_tokens.embedding(ids)?.detach();
        for layer in &self.layers {
            // The layer's graph is dropped with its output's: only the detached values stay.
            let out = self.block(layer, &h, &cos, &sin, None)?.detach();
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
            let out = self.block(layer, x.as_tensor(), &cos, &sin, None)?;
            let mut layer_grads = (out * &grad)?.sum_all()?.backward()?;
            grad = layer_grads.remove(x.as_tensor()).ok_or_else(|| no_gradient("a decoder layer's input"))?;
            let vars: Vec<Var> = layer.linears.iter().flat_map(adapter_vars).collect();
            move_grads(&mut layer_grads, &mut grads, &vars)?;
        }
        Ok((loss, grads))
    }

    /// Greedy decoding: appends up to `max_new` argmax tokens to `prompt`, stopping after `eos`
    /// (with a KV cache: each new token costs one position's forward pass).
    pub fn generate_greedy(&self, prompt: &[u32], max_new: usize, eos: Option<u32>) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(Error::config("prompt", "generation needs at least one prompt token"));
        }
        let device = self.embed_tokens.device();
        let mut cache = KvCache::default();
        let mut input = Tensor::new(prompt, device)?.unsqueeze(0)?;
        let mut new = Vec::new();
        for _ in 0..max_new {
            let logits = self.forward_cached(&input, &mut cache)?;
            let last = logits.squeeze(0)?.get(input.dim(1)? - 1)?;
            let next = last.argmax(D::Minus1)?.to_scalar::<u32>()?;
            new.push(next);
            if Some(next) == eos {
                break;
            }
            input = Tensor::new(&[next], device)?.unsqueeze(0)?;
        }
        Ok(new)
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

/// The trainable tensors of a layer's adapter, if it has one.
fn adapter_vars(layer: &AdaptedLinear) -> Vec<Var> {
    layer.adapter().map(|a| a.trainable_vars().into_iter().map(|(_, v)| v).collect()).unwrap_or_default()
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

/// The tensor `name` of `tensors`, cast to `dtype`; a missing one is a key mismatch.
fn get_tensor(tensors: &BTreeMap<String, Tensor>, name: &str, dtype: DType) -> Result<Tensor> {
    let t = tensors.get(name).ok_or_else(|| Error::KeyMismatch {
        path: "model weights".into(),
        missing: vec![name.to_string()],
        unexpected: vec![],
    })?;
    Ok(t.to_dtype(dtype)?)
}

/// llama.cpp's tensor names and HF's, for the whole model and (after `blk.N.` /
/// `model.layers.N.`) per layer.
const MODEL_TENSORS: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];
const LAYER_TENSORS: [(&str, &str); 9] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// The name of a tensor in the other convention: `to_hf` maps llama.cpp's names to HF's, else
/// HF's to llama.cpp's. `None` for a name the tables do not have.
fn rename(name: &str, to_hf: bool) -> Option<String> {
    let pick = |(gguf, hf): &(&'static str, &'static str)| if to_hf { (*gguf, *hf) } else { (*hf, *gguf) };
    if let Some((_, to)) = MODEL_TENSORS.iter().map(pick).find(|(from, _)| *from == name) {
        return Some(to.to_string());
    }
    let (from_prefix, to_prefix) = if to_hf { ("blk.", "model.layers.") } else { ("model.layers.", "blk.") };
    let (layer, tail) = name.strip_prefix(from_prefix)?.split_once('.')?;
    let (_, to) = LAYER_TENSORS.iter().map(pick).find(|(from, _)| *from == tail)?;
    Some(format!("{to_prefix}{layer}.{to}"))
}

/// HF's name of a llama.cpp tensor name.
fn gguf_to_hf_name(name: &str) -> Option<String> {
    rename(name, true)
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
        Llama::from_weights(config, &self.tensors, self.quantized, self.dtype)
    }
}

/// llama.cpp's `permute(w, n_head)` of q/k rows (what `convert_hf_to_gguf.py` applies), the
/// inverse of [`unpermute_rows`].
fn permute_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / n_head;
    Ok(w.reshape((n_head, 2, hd / 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// Undoes llama.cpp's `permute(w, n_head)` of q/k rows: GGUF stores each head's rows as
/// interleaved pairs; HF's rotate-half layout has the two halves apart.
fn unpermute_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / n_head;
    Ok(w.reshape((n_head, hd / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

impl LinearHost for Llama {
    fn linears(&self) -> Vec<(String, &AdaptedLinear)> {
        let blocks = self.layers.iter().enumerate().flat_map(|(i, b)| {
            LAYER_LINEARS.iter().zip(&b.linears).map(move |(n, l)| (format!("model.layers.{i}.{n}"), l))
        });
        blocks.chain(self.lm_head.iter().map(|h| ("lm_head".to_string(), h))).collect()
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut AdaptedLinear)> {
        let blocks = self.layers.iter_mut().enumerate().flat_map(|(i, b)| {
            LAYER_LINEARS.iter().zip(&mut b.linears).map(move |(n, l)| (format!("model.layers.{i}.{n}"), l))
        });
        blocks.chain(self.lm_head.iter_mut().map(|h| ("lm_head".to_string(), h))).collect()
    }

    fn other_params(&self) -> usize {
        let norms: usize =
            self.layers.iter().map(|l| l.input_layernorm.elem_count() + l.post_attention_layernorm.elem_count()).sum();
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
