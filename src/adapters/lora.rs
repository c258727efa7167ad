//! LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), and through its
//! scaling strategy rsLoRA (Kalajdzievski 2023) and RoRA (Liu et al. 2025).
//!
//! ```text
//! A: (r, in), B: (out, r), both trainable
//! y = x W0^T + b + s * (drop(x) A^T) B^T
//! merge: W = W0 + s B A
//! s = alpha / r          (LoRA)
//! s = alpha / sqrt(r)    (rsLoRA, RoRA; PEFT's `use_rslora: true`)
//! ```
//! Inits (PEFT's `init_lora_weights`): `true` = `A ~ kaiming_uniform(a=sqrt(5))`, `B = 0`;
//! `"gaussian"` = `A ~ N(0, (1/r)^2)`, `B = 0`; `"pissa"` (Meng et al. 2024) = the rank-`r`
//! SVD truncation `U_r S_r V_r^T` of `W0`, split as `A = sqrt(S_r / s) V_r^T`,
//! `B = U_r sqrt(S_r / s)`, with the base rewritten to the residual `W0 - s B A`; `false` = both
//! `A` and `B` drawn like `nn.Linear`'s default (a non-zero update, for tests).

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::common::{
    check_dropout, check_rank, check_ranks_and_alphas, check_scaling, kaiming_uniform, normal, rank_and_alpha, var,
};
use super::dora::Dora;
use super::update::{matmul_t, LowRankUpdate};
use crate::adapter::{Adapter, AdapterCore, BaseLayer, BuiltAdapter};
use crate::frozen::FrozenWeight;
use crate::linalg::truncated_svd;
use crate::method::{peft_fields, serde_alpha, BuildContext, Method, MethodConfig, MethodParams, PeftField, Variant};
use crate::scaling::{self, RankStabilized, Scaling, ScalingStrategy, Standard};
use crate::target::TargetConfig;
use crate::{Error, Result};

/// How LoRA's `A` and `B` start (PEFT's `init_lora_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraInit {
    /// `true`: `A ~ kaiming_uniform(a=sqrt(5))`, `B = 0` (PEFT's default).
    #[default]
    Kaiming,
    /// `false`: `A` and `B` both drawn like `nn.Linear`'s default, so the update is not zero.
    Random,
    /// `"gaussian"`: `A ~ N(0, (1/r)^2)`, `B = 0`.
    Gaussian,
    /// `"pissa"`: principal singular components of `W0`; the base becomes the residual.
    Pissa,
}

impl Serialize for LoraInit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::Kaiming => s.serialize_bool(true),
            Self::Random => s.serialize_bool(false),
            Self::Gaussian => s.serialize_str("gaussian"),
            Self::Pissa => s.serialize_str("pissa"),
        }
    }
}

impl<'de> Deserialize<'de> for LoraInit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Bool(true) => Ok(Self::Kaiming),
            serde_json::Value::Bool(false) => Ok(Self::Random),
            serde_json::Value::String(s) if s.eq_ignore_ascii_case("gaussian") => Ok(Self::Gaussian),
            serde_json::Value::String(s) if s == "pissa" => Ok(Self::Pissa),
            other => Err(D::Error::custom(format!(
                "init_lora_weights {other} is not supported (supported: true, false, \"gaussian\", \"pissa\")"
            ))),
        }
    }
}

/// A LoRA / rsLoRA / RoRA config, field for field PEFT's `LoraConfig` (`peft_type: "LORA"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraConfig {
    /// The rank `r` (PEFT default 8).
    #[serde(default = "default_r")]
    pub r: usize,
    /// `alpha` in the scaling factor (PEFT default 8).
    #[serde(default = "default_alpha", with = "serde_alpha")]
    pub lora_alpha: f64,
    /// Dropout probability on the adapter branch input, in `[0, 1)`.
    #[serde(default)]
    pub lora_dropout: f64,
    /// `alpha / sqrt(r)` instead of `alpha / r` (rsLoRA, RoRA).
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA (Liu et al. 2024): decompose the adapted weight into magnitude and direction.
    #[serde(default)]
    pub use_dora: bool,
    /// The init of `A` and `B`.
    #[serde(default)]
    pub init_lora_weights: LoraInit,
    /// Per-module ranks: a key matches a module path that ends in it (as a regex).
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alphas, matched like `rank_pattern`.
    #[serde(default, with = "serde_alpha::map")]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Which modules get an adapter.
    #[serde(flatten)]
    pub target: TargetConfig,
    /// A scaling strategy that overrides `use_rslora` (not part of PEFT's format: it is saved
    /// as the equivalent `lora_alpha` / `alpha_pattern`).
    #[serde(skip)]
    pub scaling: Option<Scaling>,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}

