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
