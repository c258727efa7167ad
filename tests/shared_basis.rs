//! VeRA (and MELoRA) against peft 0.21.2 / PyTorch: PEFT-saved adapters of the tiny LLaMA with
//! mixed layer shapes, gradients, shared projections held once, parameter counts.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Tensor, Var};
use candle_peft::format::{read_safetensors, CONFIG_FILE, WEIGHTS_FILE};
use candle_peft::method::BuildContext;
use candle_peft::DEFAULT_ADAPTER;
use candle_peft::{AdapterConfig, Error, InitOptions, LinearHost, MeloraConfig, PeftModel, VeraConfig};
use common::{assert_close, check_adapter_dir, check_saved_files, fixture, load, test_device, tiny_llama};

/// PEFT's trainable parameter count for a fixture adapter.
fn peft_trainable(name: &str) -> usize {
    let path = fixture(&format!("tiny_llama/{name}/peft_trainable.json"));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["trainable"].as_u64().unwrap() as usize
}

#[test]
fn vera_and_randlora_match_peft_on_mixed_layer_shapes() -> candle_peft::Result<()> {
    // randlora: q 32->32 (in == out), v 32->16 and down 48->32 (in > out);
    // randlora_wide: up 32->48 (in < out), o 32->32.
    for name in ["vera", "randlora", "randlora_wide"] {
        let peft = check_adapter_dir(name)?;
        assert_eq!(peft.parameter_count().trainable, peft_trainable(name), "{name}: trainable parameters");
    }
    Ok(())
}

#[test]
fn vera_projections_are_stored_once() -> candle_peft::Result<()> {
    let peft = check_adapter_dir("vera")?;
    let storage = |t: &Tensor| {
        let (s, _) = t.storage_and_layout();
        &*s as *const _ as usize
    };
    let shared = peft.shared_tensors();
    let shared_ids: BTreeSet<usize> = shared.values().map(storage).collect();
    assert_eq!(shared_ids.len(), 2);
    let mut frozen_ids = BTreeSet::new();
    let mut layers = 0;
    for (_, layer) in peft.model().linears() {
        if let Some(a) = layer.adapter() {
            layers += 1;
            for t in a.frozen_tensors() {
                frozen_ids.insert(storage(&t));
            }
        }
    }
    assert_eq!(layers, 6);
    assert_eq!(frozen_ids, shared_ids, "every layer's projections are views of the two shared tensors");
    // Adapter memory = the shared pair once + the trainable vectors, as the counts predict.
    let shared_elems: usize = shared.values().map(|t| t.elem_count()).sum();
    assert_eq!(shared_elems, 4 * 48 + 32 * 4);
    let count = peft.parameter_count();
    let linear: usize = peft.model().linears().iter().map(|(_, l)| l.weight().elem_count()).sum();
    assert_eq!(count.all, linear + shared_elems + count.trainable);
    Ok(())
}

#[test]
fn vera_and_randlora_save_peft_keys_shapes_and_config() -> candle_peft::Result<()> {
    for name in ["vera", "randlora", "randlora_wide"] {
        check_saved_files(name)?;
    }
    Ok(())
}

#[test]
fn vera_bad_input() -> candle_peft::Result<()> {
    // save_projection: false cannot be reproduced.
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("tiny_llama/vera");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join(CONFIG_FILE)).unwrap()).unwrap();
    json["save_projection"] = false.into();
    std::fs::write(dir.path().join(CONFIG_FILE), json.to_string()).unwrap();
    let mut t = read_safetensors(&src.join(WEIGHTS_FILE), &test_device())?;
    t.remove("base_model.vera_A");
    t.remove("base_model.vera_B");
    candle_peft::format::write_safetensors(&dir.path().join(WEIGHTS_FILE), &t.into_iter().collect::<Vec<_>>())?;
    let e = PeftModel::from_pretrained(tiny_llama(), dir.path(), DType::F32).unwrap_err();
    assert!(e.to_string().contains("save_projection"), "{e}");

    // A rank above the shared projections' rank.
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join(CONFIG_FILE)).unwrap()).unwrap();
    json["r"] = 8.into();
    std::fs::write(dir.path().join(CONFIG_FILE), json.to_string()).unwrap();
    std::fs::copy(src.join(WEIGHTS_FILE), dir.path().join(WEIGHTS_FILE)).unwrap();
    let e = PeftModel::from_pretrained(tiny_llama(), dir.path(), DType::F32).unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { name: "r", .. }), "{e}");

    // Shared projections too small for the layers.
    std::fs::copy(src.join(CONFIG_FILE), dir.path().join(CONFIG_FILE)).unwrap();
    let mut t = read_safetensors(&src.join(WEIGHTS_FILE), &test_device())?;
    let a = t["base_model.vera_A"].narrow(1, 0, 40)?;
    t.insert("base_model.vera_A".into(), a);
    candle_peft::format::write_safetensors(&dir.path().join(WEIGHTS_FILE), &t.into_iter().collect::<Vec<_>>())?;
    let e = PeftModel::from_pretrained(tiny_llama(), dir.path(), DType::F32).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    Ok(())
}

