//! A sweep over adapter methods x ranks x scaling strategies x learning rates, to see on one's
//! own model and data what rsLoRA (Kalajdzievski 2023) and RoRA (Liu et al. 2025) claim: with
//! `alpha / r` the gain from a higher rank flattens because the adapter's gradients shrink as
//! `1 / sqrt(r)`, while with `alpha / sqrt(r)` a higher rank keeps lowering the loss.
//!
//! Every cell trains a fresh adapter on the same loaded base model (no reload: the adapter is
//! unloaded after the cell), with the same data order and init seed. Per step it logs the
//! training loss and the mean L2 norm of the adapter's gradients; per cell the final loss (mean
//! of the last 10% of steps), the eval loss, the gradient norm at step 1 and over the run, the trainable parameters, the step time and the
//! peak heap (when [`crate::alloc::Counting`] is the global allocator). A finished cell is
//! recorded in `cells.jsonl` and not run again when the sweep is restarted.
//!
//! Output (in the output directory): `cells.jsonl` / `cells.csv`, `steps.jsonl` / `steps.csv`,
//! `sweep_config.json`, and with the `plot` feature `final_loss_vs_rank.png`,
//! `loss_vs_step.png`, `grad_norm_vs_step.png`.

pub mod builtin;
mod report;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

pub use report::{read_cells, summary_table, write_reports, CellResult, StepRecord};

use crate::config::AdapterConfig;
use crate::format::write_atomic;
use crate::method::MethodParams;
use crate::models::{Llama, LlamaConfig};
use crate::peft_model::{InitOptions, LinearHost, PeftModel};
use crate::scaling::{Fixed, RankStabilized, Scaling, ScalingStrategy, Standard};
use crate::target::TargetConfig;
use crate::train::data::{pack, read_jsonl, Ends, Example, Record};
use crate::train::{LrSchedule, TrainConfig, Trainer};
use crate::{Error, Result};

/// The embedded default sweep (`configs/sweep-default.json`).
pub const DEFAULT_CONFIG: &str = include_str!("../../configs/sweep-default.json");

/// What to sweep and how to train each cell (the JSON of `--config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    /// `"builtin"` (a random byte-level LLaMA of `builtin_model`'s shape) or a GGUF file / HF
    /// model directory.
    pub model: String,
    /// The shape of the built-in model (default [`builtin::default_model`]).
    #[serde(default)]
    pub builtin_model: Option<LlamaConfig>,
    /// `"builtin"` (the synthetic facts of [`builtin::corpus`]) or a JSONL file of `{"text"}` or
    /// `{"prompt", "completion"}` records.
    pub data: String,
    /// Adapter methods, by the names of [`crate::adapters::variants`]: any method whose factor is
    /// `alpha` over a function of the rank (`lora`, `dora`, `lora-xs`, ...); one without such a
    /// factor (`vera`) is refused.
    pub methods: Vec<String>,
    /// Adapter ranks.
    pub ranks: Vec<usize>,
    /// Scaling strategies: `alpha-r`, `alpha-sqrt-r`, `fixed:<s>`, `alpha-pow:<p>` (`alpha / r^p`).
    /// [`Sweep::with_strategy`] adds strategies written in Rust.
    pub scalings: Vec<String>,
    /// Learning rates.
    pub learning_rates: Vec<f64>,
    /// The `alpha` of every cell.
    pub alpha: f64,
    /// Target modules of the adapters.
    pub targets: Vec<String>,
    /// Optimizer steps per cell.
    pub steps: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Tokens per sequence (text is packed into blocks of this length).
    pub seq_len: usize,
    /// Held-out sequences for the eval loss (taken from the end of the data).
    pub eval_examples: usize,
    /// `constant` (default) or `cosine` (10% warmup, to a tenth of the rate).
    #[serde(default = "constant")]
    pub schedule: String,
    /// Clip the global gradient norm (default: no clipping, which would mask the effect).
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    /// Magnitude-prune this fraction of every base linear weight before fine-tuning (RoRA's
    /// pruned-model setting).
    #[serde(default)]
    pub prune: Option<f64>,
    /// Seed of the built-in model and data, the adapter init and the data order.
    #[serde(default)]
    pub seed: u64,
}

fn constant() -> String {
    "constant".into()
}

/// The most parameters the sweep's random built-in model may have (2^30, 4 GiB in f32).
const MAX_BUILTIN_PARAMS: u128 = 1 << 30;
/// The most tokens a sweep's batch may have (2^24).
const MAX_BATCH_TOKENS: u128 = 1 << 24;

