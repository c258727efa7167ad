//! The training loop on the tiny LLaMA: the loss falls, a resumed run continues the same loss
//! curve, a NaN stops training with the last good checkpoint kept, and bad checkpoints are refused.

mod common;

use candle_core::{DType, Tensor};
use candle_peft::format::read_safetensors;
use candle_peft::models::{Llama, LlamaConfig};
use candle_peft::train::data::{batch_indices, Example};
use candle_peft::train::{LrSchedule, TrainConfig, Trainer};
use candle_peft::{AdapterConfig, Error, InitOptions, LinearHost, LoraConfig, PeftModel};
use common::{fixture, test_device};

fn model(config: AdapterConfig) -> PeftModel<Llama> {
    let llama = Llama::from_hf_dir(&fixture("tiny_llama"), &test_device(), DType::F32).unwrap();
    PeftModel::new(llama, config, InitOptions { seed: 1, ..Default::default() }).unwrap()
}

/// LoRA on every linear, lm_head included: the tiny model's frozen head (weights ~ N(0, 0.02))
/// caps the logits too low to fit anything otherwise.
fn lora() -> AdapterConfig {
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"];
    AdapterConfig::Lora(LoraConfig::lora(8, 16.0, &targets))
}

/// Counting sequences modulo the vocabulary: the next token is always the previous plus one.
fn counting(n: usize) -> Vec<Example> {
    (0..n)
        .map(|k| {
            let ids: Vec<u32> = (0..12).map(|i| ((3 * k + i) % 64) as u32).collect();
            Example { labels: ids.iter().map(|&t| t as i64).collect(), ids }
        })
        .collect()
}

fn config(steps: usize) -> TrainConfig {
    TrainConfig { steps, batch_size: 4, schedule: LrSchedule::Constant { lr: 1e-2 }, ..Default::default() }
}

#[test]
fn the_loss_falls_on_a_learnable_task() -> candle_peft::Result<()> {
    let data = counting(16);
    let c = TrainConfig { grad_accum: 2, ..config(40) };
    let mut t = Trainer::new(model(lora()), c)?;
    let before = t.evaluate(&data)?;
    t.train(&data, None)?;
    let after = t.evaluate(&data)?;
    assert!(before > 3.5, "a random model starts near ln(64) = 4.16: {before}");
    assert!(after < 0.5 * before, "loss {before} -> {after}");
    eprintln!("loss {before:.3} -> {after:.3}");
    let h = t.history();
    assert_eq!(h.len(), 40);
    assert!(h.iter().all(|s| s.loss.is_finite() && s.grad_norm.is_finite() && s.tokens == 2 * 4 * 12));
    Ok(())
}

/// A bf16 base with f32 adapters (the usual mixed setup): the loss starts where the f32 model's
/// does, to bf16 precision, and training works through every fused op in bf16.
#[test]
fn a_bf16_base_trains_with_f32_adapters() -> candle_peft::Result<()> {
    let data = counting(16);
    let bf16 = Llama::from_hf_dir(&fixture("tiny_llama"), &test_device(), DType::BF16)?;
    let peft = PeftModel::new(bf16, lora(), InitOptions { seed: 1, dtype: DType::F32 })?;
    assert!(peft.trainable_vars()?.iter().all(|v| v.dtype() == DType::F32));
    let mut t = Trainer::new(peft, config(40))?;
    let mut f32_run = Trainer::new(model(lora()), config(40))?;
    let (start, start_f32) = (t.evaluate(&data)?, f32_run.evaluate(&data)?);
    assert!((start - start_f32).abs() < 0.02 * start_f32, "bf16 {start} vs f32 {start_f32}");
    t.train(&data, None)?;
    let after = t.evaluate(&data)?;
    assert!(t.history().iter().all(|s| s.loss.is_finite() && s.grad_norm.is_finite()));
    assert!(after < 0.5 * start, "bf16 loss {start} -> {after}");
    Ok(())
}

