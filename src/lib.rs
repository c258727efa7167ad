//! # candle-peft
//!
//! Parameter-efficient fine-tuning of LLMs with the LoRA family of adapters, on
//! [candle](https://github.com/huggingface/candle), with adapter files in HF PEFT's format.
//!
//! - [`Adapter`] (with [`AdapterCore`]): the trait every method implements; [`AdaptedLinear`]
//!   wraps a frozen linear layer with an adapter and is a candle `Module`.
//! - [`adapters`]: the methods, one file each (LoRA, rsLoRA, RoRA, DoRA, BoRA, LoRA-XS, EDoRA,
//!   MELoRA, VeRA, RandLoRA, LoHa), and the registry that lists them once; [`AdapterConfig`],
//!   the CLI's `--method` and the sweep's methods come from it ([`Method`], `CONTRIBUTING.md`).
//! - [`scaling`]: the rank-dependent factor (`alpha/r`, `alpha/sqrt(r)`, fixed, your own) as a
//!   pluggable [`ScalingStrategy`].
//! - [`PeftModel`]: injects adapters by module path (`target_modules`, `rank_pattern`, ...),
//!   collects trainable variables, merges, saves and loads `adapter_config.json` +
//!   `adapter_model.safetensors` as PEFT does.
//! - [`device()`]: `auto | cpu | cuda:N | metal` at run time.
//! - [`models::Llama`]: LLaMA, Llama 3, Mistral, Qwen2, Qwen3, Gemma 3 and Phi-3 ([`models::Family`]) from HF
//!   dirs, GGUF files or Hub ids ([`hub`]), KV-cached generation; [`train::Trainer`],
//!   [`chat::ChatTemplate`]: fine-tuning a real model; [`fused`]: the training ops that keep
//!   only what their backward pass needs.
//! - [`sweep`]: scaling strategies compared across ranks (rsLoRA / RoRA in miniature).
//!
//! ```no_run
//! use candle_peft::{AdapterConfig, InitOptions, LoraConfig, NamedLinears, PeftModel};
//! # fn main() -> candle_peft::Result<()> {
//! let device = candle_peft::device("auto")?;
//! let base = NamedLinears::from_safetensors("model.safetensors".as_ref(), &device, candle_core::DType::F32)?;
//! let config = AdapterConfig::Lora(LoraConfig::rslora(16, 32.0, &["q_proj", "v_proj"]));
//! let peft = PeftModel::new(base, config, InitOptions::default())?;
//! println!("{}", peft.parameter_count());
//! let vars = peft.trainable_vars()?; // hand these to an optimizer
//! # let _ = vars;
//! peft.save_pretrained("my-adapter".as_ref())?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod adapter;
pub mod adapters;
pub mod alloc;
pub mod chat;
pub mod combine;
pub mod config;
pub mod convert;
pub mod device;
pub mod error;
pub mod format;
pub mod frozen;
pub mod fused;
pub mod gguf;
pub mod gptq;
pub mod hub;
mod kernels;
pub mod layer;
pub mod linalg;
pub mod method;
pub mod models;
pub mod peft_model;
#[cfg(feature = "plot")]
pub mod plot;
pub mod quantized;
pub mod scaling;
pub mod sweep;
pub mod target;
pub mod tokenizer;
pub mod train;

pub use adapter::{Adapter, AdapterCore, BaseLayer, BuiltAdapter};
pub use adapters::exports::*;
pub use adapters::{AdapterConfig, Dora, LowRankUpdate};
pub use combine::{Combination, CombineOptions, MajoritySign};
pub use device::{device, DeviceSpec};
pub use error::{Error, Result};
pub use frozen::FrozenWeight;
pub use layer::{AdaptedLinear, BASE_ROWS, DEFAULT_ADAPTER};
pub use method::{Method, MethodConfig, MethodParams};
pub use peft_model::{InitOptions, LinearHost, NamedLinears, ParameterCount, PeftModel};
pub use scaling::{Fixed, RandLoraPaper, RankStabilized, ScalingStrategy, Standard};
pub use target::{TargetConfig, TargetModules};

/// The README's code blocks, compiled (and run where not `no_run`) by `cargo test`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
