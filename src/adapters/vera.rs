//! VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation"), identical to HF
//! PEFT's `peft_type: "VERA"`.
//!
//! ```text
//! vera_A: (r, max_in), vera_B: (max_out, r)   one frozen random pair shared by every layer
//! A_l = vera_A[:, :in], B_l = vera_B[:out, :]  (views of the shared pair, no copies)
//! lambda_b: (out,) init 0, lambda_d: (r,) init d_initial   trainable per layer
//! y = x W0^T + b + lambda_b * ((lambda_d * (drop(x) A_l^T)) B_l^T)    (no alpha scaling)
//! merge: W = W0 + diag(lambda_b) B_l diag(lambda_d) A_l
//! ```
//! The shared pair is kaiming-uniform with gain sqrt(2), `U(-sqrt(6 / fan_in), sqrt(6 / fan_in))`
//! with `fan_in = shape[1]`, drawn from a `StdRng` seeded with `projection_prng_key` (PEFT draws
//! from torch's generator, which cannot be reproduced here: adapters are exchanged with the
//! projections saved in the file, `base_model.vera_A` / `base_model.vera_B`).

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::common::{check_dropout, check_rank, normal, shared_pair, uniform, var};
use super::update::LowRankUpdate;
use crate::adapter::{AdapterCore, BaseLayer, BuiltAdapter};
use crate::frozen::{frozen_linear, vera_linear};
use crate::method::{peft_fields, BuildContext, Method, MethodConfig, MethodParams, PeftField, SharedTensors, Variant};
use crate::target::TargetConfig;
use crate::{Error, Result};

/// The shared projection keys (saved as `base_model.<key>`).
pub const SHARED_KEYS: [&str; 2] = ["vera_A", "vera_B"];

/// PEFT's `VeraConfig` (`peft_type: "VERA"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VeraConfig {
    /// The rank of the shared projections (PEFT default 256).
    #[serde(default = "default_r")]
    pub r: usize,
    /// The init of every `lambda_d` entry.
    #[serde(default = "default_d_initial")]
    pub d_initial: f64,
    /// Seed of the shared projections.
    #[serde(default)]
    pub projection_prng_key: u64,
    /// Whether the shared projections are in the file (always true for files written here).
    #[serde(default = "super::common::yes")]
    pub save_projection: bool,
    /// Dropout on the adapter branch input.
    #[serde(default)]
    pub vera_dropout: f64,
    /// `true`: `lambda_b = 0`, `lambda_d = d_initial`; `false`: PEFT's test init,
    /// `lambda_b = 1`, `lambda_d ~ N(0, 1)`.
    #[serde(default = "super::common::yes")]
    pub init_weights: bool,
    /// Which modules get an adapter.
    #[serde(flatten)]
    pub target: TargetConfig,
}

fn default_r() -> usize {
    256
}
fn default_d_initial() -> f64 {
    0.1
}

impl VeraConfig {
    /// VeRA of rank `r` on `target_modules`, PEFT's defaults otherwise.
    pub fn new(r: usize, target_modules: &[&str]) -> Self {
        Self {
            r,
            d_initial: default_d_initial(),
            projection_prng_key: 0,
            save_projection: true,
            vera_dropout: 0.0,
            init_weights: true,
            target: TargetConfig::list(target_modules),
        }
    }
}

impl MethodConfig for VeraConfig {
    const PEFT_FIELDS: &'static [PeftField] = peft_fields! {
        "bias" => "none", false;
        "fan_in_fan_out" => false, false;
    };

    fn target(&self) -> &TargetConfig {
        &self.target
    }

    fn target_mut(&mut self) -> &mut TargetConfig {
        &mut self.target
    }

    fn validate(&self) -> Result<()> {
        check_rank(self.r)?;
        check_dropout("vera_dropout", self.vera_dropout)?;
        if !self.d_initial.is_finite() {
            return Err(Error::config("d_initial", format!("{} is not finite", self.d_initial)));
        }
        self.target.validate()
    }

    fn to_peft(&self) -> Result<Self> {
        Ok(Self { save_projection: true, ..self.clone() })
    }
}

