//! RandLoRA (Albert et al. 2025, "RandLoRA: Full-rank parameter-efficient fine-tuning of large
//! models"), identical to HF PEFT's `peft_type: "RANDLORA"`.
//!
//! ```text
//! nb = ceil(min(in, out) / r) random bases, shared by every layer (views, no copies):
//! randlora_A: (r, 1, min_dim), randlora_B: (max_dim, num_bases, r)   frozen
//! lambda: (r, nb) init 0, gamma: (nb, min(in, out)) init 1 / max(nb, min(in, out))   trainable
//! A_s = (lambda[:, :, None] * A[:, :nb, :min] * gamma[None]).flatten(0, 1)   (r*nb, min), rows (r, nb)
//! B_f = B[:max, :nb, :].flatten(1)                                           (max, nb*r), cols (nb, r)
//! in <= out: dW = s * B_f A_s;  in > out: dW = s * A_s^T B_f^T
//! y = x W0^T + b + drop(x) dW^T
//! ```
//! The row order of `A_s` and the column order of `B_f` differ; both are PEFT's. The shared
//! bases are kaiming-uniform (gain sqrt(2)) divided by their standard deviation, drawn from a
//! `StdRng` seeded with `projection_prng_key` (PEFT's come from torch's generator: adapters are
//! exchanged with the bases saved in the file). PEFT also writes each layer's copy of the two
//! bases (`<layer>.randlora_A`, `<layer>.randlora_B`); they are written and checked here too.
//!
//! Scaling: `strategy.scale_bases(randlora_alpha, r, nb)`; PEFT's `alpha / r` by default
//! (`randlora_alpha = 640`), the paper's `2 / sqrt(nb)` with [`crate::scaling::RandLoraPaper`].

use candle_core::backend::BackendStorage;
use candle_core::op::Mul;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Device, Layout, MetalStorage, Shape, Tensor, Var};
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::common::{check_dropout, check_rank, check_scaling, normal, shared_pair, uniform, var};
use super::update::{matmul_t, LowRankUpdate};
use crate::adapter::{AdapterCore, BuiltAdapter};
use crate::frozen::{frozen_linear, reshape};
use crate::fused::{needed, with_backward};
use crate::method::{peft_fields, serde_alpha, BuildContext, Method, MethodConfig, MethodParams, PeftField, SharedTensors, Variant};
use crate::scaling::{Scaling, ScalingStrategy, Standard};
use crate::target::TargetConfig;
use crate::{Error, Result};

/// The shared basis keys (saved as `base_model.<key>` and under every layer).
pub const SHARED_KEYS: [&str; 2] = ["randlora_A", "randlora_B"];

/// PEFT's `RandLoraConfig` (`peft_type: "RANDLORA"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RandLoraConfig {
    /// The rank of each random basis (PEFT default 32).
    #[serde(default = "default_r")]
    pub r: usize,
    /// `alpha` of the scaling factor (PEFT default 640, with `s = alpha / r`).
    #[serde(default = "default_alpha", with = "serde_alpha")]
    pub randlora_alpha: f64,
    /// Dropout on the adapter branch input.
    #[serde(default)]
    pub randlora_dropout: f64,
    /// Seed of the shared bases.
    #[serde(default)]
    pub projection_prng_key: u64,
    /// Whether the bases are in the file (always true for files written here).
    #[serde(default = "super::common::yes")]
    pub save_projection: bool,
    /// PEFT's ternary sparse bases (only for bases read from a file).
    #[serde(default)]
    pub sparse: bool,
    /// PEFT's very sparse bases (only for bases read from a file).
    #[serde(default)]
    pub very_sparse: bool,
    /// `true`: `lambda = 0`; `false`: PEFT's test init `lambda ~ N(0, 1)`.
    #[serde(default = "super::common::yes")]
    pub init_weights: bool,
    /// Which modules get an adapter.
    #[serde(flatten)]
    pub target: TargetConfig,
    /// The scaling strategy (not part of PEFT's format: PEFT always uses `alpha / r`).
    #[serde(skip)]
    pub scaling: Option<Scaling>,
}

