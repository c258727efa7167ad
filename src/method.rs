//! What the crate knows about an adapter method besides its math: its PEFT type, its config,
//! how it builds the adapter of one layer, the tensors its layers share, and the names users
//! give it.
//!
//! Each method's file implements [`Method`] (on its layer type) and [`MethodConfig`] (on its
//! config type); the registry in [`crate::adapters`] lists the methods once, and everything that
//! enumerates methods ([`crate::AdapterConfig`], the supported `peft_type`s, the CLI's
//! `--method`, the sweep's `methods`) is derived from that list.

use std::collections::BTreeMap;
use std::fmt::Debug;

use candle_core::{DType, Device, Tensor};
use rand::RngCore;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::adapter::{BaseLayer, BuiltAdapter};
use crate::scaling::Scaling;
use crate::target::TargetConfig;
use crate::{Error, Result};

/// Tensors shared by every adapted layer (VeRA's projections, RandLoRA's bases), keyed without
/// the `base_model.` prefix they carry in a file.
pub type SharedTensors = BTreeMap<String, Tensor>;

/// Everything a method needs to build the adapter of one layer.
pub struct BuildContext<'a> {
    /// The module path (`model.layers.0.self_attn.q_proj`), which `rank_pattern` and
    /// `alpha_pattern` keys match.
    pub path: &'a str,
    /// The frozen layer.
    pub base: BaseLayer<'a>,
    /// The adapter's dtype.
    pub dtype: DType,
    /// The seeded RNG the inits are drawn from.
    pub rng: &'a mut dyn RngCore,
    /// The tensors every layer shares (empty for most methods; see [`Method::shared_tensors`]).
    pub shared: &'a SharedTensors,
}

/// A method as a user names it: `--method rslora` on the CLI, `"methods": ["rslora"]` in a sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    /// The name (`lora`, `rslora`, `dora`, `lora-xs`, ...).
    pub name: &'static str,
    /// What it reads and writes in PEFT's format: the `peft_type` and the flags it sets
    /// (`LORA + use_dora`).
    pub peft: &'static str,
    /// One line for `--help`.
    pub summary: &'static str,
}

/// The hyper-parameters the CLI and the sweep set, common to the methods; each method maps
/// them onto its config ([`Method::config`]).
#[derive(Debug, Clone)]
pub struct MethodParams {
    /// The rank `r` (VeRA: the shared rank; MELoRA: the equivalent rank).
    pub rank: usize,
    /// `alpha` of the scaling factor; `None` for the method's default. A method without an
    /// alpha (VeRA) refuses one.
    pub alpha: Option<f64>,
    /// A scaling strategy in place of the method's (`None`: the method's); a method without a
    /// rank-dependent factor refuses one.
    pub scaling: Option<Scaling>,
    /// Which modules get an adapter.
    pub target: TargetConfig,
    /// Further fields of the method's PEFT config, by their PEFT names (`lora_dropout`, `n`,
    /// `d_initial`, ...): the CLI's `--set field=value`.
    pub options: Map<String, Value>,
}

impl MethodParams {
    /// Rank `rank` on `target`, every other field at the method's default.
    pub fn new(rank: usize, target: TargetConfig) -> Self {
        Self { rank, alpha: None, scaling: None, target, options: Map::new() }
    }

    /// `alpha`, or `default` when none was given.
    pub fn alpha_or(&self, default: f64) -> f64 {
        self.alpha.unwrap_or(default)
    }

    /// Refuses an `alpha` for a method that has none (and so no rank-dependent scaling factor).
    pub fn no_alpha(&self, method: &str) -> Result<()> {
        match self.alpha {
            Some(a) => Err(Error::config(
                "alpha",
                format!("{method} has no alpha and no rank-dependent scaling factor (got alpha {a}); leave it unset"),
            )),
            None => Ok(()),
        }
    }
}

