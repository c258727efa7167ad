//! The crate's one error type.
//!
//! Every fallible public function returns [`Result`]. Messages say what was wrong and, where
//! there is one, what to do next.

use std::path::PathBuf;

/// Errors raised by candle-peft.
///
/// New variants may be added in minor releases: match with a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An error from candle itself (a shape mismatch inside an op, a device error, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A hyper-parameter is outside its valid range.
    #[error("invalid {name}: {reason}")]
    InvalidConfig {
        /// The parameter, e.g. `r` or `lora_dropout`.
        name: &'static str,
        /// Why the value was refused.
        reason: String,
    },

    /// An input tensor does not have the shape the operation needs.
    #[error("shape mismatch for {what}: expected {expected:?}, got {actual:?}")]
    ShapeMismatch {
        /// What was being checked (a key name, "input", ...).
        what: String,
        /// The shape that was expected.
        expected: Vec<usize>,
        /// The shape that was found.
        actual: Vec<usize>,
    },

    /// The layer is in the wrong merge state for the requested operation.
    #[error("{0}")]
    MergeState(String),

    /// `target_modules` matched no module of the model.
    #[error(
        "target_modules {pattern} matched no module of the model; available linear modules: {}",
        available.join(", ")
    )]
    NoTargetModules {
        /// The pattern as the user wrote it.
        pattern: String,
        /// The linear module paths the model has.
        available: Vec<String>,
    },

    /// A file's tensors do not match the adapter that should hold them.
    #[error("adapter weights in {path} do not match the model: {}", describe_key_mismatch(missing, unexpected))]
    KeyMismatch {
        /// The file that was read.
        path: PathBuf,
        /// Keys the model needs that the file lacks.
        missing: Vec<String>,
        /// Keys the file has that the model does not use.
        unexpected: Vec<String>,
    },

    /// A model's weights lack a tensor its config calls for.
    #[error(
        "{source_name}: the model weights have no tensor `{tensor}`, which the model's config calls for (are the \
         weights and the config of the same model?)"
    )]
    MissingModelTensor {
        /// Where the weights came from (a directory, a file, `<tensors>`).
        source_name: String,
        /// The tensor's name (HF's).
        tensor: String,
    },

    /// A safetensors file could not be parsed (truncated, corrupt, wrong header), or an adapter
    /// file holds a tensor an adapter cannot use (integers, NaN or infinite values).
    #[error("cannot read safetensors file {path}: {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },

    /// A file (an adapter config, a training data set, a sweep config, a GGUF file, ...) could
    /// not be parsed or holds a value that cannot be used.
    #[error("invalid {path}: {reason}")]
    Config {
        /// The file (or `<memory>` for a string).
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },

    /// A model's shape (an HF `config.json`, a GGUF file's `llama.*` metadata, a sweep's
    /// `builtin_model` or a [`crate::models::LlamaConfig`] built in code) describes no model that
    /// can be built: a size of zero, or sizes that do not divide as attention needs.
    #[error("invalid model config{}: {field} {reason}", in_file(path))]
    ModelConfig {
        /// The file the value was read from; `None` for a config built in code.
        path: Option<PathBuf>,
        /// The field as the file names it (`num_attention_heads`, `llama.attention.head_count`).
        field: String,
        /// What the value is and what was expected.
        reason: String,
    },

    /// A value could not be converted to or from JSON.
    #[error("JSON (de)serialization failed: {0}")]
    Json(#[from] serde_json::Error),

    /// The tokenizer failed (to encode a text, or to be built from a GGUF file's vocabulary).
    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    /// A feature of a config that candle-peft does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// A device was requested whose backend was not compiled in.
    #[error("device `{device}` needs candle-peft built with the `{feature}` cargo feature (cargo build --features {feature})")]
    BackendNotCompiled {
        /// The device string the user gave.
        device: String,
        /// The cargo feature that enables it.
        feature: &'static str,
    },

    /// A device string that is not `auto`, `cpu`, `cuda:N` or `metal`.
    #[error("unknown device `{0}`: expected auto, cpu, cuda, cuda:N or metal")]
    UnknownDevice(String),

    /// A linear-algebra routine (SVD) failed.
    #[error("linear algebra failed: {0}")]
    LinAlg(String),

    /// Training met a NaN or infinite value and stopped; the last good checkpoint is kept.
    #[error(
        "training stopped at step {step}: the {what} is {value}; {} (skip_nonfinite, --skip-nonfinite N, skips up \
         to N such steps)",
        match last_checkpoint {
            Some(p) => format!("the last good checkpoint is {}", p.display()),
            None => "no checkpoint was written yet".to_string(),
        }
    )]
    NonFinite {
        /// The step that failed (1-based).
        step: usize,
        /// What was not finite: the loss of which examples, the gradient of which tensor.
        what: String,
        /// The value.
        value: f64,
        /// The last checkpoint written, if any.
        last_checkpoint: Option<PathBuf>,
    },

    /// A chart could not be drawn (no plottable data, a rendering failure, ...).
    #[error("cannot draw chart: {0}")]
    Plot(String),

    /// A Hugging Face Hub model id that could not be resolved to local files (see
    /// [`crate::hub`]).
    #[error("Hub model {repo}: {reason}")]
    Hub {
        /// `org/name@revision`.
        repo: String,
        /// What is missing and how to get it.
        reason: String,
    },

    /// File-system error, with the path involved.
    #[error("{path}: {source}")]
    Io {
        /// The path that was being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn in_file(path: &Option<PathBuf>) -> String {
    path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default()
}

