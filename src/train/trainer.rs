//! The training loop: gradient accumulation, global-norm clipping, a learning-rate schedule,
//! AdamW, evaluation, atomic checkpoints with optimizer state, resume, a NaN / inf guard, a
//! progress bar, per-step metrics as JSONL and (feature `plot`) a loss-curve PNG.

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::data::{batch_indices, collate, Example};
use super::loss::{counted_labels, linear_cross_entropy_part, masked_cross_entropy_part};
use super::optim::{clip_to, grad_norms, AdamW, AdamWConfig};
use super::schedule::LrSchedule;
use crate::format::{read_safetensors, remove_interrupted_writes, write_atomic, write_safetensors, WEIGHTS_FILE};
use crate::models::Llama;
use crate::peft_model::{LinearHost, PeftModel};
use crate::{Error, Result};

/// A model that maps token ids `(b, t)` to next-token logits `(b, t, vocab)`.
pub trait CausalLm: LinearHost {
    /// The logits.
    fn logits(&self, ids: &Tensor) -> Result<Tensor>;

    /// The mean token loss's part from the positions of `ids: (b, t)` against `labels`
    /// (`b * t`, flattened), of a mean over `count` counted labels in all (see
    /// [`masked_cross_entropy_part`]). By default the loss of [`Self::logits`]; a model may
    /// compute it without them.
    fn token_loss(&self, ids: &Tensor, labels: &Tensor, count: usize) -> Result<Tensor> {
        let logits = self.logits(ids)?;
        masked_cross_entropy_part(&logits.flatten_to(1)?, &labels.flatten_all()?, count)
    }

    /// The loss and the gradients of the trainable tensors, computed with activation
    /// checkpointing ([`TrainConfig::checkpoint_activations`]); `loss(logits, range)` is the
    /// part of the loss from the positions `range` (see [`Llama::checkpointed_loss_and_grads`]). By default an error: a model
    /// opts in by implementing it.
    fn checkpointed_loss_and_grads(
        &self,
        ids: &Tensor,
        loss: &dyn Fn(&Tensor, Range<usize>) -> Result<Tensor>,
    ) -> Result<(Tensor, GradStore)> {
        let _ = (ids, loss);
        Err(Error::Unsupported("activation checkpointing for this model".into()))
    }
}

impl CausalLm for Llama {
    fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward(ids)
    }

    /// With a frozen output projection ([`Llama::frozen_head`]), from the last hidden states a
    /// block of positions at a time ([`linear_cross_entropy_part`]).
    fn token_loss(&self, ids: &Tensor, labels: &Tensor, count: usize) -> Result<Tensor> {
        match self.frozen_head() {
            Some(weight) => {
                linear_cross_entropy_part(&self.final_hidden_states(ids)?, weight, &labels.flatten_all()?, count)
            }
            None => masked_cross_entropy_part(&self.logits(ids)?.flatten_to(1)?, &labels.flatten_all()?, count),
        }
    }

    fn checkpointed_loss_and_grads(
        &self,
        ids: &Tensor,
        loss: &dyn Fn(&Tensor, Range<usize>) -> Result<Tensor>,
    ) -> Result<(Tensor, GradStore)> {
        Llama::checkpointed_loss_and_grads(self, ids, loss)
    }
}

