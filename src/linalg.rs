//! Dense linear algebra on the host, backed by `faer`: the truncated SVD used by PiSSA's init
//! (and by the SVD-based adapters).

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// The rank-`r` truncation `W ~= U_r diag(S_r) V_r^T` of a matrix `W: (m, n)`.
#[derive(Debug, Clone)]
pub struct TruncatedSvd {
    /// Left singular vectors `U_r: (m, r)`, orthonormal columns.
    pub u: Tensor,
    /// Singular values `S_r: (r,)`, non-increasing, non-negative.
    pub s: Tensor,
    /// Right singular vectors, transposed: `V_r^T: (r, n)`.
    pub vt: Tensor,
}

/// The exact SVD of `w: (m, n)` cut to its `rank` largest singular values, computed in f32 on
/// the host (whatever `w`'s dtype) and returned as f32 tensors on `w`'s device.
///
/// Errors when `rank` is 0 or exceeds `min(m, n)`, when `w` holds NaN or infinity, or when the
/// SVD does not converge.
pub fn truncated_svd(w: &Tensor, rank: usize) -> Result<TruncatedSvd> {
    let (m, n) = w.dims2()?;
    if rank == 0 || rank > m.min(n) {
        return Err(Error::config("r", format!("an SVD of rank {rank} needs 1 <= r <= min({m}, {n}) = {}", m.min(n))));
    }
    let host = w.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?.to_vec2::<f32>()?;
    if host.iter().flatten().any(|v| !v.is_finite()) {
        return Err(Error::LinAlg("the matrix holds NaN or infinite values; no SVD exists".into()));
    }
    let mat = faer::Mat::<f32>::from_fn(m, n, |i, j| host[i][j]);
    let svd = mat.thin_svd().map_err(|e| Error::LinAlg(format!("SVD of a {m}x{n} matrix did not converge: {e:?}")))?;
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let u: Vec<f32> = (0..m).flat_map(|i| (0..rank).map(move |j| u[(i, j)])).collect();
    let s: Vec<f32> = (0..rank).map(|j| s[j]).collect();
    let vt: Vec<f32> = (0..rank).flat_map(|i| (0..n).map(move |j| v[(j, i)])).collect();
    let device = w.device();
    Ok(TruncatedSvd {
        u: Tensor::from_vec(u, (m, rank), device)?,
        s: Tensor::from_vec(s, rank, device)?,
        vt: Tensor::from_vec(vt, (rank, n), device)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn full_rank_svd_reconstructs_and_u_is_orthonormal() -> Result<()> {
        let w = Tensor::randn(0f32, 1., (7, 5), &Device::Cpu)?;
        let svd = truncated_svd(&w, 5)?;
        let rec = svd.u.broadcast_mul(&svd.s.unsqueeze(0)?)?.matmul(&svd.vt)?;
        let err = (rec - &w)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "{err}");
        let gram = svd.u.t()?.matmul(&svd.u)?;
        let eye = Tensor::eye(5, DType::F32, &Device::Cpu)?;
        let err = (gram - eye)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "{err}");
        Ok(())
    }

    #[test]
    fn bad_rank_and_non_finite_input_are_errors() -> Result<()> {
        let w = Tensor::randn(0f32, 1., (4, 3), &Device::Cpu)?;
        assert!(truncated_svd(&w, 0).is_err());
        assert!(truncated_svd(&w, 4).is_err());
        let nan = Tensor::new(&[[1f32, f32::NAN], [0., 1.]], &Device::Cpu)?;
        assert!(matches!(truncated_svd(&nan, 1), Err(Error::LinAlg(_))));
        Ok(())
    }
}
