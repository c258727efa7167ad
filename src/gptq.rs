//! Re-quantization that minimizes the error of a linear layer's *outputs* on calibration
//! inputs, rather than of its weights: GPTQ (Frantar et al. 2022, "GPTQ: Accurate
//! Post-Training Quantization for Generative Pre-trained Transformers", Algorithm 1), onto
//! llama.cpp's 32-value block types ([`TYPES`]: Q8_0, Q5_1, Q5_0, Q4_1, Q4_0).
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
//!     q_i  = round_to_grid(W[:, i])
//!     e    = (W[:, i] - q_i) / U[i, i]
//!     W[:, i+1..] -= e U[i, i+1..]
//! ```
//!
//! A block's scale (and minimum) is set from its values as compensated so far when its first
//! column is reached, by llama.cpp's own rule for the type. Each row is independent given `U`,
//! so rows run in parallel. With `H` the identity, no error moves and GPTQ is round-to-nearest,
//! byte for byte what [`QTensor::quantize`] writes. The result is an ordinary tensor of its
//! type: any reader of the type (llama.cpp) reads it.
//!
//! Rounding a merged weight to Q8_0 moves a small model's loss by about 1e-2 either way
//! (SmolLM2-135M: see the README's QLoRA section); GPTQ with a few thousand calibration tokens
//! keeps the merged linears' outputs closer to the unquantized ones. At 4-5 bits the
//! compensation is large and fits the calibration text's inputs: it helps on text like it and
//! can hurt on other text (measured in the README), so calibrate on text like the model's use.
//! The calibration inputs are each linear's own inputs as the unquantized model computes them
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
        if x.dims().last() != Some(&features) {
            return Err(Error::ShapeMismatch {
                what: "inputs added to an input Gram matrix (last dimension)".into(),
                expected: vec![features],
                actual: x.dims().to_vec(),
            });
        }
        let x = x.detach().to_dtype(DType::F32)?.to_device(&Device::Cpu)?.reshape(((), features))?;
        let sum = (&self.sum + x.t()?.contiguous()?.matmul(&x)?)?;
        (self.sum, self.rows) = (sum, self.rows + x.dim(0)?);
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

/// The types GPTQ writes: llama.cpp's 32-value blocks with a scale (and a minimum for the `_1`
/// types) per block.
pub const TYPES: [GgmlDType; 5] = [GgmlDType::Q8_0, GgmlDType::Q5_1, GgmlDType::Q5_0, GgmlDType::Q4_1, GgmlDType::Q4_0];

/// Values per block of every type of [`TYPES`].
const BLOCK: usize = 32;

/// Rows of `W` processed together by one task: each row of `U` is read once for all of them.
const ROWS_PER_TASK: usize = 16;

/// A block format of [`TYPES`]: how a block's parameters come from its values, how a value is
/// rounded to a level and read back, and how a block is laid out, each as llama.cpp's reference
/// quantizers (`quantize_row_q8_0_ref`, ...) do it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Grid {
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
}

/// One block's parameters: the scale as stored (f16) and its inverse before that rounding (what
/// llama.cpp multiplies by), and for the `_1` types the minimum (f32, and as stored).
#[derive(Debug, Clone, Copy, Default)]
struct Params {
    d: f16,
    inverse: f32,
    min: f32,
    m: f16,
}