#[test]
fn fresh_vera_starts_as_the_base_and_trains_only_vectors() -> candle_peft::Result<()> {
    let peft = PeftModel::new(
        tiny_llama(),
        AdapterConfig::Vera(VeraConfig::new(16, &["q_proj", "down_proj"])),
        InitOptions::default(),
    )?;
    for (path, layer) in peft.model().linears() {
        if layer.adapter().is_some() {
            let x = Tensor::randn(0f32, 1., (2, layer.features().0), &test_device())?;
            let base = x.matmul(&layer.weight().dense()?.t()?)?;
            assert_close(&layer.forward_checked(&x)?, &base, 1e-6, &path);
        }
    }
    assert_eq!(peft.shared_tensors()["vera_A"].dims(), [16, 48]);
    assert_eq!(peft.shared_tensors()["vera_B"].dims(), [32, 16]);
    Ok(())
}

#[test]
fn melora_is_a_block_diagonal_of_mini_loras() -> candle_peft::Result<()> {
    let config = MeloraConfig {
        lora: candle_peft::LoraConfig::lora(8, 16.0, &["q_proj"]).with_init(candle_peft::LoraInit::Random),
        n: 4,
    };
    let peft = PeftModel::new(tiny_llama(), AdapterConfig::Melora(config), InitOptions::default())?;
    let layer = peft.model().get("model.layers.0.self_attn.q_proj").unwrap();
    let vars: BTreeMap<String, Var> = layer.adapter().unwrap().trainable_vars().into_iter().collect();
    assert_eq!(vars.len(), 8);
    // Independent reference: mini i maps input chunk i to output chunk i with s = alpha / r_i.
    let x = Tensor::randn(0f32, 1., (3, 32), &test_device())?;
    let s = 16.0 / 2.0;
    let mut chunks = Vec::new();
    for i in 0..4 {
        let (a, b) =
            (vars[&format!("melora_A.{i}.weight")].as_tensor(), vars[&format!("melora_B.{i}.weight")].as_tensor());
        assert_eq!((a.dims(), b.dims()), ([2, 8].as_slice(), [8, 2].as_slice()));
        let xi = x.narrow(1, 8 * i, 8)?.contiguous()?; // a copy: the `mkl` build multiplies no strided view
        chunks.push((xi.matmul(&a.t()?)?.matmul(&b.t()?)? * s)?);
    }
    let want = (x.matmul(&layer.weight().dense()?.t()?)? + Tensor::cat(&chunks, 1)?)?;
    assert_close(&layer.forward_checked(&x)?, &want, 1e-5, "MELoRA forward");
    // n times fewer parameters than a LoRA of the equivalent rank: 8 * (32 + 32) / 4 per layer.
    assert_eq!(peft.parameter_count().trainable, 2 * 8 * 64 / 4);

    // Dimensions not divisible by n are refused, naming the module.
    let config = MeloraConfig { lora: candle_peft::LoraConfig::lora(9, 16.0, &["q_proj"]), n: 3 };
    let e = PeftModel::new(tiny_llama(), AdapterConfig::Melora(config), InitOptions::default()).unwrap_err();
    assert!(e.to_string().contains("divisible") && e.to_string().contains("q_proj"), "{e}");
    // Round trip through the file format.
    let dir = tempfile::tempdir().unwrap();
    peft.save_pretrained(dir.path())?;
    let back = PeftModel::from_pretrained(tiny_llama(), dir.path(), DType::F32)?;
    let l2 = back.model().get("model.layers.0.self_attn.q_proj").unwrap();
    assert_close(&l2.forward_checked(&x)?, &want, 1e-6, "MELoRA reloaded");
    Ok(())
}

