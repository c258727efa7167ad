//! Adapter arithmetic: a new LoRA adapter from a weighted combination of a model's LoRA
//! adapters, as PEFT's `add_weighted_adapter` (`tuners/lora/model.py`, `utils/merge_utils.py`).
//!
//! For adapters `i` with weights `w_i`, factors `A_i: (r, in)`, `B_i: (out, r)` and scaling
//! `s_i` (LoRA's `alpha / r`, rsLoRA's and RoRA's `alpha / sqrt(r)`), on each layer:
//!
//! ```text
//! cat:     A = [w_1 s_1 A_1; w_2 s_2 A_2; ...],  B = [B_1, B_2, ...]        (rank = sum of ranks)
//! linear:  A = sum_i c_i sign(w_i s_i) A_i,  B = sum_i c_i B_i,  c_i = sqrt(|w_i s_i|)
//!          (an approximation: the product is not sum_i w_i s_i B_i A_i)
//! ties, dare_linear, dare_ties, magnitude_prune: as linear, each factor merged by its rule below
//! *_svd:   dW = merge_i(w_i, s_i B_i A_i), then its SVD U S V^T cut to rank k:
//!          B = U_k S_k, A = V_k^T (svd_clamp q: both clamped to [-h, h], h = the q-quantile of
//!          their entries); "svd" merges by the weighted sum
//! merges of tensors T_i with weights v_i:
//!   magnitude_prune:  sum_i v_i top_density(T_i)        (keep the density * n largest |entries|)
//!   ties:             disjoint(v_i top_density(T_i))     (TIES-merging, Yadav et al. 2023)
//!   dare_linear:      sum_i v_i bernoulli_density(T_i) / density   (DARE, Yu et al. 2023)
//!   dare_ties:        disjoint(v_i bernoulli_density(T_i) / density)
//!   disjoint: the sign elected per entry (sign of sum_i T_i for "total", of sum_i sign(T_i)
//!   for "frequency", >= 0 counts as +), then the mean of the weighted entries of that sign.
//! ```
//! The new adapter has `r = alpha = k` (scaling 1) and targets the union of the sources'
//! `target_modules`; a layer that only some sources adapt combines those.
//!
//! One difference from PEFT: PEFT copies `use_rslora` from the first adapter, so a combination
//! whose first adapter is rsLoRA gets the scaling `k / sqrt(k)` in PEFT instead of 1 (its
//! update is `sqrt(k)` times the combination above). candle-peft writes `use_rslora: false`:
//! the tensors are PEFT's, and the update is the combination.
//!
//! PEFT's `svd_full_matrices` and `svd_driver` choose how torch computes the SVD, not its cut
//! result, and have no counterpart here.
//!
//! DARE's random masks are drawn from a [`rand::rngs::StdRng`] seeded by
//! [`CombineOptions::seed`] (layer by layer in the model's order, the sources in the given order,
//! `A` before `B`): the same adapters and seed give the same result on every run and machine.
//! PEFT draws them from torch's global generator, so its DARE masks cannot be reproduced
//! outside torch.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::adapters::lora::{LoraConfig, LoraInit};
use crate::convert::{lora_factors, not_lora, LoraFactors};
use crate::format::{read_safetensors, CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE};
use crate::layer::AdaptedLinear;
use crate::linalg::truncated_svd;
use crate::peft_model::{InitOptions, LinearHost, NamedLinears, PeftModel};
use crate::target::TargetModules;
use crate::{AdapterConfig, Error, Result};

