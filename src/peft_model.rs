//! Injecting adapters into a model by module path, and the model-level operations: trainable
//! variables, merge / unmerge, enable / disable, save / load in HF PEFT's format.
//!
//! A model exposes its linear layers through [`LinearHost`]; [`PeftModel`] wraps it.
//! [`NamedLinears`] is a ready-made host: a map from module path to layer, e.g. built from every
//! 2-D `*.weight` of a safetensors file.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;

use crate::adapter::Adapter;
use crate::config::AdapterConfig;
use crate::format::{self, peft_key, CONFIG_FILE, WEIGHTS_FILE};
use crate::layer::AdaptedLinear;
use crate::method::{BuildContext, SharedTensors};
use crate::{Error, Result};

/// A model whose linear layers can be adapted, each named by its module path
/// (`model.layers.0.self_attn.q_proj`, as in the HF checkpoint).
pub trait LinearHost {
    /// Every linear layer with its path, in a fixed order.
    fn linears(&self) -> Vec<(String, &AdaptedLinear)>;

    /// Every linear layer with its path, mutably, in the same order.
    fn linears_mut(&mut self) -> Vec<(String, &mut AdaptedLinear)>;

    /// The path of the output projection, which `target_modules: "all-linear"` leaves out.
    fn output_layer(&self) -> Option<String> {
        Some("lm_head".into())
    }

    /// Parameters outside the linear layers (embeddings, norms), for parameter counts.
    fn other_params(&self) -> usize {
        0
    }
}

/// A set of named frozen linear layers: the simplest [`LinearHost`].
#[derive(Debug, Default)]
pub struct NamedLinears {
    layers: BTreeMap<String, AdaptedLinear>,
}

impl NamedLinears {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the layer at `path`.
    pub fn insert(&mut self, path: impl Into<String>, layer: AdaptedLinear) {
        self.layers.insert(path.into(), layer);
    }

    /// The layer at `path`.
    pub fn get(&self, path: &str) -> Option<&AdaptedLinear> {
        self.layers.get(path)
    }

    /// The layer at `path`, mutably.
    pub fn get_mut(&mut self, path: &str) -> Option<&mut AdaptedLinear> {
        self.layers.get_mut(path)
    }

    /// Every 2-D `<path>.weight` of `tensors` as a frozen layer at `<path>` (with `<path>.bias`
    /// when present), cast to `dtype`. Embeddings (`embed_tokens`, `wte`, ...) are 2-D too; pass
    /// only linear weights, or drop them with [`NamedLinears::retain`].
    pub fn from_tensors(tensors: &BTreeMap<String, Tensor>, dtype: DType) -> Result<Self> {
        let mut layers = BTreeMap::new();
        for (key, w) in tensors {
            let Some(path) = key.strip_suffix(".weight") else { continue };
            if w.rank() != 2 {
                continue;
            }
            let bias = tensors.get(&format!("{path}.bias")).map(|b| b.to_dtype(dtype)).transpose()?;
            layers.insert(path.to_string(), AdaptedLinear::new(w.to_dtype(dtype)?, bias)?);
        }
        Ok(Self { layers })
    }

    /// Reads a safetensors checkpoint (see [`NamedLinears::from_tensors`]).
    pub fn from_safetensors(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::from_tensors(&format::read_safetensors(path, device)?, dtype)
    }

    /// Keeps only the layers whose path satisfies `keep`.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.layers.retain(|k, _| keep(k));
    }
}

impl LinearHost for NamedLinears {
    fn linears(&self) -> Vec<(String, &AdaptedLinear)> {
        self.layers.iter().map(|(k, v)| (k.clone(), v)).collect()
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut AdaptedLinear)> {
        self.layers.iter_mut().map(|(k, v)| (k.clone(), v)).collect()
    }
}

/// How a new adapter is initialised.
#[derive(Debug, Clone, Copy)]
pub struct InitOptions {
    /// Seed of the RNG the inits are drawn from.
    pub seed: u64,
    /// The adapters' dtype (PEFT keeps adapters in f32 by default).
    pub dtype: DType,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self { seed: 0, dtype: DType::F32 }
    }
}

/// Trainable and total parameter counts, like PEFT's `print_trainable_parameters`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterCount {
    /// Trainable adapter parameters.
    pub trainable: usize,
    /// All parameters: frozen linear weights and biases plus the trainable ones.
    pub all: usize,
}