impl Grid {
    fn of(t: GgmlDType) -> Option<Self> {
        Some(match t {
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            _ => return None,
        })
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
        }
    }

    /// The highest level (levels run from 0, or from -127 for Q8_0).
    fn top(self) -> i32 {
        match self {
            Self::Q8_0 => 127,
            Self::Q4_0 | Self::Q4_1 => 15,
            Self::Q5_0 | Self::Q5_1 => 31,
        }
    }

    /// A block's parameters from its values: `amax / 127` (Q8_0); the value of largest magnitude
    /// over -8 or -16 (Q4_0, Q5_0); `(max - min) / 15` or `/ 31` and the minimum (Q4_1, Q5_1).
    fn params(self, xs: &[f32]) -> Params {
        let inverse = |d: f32| if d != 0.0 { 1.0 / d } else { 0.0 };
        match self {
            Self::Q8_0 => {
                let d = xs.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                Params { d: f16::from_f32(d), inverse: inverse(d), ..Default::default() }
            }
            Self::Q4_0 | Self::Q5_0 => {
                let (mut amax, mut max) = (0f32, 0f32);
                for &x in xs {
                    if amax < x.abs() {
                        (amax, max) = (x.abs(), x);
                    }
                }
                let d = max / -((self.top() + 1) / 2) as f32;
                Params { d: f16::from_f32(d), inverse: inverse(d), ..Default::default() }
            }
            Self::Q4_1 | Self::Q5_1 => {
                let min = xs.iter().fold(f32::INFINITY, |m, &x| m.min(x));
                let max = xs.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let d = (max - min) / self.top() as f32;
                Params { d: f16::from_f32(d), inverse: inverse(d), min, m: f16::from_f32(min) }
            }
        }
    }

    /// The level of `x` in a block of parameters `p`, clamped to the grid (GPTQ's compensated
    /// values can leave the range the block's parameters were set from).
    fn level(self, x: f32, p: &Params) -> i32 {
        let top = self.top();
        match self {
            Self::Q8_0 => (x * p.inverse).round().clamp(-127.0, 127.0) as i32,
            Self::Q4_0 | Self::Q5_0 => {
                let offset = ((top + 1) / 2) as f32 + 0.5;
                ((x * p.inverse + offset) as i32).clamp(0, top)
            }
            Self::Q4_1 | Self::Q5_1 => (((x - p.min) * p.inverse + 0.5) as i32).clamp(0, top),
        }
    }

    /// The value a reader gets back for level `q`.
    fn value(self, q: i32, p: &Params) -> f32 {
        let d = p.d.to_f32();
        match self {
            Self::Q8_0 => q as f32 * d,
            Self::Q4_0 | Self::Q5_0 => (q - (self.top() + 1) / 2) as f32 * d,
            Self::Q4_1 | Self::Q5_1 => q as f32 * d + p.m.to_f32(),
        }
    }

    /// Writes a block: the scale (f16), the minimum (`_1` types), the levels' fifth bits (Q5
    /// types, a little-endian u32), then the levels: bytes for Q8_0, nibbles for the others
    /// (value `j` in the low nibble of byte `j`, value `j + 16` in its high nibble).
    fn pack(self, p: &Params, q: &[i32; BLOCK], out: &mut [u8]) {
        out[..2].copy_from_slice(&p.d.to_le_bytes());
        let mut at = 2;
        if matches!(self, Self::Q4_1 | Self::Q5_1) {
            out[at..at + 2].copy_from_slice(&p.m.to_le_bytes());
            at += 2;
        }
        if self == Self::Q8_0 {
            for (o, &q) in out[at..at + BLOCK].iter_mut().zip(q) {
                *o = q as i8 as u8;
            }
            return;
        }
        if matches!(self, Self::Q5_0 | Self::Q5_1) {
            let high = q.iter().enumerate().fold(0u32, |h, (j, &q)| h | (((q as u32 >> 4) & 1) << j));
            out[at..at + 4].copy_from_slice(&high.to_le_bytes());
            at += 4;
        }
        for j in 0..BLOCK / 2 {
            out[at + j] = (q[j] as u8 & 0x0F) | ((q[j + BLOCK / 2] as u8 & 0x0F) << 4);
        }
    }
}

/// `Ok` when [`quantize`] writes `t` (the types of [`TYPES`]), otherwise an error that lists them
/// (f16, bf16 and f32 need no calibration).
pub fn check_type(t: GgmlDType) -> Result<()> {
    grid(t).map(|_| ())
}

/// The grid of `t`, or [`check_type`]'s error.
fn grid(t: GgmlDType) -> Result<Grid> {
    if let Some(grid) = Grid::of(t) {
        return Ok(grid);
    }
    let names: Vec<&str> = TYPES.iter().map(|&t| crate::quantized::type_name(t)).collect();
    Err(Error::Unsupported(format!(
        "GPTQ to {}: it writes {} (f16, bf16 and f32 need no calibration)",
        crate::quantized::type_name(t),
        names.join(", ")
    )))
}

