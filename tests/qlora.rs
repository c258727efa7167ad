//! QLoRA on the real model: SmolLM2-135M-Instruct's Q4_1 GGUF kept quantized
//! (`BaseQuant::Keep`) trains exactly as the same file dequantized to f32 does: the quantized
//! frozen op dequantizes one block of rows at a time and computes the products of the f32
//! weights, so 20 steps of LoRA, DoRA and VeRA give the same losses (1e-4) and adapter weights
//! (1e-4 relative).
//!
//! Needs the model: `scripts/fetch_smollm2.sh` (CI runs it).

mod common;

use std::path::PathBuf;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use candle_peft::models::Llama;
use candle_peft::quantized::BaseQuant;
use candle_peft::train::data::Example;
use candle_peft::train::{LrSchedule, TrainConfig, Trainer};
use candle_peft::{AdapterConfig, FrozenWeight, InitOptions, LinearHost, MethodParams, PeftModel, TargetConfig};

fn model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch_smollm2.sh first", p.display());
    p
}

fn load(quant: BaseQuant) -> Llama {
    Llama::from_gguf_quantized(&model_path(), &Device::Cpu, DType::F32, quant).expect("SmolLM2 loads").0
}

/// Eight sequences of 24 real token ids (the vocabulary's common range), as next-token data.
fn data() -> Vec<Example> {
    (0..8u32)
        .map(|k| {
            let ids: Vec<u32> = (0..24u32).map(|i| 300 + (37 * k + 11 * i) % 2000).collect();
            Example { labels: ids.iter().map(|&t| t as i64).collect(), ids }
        })
        .collect()
}

fn adapter(method: &str) -> AdapterConfig {
    let target = TargetConfig::list(&["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]);
    AdapterConfig::for_method(method, &MethodParams::new(16, target)).expect("a known method")
}

/// Per-step losses and the adapter's tensors after `steps` steps.
fn train(model: Llama, method: &str, steps: usize) -> (Vec<f64>, Vec<(String, Tensor)>) {
    let peft = PeftModel::new(model, adapter(method), InitOptions { seed: 3, ..Default::default() }).unwrap();
    let config =
        TrainConfig { steps, batch_size: 2, schedule: LrSchedule::Constant { lr: 1e-3 }, ..Default::default() };
    let mut trainer = Trainer::new(peft, config).unwrap();
    trainer.train(&data(), None).unwrap();
    let losses = trainer.history().iter().map(|s| s.loss).collect();
    (losses, trainer.peft().saved_tensors().unwrap())
}

#[test]
fn kept_quantized_weights_stay_quantized_and_in_hf_layout() -> candle_peft::Result<()> {
    let q = load(BaseQuant::Keep);
    let f = load(BaseQuant::None);
    let (mut quantized_bytes, mut dense_bytes) = (0, 0);
    for ((path, lq), (_, lf)) in q.linears().into_iter().zip(f.linears()) {
        assert!(matches!(lq.weight(), FrozenWeight::Quantized(_)), "{path} was not kept quantized");
        quantized_bytes += lq.weight().storage_bytes();
        dense_bytes += lf.weight().storage_bytes();
        // Same values, q/k rows unpermuted as the f32 path does.
        assert_eq!(lq.weight().dense()?.to_vec2::<f32>()?, lf.weight().dense()?.to_vec2::<f32>()?, "{path}");
    }
    // Q4_1: 20 bytes per 32 values against 128 in f32.
    assert!(quantized_bytes * 6 < dense_bytes, "{quantized_bytes} vs {dense_bytes} bytes");
    let ids = Tensor::new(&[[1u32, 504, 3456, 28, 17, 905]], &Device::Cpu)?;
    let (lq, lf) = (q.forward(&ids)?, f.forward(&ids)?);
    let diff = (lq - lf)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-3, "logits differ by {diff}");
    Ok(())
}

#[test]
fn training_on_the_kept_quantized_base_equals_the_f32_base() {
    for (method, steps) in [("lora", 20), ("dora", 20), ("vera", 20)] {
        let (loss_q, weights_q) = train(load(BaseQuant::Keep), method, steps);
        let (loss_f, weights_f) = train(load(BaseQuant::None), method, steps);
        assert_eq!(loss_q.len(), steps);
        let worst = loss_q.iter().zip(&loss_f).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-4, "{method}: losses differ by up to {worst}: {loss_q:?} (quantized) vs {loss_f:?} (f32)");
        // The whole adapter as one vector: ||q - f|| / ||f||.
        let (mut diff2, mut norm2) = (0f64, 0f64);
        for ((k, a), (k2, b)) in weights_q.iter().zip(&weights_f) {
            assert_eq!(k, k2);
            diff2 += (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            norm2 += b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        }
        let rel = (diff2 / norm2).sqrt();
        assert!(rel < 1e-4, "{method}: the adapter weights differ by {rel:.2e} (relative)");
        eprintln!("{method}: losses within {worst:.1e}, adapter weights within {rel:.1e} (relative)");
    }
}

#[test]
fn requantizing_falls_back_on_rows_k_quants_cannot_hold() -> candle_peft::Result<()> {
    // SmolLM2's rows are 576 or 1536 values: 576 is not a multiple of Q4_K's 256.
    let m = load(BaseQuant::To(GgmlDType::Q4K));
    let types: Vec<(String, GgmlDType)> = m
        .linears()
        .into_iter()
        .filter_map(|(p, l)| match l.weight() {
            FrozenWeight::Quantized(q) => Some((p, q.ggml_dtype())),
            FrozenWeight::Dense(_) => None,
        })
        .collect();
    assert_eq!(types.len(), 30 * 7);
    for (p, t) in &types {
        let want = if p.ends_with("down_proj") { GgmlDType::Q4K } else { GgmlDType::Q5_0 };
        assert_eq!(*t, want, "{p}");
    }
    Ok(())
}
