//! Several named adapters on one model, against peft 0.21.2 (`tests/fixtures/generate.py
//! --multi`, `tests/fixtures/tiny_llama/multi/`): PEFT's multi-adapter save layout, switching and
//! summing active adapters, merging, mixed-adapter batches and generation, and
//! `add_weighted_adapter` for every deterministic combination (the DARE ones by their statistics).

mod common;

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Tensor};
use candle_peft::format::{read_safetensors, CONFIG_FILE, WEIGHTS_FILE};
use candle_peft::models::Llama;
use candle_peft::{
    AdapterConfig, Combination, CombineOptions, Error, MajoritySign, PeftModel, Result, BASE_ROWS, DEFAULT_ADAPTER,
};
use common::{fixture, load, rel_err, test_device};
use serde_json::Value;

/// The tiny LLaMA with PEFT's saved adapters: `a` as [`DEFAULT_ADAPTER`] (the root of the
/// layout), then `b` (rsLoRA), `c` (LoRA of rank 6) and `d` (DoRA) from their subdirectories.
fn model_with_adapters() -> PeftModel<Llama> {
    let base = Llama::from_hf_dir(&fixture("tiny_llama"), &test_device(), DType::F32).unwrap();
    let saved = fixture("tiny_llama/multi/saved");
    let mut peft = PeftModel::from_pretrained(base, &saved, DType::F32).unwrap();
    for name in ["b", "c", "d"] {
        peft.load_adapter(&saved.join(name), name, DType::F32).unwrap();
    }
    peft
}

/// PEFT's name of our adapter: the root adapter is PEFT's `a`.
fn ours(name: &str) -> &str {
    if name == "a" {
        DEFAULT_ADAPTER
    } else {
        name
    }
}

fn ids() -> Tensor {
    load("tiny_llama/multi/mixed.safetensors")["ids"].to_dtype(DType::U32).unwrap()
}

fn reference(key: &str) -> Tensor {
    load("tiny_llama/multi/mixed.safetensors").remove(key).unwrap_or_else(|| panic!("no {key}"))
}

#[track_caller]
fn assert_abs(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d <= tol, "{what}: max abs difference {d:e} > {tol:e}");
}

#[test]
fn each_adapter_alone_and_two_summed_give_peft_logits() -> Result<()> {
    let mut peft = model_with_adapters();
    assert_eq!(peft.adapter_names(), [DEFAULT_ADAPTER, "b", "c", "d"]);
    assert_eq!(peft.active_adapters(), [DEFAULT_ADAPTER]);
    let ids = ids();
    for name in ["a", "b", "c", "d"] {
        peft.set_adapter(ours(name))?;
        assert_abs(&peft.model().forward(&ids)?, &reference(&format!("alone.{name}")), 1e-5, name);
    }
    peft.set_adapters(&[DEFAULT_ADAPTER, "b"])?;
    assert_abs(&peft.model().forward(&ids)?, &reference("active.a+b"), 1e-5, "a + b active");
    let base = peft.with_adapters_disabled(|p| p.model().forward(&ids))?;
    assert_abs(&base, &reference("alone.__base__"), 1e-5, "adapters disabled");
    // Switched on again afterwards.
    assert_abs(&peft.model().forward(&ids)?, &reference("active.a+b"), 1e-5, "after with_adapters_disabled");
    Ok(())
}

#[test]
fn only_the_active_adapters_are_trainable() -> Result<()> {
    let mut peft = model_with_adapters();
    let keys = |p: &PeftModel<Llama>| p.named_trainable_vars().unwrap().into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    peft.set_adapter("b")?;
    let b_file = read_safetensors(&fixture("tiny_llama/multi/saved/b").join(WEIGHTS_FILE), &test_device())?;
    assert_eq!(keys(&peft).into_iter().collect::<BTreeSet<_>>(), b_file.keys().cloned().collect());
    let b_params: usize = b_file.values().map(|t| t.elem_count()).sum();
    assert_eq!(peft.parameter_count().trainable, b_params);
    peft.set_adapters(&["b", "c"])?;
    assert!(keys(&peft).iter().all(|k| k.starts_with("b/") || k.starts_with("c/")), "{:?}", keys(&peft));
    let e = peft.set_adapter("nope").unwrap_err().to_string();
    assert!(e.contains("nope") && e.contains("default, b, c, d"), "{e}");
    assert!(peft.set_adapters(&[]).is_err());
    Ok(())
}

