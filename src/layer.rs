//! [`AdaptedLinear`]: a frozen linear layer and its adapter, usable as a candle [`Module`].

use std::sync::{Mutex, MutexGuard};

use candle_core::{Module, Tensor};

use crate::adapter::{add_in_f32, Adapter, BaseLayer};
use crate::frozen::FrozenWeight;
use crate::gptq::InputGram;
use crate::{Error, Result};

/// The adapter name PEFT gives the adapter of a model built with one config
/// ([`crate::PeftModel::new`], [`crate::PeftModel::from_pretrained`]).
pub const DEFAULT_ADAPTER: &str = "default";

/// The name that selects the frozen base model for a row of a mixed batch, as PEFT's
/// `adapter_names=` takes it.
pub const BASE_ROWS: &str = "__base__";

/// A frozen `y = x W0^T + b` with named adapters.
///
/// The base weight ([`FrozenWeight`]: dense, or kept quantized) and bias are never trainable;
/// the backward pass computes no gradient for them (see [`crate::frozen`]). A layer holds any
/// number of adapters by name, of any methods; the *active* ones take part in the forward pass,
/// summed (each computed against the frozen layer, as PEFT sums them). Adapters can be switched
/// off together ([`Self::set_enabled`]), folded into the weight ([`Self::merge`],
/// [`Self::merge_adapters`]) and taken out again ([`Self::unmerge`]), and the rows of a batch can
/// each go through another adapter ([`Self::set_row_adapters`]).
#[derive(Debug)]
pub struct AdaptedLinear {
    weight: FrozenWeight,
    /// A quantized `W0` while a merge holds the dense merged weight in `weight`: restored by
    /// [`Self::unmerge`] bit for bit.
    quantized_base: Option<FrozenWeight>,
    bias: Option<Tensor>,
    /// The adapters, in the order they were added.
    adapters: Vec<(String, Box<dyn Adapter>)>,
    /// The names of the active adapters, in the order they are summed.
    active: Vec<String>,
    /// The names of the adapters folded into `weight`, in the order they were merged.
    merged: Vec<String>,
    enabled: bool,
    train: bool,
    /// For a mixed batch: the index into `adapters` of each row's adapter, `None` for the base.
    rows: Option<Vec<Option<usize>>>,
    /// While recording ([`Self::record_inputs`]): the Gram matrix of the inputs seen so far.
    inputs: Mutex<Option<InputGram>>,
}

impl AdaptedLinear {
    /// A frozen layer with weight `(out, in)` (a [`Tensor`] or a
    /// [`crate::quantized::QuantizedWeight`]) and optional bias `(out,)`, without an adapter.
    pub fn new(weight: impl Into<FrozenWeight>, bias: Option<Tensor>) -> Result<Self> {
        let weight = weight.into();
        let (out, _) = weight.dims2()?;
        if let Some(b) = &bias {
            if b.dims() != [out] {
                return Err(Error::ShapeMismatch {
                    what: "bias".into(),
                    expected: vec![out],
                    actual: b.dims().to_vec(),
                });
            }
        }
        Ok(Self {
            weight,
            quantized_base: None,
            bias: bias.map(|b| b.detach()),
            adapters: Vec::new(),
            active: Vec::new(),
            merged: Vec::new(),
            enabled: true,
            train: false,
            rows: None,
            inputs: Mutex::new(None),
        })
    }

    /// Wraps a candle [`candle_nn::Linear`].
    pub fn from_linear(linear: &candle_nn::Linear) -> Result<Self> {
        Self::new(linear.weight().clone(), linear.bias().cloned())
    }

