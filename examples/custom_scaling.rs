//! A scaling strategy of your own, plugged in without touching the crate.
//!
//! `cargo run --release --example custom_scaling [-- --output DIR]`
//!
//! Defines `s = alpha / r^p` (p = 0.75, between LoRA's p = 1 and rsLoRA's p = 0.5), fits LoRA
//! adapters of that scaling to a low-rank change of two random layers with AdamW, and saves the
//! adapter in HF PEFT's format, where the factor becomes the equivalent `lora_alpha`.

use candle_core::{DType, Module, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use candle_peft::{
    AdaptedLinear, AdapterConfig, InitOptions, LinearHost, LoraConfig, NamedLinears, PeftModel, RankStabilized,
    ScalingStrategy, Standard,
};

/// `s = alpha / r^p`.
#[derive(Debug)]
struct PowerScaling {
    p: f64,
}

impl ScalingStrategy for PowerScaling {
    fn name(&self) -> String {
        format!("alpha/r^{}", self.p)
    }
    fn scale(&self, alpha: f64, rank: usize) -> f64 {
        alpha / (rank as f64).powf(self.p)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let output = std::env::args().skip_while(|a| a != "--output").nth(1);
    let device = candle_peft::device("auto")?;

    let strategies: [&dyn ScalingStrategy; 3] = [&Standard, &RankStabilized, &PowerScaling { p: 0.75 }];
    println!("scaling factor s at alpha = 16:");
    for s in strategies {
        let row: Vec<String> = [4, 16, 64, 256].iter().map(|&r| format!("r={r}: {:.3}", s.scale(16.0, r))).collect();
        println!("  {:<14} {}", s.name(), row.join("  "));
    }

    // Two frozen layers and a target: the same layers with a rank-4 change.
    let mut base = NamedLinears::new();
    let mut targets = Vec::new();
    for (i, (inp, out)) in [(64usize, 64usize), (64, 32)].into_iter().enumerate() {
        let w = Tensor::randn(0f32, 0.1, (out, inp), &device)?;
        let u = Tensor::randn(0f32, 0.1, (out, 4), &device)?;
        let v = Tensor::randn(0f32, 0.1, (4, inp), &device)?;
        targets.push((w.clone() + u.matmul(&v)?)?);
        base.insert(format!("blocks.{i}.proj"), AdaptedLinear::new(w, None)?);
    }

    let config = LoraConfig::lora(8, 16.0, &["proj"]).with_scaling(PowerScaling { p: 0.75 });
    let peft = PeftModel::new(base, AdapterConfig::Lora(config), InitOptions { seed: 42, dtype: DType::F32 })?;
    println!("{}", peft.parameter_count());

    let mut opt =
        AdamW::new(peft.trainable_vars()?, ParamsAdamW { lr: 1e-2, weight_decay: 0.0, ..Default::default() })?;
    for step in 0..=200 {
        let x = Tensor::randn(0f32, 1., (32, 64), &device)?;
        let mut loss = Tensor::zeros((), DType::F32, &device)?;
        for ((_, layer), target) in peft.model().linears().into_iter().zip(&targets) {
            let want = x.matmul(&target.t()?)?;
            loss = (loss + (layer.forward(&x)? - want)?.sqr()?.mean_all()?)?;
        }
        if step % 50 == 0 {
            println!("step {step:>3}  mse {:.6}", loss.to_scalar::<f32>()?);
        }
        opt.backward_step(&loss)?;
    }

    let dir = match output {
        Some(d) => std::path::PathBuf::from(d),
        None => std::env::temp_dir().join("candle-peft-custom-scaling"),
    };
    peft.save_pretrained(&dir)?;
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json"))?)?;
    println!(
        "saved to {}: lora_alpha = {} (s = {:.4} at r = 8, as PEFT computes lora_alpha / r)",
        dir.display(),
        saved["lora_alpha"],
        PowerScaling { p: 0.75 }.scale(16.0, 8)
    );
    Ok(())
}
