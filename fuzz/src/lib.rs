//! The bodies of candle-peft's fuzz targets: each feeds one input to a reader of a file a user
//! may be handed (an adapter, a GGUF, a model's `config.json`, a tokenizer, training data, a
//! sweep config, a trainer checkpoint) and returns its error, if any. A panic, an abort or an
//! allocation the input dictates is the bug a fuzzer looks for; an `Err` is the right answer to
//! a malformed file.
//!
//! Used twice: by the libFuzzer targets of this crate (`cargo +nightly fuzz run <target>`, in
//! `fuzz/`), and by `tests/fuzz_corpora.rs` of the main crate, which replays the committed
//! corpora (`fuzz/corpus/<target>/`) and the minimized crash inputs (`fuzz/regressions/<target>/`)
//! on the stable toolchain in `cargo test`.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_peft::models::Llama;
use candle_peft::sweep::SweepConfig;
use candle_peft::train::data::{read_jsonl, Ends, Example};
use candle_peft::train::{TrainConfig, Trainer};
use candle_peft::{AdapterConfig, InitOptions, LoraConfig, PeftModel, Result};

/// A fuzz target: its name (the directory of its corpus) and its body.
pub type Target = (&'static str, fn(&[u8]) -> Result<()>);

/// Every target, by name.
pub const TARGETS: [Target; 8] = [
    ("adapter_config", adapter_config),
    ("adapter_weights", adapter_weights),
    ("gguf", gguf),
    ("model_config", model_config),
    ("tokenizer", tokenizer),
    ("jsonl", jsonl),
    ("sweep_config", sweep_config),
    ("checkpoint", checkpoint),
];

/// The adapters of the tiny LLaMA fixture (every method the fixtures hold): the first byte of
/// an adapter target's input picks one.
const ADAPTERS: [&str; 8] =
    ["lora", "dora", "loha", "vera", "randlora", "randlora_wide", "rslora_all_linear", "lora_layers"];

/// `tests/fixtures` of the main crate, from either crate's manifest directory.
pub fn fixtures() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = if manifest.ends_with("fuzz") { manifest.parent().unwrap_or(manifest) } else { manifest };
    root.join("tests/fixtures")
}

thread_local! {
    static SCRATCH: RefCell<Option<tempfile::TempDir>> = const { RefCell::new(None) };
}

/// A directory of this thread's scratch space (created once, removed at exit), empty on return.
fn scratch(name: &str) -> PathBuf {
    let root = SCRATCH.with(|s| {
        s.borrow_mut()
            .get_or_insert_with(|| tempfile::tempdir().expect("a scratch directory for the fuzz target"))
            .path()
            .to_path_buf()
    });
    let dir = root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch directory for the fuzz target");
    dir
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("writing a fuzz input to the scratch directory");
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).expect("copying a fixture to the scratch directory");
}

fn tiny_llama() -> Result<Llama> {
    Llama::from_hf_dir(&fixtures().join("tiny_llama"), &Device::Cpu, DType::F32)
}

/// `(adapter directory of the fixture, the rest of the input)`, by the input's first byte.
fn pick_adapter(data: &[u8]) -> (PathBuf, &[u8]) {
    let (first, rest) = data.split_first().map(|(f, r)| (*f, r)).unwrap_or((0, data));
    (fixtures().join("tiny_llama").join(ADAPTERS[first as usize % ADAPTERS.len()]), rest)
}

/// An `adapter_config.json` (after the first byte), beside a fixture adapter's weights, loaded
/// onto the tiny LLaMA.
pub fn adapter_config(data: &[u8]) -> Result<()> {
    let (fixture, config) = pick_adapter(data);
    let dir = scratch("adapter_config");
    write(&dir.join("adapter_config.json"), config);
    copy(&fixture.join("adapter_model.safetensors"), &dir.join("adapter_model.safetensors"));
    PeftModel::from_pretrained(tiny_llama()?, &dir, DType::F32).map(drop)
}

/// An `adapter_model.safetensors` (after the first byte), beside a fixture adapter's config,
/// loaded onto the tiny LLaMA.
pub fn adapter_weights(data: &[u8]) -> Result<()> {
    let (fixture, weights) = pick_adapter(data);
    let dir = scratch("adapter_weights");
    copy(&fixture.join("adapter_config.json"), &dir.join("adapter_config.json"));
    write(&dir.join("adapter_model.safetensors"), weights);
    PeftModel::from_pretrained(tiny_llama()?, &dir, DType::F32).map(drop)
}

