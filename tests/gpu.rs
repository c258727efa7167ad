//! Every adapter method of the registry on the test device (`CANDLE_PEFT_TEST_DEVICE`: `cpu` by
//! default, `cuda:0` on a GPU) against the same computation on the CPU: the layer outputs, the
//! gradients of every trainable tensor and of the input, and the merged weights, on the tiny
//! LLaMA's layers (32->32, 32->16, 32->48, 48->32), in f32 and with a bf16 base under f32
//! adapters.
//!
//! Tolerances: f32 on the CPU against f32 on a GPU differ by summation order only (candle leaves
//! TF32 off for f32 matmuls, and the test checks that it is off): 1e-5 relative for outputs and
//! merged weights, 1e-4 for gradients, as against PEFT. A bf16 base rounds `x W0^T` to 8 bits of
//! mantissa on either device, in different orders: 2e-2.
//!
//! `scripts/gpu_check.sh` runs this binary on the GPU machine.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_peft::adapters::variants;
use candle_peft::{AdapterConfig, InitOptions, LinearHost, MethodParams, NamedLinears, PeftModel, TargetConfig};
use common::{assert_close, fixture, test_device};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

/// A tensor of `shape` drawn on the host from `seed` (the same values for every device).
fn host_randn(seed: u64, shape: &[usize], device: &Device) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| Normal::new(0f32, 1.).unwrap().sample(&mut rng)).collect();
    Tensor::from_vec(data, shape, device).unwrap()
}

/// The tiny LLaMA's linears on `device` in `dtype`, with the adapters of method `name`, their
/// trainable tensors moved away from their init by the same host-drawn values on every device.
fn adapted(name: &str, device: &Device, dtype: DType) -> candle_peft::Result<PeftModel<NamedLinears>> {
    let mut base = NamedLinears::from_safetensors(&fixture("tiny_llama/model.safetensors"), device, dtype)?;
    base.retain(|p| !p.ends_with("embed_tokens") && p.starts_with("model.layers.0."));
    let mut params = MethodParams::new(4, TargetConfig::list(&["q_proj", "v_proj", "up_proj", "down_proj"]));
    if name == "melora" {
        params.options.insert("n".into(), 2.into());
    }
    let config = AdapterConfig::for_method(name, &params)?;
    let peft = PeftModel::new(base, config, InitOptions { seed: 5, dtype: DType::F32 })?;
    for (i, (_, var)) in peft.named_trainable_vars()?.iter().enumerate() {
        let step = (host_randn(100 + i as u64, var.dims(), device) * 0.1)?;
        var.set(&(var.as_tensor() + step)?)?;
    }
    Ok(peft)
}

fn compare_method(name: &str, device: &Device, dtype: DType) -> candle_peft::Result<()> {
    let (tol_y, tol_g) = if dtype == DType::F32 { (1e-5, 1e-4) } else { (2e-2, 2e-2) };
    let cpu = adapted(name, &Device::Cpu, dtype)?;
    let dev = adapted(name, device, dtype)?;
    let (cpu_vars, dev_vars) = (cpu.named_trainable_vars()?, dev.named_trainable_vars()?);
    for (path, layer) in cpu.model().linears() {
        let Some(theirs) = dev.model().get(&path).filter(|l| l.adapter().is_some()) else { continue };
        let what = |w: &str| format!("{name} {dtype:?} {path} {w}");
        let x_cpu = candle_core::Var::from_tensor(&host_randn(7, &[2, 3, layer.features().0], &Device::Cpu))?;
        let x_dev = candle_core::Var::from_tensor(&x_cpu.to_device(device)?)?;
        let g = host_randn(8, &[2, 3, layer.features().1], &Device::Cpu);
        let y_cpu = layer.forward_checked(&x_cpu.to_dtype(dtype)?)?;
        let y_dev = theirs.forward_checked(&x_dev.to_dtype(dtype)?)?;
        assert_eq!(y_dev.device().location(), device.location(), "{}", what("output device"));
        assert_close(&y_dev.to_device(&Device::Cpu)?, &y_cpu, tol_y, &what("forward"));
        let grads_cpu = (y_cpu.to_dtype(DType::F32)? * &g)?.sum_all()?.backward()?;
        let grads_dev = (y_dev.to_dtype(DType::F32)? * g.to_device(device)?)?.sum_all()?.backward()?;
        let mut checked = 0;
        for ((key, a), (_, b)) in cpu_vars.iter().zip(&dev_vars).filter(|((k, _), _)| k.contains(&path)) {
            let (ga, gb) = (grads_cpu.get(a.as_tensor()), grads_dev.get(b.as_tensor()));
            match (ga, gb) {
                (Some(ga), Some(gb)) => assert_close(&gb.to_device(&Device::Cpu)?, ga, tol_g, &what(key)),
                (None, None) => {}
                _ => panic!("{}: a gradient on one device only", what(key)),
            }
            checked += 1;
        }
        assert!(checked > 0, "{}", what("no trainable tensor"));
        let gx = grads_dev.get(x_dev.as_tensor()).expect("input gradient").to_device(&Device::Cpu)?;
        assert_close(&gx, grads_cpu.get(x_cpu.as_tensor()).expect("input gradient"), tol_g, &what("grad x"));
        let merged = theirs.merged_weight()?.to_device(&Device::Cpu)?;
        assert_close(&merged, &layer.merged_weight()?, tol_y, &what("merged weight"));
    }
    Ok(())
}

#[test]
fn every_method_matches_the_cpu_on_the_test_device() -> candle_peft::Result<()> {
    let device = test_device();
    if device.is_cuda() {
        assert!(!candle_core::cuda::gemm_reduced_precision_f32(), "TF32 must stay off for these tolerances");
    }
    eprintln!("test device: {device:?}");
    for v in variants() {
        compare_method(v.name, &device, DType::F32)?;
    }
    Ok(())
}

#[test]
fn a_bf16_base_with_f32_adapters_matches_the_cpu() -> candle_peft::Result<()> {
    let device = test_device();
    for name in ["lora", "dora", "loha", "vera"] {
        compare_method(name, &device, DType::BF16)?;
    }
    Ok(())
}
