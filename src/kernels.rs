//! CPU kernels for the fused training ops of [`crate::fused`] and the loss of
//! [`crate::train::loss`]: each makes one pass over memory where the same math written with
//! candle's ops makes five to ten (one allocation and one pass per op), uses a vectorized `exp`
//! (candle's CPU `exp` calls libm once per element), and runs in parallel over rows with rayon.
//! Attention is computed per head, in blocks of query rows, with gemm's matrix kernels and the
//! causal mask's empty blocks skipped, as FlashAttention-2 (Dao, 2023) organizes it.
//!
//! The products of bf16 weights (`matmul_*_bf16`) widen a tile of the weight at a time, in the
//! core's cache, and multiply it with gemm's f32 kernels: candle's own bf16 matmul on the CPU
//! widens both operands whole, on one thread, on every call.
//!
//! Everything else here works on contiguous f32 slices. The loops are compiled twice, for the
//! baseline x86-64 and for AVX2 + FMA, and the CPU picks at run time (`vectorized!`). The same
//! ops for other devices are written with candle's ops in `fused`; tests check that the two give
//! the same numbers.

use gemm::Parallelism;
use half::bf16;
use rayon::prelude::*;

/// Elements per rayon task in the element-wise kernels.
const CHUNK: usize = 1 << 14;

/// Query rows per block in the attention kernels.
const ATTENTION_ROWS: usize = 64;

/// Defines a function whose body is compiled for the baseline target and, on x86-64, also with
/// AVX2 and FMA enabled (so that LLVM vectorizes its loops 8 lanes wide); the CPU's features
/// pick one at run time.
macro_rules! vectorized {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

/// `e^x` in f32, within 2 ulp of the exact value for `-87 <= x <= 88` (Cephes' `expf`:
/// `x = n ln 2 + r` with `|r| <= ln 2 / 2`, `e^r` by a degree-6 polynomial, times `2^n` built
/// from its bits); 0 below -87 (including -inf, where the exact value is below 1.7e-38), +inf
/// above 88, NaN for NaN. Branch-free, so that loops over it vectorize.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 = LN2_HI + LN2_LO, LN2_HI with few mantissa bits so that `n * LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: `y + ROUND` rounds `y` to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // 2^n: the integer n sits in t's low bits; n + 127 is the biased exponent (1..=254 here).
    let two_n = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    let y = e_r * two_n;
    if x < -87.0 {
        0.0
    } else if x > 88.0 {
        f32::INFINITY
    } else {
        y
    }
}

/// Lanes of the reductions below: independent partial results that LLVM keeps in one vector.
const LANES: usize = 16;

/// The largest element of `xs` (NaN elements are skipped; -inf for an empty slice).
#[inline(always)]
fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    acc.iter().fold(tail, |m, &x| if x > m { x } else { m })
}

/// `sum(e^(xs - shift))`, in [`LANES`] partial sums.
#[inline(always)]
fn sum_exp(xs: &[f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += exp(x - shift);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&x| exp(x - shift)).sum();
    acc.iter().sum::<f32>() + tail
}

/// `sum(a * b)`, in [`LANES`] partial sums.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

vectorized! {
    /// `out = silu(g) * u = g u / (1 + e^-g)`.
    fn swiglu_chunk(g: &[f32], u: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            *o = g * u / (1.0 + exp(-g));
        }
    }
}

vectorized! {
    /// SwiGLU's backward with `s = sigmoid(g)`: `dg = dy u s (1 + g (1 - s))`, `du = dy g s`.
    fn swiglu_backward_chunk(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for ((((dg, du), &g), &u), &dy) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
            let s = 1.0 / (1.0 + exp(-g));
            *dg = dy * u * s * (1.0 + g * (1.0 - s));
            *du = dy * g * s;
        }
    }
}

/// SwiGLU's gate `silu(g) * u` of two equally long slices.
pub(crate) fn swiglu(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; g.len()];
    out.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(out, (g, u))| swiglu_chunk(g, u, out));
    out
}

/// The gradients `(dg, du)` of [`swiglu`] given the output's gradient `dy`.
pub(crate) fn swiglu_backward(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK)))
        .for_each(|((dg, du), ((g, u), dy))| swiglu_backward_chunk(g, u, dy, dg, du));
    (dg, du)
}

