//! Any adapter as a plain LoRA by the SVD of its per-layer update: at full rank the LoRA gives
//! the adapter's own logits (DoRA, VeRA, LoHa, RandLoRA, rsLoRA on the tiny LLaMA, PEFT's
//! fixtures); cut to rank k, each layer keeps exactly the energy of its k largest singular
//! values (Eckart-Young), and the saved directory loads as a PEFT LoRA.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_peft::convert::{to_lora, LoraRank};
use candle_peft::linalg::truncated_svd;
use candle_peft::models::Llama;
use candle_peft::{LinearHost, PeftModel};
use common::{fixture, rel_err};

fn adapted(name: &str) -> PeftModel<Llama> {
    let llama = Llama::from_hf_dir(&fixture("tiny_llama"), &Device::Cpu, DType::F32).unwrap();
    PeftModel::from_pretrained(llama, &fixture("tiny_llama").join(name), DType::F32).unwrap()
}

fn ids() -> Tensor {
    Tensor::new(&[[1u32, 5, 9, 13, 17, 21, 25, 29, 33], [60, 2, 44, 8, 31, 7, 19, 50, 3]], &Device::Cpu).unwrap()
}

#[test]
fn a_full_rank_conversion_gives_the_adapters_own_logits() -> candle_peft::Result<()> {
    for name in ["dora", "vera", "loha", "randlora", "rslora_all_linear", "lora"] {
        let peft = adapted(name);
        let want = peft.model().forward(&ids())?;
        let converted = to_lora(&peft, LoraRank::Fixed(64))?;
        assert!(converted.layers.iter().all(|l| l.relative_error < 1e-5 && l.energy > 1.0 - 1e-6), "{name}");
        let dir = tempfile::tempdir().unwrap();
        converted.save(dir.path())?;
        let llama = Llama::from_hf_dir(&fixture("tiny_llama"), &Device::Cpu, DType::F32)?;
        let lora = PeftModel::from_pretrained(llama, dir.path(), DType::F32)?;
        assert_eq!(lora.config().peft_type(), "LORA");
        assert_eq!(lora.adapted_modules(), peft.adapted_modules(), "{name}");
        let got = lora.model().forward(&ids())?;
        let err = rel_err(&got, &want);
        println!("{name}: {} layers, logits rel. error {err:.2e}", converted.layers.len());
        assert!(err < 1e-5, "{name}: {err}");
    }
    Ok(())
}

#[test]
fn a_cut_keeps_the_energy_of_the_largest_singular_values() -> candle_peft::Result<()> {
    let peft = adapted("dora");
    let converted = to_lora(&peft, LoraRank::Fixed(2))?;
    for (path, layer) in peft.model().linears() {
        let Some(fit) = converted.layers.iter().find(|f| f.module == path) else { continue };
        let w0 = layer.weight().dense()?;
        let delta = (layer.merged_weight()? - &w0)?;
        let (m, n) = delta.dims2()?;
        let s: Vec<f32> = truncated_svd(&delta, m.min(n))?.s.to_vec1()?;
        let total: f32 = s.iter().map(|v| v * v).sum();
        let tail: f32 = s[2..].iter().map(|v| v * v).sum();
        assert_eq!(fit.rank, 2);
        assert!(
            (fit.energy as f32 - (1.0 - tail / total)).abs() < 1e-4,
            "{path}: {} vs {}",
            fit.energy,
            1.0 - tail / total
        );
        assert!((fit.relative_error as f32 - (tail / total).sqrt()).abs() < 1e-3, "{path}: {}", fit.relative_error);
    }
    // By energy: the smallest rank per layer that keeps 90%; layers of another rank than the
    // config's `r` go to its rank and alpha patterns, and the saved adapter loads back with each
    // layer's rank and an update of exactly `B A` (scaling 1 everywhere).
    let by_energy = to_lora(&peft, LoraRank::Energy(0.9))?;
    assert!(by_energy.layers.iter().all(|f| f.energy >= 0.9 - 1e-9));
    let candle_peft::AdapterConfig::Lora(c) = &by_energy.config else { panic!("not a LoRA config") };
    assert!(!c.rank_pattern.is_empty(), "all layers got rank {}: the patterns are not exercised", c.r);
    let dir = tempfile::tempdir().unwrap();
    by_energy.save(dir.path())?;
    let llama = Llama::from_hf_dir(&fixture("tiny_llama"), &Device::Cpu, DType::F32)?;
    let reloaded = PeftModel::from_pretrained(llama, dir.path(), DType::F32)?;
    let tensors: std::collections::BTreeMap<_, _> = by_energy.tensors.iter().cloned().collect();
    for (path, layer) in reloaded.model().linears() {
        let Some(fit) = by_energy.layers.iter().find(|f| f.module == path) else { continue };
        let key = |s: &str| format!("base_model.model.{path}.{s}");
        let (a, b) = (&tensors[&key("lora_A.weight")], &tensors[&key("lora_B.weight")]);
        assert_eq!(a.dim(0)?, fit.rank, "{path}");
        let w0 = layer.weight().dense()?;
        let delta = (layer.merged_weight()? - &w0)?;
        let err = rel_err(&delta, &b.matmul(a)?);
        assert!(err < 1e-5, "{path}: rank {} (r = {}), update differs from B A by {err}", fit.rank, c.r);
    }
    assert!(to_lora(&peft, LoraRank::Fixed(0)).is_err() && to_lora(&peft, LoraRank::Energy(1.5)).is_err());
    Ok(())
}
