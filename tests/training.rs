//! The training pieces against PyTorch (tests/fixtures/training.safetensors): AdamW steps,
//! gradient clipping, and the masked cross-entropy with its gradient.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_peft::train::{clip_grad_norm, masked_cross_entropy, AdamW, AdamWConfig};
use common::{assert_close, load, test_device};

#[test]
fn adamw_matches_torch() -> candle_peft::Result<()> {
    let t = load("training.safetensors");
    let p0 = Var::from_tensor(&t["p0.init"])?;
    let p1 = Var::from_tensor(&t["p1.init"])?;
    let config = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
    let mut opt = AdamW::new(vec![("p0".into(), p0.clone(), true), ("p1".into(), p1.clone(), false)], config)?;
    for step in 0..4 {
        // A GradStore holding the fixture's gradients: d(sum(p * g))/dp = g.
        let loss = ((p0.as_tensor() * &t[&format!("p0.grad{step}")])?.sum_all()?
            + (p1.as_tensor() * &t[&format!("p1.grad{step}")])?.sum_all()?)?;
        let grads: GradStore = loss.backward()?;
        opt.step(&grads, 1e-2)?;
        assert_close(p0.as_tensor(), &t[&format!("p0.after{step}")], 1e-6, &format!("p0 step {step}"));
        assert_close(p1.as_tensor(), &t[&format!("p1.after{step}")], 1e-6, &format!("p1 step {step}"));
    }
    // The state round-trips: a fresh optimizer loaded from it takes the same next step.
    let state = opt.state()?.into_iter().collect();
    let q0 = Var::from_tensor(p0.as_tensor())?;
    let q1 = Var::from_tensor(p1.as_tensor())?;
    let mut again = AdamW::new(vec![("p0".into(), q0.clone(), true), ("p1".into(), q1.clone(), false)], config)?;
    again.load_state(&state)?;
    assert_eq!(again.step_count(), 4);
    for (opt, a, b) in [(&mut opt, &p0, &p1), (&mut again, &q0, &q1)] {
        let loss = (a.as_tensor().sum_all()? + (b.as_tensor().sum_all()? * 2.0)?)?;
        opt.step(&loss.backward()?, 1e-2)?;
    }
    assert_eq!(p0.as_tensor().flatten_all()?.to_vec1::<f32>()?, q0.as_tensor().flatten_all()?.to_vec1::<f32>()?);
    assert_eq!(p1.as_tensor().to_vec1::<f32>()?, q1.as_tensor().to_vec1::<f32>()?);
    Ok(())
}

#[test]
fn clipping_scales_to_the_global_norm() -> candle_peft::Result<()> {
    let a = Var::new(&[3f32, 0.], &test_device())?;
    let b = Var::new(&[0f32, 4.], &test_device())?;
    let loss = ((a.as_tensor() * a.as_tensor())?.sum_all()? * 0.5)?
        .add(&((b.as_tensor() * b.as_tensor())?.sum_all()? * 0.5)?)?;
    let mut grads = loss.backward()?; // grads = (3, 0) and (0, 4): global norm 5
    let norm = clip_grad_norm(&mut grads, &[a.clone(), b.clone()], 1.0)?;
    assert!((norm - 5.0).abs() < 1e-6);
    let ga = grads.get(a.as_tensor()).unwrap().to_vec1::<f32>()?;
    let gb = grads.get(b.as_tensor()).unwrap().to_vec1::<f32>()?;
    assert!((ga[0] - 0.6).abs() < 1e-5 && (gb[1] - 0.8).abs() < 1e-5, "{ga:?} {gb:?}");
    Ok(())
}

#[test]
fn masked_cross_entropy_matches_torch() -> candle_peft::Result<()> {
    let t = load("training.safetensors");
    let logits = Var::from_tensor(&t["ce.logits"].reshape((12, 11))?)?;
    let labels = t["ce.labels"].flatten_all()?;
    let loss = masked_cross_entropy(logits.as_tensor(), &labels)?;
    assert_close(&loss.reshape(1)?, &t["ce.loss"], 1e-6, "loss");
    let grads = loss.backward()?;
    assert_close(grads.get(logits.as_tensor()).unwrap(), &t["ce.grad"].reshape((12, 11))?, 1e-5, "grad");
    // All positions ignored, or a label outside the vocabulary: clear errors.
    let ignored = Tensor::full(-100i64, 12, &test_device())?;
    assert!(masked_cross_entropy(logits.as_tensor(), &ignored).is_err());
    let outside = Tensor::full(11i64, 12, &test_device())?;
    assert!(masked_cross_entropy(logits.as_tensor(), &outside).unwrap_err().to_string().contains("outside"));
    Ok(())
}
