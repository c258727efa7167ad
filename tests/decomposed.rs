//! BoRA, LoRA-XS and EDoRA against PyTorch references of docs/METHODS.md's formulas
//! (tests/fixtures/generate.py, `decomposed_cases`), plus file round trips of every method.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};
use candle_peft::adapters::edora::edora;
use candle_peft::format::{CONFIG_FILE, WEIGHTS_FILE};
use candle_peft::DEFAULT_ADAPTER;
use candle_peft::{
    AdaptedLinear, Adapter, AdapterConfig, AdapterCore, BaseLayer, Bora, Error, InitOptions, LinearHost, Lora,
    LoraConfig, LoraParams, LoraXs, PeftModel,
};
use common::{assert_close, fixture, load, test_device, tiny_llama};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    method: String,
    bias: bool,
    scaling: f64,
    trainable: Vec<String>,
}

fn build(c: &Case, get: &dyn Fn(&str) -> Tensor) -> candle_peft::Result<Box<dyn Adapter>> {
    let (a, b) = (get("lora_A.weight"), get("lora_B.weight"));
    let mut adapter: Box<dyn Adapter> = match c.method.as_str() {
        "bora" => Box::new(Bora::new(Lora::from_weights(a, b, c.scaling, 0.0)?, &get("w").into())?),
        "lora_xs" => Box::new(LoraXs::from_weights(a, b, get("lora_R.weight"), c.scaling, 0.0)?),
        "edora" => {
            Box::new(edora(LoraXs::from_weights(a, b, get("lora_R.weight"), c.scaling, 0.0)?, &get("w").into())?)
        }
        other => panic!("unknown method {other}"),
    };
    for key in &c.trainable {
        adapter.load_tensor(key, &get(key))?;
    }
    Ok(adapter)
}

#[test]
fn bora_lora_xs_and_edora_match_the_pytorch_reference() -> candle_peft::Result<()> {
    let t = load("decomposed_cases.safetensors");
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(fixture("decomposed_cases.json")).unwrap()).unwrap();
    assert_eq!(cases.len(), 18);
    for c in &cases {
        let get = |k: &str| t[&format!("{}.{k}", c.name)].clone();
        let mut layer = AdaptedLinear::new(get("w"), c.bias.then(|| get("b")))?;
        layer.insert_adapter(DEFAULT_ADAPTER, build(c, &get)?, None)?;
        let names: Vec<String> = layer.adapter().unwrap().trainable_vars().into_iter().map(|(k, _)| k).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(sorted, c.trainable, "{}: trainable tensors", c.name);

        let x = Var::from_tensor(&get("x"))?;
        let y = layer.forward_checked(x.as_tensor())?;
        assert_close(&y, &get("y"), 1e-5, &format!("{} forward", c.name));
        let grads = (&y * get("g"))?.sum_all()?.backward()?;
        for (key, var) in layer.adapter().unwrap().trainable_vars() {
            assert_close(
                grads.get(var.as_tensor()).unwrap(),
                &get(&format!("grad.{key}")),
                1e-4,
                &format!("{} grad {key}", c.name),
            );
        }
        assert_close(grads.get(x.as_tensor()).unwrap(), &get("grad_x"), 1e-4, &format!("{} grad x", c.name));

        assert_close(&layer.merged_weight()?, &get("merged"), 1e-5, &format!("{} merged_weight", c.name));
        layer.merge()?;
        assert_close(&layer.weight().dense()?, &get("merged"), 1e-5, &format!("{} merge", c.name));
        assert_close(&layer.forward_checked(&get("x"))?, &y, 1e-5, &format!("{} merged vs unmerged", c.name));
        layer.unmerge()?;
        assert_close(&layer.weight().dense()?, &get("w"), 1e-6, &format!("{} unmerge", c.name));
    }
    Ok(())
}

#[test]
fn lora_xs_svd_init_is_the_rank_r_truncation() -> candle_peft::Result<()> {
    let t = load("decomposed_cases.safetensors");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    for name in ["lora_xs_square_r4", "lora_xs_wide_r16", "lora_xs_tall_r16"] {
        let get = |k: &str| t[&format!("{name}.{k}")].clone();
        let w = get("w");
        let r = get("lora_R.weight").dim(0)?;
        let xs = LoraXs::new(
            BaseLayer { weight: &candle_peft::FrozenWeight::from(w.clone()), bias: None },
            &LoraParams { r, alpha: 16.0, ..Default::default() },
            DType::F32,
            &mut rng,
        )?;
        let truncation = xs.lora_b().matmul(xs.lora_a())?;
        let frob = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
        let rel = frob(&(&truncation - get("truncation"))?) / frob(&get("truncation"));
        assert!(rel < 1e-4, "{name}: truncation off by {rel:e} (Frobenius, relative)");
        let gram = xs.lora_b().t()?.matmul(xs.lora_b())?;
        assert_close(&gram, &Tensor::eye(r, DType::F32, &test_device())?, 1e-5, "U^T U = I");
        let r_std = xs.lora_r().flatten_all()?.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?;
        assert!(r_std > 2e-6 && r_std < 5e-5, "R ~ N(0, 1e-5^2): rms {r_std}");
    }
    Ok(())
}