impl SweepConfig {
    /// The embedded default.
    pub fn builtin_default() -> Self {
        Self::from_json(DEFAULT_CONFIG, Path::new("<embedded default>")).expect("the embedded config is valid")
    }

    /// Reads a config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    fn from_json(text: &str, path: &Path) -> Result<Self> {
        let c: Self = serde_json::from_str(text)
            .map_err(|e| Error::Config { path: path.to_path_buf(), reason: e.to_string() })?;
        c.validate().map_err(|e| match e {
            // The built-in model's shape came from this file: say so.
            Error::ModelConfig { path: None, field, reason } => {
                Error::ModelConfig { path: Some(path.to_path_buf()), field, reason }
            }
            e => e,
        })?;
        Ok(c)
    }

    /// Checks the grid, the training settings and the shape of the built-in model (see
    /// [`LlamaConfig::validate`]; its errors name the field as `builtin_model.<field>`).
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: &str| Err(Error::config(field, reason));
        if let Some(model) = &self.builtin_model {
            model.check(None, &|field| format!("builtin_model.{field}"))?;
            // Embeddings and head, and per layer at most 4 hidden x hidden attention matrices and
            // 3 hidden x intermediate MLP ones.
            let (h, i) = (model.hidden_size as u128, model.intermediate_size as u128);
            let params = 2 * model.vocab_size as u128 * h + model.num_hidden_layers as u128 * (4 * h * h + 3 * h * i);
            if params > MAX_BUILTIN_PARAMS {
                return Err(Error::config(
                    "builtin_model",
                    format!(
                        "about {params} parameters, more than the {MAX_BUILTIN_PARAMS} a random model of the sweep \
                         may have (4 GiB in f32); sweep a real model with `model` instead"
                    ),
                ));
            }
        }
        if self.methods.is_empty() || self.ranks.is_empty() || self.learning_rates.is_empty() {
            return bad("methods/ranks/learning_rates", "each axis of the grid needs at least one value");
        }
        if self.ranks.contains(&0) {
            return bad("ranks", "ranks must be at least 1");
        }
        if self.learning_rates.iter().any(|&lr| !(lr.is_finite() && lr > 0.0)) {
            return bad("learning_rates", "learning rates must be positive");
        }
        if self.steps == 0 || self.batch_size == 0 || self.seq_len < 2 {
            return bad("steps", "steps and batch_size must be at least 1 and seq_len at least 2");
        }
        if (self.batch_size as u128) * (self.seq_len as u128) > MAX_BATCH_TOKENS {
            return bad(
                "batch_size",
                &format!(
                    "batch_size {} x seq_len {} tokens per batch; expected at most {MAX_BATCH_TOKENS}",
                    self.batch_size, self.seq_len
                ),
            );
        }
        if let Some(p) = self.prune.filter(|p| !(0.0..1.0).contains(p)) {
            return bad("prune", &format!("the pruned fraction must be in [0, 1), not {p}"));
        }
        for m in &self.methods {
            method_config(m, 8, 16.0, &[], Arc::new(Standard))?;
        }
        for s in &self.scalings {
            parse_scaling(s)?;
        }
        self.lr_schedule(1.0)?;
        Ok(())
    }

    /// The learning-rate schedule of a cell trained at `lr`: `constant`, or `cosine` (a tenth of
    /// the steps of warmup, then down to `lr / 10`).
    fn lr_schedule(&self, lr: f64) -> Result<LrSchedule> {
        match self.schedule.as_str() {
            "constant" => Ok(LrSchedule::Constant { lr }),
            "cosine" => {
                Ok(LrSchedule::WarmupCosine { lr, warmup: self.steps / 10, total: self.steps, min_lr: lr / 10.0 })
            }
            other => {
                Err(Error::config("schedule", format!("unknown schedule \"{other}\"; expected constant or cosine")))
            }
        }
    }
}

/// A scaling strategy from its config name.
pub fn parse_scaling(name: &str) -> Result<Scaling> {
    let number = |s: &str| s.parse::<f64>().ok().filter(|v| v.is_finite());
    match name {
        "alpha-r" => Ok(Arc::new(Standard)),
        "alpha-sqrt-r" => Ok(Arc::new(RankStabilized)),
        _ => match (name.strip_prefix("fixed:").map(number), name.strip_prefix("alpha-pow:").map(number)) {
            (Some(Some(s)), _) => Ok(Arc::new(Fixed(s))),
            (_, Some(Some(p))) => Ok(Arc::new(AlphaOverRankPower(p))),
            _ => Err(Error::config(
                "scalings",
                format!("unknown scaling {name:?} (alpha-r, alpha-sqrt-r, fixed:<s>, alpha-pow:<p>)"),
            )),
        },
    }
}

