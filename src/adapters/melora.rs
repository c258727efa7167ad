//! MELoRA (Ren et al. 2024, "MELoRA: Mini-Ensemble Low-Rank Adapters for Parameter-Efficient
//! Fine-Tuning").
//!
//! ```text
//! n mini LoRAs on the block diagonal: the in features split into n equal contiguous chunks,
//! the out features likewise; mini i maps input chunk i to output chunk i:
//! A_i: (r_i, in/n), B_i: (out/n, r_i),  r_i = r / n,  s_i = strategy(alpha, r_i)
//! dW = blockdiag(s_1 B_1 A_1, ..., s_n B_n A_n)
//! y = x W0^T + b + drop(x) dW^T
//! ```
//! Equivalent rank `r = sum r_i` with `n` times fewer parameters than a LoRA of rank `r`. Each
//! mini's factor uses its own rank, as the official code does; with equal ranks all minis share
//! one factor. Init: each `A_i` kaiming-uniform (a = sqrt(5)), each `B_i = 0`. `in`, `out` and
//! `r` must be divisible by `n`. File format: `peft_type: "MELORA"` (LoRA's fields plus `n`),
//! keys `melora_A.<i>.weight`, `melora_B.<i>.weight`.
//!
//! The branch runs as one rank-`r` LoRA whose factors are the block-diagonal matrices (built from
//! the minis in every call): the flops of a rank-`r` LoRA, the parameters of the minis.

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::common::{check_dropout, check_rank, check_scaling, kaiming_uniform, var};
use super::lora::{LoraConfig, LoraInit};
use super::update::{matmul_t, LowRankUpdate};
use crate::adapter::{AdapterCore, BuiltAdapter};
use crate::method::{BuildContext, Method, MethodConfig, MethodParams, PeftField, Variant};
use crate::scaling::Scaling;
use crate::target::TargetConfig;
use crate::{Error, Result};

/// MELoRA's config: LoRA's fields (with `r` the equivalent rank) plus the number of minis `n`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeloraConfig {
    /// The number of mini LoRAs.
    pub n: usize,
    /// LoRA's fields; `r` is the equivalent rank `sum r_i`.
    #[serde(flatten)]
    pub lora: LoraConfig,
}

/// The number of minis when none is given (the CLI's and the sweep's default).
pub const DEFAULT_N: usize = 4;

impl MeloraConfig {
    /// `n` minis of equivalent rank `r` (each of rank `r / n`) on `target_modules`.
    pub fn new(n: usize, r: usize, alpha: f64, target_modules: &[&str]) -> Self {
        Self { n, lora: LoraConfig::lora(r, alpha, target_modules) }
    }
}

impl MethodConfig for MeloraConfig {
    const PEFT_FIELDS: &'static [PeftField] = <LoraConfig as MethodConfig>::PEFT_FIELDS;

    fn target(&self) -> &TargetConfig {
        &self.lora.target
    }

    fn target_mut(&mut self) -> &mut TargetConfig {
        &mut self.lora.target
    }

    fn validate(&self) -> Result<()> {
        self.lora.validate()?;
        if self.n == 0 {
            return Err(Error::config("n", "MELoRA needs at least one mini LoRA"));
        }
        if self.lora.use_dora || !matches!(self.lora.init_lora_weights, LoraInit::Kaiming | LoraInit::Random) {
            return Err(Error::Unsupported("MELoRA supports init_lora_weights true or false and no use_dora".into()));
        }
        Ok(())
    }

    fn set_scaling(&mut self, strategy: Scaling) -> Result<()> {
        self.lora.set_scaling(strategy)
    }

    fn to_peft(&self) -> Result<Self> {
        Ok(Self { n: self.n, lora: self.lora.peft_equivalent() })
    }
}