/// How [`PeftModel::add_weighted_adapter`] combines adapters: PEFT's `combination_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Combination {
    /// The SVD of the weighted sum of the updates (PEFT's default).
    #[default]
    Svd,
    /// The weighted sum of the factors (equal ranks; an approximation).
    Linear,
    /// The factors stacked: exact, rank = the sum of the ranks.
    Cat,
    /// TIES-merging of the factors (equal ranks).
    Ties,
    /// The SVD of the TIES-merged updates.
    TiesSvd,
    /// DARE with the weighted sum, on the factors (equal ranks).
    DareLinear,
    /// DARE with TIES' sign election, on the factors (equal ranks).
    DareTies,
    /// The SVD of the DARE-merged updates.
    DareLinearSvd,
    /// The SVD of the DARE-TIES-merged updates.
    DareTiesSvd,
    /// Magnitude pruning, then the weighted sum, on the factors (equal ranks).
    MagnitudePrune,
    /// The SVD of the magnitude-pruned weighted sum of the updates.
    MagnitudePruneSvd,
}

/// How entries are dropped before a merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pruning {
    None,
    Magnitude,
    Random,
}

impl Combination {
    /// Every combination, in PEFT's order.
    pub const ALL: [Self; 11] = [
        Self::Svd,
        Self::Linear,
        Self::Cat,
        Self::Ties,
        Self::TiesSvd,
        Self::DareTies,
        Self::DareLinear,
        Self::DareTiesSvd,
        Self::DareLinearSvd,
        Self::MagnitudePrune,
        Self::MagnitudePruneSvd,
    ];

    /// PEFT's name (`"dare_ties_svd"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Svd => "svd",
            Self::Linear => "linear",
            Self::Cat => "cat",
            Self::Ties => "ties",
            Self::TiesSvd => "ties_svd",
            Self::DareLinear => "dare_linear",
            Self::DareTies => "dare_ties",
            Self::DareLinearSvd => "dare_linear_svd",
            Self::DareTiesSvd => "dare_ties_svd",
            Self::MagnitudePrune => "magnitude_prune",
            Self::MagnitudePruneSvd => "magnitude_prune_svd",
        }
    }

    /// Whether the new factors come from an SVD of the combined update.
    pub fn is_svd(self) -> bool {
        self.name().ends_with("svd")
    }

    fn pruning(self) -> Pruning {
        match self {
            Self::Ties | Self::TiesSvd | Self::MagnitudePrune | Self::MagnitudePruneSvd => Pruning::Magnitude,
            Self::DareLinear | Self::DareTies | Self::DareLinearSvd | Self::DareTiesSvd => Pruning::Random,
            Self::Svd | Self::Linear | Self::Cat => Pruning::None,
        }
    }

    /// Whether the merge elects a sign per entry (TIES).
    fn elects_sign(self) -> bool {
        matches!(self, Self::Ties | Self::TiesSvd | Self::DareTies | Self::DareTiesSvd)
    }
}

impl fmt::Display for Combination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Combination {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|c| c.name()).collect();
            Error::config("combination type", format!("`{s}` is not one (expected one of: {})", names.join(", ")))
        })
    }
}

/// How TIES elects the sign of an entry: PEFT's `majority_sign_method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MajoritySign {
    /// The sign of the sum of the entries.
    #[default]
    Total,
    /// The sign held by more adapters.
    Frequency,
}

impl FromStr for MajoritySign {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "total" => Ok(Self::Total),
            "frequency" => Ok(Self::Frequency),
            _ => Err(Error::config("majority sign method", format!("`{s}`; expected `total` or `frequency`"))),
        }
    }
}

/// The options of [`PeftModel::add_weighted_adapter`], PEFT's keyword arguments.
#[derive(Debug, Clone, Default)]
pub struct CombineOptions {
    /// The combination (PEFT's `combination_type`; `svd` by default).
    pub combination: Combination,
    /// The rank of an SVD combination (default: the largest source rank).
    pub svd_rank: Option<usize>,
    /// The quantile in `(0, 1]` at which an SVD combination's factors are clamped.
    pub svd_clamp: Option<f64>,
    /// The share of entries kept by pruning, in `[0, 1]` (1 keeps all); required by every
    /// combination that prunes.
    pub density: Option<f64>,
    /// TIES' sign election.
    pub majority_sign: MajoritySign,
    /// The seed of DARE's random masks.
    pub seed: u64,
}

/// What the errors call this module's operation.
const WHAT: &str = "add_weighted_adapter";