/// How to train.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// The learning rate per step.
    pub schedule: LrSchedule,
    /// AdamW's settings (weight decay applies to matrices, not to vectors such as magnitudes).
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this value.
    pub max_grad_norm: Option<f64>,
    /// Evaluate every this many steps (and at the end).
    pub eval_every: Option<usize>,
    /// Write a checkpoint every this many steps (and at the end), into `output_dir`.
    pub checkpoint_every: Option<usize>,
    /// Where checkpoints and `metrics.jsonl` go.
    pub output_dir: Option<PathBuf>,
    /// Seed of the data order.
    pub seed: u64,
    /// The padding token id.
    pub pad_id: u32,
    /// Show a progress bar.
    pub progress: bool,
    /// Activation checkpointing: keep only each decoder layer's input in the forward pass and
    /// recompute its activations in the backward pass (less memory, about one more forward pass
    /// of compute; see [`Llama::checkpointed_loss_and_grads`]). Needs adapters without dropout.
    pub checkpoint_activations: bool,
    /// How many steps whose loss or gradient is NaN or infinite training skips (a warning each,
    /// no update, the step logged as `skipped`) before it stops with [`Error::NonFinite`], as
    /// mixed-precision trainers skip overflowed steps. 0 (the default) stops at the first.
    pub skip_nonfinite: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 100,
            batch_size: 4,
            grad_accum: 1,
            schedule: LrSchedule::Constant { lr: 1e-3 },
            adamw: AdamWConfig::default(),
            max_grad_norm: Some(1.0),
            eval_every: None,
            checkpoint_every: None,
            output_dir: None,
            seed: 0,
            pad_id: 0,
            progress: false,
            checkpoint_activations: false,
            skip_nonfinite: 0,
        }
    }
}

impl TrainConfig {
    /// Checks the settings: `steps`, `batch_size`, `grad_accum`, `eval_every` and
    /// `checkpoint_every` of at least 1, a positive `max_grad_norm`, the learning rates
    /// ([`LrSchedule::validate`]) and AdamW's settings ([`AdamWConfig::validate`]). The error
    /// names the field.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::config("steps", "0 optimizer steps; expected at least 1 (nothing would be trained)"));
        }
        self.schedule.validate()?;
        self.adamw.validate()?;
        if self.batch_size == 0 {
            return Err(Error::config("batch_size", "0 examples per micro-batch; expected at least 1"));
        }
        if self.grad_accum == 0 {
            return Err(Error::config(
                "grad_accum",
                "0 micro-batches per optimizer step; expected at least 1 (1 accumulates nothing)",
            ));
        }
        if self.eval_every == Some(0) {
            return Err(Error::config(
                "eval_every",
                "0 steps; expected at least 1 (evaluate every N steps), or None not to evaluate",
            ));
        }
        if self.checkpoint_every == Some(0) {
            return Err(Error::config(
                "checkpoint_every",
                "0 steps; expected at least 1 (checkpoint every N steps), or None to checkpoint only at the end",
            ));
        }
        if let Some(max) = self.max_grad_norm.filter(|m| !(m.is_finite() && *m > 0.0)) {
            return Err(Error::config(
                "max_grad_norm",
                format!("{max}; expected a positive number to clip the gradient norm to, or None not to clip"),
            ));
        }
        Ok(())
    }
}

/// One optimizer step's record (a line of `metrics.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    /// The step (1-based).
    pub step: usize,
    /// Mean token loss over the step's micro-batches (NaN, `null` in JSON, on a skipped step).
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    /// The learning rate used.
    pub lr: f64,
    /// The global gradient norm before clipping (NaN on a skipped step).
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    /// The mean over the adapter's parameter tensors of their gradient's L2 norm, before
    /// clipping (what rsLoRA's analysis tracks as the rank grows).
    #[serde(default, deserialize_with = "nan_if_null")]
    pub mean_grad_norm: f64,
    /// Tokens processed (padding excluded from the loss, included here).
    pub tokens: usize,
    /// Tokens per second of this step.
    pub tokens_per_s: f64,
    /// The evaluation loss, on steps that evaluate.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    /// The step met a NaN or infinite loss or gradient and made no update
    /// ([`TrainConfig::skip_nonfinite`]).
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub skipped: bool,
}

/// A number that JSON holds as `null` when it is NaN or infinite (as serde_json writes them).
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// A step's accumulated gradients (clipped) and what its log reports.
struct StepGradients {
    grads: GradStore,
    loss: f64,
    tokens: usize,
    grad_norm: f64,
    mean_grad_norm: f64,
}

/// A NaN or infinite value met in a step: what it was, and its value.
struct Fault {
    what: String,
    value: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    peft_type: String,
    history: Vec<StepLog>,
    /// The adapters trained (the model's active ones): the first in the checkpoint directory,
    /// the others in `<checkpoint>/<name>/`. Absent in checkpoints from before named adapters:
    /// the one adapter in the directory.
    #[serde(default)]
    adapters: Vec<String>,
}