fn default_r() -> usize {
    32
}
fn default_alpha() -> f64 {
    640.0
}

/// `ceil(min_dim / r)`: the number of bases that makes the update full rank.
pub fn num_bases(min_dim: usize, r: usize) -> usize {
    min_dim.div_ceil(r)
}

impl RandLoraConfig {
    /// RandLoRA with bases of rank `r` on `target_modules`, PEFT's defaults otherwise.
    pub fn new(r: usize, target_modules: &[&str]) -> Self {
        Self {
            r,
            randlora_alpha: default_alpha(),
            randlora_dropout: 0.0,
            projection_prng_key: 0,
            save_projection: true,
            sparse: false,
            very_sparse: false,
            init_weights: true,
            target: TargetConfig::list(target_modules),
            scaling: None,
        }
    }
}

impl MethodConfig for RandLoraConfig {
    const PEFT_FIELDS: &'static [PeftField] = peft_fields! {
        "bias" => "none", false;
        "fan_in_fan_out" => false, false;
    };

    fn target(&self) -> &TargetConfig {
        &self.target
    }

    fn target_mut(&mut self) -> &mut TargetConfig {
        &mut self.target
    }

    fn validate(&self) -> Result<()> {
        check_rank(self.r)?;
        check_dropout("randlora_dropout", self.randlora_dropout)?;
        check_scaling("randlora_alpha", self.randlora_alpha, 0.0)?;
        self.target.validate()
    }

    fn set_scaling(&mut self, strategy: Scaling) -> Result<()> {
        self.scaling = Some(strategy);
        Ok(())
    }

    fn to_peft(&self) -> Result<Self> {
        if self.scaling.as_ref().is_some_and(|s| s.name() != Standard.name()) {
            return Err(Error::Unsupported(
                "saving RandLoRA with a custom scaling strategy: PEFT's format has only alpha / r".into(),
            ));
        }
        Ok(Self { save_projection: true, scaling: None, ..self.clone() })
    }
}