/// A model of placeholder layers with the shapes that the LoRA adapter directories `dirs` adapt,
/// for combining adapters without their base model (a LoRA combination needs only the factors):
/// each frozen weight is one zero broadcast to `(out, in)`, which takes no memory. Refuses an
/// adapter that is not a LoRA, and layers whose shapes two adapters disagree on.
pub fn lora_shapes_host(dirs: &[&Path], device: &Device) -> Result<NamedLinears> {
    let mut shapes = std::collections::BTreeMap::<String, (usize, usize)>::new();
    for dir in dirs {
        let config = AdapterConfig::from_file(&dir.join(CONFIG_FILE))?;
        if !matches!(&config, AdapterConfig::Lora(c) if !c.use_dora) {
            return Err(not_lora(WHAT, &dir.display().to_string(), &config));
        }
        let path = dir.join(WEIGHTS_FILE);
        let tensors = read_safetensors(&path, device)?;
        for (key, t) in &tensors {
            let Some(module) = key.strip_prefix(KEY_PREFIX).and_then(|k| k.strip_suffix(".lora_A.weight")) else {
                continue;
            };
            let b = tensors.get(&format!("{KEY_PREFIX}{module}.lora_B.weight")).ok_or_else(|| Error::KeyMismatch {
                path: path.clone(),
                missing: vec![format!("{KEY_PREFIX}{module}.lora_B.weight")],
                unexpected: vec![],
            })?;
            let shape = (b.dim(0)?, t.dim(1)?);
            if let Some(other) = shapes.insert(module.to_string(), shape) {
                if other != shape {
                    return Err(Error::ShapeMismatch {
                        what: format!("{module} (out, in) in {} and an adapter before it", path.display()),
                        expected: vec![other.0, other.1],
                        actual: vec![shape.0, shape.1],
                    });
                }
            }
        }
    }
    let mut host = NamedLinears::new();
    let zero = Tensor::zeros((1, 1), DType::F32, device)?;
    for (module, (out, inp)) in shapes {
        host.insert(module, AdaptedLinear::new(zero.broadcast_as((out, inp))?, None)?);
    }
    Ok(host)
}

/// One source adapter on one layer: its weight, scaling and factors (f32, on the host).
struct Source {
    weight: f64,
    scale: f64,
    a: Factor,
    b: Factor,
}

/// A row-major matrix on the host.
#[derive(Clone)]
struct Factor {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl Factor {
    fn from_tensor(t: &Tensor) -> Result<Self> {
        let (rows, cols) = t.dims2()?;
        Ok(Self { rows, cols, data: t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()? })
    }

    fn to_tensor(&self, like: &Tensor) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.data.clone(), (self.rows, self.cols), like.device())?.to_dtype(like.dtype())?)
    }

    fn scaled(&self, c: f64) -> Self {
        // Torch multiplies an f32 tensor by a Python float in f32.
        let c = c as f32;
        Self { data: self.data.iter().map(|v| v * c).collect(), ..*self }
    }

    fn tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.data.clone(), (self.rows, self.cols), &candle_core::Device::Cpu)?)
    }

    /// `self @ other`.
    fn matmul(&self, other: &Self) -> Result<Self> {
        Self::from_tensor(&self.tensor()?.matmul(&other.tensor()?)?)
    }
}

/// `top_density(t)`: the `floor(density * n)` entries of largest magnitude, the others zero.
fn magnitude_prune(t: &[f32], density: f64) -> Vec<f32> {
    let k = (density * t.len() as f64) as usize;
    let mut order: Vec<usize> = (0..t.len()).collect();
    order.sort_by(|&i, &j| t[j].abs().total_cmp(&t[i].abs()));
    let mut out = vec![0f32; t.len()];
    for &i in &order[..k] {
        out[i] = t[i];
    }
    out
}

