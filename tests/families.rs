//! The LLaMA-layout families (Llama 3, Mistral, Qwen2, Qwen3, Gemma 3, Phi-3) against transformers' own model
//! classes (fixtures from `generate.py --families`): logits of the base model, logits with a
//! PEFT LoRA adapter on every linear and the gradient of every LoRA tensor; the KV cache and
//! activation checkpointing through their switches (windows, biases, q/k norms); configs whose
//! math is not implemented refused by name.

mod common;

use candle_core::{DType, Tensor};
use candle_peft::models::{Family, KvCache, Llama, LlamaConfig};
use candle_peft::PeftModel;
use common::{assert_close, fixture, load, test_device};

const FAMILIES: [(&str, Family); 6] = [
    ("llama3", Family::Llama),
    ("mistral", Family::Mistral),
    ("qwen2", Family::Qwen2),
    ("qwen3", Family::Qwen3),
    ("gemma3", Family::Gemma3),
    ("phi3", Family::Phi3),
];

fn model(name: &str) -> Llama {
    Llama::from_hf_dir(&fixture(&format!("families/{name}")), &test_device(), DType::F32).unwrap()
}

#[test]
fn every_family_matches_transformers_and_peft() -> candle_peft::Result<()> {
    for (name, family) in FAMILIES {
        let r = load(&format!("families/{name}/reference.safetensors"));
        let base = model(name);
        assert_eq!(base.config().family(), family, "{name}");
        assert_close(&base.forward(&r["ids"])?, &r["base_logits"], 1e-5, &format!("{name} base logits"));
        let peft = PeftModel::from_pretrained(base, &fixture(&format!("families/{name}/lora")), DType::F32)?;
        // Every tensor of the checkpoint is counted once (a tied head is the embedding).
        let file = candle_peft::format::read_safetensors(
            &fixture(&format!("families/{name}/model.safetensors")),
            &test_device(),
        )?;
        let count = peft.parameter_count();
        assert_eq!(count.all - count.trainable, file.values().map(Tensor::elem_count).sum::<usize>(), "{name}");
        let logits = peft.model().forward(&r["ids"])?;
        assert_close(&logits, &r["logits"], 1e-5, &format!("{name} logits with LoRA"));
        let grads = (&logits * &r["g"])?.sum_all()?.backward()?;
        let named = peft.named_trainable_vars()?;
        let (layers, linears) = (peft.model().config().num_hidden_layers, peft.model().config().layer_linears().len());
        assert_eq!(named.len(), 2 * linears * layers, "{name}: LoRA A and B on every linear of every layer");
        for (key, var) in named {
            assert_close(
                grads.get(var.as_tensor()).unwrap(),
                &r[&format!("grad.{key}")],
                1e-4,
                &format!("{name} {key}"),
            );
        }
    }
    Ok(())
}

/// The switches matter: each fixture's logits move when its family's feature is taken away.
#[test]
fn the_family_switches_are_what_the_reference_needs() -> candle_peft::Result<()> {
    let dir = fixture("families");
    let edited = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| -> candle_peft::Result<f32> {
        let tmp = tempfile::tempdir().unwrap();
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(name).join("config.json")).unwrap()).unwrap();
        edit(&mut config);
        std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
        std::fs::copy(dir.join(name).join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
        let r = load(&format!("families/{name}/reference.safetensors"));
        let logits = Llama::from_hf_dir(tmp.path(), &test_device(), DType::F32)?.forward(&r["ids"])?;
        Ok(common::rel_err(&logits, &r["base_logits"]))
    };
    let no_window = edited("mistral", &|c| c["sliding_window"] = serde_json::Value::Null)?;
    assert!(no_window > 1e-3, "mistral without its window: {no_window}");
    let no_window = edited("qwen2", &|c| c["use_sliding_window"] = false.into())?;
    assert!(no_window > 1e-3, "qwen2 without its window: {no_window}");
    // Gemma's logit soft-capping (a Gemma 2 feature Gemma 3's config can set): cap * tanh(z / cap)
    // of transformers' logits.
    let capped = {
        let r = load("families/gemma3/reference.safetensors");
        let want = ((&r["base_logits"] / 5.0)?.tanh()? * 5.0)?;
        let tmp = tempfile::tempdir().unwrap();
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("gemma3/config.json")).unwrap()).unwrap();
        config["final_logit_softcapping"] = 5.0.into();
        std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
        std::fs::copy(dir.join("gemma3/model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
        let logits = Llama::from_hf_dir(tmp.path(), &test_device(), DType::F32)?.forward(&r["ids"])?;
        assert_close(&logits, &want, 1e-5, "gemma3 soft-capped logits");
        common::rel_err(&logits, &r["base_logits"])
    };
    assert!(capped > 1e-2, "the cap of 5 changed nothing: {capped}");
    let no_window = edited("phi3", &|c| c["sliding_window"] = serde_json::Value::Null)?;
    assert!(no_window > 1e-3, "phi3 without its window: {no_window}");
    let plain_rope = edited("llama3", &|c| c["rope_parameters"] = serde_json::json!({"rope_theta": 10000.0}))?;
    assert!(plain_rope > 1e-3, "llama3 without its RoPE scaling: {plain_rope}");
    let all_global = edited("gemma3", &|c| {
        c["layer_types"] = serde_json::json!(["full_attention", "full_attention", "full_attention"])
    })?;
    assert!(all_global > 1e-3, "gemma3 without its local layers: {all_global}");
    let one_base = edited("gemma3", &|c| c["rope_parameters"]["sliding_attention"]["rope_theta"] = 1e6.into())?;
    assert!(one_base > 1e-3, "gemma3 with the global RoPE base on local layers: {one_base}");
    let head_scale = edited("gemma3", &|c| c["query_pre_attn_scalar"] = 16.into())?;
    assert!(head_scale > 1e-3, "gemma3 scaled by 1 / sqrt(head_dim): {head_scale}");
    Ok(())
}