impl LoraConfig {
    /// LoRA with `s = alpha / r` on `target_modules`.
    pub fn lora(r: usize, alpha: f64, target_modules: &[&str]) -> Self {
        Self {
            r,
            lora_alpha: alpha,
            lora_dropout: 0.0,
            use_rslora: false,
            use_dora: false,
            init_lora_weights: LoraInit::Kaiming,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            target: TargetConfig::list(target_modules),
            scaling: None,
        }
    }

    /// rsLoRA (Kalajdzievski 2023): LoRA with `s = alpha / sqrt(r)`.
    pub fn rslora(r: usize, alpha: f64, target_modules: &[&str]) -> Self {
        Self { use_rslora: true, ..Self::lora(r, alpha, target_modules) }
    }

    /// RoRA (Liu et al. 2025): the same rank-stabilised factor `alpha / sqrt(r)` as rsLoRA,
    /// motivated by keeping accuracy rising with rank (notably when recovering pruned models).
    pub fn rora(r: usize, alpha: f64, target_modules: &[&str]) -> Self {
        Self::rslora(r, alpha, target_modules)
    }

    /// DoRA with `s = alpha / r` (Liu et al. 2024; PEFT's `use_dora: true`).
    pub fn dora(r: usize, alpha: f64, target_modules: &[&str]) -> Self {
        Self { use_dora: true, ..Self::lora(r, alpha, target_modules) }
    }

    /// Uses `strategy` for the scaling factor instead of `use_rslora`.
    pub fn with_scaling(mut self, strategy: impl ScalingStrategy + 'static) -> Self {
        self.use_rslora = strategy.is_rank_stabilized();
        self.scaling = Some(Arc::new(strategy));
        self
    }

    /// Sets the branch dropout.
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.lora_dropout = p;
        self
    }

    /// Sets the init.
    pub fn with_init(mut self, init: LoraInit) -> Self {
        self.init_lora_weights = init;
        self
    }

    /// The scaling strategy in force.
    pub fn strategy(&self) -> Scaling {
        self.scaling.clone().unwrap_or_else(|| scaling::from_use_rslora(self.use_rslora))
    }

    /// `(r, alpha)` for the module at `path`, after `rank_pattern` / `alpha_pattern`.
    pub fn rank_and_alpha(&self, path: &str) -> Result<(usize, f64)> {
        rank_and_alpha(path, self.r, &self.rank_pattern, self.lora_alpha, &self.alpha_pattern)
    }

    /// The hyper-parameters of the LoRA of the module at `path` (its rank and alpha after the
    /// patterns).
    pub fn layer_params(&self, path: &str) -> Result<LoraParams> {
        let (r, alpha) = self.rank_and_alpha(path)?;
        Ok(LoraParams {
            r,
            alpha,
            strategy: self.strategy(),
            dropout: self.lora_dropout,
            init: self.init_lora_weights,
        })
    }

    /// The LoRA of the layer in `ctx`, and for PiSSA the residual base weight.
    pub fn new_lora(&self, ctx: &mut BuildContext<'_>) -> Result<(Lora, Option<Tensor>)> {
        Lora::new(ctx.base, &self.layer_params(ctx.path)?, ctx.dtype, &mut *ctx.rng)
    }

    /// LoRA's fields from the CLI's and the sweep's common parameters: rank, alpha (default
    /// `2 r`), targets. Used by every method whose config is LoRA's.
    pub fn from_params(params: &MethodParams) -> Self {
        Self { target: params.target.clone(), ..Self::lora(params.rank, params.alpha_or(2.0 * params.rank as f64), &[]) }
    }

    /// Refuses `use_dora` for a method that shares LoRA's config but is not DoRA.
    pub fn refuse_dora(&self, peft_type: &str) -> Result<()> {
        if self.use_dora {
            return Err(Error::Unsupported(format!("use_dora with peft_type {peft_type} (DoRA is LORA + use_dora)")));
        }
        Ok(())
    }

    /// This config as PEFT must read it: a strategy PEFT does not know is written as the
    /// `lora_alpha` (and `alpha_pattern` entries) that give the same factor under `alpha / r`.
    pub fn peft_equivalent(&self) -> Self {
        let strategy = self.strategy();
        let mut out = self.clone();
        out.scaling = None;
        if strategy.is_rank_stabilized() {
            out.use_rslora = true;
        } else if strategy.name() != Standard.name() {
            out.use_rslora = false;
            let equivalent = |alpha: f64, r: usize| strategy.scale(alpha, r) * r as f64;
            out.lora_alpha = equivalent(self.lora_alpha, self.r);
            let mut alphas = BTreeMap::new();
            for key in self.rank_pattern.keys().chain(self.alpha_pattern.keys()) {
                let r = self.rank_pattern.get(key).copied().unwrap_or(self.r);
                let a = self.alpha_pattern.get(key).copied().unwrap_or(self.lora_alpha);
                alphas.insert(key.clone(), equivalent(a, r));
            }
            out.alpha_pattern = alphas;
        }
        out
    }
}