#[test]
fn every_method_saves_and_loads_bit_exact_and_merges_back() -> candle_peft::Result<()> {
    let lora =
        || LoraConfig::lora(4, 8.0, &["q_proj", "up_proj", "down_proj"]).with_init(candle_peft::LoraInit::Random);
    let targets = ["q_proj", "up_proj", "down_proj"];
    let methods = [
        ("lora", AdapterConfig::Lora(lora())),
        ("dora", AdapterConfig::Lora(LoraConfig { use_dora: true, ..lora() })),
        ("bora", AdapterConfig::Bora(lora())),
        ("lora_xs", AdapterConfig::LoraXs(lora())),
        ("edora", AdapterConfig::EDora(lora())),
        ("melora", AdapterConfig::Melora(candle_peft::MeloraConfig { n: 2, lora: lora() })),
        (
            "vera",
            AdapterConfig::Vera(candle_peft::VeraConfig {
                init_weights: false,
                ..candle_peft::VeraConfig::new(8, &targets)
            }),
        ),
        (
            "randlora",
            // alpha 16 rather than PEFT's 640 keeps dW near W0's scale, so float32 can restore W0
            // to 1e-6 after merge + unmerge.
            AdapterConfig::RandLora(candle_peft::RandLoraConfig {
                init_weights: false,
                randlora_alpha: 16.0,
                ..candle_peft::RandLoraConfig::new(8, &targets)
            }),
        ),
    ];
    for (name, config) in methods {
        let mut peft = PeftModel::new(tiny_llama(), config, InitOptions { seed: 3, ..Default::default() })?;
        let dir = tempfile::tempdir().unwrap();
        peft.save_pretrained(dir.path())?;
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(json["peft_type"], peft.config().peft_type(), "{name}");
        let back = PeftModel::from_pretrained(tiny_llama(), dir.path(), DType::F32)?;
        let theirs: BTreeMap<String, Tensor> = back.saved_tensors()?.into_iter().collect();
        for (k, t) in peft.saved_tensors()? {
            assert_eq!(t.flatten_all()?.to_vec1::<f32>()?, theirs[&k].flatten_all()?.to_vec1::<f32>()?, "{name} {k}");
        }
        // The adapter changes the output, merged outputs equal unmerged ones, and merge then
        // unmerge restores every base weight.
        let x = Tensor::randn(0f32, 1., (3, 32), &test_device())?;
        let path = "model.layers.1.self_attn.q_proj";
        let layer = peft.model().get(path).unwrap();
        let before = layer.forward_checked(&x)?;
        let base = x.matmul(&layer.weight().dense()?.t()?)?;
        // (LoRA-XS and EDoRA start with R ~ N(0, 1e-5^2): a near-zero update by design.)
        if !matches!(name, "lora_xs" | "edora") {
            assert!(common::rel_err(&before, &base) > 1e-3, "{name}: the adapter changes nothing");
        }
        let w0: Vec<Tensor> = peft.model().linears().iter().map(|(_, l)| l.weight().dense().unwrap()).collect();
        peft.merge()?;
        assert_close(
            &peft.model().get(path).unwrap().forward_checked(&x)?,
            &before,
            1e-5,
            &format!("{name} merged forward"),
        );
        peft.unmerge()?;
        for ((p, l), w) in peft.model().linears().iter().zip(&w0) {
            assert_close(&l.weight().dense()?, w, 1e-6, &format!("{name} {p} unmerge"));
        }
        assert!(dir.path().join(WEIGHTS_FILE).exists());
    }
    Ok(())
}

#[test]
fn svd_methods_refuse_ranks_above_min_dims_and_bad_magnitudes() -> candle_peft::Result<()> {
    for make in [AdapterConfig::LoraXs, AdapterConfig::EDora] {
        // v_proj is 32 -> 16: rank 17 cannot be an SVD truncation.
        let config = make(LoraConfig::lora(17, 8.0, &["v_proj"]));
        let e = PeftModel::new(tiny_llama(), config, InitOptions::default()).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { name: "r", .. }) && e.to_string().contains("min(16, 32)"), "{e}");
    }
    let w = Tensor::randn(0f32, 1., (8, 6), &test_device())?;
    let nan = w.broadcast_mul(&Tensor::new(&[f32::NAN, 1., 1., 1., 1., 1.], &test_device())?)?;
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let e = LoraXs::new(
        BaseLayer { weight: &candle_peft::FrozenWeight::from(nan.clone()), bias: None },
        &LoraParams { r: 2, alpha: 4.0, ..Default::default() },
        DType::F32,
        &mut rng,
    )
    .unwrap_err();
    assert!(matches!(e, Error::LinAlg(_)), "{e}");

    let xs = LoraXs::new(
        BaseLayer { weight: &candle_peft::FrozenWeight::from(w.clone()), bias: None },
        &LoraParams { r: 2, alpha: 4.0, ..Default::default() },
        DType::F32,
        &mut rng,
    )?;
    let mut e = edora(xs, &w.clone().into())?;
    let wrong = Tensor::ones(7, DType::F32, &test_device())?;
    assert!(matches!(e.load_tensor("lora_magnitude_vector", &wrong), Err(Error::ShapeMismatch { .. })));
    let lora = Lora::from_weights(
        Tensor::ones((2, 6), DType::F32, &test_device())?,
        Tensor::ones((8, 2), DType::F32, &test_device())?,
        1.0,
        0.0,
    )?;
    let mut b = Bora::new(lora, &w.clone().into())?;
    assert!(matches!(b.load_tensor("bora_magnitude_col", &wrong), Err(Error::ShapeMismatch { .. })));
    Ok(())
}