#[test]
fn the_multi_adapter_layout_saves_as_peft_writes_it() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let peft = model_with_adapters();
    let dir = tempfile::tempdir()?;
    peft.save_pretrained(dir.path())?;
    for name in ["a", "b", "c", "d"] {
        let sub = if name == "a" { String::new() } else { name.to_string() };
        let theirs =
            read_safetensors(&fixture("tiny_llama/multi/saved").join(&sub).join(WEIGHTS_FILE), &test_device())?;
        let mine = read_safetensors(&dir.path().join(&sub).join(WEIGHTS_FILE), &test_device())?;
        assert_eq!(mine.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>(), "{name}");
        for (k, t) in &theirs {
            assert_eq!(rel_err(&mine[k], t), 0.0, "{name}: {k}");
        }
        let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join(&sub).join(CONFIG_FILE))?)?;
        assert_eq!(config["peft_type"], "LORA", "{name}");
    }
    // What was saved loads back: all of it, or adapter by adapter.
    let base = Llama::from_hf_dir(&fixture("tiny_llama"), &test_device(), DType::F32)?;
    let all = PeftModel::from_pretrained_all(base, dir.path(), DType::F32)?;
    assert_eq!(all.adapter_names(), [DEFAULT_ADAPTER, "b", "c", "d"]);
    assert_eq!(all.active_adapters(), [DEFAULT_ADAPTER]);
    assert_abs(&all.model().forward(&ids())?, &reference("alone.a"), 1e-5, "default of the saved layout");
    let base = Llama::from_hf_dir(&fixture("tiny_llama"), &test_device(), DType::F32)?;
    let mut back = PeftModel::from_pretrained(base, dir.path(), DType::F32)?;
    back.load_adapter(&dir.path().join("d"), "d", DType::F32)?;
    back.set_adapter("d")?;
    assert_abs(&back.model().forward(&ids())?, &reference("alone.d"), 1e-5, "d saved and loaded");
    Ok(())
}

#[test]
fn merging_two_adapters_gives_their_sum_and_unmerging_restores() -> Result<()> {
    let mut peft = model_with_adapters();
    let ids = ids();
    peft.merge_adapter(&[DEFAULT_ADAPTER, "b"])?;
    peft.set_adapters(&[DEFAULT_ADAPTER, "b"])?;
    assert_abs(&peft.model().forward(&ids)?, &reference("active.a+b"), 1e-4, "a + b merged");
    assert!(matches!(peft.merge_adapter(&["b"]), Err(Error::MergeState(_))));
    assert!(peft.with_adapters_disabled(|_| Ok(())).is_err(), "disabling a merged adapter is refused");
    // ... and leaves every layer on: after unmerging, the active adapters run.
    let merged_logits = peft.model().forward(&ids)?;
    assert_abs(&merged_logits, &reference("active.a+b"), 1e-4, "a + b merged, after the refusal");
    assert!(peft.delete_adapter("b").is_err(), "deleting a merged adapter is refused");
    peft.unmerge()?;
    assert_abs(&peft.model().forward(&ids)?, &reference("active.a+b"), 1e-5, "a + b unmerged, still on");
    peft.set_adapter("c")?;
    assert_abs(&peft.model().forward(&ids)?, &reference("alone.c"), 1e-5, "c after unmerging a + b");
    peft.delete_adapter("c")?;
    assert_eq!(peft.active_adapters(), [DEFAULT_ADAPTER], "the first remaining adapter becomes active");
    assert_eq!(peft.adapter_names(), [DEFAULT_ADAPTER, "b", "d"]);
    Ok(())
}

#[test]
fn a_mixed_batch_gives_peft_logits_row_by_row() -> Result<()> {
    let mut peft = model_with_adapters();
    let ids = ids();
    // PEFT's own mixed batch (LoRA adapters; peft 0.21.2 refuses adapter_names with DoRA).
    let rows = [DEFAULT_ADAPTER, BASE_ROWS, "b", "c", DEFAULT_ADAPTER];
    assert_abs(&peft.forward_with_adapters(&ids, &rows)?, &reference("mixed"), 1e-5, "PEFT's mixed batch");
    // DoRA rows, against each adapter's logits alone.
    let rows = ["d", "c", BASE_ROWS, "d", "b"];
    let mixed = peft.forward_with_adapters(&ids, &rows)?;
    for (i, name) in ["d", "c", "__base__", "d", "b"].iter().enumerate() {
        let alone = reference(&format!("alone.{name}")).get(i)?;
        assert_abs(&mixed.get(i)?, &alone, 1e-5, &format!("row {i} ({name})"));
    }
    // The routing is gone afterwards: the active adapter again.
    assert_abs(&peft.model().forward(&ids)?, &reference("alone.a"), 1e-5, "after the mixed batch");
    Ok(())
}