/// `alpha / r^p`: between LoRA (`p = 1`) and rsLoRA (`p = 0.5`) and beyond.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlphaOverRankPower(pub f64);

impl ScalingStrategy for AlphaOverRankPower {
    fn name(&self) -> String {
        format!("alpha/r^{}", self.0)
    }
    fn scale(&self, alpha: f64, rank: usize) -> f64 {
        alpha / (rank as f64).powf(self.0)
    }
    fn is_rank_stabilized(&self) -> bool {
        self.0 == 0.5
    }
}

/// The adapter config of one cell: the registry's method `method` with rank `r`, `alpha` and
/// the cell's scaling strategy (a method without a rank-dependent factor is refused).
fn method_config(method: &str, r: usize, alpha: f64, targets: &[&str], scaling: Scaling) -> Result<AdapterConfig> {
    let params = MethodParams {
        alpha: Some(alpha),
        scaling: Some(scaling),
        ..MethodParams::new(r, TargetConfig::list(targets))
    };
    AdapterConfig::for_method(method, &params).map_err(|e| Error::config("methods", e.to_string()))
}

/// A sweep ready to run.
#[derive(Debug, Clone)]
pub struct Sweep {
    config: SweepConfig,
    strategies: Vec<Scaling>,
    device: Device,
    progress: bool,
}

/// The data of a sweep: training and held-out sequences and the padding id.
struct Data {
    train: Vec<Example>,
    eval: Vec<Example>,
    pad: u32,
}

impl Sweep {
    /// A sweep of `config` on `device`, with the config's scaling strategies.
    pub fn new(config: SweepConfig, device: Device) -> Result<Self> {
        config.validate()?;
        let strategies = config.scalings.iter().map(|s| parse_scaling(s)).collect::<Result<_>>()?;
        Ok(Self { config, strategies, device, progress: false })
    }

    /// Adds a scaling strategy of one's own to the grid.
    pub fn with_strategy(mut self, strategy: impl ScalingStrategy + 'static) -> Self {
        self.strategies.push(Arc::new(strategy));
        self
    }

    /// Shows a progress bar over all steps of all cells.
    pub fn with_progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    /// The config.
    pub fn config(&self) -> &SweepConfig {
        &self.config
    }

    /// Runs every cell not yet recorded in `output/cells.jsonl`, then writes the CSV files and
    /// plots of all cells. Returns every cell's result, in grid order.
    pub fn run(&self, output: &Path) -> Result<Vec<CellResult>> {
        if self.strategies.is_empty() {
            return Err(Error::config("scalings", "the grid has no scaling strategy"));
        }
        let c = &self.config;
        std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
        self.check_same_sweep(output)?;
        for file in ["cells.jsonl", "steps.jsonl"] {
            report::drop_partial_line(&output.join(file))?;
        }
        let done = read_cells(output)?;
        let done_keys: BTreeSet<String> = done.iter().map(|r| r.key.clone()).collect();
        report::keep_steps_of(output, &done_keys)?;

        let grid = self.grid();
        let todo: Vec<&Cell> = grid.iter().filter(|cell| !done_keys.contains(&cell.key())).collect();
        if !todo.is_empty() {
            let (mut model, data) = self.load()?;
            let bar = if self.progress {
                let bar = indicatif::ProgressBar::new((todo.len() * c.steps) as u64);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar
            } else {
                indicatif::ProgressBar::hidden()
            };
            for cell in todo {
                let (result, steps, back) = self.run_cell(cell, model, &data, &bar)?;
                model = back;
                report::append_jsonl(&output.join("steps.jsonl"), &steps)?;
                report::append_jsonl(&output.join("cells.jsonl"), std::slice::from_ref(&result))?;
            }
            bar.finish_and_clear();
        }
        let mut cells = read_cells(output)?;
        let order: Vec<String> = grid.iter().map(|c| c.key()).collect();
        cells.retain(|r| order.contains(&r.key));
        cells.sort_by_key(|r| order.iter().position(|k| k == &r.key));
        write_reports(output, &cells)?;
        Ok(cells)
    }

