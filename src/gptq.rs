//! Re-quantization that minimizes the error of a linear layer's *outputs* on calibration
//! inputs, rather than of its weights: GPTQ (Frantar et al. 2022, "GPTQ: Accurate
//! Post-Training Quantization for Generative Pre-trained Transformers", Algorithm 1), with
//! llama.cpp's Q8_0 blocks as the quantization grid.
//!
//! For a weight `W: (out, in)` and calibration inputs `X: (n, in)`, GPTQ chooses the quantized
//! `Q` that makes `||X W^T - X Q^T||^2` small, one input column at a time: column `i` is rounded
//! to the grid, and its rounding error, weighted by the inverse Hessian `H^{-1}` of that
//! objective (`H = X^T X`, damped by `lambda = damp * mean(diag H)`), is moved onto the columns
//! not rounded yet, where it can still be compensated:
//!
//! ```text
//! U = chol(H^{-1})  (upper: H^{-1} = U^T U)
//! for i in 0..in:
//!     q_i  = round_to_grid(W[:, i])                 (a block's scale is set at its first column)
//!     e    = (W[:, i] - q_i) / U[i, i]
//!     W[:, i+1..] -= e U[i, i+1..]
//! ```
//!
//! Each row is independent given `U`, so rows run in parallel. With `H` the identity, no error
//! moves and GPTQ is round-to-nearest, byte for byte the Q8_0 that [`QTensor::quantize`]
//! writes. The result is an ordinary Q8_0 tensor: any Q8_0 reader (llama.cpp) reads it.
//!
//! Rounding a merged weight to Q8_0 moves a small model's loss by about 1e-2 either way
//! (SmolLM2-135M: see the README's QLoRA section); GPTQ with a few thousand calibration tokens
//! keeps the merged linears' outputs closer to the unquantized ones. The calibration inputs are
//! each linear's own inputs as the unquantized model computes them
//! ([`crate::PeftModel::record_input_grams`]).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::{Error, Result};

/// `X^T X` of the inputs `X` a linear layer saw, summed over every row (token) recorded: the
/// Hessian, up to a factor 2, of the squared error of the layer's outputs.
#[derive(Debug, Clone)]
pub struct InputGram {
    sum: Tensor,
    rows: usize,
}

impl InputGram {
    /// An empty Gram matrix for inputs of `features` values.
    pub fn new(features: usize) -> Result<Self> {
        Ok(Self { sum: Tensor::zeros((features, features), DType::F32, &Device::Cpu)?, rows: 0 })
    }

    /// Adds the rows of `x: (.., features)` (any dtype or device).
    pub fn add(&mut self, x: &Tensor) -> Result<()> {
        let features = self.sum.dim(0)?;
        let x = x.detach().to_dtype(DType::F32)?.to_device(&Device::Cpu)?.reshape(((), features))?;
        self.rows += x.dim(0)?;
        self.sum = (&self.sum + x.t()?.contiguous()?.matmul(&x)?)?;
        Ok(())
    }

    /// The number of rows (tokens) added.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `X^T X`, `(features, features)` f32 on the CPU.
    pub fn matrix(&self) -> &Tensor {
        &self.sum
    }
}

/// GPTQ's default damping: `lambda = 0.01 * mean(diag H)` is added to `H`'s diagonal.
pub const DEFAULT_DAMP: f64 = 0.01;

/// Largest Q8_0 value: a block's scale is `amax / 127`.
const Q8_MAX: f32 = 127.0;

/// Rows of `W` processed together by one task: each row of `U` is read once for all of them.
const ROWS_PER_TASK: usize = 16;

/// `w: (out, in)` quantized to Q8_0 by GPTQ (see the module docs) against the inputs of `gram`,
/// with the damping `damp` (e.g. [`DEFAULT_DAMP`]). Inputs that were always zero (a zero
/// diagonal of `H`) are rounded to nearest.
///
/// Errors when `in` is not a multiple of Q8_0's 32-value blocks, when the shapes of `w` and
/// `gram` disagree, when no input was recorded, or when `w` or `gram` hold NaN or infinity.
pub fn quantize_q8_0(w: &Tensor, gram: &InputGram, damp: f64) -> Result<QTensor> {
    let (out, inp) = w.dims2()?;
    let block = GgmlDType::Q8_0.block_size();
    if inp == 0 || out == 0 || inp % block != 0 {
        return Err(Error::Unsupported(format!(
            "GPTQ to Q8_0 of a ({out}, {inp}) weight: rows must be a non-zero multiple of {block} values"
        )));
    }
    if gram.matrix().dims() != [inp, inp] {
        return Err(Error::ShapeMismatch {
            what: "GPTQ input Gram matrix".into(),
            expected: vec![inp, inp],
            actual: gram.matrix().dims().to_vec(),
        });
    }
    if gram.rows == 0 {
        return Err(Error::config("calibration", "no calibration input reached the layer; GPTQ needs some"));
    }
    if !(damp.is_finite() && damp > 0.0) {
        return Err(Error::config("damp", format!("{damp}: expected a positive share of H's mean diagonal")));
    }
    let u = inverse_hessian_factor(gram.matrix(), damp)?;
    let mut w = w.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    if w.iter().any(|v| !v.is_finite()) {
        return Err(Error::LinAlg("the weight holds NaN or infinite values; it cannot be quantized".into()));
    }
    let row_bytes = inp / block * GgmlDType::Q8_0.type_size();
    let mut bytes = vec![0u8; out * row_bytes];
    w.par_chunks_mut(ROWS_PER_TASK * inp)
        .zip(bytes.par_chunks_mut(ROWS_PER_TASK * row_bytes))
        .for_each(|(rows, bytes)| quantize_rows(rows, bytes, &u, inp));
    crate::quantized::gather_rows(out, inp, GgmlDType::Q8_0, &Device::Cpu, |i| {
        &bytes[i * row_bytes..(i + 1) * row_bytes]
    })
}