#[test]
fn a_resumed_run_continues_the_same_loss_curve() -> candle_peft::Result<()> {
    let data = counting(10);
    let dir = tempfile::tempdir().unwrap();
    let full_config =
        TrainConfig { checkpoint_every: Some(3), output_dir: Some(dir.path().to_path_buf()), ..config(6) };
    let mut full = Trainer::new(model(lora()), full_config.clone())?;
    full.train(&data, None)?;
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 6);
    #[cfg(feature = "plot")]
    assert!(std::fs::read(dir.path().join("loss.png")).unwrap().starts_with(b"\x89PNG"), "no loss curve");
    // Resuming into the same directory keeps steps 1-3 of the log and rewrites 4-6.

    let mut resumed = Trainer::resume(model(lora()), full_config, &dir.path().join("checkpoint-3"))?;
    assert_eq!(resumed.step(), 3);
    resumed.train(&data, None)?;
    for (a, b) in full.history().iter().zip(resumed.history()) {
        assert!((a.loss - b.loss).abs() < 1e-6, "step {}: {} vs {}", a.step, a.loss, b.loss);
    }
    assert_eq!(resumed.history().len(), 6);
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    // The final checkpoint is a PEFT adapter directory.
    PeftModel::from_pretrained(
        Llama::from_hf_dir(&fixture("tiny_llama"), &test_device(), DType::F32)?,
        &dir.path().join("checkpoint-6"),
        DType::F32,
    )?;
    Ok(())
}

#[test]
fn a_nan_stops_training_and_keeps_the_last_checkpoint() -> candle_peft::Result<()> {
    let data = counting(8);
    let dir = tempfile::tempdir().unwrap();
    let c = TrainConfig { checkpoint_every: Some(1), output_dir: Some(dir.path().to_path_buf()), ..config(4) };
    let mut t = Trainer::new(model(lora()), c)?;
    t.train_step(&data)?;
    t.train_step(&data)?;
    let good = dir.path().join("checkpoint-2");
    t.save_checkpoint(&good)?;
    // Poison one adapter: the next forward gives NaN logits.
    for (path, layer) in t.peft_mut().model_mut().linears_mut() {
        if path == "model.layers.0.self_attn.q_proj" {
            let nan = Tensor::full(f32::NAN, (32, 8), &test_device())?;
            layer.adapter_mut().unwrap().load_tensor("lora_B.weight", &nan)?;
        }
    }
    let e = t.train(&data, None).unwrap_err();
    assert!(matches!(e, Error::NonFinite { step: 3, .. }), "{e}");
    assert!(e.to_string().contains("checkpoint-2"), "{e}");
    assert!(!dir.path().join("checkpoint-3").exists());
    let llama = Llama::from_hf_dir(&fixture("tiny_llama"), &test_device(), DType::F32)?;
    PeftModel::from_pretrained(llama, &good, DType::F32)?;
    Ok(())
}

/// The tiny LLaMA with a NaN embedding for token 63: the loss of a batch holding the token is
/// NaN (and so are its gradients).
fn poisoned_model() -> candle_peft::Result<PeftModel<Llama>> {
    let dir = fixture("tiny_llama");
    let mut tensors = read_safetensors(&dir.join("model.safetensors"), &test_device())?;
    let embed = &tensors["model.embed_tokens.weight"];
    let nan = Tensor::full(f32::NAN, (1, embed.dim(1)?), &test_device())?;
    let poisoned = Tensor::cat(&[&embed.narrow(0, 0, 63)?, &nan], 0)?;
    tensors.insert("model.embed_tokens.weight".into(), poisoned);
    let llama = Llama::from_tensors(LlamaConfig::from_file(&dir.join("config.json"))?, &tensors, DType::F32)?;
    PeftModel::new(llama, lora(), InitOptions { seed: 1, ..Default::default() })
}

/// Counting sequences, of which examples 2 and 5 hold the poisoned token 63.
fn poisoned_data() -> Vec<Example> {
    let mut data: Vec<Example> = counting(8)
        .into_iter()
        .map(|mut e| {
            e.ids.iter_mut().for_each(|t| *t %= 60);
            e.labels = e.ids.iter().map(|&t| t as i64).collect();
            e
        })
        .collect();
    for i in [2, 5] {
        data[i].ids[4] = 63;
    }
    data
}