/// The fields of peft 0.21.2's LoRA `adapter_config.json` that live in [`TargetConfig::other`]
/// (besides [`crate::method::COMMON_PEFT_FIELDS`]).
const LORA_PEFT_FIELDS: &[PeftField] = peft_fields! {
    "alora_invocation_tokens" => null, false;
    "arrow_config" => null, false;
    "bias" => "none", false;
    "corda_config" => null, true;
    "ensure_weight_tying" => false, true;
    "eva_config" => null, true;
    "exclude_modules" => null, false;
    "fan_in_fan_out" => false, false;
    "kasa_config" => null, false;
    "layer_replication" => null, false;
    "loftq_config" => {}, true;
    "lora_bias" => false, false;
    "lora_ga_config" => null, true;
    "megatron_config" => null, false;
    "megatron_core" => "megatron.core", true;
    "monteclora_config" => null, false;
    "qalora_group_size" => 16, true;
    "target_parameters" => null, false;
    "trainable_token_indices" => null, false;
    "use_bdlora" => null, false;
    "use_qalora" => false, false;
    "velora_config" => null, false;
};

impl MethodConfig for LoraConfig {
    const PEFT_FIELDS: &'static [PeftField] = LORA_PEFT_FIELDS;

    fn target(&self) -> &TargetConfig {
        &self.target
    }

    fn target_mut(&mut self) -> &mut TargetConfig {
        &mut self.target
    }

    fn validate(&self) -> Result<()> {
        check_ranks_and_alphas(self.r, &self.rank_pattern, "lora_alpha", self.lora_alpha, &self.alpha_pattern)?;
        check_dropout("lora_dropout", self.lora_dropout)?;
        self.target.validate()
    }

    fn set_scaling(&mut self, strategy: Scaling) -> Result<()> {
        self.use_rslora = strategy.is_rank_stabilized();
        self.scaling = Some(strategy);
        Ok(())
    }

    fn to_peft(&self) -> Result<Self> {
        Ok(self.peft_equivalent())
    }
}

/// The hyper-parameters of one layer's LoRA (after `rank_pattern` / `alpha_pattern`).
#[derive(Debug, Clone)]
pub struct LoraParams {
    /// The rank `r`.
    pub r: usize,
    /// `alpha` of the scaling factor.
    pub alpha: f64,
    /// The scaling strategy: `s = strategy.scale(alpha, r)`.
    pub strategy: Scaling,
    /// Dropout probability on the branch input, in `[0, 1)`.
    pub dropout: f64,
    /// The init of `A` and `B`.
    pub init: LoraInit,
}

impl Default for LoraParams {
    /// PEFT's defaults: `r = 8`, `alpha = 8`, `s = alpha / r`, no dropout, kaiming `A`, zero `B`.
    fn default() -> Self {
        Self { r: 8, alpha: 8.0, strategy: Arc::new(Standard), dropout: 0.0, init: LoraInit::Kaiming }
    }
}