#[test]
fn mixed_batches_are_refused_where_they_cannot_work() -> Result<()> {
    let mut peft = model_with_adapters();
    let ids = ids();
    let e = peft.forward_with_adapters(&ids, &["b", "zz", "b", "b", "b"]).unwrap_err().to_string();
    assert!(e.contains("zz") && e.contains("default, b, c, d"), "{e}");
    let e = peft.forward_with_adapters(&ids, &["b"]).unwrap_err().to_string();
    assert!(e.contains("1 names for a batch of 5 rows"), "{e}");
    peft.set_train(true);
    let e = peft.forward_with_adapters(&ids, &["b"; 5]).unwrap_err().to_string();
    assert!(e.contains("training mode"), "{e}");
    peft.set_train(false);
    peft.merge()?;
    assert!(matches!(peft.forward_with_adapters(&ids, &["b"; 5]), Err(Error::MergeState(_))));
    peft.unmerge()?;
    assert_abs(&peft.forward_with_adapters(&ids, &[DEFAULT_ADAPTER; 5])?, &reference("alone.a"), 1e-5, "unmerged");
    Ok(())
}

#[test]
fn mixed_generation_gives_each_adapters_own_continuation() -> Result<()> {
    let mut peft = model_with_adapters();
    // Prompts of different lengths: the shorter ones are padded on the left, the padding hidden.
    let prompts: [&[u32]; 4] = [&[3, 17, 29], &[3, 17, 29], &[40, 2, 9, 33, 8, 1, 60], &[11]];
    let rows = ["d", BASE_ROWS, "b", DEFAULT_ADAPTER];
    let mixed = peft.generate_with_adapters(&prompts, &rows, 6, &[])?;
    for (i, name) in rows.iter().enumerate() {
        let alone = if *name == BASE_ROWS {
            peft.with_adapters_disabled(|p| p.model().generate_greedy(prompts[i], 6, &[]))?
        } else {
            peft.set_adapter(name)?;
            peft.model().generate_greedy(prompts[i], 6, &[])?
        };
        assert_eq!(mixed[i], alone, "row {i} ({name})");
    }
    assert_ne!(mixed[0], mixed[1], "the DoRA row and the base row should differ on the same prompt");
    let e = peft.generate_with_adapters(&[&[1, 2], &[]], &["b", "b"], 2, &[]).unwrap_err().to_string();
    assert!(e.contains("empty prompt"), "{e}");
    Ok(())
}

/// `combinations.json`: name -> adapters, weights and PEFT's keyword arguments.
fn combinations() -> BTreeMap<String, Value> {
    let text = std::fs::read_to_string(fixture("tiny_llama/multi/combinations.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn options(spec: &Value) -> CombineOptions {
    CombineOptions {
        combination: spec["combination_type"].as_str().unwrap().parse().unwrap(),
        svd_rank: spec["svd_rank"].as_u64().map(|r| r as usize),
        svd_clamp: spec["svd_clamp"].as_f64(),
        density: spec["density"].as_f64(),
        majority_sign: spec["majority_sign_method"].as_str().map_or(MajoritySign::Total, |m| m.parse().unwrap()),
        seed: 0,
    }
}

fn sources(spec: &Value) -> Vec<(&'static str, f64)> {
    let names = spec["adapters"].as_array().unwrap().iter().map(|n| ours(n.as_str().unwrap()));
    let names: Vec<&'static str> =
        names.map(|n| if n == DEFAULT_ADAPTER { DEFAULT_ADAPTER } else { leak(n) }).collect();
    names.into_iter().zip(spec["weights"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap())).collect()
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

/// The new adapter's tensors, keyed as in its PEFT file.
fn combined(peft: &PeftModel<Llama>, name: &str) -> BTreeMap<String, Tensor> {
    peft.adapter_tensors(name).unwrap().into_iter().collect()
}

#[test]
fn every_deterministic_combination_gives_peft_tensors() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let mut peft = model_with_adapters();
    for (name, spec) in combinations() {
        let opts = options(&spec);
        peft.add_weighted_adapter(&sources(&spec), &name, &opts)?;
        let dir = fixture("tiny_llama/multi/combined").join(&name);
        let theirs = read_safetensors(&dir.join(WEIGHTS_FILE), &test_device())?;
        let mine = combined(&peft, &name);
        assert_eq!(mine.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>(), "{name}: keys");
        let peft_config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE))?)?;
        let AdapterConfig::Lora(config) = peft.adapter_config(&name)? else { panic!("{name}: not a LoRA") };
        assert_eq!(config.r as u64, peft_config["r"].as_u64().unwrap(), "{name}: r");
        assert_eq!(config.lora_alpha, peft_config["lora_alpha"].as_f64().unwrap(), "{name}: lora_alpha");
        assert!(!config.use_rslora, "{name}: the combination's scaling is 1");
        let targets = |v: &Value| v.as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
        let want: BTreeSet<String> = targets(&peft_config["target_modules"]);
        let mine_targets: BTreeSet<String> = targets(&peft.adapter_config(&name)?.to_peft_json()?["target_modules"]);
        assert_eq!(mine_targets, want, "{name}: target_modules");
        let is_svd = options(&spec).combination.is_svd() && spec["adapters"].as_array().unwrap().len() > 1;
        for key in theirs.keys().filter(|k| k.ends_with("lora_A.weight")) {
            let key_b = key.replace("lora_A", "lora_B");
            if is_svd {
                // SVD factors are sign-ambiguous: compare the products B A.
                let product = |t: &BTreeMap<String, Tensor>| t[&key_b].matmul(&t[key]).unwrap();
                assert_abs(&product(&mine), &product(&theirs), 1e-5, &format!("{name}: B A of {key}"));
            } else {
                assert_abs(&mine[key], &theirs[key], 1e-5, &format!("{name}: {key}"));
                assert_abs(&mine[&key_b], &theirs[&key_b], 1e-5, &format!("{name}: {key_b}"));
            }
        }
    }
    Ok(())
}

