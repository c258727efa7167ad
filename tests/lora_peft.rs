//! LoRA and rsLoRA against HF PEFT 0.21.2 (fixtures from tests/fixtures/generate.py).

mod common;

use candle_core::{DType, Module, Tensor, Var};
use candle_peft::scaling::from_use_rslora;
use candle_peft::DEFAULT_ADAPTER;
use candle_peft::{AdaptedLinear, Adapter, AdapterCore, BaseLayer, Dora, Lora, LoraInit, LoraParams};
use common::{assert_close, fixture, load, test_device};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    bias: bool,
    r: usize,
    alpha: f64,
    use_rslora: bool,
    scaling: f64,
}

fn cases(prefix: &str) -> Vec<Case> {
    serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{prefix}_cases.json"))).unwrap()).unwrap()
}

/// Runs the single-layer cases of `{prefix}_cases.safetensors`: shapes square / wide / tall,
/// ranks 1 / 8 / 64, alpha/r and alpha/sqrt(r), with and without bias. `dora` wraps the LoRA in
/// PEFT's DoRA and checks the magnitude's gradient too.
fn check_single_layer_cases(prefix: &str, dora: bool) -> candle_peft::Result<()> {
    let t = load(&format!("{prefix}_cases.safetensors"));
    let cases = cases(prefix);
    assert_eq!(cases.len(), 18);
    for c in cases {
        let name = format!("{prefix} {}", c.name);
        let get = |k: &str| t[&format!("{}.{k}", c.name)].clone();
        let scaling = from_use_rslora(c.use_rslora).scale(c.alpha, c.r);
        assert!((scaling - c.scaling).abs() < 1e-12, "{name}: scaling {scaling} vs PEFT {}", c.scaling);

        let bias = c.bias.then(|| get("b"));
        let mut layer = AdaptedLinear::new(get("w"), bias)?;
        let lora = Lora::from_weights(get("lora_A"), get("lora_B"), scaling, 0.0)?;
        let adapter: Box<dyn Adapter> = if dora {
            let mut d = Dora::new(lora, &get("w").into(), "LORA")?;
            d.load_tensor("lora_magnitude_vector", &get("magnitude"))?;
            Box::new(d)
        } else {
            Box::new(lora)
        };
        layer.insert_adapter(DEFAULT_ADAPTER, adapter, None)?;
        layer.set_train(true);

        // Forward and gradients of loss = sum(y * g) w.r.t. x and every trainable tensor.
        let x = Var::from_tensor(&get("x"))?;
        let y = layer.forward(x.as_tensor())?;
        assert_close(&y, &get("y"), 1e-5, &format!("{name} forward"));
        let grads = (&y * get("g"))?.sum_all()?.backward()?;
        for (key, var) in layer.adapter().unwrap().trainable_vars() {
            let fixture_key = match key.as_str() {
                "lora_A.weight" => "grad_A",
                "lora_B.weight" => "grad_B",
                "lora_magnitude_vector" => "grad_magnitude",
                other => panic!("unexpected trainable tensor {other}"),
            };
            assert_close(
                grads.get(var.as_tensor()).unwrap(),
                &get(fixture_key),
                1e-4,
                &format!("{name} {fixture_key}"),
            );
        }
        assert_close(grads.get(x.as_tensor()).unwrap(), &get("grad_x"), 1e-4, &format!("{name} grad x"));
        assert!(
            layer.weight().as_dense().is_some_and(|w| grads.get(w).is_none()),
            "{name}: the frozen weight got a gradient"
        );

        // Merge: the weight PEFT merges, the same outputs, and back to W0 on unmerge.
        layer.merge()?;
        assert_close(&layer.weight().dense()?, &get("merged"), 1e-5, &format!("{name} merged weight"));
        let y_merged = layer.forward(&get("x"))?;
        assert_close(&y_merged, &get("y_merged"), 1e-5, &format!("{name} merged forward"));
        assert_close(&y_merged, &y, 1e-5, &format!("{name} merged vs unmerged"));
        layer.unmerge()?;
        let restored = (layer.weight().dense()? - get("w"))?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(restored <= 1e-6, "{name}: unmerge leaves {restored:e}");
    }
    Ok(())
}

