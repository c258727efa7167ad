//! LoHa (Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient
//! Federated Learning"; LyCORIS), identical to HF PEFT's `peft_type: "LOHA"`.
//!
//! ```text
//! hada_w1_a, hada_w2_a: (out, r)    hada_w1_b, hada_w2_b: (r, in)    all four trainable
//! dW = s * (hada_w1_a hada_w1_b) ⊙ (hada_w2_a hada_w2_b)      (⊙: element-wise product)
//! s  = alpha / r           (PEFT's only factor; another ScalingStrategy can train, not be saved)
//! y  = x W0^T + b + x dW^T = x (W0 + dW)^T + b
//! merge: W = W0 + dW
//! ```
//! The Hadamard product of two rank-`r` matrices has rank up to `r^2`: a LoRA's parameter count
//! with a higher-rank update.
//!
//! Init (PEFT's `init_weights: true`): `hada_w1_a`, `hada_w1_b`, `hada_w2_a` drawn, in that order,
//! like `nn.Linear`'s default (`kaiming_uniform(a = sqrt(5))`: `U(±1/sqrt(fan_in))` with
//! `fan_in = shape[1]`), `hada_w2_b = 0`, so `dW = 0`; `false` draws `hada_w2_b` too.
//! PEFT's `rank_dropout` and `module_dropout` are not implemented: configs that set them are
//! refused. PEFT forms `dW` in every forward pass, and so does this file; with the base in the
//! adapter's dtype the frozen and adapted products run as one matmul over `W0 + dW`.
//! File format: keys `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, without `.weight`.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::common::{check_rank, check_ranks_and_alphas, check_scaling, kaiming_uniform, rank_and_alpha, var};
use super::update::matmul_t;
use crate::adapter::{Adapter, AdapterCore, BaseLayer, BuiltAdapter};
use crate::frozen::add_branch;
use crate::method::{peft_fields, serde_alpha, BuildContext, Method, MethodConfig, MethodParams, PeftField, Variant};
use crate::scaling::{Scaling, ScalingStrategy, Standard};
use crate::target::TargetConfig;
use crate::{Error, Result};

/// PEFT's `LoHaConfig` (`peft_type: "LOHA"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LohaConfig {
    /// The rank `r` of each of the two factor pairs (PEFT default 8).
    #[serde(default = "default_r")]
    pub r: usize,
    /// `alpha` of the factor `s = alpha / r` (PEFT default 8).
    #[serde(default = "default_alpha", with = "serde_alpha")]
    pub alpha: f64,
    /// PEFT's dropout of output rows of `dW` in training; only 0 is supported.
    #[serde(default)]
    pub rank_dropout: f64,
    /// PEFT's probability of skipping the whole adapter in a training step; only 0 is supported.
    #[serde(default)]
    pub module_dropout: f64,
    /// PEFT's conv2d parametrisation; linear layers ignore it.
    #[serde(default)]
    pub use_effective_conv2d: bool,
    /// `true`: `hada_w2_b = 0` (a zero update); `false`: every factor drawn.
    #[serde(default = "super::common::yes")]
    pub init_weights: bool,
    /// Per-module ranks: a key matches a module path that ends in it (as a regex).
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alphas, matched like `rank_pattern`.
    #[serde(default, with = "serde_alpha::map")]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Which modules get an adapter.
    #[serde(flatten)]
    pub target: TargetConfig,
    /// A scaling strategy in place of `alpha / r` (not part of PEFT's format: such an adapter
    /// trains but cannot be saved).
    #[serde(skip)]
    pub scaling: Option<Scaling>,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}

impl LohaConfig {
    /// LoHa of rank `r` with `alpha` on `target_modules`, PEFT's defaults otherwise.
    pub fn new(r: usize, alpha: f64, target_modules: &[&str]) -> Self {
        Self {
            r,
            alpha,
            rank_dropout: 0.0,
            module_dropout: 0.0,
            use_effective_conv2d: false,
            init_weights: true,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            target: TargetConfig::list(target_modules),
            scaling: None,
        }
    }

    fn strategy(&self) -> Scaling {
        self.scaling.clone().unwrap_or_else(|| std::sync::Arc::new(Standard))
    }
}

impl MethodConfig for LohaConfig {
    const PEFT_FIELDS: &'static [PeftField] = peft_fields! {
        "exclude_modules" => null, false;
    };

    fn target(&self) -> &TargetConfig {
        &self.target
    }

    fn target_mut(&mut self) -> &mut TargetConfig {
        &mut self.target
    }

    fn validate(&self) -> Result<()> {
        check_ranks_and_alphas(self.r, &self.rank_pattern, "alpha", self.alpha, &self.alpha_pattern)?;
        for (name, p) in [("rank_dropout", self.rank_dropout), ("module_dropout", self.module_dropout)] {
            if p != 0.0 {
                return Err(Error::Unsupported(format!(
                    "LoHa's {name} = {p}: candle-peft implements LoHa without dropout; set {name} to 0"
                )));
            }
        }
        self.target.validate()
    }

    fn set_scaling(&mut self, strategy: Scaling) -> Result<()> {
        self.scaling = Some(strategy);
        Ok(())
    }

    fn to_peft(&self) -> Result<Self> {
        if self.strategy().name() != Standard.name() {
            return Err(Error::Unsupported(
                "saving LoHa with a custom scaling strategy: PEFT's LOHA format has only alpha / r".into(),
            ));
        }
        Ok(Self { scaling: None, ..self.clone() })
    }
}

