//! Adapters exported for llama.cpp (`Llama::save_lora_gguf`, `candle-peft export`), run by
//! llama.cpp itself: `llama-cpp-python` (built from source in the fixture venv) loaded an F32 GGUF
//! of SmolLM2 (dequantized from the Q4_1 file, so neither side quantizes activations) with each
//! exported adapter; its logits and greedy continuations are committed in
//! `tests/fixtures/llama_cpp/`. This test rebuilds the same adapters (fixed seeds) and checks
//! candle-peft's logits against llama.cpp's.
//!
//! To regenerate (needs Python, llama-cpp-python and about 1 GB of disk):
//!
//! ```text
//! cargo test --release --test llama_cpp -- --ignored   # writes target/llama-cpp/
//! ../venv/bin/python tests/fixtures/check_llama_cpp.py  # runs llama.cpp, writes tests/fixtures/llama_cpp/
//! ```

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use candle_peft::convert::{lora_factors, to_lora, LoraRank};
use candle_peft::format::{read_safetensors, write_safetensors};
use candle_peft::models::Llama;
use candle_peft::{AdapterConfig, InitOptions, LoraConfig, PeftModel, DEFAULT_ADAPTER};
use common::{fixture, real_model};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The prompt, and the length of the greedy continuation.
const PROMPT: &str = "The capital of France is a city where";
const NEW_TOKENS: usize = 8;

fn model_path() -> PathBuf {
    real_model::model_path("SmolLM2-135M-Instruct.Q4_1.gguf", "fetch_smollm2.sh")
}

fn smollm2() -> Llama {
    Llama::from_gguf(&model_path(), &Device::Cpu, DType::F32).unwrap().0
}

/// SmolLM2's ids of [`PROMPT`] (it adds no BOS).
fn prompt() -> Vec<u32> {
    let meta = candle_peft::models::GgufMetadata::read(&model_path()).unwrap();
    let tokenizer = candle_peft::tokenizer::from_gguf(&meta).unwrap();
    tokenizer.encode(PROMPT, false).unwrap().get_ids().to_vec()
}

