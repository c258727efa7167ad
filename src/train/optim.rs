//! AdamW (Loshchilov & Hutter 2019) as `torch.optim.AdamW` computes it, with its moments in f32
//! whatever the parameters' dtype, per-parameter weight decay, and a state that checkpoints.
//!
//! ```text
//! p <- p * (1 - lr * wd)
//! m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
//! p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::{Error, Result};

/// AdamW's hyper-parameters (PyTorch's defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// `beta1`.
    pub beta1: f64,
    /// `beta2`.
    pub beta2: f64,
    /// `eps`.
    pub eps: f64,
    /// Decoupled weight decay for parameters that take it.
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// Checks the settings: `beta1` and `beta2` in `[0, 1)`, a finite positive `eps` and a
    /// finite, non-negative `weight_decay`. The error names the field.
    pub fn validate(&self) -> Result<()> {
        for (name, beta) in [("adamw.beta1", self.beta1), ("adamw.beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(Error::config(name, format!("{beta}; expected a decay rate in [0, 1)")));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::config("adamw.eps", format!("{}; expected a small positive number", self.eps)));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::config(
                "adamw.weight_decay",
                format!("{}; expected a non-negative decay (0 for none)", self.weight_decay),
            ));
        }
        Ok(())
    }
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

/// AdamW over named variables.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    step: u64,
}

impl AdamW {
    /// An optimizer over `vars` (name, variable, whether weight decay applies).
    pub fn new(vars: Vec<(String, Var, bool)>, config: AdamWConfig) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var, decay)| {
                let zeros = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                Ok(Slot { name, var, decay, m: zeros.clone(), v: zeros })
            })
            .collect::<Result<_>>()?;
        Ok(Self { config, slots, step: 0 })
    }

    /// The number of steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update with learning rate `lr` from the gradients in `grads`; a variable without a
    /// gradient is left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else { continue };
            let g = g.to_dtype(DType::F32)?;
            slot.m = ((&slot.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            slot.v = ((&slot.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let mut p = slot.var.as_tensor().to_dtype(DType::F32)?;
            if slot.decay && c.weight_decay != 0.0 {
                p = (p * (1.0 - lr * c.weight_decay))?;
            }
            let denom = ((slot.v.sqrt()? / bc2.sqrt())? + c.eps)?;
            p = (p - (slot.m.div(&denom)? * (lr / bc1))?)?;
            slot.var.set(&p.to_dtype(slot.var.dtype())?)?;
        }
        Ok(())
    }

    /// The state to checkpoint: `exp_avg.<name>`, `exp_avg_sq.<name>` and `step`.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("step".to_string(), Tensor::new(&[self.step as f64], &self.device())?)];
        for s in &self.slots {
            out.push((format!("exp_avg.{}", s.name), s.m.clone()));
            out.push((format!("exp_avg_sq.{}", s.name), s.v.clone()));
        }
        Ok(out)
    }

    /// Restores a state written by [`AdamW::state`] for the same variables.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let get = |k: &str| {
            state.get(k).ok_or_else(|| {
                Error::Unsupported(format!("optimizer state lacks `{k}` (a checkpoint of another model or method?)"))
            })
        };
        let step = get("step")?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        for s in &mut self.slots {
            let (m, v) = (get(&format!("exp_avg.{}", s.name))?, get(&format!("exp_avg_sq.{}", s.name))?);
            if m.dims() != s.var.dims() || v.dims() != s.var.dims() {
                return Err(Error::ShapeMismatch {
                    what: format!("optimizer state of {}", s.name),
                    expected: s.var.dims().to_vec(),
                    actual: m.dims().to_vec(),
                });
            }
            s.m = m.to_dtype(DType::F32)?;
            s.v = v.to_dtype(DType::F32)?;
        }
        self.step = step.first().copied().unwrap_or(0.0) as u64;
        Ok(())
    }

    fn device(&self) -> candle_core::Device {
        self.slots.first().map(|s| s.var.device().clone()).unwrap_or(candle_core::Device::Cpu)
    }
}

/// The L2 norm of each variable's gradient (0 for a variable without one).
pub fn grad_norms(grads: &GradStore, vars: &[Var]) -> Result<Vec<f64>> {
    vars.iter()
        .map(|v| match grads.get(v.as_tensor()) {
            Some(g) => Ok((g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64).sqrt()),
            None => Ok(0.0),
        })
        .collect()
}

/// Scales the gradients of `vars` in `grads` so that their global L2 norm is at most `max_norm`
/// (`torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    clip_to(grads, vars, &grad_norms(grads, vars)?, max_norm)
}

/// [`clip_grad_norm`] with the per-variable norms already computed.
pub(crate) fn clip_to(grads: &mut GradStore, vars: &[Var], norms: &[f64], max_norm: f64) -> Result<f64> {
    let norm = norms.iter().map(|n| n * n).sum::<f64>().sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * coef)?);
            }
        }
    }
    Ok(norm)
}