impl fmt::Display for ParameterCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = 100.0 * self.trainable as f64 / self.all.max(1) as f64;
        write!(f, "trainable params: {} || all params: {} || trainable%: {pct:.4}", self.trainable, self.all)
    }
}

/// A model with adapters injected into the linear layers that the config targets.
#[derive(Debug)]
pub struct PeftModel<M: LinearHost> {
    model: M,
    config: AdapterConfig,
    adapted: Vec<String>,
    shared: SharedTensors,
}

/// The prefix of a shared tensor's key in a PEFT file (`base_model.vera_A`).
const SHARED_PREFIX: &str = "base_model.";

/// The name of a shared tensor, if `key` is one (`base_model.vera_A` but not
/// `base_model.model.<path>...`).
fn shared_key(key: &str) -> Option<&str> {
    key.strip_prefix(SHARED_PREFIX).filter(|rest| !rest.contains('.'))
}

impl<M: LinearHost> PeftModel<M> {
    /// Injects fresh adapters (drawn from `opts.seed`) into every targeted linear of `model`.
    ///
    /// Errors when no module matches, listing the linear modules the model has.
    pub fn new(model: M, config: AdapterConfig, opts: InitOptions) -> Result<Self> {
        Self::inject(model, config, opts, None)
    }

    /// Injects adapters; `shared` holds the shared tensors read from a file, if any (otherwise
    /// they are drawn for the targeted layers' shapes).
    fn inject(mut model: M, config: AdapterConfig, opts: InitOptions, shared: Option<SharedTensors>) -> Result<Self> {
        config.validate()?;
        let output = model.output_layer();
        let mut targets = Vec::new();
        let mut available = Vec::new();
        let mut device = Device::Cpu;
        for (path, layer) in model.linears() {
            available.push(path.clone());
            if config.target().matches(&path, output.as_deref())? {
                device = layer.weight().device().clone();
                targets.push((path, layer.features()));
            }
        }
        if targets.is_empty() {
            let pattern = serde_json::to_string(&config.target().target_modules).unwrap_or_default();
            return Err(Error::NoTargetModules { pattern, available });
        }
        let shared = match shared {
            Some(shared) => {
                config.check_shared(&shared)?;
                shared
            }
            None => {
                let shapes: Vec<(usize, usize)> = targets.iter().map(|(_, s)| *s).collect();
                config.shared_tensors(&shapes, opts.dtype, &device)?
            }
        };
        let adapted: Vec<String> = targets.into_iter().map(|(p, _)| p).collect();
        let wanted: BTreeSet<&String> = adapted.iter().collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
        for (path, layer) in model.linears_mut() {
            if wanted.contains(&path) {
                let ctx =
                    BuildContext { path: &path, base: layer.base(), dtype: opts.dtype, rng: &mut rng, shared: &shared };
                let built = config.build(ctx)?;
                layer.set_adapter(built.adapter, built.base_weight)?;
            }
        }
        Ok(Self { model, config, adapted, shared })
    }

    /// Loads a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`) onto
    /// `model`: injects the configured adapters (over the file's shared projections, for VeRA),
    /// then sets every tensor from the file. Missing or unexpected keys and wrong shapes are
    /// errors that name them.
    pub fn from_pretrained(model: M, dir: &Path, dtype: DType) -> Result<Self> {
        let config = AdapterConfig::from_file(&dir.join(CONFIG_FILE))?;
        let path = dir.join(WEIGHTS_FILE);
        let device = model.linears().first().map(|(_, l)| l.weight().device().clone()).unwrap_or(Device::Cpu);
        let tensors = read_adapter_tensors(&path, &device)?;
        let shared: SharedTensors = tensors
            .iter()
            .filter_map(|(k, t)| shared_key(k).map(|name| (name.to_string(), t)))
            .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
            .collect::<Result<_>>()?;
        let mut peft = Self::inject(model, config, InitOptions { seed: 0, dtype }, Some(shared))?;
        peft.set_tensors(tensors, &path)?;
        Ok(peft)
    }

    /// Sets every adapter tensor from a PEFT safetensors file written for this model and config.
    pub fn load_weights(&mut self, path: &Path) -> Result<()> {
        let device = self.model.linears().first().map(|(_, l)| l.weight().device().clone()).unwrap_or(Device::Cpu);
        let tensors = read_adapter_tensors(path, &device)?;
        self.set_tensors(tensors, path)
    }

