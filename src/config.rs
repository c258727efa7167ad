//! Adapter configs: [`AdapterConfig`], one serde enum over the methods, read and written as HF
//! PEFT's `adapter_config.json`.
//!
//! Each method owns its fields (see its file under `adapters/`); the fields that choose which
//! modules are adapted are shared ([`TargetConfig`]). Fields PEFT writes that candle-peft does not
//! interpret are checked: harmless ones (`task_type`, `revision`, ...) are kept, ones that would
//! change the math are refused unless they hold PEFT's default, and fields PEFT does not know
//! are ignored with a warning, as PEFT does.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::adapter::Adapter;
use crate::adapters::lora::LoraConfig;
use crate::adapters::melora::MeloraConfig;
use crate::adapters::randlora::RandLoraConfig;
use crate::adapters::vera::VeraConfig;
use crate::{Error, Result};

/// `target_modules` / `exclude_modules`: a list of names or a regex.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// A module matches when its path equals an entry or ends in `.entry`.
    List(Vec<String>),
    /// A regex that must match the whole path; `"all-linear"` means every linear layer but the
    /// output layer.
    Regex(String),
}

/// `layers_to_transform`: one layer index or a list of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerIndices {
    /// One index.
    One(usize),
    /// Several indices.
    Many(Vec<usize>),
}

/// `layers_pattern`: the name of the module list that holds the layers (`"layers"`, `"h"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersPattern {
    /// One name.
    One(String),
    /// Several names; the first that matches is used.
    Many(Vec<String>),
}

/// The fields every PEFT config has that select the adapted modules, plus PEFT's bookkeeping
/// fields. Matching follows `peft.tuners.tuners_utils.check_target_module_exists`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TargetConfig {
    /// The modules to adapt.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted, matched like `target_modules`.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// Adapt only the layers with these indices.
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    /// The module-list name the layer index follows.
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    /// The base model's name or path (informational).
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// PEFT's task type (`"CAUSAL_LM"`, ...); informational here.
    #[serde(default)]
    pub task_type: Option<String>,
    /// PEFT's `inference_mode` (it writes `true` in saved adapters).
    #[serde(default)]
    pub inference_mode: bool,
    /// The base model's revision (informational).
    #[serde(default)]
    pub revision: Option<String>,
    /// Fields of PEFT's config that candle-peft does not interpret (see [`AdapterConfig`]).
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// The name PEFT gives to "every linear layer except the output layer".
pub const ALL_LINEAR: &str = "all-linear";

impl TargetConfig {
    /// Targets the modules named in `names` (matched as path suffixes).
    pub fn list(names: &[&str]) -> Self {
        Self {
            target_modules: Some(TargetModules::List(names.iter().map(|s| s.to_string()).collect())),
            ..Self::default()
        }
    }

    /// Checks that regexes compile and that `layers_to_transform` comes with a list of
    /// targets (PEFT refuses it with a regex).
    pub fn validate(&self) -> Result<()> {
        if matches!(self.target_modules, Some(TargetModules::Regex(_))) && self.layers_to_transform.is_some() {
            return Err(Error::config(
                "layers_to_transform",
                "cannot be used when target_modules is a string (regex or \"all-linear\")",
            ));
        }
        for m in [&self.target_modules, &self.exclude_modules].into_iter().flatten() {
            if let TargetModules::Regex(r) = m {
                if !r.eq_ignore_ascii_case(ALL_LINEAR) {
                    full_regex(r)?;
                }
            }
        }
        Ok(())
    }

    /// Whether the module at `path` gets an adapter. `output_layer` is the model's output
    /// projection, which `"all-linear"` leaves out.
    pub fn matches(&self, path: &str, output_layer: Option<&str>) -> Result<bool> {
        if let Some(ex) = &self.exclude_modules {
            if names_match(ex, path, output_layer)? {
                return Ok(false);
            }
        }
        let Some(target) = &self.target_modules else {
            return Err(Error::config(
                "target_modules",
                "no target_modules given (a list of module names, a regex, or \"all-linear\")",
            ));
        };
        match target {
            TargetModules::Regex(_) => names_match(target, path, output_layer),
            TargetModules::List(names) => {
                if names.iter().any(|n| n == path) {
                    return Ok(true);
                }
                if !names_match(target, path, output_layer)? {
                    return Ok(false);
                }
                self.layer_index_allowed(path)
            }
        }
    }

