//! Rank-dependent scaling of the adapter update, as a pluggable strategy.
//!
//! A LoRA-style update is `s * B A`; the factor `s` is a function of the user's `alpha` and the
//! adapter rank `r`. LoRA (Hu et al. 2021) uses `alpha / r`; rsLoRA (Kalajdzievski 2023) proves
//! that only `s = Theta(1 / sqrt(r))` keeps learning stable as `r` grows and uses
//! `alpha / sqrt(r)`, as does RoRA (Liu et al. 2025). Adapters never compute the factor
//! themselves: they receive it from a [`ScalingStrategy`], so a user can plug in their own.
//!
//! ```
//! use candle_peft::scaling::{ScalingStrategy, Standard, RankStabilized};
//! assert_eq!(Standard.scale(16.0, 4), 4.0);
//! assert_eq!(RankStabilized.scale(16.0, 4), 8.0);
//! ```

use std::fmt::Debug;
use std::sync::Arc;

/// Maps `(alpha, rank)` to the factor `s` that multiplies an adapter's update.
///
/// Implement it to try a scaling rule of your own; see `examples/custom_scaling.rs`.
pub trait ScalingStrategy: Debug + Send + Sync {
    /// A short name for logs and reports (`"alpha/r"`, `"alpha/sqrt(r)"`, ...).
    fn name(&self) -> String;

    /// The factor `s` for an adapter of rank `rank` (always at least 1) with `alpha`.
    fn scale(&self, alpha: f64, rank: usize) -> f64;

    /// The factor for a RandLoRA layer made of `num_bases` random bases of rank `rank`. By
    /// default [`ScalingStrategy::scale`]`(alpha, rank)`; [`RandLoraPaper`] uses `num_bases`.
    fn scale_bases(&self, alpha: f64, rank: usize, num_bases: usize) -> f64 {
        let _ = num_bases;
        self.scale(alpha, rank)
    }

    /// Whether this is rsLoRA's `alpha / sqrt(r)`, which PEFT stores as `use_rslora: true`.
    ///
    /// Any other strategy is written to PEFT's format as an equivalent `lora_alpha`
    /// (`s * r`), so PEFT computes the same factor.
    fn is_rank_stabilized(&self) -> bool {
        false
    }
}

/// LoRA's factor `alpha / r` (Hu et al. 2021).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Standard;

impl ScalingStrategy for Standard {
    fn name(&self) -> String {
        "alpha/r".into()
    }
    fn scale(&self, alpha: f64, rank: usize) -> f64 {
        alpha / rank as f64
    }
}

/// rsLoRA's and RoRA's factor `alpha / sqrt(r)` (Kalajdzievski 2023; Liu et al. 2025).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RankStabilized;

impl ScalingStrategy for RankStabilized {
    fn name(&self) -> String {
        "alpha/sqrt(r)".into()
    }
    fn scale(&self, alpha: f64, rank: usize) -> f64 {
        alpha / (rank as f64).sqrt()
    }
    fn is_rank_stabilized(&self) -> bool {
        true
    }
}

/// A constant factor, whatever the rank and alpha.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fixed(pub f64);

impl ScalingStrategy for Fixed {
    fn name(&self) -> String {
        format!("fixed({})", self.0)
    }
    fn scale(&self, _alpha: f64, _rank: usize) -> f64 {
        self.0
    }
}

/// The RandLoRA paper's factor `2 / sqrt(nb)` for `nb` random bases (Albert et al. 2025), where
/// PEFT uses `alpha / r`. Outside RandLoRA it reads `rank` as the number of bases.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RandLoraPaper;

impl ScalingStrategy for RandLoraPaper {
    fn name(&self) -> String {
        "2/sqrt(num_bases)".into()
    }
    fn scale(&self, _alpha: f64, rank: usize) -> f64 {
        2.0 / (rank as f64).sqrt()
    }
    fn scale_bases(&self, _alpha: f64, _rank: usize, num_bases: usize) -> f64 {
        2.0 / (num_bases as f64).sqrt()
    }
}

/// A shared handle to a strategy, as stored in configs.
pub type Scaling = Arc<dyn ScalingStrategy>;

/// The strategy PEFT's `use_rslora` flag selects.
pub fn from_use_rslora(use_rslora: bool) -> Scaling {
    if use_rslora {
        Arc::new(RankStabilized)
    } else {
        Arc::new(Standard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_factors_match_their_formulas() {
        for r in [1usize, 4, 8, 64, 256] {
            assert_eq!(Standard.scale(32.0, r), 32.0 / r as f64);
            assert_eq!(RankStabilized.scale(32.0, r), 32.0 / (r as f64).sqrt());
            assert_eq!(Fixed(0.5).scale(32.0, r), 0.5);
        }
        assert!(RankStabilized.is_rank_stabilized());
        assert!(!Standard.is_rank_stabilized());
    }
}