/// `bernoulli_density(t) / density`: each entry kept with probability `density`, rescaled.
fn random_prune(t: &[f32], density: f64, rng: &mut StdRng) -> Vec<f32> {
    let d = density as f32;
    t.iter().map(|&v| if rng.random::<f64>() < density { v / d } else { 0.0 }).collect()
}

/// PEFT's `merge_utils` on flat tensors: prune each, then the weighted sum or TIES' disjoint
/// merge.
fn merge_tensors(
    tasks: &[&[f32]],
    weights: &[f64],
    combination: Combination,
    density: f64,
    sign: MajoritySign,
    rng: &mut StdRng,
) -> Vec<f32> {
    let pruned: Vec<Vec<f32>> = tasks
        .iter()
        .map(|t| match combination.pruning() {
            _ if density >= 1.0 => t.to_vec(),
            Pruning::None => t.to_vec(),
            Pruning::Magnitude => magnitude_prune(t, density),
            Pruning::Random => random_prune(t, density, rng),
        })
        .collect();
    let n = pruned[0].len();
    let weights: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
    if !combination.elects_sign() {
        return (0..n).map(|j| pruned.iter().zip(&weights).map(|(t, w)| t[j] * w).sum()).collect();
    }
    let signum = |v: f32| {
        if v > 0.0 {
            1f32
        } else if v < 0.0 {
            -1.0
        } else {
            0.0
        }
    };
    (0..n)
        .map(|j| {
            let magnitude: f32 = match sign {
                MajoritySign::Total => pruned.iter().map(|t| t[j]).sum(),
                MajoritySign::Frequency => pruned.iter().map(|t| signum(t[j])).sum(),
            };
            let elected = if magnitude >= 0.0 { 1.0 } else { -1.0 };
            let kept = pruned.iter().zip(&weights).filter(|(t, _)| signum(t[j]) == elected);
            let (sum, count) = kept.fold((0f32, 0f32), |(s, c), (t, w)| (s + t[j] * w, c + 1.0));
            sum / count.max(1.0)
        })
        .collect()
}

/// torch.quantile's linear interpolation.
fn quantile(values: &[f32], q: f64) -> f32 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f32::total_cmp);
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64) as f32
}

impl<M: LinearHost> PeftModel<M> {
    /// Adds the adapter `new_name`, a combination of the LoRA adapters `sources` (name, weight;
    /// weights may be negative), as PEFT's `add_weighted_adapter` computes it (see
    /// [`crate::combine`] for every combination's formula). The new adapter is not activated
    /// ([`PeftModel::set_adapter`]).
    ///
    /// Combines LoRA, rsLoRA and RoRA adapters (any scaling strategy); other methods are refused
    /// with a pointer to [`crate::convert::to_lora`], which turns any adapter into a LoRA first.
    /// `linear`, `ties`, `dare_*` (without svd) and `magnitude_prune` need equal ranks; the SVD
    /// rank is at most `min(out, in)` of every layer. With one source, the combination is
    /// `linear` (as in PEFT).
    pub fn add_weighted_adapter(
        &mut self,
        sources: &[(&str, f64)],
        new_name: &str,
        opts: &CombineOptions,
    ) -> Result<()> {
        let (config, new_rank, combination) = self.combined_config(sources, opts)?;
        let dtype = self.source_dtype(sources[0].0)?;
        self.add_adapter(new_name, AdapterConfig::Lora(config), InitOptions { seed: opts.seed, dtype })?;
        let result = self.fill_combination(sources, new_name, new_rank, combination, opts);
        if result.is_err() {
            self.drop_adapter(new_name)?;
        }
        result
    }