    /// PEFT applies `layers_to_transform` only with a list of `target_modules` and reads the
    /// first numbered path segment (after `layers_pattern`, if given) as the layer index.
    fn layer_index_allowed(&self, path: &str) -> Result<bool> {
        let allowed: Vec<usize> = match &self.layers_to_transform {
            None => return Ok(true),
            Some(LayerIndices::One(i)) => vec![*i],
            Some(LayerIndices::Many(v)) if v.is_empty() => return Ok(true),
            Some(LayerIndices::Many(v)) => v.clone(),
        };
        let patterns: Vec<String> = match &self.layers_pattern {
            None => vec![],
            Some(LayersPattern::One(p)) => vec![p.clone()],
            Some(LayersPattern::Many(v)) => v.clone(),
        };
        let mut index = None;
        if patterns.iter().all(|p| p.is_empty()) {
            index = capture_index(r"^.*?\.[^.]*\.(?P<idx>\d+)\.", path)?;
        } else {
            for p in &patterns {
                index = capture_index(&format!(r"^(?:.*?\.)?{p}\.(?P<idx>\d+)\."), path)?;
                if index.is_some() {
                    break;
                }
            }
        }
        Ok(index.is_some_and(|i| allowed.contains(&i)))
    }
}

fn capture_index(re: &str, path: &str) -> Result<Option<usize>> {
    let re = Regex::new(re).map_err(|e| Error::config("layers_pattern", e.to_string()))?;
    Ok(re.captures(path).and_then(|c| c.name("idx")).and_then(|m| m.as_str().parse().ok()))
}

fn full_regex(pattern: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| Error::config("target_modules", format!("invalid regex `{pattern}`: {e}")))
}

fn names_match(m: &TargetModules, path: &str, output_layer: Option<&str>) -> Result<bool> {
    Ok(match m {
        TargetModules::Regex(r) if r.eq_ignore_ascii_case(ALL_LINEAR) => output_layer != Some(path),
        TargetModules::Regex(r) => full_regex(r)?.is_match(path),
        TargetModules::List(names) => names.iter().any(|n| path == n || path.ends_with(&format!(".{n}"))),
    })
}

/// The value of the first `pattern` key that matches `path` as PEFT's `get_pattern_key` does
/// (`(.*\.)?(key)$`), if any.
pub fn pattern_value<T: Copy>(patterns: &BTreeMap<String, T>, path: &str) -> Result<Option<T>> {
    for (key, value) in patterns {
        let re = Regex::new(&format!(r"^(.*\.)?({key})$"))
            .map_err(|e| Error::config("rank_pattern", format!("invalid pattern `{key}`: {e}")))?;
        if re.is_match(path) {
            return Ok(Some(*value));
        }
    }
    Ok(None)
}

/// A freshly built adapter, and the base weight that must replace the layer's (PiSSA-style
/// inits rewrite the base), if any.
#[derive(Debug)]
pub struct BuiltAdapter {
    /// The adapter.
    pub adapter: Box<dyn Adapter>,
    /// The new frozen base weight, when the init changed it.
    pub base_weight: Option<Tensor>,
}

/// An adapter config of any method, tagged by PEFT's `peft_type`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "peft_type")]
pub enum AdapterConfig {
    /// LoRA, rsLoRA, RoRA, and DoRA with `use_dora` (`"LORA"`).
    #[serde(rename = "LORA")]
    Lora(LoraConfig),
    /// BoRA (`"BORA"`, LoRA's fields).
    #[serde(rename = "BORA")]
    Bora(LoraConfig),
    /// LoRA-XS (`"LORA_XS"`, LoRA's fields; `init_lora_weights` is unused: the init is an SVD).
    #[serde(rename = "LORA_XS")]
    LoraXs(LoraConfig),
    /// EDoRA (`"EDORA"`, LoRA's fields; init as LoRA-XS).
    #[serde(rename = "EDORA")]
    Edora(LoraConfig),
    /// MELoRA (`"MELORA"`, LoRA's fields plus `n`).
    #[serde(rename = "MELORA")]
    Melora(MeloraConfig),
    /// VeRA (`"VERA"`).
    #[serde(rename = "VERA")]
    Vera(VeraConfig),
    /// RandLoRA (`"RANDLORA"`).
    #[serde(rename = "RANDLORA")]
    RandLora(RandLoraConfig),
}

/// The `peft_type` values candle-peft reads.
pub const SUPPORTED_PEFT_TYPES: [&str; 7] = ["LORA", "BORA", "LORA_XS", "EDORA", "MELORA", "VERA", "RANDLORA"];

/// Tensors shared by every adapted layer (VeRA's projections), keyed without the
/// `base_model.` prefix they carry in a file.
pub type SharedTensors = BTreeMap<String, Tensor>;

