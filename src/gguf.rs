//! The metadata of a llama.cpp GGUF file (model shape, tokenizer, chat template, ...), read
//! without its tensors, and the crate's one GGUF writer ([`write_gguf`]).
//!
//! This module sits below both [`crate::models`] (which builds a model from the `llama.*` keys)
//! and [`crate::tokenizer`] (which builds a tokenizer from the `tokenizer.ggml.*` keys): it
//! imports neither.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;

use crate::{Error, Result};

/// The metadata of a GGUF file. Errors about a missing key or a value of the wrong type name
/// the file and the key.
#[derive(Debug, Clone)]
pub struct GgufMetadata {
    path: PathBuf,
    values: HashMap<String, Value>,
}

impl GgufMetadata {
    /// Reads only the metadata of a GGUF file (not its tensors).
    pub fn read(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let content = read_content(path, &mut file)?;
        Ok(Self::from_content(path, &content))
    }

    /// The metadata of a file already read (`content` of the GGUF file at `path`).
    pub fn from_content(path: &Path, content: &Content) -> Self {
        Self { path: path.to_path_buf(), values: content.metadata.clone() }
    }

    /// The file the metadata was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every key and value, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Whether the file has `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }

    fn error(&self, reason: String) -> Error {
        Error::Config { path: self.path.clone(), reason }
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.values.get(key).ok_or_else(|| self.error(format!("the GGUF metadata has no `{key}`")))
    }

    fn typed<T>(&self, key: &str, convert: impl FnOnce(&Value) -> candle_core::Result<T>) -> Result<T> {
        convert(self.get(key)?).map_err(|e| self.error(format!("GGUF metadata `{key}`: {e}")))
    }

    /// A string value.
    pub fn string(&self, key: &str) -> Result<String> {
        self.typed(key, |v| v.to_string().cloned())
    }

    /// An integer value (stored as u32).
    pub fn u32(&self, key: &str) -> Result<u32> {
        self.typed(key, Value::to_u32)
    }

    /// A boolean value.
    pub fn bool(&self, key: &str) -> Result<bool> {
        self.typed(key, Value::to_bool)
    }

    /// A float value (stored as f32).
    pub fn f32(&self, key: &str) -> Result<f32> {
        self.typed(key, Value::to_f32)
    }

    /// An array of integers (e.g. `tokenizer.ggml.token_type`).
    pub fn i32s(&self, key: &str) -> Result<Vec<i32>> {
        self.typed(key, |v| v.to_vec()?.iter().map(Value::to_i32).collect())
    }

    /// An array of strings (e.g. `tokenizer.ggml.tokens`).
    pub fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.typed(key, |v| v.to_vec()?.iter().map(|s| s.to_string().cloned()).collect())
    }
}

/// Writes a GGUF file (version 2, as candle writes it; llama.cpp reads it) with `metadata` and
/// `tensors` in that order, atomically: to a temporary file, synced, then renamed over `path`.
pub fn write_gguf(path: &Path, metadata: &[(String, Value)], tensors: &[(String, QTensor)]) -> Result<()> {
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut bytes = std::io::Cursor::new(Vec::new());
    candle_core::quantized::gguf_file::write(&mut bytes, &metadata, &tensors)
        .map_err(|e| Error::Config { path: path.to_path_buf(), reason: format!("writing a GGUF file: {e}") })?;
    crate::format::write_atomic(path, &bytes.into_inner())
}

/// Reads the header of a GGUF file (metadata and tensor infos), with an error naming the file.
pub fn read_content(path: &Path, file: &mut std::fs::File) -> Result<Content> {
    Content::read(file)
        .map_err(|e| Error::Config { path: path.to_path_buf(), reason: format!("not a readable GGUF file: {e}") })
}