    /// Checks the sources and options; the new adapter's config, rank and (effective)
    /// combination.
    fn combined_config(
        &self,
        sources: &[(&str, f64)],
        opts: &CombineOptions,
    ) -> Result<(LoraConfig, usize, Combination)> {
        if sources.is_empty() {
            return Err(Error::config("adapters", "add_weighted_adapter needs at least one adapter to combine"));
        }
        let mut configs = Vec::new();
        for &(name, weight) in sources {
            if !weight.is_finite() {
                return Err(Error::config(
                    "weights",
                    format!("{weight} for adapter `{name}`; expected a finite number"),
                ));
            }
            match self.adapter_config(name)? {
                AdapterConfig::Lora(c) if !c.use_dora => configs.push(c),
                other => return Err(not_lora(WHAT, name, other)),
            }
        }
        let combination = if sources.len() == 1 { Combination::Linear } else { opts.combination };
        let density = opts.density;
        if combination.pruning() != Pruning::None {
            match density {
                None => {
                    return Err(Error::config(
                        "density",
                        format!(
                            "missing; the `{combination}` combination prunes, and needs the share of entries to keep"
                        ),
                    ))
                }
                Some(d) if !(0.0..=1.0).contains(&d) => {
                    return Err(Error::config("density", format!("{d}; expected a share in [0, 1]")))
                }
                _ => {}
            }
        }
        if let Some(q) = opts.svd_clamp {
            if !(q > 0.0 && q <= 1.0) {
                return Err(Error::config("svd_clamp", format!("{q}; expected a quantile in (0, 1]")));
            }
        }
        if opts.svd_rank == Some(0) {
            return Err(Error::config("svd_rank", "0; expected a rank of at least 1"));
        }
        let ranks: Vec<usize> =
            configs.iter().map(|c| c.rank_pattern.values().copied().fold(c.r, usize::max)).collect();
        let new_rank = match combination {
            Combination::Cat => ranks.iter().sum(),
            c if c.is_svd() => opts.svd_rank.unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(1)),
            c => {
                if ranks.iter().any(|&r| r != ranks[0]) {
                    return Err(Error::config(
                        "adapters",
                        format!(
                            "ranks {ranks:?}; the `{c}` combination needs adapters of equal rank (use cat or an svd \
                             combination)"
                        ),
                    ));
                }
                ranks[0]
            }
        };
        let mut union: Option<TargetModules> = None;
        for (c, &(name, _)) in configs.iter().zip(sources) {
            let own = c.target.target_modules.clone().ok_or_else(|| {
                Error::config("target_modules", format!("adapter `{name}` has none; its config names no module"))
            })?;
            union = Some(match (union, own) {
                (None, own) => own,
                (Some(TargetModules::List(mut all)), TargetModules::List(more)) => {
                    for m in more {
                        if !all.contains(&m) {
                            all.push(m);
                        }
                    }
                    TargetModules::List(all)
                }
                (Some(TargetModules::Regex(all)), TargetModules::Regex(more)) => {
                    let all = if all.starts_with('(') { all } else { format!("({all})") };
                    TargetModules::Regex(format!("{all}|({more})"))
                }
                _ => {
                    return Err(Error::Unsupported(
                        "combining adapters whose target_modules mix a list and a regex (PEFT refuses it too)".into(),
                    ))
                }
            });
        }
        let mut config = configs[0].clone();
        config.r = new_rank;
        config.lora_alpha = new_rank as f64;
        config.use_rslora = false;
        config.scaling = None;
        config.init_lora_weights = LoraInit::Kaiming;
        config.rank_pattern.clear();
        config.alpha_pattern.clear();
        config.target.target_modules = union;
        Ok((config, new_rank, combination))
    }

    /// The dtype of a source adapter's tensors.
    fn source_dtype(&self, name: &str) -> Result<DType> {
        Ok(self.layers_of(name)?.first().map_or(DType::F32, |(_, _, a)| a.dtype()))
    }

    /// Computes and sets the new adapter's factors on every layer it adapts.
    fn fill_combination(
        &mut self,
        sources: &[(&str, f64)],
        new_name: &str,
        new_rank: usize,
        combination: Combination,
        opts: &CombineOptions,
    ) -> Result<()> {
        let targets = self.adapted_modules_of(new_name)?.to_vec();
        let mut per_source = Vec::new();
        for &(name, weight) in sources {
            let factors = lora_factors(self, name, WHAT)?;
            let by_module: std::collections::BTreeMap<String, LoraFactors> =
                factors.into_iter().map(|f| (f.module.clone(), f)).collect();
            per_source.push((weight, by_module));
        }
        let mut rng = StdRng::seed_from_u64(opts.seed);
        let mut results = Vec::new();
        for path in self.model().linears().into_iter().map(|(p, _)| p).filter(|p| targets.contains(p)) {
            let mut present = Vec::new();
            for (weight, by_module) in &per_source {
                let Some(f) = by_module.get(&path) else { continue };
                present.push(Source {
                    weight: *weight,
                    scale: f.scale,
                    a: Factor::from_tensor(&f.a)?,
                    b: Factor::from_tensor(&f.b)?,
                });
            }
            if present.is_empty() {
                return Err(Error::config(
                    "target_modules",
                    format!("the combined adapter targets {path}, which none of the combined adapters adapts"),
                ));
            }
            let (a, b) = combine_layer(&path, &present, new_rank, combination, opts, &mut rng)?;
            results.push((path, a, b));
        }
        let mut results: std::collections::BTreeMap<String, (Factor, Factor)> =
            results.into_iter().map(|(p, a, b)| (p, (a, b))).collect();
        for (path, layer) in self.model_mut().linears_mut() {
            let Some((a, b)) = results.remove(&path) else { continue };
            let adapter = layer.adapter_named_mut(new_name).ok_or_else(|| {
                Error::MergeState(format!("the combined adapter `{new_name}` is missing from {path}"))
            })?;
            let like = &adapter.saved_tensors()[0].1;
            let (a, b) = (a.to_tensor(like)?, b.to_tensor(like)?);
            adapter.load_tensor("lora_A.weight", &a)?;
            adapter.load_tensor("lora_B.weight", &b)?;
        }
        Ok(())
    }
}

