//! [`AdapterConfig`] as HF PEFT's `adapter_config.json`: reading, checking and writing it.
//!
//! The enum itself is derived from the method registry ([`crate::adapters`]); each method owns
//! its fields (see its file under `adapters/`), and the fields that choose which modules are
//! adapted are shared ([`crate::target::TargetConfig`]). Fields PEFT writes that candle-peft does
//! not interpret are checked: harmless ones (`task_type`, `revision`, ...) are kept, ones that
//! would change the math are refused unless they hold PEFT's default, and fields PEFT does not
//! know are ignored with a warning, as PEFT does.

use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

pub use crate::adapters::AdapterConfig;
use crate::method::{check_peft_fields, fill_peft_fields};
use crate::{Error, Result};

impl AdapterConfig {
    /// Checks every hyper-parameter and every uninterpreted PEFT field.
    pub fn validate(&self) -> Result<()> {
        self.validate_method()?;
        check_peft_fields(self.peft_type(), self.target(), self.peft_fields()).map(drop)
    }

    /// Parses an `adapter_config.json` text; `path` is only used in messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let err = |reason: String| Error::Config { path: path.to_path_buf(), reason };
        let value: Value = serde_json::from_str(text).map_err(|e| err(format!("malformed JSON: {e}")))?;
        let config = Self::from_value(value).map_err(|e| err(e.to_string()))?;
        config.validate_method()?;
        for field in check_peft_fields(config.peft_type(), config.target(), config.peft_fields())? {
            tracing::warn!(
                "{}: ignoring field `{field}`, which PEFT's {} config does not have",
                path.display(),
                config.peft_type()
            );
        }
        Ok(config)
    }

    /// The config a JSON object describes: its `peft_type` picks the method, the other fields
    /// are the method's.
    fn from_value(mut value: Value) -> std::result::Result<Self, String> {
        let fields = value.as_object_mut().ok_or("expected a JSON object")?;
        let peft_type = match fields.remove("peft_type") {
            Some(Value::String(t)) => t,
            Some(other) => return Err(format!("\"peft_type\" must be a string, got {other}")),
            None => return Err("no \"peft_type\" field".into()),
        };
        match Self::from_fields_json(&peft_type, value) {
            Some(config) => config.map_err(|e| e.to_string()),
            None => {
                Err(format!("peft_type \"{peft_type}\" is not supported (supported: {})", Self::PEFT_TYPES.join(", ")))
            }
        }
    }

    /// Reads `adapter_config.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// The JSON PEFT writes for this config: every field PEFT writes, in its format.
    pub fn to_peft_json(&self) -> Result<Value> {
        let config = self.to_peft()?;
        let mut value = config.to_value()?;
        let map = value.as_object_mut().ok_or_else(|| Error::Unsupported("a config must be a JSON object".into()))?;
        fill_peft_fields(map, self.peft_fields());
        map.insert("inference_mode".into(), Value::Bool(true));
        Ok(value)
    }

    /// The config as a JSON object with its `peft_type`.
    fn to_value(&self) -> Result<Value> {
        let mut value = self.fields_json()?;
        if let Some(map) = value.as_object_mut() {
            map.insert("peft_type".into(), Value::String(self.peft_type().into()));
        }
        Ok(value)
    }
}

impl Serialize for AdapterConfig {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_value().map_err(serde::ser::Error::custom)?.serialize(s)
    }
}

impl<'de> Deserialize<'de> for AdapterConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Self::from_value(Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(matches!(e, Error::InvalidConfig { name: "lora_dropout", .. }), "{e}");
        // Unknown fields are ignored (with a warning), as PEFT does.
        AdapterConfig::from_json(r#"{"peft_type": "LORA", "target_modules": ["q"], "future_field": 1}"#, p).unwrap();
    }
}