/// A method's config: PEFT's `adapter_config.json` fields for that method.
pub trait MethodConfig: Serialize + DeserializeOwned + Clone + Debug + Send + Sync + 'static {
    /// The fields PEFT writes for this config that candle-peft does not interpret (besides
    /// [`COMMON_PEFT_FIELDS`]), with PEFT's defaults.
    const PEFT_FIELDS: &'static [PeftField];

    /// The module selection.
    fn target(&self) -> &TargetConfig;

    /// The module selection, mutably.
    fn target_mut(&mut self) -> &mut TargetConfig;

    /// Checks every hyper-parameter that does not depend on a layer.
    fn validate(&self) -> Result<()>;

    /// Uses `strategy` for the scaling factor. Errors for a method without a rank-dependent
    /// factor (the default).
    fn set_scaling(&mut self, strategy: Scaling) -> Result<()> {
        Err(Error::Unsupported(format!(
            "scaling strategy {}: this method has no rank-dependent scaling factor",
            strategy.name()
        )))
    }

    /// This config as PEFT must read it (a strategy PEFT does not know written as an equivalent
    /// alpha, projections marked as saved, ...). By default the config itself.
    fn to_peft(&self) -> Result<Self> {
        Ok(self.clone())
    }
}

/// An adapter method: implemented by its layer type (`Lora`, `Vera`, ...) in the method's own
/// file, and listed once in the registry ([`crate::adapters`]).
pub trait Method: 'static {
    /// PEFT's `peft_type` (`"LORA"`, `"VERA"`, ...).
    const PEFT_TYPE: &'static str;

    /// The names users give the method, with what each reads and writes. The first is the
    /// method's own name.
    const VARIANTS: &'static [Variant];

    /// The keys of the tensors every layer shares (saved as `base_model.<key>`); none by
    /// default.
    const SHARED_KEYS: &'static [&'static str] = &[];

    /// The config.
    type Config: MethodConfig;

    /// The config of variant `name` (one of [`Method::VARIANTS`]) for the common parameters;
    /// [`MethodParams::options`] and [`MethodParams::scaling`] are applied afterwards by the
    /// registry.
    fn config(name: &str, params: &MethodParams) -> Result<Self::Config>;

    /// The variant a config describes (DoRA for `use_dora`, ...). By default the first.
    fn variant(config: &Self::Config) -> &'static str {
        let _ = config;
        Self::VARIANTS[0].name
    }

    /// Checks what this method needs of its config beyond [`MethodConfig::validate`]
    /// (BoRA, which shares LoRA's config, refuses `use_dora`). By default nothing more.
    fn validate(config: &Self::Config) -> Result<()> {
        config.validate()
    }

    /// Builds the adapter of one layer.
    fn build(config: &Self::Config, ctx: BuildContext<'_>) -> Result<BuiltAdapter>;

    /// Draws the tensors every layer shares, for layers of the given `(in, out)` shapes. None by
    /// default.
    fn shared_tensors(
        config: &Self::Config,
        shapes: &[(usize, usize)],
        dtype: DType,
        device: &Device,
    ) -> Result<SharedTensors> {
        let _ = (config, shapes, dtype, device);
        Ok(SharedTensors::new())
    }

    /// Whether a file written with this config holds the shared tensors (PEFT's
    /// `save_projection`). True by default.
    fn shared_saved(config: &Self::Config) -> bool {
        let _ = config;
        true
    }
}