impl Method for Melora {
    const PEFT_TYPE: &'static str = "MELORA";
    const VARIANTS: &'static [Variant] = &[Variant {
        name: "melora",
        peft: "MELORA",
        summary: "MELoRA (Ren et al. 2024): n mini LoRAs on the block diagonal (n: --set n=4)",
    }];
    type Config = MeloraConfig;

    fn config(_name: &str, params: &MethodParams) -> Result<MeloraConfig> {
        Ok(MeloraConfig { n: DEFAULT_N, lora: LoraConfig::from_params(params) })
    }

    fn build(config: &MeloraConfig, ctx: BuildContext<'_>) -> Result<BuiltAdapter> {
        let path = ctx.path;
        let (r, alpha) = config.lora.rank_and_alpha(path)?;
        let (out, inp) = ctx.base.weight.dims2()?;
        let n = config.n;
        check_rank(r)?;
        for (what, d) in [("in_features", inp), ("out_features", out), ("r", r)] {
            if d % n != 0 {
                return Err(Error::config(
                    "n",
                    format!("MELoRA with n = {n} minis needs {what} divisible by n, got {d} at {path}"),
                ));
            }
        }
        let ri = r / n;
        let s = check_scaling("lora_alpha", alpha, config.lora.strategy().scale(alpha, ri))?;
        let (dev, dtype) = (ctx.base.weight.device(), ctx.dtype);
        let mut minis = Vec::with_capacity(n);
        for _ in 0..n {
            let a = kaiming_uniform(&mut *ctx.rng, ri, inp / n, dtype, dev)?;
            let b = match config.lora.init_lora_weights {
                LoraInit::Random => kaiming_uniform(&mut *ctx.rng, out / n, ri, dtype, dev)?,
                _ => Tensor::zeros((out / n, ri), dtype, dev)?,
            };
            minis.push((var(a)?, var(b)?));
        }
        let melora = Melora {
            minis,
            scaling: s,
            dropout: check_dropout("lora_dropout", config.lora.lora_dropout)?,
            in_features: inp,
            out_features: out,
        };
        Ok(BuiltAdapter::new(melora))
    }
}

/// One layer's MELoRA: `n` mini `(A_i, B_i)` pairs on the block diagonal.
#[derive(Debug)]
pub struct Melora {
    minis: Vec<(Var, Var)>,
    scaling: f64,
    dropout: f32,
    in_features: usize,
    out_features: usize,
}

impl Melora {
    /// The minis `(A_i, B_i)`.
    pub fn minis(&self) -> &[(Var, Var)] {
        &self.minis
    }

    /// `blockdiag(M_1, ..., M_n)` of the minis' `A` (`pick = 0`) or `B` (`pick = 1`).
    fn block_diag(&self, pick: usize) -> Result<Tensor> {
        let blocks: Vec<&Tensor> =
            self.minis.iter().map(|m| if pick == 0 { m.0.as_tensor() } else { m.1.as_tensor() }).collect();
        let cols: usize = blocks.iter().map(|b| b.dim(1)).sum::<candle_core::Result<usize>>()?;
        let mut rows = Vec::with_capacity(blocks.len());
        let mut offset = 0;
        for b in blocks {
            let w = b.dim(1)?;
            rows.push(b.pad_with_zeros(1, offset, cols - offset - w)?);
            offset += w;
        }
        Ok(Tensor::cat(&rows, 0)?)
    }
}

impl AdapterCore for Melora {
    fn peft_type(&self) -> &'static str {
        Self::PEFT_TYPE
    }

    fn features(&self) -> (usize, usize) {
        (self.in_features, self.out_features)
    }

    fn dtype(&self) -> DType {
        self.minis[0].0.dtype()
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        let a = self.minis.iter().enumerate().map(|(i, m)| (format!("melora_A.{i}.weight"), m.0.clone()));
        let b = self.minis.iter().enumerate().map(|(i, m)| (format!("melora_B.{i}.weight"), m.1.clone()));
        a.chain(b).collect()
    }
}

impl LowRankUpdate for Melora {
    fn dropout(&self) -> f32 {
        self.dropout
    }

    fn head(&self, x: &Tensor) -> Result<Tensor> {
        Ok((matmul_t(x, &self.block_diag(0)?)? * self.scaling)?)
    }

    fn tail(&self) -> Result<Tensor> {
        self.block_diag(1)
    }

    fn factors(&self) -> Result<(Tensor, Tensor, f64)> {
        Ok((self.block_diag(1)?, self.block_diag(0)?, self.scaling))
    }
}