fn describe_key_mismatch(missing: &[String], unexpected: &[String]) -> String {
    // The first few of each (an adapter for another model can miss hundreds of keys).
    const SHOWN: usize = 8;
    let list = |what: &str, keys: &[String]| {
        let more = keys.len().saturating_sub(SHOWN);
        let tail = if more > 0 { format!(", ... and {more} more") } else { String::new() };
        format!("{} {what} keys [{}{tail}]", keys.len(), keys[..keys.len().min(SHOWN)].join(", "))
    };
    let mut parts: Vec<String> = layer_mismatch(missing, unexpected).into_iter().collect();
    if !missing.is_empty() {
        parts.push(list("missing", missing));
    }
    if !unexpected.is_empty() {
        parts.push(list("unexpected", unexpected));
    }
    parts.join("; ")
}

/// The decoder layer a key belongs to (`...layers.N....`).
fn layer_of(key: &str) -> Option<usize> {
    let (_, rest) = key.split_once(".layers.")?;
    rest.split('.').next()?.parse().ok()
}

/// A sentence for the commonest mismatch, an adapter made for a model with another number of
/// layers: every key of a contiguous range of top layers is missing (the file's model was
/// smaller) or unexpected (it was larger), and nothing else is wrong with the layers.
fn layer_mismatch(missing: &[String], unexpected: &[String]) -> Option<String> {
    let layers = |keys: &[String]| -> Option<(usize, usize)> {
        let ls: Vec<usize> = keys.iter().map(|k| layer_of(k)).collect::<Option<_>>()?;
        let (lo, hi) = (*ls.iter().min()?, *ls.iter().max()?);
        (lo..=hi).all(|l| ls.contains(&l)).then_some((lo, hi))
    };
    let span = |lo: usize, hi: usize| if lo == hi { format!("layer {lo}") } else { format!("layers {lo}..{hi}") };
    let layered = |keys: &[String]| keys.iter().any(|k| layer_of(k).is_some());
    if let (Some((lo, hi)), false) = (layers(missing), layered(unexpected)) {
        if lo > 0 {
            return Some(format!(
                "{} of the model {} no tensors in the file: the adapter looks made for a model with {lo} layers",
                span(lo, hi),
                if lo == hi { "has" } else { "have" }
            ));
        }
    }
    if let (Some((lo, hi)), false) = (layers(unexpected), layered(missing)) {
        return Some(format!(
            "the file has tensors for {}, which the model (layers 0..{}) lacks: the adapter looks made for a model with {} layers",
            span(lo, hi),
            lo.saturating_sub(1),
            hi + 1
        ));
    }
    None
}

impl Error {
    /// Builds an [`Error::InvalidConfig`].
    pub(crate) fn config(name: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidConfig { name, reason: reason.into() }
    }

    /// Wraps an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(layers: std::ops::Range<usize>) -> Vec<String> {
        layers
            .flat_map(|l| {
                ["q_proj.lora_A", "v_proj.lora_B"]
                    .map(|m| format!("base_model.model.model.layers.{l}.self_attn.{m}.weight"))
            })
            .collect()
    }

    /// An adapter of a model with another layer count is said in a sentence, before the first
    /// few keys and their count (not a list of hundreds of keys).
    #[test]
    fn an_adapter_for_another_layer_count_is_said_in_a_sentence() {
        let smaller = describe_key_mismatch(&keys(2..30), &[]);
        assert!(
            smaller.starts_with("layers 2..29 of the model have no tensors in the file: the adapter looks made for a model with 2 layers; 56 missing keys ["),
            "{smaller}"
        );
        assert!(smaller.contains("... and 48 more") && smaller.len() < 1200, "{smaller}");
        let larger = describe_key_mismatch(&[], &keys(30..32));
        assert!(
            larger.contains("tensors for layers 30..31, which the model (layers 0..29) lacks")
                && larger.contains("32 layers"),
            "{larger}"
        );
        assert!(describe_key_mismatch(&keys(1..2), &[]).starts_with("layer 1 of the model has no tensors"));
        // Anything else: just the keys.
        let mixed = describe_key_mismatch(&keys(3..4), &keys(5..6));
        assert!(mixed.starts_with("2 missing keys"), "{mixed}");
        let gap = describe_key_mismatch(&[keys(2..3), keys(4..5)].concat(), &[]);
        assert!(gap.starts_with("4 missing keys"), "{gap}");
    }
}