vectorized! {
    /// Rows of `y = g (u + v) + c` for rows of `u`, `v` and `y` of `g.len()` values.
    fn scale_shift_rows(u: &[f32], v: &[f32], g: &[f32], c: &[f32], y: &mut [f32]) {
        let cols = g.len();
        for ((y, u), v) in y.chunks_exact_mut(cols).zip(u.chunks_exact(cols)).zip(v.chunks_exact(cols)) {
            for ((((y, &u), &v), &g), &c) in y.iter_mut().zip(u).zip(v).zip(g).zip(c) {
                *y = g * (u + v) + c;
            }
        }
    }
}

/// `y = g * (u + v) + c` for `u, v: (rows, g.len())` and `g, c` broadcast over the rows (DoRA's
/// output from the base and branch products).
pub(crate) fn scale_shift(u: &[f32], v: &[f32], g: &[f32], c: &[f32]) -> Vec<f32> {
    let rows = rows_per_task(g.len()) * g.len();
    let mut y = vec![0f32; u.len()];
    y.par_chunks_mut(rows)
        .zip(u.par_chunks(rows).zip(v.par_chunks(rows)))
        .for_each(|(y, (u, v))| scale_shift_rows(u, v, g, c, y));
    y
}

vectorized! {
    /// Rows of `dz = dy g`, and the column sums of `dy y` and `dy` added to `sums` (`[dy y | dy]`).
    fn scale_shift_backward_rows(dy: &[f32], y: &[f32], g: &[f32], dz: &mut [f32], sums: &mut [f32]) {
        let cols = g.len();
        let (dy_y, dy_sum) = sums.split_at_mut(cols);
        for ((dz, dy), y) in dz.chunks_exact_mut(cols).zip(dy.chunks_exact(cols)).zip(y.chunks_exact(cols)) {
            for (((((dz, &dy), &y), &g), s1), s0) in
                dz.iter_mut().zip(dy).zip(y).zip(g).zip(dy_y.iter_mut()).zip(dy_sum.iter_mut())
            {
                *dz = dy * g;
                *s1 += dy * y;
                *s0 += dy;
            }
        }
    }
}

/// The backward pass of [`scale_shift`] given its output `y` and the output's gradient `dy`, for
/// a `g` with no zero: `dz = dy g` (the gradient of `u` and of `v`) and
/// `dg = sum_rows(dy (u + v)) = (sum_rows(dy y) - c sum_rows(dy)) / g`.
pub(crate) fn scale_shift_backward(dy: &[f32], y: &[f32], g: &[f32], c: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let cols = g.len();
    let rows = rows_per_task(cols) * cols;
    let mut dz = vec![0f32; dy.len()];
    let sums = dz
        .par_chunks_mut(rows)
        .zip(dy.par_chunks(rows).zip(y.par_chunks(rows)))
        .fold(
            || vec![0f32; 2 * cols],
            |mut sums, (dz, (dy, y))| {
                scale_shift_backward_rows(dy, y, g, dz, &mut sums);
                sums
            },
        )
        .reduce(|| vec![0f32; 2 * cols], |a, b| a.iter().zip(&b).map(|(a, b)| a + b).collect());
    let dg = (0..cols).map(|j| (sums[j] - c[j] * sums[cols + j]) / g[j]).collect();
    (dz, dg)
}

vectorized! {
    /// `logsumexp` of each row of `z` (rows of `vocab` values) whose weight is not 0 (0 for the
    /// others, which are not read).
    fn logsumexp_rows(z: &[f32], vocab: usize, weights: &[f32], lse: &mut [f32]) {
        for ((row, &w), lse) in z.chunks_exact(vocab).zip(weights).zip(lse) {
            *lse = if w == 0.0 {
                0.0
            } else {
                let m = max(row);
                // A row of -inf (or all NaN): its own value, as PyTorch gives.
                if m == f32::NEG_INFINITY { m } else { sum_exp(row, m).ln() + m }
            };
        }
    }
}

