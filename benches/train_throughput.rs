//! Training throughput on a real model, side by side with PyTorch + PEFT running the same job:
//! SmolLM2-135M-Instruct, LoRA r=16 alpha=32 on all seven linears of every layer, batch 4 x 256
//! tokens, f32, AdamW, CPU.
//!
//! ```text
//! scripts/fetch_smollm2.sh
//! cargo bench --bench train_throughput                          # candle-peft only
//! cargo bench --bench train_throughput -- --python /path/to/venv/bin/python   # and PyTorch
//! ```
//! Options: `--model <gguf | HF dir>` (default `models/SmolLM2-135M-Instruct.Q4_1.gguf`),
//! `--steps N` timed steps (default 5) after `--warmup N` (default 1). The PyTorch side is
//! `benches/train_throughput_peft.py`, run as a child process after this one's steps, so the two
//! never share the cores; each reports its own peak RSS.
//!
//! Before timing, one step is taken apart: forward, backward and optimizer times, and every
//! gradient that the backward pass produced, to show that none of them has the shape of a frozen
//! weight (candle's own matmul backward would compute one per linear layer).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device};
use candle_peft::train::data::{collate, Example};
use candle_peft::train::loss::masked_cross_entropy;
use candle_peft::train::{AdamW, AdamWConfig, CausalLm, LrSchedule, TrainConfig, Trainer};
use candle_peft::{AdapterConfig, InitOptions, LoraConfig, PeftModel};
use rand::{Rng, SeedableRng};

const BATCH: usize = 4;
const SEQ: usize = 256;
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

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let reuse = candle_peft::train::reuse_freed_memory();
    println!("malloc keeps freed memory: {reuse}");
    let args: Vec<String> = std::env::args().collect();
    let model_path =
        PathBuf::from(arg(&args, "--model").unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into()));
    let steps: usize = arg(&args, "--steps").map(|s| s.parse()).transpose()?.unwrap_or(5);
    let warmup: usize = arg(&args, "--warmup").map(|s| s.parse()).transpose()?.unwrap_or(1);
    if !model_path.exists() {
        return Err(format!("{} not found: run scripts/fetch_smollm2.sh or pass --model", model_path.display()).into());
    }

    let device = Device::Cpu;
    let (model, _) = candle_peft::models::load(&model_path, &device, DType::F32)?;
    let vocab = model.config().vocab_size;
    let frozen_shapes: BTreeSet<Vec<usize>> = model
        .tensors()
        .values()
        .filter(|t| t.rank() == 2)
        .flat_map(|t| [t.dims().to_vec(), t.dims().iter().rev().copied().collect()])
        .collect();
    let lora = LoraConfig { lora_dropout: 0.0, ..LoraConfig::lora(16, 32.0, &TARGETS) };
    let peft = PeftModel::new(model, AdapterConfig::Lora(lora), InitOptions { seed: 0, dtype: DType::F32 })?;
    println!("{model_path:?}: {}", peft.parameter_count());

    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let data: Vec<Example> = (0..BATCH * (warmup + steps))
        .map(|_| {
            let ids: Vec<u32> = (0..SEQ).map(|_| rng.random_range(0..vocab as u32)).collect();
            Example { labels: ids.iter().map(|&t| t as i64).collect(), ids }
        })
        .collect();

    // One step taken apart (the profile) and the check that no frozen weight gets a gradient.
    let vars = peft.trainable_vars()?;
    let mut opt = AdamW::new(
        peft.named_trainable_vars()?.into_iter().map(|(k, v)| (k, v, true)).collect(),
        AdamWConfig::default(),
    )?;
    let batch = collate(&data[..BATCH].iter().collect::<Vec<_>>(), 0, &device)?;
    let t0 = Instant::now();
    let logits = peft.model().logits(&batch.ids)?;
    let logits = logits.reshape((BATCH * SEQ, vocab))?;
    let loss = masked_cross_entropy(&logits, &batch.labels)?;
    loss.to_scalar::<f32>()?;
    let t1 = Instant::now();
    let grads = loss.backward()?;
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
    drop((grads, loss, logits, opt));

    let config = TrainConfig {
        steps: warmup + steps,
        batch_size: BATCH,
        schedule: LrSchedule::Constant { lr: 1e-4 },
        max_grad_norm: None,
        ..Default::default()
    };
    let mut trainer = Trainer::new(peft, config)?;
    let mut seconds = 0.0;
    for step in 0..warmup + steps {
        let started = Instant::now();
        let log = trainer.train_step(&data)?;
        if step >= warmup {
            seconds += started.elapsed().as_secs_f64();
        }
        println!("step {}: loss {:.4}, {:.1} tokens/s", log.step, log.loss, log.tokens_per_s);
    }
    let ours_tps = (BATCH * SEQ * steps) as f64 / seconds;
    let ours_rss = peak_rss();
    println!(
        "candle-peft: {:.1} tokens/s ({:.2} s/step), peak RSS {}",
        ours_tps,
        seconds / steps as f64,
        ours_rss.map_or("n/a".into(), |b| format!("{:.2} GiB", gib(b)))
    );
    drop(trainer);

    let Some(python) = arg(&args, "--python") else {
        println!("(pass --python <venv python with torch and peft> to run PyTorch + PEFT side by side)");
        return Ok(());
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/train_throughput_peft.py");
    let out = Command::new(&python)
        .arg(&script)
        .args(["--model".as_ref(), model_path.as_os_str()])
        .args(["--steps", &steps.to_string(), "--warmup", &warmup.to_string()])
        .output()?;
    if !out.status.success() {
        return Err(format!("{} failed:\n{}", script.display(), String::from_utf8_lossy(&out.stderr)).into());
    }
    let stdout = String::from_utf8(out.stdout)?;
    let theirs: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())?;
    let their_tps = theirs["tokens_per_s"].as_f64().ok_or("no tokens_per_s from the PyTorch script")?;
    let their_rss = theirs["peak_rss_bytes"].as_u64().ok_or("no peak_rss_bytes from the PyTorch script")?;
    println!("{}: {:.1} tokens/s, peak RSS {:.2} GiB", theirs["impl"], their_tps, gib(their_rss));
    println!("| | tokens/s | peak RSS (GiB) |\n|---|---:|---:|");
    println!("| PyTorch + PEFT | {their_tps:.1} | {:.2} |", gib(their_rss));
    println!("| candle-peft | {ours_tps:.1} | {} |", ours_rss.map_or("n/a".into(), |b| format!("{:.2}", gib(b))));
    println!(
        "| ratio | {:.2}x | {} |",
        ours_tps / their_tps,
        ours_rss.map_or("n/a".into(), |b| format!("{:.2}x", b as f64 / their_rss as f64))
    );
    Ok(())
}
