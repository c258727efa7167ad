//! Crash-safe training through the CLI, on the tiny LLaMA (with a word-level tokenizer): a run
//! killed with SIGKILL 20 times at seeded random moments and resumed each time with
//! `--resume latest` ends with the adapter of an uninterrupted run, and every checkpoint it
//! left is complete and equal to that run's; a disk that fills up mid-run gives an error naming
//! the path and leaves the last checkpoint whole.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use candle_peft::format::read_safetensors;
use candle_peft::models::Llama;
use candle_peft::train::latest_checkpoint;
use candle_peft::PeftModel;
use common::fixture;
use rand::{Rng, SeedableRng};

const STEPS: usize = 60;
const KILLS: usize = 20;

/// The tiny LLaMA as an HF directory with a tokenizer, and a JSONL data set, in `dir`.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny_llama").join(f), model.join(f)).unwrap();
    }
    std::fs::copy(fixture("tiny_llama_tokenizer.json"), model.join("tokenizer.json")).unwrap();
    let data = dir.join("train.jsonl");
    let lines = [
        r#"{"text": "the cat sat on the mat"}"#,
        r#"{"prompt": "1 + 1 =", "completion": "2"}"#,
        r#"{"text": "the dog ran to the sun"}"#,
        r#"{"prompt": "hello", "completion": "world"}"#,
        r#"{"text": "a b c d e f g h"}"#,
        r#"{"prompt": "is the sun up?", "completion": "yes"}"#,
    ];
    std::fs::write(&data, lines.join("\n")).unwrap();
    (model, data)
}

fn train(model: &Path, data: &Path, output: &Path, resume: bool) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_candle-peft"));
    let steps = STEPS.to_string();
    cmd.args(["train", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()])
        .args(["--output", output.to_str().unwrap(), "--method", "lora", "--rank", "4", "--targets", "q_proj,v_proj"])
        .args(["--set", "lora_dropout=0", "--steps", &steps, "--batch-size", "2", "--max-len", "16", "--every", "1"])
        .args(["--lr", "1e-2", "--device", "cpu"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if resume {
        cmd.args(["--resume", "latest"]);
    }
    cmd
}

fn adapter(dir: &Path) -> PeftModel<Llama> {
    let llama = Llama::from_hf_dir(&fixture("tiny_llama"), &Device::Cpu, DType::F32).unwrap();
    PeftModel::from_pretrained(llama, dir, DType::F32).unwrap()
}

/// The largest difference between two adapters' tensors (same keys).
fn max_diff(a: &Path, b: &Path) -> f32 {
    let (a, b) = (read_safetensors(a, &Device::Cpu).unwrap(), read_safetensors(b, &Device::Cpu).unwrap());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .map(|(k, t)| (t - &b[k]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap())
        .fold(0f32, f32::max)
}

/// The `checkpoint-N` directories and the hidden leftovers of `dir` (none when it does not exist).
fn entries(dir: &Path) -> (Vec<PathBuf>, Vec<String>) {
    let (mut checkpoints, mut hidden) = (Vec::new(), Vec::new());
    let Ok(listing) = std::fs::read_dir(dir) else { return (checkpoints, hidden) };
    for e in listing {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("checkpoint-") {
            checkpoints.push(path);
        } else if name.starts_with('.') {
            hidden.push(name);
        }
    }
    (checkpoints, hidden)
}

/// A checkpoint of the killed series is whole and holds what the uninterrupted run's
/// checkpoint of the same step holds (adapter and optimizer state, byte for byte).
fn check_checkpoint(ckpt: &Path, reference: &Path) {
    let name = ckpt.file_name().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors"] {
        let (got, want) = (std::fs::read(ckpt.join(f)), std::fs::read(reference.join(name).join(f)));
        assert!(
            got.is_ok() && got.as_ref().ok() == want.as_ref().ok(),
            "{} differs from the reference",
            ckpt.join(f).display()
        );
    }
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("trainer_state.json")).unwrap()).unwrap();
    let step: usize = name.to_str().unwrap().strip_prefix("checkpoint-").unwrap().parse().unwrap();
    assert_eq!(state["step"], step, "{}", ckpt.display());
    assert_eq!(state["history"].as_array().unwrap().len(), step);
}