vectorized! {
    /// The cross-entropy gradient of rows of `z`: `dz = c_i (e^(z - lse_i) - onehot(y_i))`,
    /// `c_i = weight_i * grad`.
    fn cross_entropy_backward_rows(
        z: &[f32],
        vocab: usize,
        weights: &[f32],
        targets: &[u32],
        lse: &[f32],
        grad: f32,
        dz: &mut [f32],
    ) {
        for ((((row, drow), &w), &y), &lse) in z.chunks_exact(vocab).zip(dz.chunks_exact_mut(vocab)).zip(weights).zip(targets).zip(lse) {
            let c = w * grad;
            if c == 0.0 {
                drow.fill(0.0);
                continue;
            }
            for (d, &x) in drow.iter_mut().zip(row) {
                *d = c * exp(x - lse);
            }
            drow[y as usize] -= c;
        }
    }
}

/// Rows per rayon task of the row-wise kernels: about [`CHUNK`] values, at least one row.
fn rows_per_task(cols: usize) -> usize {
    (CHUNK / cols.max(1)).max(1)
}

/// The weighted cross-entropy `sum_i w_i (logsumexp(z_i) - z_i[y_i])` of `z: (n, vocab)` and
/// each row's `logsumexp` (0 on rows of weight 0), which the backward pass reuses.
pub(crate) fn cross_entropy(z: &[f32], vocab: usize, weights: &[f32], targets: &[u32]) -> (f32, Vec<f32>) {
    let mut lse = vec![0f32; weights.len()];
    let rows = rows_per_task(vocab);
    lse.par_chunks_mut(rows)
        .zip(z.par_chunks(rows * vocab).zip(weights.par_chunks(rows)))
        .for_each(|(lse, (z, w))| logsumexp_rows(z, vocab, w, lse));
    let loss = lse
        .iter()
        .zip(weights)
        .zip(targets)
        .enumerate()
        .filter(|(_, ((_, &w), _))| w != 0.0)
        .map(|(i, ((&lse, &w), &y))| f64::from(w) * f64::from(lse - z[i * vocab + y as usize]))
        .sum::<f64>();
    (loss as f32, lse)
}

/// The gradient of [`cross_entropy`] with respect to `z`, scaled by the loss's gradient `grad`.
pub(crate) fn cross_entropy_backward(
    z: &[f32],
    vocab: usize,
    weights: &[f32],
    targets: &[u32],
    lse: &[f32],
    grad: f32,
) -> Vec<f32> {
    let mut dz = vec![0f32; z.len()];
    let rows = rows_per_task(vocab);
    dz.par_chunks_mut(rows * vocab)
        .zip(z.par_chunks(rows * vocab))
        .zip(weights.par_chunks(rows).zip(targets.par_chunks(rows)).zip(lse.par_chunks(rows)))
        .for_each(|((dz, z), ((w, y), lse))| cross_entropy_backward_rows(z, vocab, w, y, lse, grad, dz));
    dz
}