/// An adapter with a visible effect: built from `seed` (B = 0, PEFT's init), then every trainable
/// tensor moved by Gaussian noise of standard deviation `noise`.
fn adapter(config: LoraConfig, seed: u64, noise: f64) -> PeftModel<Llama> {
    let peft =
        PeftModel::new(smollm2(), AdapterConfig::Lora(config), InitOptions { seed, ..Default::default() }).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    for (_, var) in peft.named_trainable_vars().unwrap() {
        let t = var.as_tensor();
        // Box-Muller: N(0, noise^2) from two uniforms.
        let values: Vec<f32> = (0..t.elem_count())
            .map(|_| {
                let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
                (noise * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect();
        let moved = (t + Tensor::from_vec(values, t.shape(), t.device()).unwrap()).unwrap();
        var.set(&moved).unwrap();
    }
    peft
}

/// The three exported adapters: LoRA on q, k, v, o (q and k test llama.cpp's row permutation);
/// rsLoRA with a rank_pattern and an alpha_pattern (folded into B); a DoRA converted to a rank-8
/// LoRA. Each with its PEFT-format factors and alpha for the export.
fn adapters() -> Vec<(&'static str, PeftModel<Llama>, Vec<candle_peft::convert::LoraFactors>, f64)> {
    let lora = adapter(LoraConfig::lora(8, 16.0, &["q_proj", "k_proj", "v_proj", "o_proj"]), 11, 0.02);
    let lora_factors_ = lora_factors(&lora, DEFAULT_ADAPTER, "export").unwrap();
    let mut rs = LoraConfig::rslora(8, 8.0, &["q_proj", "v_proj", "down_proj"]);
    rs.rank_pattern.insert("layers.3.self_attn.q_proj".into(), 4);
    rs.rank_pattern.insert("down_proj".into(), 6);
    rs.alpha_pattern.insert("layers.5.self_attn.v_proj".into(), 3.0);
    let rslora = adapter(rs, 12, 0.02);
    let rslora_factors = lora_factors(&rslora, DEFAULT_ADAPTER, "export").unwrap();
    let dora = adapter(LoraConfig::dora(4, 8.0, &["q_proj", "k_proj", "gate_proj"]), 13, 0.02);
    let converted = to_lora(&dora, LoraRank::Fixed(8)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    converted.save(dir.path()).unwrap();
    let as_lora = PeftModel::from_pretrained(smollm2(), dir.path(), DType::F32).unwrap();
    let dora_factors = converted.factors().unwrap();
    vec![
        ("lora", lora, lora_factors_, 16.0),
        ("rslora_pattern", rslora, rslora_factors, 8.0),
        ("dora_as_lora", as_lora, dora_factors, 8.0),
    ]
}

/// candle-peft's logits for the prompt `(positions, vocab)` and greedy continuation.
fn run(model: &Llama) -> (Tensor, Vec<u32>) {
    let prompt = prompt();
    let ids = Tensor::new(prompt.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = model.forward(&ids).unwrap().squeeze(0).unwrap();
    (logits, model.generate_greedy(&prompt, NEW_TOKENS, &[]).unwrap())
}

fn out_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/llama-cpp")
}

#[test]
#[ignore = "writes target/llama-cpp/ for tests/fixtures/check_llama_cpp.py (needs Python + llama-cpp-python)"]
fn export_for_llama_cpp() -> candle_peft::Result<()> {
    let dir = out_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let (base_logits, base_greedy) = run(&smollm2());
    let mut ours = vec![("base.logits".to_string(), base_logits), ("base.greedy".into(), greedy(&base_greedy))];
    for (name, peft, factors, alpha) in adapters() {
        let saved = peft.model().save_lora_gguf(&factors, alpha, GgmlDType::F32, &dir.join(format!("{name}.gguf")))?;
        assert!(saved.fallbacks.is_empty());
        let (logits, continuation) = run(peft.model());
        ours.push((format!("{name}.logits"), logits));
        ours.push((format!("{name}.greedy"), greedy(&continuation)));
    }
    ours.push(("prompt".into(), greedy(&prompt())));
    write_safetensors(&dir.join("candle_peft.safetensors"), &ours)
}

fn greedy(ids: &[u32]) -> Tensor {
    Tensor::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), &Device::Cpu).unwrap()
}

#[test]
fn llama_cpp_runs_exported_adapters_with_candle_peft_logits() -> candle_peft::Result<()> {
    let theirs = read_safetensors(&fixture("llama_cpp/logits.safetensors"), &Device::Cpu)?;
    let columns = theirs["columns"].to_vec1::<i64>()?.into_iter().map(|c| c as u32).collect::<Vec<_>>();
    let columns = Tensor::new(columns, &Device::Cpu)?;
    let base = run(&smollm2());
    let mut cases = vec![("base".to_string(), base)];
    for (name, peft, _, _) in adapters() {
        cases.push((name.to_string(), run(peft.model())));
    }
    for (name, (logits, continuation)) in &cases {
        let mine = logits.index_select(&columns, 1)?;
        let want = &theirs[&format!("{name}.logits")];
        let diff = (&mine - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff <= 1e-3, "{name}: candle-peft's logits are {diff:e} from llama.cpp's (max abs)");
        let greedy = theirs[&format!("{name}.greedy")].to_vec1::<i64>()?;
        assert_eq!(continuation.iter().map(|&i| i as i64).collect::<Vec<_>>(), greedy, "{name}: greedy continuation");
        if name != "base" {
            // The adapter changes what llama.cpp computes: the check is not of the base alone.
            let moved = (want - &theirs["base.logits"])?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(moved > 0.05, "{name}: the adapter moves llama.cpp's logits by only {moved}");
        }
    }
    Ok(())
}

/// The file itself, on the tiny LLaMA's rsLoRA adapter (PEFT-saved, all linears): llama.cpp's
/// metadata, names and shapes, `B` with the scaling folded in (`s r / alpha = sqrt(r) / r * r`)
/// and, for q and k, llama.cpp's row permutation; the types that q8_0 cannot hold fall back to f16.
#[test]
fn the_exported_file_has_llama_cpps_names_shapes_and_folded_scaling() -> candle_peft::Result<()> {
    use candle_core::quantized::gguf_file;
    let base = Llama::from_hf_dir(&fixture("tiny_llama"), &Device::Cpu, DType::F32)?;
    let peft = PeftModel::from_pretrained(base, &fixture("tiny_llama/rslora_all_linear"), DType::F32)?;
    let factors = lora_factors(&peft, DEFAULT_ADAPTER, "export")?;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.gguf");
    let saved = peft.model().save_lora_gguf(&factors, 4.0, GgmlDType::Q8_0, &path)?;
    assert_eq!(saved.tensors, 14);
    // Rows of 32 (A's `in`) are q8_0; B's rows of r = 8 values and down_proj's A (48) fall back
    // to f16.
    assert_eq!(saved.fallbacks.len(), 16, "{:?}", saved.fallbacks);
    assert!(saved.fallbacks.contains(&"blk.0.ffn_down.weight.lora_a (q8_0 -> f16)".to_string()));
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let meta = |k: &str| content.metadata[k].clone();
    assert_eq!(meta("general.type").to_string().unwrap(), "adapter");
    assert_eq!(meta("general.architecture").to_string().unwrap(), "llama");
    assert_eq!(meta("adapter.type").to_string().unwrap(), "lora");
    assert_eq!(meta("adapter.lora.alpha").to_f32().unwrap(), 4.0);
    let a = &content.tensor_infos["blk.1.attn_k.weight.lora_a"];
    assert_eq!((a.shape.dims(), a.ggml_dtype), (&[8usize, 32][..], GgmlDType::Q8_0));
    let b_info = &content.tensor_infos["blk.1.attn_k.weight.lora_b"];
    assert_eq!((b_info.shape.dims(), b_info.ggml_dtype), (&[16usize, 8][..], GgmlDType::F16));
    let b = content.tensor(&mut file, "blk.1.attn_k.weight.lora_b", &Device::Cpu)?.dequantize(&Device::Cpu)?;
    // PEFT's B of k_proj (16 rows: 2 KV heads of 8), times s r / alpha = (4 / sqrt(8)) 8 / 4.
    let k = factors.iter().find(|f| f.module == "model.layers.1.self_attn.k_proj").unwrap();
    let folded = (&k.b * ((4.0 / 8f64.sqrt()) * 8.0 / 4.0))?;
    // llama.cpp's permute(w, n_head): per head, rows (0, 4, 1, 5, 2, 6, 3, 7) of its 8.
    let order: Vec<u32> = (0..2u32).flat_map(|h| [0, 4, 1, 5, 2, 6, 3, 7].map(|r| h * 8 + r)).collect();
    let want = folded.index_select(&Tensor::new(order, &Device::Cpu)?, 0)?;
    let diff = (b - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 2e-3, "lora_b of k_proj: {diff} from PEFT's B, folded and permuted (f16)");
    assert!(content.tensor_infos.contains_key("blk.0.ffn_down.weight.lora_a"));
    assert!(content.tensor_infos.contains_key("output.weight.lora_b") == factors.iter().any(|f| f.module == "lm_head"));
    let e = peft.model().save_lora_gguf(&factors, 4.0, GgmlDType::Q4K, &path).unwrap_err();
    assert!(e.to_string().contains("f32, f16, bf16 or q8_0"), "{e}");
    Ok(())
}

/// A model merged by `candle-peft merge --output-gguf` (SmolLM2 with the format task's DoRA
/// adapter, Q8_0) loaded by llama.cpp answers the held-out prompts, formatted by the chat
/// template the GGUF carries (llama-cpp-python's own rendering), with the fine-tuned answers
/// (`check_llama_cpp.py --merged`, committed output).
#[test]
fn llama_cpp_answers_the_format_task_with_a_merged_gguf() {
    let text = std::fs::read_to_string(fixture("llama_cpp/merged_answers.json")).unwrap();
    let run: serde_json::Value = serde_json::from_str(&text).unwrap();
    let answers = run["answers"].as_array().unwrap();
    assert!(answers.len() >= 10, "{} answers", answers.len());
    for a in answers {
        let (got, want) = (a["llama_cpp"].as_str().unwrap(), a["expected"].as_str().unwrap());
        assert_eq!(got.trim(), want.trim(), "prompt {}", a["prompt"]);
        // The base model does not answer in this format: the answer is the fine-tuning's.
        assert!(want.trim().starts_with('{') && want.trim().ends_with('}'), "{want}");
    }
}
