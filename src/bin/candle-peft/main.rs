//! `candle-peft`: train, merge, evaluate, generate with and inspect PEFT adapters of LLaMA-family
//! models (a GGUF file or an HF model directory).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use candle_peft::chat::{ChatTemplate, Message};
use candle_peft::convert::{to_lora, LoraRank};
use candle_peft::format::{read_safetensors, CONFIG_FILE, WEIGHTS_FILE};
use candle_peft::models::{self, Llama};
use candle_peft::quantized::BaseQuant;
use candle_peft::sweep::{Sweep, SweepConfig};
use candle_peft::tokenizer::{encode, encode_sequence, ends, stop_tokens};
use candle_peft::train::data::{read_jsonl, Ends, Example, Record};
use candle_peft::train::loss::linear_cross_entropy_part;
use candle_peft::train::{latest_checkpoint, masked_cross_entropy, LrSchedule, TrainConfig, Trainer};
use candle_peft::{
    AdaptedLinear, AdapterConfig, Combination, CombineOptions, Fixed, InitOptions, LinearHost, MethodParams, PeftModel,
    RankStabilized, Standard, TargetConfig, TargetModules,
};
use clap::builder::{PossibleValue, PossibleValuesParser};
use clap::{Parser, Subcommand};
use tokenizers::Tokenizer;