#[test]
fn lora_single_layers_match_peft() -> candle_peft::Result<()> {
    check_single_layer_cases("lora", false)
}

#[test]
fn dora_single_layers_match_peft() -> candle_peft::Result<()> {
    check_single_layer_cases("dora", true)
}

#[test]
fn pissa_init_matches_peft() -> candle_peft::Result<()> {
    let t = load("pissa.safetensors");
    let w = &t["w"];
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let (lora, residual) = Lora::new(
        BaseLayer { weight: &candle_peft::FrozenWeight::from(w.clone()), bias: None },
        &LoraParams { r: 4, alpha: 8.0, init: LoraInit::Pissa, ..Default::default() },
        DType::F32,
        &mut rng,
    )?;
    // Singular vectors are defined up to sign, so compare s * B A and the residual.
    assert_close(&lora.delta_weight(w)?, &t["scaled_ba"], 1e-4, "PiSSA s B A");
    assert_close(&residual.unwrap(), &t["residual"], 1e-4, "PiSSA residual base");
    Ok(())
}

/// A layer holding fixture case `name`'s base and LoRA, with branch dropout `p`.
fn case_layer(
    t: &std::collections::BTreeMap<String, Tensor>,
    name: &str,
    p: f64,
) -> candle_peft::Result<AdaptedLinear> {
    let get = |k: &str| t[&format!("{name}.{k}")].clone();
    let mut layer = AdaptedLinear::new(get("w"), Some(get("b")))?;
    layer.insert_adapter(DEFAULT_ADAPTER, Box::new(Lora::from_weights(get("lora_A"), get("lora_B"), 2.0, p)?), None)?;
    Ok(layer)
}

#[test]
fn adapter_in_another_dtype_runs_in_its_own_dtype() -> candle_peft::Result<()> {
    let t = load("lora_cases.safetensors");
    let get = |k: &str| t[&format!("square_r8_lora.{k}")].clone();
    let mut layer = AdaptedLinear::new(get("w"), Some(get("b")))?;
    let (a, b) = (get("lora_A").to_dtype(DType::BF16)?, get("lora_B").to_dtype(DType::BF16)?);
    layer.insert_adapter(DEFAULT_ADAPTER, Box::new(Lora::from_weights(a, b, 2.0, 0.0)?), None)?;
    assert_eq!(layer.adapter().unwrap().dtype(), DType::BF16);
    assert_close(&case_layer(&t, "square_r8_lora", 0.0)?.forward(&get("x"))?, &get("y"), 1e-5, "f32 reference");
    let y = layer.forward(&get("x"))?;
    assert_eq!(y.dtype(), DType::F32, "the output keeps the base dtype");
    assert_close(&y, &get("y"), 2e-2, "bf16 adapter on an f32 base");

    // A bf16 base with an f32 adapter.
    let mut layer = AdaptedLinear::new(get("w").to_dtype(DType::BF16)?, Some(get("b").to_dtype(DType::BF16)?))?;
    layer.insert_adapter(
        DEFAULT_ADAPTER,
        Box::new(Lora::from_weights(get("lora_A"), get("lora_B"), 2.0, 0.0)?),
        None,
    )?;
    let y = layer.forward(&get("x").to_dtype(DType::BF16)?)?;
    assert_eq!(y.dtype(), DType::BF16);
    assert_close(&y, &get("y"), 2e-2, "f32 adapter on a bf16 base");
    Ok(())
}

