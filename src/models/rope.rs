//! Rotary position embeddings' frequencies (Su et al. 2021, "RoFormer"), with the RoPE scalings
//! of the configs this crate loads: none (`default`), position interpolation (`linear`, Chen et
//! al. 2023) and Llama 3's (`llama3`). Any other `rope_type` is refused by name.
//!
//! ```text
//! default   inv_freq_i = theta^(-2i / d)                                 i = 0 .. d/2
//! linear    inv_freq_i / factor
//! llama3    wavelen_i = 2 pi / inv_freq_i
//!           inv_freq_i                       wavelen_i < L / high_freq_factor
//!           inv_freq_i / factor              wavelen_i > L / low_freq_factor
//!           (1 - s) inv_freq_i / factor + s inv_freq_i   otherwise,
//!           s = (L / wavelen_i - low_freq_factor) / (high_freq_factor - low_freq_factor)
//!           L = original_max_position_embeddings
//! ```
//! (transformers' `modeling_rope_utils`: `_compute_default_rope_parameters`,
//! `_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`; the frequencies are
//! computed in f32 as there.)

use serde_json::Value;

/// The RoPE of a config: its base and scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeParameters {
    /// The base `theta`.
    pub theta: f64,
    /// The scaling of the frequencies.
    pub scaling: RopeScaling,
}

/// A RoPE scaling (`rope_parameters.rope_type`, or an older config's `rope_scaling.type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `default`: none.
    None,
    /// `linear`: every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// `llama3`: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        /// The divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are divided.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was trained at before the extension.
        original_max_position_embeddings: f64,
    },
}

impl RopeParameters {
    /// Reads a config's RoPE: `rope_parameters` (transformers >= 5: `rope_type`, `rope_theta`
    /// and the scaling's own keys) when present, else `rope_theta` and `rope_scaling` (`type`
    /// or `rope_type`). `default_theta` when no base is given. Errors name the field.
    pub fn from_config(
        rope_parameters: Option<&Value>,
        rope_theta: Option<f64>,
        rope_scaling: Option<&Value>,
        default_theta: f64,
    ) -> std::result::Result<Self, (String, String)> {
        let (params, field) = match (rope_parameters.filter(|p| !p.is_null()), rope_scaling.filter(|s| !s.is_null())) {
            (Some(p), _) => (Some(p), "rope_parameters"),
            (None, Some(s)) => (Some(s), "rope_scaling"),
            (None, None) => (None, "rope_parameters"),
        };
        let theta =
            params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).or(rope_theta).unwrap_or(default_theta);
        if !(theta.is_finite() && theta > 0.0) {
            let field = if params.and_then(|p| p.get("rope_theta")).is_some() {
                format!("{field}.rope_theta")
            } else {
                "rope_theta".into()
            };
            return Err((field, format!("is {theta}; expected a positive RoPE base such as 10000")));
        }
        let Some(params) = params else { return Ok(Self { theta, scaling: RopeScaling::None }) };
        if !params.is_object() {
            return Err((field.into(), format!("is {params}; expected an object with a rope_type")));
        }
        if let Some(f) = params.get("partial_rotary_factor").and_then(Value::as_f64).filter(|&f| f != 1.0) {
            return Err((
                format!("{field}.partial_rotary_factor"),
                format!("is {f}; only 1.0 (every channel of a head rotated) is supported"),
            ));
        }
        let kind = params.get("rope_type").or_else(|| params.get("type")).and_then(Value::as_str).unwrap_or("default");
        let number = |key: &str| -> std::result::Result<f64, (String, String)> {
            params.get(key).and_then(Value::as_f64).filter(|v| v.is_finite() && *v > 0.0).ok_or_else(|| {
                (
                    format!("{field}.{key}"),
                    format!(
                        "is {}; a {kind} RoPE scaling needs a positive number",
                        params.get(key).unwrap_or(&Value::Null)
                    ),
                )
            })
        };
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: number("factor")? },
            "llama3" => {
                let (low, high) = (number("low_freq_factor")?, number("high_freq_factor")?);
                if high <= low {
                    return Err((
                        format!("{field}.high_freq_factor"),
                        format!("is {high}; expected more than low_freq_factor ({low})"),
                    ));
                }
                RopeScaling::Llama3 {
                    factor: number("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: number("original_max_position_embeddings")?,
                }
            }
            other => {
                return Err((
                    format!("{field}.rope_type"),
                    format!("is \"{other}\"; supported RoPE types are default, linear and llama3"),
                ))
            }
        };
        Ok(Self { theta, scaling })
    }

    /// The `head_dim / 2` inverse frequencies.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        (0..head_dim / 2)
            .map(|i| {
                let f = 1.0 / (self.theta as f32).powf(2.0 * i as f32 / head_dim as f32);
                match self.scaling {
                    RopeScaling::None => f,
                    RopeScaling::Linear { factor } => f / factor as f32,
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings,
                    } => {
                        let (factor, low, high, l) = (
                            factor as f32,
                            low_freq_factor as f32,
                            high_freq_factor as f32,
                            original_max_position_embeddings as f32,
                        );
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < l / high {
                            f
                        } else if wavelen > l / low {
                            f / factor
                        } else {
                            let s = (l / wavelen - low) / (high - low);
                            (1.0 - s) * f / factor + s * f
                        }
                    }
                }
            })
            .collect()
    }
}

