//! The trainable LLaMA against transformers' LlamaForCausalLM (fixtures from generate.py):
//! logits of the base model, logits with PEFT's LoRA adapter, and the gradients of every LoRA
//! tensor through the whole network.

mod common;

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use candle_peft::models::{Llama, LlamaConfig};
use candle_peft::{Error, PeftModel};
use common::{assert_close, fixture, load, test_device};

fn tiny() -> Llama {
    Llama::from_hf_dir(&fixture("tiny_llama"), &test_device(), DType::F32).unwrap()
}

#[test]
fn base_logits_match_transformers() -> candle_peft::Result<()> {
    let r = load("tiny_llama/llama_reference.safetensors");
    let logits = tiny().forward(&r["ids"])?;
    assert_close(&logits, &r["base_logits"], 1e-5, "base logits");
    Ok(())
}

#[test]
fn lora_logits_and_gradients_match_peft() -> candle_peft::Result<()> {
    let r = load("tiny_llama/llama_reference.safetensors");
    let peft = PeftModel::from_pretrained(tiny(), &fixture("tiny_llama/lora"), DType::F32)?;
    let logits = peft.model().forward(&r["ids"])?;
    assert_close(&logits, &r["logits"], 1e-5, "adapted logits");
    let grads = (&logits * &r["g"])?.sum_all()?.backward()?;
    let named = peft.named_trainable_vars()?;
    assert_eq!(named.len(), 12);
    for (key, var) in named {
        assert_close(grads.get(var.as_tensor()).unwrap(), &r[&format!("grad.{key}")], 1e-4, &key);
    }
    Ok(())
}

/// Every other PEFT-saved adapter of the tiny LLaMA reproduces PEFT's whole-model logits.
#[test]
fn other_peft_adapters_reproduce_peft_logits() -> candle_peft::Result<()> {
    let r = load("tiny_llama/llama_reference.safetensors");
    for name in ["dora", "rslora_all_linear", "vera", "randlora", "randlora_wide"] {
        let peft = PeftModel::from_pretrained(tiny(), &fixture(&format!("tiny_llama/{name}")), DType::F32)?;
        let logits = peft.model().forward(&r["ids"])?;
        assert_close(&logits, &r[&format!("{name}.logits")], 1e-5, name);
        assert!(common::rel_err(&logits, &r["base_logits"]) > 1e-4, "{name}: the adapter changes nothing");
    }
    Ok(())
}

#[test]
fn bad_model_dirs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = Llama::from_hf_dir(dir.path(), &test_device(), DType::F32).unwrap_err();
    assert!(matches!(e, Error::Io { .. }) && e.to_string().contains("config.json"), "{e}");
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "gpt2", "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10}"#,
    )
    .unwrap();
    let e = Llama::from_hf_dir(dir.path(), &test_device(), DType::F32).unwrap_err();
    assert!(e.to_string().contains("gpt2"), "{e}");
    std::fs::copy(fixture("tiny_llama/config.json"), dir.path().join("config.json")).unwrap();
    let e = Llama::from_hf_dir(dir.path(), &test_device(), DType::F32).unwrap_err();
    assert!(e.to_string().contains("safetensors"), "{e}");
    // Weights with a tensor missing name it.
    let mut t =
        candle_peft::format::read_safetensors(&fixture("tiny_llama/model.safetensors"), &test_device()).unwrap();
    t.remove("model.layers.1.mlp.up_proj.weight");
    candle_peft::format::write_safetensors(&dir.path().join("model.safetensors"), &t.into_iter().collect::<Vec<_>>())
        .unwrap();
    let e = Llama::from_hf_dir(dir.path(), &test_device(), DType::F32).unwrap_err();
    assert!(e.to_string().contains("model.layers.1.mlp.up_proj.weight"), "{e}");
    // A config that claims 10^9 layers over the weights of 2 fails at layer 2, without
    // allocating for 10^9 (it aborted).
    std::fs::copy(fixture("tiny_llama/model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny_llama/config.json")).unwrap()).unwrap();
    config["num_hidden_layers"] = 1_000_000_000.into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let e = Llama::from_hf_dir(dir.path(), &test_device(), DType::F32).unwrap_err();
    assert!(e.to_string().contains("model.layers.2."), "{e}");
}