/// Trains the adapters of a [`PeftModel`].
#[derive(Debug)]
pub struct Trainer<M: CausalLm> {
    peft: PeftModel<M>,
    vars: Vec<Var>,
    /// The PEFT names of `vars`.
    names: Vec<String>,
    opt: AdamW,
    config: TrainConfig,
    step: usize,
    history: Vec<StepLog>,
    last_checkpoint: Option<PathBuf>,
}

impl<M: CausalLm> Trainer<M> {
    /// A trainer for `peft`'s trainable variables. Errors when `config` does not pass
    /// [`TrainConfig::validate`].
    pub fn new(mut peft: PeftModel<M>, config: TrainConfig) -> Result<Self> {
        config.validate()?;
        peft.set_train(true);
        let named = peft.named_trainable_vars()?;
        let vars = named.iter().map(|(_, v)| v.clone()).collect();
        let names = named.iter().map(|(k, _)| k.clone()).collect();
        let groups = named.into_iter().map(|(k, v)| (k, v.clone(), v.rank() >= 2)).collect();
        let opt = AdamW::new(groups, config.adamw)?;
        Ok(Self { peft, vars, names, opt, config, step: 0, history: Vec::new(), last_checkpoint: None })
    }

    /// A trainer that continues from a checkpoint directory written by [`Trainer::save_checkpoint`]
    /// for the same model and adapter config: adapter weights, optimizer state, step and history.
    pub fn resume(peft: PeftModel<M>, config: TrainConfig, checkpoint: &Path) -> Result<Self> {
        let mut t = Self::new(peft, config)?;
        let state_path = checkpoint.join(STATE_FILE);
        let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let state: TrainerState = serde_json::from_str(&text)
            .map_err(|e| Error::Config { path: state_path.clone(), reason: e.to_string() })?;
        if state.peft_type != t.peft.config().peft_type() {
            return Err(Error::Unsupported(format!(
                "checkpoint {} is of method {}, not {}",
                checkpoint.display(),
                state.peft_type,
                t.peft.config().peft_type()
            )));
        }
        let active = t.peft.active_adapters().to_vec();
        if state.adapters.is_empty() {
            t.peft.load_weights(&checkpoint.join(WEIGHTS_FILE))?;
        } else if state.adapters != active {
            return Err(Error::Unsupported(format!(
                "checkpoint {} trained the adapters [{}], and the model's active adapters are [{}]: activate the same \
                 ones (PeftModel::set_adapters) before resuming",
                checkpoint.display(),
                state.adapters.join(", "),
                active.join(", ")
            )));
        } else {
            for (i, name) in active.iter().enumerate() {
                let dir = if i == 0 { checkpoint.to_path_buf() } else { checkpoint.join(name) };
                t.peft.load_adapter_weights(name, &dir.join(WEIGHTS_FILE))?;
            }
        }
        let device = t.device();
        t.opt.load_state(&read_safetensors(&checkpoint.join(OPTIMIZER_FILE), &device)?)?;
        t.step = state.step;
        t.history = state.history;
        t.last_checkpoint = Some(checkpoint.to_path_buf());
        Ok(t)
    }

    fn device(&self) -> Device {
        self.vars.first().map(|v| v.device().clone()).unwrap_or(Device::Cpu)
    }

    /// The model being trained.
    pub fn peft(&self) -> &PeftModel<M> {
        &self.peft
    }

    /// The model being trained, mutably.
    pub fn peft_mut(&mut self) -> &mut PeftModel<M> {
        &mut self.peft
    }

    /// Ends training and returns the model (in evaluation mode).
    pub fn into_peft(mut self) -> PeftModel<M> {
        self.peft.set_train(false);
        self.peft
    }

    /// Steps taken so far.
    pub fn step(&self) -> usize {
        self.step
    }

    /// Every step's record so far.
    pub fn history(&self) -> &[StepLog] {
        &self.history
    }

