//! The method registry: every method users can name builds, trains a step's worth of gradient,
//! saves and loads back through the one list; the CLI-facing parameters (`--set`, scaling) reach
//! the method's PEFT config or fail with an error that says what to do.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use candle_peft::adapters::{variant_names, variants};
use candle_peft::{
    AdapterConfig, Error, Fixed, InitOptions, LinearHost, MethodParams, PeftModel, RankStabilized, TargetConfig,
};
use common::{assert_close, test_device, tiny_llama};

fn params(rank: usize) -> MethodParams {
    MethodParams::new(rank, TargetConfig::list(&["q_proj", "v_proj", "up_proj"]))
}

#[test]
fn the_registry_lists_each_name_and_peft_type_once() {
    let names = variant_names();
    assert_eq!(names.iter().collect::<BTreeSet<_>>().len(), names.len(), "{names:?}");
    for name in ["lora", "rslora", "rora", "dora", "bora", "lora-xs", "edora", "melora", "vera", "randlora", "loha"] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    let types = AdapterConfig::PEFT_TYPES;
    assert_eq!(types.iter().collect::<BTreeSet<_>>().len(), types.len(), "{types:?}");
    // Each variant says which PEFT type it writes.
    for v in variants() {
        assert!(types.iter().any(|t| v.peft.starts_with(t)), "{}: {}", v.name, v.peft);
    }
}

/// Every method a user can name: built on the tiny LLaMA, it gives gradients to its trainable
/// tensors, saves in PEFT's format and loads back to the same outputs, as the same method.
#[test]
fn every_method_builds_trains_saves_and_loads() -> candle_peft::Result<()> {
    let x = Tensor::randn(0f32, 1., (3, 32), &test_device())?;
    for v in variants() {
        let mut p = params(4);
        if v.name == "melora" {
            p.options.insert("n".into(), 2.into());
        }
        let config = AdapterConfig::for_method(v.name, &p)?;
        let expected_name = if v.name == "rora" { "rslora" } else { v.name }; // one PEFT flag for both
        assert_eq!(config.method_name(), expected_name);
        let peft = PeftModel::new(tiny_llama(), config, InitOptions { seed: 3, ..Default::default() })?;
        assert_eq!(peft.adapted_modules().len(), 6, "{}", v.name);
        let vars = peft.named_trainable_vars()?;
        for (_, var) in &vars {
            // Away from the (often zero-update) init, so that the file round trip is tested.
            var.set(&(var.as_tensor() + var.as_tensor().randn_like(0., 0.1)?)?)?;
        }
        let path = "model.layers.0.self_attn.q_proj";
        let layer = peft.model().get(path).unwrap();
        let base = x.matmul(&layer.weight().dense()?.t()?)?;
        assert!(common::rel_err(&layer.forward_checked(&x)?, &base) > 1e-4, "{}: the adapter does nothing", v.name);
        let grads = layer.forward_checked(&x)?.sqr()?.sum_all()?.backward()?;
        assert!(!vars.is_empty());
        let with_grad = vars.iter().filter(|(k, v)| k.contains(path) && grads.get(v.as_tensor()).is_some()).count();
        assert!(with_grad > 0, "{}: no gradient reaches the adapter", v.name);

        let dir = tempfile::tempdir().unwrap();
        peft.save_pretrained(dir.path())?;
        let back = PeftModel::from_pretrained(tiny_llama(), dir.path(), DType::F32)?;
        assert_eq!(back.config().peft_type(), v.peft.split(' ').next().unwrap(), "{}", v.name);
        assert_eq!(back.config().method_name(), expected_name);
        for (p, l) in peft.model().linears() {
            let x = Tensor::randn(0f32, 1., (3, l.features().0), &test_device())?;
            let theirs = back.model().get(&p).unwrap();
            assert_close(&theirs.forward_checked(&x)?, &l.forward_checked(&x)?, 1e-6, &format!("{} {p}", v.name));
        }
    }
    Ok(())
}

