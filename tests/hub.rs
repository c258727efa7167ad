//! Hub ids resolved offline against a cache directory laid out as `huggingface_hub` lays it out
//! (blobs, snapshots of symlinks, refs): a branch, a tag, a commit hash, sharded weights, a
//! missing file named, and the CLI taking `--model org/name` with `HF_HUB_CACHE` and
//! `HF_HUB_OFFLINE`.
#![cfg(unix)]

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::DType;
use candle_peft::hub::{resolve_model_in, HubId};
use candle_peft::models::Llama;
use candle_peft::Error;
use common::{assert_close, fixture, load, test_device};

const MAIN: &str = "0123456789abcdef0123456789abcdef01234567";
const TAGGED: &str = "89abcdef0123456789abcdef0123456789abcdef";

/// A word-level tokenizer of the tiny models' 64 ids (`t0` .. `t62`, `[UNK]`).
fn tokenizer_json() -> String {
    let mut vocab: serde_json::Map<String, serde_json::Value> = (0..63).map(|i| (format!("t{i}"), i.into())).collect();
    vocab.insert("[UNK]".into(), 63.into());
    serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}})
    .to_string()
}

/// Stores `files` (name, bytes) as blobs and links them from `snapshots/<commit>/`.
fn snapshot(repo: &Path, commit: &str, files: &[(&str, Vec<u8>)]) {
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for (i, (name, bytes)) in files.iter().enumerate() {
        let blob = format!("{commit}{i:04}");
        std::fs::write(repo.join("blobs").join(&blob), bytes).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join(name)).unwrap();
    }
}

/// A cache holding the tiny Qwen3 as `org/tiny-qwen3`: `main` whole, tag `v1` without its
/// tokenizer; and the tiny Mistral as `org/tiny-mistral` in two shards with an index.
fn cache() -> tempfile::TempDir {
    let cache = tempfile::tempdir().unwrap();
    let read = |f: &str| std::fs::read(fixture(&format!("families/{f}"))).unwrap();
    let repo = cache.path().join("models--org--tiny-qwen3");
    let config = ("config.json", read("qwen3/config.json"));
    let weights = ("model.safetensors", read("qwen3/model.safetensors"));
    snapshot(&repo, MAIN, &[config.clone(), weights.clone(), ("tokenizer.json", tokenizer_json().into_bytes())]);
    snapshot(&repo, TAGGED, &[config, weights]);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), MAIN).unwrap();
    std::fs::write(repo.join("refs/v1"), TAGGED).unwrap();

    let tensors =
        candle_peft::format::read_safetensors(&fixture("families/mistral/model.safetensors"), &test_device()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut shards, mut map) = (vec![Vec::new(), Vec::new()], serde_json::Map::new());
    for (i, (name, t)) in tensors.into_iter().enumerate() {
        map.insert(name.clone(), format!("model-0000{}-of-00002.safetensors", i % 2 + 1).into());
        shards[i % 2].push((name, t));
    }
    let mut files = vec![
        ("config.json", read("mistral/config.json")),
        ("tokenizer.json", tokenizer_json().into_bytes()),
        ("model.safetensors.index.json", serde_json::json!({"weight_map": map}).to_string().into_bytes()),
    ];
    for (i, shard) in shards.iter().enumerate() {
        let path = dir.path().join(format!("{i}"));
        candle_peft::format::write_safetensors(&path, shard).unwrap();
        let name = if i == 0 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" };
        files.push((name, std::fs::read(path).unwrap()));
    }
    let repo = cache.path().join("models--org--tiny-mistral");
    snapshot(&repo, MAIN, &files);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), MAIN).unwrap();
    cache
}

#[test]
fn branches_commits_and_shards_resolve_from_the_cache() -> candle_peft::Result<()> {
    let cache = cache();
    let id = |s: &str| s.parse::<HubId>().unwrap();
    let dir = resolve_model_in(cache.path(), &id("org/tiny-qwen3"), true)?;
    assert!(dir.ends_with(format!("snapshots/{MAIN}")), "{}", dir.display());
    let r = load("families/qwen3/reference.safetensors");
    let logits = Llama::from_hf_dir(&dir, &test_device(), DType::F32)?.forward(&r["ids"])?;
    assert_close(&logits, &r["base_logits"], 1e-5, "qwen3 from the cache");
    // A commit hash is a snapshot of its own.
    assert_eq!(resolve_model_in(cache.path(), &id(&format!("org/tiny-qwen3@{MAIN}")), true)?, dir);
    // Sharded weights: the shards the index names.
    let dir = resolve_model_in(cache.path(), &id("org/tiny-mistral"), true)?;
    let r = load("families/mistral/reference.safetensors");
    let logits = Llama::from_hf_dir(&dir, &test_device(), DType::F32)?.forward(&r["ids"])?;
    assert_close(&logits, &r["base_logits"], 1e-5, "sharded mistral from the cache");
    Ok(())
}

#[test]
fn missing_files_are_named_offline() {
    let cache = cache();
    let e = resolve_model_in(cache.path(), &"org/tiny-qwen3@v1".parse().unwrap(), true).unwrap_err();
    assert!(matches!(e, Error::Hub { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("tokenizer.json") && msg.contains(TAGGED) && msg.contains("HF_HUB_OFFLINE"), "{msg}");
    assert!(!msg.contains("config.json"), "config.json is there: {msg}");
    let e = resolve_model_in(cache.path(), &"org/absent".parse().unwrap(), true).unwrap_err().to_string();
    assert!(e.contains("org/absent@main") && e.contains("config.json") && e.contains("model.safetensors"), "{e}");
}

#[test]
fn the_cli_takes_a_hub_id() {
    let cache = cache();
    let data = cache.path().join("eval.jsonl");
    std::fs::write(&data, "{\"text\": \"t1 t2 t3 t4 t5 t6\"}\n").unwrap();
    let eval = |model: &str, env: &[(&str, &Path)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_candle-peft"));
        cmd.args(["eval", "--model", model, "--data", data.to_str().unwrap(), "--device", "cpu"]);
        cmd.env_remove("HF_HOME").env_remove("HF_HUB_CACHE").env("HF_HUB_OFFLINE", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, err) = eval("org/tiny-qwen3", &[("HF_HUB_CACHE", cache.path())]);
    assert!(ok && out.contains("loss"), "{out}{err}");
    // HF_HOME/hub, as huggingface_hub reads it.
    let home = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(cache.path(), home.path().join("hub")).unwrap();
    let (ok, out2, err) = eval("org/tiny-qwen3", &[("HF_HOME", home.path())]);
    assert!(ok && out2 == out, "{out2}{err}");
    let (ok, _, err) = eval("org/tiny-qwen3@v1", &[("HF_HUB_CACHE", cache.path())]);
    assert!(!ok && err.contains("tokenizer.json"), "{err}");
}
