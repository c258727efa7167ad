//! EDoRA (Nasiri & Garraghan 2025, "EDoRA: Efficient Weight-Decomposed Low-Rank Adaptation via
//! Singular Value Decomposition"): DoRA's decomposition over LoRA-XS's update.
//!
//! ```text
//! V  = W0 + s B R A        A, B frozen from the SVD of W0 (see lora_xs.rs), R: (r, r) trainable
//! W' = diag(m / stopgrad(rownorm(V))) V,   m: (out,) trainable
//! y  = x W'^T + b          (computed as in DoRA, without forming W')
//! ```
//! The magnitude starts at `rownorm(V)` (so `W' = V` at init; with `R ~ N(0, 1e-5^2)` this is
//! `rownorm(W0)` up to 1e-5, METHODS.md's init). The math is DoRA's ([`super::dora::Dora`]); this
//! file only pairs it with LoRA-XS. File format: `peft_type: "EDORA"`, LoRA-XS keys plus
//! `lora_magnitude_vector`.

use candle_core::{DType, Tensor};
use rand::Rng;

use super::dora::Dora;
use super::lora::LoraConfig;
use super::lora_xs::LoraXs;
use crate::adapter::BaseLayer;
use crate::config::BuiltAdapter;
use crate::Result;

/// EDoRA: [`Dora`] over a [`LoraXs`] update.
pub type EDora = Dora<LoraXs>;

/// Decomposes a LoRA-XS update over the frozen weight `w0` (see the module docs).
pub fn edora(update: LoraXs, w0: &Tensor) -> Result<EDora> {
    Dora::new(update, w0, "EDORA")
}

/// Builds the EDoRA of the module at `path` from LoRA's fields (`config`).
pub fn build(
    config: &LoraConfig,
    path: &str,
    base: BaseLayer<'_>,
    dtype: DType,
    rng: &mut impl Rng,
) -> Result<BuiltAdapter> {
    let xs = super::lora_xs::from_config(config, path, base, dtype, rng)?;
    Ok(BuiltAdapter { adapter: Box::new(edora(xs, base.weight)?), base_weight: None })
}
