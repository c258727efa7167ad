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
use crate::gptq::InputGram;
use crate::layer::{AdaptedLinear, BASE_ROWS, DEFAULT_ADAPTER};
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

/// One named adapter of a [`PeftModel`]: its config, the module paths it adapts and the tensors
/// its layers share (VeRA's projections).
#[derive(Debug)]
struct NamedAdapter {
    config: AdapterConfig,
    adapted: Vec<String>,
    shared: SharedTensors,
}

/// A model with named adapters injected into the linear layers their configs target, as PEFT's
/// `PeftModel`: [`PeftModel::new`] and [`PeftModel::from_pretrained`] give it one adapter named
/// [`DEFAULT_ADAPTER`]; [`PeftModel::add_adapter`] and [`PeftModel::load_adapter`] add more,
/// of any methods and targets; [`PeftModel::set_adapter`] / [`PeftModel::set_adapters`] choose
/// the active ones (summed in the forward pass); only the active adapters' parameters are
/// trainable.
#[derive(Debug)]
pub struct PeftModel<M: LinearHost> {
    model: M,
    /// The adapters, in the order they were added.
    adapters: Vec<(String, NamedAdapter)>,
    /// The active adapters' names: never empty.
    active: Vec<String>,
}

/// The prefix of a shared tensor's key in a PEFT file (`base_model.vera_A`).
const SHARED_PREFIX: &str = "base_model.";

/// The name of a shared tensor, if `key` is one (`base_model.vera_A` but not
/// `base_model.model.<path>...`).
fn shared_key(key: &str) -> Option<&str> {
    key.strip_prefix(SHARED_PREFIX).filter(|rest| !rest.contains('.'))
}

/// Refuses adapter names that cannot be a directory of PEFT's multi-adapter layout or that
/// mean the base model.
fn check_adapter_name(name: &str) -> Result<()> {
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
    if name.is_empty() || !ok_chars || name.starts_with('.') || name == BASE_ROWS {
        return Err(Error::config(
            "adapter name",
            format!(
                "`{name}` cannot name an adapter: use letters, digits, `_`, `-` and `.` (not first); `{BASE_ROWS}` \
                 selects the base model in mixed batches"
            ),
        ));
    }
    Ok(())
}

impl<M: LinearHost> PeftModel<M> {
    /// Injects fresh adapters (drawn from `opts.seed`) into every targeted linear of `model`, as
    /// the adapter [`DEFAULT_ADAPTER`].
    ///
    /// Errors when no module matches, listing the linear modules the model has.
    pub fn new(model: M, config: AdapterConfig, opts: InitOptions) -> Result<Self> {
        let mut peft = Self { model, adapters: Vec::new(), active: Vec::new() };
        peft.inject(DEFAULT_ADAPTER, config, opts, None)?;
        Ok(peft)
    }

    /// Adds a fresh adapter `name` (drawn from `opts.seed`) to the layers `config` targets, as
    /// PEFT's `add_adapter`: the active adapters stay active (see [`Self::set_adapter`]). Errors
    /// when the name is taken or no module matches.
    pub fn add_adapter(&mut self, name: &str, config: AdapterConfig, opts: InitOptions) -> Result<()> {
        self.inject(name, config, opts, None)
    }