#[test]
fn skip_nonfinite_skips_the_steps_whose_batch_has_a_nan_loss_and_stops_after_n() -> candle_peft::Result<()> {
    let data = poisoned_data();
    let c = TrainConfig { batch_size: 2, skip_nonfinite: 100, ..config(12) };
    let bad: Vec<bool> =
        (0..12).map(|s| batch_indices(8, 2, s, c.seed).unwrap().iter().any(|i| [2, 5].contains(i))).collect();
    assert!(bad.iter().any(|&b| b) && !bad.iter().all(|&b| b), "{bad:?}");
    let mut t = Trainer::new(poisoned_model()?, c.clone())?;
    let weights = |t: &Trainer<Llama>| -> Vec<Vec<f32>> {
        t.peft().trainable_vars().unwrap().iter().map(|v| v.flatten_all().unwrap().to_vec1().unwrap()).collect()
    };
    for (step, &is_bad) in bad.iter().enumerate() {
        let before = weights(&t);
        let log = t.train_step(&data)?;
        assert_eq!(log.skipped, is_bad, "step {}", step + 1);
        assert_eq!(log.loss.is_finite(), !is_bad, "step {}: loss {}", step + 1, log.loss);
        // A skipped step changes nothing; any other one updates every tensor.
        assert_eq!(weights(&t) == before, is_bad, "step {}", step + 1);
    }
    let skipped = bad.iter().filter(|&&b| b).count();
    assert_eq!(t.skipped_steps(), skipped);

    // The skipped steps survive a checkpoint (`null` losses in JSON) and count against the limit.
    let dir = tempfile::tempdir().unwrap();
    t.save_checkpoint(&dir.path().join("checkpoint-12"))?;
    let c = TrainConfig { steps: 40, skip_nonfinite: skipped, ..c };
    let mut resumed = Trainer::resume(poisoned_model()?, c, &dir.path().join("checkpoint-12"))?;
    assert_eq!(resumed.skipped_steps(), skipped);
    let e = resumed.train(&data, None).unwrap_err();
    let step =
        12 + (12..40).position(|s| batch_indices(8, 2, s, 0).unwrap().iter().any(|i| [2, 5].contains(i))).unwrap() + 1;
    let idx = batch_indices(8, 2, step - 1, 0)?;
    assert!(matches!(e, Error::NonFinite { step: s, .. } if s == step), "{e}");
    let message = e.to_string();
    assert!(message.contains(&format!("loss of the training examples {idx:?}")), "{message}");
    assert!(message.contains("checkpoint-12"), "{message}");
    Ok(())
}

#[test]
fn a_checkpoint_of_another_method_is_refused() -> candle_peft::Result<()> {
    let data = counting(8);
    let dir = tempfile::tempdir().unwrap();
    let c = TrainConfig { output_dir: Some(dir.path().to_path_buf()), ..config(1) };
    Trainer::new(model(lora()), c.clone())?.train(&data, None)?;
    let vera = AdapterConfig::Vera(candle_peft::VeraConfig::new(8, &["q_proj"]));
    let e = Trainer::resume(model(vera), c, &dir.path().join("checkpoint-1")).unwrap_err();
    assert!(e.to_string().contains("LORA") && e.to_string().contains("VERA"), "{e}");
    Ok(())
}

#[test]
fn zero_sizes_and_intervals_are_refused_naming_their_own_field() {
    type Spoil = fn(&mut TrainConfig);
    let cases: [(&str, Spoil, &str); 5] = [
        ("batch_size", |c| c.batch_size = 0, "expected at least 1"),
        ("grad_accum", |c| c.grad_accum = 0, "expected at least 1"),
        ("eval_every", |c| c.eval_every = Some(0), "expected at least 1"),
        ("checkpoint_every", |c| c.checkpoint_every = Some(0), "expected at least 1"),
        ("max_grad_norm", |c| c.max_grad_norm = Some(0.0), "expected a positive number"),
    ];
    for (field, spoil, says) in cases {
        let mut c = config(4);
        spoil(&mut c);
        let e = Trainer::new(model(lora()), c.clone()).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { name, .. } if name == field), "{field}: {e}");
        let text = e.to_string();
        assert!(text.contains(field) && text.contains(says), "{text}");
        for other in cases.iter().map(|(f, ..)| *f).filter(|f| *f != field) {
            assert!(!text.contains(other), "the error about {field} names {other}: {text}");
        }
        // Resuming checks the config before it reads the checkpoint (which does not exist here).
        let e = Trainer::resume(model(lora()), c, std::path::Path::new("no-such-checkpoint")).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { name, .. } if name == field), "{field}: {e}");
    }
    let c = TrainConfig { eval_every: None, checkpoint_every: None, max_grad_norm: None, ..config(4) };
    Trainer::new(model(lora()), c).expect("None everywhere is valid");
}

