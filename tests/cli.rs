//! The `candle-peft` command line: inspect, merge (the merged model gives the adapted logits),
//! eval (transformers' loss), train (a short run on SmolLM2 whose adapter loads) and bad input.

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device};
use candle_peft::models::Llama;
use candle_peft::PeftModel;
use common::{assert_close, fixture, load};

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_candle-peft")).args(args).output().expect("run candle-peft");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn smollm2() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch_smollm2.sh first", p.display());
    p.to_string_lossy().into_owned()
}

#[test]
fn inspect_describes_an_adapter() {
    let (ok, out, err) = cli(&["inspect", fixture("tiny_llama/lora").to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("method: LORA") && out.contains("r: 4") && out.contains("adapted modules: 6"), "{out}");
    // q: 2 * (4*32 + 32*4) - r=2 in layer 1; v: 2 * (4*32 + 16*4); down: 2 * (4*48 + 32*4).
    let params = (4 * 32 + 32 * 4) + (2 * 32 + 32 * 2) + 2 * (4 * 32 + 16 * 4) + 2 * (4 * 48 + 32 * 4);
    assert!(out.contains(&format!("parameters: {params}")), "{out}");
    assert!(out.contains("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight [2, 32]"), "{out}");
    assert!(err.is_empty(), "{err}");
    assert!(!out.contains("other adapters"), "{out}");
    // PEFT's multi-adapter layout: the others are named.
    let (ok, out, err) = cli(&["inspect", fixture("tiny_llama/multi/saved").to_str().unwrap()]);
    assert!(
        ok && out.contains("other adapters in this directory (PEFT's multi-adapter layout): b, c, d"),
        "{err}{out}"
    );

    // A field PEFT does not know is ignored, as PEFT does, with a warning on stderr naming the file.
    let dir = tempfile::tempdir().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture("tiny_llama/lora").join(f), dir.path().join(f)).unwrap();
    }
    let config = dir.path().join("adapter_config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["future_field"] = 1.into();
    std::fs::write(&config, json.to_string()).unwrap();
    let (ok, out, err) = cli(&["inspect", dir.path().to_str().unwrap()]);
    assert!(ok && out.contains("method: LORA"), "{err}");
    assert!(err.contains("ignoring field `future_field`") && err.contains(&config.display().to_string()), "{err}");
}

