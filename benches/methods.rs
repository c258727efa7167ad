//! One training step (forward + backward) of each adapter method on a (4096, 4096) layer with
//! 512 tokens, r = 16 (VeRA and RandLoRA at PEFT's default ranks), f32, CPU: step time (criterion) and heap memory (a counting allocator),
//! printed as a table before criterion runs.
//!
//! `cargo bench --bench methods`
//!
//! `cargo bench --bench methods -- --python <venv python with torch and peft>` instead times the
//! same step side by side with PyTorch + PEFT (`benches/methods_peft.py`, same layer and configs)
//! for the methods PEFT has, and prints each method's time relative to its own library's LoRA.

use candle_core::{DType, Device, Tensor, Var};
use candle_peft::method::BuildContext;
use candle_peft::DEFAULT_ADAPTER;
use candle_peft::{
    AdaptedLinear, AdapterConfig, BaseLayer, LoraConfig, LoraInit, MeloraConfig, RandLoraConfig, VeraConfig,
};
use criterion::{BenchmarkId, Criterion};
use rand::SeedableRng;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

#[global_allocator]
static ALLOC: candle_peft::alloc::Counting = candle_peft::alloc::Counting;

const TOKENS: usize = 512;
const DIM: usize = 4096;
const RANK: usize = 16;

fn methods() -> Vec<(&'static str, AdapterConfig)> {
    let lora = || LoraConfig::lora(RANK, 2.0 * RANK as f64, &["proj"]).with_init(LoraInit::Random);
    vec![
        ("LoRA", AdapterConfig::Lora(lora())),
        ("DoRA", AdapterConfig::Lora(LoraConfig { use_dora: true, ..lora() })),
        ("BoRA", AdapterConfig::Bora(lora())),
        ("LoRA-XS", AdapterConfig::LoraXs(lora())),
        ("EDoRA", AdapterConfig::EDora(lora())),
        ("MELoRA n=4", AdapterConfig::Melora(MeloraConfig { n: 4, lora: lora() })),
        // VeRA and RandLoRA at their PEFT default ranks (VeRA needs a large shared rank).
        ("VeRA r=256", AdapterConfig::Vera(VeraConfig { init_weights: false, ..VeraConfig::new(256, &["proj"]) })),
        (
            "RandLoRA r=32",
            AdapterConfig::RandLora(RandLoraConfig { init_weights: false, ..RandLoraConfig::new(32, &["proj"]) }),
        ),
    ]
}

fn layer(w: &Tensor, config: &AdapterConfig) -> AdaptedLinear {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let shared = config.shared_tensors(&[(DIM, DIM)], DType::F32, w.device()).unwrap();
    let base = BaseLayer { weight: &candle_peft::FrozenWeight::from(w.clone()), bias: None };
    let ctx = BuildContext { path: "proj", base, dtype: DType::F32, rng: &mut rng, shared: &shared };
    let built = config.build(ctx).unwrap();
    let mut layer = AdaptedLinear::new(w.clone(), None).unwrap();
    layer.insert_adapter(DEFAULT_ADAPTER, built.adapter, built.base_weight).unwrap();
    layer.set_train(true);
    layer
}

fn step(layer: &AdaptedLinear, x: &Var) {
    let grads = layer.forward_checked(x.as_tensor()).unwrap().backward().unwrap();
    drop(grads);
}

/// The median seconds of `steps` steps after `warmup`.
fn median_step(layer: &AdaptedLinear, x: &Var, warmup: usize, steps: usize) -> f64 {
    let mut times: Vec<f64> = (0..warmup + steps)
        .map(|_| {
            let t = Instant::now();
            step(layer, x);
            t.elapsed().as_secs_f64()
        })
        .skip(warmup)
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Times the methods that PEFT has, here and in `benches/methods_peft.py`, and prints the table.
fn side_by_side(python: &str, layers: &[(&str, AdaptedLinear)], x: &Var) {
    let (warmup, steps) = (2, 10);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/methods_peft.py");
    let out = Command::new(python)
        .arg(&script)
        .args(["--steps", &steps.to_string(), "--warmup", &warmup.to_string()])
        .output()
        .expect("run the PyTorch script");
    assert!(out.status.success(), "{} failed:\n{}", script.display(), String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let theirs: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    let theirs = &theirs["seconds_per_step"];
    let ours: Vec<(&str, f64)> = layers
        .iter()
        .filter(|(name, _)| theirs.get(*name).is_some())
        .map(|(name, l)| (*name, median_step(l, x, warmup, steps)))
        .collect();
    let (our_lora, their_lora) = (ours[0].1, theirs["LoRA"].as_f64().unwrap());
    println!("\none step ({DIM}x{DIM}, {TOKENS} tokens), median of {steps}, side by side with PyTorch + PEFT:");
    println!("| method | candle-peft (ms) | PEFT (ms) | candle-peft / its LoRA | PEFT / its LoRA | speed vs PEFT |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, t) in ours {
        let p = theirs[name].as_f64().unwrap();
        println!(
            "| {name} | {:.1} | {:.1} | {:.2}x | {:.2}x | {:.2}x |",
            t * 1e3,
            p * 1e3,
            t / our_lora,
            p / their_lora,
            p / t
        );
    }
}

fn main() {
    // As the trainer, the CLI and the examples do: freed buffers are reused, not returned.
    candle_peft::train::reuse_freed_memory();
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.02, (DIM, DIM), &dev).unwrap();
    let x = Var::randn(0f32, 1., (TOKENS, DIM), &dev).unwrap();
    let layers: Vec<(&str, AdaptedLinear)> = methods().into_iter().map(|(n, c)| (n, layer(&w, &c))).collect();

    // Two figures per method, both above the resting state (weights and input excluded):
    // what autograd keeps after the forward pass (this is what adds up across the layers of a
    // model) and the peak during the whole step (forward + backward of this one layer).
    println!("heap memory of one step ({DIM}x{DIM}, {TOKENS} tokens, r={RANK}):");
    println!("| method | trainable params | kept for backward (MiB) | step peak (MiB) |");
    println!("|---|---:|---:|---:|");
    for (name, l) in &layers {
        step(l, &x); // warm up
        let live = || candle_peft::alloc::live().expect("the counting allocator is installed");
        let rest = live();
        candle_peft::alloc::reset_peak();
        let y = l.forward_checked(x.as_tensor()).unwrap();
        let kept = live() - rest;
        drop(y.backward().unwrap());
        drop(y);
        let peak = candle_peft::alloc::peak().unwrap() - rest;
        let params = l.adapter().unwrap().num_trainable();
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        println!("| {name} | {params} | {:.1} | {:.1} |", mib(kept), mib(peak));
    }

    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--python") {
        let python = args.get(i + 1).expect("--python <path of a python with torch and peft>");
        return side_by_side(python, &layers, &x);
    }

    let mut c = Criterion::default().configure_from_args().sample_size(10);
    let mut group = c.benchmark_group(format!("step {DIM}x{DIM}, {TOKENS} tokens, r={RANK}"));
    for (name, l) in &layers {
        group.bench_with_input(BenchmarkId::new("forward+backward", name), l, |b, l| b.iter(|| step(l, &x)));
    }
    group.finish();
    c.final_summary();
}