/// `U`, row-major `(n, n)` f32, upper triangular with `(H + lambda I)^{-1} = U^T U`, for the
/// Gram matrix `h`; a zero diagonal entry (an input never seen) is set to 1 first, as GPTQ does.
fn inverse_hessian_factor(h: &Tensor, damp: f64) -> Result<Vec<f32>> {
    let n = h.dim(0)?;
    let host = h.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if host.iter().any(|v| !v.is_finite()) {
        return Err(Error::LinAlg("the calibration inputs hold NaN or infinite values".into()));
    }
    let mut h = faer::Mat::<f64>::from_fn(n, n, |i, j| host[i * n + j]);
    let mean = (0..n).map(|i| h[(i, i)]).sum::<f64>() / n as f64;
    for i in 0..n {
        if h[(i, i)] == 0.0 {
            h[(i, i)] = 1.0;
        }
        h[(i, i)] += damp * mean.max(f64::MIN_POSITIVE);
    }
    use faer::linalg::solvers::DenseSolveCore;
    let not_pd = |e| Error::LinAlg(format!("the damped {n}x{n} input Hessian is not positive definite: {e:?}"));
    let inverse = h.llt(faer::Side::Lower).map_err(not_pd)?.inverse();
    let llt = inverse.llt(faer::Side::Lower).map_err(not_pd)?;
    let l = llt.L();
    // U = L^T: row i of U is column i of L.
    Ok((0..n).flat_map(|i| (0..n).map(move |j| if j >= i { l[(j, i)] as f32 } else { 0.0 })).collect())
}

/// GPTQ of a few rows `w` (row-major, `in` columns each) into Q8_0 `bytes`, against `u`.
fn quantize_rows(w: &mut [f32], bytes: &mut [u8], u: &[f32], inp: usize) {
    let block = GgmlDType::Q8_0.block_size();
    let block_bytes = GgmlDType::Q8_0.type_size();
    let rows = w.len() / inp;
    let mut inverse_scales = vec![0f32; rows];
    let mut scales = vec![0f32; rows];
    for i in 0..inp {
        let (b, k) = (i / block, i % block);
        if k == 0 {
            // The block's scale, from its values as compensated so far (llama.cpp's rounding:
            // `d = amax / 127`, values multiplied by `1 / d`, `d` stored as f16).
            for r in 0..rows {
                let amax = w[r * inp + i..r * inp + i + block].iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / Q8_MAX;
                let d16 = f16::from_f32(d);
                inverse_scales[r] = if d != 0.0 { 1.0 / d } else { 0.0 };
                scales[r] = d16.to_f32();
                let at = r * inp / block * block_bytes + b * block_bytes;
                bytes[at..at + 2].copy_from_slice(&d16.to_le_bytes());
            }
        }
        let (ui, tail) = (u[i * inp + i], &u[i * inp + i + 1..(i + 1) * inp]);
        for r in 0..rows {
            let row = &mut w[r * inp..(r + 1) * inp];
            let q = (row[i] * inverse_scales[r]).round().clamp(-Q8_MAX, Q8_MAX);
            bytes[r * inp / block * block_bytes + b * block_bytes + 2 + k] = q as i8 as u8;
            let e = (row[i] - q * scales[r]) / ui;
            for (v, &uij) in row[i + 1..].iter_mut().zip(tail) {
                *v -= e * uij;
            }
        }
    }
}

