//! Adapter directories in HF PEFT's format: PEFT-saved adapters of a tiny LLaMA load and give
//! PEFT's outputs; adapters we save have PEFT's keys, shapes and config fields.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{DType, Tensor};
use candle_peft::format::{read_safetensors, write_safetensors, CONFIG_FILE, WEIGHTS_FILE};
use candle_peft::{AdapterConfig, Error, Fixed, InitOptions, LinearHost, LoraConfig, PeftModel};
use common::{assert_close, fixture, test_device, tiny_llama};
use serde_json::Value;

const ADAPTERS: [&str; 4] = ["lora", "rslora_all_linear", "lora_layers", "dora"];

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn peft_saved_adapters_reproduce_peft_outputs_and_merges() -> candle_peft::Result<()> {
    for name in ADAPTERS {
        common::check_adapter_dir(name)?;
    }
    Ok(())
}

/// Compares two adapter_config.json values field by field (`target_modules` as a set: PEFT
/// stores it as a Python set, whose order varies from run to run).
fn assert_same_config(ours: &Value, peft: &Value, what: &str) {
    let (o, p) = (ours.as_object().unwrap(), peft.as_object().unwrap());
    let ok: BTreeSet<&String> = o.keys().collect();
    let pk: BTreeSet<&String> = p.keys().collect();
    assert_eq!(ok, pk, "{what}: config fields");
    for (k, pv) in p {
        let ov = &o[k];
        if k == "target_modules" && pv.is_array() {
            let set = |v: &Value| {
                v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect::<BTreeSet<_>>()
            };
            assert_eq!(set(ov), set(pv), "{what}: {k}");
        } else {
            assert_eq!(ov, pv, "{what}: field {k}");
        }
    }
}

#[test]
fn saved_adapters_have_peft_keys_shapes_and_config() -> candle_peft::Result<()> {
    for name in ADAPTERS {
        let dir = fixture(&format!("tiny_llama/{name}"));
        let config = AdapterConfig::from_file(&dir.join(CONFIG_FILE))?;
        let peft = PeftModel::new(tiny_llama(), config, InitOptions::default())?;
        let out = tempdir();
        peft.save_pretrained(out.path())?;

        let shapes = |p: &Path| -> BTreeMap<String, Vec<usize>> {
            read_safetensors(p, &test_device()).unwrap().into_iter().map(|(k, t)| (k, t.dims().to_vec())).collect()
        };
        assert_eq!(shapes(&out.path().join(WEIGHTS_FILE)), shapes(&dir.join(WEIGHTS_FILE)), "{name}: keys and shapes");
        let read = |p: &Path| -> Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
        assert_same_config(&read(&out.path().join(CONFIG_FILE)), &read(&dir.join(CONFIG_FILE)), name);
    }
    Ok(())
}

#[test]
fn save_then_load_is_bit_exact() -> candle_peft::Result<()> {
    let dir = fixture("tiny_llama/lora");
    let peft = PeftModel::from_pretrained(tiny_llama(), &dir, DType::F32)?;
    let out = tempdir();
    peft.save_pretrained(out.path())?;
    let back = PeftModel::from_pretrained(tiny_llama(), out.path(), DType::F32)?;
    let a = peft.saved_tensors()?;
    let b: BTreeMap<String, Tensor> = back.saved_tensors()?.into_iter().collect();
    assert_eq!(a.len(), b.len());
    for (k, t) in a {
        assert_eq!(t.flatten_all()?.to_vec1::<f32>()?, b[&k].flatten_all()?.to_vec1::<f32>()?, "{k}");
    }
    Ok(())
}