impl Method for RandLora {
    const PEFT_TYPE: &'static str = "RANDLORA";
    const VARIANTS: &'static [Variant] = &[Variant {
        name: "randlora",
        peft: "RANDLORA",
        summary: "RandLoRA (Albert et al. 2025): full-rank updates from shared random bases (alpha default 640)",
    }];
    const SHARED_KEYS: &'static [&'static str] = &SHARED_KEYS;
    type Config = RandLoraConfig;

    fn config(_name: &str, params: &MethodParams) -> Result<RandLoraConfig> {
        Ok(RandLoraConfig {
            target: params.target.clone(),
            randlora_alpha: params.alpha_or(default_alpha()),
            ..RandLoraConfig::new(params.rank, &[])
        })
    }

    /// Draws the shared bases for layers of the given `(in, out)` shapes.
    fn shared_tensors(
        config: &RandLoraConfig,
        shapes: &[(usize, usize)],
        dtype: DType,
        device: &Device,
    ) -> Result<SharedTensors> {
        if config.sparse || config.very_sparse {
            return Err(Error::Unsupported(
                "new RandLoRA adapters with sparse bases; sparse bases are read from files only".into(),
            ));
        }
        let max_in = shapes.iter().map(|s| s.0).max().unwrap_or(0);
        let max_out = shapes.iter().map(|s| s.1).max().unwrap_or(0);
        let (min_dim, max_dim) = (max_in.min(max_out), max_in.max(max_out));
        let nb = num_bases(min_dim, config.r);
        let mut rng = rand::rngs::StdRng::seed_from_u64(config.projection_prng_key);
        let normalized = |t: Tensor| -> Result<Tensor> {
            let n = t.elem_count() as f64;
            let mean = t.mean_all()?.to_scalar::<f32>()? as f64;
            let var = (t.sqr()?.sum_all()?.to_scalar::<f32>()? as f64 - n * mean * mean) / (n - 1.0).max(1.0);
            Ok((t / var.sqrt())?.to_dtype(dtype)?)
        };
        let a =
            normalized(uniform(&mut rng, (config.r, 1, min_dim), (6.0 / min_dim as f64).sqrt(), DType::F32, device)?)?;
        let b =
            normalized(uniform(&mut rng, (max_dim, nb, config.r), (6.0 / config.r as f64).sqrt(), DType::F32, device)?)?;
        Ok(SharedTensors::from([(SHARED_KEYS[0].to_string(), a), (SHARED_KEYS[1].to_string(), b)]))
    }

    fn shared_saved(config: &RandLoraConfig) -> bool {
        config.save_projection
    }

    /// Builds the RandLoRA of a layer over views of the shared bases.
    fn build(config: &RandLoraConfig, ctx: BuildContext<'_>) -> Result<BuiltAdapter> {
        let (out, inp) = ctx.base.weight.dims2()?;
        let (min_l, max_l) = (inp.min(out), inp.max(out));
        let (a, b) = shared_pair(ctx.shared, SHARED_KEYS, "RandLoRA")?;
        let (ra, _, min_dim) = a.dims3()?;
        let (max_dim, nb_shared, rb) = b.dims3()?;
        let r = config.r;
        if r > min_l {
            return Err(Error::config("r", format!("RandLoRA rank {r} exceeds min(in, out) = min({inp}, {out})")));
        }
        if ra != r || rb != r {
            return Err(Error::ShapeMismatch {
                what: "shared randlora_A / randlora_B rank".into(),
                expected: vec![r, r],
                actual: vec![ra, rb],
            });
        }
        let nb = num_bases(min_l, r);
        if min_l > min_dim || max_l > max_dim || nb > nb_shared {
            return Err(Error::ShapeMismatch {
                what: "shared randlora bases (min_dim, max_dim, num_bases)".into(),
                expected: vec![min_l, max_l, nb],
                actual: vec![min_dim, max_dim, nb_shared],
            });
        }
        let dev = ctx.base.weight.device();
        let lambda = if config.init_weights {
            Tensor::zeros((r, nb), ctx.dtype, dev)?
        } else {
            normal(&mut *ctx.rng, (r, nb), 1.0, ctx.dtype, dev)?
        };
        let gamma = Tensor::full(1.0 / nb.max(min_l) as f32, (nb, min_l), dev)?.to_dtype(ctx.dtype)?;
        let strategy = config.scaling.clone().unwrap_or_else(|| std::sync::Arc::new(Standard));
        let scaling = check_scaling("randlora_alpha", config.randlora_alpha, strategy.scale_bases(config.randlora_alpha, r, nb))?;
        let layer = RandLora {
            basis_a: a.narrow(2, 0, min_l)?,
            basis_b: b.narrow(0, 0, max_l)?.narrow(1, 0, nb)?,
            shared: (a.clone(), b.clone()),
            lambda: var(lambda)?,
            gamma: var(gamma)?,
            scaling,
            dropout: check_dropout("randlora_dropout", config.randlora_dropout)?,
            in_features: inp,
            out_features: out,
        };
        Ok(BuiltAdapter::new(layer))
    }
}

/// `lambda[:, :, None] * A * gamma[None]: (r, nb, min)` for `lambda: (r, nb)`, the basis view
/// `A: (r, 1, min)` and `gamma: (nb, min)`, as one op (PEFT's `UniqueBaseGrad`): autograd keeps
/// the three small inputs instead of two `(r, nb, min)` products, and the backward computes only
/// the gradients of `lambda` and `gamma`.
struct ScaledBasis;

impl ScaledBasis {
    fn fwd<S: BackendStorage>(
        lambda: &S,
        lambda_l: &Layout,
        a: &S,
        a_l: &Layout,
        gamma: &S,
        gamma_l: &Layout,
    ) -> candle_core::Result<(S, Shape)> {
        let (r, nb) = lambda_l.shape().dims2()?;
        let min = a_l.shape().dims3()?.2;
        if !lambda_l.is_contiguous() {
            candle_core::bail!("randlora scaled basis: lambda must be contiguous");
        }
        let shape = Shape::from((r, nb, min));
        let lambda_b =
            Layout::contiguous_with_offset((r, nb, 1), lambda_l.start_offset()).broadcast_as(shape.clone())?;
        let prod = lambda.binary_impl::<Mul>(a, &lambda_b, &a_l.broadcast_as(shape.clone())?)?;
        let out =
            prod.binary_impl::<Mul>(gamma, &Layout::contiguous(shape.clone()), &gamma_l.broadcast_as(shape.clone())?)?;
        Ok((out, shape))
    }
}

