//! Any adapter as a plain LoRA, so that it runs wherever LoRA runs (PEFT without the method,
//! llama.cpp, vLLM, mistral.rs).
//!
//! Per adapted layer, the update `dW = W' - W0` (the method's [`Adapter::delta_weight`]: for
//! DoRA-family methods the exact merged-minus-base difference) is cut to its best rank-`k`
//! approximation by the SVD, `dW ~= U_k diag(s_k) V_k^T` (Eckart-Young: no rank-`k` matrix is
//! closer in the Frobenius norm), and split evenly into LoRA's factors
//! `B = U_k diag(sqrt(s_k))`, `A = diag(sqrt(s_k)) V_k^T`, with `lora_alpha = r` (scaling 1).
//! What the cut loses is reported per layer: the kept share of the update's energy
//! `sum_{i<=k} s_i^2 / ||dW||_F^2` and the relative error `||dW - B A||_F / ||dW||_F`.
//!
//! [`Adapter::delta_weight`]: crate::Adapter::delta_weight

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use crate::config::AdapterConfig;
use crate::format::{peft_key, write_atomic, write_safetensors, CONFIG_FILE, WEIGHTS_FILE};
use crate::linalg::truncated_svd;
use crate::peft_model::{LinearHost, PeftModel};
use crate::{Error, LoraConfig, Result};

/// How many singular values each layer keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoraRank {
    /// The same rank `k` for every layer (a layer narrower than `k` keeps all of its update).
    Fixed(usize),
    /// Per layer, the smallest rank that keeps this share of the update's energy (in `(0, 1]`).
    Energy(f64),
}

/// What the conversion of one layer kept.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerFit {
    /// The layer's module path.
    pub module: String,
    /// The LoRA rank it got.
    pub rank: usize,
    /// The rank of the update (singular values above `1e-6` of the largest).
    pub full_rank: usize,
    /// The kept share of the update's energy, `sum_{i<=k} s_i^2 / ||dW||_F^2` (1 for a zero
    /// update).
    pub energy: f64,
    /// `||dW - B A||_F / ||dW||_F` (0 for a zero update).
    pub relative_error: f64,
}

/// An adapter converted to LoRA: its PEFT config, its tensors (PEFT keys) and what each layer kept.
#[derive(Debug)]
pub struct LoraConversion {
    /// A LoRA config targeting exactly the converted modules, `lora_alpha = r` (and a
    /// `rank_pattern` / `alpha_pattern` entry for each layer whose rank differs from `r`).
    pub config: AdapterConfig,
    /// `lora_A.weight` / `lora_B.weight` of every module, in f32.
    pub tensors: Vec<(String, Tensor)>,
    /// Per layer, in module order.
    pub layers: Vec<LayerFit>,
}

impl LoraConversion {
    /// Writes the adapter in HF PEFT's format (`adapter_config.json`,
    /// `adapter_model.safetensors`) into `dir`, each file atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        write_safetensors(&dir.join(WEIGHTS_FILE), &self.tensors)?;
        let json = serde_json::to_string_pretty(&self.config.to_peft_json()?)?;
        write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())
    }
}

/// One layer's LoRA factors, `dW = scale * B A`.
#[derive(Debug, Clone)]
pub struct LoraFactors {
    /// The layer's module path.
    pub module: String,
    /// `A: (r, in)`.
    pub a: Tensor,
    /// `B: (out, r)`.
    pub b: Tensor,
    /// The scaling `s` (LoRA's `alpha / r`, rsLoRA's `alpha / sqrt(r)`, a strategy's own).
    pub scale: f64,
}

/// The error for an adapter that is not a LoRA where `what` needs one.
pub(crate) fn not_lora(what: &str, name: &str, config: &AdapterConfig) -> Error {
    Error::Unsupported(format!(
        "{what} takes LoRA adapters (LoRA, rsLoRA, RoRA), and `{name}` is {}; convert it to a LoRA first \
         (candle_peft::convert::to_lora, or `candle-peft convert`)",
        config.method_name()
    ))
}

/// The factors of every layer of the LoRA adapter `name` of `peft` (LoRA, rsLoRA, RoRA, any
/// scaling strategy), in module order; `what` names the caller in the error for another method.
pub fn lora_factors<M: LinearHost>(peft: &PeftModel<M>, name: &str, what: &str) -> Result<Vec<LoraFactors>> {
    let config = match peft.adapter_config(name)? {
        AdapterConfig::Lora(c) if !c.use_dora => c,
        other => return Err(not_lora(what, name, other)),
    };
    let mut out = Vec::new();
    for (path, _, adapter) in peft.layers_of(name)? {
        let params = config.layer_params(&path)?;
        let tensors = adapter.saved_tensors();
        let get =
            |suffix: &str| {
                tensors.iter().find(|(s, _)| s == suffix).map(|(_, t)| t.clone()).ok_or_else(|| {
                    Error::Unsupported(format!("adapter `{name}` of {path} has no {suffix}; is it a LoRA?"))
                })
            };
        let (a, b) = (get("lora_A.weight")?, get("lora_B.weight")?);
        out.push(LoraFactors { module: path, a, b, scale: params.strategy.scale(params.alpha, params.r) });
    }
    Ok(out)
}

