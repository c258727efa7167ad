//! The adapter methods, one file each, named after the method.

pub mod bora;
pub(crate) mod common;
pub mod dora;
pub mod edora;
pub mod lora;
pub mod lora_xs;
pub mod update;

pub use bora::Bora;
pub use dora::Dora;
pub use edora::EDora;
pub use lora::{Lora, LoraConfig, LoraInit};
pub use lora_xs::LoraXs;
pub use update::LowRankUpdate;