impl CustomOp3 for ScaledBasis {
    fn name(&self) -> &'static str {
        "randlora-scaled-basis"
    }

    fn cpu_fwd(
        &self,
        l: &CpuStorage,
        ll: &Layout,
        a: &CpuStorage,
        al: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match (l, a, g, ll.contiguous_offsets(), gl.contiguous_offsets(), al.stride()) {
            (CpuStorage::F32(l), CpuStorage::F32(a), CpuStorage::F32(g), Some(lo), Some(go), &[a_row, _, 1]) => {
                let (r, nb) = ll.shape().dims2()?;
                let min = al.shape().dims3()?.2;
                let a = &a[al.start_offset()..];
                let (l, g) = (&l[lo.0..lo.1], &g[go.0..go.1]);
                // One pass, no temporary: out[k, b, j] = lambda[k, b] a[k, j] gamma[b, j].
                let mut out = vec![0f32; r * nb * min];
                out.par_chunks_mut(min.max(1)).enumerate().for_each(|(kb, row)| {
                    let (k, b) = (kb / nb, kb % nb);
                    let (ak, gb) = (&a[k * a_row..][..min], &g[b * min..][..min]);
                    for ((o, &aj), &gj) in row.iter_mut().zip(ak).zip(gb) {
                        *o = l[kb] * aj * gj;
                    }
                });
                Ok((CpuStorage::F32(out), Shape::from((r, nb, min))))
            }
            _ => Self::fwd(l, ll, a, al, g, gl),
        }
    }

    fn cuda_fwd(
        &self,
        l: &CudaStorage,
        ll: &Layout,
        a: &CudaStorage,
        al: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        Self::fwd(l, ll, a, al, g, gl)
    }

    fn metal_fwd(
        &self,
        l: &MetalStorage,
        ll: &Layout,
        a: &MetalStorage,
        al: &Layout,
        g: &MetalStorage,
        gl: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        Self::fwd(l, ll, a, al, g, gl)
    }

    fn bwd(
        &self,
        lambda: &Tensor,
        a: &Tensor,
        gamma: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (grad_lambda, grad_gamma) = basis_grads(grad, a, lambda, gamma)?;
        Ok((Some(grad_lambda), None, Some(grad_gamma)))
    }
}