/// `lora`, `rslora`, `rora` and `dora` are all PEFT's `LORA`; DoRA's layer is [`Dora`] over a
/// [`Lora`].
impl Method for Lora {
    const PEFT_TYPE: &'static str = "LORA";
    const VARIANTS: &'static [Variant] = &[
        Variant { name: "lora", peft: "LORA", summary: "LoRA (Hu et al. 2021): s = alpha / r" },
        Variant {
            name: "rslora",
            peft: "LORA + use_rslora",
            summary: "rsLoRA (Kalajdzievski 2023): LoRA with s = alpha / sqrt(r)",
        },
        Variant {
            name: "rora",
            peft: "LORA + use_rslora",
            summary: "RoRA (Liu et al. 2025): LoRA with rsLoRA's s = alpha / sqrt(r)",
        },
        Variant {
            name: "dora",
            peft: "LORA + use_dora",
            summary: "DoRA (Liu et al. 2024): LoRA's direction with a trained magnitude per row",
        },
    ];
    type Config = LoraConfig;

    fn config(name: &str, params: &MethodParams) -> Result<LoraConfig> {
        let lora = LoraConfig::from_params(params);
        Ok(match name {
            "rslora" | "rora" => LoraConfig { scaling: Some(Arc::new(RankStabilized)), use_rslora: true, ..lora },
            "dora" => LoraConfig { use_dora: true, ..lora },
            _ => lora,
        })
    }

    /// `dora` for `use_dora`, `rslora` for `use_rslora` (a file cannot tell RoRA from rsLoRA: both
    /// write `use_rslora`), else `lora`.
    fn variant(config: &LoraConfig) -> &'static str {
        if config.use_dora {
            "dora"
        } else if config.strategy().is_rank_stabilized() {
            "rslora"
        } else {
            "lora"
        }
    }

    fn build(config: &LoraConfig, mut ctx: BuildContext<'_>) -> Result<BuiltAdapter> {
        let (lora, residual) = config.new_lora(&mut ctx)?;
        let adapter: Box<dyn Adapter> = if config.use_dora {
            let rewritten = residual.clone().map(FrozenWeight::from);
            Box::new(Dora::new(lora, rewritten.as_ref().unwrap_or(ctx.base.weight), "LORA")?)
        } else {
            Box::new(lora)
        };
        Ok(BuiltAdapter { adapter, base_weight: residual })
    }
}

/// One layer's LoRA: `y = base_out + s * (drop(x) A^T) B^T`.
#[derive(Debug)]
pub struct Lora {
    lora_a: Var,
    lora_b: Var,
    scaling: f64,
    dropout: f32,
    in_features: usize,
    out_features: usize,
}

impl Lora {
    /// A LoRA for `base` with `params` (factor `params.strategy.scale(alpha, r)`).
    ///
    /// Returns the adapter and, for PiSSA, the residual base weight that must replace `W0`.
    pub fn new(
        base: BaseLayer<'_>,
        params: &LoraParams,
        dtype: DType,
        rng: &mut (impl Rng + ?Sized),
    ) -> Result<(Self, Option<Tensor>)> {
        let r = params.r;
        check_rank(r)?;
        check_dropout("lora_dropout", params.dropout)?;
        let scaling = check_scaling("lora_alpha", params.alpha, params.strategy.scale(params.alpha, r))?;
        let (out_f, in_f) = base.weight.dims2()?;
        let dev = base.weight.device();
        let (a, b, residual) = match params.init {
            LoraInit::Kaiming => {
                (kaiming_uniform(rng, r, in_f, dtype, dev)?, Tensor::zeros((out_f, r), dtype, dev)?, None)
            }
            LoraInit::Gaussian => {
                (normal(rng, (r, in_f), 1.0 / r as f64, dtype, dev)?, Tensor::zeros((out_f, r), dtype, dev)?, None)
            }
            LoraInit::Random => {
                (kaiming_uniform(rng, r, in_f, dtype, dev)?, kaiming_uniform(rng, out_f, r, dtype, dev)?, None)
            }
            LoraInit::Pissa => {
                if scaling <= 0.0 {
                    return Err(Error::config("lora_alpha", "PiSSA needs a positive scaling factor"));
                }
                let w0 = base.weight.dense()?;
                let svd = truncated_svd(&w0, r)?;
                let root = (svd.s / scaling)?.sqrt()?;
                let a = svd.vt.broadcast_mul(&root.unsqueeze(1)?)?;
                let b = svd.u.broadcast_mul(&root.unsqueeze(0)?)?;
                let principal = (b.matmul(&a)? * scaling)?;
                let residual = (w0.to_dtype(DType::F32)? - principal)?.to_dtype(w0.dtype())?;
                (a.to_dtype(dtype)?, b.to_dtype(dtype)?, Some(residual))
            }
        };
        Ok((Self::from_weights(a, b, scaling, params.dropout)?, residual))
    }

    /// A LoRA from given `A: (r, in)` and `B: (out, r)`.
    pub fn from_weights(lora_a: Tensor, lora_b: Tensor, scaling: f64, dropout: f64) -> Result<Self> {
        let (r, in_features) = lora_a.dims2()?;
        let (out_features, r2) = lora_b.dims2()?;
        check_rank(r)?;
        if r != r2 {
            return Err(Error::ShapeMismatch {
                what: "lora_B.weight".into(),
                expected: vec![out_features, r],
                actual: lora_b.dims().to_vec(),
            });
        }
        Ok(Self {
            lora_a: var(lora_a)?,
            lora_b: var(lora_b)?,
            scaling: check_scaling("scaling", 0.0, scaling)?,
            dropout: check_dropout("lora_dropout", dropout)?,
            in_features,
            out_features,
        })
    }