/// A GGUF model file (header, metadata, tensor infos, data), loaded as a model and its tokenizer.
pub fn gguf(data: &[u8]) -> Result<()> {
    let path = scratch("gguf").join("model.gguf");
    write(&path, data);
    let (_, meta) = Llama::from_gguf(&path, &Device::Cpu, DType::F32)?;
    candle_peft::tokenizer::from_gguf(&meta).map(drop)
}

/// A model directory's `config.json` beside the tiny LLaMA's weights.
pub fn model_config(data: &[u8]) -> Result<()> {
    let dir = scratch("model_config");
    write(&dir.join("config.json"), data);
    copy(&fixtures().join("tiny_llama/model.safetensors"), &dir.join("model.safetensors"));
    Llama::from_hf_dir(&dir, &Device::Cpu, DType::F32).map(drop)
}

/// A `tokenizer.json`, read and used to encode a sentence.
pub fn tokenizer(data: &[u8]) -> Result<()> {
    let path = scratch("tokenizer").join("tokenizer.json");
    write(&path, data);
    let tok = candle_peft::tokenizer::from_file(&path)?;
    candle_peft::tokenizer::encode(&tok, "Hello, world: 12345 + 678 = ?").map(drop)
}

/// A JSONL data file, read and made into examples (a byte per token, up to 64 tokens).
pub fn jsonl(data: &[u8]) -> Result<()> {
    let path = scratch("jsonl").join("train.jsonl");
    write(&path, data);
    let encode = |s: &str| -> Result<Vec<u32>> { Ok(s.bytes().map(u32::from).collect()) };
    let ends = Ends { bos: Some(1), eos: Some(2) };
    for record in read_jsonl(&path)? {
        Example::from_record(&record, &encode, ends, 64)?;
    }
    Ok(())
}

/// A sweep config file.
pub fn sweep_config(data: &[u8]) -> Result<()> {
    let path = scratch("sweep_config").join("sweep.json");
    write(&path, data);
    SweepConfig::from_file(&path).map(drop)
}

/// A trainer checkpoint directory in which one file is the input (after the first byte: even,
/// `trainer_state.json`; odd, `optimizer.safetensors`), the others a real checkpoint's (LoRA
/// r = 2 on the tiny LLaMA after one step), resumed.
pub fn checkpoint(data: &[u8]) -> Result<()> {
    let (first, rest) = data.split_first().map(|(f, r)| (*f, r)).unwrap_or((0, data));
    let dir = scratch("checkpoint");
    let real = real_checkpoint()?;
    for f in ["adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "optimizer.safetensors"] {
        copy(&real.join(f), &dir.join(f));
    }
    let fuzzed = if first % 2 == 0 { "trainer_state.json" } else { "optimizer.safetensors" };
    write(&dir.join(fuzzed), rest);
    Trainer::resume(checkpoint_model()?, checkpoint_config(), &dir).map(drop)
}

fn checkpoint_model() -> Result<PeftModel<Llama>> {
    let config = AdapterConfig::Lora(LoraConfig::lora(2, 4.0, &["q_proj", "v_proj"]));
    PeftModel::new(tiny_llama()?, config, InitOptions::default())
}

fn checkpoint_config() -> TrainConfig {
    TrainConfig { steps: 2, batch_size: 1, ..Default::default() }
}

/// The real checkpoint that [`checkpoint`] alters (written once per thread).
fn real_checkpoint() -> Result<PathBuf> {
    thread_local! {
        static REAL: RefCell<Option<PathBuf>> = const { RefCell::new(None) };
    }
    if let Some(dir) = REAL.with(|r| r.borrow().clone()) {
        return Ok(dir);
    }
    let dir = scratch("real_checkpoint").join("checkpoint-1");
    let mut trainer = Trainer::new(checkpoint_model()?, checkpoint_config())?;
    let ids: Vec<u32> = (0..8).collect();
    let example = Example { labels: ids.iter().map(|&t| i64::from(t)).collect(), ids };
    trainer.train_step(&[example])?;
    trainer.save_checkpoint(&dir)?;
    REAL.with(|r| *r.borrow_mut() = Some(dir.clone()));
    Ok(dir)
}
