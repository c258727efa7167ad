//! The [`Adapter`] trait: the whole contract between an adapter method and the rest of the
//! crate.
//!
//! [`AdapterCore`] is what every adapter exposes (type, shape, dtype, tensors); [`Adapter`] adds
//! the math.
//!
//! An adapter wraps one frozen linear layer `y = x W0^T + b`. It sees the layer's input `x`, the
//! base output and the frozen weights, and returns the adapted output: additive methods (LoRA)
//! add an update to the base output, weight-decomposed methods (DoRA) rescale it. It can fold
//! itself into the base weight (merge) and take itself out again (unmerge), and it names its
//! tensors with HF PEFT's key suffixes so that [`crate::format`] can save and load them.

use std::fmt::Debug;

use candle_core::{DType, Tensor, Var};

use crate::frozen::FrozenWeight;
use crate::{Error, Result};

/// What an adapter sees of the frozen layer it wraps.
#[derive(Debug, Clone, Copy)]
pub struct BaseLayer<'a> {
    /// The frozen weight `W0: (out, in)`, dense or quantized.
    pub weight: &'a FrozenWeight,
    /// The frozen bias `b: (out,)`, if the layer has one.
    pub bias: Option<&'a Tensor>,
}

impl BaseLayer<'_> {
    /// The frozen layer's output `x W0^T + b`, in the base dtype, with no gradient for `W0`
    /// (see [`crate::frozen`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.weight.linear(&x.to_dtype(self.weight.dtype())?, self.bias)
    }
}

/// What every adapter layer exposes, whether it is a whole [`Adapter`] or a
/// [`crate::adapters::LowRankUpdate`] that gets its `Adapter` from the blanket impl: its
/// identity, its shape and dtype, and its tensors under PEFT's key suffixes.
pub trait AdapterCore: Debug + Send + Sync {
    /// The method's name as PEFT writes `peft_type` (`"LORA"`, ...).
    fn peft_type(&self) -> &'static str;

    /// `(in_features, out_features)` of the layer this adapter was built for.
    fn features(&self) -> (usize, usize);

    /// The dtype the adapter computes in (its parameters' dtype).
    fn dtype(&self) -> DType;

    /// The trainable parameters, each with its PEFT key suffix (e.g. `lora_A.weight`).
    fn trainable_vars(&self) -> Vec<(String, Var)>;

    /// Every tensor this layer writes to an adapter file, with its PEFT key suffix. By default the
    /// trainable parameters.
    fn saved_tensors(&self) -> Vec<(String, Tensor)> {
        var_tensors(self.trainable_vars())
    }

    /// Replaces the saved tensor `suffix` by `value`; its shape has been checked against
    /// [`AdapterCore::saved_tensors`] and its dtype converted to [`AdapterCore::dtype`]. By
    /// default sets the trainable parameter of that name.
    fn load_tensor(&mut self, suffix: &str, value: &Tensor) -> Result<()> {
        set_var(self.trainable_vars(), self.peft_type(), suffix, value)
    }

    /// Frozen tensors the adapter holds besides the base layer (LoRA-XS's SVD factors, VeRA's
    /// views of the shared projections), for memory accounting. Empty by default.
    fn frozen_tensors(&self) -> Vec<Tensor> {
        Vec::new()
    }

    /// The number of trainable scalars.
    fn num_trainable(&self) -> usize {
        self.trainable_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }
}

/// An adapter method's per-layer math. Object safe: layers hold `Box<dyn Adapter>`.
pub trait Adapter: AdapterCore {
    /// The adapted output of the layer for its input `x: (..., in)`, in the base dtype. `train`
    /// switches dropout on.
    ///
    /// The adapter computes the frozen part itself ([`BaseLayer::forward`], or fused with its own
    /// math, as DoRA does), so no method pays for a base output it does not use. The adapter
    /// branch runs in [`AdapterCore::dtype`] and is cast back to the base dtype.
    fn forward(&self, x: &Tensor, base: BaseLayer<'_>, train: bool) -> Result<Tensor>;

    /// `acc` plus what this adapter adds to the frozen layer's output `base_out = x W0^T + b`:
    /// how a layer with several active adapters sums them, each computed against the same frozen
    /// layer (as PEFT does). By default `acc + (forward(x) - base_out)`, which costs a second
    /// frozen product; additive methods add their branch alone.
    fn add_to(&self, acc: &Tensor, x: &Tensor, base: BaseLayer<'_>, base_out: &Tensor, train: bool) -> Result<Tensor> {
        let own = self.forward(x, base, train)?;
        let added = (own.to_dtype(DType::F32)? - base_out.to_dtype(DType::F32)?)?;
        crate::frozen::add_branch(acc, &added)
    }

    /// The additive update `dW` such that the merged weight is `w0 + dW`, in the adapter's
    /// dtype. Methods whose merge is not additive (DoRA) return `W' - w0`.
    fn delta_weight(&self, w0: &Tensor) -> Result<Tensor>;

    /// The merged weight `W'` for the frozen weight `w0`, in `w0`'s dtype (the sum is taken in
    /// f32). By default `w0 + dW`.
    ///
    /// Takes `&mut self` because some methods (DoRA) must remember a value of the base weight
    /// to be able to [`Adapter::unmerge`] later.
    fn merge(&mut self, w0: &Tensor) -> Result<Tensor> {
        add_in_f32(w0, &self.delta_weight(w0)?, 1.0)
    }

    /// The frozen weight `W0` recovered from a weight that [`Adapter::merge`] produced. By
    /// default `merged - dW`.
    fn unmerge(&mut self, merged: &Tensor) -> Result<Tensor> {
        add_in_f32(merged, &self.delta_weight(merged)?, -1.0)
    }
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

impl BuiltAdapter {
    /// An adapter that leaves the base weight as it is.
    pub fn new(adapter: impl Adapter + 'static) -> Self {
        Self { adapter: Box::new(adapter), base_weight: None }
    }
}

/// `w + sign * delta`, summed in f32 and returned in `w`'s dtype.
pub(crate) fn add_in_f32(w: &Tensor, delta: &Tensor, sign: f64) -> Result<Tensor> {
    let sum = (w.to_dtype(DType::F32)? + (delta.to_dtype(DType::F32)? * sign)?)?;
    Ok(sum.to_dtype(w.dtype())?)
}

/// The tensors of named variables.
pub(crate) fn var_tensors(vars: Vec<(String, Var)>) -> Vec<(String, Tensor)> {
    vars.into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect()
}

/// Sets the variable named `suffix` among `vars` of method `peft_type` to `value`.
pub(crate) fn set_var(vars: Vec<(String, Var)>, peft_type: &str, suffix: &str, value: &Tensor) -> Result<()> {
    let var = vars
        .into_iter()
        .find_map(|(k, v)| (k == suffix).then_some(v))
        .ok_or_else(|| Error::Unsupported(format!("{peft_type} has no tensor `{suffix}`")))?;
    var.set(value)?;
    Ok(())
}