    /// Injects adapter `name`; `shared` holds the shared tensors read from a file, if any
    /// (otherwise they are drawn for the targeted layers' shapes). The first adapter of a model
    /// becomes its active one.
    fn inject(
        &mut self,
        name: &str,
        config: AdapterConfig,
        opts: InitOptions,
        shared: Option<SharedTensors>,
    ) -> Result<()> {
        check_adapter_name(name)?;
        if self.entry(name).is_ok() {
            return Err(Error::config(
                "adapter name",
                format!("the model already has an adapter `{name}`; delete it first, or choose another name"),
            ));
        }
        config.validate()?;
        let output = self.model.output_layer();
        let mut targets = Vec::new();
        let mut available = Vec::new();
        let mut device = Device::Cpu;
        for (path, layer) in self.model.linears() {
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
        let mut built = Vec::new();
        for (path, layer) in self.model.linears() {
            if wanted.contains(&path) {
                let ctx =
                    BuildContext { path: &path, base: layer.base(), dtype: opts.dtype, rng: &mut rng, shared: &shared };
                let b = config.build(ctx)?;
                built.push((path.clone(), b));
            }
        }
        let mut built: BTreeMap<String, _> = built.into_iter().collect();
        let mut inserted = Vec::new();
        let mut outcome = Ok(());
        for (path, layer) in self.model.linears_mut() {
            if let Some(b) = built.remove(&path) {
                outcome = layer.insert_adapter(name, b.adapter, b.base_weight);
                if outcome.is_err() {
                    break;
                }
                inserted.push(path);
            }
        }
        if let Err(e) = outcome {
            // Leaves the model as it was: no layer keeps a part of the new adapter.
            for (path, layer) in self.model.linears_mut() {
                if inserted.contains(&path) {
                    layer.remove_adapter(name)?;
                }
            }
            return Err(e);
        }
        self.adapters.push((name.to_string(), NamedAdapter { config, adapted, shared }));
        if self.active.is_empty() {
            self.active.push(name.to_string());
        }
        self.sync_active();
        Ok(())
    }

    /// Loads a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`) onto
    /// `model` as the adapter [`DEFAULT_ADAPTER`] (see [`Self::load_adapter`]).
    pub fn from_pretrained(model: M, dir: &Path, dtype: DType) -> Result<Self> {
        let mut peft = Self { model, adapters: Vec::new(), active: Vec::new() };
        peft.load_adapter(dir, DEFAULT_ADAPTER, dtype)?;
        Ok(peft)
    }

    /// Loads every adapter of a directory in PEFT's multi-adapter layout (what
    /// [`Self::save_pretrained`] writes for several adapters): `dir` itself as
    /// [`DEFAULT_ADAPTER`], then each subdirectory holding an `adapter_config.json` as the adapter
    /// of its name, in name order. The default adapter is the active one.
    pub fn from_pretrained_all(model: M, dir: &Path, dtype: DType) -> Result<Self> {
        let mut peft = Self::from_pretrained(model, dir, dtype)?;
        for (name, sub) in format::named_adapter_dirs(dir)? {
            peft.load_adapter(&sub, &name, dtype)?;
        }
        Ok(peft)
    }

    /// Loads a PEFT adapter directory as the adapter `name`, as PEFT's `load_adapter`: injects
    /// the configured adapters (over the file's shared projections, for VeRA), then sets every
    /// tensor from the file. Missing or unexpected keys and wrong shapes are errors that name
    /// them. A directory that [`Self::save_pretrained`] wrote for several adapters holds the
    /// others in `<dir>/<name>/`.
    pub fn load_adapter(&mut self, dir: &Path, name: &str, dtype: DType) -> Result<()> {
        let config = AdapterConfig::from_file(&dir.join(CONFIG_FILE))?;
        let path = dir.join(WEIGHTS_FILE);
        let tensors = read_adapter_tensors(&path, &self.device())?;
        let shared: SharedTensors = tensors
            .iter()
            .filter_map(|(k, t)| shared_key(k).map(|name| (name.to_string(), t)))
            .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
            .collect::<Result<_>>()?;
        self.inject(name, config, InitOptions { seed: 0, dtype }, Some(shared))?;
        if let Err(e) = self.set_tensors(name, tensors, &path) {
            self.drop_adapter(name)?;
            return Err(e);
        }
        Ok(())
    }

    /// The device of the model's linears.
    fn device(&self) -> Device {
        self.model.linears().first().map(|(_, l)| l.weight().device().clone()).unwrap_or(Device::Cpu)
    }

    /// Sets every tensor of the active adapter from a PEFT safetensors file written for this
    /// model and config. Errors when several adapters are active.
    pub fn load_weights(&mut self, path: &Path) -> Result<()> {
        let name = self.active_adapter()?.to_string();
        self.load_adapter_weights(&name, path)
    }

    /// Sets every tensor of the adapter `name` from a PEFT safetensors file written for it.
    pub fn load_adapter_weights(&mut self, name: &str, path: &Path) -> Result<()> {
        let tensors = read_adapter_tensors(path, &self.device())?;
        self.set_tensors(name, tensors, path)
    }

    fn set_tensors(&mut self, name: &str, mut tensors: BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
        let expected = self.adapter_tensors(name)?;
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
        for (shared_name, ours) in &self.entry(name)?.shared {
            let theirs = take_checked(&mut tensors, &format!("{SHARED_PREFIX}{shared_name}"), path)?;
            let diff =
                (theirs.to_dtype(DType::F32)? - ours.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
            if diff != 0.0 {
                return Err(Error::Unsupported(format!(
                    "{} holds other shared projections than this model ({shared_name}); load it with \
                     PeftModel::from_pretrained or load_adapter",
                    path.display()
                )));
            }
        }
        self.for_each_adapted(name, |layer_path, adapter| {
            for (suffix, _) in adapter.saved_tensors() {
                let value = take_checked(&mut tensors, &peft_key(layer_path, &suffix), path)?;
                adapter.load_tensor(&suffix, &value.to_dtype(adapter.dtype())?)?;
            }
            Ok(())
        })
    }

    /// The adapter `name`'s entry, or an error listing the adapters there are.
    fn entry(&self, name: &str) -> Result<&NamedAdapter> {
        self.adapters.iter().find(|(n, _)| n == name).map(|(_, e)| e).ok_or_else(|| {
            Error::config(
                "adapter name",
                format!("the model has no adapter `{name}`; it has: {}", self.adapter_names().join(", ")),
            )
        })
    }

    /// The name of the one active adapter, or an error when several are active.
    pub fn active_adapter(&self) -> Result<&str> {
        match self.active.as_slice() {
            [one] => Ok(one),
            several => Err(Error::Unsupported(format!(
                "this needs one active adapter, and {} are active ({}): choose one with set_adapter",
                several.len(),
                several.join(", ")
            ))),
        }
    }

    /// Every tensor that [`PeftModel::save_pretrained`] writes for the active adapter, keyed as
    /// PEFT keys it. Errors when several adapters are active, or an adapter was taken out of a
    /// layer behind the model's back ([`PeftModel::model_mut`]).
    pub fn saved_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.adapter_tensors(self.active_adapter()?)
    }

    /// Every tensor of the adapter `name`, keyed as PEFT keys it in its own file.
    pub fn adapter_tensors(&self, name: &str) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (path, adapter) in self.adapters_of(name)? {
            out.extend(adapter.saved_tensors().into_iter().map(|(s, t)| (peft_key(&path, &s), t)));
        }
        out.extend(self.entry(name)?.shared.iter().map(|(k, t)| (format!("{SHARED_PREFIX}{k}"), t.clone())));
        Ok(out)
    }

