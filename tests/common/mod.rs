//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_peft::format::read_safetensors;
use candle_peft::NamedLinears;

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Every tensor of a fixture safetensors file, on the CPU.
pub fn load(name: &str) -> BTreeMap<String, Tensor> {
    read_safetensors(&fixture(name), &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"))
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
        NamedLinears::from_safetensors(&fixture("tiny_llama/model.safetensors"), &Device::Cpu, DType::F32).unwrap();
    layers.retain(|p| !p.ends_with("embed_tokens"));
    layers
}