impl Method for Loha {
    const PEFT_TYPE: &'static str = "LOHA";
    const VARIANTS: &'static [Variant] = &[Variant {
        name: "loha",
        peft: "LOHA",
        summary: "LoHa (Hyeon-Woo et al. 2022): dW = s (W1a W1b) * (W2a W2b), a Hadamard product of two rank-r pairs",
    }];
    type Config = LohaConfig;

    fn config(_name: &str, params: &MethodParams) -> Result<LohaConfig> {
        let alpha = params.alpha_or(2.0 * params.rank as f64);
        Ok(LohaConfig { target: params.target.clone(), ..LohaConfig::new(params.rank, alpha, &[]) })
    }

    fn build(config: &LohaConfig, ctx: BuildContext<'_>) -> Result<BuiltAdapter> {
        let (r, alpha) = rank_and_alpha(ctx.path, config.r, &config.rank_pattern, config.alpha, &config.alpha_pattern)?;
        check_rank(r)?;
        let scaling = check_scaling("alpha", alpha, config.strategy().scale(alpha, r))?;
        let (out, inp) = ctx.base.weight.dims2()?;
        let (dtype, dev) = (ctx.dtype, ctx.base.weight.device());
        let w1_a = kaiming_uniform(&mut *ctx.rng, out, r, dtype, dev)?;
        let w1_b = kaiming_uniform(&mut *ctx.rng, r, inp, dtype, dev)?;
        let w2_a = kaiming_uniform(&mut *ctx.rng, out, r, dtype, dev)?;
        let w2_b = match config.init_weights {
            true => Tensor::zeros((r, inp), dtype, dev)?,
            false => kaiming_uniform(&mut *ctx.rng, r, inp, dtype, dev)?,
        };
        Ok(BuiltAdapter::new(Loha::from_weights([w1_a, w1_b, w2_a, w2_b], scaling)?))
    }
}

/// PEFT's key suffixes of `[hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b]`.
const KEYS: [&str; 4] = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"];

/// One layer's LoHa: two trainable factor pairs whose products are multiplied element-wise.
#[derive(Debug)]
pub struct Loha {
    /// `[hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b]`.
    factors: [Var; 4],
    scaling: f64,
    in_features: usize,
    out_features: usize,
}

impl Loha {
    /// `s * (hada_w1_a hada_w1_b) ⊙ (hada_w2_a hada_w2_b)`.
    fn delta(&self) -> Result<Tensor> {
        let [a1, b1, a2, b2] = &self.factors;
        let w1 = a1.matmul(b1)?;
        let w2 = a2.matmul(b2)?;
        Ok(((w1 * w2)? * self.scaling)?)
    }

    /// A LoHa from `[hada_w1_a (out, r), hada_w1_b (r, in), hada_w2_a (out, r), hada_w2_b (r, in)]`
    /// and the factor `s`.
    pub fn from_weights(factors: [Tensor; 4], scaling: f64) -> Result<Self> {
        let (out, r) = factors[0].dims2()?;
        let inp = factors[1].dim(1)?;
        check_rank(r)?;
        for (i, want) in [[out, r], [r, inp], [out, r], [r, inp]].iter().enumerate() {
            if factors[i].dims() != want {
                return Err(Error::ShapeMismatch {
                    what: KEYS[i].into(),
                    expected: want.to_vec(),
                    actual: factors[i].dims().to_vec(),
                });
            }
        }
        let [a1, b1, a2, b2] = factors;
        Ok(Self {
            factors: [var(a1)?, var(b1)?, var(a2)?, var(b2)?],
            scaling: check_scaling("scaling", 0.0, scaling)?,
            in_features: inp,
            out_features: out,
        })
    }

    /// `[hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b]`.
    pub fn factors(&self) -> &[Var; 4] {
        &self.factors
    }

    /// The factor `s`.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }
}

impl AdapterCore for Loha {
    fn peft_type(&self) -> &'static str {
        Self::PEFT_TYPE
    }

    fn features(&self) -> (usize, usize) {
        (self.in_features, self.out_features)
    }

    fn dtype(&self) -> DType {
        self.factors[0].dtype()
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        KEYS.iter().zip(&self.factors).map(|(k, v)| (k.to_string(), v.clone())).collect()
    }
}

impl Adapter for Loha {
    fn forward(&self, x: &Tensor, base: BaseLayer<'_>, _train: bool) -> Result<Tensor> {
        let delta = self.delta()?;
        if let Some(w0) = base.weight.as_dense().filter(|w| x.dtype() == self.dtype() && w.dtype() == self.dtype()) {
            // One matmul over W0 + dW: the gradient of dW is the weight gradient this matmul
            // computes anyway, and W0 is a constant of the sum.
            let y = matmul_t(x, &(w0 + delta)?)?;
            return Ok(match base.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            });
        }
        add_branch(&base.forward(x)?, &matmul_t(&x.to_dtype(self.dtype())?, &delta)?)
    }

    fn delta_weight(&self, _w0: &Tensor) -> Result<Tensor> {
        self.delta()
    }
}
