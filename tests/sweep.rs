//! The scaling sweep: the logged quantities against closed-form facts, resumption, pruning and
//! bad configs. A tiny built-in model keeps it fast.

use std::path::Path;

use candle_core::Device;
use candle_peft::sweep::{prune_magnitude, read_cells, Sweep, SweepConfig};

fn tiny(ranks: &[usize], steps: usize) -> SweepConfig {
    serde_json::from_value(serde_json::json!({
        "model": "builtin",
        "builtin_model": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "vocab_size": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
        "data": "builtin", "methods": ["lora"], "ranks": ranks, "scalings": ["alpha-r", "alpha-sqrt-r"],
        "learning_rates": [1e-3], "alpha": 16.0, "targets": ["q_proj", "v_proj", "down_proj"],
        "steps": steps, "batch_size": 2, "seq_len": 32, "eval_examples": 2, "seed": 3
    }))
    .unwrap()
}

fn steps(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("steps.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn step_one_gradients_scale_with_the_factor_and_cells_share_one_base_model() -> candle_peft::Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let cells = Sweep::new(tiny(&[2, 8], 4), Device::Cpu)?.run(dir.path())?;
    assert_eq!(cells.len(), 4);
    let steps = steps(dir.path());
    assert_eq!(steps.len(), 16);
    let first = |key: &str| steps.iter().find(|s| s["cell"] == key && s["step"] == 1).unwrap().clone();
    // LoRA starts with B = 0: the first forward pass is the base model's in every cell (so the
    // base came back unchanged from each earlier cell), and the first gradients (of B only) are
    // proportional to the factor s: alpha/sqrt(r) over alpha/r is sqrt(r).
    let loss0 = first(&cells[0].key)["loss"].as_f64().unwrap();
    for c in &cells {
        assert!((first(&c.key)["loss"].as_f64().unwrap() - loss0).abs() < 1e-6, "{}", c.key);
    }
    for r in [2usize, 8] {
        let g = |scaling: &str| first(&format!("lora|r={r}|{scaling}|lr=0.001"))["mean_grad_norm"].as_f64().unwrap();
        let ratio = g("alpha/sqrt(r)") / g("alpha/r");
        assert!((ratio - (r as f64).sqrt()).abs() < 1e-4 * ratio, "r={r}: {ratio}");
    }
    for c in &cells {
        assert!(c.final_loss.unwrap().is_finite() && c.eval_loss.unwrap().is_finite());
        assert!(c.trainable_params > 0 && c.step_time_s > 0.0);
    }
    for f in ["cells.csv", "steps.csv", "cells.jsonl", "sweep_config.json"] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
    #[cfg(feature = "plot")]
    for f in ["final_loss_vs_rank.png", "loss_vs_step.png", "grad_norm_vs_step.png"] {
        assert!(std::fs::read(dir.path().join(f)).unwrap().starts_with(b"\x89PNG"), "{f}");
    }
    Ok(())
}

#[test]
fn an_interrupted_sweep_runs_only_its_unfinished_cells() -> candle_peft::Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let full = Sweep::new(tiny(&[2, 4], 3), Device::Cpu)?.run(dir.path())?;
    // Simulate an interruption during the last cell: its record is missing and half its steps
    // were logged. Mark a finished cell so that a rerun of it would show.
    let cells_path = dir.path().join("cells.jsonl");
    let mut lines: Vec<String> = std::fs::read_to_string(&cells_path).unwrap().lines().map(String::from).collect();
    lines.pop();
    let mut marked: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    marked["final_loss"] = serde_json::json!(123.0);
    lines[0] = marked.to_string();
    // ... and the interruption cut the write of the last record short.
    std::fs::write(&cells_path, lines.join("\n") + "\n{\"key\":\"lora|r=4|alp").unwrap();
    let steps_path = dir.path().join("steps.jsonl");
    let kept: Vec<String> =
        std::fs::read_to_string(&steps_path).unwrap().lines().take(3 * 3 + 1).map(String::from).collect();
    std::fs::write(&steps_path, kept.join("\n") + "\n").unwrap();

    let resumed = Sweep::new(tiny(&[2, 4], 3), Device::Cpu)?.run(dir.path())?;
    assert_eq!(resumed.len(), 4);
    assert_eq!(resumed[0].final_loss, Some(123.0), "a finished cell ran again");
    assert_eq!(resumed[3].key, full[3].key);
    assert_eq!(resumed[3].final_loss, full[3].final_loss, "same seeds and data order: the same result");
    assert_eq!(steps(dir.path()).len(), 12, "the partial steps of the interrupted cell were dropped");

    // Other training settings in the same directory are refused; a larger grid extends it.
    let mut other = tiny(&[2, 4], 3);
    other.alpha = 8.0;
    assert!(Sweep::new(other, Device::Cpu)?.run(dir.path()).unwrap_err().to_string().contains("another --output"));
    let extended = Sweep::new(tiny(&[2, 4, 8], 3), Device::Cpu)?.run(dir.path())?;
    assert_eq!(read_cells(dir.path())?.len(), 6);
    assert_eq!(extended.len(), 6);
    Ok(())
}