#[test]
fn the_exact_combinations_add_the_weighted_updates() -> Result<()> {
    // cat and a full-rank svd reproduce sum_i w_i dW_i exactly: the new adapter alone gives the
    // logits of the weighted sources merged.
    let mut peft = model_with_adapters();
    let ids = ids();
    for combination in [Combination::Cat, Combination::Svd] {
        let name = format!("exact_{combination}");
        let opts = CombineOptions { combination, svd_rank: Some(10), ..Default::default() };
        peft.add_weighted_adapter(&[(DEFAULT_ADAPTER, 0.8), ("c", 0.6)], &name, &opts)?;
        peft.set_adapter(&name)?;
        let combined = peft.model().forward(&ids)?;
        // The reference: each source alone at its weight (one source is combined linearly:
        // sqrt(|w s|) on each factor, so its update is exactly w s B A), both active.
        let mut scaled = model_with_adapters();
        scaled.add_weighted_adapter(&[(DEFAULT_ADAPTER, 0.8)], "wa", &CombineOptions::default())?;
        scaled.add_weighted_adapter(&[("c", 0.6)], "wc", &CombineOptions::default())?;
        scaled.set_adapters(&["wa", "wc"])?;
        assert_abs(&combined, &scaled.model().forward(&ids)?, 1e-4, &name);
    }
    Ok(())
}

#[test]
fn svd_clamp_bounds_the_factors_at_the_quantile() -> Result<()> {
    let mut peft = model_with_adapters();
    let sources = [(DEFAULT_ADAPTER, 0.8), ("c", 0.6)];
    peft.add_weighted_adapter(&sources, "free", &CombineOptions::default())?;
    let opts = CombineOptions { svd_clamp: Some(0.9), ..Default::default() };
    peft.add_weighted_adapter(&sources, "clamped", &opts)?;
    let (free, clamped) = (combined(&peft, "free"), combined(&peft, "clamped"));
    let mut changed = 0;
    let mut total = 0;
    for key in free.keys().filter(|k| k.ends_with("lora_A.weight")) {
        let key_b = key.replace("lora_A", "lora_B");
        // The same SVD, so the same signs: the clamp's effect is entry by entry.
        let values = |t: &BTreeMap<String, Tensor>| {
            let mut v = t[&key_b].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.extend(t[key].flatten_all().unwrap().to_vec1::<f32>().unwrap());
            v
        };
        let (f, c) = (values(&free), values(&clamped));
        let mut sorted = f.clone();
        sorted.sort_by(f32::total_cmp);
        let pos = 0.9 * (sorted.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        let h = sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64) as f32;
        for (x, y) in f.iter().zip(&c) {
            assert!((x.clamp(-h, h) - y).abs() <= 1e-6 * h.max(1.0), "{key}: {x} clamped to {y}, h = {h}");
            changed += usize::from(x != y);
        }
        total += f.len();
    }
    // About 10% are above the 0.9-quantile, and some below -h.
    let share = changed as f64 / total as f64;
    assert!((0.1..0.3).contains(&share), "{share} of the entries clamped");
    Ok(())
}