#[test]
fn options_set_peft_fields_by_name() -> candle_peft::Result<()> {
    let mut p = params(8);
    p.options.insert("n".into(), 4.into());
    p.options.insert("lora_dropout".into(), 0.1.into());
    match AdapterConfig::for_method("melora", &p)? {
        AdapterConfig::Melora(c) => assert!(c.n == 4 && c.lora.lora_dropout == 0.1),
        other => panic!("{other:?}"),
    }
    // A field the method does not have: the error lists the ones it has.
    let mut p = params(8);
    p.options.insert("n".into(), 4.into());
    let e = AdapterConfig::for_method("lora", &p).unwrap_err().to_string();
    assert!(e.contains("lora has no config field `n`") && e.contains("lora_dropout"), "{e}");
    // A value of the wrong type, and one out of range.
    let mut p = params(8);
    p.options.insert("r".into(), "four".into());
    assert!(AdapterConfig::for_method("vera", &p).unwrap_err().to_string().contains("options"));
    let mut p = params(8);
    p.options.insert("lora_dropout".into(), 1.5.into());
    assert!(matches!(AdapterConfig::for_method("dora", &p), Err(Error::InvalidConfig { name: "lora_dropout", .. })));
    Ok(())
}

#[test]
fn scaling_strategies_reach_the_methods_that_have_one() -> candle_peft::Result<()> {
    let p = MethodParams { alpha: Some(16.0), scaling: Some(Arc::new(Fixed(0.5))), ..params(4) };
    match AdapterConfig::for_method("lora-xs", &p)? {
        AdapterConfig::LoraXs(c) => assert_eq!(c.strategy().scale(16.0, 4), 0.5),
        other => panic!("{other:?}"),
    }
    // rsLoRA's variant and an explicit alpha/sqrt(r) write the same PEFT flag.
    let p = MethodParams { alpha: Some(16.0), ..params(4) };
    let rs = AdapterConfig::for_method("rslora", &p)?.to_peft_json()?;
    let p = MethodParams { scaling: Some(Arc::new(RankStabilized)), ..p };
    let explicit = AdapterConfig::for_method("lora", &p)?.to_peft_json()?;
    assert_eq!(rs, explicit);
    assert_eq!(rs["use_rslora"], true);
    // VeRA has no rank-dependent factor.
    let p = MethodParams { scaling: Some(Arc::new(Fixed(0.5))), ..params(4) };
    let e = AdapterConfig::for_method("vera", &p).unwrap_err().to_string();
    assert!(e.contains("no rank-dependent scaling factor"), "{e}");
    let e = AdapterConfig::for_method("lorra", &params(4)).unwrap_err().to_string();
    assert!(e.contains("unknown method `lorra`") && e.contains("loha"), "{e}");
    Ok(())
}

/// Every method serves rows of a mixed batch: one model holds an adapter of each method, and
/// each row of the batch gives the logits of its adapter alone (or of the base model).
#[test]
fn every_method_serves_its_rows_of_a_mixed_batch() -> candle_peft::Result<()> {
    let base = candle_peft::models::Llama::from_hf_dir(&common::fixture("tiny_llama"), &test_device(), DType::F32)?;
    let mut names = Vec::new();
    let mut peft: Option<PeftModel<_>> = None;
    let mut base = Some(base);
    for (i, v) in variants().iter().enumerate() {
        let mut p = params(4);
        if v.name == "melora" {
            p.options.insert("n".into(), 2.into());
        }
        let config = AdapterConfig::for_method(v.name, &p)?;
        let opts = InitOptions { seed: i as u64, ..Default::default() };
        match peft.as_mut() {
            None => peft = Some(PeftModel::new(base.take().unwrap(), config, opts)?),
            Some(m) => m.add_adapter(v.name, config, opts)?,
        }
        names.push(if i == 0 { candle_peft::DEFAULT_ADAPTER } else { v.name });
    }
    let mut peft = peft.unwrap();
    peft.set_adapters(&names)?;
    for (_, var) in peft.named_trainable_vars()? {
        var.set(&(var.as_tensor() + var.as_tensor().randn_like(0., 0.1)?)?)?;
    }
    let mut rows = names.clone();
    rows.push(candle_peft::BASE_ROWS);
    let ids = Tensor::arange(0u32, (rows.len() * 5) as u32, &test_device())?.reshape((rows.len(), 5))?;
    let mixed = peft.forward_with_adapters(&ids, &rows)?;
    for (i, name) in rows.iter().enumerate() {
        let row = ids.narrow(0, i, 1)?;
        let alone = if *name == candle_peft::BASE_ROWS {
            peft.with_adapters_disabled(|p| p.model().forward(&row))?
        } else {
            peft.set_adapter(name)?;
            peft.model().forward(&row)?
        };
        let base = peft.with_adapters_disabled(|p| p.model().forward(&row))?;
        if *name != candle_peft::BASE_ROWS {
            assert!(common::rel_err(&alone, &base) > 1e-4, "{name}: the adapter does nothing");
        }
        assert_close(&mixed.narrow(0, i, 1)?, &alone, 1e-5, &format!("row {i} ({name})"));
    }
    Ok(())
}