/// `(U_k S_k, V_k^T)` of `dW = sum_i w_i s_i B_i A_i` from the factors, without forming `dW`:
/// with `B = [B_1 .. B_n]: (out, R)` and `A = [w_1 s_1 A_1; ..]: (R, in)`, the SVD
/// `B = U_b S_b V_b^T` and then `S_b V_b^T A = U_c S_c V_c^T` give `dW = (U_b U_c) S_c V_c^T`, an
/// SVD of `dW` from products of `R` rows (the same singular values and, up to sign, vectors as
/// the SVD of the whole matrix when they are distinct). For `svd` with `k <= R`.
fn low_rank_svd(sources: &[Source], k: usize) -> Result<(Tensor, Tensor)> {
    let b = Tensor::cat(&sources.iter().map(|s| s.b.tensor()).collect::<Result<Vec<_>>>()?, 1)?;
    let a = sources.iter().map(|s| s.a.scaled(s.weight).scaled(s.scale).tensor()).collect::<Result<Vec<_>>>()?;
    let a = Tensor::cat(&a, 0)?;
    let rank = a.dim(0)?;
    let outer = truncated_svd(&b, rank)?;
    let inner = outer.s.unsqueeze(1)?.broadcast_mul(&outer.vt)?.matmul(&a)?;
    let svd = truncated_svd(&inner, rank)?;
    // Contiguous views: MKL's products (the `mkl` build) take no column slice.
    let u = outer.u.matmul(&svd.u.narrow(1, 0, k)?.contiguous()?)?;
    Ok((u.broadcast_mul(&svd.s.narrow(0, 0, k)?.unsqueeze(0)?)?, svd.vt.narrow(0, 0, k)?.contiguous()?))
}

