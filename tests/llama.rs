//! The trainable LLaMA against transformers' LlamaForCausalLM (fixtures from generate.py):
//! logits of the base model, logits with PEFT's LoRA adapter, and the gradients of every LoRA
//! tensor through the whole network.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_peft::models::Llama;
use candle_peft::{Error, PeftModel};
use common::{assert_close, fixture, load};

fn tiny() -> Llama {
    Llama::from_hf_dir(&fixture("tiny_llama"), &Device::Cpu, DType::F32).unwrap()
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
    let e = Llama::from_hf_dir(dir.path(), &Device::Cpu, DType::F32).unwrap_err();
    assert!(matches!(e, Error::Io { .. }) && e.to_string().contains("config.json"), "{e}");
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "gpt2", "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10}"#,
    )
    .unwrap();
    let e = Llama::from_hf_dir(dir.path(), &Device::Cpu, DType::F32).unwrap_err();
    assert!(e.to_string().contains("gpt2"), "{e}");
    std::fs::copy(fixture("tiny_llama/config.json"), dir.path().join("config.json")).unwrap();
    let e = Llama::from_hf_dir(dir.path(), &Device::Cpu, DType::F32).unwrap_err();
    assert!(e.to_string().contains("safetensors"), "{e}");
    // Weights with a tensor missing name it.
    let mut t = candle_peft::format::read_safetensors(&fixture("tiny_llama/model.safetensors"), &Device::Cpu).unwrap();
    t.remove("model.layers.1.mlp.up_proj.weight");
    candle_peft::format::write_safetensors(&dir.path().join("model.safetensors"), &t.into_iter().collect::<Vec<_>>())
        .unwrap();
    let e = Llama::from_hf_dir(dir.path(), &Device::Cpu, DType::F32).unwrap_err();
    assert!(e.to_string().contains("model.layers.1.mlp.up_proj.weight"), "{e}");
}

#[test]
fn the_kv_cache_gives_the_full_forward_logits_and_the_same_greedy_tokens() -> candle_peft::Result<()> {
    let model = tiny();
    let ids: Vec<u32> = vec![3, 17, 42, 5, 9, 60, 1, 33, 12];
    let full = model.forward(&Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?)?.squeeze(0)?;
    // The same positions in three calls: 5 tokens, then 1, then 3.
    let mut cache = candle_peft::models::KvCache::default();
    let mut parts = Vec::new();
    for chunk in [&ids[..5], &ids[5..6], &ids[6..]] {
        parts.push(model.forward_cached(&Tensor::new(chunk, &Device::Cpu)?.unsqueeze(0)?, &mut cache)?.squeeze(0)?);
    }
    assert_eq!(cache.len(), ids.len());
    let cached = Tensor::cat(&parts, 0)?;
    let diff = (cached - &full)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-5, "cached logits differ by {diff}");

    // Greedy decoding with the cache against recomputing the whole prefix every step.
    let mut reference = ids[..4].to_vec();
    for _ in 0..8 {
        let logits = model.forward(&Tensor::new(reference.as_slice(), &Device::Cpu)?.unsqueeze(0)?)?;
        reference.push(logits.squeeze(0)?.get(reference.len() - 1)?.argmax(0)?.to_scalar::<u32>()?);
    }
    assert_eq!(model.generate_greedy(&ids[..4], 8, None)?, reference[4..]);
    assert!(model.generate_greedy(&[], 3, None).is_err());
    Ok(())
}