#[test]
fn dare_masks_keep_the_density_and_average_to_the_linear_combination() -> Result<()> {
    let mut peft = model_with_adapters();
    let sources = [(DEFAULT_ADAPTER, 0.8), ("b", -0.5)];
    peft.add_weighted_adapter(
        &sources,
        "linear",
        &CombineOptions { combination: Combination::Linear, ..Default::default() },
    )?;
    let linear = combined(&peft, "linear");
    let density = 0.5;
    let runs = 48;
    let mut mean: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut zeros = 0usize;
    let mut entries = 0usize;
    let mut first = None;
    for seed in 0..runs {
        let name = format!("dare{seed}");
        let opts =
            CombineOptions { combination: Combination::DareLinear, density: Some(density), seed, ..Default::default() };
        peft.add_weighted_adapter(&sources, &name, &opts)?;
        let t = combined(&peft, &name);
        if seed == 0 {
            // The same seed gives the same masks.
            peft.add_weighted_adapter(&sources, "dare0_again", &opts)?;
            for (k, v) in combined(&peft, "dare0_again") {
                assert_eq!(rel_err(&v, &t[&k]), 0.0, "{k}: same seed, other result");
            }
            first = Some(t.clone());
        }
        for (k, v) in &t {
            let values = v.flatten_all()?.to_vec1::<f32>()?;
            // Layers that both sources adapt: an entry is zero when both masks drop it.
            if k.contains("q_proj") || k.contains("down_proj") {
                zeros += values.iter().filter(|x| **x == 0.0).count();
                entries += values.len();
            }
            let sum = match mean.remove(k) {
                Some(m) => (m + v)?,
                None => v.clone(),
            };
            mean.insert(k.clone(), sum);
        }
        peft.delete_adapter(&name)?;
    }
    let share = zeros as f64 / entries as f64;
    assert!((share - 0.25).abs() < 0.02, "{share} of the entries are zero; expected (1 - density)^2 = 0.25");
    // E[mask / density] = 1: the mean over seeds tends to the linear combination, with a
    // relative spread of sqrt((1 - d) / d / runs) = 0.14 per entry.
    let mut err = 0f64;
    let mut norm = 0f64;
    for (k, m) in &mean {
        let m = (m / runs as f64)?;
        err += (&m - &linear[k])?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        norm += linear[k].sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let rel = (err / norm).sqrt();
    assert!(rel < 0.2, "the mean of {runs} DARE draws is {rel} away from the linear combination");
    let first = first.unwrap();
    let one_draw: f64 = first.iter().map(|(k, v)| rel_err(v, &linear[k]) as f64).fold(0.0, f64::max);
    assert!(one_draw > 0.1, "a single DARE draw should differ from linear ({one_draw})");
    Ok(())
}

#[test]
fn combinations_that_cannot_work_are_refused() -> Result<()> {
    let mut peft = model_with_adapters();
    let e = peft.add_weighted_adapter(&[("d", 1.0), ("b", 1.0)], "x", &CombineOptions::default()).unwrap_err();
    assert!(e.to_string().contains("dora") && e.to_string().contains("convert"), "{e}");
    let linear = CombineOptions { combination: Combination::Linear, ..Default::default() };
    let e = peft.add_weighted_adapter(&[(DEFAULT_ADAPTER, 1.0), ("c", 1.0)], "x", &linear).unwrap_err();
    assert!(e.to_string().contains("[4, 6]") && e.to_string().contains("equal rank"), "{e}");
    let ties = CombineOptions { combination: Combination::Ties, ..Default::default() };
    let e = peft.add_weighted_adapter(&[(DEFAULT_ADAPTER, 1.0), ("b", 1.0)], "x", &ties).unwrap_err();
    assert!(e.to_string().contains("density"), "{e}");
    let e = peft.add_weighted_adapter(&[(DEFAULT_ADAPTER, f64::NAN)], "x", &linear).unwrap_err();
    assert!(e.to_string().contains("finite"), "{e}");
    let e = peft.add_weighted_adapter(&[(DEFAULT_ADAPTER, 1.0)], "b", &linear).unwrap_err();
    assert!(e.to_string().contains("already has an adapter `b`"), "{e}");
    let big = CombineOptions { svd_rank: Some(40), ..Default::default() };
    let e = peft.add_weighted_adapter(&[(DEFAULT_ADAPTER, 1.0), ("b", 1.0)], "x", &big).unwrap_err();
    assert!(e.to_string().contains("svd_rank"), "{e}");
    assert!("tie".parse::<Combination>().unwrap_err().to_string().contains("dare_ties_svd"));
    // Nothing of a refused combination is left behind.
    assert_eq!(peft.adapter_names(), [DEFAULT_ADAPTER, "b", "c", "d"]);
    Ok(())
}
