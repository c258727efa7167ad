//! Forward and forward+backward cost of a LoRA layer against its base layer (f32, CPU).
//!
//! `cargo bench --bench lora` — shapes (in, out) = (4096, 4096) and (576, 1536), 512 tokens.
//! Variants: candle_nn::Linear; the frozen base (AdaptedLinear without adapter, whose backward
//! skips the weight gradient); unmerged LoRA r=8 and r=64; merged LoRA r=8. The backward pass
//! starts from dL/dy = 1 (a contiguous tensor, as in training), with `x` requiring a gradient.

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_peft::DEFAULT_ADAPTER;
use candle_peft::{AdaptedLinear, BaseLayer, Lora, LoraInit, LoraParams};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rand::SeedableRng;

const TOKENS: usize = 512;

fn lora_layer(w: &Tensor, r: usize, merged: bool) -> AdaptedLinear {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let base = BaseLayer { weight: &candle_peft::FrozenWeight::from(w.clone()), bias: None };
    let (lora, _) = Lora::new(
        base,
        &LoraParams { r, alpha: 2.0 * r as f64, init: LoraInit::Random, ..Default::default() },
        DType::F32,
        &mut rng,
    )
    .unwrap();
    let mut layer = AdaptedLinear::new(w.clone(), None).unwrap();
    layer.insert_adapter(DEFAULT_ADAPTER, Box::new(lora), None).unwrap();
    if merged {
        layer.merge().unwrap();
    }
    layer
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    for (inp, out) in [(4096usize, 4096usize), (576, 1536)] {
        let w = Tensor::randn(0f32, 0.02, (out, inp), &dev).unwrap();
        let x = Var::randn(0f32, 1., (TOKENS, inp), &dev).unwrap();
        let variants: Vec<(&str, Box<dyn Module>)> = vec![
            ("candle_nn::Linear", Box::new(candle_nn::Linear::new(w.clone(), None))),
            ("frozen base", Box::new(AdaptedLinear::new(w.clone(), None).unwrap())),
            ("LoRA r=8", Box::new(lora_layer(&w, 8, false))),
            ("LoRA r=64", Box::new(lora_layer(&w, 64, false))),
            ("merged LoRA r=8", Box::new(lora_layer(&w, 8, true))),
        ];
        let mut group = c.benchmark_group(format!("linear {inp}x{out}, {TOKENS} tokens"));
        // Each 4096 forward is ~0.1 s: 20 samples over 20 s per variant keep the noise of a
        // shared 2-core machine down.
        group.sample_size(20).measurement_time(std::time::Duration::from_secs(20));
        for (name, layer) in &variants {
            group.bench_with_input(BenchmarkId::new("forward", name), layer, |b, l| {
                b.iter(|| l.forward(x.as_tensor()).unwrap())
            });
            group.bench_with_input(BenchmarkId::new("forward+backward", name), layer, |b, l| {
                b.iter(|| l.forward(x.as_tensor()).unwrap().backward().unwrap())
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