#[test]
fn magnitude_pruning_zeroes_the_smallest_weights_of_each_matrix() -> candle_peft::Result<()> {
    use candle_peft::models::Llama;
    use candle_peft::peft_model::LinearHost;
    let config = tiny(&[2], 1).builtin_model.unwrap();
    let mut model = Llama::random(config.clone(), 0, &Device::Cpu)?;
    let before: Vec<Vec<f32>> = model
        .linears()
        .iter()
        .map(|(_, l)| l.weight().dense().unwrap().flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    prune_magnitude(&mut model, 0.3)?;
    for ((path, l), w0) in model.linears().iter().zip(&before) {
        let w: Vec<f32> = l.weight().dense()?.flatten_all()?.to_vec1()?;
        if path == "lm_head" {
            assert_eq!(&w, w0, "the output layer is not pruned");
            continue;
        }
        let zeros = w.iter().filter(|&&v| v == 0.0).count();
        assert_eq!(zeros, (w.len() as f64 * 0.3).floor() as usize, "{path}");
        let largest_pruned = w0.iter().zip(&w).filter(|(_, &v)| v == 0.0).map(|(a, _)| a.abs()).fold(0f32, f32::max);
        let smallest_kept = w0.iter().zip(&w).filter(|(_, &v)| v != 0.0).map(|(a, _)| a.abs()).fold(f32::MAX, f32::min);
        assert!(largest_pruned <= smallest_kept, "{path}");
        assert!(w0.iter().zip(&w).all(|(a, b)| *b == 0.0 || a == b));
    }
    assert!(prune_magnitude(&mut model, 1.0).is_err());
    Ok(())
}

#[test]
fn bad_sweep_configs_are_clear_errors() {
    let err = |f: fn(&mut SweepConfig)| {
        let mut c = tiny(&[2], 1);
        f(&mut c);
        c.validate().unwrap_err().to_string()
    };
    assert!(err(|c| c.ranks = vec![0]).contains("at least 1"));
    assert!(err(|c| c.scalings = vec!["alpha-cube".into()]).contains("alpha-sqrt-r"));
    assert!(err(|c| c.methods = vec!["vera".into()]).contains("vera has no alpha and no rank-dependent scaling factor"));
    let e = err(|c| c.methods = vec!["lorra".into()]);
    assert!(e.contains("unknown method `lorra`") && e.contains("lora, rslora, rora, dora"), "{e}");
    assert!(err(|c| c.learning_rates = vec![-1.0]).contains("positive"));
    // `train` refuses an unknown schedule; the sweep ran one as constant.
    let e = err(|c| c.schedule = "cosin".into());
    assert!(e.contains("unknown schedule \"cosin\"") && e.contains("constant or cosine"), "{e}");
    assert!(err(|c| c.prune = Some(1.5)).contains("[0, 1)"));
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.json");
    std::fs::write(&p, "{\"model\": \"builtin\", \"rank\": 4}").unwrap();
    assert!(SweepConfig::from_file(&p).unwrap_err().to_string().contains("bad.json"));
    assert_eq!(SweepConfig::builtin_default().ranks, vec![4, 16, 64, 256]);
}

/// A built-in model with zero or inconsistent head counts is refused when the config is checked,
/// naming the field (and the file, for a config file), instead of dividing by zero in the sweep.
#[test]
fn a_bad_builtin_model_shape_is_a_clear_error() {
    let with = |field: &str, value: usize| {
        let mut c = tiny(&[2], 1);
        let mut model = serde_json::to_value(c.builtin_model.as_ref().unwrap()).unwrap();
        model[field] = value.into();
        c.builtin_model = Some(serde_json::from_value(model).unwrap());
        c
    };
    for (field, value, says) in [
        ("num_attention_heads", 0, "expected at least 1"),
        ("num_key_value_heads", 0, "expected at least 1"),
        ("num_key_value_heads", 3, "does not divide builtin_model.num_attention_heads (2)"),
        ("num_attention_heads", 3, "does not divide builtin_model.hidden_size (32)"),
        ("vocab_size", 0, "expected at least 1"),
    ] {
        let c = with(field, value);
        let e = c.validate().unwrap_err();
        let want = format!("builtin_model.{field}");
        assert!(
            matches!(&e, candle_peft::Error::ModelConfig { path: None, field: f, .. } if *f == want),
            "{field} = {value}: {e}"
        );
        assert!(e.to_string().contains(says), "{field} = {value}: {e}");
        assert!(Sweep::new(c.clone(), Device::Cpu).is_err());
        // From a file, the error names the file.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sweep.json");
        std::fs::write(&p, serde_json::to_string(&c).unwrap()).unwrap();
        let e = SweepConfig::from_file(&p).unwrap_err();
        assert!(matches!(&e, candle_peft::Error::ModelConfig { path: Some(f), .. } if *f == p), "{e}");
        assert!(e.to_string().contains("sweep.json") && e.to_string().contains(&want), "{e}");
    }
    tiny(&[2], 1).validate().expect("the unmodified config is valid");
    // A billion layers, or a batch of 2^40 tokens, is refused before anything is allocated.
    let e = with("num_hidden_layers", 1_000_000_000).validate().unwrap_err().to_string();
    assert!(e.contains("builtin_model") && e.contains("parameters, more than the 1073741824"), "{e}");
    let e = SweepConfig { batch_size: 1 << 20, seq_len: 1 << 20, ..tiny(&[2], 1) }.validate().unwrap_err().to_string();
    assert!(e.contains("batch_size 1048576 x seq_len 1048576 tokens per batch"), "{e}");
}