    fn batch_loss(&self, examples: &[&Example]) -> Result<(Tensor, usize)> {
        let batch = collate(examples, self.config.pad_id, &self.device())?;
        // From the logits: the blocked loss of `token_loss` would also compute the gradient of the
        // hidden states, which an evaluation does not need.
        let logits = self.peft.model().logits(&batch.ids)?.flatten_to(1)?;
        let loss = masked_cross_entropy_part(&logits, &batch.labels.flatten_all()?, counted_labels(&batch.labels)?)?;
        Ok((loss, batch.ids.elem_count()))
    }

    /// The loss of a micro-batch, divided by `scale`, and its gradients: by one backward pass
    /// through the whole graph, or layer by layer with activation checkpointing.
    fn batch_grads(&self, examples: &[&Example], scale: f64) -> Result<(f64, usize, GradStore)> {
        let batch = collate(examples, self.config.pad_id, &self.device())?;
        let model = self.peft.model();
        let (loss, grads) = if self.config.checkpoint_activations {
            let labels = batch.labels.flatten_all()?;
            let count = counted_labels(&labels)?;
            let part = |logits: &Tensor, rows: Range<usize>| -> Result<Tensor> {
                let labels = labels.narrow(0, rows.start, rows.len())?;
                Ok((masked_cross_entropy_part(logits, &labels, count)? / scale)?)
            };
            model.checkpointed_loss_and_grads(&batch.ids, &part)?
        } else {
            let loss = (model.token_loss(&batch.ids, &batch.labels, counted_labels(&batch.labels)?)? / scale)?;
            let grads = loss.backward()?;
            (loss, grads)
        };
        let value = loss.to_scalar::<f32>()? as f64 * scale;
        Ok((value, batch.ids.elem_count(), grads))
    }

    /// One optimizer step over `grad_accum` micro-batches of `data`. Errors when `data` is empty,
    /// and with [`Error::NonFinite`] when a loss or a gradient is NaN or infinite, unless
    /// [`TrainConfig::skip_nonfinite`] allows skipping the step (a warning, and a [`StepLog`]
    /// marked `skipped`).
    pub fn train_step(&mut self, data: &[Example]) -> Result<StepLog> {
        let started = Instant::now();
        check_not_empty("training data", data)?;
        let lr = self.config.schedule.at(self.step);
        let step = match self.step_gradients(data)? {
            Ok(step) => step,
            Err(fault) => {
                let skipped = self.skipped_steps() + 1;
                if skipped > self.config.skip_nonfinite {
                    return Err(self.non_finite(fault));
                }
                tracing::warn!(
                    "step {}: the {} is {}; the step is skipped, no update ({skipped} of the {} that \
                     skip_nonfinite allows)",
                    self.step + 1,
                    fault.what,
                    fault.value,
                    self.config.skip_nonfinite
                );
                return Ok(self.record(StepLog {
                    step: self.step + 1,
                    loss: f64::NAN,
                    lr,
                    grad_norm: f64::NAN,
                    mean_grad_norm: f64::NAN,
                    tokens: 0,
                    tokens_per_s: 0.0,
                    eval_loss: None,
                    skipped: true,
                }));
            }
        };
        self.opt.step(&step.grads, lr)?;
        let seconds = started.elapsed().as_secs_f64();
        Ok(self.record(StepLog {
            step: self.step + 1,
            loss: step.loss,
            lr,
            grad_norm: step.grad_norm,
            mean_grad_norm: step.mean_grad_norm,
            tokens: step.tokens,
            tokens_per_s: step.tokens as f64 / seconds.max(1e-9),
            eval_loss: None,
            skipped: false,
        }))
    }

    /// Counts the step taken and records its log.
    fn record(&mut self, log: StepLog) -> StepLog {
        self.step += 1;
        self.history.push(log.clone());
        log
    }

    /// The steps skipped so far (NaN or infinite values; [`TrainConfig::skip_nonfinite`]).
    pub fn skipped_steps(&self) -> usize {
        self.history.iter().filter(|l| l.skipped).count()
    }

