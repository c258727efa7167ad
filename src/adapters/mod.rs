//! The adapter methods, one file each, named after the method.

pub(crate) mod common;
pub mod dora;
pub mod lora;
pub mod update;

pub use dora::Dora;
pub use lora::{Lora, LoraConfig, LoraInit};
pub use update::LowRankUpdate;