/// The gradients of `lambda` and `gamma` from `grad = dL/dA_s: (r, nb, min)`, PEFT's
/// `UniqueBaseGrad.backward`: `grad_lambda = einsum("kbj,kvj,bj->kb", grad, A, gamma)`,
/// `grad_gamma = einsum("kbj,kvj,kb->bj", grad, A, lambda)`. On the CPU in f32, one pass over
/// `grad` with no temporary; elsewhere `grad * A` and two broadcast products, reduced.
fn basis_grads(grad: &Tensor, a: &Tensor, lambda: &Tensor, gamma: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    // Detached, so that no graph node keeps `grad * A` alive beside the gradients.
    let (lambda, gamma) = (lambda.detach(), gamma.detach());
    let all_f32 = [grad, a, &lambda, &gamma].iter().all(|t| t.dtype() == DType::F32);
    if grad.device().is_cpu() && all_f32 {
        let (r, nb, min) = grad.dims3()?;
        let small = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let (a_v, lambda_v, gamma_v) = (small(a)?, small(&lambda)?, small(&gamma)?);
        let grad = grad.contiguous()?;
        let (storage, layout) = grad.storage_and_layout();
        let candle_core::Storage::Cpu(CpuStorage::F32(g)) = &*storage else {
            candle_core::bail!("randlora basis gradients: expected f32 CPU storage");
        };
        let g = &g[layout.start_offset()..];
        let (mut grad_gamma, mut grad_lambda_t) = (vec![0f32; nb * min], vec![0f32; nb * r]);
        grad_gamma.par_chunks_mut(min.max(1)).zip(grad_lambda_t.par_chunks_mut(r.max(1))).enumerate().for_each(
            |(b, (gg, gl))| {
                let gamma_b = &gamma_v[b * min..][..min];
                for (k, gl_k) in gl.iter_mut().enumerate() {
                    let (row, a_k, l) = (&g[(k * nb + b) * min..][..min], &a_v[k * min..][..min], lambda_v[k * nb + b]);
                    // Eight partial sums, so that the compiler can vectorise the dot product.
                    let mut dot = [0f32; 8];
                    for (j, ((&gj, &aj), (&cj, ggj))) in row.iter().zip(a_k).zip(gamma_b.iter().zip(gg.iter_mut())).enumerate() {
                        let t = gj * aj;
                        dot[j % 8] += t * cj;
                        *ggj += t * l;
                    }
                    *gl_k = dot.iter().sum();
                }
            },
        );
        drop(storage);
        let dev = grad.device();
        let grad_lambda = Tensor::from_vec(grad_lambda_t, (nb, r), dev)?.t()?.contiguous()?;
        return Ok((grad_lambda, Tensor::from_vec(grad_gamma, (nb, min), dev)?));
    }
    let ga = grad.broadcast_mul(a)?;
    let grad_lambda = ga.broadcast_mul(&gamma.unsqueeze(0)?)?.sum(2)?;
    let grad_gamma = ga.broadcast_mul(&lambda.unsqueeze(2)?)?.sum(0)?;
    Ok((grad_lambda, grad_gamma))
}

/// Which side of the activation the scaled basis `A_s: (r*nb, min)` multiplies.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    /// `m A_s^T` for `m: (n, min)`: the head of a layer with `in <= out`.
    Head,
    /// `m A_s` for `m: (n, r*nb)`: the tail of a layer with `in > out`.
    Tail,
}

/// One layer's RandLoRA: `lambda` and `gamma` over views of the shared random bases.
#[derive(Debug)]
pub struct RandLora {
    basis_a: Tensor,
    basis_b: Tensor,
    shared: (Tensor, Tensor),
    lambda: Var,
    gamma: Var,
    scaling: f64,
    dropout: f32,
    in_features: usize,
    out_features: usize,
}

impl RandLora {
    /// Whether `in <= out` (which side of the layer the bases' `min_dim` is).
    fn in_is_min(&self) -> bool {
        self.in_features <= self.out_features
    }

    /// `(A_s: (r*nb, min), B_f: (max, nb*r))`, PEFT's `get_scaled_bases` before orientation.
    fn scaled_bases(&self) -> Result<(Tensor, Tensor)> {
        let a_s = scaled_basis(self.lambda.as_tensor(), &self.basis_a, self.gamma.as_tensor())?;
        Ok((a_s, self.flat_basis_b()?))
    }

    /// `B_f: (max, nb*r)`, frozen.
    fn flat_basis_b(&self) -> Result<Tensor> {
        let (max_l, nb, r) = self.basis_b.dims3()?;
        Ok(self.basis_b.to_dtype(self.lambda.dtype())?.contiguous()?.reshape((max_l, nb * r))?)
    }