    /// The accumulated, clipped gradients of this step's micro-batches, or the first NaN or
    /// infinite value met: a micro-batch's loss (naming its examples) or a tensor's gradient.
    fn step_gradients(&self, data: &[Example]) -> Result<std::result::Result<StepGradients, Fault>> {
        let c = &self.config;
        let mut total: Option<GradStore> = None;
        let (mut loss_sum, mut tokens) = (0f64, 0usize);
        for micro in 0..c.grad_accum {
            let idx = batch_indices(data.len(), c.batch_size, self.step * c.grad_accum + micro, c.seed)?;
            let examples: Vec<&Example> = idx.iter().map(|&i| &data[i]).collect();
            let (value, n, grads) = self.batch_grads(&examples, c.grad_accum as f64)?;
            if !value.is_finite() {
                let what = format!("loss of the training examples {idx:?} (0-based, in the data's order)");
                return Ok(Err(Fault { what, value }));
            }
            loss_sum += value;
            tokens += n;
            total = Some(match total {
                None => grads,
                Some(mut acc) => {
                    for v in &self.vars {
                        if let (Some(a), Some(g)) = (acc.get(v.as_tensor()), grads.get(v.as_tensor())) {
                            let sum = (a + g)?;
                            acc.insert(v.as_tensor(), sum);
                        }
                    }
                    acc
                }
            });
        }
        let mut grads =
            total.ok_or_else(|| Error::config("grad_accum", "0 micro-batches per step; expected at least 1"))?;
        let norms = grad_norms(&grads, &self.vars)?;
        if let Some(i) = norms.iter().position(|n| !n.is_finite()) {
            return Ok(Err(Fault { what: format!("gradient norm of {}", self.names[i]), value: norms[i] }));
        }
        let mean_grad_norm = norms.iter().sum::<f64>() / norms.len().max(1) as f64;
        let grad_norm = clip_to(&mut grads, &self.vars, &norms, c.max_grad_norm.unwrap_or(f64::INFINITY))?;
        if !grad_norm.is_finite() {
            return Ok(Err(Fault { what: "global gradient norm".into(), value: grad_norm }));
        }
        let loss = loss_sum / c.grad_accum as f64;
        Ok(Ok(StepGradients { grads, loss, tokens, grad_norm, mean_grad_norm }))
    }

    fn non_finite(&self, fault: Fault) -> Error {
        Error::NonFinite {
            step: self.step + 1,
            what: fault.what,
            value: fault.value,
            last_checkpoint: self.last_checkpoint.clone(),
        }
    }

    /// The mean token loss over `data` (in batches of `batch_size`, evaluation mode). Errors when
    /// `data` is empty.
    pub fn evaluate(&mut self, data: &[Example]) -> Result<f64> {
        check_not_empty("evaluation data", data)?;
        self.peft.set_train(false);
        let result = (|| {
            let (mut sum, mut count) = (0f64, 0usize);
            for chunk in data.chunks(self.config.batch_size) {
                let refs: Vec<&Example> = chunk.iter().collect();
                let batch = collate(&refs, self.config.pad_id, &self.device())?;
                let (loss, _) = self.batch_loss(&refs)?;
                sum += loss.to_scalar::<f32>()? as f64 * batch.target_tokens as f64;
                count += batch.target_tokens;
            }
            Ok(sum / count.max(1) as f64)
        })();
        self.peft.set_train(true);
        result
    }