    /// Refuses to mix two different sweeps in one directory.
    fn check_same_sweep(&self, output: &Path) -> Result<()> {
        let path = output.join("sweep_config.json");
        let mut recorded = serde_json::to_value(&self.config)?;
        let names: Vec<String> = self.strategies.iter().map(|s| s.name()).collect();
        recorded["strategy_names"] = serde_json::json!(names);
        let json = serde_json::to_string_pretty(&recorded)?;
        if let Ok(existing) = std::fs::read_to_string(&path) {
            let existing: serde_json::Value = serde_json::from_str(&existing)
                .map_err(|e| Error::Config { path: path.clone(), reason: e.to_string() })?;
            // A different grid may extend a sweep; different training settings may not.
            let settings = |v: &serde_json::Value| {
                let mut v = v.clone();
                for axis in ["methods", "ranks", "scalings", "learning_rates", "strategy_names"] {
                    v.as_object_mut().map(|o| o.remove(axis));
                }
                v
            };
            if settings(&existing) != settings(&recorded) {
                return Err(Error::Config {
                    path,
                    reason: "the output directory holds a sweep with other training settings: use another --output"
                        .into(),
                });
            }
        }
        write_atomic(&path, json.as_bytes())
    }

    fn grid(&self) -> Vec<Cell> {
        let c = &self.config;
        let mut cells = Vec::new();
        for &lr in &c.learning_rates {
            for method in &c.methods {
                for scaling in &self.strategies {
                    for &rank in &c.ranks {
                        cells.push(Cell { method: method.clone(), rank, scaling: scaling.clone(), lr });
                    }
                }
            }
        }
        cells
    }

    /// The base model (pruned if asked) and the data, loaded once for all cells.
    fn load(&self) -> Result<(Llama, Data)> {
        let c = &self.config;
        type Encode = Box<dyn Fn(&str) -> Result<Vec<u32>>>;
        let (mut model, encode, ends): (Llama, Encode, Ends) = if c.model == "builtin" {
            let config = c.builtin_model.clone().unwrap_or_else(builtin::default_model);
            let bytes = |s: &str| Ok(s.bytes().map(u32::from).collect());
            (Llama::random(config, c.seed, &self.device)?, Box::new(bytes), Ends::default())
        } else {
            let (model, tokenizer) = crate::models::load(Path::new(&c.model), &self.device, DType::F32)?;
            let ends = crate::tokenizer::ends(&tokenizer);
            (model, Box::new(move |s: &str| crate::tokenizer::encode(&tokenizer, s)), ends)
        };
        let records = if c.data == "builtin" {
            // Enough facts for about two epochs over the steps of a cell, plus the eval split.
            let per_line = encode(&builtin::corpus(50, c.seed))?.len() as f64 / 50.0;
            let tokens = (c.steps * c.batch_size / 2 + c.eval_examples) * c.seq_len;
            vec![Record::Text { text: builtin::corpus((tokens as f64 / per_line).ceil() as usize + 1, c.seed) }]
        } else {
            read_jsonl(Path::new(&c.data))?
        };
        let examples = to_examples(&records, &encode, ends, c.seq_len)?;
        let pad = ends.eos.unwrap_or(0);
        if let Some(fraction) = c.prune {
            prune_magnitude(&mut model, fraction)?;
        }
        if examples.len() < c.eval_examples + c.batch_size {
            return Err(Error::config(
                "data",
                format!(
                    "{} sequences of {} tokens: too few for the eval split and one batch",
                    examples.len(),
                    c.seq_len
                ),
            ));
        }
        let split = examples.len() - c.eval_examples;
        let (train, eval) = (examples[..split].to_vec(), examples[split..].to_vec());
        Ok((model, Data { train, eval, pad }))
    }

