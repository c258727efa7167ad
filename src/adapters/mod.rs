//! The adapter methods, one file each, named after the method.

pub(crate) mod common;
pub mod lora;

pub use lora::{Lora, LoraConfig, LoraInit};