    /// Trains until `steps` steps are done, evaluating, checkpointing and logging as configured.
    /// Errors before the first step when `data` or `eval` is empty (pass `None` not to evaluate).
    /// In `output_dir`, what an interrupted checkpoint save left is removed first.
    pub fn train(&mut self, data: &[Example], eval: Option<&[Example]>) -> Result<()> {
        check_not_empty("training data", data)?;
        if let Some(eval) = eval {
            check_not_empty("evaluation data", eval)?;
        }
        let c = self.config.clone();
        let bar = if c.progress {
            let bar = indicatif::ProgressBar::new(c.steps as u64);
            let template = "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}";
            bar.set_style(
                indicatif::ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_position(self.step as u64);
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        if let Some(dir) = &c.output_dir {
            clean_interrupted_saves(dir)?;
            // A fresh run starts a fresh log; a resumed one drops what came after its checkpoint.
            self.trim_metrics(&dir.join("metrics.jsonl"))?;
        }
        while self.step < c.steps {
            let mut log = self.train_step(data)?;
            let last = self.step == c.steps;
            if let (Some(every), Some(eval)) = (c.eval_every, eval) {
                if self.step % every == 0 || last {
                    log.eval_loss = Some(self.evaluate(eval)?);
                    if let Some(recorded) = self.history.last_mut() {
                        *recorded = log.clone();
                    }
                }
            }
            bar.set_message(format!("loss {:.4}  {:.0} tok/s", log.loss, log.tokens_per_s));
            bar.inc(1);
            if let Some(dir) = &c.output_dir {
                append_jsonl(&dir.join("metrics.jsonl"), &log)?;
                if c.checkpoint_every.is_some_and(|every| self.step % every == 0) || last {
                    self.save_checkpoint(&dir.join(format!("checkpoint-{}", self.step)))?;
                    #[cfg(feature = "plot")]
                    self.plot_loss(&dir.join("loss.png"))?;
                }
            }
        }
        bar.finish();
        Ok(())
    }

    /// Writes the adapter (PEFT format), the optimizer state and the trainer state into `dir`,
    /// atomically: everything goes to a temporary directory beside it, synced to disk, that is
    /// renamed into place (the parent directory synced after). A process killed at any point
    /// leaves either the complete checkpoint or none at `dir` (and a `.checkpoint-N.tmp-*`
    /// directory that [`Trainer::train`] removes); an error (a full disk) removes the temporary
    /// directory and leaves what was at `dir`, and every earlier checkpoint, as it was.
    pub fn save_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let sibling = |kind: &str| dir.with_file_name(format!(".{name}.{kind}-{}", std::process::id()));
        let tmp = sibling("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        if let Err(e) = self.write_checkpoint_files(&tmp) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        // A checkpoint already at `dir` (the same step saved twice) moves aside until the new one
        // is in place.
        let old = sibling("old");
        let replaced = dir.exists();
        if replaced {
            if let Err(e) = std::fs::rename(dir, &old) {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(Error::io(dir, e));
            }
        }
        if let Err(e) = std::fs::rename(&tmp, dir) {
            if replaced {
                let _ = std::fs::rename(&old, dir);
            }
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(Error::io(dir, e));
        }
        crate::format::sync_dir(dir.parent().unwrap_or(Path::new("."))).map_err(|e| Error::io(dir, e))?;
        self.last_checkpoint = Some(dir.to_path_buf());
        if replaced {
            if let Err(e) = std::fs::remove_dir_all(&old) {
                tracing::warn!("{}: the replaced checkpoint could not be removed: {e}", old.display());
            }
        }
        Ok(())
    }

    /// The files of a checkpoint, into `dir` (created), synced.
    fn write_checkpoint_files(&self, dir: &Path) -> Result<()> {
        // The trained adapters: the first as a plain PEFT adapter directory, the others beside it.
        let active = self.peft.active_adapters();
        for (i, name) in active.iter().enumerate() {
            self.peft.save_adapter(name, &if i == 0 { dir.to_path_buf() } else { dir.join(name) })?;
        }
        write_safetensors(&dir.join(OPTIMIZER_FILE), &self.opt.state()?)?;
        let state = TrainerState {
            step: self.step,
            peft_type: self.peft.config().peft_type().into(),
            history: self.history.clone(),
            adapters: active.to_vec(),
        };
        let json = serde_json::to_string_pretty(&state)?;
        write_atomic(&dir.join(STATE_FILE), json.as_bytes())
    }
}

/// A checkpoint's trainer state (step, method, history).
const STATE_FILE: &str = "trainer_state.json";
/// A checkpoint's AdamW state.
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// The newest complete checkpoint in a training run's output directory: the `checkpoint-N` with
/// the largest `N` (a checkpoint is renamed into place only once all of it is written, see
/// [`Trainer::save_checkpoint`]); `None` when there is none (or no such directory). What a
/// killed save left is cleaned up first (a replaced checkpoint moved aside is put back).
pub fn latest_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    // A checkpoint that a killed re-save had moved aside counts.
    clean_interrupted_saves(output_dir)?;
    let entries = match std::fs::read_dir(output_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(output_dir, e)),
    };
    let mut newest: Option<(usize, PathBuf)> = None;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(output_dir, e))?.path();
        let step = path.file_name().and_then(|n| n.to_str()?.strip_prefix("checkpoint-")?.parse::<usize>().ok());
        if let Some(step) = step.filter(|_| path.join(STATE_FILE).is_file()) {
            if newest.as_ref().is_none_or(|(n, _)| step > *n) {
                newest = Some((step, path));
            }
        }
    }
    Ok(newest.map(|(_, p)| p))
}

