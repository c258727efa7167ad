//! Which modules get an adapter: PEFT's targeting fields (`target_modules`, `exclude_modules`,
//! `layers_to_transform`, `layers_pattern`) and per-module patterns (`rank_pattern`,
//! `alpha_pattern`), shared by every method's config.
//!
//! A leaf module: it imports nothing of the crate but the error type, so configs and methods
//! can both use it.

use std::collections::BTreeMap;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

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
    /// Modules never adapted, matched like `target_modules`. Written only when set (methods
    /// whose PEFT config has the field write `null` through their PEFT fields).
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    /// Fields of PEFT's config that candle-peft does not interpret (see [`crate::AdapterConfig`]).
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

#[cfg(test)]
mod tests {
    use serde_json::json;

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
}