#[test]
fn the_kv_cache_gives_the_full_forward_logits_and_the_same_greedy_tokens() -> candle_peft::Result<()> {
    let model = tiny();
    let ids: Vec<u32> = vec![3, 17, 42, 5, 9, 60, 1, 33, 12];
    let full = model.forward(&Tensor::new(ids.as_slice(), &test_device())?.unsqueeze(0)?)?.squeeze(0)?;
    // The same positions in three calls: 5 tokens, then 1, then 3.
    let mut cache = candle_peft::models::KvCache::default();
    let mut parts = Vec::new();
    for chunk in [&ids[..5], &ids[5..6], &ids[6..]] {
        parts.push(model.forward_cached(&Tensor::new(chunk, &test_device())?.unsqueeze(0)?, &mut cache)?.squeeze(0)?);
    }
    assert_eq!(cache.len(), ids.len());
    let cached = Tensor::cat(&parts, 0)?;
    let diff = (cached - &full)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-5, "cached logits differ by {diff}");

    // Greedy decoding with the cache against recomputing the whole prefix every step.
    let mut reference = ids[..4].to_vec();
    for _ in 0..8 {
        let logits = model.forward(&Tensor::new(reference.as_slice(), &test_device())?.unsqueeze(0)?)?;
        reference.push(logits.squeeze(0)?.get(reference.len() - 1)?.argmax(0)?.to_scalar::<u32>()?);
    }
    assert_eq!(model.generate_greedy(&ids[..4], 8, &[])?, reference[4..]);
    // Any of the stop tokens ends generation, itself included.
    let first_stop = reference[4..].iter().position(|&t| t == reference[5]).unwrap();
    assert_eq!(model.generate_greedy(&ids[..4], 8, &[999, reference[5]])?, reference[4..4 + first_stop + 1]);
    assert!(model.generate_greedy(&[], 3, &[]).is_err());
    Ok(())
}

/// The tiny fixture's `config.json` with `field` set to `value`, next to its weights.
fn dir_with(field: &str, value: serde_json::Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny_llama/config.json")).unwrap()).unwrap();
    config[field] = value;
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    std::fs::copy(fixture("tiny_llama/model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    dir
}

#[test]
fn zero_or_inconsistent_sizes_in_config_json_are_clear_errors() {
    // The fixture: hidden 32, 4 heads of head_dim 8, 2 key/value heads.
    for (field, value, says) in [
        ("num_attention_heads", serde_json::json!(0), "is 0; expected at least 1"),
        ("num_key_value_heads", serde_json::json!(0), "is 0; expected at least 1"),
        ("num_key_value_heads", serde_json::json!(3), "is 3, which does not divide num_attention_heads (4)"),
        ("hidden_size", serde_json::json!(0), "is 0; expected at least 1"),
        ("intermediate_size", serde_json::json!(0), "is 0; expected at least 1"),
        ("num_hidden_layers", serde_json::json!(0), "is 0; expected at least 1"),
        ("vocab_size", serde_json::json!(0), "is 0; expected at least 1"),
        ("head_dim", serde_json::json!(7), "expected a positive even number"),
        ("rms_norm_eps", serde_json::json!(-1.0), "expected a small positive number"),
    ] {
        let dir = dir_with(field, value.clone());
        let e = Llama::from_hf_dir(dir.path(), &test_device(), DType::F32).unwrap_err();
        let config = dir.path().join("config.json");
        assert!(
            matches!(&e, Error::ModelConfig { path: Some(p), field: f, .. } if *p == config && f == field),
            "{field} = {value}: {e}"
        );
        let text = e.to_string();
        assert!(text.contains(&config.display().to_string()) && text.contains(field) && text.contains(says), "{text}");
    }
    // Without head_dim, the heads must split hidden_size evenly.
    let dir = dir_with("head_dim", serde_json::Value::Null);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    config["num_attention_heads"] = 3.into();
    config["num_key_value_heads"] = 1.into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let e = Llama::from_hf_dir(dir.path(), &test_device(), DType::F32).unwrap_err();
    assert!(e.to_string().contains("num_attention_heads is 3, which does not divide hidden_size (32)"), "{e}");
    // The unmodified config loads: the errors above come from the values, not from the copy.
    let dir = dir_with("num_attention_heads", serde_json::json!(4));
    Llama::from_hf_dir(dir.path(), &test_device(), DType::F32).expect("the fixture loads");
}

fn small_config() -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 64, "rms_norm_eps": 1e-6
    }))
    .unwrap()
}

#[test]
fn a_config_built_in_code_is_checked_by_every_constructor() {
    let zero_heads = LlamaConfig { num_attention_heads: 0, ..small_config() };
    assert_eq!(zero_heads.head_dim(), 0, "no division by zero");
    let e = zero_heads.validate().unwrap_err();
    assert!(matches!(&e, Error::ModelConfig { path: None, field, .. } if field == "num_attention_heads"), "{e}");
    let e = Llama::random(zero_heads.clone(), 0, &test_device()).unwrap_err();
    assert!(e.to_string().contains("num_attention_heads is 0; expected at least 1"), "{e}");
    let good = Llama::random(small_config(), 0, &test_device()).unwrap();
    let e = Llama::from_tensors(zero_heads, &good.tensors().unwrap(), DType::F32).unwrap_err();
    assert!(matches!(&e, Error::ModelConfig { field, .. } if field == "num_attention_heads"), "{e}");
    let e =
        Llama::random(LlamaConfig { num_key_value_heads: Some(0), ..small_config() }, 0, &test_device()).unwrap_err();
    assert!(matches!(&e, Error::ModelConfig { field, .. } if field == "num_key_value_heads"), "{e}");
    let rope = LlamaConfig { rope_scaling: Some(serde_json::json!({"type": "yarn"})), ..small_config() };
    assert!(matches!(rope.validate(), Err(Error::ModelConfig { field, .. }) if field == "rope_scaling.rope_type"));
    let rope = LlamaConfig { rope_scaling: Some(serde_json::json!({"type": "linear"})), ..small_config() };
    assert!(matches!(rope.validate(), Err(Error::ModelConfig { field, .. }) if field == "rope_scaling.factor"));
}