/// One field PEFT writes that candle-peft does not interpret, with PEFT 0.21.2's default.
/// `inert` fields are kept whatever their value; the others must hold the default.
struct PeftField {
    name: &'static str,
    default: fn() -> Value,
    inert: bool,
}

macro_rules! peft_fields {
    ($($name:literal => $default:tt, $inert:expr;)*) => {
        &[$(PeftField { name: $name, default: || json!($default), inert: $inert },)*]
    };
}

/// The LoRA fields of peft 0.21.2's `adapter_config.json` that live in [`TargetConfig::other`].
const LORA_PEFT_FIELDS: &[PeftField] = peft_fields! {
    "alora_invocation_tokens" => null, false;
    "arrow_config" => null, false;
    "auto_mapping" => null, true;
    "bias" => "none", false;
    "corda_config" => null, true;
    "ensure_weight_tying" => false, true;
    "eva_config" => null, true;
    "fan_in_fan_out" => false, false;
    "kasa_config" => null, false;
    "layer_replication" => null, false;
    "loftq_config" => {}, true;
    "lora_bias" => false, false;
    "lora_ga_config" => null, true;
    "megatron_config" => null, false;
    "megatron_core" => "megatron.core", true;
    "modules_to_save" => null, false;
    "monteclora_config" => null, false;
    "peft_version" => "0.21.2", true;
    "qalora_group_size" => 16, true;
    "target_parameters" => null, false;
    "trainable_token_indices" => null, false;
    "use_bdlora" => null, false;
    "use_qalora" => false, false;
    "velora_config" => null, false;
};

/// The fields of peft 0.21.2's VeRA and RandLoRA `adapter_config.json` in
/// [`TargetConfig::other`].
const VERA_PEFT_FIELDS: &[PeftField] = peft_fields! {
    "auto_mapping" => null, true;
    "bias" => "none", false;
    "fan_in_fan_out" => false, false;
    "modules_to_save" => null, false;
    "peft_version" => "0.21.2", true;
};

