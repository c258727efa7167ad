//! EDoRA (Nasiri & Garraghan 2025, "EDoRA: Efficient Weight-Decomposed Low-Rank Adaptation via
//! Singular Value Decomposition"): DoRA's decomposition over LoRA-XS's update.
//!
//! ```text
//! V  = W0 + s B R A        A, B frozen from the SVD of W0 (see lora_xs.rs), R: (r, r) trainable
//! W' = diag(m / stopgrad(rownorm(V))) V,   m: (out,) trainable
//! y  = x W'^T + b          (computed as in DoRA, without forming W')
//! ```
//! The magnitude starts at `rownorm(V)` (so `W' = V` at init; with `R ~ N(0, 1e-5^2)` this is
//! `rownorm(W0)` up to 1e-5, docs/METHODS.md's init). The math is DoRA's ([`super::dora::Dora`]); this
//! file only pairs it with LoRA-XS. File format: `peft_type: "EDORA"`, LoRA-XS keys plus
//! `lora_magnitude_vector`.

use super::dora::Dora;
use super::lora::LoraConfig;
use super::lora_xs::LoraXs;
use crate::adapter::BuiltAdapter;
use crate::frozen::FrozenWeight;
use crate::method::{BuildContext, Method, MethodConfig, MethodParams, Variant};
use crate::Result;

/// EDoRA: [`Dora`] over a [`LoraXs`] update.
pub type EDora = Dora<LoraXs>;

/// Decomposes a LoRA-XS update over the frozen weight `w0` (see the module docs).
pub fn edora(update: LoraXs, w0: &FrozenWeight) -> Result<EDora> {
    Dora::new(update, w0, EDora::PEFT_TYPE)
}

impl Method for EDora {
    const PEFT_TYPE: &'static str = "EDORA";
    const VARIANTS: &'static [Variant] = &[Variant {
        name: "edora",
        peft: "EDORA",
        summary: "EDoRA (Nasiri & Garraghan 2025): DoRA's magnitude over LoRA-XS's update",
    }];
    type Config = LoraConfig;

    fn config(_name: &str, params: &MethodParams) -> Result<LoraConfig> {
        Ok(LoraConfig::from_params(params))
    }

    fn validate(config: &LoraConfig) -> Result<()> {
        config.validate()?;
        config.refuse_dora(Self::PEFT_TYPE)
    }

    fn build(config: &LoraConfig, mut ctx: BuildContext<'_>) -> Result<BuiltAdapter> {
        let xs = LoraXs::from_config(config, &mut ctx)?;
        Ok(BuiltAdapter::new(edora(xs, ctx.base.weight)?))
    }
}