/// Removes what a killed run left in `output_dir`: temporary files and directories
/// ([`remove_interrupted_writes`]), and puts back a `.checkpoint-N.old-<pid>` (a checkpoint that
/// a re-save of the same step was replacing) when the new one did not take its place.
fn clean_interrupted_saves(output_dir: &Path) -> Result<()> {
    remove_interrupted_writes(output_dir)?;
    let Ok(entries) = std::fs::read_dir(output_dir) else { return Ok(()) };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((step, _)) = name.strip_prefix(".checkpoint-").and_then(|rest| rest.split_once(".old-")) else {
            continue;
        };
        let target = output_dir.join(format!("checkpoint-{step}"));
        if target.exists() {
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        } else {
            std::fs::rename(&path, &target).map_err(|e| Error::io(&target, e))?;
        }
    }
    Ok(())
}

impl<M: CausalLm> Trainer<M> {
    /// Draws the loss curve so far (training loss, its moving average over 10 steps, and the
    /// evaluation loss) into a PNG; `train` does it at every checkpoint, as `loss.png`.
    #[cfg(feature = "plot")]
    pub fn plot_loss(&self, path: &Path) -> Result<()> {
        use crate::plot::{moving_average, LineChart, Scale, Series};
        // Skipped steps have no loss.
        let h: Vec<&StepLog> = self.history.iter().filter(|l| !l.skipped).collect();
        let raw: Vec<(f64, f64)> = h.iter().map(|l| (l.step as f64, l.loss)).collect();
        let losses: Vec<f64> = h.iter().map(|l| l.loss).collect();
        let smooth = h.iter().map(|l| l.step as f64).zip(moving_average(&losses, 10)).collect();
        let eval = h.iter().filter_map(|l| l.eval_loss.map(|e| (l.step as f64, e))).collect();
        let series = [
            Series { name: "train".into(), points: raw },
            Series { name: "train (mean of 10 steps)".into(), points: smooth },
            Series { name: "eval".into(), points: eval },
        ];
        let chart = LineChart {
            title: "Loss",
            x_label: "step",
            y_label: "token loss",
            x_scale: Scale::Linear,
            y_scale: Scale::Linear,
        };
        chart.write_png(path, &series)
    }

    fn trim_metrics(&self, path: &Path) -> Result<()> {
        let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
        let kept: String = text
            .lines()
            .filter(|l| serde_json::from_str::<StepLog>(l).is_ok_and(|s| s.step <= self.step))
            .map(|l| format!("{l}\n"))
            .collect();
        write_atomic(path, kept.as_bytes())
    }
}

/// An error naming `what` when `data` has no example.
fn check_not_empty(what: &'static str, data: &[Example]) -> Result<()> {
    if data.is_empty() {
        return Err(Error::config(what, "it has no examples; expected at least one"));
    }
    Ok(())
}

fn append_jsonl(path: &Path, log: &StepLog) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
    let line = serde_json::to_string(log)?;
    writeln!(f, "{line}").map_err(|e| Error::io(path, e))
}
