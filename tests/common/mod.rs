//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_peft::format::{read_safetensors, CONFIG_FILE, WEIGHTS_FILE};
use candle_peft::{AdapterConfig, InitOptions, LinearHost, NamedLinears, PeftModel};

pub mod real_model;

/// The device the numeric tests run on: `CANDLE_PEFT_TEST_DEVICE` (`cpu`, `cuda:0`, `metal`,
/// `auto`), `cpu` when unset. A device this build cannot use is a test failure that says why.
pub fn test_device() -> Device {
    let spec = std::env::var("CANDLE_PEFT_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    candle_peft::device(&spec).unwrap_or_else(|e| panic!("CANDLE_PEFT_TEST_DEVICE={spec}: {e}"))
}

/// `tests/fixtures/<name>`, under `CANDLE_PEFT_ROOT` when set (a test binary shipped to another
/// machine, as `scripts/gpu_check.sh` does), else under the crate it was built from.
pub fn fixture(name: &str) -> PathBuf {
    let root = std::env::var_os("CANDLE_PEFT_ROOT")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).into(), PathBuf::from);
    root.join("tests/fixtures").join(name)
}

/// Every tensor of a fixture safetensors file, on the test device.
pub fn load(name: &str) -> BTreeMap<String, Tensor> {
    read_safetensors(&fixture(name), &test_device()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// `max |a - b| / max |b|`, computed in f32.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-12);
    diff / scale
}

/// Asserts `rel_err(a, b) <= tol`.
#[track_caller]
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
    let e = rel_err(a, b);
    assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
}

/// The linear layers of the tiny LLaMA fixture (every 2-D weight but the embedding).
pub fn tiny_llama() -> NamedLinears {
    let mut layers =
        NamedLinears::from_safetensors(&fixture("tiny_llama/model.safetensors"), &test_device(), DType::F32).unwrap();
    layers.retain(|p| !p.ends_with("embed_tokens"));
    layers
}

/// Checks a PEFT-saved adapter directory `tiny_llama/<name>` against its reference.safetensors:
/// adapted modules, per-module forward and merged weight, and (where the reference has them) the
/// gradients of loss = sum(y * g) w.r.t. x and every trainable tensor.
pub fn check_adapter_dir(name: &str) -> candle_peft::Result<PeftModel<candle_peft::NamedLinears>> {
    let dir = fixture(&format!("tiny_llama/{name}"));
    let peft = PeftModel::from_pretrained(tiny_llama(), &dir, DType::F32)?;
    let reference = load(&format!("tiny_llama/{name}/reference.safetensors"));
    let expected: BTreeSet<String> =
        reference.keys().filter_map(|k| k.strip_suffix(".x")).map(str::to_string).collect();
    let adapted: BTreeSet<String> = peft.adapted_modules().iter().cloned().collect();
    assert_eq!(adapted, expected, "{name}: adapted modules");
    for (path, layer) in peft.model().linears() {
        if !adapted.contains(&path) {
            continue;
        }
        let get = |k: &str| reference[&format!("{path}.{k}")].clone();
        let x = Var::from_tensor(&get("x"))?;
        let y = layer.forward_checked(x.as_tensor())?;
        assert_close(&y, &get("y"), 1e-5, &format!("{name} {path} forward"));
        assert_close(&layer.merged_weight()?, &get("merged"), 1e-5, &format!("{name} {path} merge"));
        if !reference.contains_key(&format!("{path}.g")) {
            continue;
        }
        let grads = (&y * get("g"))?.sum_all()?.backward()?;
        for (suffix, var) in layer.adapter().unwrap().trainable_vars() {
            let want = get(&format!("grad.{suffix}"));
            assert_close(grads.get(var.as_tensor()).unwrap(), &want, 1e-4, &format!("{name} {path} grad {suffix}"));
        }
        assert_close(grads.get(x.as_tensor()).unwrap(), &get("grad_x"), 1e-4, &format!("{name} {path} grad x"));
    }
    Ok(peft)
}

/// Checks what candle-peft saves for the config of `tiny_llama/<name>` against PEFT's files:
/// the same keys and shapes, the same `adapter_config.json` fields (target_modules' order aside),
/// and a file that loads back bit-exact.
pub fn check_saved_files(name: &str) -> candle_peft::Result<()> {
    let dir = fixture(&format!("tiny_llama/{name}"));
    let config = AdapterConfig::from_file(&dir.join(CONFIG_FILE))?;
    let peft = PeftModel::new(tiny_llama(), config, InitOptions::default())?;
    let out = tempfile::tempdir().unwrap();
    peft.save_pretrained(out.path())?;
    let shapes = |p: &std::path::Path| -> BTreeMap<String, Vec<usize>> {
        read_safetensors(p, &Device::Cpu).unwrap().into_iter().map(|(k, t)| (k, t.dims().to_vec())).collect()
    };
    assert_eq!(shapes(&out.path().join(WEIGHTS_FILE)), shapes(&dir.join(WEIGHTS_FILE)));
    let read = |p: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let (ours, theirs) = (read(&out.path().join(CONFIG_FILE)), read(&dir.join(CONFIG_FILE)));
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<BTreeSet<_>>();
    assert_eq!(keys(&ours), keys(&theirs));
    for (k, v) in theirs.as_object().unwrap() {
        if k != "target_modules" {
            assert_eq!(&ours[k], v, "{name}: {k}");
        }
    }
    // Our own file loads back bit-exact, projections included.
    let back = PeftModel::from_pretrained(tiny_llama(), out.path(), DType::F32)?;
    let theirs: BTreeMap<String, Tensor> = back.saved_tensors()?.into_iter().collect();
    for (k, t) in peft.saved_tensors()? {
        assert_eq!(t.flatten_all()?.to_vec1::<f32>()?, theirs[&k].flatten_all()?.to_vec1::<f32>()?, "{k}");
    }
    Ok(())
}