#[test]
fn a_custom_strategy_is_saved_as_an_equivalent_alpha() -> candle_peft::Result<()> {
    let mut config = LoraConfig::lora(4, 8.0, &["q_proj", "v_proj"]).with_scaling(Fixed(0.75));
    config.rank_pattern.insert("layers.1.self_attn.q_proj".into(), 2);
    config.init_lora_weights = candle_peft::LoraInit::Random;
    let peft = PeftModel::new(tiny_llama(), AdapterConfig::Lora(config), InitOptions::default())?;
    let out = tempdir();
    peft.save_pretrained(out.path())?;
    let json: Value = serde_json::from_str(&std::fs::read_to_string(out.path().join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(json["lora_alpha"], 3, "0.75 * r=4");
    assert_eq!(json["alpha_pattern"]["layers.1.self_attn.q_proj"], 1.5, "0.75 * r=2");
    assert_eq!(json["use_rslora"], false);

    // Loaded back as plain alpha/r, every layer computes what the fixed factor computed.
    let back = PeftModel::from_pretrained(tiny_llama(), out.path(), DType::F32)?;
    for ((p, ours), (_, theirs)) in peft.model().linears().into_iter().zip(back.model().linears()) {
        let x = Tensor::randn(0f32, 1., (2, ours.features().0), &test_device())?;
        assert_close(&ours.forward_checked(&x)?, &theirs.forward_checked(&x)?, 1e-6, &p);
    }
    Ok(())
}

#[test]
fn trainable_vars_and_parameter_count() -> candle_peft::Result<()> {
    let peft = PeftModel::from_pretrained(tiny_llama(), &fixture("tiny_llama/lora"), DType::F32)?;
    let named = peft.named_trainable_vars()?;
    // q (32->32) r=4 in layer 0, r=2 in layer 1; v (32->16) r=4; down (48->32) r=4; two layers.
    let expected = (4 * 32 + 32 * 4) + (2 * 32 + 32 * 2) + 2 * (4 * 32 + 16 * 4) + 2 * (4 * 48 + 32 * 4);
    let count = peft.parameter_count();
    assert_eq!(count.trainable, expected);
    assert_eq!(named.iter().map(|(_, v)| v.elem_count()).sum::<usize>(), expected);
    assert!(named.iter().all(|(k, _)| k.starts_with("base_model.model.model.layers.")));
    assert!(count.to_string().starts_with(&format!("trainable params: {expected} || all params: ")));
    Ok(())
}

#[test]
fn merge_then_unmerge_restores_every_base_weight() -> candle_peft::Result<()> {
    let mut peft = PeftModel::from_pretrained(tiny_llama(), &fixture("tiny_llama/rslora_all_linear"), DType::F32)?;
    let before: Vec<Tensor> = peft.model().linears().iter().map(|(_, l)| l.weight().dense().unwrap()).collect();
    let x = Tensor::randn(0f32, 1., (3, 32), &test_device())?;
    let path = "model.layers.1.self_attn.q_proj";
    let unmerged = peft.model().get(path).unwrap().forward_checked(&x)?;
    peft.merge()?;
    assert_close(&peft.model().get(path).unwrap().forward_checked(&x)?, &unmerged, 1e-5, "merged forward");
    assert!(matches!(peft.merge(), Err(Error::MergeState(_))));
    peft.unmerge()?;
    for ((_, l), w0) in peft.model().linears().iter().zip(&before) {
        let d = (l.weight().dense()? - w0)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d <= 1e-6, "{d}");
    }
    Ok(())
}

// ---- bad input ----

fn copy_adapter(name: &str) -> tempfile::TempDir {
    let out = tempdir();
    for f in [CONFIG_FILE, WEIGHTS_FILE] {
        std::fs::copy(fixture(&format!("tiny_llama/{name}/{f}")), out.path().join(f)).unwrap();
    }
    out
}

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) {
    let path = dir.join(WEIGHTS_FILE);
    let mut t = read_safetensors(&path, &test_device()).unwrap();
    edit(&mut t);
    write_safetensors(&path, &t.into_iter().collect::<Vec<_>>()).unwrap();
}

