//! Fine-tunes a LLaMA with an adapter and saves it in HF PEFT's format.
//!
//! ```text
//! cargo run --release --example finetune_llama                  # offline: built-in model and data
//! cargo run --release --example finetune_llama -- \
//!     --model models/SmolLM2-135M-Instruct.Q4_1.gguf --data train.jsonl --steps 200
//! ```
//! Options: `--model <gguf file | HF dir>`, `--data <jsonl>` (`{"prompt", "completion"}` or
//! `{"text"}` per line), `--steps N`, `--rank R`, `--lr LR`, `--method lora|rslora|dora`,
//! `--output DIR` (default `target/finetune-llama`), `--device auto|cpu|cuda:N|metal`.
//!
//! Without `--model` it trains LoRA on a small randomly initialised byte-level LLaMA over a
//! built-in set of question/answer pairs, in well under two minutes on two CPU cores, and shows
//! the loss falling.

use std::path::PathBuf;

use candle_core::DType;
use candle_peft::models::{Llama, LlamaConfig};
use candle_peft::train::data::{read_jsonl, Example, Record};
use candle_peft::train::{LrSchedule, TrainConfig, Trainer};
use candle_peft::{AdapterConfig, InitOptions, LoraConfig, PeftModel};

const COUNTRIES: [(&str, &str); 24] = [
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Portugal", "Lisbon"),
    ("Austria", "Vienna"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Poland", "Warsaw"),
    ("Ireland", "Dublin"),
    ("Egypt", "Cairo"),
    ("Japan", "Tokyo"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Kenya", "Nairobi"),
    ("Cuba", "Havana"),
    ("Canada", "Ottawa"),
    ("Hungary", "Budapest"),
    ("Belgium", "Brussels"),
    ("Denmark", "Copenhagen"),
    ("Turkey", "Ankara"),
    ("Iceland", "Reykjavik"),
];

fn builtin_records() -> Vec<Record> {
    COUNTRIES
        .iter()
        .map(|(c, cap)| Record::PromptCompletion {
            prompt: format!("Q: What is the capital of {c}?\nA:"),
            completion: format!(" {cap}."),
        })
        .collect()
}

/// Text to token ids.
type Encode = Box<dyn Fn(&str) -> candle_peft::Result<Vec<u32>>>;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let device = candle_peft::device(&arg(&args, "--device").unwrap_or_else(|| "auto".into()))?;
    let output = PathBuf::from(arg(&args, "--output").unwrap_or_else(|| "target/finetune-llama".into()));
    let rank: usize = arg(&args, "--rank").map(|r| r.parse()).transpose()?.unwrap_or(8);
    let method = arg(&args, "--method").unwrap_or_else(|| "lora".into());
    let records = match arg(&args, "--data") {
        Some(p) => read_jsonl(p.as_ref())?,
        None => builtin_records(),
    };

    // The model, a text-to-ids function, the end and padding ids, and extra adapter targets.
    let (model, encode, eos, pad, mut targets): (Llama, Encode, _, _, Vec<&str>) = match arg(&args, "--model") {
        None => {
            let config: LlamaConfig = serde_json::from_str(
                r#"{"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
                        "rms_norm_eps": 1e-6, "rope_theta": 10000.0}"#,
            )?;
            let model = Llama::random(config, 0, &device)?;
            // Bytes are tokens; 0 (never in the text) ends a sequence and pads.
            (model, Box::new(|s: &str| Ok(s.bytes().map(u32::from).collect())), Some(0), 0, vec!["lm_head"])
        }
        Some(path) => {
            let (model, tokenizer) = candle_peft::models::load(path.as_ref(), &device, DType::F32)?;
            let eos = tokenizer.token_to_id("<|im_end|>").or_else(|| tokenizer.token_to_id("</s>"));
            let encode = move |s: &str| {
                tokenizer
                    .encode(s, false)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| candle_peft::Error::Unsupported(format!("tokenizer: {e}")))
            };
            (model, Box::new(encode), eos, eos.unwrap_or(0), vec![])
        }
    };
    targets.extend(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]);

    let examples: Vec<Example> =
        records.iter().map(|r| Example::from_record(r, &encode, eos, 256)).collect::<candle_peft::Result<_>>()?;
    let split = examples.len() - (examples.len() / 6).max(1);
    let (train, eval) = examples.split_at(split);
    println!("{} training examples, {} held out", train.len(), eval.len());

    let alpha = 2.0 * rank as f64;
    let lora = match method.as_str() {
        "lora" => LoraConfig::lora(rank, alpha, &targets),
        "rslora" => LoraConfig::rslora(rank, alpha, &targets),
        "dora" => LoraConfig::dora(rank, alpha, &targets),
        other => return Err(format!("unknown --method {other} (lora, rslora, dora)").into()),
    };
    let peft = PeftModel::new(model, AdapterConfig::Lora(lora), InitOptions { seed: 0, dtype: DType::F32 })?;
    println!("{}", peft.parameter_count());

    let steps: usize = arg(&args, "--steps").map(|s| s.parse()).transpose()?.unwrap_or(150);
    // A fresh random model takes a large rate; a pretrained one a small one.
    let default_lr = if arg(&args, "--model").is_some() { 2e-4 } else { 5e-3 };
    let lr: f64 = arg(&args, "--lr").map(|s| s.parse()).transpose()?.unwrap_or(default_lr);
    let config = TrainConfig {
        steps,
        batch_size: 4,
        schedule: LrSchedule::WarmupCosine { lr, warmup: steps / 10, total: steps, min_lr: lr / 10.0 },
        eval_every: Some((steps / 5).max(1)),
        output_dir: Some(output.clone()),
        checkpoint_every: Some(steps),
        pad_id: pad,
        progress: true,
        ..Default::default()
    };
    let mut trainer = Trainer::new(peft, config)?;
    let before = (trainer.evaluate(train)?, trainer.evaluate(eval)?);
    trainer.train(train, Some(eval))?;
    let after = (trainer.evaluate(train)?, trainer.evaluate(eval)?);
    println!("train loss {:.3} -> {:.3}, held-out loss {:.3} -> {:.3}", before.0, after.0, before.1, after.1);
    for log in trainer.history().iter().filter(|l| l.eval_loss.is_some()) {
        println!("step {:>4}  loss {:.3}  eval {:.3}", log.step, log.loss, log.eval_loss.unwrap_or(f64::NAN));
    }
    let adapter = output.join("adapter");
    trainer.into_peft().save_pretrained(&adapter)?;
    println!("adapter saved to {} (metrics in {})", adapter.display(), output.join("metrics.jsonl").display());
    Ok(())
}
