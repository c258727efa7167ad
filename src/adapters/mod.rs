//! The adapter methods, one file each, named after the method.

pub mod bora;
pub(crate) mod common;
pub mod dora;
pub mod edora;
pub mod lora;
pub mod lora_xs;
pub mod melora;
pub mod randlora;
pub mod update;
pub mod vera;

pub use bora::Bora;
pub use dora::Dora;
pub use edora::EDora;
pub use lora::{Lora, LoraConfig, LoraInit};
pub use lora_xs::LoraXs;
pub use melora::{Melora, MeloraConfig};
pub use randlora::{RandLora, RandLoraConfig};
pub use update::LowRankUpdate;
pub use vera::{Vera, VeraConfig};