    fn set_tensors(&mut self, mut tensors: BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
        let expected = self.saved_tensors()?;
        let expected_keys: BTreeSet<&String> = expected.iter().map(|(k, _)| k).collect();
        let missing: Vec<String> =
            expected_keys.iter().filter(|k| !tensors.contains_key(**k)).map(|k| k.to_string()).collect();
        let unexpected: Vec<String> = tensors.keys().filter(|k| !expected_keys.contains(k)).cloned().collect();
        if !missing.is_empty() || !unexpected.is_empty() {
            return Err(Error::KeyMismatch { path: path.to_path_buf(), missing, unexpected });
        }
        for (key, t) in &expected {
            let got = &tensors[key];
            if got.dims() != t.dims() {
                return Err(Error::ShapeMismatch {
                    what: format!("{key} in {}", path.display()),
                    expected: t.dims().to_vec(),
                    actual: got.dims().to_vec(),
                });
            }
        }
        for (name, ours) in &self.shared {
            let theirs = take_checked(&mut tensors, &format!("{SHARED_PREFIX}{name}"), path)?;
            let diff =
                (theirs.to_dtype(DType::F32)? - ours.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
            if diff != 0.0 {
                return Err(Error::Unsupported(format!(
                    "{} holds other shared projections than this model ({name}); load it with PeftModel::from_pretrained",
                    path.display()
                )));
            }
        }
        self.for_each_adapted(|layer_path, layer| {
            let adapter = layer.adapter_mut().ok_or_else(|| adapter_removed(layer_path))?;
            for (suffix, _) in adapter.saved_tensors() {
                let value = take_checked(&mut tensors, &peft_key(layer_path, &suffix), path)?;
                adapter.load_tensor(&suffix, &value.to_dtype(adapter.dtype())?)?;
            }
            Ok(())
        })
    }

    /// Every tensor that [`PeftModel::save_pretrained`] writes, keyed as PEFT keys it. Errors
    /// when an adapter was taken out of a layer behind the model's back ([`PeftModel::model_mut`]).
    pub fn saved_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (path, adapter) in self.adapters()? {
            out.extend(adapter.saved_tensors().into_iter().map(|(s, t)| (peft_key(&path, &s), t)));
        }
        out.extend(self.shared.iter().map(|(k, t)| (format!("{SHARED_PREFIX}{k}"), t.clone())));
        Ok(out)
    }

    /// The tensors all adapted layers share (VeRA's projections), without key prefix.
    pub fn shared_tensors(&self) -> &SharedTensors {
        &self.shared
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (created if
    /// needed), in HF PEFT's format, each file atomically.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        format::write_safetensors(&dir.join(WEIGHTS_FILE), &self.saved_tensors()?)?;
        let json = serde_json::to_string_pretty(&self.config.to_peft_json()?)?;
        format::write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())
    }

    /// The adapter of every adapted layer, with the layer's path. Errors when one was taken out
    /// behind the model's back ([`PeftModel::model_mut`]).
    fn adapters(&self) -> Result<Vec<(String, &dyn Adapter)>> {
        let adapted: BTreeSet<&String> = self.adapted.iter().collect();
        self.model
            .linears()
            .into_iter()
            .filter(|(p, _)| adapted.contains(p))
            .map(|(p, l)| match l.adapter() {
                Some(a) => Ok((p, a)),
                None => Err(adapter_removed(&p)),
            })
            .collect()
    }

    fn for_each_adapted(&mut self, mut f: impl FnMut(&str, &mut AdaptedLinear) -> Result<()>) -> Result<()> {
        let adapted: BTreeSet<String> = self.adapted.iter().cloned().collect();
        for (path, layer) in self.model.linears_mut() {
            if adapted.contains(&path) {
                f(&path, layer)?;
            }
        }
        Ok(())
    }

    /// The trainable variables with their PEFT keys, for an optimizer or a report. Errors when
    /// an adapter was taken out behind the model's back ([`PeftModel::model_mut`]).
    pub fn named_trainable_vars(&self) -> Result<Vec<(String, Var)>> {
        let mut out = Vec::new();
        for (path, adapter) in self.adapters()? {
            out.extend(adapter.trainable_vars().into_iter().map(|(s, v)| (peft_key(&path, &s), v)));
        }
        Ok(out)
    }