/// A matrix view into a slice: element `(i, j)` at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// Rows `r0..r0 + n` of a row-major matrix with `cols` columns stored from `data[0]`.
    fn rows(data: &'a [f32], cols: usize, r0: usize, n: usize) -> Self {
        Mat { data: &data[r0 * cols..(r0 + n) * cols], rows: n, cols, rs: cols, cs: 1 }
    }

    fn t(self) -> Self {
        Mat { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst (+)= a b` for `dst` row-major `(a.rows, b.cols)` with row stride `ld`, on this thread.
fn matmul(dst: &mut [f32], ld: usize, a: Mat, b: Mat, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k && a.in_bounds() && b.in_bounds() && (m == 0 || n == 0 || (m - 1) * ld + n <= dst.len()),
        "attention kernel: operands out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: every element that gemm reads or writes is inside the slices (checked above), and
    // `dst` does not overlap `a` or `b` (a `&mut` and two `&` borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

vectorized! {
    /// `dst = src` widened from bf16 to f32 (exact: a bf16 is the high half of an f32).
    fn widen(src: &[bf16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits(u32::from(s.to_bits()) << 16);
        }
    }
}

/// `s` rounded from f32 to the nearest bf16 (ties to even; NaN stays NaN), as
/// `half::bf16::from_f32` and PyTorch round; branch-free, so that loops over it vectorize.
#[inline(always)]
fn round_bf16(s: f32) -> bf16 {
    let bits = s.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    bf16::from_bits(if s.is_nan() { 0x7fc0 } else { rounded })
}

vectorized! {
    /// `dst = src` rounded from f32 to bf16 ([`round_bf16`]).
    fn narrow(src: &[f32], dst: &mut [bf16]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = round_bf16(s);
        }
    }
}

vectorized! {
    /// `y = a + b` computed in f32 and rounded to bf16 once.
    fn add_to_bf16_chunk(a: &[bf16], b: &[f32], y: &mut [bf16]) {
        for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
            *y = round_bf16(f32::from_bits(u32::from(a.to_bits()) << 16) + b);
        }
    }
}

/// `a + b` for bf16 `a` and f32 `b` of one length, added in f32 and rounded to bf16 once, in
/// parallel: a bf16 base's output plus an f32 adapter branch.
pub(crate) fn add_to_bf16(a: &[bf16], b: &[f32]) -> Vec<bf16> {
    let mut y = vec![bf16::ZERO; a.len()];
    y.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(y, (a, b))| add_to_bf16_chunk(a, b, y));
    y
}

/// `src` widened to f32, in parallel.
fn widened(src: &[bf16]) -> Vec<f32> {
    let mut dst = vec![0f32; src.len()];
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| widen(s, d));
    dst
}

/// `src` rounded to bf16, in parallel.
fn narrowed(src: &[f32]) -> Vec<bf16> {
    let mut dst = vec![bf16::ZERO; src.len()];
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| narrow(s, d));
    dst
}

/// Floats per tile of a bf16 weight widened at once in [`matmul_nt_bf16`] and
/// [`matmul_nn_bf16`] (256 KiB: the tile stays in the core's L2 cache while gemm reads it).
const BF16_TILE: usize = 1 << 16;

/// `x W^T` for row-major f32 `x: (m, k)` and bf16 `W: (n, k)`, as `(m, n)` f32: each task
/// widens a tile of `W`'s rows (so a large `W` is never widened whole) and multiplies it with
/// gemm's f32 kernels.
pub(crate) fn matmul_nt_bf16(x: &[f32], w: &[bf16], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert!(x.len() == m * k && w.len() == n * k, "bf16 matmul: operands do not fit their shapes");
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * n];
    }
    let rows = (BF16_TILE / k).clamp(1, n);
    let tiles: Vec<Vec<f32>> = w
        .par_chunks(rows * k)
        .map(|w| {
            let r = w.len() / k;
            let mut tile = vec![0f32; w.len()];
            widen(w, &mut tile);
            let mut y = vec![0f32; m * r];
            matmul(&mut y, r, Mat::rows(x, k, 0, m), Mat::rows(&tile, k, 0, r).t(), false);
            y
        })
        .collect();
    side_by_side(&tiles, m, n, rows)
}

/// The `(m, width)` row-major matrix made of `blocks` side by side: block `i`, `(m, c_i)`
/// row-major, from column `i * stride`.
fn side_by_side(blocks: &[Vec<f32>], m: usize, width: usize, stride: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * width];
    out.par_chunks_mut(width).enumerate().for_each(|(i, row)| {
        for (j, block) in blocks.iter().enumerate() {
            let c = block.len() / m;
            row[j * stride..j * stride + c].copy_from_slice(&block[i * c..(i + 1) * c]);
        }
    });
    out
}

/// `dy W` for row-major f32 `dy: (m, n)` and bf16 `W: (n, k)`, as `(m, k)` f32: each task owns
/// a range of the output's columns and adds up the products of `dy`'s columns with tiles of
/// `W` (its rows, those columns) widened one at a time.
pub(crate) fn matmul_nn_bf16(dy: &[f32], w: &[bf16], m: usize, n: usize, k: usize) -> Vec<f32> {
    assert!(dy.len() == m * n && w.len() == n * k, "bf16 matmul: operands do not fit their shapes");
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * k];
    }
    let tasks = rayon::current_num_threads().clamp(1, k.div_ceil(16));
    let cols = k.div_ceil(tasks).next_multiple_of(16).min(k);
    let rows = (BF16_TILE / cols).clamp(1, n);
    let parts: Vec<Vec<f32>> = (0..k.div_ceil(cols))
        .into_par_iter()
        .map(|c| {
            let (c0, c) = (c * cols, cols.min(k - c * cols));
            let mut acc = vec![0f32; m * c];
            let mut tile = vec![0f32; rows * c];
            for r0 in (0..n).step_by(rows) {
                let r = rows.min(n - r0);
                for (i, t) in tile.chunks_exact_mut(c).take(r).enumerate() {
                    widen(&w[(r0 + i) * k + c0..][..c], t);
                }
                let a = Mat { data: &dy[r0..], rows: m, cols: r, rs: n, cs: 1 };
                matmul(&mut acc, c, a, Mat::rows(&tile, c, 0, r), r0 > 0);
            }
            acc
        })
        .collect();
    side_by_side(&parts, m, k, cols)
}

/// `x W^T` for row-major bf16 `x: (m, k)` and `W: (n, k)`, accumulated in f32 and rounded to
/// bf16 once (candle's bf16 matmul rounds the same way, but widens both operands whole, on one
/// thread). The `mkl` build multiplies the bf16 operands with MKL's bf16 kernels ([`mkl_bf16`]);
/// otherwise [`matmul_nt_bf16`] of the widened `x`.
pub(crate) fn matmul_bf16_nt(x: &[bf16], w: &[bf16], m: usize, k: usize, n: usize) -> Vec<bf16> {
    #[cfg(feature = "mkl")]
    if let Some(y) = mkl_bf16::gemm(x, w, (m, k, n), true) {
        return narrowed(&y);
    }
    narrowed(&matmul_nt_bf16(&widened(x), w, m, k, n))
}

/// `dy W` for row-major bf16 `dy: (m, n)` and `W: (n, k)`, accumulated in f32 and rounded to
/// bf16 once: MKL's bf16 kernels in the `mkl` build, otherwise [`matmul_nn_bf16`].
pub(crate) fn matmul_bf16_nn(dy: &[bf16], w: &[bf16], m: usize, n: usize, k: usize) -> Vec<bf16> {
    #[cfg(feature = "mkl")]
    if let Some(y) = mkl_bf16::gemm(dy, w, (m, n, k), false) {
        return narrowed(&y);
    }
    narrowed(&matmul_nn_bf16(&widened(dy), w, m, n, k))
}

/// Intel MKL's bf16 GEMM, `cblas_gemm_bf16bf16f32` (the `mkl` build links MKL through candle):
/// bf16 operands, f32 accumulation and output. MKL picks its kernels when it runs: AVX512-BF16's
/// `vdpbf16ps` or AMX tiles where the CPU has them (twice f32's multiply-adds per instruction, or
/// more), f32 arithmetic elsewhere.
#[cfg(feature = "mkl")]
mod mkl_bf16 {
    use half::bf16;

    const ROW_MAJOR: i32 = 101;
    const NO_TRANS: i32 = 111;
    const TRANS: i32 = 112;

    extern "C" {
        /// `C = alpha op(A) op(B) + beta C` (MKL's `mkl_cblas.h`; LP64: 32-bit indices;
        /// `MKL_BF16` is a `u16` holding a bf16's bits).
        #[allow(clippy::too_many_arguments)]
        fn cblas_gemm_bf16bf16f32(
            layout: i32,
            trans_a: i32,
            trans_b: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const u16,
            lda: i32,
            b: *const u16,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
    }

    /// `a b^T` (`transposed`, `b: (n, k)`) or `a b` (`b: (k, n)`) for row-major bf16 `a: (m, k)`,
    /// as row-major f32 `(m, n)`; `None` when a dimension or leading dimension passes MKL's
    /// 32-bit indices (the caller then uses the f32 kernels).
    pub(super) fn gemm(a: &[bf16], b: &[bf16], (m, k, n): (usize, usize, usize), transposed: bool) -> Option<Vec<f32>> {
        assert!(a.len() == m * k && b.len() == k * n, "bf16 matmul: operands do not fit their shapes");
        let [mi, ki, ni] = [m, k, n].map(|d| i32::try_from(d.max(1)).ok());
        let (mi, ki, ni) = (mi?, ki?, ni?);
        let mut c = vec![0f32; m * n];
        if m == 0 || n == 0 || k == 0 {
            return Some(c);
        }
        let (trans_b, ldb) = if transposed { (TRANS, ki) } else { (NO_TRANS, ni) };
        // SAFETY: `a` holds `m * k` values with row stride `k`, `b` `k * n` with row stride
        // `ldb`, `c` `m * n` with row stride `n` (all checked above); `bf16` is a `u16` in memory.
        unsafe {
            cblas_gemm_bf16bf16f32(
                ROW_MAJOR,
                NO_TRANS,
                trans_b,
                mi,
                ni,
                ki,
                1.0,
                a.as_ptr().cast(),
                ki,
                b.as_ptr().cast(),
                ldb,
                0.0,
                c.as_mut_ptr(),
                ni,
            );
        }
        Some(c)
    }
}

/// Shapes and masking of one attention call: `q: (b, heads, tq, d)`, `k, v: (b, kv, tk, d)`,
/// scores scaled by `scale`, query row `i` (at position `i + tk - tq`) sees the keys
/// `p - window < j <= p` (`window = usize::MAX`: every earlier key).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionShape {
    pub b: usize,
    pub heads: usize,
    pub kv: usize,
    pub tq: usize,
    pub tk: usize,
    pub d: usize,
    pub scale: f32,
    pub window: usize,
}

impl AttentionShape {
    /// Blocks of query rows: `(first row, rows, first key the block reads, one past its last)`.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
        (0..self.tq).step_by(ATTENTION_ROWS).map(move |r0| {
            let n = ATTENTION_ROWS.min(self.tq - r0);
            let first = (r0 + self.tk - self.tq + 1).saturating_sub(self.window);
            (r0, n, first, r0 + n + self.tk - self.tq)
        })
    }

    /// The keys `lo..hi` (relative to the block's first key `k0`) that query row `r` sees.
    fn visible(&self, r: usize, k0: usize) -> (usize, usize) {
        let p = r + self.tk - self.tq;
        ((p + 1).saturating_sub(self.window).max(k0) - k0, p + 1 - k0)
    }
}

vectorized! {
    /// Softmax of the rows of `s: (rows, m)` (scores of the block's keys), scaled by `scale`
    /// and masked (`visible(i) = (lo, hi)`: row `i` sees keys `lo..hi`, the others get 0); each
    /// row's `logsumexp` of the scaled scores goes to `lse`.
    fn softmax_rows(s: &mut [f32], m: usize, scale: f32, visible: &dyn Fn(usize) -> (usize, usize), lse: &mut [f32]) {
        for (i, (row, lse)) in s.chunks_exact_mut(m).zip(lse).enumerate() {
            let (lo, hi) = visible(i);
            row[..lo].fill(0.0);
            row[hi..].fill(0.0);
            let seen = &mut row[lo..hi];
            for x in seen.iter_mut() {
                *x *= scale;
            }
            let top = max(seen);
            let mut sum = 0.0;
            for x in seen.iter_mut() {
                *x = exp(*x - top);
                sum += *x;
            }
            let inv = 1.0 / sum;
            for x in seen.iter_mut() {
                *x *= inv;
            }
            *lse = top + sum.ln();
        }
    }
}

vectorized! {
    /// Attention's probabilities again from the scores `s: (rows, m)` and each row's `lse`:
    /// `p = e^(scale s - lse)` where the row sees the key, else 0.
    fn probabilities_rows(s: &mut [f32], m: usize, scale: f32, visible: &dyn Fn(usize) -> (usize, usize), lse: &[f32]) {
        for (i, (row, &lse)) in s.chunks_exact_mut(m).zip(lse).enumerate() {
            let (lo, hi) = visible(i);
            row[..lo].fill(0.0);
            row[hi..].fill(0.0);
            for x in row[lo..hi].iter_mut() {
                *x = exp(*x * scale - lse);
            }
        }
    }
}

vectorized! {
    /// `ds = scale p (dp - rowsum(do o))`, written over `dp: (rows, m)`.
    fn score_gradient_rows(p: &[f32], dp: &mut [f32], m: usize, d: usize, dout: &[f32], out: &[f32], scale: f32) {
        for (((p, dp), dout), out) in p.chunks_exact(m).zip(dp.chunks_exact_mut(m)).zip(dout.chunks_exact(d)).zip(out.chunks_exact(d)) {
            let rowsum = dot(dout, out);
            for (dp, &p) in dp.iter_mut().zip(p) {
                *dp = scale * p * (*dp - rowsum);
            }
        }
    }
}

/// Causal attention `softmax(scale q k^T + mask) v` (grouped: query head `i` reads key/value
/// head `i / (heads / kv)`). Returns the output `(b, heads, tq, d)` and each query row's
/// `logsumexp` of its scaled scores `(b, heads, tq)`, which the backward pass reuses.
pub(crate) fn attention(q: &[f32], k: &[f32], v: &[f32], sh: AttentionShape) -> (Vec<f32>, Vec<f32>) {
    let AttentionShape { heads, kv, tq, tk, d, scale, .. } = sh;
    let group = heads / kv;
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; sh.b * heads * tq];
    out.par_chunks_mut(tq * d).zip(lse.par_chunks_mut(tq)).enumerate().for_each(|(bh, (out, lse))| {
        let kv_head = (bh / heads) * kv + (bh % heads) / group;
        let q = &q[bh * tq * d..][..tq * d];
        let (k, v) = (&k[kv_head * tk * d..][..tk * d], &v[kv_head * tk * d..][..tk * d]);
        let mut s = Vec::new();
        for (r0, n, k0, k1) in sh.blocks() {
            let m = k1 - k0;
            s.clear();
            s.resize(n * m, 0.0);
            matmul(&mut s, m, Mat::rows(q, d, r0, n), Mat::rows(k, d, k0, m).t(), false);
            softmax_rows(&mut s, m, scale, &|i| sh.visible(r0 + i, k0), &mut lse[r0..r0 + n]);
            matmul(
                &mut out[r0 * d..],
                d,
                Mat { data: &s, rows: n, cols: m, rs: m, cs: 1 },
                Mat::rows(v, d, k0, m),
                false,
            );
        }
    });
    (out, lse)
}

/// The gradients `(dq, dk, dv)` of [`attention`] from its inputs, output, the `logsumexp` it
/// returned and the output's gradient `dout`. With `P` recomputed per block from `lse`:
/// `dV = P^T dO`, `dS = scale P (dO V^T - rowsum(dO O))`, `dQ = dS K`, `dK = dS^T Q`, summed
/// over the query heads that share a key/value head.
pub(crate) fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    sh: AttentionShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttentionShape { heads, kv, tq, tk, d, scale, .. } = sh;
    let group = heads / kv;
    let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
    // One task per key/value head: it owns that head's dK, dV and its query heads' dQ.
    dq.par_chunks_mut(group * tq * d)
        .zip(dk.par_chunks_mut(tk * d).zip(dv.par_chunks_mut(tk * d)))
        .enumerate()
        .for_each(|(kv_head, (dq, (dk, dv)))| {
            let (k, v) = (&k[kv_head * tk * d..][..tk * d], &v[kv_head * tk * d..][..tk * d]);
            let (mut p, mut ds) = (Vec::new(), Vec::new());
            for g in 0..group {
                let bh = kv_head * group + g;
                let head = bh * tq * d..(bh + 1) * tq * d;
                let (q, out, dout) = (&q[head.clone()], &out[head.clone()], &dout[head]);
                let lse = &lse[bh * tq..(bh + 1) * tq];
                let dq = &mut dq[g * tq * d..][..tq * d];
                for (r0, n, k0, k1) in sh.blocks() {
                    let m = k1 - k0;
                    p.clear();
                    p.resize(n * m, 0.0);
                    ds.clear();
                    ds.resize(n * m, 0.0);
                    let (q_rows, do_rows) = (Mat::rows(q, d, r0, n), Mat::rows(dout, d, r0, n));
                    let (k_rows, v_rows) = (Mat::rows(k, d, k0, m), Mat::rows(v, d, k0, m));
                    matmul(&mut p, m, q_rows, k_rows.t(), false);
                    probabilities_rows(&mut p, m, scale, &|i| sh.visible(r0 + i, k0), &lse[r0..r0 + n]);
                    let p_mat = Mat { data: &p, rows: n, cols: m, rs: m, cs: 1 };
                    matmul(&mut dv[k0 * d..], d, p_mat.t(), do_rows, true);
                    matmul(&mut ds, m, do_rows, v_rows.t(), false);
                    score_gradient_rows(
                        &p,
                        &mut ds,
                        m,
                        d,
                        &dout[r0 * d..(r0 + n) * d],
                        &out[r0 * d..(r0 + n) * d],
                        scale,
                    );
                    let ds_mat = Mat { data: &ds, rows: n, cols: m, rs: m, cs: 1 };
                    matmul(&mut dq[r0 * d..], d, ds_mat, k_rows, false);
                    matmul(&mut dk[k0 * d..], d, ds_mat.t(), q_rows, true);
                }
            }
        });
    (dq, dk, dv)
}

/// RoPE tables for [`heads_first`] and [`tokens_first`]: `cos, sin: (t, d / 2)` and the sign of
/// the rotation (-1: the inverse rotation, which is RoPE's backward).
#[derive(Clone, Copy)]
pub(crate) struct Rotation<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub sign: f32,
}

/// HF's rotary embedding of one head's row `x` (`d` values) at a position with `cos, sin`
/// (`d / 2` values): `x cos + rotate_half(x) sin`, `rotate_half(x) = [-x2, x1]`; into `out`.
#[inline(always)]
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], sign: f32, out: &mut [f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    for i in 0..half {
        let (c, s) = (cos[i], sign * sin[i]);
        o1[i] = x1[i] * c - x2[i] * s;
        o2[i] = x2[i] * c + x1[i] * s;
    }
}

/// `x: (b, t, n, d)` (the projections' layout, one row of `n` heads per token) as `(b, n, t,
/// d)`, each row rotated when `rope` is given: the layout the attention kernels read.
pub(crate) fn heads_first(x: &[f32], [b, t, n, d]: [usize; 4], rope: Option<Rotation>) -> Vec<f32> {
    swap_middle(x, [b, t, n, d], rope, true)
}

/// `x: (b, n, t, d)` as `(b, t, n, d)`, each row rotated when `rope` is given: the inverse of
/// [`heads_first`] (with the inverse rotation).
pub(crate) fn tokens_first(x: &[f32], [b, n, t, d]: [usize; 4], rope: Option<Rotation>) -> Vec<f32> {
    swap_middle(x, [b, n, t, d], rope, false)
}

/// `x: (b, p, q, d)` as `(b, q, p, d)`, each row of `d` rotated when `rope` is given, at its
/// position on the `p` axis (`positions_on_p`) or the `q` axis.
fn swap_middle(x: &[f32], [b, p, q, d]: [usize; 4], rope: Option<Rotation>, positions_on_p: bool) -> Vec<f32> {
    let t = if positions_on_p { p } else { q };
    assert!(x.len() == b * p * q * d && rope.is_none_or(|r| r.cos.len() == t * d / 2 && r.sin.len() == t * d / 2));
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(p * d).enumerate().for_each(|(bj, out)| {
        let (bi, j) = (bj / q, bj % q);
        for (i, row) in out.chunks_exact_mut(d).enumerate() {
            let src = &x[((bi * p + i) * q + j) * d..][..d];
            let pos = if positions_on_p { i } else { j };
            match rope {
                Some(r) => rotate(src, &r.cos[pos * d / 2..][..d / 2], &r.sin[pos * d / 2..][..d / 2], r.sign, row),
                None => row.copy_from_slice(src),
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_and_handles_the_ends() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let exact = f64::from(x).exp();
            worst = worst.max((f64::from(exp(x)) - exact).abs() / exact);
            x += 0.001_37;
        }
        // 2 ulp of f32 is 2^-22 relative at worst.
        assert!(worst < 2.4e-7, "max relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn reductions_match_sequential_sums() {
        let xs: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        for len in [0, 1, 15, 16, 17, 1000] {
            let xs = &xs[..len];
            let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(xs), m);
            let s: f64 = xs.iter().map(|&x| (f64::from(x) - 3.0).exp()).sum();
            assert!((f64::from(sum_exp(xs, 3.0)) - s).abs() <= 1e-6 * s.max(1.0), "{len}");
            let d: f64 = xs.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            assert!((f64::from(dot(xs, xs)) - d).abs() <= 1e-6 * d.max(1.0), "{len}");
        }
    }
}