/// Cached decoding reads the window's keys only: logits equal the full forward's.
#[test]
fn the_kv_cache_keeps_the_windows() -> candle_peft::Result<()> {
    for (name, _) in FAMILIES {
        let m = model(name);
        let ids: Vec<u32> = vec![3, 17, 42, 5, 9, 60, 1, 33, 12];
        let full = m.forward(&Tensor::new(ids.as_slice(), &test_device())?.unsqueeze(0)?)?.squeeze(0)?;
        let mut cache = KvCache::default();
        let mut parts = Vec::new();
        for chunk in [&ids[..5], &ids[5..6], &ids[6..]] {
            parts.push(m.forward_cached(&Tensor::new(chunk, &test_device())?.unsqueeze(0)?, &mut cache)?.squeeze(0)?);
        }
        assert_close(&Tensor::cat(&parts, 0)?, &full, 1e-5, &format!("{name} cached logits"));
    }
    Ok(())
}

/// Batched greedy decoding of prompts of different lengths (left padding, hidden from each row)
/// gives each prompt's own continuation, in every family (windows, biases, q/k norms, Gemma's
/// local layers).
#[test]
fn batched_generation_of_unequal_prompts_equals_each_alone() -> candle_peft::Result<()> {
    for (name, _) in FAMILIES {
        let m = model(name);
        let prompts: [&[u32]; 3] = [&[3, 17, 42, 5, 9, 60, 1, 33, 12], &[7], &[40, 2, 9, 11]];
        let batch = m.generate_greedy_batch(&prompts, 6, &[])?;
        for (p, got) in prompts.iter().zip(&batch) {
            assert_eq!(got, &m.generate_greedy(p, 6, &[])?, "{name}: prompt {p:?}");
        }
    }
    Ok(())
}

/// Activation checkpointing recomputes each layer with its window, biases and norms: the same
/// loss and LoRA gradients as the plain backward.
#[test]
fn checkpointing_gives_the_plain_gradients() -> candle_peft::Result<()> {
    for (name, _) in FAMILIES {
        let r = load(&format!("families/{name}/reference.safetensors"));
        let peft = PeftModel::from_pretrained(model(name), &fixture(&format!("families/{name}/lora")), DType::F32)?;
        let g = r["g"].flatten_to(1)?;
        let plain_loss = (peft.model().forward(&r["ids"])?.flatten_to(1)? * &g)?.sum_all()?;
        let plain = plain_loss.backward()?;
        let part = |logits: &Tensor, range: std::ops::Range<usize>| -> candle_peft::Result<Tensor> {
            Ok((logits * g.narrow(0, range.start, range.len())?)?.sum_all()?)
        };
        let (loss, grads) = peft.model().checkpointed_loss_and_grads(&r["ids"], &part)?;
        let diff = (loss.to_scalar::<f32>()? - plain_loss.to_scalar::<f32>()?).abs();
        assert!(diff < 1e-3, "{name}: loss {diff}");
        for (key, var) in peft.named_trainable_vars()? {
            let (a, b) = (grads.get(var.as_tensor()).unwrap(), plain.get(var.as_tensor()).unwrap());
            assert_close(a, b, 1e-5, &format!("{name} checkpointed {key}"));
        }
    }
    Ok(())
}

