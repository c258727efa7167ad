//! One training step (forward + backward) of each adapter method on a (4096, 4096) layer with
//! 512 tokens, r = 16 (VeRA and RandLoRA at PEFT's default ranks), f32, CPU: step time (criterion) and heap memory (a counting allocator),
//! printed as a table before criterion runs.
//!
//! `cargo bench --bench methods`

use candle_core::{DType, Device, Tensor, Var};
use candle_peft::method::BuildContext;
use candle_peft::{
    AdaptedLinear, AdapterConfig, BaseLayer, LoraConfig, LoraInit, MeloraConfig, RandLoraConfig, VeraConfig,
};
use criterion::{BenchmarkId, Criterion};
use rand::SeedableRng;

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
    let base = BaseLayer { weight: w, bias: None };
    let ctx = BuildContext { path: "proj", base, dtype: DType::F32, rng: &mut rng, shared: &shared };
    let built = config.build(ctx).unwrap();
    let mut layer = AdaptedLinear::new(w.clone(), None).unwrap();
    layer.set_adapter(built.adapter, built.base_weight).unwrap();
    layer.set_train(true);
    layer
}

fn step(layer: &AdaptedLinear, x: &Var) {
    let grads = layer.forward_checked(x.as_tensor()).unwrap().backward().unwrap();
    drop(grads);
}

fn main() {
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

    let mut c = Criterion::default().configure_from_args().sample_size(10);
    let mut group = c.benchmark_group(format!("step {DIM}x{DIM}, {TOKENS} tokens, r={RANK}"));
    for (name, l) in &layers {
        group.bench_with_input(BenchmarkId::new("forward+backward", name), l, |b, l| b.iter(|| step(l, &x)));
    }
    group.finish();
    c.final_summary();
}