    /// `s m A_s^T` ([`Side::Head`]) or `s m A_s` ([`Side::Tail`]) over the last dimension of `m`,
    /// as one graph node over `m`, `lambda` and `gamma`. `A_s` is formed without a graph and
    /// formed again in the backward pass instead of being kept (it is `(r*nb, min)`, as large as
    /// the layer's weight); the backward contracts `dL/dA_s` straight into the gradients of
    /// `lambda` and `gamma` ([`basis_grads`]), so no basis-sized gradient enters autograd, which
    /// would allocate and add two more of them.
    fn basis_product(&self, m: &Tensor, side: Side) -> Result<Tensor> {
        let (r, nb) = self.lambda.dims2()?;
        let min = self.gamma.dim(1)?;
        let (k, n_out) = match side {
            Side::Head => (min, r * nb),
            Side::Tail => (r * nb, min),
        };
        let rows = m.elem_count() / k.max(1);
        let mut out_dims = m.dims().to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = n_out;
        }
        let a = self.basis_a.to_dtype(self.lambda.dtype())?;
        let s = self.scaling;
        let product = move |m: &Tensor, a_s: &Tensor| -> candle_core::Result<Tensor> {
            let m = reshape(m, &[rows, k])?;
            match side {
                Side::Head => m.matmul(&a_s.t()?)? * s,
                Side::Tail => m.matmul(a_s)? * s,
            }
        };
        let (lambda, gamma) = (self.lambda.as_tensor(), self.gamma.as_tensor());
        let a_s = scaled_basis(&lambda.detach(), &a, &gamma.detach())?;
        let out = reshape(&product(&m.detach(), &a_s)?, &out_dims)?;
        drop(a_s);
        with_backward("randlora-basis-product", &[m, lambda, gamma], out, move |inputs, _, grad| {
            let [m, lambda, gamma] = [inputs[0], inputs[1], inputs[2]];
            let a_s = scaled_basis(&lambda.detach(), &a, &gamma.detach())?;
            let g = (reshape(grad, &[rows, n_out])? * s)?;
            let m_flat = reshape(&m.detach(), &[rows, k])?;
            let dm = needed(m, || match side {
                Side::Head => g.matmul(&a_s)?.reshape(m.dims()),
                Side::Tail => g.matmul(&a_s.t()?)?.reshape(m.dims()),
            })?;
            drop(a_s);
            let d_as = match side {
                Side::Head => g.t()?.matmul(&m_flat)?,
                Side::Tail => m_flat.t()?.matmul(&g)?,
            };
            let (grad_lambda, grad_gamma) = basis_grads(&d_as.reshape((r, nb, min))?, &a, lambda, gamma)?;
            Ok(vec![dm, Some(grad_lambda), Some(grad_gamma)])
        })
    }
}

/// `A_s = (lambda[:, :, None] * A * gamma[None]).flatten(0, 1): (r*nb, min)` for `lambda: (r, nb)`,
/// the basis view `A: (r, 1, min)` and `gamma: (nb, min)`, in `lambda`'s dtype.
fn scaled_basis(lambda: &Tensor, a: &Tensor, gamma: &Tensor) -> candle_core::Result<Tensor> {
    let (r, nb) = lambda.dims2()?;
    let min = gamma.dim(1)?;
    lambda.apply_op3(&a.to_dtype(lambda.dtype())?, gamma, ScaledBasis)?.reshape((r * nb, min))
}

impl AdapterCore for RandLora {
    fn peft_type(&self) -> &'static str {
        Self::PEFT_TYPE
    }

    fn features(&self) -> (usize, usize) {
        (self.in_features, self.out_features)
    }

    fn dtype(&self) -> DType {
        self.lambda.dtype()
    }

    fn frozen_tensors(&self) -> Vec<Tensor> {
        vec![self.shared.0.clone(), self.shared.1.clone()]
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        vec![("randlora_lambda".into(), self.lambda.clone()), ("randlora_gamma".into(), self.gamma.clone())]
    }

    fn saved_tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            ("randlora_lambda".into(), self.lambda.as_tensor().clone()),
            ("randlora_gamma".into(), self.gamma.as_tensor().clone()),
            (SHARED_KEYS[0].into(), self.shared.0.clone()),
            (SHARED_KEYS[1].into(), self.shared.1.clone()),
        ]
    }

    fn load_tensor(&mut self, suffix: &str, value: &Tensor) -> Result<()> {
        match suffix {
            "randlora_lambda" => Ok(self.lambda.set(value)?),
            "randlora_gamma" => Ok(self.gamma.set(value)?),
            key if SHARED_KEYS.contains(&key) => {
                // PEFT's per-layer copy of a shared basis: it must equal the shared one.
                let ours = if key == SHARED_KEYS[0] { &self.shared.0 } else { &self.shared.1 };
                let diff =
                    (value.to_dtype(DType::F32)? - ours.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
                if diff != 0.0 {
                    return Err(Error::Unsupported(format!("a layer's copy of {key} differs from base_model.{key}")));
                }
                Ok(())
            }
            other => Err(Error::Unsupported(format!("RANDLORA has no tensor `{other}`"))),
        }
    }
}

