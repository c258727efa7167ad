//! Trainable models whose linear layers carry adapters.

pub mod llama;

pub use llama::{GgufMetadata, Llama, LlamaConfig};