#[test]
fn dropout_acts_in_training_only_and_disable_gives_the_base() -> candle_peft::Result<()> {
    let t = load("lora_cases.safetensors");
    let get = |k: &str| t[&format!("tall_r8_lora.{k}")].clone();
    let mut layer = case_layer(&t, "tall_r8_lora", 0.5)?;
    let x = get("x");
    let eval = layer.forward(&x)?;
    assert_close(&eval, &get("y"), 1e-5, "eval mode has no dropout");
    layer.set_train(true);
    let train = layer.forward(&x)?;
    assert!(common::rel_err(&train, &eval) > 1e-3, "dropout 0.5 changed nothing in training mode");
    layer.set_enabled(false)?;
    let base = x.broadcast_matmul(&get("w").t()?)?.broadcast_add(&get("b"))?;
    assert_close(&layer.forward(&x)?, &base, 1e-6, "disabled adapter");
    let branch = common::rel_err(&base, &eval);
    assert!(branch > 0.05, "the fixture's adapter branch is too small to test anything ({branch})");
    Ok(())
}

#[test]
fn frozen_weights_get_no_gradient_deep_in_a_stack() -> candle_peft::Result<()> {
    // Two adapted layers: the second sees an input that depends on the first adapter, the case
    // in which candle's matmul would compute a gradient for the frozen weight.
    let dev = test_device();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
    let mut layers = Vec::new();
    for _ in 0..2 {
        let w = Tensor::randn(0f32, 0.2, (16, 16), &dev)?;
        let mut l = AdaptedLinear::new(w.clone(), None)?;
        let (lora, _) = Lora::new(
            BaseLayer { weight: &candle_peft::FrozenWeight::from(w.clone()), bias: None },
            &LoraParams { r: 4, alpha: 8.0, init: LoraInit::Random, ..Default::default() },
            DType::F32,
            &mut rng,
        )?;
        l.insert_adapter(DEFAULT_ADAPTER, Box::new(lora), None)?;
        layers.push(l);
    }
    let x = Tensor::randn(0f32, 1., (3, 16), &dev)?;
    let y = layers[1].forward(&layers[0].forward(&x)?)?;
    let grads = y.sqr()?.sum_all()?.backward()?;
    for l in &layers {
        assert!(l.weight().as_dense().is_some_and(|w| grads.get(w).is_none()));
        for (_, v) in l.adapter().unwrap().trainable_vars() {
            assert!(grads.get(v.as_tensor()).is_some());
        }
    }
    Ok(())
}

/// A LoRA for a (4, 3) layer with `A`, `B` all ones.
fn ones_lora() -> candle_peft::Result<Lora> {
    let ones = |shape: (usize, usize)| Tensor::ones(shape, DType::F32, &test_device());
    Lora::from_weights(ones((2, 3))?, ones((4, 2))?, 1.0, 0.0)
}

#[test]
fn merge_state_errors() -> candle_peft::Result<()> {
    let w = Tensor::randn(0f32, 1., (4, 3), &test_device())?;
    let mut layer = AdaptedLinear::new(w.clone(), None)?;
    assert!(layer.merge().is_err(), "merging without an adapter");
    let lora = ones_lora()?;
    layer.insert_adapter(DEFAULT_ADAPTER, Box::new(lora), None)?;
    assert!(matches!(layer.unmerge(), Err(candle_peft::Error::MergeState(_))), "unmerging an unmerged layer");
    layer.merge()?;
    assert!(matches!(layer.merge(), Err(candle_peft::Error::MergeState(_))), "merging twice");
    assert!(layer.set_enabled(false).is_err(), "disabling a merged adapter");
    let bad = layer.forward_checked(&Tensor::zeros((2, 5), DType::F32, &test_device())?).unwrap_err();
    assert!(matches!(bad, candle_peft::Error::ShapeMismatch { .. }), "{bad}");
    // An adapter built for another shape is refused.
    let mut other = AdaptedLinear::new(Tensor::zeros((5, 3), DType::F32, &test_device())?, None)?;
    let lora = ones_lora()?;
    assert!(matches!(
        other.insert_adapter(DEFAULT_ADAPTER, Box::new(lora), None),
        Err(candle_peft::Error::ShapeMismatch { .. })
    ));
    Ok(())
}