/// An HF directory written by `save_hf_dir` loads back as the same family with the same logits.
#[test]
fn save_hf_dir_keeps_the_family() -> candle_peft::Result<()> {
    for (name, family) in FAMILIES {
        let r = load(&format!("families/{name}/reference.safetensors"));
        let dir = tempfile::tempdir().unwrap();
        model(name).save_hf_dir(dir.path())?;
        let again = Llama::from_hf_dir(dir.path(), &test_device(), DType::F32)?;
        assert_eq!(again.config().family(), family);
        assert_close(&again.forward(&r["ids"])?, &r["base_logits"], 1e-5, &format!("{name} reloaded"));
    }
    Ok(())
}

fn config(json: serde_json::Value) -> candle_peft::Result<LlamaConfig> {
    let dir = tempfile::tempdir().unwrap();
    let mut base = serde_json::json!({"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 64});
    base.as_object_mut().unwrap().extend(json.as_object().unwrap().clone());
    std::fs::write(dir.path().join("config.json"), base.to_string()).unwrap();
    LlamaConfig::from_file(&dir.path().join("config.json"))
}

#[test]
fn configs_that_change_the_math_are_read_or_refused_by_name() {
    // A Mistral config without the key gets transformers' default window; Qwen2's window
    // counts only with use_sliding_window.
    let mistral = config(serde_json::json!({"model_type": "mistral"})).unwrap();
    assert_eq!(mistral.layer_window(0), Some(4096));
    let qwen2 = config(serde_json::json!({"model_type": "qwen2", "sliding_window": 8, "use_sliding_window": false}));
    assert_eq!(qwen2.unwrap().layer_window(1), None);
    let qwen3 = config(serde_json::json!({"model_type": "qwen3"})).unwrap();
    assert_eq!(qwen3.head_dim(), 128);
    for (json, field, says) in [
        (serde_json::json!({"model_type": "gemma2"}), "model_type", "gemma2"),
        (serde_json::json!({"hidden_act": "gelu"}), "hidden_act", "silu"),
        (serde_json::json!({"final_logit_softcapping": 30.0}), "final_logit_softcapping", "soft-capping"),
        (serde_json::json!({"partial_rotary_factor": 0.5}), "partial_rotary_factor", "partial rotary"),
        (serde_json::json!({"rope_scaling": {"type": "yarn", "factor": 4.0}}), "rope_scaling.rope_type", "yarn"),
        (
            serde_json::json!({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}),
            "rope_parameters.low_freq_factor",
            "llama3",
        ),
        (serde_json::json!({"layer_types": ["full_attention"]}), "layer_types", "one per layer"),
        (serde_json::json!({"sliding_window": 0, "model_type": "mistral"}), "sliding_window", "is 0"),
        (serde_json::json!({"quantization_config": {"quant_method": "fp8"}}), "quantization_config", "pre-quantized"),
    ] {
        let e = config(json.clone()).unwrap_err().to_string();
        assert!(e.contains(field) && e.contains(says), "{json}: {e}");
    }
}

/// Qwen2, Qwen3, Llama 3 and Phi-3 GGUF files (gguf-py's names and writer): Qwen's unpermuted q/k
/// rows, biases, q/k norms, Qwen3's `key_length`; Llama 3's permuted q/k rows and biases and its
/// RoPE scaling as llama.cpp's `rope_freqs` divisors; Phi-3's fused `attn_qkv` / `ffn_up` and
/// its window. Kept quantized or not, and written back by the crate's writer, the logits of
/// transformers' reading of the same file (Qwen2) or of the HF model (Qwen3, Llama 3, Phi-3).
#[test]
fn gguf_files_of_the_families_load() -> candle_peft::Result<()> {
    for (name, arch) in [("qwen2", "qwen2"), ("qwen3", "qwen3"), ("llama3", "llama"), ("phi3", "phi3")] {
        let r = load(&format!("families/{name}/reference.safetensors"));
        let path = fixture(&format!("families/{name}/model.gguf"));
        for quant in [candle_peft::quantized::BaseQuant::None, candle_peft::quantized::BaseQuant::Keep] {
            let (m, meta) = Llama::from_gguf_quantized(&path, &test_device(), DType::F32, quant)?;
            assert_eq!(meta.string("general.architecture")?, arch);
            assert_close(&m.forward(&r["ids"])?, &r["gguf_logits"], 1e-5, &format!("{name} GGUF {quant:?}"));
            // Written back by the crate's GGUF writer, it reads the same.
            let dir = tempfile::tempdir().unwrap();
            let again = dir.path().join("again.gguf");
            m.save_gguf(&again, candle_core::quantized::GgmlDType::F32, &meta)?;
            let (m, _) = Llama::from_gguf(&again, &test_device(), DType::F32)?;
            assert_close(&m.forward(&r["ids"])?, &r["gguf_logits"], 1e-5, &format!("{name} GGUF written back"));
        }
    }
    Ok(())
}
