//! [`AdaptedLinear`]: a frozen linear layer and its adapter, usable as a candle [`Module`].

use candle_core::{Module, Tensor};

use crate::adapter::{add_in_f32, Adapter, BaseLayer};
use crate::frozen::FrozenWeight;
use crate::{Error, Result};

/// A frozen `y = x W0^T + b` with an optional adapter.
///
/// The base weight ([`FrozenWeight`]: dense, or kept quantized) and bias are never trainable;
/// the backward pass computes no gradient for them (see [`crate::frozen`]). The adapter can be switched off ([`Self::set_enabled`]),
/// folded into the weight ([`Self::merge`]) and taken out again ([`Self::unmerge`]).
#[derive(Debug)]
pub struct AdaptedLinear {
    weight: FrozenWeight,
    /// A quantized `W0` while a merge holds the dense merged weight in `weight`: restored by
    /// [`Self::unmerge`] bit for bit.
    quantized_base: Option<FrozenWeight>,
    bias: Option<Tensor>,
    adapter: Option<Box<dyn Adapter>>,
    merged: bool,
    enabled: bool,
    train: bool,
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
            adapter: None,
            merged: false,
            enabled: true,
            train: false,
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

    /// Attaches `adapter`, replacing any previous one; `base_weight` replaces `W0` when the
    /// adapter's init rewrote it (PiSSA). Errors if the layer is merged or the shapes differ.
    pub fn set_adapter(&mut self, adapter: Box<dyn Adapter>, base_weight: Option<Tensor>) -> Result<()> {
        if self.merged {
            return Err(Error::MergeState("cannot replace the adapter of a merged layer: unmerge it first".into()));
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
            if w.dims() != self.dims() {
                return Err(Error::ShapeMismatch {
                    what: "rewritten base weight".into(),
                    expected: self.dims(),
                    actual: w.dims().to_vec(),
                });
            }
            self.weight = w.into();
        }
        self.adapter = Some(adapter);
        Ok(())
    }

    /// Detaches and returns the adapter, leaving the frozen layer (a merged layer is unmerged
    /// first, so the weight is `W0` again).
    pub fn take_adapter(&mut self) -> Result<Option<Box<dyn Adapter>>> {
        if self.merged {
            self.unmerge()?;
        }
        Ok(self.adapter.take())
    }

    /// Replaces the frozen weight (same shape), e.g. with a pruned copy. Errors when an adapter
    /// is attached, since it was built for the old weight.
    pub fn set_weight(&mut self, weight: Tensor) -> Result<()> {
        if self.adapter.is_some() {
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

    /// The adapter, if any.
    pub fn adapter(&self) -> Option<&dyn Adapter> {
        self.adapter.as_deref()
    }

    /// The adapter, mutably.
    pub fn adapter_mut(&mut self) -> Option<&mut (dyn Adapter + 'static)> {
        self.adapter.as_deref_mut()
    }

    /// Whether the adapter is folded into the weight.
    pub fn is_merged(&self) -> bool {
        self.merged
    }

    /// Whether the adapter takes part in the forward pass.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Training mode (dropout on) or evaluation mode.
    pub fn set_train(&mut self, train: bool) {
        self.train = train;
    }

    /// Switches the adapter on or off. A merged adapter cannot be switched off: unmerge first.
    pub fn set_enabled(&mut self, enabled: bool) -> Result<()> {
        if self.merged && !enabled {
            return Err(Error::MergeState("the adapter is merged into the weight: unmerge before disabling it".into()));
        }
        self.enabled = enabled;
        Ok(())
    }

    fn adapter_or_err(&mut self, what: &str) -> Result<&mut Box<dyn Adapter>> {
        self.adapter.as_mut().ok_or_else(|| Error::MergeState(format!("cannot {what}: the layer has no adapter")))
    }

    /// Folds the adapter into the weight: afterwards the forward pass costs what the base layer
    /// costs. Merging twice is an error. A quantized `W0` is dequantized and the merged weight is
    /// dense (as PEFT merges into a bitsandbytes base); [`Self::unmerge`] restores the quantized
    /// weight.
    pub fn merge(&mut self) -> Result<()> {
        if self.merged {
            return Err(Error::MergeState("the adapter is already merged".into()));
        }
        let w0 = self.weight.dense()?;
        let merged = self.adapter_or_err("merge")?.merge(&w0)?;
        let previous = std::mem::replace(&mut self.weight, merged.into());
        if matches!(previous, FrozenWeight::Quantized(_)) {
            self.quantized_base = Some(previous);
        }
        self.merged = true;
        Ok(())
    }

    /// Takes a merged adapter out of the weight again. Unmerging an unmerged layer is an error.
    pub fn unmerge(&mut self) -> Result<()> {
        if !self.merged {
            return Err(Error::MergeState("the adapter is not merged".into()));
        }
        let w = self.weight.dense()?;
        let w0 = self.adapter_or_err("unmerge")?.unmerge(&w)?;
        self.weight = self.quantized_base.take().unwrap_or_else(|| w0.into());
        self.merged = false;
        Ok(())
    }

    /// The merged weight, without changing the layer (for export): `W0 + dW`, or the current
    /// weight when the layer is already merged or has no adapter.
    pub fn merged_weight(&self) -> Result<Tensor> {
        let w = self.weight.dense()?;
        match &self.adapter {
            Some(a) if !self.merged => add_in_f32(&w, &a.delta_weight(&w)?, 1.0),
            _ => Ok(w),
        }
    }

    /// The forward pass ([`Module::forward`]) with this crate's error type: checks the input's
    /// last dimension, and runs the adapter in the mode set by [`Self::set_train`].
    pub fn forward_checked(&self, x: &Tensor) -> Result<Tensor> {
        let (in_f, _) = self.features();
        if x.dims().last() != Some(&in_f) {
            let mut expected = x.dims().to_vec();
            if let Some(l) = expected.last_mut() {
                *l = in_f;
            }
            return Err(Error::ShapeMismatch { what: "linear input".into(), expected, actual: x.dims().to_vec() });
        }
        match &self.adapter {
            Some(a) if self.enabled && !self.merged => a.forward(x, self.base(), self.train),
            _ => self.base().forward(x),
        }
    }
}

impl Module for AdaptedLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_checked(x).map_err(candle_core::Error::wrap)
    }
}