#[derive(Parser)]
#[command(name = "candle-peft", version, about = "Parameter-efficient fine-tuning of LLaMA-family models on candle")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train an adapter on a JSONL data set and save it in HF PEFT's format.
    Train(Box<TrainArgs>),
    /// Merge an adapter into its base model and write an HF model directory.
    Merge {
        /// The base model: a GGUF file, an HF model directory or a Hub id (org/name[@revision]).
        #[arg(long)]
        base: PathBuf,
        /// The adapter directory (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// Where to write the merged model as an HF directory (config.json, model.safetensors,
        /// tokenizer.json).
        #[arg(long, required_unless_present = "output_gguf")]
        output: Option<PathBuf>,
        /// Where to write the merged model as a llama.cpp GGUF file (needs a GGUF base: its
        /// tokenizer and other metadata are copied): the merged weights quantized to --quant, the
        /// others as the base stores them (with --base-quant keep, the default here).
        #[arg(long)]
        output_gguf: Option<PathBuf>,
        /// The type of the GGUF file's merged weights: f32, f16, bf16, q8_0, q4_0, q4_k, ...
        #[arg(long, default_value = "q8_0")]
        quant: String,
        /// Text (JSONL, as `train` and `eval` read it) to re-quantize the merged weights against:
        /// GPTQ instead of rounding to nearest, so each merged linear's outputs on this text stay
        /// closer to the unquantized model's (--output-gguf with --quant q8_0, q5_1, q5_0, q4_1 or
        /// q4_0). A few thousand tokens of text like the model's use are enough; keep your
        /// evaluation text out of it.
        #[arg(long, requires = "output_gguf")]
        calibration: Option<PathBuf>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Convert an adapter of any method to a plain LoRA (truncated SVD of each layer's update)
    /// that runs wherever LoRA runs; prints what each layer keeps.
    Convert {
        /// The base model the adapter was trained on (GGUF file, HF directory or Hub id).
        #[arg(long)]
        base: PathBuf,
        /// The adapter directory.
        #[arg(long)]
        adapter: PathBuf,
        /// The LoRA rank of every layer.
        #[arg(long, conflicts_with = "energy", required_unless_present = "energy")]
        rank: Option<usize>,
        /// Instead of --rank: per layer, the smallest rank that keeps this share of the update's
        /// energy (e.g. 0.99).
        #[arg(long)]
        energy: Option<f64>,
        /// Where to write the LoRA adapter (PEFT format).
        #[arg(long)]
        output: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Write an adapter as a llama.cpp LoRA GGUF file (for `llama-cli --lora`, llama-server,
    /// ollama). An adapter of another method than LoRA is converted first (--rank or --energy).
    Export {
        /// The adapter directory.
        #[arg(long)]
        adapter: PathBuf,
        /// The base model the adapter was trained on (GGUF file, HF directory or Hub id): its
        /// architecture, names and head counts.
        #[arg(long)]
        base: PathBuf,
        /// Where to write the adapter GGUF file.
        #[arg(long)]
        output: PathBuf,
        /// The tensors' type (q8_0 falls back to f16 for rows that are not a multiple of 32).
        #[arg(long, default_value = "f16", value_parser = ["f32", "f16", "bf16", "q8_0"])]
        outtype: String,
        /// For a method other than LoRA: the LoRA rank of its conversion.
        #[arg(long, conflicts_with = "energy")]
        rank: Option<usize>,
        /// For a method other than LoRA: per layer, the smallest rank that keeps this share of
        /// the update's energy (e.g. 0.99).
        #[arg(long)]
        energy: Option<f64>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Combine LoRA adapters into one (PEFT's add_weighted_adapter) and write it as a PEFT
    /// adapter directory. Needs only the adapters, not their base model.
    Combine {
        /// An adapter and its weight, `DIR:WEIGHT` (e.g. `math:0.7`; the weight may be negative).
        /// Repeat for each adapter.
        #[arg(long = "adapter", required = true, value_name = "DIR:WEIGHT")]
        adapters: Vec<String>,
        /// How to combine them.
        #[arg(long = "type", default_value = "svd", value_parser = PossibleValuesParser::new(
            Combination::ALL.map(|c| PossibleValue::new(c.name()))))]
        combination: String,
        /// The share of entries that pruning keeps, in [0, 1] (ties, dare_*, magnitude_prune*).
        #[arg(long)]
        density: Option<f64>,
        /// The rank of an svd combination (default: the largest rank combined).
        #[arg(long)]
        svd_rank: Option<usize>,
        /// Clamp an svd combination's factors at this quantile of their entries, in (0, 1].
        #[arg(long)]
        svd_clamp: Option<f64>,
        /// How ties and dare_ties elect an entry's sign.
        #[arg(long, default_value = "total", value_parser = ["total", "frequency"])]
        majority_sign: String,
        /// The seed of DARE's random masks.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Where to write the combined adapter (PEFT format).
        #[arg(long)]
        output: PathBuf,
    },
    /// Mean token loss and perplexity on a data set (labels = input ids, as transformers).
    Eval {
        /// The model: a GGUF file, an HF model directory or a Hub id (org/name[@revision]).
        #[arg(long)]
        model: PathBuf,
        /// An adapter to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// JSONL data ({"prompt", "completion"} records are read as their concatenation).
        #[arg(long)]
        data: PathBuf,
        /// The most tokens of a record (one forward pass each); a longer record is an error.
        #[arg(long, default_value_t = 8192)]
        max_len: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Greedy generation from a prompt.
    Generate {
        /// The model: a GGUF file, an HF model directory or a Hub id (org/name[@revision]).
        #[arg(long)]
        model: PathBuf,
        /// An adapter to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The prompt.
        #[arg(long)]
        prompt: String,
        /// Tokens to generate.
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// Wrap the prompt in the model's chat template (as a user turn).
        #[arg(long)]
        chat: bool,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Compare scaling strategies across ranks: a grid of methods x ranks x scalings x learning
    /// rates, each cell trained on the same base model, data order and seed (resumable).
    Sweep {
        /// A sweep config (JSON; see configs/). Default: the embedded one (built-in model and
        /// data, ranks 4 to 256, alpha/r and alpha/sqrt(r)).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Output directory: cells/steps as JSONL and CSV, PNG plots. Rerun to resume.
        #[arg(long)]
        output: PathBuf,
        /// Magnitude-prune this fraction of every base linear weight first (overrides the config).
        #[arg(long)]
        prune: Option<f64>,
        /// auto, cpu, cuda, cuda:N or metal.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Describe an adapter directory: method, rank, targets, parameters, keys.
    Inspect {
        /// The adapter directory.
        dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    device: String,
    /// The compute dtype of the model: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// How the frozen base is held: none (dequantized to --dtype), keep (a GGUF's own quantized
    /// types, QLoRA), or a type to quantize it to on load (q8_0, q4_0, q4_k, ...). Default: none;
    /// keep for `merge` of a GGUF base, so that the weights the adapter leaves alone are written
    /// back as they were stored.
    #[arg(long)]
    base_quant: Option<BaseQuant>,
}

impl RunArgs {
    /// The model at `path` (GGUF file or HF directory) and its tokenizer, as these flags say.
    fn load(&self, path: &Path, device: &Device, dtype: DType) -> anyhow_like::Result<(Llama, Tokenizer)> {
        Ok(models::load_quantized(path, device, dtype, self.base_quant.unwrap_or_default())?)
    }

    fn open(&self) -> anyhow_like::Result<(Device, DType)> {
        let device = candle_peft::device(&self.device)?;
        let dtype = match self.dtype.as_str() {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            other => return Err(format!("unknown --dtype {other} (f32, bf16, f16)").into()),
        };
        // candle's bf16 element-wise ops on the CPU convert 8 values per call of a function
        // unless the build targets a CPU with AVX512-BF16 (`-C target-cpu=native` on one).
        if device.is_cpu() && dtype == DType::BF16 && !cfg!(target_feature = "avx512bf16") {
            tracing::warn!(
                "--dtype bf16 on the CPU is slow in this build: candle's bf16 element-wise ops are several times \
                 slower than f32's unless compiled for a CPU with AVX512-BF16, and a training step takes about \
                 1.5-2x as long as in f32. On such a CPU, build with RUSTFLAGS=\"-C target-cpu=native\" (and \
                 --features mkl for MKL's bf16 matrix products); or use --dtype f32 --base-quant bf16, which holds \
                 the frozen base in bf16 as well and computes in f32, at about f32's speed"
            );
        }
        Ok((device, dtype))
    }
}

/// `--method`'s values: every method of the registry, with what it writes in PEFT's format.
fn methods() -> PossibleValuesParser {
    PossibleValuesParser::new(
        candle_peft::adapters::variants()
            .into_iter()
            .map(|v| PossibleValue::new(v.name).help(format!("{} [PEFT: {}]", v.summary, v.peft))),
    )
}

/// A `--set FIELD=VALUE` pair; the value is read as JSON when it parses (`4`, `true`,
/// `"x"`), else as a string (`gaussian`).
fn field_value(s: &str) -> Result<(String, serde_json::Value), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("`{s}`: expected FIELD=VALUE, e.g. n=4"))?;
    let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
    Ok((k.trim().to_string(), value))
}

#[derive(clap::Args)]
struct TrainArgs {
    /// The model: a GGUF file, an HF model directory or a Hub id (org/name[@revision]).
    #[arg(long)]
    model: PathBuf,
    /// JSONL training data: {"prompt", "completion"} or {"text"} per line.
    #[arg(long)]
    data: PathBuf,
    /// JSONL evaluation data.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Output directory: checkpoints, metrics.jsonl and the final adapter (in `adapter/`).
    #[arg(long)]
    output: PathBuf,
    /// The adapter method.
    #[arg(long, default_value = "lora", value_parser = methods())]
    method: String,
    /// Rank (VeRA: the shared rank; MELoRA: the equivalent rank).
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Alpha of the scaling factor (default 2 * rank).
    #[arg(long)]
    alpha: Option<f64>,
    /// Scaling strategy: alpha-r, alpha-sqrt-r or fixed:<s> (default: the method's).
    #[arg(long)]
    scaling: Option<String>,
    /// Comma-separated target modules, or all-linear.
    #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")]
    targets: String,
    /// Any other field of the method's PEFT config, by its PEFT name: `--set lora_dropout=0.05`,
    /// `--set n=8` (MELoRA's minis), `--set init_lora_weights=gaussian`. Repeatable.
    #[arg(long = "set", value_name = "FIELD=VALUE", value_parser = field_value)]
    set: Vec<(String, serde_json::Value)>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Learning-rate schedule: cosine (with 10% warmup) or constant.
    #[arg(long, default_value = "cosine")]
    schedule: String,
    /// Activation checkpointing: keep only each decoder layer's input and recompute its
    /// activations in the backward pass (less memory, about one more forward pass of compute;
    /// needs an adapter without dropout).
    #[arg(long)]
    checkpoint_activations: bool,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Micro-batches per step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Truncate examples to this many tokens.
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// Evaluate and checkpoint every N steps.
    #[arg(long, default_value_t = 50)]
    every: usize,
    /// Seed of the adapter init and the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from a checkpoint directory, or from `latest`: the newest checkpoint in
    /// --output (a start from step 0 when there is none yet, so that a job restarted after a
    /// kill can always pass it).
    #[arg(long, value_name = "DIR|latest")]
    resume: Option<PathBuf>,
    /// Skip up to N steps whose loss or gradient is NaN or infinite (a warning each, no update)
    /// instead of stopping at the first.
    #[arg(long, value_name = "N", default_value_t = 0)]
    skip_nonfinite: usize,
    /// Format {"prompt", "completion"} records with the model's chat template: auto (when the
    /// model has one) or none.
    #[arg(long, default_value = "auto")]
    chat_template: String,
    #[command(flatten)]
    run: RunArgs,
}

/// A boxed error for the binary.
mod anyhow_like {
    pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;
}

#[global_allocator]
static ALLOC: candle_peft::alloc::Counting = candle_peft::alloc::Counting;

fn main() {
    // Output into a closed pipe (`candle-peft inspect dir | head`) ends the program quietly, as
    // it does other command-line tools, rather than panicking inside `println!`.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // The library's warnings (an adapter_config.json field PEFT does not know, ...) on stderr.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .without_time()
        .with_target(false)
        .init();
    candle_peft::train::reuse_freed_memory();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow_like::Result<()> {
    match cli.command {
        Command::Train(args) => train(*args),
        Command::Convert { base, adapter, rank, energy, output, run } => {
            let rank = match (rank, energy) {
                (Some(k), _) => LoraRank::Fixed(k),
                (None, Some(e)) => LoraRank::Energy(e),
                (None, None) => return Err("give --rank or --energy".into()),
            };
            let (device, dtype) = run.open()?;
            let quant = run.base_quant.unwrap_or_default();
            let model = models::load_model(&models::resolve(&base)?, &device, dtype, quant)?;
            let peft = PeftModel::from_pretrained(model, &adapter, dtype)?;
            let converted = to_lora(&peft, rank)?;
            println!("{:<48} {:>5} {:>9} {:>8} {:>10}", "module", "rank", "of rank", "energy", "rel. error");
            for l in &converted.layers {
                println!(
                    "{:<48} {:>5} {:>9} {:>8.4} {:>10.2e}",
                    l.module, l.rank, l.full_rank, l.energy, l.relative_error
                );
            }
            let worst = converted.layers.iter().map(|l| l.relative_error).fold(0.0, f64::max);
            converted.save(&output)?;
            println!(
                "{} adapter converted to LoRA ({} layers, largest relative error {worst:.2e}), written to {}",
                peft.config().method_name(),
                converted.layers.len(),
                output.display()
            );
            Ok(())
        }
        Command::Export { adapter, base, output, outtype, rank, energy, run } => {
            let (device, dtype) = run.open()?;
            let quant = run.base_quant.unwrap_or_default();
            let model = models::load_model(&models::resolve(&base)?, &device, dtype, quant)?;
            let peft = PeftModel::from_pretrained(model, &adapter, dtype)?;
            let outtype = match outtype.as_str() {
                "f32" => GgmlDType::F32,
                "bf16" => GgmlDType::BF16,
                "q8_0" => GgmlDType::Q8_0,
                _ => GgmlDType::F16,
            };
            let conversion = match (rank, energy) {
                (Some(k), _) => Some(to_lora(&peft, LoraRank::Fixed(k))?),
                (None, Some(e)) => Some(to_lora(&peft, LoraRank::Energy(e))?),
                (None, None) => None,
            };
            let (factors, alpha) = match (&conversion, peft.config()) {
                // Scaling 1 and lora_alpha = r: any alpha is folded exactly; r keeps B as is.
                (Some(c), _) => (c.factors()?, c.config.to_peft_json()?["lora_alpha"].as_f64().unwrap_or(1.0)),
                (None, AdapterConfig::Lora(c)) if !c.use_dora => {
                    (candle_peft::convert::lora_factors(&peft, candle_peft::DEFAULT_ADAPTER, "export")?, c.lora_alpha)
                }
                (None, other) => {
                    return Err(format!(
                        "{} is a {} adapter; llama.cpp runs LoRA adapters: give --rank or --energy to convert it \
                         (e.g. --energy 0.99)",
                        adapter.display(),
                        other.method_name()
                    )
                    .into())
                }
            };
            if let Some(c) = &conversion {
                let worst = c.layers.iter().map(|l| l.relative_error).fold(0.0, f64::max);
                println!(
                    "{} adapter converted to LoRA ({} layers, largest relative error {worst:.2e})",
                    peft.config().method_name(),
                    c.layers.len()
                );
            }
            let saved = peft.model().save_lora_gguf(&factors, alpha, outtype, &output)?;
            for f in &saved.fallbacks {
                eprintln!("note: {f}: the rows' length is not a multiple of the type's block");
            }
            println!("{} adapted tensors written to {} for llama.cpp", saved.tensors, output.display());
            Ok(())
        }
        Command::Combine { adapters, combination, density, svd_rank, svd_clamp, majority_sign, seed, output } => {
            let mut sources = Vec::new();
            for spec in &adapters {
                let (dir, weight) = spec
                    .rsplit_once(':')
                    .and_then(|(d, w)| Some((PathBuf::from(d), w.parse::<f64>().ok()?)))
                    .ok_or_else(|| format!("--adapter {spec}: expected DIR:WEIGHT, e.g. ./math:0.7"))?;
                sources.push((dir, weight));
            }
            let dirs: Vec<&Path> = sources.iter().map(|(d, _)| d.as_path()).collect();
            let host = candle_peft::combine::lora_shapes_host(&dirs, &candle_core::Device::Cpu)?;
            let names: Vec<String> = (0..sources.len()).map(|i| format!("source{i}")).collect();
            let mut peft = PeftModel::from_pretrained(host, dirs[0], DType::F32)?;
            for (i, dir) in dirs.iter().enumerate().skip(1) {
                peft.load_adapter(dir, &names[i], DType::F32)?;
            }
            let name_of = |i: usize| if i == 0 { candle_peft::DEFAULT_ADAPTER } else { names[i].as_str() };
            let weighted: Vec<(&str, f64)> = sources.iter().enumerate().map(|(i, (_, w))| (name_of(i), *w)).collect();
            let opts = CombineOptions {
                combination: combination.parse()?,
                svd_rank,
                svd_clamp,
                density,
                majority_sign: majority_sign.parse()?,
                seed,
            };
            peft.add_weighted_adapter(&weighted, "combined", &opts)?;
            peft.save_adapter("combined", &output)?;
            let rank = peft.adapter_config("combined")?.to_peft_json()?["r"].clone();
            let layers = peft.adapted_modules_of("combined")?.len();
            println!(
                "{} adapters combined by {combination} into a rank-{rank} LoRA of {layers} layers, written to {}",
                sources.len(),
                output.display()
            );
            Ok(())
        }
        Command::Merge { base, adapter, output, output_gguf, quant, calibration, run } => {
            let (device, dtype) = run.open()?;
            let base = models::resolve(&base)?;
            let quant = match quant.parse::<BaseQuant>()? {
                BaseQuant::To(t) => t,
                _ => return Err(format!("--quant {quant}: expected a type such as q8_0, q4_k or f16").into()),
            };
            // The tokenizer travels with the model: tokenizer.json from a directory (if it has
            // one), or the one a GGUF file describes (with the rest of its metadata).
            let (model, tokenizer, meta) = if base.is_dir() {
                let tokenizer = Some(base.join("tokenizer.json")).filter(|p| p.exists());
                (
                    Llama::from_hf_dir_quantized(&base, &device, dtype, run.base_quant.unwrap_or_default())?,
                    tokenizer.map(|p| candle_peft::tokenizer::from_file(&p)).transpose()?,
                    None,
                )
            } else {
                let (model, meta) =
                    Llama::from_gguf_quantized(&base, &device, dtype, run.base_quant.unwrap_or(BaseQuant::Keep))?;
                (model, Some(candle_peft::tokenizer::from_gguf(&meta)?), Some(meta))
            };
            if output_gguf.is_some() && meta.is_none() {
                return Err(format!(
                    "--output-gguf needs a GGUF base, whose tokenizer and metadata the file copies; {} is an HF \
                     directory: write an HF directory with --output",
                    base.display()
                )
                .into());
            }
            if calibration.is_some() {
                candle_peft::gptq::check_type(quant).map_err(|e| format!("--calibration: {e}"))?;
            }
            let mut peft = PeftModel::from_pretrained(model, &adapter, dtype)?;
            // The inputs of every linear the file will hold quantized from dense values (the
            // merged ones; all of them on a dense base), as the unmerged model computes them.
            let mut grams = BTreeMap::new();
            if let Some(data) = &calibration {
                let tokenizer = tokenizer.as_ref().ok_or("--calibration needs the model's tokenizer")?;
                let records = read_jsonl(data)?;
                let will_quantize = |_: &str, l: &AdaptedLinear| l.has_adapters() || l.weight().as_dense().is_some();
                // The output head runs only when it records (its logits are as large as the
                // record times the vocabulary).
                let head = peft.model().output_layer();
                let head_records = peft
                    .model()
                    .linears()
                    .into_iter()
                    .any(|(p, l)| head.as_deref() == Some(p.as_str()) && will_quantize(&p, l));
                let (ran, recorded) = peft.record_input_grams(will_quantize, |m| {
                    Ok(for_each_record(tokenizer, &records, (data, 8192, None), &device, |input, _| {
                        if head_records {
                            m.forward(input)?;
                        } else {
                            m.final_hidden_states(input)?;
                        }
                        Ok(())
                    }))
                })?;
                let tokens = ran.map_err(|e| format!("--calibration {}: {e}", data.display()))?;
                eprintln!("calibration: {tokens} tokens of {} through {} linears", data.display(), recorded.len());
                if quant != GgmlDType::Q8_0 {
                    eprintln!(
                        "warning: GPTQ at 4-5 bits fits its compensation to the calibration text's inputs: give it \
                         plenty of text like the model's use. On SmolLM2, 3.4k tokens of one kind of text improved \
                         q4_0 on more of that kind and made it worse than rounding to nearest on other text (README)"
                    );
                }
                grams = recorded;
            }
            peft.merge()?;
            if let Some(output) = &output {
                peft.model().save_hf_dir(output)?;
                if let Some(tokenizer) = &tokenizer {
                    candle_peft::tokenizer::save_with_model(tokenizer, &base, output)?;
                }
                println!("merged model written to {}", output.display());
            }
            if let (Some(path), Some(meta)) = (&output_gguf, &meta) {
                let saved = peft.model().save_gguf_calibrated(path, quant, meta, &grams)?;
                if !saved.calibrated.is_empty() {
                    // Both errors are 0 where rounding is exact.
                    let ratio = |c: &candle_peft::models::Calibrated| match c.nearest_error {
                        0.0 => 1.0,
                        nearest => c.error / nearest,
                    };
                    let mut ratios: Vec<f64> = saved.calibrated.iter().map(ratio).collect();
                    ratios.sort_by(f64::total_cmp);
                    eprintln!(
                        "GPTQ: {} weights quantized against the calibration text; their output error there is \
                         {:.2}x round-to-nearest's (median; {:.2}x to {:.2}x)",
                        ratios.len(),
                        ratios[ratios.len() / 2],
                        ratios[0],
                        ratios[ratios.len() - 1]
                    );
                }
                if !saved.copied.is_empty() {
                    eprintln!(
                        "{} weights the adapter does not change were copied as the base stores them",
                        saved.copied.len()
                    );
                }
                if !matches!(quant, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
                    eprintln!(
                        "warning: the merged weights are re-quantized to {} for {}: this loses precision (the \
                         adapter's update is rounded with the base); --quant f16 or f32 keeps it",
                        candle_peft::quantized::type_name(quant),
                        path.display()
                    );
                }
                if !saved.fallbacks.is_empty() {
                    eprintln!(
                        "warning: {} tensors have rows that {}'s blocks do not divide and were written as: {}",
                        saved.fallbacks.len(),
                        candle_peft::quantized::type_name(quant),
                        saved.fallbacks.join(", ")
                    );
                }
                println!("merged model written to {}", path.display());
            }
            Ok(())
        }
        Command::Eval { model, adapter, data, max_len, json, run } => {
            if max_len < 2 {
                return Err(format!("--max-len {max_len}: expected at least 2 (a token and the next one)").into());
            }
            let (device, dtype) = run.open()?;
            let model = models::resolve(&model)?;
            let (lm, tokenizer) = load_with_adapter(&run, &model, adapter.as_deref(), &device, dtype)?;
            let records = read_jsonl(&data)?;
            let (loss, tokens) = eval_loss(lm.model(), &tokenizer, &records, (&data, max_len), &device)?;
            if json {
                println!("{}", serde_json::json!({"loss": loss, "perplexity": loss.exp(), "tokens": tokens}));
            } else {
                println!("loss {loss:.4}  perplexity {:.3}  ({tokens} predicted tokens)", loss.exp());
            }
            Ok(())
        }
        Command::Generate { model, adapter, prompt, max_new_tokens, chat, run } => {
            let (device, dtype) = run.open()?;
            let model = models::resolve(&model)?;
            let prompt = if chat {
                let template = ChatTemplate::from_model(&model)?.ok_or("--chat: the model has no chat template")?;
                template.render(&[Message::new("user", &prompt)], true)?
            } else {
                prompt
            };
            let (lm, tokenizer) = load_with_adapter(&run, &model, adapter.as_deref(), &device, dtype)?;
            let lm = lm.model();
            let ids = encode_sequence(&tokenizer, &prompt)?;
            let new = lm.generate_greedy(&ids, max_new_tokens, &stop_tokens(&tokenizer))?;
            println!("{}", tokenizer.decode(&new, true).map_err(|e| e.to_string())?);
            Ok(())
        }
        Command::Inspect { dir } => inspect(&dir),
        Command::Sweep { config, output, prune, device } => {
            let mut config = match config {
                Some(path) => SweepConfig::from_file(&path)?,
                None => SweepConfig::builtin_default(),
            };
            if prune.is_some() {
                config.prune = prune;
            }
            let cells = Sweep::new(config, candle_peft::device(&device)?)?.with_progress(true).run(&output)?;
            println!("{}", candle_peft::sweep::summary_table(&cells));
            println!("results in {} (cells.csv, steps.csv, *.png)", output.display());
            Ok(())
        }
    }
}

/// A model, bare or with an adapter.
enum Lm {
    Plain(Box<Llama>),
    Adapted(Box<PeftModel<Llama>>),
}

impl Lm {
    fn model(&self) -> &Llama {
        match self {
            Lm::Plain(m) => m,
            Lm::Adapted(p) => p.model(),
        }
    }
}

/// Loads a model, its tokenizer and, if given, an adapter on it.
fn load_with_adapter(
    run: &RunArgs,
    path: &Path,
    adapter: Option<&Path>,
    device: &Device,
    dtype: DType,
) -> anyhow_like::Result<(Lm, Tokenizer)> {
    let (model, tokenizer) = run.load(path, device, dtype)?;
    let lm = match adapter {
        None => Lm::Plain(Box::new(model)),
        Some(a) => Lm::Adapted(Box::new(PeftModel::from_pretrained(model, a, dtype)?)),
    };
    Ok((lm, tokenizer))
}

/// Runs `f` on the token ids `(1, t)` of every record of the file `data` (prompt and completion
/// joined; records of fewer than two tokens skipped, more than `max_len` an error that names the
/// `flag` setting it, if one does) and returns how many next tokens they predict.
fn for_each_record(
    tokenizer: &Tokenizer,
    records: &[Record],
    (data, max_len, flag): (&Path, usize, Option<&str>),
    device: &Device,
    mut f: impl FnMut(&Tensor, &[u32]) -> anyhow_like::Result<()>,
) -> anyhow_like::Result<usize> {
    let mut count = 0usize;
    for (i, r) in records.iter().enumerate() {
        let text = match r {
            Record::PromptCompletion { prompt, completion } => format!("{prompt}{completion}"),
            Record::Text { text } => text.clone(),
        };
        let ids = encode_sequence(tokenizer, &text)?;
        if ids.len() < 2 {
            continue;
        }
        if ids.len() > max_len {
            let limit = match flag {
                Some(flag) => format!("{flag} {max_len}: split it, or raise {flag}"),
                None => format!("{max_len}: split it"),
            };
            return Err(format!(
                "record {} of {} has {} tokens, more than {limit} (one forward pass holds all of a record's \
                 activations)",
                i + 1,
                data.display(),
                ids.len()
            )
            .into());
        }
        f(&Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?, &ids)?;
        count += ids.len() - 1;
    }
    if count == 0 {
        return Err(format!("{} has no record of two or more tokens", data.display()).into());
    }
    Ok(count)
}

/// Token-weighted mean next-token loss over every record's tokens (labels = input ids), for the
/// records of the file `data`, each of at most `max_len` tokens. With a frozen output projection
/// (no adapter on it, no soft-capping) the loss comes from the final hidden states a block of
/// positions at a time, so a long record never holds its whole `(tokens, vocab)` logits.
fn eval_loss(
    lm: &Llama,
    tokenizer: &Tokenizer,
    records: &[Record],
    (data, max_len): (&Path, usize),
    device: &Device,
) -> anyhow_like::Result<(f64, usize)> {
    let mut sum = 0f64;
    let count = for_each_record(tokenizer, records, (data, max_len, Some("--max-len")), device, |input, ids| {
        let n = ids.len() - 1;
        let labels: Vec<i64> = ids[1..].iter().map(|&t| t as i64).collect();
        let labels = Tensor::new(labels.as_slice(), device)?;
        let loss = match lm.frozen_head() {
            Some(head) => {
                let h = lm.final_hidden_states(input)?.narrow(0, 0, n)?;
                linear_cross_entropy_part(&h, head, &labels, n)?
            }
            None => masked_cross_entropy(&lm.forward(input)?.squeeze(0)?.narrow(0, 0, n)?, &labels)?,
        };
        sum += loss.to_scalar::<f32>()? as f64 * n as f64;
        Ok(())
    })?;
    Ok((sum / count as f64, count))
}

fn adapter_config(args: &TrainArgs) -> anyhow_like::Result<AdapterConfig> {
    let target_modules = if args.targets.trim() == "all-linear" {
        TargetModules::Regex("all-linear".into())
    } else {
        TargetModules::List(
            args.targets.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect(),
        )
    };
    let target = TargetConfig { target_modules: Some(target_modules), ..Default::default() };
    let scaling: Option<candle_peft::scaling::Scaling> = match args.scaling.as_deref() {
        None => None,
        Some("alpha-r") => Some(Arc::new(Standard)),
        Some("alpha-sqrt-r") => Some(Arc::new(RankStabilized)),
        Some(s) => match s.strip_prefix("fixed:").map(str::parse::<f64>) {
            Some(Ok(v)) => Some(Arc::new(Fixed(v))),
            _ => return Err(format!("unknown --scaling {s} (alpha-r, alpha-sqrt-r, fixed:<s>)").into()),
        },
    };
    let params = MethodParams {
        alpha: args.alpha,
        scaling,
        options: args.set.iter().cloned().collect(),
        ..MethodParams::new(args.rank, target)
    };
    Ok(AdapterConfig::for_method(&args.method, &params)?)
}

/// The flags of `train` that need no file, checked before anything is loaded: an error names the
/// flag as the user typed it.
fn check_train_args(args: &TrainArgs) -> anyhow_like::Result<()> {
    let counts = [
        ("--every", args.every, "evaluate and checkpoint every N steps"),
        ("--batch-size", args.batch_size, "examples per micro-batch"),
        ("--grad-accum", args.grad_accum, "micro-batches per optimizer step"),
    ];
    for (flag, value, what) in counts {
        if value == 0 {
            return Err(format!("{flag} 0: expected at least 1 ({what})").into());
        }
    }
    if args.max_len < 2 {
        return Err(format!(
            "--max-len {}: expected at least 2 (a token and the next one that the model learns to predict)",
            args.max_len
        )
        .into());
    }
    if !["auto", "none"].contains(&args.chat_template.as_str()) {
        return Err(format!("unknown --chat-template {} (auto, none)", args.chat_template).into());
    }
    Ok(())
}

fn train(args: TrainArgs) -> anyhow_like::Result<()> {
    check_train_args(&args)?;
    let schedule = match args.schedule.as_str() {
        "constant" => LrSchedule::Constant { lr: args.lr },
        "cosine" => {
            LrSchedule::WarmupCosine { lr: args.lr, warmup: args.steps / 10, total: args.steps, min_lr: args.lr / 10.0 }
        }
        other => return Err(format!("unknown --schedule {other} (cosine, constant)").into()),
    };
    // The adapter config is checked before the model is loaded, so a bad --method / --set /
    // --scaling fails at once.
    let adapter_config = adapter_config(&args)?;
    let (device, dtype) = args.run.open()?;
    let model_path = models::resolve(&args.model)?;
    let (model, tokenizer) = args.run.load(&model_path, &device, dtype)?;
    let ends = ends(&tokenizer);
    let enc = |s: &str| encode(&tokenizer, s);
    let template = match args.chat_template.as_str() {
        "auto" => ChatTemplate::from_model(&model_path)?,
        "none" => None,
        other => return Err(format!("unknown --chat-template {other} (auto, none)").into()),
    };
    if let Some(t) = &template {
        println!(
            "prompt/completion records formatted with the model's chat template, e.g.\n{}",
            t.render(&[Message::new("user", "<prompt>")], true)?
        );
    }
    let to_examples = |path: &Path| -> anyhow_like::Result<Vec<Example>> {
        Ok(read_jsonl(path)?
            .iter()
            .map(|r| match (&template, r) {
                // The template ends the assistant turn itself.
                (Some(t), Record::PromptCompletion { .. }) => {
                    Example::from_record(&r.with_chat_template(t)?, &enc, Ends { eos: None, ..ends }, args.max_len)
                }
                _ => Example::from_record(r, &enc, ends, args.max_len),
            })
            .collect::<candle_peft::Result<_>>()?)
    };
    let data = to_examples(&args.data)?;
    let eval = args.eval_data.as_deref().map(to_examples).transpose()?;
    let peft = PeftModel::new(model, adapter_config, InitOptions { seed: args.seed, dtype: DType::F32 })?;
    println!("{}", peft.parameter_count());
    let config = TrainConfig {
        steps: args.steps,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        schedule,
        eval_every: Some(args.every),
        checkpoint_every: Some(args.every),
        output_dir: Some(args.output.clone()),
        seed: args.seed,
        pad_id: ends.eos.unwrap_or(0),
        progress: true,
        checkpoint_activations: args.checkpoint_activations,
        skip_nonfinite: args.skip_nonfinite,
        ..Default::default()
    };
    let resume = match &args.resume {
        Some(dir) if dir.as_os_str() == "latest" => {
            let found = latest_checkpoint(&args.output)?;
            match &found {
                Some(ckpt) => println!("resuming from {}", ckpt.display()),
                None => println!("no checkpoint in {} yet: training starts at step 0", args.output.display()),
            }
            found
        }
        other => other.clone(),
    };
    let mut trainer = match &resume {
        Some(ckpt) => Trainer::resume(peft, config, ckpt)?,
        None => Trainer::new(peft, config)?,
    };
    trainer.train(&data, eval.as_deref())?;
    let adapter = args.output.join("adapter");
    candle_peft::format::remove_interrupted_writes(&adapter)?;
    trainer.into_peft().save_pretrained(&adapter)?;
    println!("adapter saved to {}", adapter.display());
    Ok(())
}

fn inspect(dir: &Path) -> anyhow_like::Result<()> {
    let config = AdapterConfig::from_file(&dir.join(CONFIG_FILE))?;
    let tensors = read_safetensors(&dir.join(WEIGHTS_FILE), &Device::Cpu)?;
    // An adapted module's path is the longest key prefix that the config targets.
    let output = Some("lm_head");
    let mut modules = BTreeMap::<String, usize>::new();
    for (k, t) in &tensors {
        let Some(rest) = k.strip_prefix("base_model.model.") else { continue };
        let mut module = None;
        for (i, _) in rest.match_indices('.') {
            if config.target().matches(&rest[..i], output)? {
                module = Some(&rest[..i]);
            }
        }
        *modules.entry(module.unwrap_or(rest).to_string()).or_default() += t.elem_count();
    }
    println!("method: {} ({})", config.peft_type(), config.method_name());
    let json = serde_json::to_value(&config)?;
    let targeting = serde_json::to_value(config.target())?;
    for (field, value) in json.as_object().into_iter().flatten() {
        let own = field != "peft_type" && targeting.get(field).is_none();
        if own && !value.is_null() && value != &serde_json::json!({}) {
            println!("{field}: {value}");
        }
    }
    println!("target_modules: {}", json["target_modules"]);
    println!("adapted modules: {}", modules.len());
    println!("parameters: {}", tensors.values().map(|t| t.elem_count()).sum::<usize>());
    println!("keys:");
    for (k, t) in &tensors {
        println!("  {k} {:?} {:?}", t.dims(), t.dtype());
    }
    // PEFT's multi-adapter layout keeps the adapters other than "default" in subdirectories.
    let others: Vec<String> = candle_peft::format::named_adapter_dirs(dir)?.into_iter().map(|(name, _)| name).collect();
    if !others.is_empty() {
        println!(
            "other adapters in this directory (PEFT's multi-adapter layout): {}; inspect each as {}/<name>",
            others.join(", "),
            dir.display()
        );
    }
    Ok(())
}