impl RopeParameters {
    /// llama.cpp's `rope_freqs` tensor for a Llama 3 scaling, as `convert_hf_to_gguf.py` writes
    /// it: the divisor of each of the `head_dim / 2` frequencies (1 where kept, `factor` where
    /// divided, `1 / ((1 - s) / factor + s)` on the ramp). `None` for the other scalings.
    pub fn llama_cpp_divisors(&self, head_dim: usize) -> Option<Vec<f32>> {
        let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } =
            self.scaling
        else {
            return None;
        };
        let (low_wavelen, high_wavelen) =
            (original_max_position_embeddings / low_freq_factor, original_max_position_embeddings / high_freq_factor);
        let plain = Self { theta: self.theta, scaling: RopeScaling::None }.inv_freq(head_dim);
        Some(
            plain
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f as f64;
                    let d = if wavelen < high_wavelen {
                        1.0
                    } else if wavelen > low_wavelen {
                        factor
                    } else {
                        let s = (original_max_position_embeddings / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        1.0 / ((1.0 - s) / factor + s)
                    };
                    d as f32
                })
                .collect(),
        )
    }

    /// The RoPE of base `theta` whose llama.cpp `rope_freqs` are `divisors` (a Llama 3 GGUF
    /// file): a Llama 3 scaling with `factor` the largest divisor and the ramp's ends solved from
    /// the divisors between 1 and `factor` (only the ratios `L / low_freq_factor` and
    /// `L / high_freq_factor` matter, so `low_freq_factor` is 1; where the divisors leave the
    /// ends free, any that fit are taken). Checked: the result's divisors equal `divisors`
    /// (1e-5 relative). All ones is no scaling. The error says what does not fit.
    pub fn from_llama_cpp_divisors(theta: f64, head_dim: usize, divisors: &[f32]) -> Result<Self, String> {
        let plain = Self { theta, scaling: RopeScaling::None };
        if divisors.len() != head_dim / 2 {
            return Err(format!("has {} values; expected head_dim / 2 = {}", divisors.len(), head_dim / 2));
        }
        if let Some(d) = divisors.iter().find(|d| !(d.is_finite() && **d >= 1.0 - 1e-6)) {
            return Err(format!("has the divisor {d}; Llama 3's are at least 1"));
        }
        let factor = divisors.iter().fold(1f64, |m, &d| m.max(d as f64));
        if factor <= 1.0 + 1e-6 {
            return Ok(plain);
        }
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b;
        // (wavelength, divisor) of each frequency, shortest wavelength first.
        let points: Vec<(f64, f64)> = plain
            .inv_freq(head_dim)
            .iter()
            .zip(divisors)
            .map(|(&f, &d)| (2.0 * std::f64::consts::PI / f as f64, d as f64))
            .collect();
        let kept = points.iter().filter(|(_, d)| close(*d, 1.0)).map(|p| p.0).fold(0f64, f64::max);
        let divided = points.iter().filter(|(_, d)| close(*d, factor)).map(|p| p.0).fold(f64::INFINITY, f64::min);
        // On the ramp, s = (1 / d - 1 / factor) / (1 - 1 / factor) = (W_low / w - 1) / (W_low / W_high - 1).
        let ramp: Vec<(f64, f64)> = points
            .iter()
            .filter(|(_, d)| !close(*d, 1.0) && !close(*d, factor))
            .map(|&(w, d)| (w, (1.0 / d - 1.0 / factor) / (1.0 - 1.0 / factor)))
            .collect();
        let (w_low, w_high) = match ramp.as_slice() {
            [] if divided.is_finite() => (divided, if kept > 0.0 { kept } else { divided / 4.0 }),
            [] => return Err("has no divisor equal to its largest".into()),
            [(w, s)] => {
                // Any W_high in (max(kept, s w), w) fits; W_low follows from s.
                let w_high = (kept.max(s * w) + w) / 2.0;
                ((1.0 - s) / (1.0 / w - s / w_high), w_high)
            }
            [(w0, s0), .., (w1, s1)] => {
                // s = A / w - B, with W_low = A / B and W_high = W_low B / (B + 1).
                let a = (s0 - s1) / (1.0 / w0 - 1.0 / w1);
                let b = a / w0 - s0;
                (a / b, a / (b + 1.0))
            }
        };
        let solved = Self {
            theta,
            scaling: RopeScaling::Llama3 {
                factor,
                low_freq_factor: 1.0,
                high_freq_factor: w_low / w_high,
                original_max_position_embeddings: w_low,
            },
        };
        let again = solved.llama_cpp_divisors(head_dim).expect("a Llama 3 scaling");
        match again.iter().zip(divisors).position(|(a, &d)| !close(*a as f64, d as f64)) {
            None if w_high.is_finite() && w_low > w_high && w_high > 0.0 => Ok(solved),
            _ => Err(format!("is not Llama 3's RoPE scaling of any parameters (divisors {divisors:?})")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama 3.1's parameters (head_dim 128, theta 500000, factor 8, low 1, high 4, 8192):
    /// the first frequency kept, the last divided, one on the ramp. (The whole model against
    /// transformers: `tests/families.rs`.)
    #[test]
    fn llama3_frequencies() {
        let p = RopeParameters::from_config(
            Some(&serde_json::json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
            None,
            None,
            10_000.0,
        )
        .unwrap();
        let f = p.inv_freq(128);
        let plain = RopeParameters { theta: 500000.0, scaling: RopeScaling::None }.inv_freq(128);
        assert_eq!(f[0], plain[0]);
        assert!((f[63] - plain[63] / 8.0).abs() <= f32::EPSILON * plain[63]);
        // Index 30: wavelength 2 pi 500000^(30/64) = 2.9k, between 8192 / 4 and 8192: the ramp.
        let w30 = 2.0 * std::f32::consts::PI / plain[30];
        assert!(w30 > 2048.0 && w30 < 8192.0, "{w30}");
        let s = (8192.0 / w30 - 1.0) / 3.0;
        assert!((f[30] - ((1.0 - s) * plain[30] / 8.0 + s * plain[30])).abs() < 1e-9);
    }

    /// llama.cpp's divisors of Llama 3.1's scaling give its parameters back (with a ramp of
    /// several frequencies), and so do those of ramps of one frequency and of none.
    #[test]
    fn llama3_scaling_from_llama_cpp_divisors() {
        let llama31 = RopeParameters {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        };
        for (p, head_dim) in [
            (llama31.clone(), 128),
            (RopeParameters { theta: 1e4, ..llama31.clone() }, 16),
            (RopeParameters { theta: 1e4, ..llama31.clone() }, 6),
        ] {
            let divisors = p.llama_cpp_divisors(head_dim).unwrap();
            let back = RopeParameters::from_llama_cpp_divisors(p.theta, head_dim, &divisors).unwrap();
            for (a, b) in back.inv_freq(head_dim).iter().zip(p.inv_freq(head_dim)) {
                assert!((a - b).abs() <= 1e-6 * b, "{head_dim}: {a} vs {b}");
            }
        }
        assert_eq!(RopeParameters::from_llama_cpp_divisors(1e4, 8, &[1.0; 4]).unwrap().scaling, RopeScaling::None);
        assert!(RopeParameters::from_llama_cpp_divisors(1e4, 8, &[1.0, 3.0, 1.0, 2.0]).is_err());
        assert!(RopeParameters::from_llama_cpp_divisors(1e4, 8, &[1.0; 3]).is_err());
    }

    #[test]
    fn unsupported_rope_types_are_named() {
        let e = RopeParameters::from_config(None, None, Some(&serde_json::json!({"type": "yarn", "factor": 4.0})), 1e4)
            .unwrap_err();
        assert_eq!(e.0, "rope_scaling.rope_type");
        assert!(e.1.contains("yarn"), "{}", e.1);
        let old = RopeParameters::from_config(
            None,
            Some(5e5),
            Some(&serde_json::json!({"type": "linear", "factor": 2.0})),
            1e4,
        )
        .unwrap();
        assert_eq!(old, RopeParameters { theta: 5e5, scaling: RopeScaling::Linear { factor: 2.0 } });
    }
}