#[test]
fn randlora_bases_are_stored_once_and_bad_input_is_refused() -> candle_peft::Result<()> {
    let peft = check_adapter_dir("randlora")?;
    let storage = |t: &Tensor| {
        let (s, _) = t.storage_and_layout();
        &*s as *const _ as usize
    };
    let shared: BTreeSet<usize> = peft.shared_tensors().values().map(storage).collect();
    let held: BTreeSet<usize> = peft
        .model()
        .linears()
        .iter()
        .filter_map(|(_, l)| l.adapter())
        .flat_map(|a| a.frozen_tensors())
        .map(|t| storage(&t))
        .collect();
    assert_eq!(held, shared, "every layer holds the two shared bases, no copies");

    // A rank above min(in, out) of a targeted layer (v_proj: 32 -> 16).
    let config = candle_peft::RandLoraConfig::new(17, &["v_proj"]);
    let e = PeftModel::new(tiny_llama(), AdapterConfig::RandLora(config), InitOptions::default()).unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { name: "r", .. }), "{e}");

    // Shared bases in a file too small for the layers.
    let src = fixture("tiny_llama/randlora");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join(CONFIG_FILE), dir.path().join(CONFIG_FILE)).unwrap();
    let mut t = read_safetensors(&src.join(WEIGHTS_FILE), &test_device())?;
    let b = t["base_model.randlora_B"].narrow(1, 0, 2)?;
    t.insert("base_model.randlora_B".into(), b);
    candle_peft::format::write_safetensors(&dir.path().join(WEIGHTS_FILE), &t.into_iter().collect::<Vec<_>>())?;
    let e = PeftModel::from_pretrained(tiny_llama(), dir.path(), DType::F32).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }) && e.to_string().contains("randlora"), "{e}");

    // The paper's 2 / sqrt(nb) is a strategy: nb = 4 for q_proj (32 / r=8).
    let config = candle_peft::RandLoraConfig {
        scaling: Some(std::sync::Arc::new(candle_peft::RandLoraPaper)),
        init_weights: false,
        ..candle_peft::RandLoraConfig::new(8, &["q_proj"])
    };
    let paper = PeftModel::new(tiny_llama(), AdapterConfig::RandLora(config.clone()), InitOptions::default())?;
    let peft_scale = PeftModel::new(
        tiny_llama(),
        AdapterConfig::RandLora(candle_peft::RandLoraConfig { scaling: None, ..config }),
        InitOptions::default(),
    )?;
    let path = "model.layers.0.self_attn.q_proj";
    let d_paper = paper.model().get(path).unwrap().merged_weight()?;
    let d_peft = peft_scale.model().get(path).unwrap().merged_weight()?;
    let w0 = paper.model().get(path).unwrap().weight().dense()?;
    let ratio = ((d_paper - &w0)?.abs()?.sum_all()?.to_scalar::<f32>()?
        / (d_peft - &w0)?.abs()?.sum_all()?.to_scalar::<f32>()?) as f64;
    let want = (2.0 / 2.0) / (640.0 / 8.0); // (2 / sqrt(4)) / (alpha / r)
    assert!((ratio - want).abs() < 1e-4 * want, "{ratio} vs {want}");
    Ok(())
}

#[derive(serde::Deserialize)]
struct MeloraCase {
    name: String,
    n: usize,
    r: usize,
    alpha: f64,
    bias: bool,
}

#[test]
fn melora_matches_the_pytorch_reference() -> candle_peft::Result<()> {
    let t = load("melora_cases.safetensors");
    let cases: Vec<MeloraCase> =
        serde_json::from_str(&std::fs::read_to_string(fixture("melora_cases.json")).unwrap()).unwrap();
    for c in cases {
        let get = |k: &str| t[&format!("{}.{k}", c.name)].clone();
        let w = get("w");
        let config = AdapterConfig::Melora(MeloraConfig {
            n: c.n,
            lora: candle_peft::LoraConfig::lora(c.r, c.alpha, &["proj"]),
        });
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
        let base = candle_peft::BaseLayer { weight: &candle_peft::FrozenWeight::from(w.clone()), bias: None };
        let shared = Default::default();
        let ctx = BuildContext { path: "proj", base, dtype: DType::F32, rng: &mut rng, shared: &shared };
        let built = config.build(ctx)?;
        let mut layer = candle_peft::AdaptedLinear::new(w.clone(), c.bias.then(|| get("b")))?;
        layer.insert_adapter(DEFAULT_ADAPTER, built.adapter, None)?;
        let keys: Vec<String> = layer.adapter().unwrap().trainable_vars().into_iter().map(|(k, _)| k).collect();
        for k in &keys {
            layer.adapter_mut().unwrap().load_tensor(k, &get(k))?;
        }
        let x = Var::from_tensor(&get("x"))?;
        let y = layer.forward_checked(x.as_tensor())?;
        assert_close(&y, &get("y"), 1e-5, &format!("{} forward", c.name));
        let grads = (&y * get("g"))?.sum_all()?.backward()?;
        for (k, v) in layer.adapter().unwrap().trainable_vars() {
            assert_close(
                grads.get(v.as_tensor()).unwrap(),
                &get(&format!("grad.{k}")),
                1e-4,
                &format!("{} grad {k}", c.name),
            );
        }
        assert_close(grads.get(x.as_tensor()).unwrap(), &get("grad_x"), 1e-4, &format!("{} grad x", c.name));
        layer.merge()?;
        assert_close(&layer.weight().dense()?, &get("merged"), 1e-5, &format!("{} merge", c.name));
        layer.unmerge()?;
        assert_close(&layer.weight().dense()?, &w, 1e-6, &format!("{} unmerge", c.name));
    }
    Ok(())
}