impl LowRankUpdate for RandLora {
    fn dropout(&self) -> f32 {
        self.dropout
    }

    fn head(&self, x: &Tensor) -> Result<Tensor> {
        let (_, a, s) = self.factors()?;
        Ok((matmul_t(x, &a)? * s)?)
    }

    fn tail(&self) -> Result<Tensor> {
        Ok(self.factors()?.0)
    }

    fn head_tail(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.in_is_min() {
            // The trainable side is the head: one fused node (see `basis_product`).
            return Ok((self.basis_product(x, Side::Head)?, self.flat_basis_b()?));
        }
        // The frozen random basis goes through the frozen-weight op: no basis-sized gradient.
        let (a_s, b_f) = self.scaled_bases()?;
        Ok(((frozen_linear(x, &b_f.t()?, None)? * self.scaling)?, a_s.t()?))
    }

    fn branch(&self, x: &Tensor) -> Result<Tensor> {
        if self.in_is_min() {
            let (h, b_f) = self.head_tail(x)?;
            return frozen_linear(&h, &b_f, None);
        }
        // in > out: s (x B_f) A_s, the trainable tail in one fused node.
        self.basis_product(&frozen_linear(x, &self.flat_basis_b()?.t()?, None)?, Side::Tail)
    }

    fn fuse_with_base(&self) -> bool {
        // With in > out the tail is trainable: `branch` takes its gradient in one node.
        self.in_is_min()
    }

    fn factors(&self) -> Result<(Tensor, Tensor, f64)> {
        let (a_s, b_f) = self.scaled_bases()?;
        Ok(if self.in_is_min() { (b_f, a_s, self.scaling) } else { (a_s.t()?, b_f.t()?, self.scaling) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU kernels (one pass each) against the formulas in f64 tensor ops, on shapes whose
    /// `min` is not a multiple of the kernel's eight lanes and with a strided basis view.
    #[test]
    fn cpu_kernels_match_the_einsum_formulas() -> Result<()> {
        let dev = Device::Cpu;
        let (r, nb, min) = (3, 5, 37);
        let lambda = Tensor::randn(0f32, 1., (r, nb), &dev)?;
        let gamma = Tensor::randn(0f32, 1., (nb, min), &dev)?;
        let a = Tensor::randn(0f32, 1., (r, 1, min + 4), &dev)?.narrow(2, 2, min)?; // a view
        let grad = Tensor::randn(0f32, 1., (r, nb, min), &dev)?;
        let f64s = |t: &Tensor| t.to_dtype(DType::F64);
        let (l64, a64, g64, d64) = (f64s(&lambda)?, f64s(&a)?, f64s(&gamma)?, f64s(&grad)?);

        let a_s = scaled_basis(&lambda, &a, &gamma)?;
        let want = l64.unsqueeze(2)?.broadcast_mul(&a64)?.broadcast_mul(&g64.unsqueeze(0)?)?.reshape((r * nb, min))?;
        let err = (a_s.to_dtype(DType::F64)? - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(err < 1e-5, "scaled basis: {err}");

        let (gl, gg) = basis_grads(&grad, &a, &lambda, &gamma)?;
        let ga = d64.broadcast_mul(&a64)?;
        let want_l = ga.broadcast_mul(&g64.unsqueeze(0)?)?.sum(2)?;
        let want_g = ga.broadcast_mul(&l64.unsqueeze(2)?)?.sum(0)?;
        for (got, want, what) in [(gl, want_l, "lambda"), (gg, want_g, "gamma")] {
            assert_eq!(got.dims(), want.dims(), "{what}");
            let err = (got.to_dtype(DType::F64)? - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(err < 1e-4, "grad {what}: {err}");
        }
        Ok(())
    }
}