    /// The tensors all layers of the (first) active adapter share (VeRA's projections), without
    /// key prefix.
    pub fn shared_tensors(&self) -> &SharedTensors {
        &self.first_active().shared
    }

    fn first_active(&self) -> &NamedAdapter {
        self.entry(&self.active[0]).expect("the active adapters exist")
    }

    /// Writes every adapter in HF PEFT's layout: [`DEFAULT_ADAPTER`] into `dir` (created if
    /// needed), any other adapter into `dir/<name>/`, each as `adapter_config.json` and
    /// `adapter_model.safetensors`, each file atomically.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        for (name, _) in &self.adapters {
            let sub = if name == DEFAULT_ADAPTER { dir.to_path_buf() } else { dir.join(name) };
            self.save_adapter(name, &sub)?;
        }
        Ok(())
    }

    /// Writes the adapter `name` alone into `dir` (created if needed), as a single-adapter PEFT
    /// directory.
    pub fn save_adapter(&self, name: &str, dir: &Path) -> Result<()> {
        let config = &self.entry(name)?.config;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        format::write_safetensors(&dir.join(WEIGHTS_FILE), &self.adapter_tensors(name)?)?;
        let json = serde_json::to_string_pretty(&config.to_peft_json()?)?;
        format::write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())
    }

    /// The adapter `name` of every layer it adapts, with the layer's path. Errors when one was
    /// taken out behind the model's back ([`PeftModel::model_mut`]).
    fn adapters_of(&self, name: &str) -> Result<Vec<(String, &dyn Adapter)>> {
        Ok(self.layers_of(name)?.into_iter().map(|(p, _, a)| (p, a)).collect())
    }

    /// Every layer the adapter `name` adapts, in the model's order, with its path and that
    /// adapter. Errors on an unknown name, or when the adapter was taken out of a layer behind
    /// the model's back ([`PeftModel::model_mut`]).
    pub fn layers_of(&self, name: &str) -> Result<Vec<(String, &AdaptedLinear, &dyn Adapter)>> {
        let adapted: BTreeSet<&String> = self.entry(name)?.adapted.iter().collect();
        self.model
            .linears()
            .into_iter()
            .filter(|(p, _)| adapted.contains(p))
            .map(|(p, l)| match l.adapter_named(name) {
                Some(a) => Ok((p, l, a)),
                None => Err(adapter_removed(&p, name)),
            })
            .collect()
    }

    /// Runs `f` on the adapter `name` of every layer it adapts.
    fn for_each_adapted(&mut self, name: &str, mut f: impl FnMut(&str, &mut dyn Adapter) -> Result<()>) -> Result<()> {
        let adapted: BTreeSet<String> = self.entry(name)?.adapted.iter().cloned().collect();
        for (path, layer) in self.model.linears_mut() {
            if adapted.contains(&path) {
                f(&path, layer.adapter_named_mut(name).ok_or_else(|| adapter_removed(&path, name))?)?;
            }
        }
        Ok(())
    }

    /// The trainable variables of the active adapters, keyed as PEFT keys them in a file (with
    /// several active adapters, `<adapter>/<key>`), for an optimizer or a report. Errors when an
    /// adapter was taken out behind the model's back ([`PeftModel::model_mut`]).
    pub fn named_trainable_vars(&self) -> Result<Vec<(String, Var)>> {
        let mut out = Vec::new();
        let several = self.active.len() > 1;
        for name in &self.active {
            for (path, adapter) in self.adapters_of(name)? {
                for (suffix, var) in adapter.trainable_vars() {
                    let key = peft_key(&path, &suffix);
                    out.push((if several { format!("{name}/{key}") } else { key }, var));
                }
            }
        }
        Ok(out)
    }

    /// The trainable variables, for an optimizer (see [`PeftModel::named_trainable_vars`]).
    pub fn trainable_vars(&self) -> Result<Vec<Var>> {
        Ok(self.named_trainable_vars()?.into_iter().map(|(_, v)| v).collect())
    }

    /// Trainable and total parameter counts, as PEFT's `print_trainable_parameters` gives them:
    /// the trainable ones are the active adapters'; the total counts the whole model
    /// ([`LinearHost::other_params`] included), every adapter and the shared frozen projections
    /// (once per adapter).
    pub fn parameter_count(&self) -> ParameterCount {
        let mut trainable = 0;
        let mut adapters = 0;
        let mut frozen = 0;
        for (_, l) in self.model.linears() {
            frozen += l.weight().elem_count() + l.bias().map_or(0, |b| b.elem_count());
            for name in l.names() {
                let n = l.adapter_named(&name).map_or(0, |a| a.num_trainable());
                adapters += n;
                if self.active.contains(&name) {
                    trainable += n;
                }
            }
        }
        let shared: usize = self.adapters.iter().flat_map(|(_, e)| e.shared.values()).map(|t| t.elem_count()).sum();
        ParameterCount { trainable, all: frozen + self.model.other_params() + shared + adapters }
    }

    /// The adapters' names, in the order they were added.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The active adapters' names (never empty).
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    /// Makes `name` the one active adapter, as PEFT's `set_adapter`.
    pub fn set_adapter(&mut self, name: &str) -> Result<()> {
        self.set_adapters(&[name])
    }

    /// Makes `names` the active adapters: the forward pass adds each one's update (in this
    /// order), and only their parameters are trainable. Errors on an unknown name or an empty
    /// list (switch adapters off with [`Self::set_enabled`] or [`Self::with_adapters_disabled`]).
    pub fn set_adapters(&mut self, names: &[&str]) -> Result<()> {
        if names.is_empty() {
            return Err(Error::config(
                "active adapters",
                "at least one adapter must be active; run the base model with with_adapters_disabled",
            ));
        }
        for name in names {
            self.entry(name)?;
        }
        let mut active: Vec<String> = Vec::new();
        for name in names {
            if !active.iter().any(|a| a == name) {
                active.push(name.to_string());
            }
        }
        self.active = active;
        self.sync_active();
        Ok(())
    }

    /// Tells every layer the model's active set.
    fn sync_active(&mut self) {
        let active = self.active.clone();
        for (_, l) in self.model.linears_mut() {
            l.set_active(&active);
        }
    }

    /// Removes the adapter `name` from every layer, as PEFT's `delete_adapter`. When it was the
    /// only active adapter, the first remaining adapter becomes active. The last adapter cannot
    /// be deleted (take it out with [`Self::unload`]), nor a merged one (unmerge first).
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.entry(name)?;
        if self.adapters.len() == 1 && self.active.iter().any(|a| a == name) {
            return Err(Error::config(
                "adapter name",
                format!("`{name}` is the model's only adapter; take it out with unload() to get the base model"),
            ));
        }
        for (_, l) in self.model.linears_mut() {
            if l.merged_adapters().iter().any(|m| m == name) {
                return Err(Error::MergeState(format!("adapter `{name}` is merged: unmerge before deleting it")));
            }
        }
        self.drop_adapter(name)
    }

    /// Takes the adapter `name` out of every layer and the model's lists (the caller checked that
    /// it is not merged).
    pub(crate) fn drop_adapter(&mut self, name: &str) -> Result<()> {
        for (_, l) in self.model.linears_mut() {
            l.remove_adapter(name)?;
        }
        self.adapters.retain(|(n, _)| n != name);
        self.active.retain(|a| a != name);
        if self.active.is_empty() {
            if let Some((first, _)) = self.adapters.first() {
                self.active.push(first.clone());
            }
        }
        self.sync_active();
        Ok(())
    }

    /// Runs `f` with every adapter switched off (the base model), then switches them on again,
    /// also when `f` fails: PEFT's `with model.disable_adapter():`. Errors without running `f`
    /// while an adapter is merged.
    pub fn with_adapters_disabled<R>(&mut self, f: impl FnOnce(&mut Self) -> Result<R>) -> Result<R> {
        self.set_enabled(false)?;
        let out = f(self);
        let restored = self.set_enabled(true);
        let out = out?;
        restored?;
        Ok(out)
    }

    /// Runs `f` with row `i` of every batch going through the adapter `rows[i]` alone, or through
    /// the base model for [`BASE_ROWS`], as PEFT's `adapter_names=`: one base model serves many
    /// adapters in one batch. Every method works: each group of rows runs its adapter's own
    /// forward pass. Errors on an unknown name, while an adapter is merged, and (from the
    /// layers) in training mode; the routing is cleared when `f` returns.
    pub fn with_row_adapters<R>(&mut self, rows: &[&str], f: impl FnOnce(&M) -> Result<R>) -> Result<R> {
        for name in rows {
            if *name != BASE_ROWS {
                self.entry(name)?;
            }
        }
        let set = self.model.linears_mut().into_iter().try_for_each(|(_, l)| l.set_row_adapters(Some(rows)));
        let out = set.and_then(|()| f(&self.model));
        for (_, l) in self.model.linears_mut() {
            l.set_row_adapters(None)?;
        }
        out
    }

    /// Runs `f` on the model while the linears that `which` picks (by path and layer) record
    /// their inputs, and returns `f`'s result with each picked layer's input Gram matrix `X^T X`
    /// (for [`crate::gptq::quantize`]: run calibration text through the model, merge, then
    /// quantize each merged weight against its layer's inputs). The recording ends when `f`
    /// returns, also on an error. Each picked layer holds an `(in, in)` f32 matrix.
    pub fn record_input_grams<R>(
        &mut self,
        which: impl Fn(&str, &AdaptedLinear) -> bool,
        f: impl FnOnce(&M) -> Result<R>,
    ) -> Result<(R, BTreeMap<String, InputGram>)> {
        let started = self
            .model
            .linears_mut()
            .into_iter()
            .filter(|(path, l)| which(path, l))
            .try_for_each(|(_, l)| l.record_inputs());
        let out = started.and_then(|()| f(&self.model));
        let grams: BTreeMap<String, InputGram> =
            self.model.linears_mut().into_iter().filter_map(|(path, l)| Some((path, l.take_inputs()?))).collect();
        Ok((out?, grams))
    }

    /// Folds the active adapters into their layers' weights.
    pub fn merge(&mut self) -> Result<()> {
        let active = self.active.clone();
        self.merge_adapter(&active.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Folds the adapters `names` into their layers' weights, in that order, as PEFT's
    /// `merge_adapter(adapter_names)`. Errors on an unknown or already merged adapter.
    pub fn merge_adapter(&mut self, names: &[&str]) -> Result<()> {
        for name in names {
            self.entry(name)?;
        }
        for (_, l) in self.model.linears() {
            if let Some(m) = l.merged_adapters().iter().find(|m| names.contains(&m.as_str())) {
                return Err(Error::MergeState(format!("adapter `{m}` is already merged")));
            }
        }
        for (_, l) in self.model.linears_mut() {
            let held = l.names();
            let here: Vec<String> =
                names.iter().filter(|n| held.iter().any(|h| h == *n)).map(|n| n.to_string()).collect();
            l.merge_adapters(&here)?;
        }
        Ok(())
    }

    /// Takes every merged adapter out again. Errors when none is merged.
    pub fn unmerge(&mut self) -> Result<()> {
        let mut any = false;
        for (_, l) in self.model.linears_mut() {
            if l.is_merged() {
                l.unmerge()?;
                any = true;
            }
        }
        if !any {
            return Err(Error::MergeState("the adapter is not merged".into()));
        }
        Ok(())
    }

    /// Training mode (dropout on) or evaluation mode, for every adapted layer.
    pub fn set_train(&mut self, train: bool) {
        for (_, l) in self.model.linears_mut() {
            l.set_train(train);
        }
    }

    /// Switches every adapter on or off (see [`AdaptedLinear::set_enabled`]). Switching off
    /// while an adapter is merged is an error that changes nothing.
    pub fn set_enabled(&mut self, enabled: bool) -> Result<()> {
        if let Some((path, l)) = self.model.linears().into_iter().find(|(_, l)| l.is_merged()).filter(|_| !enabled) {
            return Err(Error::MergeState(format!(
                "adapter {} is merged into {path}: unmerge before switching adapters off",
                l.merged_adapters().join(", ")
            )));
        }
        for (_, l) in self.model.linears_mut() {
            if l.has_adapters() {
                l.set_enabled(enabled)?;
            }
        }
        Ok(())
    }

    /// The module paths that received the (first) active adapter.
    pub fn adapted_modules(&self) -> &[String] {
        &self.first_active().adapted
    }

    /// The config of the (first) active adapter.
    pub fn config(&self) -> &AdapterConfig {
        &self.first_active().config
    }

    /// The config of the adapter `name`.
    pub fn adapter_config(&self, name: &str) -> Result<&AdapterConfig> {
        Ok(&self.entry(name)?.config)
    }

    /// The module paths that received the adapter `name`.
    pub fn adapted_modules_of(&self, name: &str) -> Result<&[String]> {
        Ok(&self.entry(name)?.adapted)
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
        for (_, l) in self.model.linears_mut() {
            l.take_adapters()?;
        }
        Ok(self.model)
    }
}

/// The error for an adapted layer whose adapter is gone.
fn adapter_removed(path: &str, name: &str) -> Error {
    Error::MergeState(format!(
        "adapter `{name}` of {path} was removed through model_mut(); use PeftModel::delete_adapter() or unload() to \
         take adapters out"
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
