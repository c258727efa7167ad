//! Training throughput on a real model, side by side with PyTorch + PEFT running the same job:
//! SmolLM2-135M-Instruct, an adapter on all seven linears of every layer (`--method lora`: LoRA
//! r=16 alpha=32, the default; `dora`: DoRA r=16 alpha=32; `vera`: VeRA at PEFT's default r=256),
//! AdamW. By default batch 4 x 256 tokens, f32, CPU.
//!
//! ```text
//! scripts/fetch_smollm2.sh
//! cargo bench --bench train_throughput                          # candle-peft only
//! cargo bench --bench train_throughput -- --python /path/to/venv/bin/python   # and PyTorch
//! ```
//! Options: `--model <gguf | HF dir>` (default `models/SmolLM2-135M-Instruct.Q4_1.gguf`), or
//! `--random` for a randomly initialised model of SmolLM2-135M's shape (no file; both sides draw
//! their own weights; `--shape smollm2-360m | tinyllama-1.1b` for others, candle-peft's side
//! only, its 2-D weights quantized as drawn with `--base-quant <type>`); `--device cpu | cuda:N` (default cpu), `--dtype f32 | bf16` (the base
//! model's dtype; adapters, optimizer state and loss stay f32 on both sides), `--batch N`
//! (default 4), `--seq N` (default 256), `--steps N` timed steps (default 5) after `--warmup N`
//! (default 1), `--method lora | dora | vera`, `--base-quant none | keep | q8_0 | ...` (the
//! frozen base kept quantized, QLoRA; candle-peft's side only; `--base-quant bf16` holds it
//! in bf16 and computes in f32), `--python-dtype f32 | bf16` (the PyTorch side's dtype, by
//! default `--dtype`'s: `--base-quant bf16 --python-dtype bf16` compares a bf16 base on both
//! sides), `--checkpoint-activations`
//! (candle-peft's side only), `--json PATH` (a summary of both sides). The PyTorch side is
//! `benches/train_throughput_peft.py`, run as a child process after this one's steps, so the two
//! never share the device; each reports its own peak memory: peak RSS on the CPU; on a GPU the
//! device memory in use (CUDA's `mem_get_info`, sampled every 2 ms, above what was in use before
//! the model was built) here, `torch.cuda.max_memory_allocated` there (and `_reserved`).
//!
//! Before timing, one step is taken apart: forward, backward and optimizer times, and every
//! gradient that the backward pass produced, to show that none of them has the shape of a frozen
//! weight (candle's own matmul backward would compute one per linear layer).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use candle_peft::train::data::{collate, Example};
use candle_peft::train::loss::{counted_labels, masked_cross_entropy_part};
use candle_peft::train::{AdamW, AdamWConfig, CausalLm, LrSchedule, TrainConfig, Trainer};
use candle_peft::{AdapterConfig, InitOptions, LinearHost, LoraConfig, PeftModel, VeraConfig};
use rand::{Rng, SeedableRng};

const TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

/// The peak resident set size of this process (Linux), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// The cargo features this bench was built with that change its speed.
fn features() -> Vec<&'static str> {
    [("avx512", cfg!(feature = "avx512")), ("mkl", cfg!(feature = "mkl")), ("cuda", cfg!(feature = "cuda"))]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect()
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Device memory in use on a CUDA device (total minus free), in bytes; `None` elsewhere.
fn device_memory_used(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Ok(cuda) = device.as_cuda_device() {
        let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
        return Some((total - free) as u64);
    }
    let _ = device;
    None
}