impl Method for Vera {
    const PEFT_TYPE: &'static str = "VERA";
    const VARIANTS: &'static [Variant] = &[Variant {
        name: "vera",
        peft: "VERA",
        summary: "VeRA (Kopiczko et al. 2024): trained vectors around one shared frozen random pair",
    }];
    const SHARED_KEYS: &'static [&'static str] = &SHARED_KEYS;
    type Config = VeraConfig;

    fn config(name: &str, params: &MethodParams) -> Result<VeraConfig> {
        params.no_alpha(name)?;
        Ok(VeraConfig { target: params.target.clone(), ..VeraConfig::new(params.rank, &[]) })
    }

    /// Draws the shared pair for layers of the given `(in, out)` shapes.
    fn shared_tensors(
        config: &VeraConfig,
        shapes: &[(usize, usize)],
        dtype: DType,
        device: &Device,
    ) -> Result<SharedTensors> {
        let max_in = shapes.iter().map(|s| s.0).max().unwrap_or(0);
        let max_out = shapes.iter().map(|s| s.1).max().unwrap_or(0);
        let mut rng = rand::rngs::StdRng::seed_from_u64(config.projection_prng_key);
        let a = uniform(&mut rng, (config.r, max_in), (6.0 / max_in as f64).sqrt(), dtype, device)?;
        let b = uniform(&mut rng, (max_out, config.r), (6.0 / config.r as f64).sqrt(), dtype, device)?;
        Ok(SharedTensors::from([(SHARED_KEYS[0].to_string(), a), (SHARED_KEYS[1].to_string(), b)]))
    }

    fn shared_saved(config: &VeraConfig) -> bool {
        config.save_projection
    }

    /// Builds the VeRA of a layer over views of the shared pair.
    fn build(config: &VeraConfig, ctx: BuildContext<'_>) -> Result<BuiltAdapter> {
        let (out, inp) = ctx.base.weight.dims2()?;
        let (a, b) = shared_pair(ctx.shared, SHARED_KEYS, "VeRA")?;
        let (ra, max_in) = a.dims2()?;
        let (max_out, rb) = b.dims2()?;
        if config.r > ra || config.r > rb {
            return Err(Error::config(
                "r",
                format!("VeRA rank {} exceeds the shared projections' rank {}", config.r, ra.min(rb)),
            ));
        }
        if inp > max_in || out > max_out {
            return Err(Error::ShapeMismatch {
                what: "shared vera_A / vera_B (max_in, max_out)".into(),
                expected: vec![inp, out],
                actual: vec![max_in, max_out],
            });
        }
        let dev = ctx.base.weight.device();
        let (lambda_b, lambda_d) = if config.init_weights {
            (Tensor::zeros(out, ctx.dtype, dev)?, Tensor::full(config.d_initial as f32, config.r, dev)?.to_dtype(ctx.dtype)?)
        } else {
            (Tensor::ones(out, ctx.dtype, dev)?, normal(&mut *ctx.rng, config.r, 1.0, ctx.dtype, dev)?)
        };
        let vera = Vera {
            vera_a: a.narrow(0, 0, config.r)?.narrow(1, 0, inp)?,
            vera_b: b.narrow(0, 0, out)?.narrow(1, 0, config.r)?,
            lambda_b: var(lambda_b)?,
            lambda_d: var(lambda_d)?,
            dropout: check_dropout("vera_dropout", config.vera_dropout)?,
            in_features: inp,
            out_features: out,
        };
        Ok(BuiltAdapter::new(vera))
    }
}

/// One layer's VeRA: two trainable vectors around views of the shared random pair.
#[derive(Debug)]
pub struct Vera {
    vera_a: Tensor,
    vera_b: Tensor,
    lambda_b: Var,
    lambda_d: Var,
    dropout: f32,
    in_features: usize,
    out_features: usize,
}

impl Vera {
    /// The layer's view `A_l: (r, in)` of the shared `vera_A`.
    pub fn vera_a(&self) -> &Tensor {
        &self.vera_a
    }

    /// The layer's view `B_l: (out, r)` of the shared `vera_B`.
    pub fn vera_b(&self) -> &Tensor {
        &self.vera_b
    }

    /// `B_l` with `lambda_b` folded into its rows (small: `(out, r)`), so the branch never
    /// scales an `(n, out)` activation.
    fn scaled_b(&self) -> Result<Tensor> {
        Ok(self.vera_b.to_dtype(self.dtype())?.broadcast_mul(&self.lambda_b.as_tensor().unsqueeze(1)?)?)
    }
}

impl AdapterCore for Vera {
    fn peft_type(&self) -> &'static str {
        Self::PEFT_TYPE
    }

    fn features(&self) -> (usize, usize) {
        (self.in_features, self.out_features)
    }

    fn dtype(&self) -> DType {
        self.lambda_d.dtype()
    }

    fn frozen_tensors(&self) -> Vec<Tensor> {
        vec![self.vera_a.clone(), self.vera_b.clone()]
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        vec![("vera_lambda_b".into(), self.lambda_b.clone()), ("vera_lambda_d".into(), self.lambda_d.clone())]
    }
}

impl LowRankUpdate for Vera {
    fn dropout(&self) -> f32 {
        self.dropout
    }

    fn head(&self, x: &Tensor) -> Result<Tensor> {
        // The view is strided (columns of vera_A); a contiguous copy of the (r, in) view is
        // small and transient.
        // The frozen-weight op: no gradient is computed for the frozen projection.
        let a = self.vera_a.to_dtype(self.dtype())?.contiguous()?;
        Ok(frozen_linear(x, &a, None)?.broadcast_mul(self.lambda_d.as_tensor())?)
    }

    fn tail(&self) -> Result<Tensor> {
        Ok(self.scaled_b()?.contiguous()?)
    }

    fn fused_linear(&self, x: &Tensor, base: &BaseLayer<'_>) -> Result<Option<Tensor>> {
        let (a, b) = (self.vera_a.to_dtype(self.dtype())?, self.vera_b.to_dtype(self.dtype())?);
        let (d, l) = (self.lambda_d.as_tensor(), self.lambda_b.as_tensor());
        Ok(Some(vera_linear(x, base.weight, base.bias, &a, &b, d, l)?))
    }

    fn factors(&self) -> Result<(Tensor, Tensor, f64)> {
        let b = self.scaled_b()?.broadcast_mul(&self.lambda_d.as_tensor().unsqueeze(0)?)?;
        Ok((b, self.vera_a.to_dtype(self.dtype())?, 1.0))
    }
}