/// Settings that would train uphill, into NaN, or not at all are refused by name before a step
/// runs (`--lr -1` used to climb the loss, `--lr NaN` to save an all-NaN adapter).
#[test]
fn bad_rates_steps_and_optimizer_settings_are_refused_naming_their_field() {
    use candle_peft::train::LrSchedule;
    type Spoil = fn(&mut TrainConfig);
    let cases: [(&str, Spoil, &str); 9] = [
        ("steps", |c| c.steps = 0, "expected at least 1"),
        ("schedule.lr", |c| c.schedule = LrSchedule::Constant { lr: -1.0 }, "expected a positive learning rate"),
        ("schedule.lr", |c| c.schedule = LrSchedule::Constant { lr: f64::NAN }, "expected a positive learning rate"),
        (
            "schedule.min_lr",
            |c| c.schedule = LrSchedule::WarmupCosine { lr: 1e-3, warmup: 1, total: 4, min_lr: 1e-2 },
            "between 0 and the peak learning rate",
        ),
        ("adamw.beta1", |c| c.adamw.beta1 = 1.0, "in [0, 1)"),
        ("adamw.beta2", |c| c.adamw.beta2 = -0.5, "in [0, 1)"),
        ("adamw.eps", |c| c.adamw.eps = 0.0, "small positive"),
        ("adamw.weight_decay", |c| c.adamw.weight_decay = f64::NAN, "non-negative"),
        ("adamw.weight_decay", |c| c.adamw.weight_decay = -0.1, "non-negative"),
    ];
    for (field, spoil, says) in cases {
        let mut c = config(4);
        spoil(&mut c);
        let e = Trainer::new(model(lora()), c).unwrap_err();
        assert!(matches!(&e, Error::InvalidConfig { name, .. } if *name == field), "{field}: {e}");
        assert!(e.to_string().contains(says), "{field}: {e}");
    }
    let c =
        TrainConfig { schedule: LrSchedule::WarmupCosine { lr: 1e-3, warmup: 1, total: 4, min_lr: 0.0 }, ..config(4) };
    Trainer::new(model(lora()), c).expect("a cosine down to 0 is valid");
}

#[test]
fn empty_training_or_evaluation_data_is_an_error_not_a_panic() -> candle_peft::Result<()> {
    let data = counting(8);
    let mut t = Trainer::new(model(lora()), TrainConfig { eval_every: Some(1), ..config(2) })?;
    let e = t.train(&[], None).unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { name: "training data", .. }), "{e}");
    assert!(e.to_string().contains("no examples"), "{e}");
    let e = t.train_step(&[]).unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { name: "training data", .. }), "{e}");
    // Empty evaluation data is refused before the first step, not after it.
    let e = t.train(&data, Some(&[])).unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { name: "evaluation data", .. }), "{e}");
    assert_eq!(t.step(), 0);
    let e = t.evaluate(&[]).unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { name: "evaluation data", .. }), "{e}");
    t.train(&data, Some(&data))?;
    assert_eq!(t.step(), 2);
    assert!(t.history().iter().all(|s| s.eval_loss.is_some_and(f64::is_finite)));
    Ok(())
}

/// Activation checkpointing changes where the activations come from, not the math: for every
/// method of the registry (on every linear and the untied lm_head of the tiny LLaMA), the loss
/// and every gradient equal those of one backward pass through the whole graph.
#[test]
fn checkpointed_gradients_equal_the_full_backward_for_every_method() -> candle_peft::Result<()> {
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"];
    let ids = Tensor::new(&[[3u32, 17, 42, 8, 61, 5], [9, 9, 1, 0, 33, 12]], &test_device())?;
    let labels = Tensor::new(&[[17i64, 42, 8, 61, 5, -100], [9, 1, 0, 33, 12, 4]], &test_device())?;
    let labels = labels.flatten_all()?;
    let loss_of = |logits: &Tensor| -> candle_peft::Result<Tensor> {
        candle_peft::train::masked_cross_entropy(&logits.reshape((12, 64))?, &labels)
    };
    // The head in chunks of positions: each chunk's part of the mean over the 11 counted labels.
    let part = |logits: &Tensor, rows: std::ops::Range<usize>| -> candle_peft::Result<Tensor> {
        candle_peft::train::loss::masked_cross_entropy_part(logits, &labels.narrow(0, rows.start, rows.len())?, 11)
    };
    for v in candle_peft::adapters::variants() {
        let mut p = candle_peft::MethodParams::new(4, candle_peft::TargetConfig::list(&targets));
        if v.name == "melora" {
            p.options.insert("n".into(), 2.into());
        }
        let peft = model(AdapterConfig::for_method(v.name, &p)?);
        for var in peft.trainable_vars()? {
            var.set(&(var.as_tensor() + var.as_tensor().randn_like(0., 0.1)?)?)?;
        }
        let loss = loss_of(&peft.model().forward(&ids)?)?;
        let full = loss.backward()?;
        let (checkpointed_loss, checkpointed) = peft.model().checkpointed_loss_and_grads(&ids, &part)?;
        let (a, b) = (loss.to_scalar::<f32>()?, checkpointed_loss.to_scalar::<f32>()?);
        assert!((a - b).abs() < 1e-6, "{}: loss {a} vs checkpointed {b}", v.name);
        // Nothing else: an extra gradient would keep a recomputed layer's graph alive.
        let vars = peft.named_trainable_vars()?;
        assert_eq!(checkpointed.get_ids().count(), vars.len(), "{}: gradients of more than the adapters", v.name);
        for (k, var) in vars {
            let want = full.get(var.as_tensor()).unwrap_or_else(|| panic!("{}: no gradient for {k}", v.name));
            let got = checkpointed.get(var.as_tensor()).unwrap_or_else(|| panic!("{}: checkpointing lost {k}", v.name));
            let e = common::rel_err(got, want);
            assert!(e < 1e-5, "{} {k}: gradients differ by {e}", v.name);
        }
    }
    Ok(())
}

