//! LoHa against peft 0.21.2 (fixtures from tests/fixtures/generate.py --loha): single layers
//! (forward, gradients, merge), a PEFT-saved adapter of the tiny LLaMA (per-module outputs and
//! gradients, whole-model logits, parameter count), files both ways, init and bad configs.

mod common;

use std::path::Path;

use candle_core::{DType, Tensor, Var};
use candle_peft::adapters::{Loha, LohaConfig};
use candle_peft::format::CONFIG_FILE;
use candle_peft::models::Llama;
use candle_peft::DEFAULT_ADAPTER;
use candle_peft::{
    AdaptedLinear, AdapterConfig, Error, InitOptions, LinearHost, MethodParams, PeftModel, TargetConfig,
};
use common::{assert_close, check_adapter_dir, check_saved_files, fixture, load, test_device, tiny_llama};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    bias: bool,
    scaling: f64,
}

const KEYS: [&str; 4] = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"];

#[test]
fn single_layers_match_peft() -> candle_peft::Result<()> {
    let t = load("loha_cases.safetensors");
    let cases: Vec<Case> = serde_json::from_str(&std::fs::read_to_string(fixture("loha_cases.json")).unwrap()).unwrap();
    assert_eq!(cases.len(), 15);
    for c in cases {
        let get = |k: &str| t[&format!("{}.{k}", c.name)].clone();
        let w = get("w");
        let loha = Loha::from_weights(KEYS.map(get), c.scaling)?;
        let mut layer = AdaptedLinear::new(w.clone(), c.bias.then(|| get("b")))?;
        layer.insert_adapter(DEFAULT_ADAPTER, Box::new(loha), None)?;
        let x = Var::from_tensor(&get("x"))?;
        let y = layer.forward_checked(x.as_tensor())?;
        assert_close(&y, &get("y"), 1e-5, &format!("{} forward", c.name));
        let grads = (&y * get("g"))?.sum_all()?.backward()?;
        for (key, var) in layer.adapter().unwrap().trainable_vars() {
            let want = get(&format!("grad_{key}"));
            assert_close(grads.get(var.as_tensor()).unwrap(), &want, 1e-4, &format!("{} grad {key}", c.name));
        }
        assert_close(grads.get(x.as_tensor()).unwrap(), &get("grad_x"), 1e-4, &format!("{} grad x", c.name));
        layer.merge()?;
        assert_close(&layer.weight().dense()?, &get("merged"), 1e-5, &format!("{} merge", c.name));
        assert_close(&layer.forward_checked(x.as_tensor())?, &get("y_merged"), 1e-5, &format!("{} merged", c.name));
        layer.unmerge()?;
        assert_close(&layer.weight().dense()?, &w, 1e-6, &format!("{} unmerge", c.name));
    }
    Ok(())
}

#[test]
fn a_peft_saved_adapter_matches_peft() -> candle_peft::Result<()> {
    // Per-module outputs, merged weights and gradients (rank_pattern and alpha_pattern in use).
    let peft = check_adapter_dir("loha")?;
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny_llama/loha/peft_trainable.json")).unwrap())
            .unwrap();
    assert_eq!(peft.parameter_count().trainable, v["trainable"].as_u64().unwrap() as usize);
    assert_eq!(peft.config().method_name(), "loha");

    // The whole model's logits through the trainable LLaMA.
    let r = load("tiny_llama/loha/reference.safetensors");
    let model = Llama::from_hf_dir(&fixture("tiny_llama"), &test_device(), DType::F32)?;
    let peft = PeftModel::from_pretrained(model, &fixture("tiny_llama/loha"), DType::F32)?;
    assert_close(&peft.model().forward(&r["ids"])?, &r["logits"], 1e-5, "LoHa logits");
    Ok(())
}

#[test]
fn saved_files_are_peft_files() -> candle_peft::Result<()> {
    // Keys, shapes and adapter_config.json fields as PEFT writes them, and a bit-exact reload.
    check_saved_files("loha")
}

#[test]
fn a_fresh_adapter_is_the_base_and_draws_like_nn_linear() -> candle_peft::Result<()> {
    let params = MethodParams::new(4, TargetConfig::list(&["q_proj", "down_proj"]));
    let config = AdapterConfig::for_method("loha", &params)?;
    let peft = PeftModel::new(tiny_llama(), config, InitOptions::default())?;
    for (path, layer) in peft.model().linears() {
        let Some(adapter) = layer.adapter() else { continue };
        let (inp, _) = layer.features();
        let x = Tensor::randn(0f32, 1., (3, inp), &test_device())?;
        let base = x.matmul(&layer.weight().dense()?.t()?)?;
        assert_close(&layer.forward_checked(&x)?, &base, 1e-6, &format!("{path}: dW = 0 at init"));
        for (key, var) in adapter.trainable_vars() {
            let max = var.abs()?.max_all()?.to_scalar::<f32>()?;
            let bound = 1.0 / (var.dim(1)? as f32).sqrt();
            match key.as_str() {
                "hada_w2_b" => assert_eq!(max, 0.0, "{path} {key}"),
                _ => assert!(max <= bound && max > 0.5 * bound, "{path} {key}: max {max}, bound {bound}"),
            }
        }
    }
    Ok(())
}

#[test]
fn bad_configs_are_clear_errors() {
    let dir = fixture("tiny_llama/loha");
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
    let with = |field: &str, value: serde_json::Value| {
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json[field] = value;
        AdapterConfig::from_json(&json.to_string(), Path::new("adapter_config.json"))
    };
    let e = with("rank_dropout", 0.1.into()).unwrap_err();
    assert!(e.to_string().contains("rank_dropout = 0.1"), "{e}");
    let e = with("module_dropout", 0.5.into()).unwrap_err();
    assert!(e.to_string().contains("module_dropout"), "{e}");
    let e = with("r", 0.into()).unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { name: "r", .. }), "{e}");
    assert!(matches!(with("alpha", "eight".into()), Err(Error::Config { .. })));
    // A factor of the wrong shape.
    let ones = |d: (usize, usize)| Tensor::ones(d, DType::F32, &test_device()).unwrap();
    let e = Loha::from_weights([ones((4, 2)), ones((2, 3)), ones((4, 2)), ones((3, 3))], 1.0).unwrap_err();
    assert!(e.to_string().contains("hada_w2_b"), "{e}");
    // A scaling strategy PEFT's format cannot hold trains, but is not saved as something else.
    let mut config = LohaConfig::new(4, 8.0, &["q_proj"]);
    config.scaling = Some(std::sync::Arc::new(candle_peft::RankStabilized));
    let peft = PeftModel::new(tiny_llama(), AdapterConfig::Loha(config), InitOptions::default()).unwrap();
    let e = peft.save_pretrained(tempfile::tempdir().unwrap().path()).unwrap_err();
    assert!(e.to_string().contains("alpha / r"), "{e}");
}