    /// The trainable variables, for an optimizer (see [`PeftModel::named_trainable_vars`]).
    pub fn trainable_vars(&self) -> Result<Vec<Var>> {
        Ok(self.named_trainable_vars()?.into_iter().map(|(_, v)| v).collect())
    }

    /// Trainable and total parameter counts, as PEFT's `print_trainable_parameters` gives them:
    /// the total counts the whole model ([`LinearHost::other_params`] included), the adapters
    /// and the shared frozen projections (once).
    pub fn parameter_count(&self) -> ParameterCount {
        let adapted: BTreeSet<&String> = self.adapted.iter().collect();
        let trainable: usize = self
            .model
            .linears()
            .iter()
            .filter(|(p, _)| adapted.contains(p))
            .filter_map(|(_, l)| l.adapter().map(|a| a.num_trainable()))
            .sum();
        let frozen: usize = self
            .model
            .linears()
            .iter()
            .map(|(_, l)| l.weight().elem_count() + l.bias().map_or(0, |b| b.elem_count()))
            .sum();
        let shared: usize = self.shared.values().map(|t| t.elem_count()).sum();
        ParameterCount { trainable, all: frozen + self.model.other_params() + shared + trainable }
    }

    /// Folds every adapter into its layer's weight.
    pub fn merge(&mut self) -> Result<()> {
        self.for_each_adapted(|_, l| l.merge())
    }

    /// Takes every merged adapter out again.
    pub fn unmerge(&mut self) -> Result<()> {
        self.for_each_adapted(|_, l| l.unmerge())
    }

    /// Training mode (dropout on) or evaluation mode, for every adapted layer.
    pub fn set_train(&mut self, train: bool) {
        for (_, l) in self.model.linears_mut() {
            l.set_train(train);
        }
    }

    /// Switches every adapter on or off (see [`AdaptedLinear::set_enabled`]).
    pub fn set_enabled(&mut self, enabled: bool) -> Result<()> {
        self.for_each_adapted(|_, l| l.set_enabled(enabled))
    }

    /// The module paths that received an adapter.
    pub fn adapted_modules(&self) -> &[String] {
        &self.adapted
    }

    /// The config.
    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }

    /// The wrapped model.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The wrapped model, mutably.
    pub fn model_mut(&mut self) -> &mut M {
        &mut self.model
    }

    /// Unwraps the model (its layers keep their adapters).
    pub fn into_inner(self) -> M {
        self.model
    }

    /// Removes every adapter (unmerging merged ones) and returns the base model, as PEFT's
    /// `unload()`: the model can take a fresh adapter, e.g. the next cell of a sweep. A base
    /// weight that the adapter's init rewrote (PiSSA's residual) stays rewritten.
    pub fn unload(mut self) -> Result<M> {
        self.for_each_adapted(|_, l| l.take_adapter().map(drop))?;
        Ok(self.model)
    }
}

/// The error for an adapted layer whose adapter is gone.
fn adapter_removed(path: &str) -> Error {
    Error::MergeState(format!(
        "the adapter of {path} was removed through model_mut(); use PeftModel::unload() to take adapters out"
    ))
}

/// Removes `key` from `tensors`, which was checked to hold it; an error naming the file if not.
fn take_checked(tensors: &mut BTreeMap<String, Tensor>, key: &str, path: &Path) -> Result<Tensor> {
    tensors.remove(key).ok_or_else(|| Error::KeyMismatch {
        path: path.to_path_buf(),
        missing: vec![key.to_string()],
        unexpected: vec![],
    })
}

/// An adapter file's tensors, refused when one is not floating point (an integer tensor would be
/// cast without a word) or holds NaN or infinite values (it would make every output NaN, and a
/// merge would write a NaN model): the error names the file and the tensor.
fn read_adapter_tensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let tensors = format::read_safetensors(path, device)?;
    for (key, t) in &tensors {
        let bad =
            |reason: String| Error::Safetensors { path: path.to_path_buf(), reason: format!("tensor {key}: {reason}") };
        if !t.dtype().is_float() {
            return Err(bad(format!(
                "{:?} values; an adapter's tensors are floating point (f32, f16, bf16)",
                t.dtype()
            )));
        }
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let non_finite = values.iter().filter(|v| !v.is_finite()).count();
        if non_finite > 0 {
            return Err(bad(format!(
                "{non_finite} of its {} values are NaN or infinite; the adapter is unusable (saved from a run that \
                 diverged?)",
                values.len()
            )));
        }
    }
    Ok(tensors)
}