/// The peak of [`device_memory_used`] while it runs, sampled every 2 ms on another thread.
struct MemorySampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MemorySampler {
    fn start(device: &Device) -> Option<Self> {
        device_memory_used(device)?;
        let (peak, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (p, s, d) = (peak.clone(), stop.clone(), device.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(used) = device_memory_used(&d) {
                    p.fetch_max(used, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Some(Self { peak, stop, thread: Some(thread) })
    }

    fn peak(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// The shapes `--random` draws a model of (their HF `config.json`s): `smollm2-135m` (the
/// default), `smollm2-360m`, `tinyllama-1.1b`.
fn shape(name: &str) -> Result<candle_peft::models::LlamaConfig, Box<dyn std::error::Error>> {
    let (hidden, inter, layers, heads, kv, vocab, tied, theta) = match name {
        "smollm2-135m" => (576, 1536, 30, 9, 3, 49152, true, 100000.0),
        "smollm2-360m" => (960, 2560, 32, 15, 5, 49152, true, 100000.0),
        "tinyllama-1.1b" => (2048, 5632, 22, 32, 4, 32000, false, 10000.0),
        other => return Err(format!("--shape {other}: expected smollm2-135m, smollm2-360m or tinyllama-1.1b").into()),
    };
    Ok(serde_json::from_value(serde_json::json!({
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "rms_norm_eps": 1e-5,
        "rope_theta": theta, "vocab_size": vocab, "tie_word_embeddings": tied, "model_type": "llama"
    }))?)
}

#[global_allocator]
static ALLOC: candle_peft::alloc::Counting = candle_peft::alloc::Counting;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let reuse = candle_peft::train::reuse_freed_memory();
    println!("malloc keeps freed memory: {reuse}");
    let args: Vec<String> = std::env::args().collect();
    let num = |name: &str, default: usize| -> Result<usize, Box<dyn std::error::Error>> {
        Ok(arg(&args, name).map(|s| s.parse()).transpose()?.unwrap_or(default))
    };
    let (steps, warmup, batch_size, seq) =
        (num("--steps", 5)?, num("--warmup", 1)?, num("--batch", 4)?, num("--seq", 256)?);
    let random = args.iter().any(|a| a == "--random");
    let model_path =
        PathBuf::from(arg(&args, "--model").unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into()));
    let device_spec = arg(&args, "--device").unwrap_or_else(|| "cpu".into());
    let device = candle_peft::device(&device_spec)?;
    let dtype_name = arg(&args, "--dtype").unwrap_or_else(|| "f32".into());
    let method = arg(&args, "--method").unwrap_or_else(|| "lora".into());
    let quant_name = arg(&args, "--base-quant").unwrap_or_else(|| "none".into());
    let base_quant: candle_peft::quantized::BaseQuant = quant_name.parse()?;
    let checkpoint = args.iter().any(|a| a == "--checkpoint-activations");
    let dtype = match dtype_name.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => return Err(format!("--dtype {other}: expected f32 or bf16").into()),
    };
    if !random && !model_path.exists() {
        return Err(format!(
            "{} not found: run scripts/fetch_smollm2.sh, pass --model, or --random",
            model_path.display()
        )
        .into());
    }

    let memory_before = device_memory_used(&device);
    let sampler = MemorySampler::start(&device);
    let shape_name = arg(&args, "--shape").unwrap_or_else(|| "smollm2-135m".into());
    let model = if random {
        candle_peft::models::Llama::random_quantized(shape(&shape_name)?, 0, &device, dtype, base_quant)?
    } else {
        candle_peft::models::load_quantized(&model_path, &device, dtype, base_quant)?.0
    };
    let source = if random { format!("random {shape_name} shape") } else { model_path.display().to_string() };
    let vocab = model.config().vocab_size;
    // Read from the shapes, not the tensors: a quantized base is never dequantized whole.
    let hidden = model.config().hidden_size;
    let frozen_shapes: BTreeSet<Vec<usize>> = model
        .linears()
        .iter()
        .map(|(_, l)| l.features())
        .chain([(hidden, vocab)])
        .flat_map(|(i, o)| [vec![o, i], vec![i, o]])
        .collect();
    let lora = LoraConfig { lora_dropout: 0.0, ..LoraConfig::lora(16, 32.0, &TARGETS) };
    let (adapter, adapter_name) = match method.as_str() {
        "lora" => (AdapterConfig::Lora(lora), "LoRA r=16 alpha=32"),
        "dora" => (AdapterConfig::Lora(LoraConfig { use_dora: true, ..lora }), "DoRA r=16 alpha=32"),
        "vera" => (AdapterConfig::Vera(VeraConfig::new(256, &TARGETS)), "VeRA r=256"),
        other => return Err(format!("--method {other}: expected lora, dora or vera").into()),
    };
    let peft = PeftModel::new(model, adapter, InitOptions { seed: 0, dtype: DType::F32 })?;
    let params = peft.parameter_count();
    let shape_json = serde_json::to_value(peft.model().config())?;
    println!(
        "{source} on {device_spec}, {dtype_name} base (--base-quant {quant_name}), checkpointing {checkpoint}, {adapter_name}, batch {batch_size} x {seq}, features {:?}: {}",
        features(),
        peft.parameter_count()
    );

    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let data: Vec<Example> = (0..batch_size * (warmup + steps))
        .map(|_| {
            let ids: Vec<u32> = (0..seq).map(|_| rng.random_range(0..vocab as u32)).collect();
            Example { labels: ids.iter().map(|&t| t as i64).collect(), ids }
        })
        .collect();

    // One step taken apart (the profile) and the check that no frozen weight gets a gradient.
    let vars = peft.trainable_vars()?;
    let mut opt = AdamW::new(
        peft.named_trainable_vars()?.into_iter().map(|(k, v)| (k, v, true)).collect(),
        AdamWConfig::default(),
    )?;
    let batch = collate(&data[..batch_size].iter().collect::<Vec<_>>(), 0, &device)?;
    let labels = batch.labels.flatten_all()?;
    let part = |logits: &candle_core::Tensor, rows: std::ops::Range<usize>| {
        let labels = labels.narrow(0, rows.start, rows.len())?;
        masked_cross_entropy_part(logits, &labels, counted_labels(&batch.labels)?)
    };
    let t0 = Instant::now();
    let (t1, loss, grads) = if checkpoint {
        // Forward and backward interleave layer by layer: timed together.
        let (loss, grads) = peft.model().checkpointed_loss_and_grads(&batch.ids, &part)?;
        (t0, loss, grads)
    } else {
        let loss = peft.model().token_loss(&batch.ids, &batch.labels, counted_labels(&batch.labels)?)?;
        loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        (t1, loss.clone(), loss.backward()?)
    };
    let t2 = Instant::now();
    opt.step(&grads, 1e-4)?;
    let t3 = Instant::now();
    let shapes: Vec<Vec<usize>> =
        grads.get_ids().filter_map(|id| grads.get_id(*id)).map(|g| g.dims().to_vec()).collect();
    let weight_shaped = shapes.iter().filter(|s| frozen_shapes.contains(*s)).count();
    let adapter_grads = vars.iter().filter(|v| grads.get(v.as_tensor()).is_some()).count();
    println!(
        "one step: forward {:.2} s, backward {:.2} s, optimizer {:.3} s; {} gradients ({} of them the {} adapter \
         matrices), {} with the shape of a frozen weight",
        (t1 - t0).as_secs_f64(),
        (t2 - t1).as_secs_f64(),
        (t3 - t2).as_secs_f64(),
        shapes.len(),
        adapter_grads,
        vars.len(),
        weight_shaped
    );
    if weight_shaped != 0 || adapter_grads != vars.len() {
        return Err("the backward pass computed a frozen weight's gradient or missed an adapter's".into());
    }
    drop((grads, loss, opt));

    let config = TrainConfig {
        steps: warmup + steps,
        batch_size,
        schedule: LrSchedule::Constant { lr: 1e-4 },
        max_grad_norm: None,
        checkpoint_activations: checkpoint,
        ..Default::default()
    };
    let mut trainer = Trainer::new(peft, config)?;
    let mut seconds = 0.0;
    let heap_before = candle_peft::alloc::live().unwrap_or(0);
    candle_peft::alloc::reset_peak();
    for step in 0..warmup + steps {
        let started = Instant::now();
        let log = trainer.train_step(&data)?;
        if step >= warmup {
            seconds += started.elapsed().as_secs_f64();
        }
        println!("step {}: loss {:.4}, {:.1} tokens/s", log.step, log.loss, log.tokens_per_s);
    }
    let ours_tps = (batch_size * seq * steps) as f64 / seconds;
    let heap_peak = candle_peft::alloc::peak().unwrap_or(0);
    println!(
        "heap: {:.2} GiB live before the training steps (model, adapter), {:.2} GiB at the steps' peak",
        gib(heap_before as u64),
        gib(heap_peak as u64)
    );
    drop(trainer);
    // Peak memory: the device's (above what was in use before the model) on a GPU, RSS on the CPU.
    let (ours_mem, mem_kind) = match (sampler, memory_before) {
        (Some(s), Some(before)) => (Some(s.peak().saturating_sub(before)), "peak device memory"),
        _ => (peak_rss(), "peak RSS"),
    };
    println!(
        "candle-peft: {:.1} tokens/s ({:.2} s/step), {mem_kind} {}",
        ours_tps,
        seconds / steps as f64,
        ours_mem.map_or("n/a".into(), |b| format!("{:.2} GiB", gib(b)))
    );
    let mut summary = serde_json::json!({
        "job": {"model": source, "device": device_spec, "dtype": dtype_name, "base_quant": quant_name, "checkpoint_activations": checkpoint, "batch": batch_size, "seq": seq,
                "steps": steps, "warmup": warmup, "adapter": format!("{adapter_name}, all seven linears"),
                "features": features()},
        "candle_peft": {"tokens_per_s": ours_tps, "seconds_per_step": seconds / steps as f64,
                        "peak_memory_bytes": ours_mem, "memory_measure": mem_kind,
                        "heap_before_steps_bytes": heap_before, "heap_peak_bytes": heap_peak,
                        "trainable_params": params.trainable, "all_params": params.all, "model_config": shape_json},
    });
    let write_summary = |summary: &serde_json::Value| -> Result<(), Box<dyn std::error::Error>> {
        if let Some(path) = arg(&args, "--json") {
            candle_peft::format::write_atomic(path.as_ref(), serde_json::to_string_pretty(summary)?.as_bytes())?;
        }
        Ok(())
    };

    if random && shape_name != "smollm2-135m" && arg(&args, "--python").is_some() {
        return Err(format!("--shape {shape_name}: the PyTorch side draws SmolLM2-135M's shape only").into());
    }
    let Some(python) = arg(&args, "--python") else {
        println!("(pass --python <venv python with torch and peft> to run PyTorch + PEFT side by side)");
        return write_summary(&summary);
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/train_throughput_peft.py");
    let mut cmd = Command::new(&python);
    cmd.arg(&script);
    if random {
        cmd.arg("--random");
    } else {
        cmd.args(["--model".as_ref(), model_path.as_os_str()]);
    }
    let torch_device = match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        _ => "cpu".into(),
    };
    let torch_dtype = arg(&args, "--python-dtype").unwrap_or_else(|| dtype_name.clone());
    cmd.args(["--device", &torch_device, "--dtype", &torch_dtype, "--method", &method]);
    cmd.args(["--batch", &batch_size.to_string(), "--seq", &seq.to_string()]);
    let out = cmd.args(["--steps", &steps.to_string(), "--warmup", &warmup.to_string()]).output()?;
    if !out.status.success() {
        return Err(format!("{} failed:\n{}", script.display(), String::from_utf8_lossy(&out.stderr)).into());
    }
    let stdout = String::from_utf8(out.stdout)?;
    let theirs: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())?;
    let their_tps = theirs["tokens_per_s"].as_f64().ok_or("no tokens_per_s from the PyTorch script")?;
    let their_mem = theirs["peak_memory_bytes"].as_u64().ok_or("no peak_memory_bytes from the PyTorch script")?;
    println!("{}: {:.1} tokens/s, {} {:.2} GiB", theirs["impl"], their_tps, theirs["memory_measure"], gib(their_mem));
    println!("| | tokens/s | peak memory (GiB) |\n|---|---:|---:|");
    println!("| PyTorch + PEFT | {their_tps:.1} | {:.2} |", gib(their_mem));
    println!("| candle-peft | {ours_tps:.1} | {} |", ours_mem.map_or("n/a".into(), |b| format!("{:.2}", gib(b))));
    let mem_ratio = ours_mem.map(|b| b as f64 / their_mem as f64);
    println!("| ratio | {:.2}x | {} |", ours_tps / their_tps, mem_ratio.map_or("n/a".into(), |r| format!("{r:.2}x")));
    summary["pytorch"] = theirs;
    summary["ratio"] = serde_json::json!({"tokens_per_s": ours_tps / their_tps, "peak_memory": mem_ratio});
    write_summary(&summary)
}