/// `w: (out, in)` quantized to `t` (one of [`TYPES`]) by GPTQ (see the module docs) against the
/// inputs of `gram`, with the damping `damp` (e.g. [`DEFAULT_DAMP`]). Inputs that were always
/// zero (a zero diagonal of `H`) are rounded to nearest.
///
/// Errors when `t` is not one of [`TYPES`], when `in` is not a multiple of their 32-value
/// blocks, when the shapes of `w` and `gram` disagree, when no input was recorded, or when `w`
/// or `gram` hold NaN or infinity.
pub fn quantize(w: &Tensor, gram: &InputGram, t: GgmlDType, damp: f64) -> Result<QTensor> {
    let grid = grid(t)?;
    let (out, inp) = w.dims2()?;
    if inp == 0 || out == 0 || inp % BLOCK != 0 {
        return Err(Error::Unsupported(format!(
            "GPTQ to {} of a ({out}, {inp}) weight: rows must be a non-zero multiple of {BLOCK} values",
            crate::quantized::type_name(t)
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
    let row_bytes = inp / BLOCK * t.type_size();
    let mut bytes = vec![0u8; out * row_bytes];
    w.par_chunks_mut(ROWS_PER_TASK * inp)
        .zip(bytes.par_chunks_mut(ROWS_PER_TASK * row_bytes))
        .for_each(|(rows, bytes)| quantize_rows(grid, rows, bytes, &u, inp));
    crate::quantized::gather_rows(out, inp, grid.ggml(), &Device::Cpu, |i| &bytes[i * row_bytes..(i + 1) * row_bytes])
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
    for i in 0..n {
        if h[(i, i)] == 0.0 {
            h[(i, i)] = 1.0;
        }
    }
    let mean = (0..n).map(|i| h[(i, i)]).sum::<f64>() / n as f64;
    for i in 0..n {
        h[(i, i)] += damp * mean;
    }
    use faer::linalg::solvers::DenseSolveCore;
    let not_pd = |e| Error::LinAlg(format!("the damped {n}x{n} input Hessian is not positive definite: {e:?}"));
    let inverse = h.llt(faer::Side::Lower).map_err(not_pd)?.inverse();
    let llt = inverse.llt(faer::Side::Lower).map_err(not_pd)?;
    let l = llt.L();
    // U = L^T: row i of U is column i of L.
    Ok((0..n).flat_map(|i| (0..n).map(move |j| if j >= i { l[(j, i)] as f32 } else { 0.0 })).collect())
}

/// GPTQ of a few rows `w` (row-major, `in` columns each) into `grid`'s blocks `bytes`, against
/// `u`: a block's parameters are set from its values as compensated when its first column is
/// reached, and each value's error is measured against what a reader gets back.
fn quantize_rows(grid: Grid, w: &mut [f32], bytes: &mut [u8], u: &[f32], inp: usize) {
    let block_bytes = grid.ggml().type_size();
    let rows = w.len() / inp;
    let mut blocks = vec![(Params::default(), [0i32; BLOCK]); rows];
    for i in 0..inp {
        let (b, k) = (i / BLOCK, i % BLOCK);
        if k == 0 {
            for (r, (p, _)) in blocks.iter_mut().enumerate() {
                *p = grid.params(&w[r * inp + i..r * inp + i + BLOCK]);
            }
        }
        let (ui, tail) = (u[i * inp + i], &u[i * inp + i + 1..(i + 1) * inp]);
        for (r, (p, levels)) in blocks.iter_mut().enumerate() {
            let row = &mut w[r * inp..(r + 1) * inp];
            let q = grid.level(row[i], p);
            levels[k] = q;
            let e = (row[i] - grid.value(q, p)) / ui;
            for (v, &uij) in row[i + 1..].iter_mut().zip(tail) {
                *v -= e * uij;
            }
            if k == BLOCK - 1 {
                let at = (r * inp / BLOCK + b) * block_bytes;
                grid.pack(p, levels, &mut bytes[at..at + block_bytes]);
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
    /// byte candle's (llama.cpp's reference) quantization, for every type it writes.
    #[test]
    fn identity_hessian_gives_round_to_nearest() -> Result<()> {
        let w = (random(8, 96, 1) * 3.0)?;
        let eye: Vec<f32> = (0..96 * 96).map(|i| if i / 96 == i % 96 { 3.0 } else { 0.0 }).collect();
        for t in TYPES {
            let q = quantize(&w, &gram_of(eye.clone(), 96), t, DEFAULT_DAMP)?;
            assert_eq!(q.dtype(), t);
            assert_eq!(q.data()?, QTensor::quantize(&w, t)?.data()?, "{t:?}");
        }
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
        let q = quantize(&wt, &gram_of(h, n), GgmlDType::Q8_0, DEFAULT_DAMP)?;
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

    /// On correlated calibration inputs, GPTQ's output error is well under round-to-nearest's,
    /// for every type it writes.
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
        for t in TYPES {
            let gptq = output_error(&w, &quantize(&w, &gram, t, DEFAULT_DAMP)?, &gram)?;
            let nearest = output_error(&w, &QTensor::quantize(&w, t)?, &gram)?;
            assert!(gptq < 0.7 * nearest, "{t:?}: GPTQ {gptq} vs round-to-nearest {nearest}");
        }
        Ok(())
    }

    #[test]
    fn unfit_shapes_and_inputs_are_errors() -> Result<()> {
        let w = random(4, 40, 5);
        assert!(matches!(
            quantize(&w, &InputGram::new(40)?, GgmlDType::Q8_0, DEFAULT_DAMP),
            Err(Error::Unsupported(_))
        ));
        let w = random(4, 256, 5);
        let k = quantize(&w, &InputGram::new(256)?, GgmlDType::Q4K, DEFAULT_DAMP);
        assert!(matches!(&k, Err(Error::Unsupported(m)) if m.contains("q4_0")), "{k:?}");
        let w = random(4, 32, 5);
        let empty = InputGram::new(32)?;
        assert!(matches!(quantize(&w, &empty, GgmlDType::Q8_0, DEFAULT_DAMP), Err(Error::InvalidConfig { .. })));
        let mut small = InputGram::new(16)?;
        small.add(&random(3, 16, 6))?;
        assert!(matches!(small.add(&random(3, 32, 6)), Err(Error::ShapeMismatch { .. })));
        assert!(matches!(quantize(&w, &small, GgmlDType::Q8_0, DEFAULT_DAMP), Err(Error::ShapeMismatch { .. })));
        let mut nan = InputGram::new(32)?;
        nan.add(&(random(3, 32, 7) * f64::NAN)?)?;
        assert!(matches!(quantize(&w, &nan, GgmlDType::Q8_0, DEFAULT_DAMP), Err(Error::LinAlg(_))));
        Ok(())
    }
}