/// `tr((W - Q) H (W - Q)^T)`: the summed squared output error of `Q` in place of `W` over the
/// inputs of `gram` (what GPTQ makes small).
pub fn output_error(w: &Tensor, q: &QTensor, gram: &InputGram) -> Result<f64> {
    let e = (w.to_dtype(DType::F32)?.to_device(&Device::Cpu)? - q.dequantize(&Device::Cpu)?)?;
    let eh = e.matmul(gram.matrix())?;
    Ok((eh * e)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn gram_of(h: Vec<f32>, n: usize) -> InputGram {
        InputGram { sum: Tensor::from_vec(h, (n, n), &Device::Cpu).unwrap(), rows: 1 }
    }

    fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1f32..1.)).collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    /// With uncorrelated inputs no error can be compensated: GPTQ is round-to-nearest, byte for
    /// byte candle's (llama.cpp's) Q8_0.
    #[test]
    fn identity_hessian_gives_round_to_nearest() -> Result<()> {
        let w = random(8, 96, 1);
        let eye: Vec<f32> = (0..96 * 96).map(|i| if i / 96 == i % 96 { 3.0 } else { 0.0 }).collect();
        let q = quantize_q8_0(&w, &gram_of(eye, 96), DEFAULT_DAMP)?;
        assert_eq!(q.data()?, QTensor::quantize(&w, GgmlDType::Q8_0)?.data()?);
        Ok(())
    }

    /// Closed form (Optimal Brain Surgeon's update, which GPTQ applies): with inputs 0 and 1
    /// correlated (`H[0][1] = b`, `H[1][1] = c`, damped), rounding input 0 with error `e` moves
    /// input 1's weight to `w1 + e b / c`, which here rounds to the next Q8_0 step.
    #[test]
    fn the_rounding_error_of_a_column_moves_to_a_correlated_one() -> Result<()> {
        let n = 32;
        let mut h: Vec<f32> = (0..n * n).map(|i| if i / n == i % n { 1.0 } else { 0.0 }).collect();
        let b = 0.9f32;
        (h[1], h[n]) = (b, b);
        let mut w = vec![0f32; n];
        (w[0], w[1], w[31]) = (0.3333, 0.5049, 1.27);
        let wt = Tensor::from_vec(w.clone(), (1, n), &Device::Cpu)?;
        let q = quantize_q8_0(&wt, &gram_of(h, n), DEFAULT_DAMP)?;
        let bytes = q.data()?;
        let d = f16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
        let inverse = 1.0 / (1.27f32 / 127.0);
        let q0 = (w[0] * inverse).round();
        let e = w[0] - q0 * d;
        let c = 1.0 + DEFAULT_DAMP as f32; // H[1][1] after damping by 0.01 * mean(diag) = 0.01
        let q1 = ((w[1] + e * b / c) * inverse).round();
        assert_eq!([bytes[2] as i8, bytes[3] as i8], [q0 as i8, q1 as i8]);
        // Round-to-nearest would have written 50: the compensation moved it to 51.
        assert_eq!(((w[1] * inverse).round(), q1), (50.0, 51.0));
        assert_eq!(bytes[2 + 31] as i8, 127);
        Ok(())
    }

    /// On correlated calibration inputs, GPTQ's output error is well under round-to-nearest's.
    #[test]
    fn correlated_inputs_get_a_smaller_output_error_than_rounding() -> Result<()> {
        let mixing = random(64, 64, 2);
        let x = random(512, 64, 3).matmul(&mixing)?;
        let mut gram = InputGram::new(64)?;
        gram.add(&x.reshape((4, 128, 64))?)?;
        assert_eq!(gram.rows(), 512);
        let direct = x.t()?.matmul(&x)?;
        assert!((gram.matrix() - &direct)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-3);
        let w = random(24, 64, 4);
        let gptq = output_error(&w, &quantize_q8_0(&w, &gram, DEFAULT_DAMP)?, &gram)?;
        let nearest = output_error(&w, &QTensor::quantize(&w, GgmlDType::Q8_0)?, &gram)?;
        assert!(gptq < 0.7 * nearest, "GPTQ {gptq} vs round-to-nearest {nearest}");
        Ok(())
    }

    #[test]
    fn unfit_shapes_and_inputs_are_errors() -> Result<()> {
        let w = random(4, 40, 5);
        assert!(matches!(quantize_q8_0(&w, &InputGram::new(40)?, DEFAULT_DAMP), Err(Error::Unsupported(_))));
        let w = random(4, 32, 5);
        let empty = InputGram::new(32)?;
        assert!(matches!(quantize_q8_0(&w, &empty, DEFAULT_DAMP), Err(Error::InvalidConfig { .. })));
        let mut small = InputGram::new(16)?;
        small.add(&random(3, 16, 6))?;
        assert!(matches!(quantize_q8_0(&w, &small, DEFAULT_DAMP), Err(Error::ShapeMismatch { .. })));
        let mut nan = InputGram::new(32)?;
        nan.add(&(random(3, 32, 7) * f64::NAN)?)?;
        assert!(matches!(quantize_q8_0(&w, &nan, DEFAULT_DAMP), Err(Error::LinAlg(_))));
        Ok(())
    }
}