    fn run_cell(
        &self,
        cell: &Cell,
        model: Llama,
        data: &Data,
        bar: &indicatif::ProgressBar,
    ) -> Result<(CellResult, Vec<StepRecord>, Llama)> {
        let c = &self.config;
        let started = Instant::now();
        let heap_at_start = crate::alloc::live();
        crate::alloc::reset_peak();
        let targets: Vec<&str> = c.targets.iter().map(String::as_str).collect();
        let adapter = method_config(&cell.method, cell.rank, c.alpha, &targets, cell.scaling.clone())?;
        let peft = PeftModel::new(model, adapter, InitOptions { seed: c.seed, dtype: DType::F32 })?;
        let trainable_params = peft.parameter_count().trainable;
        let schedule = c.lr_schedule(cell.lr)?;
        let config = TrainConfig {
            steps: c.steps,
            batch_size: c.batch_size,
            schedule,
            max_grad_norm: c.max_grad_norm,
            seed: c.seed,
            pad_id: data.pad,
            ..Default::default()
        };
        let mut trainer = Trainer::new(peft, config)?;
        let key = cell.key();
        let (mut steps, mut train_time, mut diverged) = (Vec::new(), 0.0, None);
        bar.set_message(key.clone());
        while trainer.step() < c.steps {
            let t = Instant::now();
            match trainer.train_step(&data.train) {
                Ok(log) => {
                    train_time += t.elapsed().as_secs_f64();
                    steps.push(StepRecord {
                        cell: key.clone(),
                        step: log.step,
                        loss: log.loss,
                        mean_grad_norm: log.mean_grad_norm,
                    });
                    bar.set_message(format!("{key}  loss {:.3}", log.loss));
                    bar.inc(1);
                }
                Err(e @ Error::NonFinite { .. }) => {
                    diverged = Some(e.to_string());
                    bar.inc((c.steps - trainer.step()) as u64);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        let t = Instant::now();
        // No held-out sequences (eval_examples = 0): no eval loss, rather than a made-up 0.
        let eval_loss =
            if diverged.is_none() && !data.eval.is_empty() { Some(trainer.evaluate(&data.eval)?) } else { None };
        let eval_time = t.elapsed().as_secs_f64();
        let peak_heap_bytes = crate::alloc::peak().zip(heap_at_start).map(|(p, s)| p.saturating_sub(s));
        let model = trainer.into_peft().unload()?;

        let tail = (steps.len() / 10).max(1);
        let mean = |xs: &[StepRecord], f: fn(&StepRecord) -> f64| xs.iter().map(f).sum::<f64>() / xs.len() as f64;
        let finished = diverged.is_none() && !steps.is_empty();
        let total = started.elapsed().as_secs_f64();
        let result = CellResult {
            key,
            method: cell.method.clone(),
            rank: cell.rank,
            scaling: cell.scaling.name(),
            scale: cell.scaling.scale(c.alpha, cell.rank),
            lr: cell.lr,
            steps: steps.len(),
            final_loss: finished.then(|| mean(&steps[steps.len() - tail..], |s| s.loss)),
            eval_loss,
            first_grad_norm: steps.first().map(|s| s.mean_grad_norm),
            mean_grad_norm: (!steps.is_empty()).then(|| mean(&steps, |s| s.mean_grad_norm)),
            trainable_params,
            step_time_s: train_time / steps.len().max(1) as f64,
            peak_heap_bytes,
            harness_overhead: (total - train_time - eval_time).max(0.0) / train_time.max(1e-9),
            diverged,
        };
        Ok((result, steps, model))
    }
}

/// One point of the grid.
#[derive(Debug, Clone)]
struct Cell {
    method: String,
    rank: usize,
    scaling: Scaling,
    lr: f64,
}

impl Cell {
    fn key(&self) -> String {
        format!("{}|r={}|{}|lr={}", self.method, self.rank, self.scaling.name(), self.lr)
    }
}

/// Token sequences of at most `len` tokens: text records packed into blocks of `len`,
/// prompt/completion records one per sequence.
fn to_examples(
    records: &[Record],
    encode: &dyn Fn(&str) -> Result<Vec<u32>>,
    ends: Ends,
    len: usize,
) -> Result<Vec<Example>> {
    let (mut sequences, mut text) = (Vec::new(), Vec::new());
    for r in records {
        match r {
            Record::Text { .. } => text.push(Example::from_record(r, encode, ends, usize::MAX)?),
            Record::PromptCompletion { .. } => sequences.push(Example::from_record(r, encode, ends, len)?),
        }
    }
    sequences.extend(pack(&text, len)?);
    Ok(sequences)
}

/// Sets the smallest-magnitude `fraction` of every base linear weight (not the output layer) to
/// zero, each matrix on its own (unstructured magnitude pruning, as in RoRA's pruned setting).
pub fn prune_magnitude(model: &mut impl LinearHost, fraction: f64) -> Result<()> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(Error::config("prune", format!("the pruned fraction must be in [0, 1), not {fraction}")));
    }
    let output = model.output_layer();
    for (path, layer) in model.linears_mut() {
        if Some(&path) == output.as_ref() {
            continue;
        }
        let w = layer.weight().dense()?;
        let mut magnitudes: Vec<f32> = w.abs()?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let k = (magnitudes.len() as f64 * fraction).floor() as usize;
        if k == 0 {
            continue;
        }
        let (_, threshold, _) = magnitudes.select_nth_unstable_by(k - 1, f32::total_cmp);
        let threshold = Tensor::new(*threshold, w.device())?.to_dtype(w.dtype())?;
        let keep = w.abs()?.broadcast_gt(&threshold)?.to_dtype(w.dtype())?;
        layer.set_weight((w * keep)?)?;
    }
    Ok(())
}