impl AdapterConfig {
    /// The method's `peft_type`.
    pub fn peft_type(&self) -> &'static str {
        match self {
            Self::Lora(_) => "LORA",
            Self::Bora(_) => "BORA",
            Self::LoraXs(_) => "LORA_XS",
            Self::Edora(_) => "EDORA",
            Self::Melora(_) => "MELORA",
            Self::Vera(_) => "VERA",
            Self::RandLora(_) => "RANDLORA",
        }
    }

    /// The module selection.
    pub fn target(&self) -> &TargetConfig {
        match self {
            Self::Lora(c) | Self::Bora(c) | Self::LoraXs(c) | Self::Edora(c) => &c.target,
            Self::Melora(c) => &c.lora.target,
            Self::Vera(c) => &c.target,
            Self::RandLora(c) => &c.target,
        }
    }

    fn peft_fields(&self) -> &'static [PeftField] {
        match self {
            Self::Vera(_) | Self::RandLora(_) => VERA_PEFT_FIELDS,
            _ => LORA_PEFT_FIELDS,
        }
    }

    /// Checks every hyper-parameter and every uninterpreted PEFT field.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Lora(c) => c.validate()?,
            Self::Bora(c) | Self::LoraXs(c) | Self::Edora(c) => {
                c.validate()?;
                if c.use_dora {
                    return Err(Error::Unsupported(format!(
                        "use_dora with peft_type {} (DoRA is LORA + use_dora)",
                        self.peft_type()
                    )));
                }
            }
            Self::Melora(c) => c.validate()?,
            Self::Vera(c) => c.validate()?,
            Self::RandLora(c) => c.validate()?,
        }
        let fields = self.peft_fields();
        for (name, value) in &self.target().other {
            match fields.iter().find(|f| f.name == name) {
                Some(f) if !f.inert && *value != (f.default)() && !(value.is_null() && (f.default)().is_null()) => {
                    return Err(Error::Unsupported(format!(
                        "{} config field `{name}` = {value}: candle-peft supports only PEFT's default {}",
                        self.peft_type(),
                        (f.default)()
                    )));
                }
                Some(_) => {}
                None => tracing::warn!("ignoring unknown {} config field `{name}`", self.peft_type()),
            }
        }
        Ok(())
    }

    /// The tensors every layer shares, drawn for layers of the given `(in, out)` shapes (none for
    /// most methods).
    pub fn shared_tensors(&self, shapes: &[(usize, usize)], dtype: DType, device: &Device) -> Result<SharedTensors> {
        match self {
            Self::Vera(c) => c.shared_tensors(shapes, dtype, device),
            Self::RandLora(c) => c.shared_tensors(shapes, dtype, device),
            _ => Ok(SharedTensors::new()),
        }
    }

    /// Checks shared tensors read from a file before they are used.
    pub fn check_shared(&self, shared: &SharedTensors) -> Result<()> {
        let (save_projection, keys) = match self {
            Self::Vera(c) => (c.save_projection, crate::adapters::vera::SHARED_KEYS),
            Self::RandLora(c) => (c.save_projection, crate::adapters::randlora::SHARED_KEYS),
            _ => return Ok(()),
        };
        if !save_projection {
            return Err(Error::Unsupported(format!(
                "this {} adapter was saved with save_projection: false; its projections come from torch's random \
                 stream (projection_prng_key) and cannot be reproduced here. Re-save it in PEFT with \
                 save_projection=True",
                self.peft_type()
            )));
        }
        for key in keys {
            if !shared.contains_key(key) {
                return Err(Error::Unsupported(format!("the {} file lacks base_model.{key}", self.peft_type())));
            }
        }
        Ok(())
    }

    /// Builds the adapter of the module at `path` (see the method's `build`).
    pub fn build(
        &self,
        path: &str,
        base: crate::adapter::BaseLayer<'_>,
        dtype: DType,
        rng: &mut impl rand::Rng,
        shared: &SharedTensors,
    ) -> Result<BuiltAdapter> {
        match self {
            Self::Lora(c) => c.build(path, base, dtype, rng),
            Self::Bora(c) => crate::adapters::bora::build(c, path, base, dtype, rng),
            Self::LoraXs(c) => crate::adapters::lora_xs::build(c, path, base, dtype, rng),
            Self::Edora(c) => crate::adapters::edora::build(c, path, base, dtype, rng),
            Self::Melora(c) => c.build(path, base, dtype, rng),
            Self::Vera(c) => c.build(base, dtype, rng, shared),
            Self::RandLora(c) => c.build(base, dtype, rng, shared),
        }
    }

    /// Parses an `adapter_config.json` text; `path` is only used in messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let err = |reason: String| Error::Config { path: path.to_path_buf(), reason };
        let value: Value = serde_json::from_str(text).map_err(|e| err(format!("malformed JSON: {e}")))?;
        let peft_type =
            value.get("peft_type").and_then(Value::as_str).ok_or_else(|| err("no \"peft_type\" field".into()))?;
        if !SUPPORTED_PEFT_TYPES.contains(&peft_type) {
            return Err(err(format!(
                "peft_type \"{peft_type}\" is not supported (supported: {})",
                SUPPORTED_PEFT_TYPES.join(", ")
            )));
        }
        let config: Self = serde_json::from_value(value).map_err(|e| err(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads `adapter_config.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// The JSON PEFT writes for this config: every field PEFT writes, in its format.
    pub fn to_peft_json(&self) -> Result<Value> {
        let config = match self {
            Self::Lora(c) => Self::Lora(c.to_peft()),
            Self::Bora(c) => Self::Bora(c.to_peft()),
            Self::LoraXs(c) => Self::LoraXs(c.to_peft()),
            Self::Edora(c) => Self::Edora(c.to_peft()),
            Self::Melora(c) => Self::Melora(MeloraConfig { n: c.n, lora: c.lora.to_peft() }),
            Self::Vera(c) => Self::Vera(VeraConfig { save_projection: true, ..c.clone() }),
            Self::RandLora(c) => {
                if c.scaling.is_some() {
                    return Err(Error::Unsupported(
                        "saving RandLoRA with a custom scaling strategy: PEFT's format has only alpha / r".into(),
                    ));
                }
                Self::RandLora(RandLoraConfig { save_projection: true, ..c.clone() })
            }
        };
        let mut value = serde_json::to_value(&config).map_err(|e| Error::Unsupported(e.to_string()))?;
        let map = value.as_object_mut().expect("a config serializes to an object");
        for f in self.peft_fields() {
            map.entry(f.name).or_insert_with(f.default);
        }
        map.insert("inference_mode".into(), Value::Bool(true));
        if matches!(self, Self::Vera(_) | Self::RandLora(_)) && map.get("exclude_modules").is_some_and(Value::is_null) {
            map.remove("exclude_modules"); // PEFT's VeRA and RandLoRA configs have no such field
        }
        Ok(value)
    }
}

/// Serializes alphas as integers when they are whole numbers, as PEFT's configs hold them.
pub(crate) mod serde_alpha {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.fract() == 0.0 && v.abs() < 1e15 {
            s.serialize_i64(*v as i64)
        } else {
            s.serialize_f64(*v)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        f64::deserialize(d)
    }

    pub mod map {
        use std::collections::BTreeMap;

        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(m: &BTreeMap<String, f64>, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(m.iter().map(|(k, v)| {
                (
                    k,
                    serde_json::json!(if v.fract() == 0.0 {
                        serde_json::json!(*v as i64)
                    } else {
                        serde_json::json!(v)
                    }),
                )
            }))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
            BTreeMap::deserialize(d)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(v: Value) -> TargetConfig {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn list_targets_match_path_suffixes() -> Result<()> {
        let t = TargetConfig::list(&["q_proj", "v_proj"]);
        assert!(t.matches("model.layers.0.self_attn.q_proj", None)?);
        assert!(!t.matches("model.layers.0.self_attn.qq_proj", None)?);
        assert!(!t.matches("model.layers.0.self_attn.k_proj", None)?);
        Ok(())
    }

    #[test]
    fn regex_targets_match_the_whole_path() -> Result<()> {
        let t = target(json!({"target_modules": r".*\.(q|v)_proj"}));
        assert!(t.matches("model.layers.0.self_attn.q_proj", None)?);
        assert!(!t.matches("model.layers.0.self_attn.q_proj.x", None)?);
        let all = target(json!({"target_modules": "all-linear"}));
        assert!(all.matches("model.layers.0.mlp.up_proj", Some("lm_head"))?);
        assert!(!all.matches("lm_head", Some("lm_head"))?);
        Ok(())
    }

    #[test]
    fn layers_to_transform_reads_the_first_index() -> Result<()> {
        let t = target(json!({"target_modules": ["q_proj"], "layers_to_transform": [1]}));
        assert!(!t.matches("model.layers.0.self_attn.q_proj", None)?);
        assert!(t.matches("model.layers.1.self_attn.q_proj", None)?);
        let t = target(json!({"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": "blocks"}));
        assert!(!t.matches("model.layers.0.self_attn.q_proj", None)?);
        assert!(t.matches("model.blocks.0.experts.3.q_proj", None)?);
        Ok(())
    }

    #[test]
    fn exclude_modules_win() -> Result<()> {
        let t = target(json!({"target_modules": "all-linear", "exclude_modules": ["down_proj"]}));
        assert!(!t.matches("model.layers.0.mlp.down_proj", None)?);
        assert!(t.matches("model.layers.0.mlp.up_proj", None)?);
        Ok(())
    }

    #[test]
    fn patterns_follow_peft() -> Result<()> {
        let p: BTreeMap<String, usize> = [("layers.1.self_attn.q_proj".to_string(), 16)].into();
        assert_eq!(pattern_value(&p, "model.layers.1.self_attn.q_proj")?, Some(16));
        assert_eq!(pattern_value(&p, "model.layers.11.self_attn.q_proj")?, None);
        Ok(())
    }

    #[test]
    fn bad_configs_are_clear_errors() {
        let p = Path::new("adapter_config.json");
        assert!(matches!(AdapterConfig::from_json("{not json", p), Err(Error::Config { .. })));
        assert!(matches!(AdapterConfig::from_json(r#"{"r": 4}"#, p), Err(Error::Config { .. })));
        let e = AdapterConfig::from_json(r#"{"peft_type": "PROMPT_TUNING"}"#, p).unwrap_err();
        assert!(e.to_string().contains("PROMPT_TUNING"), "{e}");
        let e = AdapterConfig::from_json(r#"{"peft_type": "LORA", "r": 0, "target_modules": ["q"]}"#, p).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { name: "r", .. }), "{e}");
        let e = AdapterConfig::from_json(r#"{"peft_type": "LORA", "r": "four"}"#, p).unwrap_err();
        assert!(matches!(e, Error::Config { .. }), "{e}");
        let e = AdapterConfig::from_json(
            r#"{"peft_type": "LORA", "target_modules": ["q"], "layer_replication": [[0, 2]]}"#,
            p,
        )
        .unwrap_err();
        assert!(e.to_string().contains("layer_replication"), "{e}");
        let e = AdapterConfig::from_json(r#"{"peft_type": "LORA", "target_modules": ["q"], "lora_dropout": 1.5}"#, p)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { name: "dropout", .. }), "{e}");
        // Unknown fields are ignored (with a warning), as PEFT does.
        AdapterConfig::from_json(r#"{"peft_type": "LORA", "target_modules": ["q"], "future_field": 1}"#, p).unwrap();
    }
}
