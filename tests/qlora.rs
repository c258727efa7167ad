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
use candle_peft::adapters::variants;
use candle_peft::models::Llama;
use candle_peft::quantized::BaseQuant;
use candle_peft::train::data::Example;
use candle_peft::train::{LrSchedule, TrainConfig, Trainer};
use candle_peft::{AdapterConfig, FrozenWeight, InitOptions, LinearHost, MethodParams, PeftModel, TargetConfig};
use common::{fixture, rel_err};

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

/// Every method of the registry on the tiny LLaMA quantized to Q4_0 on load (its 48-wide
/// `down_proj` rows fall back to F16), against the same weights dense: the same outputs and
/// gradients, the same merged weights, and an unmerge that gives the quantized base back.
#[test]
fn every_method_trains_and_merges_on_a_quantized_base() -> candle_peft::Result<()> {
    let tiny = || {
        Llama::from_hf_dir_quantized(&fixture("tiny_llama"), &Device::Cpu, DType::F32, BaseQuant::To(GgmlDType::Q4_0))
    };
    let quantized = tiny()?;
    let dequantized = quantized.tensors()?;
    let config = quantized.config().clone();
    let ids = Tensor::new(&[[3u32, 17, 42, 8, 61, 5, 5, 30]], &Device::Cpu)?;
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    for v in variants() {
        let mut p = MethodParams::new(4, TargetConfig::list(&targets));
        if v.name == "melora" {
            p.options.insert("n".into(), 2.into());
        }
        let method = AdapterConfig::for_method(v.name, &p)?;
        let build = |m: Llama| PeftModel::new(m, method.clone(), InitOptions { seed: 5, ..Default::default() });
        let (mut pq, mut pf) =
            (build(tiny()?)?, build(Llama::from_tensors(config.clone(), &dequantized, DType::F32)?)?);
        for (vq, vf) in pq.trainable_vars()?.iter().zip(pf.trainable_vars()?) {
            // Away from the (often zero-update) init, the same on both.
            let moved = (vf.as_tensor() + vf.as_tensor().randn_like(0., 0.1)?)?;
            vf.set(&moved)?;
            vq.set(&moved)?;
        }
        let (yq, yf) = (pq.model().forward(&ids)?, pf.model().forward(&ids)?);
        let e = rel_err(&yq, &yf);
        assert!(e < 1e-5, "{}: logits differ by {e}", v.name);
        let (gq, gf) = (yq.sqr()?.mean_all()?.backward()?, yf.sqr()?.mean_all()?.backward()?);
        for ((k, vq), (_, vf)) in pq.named_trainable_vars()?.iter().zip(pf.named_trainable_vars()?) {
            let (a, b) = (gq.get(vq.as_tensor()), gf.get(vf.as_tensor()));
            let (a, b) = (a.unwrap_or_else(|| panic!("{}: no gradient for {k}", v.name)), b.expect("dense gradient"));
            let e = rel_err(a, b);
            assert!(e < 1e-4, "{} {k}: gradients differ by {e}", v.name);
        }
        pq.merge()?;
        pf.merge()?;
        for ((path, lq), (_, lf)) in pq.model().linears().into_iter().zip(pf.model().linears()) {
            let e = rel_err(&lq.weight().dense()?, &lf.weight().dense()?);
            assert!(e < 1e-5, "{} {path}: merged weights differ by {e}", v.name);
        }
        pq.unmerge()?;
        for (path, l) in pq.model().linears() {
            assert!(
                matches!(l.weight(), FrozenWeight::Quantized(_)),
                "{} {path}: unmerge lost the quantized base",
                v.name
            );
        }
        let e = rel_err(&pq.model().forward(&ids)?, &yq);
        assert!(e < 1e-5, "{}: unmerged outputs differ by {e}", v.name);
    }
    Ok(())
}

/// A layer records the Gram matrix `X^T X` of exactly the inputs its forward pass sees, and
/// `record_input_grams` gives each picked linear of the real model its own inputs' Gram (for
/// GPTQ): q and v of a layer see the same normed hidden states, down the MLP's activations.
#[test]
fn recorded_input_grams_are_the_inputs_of_each_linear() -> candle_peft::Result<()> {
    use candle_peft::AdaptedLinear;
    let w = Tensor::randn(0f32, 1., (5, 8), &Device::Cpu)?;
    let mut layer = AdaptedLinear::new(w, None)?;
    let (x1, x2) = (Tensor::randn(0f32, 1., (2, 3, 8), &Device::Cpu)?, Tensor::randn(0f32, 1., (4, 8), &Device::Cpu)?);
    layer.forward_checked(&x1)?;
    assert!(layer.take_inputs().is_none(), "nothing is recorded unless asked");
    layer.record_inputs()?;
    layer.forward_checked(&x1)?;
    layer.forward_checked(&x2)?;
    let gram = layer.take_inputs().expect("recorded");
    let x = Tensor::cat(&[x1.reshape((6, 8))?, x2], 0)?;
    let direct = x.t()?.matmul(&x)?;
    assert_eq!(gram.rows(), 10);
    assert!((gram.matrix() - direct)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-4);
    assert!(layer.take_inputs().is_none(), "taking the Gram ends the recording");

    let mut peft = PeftModel::new(load(BaseQuant::Keep), adapter("lora"), InitOptions::default())?;
    let ids = Tensor::new(&data()[0].ids[..], &Device::Cpu)?.unsqueeze(0)?;
    let (_, grams) = peft.record_input_grams(|_, l| l.has_adapters(), |m| m.forward(&ids))?;
    assert_eq!(grams.len(), peft.model().linears().into_iter().filter(|(_, l)| l.has_adapters()).count());
    assert!(grams.values().all(|g| g.rows() == 24));
    let layer = |p: &str| grams[&format!("model.layers.3.{p}")].matrix().clone();
    let same = (layer("self_attn.q_proj") - layer("self_attn.v_proj"))?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert_eq!(same, 0.0);
    assert_eq!(layer("mlp.down_proj").dims(), [1536, 1536]);
    // The recording ended with the run: the next forward pass records nothing.
    peft.model().forward(&ids)?;
    let mut model = peft.unload()?;
    assert!(model.linears_mut().into_iter().all(|(_, l)| l.take_inputs().is_none()));
    Ok(())
}