#[test]
fn a_run_killed_20_times_resumes_to_the_uninterrupted_runs_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = setup(dir.path());
    let reference = dir.path().join("reference");
    let started = Instant::now();
    let out = train(&model, &data, &reference, false).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let whole_run = started.elapsed();

    // Each run is killed at a random moment within a window of a 40th of an uninterrupted run's
    // time, so that the kills fall at every stage (loading, training, inside a checkpoint write,
    // the final save); after a kill that left no new checkpoint the window widens by half, so
    // that the run gets on, and it shrinks back once it does. A series that finishes before the
    // 20th kill is checked and the next one starts from scratch.
    let killed = dir.path().join("killed");
    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let first_window = whole_run.as_secs_f64() / 40.0;
    let mut window = first_window;
    let (mut kills, mut inside_writes, mut runs, mut series) = (0, 0, 0, 0);
    while kills < KILLS {
        runs += 1;
        assert!(runs < 400, "{kills} kills in {runs} runs: the run does not progress");
        let before = latest_checkpoint(&killed).unwrap();
        let mut child = train(&model, &data, &killed, true).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs_f64(window * rng.random_range(0.0..1.0));
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() >= deadline {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                break None;
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        let (checkpoints, hidden) = entries(&killed);
        for ckpt in &checkpoints {
            check_checkpoint(ckpt, &reference);
        }
        match status {
            None => {
                kills += 1;
                inside_writes += hidden.iter().any(|h| h.starts_with(".checkpoint-")) as usize;
                let progressed = latest_checkpoint(&killed).unwrap() != before;
                window = if progressed { first_window } else { window * 1.5 };
            }
            Some(status) => {
                let mut err = String::new();
                std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
                assert!(status.success(), "a resumed run failed: {err}");
                assert!(hidden.is_empty(), "a finished run left {hidden:?}");
                check_finished(&killed, &reference);
                series += 1;
                std::fs::remove_dir_all(&killed).unwrap();
            }
        }
    }
    // The last series, killed 0 or more times since it started, runs to the end.
    let out = train(&model, &data, &killed, true).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    check_finished(&killed, &reference);
    println!(
        "{kills} kills ({inside_writes} inside a checkpoint write) in {} runs and {} series; a whole run takes \
         {whole_run:?}",
        runs + 1,
        series + 1
    );
    assert!(inside_writes > 0, "no kill fell inside a checkpoint write");
}

/// A finished run of the killed series: every checkpoint, the final adapter (within 1e-6) and
/// the metrics (each step once, in order) are the uninterrupted run's, and nothing temporary is
/// left.
fn check_finished(killed: &Path, reference: &Path) {
    let (checkpoints, hidden) = entries(killed);
    assert!(hidden.is_empty(), "a finished run left {hidden:?}");
    let (_, in_adapter) = entries(&killed.join("adapter"));
    assert!(in_adapter.is_empty(), "a finished run left {in_adapter:?} in adapter/");
    for ckpt in &checkpoints {
        check_checkpoint(ckpt, reference);
    }
    assert_eq!(latest_checkpoint(killed).unwrap(), Some(killed.join(format!("checkpoint-{STEPS}"))));
    let diff = max_diff(
        &killed.join("adapter/adapter_model.safetensors"),
        &reference.join("adapter/adapter_model.safetensors"),
    );
    assert!(diff <= 1e-6, "the resumed run's adapter differs from the uninterrupted run's by {diff}");
    adapter(&killed.join("adapter"));
    let metrics = std::fs::read_to_string(killed.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=STEPS as u64).collect::<Vec<_>>());
}

/// Runs `script` as root of a new mount namespace (`unshare`), where it may mount a tmpfs.
fn in_mount_namespace(script: &str) -> std::process::Output {
    Command::new("unshare").args(["--mount", "--map-root-user", "sh", "-c", script]).output().unwrap()
}

#[test]
fn a_full_disk_stops_training_with_the_path_and_keeps_the_last_checkpoint() {
    let probe = in_mount_namespace("mount -t tmpfs -o size=64k tmpfs /mnt");
    if !probe.status.success() {
        // Containers without CAP_SYS_ADMIN and distributions that restrict user namespaces
        // refuse it; the machines CI runs on allow it.
        eprintln!(
            "SKIPPED: this test mounts a small tmpfs in a mount namespace of its own (`unshare --mount \
             --map-root-user`), which this machine refuses: {}",
            String::from_utf8_lossy(&probe.stderr)
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = setup(dir.path());
    let reference = dir.path().join("reference");
    assert!(train(&model, &data, &reference, false).status().unwrap().success());
    // The output directory on a 160 KiB tmpfs: room for a few checkpoints, not 60.
    let mnt = dir.path().join("mnt");
    let saved = dir.path().join("saved");
    std::fs::create_dir_all(&mnt).unwrap();
    let cmd = train(&model, &data, &mnt.join("out"), false);
    let args: Vec<String> = cmd.get_args().map(|a| format!("'{}'", a.to_str().unwrap())).collect::<Vec<_>>();
    let script = format!(
        "mount -t tmpfs -o size=160k tmpfs '{mnt}' && '{bin}' {args} 2> '{mnt}/../stderr'; echo $? > '{mnt}/../rc'; \
         cp -a '{mnt}/out' '{saved}'",
        mnt = mnt.display(),
        bin = env!("CARGO_BIN_EXE_candle-peft"),
        args = args.join(" "),
        saved = saved.display()
    );
    let out = in_mount_namespace(&script);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rc = std::fs::read_to_string(dir.path().join("rc")).unwrap();
    let err = std::fs::read_to_string(dir.path().join("stderr")).unwrap();
    println!("exit code {}; stderr: {err}", rc.trim());
    assert_ne!(rc.trim(), "0", "training on a full disk succeeded");
    assert!(err.contains("No space left on device") && err.contains(&mnt.join("out").display().to_string()), "{err}");
    let (checkpoints, hidden) = entries(&saved);
    assert!(hidden.is_empty(), "the failed save left {hidden:?}");
    assert!(!checkpoints.is_empty() && checkpoints.len() < STEPS, "{} checkpoints", checkpoints.len());
    for ckpt in &checkpoints {
        check_checkpoint(ckpt, &reference);
    }
    // The run continues from its last checkpoint once there is room.
    let out = train(&model, &data, &saved, true).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let diff = max_diff(
        &saved.join("adapter/adapter_model.safetensors"),
        &reference.join("adapter/adapter_model.safetensors"),
    );
    assert!(diff <= 1e-6, "{diff}");
}
