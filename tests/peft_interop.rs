//! The other direction of interchange: an adapter candle-peft saves, loaded by PEFT itself.
//!
//! Needs Python, so it is not part of `cargo test`. Run both halves by hand:
//!
//! ```text
//! cargo test --test peft_interop -- --ignored     # writes target/peft-interop/{lora,dora,vera,loha,randlora}
//! ../venv/bin/python tests/fixtures/check_in_peft.py target/peft-interop/*
//! ```
//! The script loads each directory with `PeftModel.from_pretrained` onto the tiny LLaMA fixture
//! and compares PEFT's layer outputs with the ones candle-peft wrote (`ours.safetensors`).

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use candle_peft::adapters::LohaConfig;
use candle_peft::format::write_safetensors;
use candle_peft::{
    AdapterConfig, InitOptions, LinearHost, LoraConfig, LoraInit, PeftModel, RandLoraConfig, VeraConfig,
};

/// The adapters written for the check: one per PEFT method, with non-trivial values.
fn configs() -> Vec<(&'static str, AdapterConfig)> {
    let mut lora = LoraConfig::rslora(4, 8.0, &["q_proj", "k_proj", "gate_proj"]).with_init(LoraInit::Random);
    lora.rank_pattern.insert("layers.0.mlp.gate_proj".into(), 6);
    lora.target.task_type = Some("CAUSAL_LM".into());
    let targets = ["q_proj", "v_proj", "down_proj"];
    vec![
        ("lora", AdapterConfig::Lora(lora.clone())),
        ("dora", AdapterConfig::Lora(LoraConfig { use_dora: true, ..lora })),
        ("vera", AdapterConfig::Vera(VeraConfig { init_weights: false, ..VeraConfig::new(8, &targets) })),
        ("loha", {
            let mut loha = LohaConfig { init_weights: false, ..LohaConfig::new(4, 6.0, &targets) };
            loha.rank_pattern.insert("layers.1.mlp.down_proj".into(), 2);
            AdapterConfig::Loha(loha)
        }),
        (
            "randlora",
            AdapterConfig::RandLora(RandLoraConfig {
                init_weights: false,
                randlora_alpha: 16.0,
                ..RandLoraConfig::new(8, &targets)
            }),
        ),
    ]
}

#[test]
#[ignore = "writes files for tests/fixtures/check_in_peft.py (needs Python + PEFT)"]
fn export_for_peft() -> candle_peft::Result<()> {
    for (name, config) in configs() {
        let peft = PeftModel::new(common::tiny_llama(), config, InitOptions { seed: 7, ..Default::default() })?;
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peft-interop").join(name);
        peft.save_pretrained(&dir)?;
        let mut outputs = Vec::new();
        for (path, layer) in peft.model().linears() {
            if layer.adapter().is_some() {
                let x = Tensor::randn(0f32, 1., (3, layer.features().0), &Device::Cpu)?;
                outputs.push((format!("{path}.y"), layer.forward_checked(&x)?));
                outputs.push((format!("{path}.x"), x));
            }
        }
        write_safetensors(&dir.join("ours.safetensors"), &outputs)?;
    }
    Ok(())
}
