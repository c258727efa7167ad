//! Helpers shared by the adapter methods: seeded initialisers and branch dropout.
//!
//! Inits are drawn on the host from the caller's seeded RNG (candle's CPU device cannot be
//! seeded), then moved to the target device, so a seed gives the same adapter on every device.

use std::cell::Cell;
use std::collections::BTreeMap;

use candle_core::{DType, Device, Shape, Tensor, Var};
use rand::Rng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::target::pattern_value;
use crate::{Error, Result};

/// Draws a tensor of `shape` from `dist` on the host, then moves it to `device` as `dtype`.
fn sample(
    rng: &mut (impl Rng + ?Sized),
    shape: Shape,
    dist: impl Distribution<f32>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let data: Vec<f32> = (0..shape.elem_count()).map(|_| dist.sample(rng)).collect();
    Ok(Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?)
}

/// Samples `U(-bound, bound)` of `shape`.
pub(crate) fn uniform(
    rng: &mut (impl Rng + ?Sized),
    shape: impl Into<Shape>,
    bound: f64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let dist = Uniform::new_inclusive(-bound as f32, bound as f32).map_err(|e| Error::config("init", e.to_string()))?;
    sample(rng, shape.into(), dist, dtype, device)
}

/// Samples `N(0, std^2)` of `shape`.
pub(crate) fn normal(
    rng: &mut (impl Rng + ?Sized),
    shape: impl Into<Shape>,
    std: f64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let dist = Normal::new(0f32, std as f32).map_err(|e| Error::config("init", e.to_string()))?;
    sample(rng, shape.into(), dist, dtype, device)
}

/// torch's `kaiming_uniform_(w, a=sqrt(5))` for a `(rows, fan_in)` weight, the default init of
/// `nn.Linear`: `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`.
pub(crate) fn kaiming_uniform(
    rng: &mut (impl Rng + ?Sized),
    rows: usize,
    fan_in: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    // gain = sqrt(2 / (1 + a^2)) = sqrt(1/3); bound = gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in).
    uniform(rng, (rows, fan_in), 1.0 / (fan_in as f64).sqrt(), dtype, device)
}

/// `true`: serde's default for PEFT's boolean fields that default to on.
pub(crate) fn yes() -> bool {
    true
}

/// A trainable parameter holding `t`.
pub(crate) fn var(t: Tensor) -> Result<Var> {
    Ok(Var::from_tensor(&t)?)
}

/// Dropout on the adapter branch's input, only in training mode.
pub(crate) fn branch_dropout(x: &Tensor, p: f32, train: bool) -> Result<Tensor> {
    if train && p > 0.0 {
        if RECOMPUTATION.with(Cell::get) {
            return Err(Error::config(
                "dropout",
                format!(
                    "the adapters have dropout {p}, and activation checkpointing recomputes each layer in the \
                     backward pass, where candle cannot draw the same dropout mask again: set the method's \
                     dropout (lora_dropout, ...) to 0, or train without checkpointing"
                ),
            ));
        }
        Ok(candle_nn::ops::dropout(x, p)?)
    } else {
        Ok(x.clone())
    }
}

thread_local! {
    static RECOMPUTATION: Cell<bool> = const { Cell::new(false) };
}

/// While alive, the forward passes on this thread are ones that activation checkpointing
/// recomputes: [`branch_dropout`] refuses to draw a mask (it could not draw the same one again).
pub(crate) struct Recomputation;

impl Recomputation {
    pub(crate) fn start() -> Self {
        RECOMPUTATION.with(|r| r.set(true));
        Self
    }
}

impl Drop for Recomputation {
    fn drop(&mut self) {
        RECOMPUTATION.with(|r| r.set(false));
    }
}

/// Checks the dropout probability of field `name` (`lora_dropout`, ...): it must lie in
/// `[0, 1)`, as PEFT requires.
pub(crate) fn check_dropout(name: &'static str, p: f64) -> Result<f32> {
    if (0.0..1.0).contains(&p) {
        Ok(p as f32)
    } else {
        Err(Error::config(name, format!("{p} is outside [0, 1)")))
    }
}

/// Checks an adapter rank against the layer: at least 1.
pub(crate) fn check_rank(r: usize) -> Result<()> {
    if r == 0 {
        return Err(Error::config("r", "the rank must be at least 1"));
    }
    Ok(())
}

/// `(r, alpha)` of the module at `path`: the first `rank_pattern` / `alpha_pattern` entry that
/// matches it (PEFT's `get_pattern_key`), else `r` and `alpha`.
pub(crate) fn rank_and_alpha(
    path: &str,
    r: usize,
    rank_pattern: &BTreeMap<String, usize>,
    alpha: f64,
    alpha_pattern: &BTreeMap<String, f64>,
) -> Result<(usize, f64)> {
    Ok((pattern_value(rank_pattern, path)?.unwrap_or(r), pattern_value(alpha_pattern, path)?.unwrap_or(alpha)))
}

/// Checks a rank and the alpha of field `alpha_name`, and every entry of their patterns.
pub(crate) fn check_ranks_and_alphas(
    r: usize,
    rank_pattern: &BTreeMap<String, usize>,
    alpha_name: &'static str,
    alpha: f64,
    alpha_pattern: &BTreeMap<String, f64>,
) -> Result<()> {
    check_rank(r)?;
    for (k, &r) in rank_pattern {
        check_rank(r).map_err(|_| Error::config("rank_pattern", format!("`{k}` has rank 0")))?;
    }
    for &a in std::iter::once(&alpha).chain(alpha_pattern.values()) {
        check_scaling(alpha_name, a, 0.0)?;
    }
    Ok(())
}

/// Checks the alpha of field `name` (`lora_alpha`, ...) and the scaling factor a strategy made
/// of it.
pub(crate) fn check_scaling(name: &'static str, alpha: f64, s: f64) -> Result<f64> {
    if !alpha.is_finite() {
        return Err(Error::config(name, format!("{alpha} is not finite")));
    }
    if !s.is_finite() {
        return Err(Error::config("scaling", format!("the strategy gave a non-finite factor {s}")));
    }
    Ok(s)
}

/// The two shared tensors `keys` of `method` (VeRA's projections, RandLoRA's bases).
pub(crate) fn shared_pair<'a>(
    shared: &'a std::collections::BTreeMap<String, Tensor>,
    keys: [&str; 2],
    method: &str,
) -> Result<(&'a Tensor, &'a Tensor)> {
    let get = |k: &str| shared.get(k).ok_or_else(|| Error::Unsupported(format!("{method} needs the shared `{k}`")));
    Ok((get(keys[0])?, get(keys[1])?))
}
