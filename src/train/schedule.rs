//! Learning-rate schedules.

use std::f64::consts::PI;

use crate::{Error, Result};

/// The learning rate as a function of the optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrSchedule {
    /// The same rate every step.
    Constant {
        /// The rate.
        lr: f64,
    },
    /// Linear warmup from 0 over `warmup` steps, then a cosine decay to `min_lr` at `total`.
    WarmupCosine {
        /// The peak rate.
        lr: f64,
        /// Warmup steps.
        warmup: usize,
        /// The last step of the decay.
        total: usize,
        /// The rate at the end.
        min_lr: f64,
    },
}

impl LrSchedule {
    /// Checks the rates: a finite, positive peak rate `lr` (a negative one climbs the loss, NaN
    /// or infinity turns every adapter weight into NaN), and for the cosine a `min_lr` between 0
    /// and `lr`. The error names the field.
    pub fn validate(&self) -> Result<()> {
        let (Self::Constant { lr } | Self::WarmupCosine { lr, .. }) = *self;
        if !(lr.is_finite() && lr > 0.0) {
            return Err(Error::config(
                "schedule.lr",
                format!(
                    "{lr}; expected a positive learning rate (a negative one climbs the loss, NaN or infinity makes \
                     the adapter NaN)"
                ),
            ));
        }
        if let Self::WarmupCosine { min_lr, .. } = *self {
            if !(min_lr.is_finite() && (0.0..=lr).contains(&min_lr)) {
                return Err(Error::config(
                    "schedule.min_lr",
                    format!("{min_lr}; expected a rate between 0 and the peak learning rate {lr}"),
                ));
            }
        }
        Ok(())
    }

    /// The rate for step `step` (0-based).
    pub fn at(&self, step: usize) -> f64 {
        match *self {
            Self::Constant { lr } => lr,
            Self::WarmupCosine { lr, warmup, total, min_lr } => {
                if step < warmup {
                    lr * (step + 1) as f64 / warmup as f64
                } else {
                    let span = total.saturating_sub(warmup).max(1) as f64;
                    let progress = ((step - warmup) as f64 / span).min(1.0);
                    min_lr + 0.5 * (lr - min_lr) * (1.0 + (PI * progress).cos())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = LrSchedule::WarmupCosine { lr: 1.0, warmup: 4, total: 14, min_lr: 0.1 };
        assert_eq!(s.at(0), 0.25);
        assert_eq!(s.at(3), 1.0);
        assert!((s.at(4) - 1.0).abs() < 1e-12);
        assert!((s.at(9) - 0.55).abs() < 1e-12);
        assert!((s.at(14) - 0.1).abs() < 1e-12);
        assert!((s.at(100) - 0.1).abs() < 1e-12);
        assert_eq!(LrSchedule::Constant { lr: 3e-4 }.at(7), 3e-4);
    }
}