/// Dropout cannot be replayed in the recomputation: refused with a message that says what to do.
#[test]
fn checkpointing_refuses_adapters_with_dropout() {
    let targets = ["q_proj", "v_proj"];
    let adapter = AdapterConfig::Lora(LoraConfig { lora_dropout: 0.1, ..LoraConfig::lora(4, 8.0, &targets) });
    let c = TrainConfig { checkpoint_activations: true, ..config(1) };
    let mut t = Trainer::new(model(adapter), c).unwrap();
    let e = t.train_step(&counting(4)).unwrap_err().to_string();
    assert!(e.contains("lora_dropout") && e.contains("checkpointing"), "{e}");
}

/// Training with checkpointing follows the same loss curve.
#[test]
fn a_checkpointed_run_has_the_same_losses() -> candle_peft::Result<()> {
    let data = counting(8);
    let mut plain = Trainer::new(model(lora()), config(5))?;
    let mut checkpointed = Trainer::new(model(lora()), TrainConfig { checkpoint_activations: true, ..config(5) })?;
    plain.train(&data, None)?;
    checkpointed.train(&data, None)?;
    for (a, b) in plain.history().iter().zip(checkpointed.history()) {
        assert!((a.loss - b.loss).abs() < 1e-5 * a.loss, "step {}: {} vs {}", a.step, a.loss, b.loss);
    }
    Ok(())
}

/// Training the second of two adapters: only it changes, its checkpoint holds it (not the
/// default adapter beside it), and resuming continues its loss curve; resuming with another
/// adapter active is refused by name.
#[test]
fn a_named_adapter_trains_checkpoints_and_resumes_alone() -> candle_peft::Result<()> {
    let data = counting(10);
    let two = || -> candle_peft::Result<PeftModel<Llama>> {
        let mut peft = model(lora());
        peft.add_adapter("second", lora(), InitOptions { seed: 9, ..Default::default() })?;
        peft.set_adapter("second")?;
        Ok(peft)
    };
    let dir = tempfile::tempdir().unwrap();
    let c = TrainConfig { checkpoint_every: Some(3), output_dir: Some(dir.path().to_path_buf()), ..config(6) };
    let mut full = Trainer::new(two()?, c.clone())?;
    let default_before = full.peft().adapter_tensors(candle_peft::DEFAULT_ADAPTER)?;
    full.train(&data, None)?;
    for (k, t) in full.peft().adapter_tensors(candle_peft::DEFAULT_ADAPTER)? {
        let before = &default_before.iter().find(|(b, _)| *b == k).unwrap().1;
        assert_eq!(common::rel_err(&t, before), 0.0, "{k}: the inactive adapter changed");
    }
    let checkpoint = dir.path().join("checkpoint-3");
    assert!(!checkpoint.join("second").exists(), "the checkpoint holds the trained adapter alone");
    let mut resumed = Trainer::resume(two()?, c.clone(), &checkpoint)?;
    resumed.train(&data, None)?;
    for (a, b) in full.history().iter().zip(resumed.history()) {
        assert!((a.loss - b.loss).abs() < 1e-6, "step {}: {} vs {}", a.step, a.loss, b.loss);
    }
    let mut other = two()?;
    other.set_adapter(candle_peft::DEFAULT_ADAPTER)?;
    let e = Trainer::resume(other, c, &checkpoint).unwrap_err().to_string();
    assert!(e.contains("[second]") && e.contains("[default]"), "{e}");
    Ok(())
}