/// llama.cpp's name of an HF tensor name (the inverse of the loader's table).
fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, tail) = rest.split_once('.').unwrap();
    let tail = match tail {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => panic!("unexpected tensor {other}"),
    };
    format!("blk.{layer}.{tail}")
}

/// Writes a GGUF file of a random `small_config()` model whose metadata says `heads` query and
/// `kv_heads` key/value heads, plus `extra` metadata.
fn write_gguf(path: &Path, heads: u32, kv_heads: u32, extra: &[(&str, Value)]) {
    let model = Llama::random(small_config(), 0, &test_device()).unwrap();
    let tensors: Vec<(String, QTensor)> = model
        .tensors()
        .unwrap()
        .into_iter()
        .map(|(name, t)| (gguf_name(&name), QTensor::quantize(&t, GgmlDType::F32).unwrap()))
        .collect();
    let mut metadata = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(32)),
        ("llama.feed_forward_length", Value::U32(48)),
        ("llama.block_count", Value::U32(1)),
        ("llama.attention.head_count", Value::U32(heads)),
        ("llama.attention.head_count_kv", Value::U32(kv_heads)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
    ];
    metadata.extend(extra.iter().cloned());
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(
        &mut file,
        &metadata.iter().map(|(k, v)| (*k, v)).collect::<Vec<_>>(),
        &tensors.iter().map(|(k, t)| (k.as_str(), t)).collect::<Vec<_>>(),
    )
    .unwrap();
}

#[test]
fn a_gguf_with_zero_or_inconsistent_head_counts_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    // The file as written loads and runs: the errors below come from the head counts alone.
    write_gguf(&path, 4, 2, &[]);
    let (model, _) = Llama::from_gguf(&path, &test_device(), DType::F32).expect("a valid GGUF loads");
    assert_eq!((model.config().num_attention_heads, model.config().kv_heads()), (4, 2));
    model.forward(&Tensor::new(&[[1u32, 2, 3]], &test_device()).unwrap()).unwrap();
    for (heads, kv, key, says) in [
        (0, 2, "llama.attention.head_count", "is 0; expected at least 1"),
        (4, 0, "llama.attention.head_count_kv", "is 0; expected at least 1"),
        (4, 3, "llama.attention.head_count_kv", "does not divide llama.attention.head_count (4)"),
        (3, 1, "llama.attention.head_count", "does not divide llama.embedding_length (32)"),
    ] {
        write_gguf(&path, heads, kv, &[]);
        let e = Llama::from_gguf(&path, &test_device(), DType::F32).unwrap_err();
        assert!(
            matches!(&e, Error::ModelConfig { path: Some(p), field, .. } if *p == path && field == key),
            "head_count {heads}, head_count_kv {kv}: {e}"
        );
        let text = e.to_string();
        assert!(text.contains("tiny.gguf") && text.contains(says), "{text}");
    }
}

#[test]
fn a_gguf_tokenizer_with_a_bad_merge_or_a_missing_key_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tok.gguf");
    let strings = |xs: &[&str]| Value::Array(xs.iter().map(|s| Value::String(s.to_string())).collect());
    let tokens = strings(&["a", "b", "ab"]);
    write_gguf(
        &path,
        4,
        2,
        &[
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens", tokens.clone()),
            ("tokenizer.ggml.merges", strings(&["a b"])),
        ],
    );
    let meta = candle_peft::gguf::GgufMetadata::read(&path).unwrap();
    let tokenizer = candle_peft::tokenizer::from_gguf(&meta).expect("a valid vocabulary builds");
    assert_eq!(candle_peft::tokenizer::encode(&tokenizer, "ab").unwrap(), vec![2]);

    write_gguf(
        &path,
        4,
        2,
        &[
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens", tokens),
            ("tokenizer.ggml.merges", strings(&["ab"])),
        ],
    );
    let meta = candle_peft::gguf::GgufMetadata::read(&path).unwrap();
    let e = candle_peft::tokenizer::from_gguf(&meta).unwrap_err();
    assert!(matches!(e, Error::Tokenizer(_)), "{e}");
    let text = e.to_string();
    assert!(text.contains("tokenizer") && text.contains("tok.gguf") && text.contains("`ab`"), "{text}");

    // A key the tokenizer needs and the file lacks: named, with the file.
    write_gguf(&path, 4, 2, &[("tokenizer.ggml.model", Value::String("gpt2".into()))]);
    let meta = candle_peft::gguf::GgufMetadata::read(&path).unwrap();
    let e = candle_peft::tokenizer::from_gguf(&meta).unwrap_err();
    assert!(matches!(&e, Error::Config { path: p, .. } if *p == path), "{e}");
    assert!(e.to_string().contains("tokenizer.ggml.tokens"), "{e}");
    // A value of the wrong type names its key.
    let e = meta.u32("general.architecture").unwrap_err();
    assert!(e.to_string().contains("general.architecture") && e.to_string().contains("tok.gguf"), "{e}");
}