/// The new `(A, B)` of one layer (`A: (new_rank, in)`, `B: (out, new_rank)`).
fn combine_layer(
    path: &str,
    sources: &[Source],
    new_rank: usize,
    combination: Combination,
    opts: &CombineOptions,
    rng: &mut StdRng,
) -> Result<(Factor, Factor)> {
    let (rows_in, cols_out) = (sources[0].a.cols, sources[0].b.rows);
    let density = opts.density.unwrap_or(1.0);
    if combination == Combination::Cat {
        let mut a = Factor { rows: new_rank, cols: rows_in, data: vec![0.0; new_rank * rows_in] };
        let mut b = Factor { rows: cols_out, cols: new_rank, data: vec![0.0; cols_out * new_rank] };
        let mut offset = 0;
        for s in sources {
            let scaled = s.a.scaled(s.weight).scaled(s.scale);
            a.data[offset * rows_in..(offset + s.a.rows) * rows_in].copy_from_slice(&scaled.data);
            for i in 0..cols_out {
                for k in 0..s.b.cols {
                    b.data[i * new_rank + offset + k] = s.b.data[i * s.b.cols + k];
                }
            }
            offset += s.a.rows;
        }
        return Ok((a, b));
    }
    if combination.is_svd() {
        if new_rank > cols_out.min(rows_in) {
            return Err(Error::config(
                "svd_rank",
                format!(
                    "{new_rank} for {path}, whose update is {cols_out}x{rows_in}; expected at most {}",
                    cols_out.min(rows_in)
                ),
            ));
        }
        let total_rank: usize = sources.iter().map(|s| s.a.rows).sum();
        let (u, vt) =
            if combination == Combination::Svd && new_rank <= total_rank && total_rank <= cols_out.min(rows_in) {
                low_rank_svd(sources, new_rank)?
            } else {
                let deltas: Vec<Factor> =
                    sources.iter().map(|s| Ok(s.b.matmul(&s.a)?.scaled(s.scale))).collect::<Result<_>>()?;
                let tasks: Vec<&[f32]> = deltas.iter().map(|d| d.data.as_slice()).collect();
                let weights: Vec<f64> = sources.iter().map(|s| s.weight).collect();
                let delta = merge_tensors(&tasks, &weights, combination, density, opts.majority_sign, rng);
                let svd = truncated_svd(&Factor { rows: cols_out, cols: rows_in, data: delta }.tensor()?, new_rank)?;
                (svd.u.broadcast_mul(&svd.s.unsqueeze(0)?)?, svd.vt)
            };
        let mut b = Factor::from_tensor(&u)?;
        let mut a = Factor::from_tensor(&vt)?;
        if let Some(q) = opts.svd_clamp {
            let all: Vec<f32> = b.data.iter().chain(&a.data).copied().collect();
            let hi = quantile(&all, q);
            for v in b.data.iter_mut().chain(a.data.iter_mut()) {
                *v = v.clamp(-hi, hi);
            }
        }
        return Ok((a, b));
    }
    for s in sources {
        if (s.a.rows, s.a.cols, s.b.rows, s.b.cols) != (sources[0].a.rows, rows_in, cols_out, sources[0].b.cols) {
            return Err(Error::ShapeMismatch {
                what: format!("LoRA factors of {path} combined by `{combination}` (equal ranks needed)"),
                expected: vec![sources[0].a.rows, rows_in],
                actual: vec![s.a.rows, s.a.cols],
            });
        }
    }
    // sqrt(|w s|) on each factor, the sign on A only.
    let ws: Vec<f64> = sources.iter().map(|s| s.weight * s.scale).collect();
    let weights_a: Vec<f64> = ws.iter().map(|w| w.abs().sqrt() * if *w >= 0.0 { 1.0 } else { -1.0 }).collect();
    let weights_b: Vec<f64> = ws.iter().map(|w| w.abs().sqrt()).collect();
    let tasks_a: Vec<&[f32]> = sources.iter().map(|s| s.a.data.as_slice()).collect();
    let tasks_b: Vec<&[f32]> = sources.iter().map(|s| s.b.data.as_slice()).collect();
    let a = merge_tensors(&tasks_a, &weights_a, combination, density, opts.majority_sign, rng);
    let b = merge_tensors(&tasks_b, &weights_b, combination, density, opts.majority_sign, rng);
    Ok((Factor { data: a, ..sources[0].a.clone() }, Factor { data: b, ..sources[0].b.clone() }))
}