    /// `A: (r, in)`.
    pub fn lora_a(&self) -> &Var {
        &self.lora_a
    }
    /// `B: (out, r)`.
    pub fn lora_b(&self) -> &Var {
        &self.lora_b
    }
    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.lora_a.dims()[0]
    }
    /// The factor `s`.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }
}

impl AdapterCore for Lora {
    fn peft_type(&self) -> &'static str {
        Self::PEFT_TYPE
    }

    fn features(&self) -> (usize, usize) {
        (self.in_features, self.out_features)
    }

    fn dtype(&self) -> DType {
        self.lora_a.dtype()
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        vec![("lora_A.weight".into(), self.lora_a.clone()), ("lora_B.weight".into(), self.lora_b.clone())]
    }
}

impl LowRankUpdate for Lora {
    fn dropout(&self) -> f32 {
        self.dropout
    }

    fn head(&self, x: &Tensor) -> Result<Tensor> {
        // s is applied to the (.., r) activation rather than the (.., out) output: one pass
        // over a tensor r/out the size, forward and backward.
        Ok((matmul_t(x, &self.lora_a)? * self.scaling)?)
    }

    fn tail(&self) -> Result<Tensor> {
        Ok(self.lora_b.as_tensor().clone())
    }

    fn linear_head(&self) -> Result<Option<(Tensor, f64)>> {
        Ok(Some((self.lora_a.as_tensor().clone(), self.scaling)))
    }

    fn factors(&self) -> Result<(Tensor, Tensor, f64)> {
        Ok((self.lora_b.as_tensor().clone(), self.lora_a.as_tensor().clone(), self.scaling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::SeedableRng;

    fn base(out: usize, inp: usize) -> Tensor {
        Tensor::randn(0f32, 1., (out, inp), &Device::Cpu).unwrap()
    }

    #[test]
    fn default_init_is_a_zero_update_with_bounded_a() -> Result<()> {
        let w = base(6, 16);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let (lora, res) = Lora::new(BaseLayer { weight: &FrozenWeight::from(w.clone()), bias: None }, &LoraParams { r: 4, alpha: 8.0, ..Default::default() }, DType::F32, &mut rng)?;
        assert!(res.is_none());
        assert_eq!(lora.scaling(), 2.0);
        let a_max = lora.lora_a().abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(a_max <= 0.25 && a_max > 0.1, "{a_max}");
        assert_eq!(lora.lora_b().abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn gaussian_init_has_std_one_over_r() -> Result<()> {
        let w = base(8, 4096);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let base = BaseLayer { weight: &FrozenWeight::from(w.clone()), bias: None };
        let (lora, _) = Lora::new(base, &LoraParams { r: 4, alpha: 8.0, init: LoraInit::Gaussian, ..Default::default() }, DType::F32, &mut rng)?;
        let a = lora.lora_a().flatten_all()?.to_vec1::<f32>()?;
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let std = (a.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / a.len() as f32).sqrt();
        assert!(mean.abs() < 0.01 && (std - 0.25).abs() < 0.01, "mean {mean} std {std}");
        assert_eq!(lora.lora_b().abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn pissa_residual_plus_update_is_the_base() -> Result<()> {
        let w = base(6, 5);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let (mut lora, res) = Lora::new(BaseLayer { weight: &FrozenWeight::from(w.clone()), bias: None }, &LoraParams { r: 2, alpha: 4.0, strategy: std::sync::Arc::new(RankStabilized), init: LoraInit::Pissa, ..Default::default() }, DType::F32, &mut rng)?;
        let res = res.expect("PiSSA rewrites the base");
        let back = lora.merge(&res)?;
        let err = (back - &w)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "{err}");
        Ok(())
    }

    #[test]
    fn rank_zero_bad_dropout_and_nan_alpha_are_errors() {
        let w = base(3, 3);
        let b = BaseLayer { weight: &FrozenWeight::from(w.clone()), bias: None };
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let mut new =
            |r, alpha, p| Lora::new(b, &LoraParams { r, alpha, dropout: p, ..Default::default() }, DType::F32, &mut rng).map(|_| ());
        assert!(matches!(new(0, 8.0, 0.0), Err(Error::InvalidConfig { name: "r", .. })));
        assert!(matches!(new(2, f64::NAN, 0.0), Err(Error::InvalidConfig { name: "lora_alpha", .. })));
        assert!(matches!(new(2, 8.0, 1.0), Err(Error::InvalidConfig { name: "lora_dropout", .. })));
        assert!(matches!(new(2, 8.0, -0.1), Err(Error::InvalidConfig { name: "lora_dropout", .. })));
    }
}