    /// The frozen layer as an adapter sees it.
    pub fn base(&self) -> BaseLayer<'_> {
        BaseLayer { weight: &self.weight, bias: self.bias.as_ref() }
    }

    /// Starts summing the Gram matrix `X^T X` of every input the layer's forward pass sees (for
    /// [`crate::gptq`]: a quantizer that keeps the layer's outputs on these inputs), replacing
    /// what an earlier recording held. Costs an `(in, in)` f32 matrix and a product per forward
    /// pass until [`Self::take_inputs`].
    pub fn record_inputs(&mut self) -> Result<()> {
        *self.recorded() = Some(InputGram::new(self.features().0)?);
        Ok(())
    }

    /// Ends a recording and returns its Gram matrix (`None` if none was started).
    pub fn take_inputs(&mut self) -> Option<InputGram> {
        self.recorded().take()
    }

    /// The recording, if one is on (a poisoned lock still holds a consistent recording: `add`
    /// replaces the matrix and its row count together, after the product).
    fn recorded(&self) -> MutexGuard<'_, Option<InputGram>> {
        self.inputs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current weight: `W0`, or the merged weight after [`Self::merge`] (dense, also over a
    /// quantized `W0`).
    pub fn weight(&self) -> &FrozenWeight {
        &self.weight
    }

    /// The frozen bias.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `(in_features, out_features)`.
    pub fn features(&self) -> (usize, usize) {
        let (out, inp) = self.weight.dims2().unwrap_or((0, 0));
        (inp, out)
    }

    /// Adds `adapter` under `name`, replacing an adapter of that name; the first adapter of a
    /// layer becomes active, later ones wait for [`Self::set_active`]. `base_weight` replaces `W0`
    /// when the adapter's init rewrote it (PiSSA), which only a layer without other adapters
    /// allows. Errors if an adapter is merged or the shapes differ.
    pub fn insert_adapter(&mut self, name: &str, adapter: Box<dyn Adapter>, base_weight: Option<Tensor>) -> Result<()> {
        if self.is_merged() {
            return Err(Error::MergeState(format!(
                "cannot add adapter `{name}` to a layer with merged adapters ({}): unmerge first",
                self.merged.join(", ")
            )));
        }
        if adapter.features() != self.features() {
            let (i, o) = adapter.features();
            return Err(Error::ShapeMismatch {
                what: "adapter (out, in)".into(),
                expected: self.dims(),
                actual: vec![o, i],
            });
        }
        if let Some(w) = base_weight {
            if self.adapters.iter().any(|(n, _)| n != name) {
                return Err(Error::Unsupported(format!(
                    "adapter `{name}`'s init rewrites the base weight (PiSSA-style), which would change the layer \
                     under its other adapters ({}); initialise it on a model without other adapters",
                    self.names().join(", ")
                )));
            }
            if w.dims() != self.dims() {
                return Err(Error::ShapeMismatch {
                    what: "rewritten base weight".into(),
                    expected: self.dims(),
                    actual: w.dims().to_vec(),
                });
            }
            self.weight = w.into();
        }
        match self.adapters.iter_mut().find(|(n, _)| n == name) {
            Some((_, slot)) => *slot = adapter,
            None => self.adapters.push((name.to_string(), adapter)),
        }
        if self.active.is_empty() {
            self.active.push(name.to_string());
        }
        Ok(())
    }

    /// Removes the adapter `name` (and from the active set) and returns it; `None` when the layer
    /// has none of that name. A merged adapter must be unmerged first.
    pub fn remove_adapter(&mut self, name: &str) -> Result<Option<Box<dyn Adapter>>> {
        if self.merged.iter().any(|m| m == name) {
            return Err(Error::MergeState(format!("adapter `{name}` is merged into the weight: unmerge it first")));
        }
        self.active.retain(|a| a != name);
        Ok(self.adapters.iter().position(|(n, _)| n == name).map(|i| self.adapters.remove(i).1))
    }

    /// Takes every adapter out (unmerging merged ones first, so the weight is `W0` again).
    pub fn take_adapters(&mut self) -> Result<Vec<(String, Box<dyn Adapter>)>> {
        if self.is_merged() {
            self.unmerge()?;
        }
        self.active.clear();
        Ok(std::mem::take(&mut self.adapters))
    }

    /// Replaces the frozen weight (same shape), e.g. with a pruned copy. Errors when an adapter
    /// is attached, since it was built for the old weight.
    pub fn set_weight(&mut self, weight: Tensor) -> Result<()> {
        if !self.adapters.is_empty() {
            return Err(Error::MergeState("cannot replace the weight of a layer with an adapter".into()));
        }
        if weight.dims() != self.dims() {
            return Err(Error::ShapeMismatch {
                what: "weight".into(),
                expected: self.dims(),
                actual: weight.dims().to_vec(),
            });
        }
        self.weight = weight.into();
        Ok(())
    }

    /// `[out, in]`.
    fn dims(&self) -> Vec<usize> {
        let (i, o) = self.features();
        vec![o, i]
    }

    /// The names of the adapters, in the order they were added.
    pub fn names(&self) -> Vec<String> {
        self.adapters.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Whether the layer holds any adapter.
    pub fn has_adapters(&self) -> bool {
        !self.adapters.is_empty()
    }

    /// The adapter `name`, if the layer has it.
    pub fn adapter_named(&self, name: &str) -> Option<&dyn Adapter> {
        self.adapters.iter().find(|(n, _)| n == name).map(|(_, a)| a.as_ref())
    }

    /// The adapter `name`, mutably.
    pub fn adapter_named_mut(&mut self, name: &str) -> Option<&mut (dyn Adapter + 'static)> {
        self.adapters.iter_mut().find(|(n, _)| n == name).map(|(_, a)| a.as_mut())
    }

    /// The active adapter, when exactly one is active (the single-adapter case).
    pub fn adapter(&self) -> Option<&dyn Adapter> {
        match self.active.as_slice() {
            [name] => self.adapter_named(name),
            _ => None,
        }
    }

    /// The active adapter, mutably, when exactly one is active.
    pub fn adapter_mut(&mut self) -> Option<&mut (dyn Adapter + 'static)> {
        match self.active.clone().as_slice() {
            [name] => self.adapter_named_mut(name),
            _ => None,
        }
    }

    /// The names of the active adapters.
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    /// Makes the adapters of `names` that this layer holds the active ones (a layer that a
    /// model's adapter does not target ignores its name, as PEFT's layers do).
    pub fn set_active(&mut self, names: &[String]) {
        self.active = names.iter().filter(|n| self.adapters.iter().any(|(a, _)| a == *n)).cloned().collect();
    }

    /// Whether any adapter is folded into the weight.
    pub fn is_merged(&self) -> bool {
        !self.merged.is_empty()
    }

    /// The names of the adapters folded into the weight, in the order they were merged.
    pub fn merged_adapters(&self) -> &[String] {
        &self.merged
    }

    /// Whether the adapters take part in the forward pass.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Training mode (dropout on) or evaluation mode.
    pub fn set_train(&mut self, train: bool) {
        self.train = train;
    }

    /// Switches the adapters on or off. A merged adapter cannot be switched off: unmerge first.
    pub fn set_enabled(&mut self, enabled: bool) -> Result<()> {
        if self.is_merged() && !enabled {
            return Err(Error::MergeState("an adapter is merged into the weight: unmerge before disabling it".into()));
        }
        self.enabled = enabled;
        Ok(())
    }

    /// Folds the active adapters that are not merged yet into the weight: afterwards the forward
    /// pass costs what the base layer costs. Merging when every active adapter is merged is an
    /// error. A quantized `W0` is dequantized and the merged weight is dense (as PEFT merges into
    /// a bitsandbytes base); [`Self::unmerge`] restores the quantized weight.
    pub fn merge(&mut self) -> Result<()> {
        let pending: Vec<String> = self.active.iter().filter(|a| !self.merged.contains(a)).cloned().collect();
        if pending.is_empty() {
            return Err(Error::MergeState(if self.is_merged() {
                "the adapter is already merged".into()
            } else {
                "cannot merge: the layer has no active adapter".into()
            }));
        }
        self.merge_adapters(&pending)
    }

    /// Folds the adapters `names` into the weight, in that order. Each must exist and not be
    /// merged yet.
    pub fn merge_adapters(&mut self, names: &[String]) -> Result<()> {
        for name in names {
            if self.merged.contains(name) {
                return Err(Error::MergeState(format!("adapter `{name}` is already merged")));
            }
            let w0 = self.weight.dense()?;
            let adapter = self.adapter_named_mut(name).ok_or_else(|| {
                Error::MergeState(format!("cannot merge `{name}`: the layer has no adapter of that name"))
            })?;
            let merged = adapter.merge(&w0)?;
            let previous = std::mem::replace(&mut self.weight, merged.into());
            if matches!(previous, FrozenWeight::Quantized(_)) {
                self.quantized_base = Some(previous);
            }
            self.merged.push(name.clone());
        }
        Ok(())
    }

    /// Takes every merged adapter out of the weight again, the last merged first. Unmerging a
    /// layer without merged adapters is an error.
    pub fn unmerge(&mut self) -> Result<()> {
        if !self.is_merged() {
            return Err(Error::MergeState("the adapter is not merged".into()));
        }
        while let Some(name) = self.merged.pop() {
            let w = self.weight.dense()?;
            let adapter = self
                .adapter_named_mut(&name)
                .ok_or_else(|| Error::MergeState(format!("merged adapter `{name}` is gone")))?;
            let w0 = adapter.unmerge(&w)?;
            self.weight = match (self.merged.is_empty(), self.quantized_base.take()) {
                (true, Some(q)) => q,
                (_, q) => {
                    self.quantized_base = q;
                    w0.into()
                }
            };
        }
        Ok(())
    }

    /// The active adapters that the forward pass runs: none when switched off, and none that is
    /// merged.
    fn live(&self) -> Vec<&dyn Adapter> {
        if !self.enabled {
            return Vec::new();
        }
        let unmerged = self.active.iter().filter(|a| !self.merged.contains(a));
        unmerged.filter_map(|a| self.adapter_named(a)).collect()
    }

    /// The merged weight, without changing the layer (for export): the current weight with
    /// every active unmerged adapter folded in, in turn.
    pub fn merged_weight(&self) -> Result<Tensor> {
        let mut w = self.weight.dense()?;
        for adapter in self.live() {
            w = add_in_f32(&w, &adapter.delta_weight(&w)?, 1.0)?;
        }
        Ok(w)
    }

    /// Routes the rows of the next inputs: row `i` of a batch goes through the adapter
    /// `rows[i]` alone, or through the frozen layer for [`BASE_ROWS`] or for a name this layer
    /// does not hold (as PEFT's `adapter_names=`). An input whose leading dimension is a
    /// multiple `k` of the rows (a `(b * t, in)` flattening of `(b, t, in)`) gives each row `k`
    /// consecutive entries. `None` clears the routing. Refused while an adapter is merged.
    pub fn set_row_adapters(&mut self, rows: Option<&[&str]>) -> Result<()> {
        if rows.is_some() && self.is_merged() {
            return Err(Error::MergeState(format!(
                "a mixed batch needs unmerged adapters, and {} is merged: unmerge first",
                self.merged.join(", ")
            )));
        }
        self.rows = rows.map(|rows| rows.iter().map(|r| self.adapters.iter().position(|(n, _)| n == r)).collect());
        Ok(())
    }

    /// The forward pass of a routed batch: each group of rows through its adapter alone.
    fn forward_rows(&self, x: &Tensor, rows: &[Option<usize>]) -> Result<Tensor> {
        if self.train {
            return Err(Error::Unsupported(
                "a mixed batch (one adapter per row) in training mode: switch to evaluation mode, or train one adapter at \
                 a time"
                    .into(),
            ));
        }
        let n = x.dim(0)?;
        if rows.is_empty() || n % rows.len() != 0 {
            return Err(Error::ShapeMismatch {
                what: "rows of a mixed batch (one adapter name per row)".into(),
                expected: vec![rows.len()],
                actual: vec![n],
            });
        }
        let per = n / rows.len();
        let mut groups: Vec<(Option<usize>, Vec<u32>)> = Vec::new();
        for (row, which) in rows.iter().enumerate() {
            let entries = (row * per..(row + 1) * per).map(|i| i as u32);
            match groups.iter_mut().find(|(w, _)| w == which) {
                Some((_, idx)) => idx.extend(entries),
                None => groups.push((*which, entries.collect())),
            }
        }
        let run = |which: Option<usize>, x: &Tensor| match which {
            Some(k) if self.enabled => self.adapters[k].1.forward(x, self.base(), false),
            _ => self.base().forward(x),
        };
        if let [(which, _)] = groups.as_slice() {
            return run(*which, x);
        }
        let mut parts = Vec::with_capacity(groups.len());
        let mut order = Vec::with_capacity(n);
        for (which, idx) in &groups {
            let sel = Tensor::new(idx.as_slice(), x.device())?;
            parts.push(run(*which, &x.index_select(&sel, 0)?)?);
            order.extend_from_slice(idx);
        }
        let mut inverse = vec![0u32; n];
        for (pos, &i) in order.iter().enumerate() {
            inverse[i as usize] = pos as u32;
        }
        Ok(Tensor::cat(&parts, 0)?.index_select(&Tensor::new(inverse, x.device())?, 0)?)
    }

    /// The forward pass ([`Module::forward`]) with this crate's error type: checks the input's
    /// last dimension, and runs the active adapters in the mode set by [`Self::set_train`] (or
    /// the rows' adapters of a mixed batch, see [`Self::set_row_adapters`]).
    pub fn forward_checked(&self, x: &Tensor) -> Result<Tensor> {
        let (in_f, _) = self.features();
        if x.dims().last() != Some(&in_f) {
            let mut expected = x.dims().to_vec();
            if let Some(l) = expected.last_mut() {
                *l = in_f;
            }
            return Err(Error::ShapeMismatch { what: "linear input".into(), expected, actual: x.dims().to_vec() });
        }
        if let Some(gram) = self.recorded().as_mut() {
            gram.add(x)?;
        }
        if let Some(rows) = &self.rows {
            return self.forward_rows(x, rows);
        }
        match self.live().as_slice() {
            [] => self.base().forward(x),
            [one] => one.forward(x, self.base(), self.train),
            several => {
                let base_out = self.base().forward(x)?;
                let mut acc = base_out.clone();
                for adapter in several {
                    acc = adapter.add_to(&acc, x, self.base(), &base_out, self.train)?;
                }
                Ok(acc)
            }
        }
    }
}

impl Module for AdaptedLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_checked(x).map_err(candle_core::Error::wrap)
    }
}