#[test]
fn merge_writes_a_model_with_the_adapted_outputs() -> candle_peft::Result<()> {
    let out = tempfile::tempdir().unwrap();
    let (ok, _, err) = cli(&[
        "merge",
        "--base",
        fixture("tiny_llama").to_str().unwrap(),
        "--adapter",
        fixture("tiny_llama/lora").to_str().unwrap(),
        "--output",
        out.path().to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    let r = load("tiny_llama/llama_reference.safetensors");
    let merged = Llama::from_hf_dir(out.path(), &Device::Cpu, DType::F32)?;
    assert_close(&merged.forward(&r["ids"])?, &r["logits"], 1e-5, "merged model logits");
    Ok(())
}

#[test]
fn eval_gives_the_transformers_loss() {
    let dir = tempfile::tempdir().unwrap();
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_reference.json")).unwrap()).unwrap();
    let lines: Vec<String> =
        refs["eval"]["texts"].as_array().unwrap().iter().map(|t| serde_json::json!({"text": t}).to_string()).collect();
    let data = dir.path().join("eval.jsonl");
    std::fs::write(&data, lines.join("\n")).unwrap();
    // The f32 base, and the Q4_1 base kept quantized (QLoRA): the same loss.
    let mut losses = Vec::new();
    for quant in ["none", "keep"] {
        let (ok, out, err) = cli(&[
            "eval",
            "--model",
            &smollm2(),
            "--data",
            data.to_str().unwrap(),
            "--json",
            "--device",
            "cpu",
            "--base-quant",
            quant,
        ]);
        assert!(ok, "{err}");
        let got: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let (loss, want) = (got["loss"].as_f64().unwrap(), refs["eval"]["loss"].as_f64().unwrap());
        assert!((loss - want).abs() < 1e-3 * want, "--base-quant {quant}: loss {loss} vs transformers {want}");
        assert_eq!(got["tokens"], refs["eval"]["tokens"]);
        assert!((got["perplexity"].as_f64().unwrap() - want.exp()).abs() < 1e-2 * want.exp());
        losses.push(loss);
    }
    assert!((losses[0] - losses[1]).abs() < 1e-5, "f32 {} vs quantized {}", losses[0], losses[1]);
    let (ok, _, err) = cli(&["eval", "--model", &smollm2(), "--data", data.to_str().unwrap(), "--base-quant", "q9_0"]);
    assert!(!ok && err.contains("q4_k"), "an unknown type must list the known ones: {err}");
}

#[test]
fn train_writes_an_adapter_that_loads() -> candle_peft::Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    std::fs::write(&data, "{\"prompt\": \"2+2=\", \"completion\": \"4\"}\n{\"text\": \"Hello there.\"}\n").unwrap();
    let out = dir.path().join("run");
    let (ok, stdout, err) = cli(&[
        "train",
        "--model",
        &smollm2(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--method",
        "dora",
        "--rank",
        "4",
        "--targets",
        "q_proj,v_proj",
        "--steps",
        "2",
        "--batch-size",
        "1",
        "--max-len",
        "64",
        "--every",
        "1",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("trainable params"), "{stdout}");
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 2);
    let (model, _) = Llama::from_gguf(Path::new(&smollm2()), &Device::Cpu, DType::F32)?;
    let peft = PeftModel::from_pretrained(model, &out.join("adapter"), DType::F32)?;
    assert_eq!(peft.adapted_modules().len(), 60);
    Ok(())
}

#[test]
fn bad_input_is_reported_not_panicked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bad.jsonl");
    std::fs::write(&data, "{\"text\": \"fine\"}\nnot json\n").unwrap();
    let (ok, _, err) = cli(&["eval", "--model", &smollm2(), "--data", data.to_str().unwrap(), "--device", "cpu"]);
    assert!(!ok && err.contains("line 2"), "{err}");
    // A record longer than --max-len is refused by number, not evaluated into an abort.
    let long = dir.path().join("long.jsonl");
    std::fs::write(&long, "{\"text\": \"short\"}\n{\"text\": \"one two three four five six seven eight\"}\n").unwrap();
    let (ok, _, err) =
        cli(&["eval", "--model", &smollm2(), "--data", long.to_str().unwrap(), "--max-len", "4", "--device", "cpu"]);
    assert!(!ok && err.contains("record 2 of") && err.contains("more than --max-len 4"), "{err}");
    let (ok, _, err) = cli(&["eval", "--model", &smollm2(), "--data", data.to_str().unwrap(), "--device", "cuda:0"]);
    assert!(!ok && (err.contains("--features cuda") || err.contains("cuda")), "{err}");
    let (ok, _, err) = cli(&["inspect", dir.path().to_str().unwrap()]);
    assert!(!ok && err.contains("adapter_config.json"), "{err}");
    let good = dir.path().join("good.jsonl");
    std::fs::write(&good, "{\"text\": \"fine\"}\n").unwrap();
    let (ok, _, err) = cli(&[
        "train",
        "--model",
        &smollm2(),
        "--data",
        good.to_str().unwrap(),
        "--output",
        dir.path().to_str().unwrap(),
        "--targets",
        "qkv",
        "--device",
        "cpu",
    ]);
    assert!(!ok && err.contains("qkv") && err.contains("model.layers.0.self_attn.q_proj"), "{err}");
    // GPTQ writes the 32-value block types: calibration for a K-quant is refused before the
    // adapter is read.
    let out = dir.path().join("m.gguf");
    let (ok, _, err) = cli(&[
        "merge",
        "--base",
        &smollm2(),
        "--adapter",
        "no-such-adapter",
        "--output-gguf",
        out.to_str().unwrap(),
        "--quant",
        "q4_k",
        "--calibration",
        good.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(!ok && err.contains("--calibration") && err.contains("q4_0") && err.contains("q4_k"), "{err}");
    assert!(!out.exists());
}

/// `--every 0` (and the other zero counts) are refused by their flag's name before the model or
/// the data is read: neither path exists here, and the error is about the flag.
#[test]
fn train_refuses_zero_counts_by_flag_before_loading_anything() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model.gguf");
    let data = dir.path().join("no-such-data.jsonl");
    let out = dir.path().join("run");
    for (flag, value, says) in [
        ("--every", "0", "--every 0: expected at least 1"),
        ("--batch-size", "0", "--batch-size 0: expected at least 1"),
        ("--grad-accum", "0", "--grad-accum 0: expected at least 1"),
        ("--max-len", "1", "--max-len 1: expected at least 2"),
        ("--schedule", "linear", "unknown --schedule linear"),
        ("--set", "nope=1", "lora has no config field `nope`"),
        ("--set", "lora_dropout=1.5", "invalid lora_dropout: 1.5 is outside [0, 1)"),
        ("--scaling", "alpha-cube", "unknown --scaling alpha-cube"),
        ("--method", "lorra", "invalid value 'lorra' for '--method <METHOD>'"),
    ] {
        let (ok, _, err) = cli(&[
            "train",
            "--model",
            missing.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--device",
            "cpu",
            flag,
            value,
        ]);
        assert!(!ok && err.contains(says), "{flag} {value}: {err}");
        assert!(!err.contains("no-such") && !err.contains("panicked"), "{flag} {value}: {err}");
    }
    assert!(!out.exists(), "nothing was written");
    // With valid counts, the same command gets as far as the missing model.
    let (ok, _, err) = cli(&[
        "train",
        "--model",
        missing.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(!ok && err.contains("no-such-model.gguf"), "{err}");
}

/// `--method` takes every method of the registry, and says what each writes in PEFT's format;
/// a method's own checks run before the model is loaded.
#[test]
fn train_methods_come_from_the_registry() {
    let (ok, help, err) = cli(&["train", "--help"]);
    assert!(ok, "{err}");
    for v in candle_peft::adapters::variants() {
        assert!(help.contains(&format!("- {}:", v.name)) && help.contains(v.peft), "{} missing from:\n{help}", v.name);
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model.gguf");
    for (args, says) in [
        (&["--method", "loha", "--set", "rank_dropout=0.1"][..], "LoHa's rank_dropout = 0.1"),
        (&["--method", "vera", "--alpha", "3"][..], "vera has no alpha"),
        (&["--method", "melora", "--set", "n=0"][..], "MELoRA needs at least one mini LoRA"),
    ] {
        let mut all = vec!["train", "--model", missing.to_str().unwrap(), "--data", "x.jsonl", "--output", "out"];
        all.extend_from_slice(args);
        let (ok, _, err) = cli(&all);
        assert!(!ok && err.contains(says) && !err.contains("no-such"), "{args:?}: {err}");
    }
}

/// QLoRA end to end: train on SmolLM2's Q4_1 kept quantized (with checkpointing), merge into a
/// GGUF file, and evaluate it against the unmerged adapter on the quantized base, on other text.
/// Written in f32 the merged file gives the same loss (1e-4): the writer's names, q/k row
/// permutation and metadata are llama.cpp's, and it loads as any llama GGUF with the source's
/// tokenizer. Re-quantized to Q8_0 by rounding to nearest it stays within 2e-2 (measured
/// +0.0108: the rounding of the merged linears), by GPTQ against other text (`--calibration`)
/// within 1e-2, the bound (measured +0.0029; see the README's QLoRA section).
#[test]
fn a_merged_gguf_evaluates_as_the_adapter_on_the_quantized_base() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, texts: &[&str]| {
        let lines: Vec<String> = texts.iter().map(|t| serde_json::json!({ "text": t }).to_string()).collect();
        let path = dir.path().join(name);
        std::fs::write(&path, lines.join("\n")).unwrap();
        path.to_str().unwrap().to_string()
    };
    let train = write(
        "train.jsonl",
        &[
            "The capital of France is Paris.",
            "Water boils at one hundred degrees Celsius at sea level.",
            "A triangle has three sides and three angles.",
            "The quick brown fox jumps over the lazy dog.",
            "Photosynthesis turns light into chemical energy in plants.",
            "Rust is a systems programming language focused on safety.",
        ],
    );
    // 32 sentences (303 predicted tokens): on fewer, the loss moves by the first-order effect
    // of the rounding on the few tokens (0.018 on 8 sentences, 79 tokens).
    let eval_data = write(
        "eval.jsonl",
        &[
            "The sun rises in the east and sets in the west.",
            "Cats are small carnivorous mammals often kept as pets.",
            "A week has seven days, and a year has twelve months.",
            "The Pacific is the largest ocean on Earth.",
            "Bread is made from flour, water, yeast and salt.",
            "Music can change the mood of a room in seconds.",
            "Trains run on rails and carry people and goods.",
            "The heart pumps blood through the body.",
            "Mount Everest is the highest mountain above sea level.",
            "Bees collect nectar from flowers to make honey.",
            "The moon orbits the Earth about once a month.",
            "Libraries lend books to the people of a town.",
            "Ice floats because it is less dense than water.",
            "A good night's sleep helps the brain store memories.",
            "Volcanoes form where molten rock reaches the surface.",
            "The piano has eighty-eight keys, black and white.",
            "Doctors wash their hands before they see a patient.",
            "Electric cars run on batteries instead of petrol.",
            "The Amazon river carries more water than any other.",
            "Children learn languages faster than most adults.",
            "A compass needle points toward magnetic north.",
            "Tea was first drunk in China thousands of years ago.",
            "Rain forms when water vapour cools into droplets.",
            "Chess is played on a board of sixty-four squares.",
            "The Roman Empire built roads across much of Europe.",
            "Whales breathe air through a blowhole on their backs.",
            "Bicycles are a cheap and healthy way to travel.",
            "Light travels faster than sound through the air.",
            "Farmers rotate crops to keep the soil healthy.",
            "The human skeleton has more than two hundred bones.",
            "Paper was invented in China nearly two thousand years ago.",
            "Penguins live mostly in the southern hemisphere.",
        ],
    );
    let run = dir.path().join("run");
    let (ok, _, err) = cli(&[
        "train",
        "--model",
        &smollm2(),
        "--base-quant",
        "keep",
        "--checkpoint-activations",
        "--data",
        &train,
        "--output",
        run.to_str().unwrap(),
        "--method",
        "lora",
        "--rank",
        "8",
        "--targets",
        "q_proj,v_proj,down_proj",
        "--steps",
        "4",
        "--lr",
        "1e-3",
        "--schedule",
        "constant",
        "--batch-size",
        "2",
        "--max-len",
        "64",
        "--every",
        "4",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    let adapter = run.join("adapter");
    let eval = |args: &[&str]| -> f64 {
        let mut all = vec!["eval", "--data", &eval_data, "--json", "--device", "cpu"];
        all.extend_from_slice(args);
        let (ok, out, err) = cli(&all);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["loss"].as_f64().unwrap()
    };
    let unmerged = eval(&["--model", &smollm2(), "--base-quant", "keep", "--adapter", adapter.to_str().unwrap()]);
    let base = eval(&["--model", &smollm2()]);
    assert!(
        (unmerged - base).abs() > 1e-2,
        "the adapter changed nothing ({unmerged} vs {base}): the test proves nothing"
    );
    // GPTQ's calibration text: the paragraphs of the GPL's text (other text than the eval's).
    let license = std::fs::read_to_string(fixture("calibration/GPL-3")).unwrap();
    let paragraphs: Vec<String> = license
        .split("\n\n")
        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|p| p.split(' ').count() >= 8)
        .collect();
    let calibration = write("calibration.jsonl", &paragraphs.iter().map(String::as_str).collect::<Vec<_>>());
    let base_model = smollm2();
    for (quant, bound, gptq) in [("f32", 1e-4, false), ("q8_0", 2e-2, false), ("q8_0", 1e-2, true)] {
        let merged = dir.path().join(format!("merged-{quant}-{gptq}.gguf"));
        let mut args = vec![
            "merge",
            "--base",
            &base_model,
            "--adapter",
            adapter.to_str().unwrap(),
            "--output-gguf",
            merged.to_str().unwrap(),
            "--quant",
            quant,
            "--device",
            "cpu",
        ];
        if gptq {
            args.extend(["--calibration", &calibration]);
        }
        let (ok, _, err) = cli(&args);
        assert!(ok, "{err}");
        assert_eq!(err.contains("loses precision"), quant == "q8_0", "the re-quantization warning: {err}");
        assert_eq!(err.contains("GPTQ: 90 weights"), gptq, "the GPTQ report: {err}");
        // The weights the adapter leaves alone are copied in the base's types (merge keeps a
        // GGUF base quantized by default); the adapted ones are written as asked.
        use candle_core::quantized::{gguf_file::Content, GgmlDType};
        let read = |path: &str| Content::read(&mut std::fs::File::open(path).unwrap()).unwrap();
        let (source, written) = (read(&smollm2()), read(merged.to_str().unwrap()));
        let merged_type = if quant == "f32" { GgmlDType::F32 } else { GgmlDType::Q8_0 };
        for (name, info) in &source.tensor_infos {
            let adapted = ["attn_q", "attn_v", "ffn_down"].iter().any(|t| name.ends_with(&format!("{t}.weight")));
            let want = if adapted { merged_type } else { info.ggml_dtype };
            assert_eq!(written.tensor_infos[name].ggml_dtype, want, "{name} in the merged {quant} file");
        }
        let loss = eval(&["--model", merged.to_str().unwrap()]);
        eprintln!(
            "eval loss: base {base:.4}, adapter on the Q4_1 base {unmerged:.4}, merged {quant} GGUF{} {loss:.4}",
            if gptq { " (GPTQ)" } else { "" }
        );
        assert!((unmerged - loss).abs() < bound, "adapter {unmerged} vs merged {quant} {loss}");
    }

    // Merged into an HF directory, the model carries its tokenizer and chat template: the
    // template renders as the GGUF's, `generate --chat` runs on the directory, and it evaluates
    // as the adapter on the f32 base.
    let merged = dir.path().join("merged-hf");
    let merge = ["merge", "--base", &smollm2(), "--adapter", adapter.to_str().unwrap(), "--device", "cpu"];
    let (ok, _, err) = cli(&[&merge[..], &["--output", merged.to_str().unwrap()]].concat());
    assert!(ok, "{err}");
    for file in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        assert!(merged.join(file).exists(), "the merged directory has no {file}");
    }
    use candle_peft::chat::{ChatTemplate, Message};
    let conversation = [Message::new("user", "Hi"), Message::new("assistant", "Hello!")];
    let render =
        |path: &Path| ChatTemplate::from_model(path).unwrap().expect("a chat template").render(&conversation, false);
    assert_eq!(render(&merged).unwrap(), render(Path::new(&smollm2())).unwrap());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(
        (config["bos_token"].as_str(), config["eos_token"].as_str()),
        (Some("<|im_start|>"), Some("<|im_end|>"))
    );
    let (ok, out, err) =
        cli(&["generate", "--model", merged.to_str().unwrap(), "--chat", "--prompt", "Hi", "--max-new-tokens", "3"]);
    assert!(ok && !out.trim().is_empty(), "{err}");
    let dense = eval(&["--model", &smollm2(), "--adapter", adapter.to_str().unwrap()]);
    let loss = eval(&["--model", merged.to_str().unwrap()]);
    assert!((dense - loss).abs() < 1e-4, "adapter on the f32 base {dense} vs merged HF directory {loss}");
}

#[test]
fn convert_writes_a_lora_with_the_adapters_logits() -> candle_peft::Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("tiny_llama");
    let adapter = base.join("vera");
    let (ok, out, err) = cli(&[
        "convert",
        "--base",
        base.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--energy",
        "1",
        "--output",
        dir.path().to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("vera adapter converted to LoRA (6 layers"), "{out}");
    let ids = candle_core::Tensor::new(&[[3u32, 1, 4, 1, 5, 9, 2, 6]], &Device::Cpu)?;
    let load = |dir: &Path| -> candle_peft::Result<candle_core::Tensor> {
        let llama = Llama::from_hf_dir(&base, &Device::Cpu, DType::F32)?;
        PeftModel::from_pretrained(llama, dir, DType::F32)?.model().forward(&ids)
    };
    let (want, got) = (load(&adapter)?, load(dir.path())?);
    assert_close(&got, &want, 1e-5, "converted VeRA");
    Ok(())
}

#[test]
fn combine_writes_peft_tensors_and_an_adapter_that_merge_takes() -> candle_peft::Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let saved = fixture("tiny_llama/multi/saved");
    let (a, b) = (format!("{}:0.8", saved.display()), format!("{}:-0.5", saved.join("b").display()));
    let out_dir = dir.path().join("ties");
    let args = ["--type", "ties", "--density", "0.5", "--output", out_dir.to_str().unwrap()];
    let (ok, out, err) = cli(&[&["combine", "--adapter", &a, "--adapter", &b][..], &args[..]].concat());
    assert!(ok, "{err}");
    assert!(out.contains("2 adapters combined by ties into a rank-4 LoRA of 8 layers"), "{out}");
    // PEFT's add_weighted_adapter(["a", "b"], [0.8, -0.5], combination_type="ties", density=0.5).
    let theirs = candle_peft::format::read_safetensors(
        &fixture("tiny_llama/multi/combined/ties/adapter_model.safetensors"),
        &Device::Cpu,
    )?;
    let mine = candle_peft::format::read_safetensors(&out_dir.join("adapter_model.safetensors"), &Device::Cpu)?;
    assert_eq!(mine.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
    for (k, t) in &theirs {
        assert_close(&mine[k], t, 1e-5, k);
    }
    // `merge` takes it, and the merged model gives the adapter's logits.
    let merged = dir.path().join("merged");
    let (ok, _, err) = cli(&[
        "merge",
        "--base",
        fixture("tiny_llama").to_str().unwrap(),
        "--adapter",
        out_dir.to_str().unwrap(),
        "--output",
        merged.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let ids = candle_core::Tensor::new(&[[3u32, 1, 4, 1, 5, 9, 2, 6]], &Device::Cpu)?;
    let llama = Llama::from_hf_dir(&fixture("tiny_llama"), &Device::Cpu, DType::F32)?;
    let adapted = PeftModel::from_pretrained(llama, &out_dir, DType::F32)?.model().forward(&ids)?;
    let merged = Llama::from_hf_dir(&merged, &Device::Cpu, DType::F32)?.forward(&ids)?;
    assert_close(&merged, &adapted, 1e-5, "merged combination");
    let (ok, _, err) = cli(&["combine", "--adapter", &a, "--adapter", &b, "--type", "ties", "--output", "x"]);
    assert!(!ok && err.contains("density"), "{err}");
    Ok(())
}

#[test]
fn export_writes_llama_cpp_adapters_and_converts_other_methods() {
    use candle_core::quantized::gguf_file;
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("tiny_llama");
    let export = |adapter: &str, extra: &[&str]| {
        let out = dir.path().join(format!("{adapter}.gguf"));
        let args = ["export", "--base", base.to_str().unwrap(), "--adapter"];
        let adapter_dir = fixture("tiny_llama").join(adapter);
        let rest = ["--output", out.to_str().unwrap(), "--outtype", "f32"];
        let (ok, stdout, err) = cli(&[&args[..], &[adapter_dir.to_str().unwrap()], &rest[..], extra].concat());
        (ok, stdout, err, out)
    };
    let (ok, stdout, err, out) = export("lora", &[]);
    assert!(ok, "{err}");
    assert!(stdout.contains("6 adapted tensors written"), "{stdout}");
    let mut f = std::fs::File::open(&out).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    assert_eq!(content.metadata["general.type"].to_string().unwrap(), "adapter");
    // PEFT's lora_alpha, the file's one alpha.
    assert_eq!(content.metadata["adapter.lora.alpha"].to_f32().unwrap(), 8.0);
    assert!(content.tensor_infos.contains_key("blk.1.attn_q.weight.lora_b"));
    let (ok, _, err, _) = export("dora", &[]);
    assert!(!ok && err.contains("dora adapter") && err.contains("--energy"), "{err}");
    let (ok, stdout, err, _) = export("dora", &["--energy", "0.99"]);
    assert!(ok, "{err}");
    assert!(stdout.contains("dora adapter converted to LoRA"), "{stdout}");
}