#[test]
fn missing_and_unexpected_keys_are_listed() {
    let dir = copy_adapter("lora");
    let gone = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight";
    rewrite_weights(dir.path(), |t| {
        t.remove(gone);
        t.insert(
            "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight".into(),
            Tensor::zeros((4, 32), DType::F32, &test_device()).unwrap(),
        );
    });
    let e = PeftModel::from_pretrained(tiny_llama(), dir.path(), DType::F32).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::KeyMismatch { .. }), "{msg}");
    assert!(msg.contains(gone) && msg.contains("gate_proj.lora_A"), "{msg}");
}

#[test]
fn a_wrong_shape_names_the_key_and_both_shapes() {
    let dir = copy_adapter("lora");
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    rewrite_weights(dir.path(), |t| {
        t.insert(key.into(), Tensor::zeros((3, 32), DType::F32, &test_device()).unwrap());
    });
    let e = PeftModel::from_pretrained(tiny_llama(), dir.path(), DType::F32).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(key) && msg.contains("[4, 32]") && msg.contains("[3, 32]"), "{msg}");
}

/// A NaN or an integer tensor in an adapter file is refused by name (a NaN adapter used to
/// evaluate to `{"loss": null}` and merge into a NaN model; integers were cast silently).
#[test]
fn non_finite_or_integer_adapter_tensors_are_refused_by_name() {
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    type Spoilt = fn() -> Tensor;
    let spoilt: [(Spoilt, &str); 3] = [
        (|| (Tensor::zeros((4, 32), DType::F32, &test_device()).unwrap() / 0.0).unwrap(), "NaN or infinite"),
        (
            || Tensor::full(f32::INFINITY, (4, 32), &test_device()).unwrap().to_dtype(DType::BF16).unwrap(),
            "128 of its 128 values are NaN or infinite",
        ),
        (|| Tensor::zeros((4, 32), DType::I64, &test_device()).unwrap(), "I64 values"),
    ];
    for (tensor, says) in spoilt {
        let dir = copy_adapter("lora");
        rewrite_weights(dir.path(), |t| {
            t.insert(key.into(), tensor());
        });
        let e = PeftModel::from_pretrained(tiny_llama(), dir.path(), DType::F32).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Safetensors { .. }) && msg.contains(key) && msg.contains(says), "{msg}");
        assert!(msg.contains(WEIGHTS_FILE), "the error names the file: {msg}");
    }
}

#[test]
fn truncated_weights_and_malformed_configs_are_errors() {
    let dir = copy_adapter("lora");
    let w = dir.path().join(WEIGHTS_FILE);
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let e = PeftModel::from_pretrained(tiny_llama(), dir.path(), DType::F32).unwrap_err();
    assert!(matches!(e, Error::Safetensors { .. }), "{e}");

    let dir = copy_adapter("lora");
    std::fs::write(dir.path().join(CONFIG_FILE), "{\"peft_type\": \"LORA\", ").unwrap();
    let e = PeftModel::from_pretrained(tiny_llama(), dir.path(), DType::F32).unwrap_err();
    assert!(matches!(e, Error::Config { .. }) && e.to_string().contains("malformed JSON"), "{e}");

    let dir = copy_adapter("lora");
    std::fs::write(dir.path().join(CONFIG_FILE), r#"{"peft_type": "IA3", "target_modules": ["q_proj"]}"#).unwrap();
    let e = PeftModel::from_pretrained(tiny_llama(), dir.path(), DType::F32).unwrap_err();
    assert!(e.to_string().contains("IA3"), "{e}");
}

#[test]
fn unknown_target_modules_list_the_available_ones() {
    let config = AdapterConfig::Lora(LoraConfig::lora(4, 8.0, &["qkv_proj"]));
    let e = PeftModel::new(tiny_llama(), config, InitOptions::default()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::NoTargetModules { .. }), "{msg}");
    assert!(
        msg.contains("qkv_proj") && msg.contains("model.layers.0.self_attn.q_proj") && msg.contains("lm_head"),
        "{msg}"
    );
}