/// The config of variant `name` of method `M`: [`Method::config`], then the options and the
/// scaling strategy of `params`, then validation.
pub(crate) fn configure<M: Method>(name: &str, params: &MethodParams) -> Result<M::Config> {
    let mut config = M::config(name, params)?;
    if !params.options.is_empty() {
        let mut value = serde_json::to_value(&config)?;
        let fields = value.as_object_mut().ok_or_else(|| Error::Unsupported(format!("{name}: config is not a map")))?;
        for (key, v) in &params.options {
            if !fields.contains_key(key) {
                let known: Vec<&String> = fields.keys().collect();
                return Err(Error::config(
                    "options",
                    format!(
                        "{name} has no config field `{key}`; its fields: {}",
                        known.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            fields.insert(key.clone(), v.clone());
        }
        config = serde_json::from_value(value)
            .map_err(|e| Error::config("options", format!("{name}: {e} (in the fields set with options)")))?;
    }
    if let Some(s) = &params.scaling {
        config.set_scaling(s.clone()).map_err(|e| Error::config("scaling", format!("{name}: {e}")))?;
    }
    M::validate(&config)?;
    Ok(config)
}

/// Checks a config's shared tensors read from a file before they are used.
pub(crate) fn check_shared<M: Method>(config: &M::Config, shared: &SharedTensors) -> Result<()> {
    if M::SHARED_KEYS.is_empty() {
        return Ok(());
    }
    if !M::shared_saved(config) {
        return Err(Error::Unsupported(format!(
            "this {} adapter was saved with save_projection: false; its projections come from torch's random \
             stream (projection_prng_key) and cannot be reproduced here. Re-save it in PEFT with \
             save_projection=True",
            M::PEFT_TYPE
        )));
    }
    match M::SHARED_KEYS.iter().find(|k| !shared.contains_key(**k)) {
        Some(key) => Err(Error::Unsupported(format!("the {} file lacks base_model.{key}", M::PEFT_TYPE))),
        None => Ok(()),
    }
}

/// One field PEFT writes that candle-peft does not interpret, with PEFT 0.21.2's default.
/// `inert` fields are kept whatever their value; the others must hold the default.
#[derive(Debug)]
pub struct PeftField {
    /// The JSON key.
    pub name: &'static str,
    /// PEFT's default value.
    pub default: fn() -> Value,
    /// Whether any value is harmless (bookkeeping) rather than one that changes the math.
    pub inert: bool,
}

/// A `&[PeftField]` from `"name" => default_json, inert;` lines.
macro_rules! peft_fields {
    ($($name:literal => $default:tt, $inert:expr;)*) => {
        &[$($crate::method::PeftField { name: $name, default: || serde_json::json!($default), inert: $inert },)*]
    };
}
pub(crate) use peft_fields;

/// The fields every PEFT 0.21.2 config writes and candle-peft does not interpret.
pub const COMMON_PEFT_FIELDS: &[PeftField] = peft_fields! {
    "auto_mapping" => null, true;
    "modules_to_save" => null, false;
    "peft_version" => "0.21.2", true;
};

/// Checks the fields of `target.other` (PEFT's fields that no config struct holds) against
/// PEFT's defaults: a known one that would change the math must hold its default. Returns the
/// fields PEFT does not know, which are ignored (with a warning where the config was read), as
/// PEFT does.
pub(crate) fn check_peft_fields<'a>(
    peft_type: &str,
    target: &'a TargetConfig,
    fields: &[PeftField],
) -> Result<Vec<&'a str>> {
    let mut unknown = Vec::new();
    for (name, value) in &target.other {
        match COMMON_PEFT_FIELDS.iter().chain(fields).find(|f| f.name == name) {
            Some(f) if !f.inert && *value != (f.default)() && !(value.is_null() && (f.default)().is_null()) => {
                return Err(Error::Unsupported(format!(
                    "{peft_type} config field `{name}` = {value}: candle-peft supports only PEFT's default {}",
                    (f.default)()
                )));
            }
            Some(_) => {}
            None => unknown.push(name.as_str()),
        }
    }
    Ok(unknown)
}

/// Writes every field of [`COMMON_PEFT_FIELDS`] and `fields` that `map` lacks, with its default.
pub(crate) fn fill_peft_fields(map: &mut Map<String, Value>, fields: &[PeftField]) {
    for f in COMMON_PEFT_FIELDS.iter().chain(fields) {
        map.entry(f.name).or_insert_with(f.default);
    }
}

/// Serializes alphas as integers when they are whole numbers, as PEFT's configs hold them.
pub(crate) mod serde_alpha {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// An alpha as an integer when whole.
    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        super::alpha_json(*v).serialize(s)
    }

    /// An alpha, integer or float.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        f64::deserialize(d)
    }

    /// A map of alphas (`alpha_pattern`).
    pub mod map {
        use std::collections::BTreeMap;

        use serde::{Deserialize, Deserializer, Serializer};

        /// Each alpha as an integer when whole.
        pub fn serialize<S: Serializer>(m: &BTreeMap<String, f64>, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(m.iter().map(|(k, v)| (k, super::super::alpha_json(*v))))
        }

        /// A map of alphas, integers or floats.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
            BTreeMap::deserialize(d)
        }
    }
}

/// An alpha as JSON: an integer when it is a whole number (as PEFT writes `lora_alpha: 16`).
fn alpha_json(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        json!(v as i64)
    } else {
        json!(v)
    }
}