impl LoraConversion {
    /// Every converted layer's factors (scaling 1).
    pub fn factors(&self) -> Result<Vec<LoraFactors>> {
        let get = |key: String| {
            self.tensors
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, t)| t.clone())
                .ok_or_else(|| Error::Unsupported(format!("the conversion has no tensor {key}")))
        };
        self.layers
            .iter()
            .map(|l| {
                Ok(LoraFactors {
                    module: l.module.clone(),
                    a: get(peft_key(&l.module, "lora_A.weight"))?,
                    b: get(peft_key(&l.module, "lora_B.weight"))?,
                    scale: 1.0,
                })
            })
            .collect()
    }
}

/// Converts the adapter of `peft` (any method) to a plain LoRA (see the module's doc). Errors
/// when the model is merged (unmerge first), when `rank` is `Fixed(0)` or the energy is not in
/// `(0, 1]`, or when an update holds NaN or infinity.
pub fn to_lora<M: LinearHost>(peft: &PeftModel<M>, rank: LoraRank) -> Result<LoraConversion> {
    match rank {
        LoraRank::Fixed(0) => return Err(Error::config("rank", "0; expected a LoRA rank of at least 1")),
        LoraRank::Energy(e) if !(e > 0.0 && e <= 1.0) => {
            return Err(Error::config("energy", format!("{e}; expected a share of the update's energy in (0, 1]")))
        }
        _ => {}
    }
    let name = peft.active_adapter()?;
    let mut fits = Vec::new();
    let mut tensors = Vec::new();
    for (path, layer, adapter) in peft.layers_of(name)? {
        if layer.is_merged() {
            return Err(Error::MergeState(format!(
                "{path} is merged; unmerge the model before converting its adapter"
            )));
        }
        let w0 = layer.weight().dense()?.to_dtype(DType::F32)?;
        let delta = adapter.delta_weight(&w0)?.to_dtype(DType::F32)?;
        let (fit, a, b) = fit_layer(&path, &delta, rank)?;
        tensors.push((peft_key(&path, "lora_A.weight"), a));
        tensors.push((peft_key(&path, "lora_B.weight"), b));
        fits.push(fit);
    }
    if fits.is_empty() {
        return Err(Error::config("adapter", "it adapts no layer of the model; there is nothing to convert"));
    }
    // The most common rank is `r`; the others go to the patterns, as PEFT writes them.
    let mut counts = BTreeMap::<usize, usize>::new();
    fits.iter().for_each(|f| *counts.entry(f.rank).or_default() += 1);
    let r = counts.iter().max_by_key(|(rank, n)| (**n, std::cmp::Reverse(**rank))).map_or(1, |(rank, _)| *rank);
    let modules: Vec<&str> = fits.iter().map(|f| f.module.as_str()).collect();
    let mut config = LoraConfig::lora(r, r as f64, &modules);
    for f in fits.iter().filter(|f| f.rank != r) {
        config.rank_pattern.insert(f.module.clone(), f.rank);
        config.alpha_pattern.insert(f.module.clone(), f.rank as f64);
    }
    Ok(LoraConversion { config: AdapterConfig::Lora(config), tensors, layers: fits })
}

/// The LoRA factors `(A, B)` of one layer's update and what they keep.
fn fit_layer(module: &str, delta: &Tensor, rank: LoraRank) -> Result<(LayerFit, Tensor, Tensor)> {
    let (out_f, in_f) = delta.dims2()?;
    let svd = truncated_svd(delta, out_f.min(in_f))
        .map_err(|e| Error::config("adapter", format!("the update of {module} cannot be decomposed: {e}")))?;
    let s: Vec<f64> = svd.s.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
    let total: f64 = s.iter().map(|v| v * v).sum();
    let largest = s.first().copied().unwrap_or(0.0);
    let full_rank = s.iter().filter(|&&v| v > 1e-6 * largest).count();
    let k = match rank {
        LoraRank::Fixed(k) => k.min(s.len()),
        // At most the update's own rank: the f32 SVD's noise below it holds no energy worth a rank.
        LoraRank::Energy(share) => {
            let mut kept = 0.0;
            (s.iter().position(|v| {
                kept += v * v;
                kept >= share * total
            }))
            .map_or(s.len(), |i| i + 1)
            .min(full_rank)
        }
    }
    .max(1);
    let root = Tensor::new(s[..k].iter().map(|v| v.sqrt() as f32).collect::<Vec<_>>(), delta.device())?;
    let b = svd.u.narrow(1, 0, k)?.broadcast_mul(&root.unsqueeze(0)?)?.contiguous()?;
    let a = svd.vt.narrow(0, 0, k)?.broadcast_mul(&root.unsqueeze(1)?)?.contiguous()?;
    let norm = |t: &Tensor| -> Result<f64> { Ok(t.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64) };
    let (delta_norm, residual) = (norm(delta)?, norm(&(delta - b.matmul(&a)?)?)?);
    let kept: f64 = s[..k].iter().map(|v| v * v).sum();
    let fit = LayerFit {
        module: module.to_string(),
        rank: k,
        full_rank,
        energy: if total > 0.0 { kept / total } else { 1.0 },
        relative_error: if delta_norm > 0.0 { residual / delta_norm } else { 0.0 },
    };
    Ok((fit, a, b))
}
