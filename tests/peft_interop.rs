//! The other direction of interchange: an adapter candle-peft saves, loaded by PEFT itself.
//!
//! Needs Python, so it is not part of `cargo test`. Run both halves by hand:
//!
//! ```text
//! cargo test --test peft_interop -- --ignored     # writes target/peft-interop/{lora,dora,vera,loha,randlora,multi}
//! ../venv/bin/python tests/fixtures/check_in_peft.py target/peft-interop/* target/peft-interop/multi/*/
//! ```
//! The script loads each directory with `PeftModel.from_pretrained` onto the tiny LLaMA fixture
//! and compares PEFT's layer outputs with the ones candle-peft wrote (`ours.safetensors`).

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use candle_peft::adapters::LohaConfig;
use candle_peft::format::write_safetensors;
use candle_peft::{
    AdapterConfig, Combination, CombineOptions, InitOptions, LinearHost, LoraConfig, LoraInit, NamedLinears, PeftModel,
    RandLoraConfig, VeraConfig, DEFAULT_ADAPTER,
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
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peft-interop");
    for (name, config) in configs() {
        let peft = PeftModel::new(common::tiny_llama(), config, InitOptions { seed: 7, ..Default::default() })?;
        let dir = root.join(name);
        peft.save_pretrained(&dir)?;
        write_layer_outputs(&peft, &dir)?;
    }
    // Several adapters in PEFT's multi-adapter layout: the default one in multi/, the others in
    // multi/<name>/, one of them a combination (add_weighted_adapter).
    let mut peft =
        PeftModel::new(common::tiny_llama(), configs().remove(0).1, InitOptions { seed: 7, ..Default::default() })?;
    let second = LoraConfig::lora(6, 3.0, &["q_proj", "o_proj"]).with_init(LoraInit::Random);
    peft.add_adapter("second", AdapterConfig::Lora(second), InitOptions { seed: 8, ..Default::default() })?;
    let ties = CombineOptions { combination: Combination::TiesSvd, density: Some(0.5), ..Default::default() };
    peft.add_weighted_adapter(&[(DEFAULT_ADAPTER, 0.7), ("second", -0.4)], "combo", &ties)?;
    let dir = root.join("multi");
    peft.save_pretrained(&dir)?;
    for name in peft.adapter_names() {
        peft.set_adapter(&name)?;
        let sub = if name == DEFAULT_ADAPTER { dir.clone() } else { dir.join(&name) };
        write_layer_outputs(&peft, &sub)?;
    }
    Ok(())
}

/// `ours.safetensors` in `dir`: for every layer of the active adapter, an input and its output.
fn write_layer_outputs(peft: &PeftModel<NamedLinears>, dir: &Path) -> candle_peft::Result<()> {
    let mut outputs = Vec::new();
    for (path, layer) in peft.model().linears() {
        if layer.adapter().is_some() {
            let x = Tensor::randn(0f32, 1., (3, layer.features().0), &Device::Cpu)?;
            outputs.push((format!("{path}.y"), layer.forward_checked(&x)?));
            outputs.push((format!("{path}.x"), x));
        }
    }
    write_safetensors(&dir.join("ours.safetensors"), &outputs)
}
